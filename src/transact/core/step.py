"""One pruning step: calibrate -> score -> select -> correct -> slice, over plain values.

``prune_step`` is the step the library API, ``transact prune``, ``transact run`` and every benchmark
take. Its two halves are public for the cases that split it: ``plan_step`` (calibrate, score, select: the
plan, and the statistics behind it) and ``apply_step`` (correct, slice). A distributed run plans on one
process and applies everywhere; a benchmark that tries many widths or alphas collects the statistics
once (``gather_statistics``) and hands them to every step.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from itertools import groupby
from typing import TYPE_CHECKING

import torch
from torch import nn

from transact.arch import ModelShape, get_adapter, shape_of
from transact.core.allocate import check_budget, mlp_variants, search_widths, width_levels
from transact.core.budget import BUDGET_NOUNS, Candidate, budget_candidates, candidate_depth
from transact.core.calibrate import Statistics, collect_statistics, sample_windows, windows_hash
from transact.core.correct import get_corrector
from transact.core.correct.refit import damp_for
from transact.core.depth import DepthPlan, drop_layers_
from transact.core.depth_calibrate import calibration_loss
from transact.core.metrics import METRICS, get_metric
from transact.core.plan import PrunePlan, dropped_routes, whole_plan
from transact.core.select import make_plan
from transact.core.sub_block_drop import droppable
from transact.core.surgery import prune_
from transact.core.targets import Targets, resolve_targets
from transact.errors import TransactError
from transact.io.text import read_texts
from transact.measure.costs import count_parameters
from transact.version import library_versions

if TYPE_CHECKING:
    from transact.recipes import PruneRecipe


def calibration_windows(tokenizer, recipe: PruneRecipe, texts: list[str] | None = None) -> torch.Tensor | None:
    """The recipe's calibration windows (samples, seq_len), or None when nothing needs calibrating."""
    if not recipe.needs_calibration:
        return None
    if tokenizer is None:
        raise TransactError(f"metric {recipe.metric!r} calibrates on text, which needs the model's tokenizer")
    cal = recipe.calibration
    texts = texts if texts is not None else read_texts(cal.text)
    return sample_windows(tokenizer, texts, cal.samples, cal.seq_len, recipe.seed)


def gather_statistics(model: nn.Module, tokenizer, recipe: PruneRecipe, *, texts: list[str] | None = None,
                      progress: bool = True) -> Statistics:
    """Everything the recipe's metric and correctors need, from one calibration of ``model``."""
    windows = calibration_windows(tokenizer, recipe, texts)
    return collect_statistics(model, windows, recipe.statistics, batch_size=recipe.calibration.batch_size,
                              progress=progress, gate_weighted=recipe.gate_weighted)


def check_step(config, recipe: PruneRecipe, targets: Targets) -> None:
    """The up-front checks of a step (no compute): the metric scores this model's kind of units, and each
    corrector's check that the family's checkpoint can carry its result."""
    check_metric(shape_of(config), recipe)
    adapter = get_adapter(config)
    for name in recipe.correctors:
        get_corrector(name).check(adapter, config, targets)
    if recipe.allocation is not None:
        check_allocation(config, recipe, targets)


def check_allocation(config, recipe: PruneRecipe, targets: Targets) -> None:
    """The width search's up-front checks: those of ``search_levels``, and a mean width within the candidate
    widths."""
    check_budget(targets.mlp, search_levels(config, recipe))


def search_levels(config, recipe: PruneRecipe) -> list[int]:
    """The widths the recipe's per-layer search gives a layer of this model (no compute); refused for a mixture
    of experts, a family without a checkpoint for per-layer widths, or a step that does not divide the MLP
    width."""
    shape = shape_of(config)
    if shape.is_moe:
        raise TransactError("per-layer widths are searched for dense MLPs only, not for a mixture of experts")
    get_adapter(config).per_layer_fields(config)
    options = recipe.allocation
    return width_levels(shape.intermediate_size, options.step, options.min_width)


def check_metric(shape, recipe: PruneRecipe) -> None:
    """Refuse a metric that cannot score this model's units (no compute)."""
    metric = get_metric(recipe.metric)
    if shape.is_moe and not metric.experts:
        able = [name for name, m in METRICS.items() if m.experts]
        raise TransactError(f"metric {recipe.metric!r} does not score experts; for a mixture of experts use "
                            f"{', '.join(able)}")


