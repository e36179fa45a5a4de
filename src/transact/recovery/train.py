"""Recovery training between pruning shots: one phase of AdamW steps on packed blocks, through Hugging Face
``accelerate`` (one CPU, one GPU, or many processes with DDP as ``accelerate launch`` or ``torchrun`` start
them), or on a model sharded with FSDP2 (``transact.recovery.sharded``). The loss is the recovery method's
(``transact.recovery.methods``: full fine-tuning, LoRA, distillation from the dense model).

Every step reseeds torch from (seed, phase, step, rank), so a phase resumed from a saved step draws the
same random numbers (LoRA dropout) as an uninterrupted one without carrying generator state around.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from transact.errors import TransactError
from transact.recovery import optim, sharded
from transact.recovery.data import BlockStream
from transact.recovery.methods import MicroBatch, RecoveryMethod, Teacher, get_method

if TYPE_CHECKING:
    from transact.recipes import Training


class TrainingDiverged(TransactError):
    """The loss or gradient became non-finite or exploded; no weights of the failing step were kept."""


# ---------------------------------------------------------------- pure pieces

def lr_factor(step: int, total: int, warmup: float, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier of optimizer step ``step`` (0-based) of ``total``: linear warmup over the
    first ``ceil(warmup * total)`` steps, then cosine decay from 1 to ``min_ratio`` at the last step."""
    warm = math.ceil(warmup * total)
    if step < warm:
        return (step + 1) / warm
    span = max(1, total - warm - 1)
    progress = min(1.0, (step - warm) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def steps_for(tokens: int, training: Training, world: int) -> int:
    """Optimizer steps that consume at least ``tokens`` tokens across ``world`` processes."""
    return math.ceil(tokens / (training.tokens_per_step * world)) if tokens > 0 else 0


def step_seed(seed: int, phase: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + phase * 10_007 + step) * 64 + rank


# ---------------------------------------------------------------- one phase

@dataclass
class PhaseLog:
    """Per optimizer step: global tokens seen, loss, learning rate, gradient norm."""

    records: list[dict] = field(default_factory=list)


@dataclass
class PhaseSpec:
    phase: int
    total_steps: int
    start_step: int = 0
    optimizer_state: dict | None = None
    tokens_before: int = 0  # global tokens trained before this phase (for the loss curve's x axis)


@contextmanager
def training_mode(model: nn.Module, gradient_checkpointing: bool) -> Iterator[None]:
    """Train mode without the KV cache (and with activation checkpointing if asked); restored after."""
    was_training, use_cache = model.training, getattr(model.config, "use_cache", None)
    model.train()
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        if gradient_checkpointing:
            model.gradient_checkpointing_disable()
        model.config.use_cache = use_cache
        model.train(was_training)


def train_phase(
    accelerator,
    model: nn.Module,
    stream: BlockStream,
    training: Training,
    spec: PhaseSpec,
    *,
    teacher: Teacher | None = None,
    on_save: Callable[[nn.Module, torch.optim.Optimizer, int, PhaseLog], None] | None = None,
    progress: bool = True,
) -> tuple[PhaseLog, torch.optim.Optimizer]:
    """Run optimizer steps ``spec.start_step`` .. ``spec.total_steps`` of one phase on ``model`` (already on
    the accelerator's device, not yet prepared). ``on_save(model, optimizer, steps_done, log)`` is called
    every ``training.save_every`` steps (not after the last; the caller saves the phase's end, with the
    optimizer returned). The loss is ``training.method``'s, learning from ``teacher`` where it has one."""
    log = PhaseLog()
    method = get_method(training.method)
    _, kind = optim.resolve(training, accelerator.device)
    optimizer = optim.make_optimizer(model, training, kind)
    if spec.optimizer_state is not None:
        optim.load_state(optimizer, spec.optimizer_state)
        if sharded.is_sharded(model):
            sharded.wrap_moments(optimizer)
    world = accelerator.num_processes
    tokens_per_step = training.tokens_per_step * world
    ema = None
    bar = tqdm(total=spec.total_steps, initial=spec.start_step, desc=f"training phase {spec.phase}", unit="step",
               disable=not (progress and accelerator.is_main_process))
    try:
        with training_mode(model, training.gradient_checkpointing):
            # Prepared after the mode switch: DDP must wrap the model as it will be trained. A model sharded
            # with FSDP2 (``transact.recovery.sharded``) is already what trains.
            prepared, optimizer = (model, optimizer) if sharded.is_sharded(model) else \
                accelerator.prepare(model, optimizer)
            for step in range(spec.start_step, spec.total_steps):
                torch.manual_seed(step_seed(training.seed, spec.phase, step, accelerator.process_index))
                lr = training.lr * lr_factor(step, spec.total_steps, training.warmup, training.min_lr_ratio)
                optim.set_lr(optimizer, lr)
                loss = _accumulate_gradients(accelerator, prepared, stream, training, method, teacher)
                grad_norm = _clip_gradients(accelerator, prepared, training.max_grad_norm or math.inf)
                loss = accelerator.reduce(loss.detach(), reduction="mean").item()
                ema = _check_health(loss, grad_norm, ema, step - spec.start_step, training.explode_factor, spec, step)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                log.records.append({"phase": spec.phase, "step": step + 1,
                                    "tokens": spec.tokens_before + (step + 1) * tokens_per_step,
                                    "loss": loss, "lr": lr, "grad_norm": grad_norm})
                bar.update(1)
                if (step + 1) % training.log_every == 0 or step + 1 == spec.total_steps:
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
                done = step + 1
                if on_save and training.save_every and done % training.save_every == 0 and done < spec.total_steps:
                    on_save(accelerator.unwrap_model(prepared), optimizer, done, log)
    finally:
        bar.close()
        optimizer.zero_grad(set_to_none=True)
    accelerator.free_memory()
    return log, optimizer


def _clip_gradients(accelerator, model: nn.Module, max_norm: float) -> float:
    """Clip the gradients' global norm to ``max_norm``; -> the norm before clipping (over every slice of a
    sharded model)."""
    if not sharded.is_sharded(model):
        return float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _accumulate_gradients(accelerator, model: nn.Module, stream: BlockStream, training: Training,
                          method: RecoveryMethod, teacher: Teacher | None) -> torch.Tensor:
    """Forward and backward ``grad_accum`` micro-batches; gradients sync only on the last. -> mean loss."""
    total = torch.zeros((), device=accelerator.device)
    student = accelerator.unwrap_model(model)
    for micro in range(training.grad_accum):
        ids = stream.take(training.batch_size).to(accelerator.device)  # (batch, seq_len)
        sync = micro == training.grad_accum - 1
        with _gradient_sync(accelerator, model, sync):
            loss = method.loss(MicroBatch(student, model, ids, stream.last_positions, training, teacher))
            accelerator.backward(loss / training.grad_accum)
        total += loss.detach() / training.grad_accum
    return total


@contextmanager
def _gradient_sync(accelerator, model: nn.Module, sync: bool) -> Iterator[None]:
    """Gradients reduced across processes after this backward pass only where ``sync``."""
    if not sharded.is_sharded(model):
        with nullcontext() if sync else accelerator.no_sync(model):
            yield
        return
    model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _check_health(loss: float, grad_norm: float, ema: float | None, steps_in: int, factor: float,
                  spec: PhaseSpec, step: int) -> float:
    """Raise TrainingDiverged on a non-finite loss/gradient or a loss above ``factor`` x its running
    average (after 5 steps of this run); return the updated average."""
    where = f"phase {spec.phase}, step {step + 1} of {spec.total_steps}"
    if not math.isfinite(loss) or not math.isfinite(grad_norm):
        raise TrainingDiverged(f"training stopped at {where}: loss {loss}, gradient norm {grad_norm}")
    if ema is not None and steps_in >= 5 and loss > factor * ema:
        raise TrainingDiverged(
            f"training stopped at {where}: loss {loss:.4g} exploded above {factor:g} x its running average "
            f"{ema:.4g} (training.explode_factor)")
    return loss if ema is None else 0.9 * ema + 0.1 * loss
