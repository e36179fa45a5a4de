"""FLAP's fluctuation metric (WIFV): a channel's variance over the calibration tokens times the squared
norm of the o_proj/down_proj column that consumes it; a head sums its channels."""

from __future__ import annotations

from transact.arch import get_adapter
from transact.core import salience
from transact.core.metrics import LayerScores, Metric, no_heads, register_metric


def flap_scores(model, stats, shape, recipe) -> LayerScores:
    sums = {m: stats.activation(m, "sum") for m in ("attn", "mlp")}
    sum_sqs = {m: stats.activation(m, "sum_sq") for m in ("attn", "mlp")}
    heads, mlp = [], []
    for i, (attn, ffn) in enumerate(get_adapter(model).layer_parts(model)):
        heads.append(no_heads() if attn is None else salience.sum_per_head(salience.flap_channel_scores(
            salience.channel_variance(sums["attn"][i], sum_sqs["attn"][i], stats.activations.tokens),
            attn.o.weight.detach().cpu()), shape.head_dim))
        mlp_var = salience.channel_variance(sums["mlp"][i], sum_sqs["mlp"][i], stats.activations.tokens)
        down = ffn.down.weight.detach().cpu()
        mlp.append(salience.flap_channel_scores(mlp_var, down))
    return LayerScores(heads, mlp)


METRIC = register_metric(Metric(
    "flap", "FLAP's fluctuation: channel variance x squared norm of the consuming o_proj/down_proj column",
    flap_scores, statistics=("sum", "sum_sq")))
