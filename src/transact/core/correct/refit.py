"""Least-squares refit: the weights that consume the pruned channels (o_proj and down_proj columns) are
refitted on the channels that stay, so that what the removed channels carried is recovered from the kept
ones where they correlate.

For a consuming weight W (out x C), kept channels S and removed R, and the Gram matrix G = sum over the
calibration tokens of x xᵀ of its input x:

    W'_S = W_S + W_R G_RS (G_SS + damp * mean(diag G_SS) * I)^-1

With damp = 0 this is the least-squares solution of min E|W x - W'_S x_S|²; damping shrinks the correction
toward the original weights (and keeps the solve well posed where kept channels are dead or collinear).
Only o_proj and down_proj change, so the checkpoint stays a vanilla one for every family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from transact.core.calibrate import register_statistic
from transact.core.correct import Corrector, kept_inputs, register_corrector
from transact.options import check_options, option

DEFAULT_DAMP = 0.01
# With few calibration tokens per channel the Gram matrix is a noisy estimate and a stronger pull toward the
# original weights pays: on SmolLM2 damping 0.1 was best at 2,048 and 4,096 tokens for 1,536 MLP channels,
# 0.01 within 2 % of the best from 8,192 tokens on (docs/results.md, "Least-squares refit").
FEW_TOKENS_PER_CHANNEL, FEW_TOKENS_DAMP = 4, 0.1


@dataclass(frozen=True)
class RefitOptions:
    damp: float | None = option(None, f"the refit's damping, relative to the mean diagonal of the Gram matrix "
                                f"(default {DEFAULT_DAMP}; {FEW_TOKENS_DAMP} with fewer than {FEW_TOKENS_PER_CHANNEL} "
                                "calibration tokens per channel)", low=0.0)

    def __post_init__(self) -> None:
        check_options(self)


def default_damp(tokens: int, channels: int) -> float:
    """The damping used when the recipe sets none, for ``tokens`` calibration tokens and Gram matrices of at
    most ``channels`` channels."""
    return FEW_TOKENS_DAMP if few_tokens(tokens, channels) else DEFAULT_DAMP


def few_tokens(tokens: int, channels: int) -> bool:
    """Whether ``tokens`` calibration tokens are under ``FEW_TOKENS_PER_CHANNEL`` per channel of a Gram matrix
    of ``channels`` channels (the regime of the stronger damping)."""
    return tokens < FEW_TOKENS_PER_CHANNEL * channels


def gram(x: torch.Tensor) -> torch.Tensor:
    """fp32 sum over tokens of x xᵀ. x: (..., C) -> (C, C)."""
    flat = x.reshape(-1, x.shape[-1]).float()  # (tokens, C)
    return flat.T @ flat


register_statistic("gram", gram)


def refit_columns(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, damp: float) -> torch.Tensor:
    """The refitted kept columns W'_S (see the module docstring), computed in fp64.

    weight: (H, C); gram: (C, C); kept: (|S|,) ascending channel indices; damp >= 0 -> (H, |S|) in weight's
    dtype. A Cholesky solve, with a least-squares solve as the fallback where G_SS + damping is singular.
    """
    g = gram.cpu()
    keep = torch.zeros(g.shape[0], dtype=torch.bool)
    keep[kept.cpu()] = True
    if keep.all():  # nothing removed, nothing to recover (the solve would add exactly zero)
        return weight.detach().cpu().clone()
    # Only the blocks the solve needs are taken to fp64 (never the whole C x C matrix): the peak is the fp32
    # Gram matrix plus two |S| x |S| fp64 matrices (the damped block and its factor).
    a = g[keep][:, keep].double()  # G_SS, damped in place below
    rhs = g[keep][:, ~keep].double() @ weight.detach().cpu()[:, ~keep].double().T  # (S, H): G_SR W_Rᵀ
    a.diagonal().add_(damp * a.diagonal().mean())
    factor, info = torch.linalg.cholesky_ex(a)
    if info.item() == 0:
        correction = torch.cholesky_solve(rhs, factor)
    else:
        correction = torch.linalg.lstsq(a, rhs, driver="gelsd").solution
    return (weight.detach().cpu()[:, keep].double() + correction.T).to(weight.dtype)


def modules_of(stats) -> tuple[str, ...]:
    """The statistics groups with consumers to refit (a shared expert's where there is one)."""
    return ("attn", "mlp", "shared") if stats.activations.shared else ("attn", "mlp")


def damp_for(stats, options: RefitOptions | None = None) -> float:
    """The damping for these statistics: the options', else ``default_damp`` for their token count and their
    widest Gram matrix."""
    if options is not None and options.damp is not None:
        return options.damp
    return default_damp(stats.activations.tokens, widest_gram(stats))


def widest_gram(stats) -> int:
    """The channels of the widest Gram matrix these statistics hold."""
    return max(g.shape[-1] for m in modules_of(stats) for g in stats.activation(m, "gram"))


def expert_damp(stats, kept, options: RefitOptions | None = None) -> float:
    """The damping of one routed expert's refit: the options', else ``default_damp`` for the tokens routed
    to that expert (a fraction of the calibration tokens) and its width."""
    if options is not None and options.damp is not None:
        return options.damp
    routed = int(stats.activations.experts["tokens"][kept.layer][kept.expert])
    return default_damp(routed, kept.linear.weight.shape[1])


@torch.no_grad()
def refit_consumers_(model: nn.Module, plan, stats, options: RefitOptions | None = None) -> dict:
    """Before the plan's slicing: refit the kept columns of every o_proj and down_proj (and every kept
    expert's down projection, from the Gram matrix of its router-weighted inputs) in place."""
    grams = {m: stats.activation(m, "gram") for m in modules_of(stats)}
    damp = damp_for(stats, options)
    for kept in kept_inputs(model, plan):
        weight = kept.linear.weight
        this_damp = damp if kept.expert is None else expert_damp(stats, kept, options)
        refitted = refit_columns(weight, kept.statistic(grams[kept.module]), kept.cols, this_damp)
        weight[:, kept.cols.to(weight.device)] = refitted.to(weight.device)
    return {"damp": damp}


def _carried_by_every_family(adapter, config, targets) -> None:
    """The refit changes existing weights only: every checkpoint can carry it."""


CORRECTOR = register_corrector(Corrector(
    "refit", "least-squares refit of the o_proj/down_proj columns that stay, from the Gram matrix of their inputs "
    f"(--damp; default {DEFAULT_DAMP}, {FEW_TOKENS_DAMP} below {FEW_TOKENS_PER_CHANNEL} calibration tokens a channel; "
    "every family, the checkpoint stays vanilla; --reconstruct / --no-reconstruct: with or without it)",
    apply=refit_consumers_, check=_carried_by_every_family, statistics=("gram",), options=RefitOptions,
    conflicts=("flap_bias",), flag="reconstruct"))
