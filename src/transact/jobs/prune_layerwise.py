"""``transact prune --layerwise``: prune a checkpoint one decoder layer at a time, reading its weights lazily and
writing the pruned checkpoint shard by shard (the pipeline is ``transact.core.layerwise``).

Memory holds one layer (dense, pruned, and its read-back copy), the calibration hidden states going into
and out of it, the layer's statistics (two Gram matrices with ``refit``) and, for the first step only, the
input embedding rows the calibration uses. Everything is assembled in a work directory beside the output
(``.NAME.layerwise``) that records its progress after every layer, so an interrupted run continues with
``resume`` from the last finished layer and gives bit-identical weights; the work directory becomes the
output only when every check has passed.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from transact.arch import get_adapter, shape_of
from transact.core.calibrate import WEIGHT_X_GRAD, windows_hash
from transact.core.layerwise import (
    CheckpointLayers,
    LayerwiseRun,
    LayerwiseState,
    ShardSink,
    hidden_store,
    layerwise_recipe,
    prune_layers,
)
from transact.core.plan import PrunePlan
from transact.core.step import calibration_windows
from transact.errors import TransactError
from transact.io.checkpoint import save_tokenizer
from transact.io.files import replace_dir, write_json_atomic
from transact.io.lazy import LazyCheckpoint, ShardWriter, checkpoint_of, non_layer_tensors
from transact.io.models import ModelSource, PreparedModel, check_weight_files, load_tokenizer, skeleton
from transact.jobs.pruned import PruneInputs, PruneResult, checkpoint_report, prune_inputs
from transact.measure.costs import model_summary

if TYPE_CHECKING:
    from transact.jobs.prune import PruneJob

PROGRESS = "progress.json"
PROGRESS_FORMAT = 2  # 2: the layers' decisions as one LayerwiseState record

# Without --sequential/--no-sequential a layer-wise prune calibrates each layer on the dense model's activations,
# which gives exactly the whole-model path's result. Sequential statistics (each layer calibrated on the pruned
# layers' outputs) were 0.996-1.021x the whole-model perplexity on SmolLM2, 1.064x on Qwen2.5-Coder-0.5B and
# 1.104x on Gemma-3-270M with the default metric and 128 x 256 calibration tokens (docs/results.md, "Quality
# that transfers"): never a clear gain, up to 10 % worse.
SEQUENTIAL_DEFAULT = False


def sequential_of(job: PruneJob) -> bool:
    return SEQUENTIAL_DEFAULT if job.sequential is None else job.sequential


def work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.layerwise"


def check_layerwise(job: PruneJob, prep: PreparedModel) -> None:
    """What a layer-wise prune refuses that the whole-model path takes, before any compute."""
    if prep.source.gguf_file or not prep.source.is_local:
        raise TransactError(f"--layerwise reads the weights lazily from a local safetensors checkpoint; "
                            f"{job.model!r} is {'a GGUF file' if prep.source.gguf_file else 'not a local directory'}")
    if WEIGHT_X_GRAD in job.recipe.statistics:
        raise TransactError(f"metric {job.recipe.metric!r} needs gradients of the whole model's loss, which a "
                            "layer-wise prune never has; use it without --layerwise")


def run(job: PruneJob) -> PruneResult:
    """Prune ``job.model`` layer by layer into ``job.out`` (``job.layerwise`` set); -> PruneResult."""
    if not job.layerwise:
        raise TransactError("--sequential/--no-sequential and --resume belong to a layer-wise prune; add --layerwise")
    if job.eval_text is not None:
        raise TransactError("held-out perplexity needs the whole model in memory, which --layerwise avoids; "
                            "run transact eval on the output instead")
    t0 = time.perf_counter()
    inputs = prune_inputs(job, check_layerwise)
    prep = inputs.prep
    weights = checkpoint_of(prep.source.path, prep.config)
    windows = calibration_windows(inputs.tokenizer, job.recipe, inputs.texts)
    calibration_hash = windows_hash(windows) if windows is not None else None
    work = work_dir(inputs.out)
    progress = _start(job, work, _run_key(job, prep, inputs, calibration_hash))
    writer = ShardWriter(work, prep.shape.num_layers + len(non_layer_tensors(weights, prep.config)))
    run = LayerwiseRun(job.recipe, inputs.targets, windows, calibration_hash, sequential_of(job),
                       round_to=prep.save_dtype if prep.save_dtype != prep.dtype else None)
    state = _prune_layers(job, prep, weights, run, writer, progress)
    plan, report = _finish(job, inputs, weights, state, run, writer, progress, t0)
    replace_dir(work, inputs.out)
    return PruneResult(inputs.out, plan, report)


def _run_key(job: PruneJob, prep: PreparedModel, inputs: PruneInputs, calibration_hash: str | None) -> dict:
    """What an interrupted run must share with this one to be continued by it."""
    targets = inputs.targets
    return {"model": str(Path(prep.source.path).resolve()), "recipe": job.recipe.to_json(),
            "sequential": sequential_of(job), "targets": [targets.heads, targets.kv_heads, targets.mlp],
            "calibration_hash": calibration_hash, "dtype": str(prep.dtype), "save_dtype": str(prep.save_dtype)}


def _start(job: PruneJob, work: Path, key: dict) -> dict:
    """The progress to continue from: a fresh start, or an interrupted run's progress (``resume``)."""
    progress_file = work / PROGRESS
    if work.exists() and job.resume and progress_file.is_file():
        progress = json.loads(progress_file.read_text())
        if progress.get("format") != PROGRESS_FORMAT:
            raise TransactError(f"the interrupted layer-wise prune in {work} was written by another version of "
                                "transact; start over with --force")
        if progress.get("key") != key:
            raise TransactError(f"the interrupted layer-wise prune in {work} used a different model, recipe or "
                                "calibration; run it with the same settings, or start over with --force")
        return progress
    if work.exists() and not job.force and not job.resume:
        raise TransactError(f"an interrupted layer-wise prune of this output is in {work}; add --resume to "
                            "continue it or --force to start over")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    progress = {"format": PROGRESS_FORMAT, "key": key, "state": LayerwiseState().to_json(), "hidden": None,
                "shards": [], "seconds": {}}
    write_json_atomic(progress_file, progress)
    return progress


