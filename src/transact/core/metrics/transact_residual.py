"""Eq. 5 with KV groups chosen by what the correction leaves: query heads within a group, MLP channels and
experts are scored as the ``transact`` metric scores them (paper eq. 5 on the transitional activations), and
in each layer the KV groups to keep are the ones whose keeping leaves the least output error of o_proj once
the recipe's correction has run (the least-squares refit: the error it cannot recover; FLAP's bias: the
removed heads' fluctuation; none: everything the removed heads carried), computed from the Gram matrix of
o_proj's input (``salience.ConsumerError``), every set of groups compared where there are few of them
(``salience.least_error_groups``).

Why: eq. 5 ranks a group by the L2 norm of its heads' outputs, blind to o_proj's columns and to what the
refit can rebuild. On Qwen2.5-Coder-0.5B it kept the KV group whose removal the refit repairs worse in about
half of the layers (docs/results.md, "Quality that transfers"). Where every group stays, the metric is eq. 5.
"""

from __future__ import annotations

import torch

from transact.arch import get_adapter
from transact.core import salience
from transact.core.correct.refit import damp_for
from transact.core.metrics import LayerScores, Metric, register_metric
from transact.core.metrics.transact import TransactOptions, transact_scores
from transact.core.targets import resolve_targets


def correction_of(stats, recipe) -> dict:
    """How the error a removal leaves is measured: after the recipe's refit (with its damping), after FLAP's
    mean compensation, or after slicing alone."""
    if "refit" in recipe.correctors:
        return {"correction": "refit", "damp": damp_for(stats, recipe.options_of("refit"))}
    if "flap_bias" in recipe.correctors:
        return {"correction": "mean", "tokens": stats.activations.tokens}
    return {"correction": "none"}


def group_scores(attn, gram: torch.Tensor, mean: torch.Tensor | None, heads: torch.Tensor, targets,
                 correction: dict) -> torch.Tensor:
    """(num_kv_heads,) scores of one layer's KV groups: 1 for the groups to keep, 0 for the others."""
    g, head_dim = attn.num_heads // attn.num_kv_heads, attn.head_dim
    per_group = targets.heads // targets.kv_heads
    best_in_group = [sorted(sorted(range(k * g, (k + 1) * g), key=lambda h: -float(heads[h]))[:per_group])
                     for k in range(attn.num_kv_heads)]
    error = salience.ConsumerError(attn.o.weight, gram, **correction,
                                   mean=mean if correction["correction"] == "mean" else None)

    def kept_error(groups: list[int]) -> float:
        kept = [h * head_dim + c for k in groups for h in best_in_group[k] for c in range(head_dim)]
        return error(torch.tensor(kept))

    scores = torch.zeros(attn.num_kv_heads)
    scores[salience.least_error_groups(kept_error, attn.num_kv_heads, targets.kv_heads)] = 1.0
    return scores


def transact_residual_scores(model, stats, shape, recipe) -> LayerScores:
    scores = transact_scores(model, stats, shape, recipe)
    targets = resolve_targets(recipe, shape)
    if targets.kv_heads == shape.num_kv_heads:  # no group leaves: nothing to choose
        return scores
    grams = stats.activation("attn", "gram")
    sums = stats.activation("attn", "sum")
    correction = correction_of(stats, recipe)
    groups = []
    for i, (attn, _) in enumerate(get_adapter(model).layer_parts(model)):
        if attn is None:
            groups.append(torch.zeros(0))
            continue
        mean = sums[i] / stats.activations.tokens
        groups.append(group_scores(attn, grams[i], mean, scores.heads[i], targets, correction))
    return LayerScores(scores.heads, scores.mlp, scores.experts, scores.shared, groups)


METRIC = register_metric(Metric(
    "transact_residual", "eq. 5 for heads and channels, KV groups kept by the output error the correction "
    "leaves (refit, bias or none), computed from the Gram matrices (--alpha weights eq. 5's max)",
    transact_residual_scores, statistics=("sum_sq", "sum", "gram"), options=TransactOptions, experts=True,
    corrector_aware=True))
