"""The job behind ``transact prune --layerwise``: prune a checkpoint one decoder layer at a time, reading
its weights lazily and writing the pruned checkpoint shard by shard (see ``transact.core.layerwise``).

Memory holds one layer (dense, pruned, and its read-back copy), the calibration hidden states going into
and out of it, the layer's statistics (two Gram matrices with ``refit``) and, for the first step only, the
input embedding. Everything is assembled in a work directory beside the output (``.NAME.layerwise``)
that records its progress after every layer, so an interrupted run continues with ``resume`` from the
last finished layer and gives bit-identical weights; the work directory becomes the output only when every
check has passed.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoConfig, PretrainedConfig

from transact.arch import get_adapter, shape_of
from transact.core.calibrate import WEIGHT_X_GRAD, windows_hash
from transact.core.layerwise import (
    LayerModels,
    config_changes,
    embed_windows,
    layer_of,
    layer_routes,
    prune_layer,
    run_layer,
)
from transact.core.plan import LayerPlan, PrunePlan, Targets, resolve_targets
from transact.core.step import calibration_windows, check_step
from transact.errors import TransactError
from transact.io.checkpoint import outputs_match, save_tokenizer
from transact.io.files import check_output_dir, replace_dir, write_json_atomic
from transact.io.lazy import LazyCheckpoint, ShardWriter, release_freed_memory
from transact.io.models import (
    ModelSource,
    PreparedModel,
    check_weight_files,
    dtype_name,
    load_tokenizer,
    prepare_model,
    saved_names,
    skeleton,
)
from transact.io.text import read_texts
from transact.measure.costs import model_summary
from transact.version import library_versions

if TYPE_CHECKING:
    from transact.api import PruneJob, PruneResult

PROGRESS = "progress.json"
PROGRESS_FORMAT = 1


# Without --sequential/--no-sequential a layer-wise prune calibrates each layer on the pruned layers' outputs
# (else the dense model's, which gives the whole-model path's result): on SmolLM2 it lowered one-shot
# perplexity by 10-14 % at 0.61x and 0.47x of the parameters and raised it by 5 % at 0.74x (docs/results.md,
# "Layer-wise pruning").
SEQUENTIAL_DEFAULT = True


def sequential_of(job: PruneJob) -> bool:
    return SEQUENTIAL_DEFAULT if job.sequential is None else job.sequential


def work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.layerwise"


def check_layerwise(job: PruneJob, prep: PreparedModel) -> LazyCheckpoint:
    """Everything a layer-wise prune can refuse, before any compute: -> the lazily read weights."""
    if prep.source.gguf_file or not prep.source.is_local:
        raise TransactError(f"--layerwise reads the weights lazily from a local safetensors checkpoint; "
                            f"{job.model!r} is {'a GGUF file' if prep.source.gguf_file else 'not a local directory'}")
    if WEIGHT_X_GRAD in job.recipe.statistics:
        raise TransactError(f"metric {job.recipe.metric!r} needs gradients of the whole model's loss, which a "
                            "layer-wise prune never has; use it without --layerwise")
    weights = LazyCheckpoint(prep.source.path, saved_names(skeleton(prep.config)))
    prefix = get_adapter(prep.config).layers_path
    if not any(name.startswith(f"{prefix}.0.") for name in weights.names):
        raise TransactError(f"{prep.source.path}: no tensor is named {prefix}.0.*; the checkpoint's layout is "
                            "not the one this family's modules use")
    return weights


def _run_key(job: PruneJob, prep: PreparedModel, targets: Targets, calibration_hash: str | None) -> dict:
    """What an interrupted run must share with this one to be continued by it."""
    return {"model": str(Path(prep.source.path).resolve()), "recipe": job.recipe.to_json(),
            "sequential": sequential_of(job), "targets": [targets.heads, targets.kv_heads, targets.mlp],
            "calibration_hash": calibration_hash, "dtype": str(prep.dtype), "save_dtype": str(prep.save_dtype)}


def _start(job: PruneJob, work: Path, key: dict) -> dict:
    """The progress to continue from: a fresh start, or an interrupted run's progress (``resume``)."""
    progress_file = work / PROGRESS
    if work.exists() and job.resume and progress_file.is_file():
        progress = json.loads(progress_file.read_text())
        if progress.get("format") != PROGRESS_FORMAT or progress.get("key") != key:
            raise TransactError(f"the interrupted layer-wise prune in {work} used a different model, recipe or "
                                "calibration; run it with the same settings, or start over with --force")
        return progress
    if work.exists() and not job.force and not job.resume:
        raise TransactError(f"an interrupted layer-wise prune of this output is in {work}; add --resume to "
                            "continue it or --force to start over")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    progress = {"format": PROGRESS_FORMAT, "key": key, "done": 0, "layers": [], "corrections": None,
                "config_changes": None, "hidden": None, "shards": [], "seconds": {}, "dropped_routes": []}
    write_json_atomic(progress_file, progress)
    return progress


