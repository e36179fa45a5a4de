"""Dropping attention or MLP sub-blocks on one real model: every candidate layer's sub-block scored once by
the calibration loss with it zeroed, then the lowest N dropped for each count asked; one shot, no training.
Held-out perplexity, parameters, KV cache and FLOPs against the dense model, and the layers chosen.

    python benchmarks/sub_block_drop.py --model builtin:smollm2 --counts 3 6 10 15 \
        --out docs/bench/attention_drop/smollm2
    python benchmarks/sub_block_drop.py --model builtin:qwen2.5-coder-0.5b --counts 3 6 12 \
        --out docs/bench/attention_drop/qwen2_5_coder_0_5b
    python benchmarks/sub_block_drop.py --model builtin:smollm2 --counts 10 15 --rounds 3 \
        --out docs/bench/attention_drop/smollm2_rounds
    python benchmarks/sub_block_drop.py --part mlp --model builtin:smollm2 --counts 1 2 3 6 --rounds 1 3 \
        --out docs/bench/mlp_drop/smollm2

``--part``: attention (the default; every layer's but the first's) or mlp (every layer's). ``--rounds R``: the
sub-blocks chosen in R rounds (each scoring the layers left with the earlier rounds' choices dropped) rather
than from the one pass; R 1 is the one pass.

The same calibration and held-out text as ``benchmarks/depth.py`` and ``benchmarks/transfer.py`` (the first
4,096 LAMBADA tokens in 1,024-token windows), so their rows at the same KV cache compare with these.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_result

from transact.core.calibrate import sample_windows
from transact.core.sub_block_drop import candidates, choose_sub_blocks, loss_scores, lowest, skip_sub_blocks_, sub_block
from transact.io.models import load_model, prepare_model
from transact.io.text import read_texts, token_stream
from transact.measure.costs import model_summary
from transact.measure.perplexity import heldout_perplexity
from transact.recipes import HeldoutText


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--part", choices=("attention", "mlp"), default="attention")
    ap.add_argument("--counts", nargs="+", type=int, required=True, help="sub-blocks dropped, one row each")
    ap.add_argument("--rounds", nargs="+", type=int, default=[1], help="rounds of choosing, one row each")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows drawn (as depth.py draws them)")
    ap.add_argument("--loss-samples", type=int, default=8, help="of those, the windows each layer's score runs on")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--out", required=True, help="path prefix for .json and .md")
    return ap.parse_args()


def table(result: dict) -> str:
    dense = result["dense"]
    noun = sub_block(result.get("part", "attention")).noun
    lines = [f"{result['model']} ({result['layers']} layers), {noun} scored on {result['loss_samples']} x "
             f"{result['seq_len']} calibration tokens (one pass {result['score_seconds']:.0f} s); held-out "
             f"perplexity on "
             f"{result['eval_tokens']:,} LAMBADA tokens (dense {dense['perplexity']:.2f}); one shot, no training.", "",
             f"| {noun} dropped | rounds | layers | params | KV cache | GFLOPs/token @4096 | held-out ppl "
             "| vs dense |",
             "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['count']} | {row.get('rounds', 1)} | {', '.join(map(str, row['dropped']))} | "
                     f"{row['params_share']:.3f} | "
                     f"{row['kv_share']:.3f} | {row['flops_4096'] / 1e9:.3f} | {row['perplexity']:.2f} | "
                     f"{row['perplexity'] / dense['perplexity']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    prep = prepare_model(args.model, "cpu", "float32")
    model, tokenizer = load_model(prep)
    windows = sample_windows(tokenizer, read_texts("builtin"), args.samples, args.seq_len, seed=0)
    ids = token_stream(tokenizer, read_texts("builtin", builtin="heldout"), limit=args.eval_tokens)
    heldout = HeldoutText(tokens=args.eval_tokens, window=args.window)
    dense = model_summary(model)
    dense["perplexity"] = heldout_perplexity(model, ids, heldout, progress=False).perplexity
    layers = candidates(model, args.part)
    t0 = time.perf_counter()  # the one pass, where a row uses it
    scores = loss_scores(model, windows[: args.loss_samples], layers, args.part) if 1 in args.rounds else None
    result = {"model": args.model, "part": args.part, "layers": prep.shape.num_layers,
              "loss_samples": args.loss_samples, "seq_len": args.seq_len, "eval_tokens": args.eval_tokens,
              "machine": machine(), "score_seconds": round(time.perf_counter() - t0, 1), "dense": dense,
              "scores": None if scores is None else dict(zip(layers, [round(float(s), 5) for s in scores],
                                                             strict=True)), "rows": []}
    for rounds in args.rounds:
        for count in args.counts:
            t1 = time.perf_counter()
            dropped = lowest(layers, scores, count) if rounds == 1 else choose_sub_blocks(
                model, windows[: args.loss_samples], layers, count, rounds, args.part)[0]
            seconds = round(time.perf_counter() - t1, 1)
            pruned = copy.deepcopy(model)
            skip_sub_blocks_(pruned, dropped, args.part)
            after = model_summary(pruned)
            ppl = heldout_perplexity(pruned, ids, heldout, progress=False).perplexity
            result["rows"].append({"count": count, "rounds": rounds, "dropped": dropped, "perplexity": ppl,
                                   "choose_seconds": seconds, "params_share": after["params"] / dense["params"],
                                   "kv_share": after["kv_cache_bytes_per_token"] / dense["kv_cache_bytes_per_token"],
                                   "flops_4096": after["flops_per_token"]["4096"]})
            print(f"{count} dropped in {rounds} rounds {dropped}: {ppl:.2f}", flush=True)
            write_result(args.out, result, table(result))
            del pruned


if __name__ == "__main__":
    main()
