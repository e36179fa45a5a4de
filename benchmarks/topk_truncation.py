"""What distilling from the teacher's top k costs, on held-out text: for each student, the full-vocabulary
KL(teacher || student) per token next to the top-k KL that ``training.kd.top_k`` / ``transact teach``
train on (the teacher renormalised over its k most likely tokens, against the student's full-vocabulary
log-probabilities there), and the teacher's probability outside its top k.

    python benchmarks/topk_truncation.py --students runs/lowp/2shot-kd-offline ... [--k 8 64 256]
        [--teacher builtin:smollm2] [--tokens 4096] [--out docs/bench/topk_truncation]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import machine, write_result

from transact.io.models import load_model, prepare_model, require_tokenizer
from transact.io.text import read_texts, token_stream


def logits_of(spec: str, ids: torch.Tensor, window: int, tokenizer) -> torch.Tensor:
    """Full logits (N, V) of the model ``spec`` on ``ids`` in windows of ``window`` tokens, fp32."""
    model, _ = load_model(prepare_model(spec, "cpu", "float32"), tokenizer=tokenizer)
    out = []
    with torch.no_grad():
        for start in range(0, ids.numel(), window):
            out.append(model(input_ids=ids[None, start:start + window]).logits[0].float())
    return torch.cat(out)


def compare(teacher: torch.Tensor, student: torch.Tensor, ks: list[int]) -> list[dict]:
    """Per k: mean full KL(t || s), mean top-k KL, mean teacher mass outside the top k (nats, per token)."""
    log_t, log_s = F.log_softmax(teacher, -1), F.log_softmax(student, -1)
    full = (log_t.exp() * (log_t - log_s)).sum(-1).mean().item()
    rows = []
    for k in ks:
        top, where = log_t.topk(k, -1)
        log_q = F.log_softmax(top.half().float(), -1)  # as stored: fp16, renormalised over the k
        topk = (log_q.exp() * (log_q - log_s.gather(-1, where))).sum(-1).mean().item()
        rows.append({"k": k, "kl_full": full, "kl_topk": topk, "tail_mass": (1 - top.exp().sum(-1)).mean().item()})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="builtin:smollm2")
    ap.add_argument("--students", nargs="+", required=True)
    ap.add_argument("--k", nargs="+", type=int, default=[8, 64, 256])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--out", default="docs/bench/topk_truncation")
    args = ap.parse_args()
    tokenizer = require_tokenizer(prepare_model(args.teacher, "cpu").source, "held-out text")
    ids = token_stream(tokenizer, read_texts("builtin", builtin="heldout"), limit=args.tokens)
    teacher = logits_of(args.teacher, ids, args.window, tokenizer)
    rows = []
    for student in args.students:
        student_logits = logits_of(student, ids, args.window, tokenizer)
        rows += [{"student": student, **r} for r in compare(teacher, student_logits, args.k)]
    lines = [f"Held-out text ({ids.numel():,} tokens of the built-in novels, windows of {args.window}); teacher "
             f"{args.teacher}; nats per token.", "",
             "| student | k | teacher mass outside top k | KL(teacher ‖ student), full vocabulary | top-k KL "
             "| top-k / full |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['student']} | {r['k']} | {r['tail_mass']:.4f} | {r['kl_full']:.4f} | {r['kl_topk']:.4f} | "
                     f"{r['kl_topk'] / r['kl_full']:.3f} |")
    write_result(args.out, {"machine": machine(), "args": vars(args), "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
