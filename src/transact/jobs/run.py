"""``transact run``: iterative pruning with recovery training, resumable at any moment.

Phases 1..n are the shots (re-calibrate the current model, prune to the shot's widths as the recipe's
``prune`` section says, train ``tokens_per_shot``); phase n+1 is the final recovery (``final_tokens``), if
any. Training is the recovery method's (``transact.recovery.methods``). The resumable state
(``transact.recovery.state``) is replaced atomically at the end of every phase and every ``save_every``
steps, so a run killed at any moment resumes from the last complete state. Calibration, data order and
per-step random numbers depend only on that state, so a resumed run ends with the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model as load_weights
from torch import nn

from transact.arch import get_adapter
from transact.core.calibrate import statistics_bytes
from transact.core.layerwise import prune_model
from transact.core.plan import PrunePlan
from transact.core.step import apply_step, check_step
from transact.errors import TransactError
from transact.extras import require
from transact.io.files import check_output_dir, check_writable, write_json_atomic
from transact.io.lazy import release_freed_memory
from transact.io.models import (
    dtype_name,
    load_model,
    prepare_model,
    require_tokenizer,
    resolve_device,
    skeleton,
    with_compute_dtype,
)
from transact.io.text import read_texts, token_stream
from transact.measure.costs import count_parameters, model_summary, peak_memory_bytes
from transact.measure.perplexity import heldout_perplexity
from transact.recipes import RunRecipe
from transact.recovery import memory, optim, sharded
from transact.recovery.data import BlockStream, check_training_data
from transact.recovery.distributed import Processes, check_launch, weights_digest
from transact.recovery.methods import RunFacts, get_method
from transact.recovery.report import report_markdown, write_run_outputs
from transact.recovery.schedule import phase_steps, schedule_of
from transact.recovery.state import (
    PhaseRecord,
    RunState,
    latest_state,
    load_optimizer_state,
    load_state,
    mark_done,
    save_sharded_state,
    save_state,
)
from transact.recovery.train import PhaseSpec, steps_for, train_phase
from transact.version import library_versions


@dataclass(frozen=True)
class RunJob:
    recipe: RunRecipe
    resume: bool = False  # continue the run in the recipe's out directory
    progress: bool = True


@dataclass
class RunResult:
    out: Path
    report: dict
    main_process: bool = True  # False on the other processes of a distributed run (they print nothing)

    def summary(self) -> str:
        if not self.main_process:
            return ""
        plan = "plan.json, " if (self.out / "plan.json").is_file() else ""  # none: a run without shots
        return (report_markdown(self.report) + f"\n\nsaved the final checkpoint, {plan}plans.json, "
                f"report.json/.md and loss.png to {self.out}")


# ---------------------------------------------------------------- checks before anything is loaded

def check_out(recipe: RunRecipe, resume: bool) -> Path:
    """The run's output directory: empty for a new run; for ``resume``, an unfinished run of this recipe."""
    out = Path(recipe.out).expanduser().resolve()
    if not resume:
        if out.is_dir() and any(out.iterdir()):
            raise TransactError(f"the output directory {out} is not empty; to continue the run there add --resume, "
                                "or choose another out")
        check_output_dir(out, force=False, inputs=(recipe.model,))
        return out
    if not (out / "recipe.json").is_file():
        raise TransactError(f"--resume: {out} holds no transact run (recipe.json is missing)")
    try:  # read back through the recipe type, so that a key the format gained since compares as its default
        saved = RunRecipe.from_dict(json.loads((out / "recipe.json").read_text())).to_json()
    except (TransactError, ValueError) as e:
        raise TransactError(f"--resume: {out / 'recipe.json'} cannot be read: {e}") from None
    now = recipe.to_json()
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        raise TransactError(f"--resume: the recipe differs from the one this run started with in "
                            f"{', '.join(changed)}; a resumed run must use the same recipe")
    state = latest_state(out)
    if state is not None and load_state(state).done:
        raise TransactError(f"the run in {out} has already finished")
    check_writable(out)
    return out


