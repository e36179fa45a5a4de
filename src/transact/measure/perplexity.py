"""Perplexity of held-out text under a model, in sliding windows."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from transact.arch import shape_of
from transact.errors import TransactError

if TYPE_CHECKING:
    from transact.recipes import HeldoutText


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll_sum: float
    tokens: int  # tokens scored
    window: int
    stride: int

    def to_json(self) -> dict:
        return asdict(self)


def _windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) for sliding-window perplexity.

    Each token is scored at most once, with the context its window gives it. With stride == window
    (disjoint windows) the first token of each window has no context and is not scored, as in the
    usual fixed-window evaluation; with stride < window every token after the first is scored, each
    with at least ``window - stride`` tokens of context.
    """
    spans, scored_until, begin = [], 1, 0
    while scored_until < n_tokens:
        end = min(begin + window, n_tokens)
        first = max(scored_until, begin + 1)  # a window's first token has no context inside it
        if first < end:
            spans.append((begin, end, first))
        scored_until = end
        begin += stride
    return spans


@torch.inference_mode()
def perplexity(
    model: nn.Module, ids: torch.Tensor, *, window: int = 1024, stride: int | None = None, progress: bool = True
) -> Perplexity:
    """exp(mean NLL) of ``ids`` (N,) under ``model``, in windows of ``window`` tokens moved by ``stride``
    (default: ``window``, i.e. disjoint windows). Log-probabilities are taken in fp32."""
    stride = stride or window
    if ids.ndim != 1 or ids.numel() < 2:
        raise TransactError("perplexity needs at least 2 tokens of text")
    if not 1 <= stride <= window:
        raise TransactError(f"stride must be between 1 and the window ({window}), got {stride}")
    device = next(model.parameters()).device
    nll_sum, scored = 0.0, 0
    spans = _windows(ids.numel(), window, stride)
    for begin, end, first in tqdm(spans, desc="perplexity", unit="window", disable=not progress):
        chunk = ids[begin:end].to(device).unsqueeze(0)  # (1, T)
        logits = model(input_ids=chunk, use_cache=False).logits[0, :-1].float()  # (T-1, V)
        targets = chunk[0, 1:]
        keep = first - begin - 1  # first predicted position that is scored in this window
        nll = F.cross_entropy(logits[keep:], targets[keep:], reduction="sum")
        nll_sum += nll.item()
        scored += targets.numel() - keep
    ppl = math.exp(nll_sum / scored)
    return Perplexity(perplexity=ppl, nll_sum=nll_sum, tokens=scored, window=window, stride=stride)


def heldout_perplexity(model: nn.Module, ids: torch.Tensor, heldout: HeldoutText, *,
                       progress: bool = True) -> Perplexity:
    """``perplexity`` with ``heldout``'s window and stride, the window clipped to the model's trained
    context (a model is not asked to read past it) and the stride to the window."""
    context = shape_of(model).max_positions or heldout.window
    window = min(heldout.window, context)
    stride = min(heldout.stride, window) if heldout.stride else None
    return perplexity(model, ids, window=window, stride=stride, progress=progress)
