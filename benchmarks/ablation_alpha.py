"""Ablation of alpha in eq. 5 (head salience = mean channel norm + alpha * max channel norm): one
calibration pass, then every alpha at every width, held-out perplexity after one-shot pruning.

    python benchmarks/ablation_alpha.py --alphas 0 0.15625 1 10 --out docs/bench/ablation_alpha
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_result
from compare_metrics import parse_width

from transact import assets, evaluate
from transact.calibrate import calibrate, read_texts, sample_windows, token_stream
from transact.models import load_model, resolve_source
from transact.plan import ModelShape, make_plan, resolve_targets
from transact.prune import prune_
from transact.recipe import PruneRecipe
from transact.score import transact_scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=assets.SMOLLM2)
    ap.add_argument("--alphas", nargs="+", type=float, default=[0.0, 10 / 64, 1.0, 10.0])
    ap.add_argument("--widths", nargs="+", type=parse_width, default=[(6, 2, 1536), (6, 3, 1536), (4, 2, 768)])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/bench/ablation_alpha")
    args = ap.parse_args()

    dense, tok = load_model(resolve_source(args.model), device=torch.device("cpu"), dtype=torch.float32)
    shape = ModelShape.of(dense.config)
    eval_ids = token_stream(tok, read_texts("builtin", builtin="heldout"), limit=args.eval_tokens)
    windows = sample_windows(tok, read_texts("builtin"), args.samples, args.seq_len, args.seed)
    stats = calibrate(dense, windows, progress=False)
    dense_ppl = evaluate.perplexity(dense, eval_ids, window=args.window, progress=False).perplexity

    results = {}
    for heads, kv, mlp in args.widths:
        targets = resolve_targets(PruneRecipe(heads=heads, kv_heads=kv, mlp=mlp), shape)
        for alpha in args.alphas:
            scores = transact_scores(stats, shape, alpha)
            model = copy.deepcopy(dense)
            prune_(model, make_plan(scores.heads, scores.mlp, targets, shape))
            ppl = evaluate.perplexity(model, eval_ids, window=args.window, progress=False).perplexity
            results[f"{heads}/{kv}/{mlp}@{alpha:g}"] = ppl
            print(f"{heads}/{kv}/{mlp} alpha {alpha:g}: ppl {ppl:.2f}", flush=True)

    header = "| widths (heads/kv/mlp) | " + " | ".join(f"alpha {a:g}" for a in args.alphas) + " |"
    lines = [f"Dense perplexity {dense_ppl:.2f} on {eval_ids.numel()} held-out tokens; calibration "
             f"{args.samples} x {args.seq_len} tokens (seed {args.seed}); one shot, no training.", "", header,
             "|---|" + "---:|" * len(args.alphas)]
    for heads, kv, mlp in args.widths:
        cells = " | ".join(f"{results[f'{heads}/{kv}/{mlp}@{a:g}']:.2f}" for a in args.alphas)
        lines.append(f"| {heads}/{kv}/{mlp} | {cells} |")
    write_result(args.out, {"machine": machine(), "args": vars(args), "dense_perplexity": dense_ppl,
                            "perplexity": results}, "\n".join(lines))


if __name__ == "__main__":
    main()
