"""transact: structured pruning of decoder LLMs by transitional activations (TransAct).

The pipeline lives in subpackages whose names follow the data: ``core`` (calibrate -> metrics -> plan ->
correct -> surgery, joined by ``core.step``; ``core.layerwise`` one layer at a time), ``recovery`` (training
between shots: data, phases, recovery methods, state), ``measure`` (perplexity, costs, tasks, bench, report),
``deploy`` (llama.cpp), ``io`` (models, assets, text, checkpoints), ``arch`` (one adapter per model family)
and ``recipes``. ``jobs`` holds one module per command; ``api`` (models in memory) and ``cli`` sit on top; the
names below are the public API.
"""

from transact.version import __version__  # noqa: I001  (first: the rest record it)

from transact.api import ApplyPlanJob, PruneJob, load, model_info, prune, run_apply_plan, run_prune, save
from transact.arch import SUPPORTED_MODEL_TYPES, FamilyAdapter, ModelShape, get_adapter
from transact.core.allocate import WidthSearch, search_widths
from transact.core.budget import Budget, ParamBudget, budget_candidates
from transact.core.calibrate import ActivationStats, Statistics, calibrate, record_transitional_stats
from transact.core.correct import Corrector, corrector_names, get_corrector, register_corrector
from transact.core.depth import DepthOptions, DepthPlan, drop_layers_, remove_layers_
from transact.core.metrics import LayerScores, Metric, get_metric, metric_names, register_metric
from transact.core.plan import PrunePlan
from transact.core.select import make_plan
from transact.core.targets import resolve_targets
from transact.core.step import apply_step, budget_step, gather_statistics, plan_step, prune_step
from transact.core.surgery import prune_
from transact.errors import TransactError
from transact.measure.jobs import BenchJob, CompareJob, EvalJob, run_bench, run_compare, run_eval
from transact.measure.perplexity import perplexity
from transact.recipes import Calibration, HeldoutText, PruneRecipe, RunRecipe, Width
from transact.recovery.methods import RecoveryMethod, get_method, method_names, register_method

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ActivationStats",
    "ApplyPlanJob",
    "BenchJob",
    "Budget",
    "Calibration",
    "CompareJob",
    "Corrector",
    "DepthOptions",
    "DepthPlan",
    "EvalJob",
    "FamilyAdapter",
    "HeldoutText",
    "LayerScores",
    "Metric",
    "ModelShape",
    "ParamBudget",
    "PruneJob",
    "PrunePlan",
    "PruneRecipe",
    "RecoveryMethod",
    "RunRecipe",
    "Statistics",
    "TransactError",
    "Width",
    "WidthSearch",
    "__version__",
    "apply_step",
    "budget_candidates",
    "budget_step",
    "calibrate",
    "corrector_names",
    "drop_layers_",
    "gather_statistics",
    "get_adapter",
    "get_corrector",
    "get_method",
    "get_metric",
    "load",
    "make_plan",
    "method_names",
    "metric_names",
    "model_info",
    "perplexity",
    "plan_step",
    "prune",
    "prune_",
    "prune_step",
    "record_transitional_stats",
    "register_corrector",
    "register_method",
    "register_metric",
    "remove_layers_",
    "resolve_targets",
    "run_apply_plan",
    "run_bench",
    "run_compare",
    "run_eval",
    "run_prune",
    "save",
    "search_widths",
]
