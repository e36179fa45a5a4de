"""Pure tensor math: salience of attention heads and MLP channels. No hooks, no models, no I/O.

Shapes: A = num_heads * head_dim (the o_proj input width), P = intermediate_size.
"""

from __future__ import annotations

import torch


def channel_norms(sum_sq: torch.Tensor) -> torch.Tensor:
    """L2 norm of each transitional channel over all calibration tokens.

    sum_sq: (C,) fp32 running sum of squares -> (C,) norms.
    """
    return sum_sq.clamp_min(0).sqrt()


def default_alpha(head_dim: int) -> float:
    """The outlier weight of eq. 5 used by the authors' code: 10 / head_dim."""
    return 10.0 / head_dim


def head_salience(norms: torch.Tensor, head_dim: int, alpha: float) -> torch.Tensor:
    """TransAct head salience (paper eq. 5): mean of the head's channel norms + alpha * their max.

    norms: (A,) channel L2 norms of the o_proj input, head-major -> (A // head_dim,) one score per head.
    """
    if norms.ndim != 1 or norms.numel() % head_dim:
        raise ValueError(f"expected a flat vector of whole heads of {head_dim}, got shape {tuple(norms.shape)}")
    per_head = norms.view(-1, head_dim)  # (heads, head_dim)
    return per_head.mean(dim=1) + alpha * per_head.amax(dim=1)


def mlp_salience(norms: torch.Tensor) -> torch.Tensor:
    """TransAct MLP channel salience: the channel's L2 norm itself. (P,) -> (P,)."""
    return norms


def magnitude_head_scores(q_weight: torch.Tensor, o_weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Data-free control: Frobenius norm of the weights that belong to one query head alone.

    q_weight: (A, H) rows of q_proj; o_weight: (H, A) columns of o_proj -> (A // head_dim,).
    (k/v rows are shared by a whole KV group, so they do not distinguish heads within a group.)
    """
    q_sq = q_weight.float().square().sum(dim=1)  # (A,)
    o_sq = o_weight.float().square().sum(dim=0)  # (A,)
    return (q_sq + o_sq).view(-1, head_dim).sum(dim=1).sqrt()


def magnitude_mlp_scores(
    gate_weight: torch.Tensor | None, up_weight: torch.Tensor, down_weight: torch.Tensor
) -> torch.Tensor:
    """Data-free control: norm of everything one MLP channel owns (gate row, up row, down column).

    gate_weight, up_weight: (P, H); down_weight: (H, P) -> (P,).
    """
    sq = up_weight.float().square().sum(dim=1) + down_weight.float().square().sum(dim=0)
    if gate_weight is not None:
        sq = sq + gate_weight.float().square().sum(dim=1)
    return sq.sqrt()


def random_scores(count: int, generator: torch.Generator) -> torch.Tensor:
    """Seeded random control: i.i.d. uniform scores. -> (count,)."""
    return torch.rand(count, generator=generator)
