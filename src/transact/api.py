"""The library API for models in memory: ``load``, ``prune`` (the pruning step, in place) and ``save`` (a
verified vanilla checkpoint). The jobs behind the command line, which take models by name, are in
``transact.jobs``; their former names here stay as aliases (``run_prune``, ``run_apply_plan``,
``model_info``, ``PruneJob``, ``ApplyPlanJob``, ``PruneResult``).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from transact.core.layerwise import prune_model
from transact.core.plan import PrunePlan
from transact.core.reapply import reapply_plan as core_reapply
from transact.io.checkpoint import write_verified
from transact.io.files import check_output_dir
from transact.io.models import load_model, prepare_model
from transact.jobs import apply_plan, info
from transact.jobs import prune as prune_job
from transact.jobs.apply_plan import ApplyPlanJob
from transact.jobs.prune import PruneJob
from transact.jobs.pruned import PruneResult, calibration_purpose, saved_model_type
from transact.measure.costs import model_summary
from transact.recipes import PruneRecipe

__all__ = ["ApplyPlanJob", "PruneJob", "PruneResult", "calibration_purpose", "load", "model_info", "prune",
           "reapply_plan", "run_apply_plan", "run_prune", "save", "saved_model_type"]

run_prune = prune_job.run
run_apply_plan = apply_plan.run


def load(model: str, *, device: str = "cpu", dtype: str = "auto"):
    """-> (model, tokenizer) from a directory, hub id, .gguf file or ``builtin:smollm2``."""
    return load_model(prepare_model(model, device, dtype))


def prune(model: nn.Module, tokenizer, recipe: PruneRecipe, *, texts: list[str] | None = None,
          sequential: bool = False, progress: bool = True) -> PrunePlan:
    """Calibrate (if the recipe needs data), score, select, correct and slice ``model`` in place; -> the plan.
    ``sequential``: layer by layer, each layer calibrated on what the already-pruned layers produce."""
    return prune_model(model, tokenizer, recipe, sequential=sequential, texts=texts, progress=progress)


def save(model: nn.Module, tokenizer, out: str | Path, plan: PrunePlan, *, report: dict | None = None,
         force: bool = False, verify: bool = True) -> Path:
    """Write a pruned model (in its current dtype) as a vanilla checkpoint with plan.json and report.json,
    after checking that the written files reload with identical logits (unless ``verify`` is False)."""
    check_output_dir(out, force=force)
    report = report if report is not None else {"after": model_summary(model)}
    return write_verified(model, tokenizer, out, plan, report, save_dtype=next(model.parameters()).dtype,
                          force=force, verify=verify)


def reapply_plan(model: nn.Module, plan: PrunePlan, tokenizer=None, *, texts: list[str] | None = None,
                 progress: bool = True) -> PrunePlan:
    """``plan`` (its recipe read back from the plan) on its base model ``model`` again, in place: the same
    weights as the first time, bit for bit (see ``transact.core.reapply.reapply_plan``)."""
    recipe = PruneRecipe.from_json(plan.recipe) if plan.corrections or plan.depth else None
    return core_reapply(model, plan, tokenizer, recipe=recipe, texts=texts, progress=progress)


def model_info(model_spec: str) -> dict:
    """Family, widths, parameters and KV cache of a model, from its config alone (``transact info``)."""
    return info.run(info.InfoJob(model_spec))