# ---------------------------------------------------------------- the run

class Run:
    """One run: its inputs, all checked before any weights load, and what the loop's steps share."""

    def __init__(self, recipe: RunRecipe, out: Path, resume: bool, progress: bool) -> None:
        require("train", "transact run")
        from accelerate import Accelerator

        self.recipe, self.out, self.resume, self.progress_bars = recipe, out, resume, progress
        training = recipe.training
        self.method = get_method(training.method)
        self.trains = bool(training.tokens_per_shot or training.final_tokens)
        self.weights, self.optimizer = optim.resolve(training, resolve_device(recipe.device))
        if not self.trains:
            self.weights = torch.float32
        optim.check_available(self.weights, self.optimizer if self.trains else "adamw")
        self.prep = prepare_model(recipe.model, recipe.device, dtype_name(self.weights))
        self._check_shots()
        self.heldout_texts = read_texts(recipe.heldout.text, builtin="heldout") if recipe.heldout.tokens else None
        self.phases = len(self.schedule) + (1 if training.final_tokens else 0)
        if self.trains:
            check_training_data(training.data)
        self.tokenizer = require_tokenizer(self.prep.source, "calibration, training and perplexity")
        self.mixed = optim.autocast_of(training, self.prep.device, self.weights)
        self.accelerator = Accelerator(cpu=self.prep.device.type == "cpu", mixed_precision=self.mixed)
        self.procs = Processes(self.accelerator)
        check_launch(self.accelerator)
        self.sharded = training.distributed == "fsdp" and self.procs.count > 1  # FSDP2 slices while training
        self.teacher = self.method.teacher(RunFacts(training, self.accelerator.device, self.procs.count,
                                                    phase_steps(training, len(self.schedule), self.procs.count),
                                                    self.prep.shape.vocab_size))
        self.memory = self._check_memory()  # also settles ``auto`` weights: fp32 unless only bf16 fits
        if self.weights != self.prep.dtype:
            optim.check_available(self.weights, self.optimizer)
            self.prep = with_compute_dtype(self.prep, self.weights)
        self.heldout_ids: torch.Tensor | None = None
        self.wrapped = False  # the model is wrapped by the method for the phase in progress
        self.resumed_optimizer: dict | None = None  # moments to continue a phase with, after a resume
        self.end_optimizer: torch.optim.Optimizer | None = None  # the finished phase's, saved with its state
        self.resumed_shards: Path | None = None  # a sharded state to continue the phase from, after a resume

    def _check_shots(self) -> None:
        """The shots' widths, pruning recipe and calibration text, checked before loading (none for a
        recovery-only run, which also trains models that transact does not prune, e.g. per-layer widths)."""
        recipe = self.recipe
        self.schedule, self.prune_recipe, self.calib_texts = [], None, None
        if recipe.num_shots == 0:
            return
        get_adapter(self.prep.config).check_prunable()
        self.schedule = schedule_of(recipe, self.prep.shape)
        self.prune_recipe = recipe.prune_recipe(recipe.target or recipe.schedule[-1])
        check_step(self.prep.config, self.prune_recipe, self.schedule[0])  # metric and correctors, before loading
        if self.prune_recipe.needs_calibration:
            self.calib_texts = read_texts(recipe.prune.calibration.text)

    def _check_memory(self) -> memory.MemoryEstimate | None:
        """The run's estimated peak, from the config alone; refused here where it cannot fit the device."""
        training = self.recipe.training
        if not self.trains:
            return None
        params, shape, device = count_parameters(skeleton(self.prep.config)), self.prep.shape, self.accelerator.device
        teacher_here = self.teacher is not None and self.teacher.on(device)
        available = memory.available_bytes(device) if training.check_memory else None
        self.weights, estimate = memory.settle(shape, params, training, device.type, teacher_here=teacher_here,
                                               available=available, processes=self.procs.count,
                                               statistics=statistics_bytes(shape, self._statistics()))
        return estimate

    def _statistics(self) -> tuple[str, ...]:
        """The calibration statistics a shot collects (none without shots)."""
        return self.prune_recipe.statistics if self.prune_recipe is not None else ()

    def heldout_ppl(self, model: nn.Module) -> float | None:
        if self.heldout_ids is None:
            return None
        result = None
        if self.procs.main:
            model.eval()
            result = heldout_perplexity(model, self.heldout_ids.to(self.accelerator.device), self.recipe.heldout,
                                        progress=self.progress_bars).perplexity
        return self.procs.broadcast(result)

    def save(self, model: nn.Module, optimizer, state: RunState) -> None:
        if sharded.is_sharded(model):
            save_sharded_state(self.out, model, optimizer, state, self.procs)
            return
        if self.procs.main:
            save_state(self.out, model, optimizer, state)
        self.procs.wait()

    def start(self) -> tuple[nn.Module, RunState]:
        """Load the dense model; on resume rebuild the saved architecture and weights."""
        if self.procs.main and not self.resume:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out / "recipe.json", self.recipe.to_json())
        model, _ = load_model(self.prep, tokenizer=self.tokenizer, device=self.accelerator.device)
        if self.heldout_texts:
            self.heldout_ids = token_stream(self.tokenizer, self.heldout_texts, limit=self.recipe.heldout.tokens)
        if self.teacher is not None:
            self.teacher.attach(model)
            teacher_model = getattr(self.teacher, "model", None)  # a teacher's weights beside the student's
            if self.sharded and teacher_model is not None and self.teacher.on(self.accelerator.device):
                sharded.shard(teacher_model, self.mixed)  # forward only: 1/N on each process
        saved = latest_state(self.out) if self.resume else None
        if saved is None:
            return model, RunState(dense={**model_summary(model), "perplexity": self.heldout_ppl(model)})
        state = load_state(saved)
        for plan in state.plans:
            apply_step(model, PrunePlan.from_json(plan))
        if state.step and sharded.has_shards(saved):  # saved mid-phase in slices: loaded once the model is sharded
            sharded.check_shards(saved, self.procs.count)
            self.resumed_shards = saved
            return model, state
        if state.step:  # saved mid-phase: as the method trains it (LoRA: adapters included)
            model = self._wrap(model, state.phase)
        load_weights(model, str(saved / "model.safetensors"), device=str(self.accelerator.device))
        self.resumed_optimizer = load_optimizer_state(saved) if state.step else None
        return model, state

    def _wrap(self, model: nn.Module, phase: int) -> nn.Module:
        """The model as the method trains it in ``phase`` (seeded by the run's seed and the phase)."""
        training = self.recipe.training
        self.wrapped = True
        return self.method.wrap(model, training.settings_of(self.method.name), training.seed * 1_000_003 + phase)

    def prune_shot(self, model: nn.Module, state: RunState) -> None:
        """Calibrate the current model, plan this shot's widths, prune (every process the same plan)."""
        shot, targets = state.phase, self.schedule[state.phase - 1]
        t0 = time.perf_counter()
        plan_json = None
        if self.procs.main:  # calibrates, selects, corrects and slices; the others slice and receive
            model.eval()
            plan_json = prune_model(model, self.tokenizer, self.prune_recipe, layerwise=self.recipe.layerwise,
                                    sequential=self.recipe.sequential, targets=targets, texts=self.calib_texts,
                                    note={"shot": shot}, progress=self.progress_bars).to_json()
        plan = PrunePlan.from_json(self.procs.broadcast(plan_json))
        release_freed_memory()  # the statistics' pages, or the training steps are counted on top of them
        if not self.procs.main:
            apply_step(model, plan)
        if plan.corrections:  # the corrected weights exist on the main process only
            self.procs.broadcast_parameters(get_adapter(model).pruned_modules(model))
        state.plans.append(plan.to_json())
        state.pruned, state.step = True, 0
        state.current = PhaseRecord(phase=shot, widths=targets.widths(),
                                    prune_seconds=round(time.perf_counter() - t0, 2), params=count_parameters(model),
                                    perplexity_pruned=self.heldout_ppl(model))

    def train(self, model: nn.Module, state: RunState) -> nn.Module:
        """Train the current phase to its end, saving every ``save_every`` steps; -> the trained model."""
        training, phase = self.recipe.training, state.phase
        tokens = training.tokens_per_shot if phase <= len(self.schedule) else training.final_tokens
        total = steps_for(tokens, training, self.procs.count)
        if state.current is None:  # the final phase: nothing was pruned
            state.current = PhaseRecord(phase=phase, params=count_parameters(model))
        state.current.train_steps = total
        state.current.train_tokens = total * training.tokens_per_step * self.procs.count
        self.end_optimizer = None
        if state.step >= total:
            return model
        if not self.wrapped:
            model = self._wrap(model, phase)
        if self.sharded:
            return self._train_sharded(model, state, total)
        optimizer = self._train_steps(model, state, total)
        self.end_optimizer = optimizer if self.method.keeps_moments else None  # LoRA's end with its adapters
        self.wrapped = False
        return self.method.merge(model)

    def _train_sharded(self, model: nn.Module, state: RunState, total: int) -> nn.Module:
        """The phase trained on FSDP2 slices (``transact.recovery.sharded``); -> the whole model again. The
        moments end with the phase (each phase trains with new ones), so none are saved with its end."""
        sharded.shard(model, self.mixed)
        if self.resumed_shards is not None:
            self.resumed_optimizer = sharded.load_shards(self.resumed_shards, model, self.procs.rank,
                                                         self.procs.count)
            self.resumed_shards = None
        self._train_steps(model, state, total)
        self.end_optimizer, self.wrapped = None, False
        plans = [PrunePlan.from_json(p) for p in state.plans]
        return sharded.plain_model(model, self.prep.config, plans, self.weights)

    def _train_steps(self, model: nn.Module, state: RunState, total: int) -> torch.optim.Optimizer:
        training, current = self.recipe.training, state.current
        stream = BlockStream(self.tokenizer, training.data, training.seq_len, training.seed, training.shuffle_buffer,
                             position=state.data_position, rank=self.accelerator.process_index,
                             world=self.procs.count)
        spec = PhaseSpec(phase=state.phase, total_steps=total, start_step=state.step,
                         optimizer_state=self.resumed_optimizer, tokens_before=state.tokens_trained)
        self.resumed_optimizer = None
        started, base_losses = time.perf_counter(), list(state.losses)

        def checkpoint(unwrapped, optimizer, done, log):
            state.step, state.data_position, state.losses = done, stream.position, base_losses + log.records
            current.train_seconds += time.perf_counter() - started
            self.save(unwrapped, optimizer, state)
            current.train_seconds -= time.perf_counter() - started  # time spent saving is not training

        log, optimizer = train_phase(self.accelerator, model, stream, training, spec, teacher=self.teacher,
                                     on_save=checkpoint, progress=self.progress_bars)
        current.train_seconds += time.perf_counter() - started
        state.step, state.data_position, state.losses = total, stream.position, base_losses + log.records
        return optimizer

    def end_phase(self, model: nn.Module, state: RunState) -> None:
        current, state.current = state.current, None
        current.perplexity = self.heldout_ppl(model)
        current.train_seconds = round(current.train_seconds, 2)
        current.train_tokens_per_second = (round(current.train_tokens / current.train_seconds, 1)
                                           if current.train_steps and current.train_seconds else None)
        state.shots.append(current)
        state.phase, state.pruned, state.step = state.phase + 1, False, 0
        self.save(model, self.end_optimizer, state)

    def finish(self, model: nn.Module, state: RunState, seconds: float) -> dict:
        """Write the final checkpoint into OUT (next to recipe.json), with plans, report and loss curve."""
        digests = self.procs.gather(weights_digest(model))
        if len(set(digests)) > 1:
            raise TransactError(f"the {len(digests)} processes ended with different weights ({', '.join(digests)}); "
                                "the distributed setup is not keeping replicas in step, so nothing was written")
        report = self._report(model, state, digests, seconds)
        save_dtype = self.prep.save_dtype
        if save_dtype != torch.float32:
            if any(p.dtype != save_dtype for p in model.parameters()):
                # Training left values the checkpoint's dtype cannot hold: round them in memory first, so the
                # reload check compares like with like, and measure what is actually saved.
                with torch.no_grad():
                    for p in model.parameters():
                        p.copy_(p.to(save_dtype).to(p.dtype))
                report["final"]["perplexity_as_saved"] = self.heldout_ppl(model)
            report["final"]["saved_dtype"] = dtype_name(save_dtype)
        if self.procs.main:
            write_run_outputs(self.out, model, self.tokenizer, state.plans, state.losses, report,
                              recipe=self.recipe.to_json(), save_dtype=self.prep.save_dtype, probe=self.heldout_ids)
            mark_done(self.out, state)
        self.procs.wait()
        return report

    def _report(self, model: nn.Module, state: RunState, digests: list[str], seconds: float) -> dict:
        return {"model": self.recipe.model, "recipe": self.recipe.to_json(), "dense": state.dense,
                "final": model_summary(model), "phases": [p.to_json() for p in state.shots],
                "schedule": [t.widths() for t in self.schedule],
                "processes": self.procs.count, "device": str(self.accelerator.device),
                "distributed": self.recipe.training.distributed if self.procs.count > 1 else None,
                "peak_memory_bytes_per_process": self.procs.gather(peak_memory_bytes(self.accelerator.device)),
                "mixed_precision": self.mixed, "weights": dtype_name(self.weights),
                "optimizer": self.optimizer if self.trains else None, "weights_sha256_per_process": digests,
                "memory_estimate": self.memory.parts if self.memory else None,
                "memory_estimate_bytes": self.memory.total if self.memory else None,
                "teacher_logits": self.teacher.note() if self.teacher is not None else None,
                "seconds_this_process": round(seconds, 1), "versions": library_versions()}


