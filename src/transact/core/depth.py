"""Depth pruning: remove a contiguous block of decoder layers, chosen on calibration text, and fold a
least-squares map into the layer before the block so that its output stands in for the block's.

The block of ``n`` layers starting at ``s`` is chosen by one of two scores (``BLOCK_SCORES``):

- ``loss`` (the default): the calibration loss of the model with the block skipped, one forward pass over the
  first ``loss_samples`` calibration windows per candidate.
- ``angular``: the mean angular distance, arccos(cos(h_s, h_{s+n})) / pi over calibration tokens, between the
  hidden states entering layer ``s`` and leaving layer ``s+n-1`` (Gromov et al., "The unreasonable
  ineffectiveness of the deeper layers"): a block that barely turns the residual stream does little. One
  pass, but on Gemma-3-270M it chose the last layers, whose removal costs most.

The compensation (ReplaceMe's idea, with the refit's machinery): with R the residual stream in layer s-1 after
its attention, m its MLP output and r the factor the MLP output joins the stream with, layer s-1 leaves
h_s = R + r m and the block leaves Y. Replacing m by m A with A = argmin ||R + r m A - Y||^2 (damped) makes
layer s-1 approximate the block's output; A is folded into s-1's ``down_proj`` (W <- A^T W, in a mixture of
experts into every expert's and the shared expert's down projection), so the checkpoint stays vanilla. Where
a norm stands between the MLP and the stream (Gemma's post-feedforward norm), only a per-channel map folds,
into that norm's gain. Where the block starts at layer 0 there is nothing to fold into and the block is
removed alone. The map is kept only if it lowers the calibration loss.

``DepthOptions.part`` "attention" ("mlp") drops the attention (MLP) sub-blocks of any layers instead, keeping the
other sub-block (``transact.core.sub_block_drop``: scored by the loss alone, no map).

Removing layers cuts every per-layer list of the config (``layer_types``, NoPE layers, ...) the same way and
renumbers the layers' cache indices, so a dropped layer whose output projections were zero leaves the logits
exactly as they were.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from transact.arch import ModelShape, get_adapter, shape_of
from transact.arch.parts import ExpertParts
from transact.core.depth_calibrate import (
    angular_scores,
    calibration_loss,
    gain_statistics,
    loss_scores,
    map_statistics,
    skipping,
)
from transact.core.sub_block_drop import NO_MAP, candidates, choose_sub_blocks, count_to_drop, skip_sub_blocks_
from transact.errors import TransactError

BLOCK_SCORES = ("loss", "angular")
# what a depth step drops: whole layers (one contiguous block), or the attention or MLP sub-blocks of any
# layers (``transact.core.sub_block_drop``), which only the loss score chooses
PARTS = ("layers", "attention", "mlp")


@dataclass(frozen=True)
class DepthPlan:
    """What depth pruning did: the model it started from (``source``), the layers it dropped (one contiguous
    block), how the block was chosen (``score`` and each candidate start's value in ``scores``), and the
    map (``compensation``: its ``kind``, ``least_squares`` or ``per_channel``, the layer it was folded into,
    its damping and the calibration loss without and with it; ``applied`` False where it was measured worse,
    or where ``reason`` says why there was none). ``part`` "attention" or "mlp": ``dropped`` lists the layers
    whose attention (MLP) went (any layers; no map), and ``scores`` is each candidate layer's loss."""

    source: ModelShape
    dropped: list[int]
    score: str
    scores: list[float]
    compensation: dict[str, Any] = field(default_factory=dict)
    part: str = "layers"
    # sub-blocks chosen in rounds: each round's scores and choice (``sub_block_drop.choose_sub_blocks``)
    rounds: list[dict] = field(default_factory=list)

    @property
    def map_applied(self) -> bool:
        return bool(self.compensation.get("applied"))

    @property
    def start(self) -> int:
        return self.dropped[0]

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source.to_json(), **{k: v for k, v in asdict(self).items() if k != "source"}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DepthPlan:
        return cls(source=ModelShape(**data["source"]), dropped=list(data["dropped"]), score=data["score"],
                   scores=list(data["scores"]), compensation=dict(data.get("compensation") or {}),
                   part=data.get("part", "layers"), rounds=list(data.get("rounds") or []))


def layers_to_drop(value: int | float, num_layers: int) -> int:
    """A count of layers (int >= 1) or a fraction of them in (0, 1) -> the count, leaving at least one."""
    count = max(1, round(value * num_layers)) if isinstance(value, float) else int(value)
    if count >= num_layers:
        raise TransactError(f"cannot drop {count} of the model's {num_layers} layers: at least one must stay")
    return count


# ---------------------------------------------------------------- the math


def least_squares_map(gram: torch.Tensor, cross: torch.Tensor, damp: float) -> torch.Tensor:
    """A = argmin ||M A - T||^2 + lambda ||A||^2 from gram = M^T M (H, H) and cross = M^T T (H, H), with
    lambda = damp * mean(diag(gram)) (damping relative to the activations' scale). -> A (H, H), float64."""
    gram, cross = gram.double(), cross.double()
    ridge = damp * gram.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype, device=gram.device), cross)


