"""Distillation without the full logits: the LM head, the KL to the teacher and the cross-entropy computed
over chunks of tokens, forward and backward.

With a 128K-152K vocabulary, the student's and the teacher's logits of a step (and their log-softmaxes)
are several GiB in fp32 at a few thousand tokens. Here both models return only their final hidden states
(B, L, H); each chunk of tokens goes through the two LM heads, the softmaxes and the loss terms inside a
``torch.utils.checkpoint`` region, which keeps none of the chunk's intermediates for the backward pass and
recomputes them there, one chunk at a time. So at most one chunk's logits exist at once. The result equals
``distill_loss`` + ``lm_weight`` x ``lm_loss`` on the full logits up to floating-point summation order.

The top-k variant distils from the teacher's k most likely next tokens only (``teacher_topk``: computed
online, or read back from what ``transact teach`` wrote): the teacher's distribution renormalised over those
k tokens, against the student's full-vocabulary log-probabilities at them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Head = Callable[[torch.Tensor], torch.Tensor]  # final hidden states (N, H) -> logits (N, V)

CHUNK_ELEMENTS = 2**25  # logits per chunk (128 MiB in fp32): about 220 tokens at Qwen's 151,936-token vocabulary
IGNORE = -100  # no next token to predict (the last position of each row)


def chunk_tokens(vocab_size: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Tokens per chunk so that one chunk's logits hold about ``elements`` values."""
    return max(1, elements // vocab_size)


def final_hidden(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The final (normed) hidden states (B, L, H) of ``model`` on ``ids``, through its own forward (so that
    a DDP wrapper sees the pass), with the LM head applied to the last position only."""
    return model(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]


def next_token_targets(ids: torch.Tensor) -> torch.Tensor:
    """(B, L) token ids -> (B * L,) the next token at every position, IGNORE at each row's last."""
    targets = torch.full_like(ids, IGNORE)
    targets[:, :-1] = ids[:, 1:]
    return targets.reshape(-1)


def _kl_and_ce(log_teacher: torch.Tensor, log_student: torch.Tensor, logits: torch.Tensor,
               targets: torch.Tensor) -> torch.Tensor:
    """(sum of KL(teacher || student) over the rows, sum of the next-token cross-entropy) as a (2,) tensor.
    log_teacher, log_student: (n, m) log-probabilities over the same m tokens; logits: (n, V); targets: (n,)."""
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum()
    ce = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
    return torch.stack([kl, ce])


def _chunk_terms(hidden: torch.Tensor, targets: torch.Tensor, teacher_hidden: torch.Tensor, head: Head,
                 teacher_head: Head, temperature: float) -> torch.Tensor:
    """``_kl_and_ce`` over the full vocabulary at temperature T. hidden, teacher_hidden: (n, H); targets: (n,)."""
    logits = head(hidden).float()
    with torch.no_grad():  # the teacher may sit on another device
        log_t = F.log_softmax(teacher_head(teacher_hidden).float() / temperature, dim=-1).to(logits.device)
    return _kl_and_ce(log_t, F.log_softmax(logits / temperature, dim=-1), logits, targets)


def _chunked(terms, hidden: torch.Tensor, teacher: tuple[torch.Tensor, ...], ids: torch.Tensor, constants: tuple,
             *, temperature: float, lm_weight: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum ``terms(hidden rows, targets, *teacher rows, *constants)`` -> (KL sum, CE sum) over chunks of
    ``chunk`` positions, each chunk recomputed in the backward pass; -> (T^2 mean KL over the B x L positions
    + lm_weight x mean CE over the B x (L - 1) that have a next token, mean CE). hidden: (B, L, H); teacher:
    tensors (B, L, ...) split into rows along with it; ids: (B, L)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 token, got {chunk}")
    batch, length, _ = hidden.shape
    flat = hidden.reshape(batch * length, -1)
    rows = [t.reshape(batch * length, -1) for t in teacher]
    targets = next_token_targets(ids).to(hidden.device)
    total = hidden.new_zeros(2, dtype=torch.float32)
    for start in range(0, batch * length, chunk):
        part = slice(start, start + chunk)
        total = total + checkpoint(terms, flat[part], targets[part], *(r[part] for r in rows), *constants,
                                   use_reentrant=False)
    kl = total[0] / (batch * length) * temperature * temperature
    ce = total[1] / (batch * (length - 1))
    return kl + lm_weight * ce, ce


def chunked_distill_loss(hidden: torch.Tensor, teacher_hidden: torch.Tensor, ids: torch.Tensor, head: Head,
                         teacher_head: Head, *, temperature: float, lm_weight: float,
                         chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T^2 KL(teacher_T || student_T) averaged over all B x L positions, plus ``lm_weight`` x the next-token
    cross-entropy averaged over the B x (L - 1) positions that have a next token; -> (that loss, the
    cross-entropy). hidden, teacher_hidden: (B, L, H) final hidden states; ids: (B, L); ``head`` /
    ``teacher_head`` map hidden states to logits (the family's LM head, ``FamilyAdapter.lm_logits``);
    ``chunk``: tokens per chunk."""
    return _chunked(_chunk_terms, hidden, (teacher_hidden,), ids, (head, teacher_head, temperature),
                    temperature=temperature, lm_weight=lm_weight, chunk=chunk)


def teacher_topk(hidden: torch.Tensor, head: Head, k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The k most likely next tokens at every position and their log-probabilities (full vocabulary,
    temperature 1), rounded to fp16 as they are stored; chunk by chunk, without gradients. hidden: (N, H)
    -> (indices (N, k) int64 by descending probability, log-probabilities (N, k) fp16, the summed
    probability outside the top k over the N positions)."""
    indices, logprobs, tail = [], [], 0.0
    with torch.no_grad():
        for start in range(0, hidden.shape[0], chunk):
            log_p = F.log_softmax(head(hidden[start:start + chunk]).float(), dim=-1)
            top, where = log_p.topk(k, dim=-1)
            tail += (1.0 - top.exp().sum(-1)).clamp(min=0.0).sum().item()
            indices.append(where)
            logprobs.append(top.half())
    return torch.cat(indices), torch.cat(logprobs), tail


def _topk_chunk_terms(hidden: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor,
                      head: Head, temperature: float) -> torch.Tensor:
    """``_kl_and_ce`` over the teacher's k tokens, its probabilities renormalised over them at temperature T.
    hidden: (n, H); indices, logprobs: (n, k); targets: (n,)."""
    logits = head(hidden).float()
    log_q = F.log_softmax(logprobs.float().to(logits.device) / temperature, dim=-1)
    log_s = F.log_softmax(logits / temperature, dim=-1).gather(-1, indices.to(logits.device))
    return _kl_and_ce(log_q, log_s, logits, targets)


def chunked_topk_distill_loss(hidden: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor, ids: torch.Tensor,
                              head: Head, *, temperature: float, lm_weight: float,
                              chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``chunked_distill_loss`` with the teacher given as its top-k: indices (B, L, k) int64 and
    log-probabilities (B, L, k); the KL runs over the k tokens, the teacher's probabilities renormalised over
    them at temperature T. -> (loss, cross-entropy)."""
    return _chunked(_topk_chunk_terms, hidden, (indices, logprobs), ids, (head, temperature),
                    temperature=temperature, lm_weight=lm_weight, chunk=chunk)
