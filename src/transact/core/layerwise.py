"""The layer-by-layer pipeline: the pruning step on one decoder layer at a time, for models larger than memory
and for calibration on the pruned layers' own outputs.

A *source* hands out each layer inside a one-layer model (``transact.core.layers``): the layers of a model
in memory (``ModelLayers``: the layer module itself, pruned where it lives) or of a checkpoint read lazily
(``CheckpointLayers``: the layer's tensors read from its safetensors files). The calibration windows enter
layer 0 once (only the embedding rows they use are read); then each layer runs on the stored hidden states
with the calibration hooks, and the same step as the whole-model path (score, select, correct, slice) prunes
it. A *sink* takes each pruned layer: ``InPlace`` (nothing to write: the model in memory holds it) or
``ShardSink`` (a shard of the new checkpoint, read back into a one-layer model of the saved config and
checked). The next layer's inputs are the outputs of either the dense layer (``sequential=False``: the
statistics, and so the result, equal the whole-model path's) or the pruned one (``sequential=True``: layer l
is calibrated on what the pruned layers 0..l-1 produce, the way GPTQ-style tools work).

What the layers decided so far (``LayerwiseState``) is a plain value with a JSON form, so a job can record it
after every layer and continue an interrupted run from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PretrainedConfig

from transact.arch import get_adapter, shape_of
from transact.core.calibrate import Statistics, windows_hash
from transact.core.layers import LayerModels, embed_windows, layer_of, one_layer_config, run_layer
from transact.core.plan import LayerPlan, PrunePlan
from transact.core.step import apply_step, calibration_windows, check_step, plan_step, prune_step
from transact.core.surgery import round_to_
from transact.core.targets import Targets, resolve_targets
from transact.errors import TransactError
from transact.io.checkpoint import outputs_match
from transact.io.lazy import LazyCheckpoint, ShardWriter, embedding_name, release_freed_memory
from transact.version import library_versions

if TYPE_CHECKING:
    from transact.recipes import PruneRecipe


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


def config_changes(source: PretrainedConfig, pruned_first: PretrainedConfig) -> dict:
    """The config values the pruned one-layer model of layer 0 changed (widths, head_dim, a corrector's bias
    flags; per-layer values such as ``layer_types`` are compared with layer 0's own)."""
    before, after = one_layer_config(source, 0).to_dict(), pruned_first.to_dict()
    return {k: v for k, v in after.items() if before.get(k) != v and k not in ("dtype", "torch_dtype")}


# ---------------------------------------------------------------- what the layers decided

@dataclass
class LayerwiseState:
    """The layers pruned so far: each one's kept units and its share of routes to dropped experts; what the
    correctors did and how the config changes (the same for every layer, recorded from the first)."""

    kept: list[LayerPlan] = field(default_factory=list)
    routes: list[float | None] = field(default_factory=list)
    corrections: list[dict] | None = None
    config_changes: dict[str, Any] | None = None

    @property
    def done(self) -> int:
        return len(self.kept)

    def record(self, result: LayerResult, model: nn.Module, source: PretrainedConfig) -> None:
        if self.config_changes is None:
            self.config_changes = config_changes(source, model.config)
            self.corrections = result.corrections
        self.kept.append(result.kept)
        self.routes.append(result.dropped_routes)

    def plan(self, source: PretrainedConfig, targets: Targets, recipe: dict[str, Any],
             calibration_hash: str | None) -> PrunePlan:
        """The plan of the whole model (every layer pruned); ``recipe``: what the plan records of how."""
        shape = shape_of(source)
        routes = self.routes if len(self.routes) == shape.num_layers and None not in self.routes else None
        plan = PrunePlan(source=shape, targets=targets, layers=list(self.kept), recipe=recipe,
                         calibration_hash=calibration_hash, versions=library_versions(),
                         corrections=self.corrections or [], dropped_expert_routes=routes)
        plan.validate()
        return plan

    def to_json(self) -> dict[str, Any]:
        return {"layers": [kept.__dict__ for kept in self.kept], "dropped_routes": self.routes,
                "corrections": self.corrections, "config_changes": self.config_changes}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayerwiseState:
        return cls([LayerPlan(**kept) for kept in data["layers"]], list(data["dropped_routes"]),
                   data["corrections"], data["config_changes"])


# ---------------------------------------------------------------- sources

class LayerSource(Protocol):
    """Where the layers come from: the model's ``config``; ``layer(index)``, the one-layer model running layer
    ``index``; ``rows(ids)``, those rows of the input embedding; ``store``, where hidden states live; whether
    the memory of a finished layer should be handed back (``frees_layers``)."""

    config: PretrainedConfig
    store: torch.device
    frees_layers: bool

    def layer(self, index: int) -> nn.Module: ...

    def rows(self, ids: list[int]) -> torch.Tensor: ...


class ModelLayers:
    """The layers of a model in memory: each runs inside a one-layer model that holds the model's own layer
    module, so pruning it there prunes it where it lives."""

    frees_layers = False

    def __init__(self, model: nn.Module) -> None:
        param = next(model.parameters())
        self.config, self.store = model.config, param.device
        self._layers = get_adapter(model).layers(model)
        self._models = LayerModels(model.config, param.dtype, param.device)
        self._embedding = model.get_input_embeddings().weight

    def layer(self, index: int) -> nn.Module:
        return self._models.holding(index, self._layers[index])

    def rows(self, ids: list[int]) -> torch.Tensor:
        return self._embedding[ids]


class CheckpointLayers:
    """The layers of a checkpoint, each read from its safetensors files when its turn comes; hidden states
    live on ``store``."""

    frees_layers = True

    def __init__(self, weights: LazyCheckpoint, config: PretrainedConfig, dtype: torch.dtype, device: torch.device,
                 store: torch.device) -> None:
        self.config, self.store, self._weights = config, store, weights
        self._models = LayerModels(config, dtype, device)
        self._adapter = get_adapter(config)

    def layer(self, index: int) -> nn.Module:
        prefix = f"{self._adapter.layers_path}.{index}."
        return self._models.with_layer(index, self._adapter.fused_layer_state(self._weights.with_prefix(prefix)))

    def rows(self, ids: list[int]) -> torch.Tensor:
        return self._weights.rows(embedding_name(self._weights, self.config), ids)


def hidden_store(device: torch.device, dtype: torch.dtype, windows: torch.Tensor | None, hidden_size: int) -> \
        torch.device:
    """Where a layer-by-layer run over ``windows`` keeps its hidden states: on the compute device when its
    inputs and outputs fit in half of the device's free memory, else in CPU memory."""
    if device.type != "cuda" or windows is None:
        return torch.device("cpu")
    need = 2 * windows.numel() * hidden_size * torch.finfo(dtype).bits // 8
    free, _ = torch.cuda.mem_get_info(device)
    return device if need < free // 2 else torch.device("cpu")


# ---------------------------------------------------------------- sinks

class LayerSink(Protocol):
    """Where each pruned layer goes: ``write(index, model, state, hidden)`` after layer ``index`` is pruned in
    the one-layer ``model`` (``state`` includes it; ``hidden``: the next layer's inputs, None after the last)."""

    def write(self, index: int, model: nn.Module, state: LayerwiseState, hidden: torch.Tensor | None) -> None: ...


class InPlace:
    """A model in memory holds its pruned layers already: nothing to write."""

    def write(self, index: int, model: nn.Module, state: LayerwiseState, hidden: torch.Tensor | None) -> None:
        return None


def _probe(hidden_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, 32, hidden_size, generator=generator).to(device, dtype)


class ShardSink:
    """Each pruned layer as its own shard of a new checkpoint (``writer``'s shard ``index + 1``), in
    ``save_dtype`` under the names the source checkpoint stores them by (``stored_name``), then read back into
    a one-layer model of the *saved* config (``saved(config_changes)``), which must compute exactly what the
    pruned layer computes. ``layers``: where the source model keeps its decoder layers (a multimodal model's
    language model's, not the one-layer model's); ``after(index, file, names, state, hidden)`` is told of every
    shard written."""

    def __init__(self, writer: ShardWriter, save_dtype: torch.dtype, stored_name: Callable[[str], str], layers: str,
                 saved: Callable[[dict[str, Any]], PretrainedConfig], dtype: torch.dtype, device: torch.device,
                 after: Callable[..., None]) -> None:
        self.writer, self.save_dtype, self.stored_name, self.after = writer, save_dtype, stored_name, after
        self.layers = layers
        self._saved, self._dtype, self._device = saved, dtype, device
        self._vanilla: LayerModels | None = None

    def write(self, index: int, model: nn.Module, state: LayerwiseState, hidden: torch.Tensor | None) -> None:
        if self._vanilla is None:
            self._vanilla = LayerModels(self._saved(state.config_changes), self._dtype, self._device)
        adapter = get_adapter(model)
        layers = f"{self.layers}.{index}."
        tensors = {k: v.to(self.save_dtype) for k, v in layer_of(model).state_dict().items()}
        tensors = adapter.split_layer_state(adapter.saved_state(tensors, model.config))  # the saved class's names
        names = [self.stored_name(layers + k) for k in tensors]  # the source checkpoint's layout
        file, reread = self.writer.write(index + 1, dict(zip(names, tensors.values(), strict=True)))
        check = self._vanilla.with_layer(index, adapter.fused_layer_state(
            {k: reread[name] for k, name in zip(tensors, names, strict=True)}))
        probe = _probe(shape_of(self._vanilla.config).hidden_size, self._vanilla.dtype, self._vanilla.device)
        expected, _ = run_layer(model, probe, 1)
        got, _ = run_layer(check, probe, 1)
        if not outputs_match(expected, got, exact=not adapter.relayouts(model.config)):
            raise TransactError(f"layer {index} as written to {file} does not compute what the pruned layer computes")
        self.after(index, file, names, state, hidden)


# ---------------------------------------------------------------- the loop

@dataclass(frozen=True)
class LayerwiseRun:
    """One layer-by-layer run: the recipe and its resolved widths, the calibration windows (None: the step
    needs no data) and their hash, which statistics feed each layer (``sequential``), and the dtype the result
    is saved in where narrower than the compute dtype (``round_to``)."""

    recipe: PruneRecipe
    targets: Targets
    windows: torch.Tensor | None
    calibration_hash: str | None
    sequential: bool
    round_to: torch.dtype | None = None


def prune_layers(source: LayerSource, sink: LayerSink, run: LayerwiseRun, *, state: LayerwiseState | None = None,
                 hidden: torch.Tensor | None = None, progress: bool = True) -> LayerwiseState:
    """Prune every layer of ``source`` from ``state.done`` on (a fresh state: from layer 0, whose inputs are
    embedded from the windows; else ``hidden`` holds the inputs of the first layer still to prune), handing
    each to ``sink``; -> the state with every layer."""
    state = state or LayerwiseState()
    num_layers = shape_of(source.config).num_layers
    with tqdm(range(num_layers), desc="layers", unit="layer", initial=state.done, disable=not progress) as bar:
        for index in range(state.done, num_layers):
            hidden = _prune_one(source, sink, run, state, index, hidden)
            if source.frees_layers:
                release_freed_memory()
            bar.update(1)
    return state


def _prune_one(source: LayerSource, sink: LayerSink, run: LayerwiseRun, state: LayerwiseState, index: int,
               hidden: torch.Tensor | None) -> torch.Tensor | None:
    """Prune layer ``index`` on its inputs ``hidden``, record it, hand it to the sink; -> the next inputs."""
    num_layers = shape_of(source.config).num_layers
    model = source.layer(index)
    if index == 0 and run.windows is not None:
        hidden = embed_windows(model, source.rows, run.windows, run.recipe.calibration.batch_size, source.store)
    result = prune_layer(model, index, num_layers, hidden, run.recipe, run.targets, sequential=run.sequential,
                         calibration_hash=run.calibration_hash, round_to=run.round_to)
    state.record(result, model, source.config)
    following = result.next_hidden if index + 1 < num_layers else None
    sink.write(index, model, state, following)
    return result.next_hidden


def prune_by_layer(model: nn.Module, tokenizer, recipe: PruneRecipe, *, sequential: bool,
                   targets: Targets | None = None, texts: list[str] | None = None, note: dict | None = None,
                   progress: bool = True) -> PrunePlan:
    """The pruning step on a model in memory, in place, one decoder layer at a time: each layer calibrated on
    what the already-pruned layers before it produce (``sequential``) or on the dense model's activations
    (the same statistics as ``prune_step``). -> the plan."""
    if recipe.depth is not None:
        raise TransactError("dropping layers works on the whole model at once; it is not available layer by layer "
                            "(layerwise or sequential) yet")
    if recipe.allocation is not None:
        raise TransactError("the per-layer width search scores the whole model's calibration loss; it is not "
                            "available layer by layer (layerwise or sequential)")
    if recipe.budget is not None:
        raise TransactError("a budget tries each candidate on the whole model's calibration loss; it is not "
                            "available layer by layer (layerwise or sequential)")
    targets = targets or resolve_targets(recipe, shape_of(model))
    check_step(model.config, recipe, targets)
    windows = calibration_windows(tokenizer, recipe, texts)
    calibration_hash = windows_hash(windows) if windows is not None else None
    run = LayerwiseRun(recipe, targets, windows, calibration_hash, sequential)
    state = prune_layers(ModelLayers(model), InPlace(), run, progress=progress)
    plan = state.plan(model.config, targets, layerwise_recipe(recipe, sequential, note), calibration_hash)
    get_adapter(model).apply_changes(model.config, state.config_changes)
    return plan


def layerwise_recipe(recipe: PruneRecipe, sequential: bool, note: dict | None = None) -> dict[str, Any]:
    """What a layer-wise plan records of how it was made: the recipe, and that it went layer by layer."""
    return {**(note or {}), **recipe.to_json(), "layerwise": True, "sequential": sequential}



def prune_model(model: nn.Module, tokenizer, recipe: PruneRecipe, *, layerwise: bool = False,
                sequential: bool = False, targets: Targets | None = None, texts: list[str] | None = None,
                note: dict | None = None, progress: bool = True) -> PrunePlan:
    """The pruning step on a model in memory, in place: the whole model at once, or one layer at a time
    (``layerwise``; ``sequential``: each layer calibrated on the pruned layers' outputs). -> the plan."""
    if layerwise or sequential:
        return prune_by_layer(model, tokenizer, recipe, sequential=sequential, targets=targets, texts=texts, note=note,
                              progress=progress)
    return prune_step(model, tokenizer, recipe, targets=targets, texts=texts, note=note, progress=progress)
