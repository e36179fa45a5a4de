"""Knowledge distillation from the dense model: loss = T²·KL(teacher_T ‖ student_T) + lm_weight·CE, computed over
chunks of tokens (``transact.recovery.chunked``) so neither model's full logits are built. The teacher is a
frozen copy of the dense model (on the student's device, or ``teacher_device``), or the top-k log-probabilities
``transact teach`` wrote (``teacher_logits``), read instead of running a teacher."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from transact.arch import get_adapter
from transact.checks import check_float, check_int, check_str
from transact.errors import TransactError
from transact.io.models import resolve_device
from transact.recovery.chunked import (
    chunk_tokens,
    chunked_distill_loss,
    chunked_topk_distill_loss,
    final_hidden,
    teacher_topk,
)
from transact.recovery.methods import (
    FP32,
    LOGIT_COPIES,
    MemoryInputs,
    MethodMemory,
    MicroBatch,
    RecoveryMethod,
    RunFacts,
    register_method,
)
from transact.recovery.teacher import OfflineTeacher, blocks_needed

if TYPE_CHECKING:
    from transact.recipes import Training


@dataclass(frozen=True)
class DistillSettings:
    """``training.kd``: distillation from the dense model, loss = T^2 KL(teacher_T || student_T) + lm_weight CE,
    computed over chunks of ``chunk_tokens`` tokens (0: about 2^25 logits per chunk for the vocabulary).
    ``top_k`` > 0: the KL over the teacher's k most likely tokens only (its distribution renormalised over
    them); ``teacher_logits``: a directory ``transact teach`` wrote, read instead of running the teacher."""

    temperature: float = 1.0
    lm_weight: float = 0.5
    teacher_device: str = "same"
    chunk_tokens: int = 0
    top_k: int = 0
    teacher_logits: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "temperature",
                           check_float("training.kd.temperature", self.temperature, 0.0, 100.0, open_low=True))
        object.__setattr__(self, "lm_weight", check_float("training.kd.lm_weight", self.lm_weight, 0.0, 100.0))
        check_str("training.kd.teacher_device", self.teacher_device)
        check_int("training.kd.chunk_tokens", self.chunk_tokens, 0)
        check_int("training.kd.top_k", self.top_k, 0)
        if self.teacher_logits is not None:
            check_str("training.kd.teacher_logits", self.teacher_logits)


def settings(training: Training) -> DistillSettings:
    return training.settings_of("kd")


def offline_target(training: Training) -> Path | None:
    """Where ``transact teach`` writes the teacher logits of a run of ``training``: its ``training.kd.
    teacher_logits`` when the run distils from such files (None otherwise)."""
    if training.method != METHOD.name or not settings(training).teacher_logits:
        return None
    return Path(settings(training).teacher_logits).expanduser().resolve()


def distill_chunk(model: nn.Module, kd: DistillSettings) -> int:
    """Tokens per chunk of the distillation loss (and of the teacher's top-k) for ``model``'s vocabulary."""
    return kd.chunk_tokens or chunk_tokens(model.get_output_embeddings().weight.shape[0])


# ---------------------------------------------------------------- the teacher

@dataclass
class DenseTeacher:
    """A frozen copy of the dense model on ``device``, made when the dense model loads."""

    device: torch.device
    model: nn.Module | None = None

    def on(self, device: torch.device) -> bool:
        return self.device == device

    def attach(self, dense: nn.Module) -> None:
        self.model = copy.deepcopy(dense).to(self.device).eval().requires_grad_(False)

    def note(self) -> None:
        return None


@dataclass
class TeacherFiles:
    """The top-k log-probabilities ``transact teach`` wrote (``recovery.teacher.OfflineTeacher``): no weights."""

    files: OfflineTeacher

    def on(self, device: torch.device) -> bool:
        return False

    def attach(self, dense: nn.Module) -> None:
        return None

    def note(self) -> dict:
        meta = self.files.meta
        return {"path": str(self.files.path), "teacher": meta["teacher"], "k": meta["k"],
                "tail_mass": meta["tail_mass"], "heldout": meta.get("heldout")}


def run_teacher(facts: RunFacts) -> DenseTeacher | TeacherFiles | None:
    """The teacher of a run, set up before any weights load: the files ``transact teach`` wrote, checked against
    this run's stream, length and vocabulary; else the dense model's copy on its device. None for a run that
    trains nothing."""
    kd = settings(facts.training)
    if not sum(facts.phase_steps):
        return None
    if kd.teacher_logits:
        files = OfflineTeacher.open(kd.teacher_logits)
        files.check(facts.training, blocks_needed(facts.phase_steps, facts.training, facts.processes),
                    facts.vocab_size)
        return TeacherFiles(files)
    if kd.teacher_device == "same":
        return DenseTeacher(facts.device)
    try:
        return DenseTeacher(resolve_device(kd.teacher_device))
    except TransactError as e:
        raise TransactError(f"recipe key 'training.kd.teacher_device': {e}") from None


# ---------------------------------------------------------------- the loss

def distill_objective(batch: MicroBatch) -> torch.Tensor:
    """``distill_loss`` + lm_weight x ``lm_loss`` computed in chunks of tokens: neither model's full logits are
    ever built. The teacher is the dense model's copy, or the top-k files read at the blocks' positions."""
    kd, student, ids = settings(batch.training), batch.student, batch.ids
    hidden = final_hidden(batch.prepared, ids)
    head, chunk = partial(get_adapter(student).lm_logits, student), distill_chunk(student, kd)
    options = {"temperature": kd.temperature, "lm_weight": kd.lm_weight, "chunk": chunk}
    if isinstance(batch.teacher, TeacherFiles):
        indices, logprobs = batch.teacher.files.topk(batch.positions, ids)
        return chunked_topk_distill_loss(hidden, indices, logprobs, ids, head, **options)[0]
    teacher = batch.teacher.model
    with torch.no_grad():
        teacher_hidden = final_hidden(teacher, ids.to(next(teacher.parameters()).device))
    teacher_head = partial(get_adapter(teacher).lm_logits, teacher)
    if not kd.top_k:
        return chunked_distill_loss(hidden, teacher_hidden, ids, head, teacher_head, **options)[0]
    b, length, _ = teacher_hidden.shape
    indices, logprobs, _ = teacher_topk(teacher_hidden.reshape(b * length, -1), teacher_head, kd.top_k, chunk)
    return chunked_topk_distill_loss(hidden, indices.reshape(b, length, -1), logprobs.reshape(b, length, -1), ids,
                                     head, **options)[0]


# ---------------------------------------------------------------- memory

def distill_memory(memory: MemoryInputs) -> MethodMemory:
    """Every parameter trains; a teacher copy on the same device; one chunk of both models' logits at a time
    and the two final hidden states."""
    shape, vocab = memory.shape, memory.shape.vocab_size or 0
    chunk = min(memory.tokens, settings(memory.training).chunk_tokens or chunk_tokens(vocab))
    value = memory.weights.itemsize
    logits = 2 * LOGIT_COPIES * chunk * vocab * FP32 + 2 * memory.tokens * shape.hidden_size * value
    return MethodMemory(trainable=memory.params, gradient_bytes=value, moments_dtype=memory.weights,
                        teacher=memory.params * value if memory.teacher_here else 0, logits=logits)


def teacher_advice(training: Training, device: str, teacher_here: bool) -> list[str]:
    if teacher_here and device != "cpu":
        return ["training.kd.teacher_device: cpu (the teacher's weights leave the GPU)"]
    return []


METHOD = register_method(RecoveryMethod(
    "kd", "distillation from the dense model, T^2 KL + lm_weight CE in chunks (training.kd: temperature, lm_weight, "
    "teacher_device, chunk_tokens, top_k, teacher_logits)", settings=DistillSettings, teacher=run_teacher,
    loss=distill_objective, memory=distill_memory, advice=teacher_advice))
