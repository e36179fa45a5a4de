"""What the jobs that write a pruned checkpoint share (``transact prune``, whole-model and layer-wise, and
``apply-plan``): the prune's inputs checked before any weights are read, the report of a written checkpoint,
and the before/after table the commands print."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from transact.arch import ModelShape, get_adapter
from transact.core.budget import BUDGET_KINDS, BUDGET_NOUNS, Candidate, check_budget_shape
from transact.core.depth import DepthPlan, layers_to_drop
from transact.core.metrics import get_metric
from transact.core.plan import PrunePlan, whole_plan
from transact.core.step import check_budget_search, check_metric, check_step
from transact.core.sub_block_drop import check_sub_block_drop, sub_block
from transact.core.surgery import round_to_
from transact.core.targets import Targets, resolve_targets
from transact.decilm.configuration_decilm import MODEL_TYPE as DECILM_MODEL_TYPE
from transact.deploy import quantize, vllm
from transact.errors import TransactError
from transact.io.files import check_output_dir
from transact.io.models import PreparedModel, dtype_name, prepare_model, require_tokenizer
from transact.io.per_layer import has_per_layer_widths
from transact.io.text import read_texts
from transact.recipes import PruneRecipe
from transact.version import library_versions

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from transact.jobs.prune import PruneJob


@dataclass
class PruneResult:
    """A pruned checkpoint written to ``out``: its plan and report (what ``transact prune`` and
    ``apply-plan`` print)."""

    out: Path
    plan: PrunePlan
    report: dict = field(default_factory=dict)

    def summary(self) -> str:
        lines = [summary_table(self.report["before"], self.report["after"], self.report["saved_as"])]
        if self.plan.depth is not None:
            lines.append(depth_line(self.plan.depth))
        if self.plan.mlp_widths is not None:
            lines.append(allocation_line(self.plan))
        if self.plan.budget is not None:
            lines += budget_lines(self.plan.budget)
        routes = self.plan.dropped_expert_routes
        if routes:
            lines.append(f"dropped experts   took {100 * sum(routes) / len(routes):.2f} % of the calibration tokens' "
                         f"routes (most in one layer: {100 * max(routes):.2f} %)")
        lines.append(f"\nsaved {self.report['saved_as']} checkpoint, plan.json and report.json to {self.out}")
        if self.report["saved_as"] == DECILM_MODEL_TYPE:  # its code travels with it (auto_map)
            lines.append("it brings its own modeling code: load model and tokenizer with trust_remote_code=True "
                         "(transformers), or --trust-remote-code (vllm serve)")
        return "\n".join(lines)


def depth_line(depth: DepthPlan) -> str:
    """What the drop did, in one line of the summary."""
    if depth.part != "layers":
        layers = ", ".join(map(str, depth.dropped))
        return (f"dropped {sub_block(depth.part).noun} in layers {layers} ({len(depth.dropped)} of "
                f"{len(depth.scores)} that could go; chosen by the calibration loss)")
    first, last = depth.dropped[0], depth.dropped[-1]
    line = f"dropped layers    {first}-{last} of {depth.source.num_layers} (chosen by {depth.score} score)"
    comp = depth.compensation
    kind = "per-channel map" if comp.get("kind") == "per_channel" else "least-squares map"
    loss = comp.get("calibration_loss")
    if loss is None:
        return f"{line}; no map: {comp.get('reason', 'none')}"
    losses = f"calibration loss {loss['without']:.3f} -> {loss['with']:.3f}"
    if comp.get("applied"):
        return f"{line}; {kind} folded into layer {comp['into_layer']} ({losses})"
    return f"{line}; {kind} not kept: it raised the {losses}"


def allocation_line(plan: PrunePlan) -> str:
    """What the width search found, in one line of the summary."""
    loss = (plan.allocation or {}).get("calibration_loss", {})
    found = "the uniform widths kept" if plan.uniform else "widths " + " ".join(map(str, plan.mlp_widths))
    losses = f" (calibration loss {loss['uniform']:.3f} -> {loss['searched']:.3f})" if loss else ""
    return f"MLP per layer     {found}{losses}"


def budget_lines(record: dict) -> list[str]:
    """The budget's candidates, their parameters (and share of what the budget counts) and calibration
    losses, the chosen one marked."""
    budget, total = record["budget"], record["parameters"]
    kind = next(k for k in BUDGET_KINDS if k in budget)
    at = f" at {budget['context']} tokens of context" if "context" in budget else ""  # not in old KV plans
    counted = "" if kind == "params" else f" ({BUDGET_NOUNS[kind]}{at}, kept {record['kept_share']:.3f})"
    lines = [f"budget            {kind}={budget[kind]}{counted}: {len(record['candidates'])} candidates scored on "
             f"the {budget['score_samples']} windows after the calibration's, in {record['seconds']:.0f} s (kept "
             f"{record['kept']:.3f} of the {total / 1e6:.1f} M parameters)"]
    for i, c in enumerate(record["candidates"]):
        mark = "  <- chosen" if i == record["chosen"] else ""
        share = "" if kind == "params" else f"  {kind} {c['share']:.3f}"
        lines.append(f"  {c['mix']:<9} {Candidate.from_json(c).describe():<22} {c['params'] / total:.3f}{share}  "
                     f"loss {c['calibration_loss']:.4f}{mark}")
    return lines


def calibration_purpose(recipe: PruneRecipe) -> str:
    """What calibration is for, as a missing tokenizer's error names it."""
    if recipe.depth is not None:
        part = "layers" if recipe.depth.part == "layers" else sub_block(recipe.depth.part).noun
        return f"choosing the {part} to drop (depth pruning calibrates on text)"
    if recipe.budget is not None:
        return "scoring the budget's candidates (a budget calibrates on text)"
    if get_metric(recipe.metric).data_free:
        return f"calibration for the {'/'.join(recipe.correctors)} corrector (--no-reconstruct prunes by weights alone)"
    return "calibration and perplexity"


