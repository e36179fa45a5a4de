"""Training throughput of ``transact run``'s step (forward, backward, clipping, AdamW, through accelerate)
against the raw forward+backward pass of the same model on the same batches, interleaved so that both
see the same machine load.

    python benchmarks/train_throughput.py --model builtin:smollm2 --steps 10 --out docs/bench/train_throughput
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch
from common import machine, write_result

from transact.io.models import load_model, prepare_model
from transact.recipes import Training
from transact.recovery.data import BlockStream
from transact.recovery.losses import lm_loss
from transact.recovery.train import PhaseSpec, train_phase


def raw_step(model: torch.nn.Module, ids: torch.Tensor) -> None:
    loss = lm_loss(model(input_ids=ids).logits, ids)
    loss.backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    from accelerate import Accelerator

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", default="docs/bench/train_throughput")
    args = ap.parse_args()

    model, tok = load_model(prepare_model(args.model, "cpu", "float32"))
    training = Training(seq_len=args.seq_len, batch_size=args.batch_size, lr=1e-5, log_every=1000, save_every=0)
    accelerator = Accelerator(cpu=True)
    tokens = args.steps * training.tokens_per_step
    raw, full = [], []
    stream = BlockStream(tok, "builtin", args.seq_len, 0, 16)
    batches = [stream.take(args.batch_size) for _ in range(args.steps)]
    model.train()
    raw_step(model, batches[0])  # warm-up
    for r in range(args.rounds):
        t = time.perf_counter()
        for ids in batches:
            raw_step(model, ids)
        raw.append(tokens / (time.perf_counter() - t))
        t = time.perf_counter()
        train_phase(accelerator, model, BlockStream(tok, "builtin", args.seq_len, 0, 16), training,
                    PhaseSpec(phase=r + 1, total_steps=args.steps), progress=False)
        full.append(tokens / (time.perf_counter() - t))
        print(f"round {r + 1}: raw fwd+bwd {raw[-1]:.0f} tokens/s, training step {full[-1]:.0f} tokens/s", flush=True)
    raw_m, full_m = statistics.median(raw), statistics.median(full)
    table = "\n".join([
        f"{args.model}, batch {args.batch_size} x {args.seq_len} tokens, {args.steps} steps per round, "
        f"median of {args.rounds} rounds, {torch.get_num_threads()} torch threads.", "",
        "| | tokens/s |", "|---|---:|",
        f"| raw forward + backward | {raw_m:,.0f} |",
        f"| transact training step (+ clip, AdamW, accelerate) | {full_m:,.0f} |",
        f"| ratio | {full_m / raw_m:.2f} |"])
    write_result(args.out, {"machine": machine(), "args": vars(args), "raw_tokens_per_s": raw,
                            "train_tokens_per_s": full}, table)


if __name__ == "__main__":
    main()
