"""Recipes: what to prune and how, as frozen values validated at construction. ``PruneRecipe`` for one
shot, ``RunRecipe`` (a YAML file) for iterative pruning with recovery training."""

from transact.recipes.prune import PruneRecipe, Width
from transact.recipes.run import (
    PRECISIONS,
    RunRecipe,
    Training,
    Widths,
    apply_overrides,
    load_run_recipe,
)
from transact.recipes.text import Calibration, HeldoutText

__all__ = [
    "PRECISIONS",
    "Calibration",
    "HeldoutText",
    "PruneRecipe",
    "RunRecipe",
    "Training",
    "Width",
    "Widths",
    "apply_overrides",
    "load_run_recipe",
]
