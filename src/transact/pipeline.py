"""The stages joined up: in-memory ``prune`` for library users, and ``run_prune``/``run_apply_plan``/
``model_info`` behind the CLI. Every check of the user's input happens before the model's
weights are loaded."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from torch import nn

import transact
from transact import evaluate
from transact.arch import get_adapter
from transact.calibrate import (
    calibrate,
    read_texts,
    sample_windows,
    taylor_saliences,
    token_stream,
    windows_hash,
)
from transact.errors import TransactError
from transact.export import check_output_dir, reload_and_compare, write_checkpoint
from transact.models import (
    ModelSource,
    checkpoint_dtype,
    load_config,
    load_model,
    require_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_source,
)
from transact.plan import ModelShape, PrunePlan, make_plan, resolve_targets, valid_head_pairs
from transact.prune import add_compensation_biases_, check_bias_compensation, prune_
from transact.recipe import PruneRecipe
from transact.score import (
    LayerScores,
    flap_scores,
    magnitude_scores,
    minitron_scores,
    random_layer_scores,
    taylor_scores,
    transact_scores,
)

# Statistics each activation metric needs beyond the sum of squares (one calibration pass serves it).
CALIBRATION_EXTRAS: dict[str, tuple[str, ...]] = {"transact": (), "flap": ("sum",), "minitron": ("abs_mean_sq",)}


def saved_model_type(model: nn.Module) -> str:
    """The ``model_type`` the checkpoint will carry (see ``transact.arch.llama``)."""
    return get_adapter(model).portable_config(model.config).model_type


def library_versions() -> dict[str, str]:
    return {"transact": transact.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


# ---------------------------------------------------------------- library API

def load(model: str, *, device: str = "cpu", dtype: str = "auto"):
    """-> (model, tokenizer) from a directory, hub id, .gguf file or ``builtin:smollm2``."""
    prep = prepare(model, device, dtype)
    return load_model(prep.source, device=prep.device, dtype=prep.dtype)


def save(model: nn.Module, tokenizer, out: str | Path, plan: PrunePlan, *, report: dict | None = None,
         force: bool = False, verify: bool = True) -> Path:
    """Write a pruned model (in its current dtype) as a vanilla checkpoint with plan.json and report.json,
    after checking that the written files reload with identical logits (unless ``verify`` is False)."""
    check_output_dir(out, force=force)
    report = report if report is not None else {"after": evaluate.model_summary(model)}
    return write_verified(model, tokenizer, out, plan, report, next(model.parameters()).dtype, force, verify, None)


def score_model(model: nn.Module, tokenizer, recipe: PruneRecipe, texts: list[str] | None = None,
                *, progress: bool = True) -> tuple[LayerScores, str | None]:
    """Scores per layer for the recipe's metric, and the hash of the calibration tokens (if any)."""
    shape = ModelShape.of(model.config)
    metric = recipe.metric
    if metric == "random":
        return random_layer_scores(shape, recipe.seed), None
    if metric == "magnitude":
        return magnitude_scores(model, shape), None
    cal = recipe.calibration
    if tokenizer is None:
        raise TransactError(f"metric {metric!r} calibrates on text, which needs the model's tokenizer")
    texts = texts if texts is not None else read_texts(cal.text)
    windows = sample_windows(tokenizer, texts, cal.samples, cal.seq_len, recipe.seed)
    if metric == "taylor":
        saliences = taylor_saliences(model, windows, batch_size=cal.batch_size, progress=progress)
        return taylor_scores(model, saliences, shape), windows_hash(windows)
    stats = calibrate(model, windows, batch_size=cal.batch_size, progress=progress, extra=CALIBRATION_EXTRAS[metric])
    if metric == "flap":
        scores = flap_scores(model, stats, shape)
    elif metric == "minitron":
        scores = minitron_scores(stats, shape)
    else:
        scores = transact_scores(stats, shape, recipe.alpha)
    return scores, windows_hash(windows)


def prune(model: nn.Module, tokenizer, recipe: PruneRecipe, *, texts: list[str] | None = None,
          progress: bool = True) -> PrunePlan:
    """Calibrate (if the metric needs data), score, plan and prune ``model`` in place; return the plan."""
    shape = ModelShape.of(model.config)
    targets = resolve_targets(recipe, shape)
    scores, data_hash = score_model(model, tokenizer, recipe, texts, progress=progress)
    plan = make_plan(scores.heads, scores.mlp, targets, shape, recipe=recipe.to_json(),
                     calibration_hash=data_hash, versions=library_versions())
    if recipe.bias_compensation:
        add_compensation_biases_(model, plan, scores.attn_mean, scores.mlp_mean)
    prune_(model, plan)
    return plan


# ---------------------------------------------------------------- jobs behind the CLI

@dataclass(frozen=True)
class EvalText:
    """Held-out text for perplexity: a path or "builtin", capped at ``max_tokens`` (0 = all)."""

    source: str = "builtin"
    max_tokens: int = 16384
    window: int = 1024
    stride: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 0 or self.window < 2 or (self.stride is not None and not 1 <= self.stride <= self.window):
            raise TransactError("eval text: max_tokens >= 0, window >= 2 and 1 <= stride <= window are required")


@dataclass(frozen=True)
class PruneJob:
    model: str
    out: str
    recipe: PruneRecipe
    device: str = "cpu"
    dtype: str = "auto"
    eval_text: EvalText | None = None
    force: bool = False
    verify: bool = True
    progress: bool = True


@dataclass
class PruneResult:
    out: Path
    plan: PrunePlan
    report: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Prepared:
    source: ModelSource
    shape: ModelShape
    device: torch.device
    dtype: torch.dtype
    save_dtype: torch.dtype


