"""Scores + targets -> PrunePlan: which heads, KV groups and MLP channels each layer keeps.

Every layer keeps the same widths, so the pruned model has a standard config. Kept indices are in their
original order. In a hybrid model only the softmax-attention layers (``ModelShape.attention_layers``) have
heads; the others keep empty head lists.

Grouped-query attention. Query head h reads KV group h // g (g = heads per group). A kept query head is
useless without its group, and every kept group must keep the same number of query heads (the config has
one ``num_key_value_groups``). So selection is two-level: within each group, take its best
``heads / kv_heads`` query heads; score the group by the **sum of the salience of exactly those heads**;
keep the best ``kv_heads`` groups. The sum (rather than the mean or max over all heads of the group) is
the total salience the pruned layer actually retains, so it is the group choice that maximises retained
salience under the structural constraint; heads a group would lose anyway do not vote for it. For MHA
(g = 1) this reduces to ranking heads directly.

Mixtures of experts. A layer keeps its best ``experts`` experts (by their routed contribution), and each
kept expert its own best ``mlp`` channels: the config has one expert width, so every expert keeps the same
number, but not the same channels. ``LayerPlan.experts`` lists the kept experts, ``expert_mlp`` the kept
channels of each of them (in the same order); ``mlp`` lists the kept channels of the shared expert where
the model has one (Qwen2-MoE: a plain MLP every token goes through), and is empty otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from transact.arch import ModelShape
from transact.errors import TransactError

if TYPE_CHECKING:
    from transact.recipes import PruneRecipe

PLAN_FORMAT = 1


@dataclass(frozen=True)
class Targets:
    """Resolved kept widths per layer; in a mixture of experts ``mlp`` is each expert's width, ``experts``
    the experts kept and ``shared_mlp`` a shared expert's width (None where the model has no such part)."""

    heads: int
    kv_heads: int
    mlp: int
    experts: int | None = None
    shared_mlp: int | None = None  # the shared expert's width, where there is one

    def to_json(self) -> dict[str, int]:
        """The widths a plan records (the experts' only for a mixture of experts, so other plans read as before)."""
        return {name: value for name, value in asdict(self).items() if value is not None}

    def __repr__(self) -> str:  # the fields a dense model does not use are left out
        return f"Targets({', '.join(f'{k}={v}' for k, v in self.to_json().items())})"

    def widths(self) -> list[int]:
        """[heads, kv_heads, mlp], and the experts kept in a mixture of experts (how run reports record them)."""
        return [self.heads, self.kv_heads, self.mlp] + ([self.experts] if self.experts is not None else [])

    def describe(self) -> str:
        """heads/kv/mlp, and the experts kept where there are experts."""
        widths = f"{self.heads}/{self.kv_heads}/{self.mlp}"
        if self.experts is not None:
            widths += f", {self.experts} experts"
        return widths if self.shared_mlp is None else f"{widths}, shared expert {self.shared_mlp}"


def resolve_targets(recipe: PruneRecipe, shape: ModelShape) -> Targets:
    """Turn the recipe's widths into counts for this model, or raise naming what is impossible.

    A dimension left unset keeps its full width. Without ``kv_heads``, an MHA model keeps kv = heads and a
    GQA model keeps its group size (so heads must be a multiple of it; a fraction is rounded to whole
    groups). A fractional ``heads`` with an explicit ``kv_heads`` rounds to the nearest multiple of it.
    """
    H, K, g = shape.num_heads, shape.num_kv_heads, shape.group_size
    mha = H == K

    if recipe.kv_heads is not None:
        kv = recipe.kv_heads.of(K)
        if recipe.heads is None:
            heads = kv * g
        elif recipe.heads.is_fraction:
            heads = kv * max(1, round(recipe.heads.value * H / kv))
        else:
            heads = recipe.heads.of(H)
    elif recipe.heads is None:
        heads, kv = H, K
    elif mha:
        heads = kv = recipe.heads.of(H)
    elif recipe.heads.is_fraction:
        kv = max(1, round(recipe.heads.value * K))
        heads = kv * g
    else:
        heads = recipe.heads.of(H)
        if heads % g:
            raise TransactError(
                f"--heads {heads}: this model has {H} query heads in {K} KV groups of {g}; without --kv-heads "
                f"the group size is kept, so heads must be a multiple of {g}. Give --kv-heads explicitly "
                f"(valid pairs: {valid_head_pairs(shape)})."
            )
        kv = heads // g

    mlp = shape.intermediate_size if recipe.mlp is None else recipe.mlp.of(shape.intermediate_size)
    if recipe.mlp is not None and recipe.mlp.is_fraction:  # to the nearest width the family can hold
        mlp = max(shape.mlp_multiple, shape.mlp_multiple * round(mlp / shape.mlp_multiple))
    experts = recipe.experts
    if experts is not None and not shape.is_moe:
        raise TransactError("--experts: this model has no experts (its MLPs are dense); prune its channels with --mlp")
    if shape.is_moe:
        experts = shape.num_experts if experts is None else experts.of(shape.num_experts)
    targets = Targets(heads, kv, mlp, experts, shared_width(shape, mlp))
    check_targets(targets, shape)
    return targets


