"""``transact apply-plan``: recreate a pruned checkpoint from its base model and plan.json, bit for bit
(recalibrating only where a correction depends on calibration statistics, on the same tokens, checked by
their hash)."""

from __future__ import annotations

from dataclasses import dataclass

from transact.arch import get_adapter
from transact.core.plan import PrunePlan
from transact.core.reapply import check_reproducible, needs_recalibration, reapply_plan
from transact.io.checkpoint import write_verified
from transact.io.files import check_output_dir
from transact.io.models import load_model, prepare_model, require_tokenizer
from transact.io.text import read_texts
from transact.jobs.pruned import PruneResult, as_saved, checkpoint_report, saved_model_type
from transact.measure.costs import model_summary
from transact.recipes import PruneRecipe


@dataclass(frozen=True)
class ApplyPlanJob:
    model: str
    plan: str
    out: str
    device: str = "cpu"
    dtype: str = "auto"
    force: bool = False
    verify: bool = True
    progress: bool = True


def run(job: ApplyPlanJob) -> PruneResult:
    """Recreate a pruned checkpoint from its base model and plan.json (recalibrating only where a correction
    depends on calibration statistics)."""
    check_output_dir(job.out, force=job.force, inputs=(job.model,))
    plan = PrunePlan.load(job.plan)
    check_reproducible(plan)
    # how to run its correctors, and the drop, again
    recipe = PruneRecipe.from_json(plan.recipe) if plan.corrections or plan.depth else None
    prep = prepare_model(job.model, job.device, job.dtype)
    get_adapter(prep.config).check_prunable()
    plan.check_applies_to(prep.shape)
    texts, tokenizer = None, None
    if needs_recalibration(plan):  # the calibration text and tokenizer are checked before the weights are read
        texts = read_texts(recipe.calibration.text)
        tokenizer = require_tokenizer(prep.source, "recalibrating the plan's corrections")
    model, tokenizer = load_model(prep, tokenizer=tokenizer)
    before = model_summary(model)
    plan = reapply_plan(model, plan, tokenizer, recipe=recipe, texts=texts, progress=job.progress)
    as_saved(model, plan, prep)
    report = checkpoint_report(job.model, prep, plan=str(job.plan), before=before, after=model_summary(model),
                               saved_as=saved_model_type(model))
    out = write_verified(model, tokenizer, job.out, plan, report, save_dtype=prep.save_dtype, force=job.force,
                         verify=job.verify)
    return PruneResult(out, plan, report)
