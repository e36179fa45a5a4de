"""Surgery: slice a model in place to a PrunePlan, updating the config and module attributes.

q/k/v/gate/up keep only the output rows (and bias entries) of kept units (in a fused projection such as
Phi-3's qkv_proj, the kept rows of each part, in its layout); o/down keep only the matching input
columns (a Qwen3.5 query head's q rows are its query and its output gate). Layers without softmax
attention (a hybrid model's linear-attention layers) lose only MLP channels. A mixture of experts keeps
its kept experts' slices of the fused expert parameters (each with its own kept channels: gate and up rows,
down columns) and their rows of the router. Embeddings, norms (including
Qwen3's per-head q/k norms, which act on head_dim) and the hidden size are untouched. Slicing copies values
exactly, so applying the same plan to the same base model always gives bit-identical weights.
"""

from __future__ import annotations

import torch
from torch import nn

from transact.arch import get_adapter, shape_of
from transact.arch.parts import AttentionParts, ExpertParts, MlpParts, Part, module_of
from transact.core.plan import PrunePlan


def unit_rows(units: list[int], width: int, device: torch.device) -> torch.Tensor:
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


def _keep_part_rows(parts: list[tuple[Part, torch.Tensor]]) -> None:
    """Keep rows ``rows`` (indices within the part) of each part; the parts of one fused module are sliced
    together, in the order their rows lie in it, so the module keeps its layout ([q | k | v], [gate | up])."""
    by_module: dict[int, tuple[nn.Linear, list[tuple[int, torch.Tensor]]]] = {}
    for part, rows in parts:
        module, start = module_of(part)
        by_module.setdefault(id(module), (module, []))[1].append((start, rows + start))
    for module, pieces in by_module.values():
        _keep_rows(module, torch.cat([rows for _, rows in sorted(pieces, key=lambda piece: piece[0])]))


def _keep_columns(linear: nn.Linear, cols: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach().index_select(1, cols).clone(),
                                 requires_grad=linear.weight.requires_grad)
    linear.in_features = cols.numel()


def _keep_heads(attn: AttentionParts, heads: list[int], kv_heads: list[int]) -> None:
    """Keep query heads ``heads`` (their q rows, with the gate rows where q_proj holds them, and o columns)
    and KV groups ``kv_heads`` (their k and v rows) of one attention block."""
    device = attn.o.weight.device
    kv_rows = unit_rows(kv_heads, attn.head_dim, device)
    _keep_part_rows([(attn.q, unit_rows(heads, attn.q_head_rows, device)), (attn.k, kv_rows), (attn.v, kv_rows)])
    _keep_columns(attn.o, unit_rows(heads, attn.head_dim, device))


def keep_channels(mlp: MlpParts, kept: list[int]) -> None:
    """Keep channels ``kept`` of a plain MLP: their gate and up rows, their down columns."""
    channels = torch.tensor(kept, dtype=torch.long, device=mlp.down.weight.device)
    _keep_part_rows([(part, channels) for part in (mlp.gate, mlp.up) if part is not None])
    _keep_columns(mlp.down, channels)


def _replace(owner: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(owner, name)
    setattr(owner, name, nn.Parameter(value.clone(), requires_grad=old.requires_grad))


def _keep_experts(mlp: ExpertParts, experts: list[int], channels: list[list[int]]) -> None:
    """Keep experts ``experts`` of one block, expert ``experts[j]`` with its channels ``channels[j]``: its
    gate and up rows of ``gate_up_proj`` ([gate | up] per expert), its ``down_proj`` columns, its router row."""
    device, width = mlp.down.device, mlp.intermediate_size
    kept = [torch.tensor(c, dtype=torch.long, device=device) for c in channels]
    gate_up, down = mlp.gate_up.detach(), mlp.down.detach()
    pairs = list(zip(experts, kept, strict=True))
    _replace(mlp.experts, "gate_up_proj", torch.stack([gate_up[e].index_select(0, torch.cat([c, c + width]))
                                                       for e, c in pairs]))
    _replace(mlp.experts, "down_proj", torch.stack([down[e].index_select(1, c) for e, c in pairs]))
    rows = torch.tensor(experts, dtype=torch.long, device=device)
    for name in ("weight", "bias"):
        if getattr(mlp.router, name, None) is not None:
            _replace(mlp.router, name, getattr(mlp.router, name).detach().index_select(0, rows))


@torch.no_grad()
def prune_(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Prune ``model`` in place to ``plan`` (which must have been made for this model's shape)."""
    adapter = get_adapter(model)
    config = model.config
    plan.check_applies_to(shape_of(config))
    for (attn, mlp), kept in zip(adapter.layer_parts(model), plan.layers, strict=True):
        if attn is not None:
            _keep_heads(attn, kept.heads, kept.kv_heads)
        if isinstance(mlp, ExpertParts):
            _keep_experts(mlp, kept.experts, kept.expert_mlp)
            mlp = mlp.shared  # the shared expert, if any, is a plain MLP
        if mlp is not None:
            keep_channels(mlp, kept.mlp)
    t = plan.targets
    adapter.write_config(config, num_heads=t.heads, num_kv_heads=t.kv_heads, intermediate_size=t.mlp,
                         num_experts=t.experts, shared_size=t.shared_mlp)
    for layer in adapter.layers(model):
        adapter.sync_modules(layer, config)
    return model


@torch.no_grad()
def round_to_(module: nn.Module, dtype: torch.dtype) -> None:
    """Round every parameter to the values ``dtype`` can hold, keeping its own dtype: a model whose weights a
    corrector changed in a wider compute dtype then is exactly the model its checkpoint in ``dtype`` holds."""
    for p in module.parameters():
        p.copy_(p.to(dtype))
