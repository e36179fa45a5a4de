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

The option ``mlp_score="consumer_error"`` ranks dense MLP channels the same way, one channel at a time: by
the down_proj output error removing it alone leaves after the correction (under the refit the
optimal-brain-surgeon saliency, ``salience.refit_removal_errors``). It won on one of the three real models
and lost on the other two (docs/results.md), so ``mlp_score="auto"`` lets the whole-model step prune with
both and keep the one whose pruned model has the lower loss on calibration windows no fit saw
(``transact.core.step.choose_mlp_score``); where no whole model is compared (layer by layer), auto is eq. 5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from transact.arch import get_adapter
from transact.core import salience
from transact.core.correct.refit import damp_for
from transact.core.metrics import LayerScores, Metric, register_metric
from transact.core.metrics.transact import ALPHA_HELP, transact_scores
from transact.core.select import best_heads_in_groups
from transact.core.targets import resolve_targets
from transact.options import check_options, option


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
    head_dim = attn.head_dim
    best_in_group = best_heads_in_groups(heads, attn.num_kv_heads, targets.heads // targets.kv_heads)
    error = salience.ConsumerError(attn.o.weight, gram, **correction,
                                   mean=mean if correction["correction"] == "mean" else None)

    def kept_error(groups: list[int]) -> float:
        kept = [h * head_dim + c for k in groups for h in best_in_group[k] for c in range(head_dim)]
        return error(torch.tensor(kept))

    scores = torch.zeros(attn.num_kv_heads)
    scores[salience.least_error_groups(kept_error, attn.num_kv_heads, targets.kv_heads)] = 1.0
    return scores


@dataclass(frozen=True)
class TransactResidualOptions:
    alpha: float | None = option(None, ALPHA_HELP, low=0.0)
    mlp_score: Literal["eq5", "consumer_error", "auto"] = option(
        "eq5", "how dense MLP channels are ranked: eq5 (the channel's activation norm, paper eq. 5), "
        "consumer_error (the down_proj output error removing the channel alone leaves after the recipe's "
        "correction: the refit's least-squares error, FLAP's fluctuation, or all it carried), or auto (prune "
        "with both and keep the pruned model with the lower loss on calibration windows no fit saw; eq5 layer "
        "by layer); consumer_error measured better on Qwen2.5-Coder-0.5B at 4 of 5 widths, worse on "
        "SmolLM2-135M and Gemma-3-270M (docs/results.md); experts' channels keep eq. 5")

    def __post_init__(self) -> None:
        check_options(self)


def mlp_channel_errors(down: torch.Tensor, layer: int, stats, correction: dict) -> torch.Tensor:
    """(intermediate_size,) the output error of down_proj (weight ``down``, (H, P)) that removing each channel
    alone leaves after the correction: the refit's (``salience.refit_removal_errors``), FLAP's mean
    compensation's (the channel's fluctuation through its column), or slicing's (all the channel carried)."""
    if correction["correction"] == "refit":
        return salience.refit_removal_errors(down, stats.activation("mlp", "gram")[layer], correction["damp"])
    sum_sq = stats.activation("mlp", "sum_sq")[layer]
    if correction["correction"] == "mean":
        tokens = stats.activations.tokens
        variance = salience.channel_variance(stats.activation("mlp", "sum")[layer], sum_sq, tokens)
        return salience.flap_channel_scores(variance, down.detach().cpu()) * tokens
    return sum_sq.double() * down.detach().cpu().double().square().sum(dim=0)


def mlp_channel_scores(model, stats, shape, targets, mlp_score: str, correction: dict,
                       eq5: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each layer's MLP channel scores: ``mlp_channel_errors`` where ``mlp_score`` is consumer_error, the model
    dense and some channel goes; else ``eq5`` (also for auto, which only the whole-model step resolves)."""
    if mlp_score != "consumer_error" or shape.is_moe or targets.mlp == shape.intermediate_size:
        return eq5
    return [mlp_channel_errors(ffn.down.weight, i, stats, correction).float()
            for i, (_, ffn) in enumerate(get_adapter(model).layer_parts(model))]


def transact_residual_scores(model, stats, shape, recipe) -> LayerScores:
    scores = transact_scores(model, stats, shape, recipe)
    targets = resolve_targets(recipe, shape)
    correction = correction_of(stats, recipe)
    mlp = mlp_channel_scores(model, stats, shape, targets, recipe.metric_options.mlp_score, correction, scores.mlp)
    scores = LayerScores(scores.heads, mlp, scores.experts, scores.shared)
    if targets.kv_heads == shape.num_kv_heads:  # no group leaves: nothing to choose
        return scores
    grams = stats.activation("attn", "gram")
    sums = stats.activation("attn", "sum")
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
    "leaves (refit, bias or none), computed from the Gram matrices (--alpha weights eq. 5's max; "
    "--mlp-score consumer_error ranks MLP channels by that error too)",
    transact_residual_scores, statistics=("sum_sq", "sum", "gram"), options=TransactResidualOptions, experts=True,
    corrector_aware=True))
