"""The plan of a pruning step, as a value saved beside every checkpoint (plan.json): the source shape, the
resolved widths, and the units each layer keeps (``LayerPlan``), with the recipe, the calibration hash,
library versions and what each corrector did, so that the same checkpoint can be recreated and audited.

A mixture of experts' ``LayerPlan`` lists the kept experts (``experts``) and each one's kept channels
(``expert_mlp``, in the same order); ``mlp`` then lists the kept channels of a shared expert where the model
has one (Qwen2-MoE: a plain MLP every token goes through), and is empty otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from transact.arch import ModelShape
from transact.core.depth import DepthPlan
from transact.core.targets import Targets, check_targets
from transact.errors import TransactError

PLAN_FORMAT = 1

@dataclass(frozen=True)
class LayerPlan:
    """The units one layer keeps: query heads, KV groups, MLP channels; in a mixture of experts the kept
    experts and each one's kept channels (``mlp`` then holds a shared expert's channels, or nothing)."""

    heads: list[int]
    kv_heads: list[int]
    mlp: list[int]
    experts: list[int] | None = None
    expert_mlp: list[list[int]] | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        return data if self.experts is not None else {k: v for k, v in data.items() if k not in _EXPERT_FIELDS}


_EXPERT_FIELDS = ("experts", "expert_mlp")


@dataclass(frozen=True)
class PrunePlan:
    """Kept units per layer plus everything needed to reproduce and audit the result."""

    source: ModelShape
    targets: Targets
    layers: list[LayerPlan]
    recipe: dict[str, Any] = field(default_factory=dict)
    calibration_hash: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    # What each corrector did after selection ({"name": ..., ...}), in the order they ran.
    corrections: list[dict[str, Any]] = field(default_factory=list)
    format: int = PLAN_FORMAT
    # A mixture of experts pruned to fewer experts: per layer, the share of the calibration tokens' routes
    # (tokens x experts per token) that went to the experts the plan drops.
    dropped_expert_routes: list[float] | None = None
    # Layers dropped before the widths were pruned (``source`` is then the shape after the drop, and
    # ``depth.source`` the base model's).
    depth: DepthPlan | None = None
    # MLP widths chosen per layer (``transact.core.allocate``; ``targets.mlp`` is then their mean, rounded
    # down); None where every layer keeps ``targets.mlp`` channels.
    mlp_widths: list[int] | None = None
    # what the width search did (calibration loss of the uniform and the searched widths, generations, time)
    allocation: dict[str, Any] | None = None
    # what the budget's search did (``transact.core.step.budget_step``: every candidate mix of depth and
    # width with its calibration loss, the one chosen); None where the recipe named the widths
    budget: dict[str, Any] | None = None

    @property
    def uniform(self) -> bool:
        """Whether every layer keeps the same widths (a vanilla config can describe the pruned model)."""
        return self.mlp_widths is None or len(set(self.mlp_widths)) == 1

    @property
    def base_shape(self) -> ModelShape:
        """The shape of the model the plan applies to."""
        return self.depth.source if self.depth is not None else self.source

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source.to_json(), "targets": self.targets.to_json(),
                "layers": [layer.to_json() for layer in self.layers], "recipe": self.recipe,
                "calibration_hash": self.calibration_hash, "versions": self.versions,
                "corrections": self.corrections, "format": self.format,
                **({"dropped_expert_routes": self.dropped_expert_routes} if self.dropped_expert_routes else {}),
                **({"depth": self.depth.to_json()} if self.depth is not None else {}),
                **({"mlp_widths": self.mlp_widths} if self.mlp_widths is not None else {}),
                **({"allocation": self.allocation} if self.allocation is not None else {}),
                **({"budget": self.budget} if self.budget is not None else {})}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PrunePlan:
        try:
            if data.get("format") != PLAN_FORMAT:
                raise TransactError(f"plan format {data.get('format')!r} is not supported (expected {PLAN_FORMAT})")
            plan = cls(
                source=ModelShape(**data["source"]),
                targets=Targets(**data["targets"]),
                layers=[LayerPlan(**layer) for layer in data["layers"]],
                recipe=data.get("recipe", {}),
                calibration_hash=data.get("calibration_hash"),
                versions=data.get("versions", {}),
                corrections=data.get("corrections", _legacy_corrections(data.get("recipe", {}))),
                dropped_expert_routes=data.get("dropped_expert_routes"),
                depth=DepthPlan.from_json(data["depth"]) if data.get("depth") else None,
                mlp_widths=data.get("mlp_widths"),
                allocation=data.get("allocation"),
                budget=data.get("budget"),
            )
        except (KeyError, TypeError) as e:
            raise TransactError(f"not a transact plan: {e}") from None
        plan.validate()
        return plan

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PrunePlan:
        p = Path(path)
        if not p.is_file():
            raise TransactError(f"plan file {p} does not exist")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise TransactError(f"plan file {p} is not valid JSON: {e}") from None
        return cls.from_json(data)

    def validate(self) -> None:
        """Internal consistency: one entry per layer, uniform widths, in-range ascending indices."""
        s, t = self.source, self.targets
        check_targets(t, s)
        if len(self.layers) != s.num_layers:
            raise TransactError(f"plan has {len(self.layers)} layers, source model {s.num_layers}")
        widths = self.layer_mlp_widths()
        for i, layer in enumerate(self.layers):
            _check_mlp(i, layer, replace(t, mlp=widths[i]), s)
            if not s.has_attention(i):
                if layer.heads or layer.kv_heads:
                    raise TransactError(f"layer {i} has no softmax attention, but the plan keeps heads in it")
                continue
            _check_indices(f"layer {i} heads", layer.heads, t.heads, s.num_heads)
            _check_indices(f"layer {i} kv_heads", layer.kv_heads, t.kv_heads, s.num_kv_heads)
            per_group = t.heads // t.kv_heads
            owners = [h // s.group_size for h in layer.heads]
            if owners != [g for g in layer.kv_heads for _ in range(per_group)]:
                raise TransactError(
                    f"layer {i}: kept heads {layer.heads} are not {per_group} per kept KV group {layer.kv_heads}"
                )

    def layer_mlp_widths(self) -> list[int]:
        """Each layer's MLP width (``mlp_widths``, else ``targets.mlp`` everywhere); refused where per-layer
        widths are not one per layer of a dense model, or their mean, rounded down, is not ``targets.mlp``."""
        layers = self.source.num_layers
        if self.mlp_widths is None:
            return [self.targets.mlp] * layers
        if self.source.is_moe or len(self.mlp_widths) != layers:
            raise TransactError(f"per-layer MLP widths need one width per layer of a dense model ({layers} layers; "
                                f"{len(self.mlp_widths)} given)")
        if sum(self.mlp_widths) // layers != self.targets.mlp:
            raise TransactError(f"per-layer MLP widths {self.mlp_widths} do not average to {self.targets.mlp} "
                                "(rounded down)")
        return list(self.mlp_widths)

    def check_applies_to(self, shape: ModelShape) -> None:
        if shape != self.base_shape:
            raise TransactError(f"this plan was made for {self.base_shape}, but the model is {shape}")


def whole_plan(shape: ModelShape, **fields: Any) -> PrunePlan:
    """A plan that keeps every unit of ``shape`` (a step that only drops layers); ``fields`` as PrunePlan's."""
    moe = shape.is_moe
    targets = Targets(shape.num_heads, shape.num_kv_heads, shape.intermediate_size,
                      shape.num_experts if moe else None, shape.shared_expert_size if moe else None)
    layers = []
    for i in range(shape.num_layers):
        attention = shape.has_attention(i)
        experts = list(range(shape.num_experts)) if moe else None
        layers.append(LayerPlan(
            heads=list(range(shape.num_heads)) if attention else [],
            kv_heads=list(range(shape.num_kv_heads)) if attention else [],
            mlp=list(range(shape.shared_expert_size or 0)) if moe else list(range(shape.intermediate_size)),
            experts=experts,
            expert_mlp=[list(range(shape.intermediate_size)) for _ in experts] if moe else None))
    return PrunePlan(source=shape, targets=targets, layers=layers, **fields)