def plan_step(model: nn.Module, tokenizer, recipe: PruneRecipe, *, targets: Targets | None = None,
              texts: list[str] | None = None, statistics: Statistics | None = None, note: dict | None = None,
              progress: bool = True) -> tuple[PrunePlan, Statistics]:
    """Calibrate (unless ``statistics`` are given), score with the recipe's metric and select the kept
    units: -> (plan, statistics). ``targets`` default to the recipe's widths on this model; ``note`` is
    recorded with the recipe in the plan."""
    shape = shape_of(model)
    targets = targets or resolve_targets(recipe, shape)
    check_step(model.config, recipe, targets)
    if statistics is None:
        statistics = gather_statistics(model, tokenizer, recipe, texts=texts, progress=progress)
    missing = [name for name in recipe.statistics if not statistics.has(name)]
    if missing:
        raise TransactError(f"the given statistics lack {', '.join(missing)}, which this recipe needs")
    scores = get_metric(recipe.metric).score(model, statistics, shape, recipe)
    widths, searched = (None, None) if recipe.allocation is None else \
        allocated_widths(model, tokenizer, recipe, statistics, scores.mlp, targets.mlp, texts, progress)
    if widths is not None:  # the search spreads what the step allows: the plan's width is their mean
        targets = replace(targets, mlp=sum(widths) // len(widths))
    plan = make_plan(scores.heads, scores.mlp, targets, shape, scores.experts, scores.shared, scores.groups,
                     mlp_widths=widths, recipe={**(note or {}), **recipe.to_json()},
                     calibration_hash=statistics.calibration_hash, versions=library_versions())
    if searched is not None:
        plan = replace(plan, allocation=searched)
    routed = statistics.activations.experts.get("tokens") if statistics.activations is not None else None
    if routed is not None:
        plan = replace(plan, dropped_expert_routes=dropped_routes(plan, routed))
    return plan, statistics


def allocated_widths(model: nn.Module, tokenizer, recipe: PruneRecipe, statistics: Statistics,
                     mlp_scores: list[torch.Tensor], mean_width: int, texts: list[str] | None,
                     progress: bool) -> tuple[list[int], dict]:
    """Each layer's MLP width, of mean ``mean_width`` or as near below it as the search's step allows
    (``transact.core.allocate.spread_total``), searched on the calibration loss with the recipe's
    ranking and corrector (``recipe.allocation``; ``transact.core.allocate``): -> (widths, the search's
    record for plan.json)."""
    if tokenizer is None:
        raise TransactError("the per-layer width search scores candidates on the calibration text, which needs "
                            "the model's tokenizer")
    options, refit = recipe.allocation, "refit" in recipe.correctors
    levels = search_levels(model.config, recipe)
    variants = mlp_variants(model, statistics.activation("mlp", "gram") if refit else None, mlp_scores, levels,
                            damp_for(statistics, recipe.options_of("refit")) if refit else None)
    found = search_widths(model, calibration_windows(tokenizer, recipe, texts), variants, mean_width, options,
                          batch_size=recipe.calibration.batch_size, progress=progress)
    return found.widths, found.record()


def apply_step(model: nn.Module, plan: PrunePlan, statistics: Statistics | None = None,
               recipe: PruneRecipe | None = None) -> PrunePlan:
    """Run the recipe's correctors on the unpruned weights, then slice ``model`` in place to the plan; -> the
    plan with what the correctors did recorded."""
    records = []
    for name in recipe.correctors if recipe is not None else ():
        corrector = get_corrector(name)
        records.append({"name": name, **corrector.apply(model, plan, statistics or Statistics(),
                                                        recipe.options_of(name))})
    if records:
        plan = replace(plan, corrections=[*plan.corrections, *records])
    prune_(model, plan)
    return plan


def prune_step(model: nn.Module, tokenizer, recipe: PruneRecipe, *, targets: Targets | None = None,
               texts: list[str] | None = None, statistics: Statistics | None = None, note: dict | None = None,
               progress: bool = True) -> PrunePlan:
    """The whole step on ``model``, in place: drop layers where the recipe says so, then calibrate, score,
    select, correct, slice (or, for a recipe with a budget, the mix of both that meets it: ``budget_step``);
    -> the plan."""
    if recipe.budget is not None:
        if targets is not None or statistics is not None:
            raise TransactError("a budget chooses the widths and calibrates each candidate itself; give neither "
                                "targets nor statistics with it")
        return budget_step(model, tokenizer, recipe, texts=texts, note=note, progress=progress)
    depth = windows = None
    if recipe.depth is not None:
        if statistics is not None:
            raise TransactError("statistics collected beforehand describe every layer; a recipe that drops layers "
                                "calibrates after the drop")
        windows = calibration_windows(tokenizer, recipe, texts)
        depth = drop_layers_(model, windows, recipe.depth, batch_size=recipe.calibration.batch_size,
                             progress=progress)
    return _widths_after_drop(model, tokenizer, recipe, depth, windows, targets=targets, texts=texts,
                              statistics=statistics, note=note, progress=progress)


def _widths_after_drop(model: nn.Module, tokenizer, recipe: PruneRecipe, depth: DepthPlan | None,
                       windows: torch.Tensor | None, *, targets: Targets | None = None, texts: list[str] | None = None,
                       statistics: Statistics | None = None, note: dict | None = None,
                       progress: bool = True) -> PrunePlan:
    """The widths half of a step, on a model whose layers were dropped as ``depth`` records (None: none were,
    and ``windows`` are not needed)."""
    if depth is not None and not recipe.has_widths:
        return whole_plan(shape_of(model), recipe={**(note or {}), **recipe.to_json()},
                          calibration_hash=windows_hash(windows), versions=library_versions(), depth=depth)
    if chooses_mlp_score(recipe, shape_of(model), targets):
        recipe, plan, statistics = choose_mlp_score(model, tokenizer, recipe, targets=targets, texts=texts,
                                                    statistics=statistics, note=note, progress=progress)
    else:
        plan, statistics = plan_step(model, tokenizer, recipe, targets=targets, texts=texts, statistics=statistics,
                                     note=note, progress=progress)
    plan = apply_step(model, plan, statistics, recipe)
    if depth is None:
        return plan
    # a width step that calibrated nothing (a data-free metric, no corrector) recorded no hash; the drop did
    return replace(plan, depth=depth, calibration_hash=plan.calibration_hash or windows_hash(windows))


MLP_SCORES = ("eq5", "consumer_error")  # what mlp_score "compare" chooses between
MLP_SCORE_WINDOWS = 16  # windows after the calibration's that the two pruned models are compared on


def chooses_mlp_score(recipe: PruneRecipe, shape: ModelShape, targets: Targets | None) -> bool:
    """Whether the step prunes dense MLP channels with a metric told to compare its MLP rankings (``compare``)."""
    if getattr(recipe.metric_options, "mlp_score", None) != "compare" or shape.is_moe:
        return False
    return (targets or resolve_targets(recipe, shape)).mlp != shape.intermediate_size


def choose_mlp_score(model: nn.Module, tokenizer, recipe: PruneRecipe, *, targets: Targets | None = None,
                     texts: list[str] | None = None, statistics: Statistics | None = None, note: dict | None = None,
                     progress: bool = True) -> tuple[PruneRecipe, PrunePlan, Statistics]:
    """Plan with each MLP ranking of ``MLP_SCORES`` from one calibration, prune a copy of ``model`` with each
    (correctors included), and keep the ranking whose pruned copy has the lower loss on the
    ``MLP_SCORE_WINDOWS`` windows that follow the calibration windows (which no fit saw); ``model`` is left
    as it is. -> (the recipe with that ranking, its plan, which records the choice, the statistics)."""
    if tokenizer is None:
        raise TransactError("mlp_score compare compares pruned models on calibration text, which needs the model's "
                            "tokenizer")
    if statistics is None:
        statistics = gather_statistics(model, tokenizer, recipe, texts=texts, progress=progress)
    unseen = scoring_windows(tokenizer, recipe, texts, MLP_SCORE_WINDOWS, "mlp_score compare")
    plans, losses = {}, {}
    for score in MLP_SCORES:
        trial, concrete = copy.deepcopy(model), _with_mlp_score(recipe, score)
        plans[score] = plan_step(trial, tokenizer, concrete, targets=targets, statistics=statistics, note=note,
                                 progress=progress)[0]
        apply_step(trial, plans[score], statistics, concrete)
        losses[score] = calibration_loss(trial, unseen, batch_size=recipe.calibration.batch_size)
        del trial
    chosen = min(MLP_SCORES, key=losses.__getitem__)
    if progress:
        print("mlp_score compare: loss on unseen calibration windows " + ", ".join(
            f"{score} {loss:.4f}" for score, loss in losses.items()) + f"; keeping {chosen}", file=sys.stderr)
    choice = {"losses": {score: round(loss, 6) for score, loss in losses.items()}, "chosen": chosen,
              "windows": MLP_SCORE_WINDOWS}
    plan = plans[chosen]
    return _with_mlp_score(recipe, chosen), replace(plan, recipe={**plan.recipe, "mlp_score_choice": choice}), \
        statistics


def _with_mlp_score(recipe: PruneRecipe, score: str) -> PruneRecipe:
    return replace(recipe, metric_options=replace(recipe.metric_options, mlp_score=score))


def budget_step(model: nn.Module, tokenizer, recipe: PruneRecipe, *, texts: list[str] | None = None,
                note: dict | None = None, progress: bool = True,
                inspect: Callable[[Candidate, nn.Module], None] | None = None) -> PrunePlan:
    """Meet ``recipe.budget`` with the candidate mix of depth and width whose pruned model has the lowest
    loss on calibration windows no fit saw (``scoring_windows``; ``transact.core.budget``), and prune
    ``model`` to it in place; -> its plan, which records the winner's widths and drop as its recipe (so
    ``apply-plan`` recreates it without a search) and every candidate's loss in ``plan.budget``. With the
    recipe's per-layer width search (``recipe.allocation``) each candidate is scored at uniform widths, and
    the winner's MLP channels are then spread over its layers by the search (as many as its step allows, so
    the parameters and FLOPs of the winner, less under one step of channels; the plan records the search).
    ``inspect(candidate, pruned)`` sees each candidate's pruned model once it is scored (a benchmark measures
    what the choice did not see)."""
    started = time.perf_counter()
    budget, total, shape = recipe.budget, count_parameters(model), shape_of(model)
    candidates = searchable(budget_candidates(shape, total, budget, recipe.multiple_of,
                                              attention_drops=droppable(model.config, "attention")),
                            recipe, model.config)  # an unreachable budget fails here
    windows = calibration_windows(tokenizer, recipe, texts)
    unseen = scoring_windows(tokenizer, recipe, texts, recipe.budget.score_samples, "a budget")
    losses, drops = [], {}
    for key, group in groupby(candidates, key=lambda c: (c.part, c.drop)):
        group = list(group)
        base = copy.deepcopy(model)
        drops[key] = _drop_for(base, windows, recipe, group[0], shape, None, progress)
        statistics = None
        for candidate in group:
            trial, concrete = copy.deepcopy(base), candidate_recipe(recipe, candidate, shape, search=False)
            if concrete.has_widths:
                if statistics is None:  # one calibration per depth serves both of its width mixes
                    statistics = gather_statistics(trial, tokenizer, concrete, texts=texts, progress=progress)
                plan = plan_step(trial, tokenizer, concrete, statistics=statistics, progress=progress)[0]
                apply_step(trial, plan, statistics, concrete)
            losses.append(calibration_loss(trial, unseen, batch_size=recipe.calibration.batch_size))
            if progress:
                print(f"budget: {candidate.describe()} ({candidate.share:.3f} of the {BUDGET_NOUNS[budget.kind]}): "
                      f"loss on unseen windows {losses[-1]:.4f}", file=sys.stderr)
            if inspect is not None:
                inspect(candidate, trial)
            del trial
        del base, statistics
    best = candidates[min(range(len(candidates)), key=losses.__getitem__)]
    winner = candidate_recipe(recipe, best, shape)
    if recipe.allocation is not None and winner.allocation is None and progress:
        print(f"budget: {best.describe()} keeps every MLP channel; the width search has nothing to spread",
              file=sys.stderr)
    depth = _drop_for(model, windows, recipe, best, shape, drops[best.part, best.drop], progress)
    plan = _widths_after_drop(model, tokenizer, winner, depth, windows, texts=texts, note=note, progress=progress)
    kept = budget.measure.of_model(shape_of(model), count_parameters(model)) / budget.measure.of_model(shape, total)
    record = {"budget": budget.to_json(), "parameters": total, "kept": round(count_parameters(model) / total, 6),
              "kept_share": round(kept, 6),  # of what the budget counts, in the pruned model
              "candidates": [{**c.to_json(), "calibration_loss": round(loss, 6)}
                             for c, loss in zip(candidates, losses, strict=True)],
              "chosen": candidates.index(best), "seconds": round(time.perf_counter() - started, 1)}
    return replace(plan, budget=record, calibration_hash=plan.calibration_hash or windows_hash(windows))


def scoring_windows(tokenizer, recipe: PruneRecipe, texts: list[str] | None, count: int, who: str) -> torch.Tensor:
    """The windows pruned candidates are compared on (by ``who``: a budget, mlp_score compare): the ``count``
    windows that follow the calibration windows in the same shuffled text, which no fit saw (a candidate that
    fits more gains nothing from having seen them). -> (count, seq_len)."""
    cal = recipe.calibration
    texts = texts if texts is not None else read_texts(cal.text)
    try:
        return sample_windows(tokenizer, texts, cal.samples + count, cal.seq_len, recipe.seed)[cal.samples:]
    except TransactError:
        raise TransactError(f"{who} scores its candidates on {count} windows of {cal.seq_len} tokens after the "
                            f"{cal.samples} calibration windows; the calibration text has fewer than "
                            f"{(cal.samples + count) * cal.seq_len} tokens: give more text, or fewer samples") from None


def _drop_for(model: nn.Module, windows: torch.Tensor, recipe: PruneRecipe, candidate: Candidate,
              shape: ModelShape, recorded: DepthPlan | None, progress: bool) -> DepthPlan | None:
    """Drop the candidate's layers (or attentions) from ``model``, of ``shape``, as the budget's depth options
    say (as ``recorded``, where given)."""
    depth = candidate_depth(recipe.budget, candidate, shape)
    if depth is None:
        return None
    return drop_layers_(model, windows, depth, recorded=recorded, batch_size=recipe.calibration.batch_size,
                        progress=progress)


def candidate_recipe(recipe: PruneRecipe, candidate: Candidate, shape: ModelShape, *,
                     search: bool = True) -> PruneRecipe:
    """The recipe that prunes a model of ``shape`` to ``candidate``: the widths it prunes (the others left
    whole) and its drop, no budget; with the recipe's per-layer width search where ``search`` and the
    candidate prunes the MLP (candidates are scored at uniform widths; the winner's MLP width is spread)."""
    attention = (candidate.heads, candidate.kv_heads) != (shape.num_heads, shape.num_kv_heads)
    mlp = candidate.mlp if candidate.mlp != shape.intermediate_size else None
    return replace(recipe, budget=None, depth=candidate_depth(recipe.budget, candidate, shape),
                   heads=candidate.heads if attention else None, kv_heads=candidate.kv_heads if attention else None,
                   mlp=mlp, allocation=recipe.allocation if search and mlp is not None else None)


def check_budget_search(config, recipe: PruneRecipe) -> None:
    """Refuse, with no compute, a budget's per-layer search that cannot take this model (``search_levels``)."""
    if recipe.allocation is not None:
        search_levels(config, recipe)


def searchable(candidates: list[Candidate], recipe: PruneRecipe, config) -> list[Candidate]:
    """The candidates whose MLP the recipe's per-layer search can spread: none narrower than its smallest
    layer width (all of them without a search); a model the search cannot take is refused here
    (``search_levels``)."""
    if recipe.allocation is None:
        return candidates
    low = search_levels(config, recipe)[0]
    kept = [c for c in candidates if c.mlp >= low]
    if not kept:
        raise TransactError(f"every candidate of budget {recipe.budget.describe()} keeps fewer MLP channels than "
                            f"the search's smallest layer width {low}")
    return kept
