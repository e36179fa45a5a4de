"""Recovery methods: how ``transact run`` trains between shots. Each is one ``RecoveryMethod`` in one module of
this package, registered by name (``training.method``); the run loop, the training phase and the memory
planner ask the method and never branch on its name.

A method declares the settings of its ``training.<name>`` section, what it does to the model before a phase
trains (``wrap``; also when a run resumes mid-phase) and after it (``merge``), whether the optimizer moments
of a finished phase belong to the model's own parameters (``keeps_moments``), what it learns from
(``teacher``: set up once per run, before any weights load), the loss of one micro-batch (``loss``), and its
part of the memory estimate (``memory``, ``advice``). Adding a method is adding one module here (see
docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from transact.arch import ModelShape
from transact.recovery import losses
from transact.registry import Registry

if TYPE_CHECKING:
    from transact.recipes import Training

FP32 = 4
LOGIT_COPIES = 3  # the logits, their fp32 log-softmax in the cross-entropy, and its gradient


class Teacher(Protocol):
    """What a distilling method learns from during a run (see ``transact.recovery.methods.kd``)."""

    def on(self, device: torch.device) -> bool:
        """Whether the teacher's weights take memory on ``device``."""

    def attach(self, dense: nn.Module) -> None:
        """Called once the dense model is loaded (an online teacher copies it)."""

    def note(self) -> dict | None:
        """What the run's report records of it (None: nothing)."""


@dataclass(frozen=True)
class RunFacts:
    """What a method may read of a run when it sets itself up, before any weights load: the training settings,
    the device the student trains on and the recipe's device name, the processes, the optimizer steps of
    every phase and the model's vocabulary."""

    training: Training
    device: torch.device
    processes: int
    phase_steps: list[int]
    vocab_size: int


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch's loss inputs: the student (unwrapped, and as the accelerator prepared it), the block
    ids (batch, seq_len), their global positions in the training stream, the training settings and the run's
    teacher (None for a method without one)."""

    student: nn.Module
    prepared: nn.Module
    ids: torch.Tensor
    positions: list[int] | None
    training: Training
    teacher: Teacher | None


@dataclass(frozen=True)
class MethodMemory:
    """A method's part of the memory estimate: parameters it trains, bytes of each one's gradient and the dtype
    of their optimizer moments, the teacher's bytes on the student's device, the logits' bytes."""

    trainable: int
    gradient_bytes: int
    moments_dtype: torch.dtype
    teacher: int
    logits: int


@dataclass(frozen=True)
class MemoryInputs:
    """What a method's memory estimate reads: the model's shape and parameter count, the training settings, the
    dtype weights are held in, the tokens of one micro-batch, whether a teacher sits on the same device."""

    shape: ModelShape
    params: int
    training: Training
    weights: torch.dtype
    tokens: int
    teacher_here: bool


def unchanged(model: nn.Module, *args: Any) -> nn.Module:
    return model


def no_teacher(facts: RunFacts) -> None:
    return None


def language_modelling(batch: MicroBatch) -> torch.Tensor:
    """The next-token loss of the student on the block itself."""
    return losses.lm_loss(batch.prepared(input_ids=batch.ids).logits, batch.ids)  # logits (batch, seq_len, vocab)


def every_parameter(memory: MemoryInputs) -> MethodMemory:
    """Every parameter trained in the weights' dtype, full-vocabulary logits of the micro-batch, no teacher."""
    vocab = memory.shape.vocab_size or 0
    return MethodMemory(trainable=memory.params, gradient_bytes=memory.weights.itemsize,
                        moments_dtype=memory.weights, teacher=0,
                        logits=LOGIT_COPIES * memory.tokens * vocab * FP32)


def no_advice(training: Training, device: str, teacher_here: bool) -> list[str]:
    return []


@dataclass(frozen=True)
class RecoveryMethod:
    """One way to train between shots (see the module docstring). ``settings``: the dataclass of its
    ``training.<name>`` section (None: it has none); ``wrap(model, settings, seed)`` -> the model to train;
    ``merge(model)`` -> the plain model again; ``teacher(facts)`` -> a ``Teacher`` or None;
    ``loss(batch)`` -> the scalar loss of a ``MicroBatch``; ``memory(inputs)`` -> its ``MethodMemory``;
    ``lighter``: methods to suggest when a run of this one does not fit; ``advice(training, device,
    teacher_here)``: further changes of its own settings that save memory, in words; ``shards``: whether it
    trains on a model sharded with FSDP2 (``training.distributed: fsdp``: every parameter trains)."""

    name: str
    summary: str
    settings: type | None = None
    wrap: Callable[[nn.Module, Any, int], nn.Module] = unchanged
    merge: Callable[[nn.Module], nn.Module] = unchanged
    keeps_moments: bool = True
    teacher: Callable[[RunFacts], Teacher | None] = no_teacher
    loss: Callable[[MicroBatch], torch.Tensor] = language_modelling
    memory: Callable[[MemoryInputs], MethodMemory] = every_parameter
    lighter: tuple[str, ...] = field(default=())
    advice: Callable[[Training, str, bool], list[str]] = no_advice
    shards: bool = True


METHODS: Registry[RecoveryMethod] = Registry("recovery method", __name__, key=lambda method: method.name,
                                             first="full")
register_method = METHODS.register
get_method = METHODS.get
method_names = METHODS.names
