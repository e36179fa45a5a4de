"""Per-layer MLP widths under a budget, searched on the model's own calibration loss.

A uniform prune keeps the same number of MLP channels in every layer. Layers differ in what a channel is
worth, so a model of the same size may keep more channels where they matter and fewer where they do not.
Ranking layers by a layer-local proxy (the refit's residual error) allocated worse than uniform widths on
SmolLM2; what a layer's cut costs shows in the model's output, so this search scores each candidate
allocation by the calibration loss of the whole model (next-token cross-entropy), as EvoPress (Sieberling
et al., 2024) and DarwinLM do.

Candidates. Widths come in steps of ``step`` channels (256 by default: the multiple that K-quants and the
engines' per-layer FFN widths need). Each layer ranks its channels once by the metric's scores; at width w
it keeps its w best (``select_channels``, as a uniform prune does) and the refit recomputes its down_proj
columns from the Gram matrix calibration collected. So the uniform allocation is exactly the default
pipeline at that width, and the search starts from it. A trial writes the refitted kept columns into
down_proj and zeros into the removed ones: a removed channel then adds nothing, as if sliced, and switching
a layer's width is one copy. ``trial_widths`` restores every original weight on exit, also on error.

The budget. A mean width of ``mean`` channels over L layers gives the search the most channels, at most
``mean x L``, that the step can spread: a multiple of ``step`` (``spread_total``), so that no budget is lost
to rounding every layer down to a step. The search starts from the most even split of that total
(``even_split``: every layer within one step of the others; exactly the uniform allocation where the total
is ``L`` whole steps), and "uniform" below means that split.

Search (evolutionary, elitist; ``WidthSearch``). The total width is the budget and stays fixed. Each
generation makes ``offspring`` children of the current allocation, each moving one to ``max_swaps`` steps of
channels from one layer to another; scores them on ``first_samples`` calibration windows drawn for that
generation; scores the best ``survivors`` and the parent on ``final_samples`` other windows drawn for it;
the best of those is the next parent. At the end the result and the uniform allocation are scored on every
search window, and the uniform one is returned where it is not worse: the result never has a higher
calibration loss than uniform widths.

Candidates are scored on a bf16 copy of an fp32 model by default (``score_dtype``): 2.5x faster on a 2-core
CPU, and on SmolLM2, Qwen2.5-Coder-0.5B and Gemma-3-270M its searches beat uniform widths as the fp32
search does (docs/results.md); ``float32`` scores on the model itself, without the copy's memory.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from transact.arch import get_adapter
from transact.arch.parts import ExpertParts
from transact.core.correct.refit import refit_columns
from transact.core.depth_calibrate import calibration_loss
from transact.core.select import select_channels
from transact.core.surgery import keep_channels
from transact.errors import TransactError
from transact.options import check_options, option


@dataclass(frozen=True)
class WidthSearch:
    """The search's settings (see the module docstring)."""

    step: int = option(256, "MLP widths are multiples of this many channels", low=1)
    generations: int = option(40, "generations of the evolutionary search", low=0)
    offspring: int = option(8, "children of the parent allocation per generation", low=1)
    survivors: int = option(2, "children scored again on more windows per generation", low=1)
    first_samples: int = option(2, "calibration windows each child is scored on", low=1)
    final_samples: int = option(8, "calibration windows the survivors and the parent are scored on", low=1)
    max_swaps: int = option(3, "at most this many steps of channels move between layers per child", low=1)
    min_width: int | None = option(None, "no layer keeps fewer MLP channels (default: one step)", low=1)
    seed: int = option(0, "seed of the mutations and of the windows each generation draws")
    seconds: float | None = option(None, "stop after the generation that passes this many seconds", low=0.0)
    score_dtype: Literal["bfloat16", "float32"] = option(
        "bfloat16", "candidates are scored on a copy of the model in this dtype (none where the model already is)")

    def __post_init__(self) -> None:
        check_options(self)
        if self.survivors > self.offspring:
            raise TransactError(f"survivors ({self.survivors}) cannot exceed offspring ({self.offspring})")


class LayerVariants:
    """One layer's candidate widths: the channels a width keeps (``kept(w)``: (w,) long, ascending) and its
    down_proj columns refitted on them (``columns(w)``: (hidden, w)), computed the first time a width is
    asked for and kept: the search visits few widths per layer, and all of them for every layer of an 8B
    model would not fit in memory. Holds a copy of the layer's original down_proj weight (trials overwrite
    the model's)."""

    def __init__(self, down_weight: torch.Tensor, gram: torch.Tensor | None, scores: torch.Tensor,
                 widths: Sequence[int], damp: float | None) -> None:
        self.widths = list(widths)
        self._weight, self._gram, self._scores, self._damp = down_weight.detach().clone(), gram, scores, damp
        self._columns: dict[int, torch.Tensor] = {}

    def kept(self, width: int) -> torch.Tensor:
        return torch.tensor(select_channels(self._scores, width), dtype=torch.long)

    def columns(self, width: int) -> torch.Tensor:
        """The refitted columns (``damp`` None: the kept columns as they are). -> (hidden, width)."""
        if width not in self._columns:
            channels = self.kept(width)
            self._columns[width] = (self._weight[:, channels].clone() if self._damp is None
                                    else refit_columns(self._weight, self._gram, channels, self._damp))
        return self._columns[width]

    def check(self, layer: int, width: int) -> None:
        if width not in self.widths:
            raise TransactError(f"layer {layer} has no candidate width {width} (widths: {self.widths})")


