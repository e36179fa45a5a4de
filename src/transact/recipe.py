"""What to prune and how, as frozen values validated at construction (bad values name their field)."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
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
    bias_compensation: bool = False  # FLAP's: add the removed channels' mean output back as biases

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
        if self.bias_compensation and self.metric != "flap":
            raise TransactError(f"bias compensation is FLAP's; it needs metric 'flap', not {self.metric!r}")

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


# ---------------------------------------------------------------- iterative pruning (``transact run``)

RECOVERY_METHODS = ("full", "lora", "kd")
PRECISIONS = ("auto", "fp32", "bf16")


def _fail(key: str, message: str) -> TransactError:
    return TransactError(f"recipe key {key!r}: {message}")


def _int(key: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(key, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _float(key: str, value: Any, low: float = 0.0, high: float = math.inf, *, open_low: bool = False) -> float:
    """A finite number in [low, high] (or (low, high] with ``open_low``); numeric strings such as '1e-4'
    are accepted because YAML 1.1 reads exponents without a dot as strings."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _fail(key, f"must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(key, f"must be a finite number, got {value!r}")
    if value < low or value > high or (open_low and value == low):
        bound = f"{'(' if open_low else '['}{low}, {high}]"
        raise _fail(key, f"must lie in {bound}, got {value}")
    return float(value)


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _fail(key, f"must be one of {', '.join(choices)}, got {value!r}")
    return value


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(key, f"must be a non-empty string, got {value!r}")
    return value


