"""A budget: the mix of depth and width that keeps a given share of a model's parameters, of its forward
FLOPs per token, or of its KV cache, chosen on the model's own calibration loss.

The candidates (``budget_candidates``, pure arithmetic on the model's shape) span the mix from width alone to
depth alone. Depth alone drops the fewest layers whose removal meets the budget (at most half of them); the
other depths lie evenly between none and that count (``Budget.depths`` in all). At each depth short of
depth alone, the layers that stay lose width until the budget is met, two ways:

- ``mlp``: MLP channels only, every head kept (not a candidate of a KV-cache budget, which MLP width does
  not change);
- ``both``: query heads (whole KV groups, the group size kept) and MLP channels, the pair of head count and
  MLP width whose kept shares of the heads and of the channels are closest (under a KV-cache budget the MLP
  stays whole and the most groups that fit stay).

Where the family can hold layers without attention (``transact.core.sub_block_drop``), a FLOPs or KV budget
also has an ``attention`` candidate: the attention of the fewest layers (at most half, as for depth) that
meets it dropped, every width kept, in 3 rounds where a third or more go ("Dropping attention" in
docs/results.md). Not under a parameter budget: an attention is a quarter of a SmolLM2 layer's parameters
and an eighth of a Qwen2.5 one's (4-8 attentions per layer depth drops).

Each candidate is pruned as a recipe with those widths (and ``DepthOptions`` for its drop) would prune it,
and scored by its loss on ``score_samples`` windows of the calibration text that follow the calibration
windows, so that no fit (refit, depth map) saw them and a candidate that fits more gains nothing from
having seen them; the lowest wins (``transact.core.step.budget_step``). Against the loss on the fitted
windows, neither choice was closer to the held-out best everywhere (docs/results.md, "Parameter budget").

With a per-layer width search (``--allocate search``), the winner's MLP channels are then spread over its
layers in the search's steps (``transact.core.allocate``): the most channels, at most the winner's, that the
step allows. An MLP channel costs the same in every layer, so the spread model keeps the winner's share, less
what that rounding leaves (under one step of channels in all).

What a budget counts (``Measure``), per layer and outside the layers:

- ``params``: the whole model's parameters (embeddings included), estimated from the projections' shapes:
  norms and biases are counted with the embeddings, so the pruned model's count differs from the estimate by
  those of the dropped layers and removed heads (well under 1 % for the families here; the plan records
  both);
- ``flops``: forward FLOPs per token attending to ``context`` tokens (``transact.measure.costs.
  flops_per_token``: the projections, the attention scores and weighted sums, and the LM head, which no
  candidate changes; the input embedding is a lookup and costs none). A sliding-window layer attends to
  at most its window, so layers differ; a candidate that drops layers is counted as if the cheapest went,
  and so meets its budget whichever layers its drop removes;
- ``kv``: the KV cache holding ``context`` tokens (keys and values of every layer: KV heads x head_dim per
  token). A sliding-window layer's cache stops at its window, so at long contexts the full-attention layers
  hold most of it; as for FLOPs, a candidate that drops layers is counted as if the cheapest went.
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
from transact.measure.costs import (
    attention_flops,
    attention_parameters,
    kv_values_per_layer,
    layer_parameters,
    lm_head_flops,
    mlp_parameters,
)

BUDGET_KINDS = ("params", "flops", "kv")
BUDGET_NOUNS = {"params": "parameters", "flops": "forward FLOPs per token", "kv": "KV cache"}
CONTEXT_KINDS = ("flops", "kv")  # the budgets whose count grows with the context


@dataclass(frozen=True)
class Measure:
    """What a budget of ``kind`` counts in a model (see the module docstring); ``context``: the tokens each
    token attends to, for FLOPs, and the tokens the KV cache holds."""

    kind: str
    context: int = 2048

    def attention(self, shape: ModelShape, layer: int) -> int:
        """Layer ``layer``'s attention at ``shape``'s heads and KV heads (layers differ in FLOPs and KV cache,
        where a sliding-window layer attends to, and caches, at most its window)."""
        if not shape.has_attention(layer):  # its attention was dropped
            return 0
        if self.kind == "kv":
            return kv_values_per_layer(shape) * shape.attended(layer, self.context)
        if self.kind == "params":
            return attention_parameters(shape)
        return attention_flops(shape, shape.attended(layer, self.context))

    def attentions_cheapest_first(self, shape: ModelShape) -> list[int]:
        """Every layer's attention (``attention``), the cheapest first: what a drop is counted to remove."""
        return sorted(self.attention(shape, i) for i in range(shape.num_layers))

    def kept_attention(self, shape: ModelShape, drop: int) -> float:
        """The mean attention of the layers left after dropping ``drop``, counted at the worst: as if the
        cheapest went (which layers go is chosen later, on calibration statistics), so that a candidate
        meets its budget whichever layers its drop removes."""
        kept = self.attentions_cheapest_first(shape)[drop:]
        return sum(kept) / len(kept)

    def mlp_channel(self, shape: ModelShape) -> int:
        """One MLP channel of one layer (its gate, up and down weights); nothing in a KV-cache budget."""
        per_channel = mlp_parameters(replace(shape, intermediate_size=1))
        return {"params": per_channel, "flops": 2 * per_channel, "kv": 0}[self.kind]

    def outside(self, shape: ModelShape, total: int) -> int:
        """What no candidate changes, of a model of ``shape`` and ``total`` parameters: for parameters its
        embeddings, norms and biases; for FLOPs its LM head; nothing of its KV cache."""
        if self.kind == "params":
            return total - shape.num_layers * layer_parameters(shape)
        return lm_head_flops(shape) if self.kind == "flops" else 0

    def of_model(self, shape: ModelShape, total: int) -> int:
        """The whole model's count (``total``: its parameters)."""
        return estimated(self, shape, total, 0, shape.num_heads, shape.num_kv_heads, shape.intermediate_size)


