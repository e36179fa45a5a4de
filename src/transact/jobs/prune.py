"""``transact prune``: calibrate, score, select, correct and slice a model by name, and write a verified
checkpoint with plan.json and report.json. Every input is checked before any weights are read; with
``layerwise`` (or a layer-wise option) the work goes layer by layer (``transact.jobs.prune_layerwise``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from torch import nn

from transact.core.step import prune_step
from transact.errors import TransactError
from transact.io.checkpoint import write_verified
from transact.io.models import load_model
from transact.io.text import read_texts, token_stream
from transact.jobs import prune_layerwise
from transact.jobs.pruned import (
    PruneResult,
    as_saved,
    checkpoint_report,
    depth_notes,
    prune_inputs,
    saved_model_type,
)
from transact.measure.costs import model_summary
from transact.measure.perplexity import heldout_perplexity
from transact.recipes import HeldoutText, PruneRecipe


@dataclass(frozen=True)
class PruneJob:
    model: str
    out: str
    recipe: PruneRecipe
    device: str = "cpu"
    dtype: str = "auto"
    eval_text: HeldoutText | None = None  # held-out perplexity before and after
    force: bool = False
    verify: bool = True
    progress: bool = True
    layerwise: bool = False  # one decoder layer in memory at a time (transact.jobs.prune_layerwise)
    # layer-wise: calibrate each layer on the pruned layers' outputs (None: the layer-wise default, True)
    sequential: bool | None = None
    resume: bool = False  # layer-wise: continue an interrupted run


def run(job: PruneJob) -> PruneResult:
    """Prune a model by name and write the verified checkpoint; every input is checked before loading."""
    if job.layerwise or job.sequential is not None or job.resume:
        if job.recipe.depth is not None:
            raise TransactError("dropping layers or sub-blocks (--drop-layers, --drop-attention, --drop-mlp) works on "
                                "the whole model in memory; it is not available with --layerwise, --sequential or "
                                "--resume yet")
        if job.recipe.budget is not None:
            raise TransactError("a budget (--budget) tries each candidate on the whole model in memory; it is not "
                                "available with --layerwise, --sequential or --resume")
        if job.recipe.allocation is not None:
            raise TransactError("the per-layer width search (--allocate search) scores the whole model's calibration "
                                "loss in memory; it is not available with --layerwise, --sequential or --resume")
        return prune_layerwise.run(job)
    eval_texts = read_texts(job.eval_text.text, builtin="heldout") if job.eval_text else None
    inputs = prune_inputs(job, tokenizer_for="perplexity" if eval_texts is not None else None)
    prep, recipe = inputs.prep, job.recipe
    t0 = time.perf_counter()
    model, tokenizer = load_model(prep, tokenizer=inputs.tokenizer)
    before = model_summary(model)
    eval_ids = token_stream(tokenizer, eval_texts, limit=job.eval_text.tokens or None) if eval_texts else None
    if eval_ids is not None:
        before["perplexity"] = _perplexity(model, eval_ids, job.eval_text, job.progress)
    t1 = time.perf_counter()
    targets = None if recipe.budget is not None else inputs.targets  # a budget's search chooses them
    plan = prune_step(model, tokenizer, recipe, targets=targets, texts=inputs.texts, progress=job.progress)
    if plan.depth is not None and job.progress:
        for line in depth_notes(model, prep.config):
            print(f"note: {line}", file=sys.stderr)
    as_saved(model, plan, prep)
    prune_seconds = round(time.perf_counter() - t1, 2)
    after = model_summary(model)
    if eval_ids is not None:
        after["perplexity"] = _perplexity(model, eval_ids, job.eval_text, job.progress)
    report = checkpoint_report(job.model, prep, before=before, prune_seconds=prune_seconds, after=after,
                               saved_as=saved_model_type(model), total_seconds=round(time.perf_counter() - t0, 2))
    out = write_verified(model, tokenizer, job.out, plan, report, save_dtype=prep.save_dtype, force=job.force,
                         verify=job.verify, probe=eval_ids)
    return PruneResult(out, plan, report)


def _perplexity(model: nn.Module, ids, heldout: HeldoutText, progress: bool) -> dict:
    return heldout_perplexity(model, ids, heldout, progress=progress).to_json()


