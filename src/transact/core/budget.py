"""A parameter budget: the mix of depth and width that keeps a given share of a model's parameters, chosen
on the model's own calibration loss.

The candidates (``budget_candidates``, pure arithmetic on the model's shape) span the mix from width alone to
depth alone. Depth alone drops the fewest layers whose removal meets the budget (at most half of them); the
other depths lie evenly between none and that count (``ParamBudget.depths`` in all). At each depth short of
depth alone, the layers that stay lose width until the budget is met, two ways:

- ``mlp``: MLP channels only, every head kept;
- ``both``: query heads (whole KV groups, the group size kept) and MLP channels, the pair of head count and
  MLP width whose kept shares of the heads and of the channels are closest.

Each candidate is pruned as a recipe with those widths (and ``DepthOptions`` for its drop) would prune it,
and scored by its loss on ``score_samples`` windows of the calibration text that follow the calibration
windows, so that no fit (refit, depth map) saw them and a candidate that fits more gains nothing from
having seen them; the lowest wins (``transact.core.step.budget_step``). Against the loss on the fitted
windows, neither choice was closer to the held-out best everywhere (docs/results.md, "Parameter budget").

The parameters counted are the whole model's (embeddings included), estimated from the projections' shapes:
norms and biases are counted with the embeddings, so the pruned model's count differs from the estimate by
those of the dropped layers and removed heads (well under 1 % for the families here; the plan records
both).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from transact.arch import ModelShape
from transact.checks import fields_from
from transact.core.depth import DepthOptions
from transact.core.targets import head_pairs
from transact.errors import TransactError
from transact.measure.costs import attention_parameters, layer_parameters, mlp_parameters

BUDGET_KINDS = ("params",)


@dataclass(frozen=True)
class ParamBudget:
    """Keep ``params`` of the model's parameters; the candidates span ``depths`` depths (see the module
    docstring); ``depth`` says how a candidate's layers are dropped (its layer count is the candidate's)."""

    params: float
    depths: int = 3
    score_samples: int = 8  # windows after the calibration's, each candidate's loss scored on
    depth: DepthOptions = field(default_factory=lambda: DepthOptions(1))

    def __post_init__(self) -> None:
        share = self.params
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < share < 1.0:
            raise TransactError(f"a parameter budget keeps a share in (0, 1) of the parameters, got {share!r}")
        for name in ("depths", "score_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TransactError(f"budget {name} must be a positive count, got {value!r}")
        if isinstance(self.depth, dict):
            if "layers" in self.depth:
                raise TransactError("budget.depth.layers: each candidate sets the layers it drops; the budget's "
                                    "depth options say only how (score, compensate, damp, loss_samples)")
            object.__setattr__(self, "depth", DepthOptions(layers=1, **fields_from(DepthOptions, self.depth,
                                                                                   "budget.depth")))
        if not isinstance(self.depth, DepthOptions):
            raise TransactError(f"a budget's depth options must be a mapping, got {self.depth!r}")

    def to_json(self) -> dict[str, Any]:
        depth = asdict(self.depth)
        depth.pop("layers")  # each candidate's own
        return {**asdict(self), "depth": depth}

    @classmethod
    def parse(cls, text: str) -> ParamBudget:
        """'params=0.6' -> keep 60 % of the parameters."""
        kind, sep, value = text.partition("=")
        if not sep or kind.strip() not in BUDGET_KINDS:
            raise TransactError(f"budget {text!r}: give {' or '.join(k + '=FRACTION' for k in BUDGET_KINDS)}, "
                                "e.g. params=0.6 (keep 60 % of the model's parameters)")
        try:
            share = float(value)
        except ValueError:
            raise TransactError(f"budget {text!r}: {value!r} is not a number") from None
        return cls(params=share)


@dataclass(frozen=True)
class Candidate:
    """One mix: ``drop`` layers removed, then every remaining layer at heads/kv_heads/mlp; ``params`` is the
    estimated parameter count of the result."""

    mix: str
    drop: int
    heads: int
    kv_heads: int
    mlp: int
    params: int

    def describe(self) -> str:
        width = f"{self.heads}/{self.kv_heads}/{self.mlp}"
        return f"drop {self.drop} + {width}" if self.drop else width

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Candidate:
        """A candidate from its record in ``plan.budget`` (which adds its loss beside its fields)."""
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


def with_widths(shape: ModelShape, heads: int, kv_heads: int, mlp: int) -> ModelShape:
    return replace(shape, num_heads=heads, num_kv_heads=kv_heads, intermediate_size=mlp)


def estimated_parameters(shape: ModelShape, total: int, drop: int, heads: int, kv_heads: int, mlp: int) -> int:
    """The parameter count of a model of ``total`` parameters and ``shape`` after dropping ``drop`` layers and
    pruning the rest to heads/kv_heads/mlp (projections only change; see the module docstring)."""
    kept = layer_parameters(with_widths(shape, heads, kv_heads, mlp))
    return outside_layers(shape, total) + (shape.num_layers - drop) * kept


def outside_layers(shape: ModelShape, total: int) -> int:
    """The parameters of a model of ``total`` parameters outside its layers' projections (embeddings, norms,
    biases), which no candidate changes."""
    return total - shape.num_layers * layer_parameters(shape)


def check_budget_shape(shape: ModelShape) -> None:
    """Refuse the models whose layers the candidates cannot count as alike (no compute)."""
    if shape.is_moe:
        raise TransactError("a parameter budget is searched for dense models only, not for a mixture of experts; "
                            "give --experts / --mlp / --drop-layers")
    if shape.attention_layers is not None:
        raise TransactError("a parameter budget is searched for models whose layers are alike, not for a hybrid "
                            f"{shape.model_type!r} model; give --heads / --mlp / --drop-layers")


def budget_candidates(shape: ModelShape, total: int, budget: ParamBudget, multiple_of: int = 1) -> list[Candidate]:
    """The candidates meeting ``budget`` for a model of ``shape`` and ``total`` parameters, widths rounded
    down to multiples of ``multiple_of``; refused, naming the least reachable share, when none does."""
    check_budget_shape(shape)
    target, outside = budget.params * total, outside_layers(shape, total)
    most = shape.num_layers // 2
    alone = next((d for d in range(1, most + 1)
                  if estimated_parameters(shape, total, d, shape.num_heads, shape.num_kv_heads,
                                          shape.intermediate_size) <= target), None)
    deepest = alone if alone is not None else most
    steps = max(1, budget.depths - 1)
    depths = sorted({round(k * deepest / steps) for k in range(steps + 1)} if budget.depths > 1 else {0})
    candidates = []
    for drop in depths:
        if drop == alone:
            candidates.append(Candidate("depth", drop, shape.num_heads, shape.num_kv_heads, shape.intermediate_size,
                                        estimated_parameters(shape, total, drop, shape.num_heads,
                                                             shape.num_kv_heads, shape.intermediate_size)))
            continue
        per_layer = (target - outside) / (shape.num_layers - drop)
        candidates += width_candidates(shape, total, drop, per_layer, multiple_of)
    if not candidates:
        least = estimated_parameters(shape, total, most, *smallest_pair(shape, multiple_of), multiple_of)
        raise TransactError(f"budget params={budget.params}: the least this model reaches by dropping up to {most} "
                            f"layers and pruning the rest to one KV group and {multiple_of} MLP channel(s) is "
                            f"{least / total:.3f} of its parameters ({outside / total:.3f}"
                            " are outside its layers' projections: embeddings, norms, biases)")
    return candidates


def width_candidates(shape: ModelShape, total: int, drop: int, per_layer: float, multiple_of: int) -> list[Candidate]:
    """The ``mlp`` and ``both`` candidates at a depth whose layers may each hold ``per_layer`` parameters."""
    out = []
    mlp = _mlp_fitting(shape, per_layer - attention_parameters(shape), multiple_of)
    if mlp is not None:
        out.append(Candidate("mlp", drop, shape.num_heads, shape.num_kv_heads, mlp,
                             estimated_parameters(shape, total, drop, shape.num_heads, shape.num_kv_heads, mlp)))
    pairs = []
    for heads, kv in _group_pairs(shape, multiple_of):
        fitted = _mlp_fitting(shape, per_layer - attention_parameters(with_widths(shape, heads, kv, 1)),
                              multiple_of, pruned=False)
        if fitted is not None:
            pairs.append((abs(heads / shape.num_heads - fitted / shape.intermediate_size), -heads, heads, kv, fitted))
    if pairs:
        _, _, heads, kv, fitted = min(pairs)
        out.append(Candidate("both", drop, heads, kv, fitted,
                             estimated_parameters(shape, total, drop, heads, kv, fitted)))
    return out


def _mlp_fitting(shape: ModelShape, room: float, multiple_of: int, *, pruned: bool = True) -> int | None:
    """The widest MLP (a multiple of ``multiple_of``; below the model's where ``pruned``, else up to it) whose
    parameters fit in ``room``; None where no channel fits."""
    step = math.lcm(multiple_of, shape.mlp_multiple)
    per_channel = mlp_parameters(with_widths(shape, shape.num_heads, shape.num_kv_heads, 1))
    fits = int(room // per_channel)
    if not pruned and fits >= shape.intermediate_size:
        return shape.intermediate_size
    width = min(fits, shape.intermediate_size - 1) // step * step
    return width if width >= 1 else None


def _group_pairs(shape: ModelShape, multiple_of: int) -> list[tuple[int, int]]:
    """The pruned (heads, kv heads) pairs that keep the group size, with heads x head_dim a multiple of
    ``multiple_of``."""
    return [(h, k) for h, k in head_pairs(shape) if h == k * shape.group_size and h < shape.num_heads
            and (h * shape.head_dim) % multiple_of == 0]


def smallest_pair(shape: ModelShape, multiple_of: int) -> tuple[int, int]:
    pairs = _group_pairs(shape, multiple_of)
    return min(pairs) if pairs else (shape.num_heads, shape.num_kv_heads)


def candidate_depth(budget: ParamBudget, candidate: Candidate) -> DepthOptions | None:
    """How the candidate drops its layers (None: it drops none)."""
    return replace(budget.depth, layers=candidate.drop) if candidate.drop else None
