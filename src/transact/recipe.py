"""What to prune and how, as frozen values validated at construction (bad values name their field)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from transact.errors import TransactError

# transact: paper eq. 5. flap, minitron, taylor: other tools' importance metrics, on the same plan
# structure. random, magnitude: data-free controls.
METRICS = ("transact", "flap", "minitron", "taylor", "random", "magnitude")
DATA_FREE_METRICS = ("random", "magnitude")
BUILTIN = "builtin"


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


@dataclass(frozen=True)
class Calibration:
    """Where calibration text comes from and how much of it is used.

    ``text`` is a .txt/.jsonl file, a directory of them, or ``"builtin"`` (the offline corpus).
    """

    text: str = BUILTIN
    samples: int = 128
    seq_len: int = 512
    batch_size: int = 4

    def __post_init__(self) -> None:
        for name in ("samples", "seq_len", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TransactError(f"calibration.{name} must be a positive integer, got {value!r}")
        if self.seq_len < 2:
            raise TransactError("calibration.seq_len must be at least 2")


@dataclass(frozen=True)
class PruneRecipe:
    """One-shot pruning: target widths per layer, the salience metric, and calibration.

    ``heads``/``kv_heads``/``mlp`` left as None keep that dimension whole; at least one must be given.
    ``alpha`` None means the default 10 / head_dim (paper eq. 5 with the authors' setting).
    """

    heads: Width | None = None
    kv_heads: Width | None = None
    mlp: Width | None = None
    metric: str = "transact"
    alpha: float | None = None
    seed: int = 0
    calibration: Calibration = field(default_factory=Calibration)

    def __post_init__(self) -> None:
        for name in ("heads", "kv_heads", "mlp"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Width):
                object.__setattr__(self, name, Width.parse(value))
        if self.heads is None and self.kv_heads is None and self.mlp is None:
            raise TransactError("nothing to prune: give heads, kv_heads and/or mlp")
        if self.metric not in METRICS:
            raise TransactError(f"metric {self.metric!r} is unknown; choose one of {', '.join(METRICS)}")
        if self.alpha is not None and (not math.isfinite(self.alpha) or self.alpha < 0):
            raise TransactError(f"alpha must be a finite number >= 0, got {self.alpha}")
        if self.alpha is not None and self.metric != "transact":
            raise TransactError(f"alpha weights eq. 5 of the transact metric; metric {self.metric!r} has none")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TransactError(f"seed must be an integer, got {self.seed!r}")

    @property
    def needs_calibration(self) -> bool:
        return self.metric not in DATA_FREE_METRICS

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for name in ("heads", "kv_heads", "mlp"):
            width = getattr(self, name)
            out[name] = None if width is None else width.to_json()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PruneRecipe:
        data = dict(data)
        calibration = Calibration(**data.pop("calibration", {}))
        return cls(calibration=calibration, **data)
