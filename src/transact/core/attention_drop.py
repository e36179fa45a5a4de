"""Dropping attention sub-blocks: remove the attention (and the norm that feeds it) of the decoder layers whose
attention the calibration loss misses least, keeping their MLPs.

A layer's attention adds its output to the residual stream; removing it leaves the stream as it entered the
layer, and removes the layer's share of the KV cache and of the attention's cost at every context length.
Each candidate layer (every layer with attention but the first, whose cache counts the tokens seen and where
vLLM starts its residual stream) is scored by the calibration loss with its attention output zeroed, one
forward pass over the first ``loss_samples`` calibration windows per layer; the ``count`` lowest go. With
``rounds`` R > 1 the count is split into R nearly equal parts, and each round scores the layers left with
the attentions already chosen zeroed, so that it sees what the earlier drops did (dropping several
attentions together can cost more than their single scores add up to): about R times the passes.

No vanilla config describes a stack in which some layers lack attention, so such a model is saved in the
DeciLM / Nemotron-NAS layout (``attention.no_op``; ``transact.io.per_layer``), which vLLM and llama.cpp's
``deci`` run. In memory the dropped attention is ``SkippedAttention`` (it adds exactly zero), and the config
lists the layers (``ATTENTION_DROPPED``), so that the model's shape says which layers keep heads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from transact.arch import get_adapter, shape_of
from transact.arch.adapter import ATTENTION_DROPPED
from transact.core.depth_calibrate import calibration_loss
from transact.decilm.modeling_decilm import skip_attention_
from transact.errors import TransactError

NO_MAP = "attention sub-blocks are dropped without a map"


def attention_candidates(model_or_config) -> list[int]:
    """The layers whose attention may be dropped: every layer with attention but layer 0."""
    shape = shape_of(model_or_config)
    return [i for i in shape.attention_layer_indices if i > 0]


def attentions_to_drop(value: int | float, candidates: int) -> int:
    """A count (int >= 1) or a fraction in (0, 1) of the ``candidates`` layers -> the count of attentions."""
    count = max(1, round(value * candidates)) if isinstance(value, float) else int(value)
    if count > candidates:
        raise TransactError(f"cannot drop the attention of {count} layers: {candidates} layers have attention that "
                            "can go (every layer's but the first, which stays)")
    return count


def check_attention_drop(config, value: int | float) -> None:
    """Refuse, before any weights are read, a family whose checkpoint cannot hold layers without attention, and
    a count the model cannot spare."""
    adapter = get_adapter(config)
    if adapter.hybrid is not None or adapter.is_moe:
        raise TransactError(f"dropping attention writes the DeciLM / Nemotron-NAS layout, which holds the Llama "
                            f"block only; the {adapter.model_type} family's layers do not fit it")
    adapter.per_layer_fields(config)  # a family without the layout is refused, naming it
    attentions_to_drop(value, len(attention_candidates(config)))


@contextmanager
def attention_skipped(model: nn.Module, layers: list[int]) -> Iterator[None]:
    """Within the block, the attention of layers ``layers`` adds nothing to the residual stream (its output
    is zeroed, as ``SkippedAttention``'s is); the hooks are removed on exit, also on error."""
    adapter = get_adapter(model)
    stack = adapter.layers(model)

    def zeroed(module, args, output):
        return (torch.zeros_like(output[0]), *output[1:]) if isinstance(output, tuple) else torch.zeros_like(output)

    handles = [adapter.attention_module(stack[i]).register_forward_hook(zeroed) for i in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def attention_loss_scores(model: nn.Module, windows: torch.Tensor, candidates: list[int], *, batch_size: int = 4,
                          progress: bool = True) -> torch.Tensor:
    """The calibration loss with each candidate layer's attention zeroed. windows: (n, seq) ->
    (len(candidates),)."""
    scores = []
    for i in tqdm(candidates, desc="scoring attentions", unit="layer", disable=not progress):
        with attention_skipped(model, [i]):
            scores.append(calibration_loss(model, windows, batch_size=batch_size))
    return torch.tensor(scores)


def lowest(candidates: list[int], scores: torch.Tensor, count: int) -> list[int]:
    """The ``count`` candidates of lowest score, in layer order (ties: the earlier candidate)."""
    order = sorted(range(len(candidates)), key=lambda j: (float(scores[j]), j))
    return sorted(candidates[j] for j in order[:count])


def skip_attention_layers_(model: nn.Module, layers: list[int]) -> None:
    """Remove the attention of layers ``layers`` in place (``SkippedAttention``, no input norm) and record them
    on the config."""
    adapter = get_adapter(model)
    text = adapter.text_config(model.config)
    stack = adapter.layers(model)
    done = set(getattr(text, ATTENTION_DROPPED, None) or ())
    for i in layers:
        if i in done or not adapter.has_attention(stack[i]):
            raise TransactError(f"layer {i} has no attention to drop")
        skip_attention_(stack[i])
    setattr(text, ATTENTION_DROPPED, sorted(done | set(layers)))


def round_sizes(count: int, rounds: int) -> list[int]:
    """``count`` split into ``min(rounds, count)`` nearly equal parts, the larger first."""
    parts = min(rounds, count)
    return [count // parts + (1 if i < count % parts else 0) for i in range(parts)]


def choose_attentions(model: nn.Module, windows: torch.Tensor, candidates: list[int], count: int, rounds: int, *,
                      batch_size: int = 4, progress: bool = True) -> tuple[list[int], list[dict]]:
    """The ``count`` attentions to drop, chosen in ``rounds`` rounds (``round_sizes``): each scores the
    candidates left with the chosen ones zeroed and takes its share of the lowest. windows: (n, seq) ->
    (the layers in order, each round's ``{"scores": {layer: loss}, "dropped": [...]}``)."""
    chosen: list[int] = []
    record = []
    for size in round_sizes(count, rounds):
        left = [i for i in candidates if i not in chosen]
        with attention_skipped(model, chosen):
            scores = attention_loss_scores(model, windows, left, batch_size=batch_size, progress=progress)
        picked = lowest(left, scores, size)
        chosen += picked
        record.append({"scores": {str(i): round(float(v), 6) for i, v in zip(left, scores, strict=True)},
                       "dropped": picked})
    return sorted(chosen), record

