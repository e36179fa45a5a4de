"""Per-layer MLP widths against uniform widths at equal parameters, on one real model: at each mean width,
the uniform prune (the default metric and the refit: exactly the default pipeline at that width) and the
allocation the evolutionary search finds on the calibration loss (``transact.core.allocate``), from the
same channel ranking and refit. One shot, no training; held-out perplexity and parameters.

    python benchmarks/allocate.py --model builtin:smollm2 --widths 768 512 --out docs/bench/allocate/smollm2

Rows are written after every width, so an interrupted run continues where it stopped (same settings).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import load_dense_run, machine, previous_result, write_result

from transact.arch import shape_of
from transact.core.allocate import (
    WidthSearch,
    mlp_variants,
    search_widths,
    slice_to_widths_,
    trial_widths,
    width_levels,
)
from transact.core.correct.refit import damp_for
from transact.core.metrics import get_metric
from transact.core.step import calibration_windows, gather_statistics, prune_step
from transact.measure.costs import count_parameters
from transact.recipes import Calibration, PruneRecipe


def parse_args() -> argparse.Namespace:
    defaults = WidthSearch()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--widths", nargs="+", type=int, required=True, help="mean MLP widths (multiples of --step)")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows (statistics and search)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=1024)
    for name in ("step", "generations", "offspring", "survivors", "first_samples", "final_samples", "max_swaps",
                 "seed"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    ap.add_argument("--seconds", type=float, default=None, help="time budget of each search")
    ap.add_argument("--search-dtype", default="bfloat16", choices=["float32", "bfloat16"],
                    help="the search scores candidates on a copy in this dtype (WidthSearch.score_dtype; bf16: 2.5x "
                         "faster on this CPU); "
                         "perplexities are measured in fp32")
    ap.add_argument("--out", required=True, help="path prefix for .json and .md")
    return ap.parse_args()


def table(result: dict) -> str:
    s = result["settings"]
    lines = [f"{s['model']}: MLP widths per layer searched on the calibration loss ({s['calibration']} calibration "
             f"tokens, step {s['search']['step']}, scored in {s['search_dtype']}) against the uniform width at equal "
             f"parameters; held-out perplexity on {s['eval_tokens']:,} LAMBADA tokens (dense "
             f"{result['dense_perplexity']:.2f}). Default metric and refit for both; one shot, no training.", "",
             "| mean MLP width | params | uniform | searched | searched / uniform | calibration loss uniform -> "
             "searched | generations | search time | widths per layer |",
             "|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['mean_width']} | {r['params_ratio']:.3f} | {r['uniform']:.2f} | {r['searched']:.2f} | "
                     f"{r['searched'] / r['uniform']:.3f} | {r['uniform_loss']:.4f} -> {r['loss']:.4f} | "
                     f"{r['generations']} | {r['search_seconds']:.0f} s | {' '.join(map(str, r['widths']))} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    search = WidthSearch(**{k: getattr(args, k) for k in ("step", "generations", "offspring", "survivors",
                                                          "first_samples", "final_samples", "max_swaps", "seed",
                                                          "seconds")}, score_dtype=args.search_dtype)
    settings = {"model": args.model, "calibration": f"{args.samples} x {args.seq_len}", "search": asdict(search),
                "eval_tokens": args.eval_tokens, "window": args.window, "search_dtype": args.search_dtype}
    out = Path(args.out)
    previous = previous_result(out, settings)
    run = load_dense_run(args)
    dense, tok = run.model, run.tokenizer

    def ppl(model) -> float:
        return round(run.perplexity(model), 3)

    recipe = PruneRecipe(mlp=args.widths[0], calibration=Calibration(samples=args.samples, seq_len=args.seq_len))
    stats = gather_statistics(dense, tok, recipe)
    windows = calibration_windows(tok, recipe)  # the windows the statistics came from
    scores = get_metric(recipe.metric).score(dense, stats, shape_of(dense), recipe).mlp
    levels = width_levels(shape_of(dense).intermediate_size, search.step, search.min_width)
    t = time.perf_counter()
    variants = mlp_variants(dense, stats.activation("mlp", "gram"), scores, levels, damp_for(stats))
    for layer in variants:  # every refit up front, so that the search's time is the search's
        for width in layer.widths:
            layer.columns(width)
    refit_seconds = time.perf_counter() - t
    result = previous or {"settings": settings, "dense_perplexity": ppl(dense), "dense_params": count_parameters(dense),
                          "refit_seconds": round(refit_seconds, 1), "rows": [], "machine": machine()}
    done = {r["mean_width"] for r in result["rows"]}
    for width in args.widths:
        if width in done:
            continue
        found = search_widths(dense, windows, variants, width, search)  # scored on a copy in --search-dtype
        with trial_widths(dense, variants) as trial:
            trial.set_([width] * len(variants))
            uniform = ppl(dense)
            trial.set_(found.widths)
            searched = ppl(dense)
        pipeline = copy.deepcopy(dense)
        prune_step(pipeline, None, PruneRecipe(mlp=width, calibration=recipe.calibration), statistics=stats)
        sliced = slice_to_widths_(copy.deepcopy(dense), variants, found.widths)
        row = {"mean_width": width, "uniform": uniform, "uniform_pipeline": ppl(pipeline), "searched": searched,
               "searched_sliced": ppl(sliced),
               "params_ratio": round(count_parameters(sliced) / result["dense_params"], 4),
               "widths": found.widths, "loss": round(found.loss, 5), "uniform_loss": round(found.uniform_loss, 5),
               "generations": found.generations, "evaluations": found.evaluations,
               "search_seconds": round(found.seconds, 1), "history": [round(v, 5) for v in found.history]}
        del pipeline, sliced
        result["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "history"}), file=sys.stderr, flush=True)
        write_result(out, result, table(result))
    write_result(out, result, table(result))


if __name__ == "__main__":
    main()
