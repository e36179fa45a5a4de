"""Eq. 5 with KV groups chosen by what the correction leaves: query heads within a group, MLP channels and
experts are scored as the ``transact`` metric scores them (paper eq. 5 on the transitional activations), and
in each layer the KV groups to keep are the ones whose keeping leaves the least output error of o_proj once
the recipe's correction has run (the least-squares refit: the error it cannot recover; FLAP's bias: the
removed heads' fluctuation; none: everything the removed heads carried), computed from the Gram matrix of
o_proj's input (``salience.ConsumerError``), every set of groups compared where there are few of them
(``salience.least_error_groups``).

Why: eq. 5 ranks a group by the L2 norm of its heads' outputs, blind to o_proj's columns and to what the
refit can rebuild. On Qwen2.5-Coder-0.5B it kept the KV group whose removal the refit repairs worse in about
half of the layers (docs/results.md, "Quality that transfers"). Where every group stays and no query head goes
inside one, the metric is eq. 5.

The option ``mlp_score`` ranks dense MLP channels: ``consumer_error`` the same way, one channel at a time, by
the down_proj output error removing it alone leaves after the correction (under the refit the
optimal-brain-surgeon saliency, ``salience.refit_removal_errors``); ``eq5`` by the paper's channel norm. On
the three real models, under the refit, consumer_error was better or within 4 % wherever the MLP kept at
least half its channels and worse wherever it kept less (where the removed channels outnumber the kept ones,
their single removals say little about removing them together), and worse with under 4 calibration tokens
per channel (where H⁻¹ is poorly estimated); so the default ``auto`` is that rule (``mlp_score_of``).
``compare`` lets the whole-model step prune with both and keep the one whose pruned model has the lower loss
on calibration windows no fit saw (``transact.core.step.choose_mlp_score``); layer by layer, where no whole
model is compared, it is auto's rule.

The option ``head_score`` chooses the query heads kept inside each kept group the same way where some go:
``consumer_error`` keeps those whose keeping leaves the least o_proj output error after the correction
(every choice compared up to ``salience.EXACT_GROUP_SETS``; beyond, greedy removal, under the refit by
optimal-brain-surgeon updates). It was better than eq. 5 on all three real models wherever the MLP kept at
least 3/4 of its channels and worse wherever it kept half or less, so the default ``auto`` is that rule
(``head_score_of``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from transact.arch import get_adapter
from transact.core import salience
from transact.core.correct.refit import damp_for, few_tokens, widest_gram
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


def layer_choice(attn, gram: torch.Tensor, mean: torch.Tensor | None, heads: torch.Tensor, targets,
                 correction: dict, head_score: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's (head scores (num_heads,), group scores (num_kv_heads,)): the groups to keep score 1, the
    others 0, chosen with each group's eq. 5 best heads; with ``head_score="consumer_error"`` the query heads
    kept inside the kept groups are then the ones whose keeping leaves the least error, and score above every
    other head (eq. 5's order kept within each side)."""
    head_dim, num_kv = attn.head_dim, attn.num_kv_heads
    per_group = targets.heads // targets.kv_heads
    error = salience.ConsumerError(attn.o.weight, gram, **correction,
                                   mean=mean if correction["correction"] == "mean" else None)

    def kept_error(kept_heads: list[int]) -> float:
        return error(torch.tensor([h * head_dim + c for h in kept_heads for c in range(head_dim)]))

    best_in_group = best_heads_in_groups(heads, num_kv, per_group)
    groups = list(range(num_kv)) if targets.kv_heads == num_kv else salience.least_error_groups(
        lambda kept: kept_error([h for k in kept for h in best_in_group[k]]), num_kv, targets.kv_heads)
    group_scores = torch.zeros(num_kv)
    group_scores[groups] = 1.0
    size = heads.shape[0] // num_kv
    if head_score != "consumer_error" or per_group == size:
        return heads, group_scores
    in_groups = [list(range(g * size, (g + 1) * size)) for g in groups]
    if correction["correction"] == "refit" and salience.head_choices(in_groups, per_group) > salience.EXACT_GROUP_SETS:
        chosen = salience.refit_greedy_heads(attn.o.weight, gram, head_dim, correction["damp"], in_groups, per_group)
    else:  # every choice compared, or greedy with the correction's own error
        chosen = salience.least_error_heads(kept_error, in_groups, per_group)
    lifted = heads.clone()
    lifted[chosen] += float(heads.max() - heads.min()) + 1.0
    return lifted, group_scores


@dataclass(frozen=True)
class TransactResidualOptions:
    alpha: float | None = option(None, ALPHA_HELP, low=0.0)
    mlp_score: Literal["eq5", "consumer_error", "auto", "compare"] = option(
        "auto", "how dense MLP channels are ranked: eq5 (the channel's activation norm, paper eq. 5), "
        "consumer_error (the down_proj output error removing the channel alone leaves after the recipe's "
        "correction: the refit's least-squares error, FLAP's fluctuation, or all it carried), auto "
        "(consumer_error under the refit where the MLP keeps at least half its channels, eq5 where more go, "
        "without the refit, below 4 calibration tokens per channel and on MoE models: measured on "
        "SmolLM2-135M, Qwen2.5-Coder-0.5B and Gemma-3-270M, docs/results.md), or compare (prune with both "
        "and keep the pruned model with the lower loss on calibration windows no fit saw; auto's rule layer "
        "by layer); experts' channels keep eq. 5")
    head_score: Literal["eq5", "consumer_error", "auto"] = option(
        "auto", "how the query heads kept inside each kept KV group are chosen where some go: eq5 (the best "
        "heads by paper eq. 5), consumer_error (the heads whose keeping leaves the least o_proj output error "
        "after the recipe's correction, every choice compared up to 70 of them, else greedy removal), or auto "
        "(consumer_error where the MLP keeps at least 3/4 of its channels, eq5 where more go and on MoE "
        "models: consumer_error measured better at every such width of SmolLM2-135M, Qwen2.5-Coder-0.5B and "
        "Gemma-3-270M, worse at every width that kept half the MLP or less; docs/results.md)")

    def __post_init__(self) -> None:
        check_options(self)