def per_channel_map(numerator: torch.Tensor, denominator: torch.Tensor, damp: float) -> torch.Tensor:
    """d = argmin ||c * d - t||^2 per channel (+ ridge) from numerator = sum(c * t) and denominator = sum(c^2)
    over tokens, each (H,), with the ridge damp * mean(denominator). -> d (H,), float64."""
    denominator = denominator.double()
    return numerator.double() / (denominator + damp * denominator.mean().clamp_min(1e-12))


def folded_down(mlp, amap: torch.Tensor) -> list[torch.Tensor]:
    """The values of ``down_tensors(mlp)`` that make the MLP's output m become m @ amap: W <- amap^T W for
    ``down_proj`` (H, P), its bias b <- b @ amap; in a mixture of experts every expert's down projection
    (E, H, I) and the shared expert's. Pure: the weights are not changed."""
    amap = amap.double()
    if isinstance(mlp, ExpertParts):
        down = mlp.down
        folded = torch.einsum("hk,ehi->eki", amap.to(down.device), down.detach().double()).to(down.dtype)
        return [folded, *(folded_down(mlp.shared, amap) if mlp.shared is not None else [])]
    weight, bias = mlp.down.weight.detach(), mlp.down.bias
    values = [(amap.to(weight.device).T @ weight.double()).to(weight.dtype)]
    if bias is not None:
        values.append((bias.detach().double() @ amap.to(bias.device)).to(bias.dtype))
    return values


def down_tensors(mlp) -> list[torch.Tensor]:
    """The tensors a map folds into: each down projection's weight (and bias), as ``folded_down`` lists them."""
    if isinstance(mlp, ExpertParts):
        return [mlp.down, *(down_tensors(mlp.shared) if mlp.shared is not None else [])]
    return [t for t in (mlp.down.weight, mlp.down.bias) if t is not None]


def fold_map_into_down_(mlp, amap: torch.Tensor) -> None:
    """Make the MLP's output m become m @ amap (``folded_down``), in place."""
    with torch.no_grad():
        for tensor, value in zip(down_tensors(mlp), folded_down(mlp, amap), strict=True):
            tensor.copy_(value)


# ---------------------------------------------------------------- removing layers


