"""A mixture of experts of Qwen3-30B-A3B's routing on random weights: prune experts and expert channels through
the command line (the prune reloads the checkpoint with vanilla transformers and compares logits), convert
both to GGUF, and measure llama.cpp's prefill and decode against the analytic ratios.

No mixture-of-experts weights are available offline, so the model is built from Qwen3-30B-A3B's routing (128
experts, 8 per token, top-k renormalised, GQA 32/4 x 128 scaled to 16/2 x 64) with smaller widths and fewer
layers, random weights, and pruned with the data-free random metric (no refit): what is measured is the
machinery and the speed, not quality.

    python benchmarks/moe.py [--layers 4] [--out docs/bench/moe]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from common import machine, write_result

SHAPE = dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=2, head_dim=64, num_experts=128,
             num_experts_per_tok=8, moe_intermediate_size=384, intermediate_size=3072, norm_topk_prob=True,
             vocab_size=151936)
PRUNED = ["--experts", "64", "--mlp", "192", "--heads", "8", "--kv-heads", "1"]


def build(folder: Path, layers: int) -> None:
    """The random model, saved in bf16 with SmolLM2's tokenizer (its ids lie within the vocabulary)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from transact.io.models import smollm2_dir

    config = AutoConfig.for_model("qwen3_moe", num_hidden_layers=layers, tie_word_embeddings=False, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2, **SHAPE)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_dir()).save_pretrained(folder)


def main() -> None:
    from transact.cli import main as cli
    from transact.jobs.bench import BenchJob
    from transact.jobs.bench import run as run_bench
    from transact.measure.bench import BenchGrid

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default="docs/bench/moe")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dense, pruned = Path(tmp) / "dense", Path(tmp) / "pruned"
        build(dense, args.layers)
        if cli(["prune", str(dense), "--out", str(pruned), "--metric", "random", "--no-reconstruct", "--quiet",
                "--dtype", "float32", *PRUNED]) != 0:
            raise SystemExit("prune failed")
        report = json.loads((pruned / "report.json").read_text())
        grid = BenchGrid(batches=(1, 4), contexts=(256,), gen=32, repeats=3, warmup=1)
        bench = run_bench(BenchJob((str(dense), str(pruned)), grid=grid, engine="llama.cpp", outtypes=("f16",),
                                   progress=False))
    before, after = report["before"], report["after"]
    rows = [r for r in bench["rows"] if r["model"].startswith("pruned")]
    result = {"machine": machine(), "args": vars(args), "shape": SHAPE, "pruned": PRUNED, "before": before,
              "after": after, "llama_cpp": bench}
    ratio = {key: after[key] / before[key] for key in ("params", "active_params", "kv_cache_bytes_per_token")}
    flops = after["flops_per_token"]["1024"] / before["flops_per_token"]["1024"]
    lines = [f"Qwen3-30B-A3B routing (128 experts, top-8) at smaller widths, {args.layers} layers, random bf16 "
             f"weights; pruned with `transact prune --metric random --no-reconstruct --dtype float32 "
             f"{' '.join(PRUNED)}`; llama.cpp f16 GGUF, 256-token prompt, 32 new tokens, median of 3.", "",
             "| | dense | pruned | pruned/dense |", "|---|---:|---:|---:|",
             f"| parameters | {before['params']:,} | {after['params']:,} | {ratio['params']:.3f} |",
             f"| active parameters per token | {before['active_params']:,} | {after['active_params']:,} | "
             f"{ratio['active_params']:.3f} |",
             f"| GFLOPs per token @1024 | {before['flops_per_token']['1024'] / 1e9:.3f} | "
             f"{after['flops_per_token']['1024'] / 1e9:.3f} | {flops:.3f} |",
             f"| KV cache bytes per token | {before['kv_cache_bytes_per_token']:,} | "
             f"{after['kv_cache_bytes_per_token']:,} | {ratio['kv_cache_bytes_per_token']:.3f} |", "",
             "| batch | prefill speedup (analytic) | decode speedup (analytic) |", "|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['prefill_speedup']:.2f}x ({r['prefill_speedup_analytic']:.2f}x) | "
                     f"{r['decode_speedup']:.2f}x ({r['decode_speedup_analytic']:.2f}x) |")
    write_result(args.out, result, "\n".join(lines))
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
