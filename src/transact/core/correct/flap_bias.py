"""FLAP's bias compensation: the mean output of the channels a plan removes (over the calibration tokens)
is added back as an o_proj/down_proj bias, so every layer's mean output is kept. A vanilla checkpoint can
hold such biases only where the family's config has flags for them (Llama: attention_bias + mlp_bias,
which also give q/k/v and gate/up a bias, set to zero here)."""

from __future__ import annotations

import torch
from torch import nn

from transact.arch import get_adapter
from transact.core import salience
from transact.core.correct import Corrector, kept_inputs, register_corrector
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
def add_compensation_biases_(model: nn.Module, plan, stats, options=None) -> dict:
    """Before the plan's slicing: give o_proj/down_proj the mean output of the channels the plan removes, and
    every other projection the zero bias the config flags imply."""
    adapter = get_adapter(model)
    check_bias_compensation(adapter, model.config, plan.targets)
    for linear in adapter.prunable_linears(model):
        _zero_bias(linear)
    tokens = stats.activations.tokens
    means = {m: [t / tokens for t in stats.activation(m, "sum")] for m in ("attn", "mlp")}  # per layer (C,)
    for kept in kept_inputs(model, plan):
        shift = salience.compensation_bias(kept.linear.weight, kept.statistic(means[kept.module]), kept.cols)
        kept.linear.bias += shift.to(kept.linear.bias.dtype).to(kept.linear.bias.device)
    adapter.enable_output_biases(model.config)
    return {}


CORRECTOR = register_corrector(Corrector(
    "flap_bias", "FLAP's bias compensation: the removed channels' mean output kept as o_proj/down_proj biases "
    "(Llama only, saved with attention_bias/mlp_bias; --flap-bias)",
    apply=add_compensation_biases_, check=check_bias_compensation, statistics=("sum",), flag="flap-bias"))
