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
    """Resolved kept widths per layer."""

    heads: int
    kv_heads: int
    mlp: int


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
    check_targets(Targets(heads, kv, mlp), shape)
    return Targets(heads, kv, mlp)


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
    if not 1 <= t.mlp <= P:
        raise TransactError(f"mlp {t.mlp}: must be between 1 and the model's {P}")


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


@dataclass(frozen=True)
class LayerPlan:
    heads: list[int]
    kv_heads: list[int]
    mlp: list[int]


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

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source.to_json(), "targets": asdict(self.targets),
                "layers": [asdict(layer) for layer in self.layers], "recipe": self.recipe,
                "calibration_hash": self.calibration_hash, "versions": self.versions,
                "corrections": self.corrections, "format": self.format}

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
            _check_indices(f"layer {i} mlp", layer.mlp, t.mlp, s.intermediate_size)
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
    **provenance: Any,
) -> PrunePlan:
    """Select per layer. head_scores[l]: (num_heads,) ((0,) in a layer without attention),
    mlp_scores[l]: (intermediate_size,)."""
    layers = []
    for h_scores, m_scores in zip(head_scores, mlp_scores, strict=True):
        heads, groups = (select_heads(h_scores, shape.num_kv_heads, targets.heads, targets.kv_heads)
                         if h_scores.numel() else ([], []))
        layers.append(LayerPlan(heads=heads, kv_heads=groups, mlp=select_channels(m_scores, targets.mlp)))
    plan = PrunePlan(source=shape, targets=targets, layers=layers, **provenance)
    plan.validate()
    return plan


# ---------------------------------------------------------------- iterative schedules

def can_follow(current: Targets, nxt: Targets) -> bool:
    """Whether one pruning step can take a model of widths ``current`` to ``nxt``: nothing grows, and each
    kept KV group keeps at most the query heads it has now."""
    return (nxt.kv_heads <= current.kv_heads and nxt.heads <= current.heads and nxt.mlp <= current.mlp
            and nxt.heads // nxt.kv_heads <= current.heads // current.kv_heads)


def linear_schedule(shape: ModelShape, target: Targets, shots: int) -> list[Targets]:
    """Widths after each of ``shots`` steps from the dense model to ``target``, shrinking linearly.

    MLP channels interpolate directly. Attention interpolates its size, which is proportional to
    heads + kv_heads (a query head owns q and o slices, a KV head k and v slices of the same size), and each
    shot takes the valid (heads, kv_heads) pair nearest to it (ties to the larger; within the family's head
    rule) that the previous shot can reach and from which the target stays reachable. The last shot is
    exactly ``target``.
    """
    check_targets(target, shape)
    dense = Targets(shape.num_heads, shape.num_kv_heads, shape.intermediate_size)
    pairs = head_pairs(shape)  # a family's head rule holds for every shot, not only the last
    steps, current = [], dense
    for i in range(1, shots + 1):
        if i == shots:
            steps.append(target)
            break
        f = i / shots
        mlp = round(dense.mlp + (target.mlp - dense.mlp) * f)
        size = (dense.heads + dense.kv_heads) + ((target.heads + target.kv_heads) - (dense.heads + dense.kv_heads)) * f
        options = [Targets(h, k, mlp) for h, k in pairs
                   if can_follow(current, Targets(h, k, mlp)) and can_follow(Targets(h, k, mlp), target)]
        current = min(options, key=lambda t: (abs(t.heads + t.kv_heads - size), -(t.heads + t.kv_heads)))
        steps.append(current)
    return steps


def check_schedule(shape: ModelShape, steps: Sequence[Targets]) -> None:
    """Every step valid and reachable from the one before (starting from the dense model)."""
    current = Targets(shape.num_heads, shape.num_kv_heads, shape.intermediate_size)
    for i, step in enumerate(steps):
        try:
            check_targets(step, shape)
        except TransactError as e:
            raise TransactError(f"schedule shot {i + 1}: {e}") from None
        if not can_follow(current, step):
            raise TransactError(
                f"schedule shot {i + 1}: {step.heads}/{step.kv_heads}/{step.mlp} cannot follow "
                f"{current.heads}/{current.kv_heads}/{current.mlp} (widths may only shrink, and a KV group "
                f"cannot gain query heads)")
        current = step


def compose_plans(first: PrunePlan, then: PrunePlan, **provenance: Any) -> PrunePlan:
    """The plan from ``first``'s source model straight to the widths ``then`` reaches, in the source's
    indices (``then`` indexes the units ``first`` kept)."""
    if then.source.num_layers != first.source.num_layers:
        raise TransactError("plans cover different numbers of layers")
    layers = [LayerPlan(heads=[a.heads[j] for j in b.heads], kv_heads=[a.kv_heads[j] for j in b.kv_heads],
                        mlp=[a.mlp[j] for j in b.mlp]) for a, b in zip(first.layers, then.layers, strict=True)]
    plan = PrunePlan(source=first.source, targets=then.targets, layers=layers, **provenance)
    plan.validate()
    return plan
