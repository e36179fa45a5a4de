"""Pure tensor math: salience of attention heads and MLP channels. No hooks, no models, no I/O.

Shapes: A = num_heads * head_dim (the o_proj input width), P = intermediate_size.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

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

    q_weight: (heads * r, H) rows of q_proj (r = head_dim, or 2 * head_dim where each head's rows also
    hold its output gate); o_weight: (H, A) columns of o_proj, A = heads * head_dim -> (heads,).
    (k/v rows are shared by a whole KV group, so they do not distinguish heads within a group.)
    """
    o_sq = o_weight.float().square().sum(dim=0).view(-1, head_dim).sum(dim=1)  # (heads,)
    q_sq = q_weight.float().square().sum(dim=1).view(o_sq.numel(), -1).sum(dim=1)  # (heads,)
    return (q_sq + o_sq).sqrt()


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


# ---------------------------------------------------------------- comparison metrics
# Each produces scores of the same shapes as TransAct's, so selection and surgery are shared.


def channel_variance(sum_: torch.Tensor, sum_sq: torch.Tensor, count: int) -> torch.Tensor:
    """Population variance of each channel over ``count`` tokens, from streamed sums (in fp64, so the
    difference of two large sums keeps its precision). (C,), (C,) -> (C,)."""
    mean = sum_.double() / count
    return (sum_sq.double() / count - mean.square()).clamp_min(0)