@dataclass(frozen=True)
class Budget:
    """Keep a share of the model's parameters (``params``), of its forward FLOPs per token at ``context``
    tokens (``flops``) or of its KV cache holding ``context`` tokens (``kv``): exactly one is given. The
    candidates span ``depths`` depths (see the module docstring); ``depth`` says how a candidate's layers are
    dropped (its layer count is the candidate's)."""

    params: float | None = None
    depths: int = 3
    score_samples: int = 8  # windows after the calibration's, each candidate's loss scored on
    depth: DepthOptions = field(default_factory=lambda: DepthOptions(1))
    flops: float | None = None
    kv: float | None = None
    context: int = 2048  # tokens each token attends to, for a FLOPs or KV-cache budget

    def __post_init__(self) -> None:
        given = [kind for kind in BUDGET_KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            raise TransactError(f"a budget keeps a share of one measure: give one of {', '.join(BUDGET_KINDS)}"
                                + (f", not {' and '.join(given)}" if given else ""))
        share = self.share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < share < 1.0:
            raise TransactError(f"a budget keeps a share in (0, 1) of the {BUDGET_NOUNS[self.kind]}, got {share!r}")
        for name in ("depths", "score_samples", "context"):
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
        if self.depth.part != "layers":
            raise TransactError("budget.depth.part: a budget's candidates drop whole layers; dropping attention "
                                "or MLP sub-blocks is a prune of its own (--drop-attention, --drop-mlp)")

    @property
    def kind(self) -> str:
        return next(kind for kind in BUDGET_KINDS if getattr(self, kind) is not None)

    @property
    def share(self) -> float:
        return getattr(self, self.kind)

    @property
    def measure(self) -> Measure:
        return Measure(self.kind, self.context)

    def describe(self) -> str:
        """'flops=0.6 (forward FLOPs per token at 2048 tokens of context)'."""
        at = f" at {self.context} tokens of context" if self.kind in CONTEXT_KINDS else ""
        return f"{self.kind}={self.share} ({BUDGET_NOUNS[self.kind]}{at})"

    def to_json(self) -> dict[str, Any]:
        depth = asdict(self.depth)
        depth.pop("layers")  # each candidate's own
        out = {self.kind: self.share, "depths": self.depths, "score_samples": self.score_samples, "depth": depth}
        return out | ({"context": self.context} if self.kind in CONTEXT_KINDS else {})

    @staticmethod
    def parse(text: str) -> tuple[str, float]:
        """'params=0.6' -> ('params', 0.6): keep 60 % of the parameters."""
        kind, sep, value = text.partition("=")
        if not sep or kind.strip() not in BUDGET_KINDS:
            raise TransactError(f"budget {text!r}: give {' or '.join(k + '=FRACTION' for k in BUDGET_KINDS)}, "
                                "e.g. params=0.6 (keep 60 % of the model's parameters), flops=0.6 (of its forward "
                                "FLOPs per token) or kv=0.5 (of its KV cache)")
        try:
            share = float(value)
        except ValueError:
            raise TransactError(f"budget {text!r}: {value!r} is not a number") from None
        Budget(**{kind.strip(): share})  # the share checked here, as the flag is read
        return kind.strip(), share


ParamBudget = Budget  # the name from before budgets counted FLOPs and the KV cache


@dataclass(frozen=True)
class Candidate:
    """One mix: ``drop`` layers removed, then every remaining layer at heads/kv_heads/mlp; ``params`` is the
    estimated parameter count of the result, ``share`` the estimated share it keeps of what the budget
    counts (None in records written before budgets counted more than parameters)."""

    mix: str
    drop: int
    heads: int
    kv_heads: int
    mlp: int
    params: int
    share: float | None = None

    @property
    def part(self) -> str:
        """What its drop removes: whole layers, or (the ``attention`` mix) the attention of that many layers."""
        return "attention" if self.mix == "attention" else "layers"

    def describe(self) -> str:
        if self.part == "attention":
            return f"drop {self.drop} attentions"
        width = f"{self.heads}/{self.kv_heads}/{self.mlp}"
        return f"drop {self.drop} + {width}" if self.drop else width

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Candidate:
        """A candidate from its record in ``plan.budget`` (which adds its loss beside its fields)."""
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})