def _fields_from(cls: type, data: Any, prefix: str) -> dict[str, Any]:
    """``data`` as keyword arguments of dataclass ``cls``; unknown keys are errors that name them."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise _fail(prefix, f"must be a mapping, got {data!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise _fail(f"{prefix}.{unknown[0]}", f"unknown key (known under {prefix!r}: {', '.join(sorted(known))})")
    return dict(data)


@dataclass(frozen=True)
class Widths:
    """Per-layer widths of one shot: query heads, KV heads, MLP channels (counts, or fractions in (0, 1)
    of the dense model; ``None`` keeps that dimension at its current width)."""

    heads: Width | None = None
    kv_heads: Width | None = None
    mlp: Width | None = None

    @classmethod
    def parse(cls, data: Any, key: str) -> Widths:
        kwargs = _fields_from(cls, data, key)
        out = {}
        for name, value in kwargs.items():
            try:
                out[name] = None if value is None else Width.parse(value)
            except TransactError as e:
                raise _fail(f"{key}.{name}", str(e)) from None
        widths = cls(**out)
        if widths.heads is None and widths.kv_heads is None and widths.mlp is None:
            raise _fail(key, "give at least one of heads, kv_heads, mlp")
        return widths

    def as_prune_recipe(self, **kwargs: Any) -> PruneRecipe:
        return PruneRecipe(heads=self.heads, kv_heads=self.kv_heads, mlp=self.mlp, **kwargs)

    def to_json(self) -> dict[str, Any]:
        values = {n: getattr(self, n) for n in ("heads", "kv_heads", "mlp")}
        return {n: None if w is None else w.to_json() for n, w in values.items()}


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters on every prunable projection, merged into the dense weights after each phase."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05

    def __post_init__(self) -> None:
        _int("training.lora.r", self.r, 1)
        object.__setattr__(self, "alpha", _float("training.lora.alpha", self.alpha, 0.0, open_low=True))
        object.__setattr__(self, "dropout", _float("training.lora.dropout", self.dropout, 0.0, 0.99))


@dataclass(frozen=True)
class DistillSettings:
    """Knowledge distillation from the dense model: loss = T^2 KL(teacher_T || student_T) + lm_weight CE."""

    temperature: float = 1.0
    lm_weight: float = 0.5
    teacher_device: str = "same"

    def __post_init__(self) -> None:
        object.__setattr__(self, "temperature",
                           _float("training.kd.temperature", self.temperature, 0.0, 100.0, open_low=True))
        object.__setattr__(self, "lm_weight", _float("training.kd.lm_weight", self.lm_weight, 0.0, 100.0))
        _str("training.kd.teacher_device", self.teacher_device)


@dataclass(frozen=True)
class Training:
    """Recovery training between shots (defaults after the paper's Table 4)."""

    data: str = BUILTIN
    method: str = "full"
    tokens_per_shot: int = 200_000
    final_tokens: int = 0
    seq_len: int = 256
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 5e-5
    min_lr_ratio: float = 0.0
    warmup: float = 0.03
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0
    shuffle_buffer: int = 256
    save_every: int = 500
    log_every: int = 10
    explode_factor: float = 4.0
    lora: LoraSettings = field(default_factory=LoraSettings)
    kd: DistillSettings = field(default_factory=DistillSettings)

    def __post_init__(self) -> None:
        p = "training."
        _str(p + "data", self.data)
        _choice(p + "method", self.method, RECOVERY_METHODS)
        _int(p + "tokens_per_shot", self.tokens_per_shot, 0)
        _int(p + "final_tokens", self.final_tokens, 0)
        _int(p + "seq_len", self.seq_len, 2)
        for name in ("batch_size", "grad_accum", "shuffle_buffer", "log_every"):
            _int(p + name, getattr(self, name), 1)
        _int(p + "save_every", self.save_every, 0)
        _int(p + "seed", self.seed, 0)
        object.__setattr__(self, "lr", _float(p + "lr", self.lr, 0.0, 1.0, open_low=True))
        object.__setattr__(self, "min_lr_ratio", _float(p + "min_lr_ratio", self.min_lr_ratio, 0.0, 1.0))
        object.__setattr__(self, "warmup", _float(p + "warmup", self.warmup, 0.0, 0.5))
        object.__setattr__(self, "weight_decay", _float(p + "weight_decay", self.weight_decay, 0.0, 10.0))
        object.__setattr__(self, "max_grad_norm", _float(p + "max_grad_norm", self.max_grad_norm, 0.0))
        object.__setattr__(self, "explode_factor", _float(p + "explode_factor", self.explode_factor, 1.0))
        betas = self.betas
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise _fail(p + "betas", f"must be two numbers [beta1, beta2], got {betas!r}")
        object.__setattr__(self, "betas", tuple(_float(p + "betas", b, 0.0, 0.9999999) for b in betas))
        _choice(p + "precision", self.precision, PRECISIONS)
        if not isinstance(self.gradient_checkpointing, bool):
            raise _fail(p + "gradient_checkpointing", f"must be true or false, got {self.gradient_checkpointing!r}")
        for name, cls in (("lora", LoraSettings), ("kd", DistillSettings)):
            value = getattr(self, name)
            if not isinstance(value, cls):
                object.__setattr__(self, name, cls(**_fields_from(cls, value, p + name)))

    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimizer step consumes on one process."""
        return self.seq_len * self.batch_size * self.grad_accum


@dataclass(frozen=True)
class Heldout:
    """Held-out perplexity after every shot: text (path or builtin), token cap, window."""

    text: str = BUILTIN
    tokens: int = 16384
    window: int = 1024

    def __post_init__(self) -> None:
        _str("heldout.text", self.text)
        _int("heldout.tokens", self.tokens, 0)
        _int("heldout.window", self.window, 2)


@dataclass(frozen=True)
class RunRecipe:
    """Iterative pruning: prune to ``target`` in ``shots`` steps (or along ``schedule``), re-calibrating on
    the current model and training between shots, then an optional final recovery phase."""

    model: str
    out: str
    target: Widths | None = None
    shots: int | None = None
    schedule: tuple[Widths, ...] | None = None
    metric: str = "transact"
    alpha: float | None = None
    calibration: Calibration = field(default_factory=Calibration)
    calibration_seed: int = 0
    training: Training = field(default_factory=Training)
    heldout: Heldout = field(default_factory=Heldout)
    device: str = "auto"

    def __post_init__(self) -> None:
        _str("model", self.model)
        _str("out", self.out)
        _choice("metric", self.metric, METRICS)
        if self.target is None and self.schedule is None:
            raise _fail("target", "give the target widths (or an explicit schedule)")
        if self.schedule is not None and self.shots is not None and self.shots != len(self.schedule):
            raise _fail("shots", f"is {self.shots} but the schedule lists {len(self.schedule)} shots")
        if self.shots is not None:
            _int("shots", self.shots, 1)
        if self.schedule is not None and not self.schedule:
            raise _fail("schedule", "must list at least one shot")
        if self.alpha is not None:
            object.__setattr__(self, "alpha", _float("alpha", self.alpha, 0.0))
        _int("calibration.seed", self.calibration_seed, 0)
        _str("device", self.device)

    @property
    def num_shots(self) -> int:
        return len(self.schedule) if self.schedule is not None else (self.shots or 1)

    def prune_recipe(self, widths: Widths) -> PruneRecipe:
        return widths.as_prune_recipe(metric=self.metric, alpha=self.alpha, seed=self.calibration_seed,
                                      calibration=self.calibration)

    @classmethod
    def from_dict(cls, data: Any) -> RunRecipe:
        kwargs = _fields_from(cls, data, "recipe")
        kwargs.pop("calibration_seed", None)  # spelled calibration.seed in the file
        for required in ("model", "out"):
            if required not in kwargs:
                raise _fail(required, "is required")
        if kwargs.get("target") is not None:
            kwargs["target"] = Widths.parse(kwargs["target"], "target")
        if kwargs.get("schedule") is not None:
            if not isinstance(kwargs["schedule"], list):
                raise _fail("schedule", "must be a list of {heads, kv_heads, mlp} mappings")
            kwargs["schedule"] = tuple(Widths.parse(w, f"schedule[{i}]") for i, w in enumerate(kwargs["schedule"]))
        cal = dict(kwargs.pop("calibration", None) or {})
        if not isinstance(cal, dict):
            raise _fail("calibration", f"must be a mapping, got {cal!r}")
        seed = cal.pop("seed", 0)
        try:
            kwargs["calibration"] = Calibration(**_fields_from(Calibration, cal, "calibration"))
        except TransactError as e:
            raise _fail("calibration", str(e)) from None
        kwargs["calibration_seed"] = seed
        kwargs["training"] = Training(**_fields_from(Training, kwargs.get("training"), "training"))
        kwargs["heldout"] = Heldout(**_fields_from(Heldout, kwargs.get("heldout"), "heldout"))
        return cls(**kwargs)

    def to_json(self) -> dict[str, Any]:
        out = {"model": self.model, "out": self.out, "target": self.target.to_json() if self.target else None,
               "shots": self.shots, "schedule": [w.to_json() for w in self.schedule] if self.schedule else None,
               "metric": self.metric, "alpha": self.alpha,
               "calibration": {**asdict(self.calibration), "seed": self.calibration_seed},
               "training": asdict(self.training), "heldout": asdict(self.heldout), "device": self.device}
        out["training"]["betas"] = list(self.training.betas)
        return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``key.sub=value`` strings applied to a recipe mapping; values are read as YAML (numbers, lists)."""
    import yaml

    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise TransactError(f"override {item!r}: write key=value, e.g. training.lr=1e-4")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise _fail(key, f"{part!r} is not a mapping")
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    return data


def load_run_recipe(path: str | Path, overrides: list[str] = ()) -> RunRecipe:
    """Read a YAML recipe, apply overrides and validate it (nothing is loaded or written)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise TransactError(f"recipe {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise TransactError(f"recipe {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise TransactError(f"recipe {p} must be a mapping of keys, got {type(data).__name__}")
    return RunRecipe.from_dict(apply_overrides(data, list(overrides)))
