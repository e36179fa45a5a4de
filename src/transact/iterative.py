"""``transact run``: iterative pruning with recovery training, resumable at any moment.

Phases 1..n are the shots (re-calibrate the current model, prune to the shot's widths, train
``tokens_per_shot``); phase n+1 is the final recovery (``final_tokens``), if any. The resumable state lives
in ``OUT/state/``: the weights (safetensors), the optimizer moments (safetensors + JSON), and
``progress.json`` (where the run is: phase, steps done, data position, plans, losses, measurements). It is
replaced atomically (a new directory renamed over the old one) at the end of every phase and every
``save_every`` steps, so a run killed at any moment resumes from the last complete state. Calibration,
data order and per-step random numbers depend only on that state, so a resumed run ends with the same
weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from transact import evaluate
from transact.calibrate import read_texts, token_stream
from transact.data import BlockStream, check_source
from transact.errors import TransactError
from transact.export import (
    check_output_dir,
    check_writable,
    move_into_place,
    old_dir,
    replace_dir,
    staging_dir,
    write_json_atomic,
)
from transact.models import load_model as load_pretrained
from transact.models import require_tokenizer, resolve_device
from transact.pipeline import library_versions, prepare, score_model, write_verified
from transact.plan import ModelShape, PrunePlan, Targets, check_schedule, compose_plans, linear_schedule, make_plan
from transact.plan import resolve_targets as resolve_widths
from transact.prune import prune_
from transact.recipe import DATA_FREE_METRICS, RunRecipe
from transact.train import PhaseSpec, lora_merge, lora_wrap, steps_for, train_phase

STATE_FORMAT = 1
STATE = "state"


@dataclass
class RunResult:
    out: Path
    report: dict
    main_process: bool = True  # False on the other processes of a distributed run (they print nothing)


# ---------------------------------------------------------------- checks before anything is loaded

def schedule_of(recipe: RunRecipe, shape: ModelShape) -> list[Targets]:
    """The widths after each shot, resolved against the dense model and checked."""
    def resolve(widths, key: str) -> Targets:
        try:
            return resolve_widths(widths.as_prune_recipe(), shape)
        except TransactError as e:
            raise TransactError(f"recipe key {key!r}: {e}") from None

    target = resolve(recipe.target, "target") if recipe.target is not None else None
    if recipe.schedule is not None:
        steps = [resolve(w, f"schedule[{i}]") for i, w in enumerate(recipe.schedule)]
        if target is not None and steps[-1] != target:
            raise TransactError(f"recipe key 'schedule': its last shot {steps[-1]} is not the target {target}")
    else:
        steps = linear_schedule(shape, target, recipe.num_shots)
    try:
        check_schedule(shape, steps)
    except TransactError as e:
        raise TransactError(f"recipe key 'schedule': {e}") from None
    return steps


def _state_dir(out: Path) -> Path | None:
    """The last complete state: ``state/``, or the parked previous one if a run died between the two
    renames of ``replace_dir``."""
    for state in (out / STATE, old_dir(out / STATE)):
        if (state / "progress.json").is_file():
            return state
    return None


def _check_out(recipe: RunRecipe, resume: bool) -> Path:
    out = Path(recipe.out).expanduser().resolve()
    if not resume:
        if out.is_dir() and any(out.iterdir()):
            raise TransactError(f"the output directory {out} is not empty; to continue the run there add --resume, "
                                "or choose another out")
        check_output_dir(out, force=False, inputs=(recipe.model,))
        return out
    if not (out / "recipe.json").is_file():
        raise TransactError(f"--resume: {out} holds no transact run (recipe.json is missing)")
    saved = json.loads((out / "recipe.json").read_text())
    now = recipe.to_json()
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        raise TransactError(f"--resume: the recipe differs from the one this run started with in "
                            f"{', '.join(changed)}; a resumed run must use the same recipe")
    state = _state_dir(out)
    if state is not None and json.loads((state / "progress.json").read_text()).get("done"):
        raise TransactError(f"the run in {out} has already finished")
    check_writable(out)
    return out


def _resolve_precision(recipe: RunRecipe, device: torch.device) -> str:
    p = recipe.training.precision
    if p == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    return "bf16" if p == "bf16" else "no"


def _teacher_device(recipe: RunRecipe, device: torch.device) -> torch.device:
    name = recipe.training.kd.teacher_device
    if name == "same":
        return device
    try:
        return resolve_device(name)
    except TransactError as e:
        raise TransactError(f"recipe key 'training.kd.teacher_device': {e}") from None


# ---------------------------------------------------------------- state on disk

def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, s in state["state"].items() for k, v in s.items()}
    keys = {str(i): list(s) for i, s in state["state"].items()}
    return tensors, {"param_groups": state["param_groups"], "keys": keys}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {int(i): {k: tensors[f"{i}.{k}"] for k in keys} for i, keys in meta["keys"].items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def save_state(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, progress: dict) -> None:
    """Write the resumable state to a new directory and swap it in (old state survives until then)."""
    tmp = staging_dir(out / STATE)
    try:
        save_model(model, str(tmp / "model.safetensors"))
        if optimizer is not None:
            tensors, meta = _optimizer_tensors(optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(meta) + "\n")
        (tmp / "progress.json").write_text(json.dumps(progress, indent=1) + "\n")
        replace_dir(tmp, out / STATE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_progress(state: Path) -> dict:
    progress = json.loads((state / "progress.json").read_text())
    if progress.get("format") != STATE_FORMAT:
        raise TransactError(f"{state} was written by another version of transact (format {progress.get('format')})")
    return progress


def load_optimizer_state(state: Path) -> dict | None:
    if not (state / "optimizer.safetensors").is_file():
        return None
    return _optimizer_state(load_file(str(state / "optimizer.safetensors")),
                            json.loads((state / "optimizer.json").read_text()))


# ---------------------------------------------------------------- the run

class _Run:
    """One run's moving parts; methods are the steps of ``run``."""

    def __init__(self, recipe: RunRecipe, out: Path, resume: bool, progress: bool) -> None:
        from accelerate import Accelerator

        self.recipe, self.out, self.progress_bars = recipe, out, progress
        training = recipe.training
        self.prep = prepare(recipe.model, recipe.device, "float32")
        self.schedule = schedule_of(recipe, self.prep.shape)
        needs_text = recipe.metric not in DATA_FREE_METRICS
        self.calib_texts = read_texts(recipe.calibration.text) if needs_text else None
        self.heldout_texts = read_texts(recipe.heldout.text, builtin="heldout") if recipe.heldout.tokens else None
        self.phases = len(self.schedule) + (1 if training.final_tokens else 0)
        if training.tokens_per_shot or training.final_tokens:
            check_source(training.data)
        if training.method == "lora":
            import peft  # noqa: F401  (fail now if it is missing)
        self.tokenizer = require_tokenizer(self.prep.source, "calibration, training and perplexity")

        cpu = self.prep.device.type == "cpu"
        mixed = _resolve_precision(recipe, self.prep.device)
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=mixed)
        self.mixed = mixed
        self.teacher_device = _teacher_device(recipe, self.accelerator.device) if training.method == "kd" else None
        self.resume = resume
        self.resumed_optimizer: dict | None = None
        self._end_optimizer = None

    # -- helpers
    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def heldout_ppl(self, model: nn.Module) -> float | None:
        if self.heldout_ids is None:
            return None
        result = None
        if self.main:
            window = min(self.recipe.heldout.window, getattr(model.config, "max_position_embeddings", 1 << 30))
            model.eval()
            result = evaluate.perplexity(model, self.heldout_ids.to(self.accelerator.device), window=window,
                                         progress=self.progress_bars).perplexity
        return self._broadcast(result)

    def _broadcast(self, value):
        from accelerate.utils import broadcast_object_list

        if self.accelerator.num_processes == 1:
            return value
        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def save(self, model: nn.Module, optimizer, progress: dict) -> None:
        if self.main:
            save_state(self.out, model, optimizer, progress)
        self.accelerator.wait_for_everyone()

    # -- the steps
    def start(self) -> tuple[nn.Module, dict]:
        """Load the dense model; on resume rebuild the saved architecture and weights."""
        if self.main and not self.resume:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out / "recipe.json", self.recipe.to_json())
        model, _ = load_pretrained(self.prep.source, device=self.accelerator.device, dtype=torch.float32,
                                   tokenizer=self.tokenizer)
        self.dense_summary = evaluate.model_summary(model)
        self.heldout_ids = (token_stream(self.tokenizer, self.heldout_texts, limit=self.recipe.heldout.tokens)
                            if self.heldout_texts else None)
        self.teacher = None
        if self.teacher_device is not None:
            self.teacher = copy.deepcopy(model).to(self.teacher_device).eval().requires_grad_(False)
        state = _state_dir(self.out) if self.resume else None
        if state is None:
            progress = {"format": STATE_FORMAT, "phase": 1, "pruned": False, "step": 0, "data_position": 0,
                        "plans": [], "shots": [], "losses": [], "done": False,
                        "dense": {**self.dense_summary, "perplexity": self.heldout_ppl(model)}}
            return model, progress
        progress = load_progress(state)
        for plan in progress["plans"]:
            prune_(model, PrunePlan.from_json(plan))
        if self.recipe.training.method == "lora" and progress["step"]:  # saved mid-phase, adapters included
            model = lora_wrap(model, self.recipe.training.lora, self._lora_seed(progress["phase"]))
        load_model(model, str(state / "model.safetensors"), device=str(self.accelerator.device))
        self.resumed_optimizer = load_optimizer_state(state) if progress["step"] else None
        return model, progress

    def _lora_seed(self, phase: int) -> int:
        return self.recipe.training.seed * 1_000_003 + phase

    def prune_shot(self, model: nn.Module, progress: dict) -> None:
        """Calibrate the current model, plan this shot's widths, prune (every process the same plan)."""
        shot = progress["phase"]
        targets = self.schedule[shot - 1]
        shape = ModelShape.of(model.config)
        t0 = time.perf_counter()
        plan_json = None
        if self.main:
            recipe = self.recipe.prune_recipe(self.recipe.target or self.recipe.schedule[-1])
            model.eval()
            scores, data_hash = score_model(model, self.tokenizer, recipe, self.calib_texts,
                                            progress=self.progress_bars)
            plan_json = make_plan(scores.heads, scores.mlp, targets, shape, recipe={"shot": shot, **recipe.to_json()},
                                  calibration_hash=data_hash, versions=library_versions()).to_json()
        plan = PrunePlan.from_json(self._broadcast(plan_json))
        prune_(model, plan)
        progress["plans"].append(plan.to_json())
        progress["pruned"], progress["step"] = True, 0
        progress["current"] = {"phase": shot, "widths": [targets.heads, targets.kv_heads, targets.mlp],
                               "prune_seconds": round(time.perf_counter() - t0, 2),
                               "params": evaluate.count_parameters(model),
                               "perplexity_pruned": self.heldout_ppl(model), "train_seconds": 0.0}

    def train(self, model: nn.Module, progress: dict) -> nn.Module:
        """Train the current phase to its end, saving every ``save_every`` steps; -> the trained model."""
        training, phase = self.recipe.training, progress["phase"]
        tokens = training.tokens_per_shot if phase <= len(self.schedule) else training.final_tokens
        world = self.accelerator.num_processes
        total = steps_for(tokens, training, world)
        current = progress.setdefault("current", {"phase": phase, "train_seconds": 0.0,
                                                  "params": evaluate.count_parameters(model)})
        current["train_steps"], current["train_tokens"] = total, total * training.tokens_per_step * world
        self._end_optimizer = None
        if progress["step"] >= total:
            return model
        lora = training.method == "lora"
        if lora and not _has_lora(model):
            model = lora_wrap(model, training.lora, self._lora_seed(phase))
        stream = BlockStream(self.tokenizer, training.data, training.seq_len, training.seed, training.shuffle_buffer,
                             position=progress["data_position"], rank=self.accelerator.process_index, world=world)
        spec = PhaseSpec(phase=phase, total_steps=total, start_step=progress["step"],
                         optimizer_state=self.resumed_optimizer,
                         tokens_before=sum(p.get("train_tokens", 0) for p in progress["shots"]))
        self.resumed_optimizer = None
        started = time.perf_counter()
        base_losses = list(progress["losses"])

        def checkpoint(unwrapped, optimizer, done, log):
            progress.update(step=done, data_position=stream.position, losses=base_losses + log.records)
            current["train_seconds"] += time.perf_counter() - started
            self.save(unwrapped, optimizer, progress)
            current["train_seconds"] -= time.perf_counter() - started

        log, optimizer = train_phase(self.accelerator, model, stream, training, spec, teacher=self.teacher,
                                     on_save=checkpoint, progress=self.progress_bars)
        current["train_seconds"] += time.perf_counter() - started
        progress.update(step=total, data_position=stream.position, losses=base_losses + log.records)
        self._end_optimizer = optimizer
        if lora:
            model = lora_merge(model)
            self._end_optimizer = None  # its moments belong to the adapters, which are merged away
        return model

    def end_phase(self, model: nn.Module, progress: dict) -> None:
        current = progress.pop("current")  # train() always leaves it
        current["perplexity"] = self.heldout_ppl(model)
        current["train_seconds"] = round(current["train_seconds"], 2)
        steps = current.get("train_steps", 0)
        current["train_tokens_per_second"] = (round(current["train_tokens"] / current["train_seconds"], 1)
                                              if steps and current["train_seconds"] else None)
        progress["shots"].append(current)
        progress.update(phase=progress["phase"] + 1, pruned=False, step=0)
        self.save(model, getattr(self, "_end_optimizer", None), progress)


