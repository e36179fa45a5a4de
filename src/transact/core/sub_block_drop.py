"""Dropping sub-blocks: remove the attention (and the norm that feeds it), or the MLP (and the norm that feeds
it), of the decoder layers where the calibration loss misses it least, keeping the rest of each layer.

A layer's attention and its MLP each add their output to the residual stream; removing one leaves the stream
as it entered that sub-block. A dropped attention takes the layer's share of the KV cache and of the
attention's cost at every context length with it; a dropped MLP about two thirds of a Llama layer's
parameters. Each candidate layer is scored by the calibration loss with that sub-block's output zeroed, one
forward pass over the first ``loss_samples`` calibration windows per layer; the ``count`` lowest go. With
``rounds`` R > 1 the count is split into R nearly equal parts, and each round scores the layers left with
the sub-blocks already chosen zeroed, so that it sees what the earlier drops did (dropping several together
can cost more than their single scores add up to): about R times the passes.

The candidates (``SubBlock``): for attention every layer with attention but the first (its cache counts the
tokens seen, and vLLM starts its residual stream there); for the MLP every layer with one. A layer keeps at
least one of the two (a layer with neither is a dropped layer: ``--drop-layers``).

No vanilla config describes a stack in which some layers lack a sub-block, so such a model is saved in the
DeciLM / Nemotron-NAS layout (``attention.no_op``, ``ffn.no_op``; ``transact.io.per_layer``), which vLLM and
llama.cpp's ``deci`` run. In memory a dropped sub-block is ``SkippedAttention`` or ``SkippedMlp`` (each adds
exactly zero), and the config lists the layers (``ATTENTION_DROPPED``, ``MLP_DROPPED``), so that the model's
shape says which layers keep heads and MLP channels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from transact.arch import get_adapter, shape_of
from transact.arch.adapter import FamilyAdapter
from transact.arch.shape import ATTENTION_DROPPED, MLP_DROPPED
from transact.core.depth_calibrate import calibration_loss
from transact.decilm.modeling_decilm import skip_attention_, skip_mlp_
from transact.errors import TransactError

NO_MAP = "sub-blocks are dropped without a map"


@dataclass(frozen=True)
class SubBlock:
    """One kind of sub-block a layer can lose: where it sits (``module``), whether a layer still has it
    (``present``), how it is removed in place (``skip``), the config key listing the layers without it, and
    whether layer 0 may lose it."""

    noun: str
    dropped_key: str
    module: Callable[[FamilyAdapter, nn.Module], nn.Module]
    present: Callable[[FamilyAdapter, nn.Module], bool]
    skip: Callable[[nn.Module], None]
    first_layer: bool


SUB_BLOCKS = {
    "attention": SubBlock("attention", ATTENTION_DROPPED, FamilyAdapter.attention_module,
                          FamilyAdapter.has_attention, skip_attention_, first_layer=False),
    "mlp": SubBlock("MLP", MLP_DROPPED, FamilyAdapter.mlp_module, FamilyAdapter.has_mlp, skip_mlp_,
                    first_layer=True),
}


def sub_block(part: str) -> SubBlock:
    """The sub-block named ``part`` ("attention" or "mlp")."""
    if part not in SUB_BLOCKS:
        raise TransactError(f"the sub-block to drop {part!r} is not one of {', '.join(SUB_BLOCKS)}")
    return SUB_BLOCKS[part]


def candidates(model_or_config, part: str) -> list[int]:
    """The layers whose ``part`` may be dropped: those that have both sub-blocks (a layer keeps one), and for
    attention not layer 0."""
    shape = shape_of(model_or_config)
    mlp = range(shape.num_layers) if shape.mlp_layers is None else shape.mlp_layers
    both = sorted(set(shape.attention_layer_indices) & set(mlp))
    return [i for i in both if i > 0 or sub_block(part).first_layer]


def count_to_drop(value: int | float, available: int, part: str) -> int:
    """A count (int >= 1) or a fraction in (0, 1) of the ``available`` candidate layers -> the count; at least
    one layer keeps the sub-block (a stack without MLPs has no MLP width to describe it by)."""
    count = max(1, round(value * available)) if isinstance(value, float) else int(value)
    if count > available:
        which = ("attention that can go (every layer's but the first, which stays)" if part == "attention"
                 else "an MLP that can go (every layer's that keeps its attention)")
        raise TransactError(f"cannot drop the {sub_block(part).noun} of {count} layers: {available} layers have "
                            f"{which}")
    if count == available and sub_block(part).first_layer:  # no layer 0 that always keeps it
        raise TransactError(f"cannot drop the {sub_block(part).noun} of every one of the {available} layers that "
                            "have one: at least one layer keeps it")
    return count


def check_sub_block_drop(config, value: int | float, part: str) -> None:
    """Refuse, before any weights are read, a family whose checkpoint cannot hold layers without ``part``, and
    a count the model cannot spare."""
    adapter = get_adapter(config)
    if adapter.hybrid is not None or adapter.is_moe:
        raise TransactError(f"dropping {sub_block(part).noun} sub-blocks writes the DeciLM / Nemotron-NAS layout, "
                            f"which holds the Llama block only; the {adapter.model_type} family's layers do not fit it")
    adapter.per_layer_fields(config)  # a family without the layout is refused, naming it
    count_to_drop(value, len(candidates(config, part)), part)


def droppable(config, part: str) -> int:
    """How many layers of a model with ``config`` can lose their ``part`` (0 where its family's checkpoint cannot
    hold layers without it)."""
    try:
        check_sub_block_drop(config, 1, part)
    except TransactError:
        return 0
    return len(candidates(config, part))


@contextmanager
def sub_blocks_skipped(model: nn.Module, layers: list[int], part: str) -> Iterator[None]:
    """Within the block, the ``part`` of layers ``layers`` adds nothing to the residual stream (its output is
    zeroed, as ``SkippedAttention``'s and ``SkippedMlp``'s is); the hooks are removed on exit, also on
    error."""
    adapter, block = get_adapter(model), sub_block(part)
    stack = adapter.layers(model)

    def zeroed(module, args, output):
        return (torch.zeros_like(output[0]), *output[1:]) if isinstance(output, tuple) else torch.zeros_like(output)

    handles = [block.module(adapter, stack[i]).register_forward_hook(zeroed) for i in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def loss_scores(model: nn.Module, windows: torch.Tensor, layers: list[int], part: str, *, batch_size: int = 4,
                progress: bool = True) -> torch.Tensor:
    """The calibration loss with each of ``layers``' ``part`` zeroed. windows: (n, seq) -> (len(layers),)."""
    scores = []
    for i in tqdm(layers, desc=f"scoring {sub_block(part).noun}s", unit="layer", disable=not progress):
        with sub_blocks_skipped(model, [i], part):
            scores.append(calibration_loss(model, windows, batch_size=batch_size))
    return torch.tensor(scores)


