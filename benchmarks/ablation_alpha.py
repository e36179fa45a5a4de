"""Ablation of alpha in eq. 5 (head salience = mean channel norm + alpha * max channel norm): one
calibration pass, then every alpha at every width, held-out perplexity after one-shot pruning.

    python benchmarks/ablation_alpha.py --alphas 0 0.15625 1 10 --out docs/bench/ablation_alpha
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import add_run_arguments, load_dense_run, machine, parse_width, write_result

from transact.core.step import gather_statistics, prune_step
from transact.measure import report
from transact.recipes import Calibration, PruneRecipe


def plot(alphas: list[float], widths: list, results: dict[str, float], dense_ppl: float, path: Path) -> None:
    """Perplexity against α, one line per width; α values evenly spaced (α = 0 has no log position)."""
    plt = report.pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = range(len(alphas))
    for heads, kv, mlp in widths:
        ax.plot(xs, [results[f"{heads}/{kv}/{mlp}@{a:g}"] for a in alphas], marker="o", label=f"{heads}/{kv}/{mlp}")
    ax.axhline(dense_ppl, color="grey", linestyle="--", label="dense")
    ax.set_xticks(xs, [f"{a:g}" for a in alphas])
    ax.set(yscale="log", xlabel="α in eq. 5", ylabel="held-out perplexity", title="One-shot pruning vs α")
    ax.legend()
    report.save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alphas", nargs="+", type=float, default=[0.0, 10 / 64, 1.0, 10.0])
    ap.add_argument("--widths", nargs="+", type=parse_width, default=[(6, 2, 1536), (6, 3, 1536), (4, 2, 768)])
    add_run_arguments(ap)
    ap.add_argument("--out", default="docs/bench/ablation_alpha")
    args = ap.parse_args()

    run = load_dense_run(args)
    dense, eval_ids = run.model, run.eval_ids
    calibration = Calibration(samples=args.samples, seq_len=args.seq_len)
    calibrate_only = PruneRecipe(correctors=(), heads=run.shape.num_heads, seed=args.seed, calibration=calibration)
    stats = gather_statistics(dense, run.tokenizer, calibrate_only, progress=False)
    dense_ppl = run.perplexity(dense)

    results = {}
    for heads, kv, mlp in args.widths:
        for alpha in args.alphas:
            model = copy.deepcopy(dense)
            recipe = PruneRecipe(correctors=(), heads=heads, kv_heads=kv, mlp=mlp, metric_options={"alpha": alpha})
            prune_step(model, None, recipe, statistics=stats)
            ppl = run.perplexity(model)
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
    plot(args.alphas, args.widths, results, dense_ppl, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