def _store_device(prep: PreparedModel, windows: torch.Tensor | None) -> torch.device:
    """Where the hidden states live: on the compute device when inputs and outputs fit in half of its free
    memory, else in CPU memory."""
    if prep.device.type != "cuda" or windows is None:
        return torch.device("cpu")
    need = 2 * windows.numel() * prep.shape.hidden_size * torch.finfo(prep.dtype).bits // 8
    free, _ = torch.cuda.mem_get_info(prep.device)
    return prep.device if need < free // 2 else torch.device("cpu")


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


def saved_config(source: PretrainedConfig, changes: dict, save_dtype: torch.dtype) -> PretrainedConfig:
    """The config the pruned checkpoint carries: the source's with ``changes``, in the family's portable form."""
    config = copy.deepcopy(source)
    adapter = get_adapter(config)
    for key, value in changes.items():
        setattr(adapter.text_config(config), key, value)
    config.dtype = save_dtype
    return adapter.portable_config(config)


def _probe(hidden_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, 32, hidden_size, generator=generator).to(device, dtype)


def _write_layer(writer: ShardWriter, index: int, model, prefix: str, save_dtype: torch.dtype,
                 vanilla: LayerModels, stored_name: Callable[[str], str]) -> tuple[str, list[str]]:
    """Write layer ``index`` of the pruned model to its shard and check it: the shard read back into a
    one-layer model of the *saved* config must compute exactly what the in-memory layer computes."""
    adapter = get_adapter(model)
    state = {k: v.to(save_dtype) for k, v in layer_of(model).state_dict().items()}
    state = adapter.split_layer_state(adapter.saved_state(state, model.config))  # the saved class's names
    names = [stored_name(f"{prefix}.{index}.{k}") for k in state]  # the source checkpoint's layout
    file, reread = writer.write(index + 1, dict(zip(names, state.values(), strict=True)))
    check = vanilla.with_layer(index, adapter.fused_layer_state({k: reread[name] for k, name in zip(state, names,
                                                                                                    strict=True)}))
    probe = _probe(shape_of(vanilla.config).hidden_size, vanilla.dtype, vanilla.device)
    expected, _ = run_layer(model, probe, 1)
    got, _ = run_layer(check, probe, 1)
    if not outputs_match(expected, got, exact=not get_adapter(model).relayouts(model.config)):
        raise TransactError(f"layer {index} as written to {file} does not compute what the pruned layer computes")
    return file, names


def run_layerwise_prune(job: PruneJob) -> PruneResult:
    """Prune ``job.model`` layer by layer into ``job.out`` (``job.layerwise`` set); -> PruneResult."""
    from transact.api import PruneResult, calibration_purpose

    if not job.layerwise:
        raise TransactError("--sequential/--no-sequential and --resume belong to a layer-wise prune; add --layerwise")
    if job.eval_text is not None:
        raise TransactError("held-out perplexity needs the whole model in memory, which --layerwise avoids; "
                            "run transact eval on the output instead")
    t0 = time.perf_counter()
    recipe = job.recipe
    out = check_output_dir(job.out, force=job.force, inputs=(job.model,))
    prep = prepare_model(job.model, job.device, job.dtype)
    weights = check_layerwise(job, prep)
    targets = resolve_targets(recipe, prep.shape)
    check_step(prep.config, recipe, targets)
    tokenizer = load_tokenizer(prep.source)
    texts = read_texts(recipe.calibration.text) if recipe.needs_calibration else None
    if texts is not None and tokenizer is None:
        raise TransactError(f"{job.model!r} has no tokenizer files, which {calibration_purpose(recipe)} needs")
    windows = calibration_windows(tokenizer, recipe, texts)
    calibration_hash = windows_hash(windows) if windows is not None else None
    work = work_dir(out)
    progress = _start(job, work, _run_key(job, prep, targets, calibration_hash))
    writer = ShardWriter(work, prep.shape.num_layers + len(_other_tensors(weights, prep.config)))
    _prune_layers(job, prep, weights, targets, windows, calibration_hash, writer, progress)
    plan, report = _finish(job, prep, weights, tokenizer, targets, calibration_hash, writer, progress, t0)
    replace_dir(work, out)
    return PruneResult(out, plan, report)


