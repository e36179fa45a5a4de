"""Per-layer head and MLP-channel scores for one metric, from calibration statistics or the weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from transact import salience
from transact.arch import get_adapter
from transact.calibrate import ActivationStats
from transact.errors import TransactError
from transact.plan import ModelShape


@dataclass(frozen=True)
class LayerScores:
    heads: list[torch.Tensor]  # per layer (num_heads,)
    mlp: list[torch.Tensor]  # per layer (intermediate_size,)


def transact_scores(stats: ActivationStats, shape: ModelShape, alpha: float | None = None) -> LayerScores:
    """Paper eq. 5 for heads, channel L2 norm for MLP channels."""
    if len(stats.attn_sum_sq) != shape.num_layers:
        raise TransactError(f"statistics cover {len(stats.attn_sum_sq)} layers, model has {shape.num_layers}")
    if alpha is None:
        alpha = salience.default_alpha(shape.head_dim)
    heads = [salience.head_salience(salience.channel_norms(s), shape.head_dim, alpha) for s in stats.attn_sum_sq]
    mlp = [salience.mlp_salience(salience.channel_norms(s)) for s in stats.mlp_sum_sq]
    return LayerScores(heads, mlp)


def magnitude_scores(model: nn.Module, shape: ModelShape) -> LayerScores:
    adapter = get_adapter(model)
    heads, mlp = [], []
    for layer in adapter.layers(model):
        attn = adapter.attention(layer, model.config)
        m = adapter.mlp(layer, model.config)
        heads.append(salience.magnitude_head_scores(attn.q.weight, attn.o.weight, shape.head_dim).cpu())
        gate = m.gate.weight if m.gate is not None else None
        mlp.append(salience.magnitude_mlp_scores(gate, m.up.weight, m.down.weight).cpu())
    return LayerScores(heads, mlp)


def random_layer_scores(shape: ModelShape, seed: int) -> LayerScores:
    generator = torch.Generator().manual_seed(seed)
    heads = [salience.random_scores(shape.num_heads, generator) for _ in range(shape.num_layers)]
    mlp = [salience.random_scores(shape.intermediate_size, generator) for _ in range(shape.num_layers)]
    return LayerScores(heads, mlp)
