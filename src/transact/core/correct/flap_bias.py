"""FLAP's bias compensation: the mean output of the channels a plan removes (over the calibration tokens)
is added back as an o_proj/down_proj bias, so every layer's mean output is kept. A vanilla checkpoint can
hold such biases only where the family's config has flags for them (Llama: attention_bias + mlp_bias,
which also give q/k/v and gate/up a bias, set to zero here)."""

from __future__ import annotations

import torch
from torch import nn

from transact.arch import get_adapter
from transact.core import salience
from transact.core.correct import Corrector, register_corrector
from transact.core.surgery import unit_rows
from transact.errors import TransactError


def check_bias_compensation(adapter, config, targets) -> None:
    """Refuse, before any work, where a vanilla checkpoint could not carry the biases."""
    reason = adapter.output_bias_refusal(config, targets.heads)
    if reason:
        raise TransactError(f"bias compensation needs o_proj and down_proj biases, but {reason}")


def _zero_bias(linear: nn.Linear) -> None:
    if linear.bias is None:
        w = linear.weight
        linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                   requires_grad=w.requires_grad)


@torch.no_grad()
def add_compensation_biases_(model: nn.Module, plan, stats, recipe=None) -> dict:
    """Before the plan's slicing: give o_proj/down_proj the mean output of the channels the plan removes, and
    every other projection the zero bias the config flags imply."""
    adapter = get_adapter(model)
    check_bias_compensation(adapter, model.config, plan.targets)
    tokens = stats.activations.tokens
    attn_mean = [t / tokens for t in stats.activation("attn", "sum")]  # per layer (num_heads * head_dim,)
    mlp_mean = [t / tokens for t in stats.activation("mlp", "sum")]  # per layer (intermediate_size,)
    for (attn, mlp), kept, a_mean, m_mean in zip(adapter.layer_parts(model), plan.layers, attn_mean, mlp_mean,
                                                 strict=True):
        for linear in (*attn.linears, *mlp.linears):
            _zero_bias(linear)
        q_rows = unit_rows(kept.heads, plan.source.head_dim, torch.device("cpu"))
        channels = torch.tensor(kept.mlp, dtype=torch.long)
        for linear, mean, cols in ((attn.o, a_mean, q_rows), (mlp.down, m_mean, channels)):
            shift = salience.compensation_bias(linear.weight, mean, cols)
            linear.bias += shift.to(linear.bias.dtype).to(linear.bias.device)
    adapter.enable_output_biases(model.config)
    return {}


CORRECTOR = register_corrector(Corrector(
    "flap_bias", "FLAP's bias compensation: the removed channels' mean output kept as o_proj/down_proj biases",
    apply=add_compensation_biases_, check=check_bias_compensation, statistics=("sum",)))
