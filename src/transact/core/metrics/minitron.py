"""Minitron's activation importance: per sample the mean |activation| over the sequence, then the L2 norm
over samples; a head is the L2 norm over its channels."""

from __future__ import annotations

from transact.core import salience
from transact.core.metrics import LayerScores, Metric, register_metric


def minitron_scores(model, stats, shape, recipe) -> LayerScores:
    heads = [salience.minitron_head_scores(salience.minitron_channel_scores(s), shape.head_dim)
             for s in stats.activation("attn", "abs_mean_sq")]
    mlp = [salience.minitron_channel_scores(s) for s in stats.activation("mlp", "abs_mean_sq")]
    return LayerScores(heads, mlp)


METRIC = register_metric(Metric(
    "minitron", "Minitron's per-sample mean |activation|, L2 over samples (heads: L2 over channels)",
    minitron_scores, statistics=("abs_mean_sq",)))
