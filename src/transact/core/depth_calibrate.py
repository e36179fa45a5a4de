"""Depth pruning's passes over the calibration windows: hooks on the decoder layers (the hidden states
entering and leaving them, one layer's MLP output; skipping a block), and what the passes reduce to: each
candidate block's score (angular distance, calibration loss) and the sums the maps are fitted from (see
``transact.core.depth`` for the math and the step)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from transact.arch import get_adapter, shape_of
from transact.core.calibrate import decoder_stack


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """arccos(cosine similarity) / pi of each token's two hidden states, in [0, 1]. a, b: (..., H) -> (...)."""
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1).clamp(-1.0, 1.0)
    return torch.arccos(cos) / torch.pi


# ---------------------------------------------------------------- hooks


@dataclass
class _Streams:
    """Per batch: the hidden states entering each tapped layer (``inputs``), leaving it (``outputs``), and the
    output of one layer's MLP (``mlp``)."""

    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    mlp: torch.Tensor | None = None


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def residual_taps(model: nn.Module, inputs: set[int], outputs: set[int], mlp_of: int | None = None,
                  module: str | None = None) -> Iterator[_Streams]:
    """Hooks recording the hidden states entering layers ``inputs`` and leaving layers ``outputs`` (before
    the final norm), and the output of layer ``mlp_of``'s MLP block (or of its submodule ``module``, in
    ``streams.mlp``); removed on exit, also on error."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    streams = _Streams()
    handles = []

    def before(index, module, args, kwargs):
        streams.inputs[index] = _hidden(args, kwargs)

    def after(index, module, args, kwargs, output):
        streams.outputs[index] = output[0] if isinstance(output, tuple) else output

    def mlp_after(module, args, output):
        streams.mlp = output[0] if isinstance(output, tuple) else output

    try:
        for i in inputs:
            handles.append(layers[i].register_forward_pre_hook(lambda m, a, k, i=i: before(i, m, a, k),
                                                               with_kwargs=True))
        for i in outputs:
            handles.append(layers[i].register_forward_hook(lambda m, a, k, o, i=i: after(i, m, a, k, o),
                                                           with_kwargs=True))
        if mlp_of is not None:
            tapped = getattr(layers[mlp_of], module) if module else adapter.mlp_module(layers[mlp_of])
            handles.append(tapped.register_forward_hook(mlp_after))
        yield streams
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def skipping(model: nn.Module, block: list[int]) -> Iterator[None]:
    """Within the block, layers ``block`` pass their input through unchanged (as if removed; for forward
    passes without a cache). The hooks are removed on exit, also on error."""
    layers = get_adapter(model).layers(model)

    def identity(module, args, kwargs, output):
        hidden = _hidden(args, kwargs)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handles = [layers[i].register_forward_hook(identity, with_kwargs=True) for i in block]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _batches(windows: torch.Tensor, batch_size: int, desc: str, progress: bool) -> Iterator[torch.Tensor]:
    total = -(-len(windows) // batch_size)
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch", total=total, disable=not progress):
        yield windows[start : start + batch_size]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------- scores and statistics


def angular_scores(model: nn.Module, windows: torch.Tensor, block: int, *, batch_size: int = 4,
                   progress: bool = True) -> torch.Tensor:
    """Mean angular distance between the hidden states entering layer s and leaving layer s+block-1, over
    every calibration token, for each start s. windows: (n, seq) -> (num_layers - block + 1,)."""
    count = len(get_adapter(model).layers(model))
    starts = range(count - block + 1)
    sums = torch.zeros(len(starts), dtype=torch.float64)
    tokens = 0
    body = decoder_stack(model)
    with residual_taps(model, set(starts), {s + block - 1 for s in starts}) as streams, torch.inference_mode():
        for batch in _batches(windows, batch_size, "scoring blocks", progress):
            body(input_ids=batch.to(_device(model)), use_cache=False)
            for j, s in enumerate(starts):
                sums[j] += angular_distance(streams.inputs[s], streams.outputs[s + block - 1]).sum().double().cpu()
            tokens += batch.numel()
    return (sums / tokens).float()


def calibration_loss(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4, progress: bool = False,
                     desc: str = "calibration loss") -> float:
    """Mean next-token cross-entropy of ``model`` over the calibration windows (n, seq)."""
    adapter = get_adapter(model)
    body = decoder_stack(model)
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in _batches(windows, batch_size, desc, progress):
            batch = batch.to(_device(model))
            hidden = body(input_ids=batch, use_cache=False).last_hidden_state[:, :-1]  # (b, seq-1, H)
            for row, targets in zip(hidden, batch[:, 1:], strict=True):  # one window's logits at a time
                logits = adapter.lm_logits(model, row).float()
                total += float(F.cross_entropy(logits, targets, reduction="sum"))
                count += targets.numel()
    return total / count


def loss_scores(model: nn.Module, windows: torch.Tensor, block: int, *, batch_size: int = 4,
                progress: bool = True) -> torch.Tensor:
    """The calibration loss with layers s..s+block-1 skipped, for each start s. -> (num_layers - block + 1,)."""
    count = len(get_adapter(model).layers(model))
    scores = []
    for s in tqdm(range(count - block + 1), desc="scoring blocks", unit="block", disable=not progress):
        with skipping(model, list(range(s, s + block))):
            scores.append(calibration_loss(model, windows, batch_size=batch_size))
    return torch.tensor(scores)


def map_statistics(model: nn.Module, windows: torch.Tensor, start: int, block: int, scale: float, *,
                   batch_size: int = 4, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram and cross matrices of the least-squares map for the block ``start``..``start+block-1``: with m the
    MLP output of layer start-1, h its output and Y the block's output, the map's target is
    T = (Y - h) / scale + m (so that R + scale m A = Y). -> (M^T M, M^T T), each (H, H) float64."""
    hidden = shape_of(model).hidden_size
    gram = torch.zeros(hidden, hidden, dtype=torch.float64)
    cross = torch.zeros(hidden, hidden, dtype=torch.float64)
    before, last = start - 1, start + block - 1
    body = decoder_stack(model)
    with residual_taps(model, set(), {before, last}, mlp_of=before) as streams, torch.inference_mode():
        for batch in _batches(windows, batch_size, "fitting the map", progress):
            body(input_ids=batch.to(_device(model)), use_cache=False)
            m = streams.mlp.reshape(-1, hidden).double()
            target = (streams.outputs[last] - streams.outputs[before]).reshape(-1, hidden).double() / scale + m
            gram += (m.T @ m).cpu()
            cross += (m.T @ target).cpu()
    return gram, cross


def gain_statistics(model: nn.Module, windows: torch.Tensor, start: int, block: int, norm: str, *,
                    batch_size: int = 4, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel map's sums where a norm (``norm``, a submodule of each layer) follows the MLP: with c
    that norm's output in layer start-1 (what joins the stream), h the layer's output and Y the block's, the
    target of c * d is t = Y - h + c. -> (sum(c * t), sum(c^2)), each (H,) float64."""
    hidden = shape_of(model).hidden_size
    numerator = torch.zeros(hidden, dtype=torch.float64)
    denominator = torch.zeros(hidden, dtype=torch.float64)
    before, last = start - 1, start + block - 1
    body = decoder_stack(model)
    with residual_taps(model, set(), {before, last}, mlp_of=before, module=norm) as streams, torch.inference_mode():
        for batch in _batches(windows, batch_size, "fitting the map", progress):
            body(input_ids=batch.to(_device(model)), use_cache=False)
            c = streams.mlp.reshape(-1, hidden).double()
            target = (streams.outputs[last] - streams.outputs[before]).reshape(-1, hidden).double() + c
            numerator += (c * target).sum(0).cpu()
            denominator += c.square().sum(0).cpu()
    return numerator, denominator
