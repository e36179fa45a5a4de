"""Cost of the calibration hooks: the same forward passes over the same tokens with and without the
statistics hooks, each in its own process (so peak memory is that mode's own), alternated over rounds.

    python benchmarks/calibration_overhead.py --samples 64 --seq-len 512 --rounds 3 \
        --out docs/bench/calibration_overhead
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_result

from transact import assets
from transact.calibrate import calibrate, decoder_stack, read_texts, sample_windows
from transact.models import load_model, resolve_source


def child(mode: str, samples: int, seq_len: int, batch_size: int, device: str) -> dict:
    model, tok = load_model(resolve_source(assets.SMOLLM2), device=torch.device(device), dtype=torch.float32)
    windows = sample_windows(tok, read_texts("builtin"), samples, seq_len, seed=0)
    body = decoder_stack(model)
    with torch.inference_mode():  # warm-up, identical for both modes
        body(input_ids=windows[:batch_size].to(device), use_cache=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if mode == "hooks":
        calibrate(model, windows, batch_size=batch_size, progress=False)
    else:
        with torch.inference_mode():
            for i in range(0, samples, batch_size):
                body(input_ids=windows[i:i + batch_size].to(device), use_cache=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"mode": mode, "seconds": seconds, "peak_bytes": peak, "tokens": samples * seq_len}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="docs/bench/calibration_overhead")
    ap.add_argument("--child", choices=["plain", "hooks"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.samples, args.seq_len, args.batch_size, args.device)))
        return

    assets.smollm2_dir()  # convert once, outside the timed children
    runs: dict[str, list[dict]] = {"plain": [], "hooks": []}
    for r in range(args.rounds):
        for mode in (("plain", "hooks") if r % 2 == 0 else ("hooks", "plain")):
            cmd = [sys.executable, __file__, "--child", mode, "--samples", str(args.samples), "--seq-len",
                   str(args.seq_len), "--batch-size", str(args.batch_size), "--device", args.device]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
            print(mode, runs[mode][-1], flush=True)
    med = {m: statistics.median(x["seconds"] for x in v) for m, v in runs.items()}
    peak = {m: max(x["peak_bytes"] for x in v) for m, v in runs.items()}
    tokens = args.samples * args.seq_len
    table = "\n".join([
        f"SmolLM2-135M fp32 on {args.device}, {args.samples} x {args.seq_len} tokens, batch {args.batch_size}, "
        f"median of {args.rounds} alternated runs per mode.", "",
        "| mode | seconds | tokens/s | peak memory |", "|---|---:|---:|---:|",
        *(f"| {m} | {med[m]:.2f} | {tokens / med[m]:,.0f} | {peak[m] / 2**20:,.0f} MiB |" for m in ("plain", "hooks")),
        "", f"Overhead (hooks / plain): time {med['hooks'] / med['plain']:.3f}x, "
            f"peak memory {peak['hooks'] / peak['plain']:.3f}x.",
    ])
    write_result(args.out, {"machine": machine(), "args": vars(args), "runs": runs,
                            "time_ratio": med["hooks"] / med["plain"], "memory_ratio": peak["hooks"] / peak["plain"]},
                 table)


if __name__ == "__main__":
    main()
