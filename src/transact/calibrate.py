"""Calibration: text -> token windows -> streamed fp32 statistics of the transitional activations.

The transitional activations are the inputs of ``o_proj`` (concatenated head outputs, width A) and of
``down_proj`` (act(gate) * up, width P). Pre-hooks add each batch's per-channel sum of squares into fp32
accumulators; the activations themselves are never kept.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from transact.arch import get_adapter
from transact.errors import TransactError
from transact.recipe import BUILTIN

TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".jsonl.gz")


# ---------------------------------------------------------------- text

def read_texts(source: str | Path, *, builtin: str = "calibration") -> list[str]:
    """Documents from a .txt/.md file (one document), a .jsonl[.gz] file (its ``text`` field per line),
    a directory of such files (sorted by name), or ``"builtin"``. Empty input is an error."""
    if str(source) == BUILTIN:
        from transact import assets

        return assets.calibration_texts() if builtin == "calibration" else assets.heldout_texts()
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise TransactError(f"directory {path} holds no {'/'.join(TEXT_SUFFIXES)} files")
        docs = [doc for f in files for doc in _read_file(f)]
    elif path.is_file():
        docs = _read_file(path)
    else:
        raise TransactError(f"text source {path} does not exist")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise TransactError(f"text source {path} contains no text")
    return docs


def _read_file(path: Path) -> list[str]:
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        docs = []
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TransactError(f"{path}:{lineno}: not valid JSON ({e})") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise TransactError(f"{path}:{lineno}: each line needs a string field 'text'")
                docs.append(row["text"])
        return docs
    if name.endswith(".json"):
        raise TransactError(f"{path}: use .jsonl (one JSON object with a 'text' field per line)")
    try:
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError:
        raise TransactError(f"{path} is not UTF-8 text") from None


def token_stream(tokenizer, texts: list[str], limit: int | None = None) -> torch.Tensor:
    """Documents tokenized as one text, separated by a blank line, stopping once ``limit`` tokens exist.

    A blank line rather than the EOS token: chat models' EOS (``<|im_end|>``) is not a document boundary
    they saw in pre-training text, and it inflates held-out perplexity. -> (N,).
    """
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"])
        if limit is not None and len(ids) >= limit:
            break
    return torch.tensor(ids if limit is None else ids[:limit], dtype=torch.long)


def sample_windows(tokenizer, texts: list[str], samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens, reproducible from ``seed``. -> (samples, seq_len).

    Documents are shuffled by the seed, tokenized in that order and cut into consecutive windows, so a
    larger ``samples`` with the same seed extends the smaller set rather than replacing it.
    """
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    needed = samples * seq_len
    stream = token_stream(tokenizer, [texts[i] for i in order], limit=needed)
    if stream.numel() < needed:
        raise TransactError(
            f"calibration text has {stream.numel()} tokens, fewer than samples x seq_len = "
            f"{samples} x {seq_len} = {needed}; give more text or fewer/shorter samples"
        )
    return stream.view(samples, seq_len)


def windows_hash(windows: torch.Tensor) -> str:
    """A content hash of the exact calibration tokens (recorded in plan.json)."""
    return "sha256:" + hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------- statistics

@dataclass
class ActivationStats:
    """Per-layer fp32 sums of squares of the transitional channels, and the token count behind them.

    attn_sum_sq[l]: (num_heads * head_dim,); mlp_sum_sq[l]: (intermediate_size,).
    """

    attn_sum_sq: list[torch.Tensor]
    mlp_sum_sq: list[torch.Tensor]
    tokens: int = 0

    def to(self, device: torch.device | str) -> ActivationStats:
        return ActivationStats(
            [t.to(device) for t in self.attn_sum_sq], [t.to(device) for t in self.mlp_sum_sq], self.tokens
        )


def _input_accumulator(linear: nn.Linear) -> torch.Tensor:
    """fp32 zeros, one per input channel, on the layer's own device (layers may be spread over GPUs)."""
    return torch.zeros(linear.in_features, dtype=torch.float32, device=linear.weight.device)


def channel_sum_sq(x: torch.Tensor) -> torch.Tensor:
    """fp32 sum of squares of each channel over all tokens. x: (..., C) -> (C,).

    The reduction is picked per device (docs/results.md, "Calibration cost"): on CUDA, a fused fp32 norm
    reads the activations once and makes no temporaries (x.float().square().sum() cost 1.22x the plain
    forward time of a 1B model on an H100; the fused form is 8x faster per call); on CPU, the same fused
    norm is 10x slower than square-and-sum and less accurate, so the CPU keeps square-and-sum.
    """
    flat = x.reshape(-1, x.shape[-1])  # (tokens, channels)
    if flat.is_cuda:
        return torch.linalg.vector_norm(flat, dim=0, dtype=torch.float32).square_()
    if flat.dtype != torch.float32:
        flat = flat.float()
    return flat.square().sum(dim=0)


def _accumulate_sum_sq(acc: torch.Tensor, module: nn.Module, args: tuple) -> None:
    acc.add_(channel_sum_sq(args[0]))


@contextmanager
def record_transitional_stats(model: nn.Module) -> Iterator[ActivationStats]:
    """Within the block, every forward pass adds into the yielded ActivationStats (token count excluded:
    the caller knows how many tokens it fed). The hooks are removed on exit, also on error."""
    adapter = get_adapter(model)
    config = model.config
    layers = adapter.layers(model)
    attn_parts = [adapter.attention(layer, config) for layer in layers]
    mlp_parts = [adapter.mlp(layer, config) for layer in layers]
    stats = ActivationStats(
        attn_sum_sq=[_input_accumulator(p.o) for p in attn_parts],
        mlp_sum_sq=[_input_accumulator(p.down) for p in mlp_parts],
    )
    handles = []
    try:
        for parts, acc in zip(attn_parts, stats.attn_sum_sq, strict=True):
            handles.append(parts.o.register_forward_pre_hook(partial(_accumulate_sum_sq, acc)))
        for parts, acc in zip(mlp_parts, stats.mlp_sum_sq, strict=True):
            handles.append(parts.down.register_forward_pre_hook(partial(_accumulate_sum_sq, acc)))
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def decoder_stack(model: nn.Module) -> nn.Module:
    """The model without its LM head: calibration needs only the layers, and the head is a large share
    of a small model's compute (a 49k x 576 matmul per token for SmolLM2)."""
    return getattr(model, model.base_model_prefix, model)


def calibrate(
    model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4, progress: bool = True
) -> ActivationStats:
    """Run ``windows`` (n, seq_len) through the model in batches and return the statistics (on CPU)."""
    device = next(model.parameters()).device
    body = decoder_stack(model)
    with record_transitional_stats(model) as stats, torch.inference_mode():
        for start in tqdm(range(0, len(windows), batch_size), desc="calibrating", unit="batch",
                          total=-(-len(windows) // batch_size), disable=not progress):
            batch = windows[start : start + batch_size].to(device)
            body(input_ids=batch, use_cache=False)
            stats.tokens += batch.numel()
    return stats.to("cpu")
