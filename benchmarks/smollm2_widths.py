"""Held-out perplexity, parameters and KV cache of SmolLM2-135M pruned by transact / random / magnitude
at several widths. One calibration pass serves every transact width; every variant starts from a fresh
copy of the dense model and is scored on the same held-out tokens.

    python benchmarks/smollm2_widths.py --out docs/bench/smollm2_widths
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_result

from transact import assets, evaluate
from transact.calibrate import calibrate, read_texts, sample_windows, token_stream
from transact.models import load_model, resolve_source
from transact.plan import ModelShape, make_plan, resolve_targets
from transact.prune import prune_
from transact.recipe import PruneRecipe
from transact.score import magnitude_scores, random_layer_scores, transact_scores


def parse_width(text: str) -> tuple[int, int, int]:
    heads, kv, mlp = (int(v) for v in text.split("/"))
    return heads, kv, mlp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", nargs="+", default=[(6, 2, 1024), (4, 2, 768), (3, 1, 512)], type=parse_width,
                    help="heads/kv_heads/mlp per layer")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/bench/smollm2_widths")
    args = ap.parse_args()

    dense, tok = load_model(resolve_source(assets.SMOLLM2), device=torch.device("cpu"), dtype=torch.float32)
    shape = ModelShape.of(dense.config)
    eval_ids = token_stream(tok, read_texts("builtin", builtin="heldout"), limit=args.eval_tokens)

    def ppl(model) -> float:
        return evaluate.perplexity(model, eval_ids, window=args.window, progress=False).perplexity

    rows = [{"variant": "dense", **evaluate.model_summary(dense), "perplexity": ppl(dense)}]
    t = time.perf_counter()
    windows = sample_windows(tok, read_texts("builtin"), args.samples, args.seq_len, args.seed)
    stats = calibrate(dense, windows, batch_size=4, progress=False)
    calib_s = time.perf_counter() - t
    scorers = {
        "transact": lambda m: transact_scores(stats, shape),
        "random": lambda m: random_layer_scores(shape, args.seed),
        "magnitude": lambda m: magnitude_scores(m, shape),
    }
    for heads, kv, mlp in args.widths:
        targets = resolve_targets(PruneRecipe(heads=heads, kv_heads=kv, mlp=mlp), shape)
        for metric, scorer in scorers.items():
            model = copy.deepcopy(dense)
            scores = scorer(model)
            prune_(model, make_plan(scores.heads, scores.mlp, targets, shape))
            row = {"variant": f"{metric} {heads}/{kv}/{mlp}", "metric": metric, **evaluate.model_summary(model),
                   "perplexity": ppl(model)}
            rows.append(row)
            print(f"{row['variant']}: ppl {row['perplexity']:.2f}", flush=True)

    d = rows[0]
    lines = [f"Held-out: {eval_ids.numel()} tokens of LAMBADA passages, window {args.window}. "
             f"Calibration: {args.samples} x {args.seq_len} tokens (seed {args.seed}), {calib_s:.0f} s.", "",
             "| variant (heads/kv/mlp) | params | params vs dense | KV bytes/token | perplexity |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['params'] / 1e6:.1f} M | {r['params'] / d['params']:.2f} | "
                     f"{r['kv_cache_bytes_per_token']:,} | {r['perplexity']:.2f} |")
    write_result(args.out, {"machine": machine(), "args": vars(args) | {"widths": args.widths},
                            "calibration_seconds": calib_s, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