def flap_channel_scores(variance: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """FLAP's fluctuation metric (WIFV): input-channel variance x squared norm of the weight column that
    consumes the channel. variance: (C,); weight: (H, C) of o_proj/down_proj -> (C,)."""
    return variance * weight.double().square().sum(dim=0)


def compensation_bias(weight: torch.Tensor, mean: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """FLAP's bias compensation: the mean contribution of the removed input channels, which the pruned
    layer adds back as a bias. weight: (H, C) of o_proj/down_proj; mean: (C,) channel means over the
    calibration tokens; kept: indices of kept channels -> (H,) = weight[:, removed] @ mean[removed]."""
    removed = torch.ones(weight.shape[1], dtype=torch.bool)
    removed[kept.cpu()] = False
    return weight.detach().cpu().double()[:, removed] @ mean.double()[removed]


def sum_per_head(channel_scores: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(heads * head_dim,) -> (heads,): a head's score is the sum of its channels' (FLAP)."""
    return channel_scores.view(-1, head_dim).sum(dim=1)


def minitron_channel_scores(abs_mean_sq: torch.Tensor) -> torch.Tensor:
    """Minitron activation importance of each channel: per sample the mean |activation| over the
    sequence, then the L2 norm over samples. abs_mean_sq (sum over samples of squared means): (C,) -> (C,)."""
    return abs_mean_sq.clamp_min(0).sqrt()


def minitron_head_scores(channel_scores: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Minitron head importance: L2 norm over the head's channels. (heads * head_dim,) -> (heads,)."""
    return channel_scores.view(-1, head_dim).norm(dim=1)


def taylor_head_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       head_dim: int, num_kv_heads: int) -> torch.Tensor:
    """LLM-Pruner's first-order Taylor importance, sum of |w * dL/dw| over the weights a head removes.

    Arguments are the element-wise |w * grad| of the projections: q (heads * r, H) (r = head_dim, or
    2 * head_dim with the output gate's rows), k and v (Akv, H), o (H, A).
    A query head owns its q rows and o columns; the k/v rows of its KV group are shared by the group's
    g heads and split equally between them, so that a group's kept heads add up to the group's whole
    k/v cost when the plan scores groups. -> (heads,).
    """
    per_head = o.double().sum(dim=0).view(-1, head_dim).sum(dim=1)  # (heads,)
    per_head = per_head + q.double().sum(dim=1).view(per_head.numel(), -1).sum(dim=1)
    shared = (k.double().sum(dim=1) + v.double().sum(dim=1)).view(num_kv_heads, head_dim).sum(dim=1)  # (kv,)
    group_size = per_head.numel() // num_kv_heads
    return per_head + (shared / group_size).repeat_interleave(group_size)


def taylor_channel_scores(gate: torch.Tensor | None, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Sum of |w * dL/dw| over one MLP channel's gate row, up row and down column. (P, H), (P, H),
    (H, P) -> (P,)."""
    scores = up.double().sum(dim=1) + down.double().sum(dim=0)
    return scores if gate is None else scores + gate.double().sum(dim=1)


def refit_removal_errors(weight: torch.Tensor, gram: torch.Tensor, damp: float) -> torch.Tensor:
    """The output error E|W x - Ŵ x'|² (summed over the calibration tokens) that removing each input channel
    alone leaves once the other columns are refitted by damped least squares: the optimal-brain-surgeon
    saliency |W_:,j|² / [H⁻¹]_jj with H = gram + damp · mean(diag gram) · I. A channel the others can
    rebuild costs little however large its activations; a channel that never fires costs nothing.

    weight: (out, C) consumer (down_proj); gram: (C, C) Gram matrix of its input -> (C,) fp64 errors.
    H⁻¹ as ``damped_inverse`` computes it.
    """
    if float(gram.diagonal().mean()) <= 0:  # no calibration token reached these channels: nothing carried, nothing lost
        return torch.zeros(gram.shape[0], dtype=torch.float64)
    return weight.detach().cpu().double().square().sum(dim=0) / damped_inverse(gram, damp).diagonal()


def damped_inverse(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """(C, C) fp64 inverse of H = gram + damp · mean(diag gram) · I, the damping at least 1e-8 (relative) so
    that a singular Gram matrix still has one; the peak is two C x C fp64 matrices (the factor, the inverse).
    A matrix not positive definite even damped (corrupt statistics) is an error, never a guess."""
    h = gram.detach().cpu().to(torch.float64, copy=True)  # damped in place; the statistics stay as they are
    h.diagonal().add_(max(damp, 1e-8) * float(h.diagonal().mean()))
    factor, info = torch.linalg.cholesky_ex(h)
    del h
    if info.item() != 0:
        raise ValueError("the damped Gram matrix is not positive definite; calibrate again or raise the damping")
    return torch.cholesky_inverse(factor)


def refit_removal_order(weight: torch.Tensor, gram: torch.Tensor, unit: int, damp: float,
                        remove: int | None = None) -> torch.Tensor:
    """Scores of a consumer's input units (blocks of ``unit`` consecutive channels: a head's head_dim, or
    one MLP channel) that account for the least-squares refit: units are removed greedily, each time the
    one whose removal adds the least output error E|W x - W' x'|² when the remaining columns are refitted
    (the optimal-brain-surgeon step: error tr(W_u [H⁻¹]_uu⁻¹ W_uᵀ), then W and H⁻¹ updated for the
    removal), with H = gram + damp * mean(diag gram) * I. A unit's score is the step at which it was
    removed (higher: kept longer); units never removed (after ``remove`` steps) share the top score.

    weight: (out, C) consumer (o_proj / down_proj); gram: (C, C) Gram matrix of its input; C % unit == 0
    -> (C // unit,) float scores. Computed in fp64.
    """
    channels = gram.shape[0]
    units = channels // unit
    remove = units if remove is None else min(remove, units)
    hinv = damped_inverse(gram, damp)
    w = weight.detach().cpu().double().clone()  # (out, C)
    scores = torch.full((units,), float(units))
    alive = torch.ones(units, dtype=torch.bool)
    blocks = torch.arange(channels).reshape(units, unit)
    for step in range(remove):
        errors = _unit_removal_errors(w, hinv, blocks, unit)
        errors[~alive] = float("inf")
        best = int(errors.argmin())
        _remove_unit_(w, hinv, blocks[best])
        scores[best], alive[best] = float(step), False
    return scores


def _remove_unit_(w: torch.Tensor, hinv: torch.Tensor, idx: torch.Tensor) -> None:
    """Remove one unit's channels ``idx`` in place: the remaining columns of ``w`` (out, C) absorb what it
    carried (the refit), and H⁻¹ (C, C) loses its rows and columns (their block becomes zero)."""
    b_inv = torch.linalg.inv(hinv[idx][:, idx])  # (unit, unit)
    e = hinv[:, idx]  # (C, unit)
    w -= w[:, idx] @ b_inv @ e.T
    hinv -= e @ b_inv @ e.T


def refit_greedy_heads(weight: torch.Tensor, gram: torch.Tensor, head_dim: int, damp: float,
                       groups: list[list[int]], per_group: int) -> list[int]:
    """``least_error_heads``' greedy removal under the refit, fast: each step removes, from the groups that
    still hold more than ``per_group`` heads, the head whose removal adds the least o_proj output error once
    the other kept heads' columns are refitted, by the optimal-brain-surgeon step of ``refit_removal_order``
    on the kept groups' channels (one H⁻¹ update per step instead of one solve per candidate; H damped once,
    by ``damp`` times the mean diagonal of those channels' Gram matrix).

    weight: (out, C) o_proj; gram: (C, C); groups: each kept group's query heads -> the kept heads, ascending.
    """
    heads = [h for group in groups for h in group]
    channels = torch.tensor([h * head_dim + c for h in heads for c in range(head_dim)])
    hinv = damped_inverse(gram[channels][:, channels], damp)
    w = weight.detach().cpu().double()[:, channels].clone()
    blocks = torch.arange(len(channels)).reshape(len(heads), head_dim)
    group_of = [g for g, group in enumerate(groups) for _ in group]
    left = [len(group) for group in groups]
    alive = torch.ones(len(heads), dtype=torch.bool)
    while max(left) > per_group:
        errors = _unit_removal_errors(w, hinv, blocks, head_dim)
        full = torch.tensor([left[g] <= per_group for g in group_of])
        errors[~alive | full] = float("inf")
        best = int(errors.argmin())
        _remove_unit_(w, hinv, blocks[best])
        alive[best] = False
        left[group_of[best]] -= 1
    return sorted(h for h, kept in zip(heads, alive.tolist(), strict=True) if kept)


def _unit_removal_errors(w: torch.Tensor, hinv: torch.Tensor, blocks: torch.Tensor, unit: int) -> torch.Tensor:
    """tr(W_u [H⁻¹]_uu⁻¹ W_uᵀ) for every unit u. -> (units,)"""
    if unit == 1:
        return (w * w).sum(0) / hinv.diagonal().clamp_min(1e-300)
    diag_blocks = hinv[blocks.unsqueeze(-1), blocks.unsqueeze(-2)]  # (units, unit, unit)
    w_units = w[:, blocks].permute(1, 0, 2)  # (units, out, unit)
    eye = torch.eye(unit, dtype=hinv.dtype)
    solved = torch.linalg.solve(diag_blocks + 1e-12 * eye, w_units.transpose(1, 2))  # (units, unit, out)
    return torch.einsum("uod,udo->u", w_units, solved)


# ---------------------------------------------------------------- what a correction leaves


class ConsumerError:
    """The output error of a consumer (o_proj) that keeps only some of its input channels, summed over the
    calibration tokens: E(S) = sum_t |W x_t - Ŵ_S x_t,S|², for the correction that follows the slicing.

    - ``"refit"`` (damp = the refit's relative damping): Ŵ_S is the damped least-squares refit,
      Ŵ_S = (W G_{:,S} + λ W_S)(G_SS + λ I)⁻¹ with λ = damp · mean(diag G_SS), the same solution as
      ``transact.core.correct.refit.refit_columns``; then E = tr(W G Wᵀ) - 2⟨Ŵ_S, (W G)_S⟩ + ⟨Ŵ_S G_SS, Ŵ_S⟩.
    - ``"mean"``: the removed channels' mean output is added back as a bias (FLAP's compensation), so only
      their fluctuation is lost: E = tr(W_R G_RR W_Rᵀ) - T |W_R μ_R|² (``mean``: μ, the channels' mean).
    - ``"none"``: slicing alone, E = tr(W_R G_RR W_Rᵀ).

    weight: (out, C); gram: (C, C) sum over tokens of x xᵀ; kept: channel indices. Computed in fp64.
    """

    def __init__(self, weight: torch.Tensor, gram: torch.Tensor, correction: str, *, damp: float = 0.0,
                 mean: torch.Tensor | None = None, tokens: int = 0) -> None:
        if correction not in ("refit", "mean", "none"):
            raise ValueError(f"unknown correction {correction!r}")
        self.w = weight.detach().cpu().double()  # (out, C)
        self.g = gram.detach().cpu().double()  # (C, C)
        self.correction, self.damp = correction, damp
        self.shift = None if mean is None else self.w * mean.detach().cpu().double() * math.sqrt(tokens)  # (out, C)
        self._wg: torch.Tensor | None = None

    def _refit_terms(self) -> tuple[torch.Tensor, float]:
        """W G (out, C) and tr(W G Wᵀ), built on the first refit error asked for: an out x C x C product that a
        caller who only constructs the object (and then takes a faster path) should not pay for."""
        if self._wg is None:
            self._wg = self.w @ self.g
            self._total = float((self._wg * self.w).sum())
        return self._wg, self._total

    def __call__(self, kept: torch.Tensor) -> float:
        keep = torch.zeros(self.g.shape[0], dtype=torch.bool)
        keep[kept] = True
        if self.correction != "refit":
            w_r = self.w[:, ~keep]
            error = float(((w_r @ self.g[~keep][:, ~keep]) * w_r).sum())
            if self.correction == "mean":
                error -= float(self.shift[:, ~keep].sum(1).square().sum())
            return error
        wg, total = self._refit_terms()
        g_ss = self.g[keep][:, keep]  # (S, S)
        w_s, wg_s = self.w[:, keep], wg[:, keep]  # (out, S)
        damping = self.damp * g_ss.diagonal().mean()
        damped = g_ss + damping * torch.eye(g_ss.shape[0], dtype=g_ss.dtype)
        rhs = (wg_s + damping * w_s).T  # (S, out)
        factor, info = torch.linalg.cholesky_ex(damped)  # as the refit solves: least squares where singular
        solved = torch.cholesky_solve(rhs, factor) if info.item() == 0 else \
            torch.linalg.lstsq(damped, rhs, driver="gelsd").solution
        refitted = solved.T  # (out, S), Ŵ_S
        return total - 2 * float((refitted * wg_s).sum()) + float(((refitted @ g_ss) * refitted).sum())


# exact enumeration of the KV-group sets up to this many; greedy removal beyond
EXACT_GROUP_SETS = 70


def least_error_groups(error: Callable[[list[int]], float], num_groups: int, keep: int) -> list[int]:
    """The ``keep`` of ``num_groups`` KV groups whose keeping leaves the least ``error(groups)`` (ascending):
    every set where there are at most ``EXACT_GROUP_SETS`` of them, else removing one group at a time, each
    time the one whose loss adds the least."""
    if math.comb(num_groups, keep) <= EXACT_GROUP_SETS:
        return list(min(itertools.combinations(range(num_groups), keep), key=lambda groups: error(list(groups))))
    kept = list(range(num_groups))
    while len(kept) > keep:
        kept.remove(min(kept, key=lambda g: error([k for k in kept if k != g])))
    return kept


def head_choices(groups: list[list[int]], per_group: int) -> int:
    """How many ways there are to keep ``per_group`` heads of each group (``groups``: each group's heads);
    up to ``EXACT_GROUP_SETS`` of them, ``least_error_heads`` compares every one."""
    return math.prod(math.comb(len(heads), per_group) for heads in groups)


def least_error_heads(error: Callable[[list[int]], float], groups: list[list[int]], per_group: int) -> list[int]:
    """The ``per_group`` query heads of each kept KV group (``groups``: each group's heads) whose keeping
    leaves the least ``error(heads)`` (ascending): every choice where there are at most ``EXACT_GROUP_SETS`` of
    them, else removing one head at a time from the groups that still hold too many, each time the one whose
    loss adds the least."""
    if head_choices(groups, per_group) <= EXACT_GROUP_SETS:
        sets = itertools.product(*(itertools.combinations(heads, per_group) for heads in groups))
        return sorted(min(([h for kept in chosen for h in kept] for chosen in sets), key=error))
    kept = [list(heads) for heads in groups]
    while any(len(heads) > per_group for heads in kept):
        flat = [h for heads in kept for h in heads]
        candidates = [h for heads in kept if len(heads) > per_group for h in heads]
        worst = min(candidates, key=lambda h: error([k for k in flat if k != h]))
        next(heads for heads in kept if worst in heads).remove(worst)
    return sorted(h for heads in kept for h in heads)