def prepare(model_spec: str, device: str, dtype: str) -> _Prepared:
    """Resolve a model's source, shape, device and dtypes from its config alone (no weights read)."""
    source = resolve_source(model_spec)
    config = load_config(source)
    stored = checkpoint_dtype(config, source)
    compute = resolve_dtype(dtype, stored)
    # Pruning only copies values, so an upcast compute dtype saves back exactly in the stored dtype;
    # a narrower compute dtype has already rounded the weights, so they are saved as they are.
    save = stored if torch.finfo(compute).bits >= torch.finfo(stored).bits else compute
    return _Prepared(source, ModelShape.of(config), resolve_device(device), compute, save)


def _heldout_ids(tokenizer, spec: EvalText, texts: list[str]) -> torch.Tensor:
    return token_stream(tokenizer, texts, limit=spec.max_tokens or None)


def _ppl(model, ids, spec: EvalText, progress: bool) -> dict:
    window = min(spec.window, getattr(model.config, "max_position_embeddings", spec.window))
    return evaluate.perplexity(model, ids, window=window, stride=spec.stride, progress=progress).to_json()


def run_prune(job: PruneJob) -> PruneResult:
    recipe = job.recipe
    check_output_dir(job.out, force=job.force, inputs=(job.model,))
    calib_texts = read_texts(recipe.calibration.text) if recipe.needs_calibration else None
    eval_texts = read_texts(job.eval_text.source, builtin="heldout") if job.eval_text else None
    prep = prepare(job.model, job.device, job.dtype)
    targets = resolve_targets(recipe, prep.shape)  # impossible widths fail here, before loading weights
    if recipe.bias_compensation:
        check_bias_compensation(load_config(prep.source), targets)
    tokenizer = None
    if calib_texts is not None or eval_texts is not None:
        tokenizer = require_tokenizer(prep.source, "calibration and perplexity")

    t0 = time.perf_counter()
    model, tokenizer = load_model(prep.source, device=prep.device, dtype=prep.dtype, tokenizer=tokenizer)
    report: dict = {"model": job.model, "device": str(prep.device), "compute_dtype": str(prep.dtype)[6:],
                    "saved_dtype": str(prep.save_dtype)[6:], "before": evaluate.model_summary(model)}
    eval_ids = _heldout_ids(tokenizer, job.eval_text, eval_texts) if eval_texts else None
    if eval_ids is not None:
        report["before"]["perplexity"] = _ppl(model, eval_ids, job.eval_text, job.progress)

    t1 = time.perf_counter()
    plan = prune(model, tokenizer, recipe, texts=calib_texts, progress=job.progress)
    report["prune_seconds"] = round(time.perf_counter() - t1, 2)
    report["after"] = evaluate.model_summary(model)
    if eval_ids is not None:
        report["after"]["perplexity"] = _ppl(model, eval_ids, job.eval_text, job.progress)
    report["saved_as"] = saved_model_type(model)
    report["total_seconds"] = round(time.perf_counter() - t0, 2)
    report["versions"] = library_versions()
    out = write_verified(model, tokenizer, job.out, plan, report, prep.save_dtype, job.force, job.verify, eval_ids)
    return PruneResult(out, plan, report)


def write_verified(model, tokenizer, out, plan, report, save_dtype: torch.dtype, force: bool, verify: bool,
                   ids: torch.Tensor | None) -> Path:
    """write_checkpoint with the reload check on a probe: held-out tokens when there are some."""
    probe = (ids[:64] if ids is not None else torch.arange(16) % model.config.vocab_size).unsqueeze(0)
    check = reload_and_compare(model, probe) if verify else None
    return write_checkpoint(model, tokenizer, out, plan=plan, report=report, save_dtype=save_dtype,
                            force=force, verify=check)


@dataclass(frozen=True)
class ApplyPlanJob:
    model: str
    plan: str
    out: str
    device: str = "cpu"
    dtype: str = "auto"
    force: bool = False
    verify: bool = True


def run_apply_plan(job: ApplyPlanJob) -> PruneResult:
    """Recreate a pruned checkpoint from its base model and plan.json, without calibration."""
    check_output_dir(job.out, force=job.force, inputs=(job.model,))
    plan = PrunePlan.load(job.plan)
    if plan.recipe.get("bias_compensation"):
        raise TransactError("this plan's checkpoint carries FLAP compensation biases, which come from calibration "
                            "statistics that plan.json does not hold; run transact prune again to recreate it")
    prep = prepare(job.model, job.device, job.dtype)
    plan.check_applies_to(prep.shape)
    model, tokenizer = load_model(prep.source, device=prep.device, dtype=prep.dtype)
    report: dict = {"model": job.model, "plan": str(job.plan), "before": evaluate.model_summary(model)}
    prune_(model, plan)
    report["after"] = evaluate.model_summary(model)
    report["saved_as"] = saved_model_type(model)
    report["versions"] = library_versions()
    out = write_verified(model, tokenizer, job.out, plan, report, prep.save_dtype, job.force, job.verify, None)
    return PruneResult(out, plan, report)


def model_info(model_spec: str) -> dict:
    """Family, widths, parameters and KV cache of a model, from its config alone (no weights read)."""
    from transformers import AutoModelForCausalLM

    source = resolve_source(model_spec)
    config = load_config(source)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=checkpoint_dtype(config, source))
    info = evaluate.model_summary(skeleton)
    shape = ModelShape.of(config)
    info["prunable"] = {
        "heads_kv_pairs": valid_head_pairs(shape),
        "mlp": f"1..{shape.intermediate_size}",
    }
    info["source"] = source.path + (f" ({source.gguf_file})" if source.gguf_file else "")
    return info
