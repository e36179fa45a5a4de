"""Layer-wise pruning: one decoder layer in memory at a time, from a checkpoint larger than memory.

The calibration windows enter layer 0 once (only the embedding is read for that); then for each layer
its weights are read from the safetensors files, the stored hidden states are run through it with the
calibration hooks, and the same pruning step as the whole-model path (score, select, correct, slice) runs
on it. The next layer's inputs are the outputs of either the dense layer (``sequential=False``: the
statistics, and so the result, equal the whole-model path's) or the pruned one (``sequential=True``:
layer l is calibrated on what the pruned layers 0..l-1 produce, the way GPTQ-style tools work).

A layer runs inside a *one-layer model*: the family's own transformers class built from the config with
one layer (that layer's entries of every per-layer list such as ``layer_types``) and a one-token
vocabulary. Its forward computes the position embeddings and attention masks exactly as the full model
does for that layer type; a pre-hook swaps the stored hidden states in for the placeholder embeddings, and
a hook takes the layer's output. So nothing transformers passes between layers is rebuilt here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PretrainedConfig

from transact.arch import get_adapter, shape_of
from transact.core.calibrate import (
    ActivationStats,
    Statistics,
    decoder_stack,
    record_transitional_stats,
    windows_hash,
)
from transact.core.plan import LayerPlan, PrunePlan, Targets, resolve_targets
from transact.core.step import apply_step, calibration_windows, check_step, plan_step
from transact.core.surgery import round_to_
from transact.recipes import PruneRecipe
from transact.version import library_versions

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


# ---------------------------------------------------------------- one layer's pruning step


@dataclass
class LayerResult:
    """One layer pruned: its kept units, what the correctors did, and the next layer's inputs."""

    kept: LayerPlan
    corrections: list[dict] = field(default_factory=list)
    next_hidden: torch.Tensor | None = None
    dropped_routes: float | None = None  # the share of routes to the experts it drops (mixtures of experts)


def prune_layer(model: nn.Module, index: int, num_layers: int, hidden: torch.Tensor | None, recipe: PruneRecipe,
                targets: Targets, *, calibration_hash: str | None, sequential: bool,
                round_to: torch.dtype | None = None) -> LayerResult:
    """The pruning step on the one-layer ``model`` (layer ``index`` of ``num_layers``), in place, calibrated
    on ``hidden`` (None for a step that needs no data). ``round_to``: the dtype the result will be saved in,
    when narrower than the compute dtype (the layer is rounded to it before it computes the next inputs, so
    the saved model is the one the next layer was calibrated on)."""
    batch = recipe.calibration.batch_size
    stats, outputs = Statistics(calibration_hash=calibration_hash, layer=(index, num_layers)), None
    if hidden is not None:
        outputs, stats.activations = run_layer(model, hidden, batch, statistics=recipe.statistics,
                                               keep_outputs=not sequential)
    plan, _ = plan_step(model, None, recipe, targets=targets, statistics=stats, progress=False)
    plan = apply_step(model, plan, stats, recipe)
    if round_to is not None:
        round_to_(layer_of(model), round_to)
    if hidden is not None and sequential:
        outputs, _ = run_layer(model, hidden, batch)
    routes = plan.dropped_expert_routes[0] if plan.dropped_expert_routes else None
    return LayerResult(plan.layers[0], plan.corrections, outputs, routes)


# ---------------------------------------------------------------- a model in memory, layer by layer


def prune_by_layer(model: nn.Module, tokenizer, recipe: PruneRecipe, *, sequential: bool,
                   targets: Targets | None = None, texts: list[str] | None = None, note: dict | None = None,
                   progress: bool = True) -> PrunePlan:
    """The pruning step on a model in memory, in place, one decoder layer at a time: each layer calibrated on
    what the already-pruned layers before it produce (``sequential``) or on the dense model's activations
    (the same statistics as ``prune_step``). Each layer runs inside a one-layer model that holds the model's
    own layer module, so the layer is pruned where it lives. -> the plan."""
    adapter, shape = get_adapter(model), shape_of(model)
    targets = targets or resolve_targets(recipe, shape)
    check_step(model.config, recipe, targets)
    windows = calibration_windows(tokenizer, recipe, texts)
    calibration_hash = windows_hash(windows) if windows is not None else None
    param = next(model.parameters())
    models = LayerModels(model.config, param.dtype, param.device)
    layers, hidden, kept, corrections, first, routes = adapter.layers(model), None, [], [], None, []
    embedding = model.get_input_embeddings().weight
    for index in tqdm(range(shape.num_layers), desc="layers", unit="layer", disable=not progress):
        one = models.holding(index, layers[index])
        if index == 0 and windows is not None:
            hidden = embed_windows(one, lambda ids: embedding[ids], windows, recipe.calibration.batch_size,
                                   param.device)
        result = prune_layer(one, index, shape.num_layers, hidden, recipe, targets, sequential=sequential,
                             calibration_hash=calibration_hash)
        kept.append(result.kept)
        routes.append(result.dropped_routes)
        corrections, hidden = corrections or result.corrections, result.next_hidden
        first = first or one.config
    for key, value in config_changes(model.config, first).items():
        setattr(adapter.text_config(model.config), key, value)
    return PrunePlan(source=shape, targets=targets, layers=kept,
                     recipe={**(note or {}), **recipe.to_json(), "layerwise": True, "sequential": sequential},
                     calibration_hash=calibration_hash, versions=library_versions(), corrections=corrections,
                     dropped_expert_routes=layer_routes(routes, shape.num_layers))


def layer_routes(routes: list[float | None], num_layers: int) -> list[float] | None:
    """The plan's ``dropped_expert_routes`` from each layer's ``LayerResult.dropped_routes``: None unless all
    ``num_layers`` layers dropped experts."""
    return routes if len(routes) == num_layers and None not in routes else None


def config_changes(source: PretrainedConfig, pruned_first: PretrainedConfig) -> dict:
    """The config values the pruned one-layer model of layer 0 changed (widths, head_dim, a corrector's bias
    flags; per-layer values such as ``layer_types`` are compared with layer 0's own)."""
    before, after = one_layer_config(source, 0).to_dict(), pruned_first.to_dict()
    return {k: v for k, v in after.items() if before.get(k) != v and k not in ("dtype", "torch_dtype")}