def with_widths(shape: ModelShape, heads: int, kv_heads: int, mlp: int) -> ModelShape:
    return replace(shape, num_heads=heads, num_kv_heads=kv_heads, intermediate_size=mlp)


def estimated_parameters(shape: ModelShape, total: int, drop: int, heads: int, kv_heads: int, mlp: int) -> int:
    """The parameter count of a model of ``total`` parameters and ``shape`` after dropping ``drop`` layers and
    pruning the rest to heads/kv_heads/mlp (projections only change; see the module docstring)."""
    return estimated(Measure("params"), shape, total, drop, heads, kv_heads, mlp)


def estimated(measure: Measure, shape: ModelShape, total: int, drop: int, heads: int, kv_heads: int, mlp: int) -> int:
    """What ``measure`` counts in a model of ``total`` parameters and ``shape`` after dropping ``drop`` layers
    and pruning the rest to heads/kv_heads/mlp; where layers differ (sliding windows, in FLOPs), as if the
    cheapest were dropped (``Measure.kept_attention``)."""
    pruned = with_widths(shape, heads, kv_heads, mlp)
    per_layer = measure.kept_attention(pruned, drop) + measure.mlp_channel(shape) * mlp
    return round(measure.outside(shape, total) + (shape.num_layers - drop) * per_layer)


def check_budget_shape(shape: ModelShape) -> None:
    """Refuse the models whose layers the candidates cannot count as alike (no compute)."""
    if shape.is_moe:
        raise TransactError("a budget is searched for dense models only, not for a mixture of experts; "
                            "give --experts / --mlp / --drop-layers")
    if shape.attention_layers is not None:
        raise TransactError("a budget is searched for models whose layers are alike, not for a hybrid "
                            f"{shape.model_type!r} model; give --heads / --mlp / --drop-layers")


@dataclass(frozen=True)
class _Counter:
    """Counts candidates of one model under one budget."""

    shape: ModelShape
    total: int
    measure: Measure

    @property
    def whole(self) -> int:
        return self.measure.of_model(self.shape, self.total)

    def candidate(self, mix: str, drop: int, heads: int, kv_heads: int, mlp: int) -> Candidate:
        share = estimated(self.measure, self.shape, self.total, drop, heads, kv_heads, mlp) / self.whole
        return Candidate(mix, drop, heads, kv_heads, mlp,
                         estimated_parameters(self.shape, self.total, drop, heads, kv_heads, mlp), round(share, 6))


def budget_candidates(shape: ModelShape, total: int, budget: Budget, multiple_of: int = 1, *,
                      attention_drops: int = 0) -> list[Candidate]:
    """The candidates meeting ``budget`` for a model of ``shape`` and ``total`` parameters, widths rounded
    down to multiples of ``multiple_of``, and under a FLOPs or KV-cache budget the ``attention`` candidate
    where ``attention_drops`` attentions can go (0: none) and their removal meets the budget; refused, naming
    the least reachable share, when none does."""
    check_budget_shape(shape)
    count = _Counter(shape, total, budget.measure)
    target, outside = budget.share * count.whole, budget.measure.outside(shape, total)
    full = (shape.num_heads, shape.num_kv_heads, shape.intermediate_size)
    most = shape.num_layers // 2
    alone = next((d for d in range(1, most + 1)
                  if estimated(budget.measure, shape, total, d, *full) <= target), None)
    deepest = alone if alone is not None else most
    steps = max(1, budget.depths - 1)
    depths = sorted({round(k * deepest / steps) for k in range(steps + 1)} if budget.depths > 1 else {0})
    candidates = []
    for drop in depths:
        if drop == alone:
            candidates.append(count.candidate("depth", drop, *full))
            continue
        per_layer = (target - outside) / (shape.num_layers - drop)
        candidates += width_candidates(count, drop, per_layer, multiple_of)
    if budget.kind in CONTEXT_KINDS:  # where the attention's share grows with the context
        candidates += attention_candidate(count, target, attention_drops)
    if not candidates:
        raise TransactError(_unreachable(budget, count, most, multiple_of))
    return candidates