def _announce(r: Run) -> None:
    """What the run decided before loading, on the main process's stderr."""
    if r.memory is not None:
        print(f"memory: {r.memory.describe()}", file=sys.stderr, flush=True)
    if r.recipe.training.weights == "auto" and r.weights == torch.bfloat16:
        print("memory: training in bf16 weights: with fp32 weights the run would not fit (training.weights: auto)",
              file=sys.stderr, flush=True)
    note = r.teacher.note() if r.teacher is not None else None
    if note is not None:
        print(f"teacher: the top {note['k']} log-probabilities in {note['path']} (their teacher's probability outside "
              f"them: {note['tail_mass']['mean']:.4f} on average over the training blocks)", file=sys.stderr,
              flush=True)


def run(job: RunJob) -> RunResult:
    """Prune iteratively with recovery training as the recipe says; write the final checkpoint and report."""
    out = check_out(job.recipe, job.resume)
    r = Run(job.recipe, out, job.resume, job.progress)
    if job.progress and r.procs.main:
        _announce(r)
    t0 = time.perf_counter()
    model, state = r.start()
    while state.phase <= r.phases:
        if state.phase <= len(r.schedule) and not state.pruned:
            r.prune_shot(model, state)
        model = r.train(model, state)
        r.end_phase(model, state)
    report = r.finish(model, state, time.perf_counter() - t0)
    return RunResult(out, report, r.procs.main)