def remove_layers_(model: nn.Module, dropped: list[int]) -> None:
    """Remove decoder layers ``dropped`` from ``model`` in place: the layer list, the config's layer count and
    per-layer lists (``FamilyAdapter.keep_layers``), and each remaining layer's cache index (``layer_idx``)."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    count = len(layers)
    if not dropped or len(set(dropped)) != len(dropped) or min(dropped) < 0 or max(dropped) >= count:
        raise TransactError(f"layers to drop {dropped} must be distinct indices in [0, {count})")
    keep = [i for i in range(count) if i not in dropped]
    if not keep:
        raise TransactError("cannot drop every layer")
    adapter.keep_layers(model.config, keep)
    parent, _, name = adapter.layers_path.rpartition(".")
    setattr(model.get_submodule(parent), name, nn.ModuleList([layers[i] for i in keep]))
    for index, layer in enumerate(adapter.layers(model)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index


# ---------------------------------------------------------------- the step


@dataclass(frozen=True)
class DepthOptions:
    """How many layers to drop (a count, or a fraction of the layers), how to choose the block
    (``BLOCK_SCORES``; the loss score on the first ``loss_samples`` calibration windows), whether to fold the
    map, and its relative damping."""

    layers: int | float
    # the calibration loss chose as well as or better than the angular distance on the three real models, and
    # far better on Gemma-3-270M, where the angular distance picked the last four layers (docs/results.md,
    # "Depth pruning")
    score: str = "loss"
    compensate: bool = True
    damp: float = 1e-2
    # the loss score runs each candidate on the first this many calibration windows (measured with 8 x 256
    # tokens on SmolLM2 and 4 x 256 on the other two: enough to find the blocks above)
    loss_samples: int = 8
    # "attention" ("mlp"): drop the attention (MLP) of ``layers`` layers (a count or a fraction of those that
    # can lose it)
    part: str = "layers"
    # with part "attention" or "mlp": score and choose in this many rounds, each seeing the earlier rounds' drops
    rounds: int = 1

    def __post_init__(self) -> None:
        v = self.layers
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 or (isinstance(v, float) and v >= 1):
            raise TransactError(f"layers to drop must be a count >= 1 or a fraction in (0, 1), got {v!r}")
        if self.score not in BLOCK_SCORES:
            raise TransactError(f"block score {self.score!r} is not one of {', '.join(BLOCK_SCORES)}")
        if self.part not in PARTS:
            raise TransactError(f"the part to drop {self.part!r} is not one of {', '.join(PARTS)}")
        if self.part != "layers" and self.score != "loss":
            raise TransactError(f"{self.part} sub-blocks are chosen by the calibration loss only (score: loss)")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise TransactError(f"rounds must be a positive count, got {self.rounds!r}")
        if self.rounds > 1 and self.part == "layers":
            raise TransactError("rounds choose sub-blocks (part: attention or mlp); a block of layers is chosen "
                                "at once")
        if not isinstance(self.compensate, bool):
            raise TransactError(f"compensate must be true or false, got {self.compensate!r}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not self.damp > 0:
            raise TransactError(f"the map's damping must be a positive number, got {self.damp!r}")
        if isinstance(self.loss_samples, bool) or not isinstance(self.loss_samples, int) or self.loss_samples < 1:
            raise TransactError(f"loss_samples must be a positive count of windows, got {self.loss_samples!r}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def compensation_refusal(model: nn.Module, start: int) -> str | None:
    """Why no map can stand in for a block starting at ``start`` (None: one can)."""
    adapter = get_adapter(model)
    if start == 0:
        return "the block starts at layer 0, so no layer before it can carry the map"
    if adapter.mlp_residual(adapter.text_config(model.config)) is None and adapter.mlp_output_norm is None:
        return (f"in a {adapter.model_type!r} layer a norm stands between the MLP output and the residual stream, "
                "so no linear map folds into down_proj")
    return None


def block_scores(model: nn.Module, windows: torch.Tensor, block: int, options: DepthOptions, *,
                 batch_size: int = 4, progress: bool = True) -> torch.Tensor:
    """Each candidate start's score (lower: the block matters less). -> (num_layers - block + 1,)."""
    if options.score == "angular":
        return angular_scores(model, windows, block, batch_size=batch_size, progress=progress)
    return loss_scores(model, windows[: options.loss_samples], block, batch_size=batch_size, progress=progress)


def drop_layers_(model: nn.Module, windows: torch.Tensor | None, options: DepthOptions, *,
                 recorded: DepthPlan | None = None, batch_size: int = 4, progress: bool = True) -> DepthPlan:
    """Choose a block, fold the least-squares map into the layer before it where one can be and it lowers
    the calibration loss, and remove the block; in place. windows: (n, seq) calibration tokens. With
    ``recorded`` (a plan's record, on the same model and windows) its block is removed and its map folded
    as it was, without scoring again. -> what was done."""
    if recorded is not None:
        return _redo_(model, windows, recorded, batch_size, progress)
    if windows is None:
        raise TransactError("depth pruning chooses its block on calibration text; none was given")
    if options.part != "layers":
        return drop_sub_blocks_(model, windows, options, batch_size=batch_size, progress=progress)
    block = layers_to_drop(options.layers, shape_of(model).num_layers)
    values = block_scores(model, windows, block, options, batch_size=batch_size, progress=progress)
    plan = drop_block_(model, windows, int(torch.argmin(values)), options, batch_size=batch_size, progress=progress)
    return DepthPlan(source=plan.source, dropped=plan.dropped, score=options.score,
                     scores=[round(float(v), 6) for v in values], compensation=plan.compensation)


def drop_block_(model: nn.Module, windows: torch.Tensor, start: int, options: DepthOptions, *, batch_size: int = 4,
                progress: bool = True) -> DepthPlan:
    """Remove the block of ``options.layers`` layers from ``start`` (no scores), with the map where it lowers
    the calibration loss and ``options.compensate`` asks for it; in place."""
    source = shape_of(model)
    dropped = list(range(start, start + layers_to_drop(options.layers, source.num_layers)))
    if dropped[-1] >= source.num_layers:
        raise TransactError(f"a block of {len(dropped)} layers from layer {start} overruns the model's "
                            f"{source.num_layers} layers")
    compensation = _compensate_(model, windows, dropped, options.damp, batch_size, progress) \
        if options.compensate else {"applied": False, "reason": "not asked for"}
    remove_layers_(model, dropped)
    return DepthPlan(source=source, dropped=dropped, score="given", scores=[], compensation=compensation)