@dataclass(frozen=True)
class SearchResult:
    """The allocation found, its calibration loss and the uniform allocation's on every search window, and
    the parent's loss after each generation (on that generation's final windows)."""

    widths: list[int]
    loss: float
    uniform_loss: float
    generations: int
    evaluations: int
    seconds: float
    history: list[float] = field(default_factory=list)

    def record(self) -> dict:
        """What plan.json keeps of the search."""
        return {"calibration_loss": {"uniform": round(self.uniform_loss, 6), "searched": round(self.loss, 6)},
                "generations": self.generations, "evaluations": self.evaluations,
                "seconds": round(self.seconds, 1)}


def width_levels(full: int, step: int, min_width: int | None = None) -> list[int]:
    """The widths a layer of ``full`` channels may keep: multiples of ``step`` from ``min_width`` (default one
    step) up to ``full``, which must be a multiple of ``step``."""
    if full % step:
        raise TransactError(f"the MLP width {full} is not a multiple of the search step {step}; choose a step "
                            "that divides it")
    low = min_width or step
    if low % step or low > full:
        raise TransactError(f"the smallest width {low} must be a multiple of the step {step} and at most {full}")
    return list(range(low, full + 1, step))


def mlp_variants(model: nn.Module, grams: Sequence[torch.Tensor] | None, mlp_scores: Sequence[torch.Tensor],
                 widths: Sequence[int], damp: float | None) -> list[LayerVariants]:
    """Every layer's candidate widths, from the calibration's MLP Gram matrices (None with ``damp`` None: no
    refit) and the metric's channel scores (one (P, P) and one (P,) per layer). A mixture of experts is
    refused."""
    parts = get_adapter(model).layer_parts(model)
    if any(isinstance(mlp, ExpertParts) for _, mlp in parts):
        raise TransactError("per-layer widths are searched for dense MLPs only, not for a mixture of experts")
    grams = grams if grams is not None else [None] * len(parts)
    return [LayerVariants(mlp.down.weight, gram, scores, widths, damp)
            for (_, mlp), gram, scores in zip(parts, grams, mlp_scores, strict=True)]


class WidthTrial:
    """Sets each layer's MLP width on the model in place (see ``trial_widths``)."""

    def __init__(self, downs: list[nn.Linear], variants: list[LayerVariants]) -> None:
        self._downs, self._variants = downs, variants
        self._current: list[int | None] = [None] * len(downs)

    @torch.no_grad()
    def set_(self, widths: Sequence[int]) -> None:
        if len(widths) != len(self._downs):
            raise TransactError(f"{len(widths)} widths for {len(self._downs)} layers")
        for i, (down, variants, w) in enumerate(zip(self._downs, self._variants, widths, strict=True)):
            if w == self._current[i]:
                continue
            variants.check(i, w)
            weight = down.weight
            weight.zero_()
            weight[:, variants.kept(w).to(weight.device)] = variants.columns(w).to(weight.device, weight.dtype)
            self._current[i] = w


@contextmanager
def trial_widths(model: nn.Module, variants: list[LayerVariants]) -> Iterator[WidthTrial]:
    """A ``WidthTrial`` on ``model``; every down_proj weight is restored on exit, also on error."""
    downs = [mlp.down for _, mlp in get_adapter(model).layer_parts(model)]
    originals = [down.weight.detach().clone() for down in downs]
    try:
        yield WidthTrial(downs, variants)
    finally:
        with torch.no_grad():
            for down, original in zip(downs, originals, strict=True):
                down.weight.copy_(original)


def mutate(widths: Sequence[int], step: int, low: int, high: int, swaps: int, rng: random.Random) -> list[int]:
    """Move ``swaps`` steps of channels, one at a time, from a layer above ``low`` to another below ``high``;
    the total stays. A move with no donor or no receiver is skipped."""
    child = list(widths)
    for _ in range(swaps):
        donors = [i for i, w in enumerate(child) if w - step >= low]
        if not donors:
            break
        donor = rng.choice(donors)
        receivers = [i for i, w in enumerate(child) if w + step <= high and i != donor]
        if not receivers:
            break
        child[donor] -= step
        child[rng.choice(receivers)] += step
    return child


def check_budget(mean_width: int, levels: Sequence[int]) -> None:
    """Refuse a mean width below the smallest candidate width or above the widest (before any work)."""
    if not levels[0] <= mean_width <= levels[-1]:
        raise TransactError(f"the mean MLP width {mean_width} is outside the candidate widths "
                            f"{levels[0]}..{levels[-1]} in steps of {_step_of(levels)}")


