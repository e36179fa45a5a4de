"""The weight-magnitude control (data-free): the norm of the weights a unit owns alone."""

from __future__ import annotations

from transact.arch import get_adapter
from transact.core import salience
from transact.core.metrics import LayerScores, Metric, no_heads, register_metric


def magnitude_scores(model, stats, shape, recipe) -> LayerScores:
    heads, mlp = [], []
    for attn, ffn in get_adapter(model).layer_parts(model):
        heads.append(no_heads() if attn is None else
                     salience.magnitude_head_scores(attn.q.weight, attn.o.weight, shape.head_dim).cpu())
        gate = ffn.gate.weight if ffn.gate is not None else None
        mlp.append(salience.magnitude_mlp_scores(gate, ffn.up.weight, ffn.down.weight).cpu())
    return LayerScores(heads, mlp)


METRIC = register_metric(Metric("magnitude", "data-free control: norms of the weights each unit owns",
                                magnitude_scores))