def _prune_layers(job: PruneJob, prep: PreparedModel, weights: LazyCheckpoint, targets: Targets,
                  windows: torch.Tensor | None, calibration_hash: str | None, writer: ShardWriter,
                  progress: dict) -> None:
    config, num_layers = prep.config, prep.shape.num_layers
    adapter = get_adapter(config)
    prefix = adapter.layers_path
    models = LayerModels(config, prep.dtype, prep.device)
    store = _store_device(prep, windows)
    round_to = prep.save_dtype if prep.save_dtype != prep.dtype else None
    work, sequential = writer.folder, sequential_of(job)
    hidden = _resume_hidden(work, progress, store)
    vanilla = None
    bar = tqdm(range(num_layers), desc="layers", unit="layer", initial=progress["done"], disable=not job.progress)
    for index in range(progress["done"], num_layers):
        t = time.perf_counter()
        model = models.with_layer(index, adapter.fused_layer_state(weights.with_prefix(f"{prefix}.{index}.")))
        if index == 0 and windows is not None:
            rows = partial(weights.rows, _embedding_name(weights, config))
            hidden = embed_windows(model, rows, windows,
                                   job.recipe.calibration.batch_size, store)
        result = prune_layer(model, index, num_layers, hidden, job.recipe, targets, sequential=sequential,
                             calibration_hash=calibration_hash, round_to=round_to)
        if progress["config_changes"] is None:
            progress["config_changes"] = config_changes(config, model.config)
            progress["corrections"] = result.corrections
        if vanilla is None:
            vanilla = LayerModels(saved_config(config, progress["config_changes"], prep.save_dtype), prep.dtype,
                                  prep.device)
        file, names = _write_layer(writer, index, model, prefix, prep.save_dtype, vanilla, weights.stored_name)
        progress["layers"].append(result.kept.__dict__)
        progress.setdefault("dropped_routes", []).append(result.dropped_routes)
        progress["shards"].append([file, names])
        progress["done"] = index + 1
        progress["seconds"]["layers"] = round(progress["seconds"].get("layers", 0) + time.perf_counter() - t, 3)
        hidden = result.next_hidden
        _save_hidden(work, progress, hidden if index + 1 < num_layers else None, index + 1)
        del model, result
        release_freed_memory()
        bar.update(1)
    bar.close()


def _resume_hidden(work: Path, progress: dict, store: torch.device) -> torch.Tensor | None:
    if not progress["hidden"]:
        return None
    return load_file(str(work / progress["hidden"]))["hidden"].to(store)


def _embedding_name(weights: LazyCheckpoint, config: PretrainedConfig) -> str:
    """The checkpoint name of the input embedding, from the family's own module layout (a tied embedding
    may be stored under the LM head's name)."""
    model = skeleton(config)
    target = model.get_input_embeddings().weight
    names = [name for name, param in model.named_parameters(remove_duplicate=False) if param is target]
    held = set(weights.names)
    for name in names:
        if name in held:
            return name
    raise TransactError(f"{weights.folder}: no tensor holds the input embedding ({' or '.join(names)})")


def _other_tensors(weights: LazyCheckpoint, config: PretrainedConfig) -> list[str]:
    """Every tensor of the model outside the decoder layers (embedding, final norm, LM head, a vision tower),
    by its stored name: copied as it is. Tensors the model class does not load (Qwen3.5's multi-token
    prediction head) are left out, as transformers' own save of the pruned model leaves them out."""
    prefix = get_adapter(config).layers_path
    model_names = set(skeleton(config).state_dict())
    return [weights.stored_name(name) for name in weights.names
            if not name.startswith(f"{prefix}.") and name in model_names]


def _finish(job: PruneJob, prep: PreparedModel, weights: LazyCheckpoint, tokenizer, targets: Targets,
            calibration_hash: str | None, writer: ShardWriter, progress: dict, t0: float) -> tuple[PrunePlan, dict]:
    """Copy the tensors outside the layers, write config, tokenizer, plan and report, and check the whole
    directory against the saved config (shapes and names, from file headers)."""
    work, sequential = writer.folder, sequential_of(job)
    shards = [tuple(s) for s in progress["shards"]]
    for number, name in enumerate(_other_tensors(weights, prep.config), start=len(shards) + 1):
        shards.append((writer.copy_tensor(number, weights, name, prep.save_dtype), [name]))
    writer.write_index(shards)
    config = saved_config(prep.config, progress["config_changes"], prep.save_dtype)
    config.save_pretrained(work)
    generation = Path(prep.source.path) / "generation_config.json"
    if generation.is_file():
        shutil.copy(generation, work / generation.name)
    if tokenizer is not None:
        save_tokenizer(tokenizer, work)
    plan = PrunePlan(source=prep.shape, targets=targets, layers=[LayerPlan(**kept) for kept in progress["layers"]],
                     recipe={**job.recipe.to_json(), "layerwise": True, "sequential": sequential},
                     calibration_hash=calibration_hash, versions=library_versions(),
                     corrections=progress["corrections"] or [],
                     dropped_expert_routes=layer_routes(progress.get("dropped_routes", []), prep.shape.num_layers))
    plan.validate()
    plan.save(work / "plan.json")
    report = {"model": job.model, "device": str(prep.device), "compute_dtype": dtype_name(prep.dtype),
              "saved_dtype": dtype_name(prep.save_dtype), "layerwise": {"sequential": sequential},
              "before": model_summary(skeleton(prep.config, prep.save_dtype)),
              "after": model_summary(skeleton(config, prep.save_dtype)), "saved_as": shape_of(config).model_type,
              "prune_seconds": progress["seconds"].get("layers", 0.0),
              "total_seconds": round(time.perf_counter() - t0, 2), "versions": library_versions()}
    (work / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (work / PROGRESS).unlink()
    reloaded = AutoConfig.from_pretrained(work)
    check_weight_files(ModelSource(str(work), str(work)), reloaded)
    if shape_of(reloaded) != shape_of(config):
        raise TransactError("the written config does not describe the pruned model")
    return plan, report