def drop_sub_blocks_(model: nn.Module, windows: torch.Tensor, options: DepthOptions, *, batch_size: int = 4,
                     progress: bool = True) -> DepthPlan:
    """Drop the ``options.part`` (attention or MLP) of the ``options.layers`` candidate layers whose loss score
    is lowest, in place (``transact.core.sub_block_drop``). windows: (n, seq) calibration tokens."""
    source, part = shape_of(model), options.part
    layers = candidates(model, part)
    count = count_to_drop(options.layers, len(layers), part)
    dropped, rounds = choose_sub_blocks(model, windows[: options.loss_samples], layers, count, options.rounds,
                                        part, batch_size=batch_size, progress=progress)
    skip_sub_blocks_(model, dropped, part)
    return DepthPlan(source=source, dropped=dropped, score="loss", scores=list(rounds[0]["scores"].values()),
                     compensation={"applied": False, "reason": NO_MAP}, part=part,
                     rounds=rounds if len(rounds) > 1 else [])


def _redo_(model: nn.Module, windows: torch.Tensor | None, recorded: DepthPlan, batch_size: int,
           progress: bool) -> DepthPlan:
    if recorded.source != shape_of(model):
        raise TransactError(f"this plan drops layers of {recorded.source}, but the model is {shape_of(model)}")
    if recorded.part != "layers":
        skip_sub_blocks_(model, recorded.dropped, recorded.part)
        return recorded
    if recorded.map_applied:
        if windows is None:
            raise TransactError("this plan folded a least-squares map fitted on calibration text into layer "
                                f"{recorded.start - 1}; recreating it needs that text")
        fold = fit_map(model, windows, recorded.dropped, recorded.compensation["damp"], batch_size, progress)
        fold.apply()
    remove_layers_(model, recorded.dropped)
    return recorded


@dataclass
class FittedMap:
    """A fitted map, ready to fold into the weights of the layer before the block (``apply``) and to take
    back out (``undo``: the weights as they were)."""

    kind: str
    tensors: list[torch.Tensor]
    values: list[torch.Tensor]
    _saved: list[torch.Tensor] = field(default_factory=list, repr=False)

    def apply(self) -> None:
        self._saved = [t.detach().clone() for t in self.tensors]
        with torch.no_grad():
            for tensor, value in zip(self.tensors, self.values, strict=True):
                tensor.copy_(value)

    def undo(self) -> None:
        with torch.no_grad():
            for tensor, value in zip(self.tensors, self._saved, strict=True):
                tensor.copy_(value)


def fit_map(model: nn.Module, windows: torch.Tensor, dropped: list[int], damp: float, batch_size: int,
            progress: bool) -> FittedMap:
    """Fit the map that makes layer ``dropped[0] - 1`` stand in for the block: the full least-squares map
    folded into its down projections, or, where a norm follows the MLP, a per-channel one folded into that
    norm's gain."""
    adapter = get_adapter(model)
    start, block = dropped[0], len(dropped)
    layer = adapter.layers(model)[start - 1]
    scale = adapter.mlp_residual(adapter.text_config(model.config))
    if scale is None:
        norm_gain = adapter.mlp_output_norm
        norm = getattr(layer, norm_gain.name)
        numerator, denominator = gain_statistics(model, windows, start, block, norm_gain.name, batch_size=batch_size,
                                                 progress=progress)
        factor = per_channel_map(numerator, denominator, damp)
        gain = (norm_gain.offset + norm.weight.double()) * factor.to(norm.weight.device) - norm_gain.offset
        return FittedMap("per_channel", [norm.weight], [gain.to(norm.weight.dtype)])
    gram, cross = map_statistics(model, windows, start, block, scale, batch_size=batch_size, progress=progress)
    mlp = adapter.mlp(layer, model.config)
    return FittedMap("least_squares", down_tensors(mlp), folded_down(mlp, least_squares_map(gram, cross, damp)))


def _compensate_(model: nn.Module, windows: torch.Tensor, dropped: list[int], damp: float, batch_size: int,
                 progress: bool) -> dict[str, Any]:
    """Fold the map into the layer before the block if it lowers the calibration loss with the block skipped;
    -> the record."""
    refusal = compensation_refusal(model, dropped[0])
    if refusal:
        return {"applied": False, "reason": refusal}
    fold = fit_map(model, windows, dropped, damp, batch_size, progress)
    with skipping(model, dropped):
        without = calibration_loss(model, windows, batch_size=batch_size, progress=progress, desc="loss without map")
        fold.apply()
        with_map = calibration_loss(model, windows, batch_size=batch_size, progress=progress, desc="loss with map")
    applied = with_map < without
    if not applied:
        fold.undo()
    return {"applied": applied, "kind": fold.kind, "into_layer": dropped[0] - 1, "damp": damp,
            "calibration_loss": {"without": round(without, 6), "with": round(with_map, 6)}}
