"""The library API and the jobs behind ``transact prune``, ``apply-plan`` and ``info``.

``load``/``prune``/``save`` work on models in memory; ``run_prune``/``run_apply_plan``/``model_info`` take a
model by name, check every input before any weights are read, and write a verified checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from transact.arch import get_adapter
from transact.core.layerwise import prune_by_layer
from transact.core.metrics import get_metric
from transact.core.plan import PrunePlan, resolve_targets, valid_head_pairs
from transact.core.step import (
    check_reproducible,
    check_step,
    needs_recalibration,
    prune_step,
    reapply_plan,
)
from transact.core.surgery import round_to_
from transact.io.checkpoint import write_verified
from transact.io.files import check_output_dir
from transact.io.models import PreparedModel, dtype_name, load_model, prepare_model, require_tokenizer, skeleton
from transact.io.text import read_texts, token_stream
from transact.layerwise_prune import run_layerwise_prune
from transact.measure.costs import layerwise_memory, model_summary
from transact.measure.perplexity import heldout_perplexity
from transact.recipes import Calibration, HeldoutText, PruneRecipe
from transact.version import library_versions


def load(model: str, *, device: str = "cpu", dtype: str = "auto"):
    """-> (model, tokenizer) from a directory, hub id, .gguf file or ``builtin:smollm2``."""
    return load_model(prepare_model(model, device, dtype))


def prune(model: nn.Module, tokenizer, recipe: PruneRecipe, *, texts: list[str] | None = None,
          sequential: bool = False, progress: bool = True) -> PrunePlan:
    """Calibrate (if the recipe needs data), score, select, correct and slice ``model`` in place; -> the plan.
    ``sequential``: layer by layer, each layer calibrated on what the already-pruned layers produce."""
    if sequential:
        return prune_by_layer(model, tokenizer, recipe, sequential=True, texts=texts, progress=progress)
    return prune_step(model, tokenizer, recipe, texts=texts, progress=progress)


def save(model: nn.Module, tokenizer, out: str | Path, plan: PrunePlan, *, report: dict | None = None,
         force: bool = False, verify: bool = True) -> Path:
    """Write a pruned model (in its current dtype) as a vanilla checkpoint with plan.json and report.json,
    after checking that the written files reload with identical logits (unless ``verify`` is False)."""
    check_output_dir(out, force=force)
    report = report if report is not None else {"after": model_summary(model)}
    return write_verified(model, tokenizer, out, plan, report, save_dtype=next(model.parameters()).dtype,
                          force=force, verify=verify)


def saved_model_type(model: nn.Module) -> str:
    """The ``model_type`` the checkpoint will carry (see ``transact.arch.llama``)."""
    return get_adapter(model).saved_model_type(model.config)


# ---------------------------------------------------------------- jobs behind the CLI

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
    layerwise: bool = False  # one decoder layer in memory at a time (transact.layerwise_prune)
    # layer-wise: calibrate each layer on the pruned layers' outputs (None: the layer-wise default, True)
    sequential: bool | None = None
    resume: bool = False  # layer-wise: continue an interrupted run


@dataclass
class PruneResult:
    out: Path
    plan: PrunePlan
    report: dict = field(default_factory=dict)


def calibration_purpose(recipe: PruneRecipe) -> str:
    """What calibration is for, as a missing tokenizer's error names it."""
    if get_metric(recipe.metric).data_free:
        return f"calibration for the {'/'.join(recipe.correctors)} corrector (--no-reconstruct prunes by weights alone)"
    return "calibration and perplexity"


def _perplexity(model: nn.Module, ids, heldout: HeldoutText, progress: bool) -> dict:
    return heldout_perplexity(model, ids, heldout, progress=progress).to_json()


