"""The seeded random control: i.i.d. uniform scores, drawn from the recipe's seed (data-free)."""

from __future__ import annotations

from dataclasses import replace

import torch

from transact.arch import ModelShape
from transact.core import salience
from transact.core.metrics import LayerScores, Metric, no_heads, register_metric


def random_layer_scores(shape: ModelShape, seed: int) -> LayerScores:
    """Every layer draws head scores (a layer without softmax attention then drops them), so the draws of
    each layer do not depend on which layers have attention."""
    generator = torch.Generator().manual_seed(seed)
    heads = [salience.random_scores(shape.num_heads, generator) for _ in range(shape.num_layers)]
    experts = shape.num_experts or 1  # a mixture of experts draws every expert's channels, then the experts
    mlp = [salience.random_scores(experts * shape.intermediate_size, generator) for _ in range(shape.num_layers)]
    heads = [scores if shape.has_attention(i) else no_heads() for i, scores in enumerate(heads)]
    if not shape.is_moe:
        return LayerScores(heads, mlp)
    mlp = [scores.view(experts, shape.intermediate_size) for scores in mlp]
    expert_scores = [salience.random_scores(experts, generator) for _ in range(shape.num_layers)]
    shared = None if shape.shared_expert_size is None else \
        [salience.random_scores(shape.shared_expert_size, generator) for _ in range(shape.num_layers)]
    return LayerScores(heads, mlp, expert_scores, shared)


def random_scores(model, stats, shape: ModelShape, recipe) -> LayerScores:
    """The whole model's draws; a layer-wise prune (one layer of many) takes its layer's share of them, so
    both paths select the same units."""
    if stats is None or stats.layer is None:
        return random_layer_scores(shape, recipe.seed)
    index, num_layers = stats.layer
    every = random_layer_scores(replace(shape, num_layers=num_layers, attention_layers=None), recipe.seed)
    return LayerScores([every.heads[index] if shape.has_attention(0) else no_heads()], [every.mlp[index]],
                       None if every.experts is None else [every.experts[index]],
                       None if every.shared is None else [every.shared[index]])


METRIC = register_metric(Metric("random", "data-free control: seeded random scores (--seed)", random_scores,
                                experts=True))
