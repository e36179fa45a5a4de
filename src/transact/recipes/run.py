"""Iterative pruning with recovery training (``transact run``): the YAML recipe as frozen values, each
bad value an error naming its key."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from transact.checks import check_choice, check_float, check_int, check_str, fail, fields_from
from transact.core.calibrate import WEIGHT_X_GRAD
from transact.errors import TransactError
from transact.io.text import BUILTIN
from transact.recipes.prune import WIDTHS, PruneRecipe, Width
from transact.recipes.text import Calibration, HeldoutText
from transact.recovery.methods import METHODS, get_method, method_names

PRECISIONS = ("auto", "fp32", "bf16")
WEIGHT_DTYPES = ("auto", "fp32", "bf16")  # what trained weights are held in (transact.recovery.optim)
OPTIMIZERS = ("auto", "adamw", "adamw_8bit")
DISTRIBUTED = ("ddp", "fsdp")  # how several processes train: whole replicas, or FSDP2 slices


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

    def to_json(self) -> dict[str, Any]:
        values = {n: getattr(self, n) for n in WIDTHS if n != "experts" or self.experts is not None}
        return {n: None if w is None else w.to_json() for n, w in values.items()}


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
    distributed: str = "ddp"  # several processes: whole replicas (ddp) or each holding 1/N (fsdp)
    check_memory: bool = True  # estimate the peak before loading and refuse a run that cannot fit
    seed: int = 0
    shuffle_buffer: int = 256
    save_every: int = 500
    log_every: int = 10
    explode_factor: float = 4.0
    # Each recovery method's settings by its name (``training.lora``, ``training.kd`` in a recipe), every
    # registered method's present (its defaults where the recipe gives none).
    methods: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        p = "training."
        check_str(p + "data", self.data)
        check_choice(p + "method", self.method, method_names())
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
        check_choice(p + "distributed", self.distributed, DISTRIBUTED)
        self._check_fsdp()
        for flag in ("gradient_checkpointing", "check_memory"):
            if not isinstance(getattr(self, flag), bool):
                raise fail(p + flag, f"must be true or false, got {getattr(self, flag)!r}")
        object.__setattr__(self, "methods", _method_settings(self.methods))

    def _check_fsdp(self) -> None:
        """What FSDP2 training does not support, refused by name (see ``transact.recovery.sharded``)."""
        if self.distributed != "fsdp":
            return
        if not get_method(self.method).shards:
            sharding = ", ".join(n for n, m in METHODS.items() if m.shards)
            raise fail("training.distributed", f"fsdp trains every parameter (method {sharding}); {self.method}'s "
                       f"partial training is not sharded here: use distributed: ddp with method: {self.method}")
        if self.weights == "bf16" and self.optimizer == "adamw_8bit":  # torchao's step fails on such slices
            raise fail("training.distributed", "fsdp trains bf16 weights or 8-bit moments, not both at once "
                       "(torchao's 8-bit step cannot update bf16 slices): use weights: fp32 with adamw_8bit, "
                       "weights: bf16 with adamw, or distributed: ddp")

    def settings_of(self, method: str) -> Any:
        """The settings of recovery method ``method`` (its ``training.<method>`` section; None for a method
        that has none)."""
        return self.methods.get(method)

    @classmethod
    def from_dict(cls, data: Any, key: str = "training") -> Training:
        """The ``training`` section of a recipe: its keys, and each recovery method's settings under the
        method's name."""
        names = tuple(n for n, m in METHODS.items() if m.settings is not None)
        kwargs = fields_from(cls, data, key, also=names)
        if "methods" in kwargs:
            raise fail(f"{key}.methods", f"unknown key (each method's settings go under its name: {', '.join(names)})")
        kwargs["methods"] = {name: kwargs.pop(name) for name in names if name in kwargs}
        return cls(**kwargs)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "methods"}
        out["betas"] = list(self.betas)
        return {**out, **{name: asdict(settings) for name, settings in self.methods.items()}}

    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimizer step consumes on one process."""
        return self.seq_len * self.batch_size * self.grad_accum


@dataclass(frozen=True)
class RunRecipe:
    """Iterative pruning: prune to ``target`` in ``shots`` steps (or along ``schedule``), re-calibrating on
    the current model and training between shots, then an optional final recovery phase. ``prune`` says how
    every shot prunes (a ``PruneRecipe`` without widths: metric and its options, correctors and theirs,
    calibration, seed); ``layerwise``: each shot one decoder layer at a time, ``sequential``: each layer
    calibrated on what the already-pruned layers produce (else on the current model's activations, the same
    statistics as the whole-model step). ``shots: 0``: no shot, only the final recovery phase (a checkpoint
    that is already pruned, trained as it is)."""

    model: str
    out: str
    target: Widths | None = None
    shots: int | None = None
    schedule: tuple[Widths, ...] | None = None
    prune: PruneRecipe = field(default_factory=PruneRecipe)
    layerwise: bool = False
    sequential: bool = False
    training: Training = field(default_factory=Training)
    heldout: HeldoutText = field(default_factory=HeldoutText)
    device: str = "auto"

    def __post_init__(self) -> None:
        check_str("model", self.model)
        check_str("out", self.out)
        if self.shots is not None:
            check_int("shots", self.shots, 0)
        if self.shots == 0:
            self._check_recovery_only()
        elif self.target is None and self.schedule is None:
            raise fail("target", "give the target widths (or an explicit schedule; or shots: 0 to only train)")
        if self.schedule is not None and self.shots is not None and self.shots != len(self.schedule):
            raise fail("shots", f"is {self.shots} but the schedule lists {len(self.schedule)} shots")
        if self.schedule is not None and not self.schedule:
            raise fail("schedule", "must list at least one shot")
        if self.prune.has_widths:
            raise fail("prune", "the widths of every shot come from target or schedule, not from prune")
        if self.prune.depth is not None:
            raise fail("prune.depth", "dropping layers is a step of transact prune; a run's shots prune widths "
                       "(prune the layers first, then run on that checkpoint)")
        if self.prune.budget is not None:
            raise fail("prune.budget", "a budget is a step of transact prune; a run's shots bring their widths "
                       "(prune to the budget first, then run on that checkpoint)")
        check_str("device", self.device)
        for key in ("layerwise", "sequential"):
            if not isinstance(getattr(self, key), bool):
                raise fail(key, f"must be true or false, got {getattr(self, key)!r}")
        if self.sequential and not self.layerwise:
            raise fail("sequential", "belongs to a layer-wise shot; set layerwise: true")
        if self.layerwise and WEIGHT_X_GRAD in self.prune.statistics:
            raise fail("layerwise", f"metric {self.prune.metric!r} needs the whole model's loss; use it without "
                       "layerwise")

    def _check_recovery_only(self) -> None:
        """``shots: 0``: the run prunes nothing and trains the model as it is (an already pruned checkpoint,
        per-layer widths included) for ``training.final_tokens``; what only a shot uses is refused."""
        for key in ("target", "schedule"):
            if getattr(self, key) is not None:
                raise fail(key, "a run with shots: 0 prunes nothing; remove the key (or give shots >= 1)")
        if self.training.final_tokens == 0:
            raise fail("training.final_tokens", "a run with shots: 0 only trains: give the tokens of its recovery "
                       "phase (e.g. training.final_tokens=48000)")
        if self.layerwise:
            raise fail("layerwise", "belongs to a shot, and a run with shots: 0 has none")

    @property
    def num_shots(self) -> int:
        if self.schedule is not None:
            return len(self.schedule)
        return 1 if self.shots is None else self.shots

    def prune_recipe(self, widths: Widths) -> PruneRecipe:
        """The recipe of a shot to ``widths``: the ``prune`` section with those widths."""
        return replace(self.prune, **{name: getattr(widths, name) for name in WIDTHS})

    @classmethod
    def from_dict(cls, data: Any) -> RunRecipe:
        kwargs = fields_from(cls, data, "recipe", also=LEGACY_PRUNE_KEYS)
        for required in ("model", "out"):
            if required not in kwargs:
                raise fail(required, "is required")
        if kwargs.get("target") is not None:
            kwargs["target"] = Widths.parse(kwargs["target"], "target")
        if kwargs.get("schedule") is not None:
            if not isinstance(kwargs["schedule"], list):
                raise fail("schedule", "must be a list of {heads, kv_heads, mlp} mappings")
            kwargs["schedule"] = tuple(Widths.parse(w, f"schedule[{i}]") for i, w in enumerate(kwargs["schedule"]))
        kwargs["prune"] = prune_section(kwargs.pop("prune", None), legacy_prune_keys(kwargs))
        kwargs["training"] = Training.from_dict(kwargs.get("training"))
        kwargs["heldout"] = HeldoutText(**fields_from(HeldoutText, kwargs.get("heldout"), "heldout"))
        return cls(**kwargs)

    def to_json(self) -> dict[str, Any]:
        prune = {k: v for k, v in self.prune.to_json().items() if k not in WIDTHS}
        out = {"model": self.model, "out": self.out, "target": self.target.to_json() if self.target else None,
               "shots": self.shots, "schedule": [w.to_json() for w in self.schedule] if self.schedule else None,
               "prune": prune, "layerwise": self.layerwise, "sequential": self.sequential,
               "training": self.training.to_json(), "heldout": asdict(self.heldout), "device": self.device}
        return out


# Keys a run recipe had before its ``prune`` section held them; still read, as the same recipe.
LEGACY_PRUNE_KEYS = ("metric", "alpha", "reconstruct", "damp", "calibration")


def _method_settings(given: Any) -> dict[str, Any]:
    """Every registered method's settings: as given (a mapping of its keys, or its settings value), else its
    defaults; a name that is no method with settings is refused."""
    if not isinstance(given, dict):
        raise fail("training", f"method settings must be a mapping by method name, got {given!r}")
    out = {}
    for name, method in METHODS.items():
        if method.settings is None:
            continue
        value = given.get(name)
        out[name] = value if isinstance(value, method.settings) else \
            method.settings(**fields_from(method.settings, value, f"training.{name}"))
    unknown = sorted(set(given) - set(out))
    if unknown:
        raise fail(f"training.{unknown[0]}", f"unknown key (methods with settings: {', '.join(out)})")
    return out


def legacy_prune_keys(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The ``prune`` section that the keys of ``LEGACY_PRUNE_KEYS`` in ``kwargs`` (removed from it) describe:
    ``metric``; ``alpha`` (the metric's option); ``reconstruct`` (false: no correctors) with ``damp`` (the
    refit's option); ``calibration`` with its ``seed``."""
    section: dict[str, Any] = {}
    if "metric" in kwargs:
        section["metric"] = kwargs.pop("metric")
    alpha = kwargs.pop("alpha", None)
    if alpha is not None:
        section["metric_options"] = {"alpha": check_float("alpha", alpha, 0.0)}
    reconstruct, damp = kwargs.pop("reconstruct", None), kwargs.pop("damp", None)
    if reconstruct is not None and not isinstance(reconstruct, bool):
        raise fail("reconstruct", f"must be true or false, got {reconstruct!r}")
    if reconstruct is False:
        section["correctors"] = []
    if damp is not None:
        if reconstruct is False:
            raise fail("damp", "weighs the refit's damping; set reconstruct: true")
        section["corrector_options"] = {"refit": {"damp": check_float("damp", damp, 0.0)}}
    if "calibration" in kwargs:
        cal = kwargs.pop("calibration") or {}
        if not isinstance(cal, dict):
            raise fail("calibration", f"must be a mapping, got {cal!r}")
        cal = dict(cal)
        section["seed"] = cal.pop("seed", 0)
        section["calibration"] = _calibration(cal, "calibration")
    return section


def prune_section(data: Any, legacy: dict[str, Any]) -> PruneRecipe:
    """The ``prune`` section (every ``PruneRecipe`` key but the widths) with what ``legacy`` keys said; a
    key given both ways is refused."""
    section = fields_from(PruneRecipe, data, "prune")
    widths = [k for k in section if k in WIDTHS]
    if widths:
        raise fail(f"prune.{widths[0]}", "the widths of every shot come from target or schedule")
    both = sorted(set(section) & set(legacy))
    if both:
        raise fail(f"prune.{both[0]}", "is also given by an older top-level key; give it once, under prune")
    if isinstance(section.get("calibration"), dict):
        section["calibration"] = _calibration(section["calibration"], "prune.calibration")
    try:
        return PruneRecipe(**section, **legacy)
    except TransactError as e:
        raise fail("prune", str(e)) from None


def _calibration(data: dict[str, Any], key: str) -> Calibration:
    values = fields_from(Calibration, data, key)
    try:
        return Calibration(**values)
    except TransactError as e:
        raise fail(key, str(e)) from None


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
