"""Peak memory and speed of one distillation step with Qwen's 151,936-token vocabulary: the full logits of
student and teacher (the former path) against the chunked loss (``transact.recovery.chunked``, the default).

A small random Qwen2 student and teacher (hidden 64, 2 layers; the vocabulary is what costs), fp32 on CPU,
a batch of 4 rows; each (mode, length) runs in a fresh process whose peak resident memory (VmHWM) is read
after 1 warm-up and 3 timed steps (forward, loss, backward, AdamW step).

    python benchmarks/distill_memory.py [--lengths 512 1024] [--out docs/bench/distill_memory]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import child_row, machine, write_result

VOCAB = 151_936
BATCH = 4


def one_run(mode: str, length: int) -> dict:
    """Runs in the child process: time the steps, then report the peak resident memory."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from transact.recipes import Training
    from transact.recovery import losses
    from transact.recovery.methods import MicroBatch
    from transact.recovery.methods.kd import DenseTeacher, distill_objective

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    student, teacher = Qwen2ForCausalLM(config), Qwen2ForCausalLM(config).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    training = Training(method="kd")
    times = []
    for step in range(4):
        ids = torch.randint(0, VOCAB, (BATCH, length), generator=torch.Generator().manual_seed(step))
        start = time.perf_counter()
        if mode == "naive":
            logits = student(input_ids=ids).logits
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids).logits
            kd = training.settings_of("kd")
            loss = losses.distill_loss(logits, teacher_logits, kd.temperature) \
                + kd.lm_weight * losses.lm_loss(logits, ids)
        else:
            batch = MicroBatch(student, student, ids, None, training, DenseTeacher(ids.device, teacher))
            loss = distill_objective(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss
        if step:
            times.append(time.perf_counter() - start)
    status = Path("/proc/self/status").read_text().splitlines()
    peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
    seconds = statistics.median(times)
    return {"mode": mode, "length": length, "tokens_per_step": BATCH * length, "peak_rss_bytes": peak_kib * 1024,
            "step_seconds": seconds, "tokens_per_second": BATCH * length / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--out", default="docs/bench/distill_memory")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_run(args.child[0], int(args.child[1]))))
        return
    rows = []
    for length in args.lengths:
        for mode in ("naive", "chunked"):
            rows.append(child_row([sys.executable, __file__, "--child", mode, str(length)]))
    lines = [f"One distillation step, vocabulary {VOCAB:,}, batch {BATCH}, random Qwen2 student and teacher "
             "(hidden 64, 2 layers), fp32 CPU; peak RSS of a fresh process, median of 3 steps after 1 warm-up.", "",
             "| tokens per step | path | peak RSS | step | tokens/s |", "|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {BATCH} × {r['length']} | {r['mode']} | {r['peak_rss_bytes'] / 2**30:.2f} GiB | "
                     f"{r['step_seconds']:.2f} s | {r['tokens_per_second']:,.0f} |")
    write_result(args.out, {"machine": machine(), "args": vars(args), "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
