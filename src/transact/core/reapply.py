"""Recreate a plan's checkpoint from its base model (``apply-plan``): the same drop, the corrections run again
on the same calibration windows (checked by their hash), the same slices; bit-identical weights."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from transact.core.calibrate import Statistics, collect_statistics, windows_hash
from transact.core.correct import get_corrector
from transact.core.depth import DepthPlan, drop_layers_
from transact.core.plan import PrunePlan
from transact.core.step import apply_step, calibration_windows
from transact.errors import TransactError

if TYPE_CHECKING:
    from transact.recipes import PruneRecipe


def check_reproducible(plan: PrunePlan) -> None:
    """Refuse a plan whose checkpoint ``apply-plan`` cannot recreate: one calibrated layer by layer on the
    pruned model's own activations (its statistics exist only inside that run)."""
    if plan.recipe.get("sequential") and needs_recalibration(plan):
        raise TransactError("this plan's corrections were computed layer by layer on the pruned model's own "
                            "activations (--layerwise --sequential), which only that run sees; run transact prune "
                            "--layerwise --sequential again to recreate it")


def needs_recalibration(plan: PrunePlan) -> bool:
    """Whether recreating the plan's checkpoint needs the calibration text again (a correction, or a depth
    map, that depends on it)."""
    return (plan.depth is not None and plan.depth.map_applied) or _corrections_need_statistics(plan)


def _corrections_need_statistics(plan: PrunePlan) -> bool:
    return any(not get_corrector(record["name"]).reproducible for record in plan.corrections)


def recalibrate(model: nn.Module, tokenizer, plan: PrunePlan, recipe: PruneRecipe, *, texts: list[str] | None = None,
                progress: bool = True) -> Statistics:
    """The statistics the plan's correctors used, from the same calibration windows: the recipe's text must
    give exactly the tokens recorded by the plan's calibration hash."""
    windows = checked_windows(tokenizer, plan, recipe, texts)
    names = tuple(dict.fromkeys(s for r in plan.corrections for s in get_corrector(r["name"]).statistics))
    return collect_statistics(model, windows, names, batch_size=recipe.calibration.batch_size, progress=progress,
                              gate_weighted=recipe.gate_weighted)


def checked_windows(tokenizer, plan: PrunePlan, recipe: PruneRecipe, texts: list[str] | None) -> torch.Tensor:
    """The recipe's calibration windows, refused unless they are exactly the tokens the plan records."""
    windows = calibration_windows(tokenizer, recipe, texts)
    if windows is None or windows_hash(windows) != plan.calibration_hash:
        raise TransactError(f"the calibration text {recipe.calibration.text!r} does not give the tokens this plan "
                            "was calibrated on (their hash differs), so its corrections cannot be recreated; run "
                            "transact prune again, or apply-plan with the same calibration text")
    return windows


def _redo_depth(model: nn.Module, plan: PrunePlan, tokenizer, recipe: PruneRecipe, texts: list[str] | None,
                progress: bool) -> DepthPlan:
    """Drop the plan's layers again, folding its map (refitted on the same windows) where it had one."""
    windows = checked_windows(tokenizer, plan, recipe, texts) if plan.depth.map_applied else None
    return drop_layers_(model, windows, recipe.depth, recorded=plan.depth, batch_size=recipe.calibration.batch_size,
                        progress=progress)


def reapply_plan(model: nn.Module, plan: PrunePlan, tokenizer=None, *, recipe: PruneRecipe | None = None,
                 texts: list[str] | None = None, progress: bool = True) -> PrunePlan:
    """``plan`` on its base model again: bit-identical weights to the first time. ``recipe`` is the recipe the
    plan records, read back (needed where it has corrections: they run again with its options; see
    ``transact.api.reapply_plan``); corrections that depend on calibration statistics are recomputed from the
    same calibration windows (checked by their hash)."""
    check_reproducible(plan)
    if (plan.corrections or plan.depth is not None) and recipe is None:
        raise TransactError("this plan's corrections run again with the options of its recipe: give "
                            "recipe=PruneRecipe.from_json(plan.recipe), or call transact.api.reapply_plan")
    if plan.depth is not None:
        _redo_depth(model, plan, tokenizer, recipe, texts, progress)
    recipe = recipe if plan.corrections else None
    stats = recalibrate(model, tokenizer, plan, recipe, texts=texts, progress=progress) \
        if _corrections_need_statistics(plan) else None
    # the widths apply to the model as the drop left it (the plan's ``source``)
    applied = apply_step(model, replace(plan, corrections=[], depth=None), stats, recipe)
    return replace(applied, depth=plan.depth)