def shared_width(shape: ModelShape, mlp: int) -> int | None:
    """The shared expert's kept width for experts of ``mlp`` channels: the same share of its own width, to
    a multiple of ``mlp_multiple`` (None where there is no shared expert)."""
    if shape.shared_expert_size is None:
        return None
    if mlp == shape.intermediate_size:
        return shape.shared_expert_size
    m = shape.mlp_multiple
    return max(m, m * round(shape.shared_expert_size * mlp / shape.intermediate_size / m))


def check_targets(t: Targets, shape: ModelShape) -> None:
    """Reject impossible widths with a message that says what is possible."""
    H, K, g, P = shape.num_heads, shape.num_kv_heads, shape.group_size, shape.intermediate_size
    if not 1 <= t.kv_heads <= K:
        raise TransactError(f"kv heads {t.kv_heads}: must be between 1 and the model's {K}")
    if not 1 <= t.heads <= H:
        raise TransactError(f"heads {t.heads}: must be between 1 and the model's {H}")
    if t.heads % t.kv_heads:
        raise TransactError(f"heads {t.heads} is not a multiple of kv heads {t.kv_heads}")
    if t.heads // t.kv_heads > g:
        raise TransactError(
            f"heads {t.heads} in {t.kv_heads} KV groups needs {t.heads // t.kv_heads} query heads per group, "
            f"but each group has only {g} (valid pairs: {valid_head_pairs(shape)})"
        )
    rule = shape.head_rule
    if rule is not None and t.heads not in rule.counts:
        raise TransactError(f"heads {t.heads}: {rule.why} (valid pairs: {valid_head_pairs(shape)})")
    what = "channels per expert" if shape.is_moe else "mlp"
    if not 1 <= t.mlp <= P:
        raise TransactError(f"{what} {t.mlp}: must be between 1 and the model's {P}")
    if t.mlp % shape.mlp_multiple and t.mlp != P:
        m = shape.mlp_multiple
        nearest = ", ".join(map(str, _nearest_multiples(t.mlp, m, P)))
        raise TransactError(f"{what} {t.mlp}: must be a multiple of {m} (transformers' grouped expert kernel needs "
                            f"rows of whole 16-byte blocks); nearest: {nearest}")
    if shape.is_moe != (t.experts is not None):
        raise TransactError("expert counts apply to mixtures of experts only" if t.experts is not None else
                            "a mixture of experts needs the number of experts to keep")
    if (shape.shared_expert_size is None) != (t.shared_mlp is None):
        raise TransactError("a shared expert's width applies to models with one" if t.shared_mlp is not None else
                            "a model with a shared expert needs its kept width")
    if t.shared_mlp is not None and not 1 <= t.shared_mlp <= shape.shared_expert_size:
        raise TransactError(f"shared expert {t.shared_mlp}: must be between 1 and the model's "
                            f"{shape.shared_expert_size}")
    if shape.is_moe and not shape.experts_per_token <= t.experts <= shape.num_experts:
        raise TransactError(f"experts {t.experts}: must be between the {shape.experts_per_token} experts each token "
                            f"is routed to and the model's {shape.num_experts}")


def _nearest_multiples(width: int, multiple: int, total: int) -> list[int]:
    below = width // multiple * multiple
    return [w for w in (below, below + multiple) if 1 <= w <= total]


def head_pairs(shape: ModelShape) -> list[tuple[int, int]]:
    """Every (heads, kv heads) pair this model can be pruned to (within its family's head rule)."""
    allowed = shape.head_rule.counts if shape.head_rule is not None else None
    return [(kv * per, kv) for kv in range(1, shape.num_kv_heads + 1) for per in range(1, shape.group_size + 1)
            if allowed is None or kv * per in allowed]


