"""Held-out perplexity, parameters and KV cache of a model pruned one-shot by several salience metrics
at several widths, and the time each metric's scoring pass takes. Each metric scores the dense model once
(timed) and serves every width; every variant starts from a fresh copy of the dense model and is scored
on the same held-out tokens.

    python benchmarks/compare_metrics.py --metrics transact random magnitude --out docs/bench/smollm2_widths
    python benchmarks/compare_metrics.py --out docs/bench/metrics     # all six metrics
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import add_run_arguments, load_dense_run, machine, parse_width, write_result

from transact import evaluate
from transact.calibrate import read_texts
from transact.pipeline import score_model
from transact.plan import make_plan, resolve_targets
from transact.prune import prune_
from transact.recipe import METRICS, Calibration, PruneRecipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", nargs="+", default=[(6, 2, 1024), (4, 2, 768), (3, 1, 512)], type=parse_width,
                    help="heads/kv_heads/mlp per layer")
    ap.add_argument("--metrics", nargs="+", choices=METRICS, default=list(METRICS))
    add_run_arguments(ap)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", default="docs/bench/metrics")
    args = ap.parse_args()

    run = load_dense_run(args)
    dense, tok, shape, eval_ids, ppl = run.model, run.tokenizer, run.shape, run.eval_ids, run.perplexity
    calib_texts = read_texts("builtin")
    calibration = Calibration(samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size)

    rows = [{"variant": "dense", **evaluate.model_summary(dense), "perplexity": ppl(dense)}]
    seconds = {}
    scores = {}
    for metric in args.metrics:
        recipe = PruneRecipe(heads=shape.num_heads, metric=metric, seed=args.seed, calibration=calibration)
        t = time.perf_counter()
        scores[metric], _ = score_model(copy.deepcopy(dense), tok, recipe, calib_texts, progress=False)
        seconds[metric] = time.perf_counter() - t
        print(f"{metric}: scored in {seconds[metric]:.1f} s", flush=True)
    for heads, kv, mlp in args.widths:
        targets = resolve_targets(PruneRecipe(heads=heads, kv_heads=kv, mlp=mlp), shape)
        for metric in args.metrics:
            model = copy.deepcopy(dense)
            prune_(model, make_plan(scores[metric].heads, scores[metric].mlp, targets, shape))
            row = {"variant": f"{metric} {heads}/{kv}/{mlp}", "metric": metric, **evaluate.model_summary(model),
                   "perplexity": ppl(model)}
            rows.append(row)
            print(f"{row['variant']}: ppl {row['perplexity']:.2f}", flush=True)

    d = rows[0]
    timing = ", ".join(f"{m} {s:.0f} s" for m, s in seconds.items())
    lines = [f"Held-out: {eval_ids.numel()} tokens of LAMBADA passages, window {args.window}. "
             f"Calibration: {args.samples} x {args.seq_len} tokens (seed {args.seed}). Scoring time: {timing}.", "",
             "| variant (heads/kv/mlp) | params | params vs dense | KV bytes/token | perplexity |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['params'] / 1e6:.1f} M | {r['params'] / d['params']:.2f} | "
                     f"{r['kv_cache_bytes_per_token']:,} | {r['perplexity']:.2f} |")
    write_result(args.out, {"machine": machine(), "args": vars(args) | {"widths": args.widths},
                            "scoring_seconds": seconds, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
