"""Iterative pruning with recovery training (``transact run``): the YAML recipe as frozen values, each
bad value an error naming its key."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transact.core.calibrate import WEIGHT_X_GRAD
from transact.core.metrics import get_metric, metric_names
from transact.errors import TransactError
from transact.io.text import BUILTIN
from transact.recipes.checks import check_choice, check_float, check_int, check_str, fail, fields_from
from transact.recipes.prune import WIDTHS, PruneRecipe, Width
from transact.recipes.text import Calibration, HeldoutText

RECOVERY_METHODS = ("full", "lora", "kd")
PRECISIONS = ("auto", "fp32", "bf16")
WEIGHT_DTYPES = ("auto", "fp32", "bf16")  # what trained weights are held in (transact.recovery.optim)
OPTIMIZERS = ("auto", "adamw", "adamw_8bit")


@dataclass(frozen=True)
class Widths:
    """Per-layer widths of one shot: query heads, KV heads, MLP channels (each expert's, in a mixture of
    experts), experts (counts, or fractions in (0, 1) of the dense model; ``None`` keeps that dimension at
    its current width)."""

    heads: Width | None = None
    kv_heads: Width | None = None
    mlp: Width | None = None
    experts: Width | None = None

    @classmethod
    def parse(cls, data: Any, key: str) -> Widths:
        kwargs = fields_from(cls, data, key)
        out = {}
        for name, value in kwargs.items():
            try:
                out[name] = None if value is None else Width.parse(value)
            except TransactError as e:
                raise fail(f"{key}.{name}", str(e)) from None
        widths = cls(**out)
        if all(getattr(widths, name) is None for name in WIDTHS):
            raise fail(key, "give at least one of heads, kv_heads, mlp, experts")
        return widths

    def as_prune_recipe(self, **kwargs: Any) -> PruneRecipe:
        return PruneRecipe(**{name: getattr(self, name) for name in WIDTHS}, **kwargs)

    def to_json(self) -> dict[str, Any]:
        values = {n: getattr(self, n) for n in WIDTHS if n != "experts" or self.experts is not None}
        return {n: None if w is None else w.to_json() for n, w in values.items()}


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters on every prunable projection, merged into the dense weights after each phase."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05

    def __post_init__(self) -> None:
        check_int("training.lora.r", self.r, 1)
        object.__setattr__(self, "alpha", check_float("training.lora.alpha", self.alpha, 0.0, open_low=True))
        object.__setattr__(self, "dropout", check_float("training.lora.dropout", self.dropout, 0.0, 0.99))


@dataclass(frozen=True)
class DistillSettings:
    """Knowledge distillation from the dense model: loss = T^2 KL(teacher_T || student_T) + lm_weight CE,
    computed over chunks of ``chunk_tokens`` tokens (0: about 2^25 logits per chunk for the vocabulary).
    ``top_k`` > 0: the KL over the teacher's k most likely tokens only (its distribution renormalised over
    them); ``teacher_logits``: a directory ``transact teach`` wrote, read instead of running the teacher."""

    temperature: float = 1.0
    lm_weight: float = 0.5
    teacher_device: str = "same"
    chunk_tokens: int = 0
    top_k: int = 0
    teacher_logits: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "temperature",
                           check_float("training.kd.temperature", self.temperature, 0.0, 100.0, open_low=True))
        object.__setattr__(self, "lm_weight", check_float("training.kd.lm_weight", self.lm_weight, 0.0, 100.0))
        check_str("training.kd.teacher_device", self.teacher_device)
        check_int("training.kd.chunk_tokens", self.chunk_tokens, 0)
        check_int("training.kd.top_k", self.top_k, 0)
        if self.teacher_logits is not None:
            check_str("training.kd.teacher_logits", self.teacher_logits)


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
    precision: str = "auto"  # autocast of fp32 weights
    weights: str = "auto"  # fp32 where the run fits that way, else bf16 (stochastic rounding)
    optimizer: str = "auto"  # adamw on a CPU, adamw_8bit on a GPU
    gradient_checkpointing: bool = False
    check_memory: bool = True  # estimate the peak before loading and refuse a run that cannot fit
    seed: int = 0
    shuffle_buffer: int = 256
    save_every: int = 500
    log_every: int = 10
    explode_factor: float = 4.0
    lora: LoraSettings = field(default_factory=LoraSettings)
    kd: DistillSettings = field(default_factory=DistillSettings)

    def __post_init__(self) -> None:
        p = "training."
        check_str(p + "data", self.data)
        check_choice(p + "method", self.method, RECOVERY_METHODS)
        check_int(p + "tokens_per_shot", self.tokens_per_shot, 0)
        check_int(p + "final_tokens", self.final_tokens, 0)
        check_int(p + "seq_len", self.seq_len, 2)
        for name in ("batch_size", "grad_accum", "shuffle_buffer", "log_every"):
            check_int(p + name, getattr(self, name), 1)
        check_int(p + "save_every", self.save_every, 0)
        check_int(p + "seed", self.seed, 0)
        object.__setattr__(self, "lr", check_float(p + "lr", self.lr, 0.0, 1.0, open_low=True))
        object.__setattr__(self, "min_lr_ratio", check_float(p + "min_lr_ratio", self.min_lr_ratio, 0.0, 1.0))
        object.__setattr__(self, "warmup", check_float(p + "warmup", self.warmup, 0.0, 0.5))
        object.__setattr__(self, "weight_decay", check_float(p + "weight_decay", self.weight_decay, 0.0, 10.0))
        object.__setattr__(self, "max_grad_norm", check_float(p + "max_grad_norm", self.max_grad_norm, 0.0))
        object.__setattr__(self, "explode_factor", check_float(p + "explode_factor", self.explode_factor, 1.0))
        betas = self.betas
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise fail(p + "betas", f"must be two numbers [beta1, beta2], got {betas!r}")
        object.__setattr__(self, "betas", tuple(check_float(p + "betas", b, 0.0, 0.9999999) for b in betas))
        check_choice(p + "precision", self.precision, PRECISIONS)
        check_choice(p + "weights", self.weights, WEIGHT_DTYPES)
        check_choice(p + "optimizer", self.optimizer, OPTIMIZERS)
        for flag in ("gradient_checkpointing", "check_memory"):
            if not isinstance(getattr(self, flag), bool):
                raise fail(p + flag, f"must be true or false, got {getattr(self, flag)!r}")
        for name, cls in (("lora", LoraSettings), ("kd", DistillSettings)):
            value = getattr(self, name)
            if not isinstance(value, cls):
                object.__setattr__(self, name, cls(**fields_from(cls, value, p + name)))

    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimizer step consumes on one process."""
        return self.seq_len * self.batch_size * self.grad_accum


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
    reconstruct: bool = True  # the least-squares refit of o_proj/down_proj after every shot's selection
    damp: float | None = None
    # Each shot one decoder layer at a time; ``sequential``: each layer calibrated on what the already-pruned
    # layers produce (else on the current model's activations, the same statistics as the whole-model step).
    layerwise: bool = False
    sequential: bool = False
    calibration: Calibration = field(default_factory=Calibration)
    calibration_seed: int = 0
    training: Training = field(default_factory=Training)
    heldout: HeldoutText = field(default_factory=HeldoutText)
    device: str = "auto"

    def __post_init__(self) -> None:
        check_str("model", self.model)
        check_str("out", self.out)
        check_choice("metric", self.metric, metric_names())
        if self.target is None and self.schedule is None:
            raise fail("target", "give the target widths (or an explicit schedule)")
        if self.schedule is not None and self.shots is not None and self.shots != len(self.schedule):
            raise fail("shots", f"is {self.shots} but the schedule lists {len(self.schedule)} shots")
        if self.shots is not None:
            check_int("shots", self.shots, 1)
        if self.schedule is not None and not self.schedule:
            raise fail("schedule", "must list at least one shot")
        if self.alpha is not None:
            object.__setattr__(self, "alpha", check_float("alpha", self.alpha, 0.0))
            if "alpha" not in get_metric(self.metric).options:
                raise fail("alpha", f"metric {self.metric!r} has no alpha")
        check_int("calibration.seed", self.calibration_seed, 0)
        check_str("device", self.device)
        if not isinstance(self.reconstruct, bool):
            raise fail("reconstruct", f"must be true or false, got {self.reconstruct!r}")
        for key in ("layerwise", "sequential"):
            if not isinstance(getattr(self, key), bool):
                raise fail(key, f"must be true or false, got {getattr(self, key)!r}")
        if self.sequential and not self.layerwise:
            raise fail("sequential", "belongs to a layer-wise shot; set layerwise: true")
        if self.layerwise and WEIGHT_X_GRAD in get_metric(self.metric).statistics:
            raise fail("layerwise", f"metric {self.metric!r} needs the whole model's loss; use it without layerwise")
        if self.damp is not None:
            object.__setattr__(self, "damp", check_float("damp", self.damp, 0.0))
            if not self.reconstruct:
                raise fail("damp", "weighs the refit's damping; set reconstruct: true")

    @property
    def num_shots(self) -> int:
        return len(self.schedule) if self.schedule is not None else (self.shots or 1)

    def prune_recipe(self, widths: Widths) -> PruneRecipe:
        return widths.as_prune_recipe(metric=self.metric, alpha=self.alpha, seed=self.calibration_seed,
                                      calibration=self.calibration, damp=self.damp,
                                      correctors=("refit",) if self.reconstruct else ())

    @classmethod
    def from_dict(cls, data: Any) -> RunRecipe:
        kwargs = fields_from(cls, data, "recipe")
        kwargs.pop("calibration_seed", None)  # spelled calibration.seed in the file
        for required in ("model", "out"):
            if required not in kwargs:
                raise fail(required, "is required")
        if kwargs.get("target") is not None:
            kwargs["target"] = Widths.parse(kwargs["target"], "target")
        if kwargs.get("schedule") is not None:
            if not isinstance(kwargs["schedule"], list):
                raise fail("schedule", "must be a list of {heads, kv_heads, mlp} mappings")
            kwargs["schedule"] = tuple(Widths.parse(w, f"schedule[{i}]") for i, w in enumerate(kwargs["schedule"]))
        cal = kwargs.pop("calibration", None) or {}
        if not isinstance(cal, dict):
            raise fail("calibration", f"must be a mapping, got {cal!r}")
        cal = dict(cal)
        seed = cal.pop("seed", 0)
        try:
            kwargs["calibration"] = Calibration(**fields_from(Calibration, cal, "calibration"))
        except TransactError as e:
            raise fail("calibration", str(e)) from None
        kwargs["calibration_seed"] = seed
        kwargs["training"] = Training(**fields_from(Training, kwargs.get("training"), "training"))
        kwargs["heldout"] = HeldoutText(**fields_from(HeldoutText, kwargs.get("heldout"), "heldout"))
        return cls(**kwargs)

    def to_json(self) -> dict[str, Any]:
        out = {"model": self.model, "out": self.out, "target": self.target.to_json() if self.target else None,
               "shots": self.shots, "schedule": [w.to_json() for w in self.schedule] if self.schedule else None,
               "metric": self.metric, "alpha": self.alpha, "reconstruct": self.reconstruct, "damp": self.damp,
               "layerwise": self.layerwise, "sequential": self.sequential,
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
                raise fail(key, f"{part!r} is not a mapping")
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