def _has_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def run(recipe: RunRecipe, *, resume: bool = False, progress: bool = True) -> RunResult:
    """Prune iteratively with recovery training as ``recipe`` says; write the final checkpoint and report."""
    out = _check_out(recipe, resume)
    r = _Run(recipe, out, resume, progress)
    t0 = time.perf_counter()
    model, state = r.start()
    n_shots = len(r.schedule)
    while state["phase"] <= r.phases:
        if state["phase"] <= n_shots and not state["pruned"]:
            r.prune_shot(model, state)
        model = r.train(model, state)
        r.end_phase(model, state)
    report = _finish(r, model, state, time.perf_counter() - t0)
    return RunResult(out, report, r.main)


def _finish(r: _Run, model: nn.Module, progress: dict, seconds: float) -> dict:
    """Write the final checkpoint into OUT (next to recipe.json), with plans, report and loss curve."""
    from transact.report import plot_training

    digests = _gather(r, weights_digest(model))
    if len(set(digests)) > 1:
        raise TransactError(f"the {len(digests)} processes ended with different weights ({', '.join(digests)}); "
                            "the distributed setup is not keeping replicas in step, so nothing was written")
    plans = [PrunePlan.from_json(p) for p in progress["plans"]]
    composed = plans[0]
    for plan in plans[1:]:
        composed = compose_plans(composed, plan, recipe=r.recipe.to_json(), versions=library_versions())
    report = {"model": r.recipe.model, "recipe": r.recipe.to_json(), "dense": progress["dense"],
              "final": evaluate.model_summary(model), "phases": progress["shots"],
              "schedule": [[t.heads, t.kv_heads, t.mlp] for t in r.schedule],
              "processes": r.accelerator.num_processes, "device": str(r.accelerator.device),
              "mixed_precision": r.mixed, "weights_sha256_per_process": digests,
              "seconds_this_process": round(seconds, 1), "versions": library_versions()}
    save_dtype = r.prep.save_dtype
    if save_dtype != torch.float32:
        # Training left fp32 values the checkpoint's dtype cannot hold: round them in memory first, so the
        # reload check compares like with like, and measure what is actually saved.
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(save_dtype).to(p.dtype))
        report["final"]["perplexity_as_saved"] = r.heldout_ppl(model)
        report["final"]["saved_dtype"] = str(save_dtype).removeprefix("torch.")
    if r.main:
        staged = r.out / ".final"
        shutil.rmtree(staged, ignore_errors=True)
        model.eval()
        write_verified(model, r.tokenizer, staged, composed, report, save_dtype, True, True, r.heldout_ids)
        (staged / "plans.json").write_text(json.dumps({"shots": progress["plans"]}, indent=1) + "\n")
        (staged / "losses.json").write_text(json.dumps(progress["losses"]) + "\n")
        (staged / "report.md").write_text(report_markdown(report) + "\n")
        plot_training(progress["losses"], progress["shots"], progress["dense"].get("perplexity"), staged / "loss.png")
        for f in sorted(staged.iterdir()):
            move_into_place(f, r.out / f.name)
        shutil.rmtree(staged, ignore_errors=True)
        progress["done"] = True
        shutil.rmtree(r.out / STATE, ignore_errors=True)
        shutil.rmtree(old_dir(r.out / STATE), ignore_errors=True)
        (r.out / STATE).mkdir()
        write_json_atomic(r.out / STATE / "progress.json", progress)
    r.accelerator.wait_for_everyone()
    return report


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over every tensor of the state dict (names, dtypes, shapes, values), for comparing replicas."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _gather(r: _Run, value: str) -> list[str]:
    if r.accelerator.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return list(gather_object([value]))


def report_markdown(report: dict) -> str:
    d = report["dense"]
    lines = ["| phase | widths (heads/kv/mlp) | params | ppl after pruning | train tokens | train s | tokens/s | ppl |",
             "|---|---|---:|---:|---:|---:|---:|---:|",
             f"| dense | {d['heads']}/{d['kv_heads']}/{d['mlp']} | {d['params'] / 1e6:.1f} M | | | | | "
             f"{_num(d.get('perplexity'))} |"]
    for p in report["phases"]:
        name = f"shot {p['phase']}" if "widths" in p else "final"
        widths = "/".join(map(str, p["widths"])) if "widths" in p else ""
        lines.append(f"| {name} | {widths} | {p['params'] / 1e6:.1f} M | {_num(p.get('perplexity_pruned'))} | "
                     f"{p.get('train_tokens', 0):,} | {p['train_seconds']:.0f} | "
                     f"{_num(p.get('train_tokens_per_second'))} | {_num(p.get('perplexity'))} |")
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.2f}"
