"""What one-shot pruning does, as a frozen value validated at construction (bad values name their field)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from transact.checks import fields_from
from transact.core.allocate import WidthSearch
from transact.core.budget import Budget
from transact.core.correct import get_corrector
from transact.core.depth import DepthOptions
from transact.core.metrics import get_metric
from transact.errors import TransactError
from transact.options import build_options, options_json
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

    ``heads``/``kv_heads``/``mlp`` left as None keep that dimension whole; a step needs at least one of them
    (or ``experts``): a recipe without widths says only *how* to prune (the ``prune`` section of a
    ``transact run`` recipe, whose shots bring the widths). In a mixture of experts ``mlp`` is each expert's
    width and ``experts`` the experts each layer keeps; ``gate_weighted`` measures the experts' channels on
    their router-weighted inputs (the activation the expert's output is linear in) rather than the raw ones.
    ``metric`` and each of ``correctors`` (default: the least-squares refit) name registered plug-ins
    (``transact.core.metrics``, ``transact.core.correct``); ``metric_options`` and ``corrector_options`` (by
    corrector name) hold their own options, given as mappings or as their options values (None or absent:
    the plug-in's defaults). ``seed`` draws the calibration windows (and the random metric's scores).
    """

    heads: Width | None = None
    kv_heads: Width | None = None
    mlp: Width | None = None
    experts: Width | None = None
    gate_weighted: bool = True
    # eq. 5 for heads and channels with KV groups kept by what the correction leaves: eq. 5's own group choice
    # was worse than random on Qwen2.5-Coder-0.5B once refitted (docs/results.md, "Quality that transfers");
    # the paper's eq. 5 alone is metric "transact".
    metric: str = "transact_residual"
    metric_options: Any = None
    seed: int = 0
    # every pruned width (heads x head_dim, MLP and expert channels) a multiple of this, for quantized formats
    # and kernels: 256 for llama.cpp's K-quants, 32 for Q4_0/Q8_0, 128 for vLLM's Marlin (1: any width)
    multiple_of: int = 1
    calibration: Calibration = field(default_factory=Calibration)
    # The least-squares refit by default: it lowered one-shot perplexity for every metric at every width
    # measured (docs/results.md, "Least-squares refit"); () prunes by slicing alone.
    correctors: tuple[str, ...] = ("refit",)
    corrector_options: dict[str, Any] = field(default_factory=dict)
    # depth pruning before the widths: a contiguous block of layers dropped (transact.core.depth; None: none)
    depth: DepthOptions | None = None
    # MLP widths per layer (mean ``mlp``) searched on the calibration loss (transact.core.allocate; None:
    # every layer keeps ``mlp`` channels)
    allocation: WidthSearch | None = None
    # a share of the parameters to keep, met by the mix of dropped layers and uniform widths with the lowest
    # calibration loss (transact.core.budget; None: the widths and depth above say what to prune)
    budget: Budget | None = None

    def __post_init__(self) -> None:
        for name in WIDTHS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, Width):
                object.__setattr__(self, name, Width.parse(value))
        if not isinstance(self.gate_weighted, bool):
            raise TransactError(f"gate_weighted must be true or false, got {self.gate_weighted!r}")
        metric = get_metric(self.metric)
        object.__setattr__(self, "metric_options",
                           build_options(metric.options, self.metric_options, f"metric {self.metric!r}"))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TransactError(f"seed must be an integer, got {self.seed!r}")
        if isinstance(self.multiple_of, bool) or not isinstance(self.multiple_of, int) or self.multiple_of < 1:
            raise TransactError(f"multiple_of must be a positive integer, got {self.multiple_of!r}")
        if not isinstance(self.calibration, Calibration):
            object.__setattr__(self, "calibration", Calibration(**fields_from(Calibration, self.calibration,
                                                                              "calibration")))
        self._check_correctors()
        if self.depth is not None and not isinstance(self.depth, DepthOptions):
            object.__setattr__(self, "depth", DepthOptions(**fields_from(DepthOptions, self.depth, "depth")))
        if self.allocation is not None and not isinstance(self.allocation, WidthSearch):
            object.__setattr__(self, "allocation", WidthSearch(**fields_from(WidthSearch, self.allocation,
                                                                             "allocation")))
        if self.allocation is not None:
            self._check_allocation()
        if self.budget is not None:
            self._check_budget()

    def _check_budget(self) -> None:
        """A budget decides the widths and the depth, so the recipe names neither; a width search then spreads
        the chosen MLP width over the layers, which a KV-cache budget (the MLP kept whole) leaves nothing to."""
        if not isinstance(self.budget, Budget):
            object.__setattr__(self, "budget", Budget(**fields_from(Budget, self.budget, "budget")))
        named = [name for name in WIDTHS if getattr(self, name) is not None]
        if named or self.depth is not None:
            what = named[0] if named else "depth (layers to drop)"
            raise TransactError(f"a budget chooses the widths and the layers to drop itself; give either the budget "
                                f"or {what}, not both")
        if self.allocation is not None and self.budget.kind == "kv":
            raise TransactError("a KV-cache budget keeps every MLP channel, so a per-layer MLP width search has "
                                "nothing to spread; give the budget without the search, or a params/flops budget")

    def _check_allocation(self) -> None:
        """A width search needs the mean MLP width, and a corrector it can try at every width (the refit, or
        none); its candidates are scored on calibration windows."""
        if self.mlp is None and self.budget is None:  # a budget chooses the mean width
            raise TransactError("a per-layer width search needs the mean MLP width (mlp / --mlp), or a budget")
        other = [name for name in self.correctors if name != "refit"]
        if other:
            raise TransactError(f"a per-layer width search tries every width with the refit or with no corrector, "
                                f"not with {other[0]}")
        needed = max(self.allocation.first_samples, self.allocation.final_samples)
        if self.calibration.samples < needed:
            raise TransactError(f"the width search scores candidates on {needed} calibration windows; the "
                                f"calibration has {self.calibration.samples}")

    def _check_correctors(self) -> None:
        if isinstance(self.correctors, str) or not isinstance(self.correctors, (list, tuple)):
            raise TransactError(f"correctors must be a list of corrector names, got {self.correctors!r}")
        object.__setattr__(self, "correctors", tuple(self.correctors))
        correctors = [get_corrector(name) for name in self.correctors]
        if len(set(self.correctors)) != len(self.correctors):
            raise TransactError(f"a corrector is named twice in {list(self.correctors)}")
        for c in correctors:
            clash = [name for name in c.conflicts if name in self.correctors]
            if clash:
                raise TransactError(f"the correctors {c.name} and {clash[0]} both compensate the removed channels; "
                                    "choose one")
        given = self.corrector_options or {}
        if not isinstance(given, dict):
            raise TransactError(f"corrector_options must map corrector names to their options, got {given!r}")
        idle = [name for name in given if name not in self.correctors]
        if idle:
            get_corrector(idle[0])  # an unknown name is refused as such
            raise TransactError(f"options are given for the corrector {idle[0]!r}, which this recipe does not run "
                                f"(correctors: {', '.join(self.correctors) or 'none'})")
        object.__setattr__(self, "corrector_options", {
            c.name: build_options(c.options, given.get(c.name), f"corrector {c.name!r}") for c in correctors})

    def options_of(self, corrector: str) -> Any:
        """The options of a corrector this recipe runs (None where it does not run it)."""
        return self.corrector_options.get(corrector)

    @property
    def has_widths(self) -> bool:
        """Whether the recipe names any width to prune to (a recipe without says only how to prune)."""
        return any(getattr(self, name) is not None for name in WIDTHS)

    @property
    def statistics(self) -> tuple[str, ...]:
        """What calibration must collect for the metric and every corrector (empty: no calibration)."""
        names = list(get_metric(self.metric).statistics)
        for corrector in self.correctors:
            names += [s for s in get_corrector(corrector).statistics if s not in names]
        return tuple(names)

    @property
    def needs_calibration(self) -> bool:
        return bool(self.statistics) or self.depth is not None or self.budget is not None

    @property
    def prunes_something(self) -> bool:
        """Whether the recipe drops layers, names a width or a budget."""
        return self.has_widths or self.depth is not None or self.budget is not None

    def to_json(self) -> dict[str, Any]:
        out = {name: None if getattr(self, name) is None else getattr(self, name).to_json() for name in WIDTHS}
        out.update(gate_weighted=self.gate_weighted, metric=self.metric,
                   metric_options=options_json(self.metric_options), seed=self.seed,
                   calibration=asdict(self.calibration), correctors=list(self.correctors),
                   corrector_options={name: options_json(o) for name, o in self.corrector_options.items()})
        if self.multiple_of != 1:  # recorded only where used, so other plans read as before
            out["multiple_of"] = self.multiple_of
        if self.depth is not None:
            out["depth"] = self.depth.to_json()
        if self.allocation is not None:
            out["allocation"] = asdict(self.allocation)
        if self.budget is not None:
            out["budget"] = self.budget.to_json()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PruneRecipe:
        """A recipe from its JSON (as plans record it); records written before plug-ins owned their options
        (``alpha``, ``damp`` beside the widths, ``bias_compensation``) are read as the same recipe."""
        data = _with_owned_options(dict(data))
        # how the plan was made, noted beside the recipe
        for note in ("shot", "layerwise", "sequential", "mlp_score_choice"):
            data.pop(note, None)
        return cls(**data)


def _with_owned_options(data: dict[str, Any]) -> dict[str, Any]:
    """A recipe record in today's layout: the metric's ``alpha`` and the refit's ``damp``, once fields of the
    recipe itself, become the plug-ins' options (a None was the default, and is dropped); plans written before
    correctors existed have none, or FLAP's bias as ``bias_compensation``."""
    data.setdefault("correctors", [])
    if data.pop("bias_compensation", False):
        data["correctors"] = [*data["correctors"], "flap_bias"]
    alpha, damp = data.pop("alpha", None), data.pop("damp", None)
    if alpha is not None:
        data["metric_options"] = {**(data.get("metric_options") or {}), "alpha": alpha}
    if damp is not None:
        options = dict(data.get("corrector_options") or {})
        options["refit"] = {**options.get("refit", {}), "damp": damp}
        data["corrector_options"] = options
    return data
