"""Refit-aware selection: units ranked by what the least-squares refit cannot recover. For each layer's
o_proj (heads: blocks of head_dim input channels) and down_proj (MLP channels), units are removed greedily,
each time the one whose removal costs the least output error once the remaining columns are refitted
(the optimal-brain-surgeon step on the Gram matrix of the consumer's input; ``salience.refit_removal_order``).
A unit whose output the kept ones can rebuild scores low even when its activations are large, which
activation norms (eq. 5) cannot see. Meant to be used with the refit corrector, whose damping it shares.
"""

from __future__ import annotations

from transact.arch import get_adapter
from transact.core import salience
from transact.core.correct.refit import damp_for
from transact.core.metrics import LayerScores, Metric, no_heads, register_metric
from transact.core.targets import resolve_targets


def refit_aware_scores(model, stats, shape, recipe) -> LayerScores:
    grams = {m: stats.activation(m, "gram") for m in ("attn", "mlp")}
    damp = damp_for(stats, recipe.options_of("refit"))
    targets = resolve_targets(recipe, shape)
    heads, mlp = [], []
    for i, (attn, ffn) in enumerate(get_adapter(model).layer_parts(model)):
        heads.append(no_heads() if attn is None else salience.refit_removal_order(
            attn.o.weight, grams["attn"][i], shape.head_dim, damp, remove=shape.num_heads - targets.heads))
        mlp.append(salience.refit_removal_order(ffn.down.weight, grams["mlp"][i], 1, damp,
                                                remove=shape.intermediate_size - targets.mlp))
    return LayerScores(heads, mlp)


METRIC = register_metric(Metric(
    "refit_aware", "units ranked by the output error the least-squares refit leaves when they are removed "
    "greedily (optimal-brain-surgeon steps on the Gram matrix; pair with --reconstruct)",
    refit_aware_scores, statistics=("gram",), corrector_aware=True))
