"""Cost of the calibration hooks: the same forward passes over the same tokens with and without the
statistics hooks, each in its own process (so peak memory is that mode's own), alternated over rounds.

By default SmolLM2-135M in fp32. ``--random-llama-1b`` instead builds a randomly initialised model of a
Llama-3.2-1B-like shape (16 layers, hidden 2048, 32/8 heads, MLP 8192) in bf16 fed with random tokens: the
timing does not depend on the weights' values, and it needs no model files (for a GPU machine).

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

from transact.core.calibrate import calibrate, decoder_stack, sample_windows
from transact.io import assets
from transact.io.models import load_model, prepare_model, smollm2_dir
from transact.io.text import read_texts


def random_llama_1b(device: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=32000)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device itself: a CPU init of 1B weights takes ~50 s
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


def child(mode: str, samples: int, seq_len: int, batch_size: int, device: str, random_1b: bool) -> dict:
    if random_1b:
        model = random_llama_1b(device)
        windows = torch.randint(0, 32000, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    else:
        model, tok = load_model(prepare_model(assets.SMOLLM2, device, "float32"))
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
    ap.add_argument("--random-llama-1b", action="store_true", help="random 1B-shaped bf16 model (see above)")
    ap.add_argument("--child", choices=["plain", "hooks"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.samples, args.seq_len, args.batch_size, args.device,
                               args.random_llama_1b)))
        return

    if not args.random_llama_1b:
        smollm2_dir()  # convert once, outside the timed children
    runs: dict[str, list[dict]] = {"plain": [], "hooks": []}
    for r in range(args.rounds):
        for mode in (("plain", "hooks") if r % 2 == 0 else ("hooks", "plain")):
            cmd = [sys.executable, __file__, "--child", mode, "--samples", str(args.samples), "--seq-len",
                   str(args.seq_len), "--batch-size", str(args.batch_size), "--device", args.device]
            cmd += ["--random-llama-1b"] if args.random_llama_1b else []
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
            print(mode, runs[mode][-1], flush=True)
    med = {m: statistics.median(x["seconds"] for x in v) for m, v in runs.items()}
    peak = {m: max(x["peak_bytes"] for x in v) for m, v in runs.items()}
    tokens = args.samples * args.seq_len
    what = "random Llama-1B-shaped bf16" if args.random_llama_1b else "SmolLM2-135M fp32"
    table = "\n".join([
        f"{what} on {args.device}, {args.samples} x {args.seq_len} tokens, batch {args.batch_size}, "
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
