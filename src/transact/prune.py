"""Apply a PrunePlan to a model in place: slice the projections, update the config and module attributes.

q/k/v/gate/up keep only the output rows (and bias entries) of kept units; o/down keep only the matching
input columns. Embeddings, norms (including Qwen3's per-head q/k norms, which act on head_dim) and the
hidden size are untouched. Slicing copies values exactly, so applying the same plan to the same base
model always gives bit-identical weights.
"""

from __future__ import annotations

import torch
from torch import nn

from transact import salience
from transact.arch import get_adapter
from transact.errors import TransactError
from transact.plan import ModelShape, PrunePlan


def _unit_rows(units: list[int], width: int, device: torch.device) -> torch.Tensor:
    """Row indices of whole units of ``width`` rows (a head's head_dim rows). -> (len(units) * width,)."""
    base = torch.tensor(units, dtype=torch.long, device=device).unsqueeze(1) * width
    return (base + torch.arange(width, device=device)).reshape(-1)


def _keep_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach().index_select(0, rows).clone(),
                                 requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach().index_select(0, rows).clone(),
                                   requires_grad=linear.bias.requires_grad)
    linear.out_features = rows.numel()


def _keep_columns(linear: nn.Linear, cols: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach().index_select(1, cols).clone(),
                                 requires_grad=linear.weight.requires_grad)
    linear.in_features = cols.numel()


@torch.no_grad()
def prune_(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Prune ``model`` in place to ``plan`` (which must have been made for this model's shape)."""
    adapter = get_adapter(model)
    config = model.config
    plan.check_applies_to(ModelShape.of(config))
    head_dim = plan.source.head_dim
    for layer, kept in zip(adapter.layers(model), plan.layers, strict=True):
        attn = adapter.attention(layer, config)
        mlp = adapter.mlp(layer, config)
        device = attn.q.weight.device
        q_rows = _unit_rows(kept.heads, head_dim, device)
        kv_rows = _unit_rows(kept.kv_heads, head_dim, device)
        _keep_rows(attn.q, q_rows)
        _keep_rows(attn.k, kv_rows)
        _keep_rows(attn.v, kv_rows)
        _keep_columns(attn.o, q_rows)
        channels = torch.tensor(kept.mlp, dtype=torch.long, device=mlp.up.weight.device)
        if mlp.gate is not None:
            _keep_rows(mlp.gate, channels)
        _keep_rows(mlp.up, channels)
        _keep_columns(mlp.down, channels)
    t = plan.targets
    adapter.write_config(config, num_heads=t.heads, num_kv_heads=t.kv_heads, intermediate_size=t.mlp)
    for layer in adapter.layers(model):
        adapter.sync_modules(layer, config)
    return model


# ---------------------------------------------------------------- FLAP's bias compensation

def check_bias_compensation(config, targets) -> None:
    """Refuse bias compensation, before any work, where a vanilla checkpoint could not carry the biases."""
    adapter = get_adapter(config)
    if not adapter.output_bias_flags:
        raise TransactError(
            f"bias compensation needs o_proj and down_proj biases, which a vanilla {config.model_type!r} "
            "checkpoint cannot carry (its config has no such option); only llama (attention_bias + mlp_bias) can")
    if config.hidden_size % targets.heads:
        raise TransactError(
            f"bias compensation needs LlamaConfig's attention_bias/mlp_bias, but {targets.heads} heads do not "
            f"divide hidden_size {config.hidden_size}, so the checkpoint would have to be saved as Mistral, "
            "which has no biases; choose a head count that divides it")


def _zero_bias(linear: nn.Linear) -> None:
    if linear.bias is None:
        w = linear.weight
        linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                   requires_grad=w.requires_grad)


@torch.no_grad()
def add_compensation_biases_(model: nn.Module, plan: PrunePlan, attn_mean: list[torch.Tensor],
                             mlp_mean: list[torch.Tensor]) -> None:
    """Before ``prune_(model, plan)``: give o_proj/down_proj the mean output of the channels the plan
    removes (FLAP), and every other projection the zero bias the config flags imply.

    attn_mean[l]: (num_heads * head_dim,), mlp_mean[l]: (intermediate_size,) channel means over calibration.
    """
    adapter = get_adapter(model)
    check_bias_compensation(model.config, plan.targets)
    head_dim = plan.source.head_dim
    for layer, kept, a_mean, m_mean in zip(adapter.layers(model), plan.layers, attn_mean, mlp_mean, strict=True):
        attn, mlp = adapter.attention(layer, model.config), adapter.mlp(layer, model.config)
        for linear in (attn.q, attn.k, attn.v, attn.o, mlp.gate, mlp.up, mlp.down):
            if linear is not None:
                _zero_bias(linear)
        q_rows = _unit_rows(kept.heads, head_dim, torch.device("cpu"))
        channels = torch.tensor(kept.mlp, dtype=torch.long)
        for linear, mean, cols in ((attn.o, a_mean, q_rows), (mlp.down, m_mean, channels)):
            shift = salience.compensation_bias(linear.weight, mean, cols)
            linear.bias += shift.to(linear.bias.dtype).to(linear.bias.device)
    for flag in adapter.output_bias_flags:
        setattr(model.config, flag, True)