@dataclass(frozen=True)
class PruneInputs:
    """A prune's inputs, every one checked before any weights are read: the output directory, the prepared
    model, the resolved widths, the calibration texts (None: the step needs none) and the tokenizer (None
    where nothing needs one)."""

    out: Path
    prep: PreparedModel
    targets: Targets
    texts: list[str] | None
    tokenizer: object | None


def prune_inputs(job: PruneJob, check: Callable[[PruneJob, PreparedModel], None] | None = None, *,
                 tokenizer_for: str | None = None) -> PruneInputs:
    """Check a prune's inputs in order (output, recipe, texts, model and weight files, ``check(job, prep)``
    for the path's own limits, widths, metric and correctors, tokenizer): -> them. ``tokenizer_for``: why a
    tokenizer is needed even without calibration (held-out text), if it is."""
    recipe = job.recipe
    if not recipe.prunes_something:
        raise TransactError("nothing to prune: give heads, kv_heads, mlp, experts and/or layers to drop")
    out = check_output_dir(job.out, force=job.force, inputs=(job.model,))
    texts = read_texts(recipe.calibration.text) if recipe.needs_calibration else None
    prep = prepare_model(job.model, job.device, job.dtype)
    get_adapter(prep.config).check_prunable()
    if check is not None:
        check(job, prep)
    if recipe.depth is not None and recipe.depth.part != "layers":  # a family or count that cannot be
        check_sub_block_drop(prep.config, recipe.depth.layers, recipe.depth.part)
        if recipe.depth.part == "mlp" and (recipe.has_widths or recipe.allocation is not None):
            raise TransactError("dropping MLPs (--drop-mlp) prunes no widths in the same run: give it without "
                                "--heads, --kv-heads, --mlp and --allocate")
    elif recipe.depth is not None:  # a count of layers the model cannot spare fails here
        layers_to_drop(recipe.depth.layers, prep.shape.num_layers)
    if recipe.has_widths:
        targets = resolve_targets(recipe, prep.shape)  # impossible widths fail here, before loading weights
        check_step(prep.config, recipe, targets)
    else:  # only layers are dropped, or a budget chooses the widths after loading
        if recipe.budget is not None:
            check_budget_shape(prep.shape)
            check_metric(prep.shape, recipe)
            check_budget_search(prep.config, recipe)  # a family or MLP width the search cannot take fails here
        targets = whole_plan(prep.shape).targets
    if job.progress:
        step = recipe.allocation.step if recipe.allocation is not None else None
        for line in deployment_notes(prep.shape, targets, prep.config, mlp_step=step):
            print(f"note: {line}", file=sys.stderr)
    tokenizer = None
    if texts is not None or tokenizer_for:
        tokenizer = require_tokenizer(prep.source, calibration_purpose(recipe) if texts is not None else tokenizer_for)
    return PruneInputs(out, prep, targets, texts, tokenizer)


def deployment_notes(shape: ModelShape, targets: Targets, config: PretrainedConfig, *,
                     mlp_step: int | None = None) -> list[str]:
    """What the pruned widths mean for llama.cpp's quantized types and vLLM's kernels, for the widths pruning
    changes (the model's own hidden size is ``transact info``'s to tell), and whether vLLM loads the family's
    checkpoint with pruned heads. ``mlp_step``: a per-layer search's step, which every layer's MLP width is a
    multiple of (in place of ``targets.mlp``)."""
    searched = mlp_step is not None and targets.mlp != shape.intermediate_size
    pruned = replace(shape, num_heads=targets.heads, num_kv_heads=targets.kv_heads,
                     intermediate_size=mlp_step if searched else targets.mlp, shared_expert_size=targets.shared_mlp)
    before = quantize.matrix_widths(shape)
    changed = {name: width for name, width in quantize.matrix_widths(pruned).items() if width != before[name]}
    marlin = vllm.marlin_note(changed)
    serving = vllm.checkpoint_notes(config, heads_pruned=targets.heads != shape.num_heads)
    stepped = ["blk.*.ffn_down"] if searched else []
    return quantize.fit_notes(changed, stepped) + ([marlin] if marlin else []) + serving