def _prune_layers(job: PruneJob, prep: PreparedModel, weights: LazyCheckpoint, run: LayerwiseRun,
                  writer: ShardWriter, progress: dict) -> LayerwiseState:
    """Every layer from the last one recorded on, each shard and the progress written as it is done."""
    work, adapter = writer.folder, get_adapter(prep.config)
    store = hidden_store(prep.device, prep.dtype, run.windows, prep.shape.hidden_size)
    source = CheckpointLayers(weights, prep.config, prep.dtype, prep.device, store)
    started = [time.perf_counter()]

    def after(index: int, file: str, names: list[str], state: LayerwiseState, hidden: torch.Tensor | None) -> None:
        progress["state"] = state.to_json()
        progress["shards"].append([file, names])
        now = time.perf_counter()
        progress["seconds"]["layers"] = round(progress["seconds"].get("layers", 0) + now - started[0], 3)
        _save_hidden(work, progress, hidden, index + 1)
        started[0] = time.perf_counter()

    sink = ShardSink(writer, prep.save_dtype, weights.stored_name, adapter.layers_path,
                     lambda changes: adapter.saved_config(prep.config, changes, prep.save_dtype), prep.dtype,
                     prep.device, after)
    state = LayerwiseState.from_json(progress["state"])
    return prune_layers(source, sink, run, state=state, hidden=_resume_hidden(work, progress, store),
                        progress=job.progress)


def _save_hidden(work: Path, progress: dict, hidden: torch.Tensor | None, index: int) -> None:
    old = progress["hidden"]
    progress["hidden"] = None
    if hidden is not None:
        name = f"hidden-{index:05d}.safetensors"
        save_file({"hidden": hidden.contiguous().cpu()}, str(work / name))
        progress["hidden"] = name
    write_json_atomic(work / PROGRESS, progress)
    if old and old != progress["hidden"]:
        (work / old).unlink(missing_ok=True)


def _resume_hidden(work: Path, progress: dict, store: torch.device) -> torch.Tensor | None:
    if not progress["hidden"]:
        return None
    return load_file(str(work / progress["hidden"]))["hidden"].to(store)


def _finish(job: PruneJob, inputs: PruneInputs, weights: LazyCheckpoint, state: LayerwiseState, run: LayerwiseRun,
            writer: ShardWriter, progress: dict, t0: float) -> tuple[PrunePlan, dict]:
    """Copy the tensors outside the layers, write config, tokenizer, plan and report, and check the whole
    directory against the saved config (shapes and names, from file headers)."""
    prep, work = inputs.prep, writer.folder
    shards = [tuple(s) for s in progress["shards"]]
    for number, name in enumerate(non_layer_tensors(weights, prep.config), start=len(shards) + 1):
        shards.append((writer.copy_tensor(number, weights, name, prep.save_dtype), [name]))
    writer.write_index(shards)
    config = get_adapter(prep.config).saved_config(prep.config, state.config_changes, prep.save_dtype)
    config.save_pretrained(work)
    generation = Path(prep.source.path) / "generation_config.json"
    if generation.is_file():
        shutil.copy(generation, work / generation.name)
    tokenizer = inputs.tokenizer or load_tokenizer(prep.source)
    if tokenizer is not None:
        save_tokenizer(tokenizer, work)
    plan = state.plan(prep.config, run.targets, layerwise_recipe(job.recipe, run.sequential), run.calibration_hash)
    plan.save(work / "plan.json")
    report = checkpoint_report(job.model, prep, layerwise={"sequential": run.sequential},
                               before=model_summary(skeleton(prep.config, prep.save_dtype)),
                               after=model_summary(skeleton(config, prep.save_dtype)),
                               saved_as=shape_of(config).model_type,
                               prune_seconds=progress["seconds"].get("layers", 0.0),
                               total_seconds=round(time.perf_counter() - t0, 2))
    (work / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (work / PROGRESS).unlink()
    reloaded = AutoConfig.from_pretrained(work)
    check_weight_files(ModelSource(str(work), str(work)), reloaded)
    if shape_of(reloaded) != shape_of(config):
        raise TransactError("the written config does not describe the pruned model")
    return plan, report
