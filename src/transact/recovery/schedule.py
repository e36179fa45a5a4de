"""Iterative pruning's schedules: the widths after each shot, from the dense model to the target, and the
composition of the shots' plans into one plan from the dense model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from transact.arch import ModelShape
from transact.core.plan import LayerPlan, PrunePlan
from transact.core.targets import Targets, check_targets, head_pairs, resolve_targets, shared_width
from transact.errors import TransactError
from transact.recovery.train import steps_for

if TYPE_CHECKING:
    from transact.recipes import RunRecipe


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



def _compose_layers(a: LayerPlan, b: LayerPlan) -> LayerPlan:
    """Layer plan ``b`` (indexing the units ``a`` kept) in the indices ``a`` started from."""
    experts = expert_mlp = None
    if a.experts is not None:
        experts = [a.experts[j] for j in b.experts]
        expert_mlp = [[a.expert_mlp[j][c] for c in channels] for j, channels in zip(b.experts, b.expert_mlp,
                                                                                    strict=True)]
    return LayerPlan(heads=[a.heads[j] for j in b.heads], kv_heads=[a.kv_heads[j] for j in b.kv_heads],
                     mlp=[a.mlp[j] for j in b.mlp], experts=experts, expert_mlp=expert_mlp)


def schedule_of(recipe: RunRecipe, shape: ModelShape) -> list[Targets]:
    """The widths after each shot, resolved against the dense model and checked (none for ``shots: 0``)."""
    if recipe.num_shots == 0:
        return []
    def resolve(widths, key: str) -> Targets:
        try:
            return resolve_targets(widths, shape, multiple_of=recipe.prune.multiple_of)
        except TransactError as e:
            raise TransactError(f"recipe key {key!r}: {e}") from None

    target = resolve(recipe.target, "target") if recipe.target is not None else None
    if recipe.schedule is not None:
        steps = [resolve(w, f"schedule[{i}]") for i, w in enumerate(recipe.schedule)]
        if target is not None and steps[-1] != target:
            raise TransactError(f"recipe key 'schedule': its last shot {steps[-1]} is not the target {target}")
    else:
        steps = linear_schedule(shape, target, recipe.num_shots)
    try:
        check_schedule(shape, steps)
    except TransactError as e:
        raise TransactError(f"recipe key 'schedule': {e}") from None
    return steps


def phase_steps(training, shots: int, processes: int) -> list[int]:
    """Optimizer steps of every phase of a run with ``shots`` shots: the shots', then the final recovery's."""
    tokens = [training.tokens_per_shot] * shots + ([training.final_tokens] if training.final_tokens else [])
    return [steps_for(t, training, processes) for t in tokens]
