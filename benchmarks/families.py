"""Every family on random weights of a real model's shape: prune through the command line, check the
vanilla reload (the prune does), and measure speed against the analytic ratios.

No pretrained weights of Gemma, Granite, SmolLM3, Phi or Qwen3.5 are available offline, so each family is built
from its published per-layer shape (hidden size, heads, KV heads, head size, MLP width, vocabulary) with
fewer layers, random weights, and pruned with the data-free random metric (no refit): what is measured is
the machinery (surgery, checkpoint, reload, speed), not quality.

    python benchmarks/families.py [--layers 4] [--families gemma3_text ...] [--out docs/bench/families]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from common import machine, write_result

# family -> (the model it takes its shape from, config values, pruned widths heads/kv/mlp)
SHAPES = {
    "gemma3_text": ("gemma-3-1b", dict(hidden_size=1152, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                                       intermediate_size=6912, vocab_size=262144, query_pre_attn_scalar=256,
                                       sliding_window=512), (2, 1, 3456)),
    "gemma2": ("gemma-2-2b", dict(hidden_size=2304, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                  intermediate_size=9216, vocab_size=256000, query_pre_attn_scalar=256,
                                  sliding_window=4096), (4, 2, 4608)),
    "granite": ("granite-3.3-2b", dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                       intermediate_size=8192, vocab_size=49159, attention_multiplier=0.015625,
                                       residual_multiplier=0.22, embedding_multiplier=12.0, logits_scaling=8.0),
                (16, 4, 4096)),
    "smollm3": ("SmolLM3-3B", dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                                   intermediate_size=11008, vocab_size=128256), (8, 2, 5504)),
    "phi3": ("Phi-4-mini (longrope: heads stay)", dict(
        hidden_size=3072, num_attention_heads=24, num_key_value_heads=8, head_dim=128, intermediate_size=8192,
        vocab_size=200064, original_max_position_embeddings=4096, max_position_embeddings=131072,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                         "short_factor": [1.0] * 48, "long_factor": [1.5] * 48,
                         "original_max_position_embeddings": 4096}), (24, 8, 4096)),
    # transformers' Qwen3_5TextConfig defaults ("Qwen3.5-9B style"): with 4 layers, 3 Gated DeltaNet layers
    # and 1 softmax-attention layer, as in the released 3:1 pattern
    "qwen3_5_text": ("Qwen3.5-9B (transformers' default config)", dict(
        hidden_size=4096, num_attention_heads=16, num_key_value_heads=4, head_dim=256, intermediate_size=12288,
        vocab_size=248320, linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
        linear_value_head_dim=128), (8, 2, 6144)),
}


def build(folder: Path, family: str, layers: int) -> int:
    """A random model of ``family``'s shape with ``layers`` layers, saved in bf16 with SmolLM2's tokenizer.
    -> parameter count."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from transact.io.models import smollm2_dir

    _, values, _ = SHAPES[family]
    config = AutoConfig.for_model(family, num_hidden_layers=layers, tie_word_embeddings=True, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2, **values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_dir()).save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def measure(family: str, layers: int, tmp: Path) -> dict:
    from transact.cli import main
    from transact.jobs.bench import BenchJob
    from transact.jobs.bench import run as run_bench
    from transact.measure.bench import BenchGrid

    source, _, (heads, kv, mlp) = SHAPES[family]
    dense, pruned = tmp / f"{family}-dense", tmp / f"{family}-pruned"
    params = build(dense, family, layers)
    code = main(["prune", str(dense), "--out", str(pruned), "--metric", "random", "--no-reconstruct", "--quiet",
                 "--heads", str(heads), "--kv-heads", str(kv), "--mlp", str(mlp), "--dtype", "float32"])
    if code != 0:
        raise SystemExit(f"{family}: prune failed")
    report = json.loads((pruned / "report.json").read_text())
    grid = BenchGrid(batches=(1,), contexts=(256,), gen=16, repeats=3, warmup=1)
    bench = run_bench(BenchJob((str(dense), str(pruned)), grid=grid, dtype="float32", progress=False))
    row = next(r for r in bench["rows"] if r["model"] != bench["rows"][0]["model"])
    return {"family": family, "shape_of": source, "layers": layers, "params": params,
            "widths": [heads, kv, mlp], "saved_as": report["saved_as"],
            "params_ratio": report["after"]["params"] / report["before"]["params"],
            "prefill_speedup": row["prefill_speedup"], "prefill_speedup_analytic": row["prefill_speedup_analytic"],
            "decode_speedup": row["decode_speedup"], "decode_speedup_analytic": row["decode_speedup_analytic"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--families", nargs="+", choices=tuple(SHAPES), default=list(SHAPES))
    ap.add_argument("--out", default="docs/bench/families")
    args = ap.parse_args()
    rows = []
    for family in args.families:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(measure(family, args.layers, Path(tmp)))
        print(rows[-1], file=sys.stderr, flush=True)
    lines = [f"Random weights of each model's per-layer shape, {args.layers} layers, tied embeddings, saved bf16; "
             "pruned with `--metric random --no-reconstruct --dtype float32` (the prune reloads the checkpoint "
             "with vanilla transformers and compares logits); speed with `transact bench` in fp32, batch 1, "
             "256-token prompt, 16 new tokens, median of 3.", "",
             "| family | shape of | heads/kv/mlp kept | saved as | params | prefill speedup (analytic) | "
             "decode speedup (analytic) |", "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['family']}` | {r['shape_of']} | {'/'.join(map(str, r['widths']))} | `{r['saved_as']}` | "
                     f"{r['params_ratio']:.2f}x | {r['prefill_speedup']:.2f}x ({r['prefill_speedup_analytic']:.2f}x) | "
                     f"{r['decode_speedup']:.2f}x ({r['decode_speedup_analytic']:.2f}x) |")
    write_result(args.out, {"machine": machine(), "args": vars(args), "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
