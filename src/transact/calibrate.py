"""Calibration: text -> token windows -> streamed fp32 statistics of the transitional activations.

The transitional activations are the inputs of ``o_proj`` (concatenated head outputs, width A) and of
``down_proj`` (act(gate) * up, width P). Pre-hooks add each batch's per-channel sum of squares into fp32
accumulators; the activations themselves are never kept.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from transact.arch import get_adapter
from transact.data import jsonl_texts
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
        return list(jsonl_texts(path))
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

# Statistics a hook can collect, per transitional channel. "sum_sq" is always collected (TransAct's own
# salience); the others are asked for by the comparison metrics that need them.
EXTRA_STATISTICS = ("sum", "abs_mean_sq")


@dataclass
class ActivationStats:
    """Per-layer fp32 statistics of the transitional channels, and the tokens and samples behind them.

    Each list has one tensor per layer, (num_heads * head_dim,) for attention, (intermediate_size,) for MLP:
    ``*_sum_sq``: sum over tokens of x^2; ``*_sum``: sum over tokens of x (None unless asked for);
    ``*_abs_mean_sq``: sum over samples of (mean over the sample's tokens of |x|)^2 (None unless asked for).
    """

    attn_sum_sq: list[torch.Tensor]
    mlp_sum_sq: list[torch.Tensor]
    tokens: int = 0
    samples: int = 0
    attn_sum: list[torch.Tensor] | None = None
    mlp_sum: list[torch.Tensor] | None = None
    attn_abs_mean_sq: list[torch.Tensor] | None = None
    mlp_abs_mean_sq: list[torch.Tensor] | None = None

    def to(self, device: torch.device | str) -> ActivationStats:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, list):
                moved[name] = [t.to(device) for t in value]
        return ActivationStats(**moved)


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


def channel_sum(x: torch.Tensor) -> torch.Tensor:
    """fp32 sum of each channel over all tokens. x: (..., C) -> (C,)."""
    return x.reshape(-1, x.shape[-1]).sum(dim=0, dtype=torch.float32)


def sample_abs_mean_sq(x: torch.Tensor) -> torch.Tensor:
    """Sum over samples of the squared per-sample mean |x|. x: (batch, seq, C) -> (C,)."""
    return x.abs().mean(dim=1, dtype=torch.float32).square().sum(dim=0)


_REDUCERS = {"sum_sq": channel_sum_sq, "sum": channel_sum, "abs_mean_sq": sample_abs_mean_sq}


def _accumulate(accumulators: dict[str, torch.Tensor], module: nn.Module, args: tuple) -> None:
    for kind, acc in accumulators.items():
        acc.add_(_REDUCERS[kind](args[0]))


@contextmanager
def record_transitional_stats(model: nn.Module, extra: tuple[str, ...] = ()) -> Iterator[ActivationStats]:
    """Within the block, every forward pass adds into the yielded ActivationStats (token and sample counts
    excluded: the caller knows what it fed). ``extra`` names statistics beyond the sum of squares (see
    EXTRA_STATISTICS). The hooks are removed on exit, also on error."""
    unknown = set(extra) - set(EXTRA_STATISTICS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; known: {EXTRA_STATISTICS}")
    adapter = get_adapter(model)
    config = model.config
    layers = adapter.layers(model)
    inputs = {"attn": [adapter.attention(layer, config).o for layer in layers],
              "mlp": [adapter.mlp(layer, config).down for layer in layers]}
    kinds = ("sum_sq", *extra)
    stats = ActivationStats(attn_sum_sq=[], mlp_sum_sq=[])
    for module_kind, linears in inputs.items():
        for kind in kinds:
            setattr(stats, f"{module_kind}_{kind}", [_input_accumulator(linear) for linear in linears])
    handles = []
    try:
        for module_kind, linears in inputs.items():
            for i, linear in enumerate(linears):
                accs = {kind: getattr(stats, f"{module_kind}_{kind}")[i] for kind in kinds}
                handles.append(linear.register_forward_pre_hook(partial(_accumulate, accs)))
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def decoder_stack(model: nn.Module) -> nn.Module:
    """The model without its LM head: calibration needs only the layers, and the head is a large share
    of a small model's compute (a 49k x 576 matmul per token for SmolLM2)."""
    return getattr(model, model.base_model_prefix, model)


def calibrate(
    model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4, progress: bool = True,
    extra: tuple[str, ...] = (),
) -> ActivationStats:
    """Run ``windows`` (n, seq_len) through the model in batches and return the statistics (on CPU)."""
    device = next(model.parameters()).device
    body = decoder_stack(model)
    with record_transitional_stats(model, extra) as stats, torch.inference_mode():
        for start in tqdm(range(0, len(windows), batch_size), desc="calibrating", unit="batch",
                          total=-(-len(windows) // batch_size), disable=not progress):
            batch = windows[start : start + batch_size].to(device)
            body(input_ids=batch, use_cache=False)
            stats.tokens += batch.numel()
            stats.samples += batch.shape[0]
    return stats.to("cpu")


def _prunable_linears(model: nn.Module) -> list[nn.Linear]:
    adapter = get_adapter(model)
    linears = []
    for layer in adapter.layers(model):
        attn, mlp = adapter.attention(layer, model.config), adapter.mlp(layer, model.config)
        linears += [attn.q, attn.k, attn.v, attn.o, mlp.up, mlp.down] + ([mlp.gate] if mlp.gate else [])
    return linears


@contextmanager
def gradients_of_prunable_weights(model: nn.Module) -> Iterator[None]:
    """Within the block only the prunable projections' weights require grad (embeddings, norms and the
    LM head keep none, which saves their gradient memory); every flag and .grad is restored on exit."""
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    saved_grads = [p.grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for linear in _prunable_linears(model):
            linear.weight.requires_grad_(True)
        yield
    finally:
        for p, flag, grad in zip(params, saved_flags, saved_grads, strict=True):
            p.requires_grad_(flag)
            p.grad = grad


def taylor_saliences(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4,
                     progress: bool = True) -> dict[nn.Linear, torch.Tensor]:
    """|w * dL/dw| for every prunable projection, with the language-modelling loss averaged over the
    calibration batches (forward and backward passes; weights are not changed). -> {linear: (out, in)}."""
    device = next(model.parameters()).device
    n_batches = -(-len(windows) // batch_size)
    with gradients_of_prunable_weights(model), torch.enable_grad():
        for start in tqdm(range(0, len(windows), batch_size), desc="gradients", unit="batch",
                          total=n_batches, disable=not progress):
            batch = windows[start : start + batch_size].to(device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss / n_batches
            loss.backward()
        return {linear: (linear.weight.detach().float() * linear.weight.grad.float()).abs().cpu()
                for linear in _prunable_linears(model)}