def _step_of(levels: Sequence[int]) -> int:
    return levels[1] - levels[0] if len(levels) > 1 else levels[0]


def spread_total(mean_width: int, layers: int, levels: Sequence[int]) -> int:
    """The channels a search of mean ``mean_width`` spreads over ``layers``: the most, at most ``mean_width x
    layers``, that are a multiple of the step (and at least the smallest width in every layer)."""
    step = _step_of(levels)
    return max(mean_width * layers // step * step, levels[0] * layers)


def even_split(total: int, layers: int, levels: Sequence[int]) -> list[int]:
    """``total`` channels (a multiple of the step) over ``layers``, every layer within one step of the others;
    the layers one step wider are spread evenly through the stack. -> one width per layer."""
    step = _step_of(levels)
    base, extra = divmod(total // step, layers)
    wider = {i * layers // extra for i in range(extra)}
    return [(base + (i in wider)) * step for i in range(layers)]


def search_widths(model: nn.Module, windows: torch.Tensor, variants: list[LayerVariants], mean_width: int,
                  options: WidthSearch = WidthSearch(), *, batch_size: int = 4,
                  progress: bool = True) -> SearchResult:
    """The per-layer MLP widths of total ``spread_total(mean_width, ...)`` (``mean_width * layers`` where the
    step divides it) with the lowest calibration loss the search finds (see the module docstring).
    windows: (n, seq) calibration tokens, n >= both sample counts."""
    levels = variants[0].widths
    check_budget(mean_width, levels)
    needed = max(options.first_samples, options.final_samples)
    if len(windows) < needed:
        raise TransactError(f"the search draws {needed} calibration windows per generation; {len(windows)} given")
    rng, start = random.Random(options.seed), time.monotonic()
    uniform = even_split(spread_total(mean_width, len(variants), levels), len(variants), levels)
    parent, history, evaluations = uniform, [], 0
    model = scoring_copy(model, getattr(torch, options.score_dtype))
    with trial_widths(model, variants) as trial:

        def loss_of(widths: list[int], rows: list[int]) -> float:
            nonlocal evaluations
            evaluations += 1
            trial.set_(widths)
            return calibration_loss(model, windows[rows], batch_size=batch_size)

        bar = tqdm(range(options.generations), desc="searching widths", unit="generation", disable=not progress)
        done = 0
        for _ in bar:
            if options.seconds is not None and time.monotonic() - start > options.seconds:
                break
            parent, best = _generation(parent, levels, options, rng, len(windows), loss_of)
            history.append(best)
            done += 1
            bar.set_postfix(loss=f"{best:.4f}")
        every = list(range(len(windows)))
        uniform_loss = loss_of(uniform, every)
        loss = loss_of(parent, every) if parent != uniform else uniform_loss
    if loss >= uniform_loss:
        parent, loss = uniform, uniform_loss
    return SearchResult(parent, loss, uniform_loss, done, evaluations, time.monotonic() - start, history)


def scoring_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` itself where its floating-point weights already are ``dtype``, else a copy cast to it (trials
    then never touch the model's own weights)."""
    if next(model.parameters()).dtype == dtype:
        return model
    return copy.deepcopy(model).to(dtype)


def _generation(parent: list[int], levels: Sequence[int], options: WidthSearch, rng: random.Random, windows: int,
                loss_of) -> tuple[list[int], float]:
    """One generation: -> (the next parent, its loss on this generation's final windows)."""
    step, low, high = _step_of(levels), levels[0], levels[-1]
    children: list[list[int]] = []
    for _ in range(options.offspring * 4):  # a few draws more, since duplicates and no-ops are dropped
        child = mutate(parent, step, low, high, rng.randint(1, options.max_swaps), rng)
        if child != parent and child not in children:
            children.append(child)
        if len(children) == options.offspring:
            break
    if not children:
        return parent, float("nan")
    first = rng.sample(range(windows), options.first_samples)
    ranked = sorted(children, key=lambda child: loss_of(child, first))[:options.survivors]
    final = rng.sample(range(windows), options.final_samples)
    scored = [(loss_of(candidate, final), i) for i, candidate in enumerate([parent, *ranked])]
    best, index = min(scored)
    return [parent, *ranked][index], best


@torch.no_grad()
def slice_to_widths_(model: nn.Module, variants: list[LayerVariants], widths: Sequence[int]) -> nn.Module:
    """Slice each layer's MLP in place to its width: the kept channels' gate and up rows, and the refitted
    down_proj columns. The model then holds different MLP widths per layer, which a vanilla config cannot
    describe: for measuring in memory, not for saving."""
    parts = get_adapter(model).layer_parts(model)
    for i, ((_, mlp), layer, w) in enumerate(zip(parts, variants, widths, strict=True)):
        layer.check(i, w)
        keep_channels(mlp, layer.kept(w).tolist())
        mlp.down.weight.copy_(layer.columns(w).to(mlp.down.weight.device, mlp.down.weight.dtype))
    return model
