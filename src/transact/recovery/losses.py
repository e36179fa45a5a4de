"""The training losses on full logits: the next-token cross-entropy, and distillation's KL (the reference that
``transact.recovery.chunked`` computes in chunks without building the logits)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy. logits (B, L, V), ids (B, L) -> scalar (mean over B * (L - 1))."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T), mean over positions. student, teacher: (B, L, V) -> scalar."""
    t = temperature
    log_s = F.log_softmax(student.float() / t, dim=-1)
    log_t = F.log_softmax(teacher.float() / t, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (B, L)
    return kl.mean() * t * t
