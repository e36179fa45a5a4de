"""One decoder layer at a time: a *one-layer model* (the family's own transformers class built from the config
cut to that layer, with a one-token vocabulary) that runs a layer on stored hidden states.

Its forward computes the position embeddings and attention masks exactly as the full model does for that
layer type; a pre-hook swaps the stored hidden states in for placeholder embeddings, and a hook takes the
layer's output. So nothing transformers passes between layers is rebuilt here. ``transact.core.layerwise``
runs the pruning step through these models layer by layer.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from transact.arch import get_adapter
from transact.core.calibrate import ActivationStats, decoder_stack, record_transitional_stats

# ---------------------------------------------------------------- one-layer models


def one_layer_config(config: PretrainedConfig, index: int) -> PretrainedConfig:
    """``config`` cut down to its layer ``index`` (see ``FamilyAdapter.one_layer_config``)."""
    return get_adapter(config).one_layer_config(config, index)


class LayerModels:
    """One-layer models of a config, built once per distinct layer configuration and copied per layer
    with their decoder layer on the meta device (no weights), ready to receive one layer's tensors."""

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, device: torch.device) -> None:
        self.config, self.dtype, self.device = config, dtype, device
        self._empty: dict[str, nn.Module] = {}

    def empty(self, index: int) -> nn.Module:
        one = one_layer_config(self.config, index)
        key = one.to_json_string()
        if key not in self._empty:
            model = AutoModelForCausalLM.from_config(one, dtype=self.dtype).to(self.device).eval()
            get_adapter(model).layers(model)[0].to("meta")
            self._empty[key] = model
        return copy.deepcopy(self._empty[key])

    def holding(self, index: int, layer: nn.Module) -> nn.Module:
        """The one-layer model of layer ``index`` running ``layer`` itself (not a copy): pruning it there
        prunes the layer where it lives."""
        model = self.empty(index)
        get_adapter(model).layers(model)[0] = layer
        return model

    def with_layer(self, index: int, state: dict[str, torch.Tensor]) -> nn.Module:
        """The one-layer model of layer ``index`` holding ``state`` (the layer's tensors by local name)."""
        model = self.empty(index)
        layer = get_adapter(model).layers(model)[0]
        layer.load_state_dict({k: v.to(self.device, self.dtype) for k, v in state.items()}, assign=True,
                              strict=True)
        return model


def layer_of(model: nn.Module) -> nn.Module:
    return get_adapter(model).layers(model)[0]


# ---------------------------------------------------------------- running one layer on stored inputs


@dataclass
class _Tap:
    """What the hooks on the layer swap in (``feed``) and take out (``inputs``, ``output``)."""

    feed: torch.Tensor | None = None
    inputs: torch.Tensor | None = None
    output: torch.Tensor | None = None


@contextmanager
def tapped(layer: nn.Module) -> Iterator[_Tap]:
    """Hooks on a decoder layer: the hidden states it is called with are replaced by ``tap.feed`` (when set)
    or recorded in ``tap.inputs``; its output is kept in ``tap.output``. Removed on exit, also on error."""
    tap = _Tap()

    def before(module, args, kwargs):
        if tap.feed is None:
            tap.inputs = args[0] if args else kwargs["hidden_states"]
            return None
        if args:
            return (tap.feed, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": tap.feed}

    def after(module, args, kwargs, output):
        tap.output = output[0] if isinstance(output, tuple) else output

    handles = [layer.register_forward_pre_hook(before, with_kwargs=True),
               layer.register_forward_hook(after, with_kwargs=True)]
    try:
        yield tap
    finally:
        for handle in handles:
            handle.remove()


def _batches(count: int, batch_size: int) -> range:
    return range(0, count, batch_size)


@torch.inference_mode()
def embed_windows(model: nn.Module, rows: Callable[[list[int]], torch.Tensor], windows: torch.Tensor,
                  batch_size: int, store: torch.device) -> torch.Tensor:
    """The hidden states that enter layer 0 for ``windows`` (n, T): -> (n, T, hidden) on ``store``.

    ``model`` is the one-layer model of layer 0; ``rows(ids)`` reads those rows of the input embedding
    (len(ids), hidden). Only the rows of tokens that occur are read: the model's embedding module gets
    exactly those rows and the windows are renumbered to them, so its forward (with any scaling the family
    applies) computes what the full embedding would.
    """
    used, renumbered = torch.unique(windows, return_inverse=True)
    emb = model.get_input_embeddings()
    weight = rows(used.tolist()).to(emb.weight.device, emb.weight.dtype)
    emb.weight = nn.Parameter(weight, requires_grad=False)
    emb.num_embeddings = weight.shape[0]
    out = []
    with tapped(layer_of(model)) as tap:
        for start in _batches(len(windows), batch_size):
            batch = renumbered[start:start + batch_size].to(emb.weight.device)
            decoder_stack(model)(input_ids=batch, use_cache=False)
            out.append(tap.inputs.to(store))
    return torch.cat(out)


@torch.inference_mode()
def run_layer(model: nn.Module, hidden: torch.Tensor, batch_size: int, *, statistics: tuple[str, ...] = (),
              keep_outputs: bool = True) -> tuple[torch.Tensor | None, ActivationStats | None]:
    """Run the one-layer ``model`` over ``hidden`` (n, T, hidden) in batches: -> (its outputs, (n, T,
    hidden) on hidden's device, or None; the transitional statistics asked for, or None)."""
    param = next(model.parameters())
    outputs = []
    body = decoder_stack(model)
    recording = record_transitional_stats(model, statistics) if statistics else _nothing()
    with recording as stats, tapped(layer_of(model)) as tap:
        for start in _batches(len(hidden), batch_size):
            tap.feed = hidden[start:start + batch_size].to(param.device)
            placeholder = torch.zeros_like(tap.feed)
            body(inputs_embeds=placeholder, use_cache=False)
            if keep_outputs:
                outputs.append(tap.output.to(hidden.device))
            if stats is not None:
                stats.tokens += tap.feed.shape[0] * tap.feed.shape[1]
                stats.samples += tap.feed.shape[0]
    return (torch.cat(outputs) if keep_outputs else None), (stats.to("cpu") if stats is not None else None)


@contextmanager
def _nothing() -> Iterator[None]:
    yield None
