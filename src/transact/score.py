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
    # Channel means of the transitional activations (flap only; its bias compensation needs them).
    attn_mean: list[torch.Tensor] | None = None  # per layer (num_heads * head_dim,)
    mlp_mean: list[torch.Tensor] | None = None  # per layer (intermediate_size,)


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


def flap_scores(model: nn.Module, stats: ActivationStats, shape: ModelShape) -> LayerScores:
    """FLAP's fluctuation metric: heads sum their channels' scores. The channel means ride along for the
    optional bias compensation (``prune.add_compensation_biases_``)."""
    if stats.attn_sum is None or stats.mlp_sum is None:
        raise TransactError("the flap metric needs channel sums; calibrate with extra=('sum',)")
    adapter = get_adapter(model)
    heads, mlp = [], []
    for i, layer in enumerate(adapter.layers(model)):
        o = adapter.attention(layer, model.config).o.weight.detach().cpu()
        down = adapter.mlp(layer, model.config).down.weight.detach().cpu()
        attn_var = salience.channel_variance(stats.attn_sum[i], stats.attn_sum_sq[i], stats.tokens)
        mlp_var = salience.channel_variance(stats.mlp_sum[i], stats.mlp_sum_sq[i], stats.tokens)
        heads.append(salience.sum_per_head(salience.flap_channel_scores(attn_var, o), shape.head_dim))
        mlp.append(salience.flap_channel_scores(mlp_var, down))
    return LayerScores(heads, mlp, attn_mean=[t / stats.tokens for t in stats.attn_sum],
                       mlp_mean=[t / stats.tokens for t in stats.mlp_sum])


def minitron_scores(stats: ActivationStats, shape: ModelShape) -> LayerScores:
    """Minitron's activation importance: mean |x| per sample, L2 over samples; heads: L2 over channels."""
    if stats.attn_abs_mean_sq is None or stats.mlp_abs_mean_sq is None:
        raise TransactError("the minitron metric needs per-sample means; calibrate with extra=('abs_mean_sq',)")
    heads = [salience.minitron_head_scores(salience.minitron_channel_scores(s), shape.head_dim)
             for s in stats.attn_abs_mean_sq]
    mlp = [salience.minitron_channel_scores(s) for s in stats.mlp_abs_mean_sq]
    return LayerScores(heads, mlp)


def taylor_scores(model: nn.Module, saliences: dict[nn.Linear, torch.Tensor], shape: ModelShape) -> LayerScores:
    """LLM-Pruner's first-order Taylor importance from |w * dL/dw| of every prunable projection."""
    adapter = get_adapter(model)
    heads, mlp = [], []
    for layer in adapter.layers(model):
        a, m = adapter.attention(layer, model.config), adapter.mlp(layer, model.config)
        heads.append(salience.taylor_head_scores(saliences[a.q], saliences[a.k], saliences[a.v], saliences[a.o],
                                                 shape.head_dim, shape.num_kv_heads))
        gate = saliences[m.gate] if m.gate is not None else None
        mlp.append(salience.taylor_channel_scores(gate, saliences[m.up], saliences[m.down]))
    return LayerScores(heads, mlp)
