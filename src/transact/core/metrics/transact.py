"""TransAct (paper eq. 5): a head's salience is the mean of its channels' L2 norms plus alpha times their
max; an MLP channel's salience is its L2 norm. Norms are over the calibration tokens of the transitional
activations (o_proj and down_proj inputs).

In a mixture of experts each expert's channels are scored the same way over the tokens routed to it (their
router-weighted inputs by default), and an expert by its routed contribution: the sum over its tokens of
the L2 norm of its router-weighted output, which is how much of the layer's output it carried. A shared
expert's channels are scored as a dense MLP's."""

from __future__ import annotations

from dataclasses import dataclass

from transact.core import salience
from transact.core.metrics import LayerScores, Metric, register_metric
from transact.errors import TransactError
from transact.options import check_options, option

ALPHA_HELP = ("outlier weight in eq. 5: a head's salience is the mean of its channels' norms + alpha x their max "
              "(default 10/head_dim, the authors' setting)")


@dataclass(frozen=True)
class TransactOptions:
    alpha: float | None = option(None, ALPHA_HELP, low=0.0)

    def __post_init__(self) -> None:
        check_options(self)


def transact_scores(model, stats, shape, recipe) -> LayerScores:
    attn, mlp = stats.activation("attn", "sum_sq"), stats.activation("mlp", "sum_sq")
    if len(attn) != shape.num_layers:
        raise TransactError(f"statistics cover {len(attn)} layers, model has {shape.num_layers}")
    alpha = recipe.metric_options.alpha
    alpha = salience.default_alpha(shape.head_dim) if alpha is None else alpha
    heads = [salience.head_salience(salience.channel_norms(s), shape.head_dim, alpha) for s in attn]
    channels = [salience.mlp_salience(salience.channel_norms(s)) for s in mlp]  # (P,) or (experts, P)
    experts = stats.activations.experts["contribution"] if shape.is_moe else None
    shared = None
    if shape.shared_expert_size is not None:  # a plain MLP, scored as one
        shared = [salience.mlp_salience(salience.channel_norms(s)) for s in stats.activation("shared", "sum_sq")]
    return LayerScores(heads, channels, experts, shared)


METRIC = register_metric(Metric(
    "transact", "paper eq. 5 on the transitional activations (the default; --alpha weights the max)",
    transact_scores, statistics=("sum_sq",), options=TransactOptions, experts=True))