# head_score auto: error-chosen heads where the MLP keeps at least this share of its channels
ERROR_HEADS_MLP_KEPT = 0.75
# mlp_score auto: error-ranked channels where the MLP keeps at least this share of them
ERROR_CHANNELS_MLP_KEPT = 0.5


def head_score_of(option: str, shape, targets, few: bool) -> str:
    """The head score a recipe's ``head_score`` option means for these targets: auto resolves by how much of
    the MLP stays (``ERROR_HEADS_MLP_KEPT``); eq5 where the calibration has ``few`` tokens (the refit's
    ``few_tokens`` regime, where the error-based choices read a poorly estimated Gram matrix: measured at
    16 x 256 tokens, docs/results.md) and on MoE models, where it was never measured."""
    if option != "auto":
        return option
    if shape.is_moe or few or targets.mlp < ERROR_HEADS_MLP_KEPT * shape.intermediate_size:
        return "eq5"
    return "consumer_error"


def mlp_score_of(option: str, shape, targets, correction: dict, few: bool) -> str:
    """The MLP ranking a recipe's ``mlp_score`` option means for these targets: auto (and compare, where no
    whole model is compared) is consumer_error under the refit where at least ``ERROR_CHANNELS_MLP_KEPT`` of
    the MLP stays and the calibration has not ``few`` tokens (as ``head_score_of``), else eq5: with slicing alone the
    error ranking lost on Gemma-3-270M, with 16 x 256 calibration tokens on SmolLM2-135M and Gemma-3-270M
    (docs/results.md); eq5 on MoE models, whose experts' channels keep eq. 5."""
    if option not in ("auto", "compare"):
        return option
    if shape.is_moe or correction["correction"] != "refit" or few or \
            targets.mlp < ERROR_CHANNELS_MLP_KEPT * shape.intermediate_size:
        return "eq5"
    return "consumer_error"


def calibrated_few(stats) -> bool:
    """Whether these statistics are in the refit's few-tokens regime (``refit.few_tokens`` on their widest
    Gram matrix)."""
    return few_tokens(stats.activations.tokens, widest_gram(stats))


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
    """Each layer's MLP channel scores: ``mlp_channel_errors`` where ``mlp_score`` means consumer_error
    (``mlp_score_of``), the model dense and some channel goes; else ``eq5``."""
    chosen = mlp_score_of(mlp_score, shape, targets, correction, calibrated_few(stats))
    if chosen != "consumer_error" or shape.is_moe or targets.mlp == shape.intermediate_size:
        return eq5
    return [mlp_channel_errors(ffn.down.weight, i, stats, correction).float()
            for i, (_, ffn) in enumerate(get_adapter(model).layer_parts(model))]


def transact_residual_scores(model, stats, shape, recipe) -> LayerScores:
    scores = transact_scores(model, stats, shape, recipe)
    targets = resolve_targets(recipe, shape)
    correction = correction_of(stats, recipe)
    mlp = mlp_channel_scores(model, stats, shape, targets, recipe.metric_options.mlp_score, correction, scores.mlp)
    scores = LayerScores(scores.heads, mlp, scores.experts, scores.shared)
    head_score = head_score_of(recipe.metric_options.head_score, shape, targets, calibrated_few(stats))
    head_cut = head_score == "consumer_error" and targets.heads < shape.num_heads
    if targets.kv_heads == shape.num_kv_heads and not head_cut:  # no group leaves, no error-chosen heads
        return scores
    grams = stats.activation("attn", "gram")
    sums = stats.activation("attn", "sum")
    heads, groups = [], []
    for i, (attn, _) in enumerate(get_adapter(model).layer_parts(model)):
        if attn is None:
            heads.append(scores.heads[i])
            groups.append(torch.zeros(0))
            continue
        mean = sums[i] / stats.activations.tokens
        layer_heads, layer_groups = layer_choice(attn, grams[i], mean, scores.heads[i], targets, correction,
                                                 head_score)
        heads.append(layer_heads)
        groups.append(layer_groups)
    return LayerScores(heads, scores.mlp, scores.experts, scores.shared, groups)


METRIC = register_metric(Metric(
    "transact_residual", "eq. 5 for heads and channels, KV groups kept by the output error the correction "
    "leaves (refit, bias or none), computed from the Gram matrices (--alpha weights eq. 5's max; "
    "--mlp-score ranks MLP channels by that error too and --head-score picks the query heads inside the kept "
    "groups by it, by default (auto) where the MLP keeps at least 1/2 and 3/4 of its channels)",
    transact_residual_scores, statistics=("sum_sq", "sum", "gram"), options=TransactResidualOptions, experts=True,
    corrector_aware=True))