def attention_candidate(count: _Counter, target: float, attention_drops: int) -> list[Candidate]:
    """The attentions of the fewest layers, of the ``attention_drops`` that can go and at most half of them,
    whose removal brings what the budget counts to ``target``, every width kept (none where no such count
    does): counted as if the cheapest went, as a dropped layer is; the MLPs stay, so under a FLOPs budget
    only the attention's share of a layer goes (under a KV-cache budget, all of the layer's)."""
    shape, full = count.shape, (count.shape.num_heads, count.shape.num_kv_heads, count.shape.intermediate_size)
    cheapest = count.measure.attentions_cheapest_first(shape)
    most = min(attention_drops, shape.num_layers // 2)  # as for layers: more lost wherever measured
    needed = next((d for d in range(1, most + 1) if count.whole - sum(cheapest[:d]) <= target), None)
    if needed is None:
        return []
    share = (count.whole - sum(cheapest[:needed])) / count.whole
    return [Candidate("attention", needed, *full, params=count.total - needed * attention_parameters(shape),
                      share=round(share, 6))]


def _unreachable(budget: Budget, count: _Counter, most: int, multiple_of: int) -> str:
    """Why no candidate meets ``budget``: the least share reachable, and what no candidate changes."""
    shape = count.shape
    least = estimated(budget.measure, shape, count.total, most, *smallest_pair(shape, multiple_of), multiple_of)
    outside = budget.measure.outside(shape, count.total) / count.whole
    fixed = {"params": f" ({outside:.3f} are outside its layers' projections: embeddings, norms, biases)",
             "flops": f" ({outside:.3f} are its LM head's)", "kv": ""}[budget.kind]
    return (f"budget {budget.describe()}: the least this model reaches by dropping up to {most} layers and "
            f"pruning the rest to one KV group and {multiple_of} MLP channel(s) is {least / count.whole:.3f} of its "
            f"{BUDGET_NOUNS[budget.kind]}{fixed}")


def width_candidates(count: _Counter, drop: int, per_layer: float, multiple_of: int) -> list[Candidate]:
    """The ``mlp`` and ``both`` candidates at a depth whose layers may each hold ``per_layer`` of what the
    budget counts; heads x head_dim and MLP widths multiples of ``multiple_of``."""
    shape, measure, out = count.shape, count.measure, []
    per_channel = measure.mlp_channel(shape)
    if per_channel:  # MLP width changes what the budget counts
        mlp = _mlp_fitting(shape, per_layer - measure.kept_attention(shape, drop), per_channel, multiple_of)
        if mlp is not None:
            out.append(count.candidate("mlp", drop, shape.num_heads, shape.num_kv_heads, mlp))
    pairs = []
    for heads, kv in _group_pairs(shape, multiple_of):
        room = per_layer - measure.kept_attention(with_widths(shape, heads, kv, 1), drop)
        fitted = _mlp_fitting(shape, room, per_channel, multiple_of, pruned=False)
        if fitted is not None:
            pairs.append((abs(heads / shape.num_heads - fitted / shape.intermediate_size), -heads, heads, kv, fitted))
    if pairs:
        _, _, heads, kv, fitted = min(pairs)
        out.append(count.candidate("both", drop, heads, kv, fitted))
    return out


def _mlp_fitting(shape: ModelShape, room: float, per_channel: int, multiple_of: int, *,
                 pruned: bool = True) -> int | None:
    """The widest MLP (a multiple of ``multiple_of``; below the model's where ``pruned``, else up to it) whose
    channels, ``per_channel`` each, fit in ``room``; None where no channel fits (with ``per_channel`` 0, the
    whole MLP fits any room that is not negative)."""
    if room < 0:
        return None
    step = math.lcm(multiple_of, shape.mlp_multiple)
    fits = int(room // per_channel) if per_channel else shape.intermediate_size
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


# the attention candidate is chosen in this many rounds where a third or more of the attentions go
ATTENTION_ROUNDS = 3


def candidate_depth(budget: Budget, candidate: Candidate, shape: ModelShape) -> DepthOptions | None:
    """How the candidate drops its layers, or its attentions, from a model of ``shape`` (None: it drops
    none)."""
    if not candidate.drop:
        return None
    if candidate.part == "attention":
        rounds = ATTENTION_ROUNDS if 3 * candidate.drop >= shape.num_attention_layers - 1 else 1
        return DepthOptions(candidate.drop, loss_samples=budget.depth.loss_samples, part="attention", rounds=rounds)
    return replace(budget.depth, layers=candidate.drop)