def valid_head_pairs(shape: ModelShape) -> str:
    """The (heads, kv heads) pairs this model can be pruned to, in words."""
    pairs = [f"{heads}/{kv}" for heads, kv in head_pairs(shape)]
    if len(pairs) <= 24:
        return "heads/kv " + ", ".join(pairs)
    rule = f"heads = kv x (1..{shape.group_size})"
    allowed = shape.head_rule.counts if shape.head_rule is not None else None
    return rule if allowed is None else f"{rule}, heads one of {', '.join(map(str, allowed))}"


def _top_sorted(scores: Sequence[float], k: int) -> list[int]:
    """Indices of the k largest scores, ties broken by lower index, returned in ascending order."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:k])


def select_heads(
    head_scores: torch.Tensor, num_kv_heads: int, keep_heads: int, keep_kv: int
) -> tuple[list[int], list[int]]:
    """Pick kept query heads and KV groups of one layer (see the module docstring for the GQA rule).

    head_scores: (num_heads,) -> (kept query heads, kept KV groups), both ascending.
    """
    scores = head_scores.tolist()
    g = len(scores) // num_kv_heads
    per_group = keep_heads // keep_kv
    best_in_group: list[list[int]] = []
    group_scores: list[float] = []
    for group in range(num_kv_heads):
        members = list(range(group * g, (group + 1) * g))
        local = _top_sorted([scores[h] for h in members], per_group)
        chosen = [members[i] for i in local]
        best_in_group.append(chosen)
        group_scores.append(sum(scores[h] for h in chosen))
    groups = _top_sorted(group_scores, keep_kv)
    heads = [h for group in groups for h in best_in_group[group]]
    return heads, groups


def select_channels(scores: torch.Tensor, keep: int) -> list[int]:
    """The ``keep`` highest-scoring MLP channels, ascending. scores: (P,)."""
    return _top_sorted(scores.tolist(), keep)


def select_experts(expert_scores: torch.Tensor, channel_scores: torch.Tensor, keep_experts: int,
                   keep_channels: int) -> tuple[list[int], list[list[int]]]:
    """The ``keep_experts`` best experts of one layer (ascending) and each one's ``keep_channels`` best
    channels. expert_scores: (E,); channel_scores: (E, I) -> (experts, channels per kept expert)."""
    experts = _top_sorted(expert_scores.tolist(), keep_experts)
    return experts, [select_channels(channel_scores[e], keep_channels) for e in experts]


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

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source.to_json(), "targets": self.targets.to_json(),
                "layers": [layer.to_json() for layer in self.layers], "recipe": self.recipe,
                "calibration_hash": self.calibration_hash, "versions": self.versions,
                "corrections": self.corrections, "format": self.format,
                **({"dropped_expert_routes": self.dropped_expert_routes} if self.dropped_expert_routes else {})}

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
        for i, layer in enumerate(self.layers):
            _check_mlp(i, layer, t, s)
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

    def check_applies_to(self, shape: ModelShape) -> None:
        if shape != self.source:
            raise TransactError(f"this plan was made for {self.source}, but the model is {shape}")


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


def make_plan(
    head_scores: Sequence[torch.Tensor],
    mlp_scores: Sequence[torch.Tensor],
    targets: Targets,
    shape: ModelShape,
    expert_scores: Sequence[torch.Tensor] | None = None,
    shared_scores: Sequence[torch.Tensor] | None = None,
    **provenance: Any,
) -> PrunePlan:
    """Select per layer. head_scores[l]: (num_heads,) ((0,) in a layer without attention),
    mlp_scores[l]: (intermediate_size,), in a mixture of experts (num_experts, intermediate_size) with
    expert_scores[l]: (num_experts,) and, where there is a shared expert, shared_scores[l]: (its width,)."""
    if shape.is_moe and expert_scores is None:
        raise TransactError("a mixture of experts needs scores of its experts")
    if shape.shared_expert_size is not None and shared_scores is None:
        raise TransactError("a model with a shared expert needs scores of its channels")
    layers = []
    for i, (h_scores, m_scores) in enumerate(zip(head_scores, mlp_scores, strict=True)):
        heads, groups = (select_heads(h_scores, shape.num_kv_heads, targets.heads, targets.kv_heads)
                         if h_scores.numel() else ([], []))
        if shape.is_moe:
            experts, channels = select_experts(expert_scores[i], m_scores, targets.experts, targets.mlp)
            shared = [] if shared_scores is None else select_channels(shared_scores[i], targets.shared_mlp)
            layers.append(LayerPlan(heads=heads, kv_heads=groups, mlp=shared, experts=experts, expert_mlp=channels))
        else:
            layers.append(LayerPlan(heads=heads, kv_heads=groups, mlp=select_channels(m_scores, targets.mlp)))
    plan = PrunePlan(source=shape, targets=targets, layers=layers, **provenance)
    plan.validate()
    return plan


# ---------------------------------------------------------------- iterative schedules

def can_follow(current: Targets, nxt: Targets) -> bool:
    """Whether one pruning step can take a model of widths ``current`` to ``nxt``: nothing grows, and each
    kept KV group keeps at most the query heads it has now."""
    return (nxt.kv_heads <= current.kv_heads and nxt.heads <= current.heads and nxt.mlp <= current.mlp
            and nxt.heads // nxt.kv_heads <= current.heads // current.kv_heads
            and (nxt.experts or 0) <= (current.experts or 0) and (nxt.shared_mlp or 0) <= (current.shared_mlp or 0))


def dense_targets(shape: ModelShape) -> Targets:
    """The widths of the unpruned model."""
    return Targets(shape.num_heads, shape.num_kv_heads, shape.intermediate_size, shape.num_experts,
                   shape.shared_expert_size)


def linear_schedule(shape: ModelShape, target: Targets, shots: int) -> list[Targets]:
    """Widths after each of ``shots`` steps from the dense model to ``target``, shrinking linearly.

    MLP channels (and experts) interpolate directly. Attention interpolates its size, which is proportional to
    heads + kv_heads (a query head owns q and o slices, a KV head k and v slices of the same size), and each
    shot takes the valid (heads, kv_heads) pair nearest to it (ties to the larger; within the family's head
    rule) that the previous shot can reach and from which the target stays reachable. The last shot is
    exactly ``target``.
    """
    check_targets(target, shape)
    dense = dense_targets(shape)
    pairs = head_pairs(shape)  # a family's head rule holds for every shot, not only the last
    steps, current = [], dense
    for i in range(1, shots + 1):
        if i == shots:
            steps.append(target)
            break
        f = i / shots
        m = shape.mlp_multiple  # expert widths in whole multiples (1 for a dense MLP)
        mlp = m * round((dense.mlp + (target.mlp - dense.mlp) * f) / m)
        experts = None if dense.experts is None else round(dense.experts + (target.experts - dense.experts) * f)
        size = (dense.heads + dense.kv_heads) + ((target.heads + target.kv_heads) - (dense.heads + dense.kv_heads)) * f
        candidates = [Targets(h, k, mlp, experts, shared_width(shape, mlp)) for h, k in pairs]
        options = [t for t in candidates if can_follow(current, t) and can_follow(t, target)]
        current = min(options, key=lambda t: (abs(t.heads + t.kv_heads - size), -(t.heads + t.kv_heads)))
        steps.append(current)
    return steps


def check_schedule(shape: ModelShape, steps: Sequence[Targets]) -> None:
    """Every step valid and reachable from the one before (starting from the dense model)."""
    current = dense_targets(shape)
    for i, step in enumerate(steps):
        try:
            check_targets(step, shape)
        except TransactError as e:
            raise TransactError(f"schedule shot {i + 1}: {e}") from None
        if not can_follow(current, step):
            raise TransactError(
                f"schedule shot {i + 1}: {step.describe()} cannot follow {current.describe()} (widths may only "
                "shrink, and a KV group cannot gain query heads)")
        current = step


def compose_plans(first: PrunePlan, then: PrunePlan, **provenance: Any) -> PrunePlan:
    """The plan from ``first``'s source model straight to the widths ``then`` reaches, in the source's
    indices (``then`` indexes the units ``first`` kept)."""
    if then.source.num_layers != first.source.num_layers:
        raise TransactError("plans cover different numbers of layers")
    layers = [_compose_layers(a, b) for a, b in zip(first.layers, then.layers, strict=True)]
    plan = PrunePlan(source=first.source, targets=then.targets, layers=layers, **provenance)
    plan.validate()
    return plan


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


def _compose_layers(a: LayerPlan, b: LayerPlan) -> LayerPlan:
    """Layer plan ``b`` (indexing the units ``a`` kept) in the indices ``a`` started from."""
    experts = expert_mlp = None
    if a.experts is not None:
        experts = [a.experts[j] for j in b.experts]
        expert_mlp = [[a.expert_mlp[j][c] for c in channels] for j, channels in zip(b.experts, b.expert_mlp,
                                                                                    strict=True)]
    return LayerPlan(heads=[a.heads[j] for j in b.heads], kv_heads=[a.kv_heads[j] for j in b.kv_heads],
                     mlp=[a.mlp[j] for j in b.mlp], experts=experts, expert_mlp=expert_mlp)
