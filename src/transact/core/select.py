"""Scores + targets -> PrunePlan: which heads, KV groups, MLP channels and experts each layer keeps.

Kept indices are in their original order. In a hybrid model only the softmax-attention layers
(``ModelShape.attention_layers``) have heads; the others keep empty head lists.

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

from collections.abc import Sequence
from typing import Any

import torch

from transact.arch import ModelShape
from transact.core.plan import LayerPlan, PrunePlan
from transact.core.targets import Targets
from transact.errors import TransactError


def _top_sorted(scores: Sequence[float], k: int) -> list[int]:
    """Indices of the k largest scores, ties broken by lower index, returned in ascending order."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:k])


def best_heads_in_groups(head_scores: torch.Tensor, num_kv_heads: int, per_group: int) -> list[list[int]]:
    """The ``per_group`` best query heads of each KV group (ascending; ties to the lower index), the heads a
    group keeps if it stays. head_scores: (num_heads,) -> num_kv_heads lists."""
    scores = head_scores.tolist()
    g = len(scores) // num_kv_heads
    return [[group * g + i for i in _top_sorted(scores[group * g:(group + 1) * g], per_group)]
            for group in range(num_kv_heads)]


def select_heads(
    head_scores: torch.Tensor, num_kv_heads: int, keep_heads: int, keep_kv: int,
    group_scores: torch.Tensor | None = None,
) -> tuple[list[int], list[int]]:
    """Pick kept query heads and KV groups of one layer (see the module docstring for the GQA rule).

    head_scores: (num_heads,); group_scores: (num_kv_heads,) where the metric ranks the groups itself (None:
    each group scores the sum of the heads it would keep) -> (kept query heads, kept KV groups), ascending.
    """
    best_in_group = best_heads_in_groups(head_scores, num_kv_heads, keep_heads // keep_kv)
    scores = head_scores.tolist()
    ranking = ([sum(scores[h] for h in chosen) for chosen in best_in_group] if group_scores is None
               else group_scores.tolist())
    groups = _top_sorted(ranking, keep_kv)
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



def make_plan(
    head_scores: Sequence[torch.Tensor],
    mlp_scores: Sequence[torch.Tensor],
    targets: Targets,
    shape: ModelShape,
    expert_scores: Sequence[torch.Tensor] | None = None,
    shared_scores: Sequence[torch.Tensor] | None = None,
    group_scores: Sequence[torch.Tensor] | None = None,
    mlp_widths: Sequence[int] | None = None,
    **provenance: Any,
) -> PrunePlan:
    """Select per layer. head_scores[l]: (num_heads,) ((0,) in a layer without attention),
    mlp_scores[l]: (intermediate_size,), in a mixture of experts (num_experts, intermediate_size) with
    expert_scores[l]: (num_experts,) and, where there is a shared expert, shared_scores[l]: (its width,);
    group_scores[l]: (num_kv_heads,) where the metric ranks KV groups itself; ``mlp_widths``: each layer's
    MLP width where they differ (``targets.mlp`` their mean)."""
    if shape.is_moe and expert_scores is None:
        raise TransactError("a mixture of experts needs scores of its experts")
    if shape.shared_expert_size is not None and shared_scores is None:
        raise TransactError("a model with a shared expert needs scores of its channels")
    layers = []
    for i, (h_scores, m_scores) in enumerate(zip(head_scores, mlp_scores, strict=True)):
        ranked = None if group_scores is None else group_scores[i]
        heads, groups = (select_heads(h_scores, shape.num_kv_heads, targets.heads, targets.kv_heads, ranked)
                         if h_scores.numel() else ([], []))
        if shape.is_moe:
            experts, channels = select_experts(expert_scores[i], m_scores, targets.experts, targets.mlp)
            shared = [] if shared_scores is None else select_channels(shared_scores[i], targets.shared_mlp)
            layers.append(LayerPlan(heads=heads, kv_heads=groups, mlp=shared, experts=experts, expert_mlp=channels))
        else:
            width = targets.mlp if mlp_widths is None else mlp_widths[i]
            layers.append(LayerPlan(heads=heads, kv_heads=groups, mlp=select_channels(m_scores, width)))
    widths = None if mlp_widths is None else list(mlp_widths)
    plan = PrunePlan(source=shape, targets=targets, layers=layers, mlp_widths=widths, **provenance)
    plan.validate()
    return plan