def run_prune(job: PruneJob) -> PruneResult:
    """Prune a model by name and write the verified checkpoint; every input is checked before loading."""
    if job.layerwise or job.sequential is not None or job.resume:
        return run_layerwise_prune(job)
    recipe = job.recipe
    check_output_dir(job.out, force=job.force, inputs=(job.model,))
    calib_texts = read_texts(recipe.calibration.text) if recipe.needs_calibration else None
    eval_texts = read_texts(job.eval_text.text, builtin="heldout") if job.eval_text else None
    prep = prepare_model(job.model, job.device, job.dtype)
    targets = resolve_targets(recipe, prep.shape)  # impossible widths fail here, before loading weights
    check_step(prep.config, recipe, targets)
    tokenizer = None
    if calib_texts is not None or eval_texts is not None:
        tokenizer = require_tokenizer(prep.source, calibration_purpose(recipe))

    t0 = time.perf_counter()
    model, tokenizer = load_model(prep, tokenizer=tokenizer)
    report: dict = {"model": job.model, "device": str(prep.device), "compute_dtype": dtype_name(prep.dtype),
                    "saved_dtype": dtype_name(prep.save_dtype), "before": model_summary(model)}
    eval_ids = token_stream(tokenizer, eval_texts, limit=job.eval_text.tokens or None) if eval_texts else None
    if eval_ids is not None:
        report["before"]["perplexity"] = _perplexity(model, eval_ids, job.eval_text, job.progress)

    t1 = time.perf_counter()
    plan = prune_step(model, tokenizer, recipe, targets=targets, texts=calib_texts, progress=job.progress)
    _as_saved(model, plan, prep)
    report["prune_seconds"] = round(time.perf_counter() - t1, 2)
    report["after"] = model_summary(model)
    if eval_ids is not None:
        report["after"]["perplexity"] = _perplexity(model, eval_ids, job.eval_text, job.progress)
    report["saved_as"] = saved_model_type(model)
    report["total_seconds"] = round(time.perf_counter() - t0, 2)
    report["versions"] = library_versions()
    out = write_verified(model, tokenizer, job.out, plan, report, save_dtype=prep.save_dtype, force=job.force,
                         verify=job.verify, probe=eval_ids)
    return PruneResult(out, plan, report)


def _as_saved(model: nn.Module, plan: PrunePlan, prep: PreparedModel) -> None:
    """Corrected weights are saved, and measured, as the checkpoint holds them: rounded to the saved dtype
    where it is narrower than the compute dtype (plain slicing only copies values that already fit)."""
    if plan.corrections and prep.save_dtype != prep.dtype:
        round_to_(model, prep.save_dtype)


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


def run_apply_plan(job: ApplyPlanJob) -> PruneResult:
    """Recreate a pruned checkpoint from its base model and plan.json (recalibrating only where a correction
    depends on calibration statistics)."""
    check_output_dir(job.out, force=job.force, inputs=(job.model,))
    plan = PrunePlan.load(job.plan)
    check_reproducible(plan)
    prep = prepare_model(job.model, job.device, job.dtype)
    plan.check_applies_to(prep.shape)
    texts, tokenizer = None, None
    if needs_recalibration(plan):  # the calibration text and tokenizer are checked before the weights are read
        texts = read_texts(PruneRecipe.from_json(plan.recipe).calibration.text)
        tokenizer = require_tokenizer(prep.source, "recalibrating the plan's corrections")
    model, tokenizer = load_model(prep, tokenizer=tokenizer)
    report: dict = {"model": job.model, "plan": str(job.plan), "before": model_summary(model)}
    plan = reapply_plan(model, plan, tokenizer, texts=texts, progress=job.progress)
    _as_saved(model, plan, prep)
    report["after"] = model_summary(model)
    report["saved_as"] = saved_model_type(model)
    report["versions"] = library_versions()
    out = write_verified(model, tokenizer, job.out, plan, report, save_dtype=prep.save_dtype, force=job.force,
                         verify=job.verify)
    return PruneResult(out, plan, report)


def model_info(model_spec: str) -> dict:
    """Family, widths, parameters and KV cache of a model, from its config alone (no weights read)."""
    prep = prepare_model(model_spec)
    info = model_summary(skeleton(prep.config, prep.save_dtype))
    shape = prep.shape
    info["prunable"] = {"heads_kv_pairs": valid_head_pairs(shape), "mlp": f"1..{shape.intermediate_size}"}
    if shape.is_moe:
        m = shape.mlp_multiple
        info["prunable"]["mlp"] = f"{m}..{shape.intermediate_size} per expert, in multiples of {m}"
        info["prunable"]["experts"] = (f"{shape.experts_per_token}..{shape.num_experts} (--experts; at least the "
                                       f"{shape.experts_per_token} each token is routed to)")
    info["notes"] = get_adapter(prep.config).family_notes(prep.config)
    source = prep.source
    info["source"] = source.path + (f" ({source.gguf_file})" if source.gguf_file else "")
    info["layerwise_memory_bytes"] = layerwise_memory(shape, prep.dtype, Calibration())
    return info