def depth_notes(model: nn.Module, base_config: PretrainedConfig) -> list[str]:
    """What a depth-pruned model's new layer stack means for llama.cpp: where the family's architecture fixes
    a layer pattern the dropped block broke (or recognises a model by its layer count), an export the base
    model allowed is refused."""
    adapter = get_adapter(model)
    try:
        adapter.gguf_target(base_config)
    except TransactError:
        return []  # refused before the drop too (the family, or its widths): not the drop's doing
    try:
        adapter.gguf_target(model.config)
    except TransactError as e:
        return [f"llama.cpp, after the drop: {e}"]
    return []


def checkpoint_report(job_model: str, prep: PreparedModel, **parts: object) -> dict:
    """report.json of a written checkpoint: the model and how it was computed and saved, then ``parts``
    (before/after summaries, timings, the class it is saved as), then the library versions."""
    return {"model": job_model, "device": str(prep.device), "compute_dtype": dtype_name(prep.dtype),
            "saved_dtype": dtype_name(prep.save_dtype), **parts, "versions": library_versions()}


def as_saved(model: nn.Module, plan: PrunePlan, prep: PreparedModel) -> None:
    """Corrected weights are saved, and measured, as the checkpoint holds them: rounded to the saved dtype
    where it is narrower than the compute dtype (plain slicing only copies values that already fit)."""
    if (plan.corrections or (plan.depth and plan.depth.map_applied)) and prep.save_dtype != prep.dtype:
        round_to_(model, prep.save_dtype)


def saved_model_type(model: nn.Module) -> str:
    """The ``model_type`` the checkpoint will carry (see ``transact.arch.llama``; per-layer widths:
    ``transact.io.per_layer``)."""
    if has_per_layer_widths(model):
        return DECILM_MODEL_TYPE
    return get_adapter(model).saved_model_type(model.config)



# ---------------------------------------------------------------- what the command prints

def _fmt_ratio(before: float, after: float) -> str:
    return f"{after / before:.2f}x" if before else "-"


def _sub_block_rows(before: dict, after: dict) -> list[tuple[str, str, str, str]]:
    """A row for the layers with attention, and one for those with an MLP, where the prune changed their count
    (sub-blocks dropped)."""
    rows = []
    for label, key in (("layers with attention", "attention_layers"), ("layers with an MLP", "mlp_layers")):
        b, a = before.get(key, before["layers"]), after.get(key, after["layers"])
        if b != a and before["layers"] == after["layers"]:
            rows.append((label, f"{b:,}", f"{a:,}", _fmt_ratio(b, a)))
    return rows


def summary_table(before: dict, after: dict, saved_as: str | None = None) -> str:
    """The before/after table printed at the end of a prune."""
    def counted(label: str, key: str) -> tuple[str, str, str, str]:
        return label, f"{before[key]:,}", f"{after[key]:,}", _fmt_ratio(before[key], after[key])

    moe = "experts" in before
    rows = [
        ("family", before["model_type"],
         after["model_type"] + (f" (saved as {saved_as})" if saved_as and saved_as != after["model_type"] else ""), ""),
        *([counted("layers", "layers")] if before["layers"] != after["layers"] else []),
        *_sub_block_rows(before, after),
        ("heads / kv heads", "{heads} / {kv_heads}".format(**before), "{heads} / {kv_heads}".format(**after), ""),
        counted("mlp channels" + (" per expert" if moe else ""), "mlp"),
        *([counted("experts", "experts"), counted("active parameters", "active_params")] if moe else []),
        counted("parameters", "params"),
        counted("KV cache bytes/token", "kv_cache_bytes_per_token"),
    ]
    for ctx in before["flops_per_token"]:
        b, a = before["flops_per_token"][ctx], after["flops_per_token"][ctx]
        rows.append((f"GFLOPs/token @{ctx} ctx", f"{b / 1e9:.3f}", f"{a / 1e9:.3f}", _fmt_ratio(b, a)))
    if "perplexity" in before and "perplexity" in after:
        b, a = before["perplexity"]["perplexity"], after["perplexity"]["perplexity"]
        rows.append((f"perplexity ({after['perplexity']['tokens']} tokens)", f"{b:.2f}", f"{a:.2f}", _fmt_ratio(b, a)))
    header = ("", "before", "after", "after/before")
    widths = [max(len(r[i]) for r in [*rows, header]) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows])
