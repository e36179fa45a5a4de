"""What one-shot pruning does, as a frozen value validated at construction (bad values name their field)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from transact.core.correct import get_corrector
from transact.core.metrics import METRICS, get_metric
from transact.errors import TransactError
from transact.recipes.text import Calibration


@dataclass(frozen=True)
class Width:
    """A kept width: an absolute count (``int`` >= 1) or a fraction of the original in (0, 1)."""

    value: int | float

    def __post_init__(self) -> None:
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TransactError(f"width must be a number, got {v!r}")
        if isinstance(v, float) and not (0.0 < v < 1.0):
            raise TransactError(f"a fractional width must lie in (0, 1), got {v}")
        if isinstance(v, int) and v < 1:
            raise TransactError(f"a width count must be at least 1, got {v}")

    @classmethod
    def parse(cls, text: str | int | float) -> Width:
        """'6' -> 6 units; '0.5' -> half of the original. '1.0' or '6.0' are refused as ambiguous."""
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            return cls(text)
        s = str(text).strip()
        try:
            return cls(int(s))
        except ValueError:
            pass
        try:
            f = float(s)
        except ValueError:
            raise TransactError(f"width {text!r} is neither a count nor a fraction in (0, 1)") from None
        if not math.isfinite(f) or not 0.0 < f < 1.0:
            raise TransactError(f"width {text!r}: give a whole count (e.g. 6) or a fraction in (0, 1) (e.g. 0.5)")
        return cls(f)

    @property
    def is_fraction(self) -> bool:
        return isinstance(self.value, float)

    def of(self, total: int) -> int:
        """The count this width keeps out of ``total`` (fractions round to nearest, at least 1)."""
        if self.is_fraction:
            return max(1, round(self.value * total))
        return int(self.value)

    def to_json(self) -> int | float:
        return self.value


WIDTHS = ("heads", "kv_heads", "mlp", "experts")


@dataclass(frozen=True)
class PruneRecipe:
    """One-shot pruning: target widths per layer, the salience metric, correctors, and calibration.

    ``heads``/``kv_heads``/``mlp`` left as None keep that dimension whole; at least one (or ``experts``)
    must be given. In a mixture of experts ``mlp`` is each expert's width and ``experts`` the experts each
    layer keeps; ``gate_weighted`` measures the experts' channels on their router-weighted inputs (the
    activation the expert's output is linear in) rather than the raw ones.
    ``metric`` and each of ``correctors`` (default: the least-squares refit) name registered plug-ins
    (``transact.core.metrics``, ``transact.core.correct``). ``alpha`` None means the default 10 / head_dim
    (paper eq. 5 with the authors' setting); it is an option of the metrics that declare it. ``seed`` draws
    the calibration windows (and the random metric's scores).
    """

    heads: Width | None = None
    kv_heads: Width | None = None
    mlp: Width | None = None
    experts: Width | None = None
    gate_weighted: bool = True
    metric: str = "transact"
    alpha: float | None = None
    seed: int = 0
    calibration: Calibration = field(default_factory=Calibration)
    # The least-squares refit by default: it lowered one-shot perplexity for every metric at every width
    # measured (docs/results.md, "Least-squares refit"); () prunes by slicing alone.
    correctors: tuple[str, ...] = ("refit",)
    damp: float | None = None  # the refit's damping (None: its default)

    def __post_init__(self) -> None:
        for name in WIDTHS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, Width):
                object.__setattr__(self, name, Width.parse(value))
        if all(getattr(self, name) is None for name in WIDTHS):
            raise TransactError("nothing to prune: give heads, kv_heads, mlp and/or experts")
        if not isinstance(self.gate_weighted, bool):
            raise TransactError(f"gate_weighted must be true or false, got {self.gate_weighted!r}")
        metric = get_metric(self.metric)
        if self.alpha is not None and (not math.isfinite(self.alpha) or self.alpha < 0):
            raise TransactError(f"alpha must be a finite number >= 0, got {self.alpha}")
        if self.alpha is not None and "alpha" not in metric.options:
            owners = [m.name for _, m in METRICS.items() if "alpha" in m.options]
            raise TransactError(f"alpha is an option of the {', '.join(owners)} metric; "
                                f"metric {self.metric!r} has none")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TransactError(f"seed must be an integer, got {self.seed!r}")
        self._check_correctors()

    def _check_correctors(self) -> None:
        object.__setattr__(self, "correctors", tuple(self.correctors))
        correctors = [get_corrector(name) for name in self.correctors]
        if len(set(self.correctors)) != len(self.correctors):
            raise TransactError(f"a corrector is named twice in {list(self.correctors)}")
        for c in correctors:
            clash = [name for name in c.conflicts if name in self.correctors]
            if clash:
                raise TransactError(f"the correctors {c.name} and {clash[0]} both compensate the removed channels; "
                                    "choose one")
        if self.damp is not None:
            if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not \
                    (math.isfinite(self.damp) and self.damp >= 0):
                raise TransactError(f"damp must be a finite number >= 0, got {self.damp!r}")
            if not any("damp" in c.options for c in correctors):
                raise TransactError("damp weighs the refit's damping; add the refit corrector (--reconstruct)")

    @property
    def statistics(self) -> tuple[str, ...]:
        """What calibration must collect for the metric and every corrector (empty: no calibration)."""
        names = list(get_metric(self.metric).statistics)
        for corrector in self.correctors:
            names += [s for s in get_corrector(corrector).statistics if s not in names]
        return tuple(names)

    @property
    def needs_calibration(self) -> bool:
        return bool(self.statistics)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for name in WIDTHS:
            width = getattr(self, name)
            out[name] = None if width is None else width.to_json()
        out["correctors"] = list(self.correctors)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PruneRecipe:
        data = dict(data)
        calibration = Calibration(**data.pop("calibration", {}))
        data.setdefault("correctors", [])  # plans written before correctors existed had none
        if data.pop("bias_compensation", False):  # how plans written before correctors recorded FLAP's bias
            data["correctors"] = [*data.get("correctors", ()), "flap_bias"]
        for note in ("shot", "layerwise", "sequential"):  # how the plan was made, noted beside the recipe
            data.pop(note, None)
        return cls(calibration=calibration, **data)
