"""Recipes: what to prune and how, as frozen values validated at construction. ``PruneRecipe`` for one
shot, ``RunRecipe`` (a YAML file) for iterative pruning with recovery training."""

from transact.recipes.prune import PruneRecipe, Width
from transact.recipes.run import (
    PRECISIONS,
    RECOVERY_METHODS,
    DistillSettings,
    LoraSettings,
    RunRecipe,
    Training,
    Widths,
    apply_overrides,
    load_run_recipe,
)
from transact.recipes.text import Calibration, HeldoutText

__all__ = [
    "PRECISIONS",
    "RECOVERY_METHODS",
    "Calibration",
    "DistillSettings",
    "HeldoutText",
    "LoraSettings",
    "PruneRecipe",
    "RunRecipe",
    "Training",
    "Width",
    "Widths",
    "apply_overrides",
    "load_run_recipe",
]
