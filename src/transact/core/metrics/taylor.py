"""LLM-Pruner's first-order Taylor importance: |w * dL/dw| summed over the weights a unit removes, from
backward passes on the calibration batches; a KV group's k/v weights are split equally among its query
heads."""

from __future__ import annotations

from transact.core import salience
from transact.core.calibrate import WEIGHT_X_GRAD
from transact.core.metrics import LayerScores, Metric, no_heads, register_metric


def taylor_scores(model, stats, shape, recipe) -> LayerScores:
    heads, mlp = [], []
    for layer in stats.weight_x_grad:
        heads.append(salience.taylor_head_scores(layer["q"], layer["k"], layer["v"], layer["o"], shape.head_dim,
                                                 shape.num_kv_heads) if "q" in layer else no_heads())
        mlp.append(salience.taylor_channel_scores(layer.get("gate"), layer["up"], layer["down"]))
    return LayerScores(heads, mlp)


METRIC = register_metric(Metric(
    "taylor", "LLM-Pruner's first-order |w * dL/dw| over each unit's weights (needs backward passes)",
    taylor_scores, statistics=(WEIGHT_X_GRAD,)))
