"""transact: structured pruning of decoder LLMs by transitional activations (TransAct).

The stages, each a module: ``calibrate`` -> ``score`` (``salience`` holds the pure math) -> ``plan`` ->
``prune`` -> ``evaluate`` (with ``tasks`` for lm-eval accuracy and ``bench`` for measured speed) ->
``export``. ``pipeline`` joins the pruning stages and ``measure`` the measuring ones (``report`` writes
their tables and plots); ``cli`` is a thin layer over both.
"""

__version__ = "0.1.0"

from transact.arch import SUPPORTED_MODEL_TYPES, get_adapter
from transact.calibrate import ActivationStats, calibrate, record_transitional_stats
from transact.errors import TransactError
from transact.evaluate import perplexity
from transact.measure import BenchJob, CompareJob, EvalJob, run_bench, run_compare, run_eval
from transact.pipeline import (
    ApplyPlanJob,
    EvalText,
    PruneJob,
    load,
    model_info,
    prune,
    run_apply_plan,
    run_prune,
    save,
)
from transact.plan import PrunePlan, make_plan, resolve_targets
from transact.prune import prune_
from transact.recipe import Calibration, PruneRecipe, Width

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ActivationStats",
    "ApplyPlanJob",
    "BenchJob",
    "Calibration",
    "CompareJob",
    "EvalJob",
    "EvalText",
    "PruneJob",
    "PrunePlan",
    "PruneRecipe",
    "TransactError",
    "Width",
    "calibrate",
    "get_adapter",
    "load",
    "make_plan",
    "model_info",
    "perplexity",
    "prune",
    "prune_",
    "record_transitional_stats",
    "resolve_targets",
    "run_apply_plan",
    "run_bench",
    "run_compare",
    "run_eval",
    "run_prune",
    "save",
]