def _legacy_corrections(recipe: dict[str, Any]) -> list[dict[str, Any]]:
    """Plans written before correctors had their own record kept FLAP's bias in the recipe."""
    return [{"name": "flap_bias"}] if recipe.get("bias_compensation") else []


def _check_mlp(i: int, layer: LayerPlan, t: Targets, s: ModelShape) -> None:
    """A layer's MLP channels, or its kept experts and each one's channels."""
    if not s.is_moe:
        if layer.experts is not None or layer.expert_mlp is not None:
            raise TransactError(f"layer {i} keeps experts, but the model has a dense MLP")
        _check_indices(f"layer {i} mlp", layer.mlp, t.mlp, s.intermediate_size)
        return
    if layer.experts is None or layer.expert_mlp is None:
        raise TransactError(f"layer {i}: a mixture-of-experts plan lists kept experts and their channels "
                            "(experts, expert_mlp)")
    if s.shared_expert_size is not None:
        _check_indices(f"layer {i} shared expert", layer.mlp, t.shared_mlp, s.shared_expert_size)
    elif layer.mlp:
        raise TransactError(f"layer {i}: the model has no shared expert, but the plan keeps mlp channels")
    _check_indices(f"layer {i} experts", layer.experts, t.experts, s.num_experts)
    if len(layer.expert_mlp) != len(layer.experts):
        raise TransactError(f"layer {i}: {len(layer.expert_mlp)} channel lists for {len(layer.experts)} kept experts")
    for e, channels in zip(layer.experts, layer.expert_mlp, strict=True):
        _check_indices(f"layer {i} expert {e} channels", channels, t.mlp, s.intermediate_size)


def _check_indices(what: str, idx: list[int], count: int, total: int) -> None:
    if len(idx) != count:
        raise TransactError(f"{what}: {len(idx)} entries, expected {count}")
    if idx != sorted(set(idx)) or (idx and (idx[0] < 0 or idx[-1] >= total)):
        raise TransactError(f"{what}: indices must be ascending, unique and in [0, {total})")



def dropped_routes(plan: PrunePlan, routed: Sequence[torch.Tensor]) -> list[float] | None:
    """Per layer, the share of routes (routed[l]: (num_experts,) tokens routed to each expert) that went to
    the experts ``plan`` drops; None where it drops none."""
    if not plan.source.is_moe or plan.targets.experts == plan.source.num_experts:
        return None
    shares = []
    for kept, tokens in zip(plan.layers, routed, strict=True):
        dropped = torch.ones(len(tokens), dtype=torch.bool)
        dropped[kept.experts] = False
        shares.append(round(float(tokens[dropped].sum() / tokens.sum().clamp_min(1)), 6))
    return shares
