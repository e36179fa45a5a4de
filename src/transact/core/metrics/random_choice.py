"""The seeded random control: i.i.d. uniform scores, drawn from the recipe's seed (data-free)."""

from __future__ import annotations

import torch

from transact.arch import ModelShape
from transact.core import salience
from transact.core.metrics import LayerScores, Metric, register_metric


def random_layer_scores(shape: ModelShape, seed: int) -> LayerScores:
    generator = torch.Generator().manual_seed(seed)
    heads = [salience.random_scores(shape.num_heads, generator) for _ in range(shape.num_layers)]
    mlp = [salience.random_scores(shape.intermediate_size, generator) for _ in range(shape.num_layers)]
    return LayerScores(heads, mlp)


METRIC = register_metric(Metric(
    "random", "data-free control: seeded random scores (--seed)",
    lambda model, stats, shape, recipe: random_layer_scores(shape, recipe.seed)))
