"""What a pruned model gained and lost: perplexity, parameters, KV cache, FLOPs per token."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from transact.arch import head_layout
from transact.errors import TransactError


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


def _unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Each parameter once (tied embeddings are one tensor)."""
    return list({id(p): p for p in model.parameters()}.values())


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in _unique_parameters(model))


def kv_cache_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Keys and values of every layer for one token: 2 * layers * kv_heads * head_dim * bytes."""
    _, kv_heads, head_dim = head_layout(config)
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype.itemsize


def flops_per_token(config, context: int) -> int:
    """Forward FLOPs (2 per multiply-add) for one token attending to ``context`` tokens.

    Counts the matmuls: q/k/v/o, gate/up/down, the LM head, and attention scores and weighted sums
    (2 * heads * head_dim * context each). Norms, RoPE, softmax and activations are ignored (< 1 %).
    """
    heads, kv_heads, head_dim = head_layout(config)
    h, p = config.hidden_size, config.intermediate_size
    attn_proj = h * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * h * p
    attention = 2 * heads * head_dim * context
    per_layer = 2 * (attn_proj + mlp + attention)
    return config.num_hidden_layers * per_layer + 2 * h * config.vocab_size


def forward_flops(config, seq_len: int) -> int:
    """FLOPs of one forward pass over ``seq_len`` tokens (a prefill), as the kernels compute it: every
    token's matmuls plus full ``seq_len`` x ``seq_len`` attention scores (the causal mask hides half of
    them but dense kernels still compute them)."""
    return seq_len * flops_per_token(config, seq_len)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the unique parameters (what a decode step reads at least once)."""
    return sum(p.numel() * p.element_size() for p in _unique_parameters(model))


def model_summary(model: nn.Module) -> dict:
    """Widths and costs of a model as it is now (used before and after pruning)."""
    config = model.config
    heads, kv_heads, head_dim = head_layout(config)
    dtype = next(model.parameters()).dtype
    return {
        "model_type": config.model_type,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "mlp": config.intermediate_size,
        "params": count_parameters(model),
        "dtype": str(dtype).removeprefix("torch."),
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(config, dtype),
        "flops_per_token": {str(c): flops_per_token(config, c) for c in (256, 1024, 4096)},
    }