def lowest(layers: list[int], scores: torch.Tensor, count: int) -> list[int]:
    """The ``count`` layers of lowest score, in layer order (ties: the earlier layer)."""
    order = sorted(range(len(layers)), key=lambda j: (float(scores[j]), j))
    return sorted(layers[j] for j in order[:count])


def skip_sub_blocks_(model: nn.Module, layers: list[int], part: str) -> None:
    """Remove the ``part`` of layers ``layers`` in place (with the norm that feeds it) and record them on the
    config."""
    adapter, block = get_adapter(model), sub_block(part)
    text = adapter.text_config(model.config)
    stack = adapter.layers(model)
    allowed = set(candidates(model, part))
    for i in layers:
        if not block.present(adapter, stack[i]):
            raise TransactError(f"layer {i} has no {block.noun} to drop")
        if i not in allowed:
            raise TransactError(f"layer {i} cannot lose its {block.noun}: "
                                + ("the first layer keeps its attention" if i == 0 and part == "attention"
                                   else "a layer keeps its attention or its MLP (drop the layer instead)"))
    for i in layers:
        block.skip(stack[i])
    done = set(getattr(text, block.dropped_key, None) or ())
    setattr(text, block.dropped_key, sorted(done | set(layers)))


def round_sizes(count: int, rounds: int) -> list[int]:
    """``count`` split into ``min(rounds, count)`` nearly equal parts, the larger first."""
    parts = min(rounds, count)
    return [count // parts + (1 if i < count % parts else 0) for i in range(parts)]


def choose_sub_blocks(model: nn.Module, windows: torch.Tensor, layers: list[int], count: int, rounds: int,
                      part: str, *, batch_size: int = 4, progress: bool = True) -> tuple[list[int], list[dict]]:
    """The ``count`` layers whose ``part`` goes, chosen in ``rounds`` rounds (``round_sizes``): each scores the
    candidates left with the chosen ones zeroed and takes its share of the lowest. windows: (n, seq) ->
    (the layers in order, each round's ``{"scores": {layer: loss}, "dropped": [...]}``)."""
    chosen: list[int] = []
    record = []
    for size in round_sizes(count, rounds):
        left = [i for i in layers if i not in chosen]
        with sub_blocks_skipped(model, chosen, part):
            scores = loss_scores(model, windows, left, part, batch_size=batch_size, progress=progress)
        picked = lowest(left, scores, size)
        chosen += picked
        record.append({"scores": {str(i): round(float(v), 6) for i, v in zip(left, scores, strict=True)},
                       "dropped": picked})
    return sorted(chosen), record
