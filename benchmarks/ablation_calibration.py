"""How many calibration samples are enough (paper section 4.2.3): held-out perplexity after one-shot
pruning with the statistics of the first N calibration windows, N = 8 ... 256, for several seeds.

The windows of one seed are nested (``sample_windows`` extends a smaller set with the same seed), so one
calibration pass per seed serves every N: statistics are sums over windows, accumulated chunk by chunk
and read off after 8, 16, 32, ... windows.

    python benchmarks/ablation_calibration.py --out docs/bench/ablation_calibration
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import add_run_arguments, load_dense_run, machine, parse_width, write_result

from transact.core.calibrate import Statistics, calibrate, sample_windows
from transact.core.step import prune_step
from transact.io.text import read_texts
from transact.measure import report
from transact.recipes import PruneRecipe


def plot(counts: list[int], seeds: list[int], widths: list[tuple], results: dict[str, float], dense_ppl: float,
         path: Path) -> None:
    """Perplexity vs calibration samples: the median over seeds per width, the seeds' range shaded."""
    plt = report.pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for h, k, m in widths:
        runs = [[results[f"{h}/{k}/{m}@{n}@{s}"] for s in seeds] for n in counts]
        line, = ax.plot(counts, [statistics.median(v) for v in runs], marker="o", label=f"{h}/{k}/{m}")
        ax.fill_between(counts, [min(v) for v in runs], [max(v) for v in runs], color=line.get_color(), alpha=0.2)
    ax.axhline(dense_ppl, color="grey", linestyle="--", label="dense")
    ax.set(xscale="log", yscale="log", xlabel="calibration samples (windows)", ylabel="held-out perplexity",
           title=f"One-shot pruning vs calibration size (median, range over {len(seeds)} seeds)")
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.legend()
    report.save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", nargs="+", type=int, default=[8, 16, 32, 64, 128, 256])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--widths", nargs="+", type=parse_width, default=[(6, 2, 1024), (3, 1, 512)])
    add_run_arguments(ap)
    ap.add_argument("--out", default="docs/bench/ablation_calibration")
    args = ap.parse_args()
    counts = sorted(args.counts)

    run = load_dense_run(args)
    dense = run.model
    texts = read_texts("builtin")
    dense_ppl = run.perplexity(dense)
    recipes = {w: PruneRecipe(correctors=(), heads=w[0], kv_heads=w[1], mlp=w[2]) for w in args.widths}

    results: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for seed in args.seeds:
        windows = sample_windows(run.tokenizer, texts, counts[-1], args.seq_len, seed)
        stats, done, elapsed = None, 0, 0.0
        for n in counts:
            t = time.perf_counter()
            more = calibrate(dense, windows[done:n], progress=False)  # the windows after the first ``done``
            stats = more if stats is None else stats.merged(more)
            elapsed += time.perf_counter() - t
            done = n
            seconds[f"{n}@{seed}"] = elapsed
            for w, recipe in recipes.items():
                model = copy.deepcopy(dense)
                prune_step(model, None, recipe, statistics=Statistics(activations=stats))
                key = f"{w[0]}/{w[1]}/{w[2]}@{n}@{seed}"
                results[key] = run.perplexity(model)
                print(f"seed {seed} samples {n} ({elapsed:.0f} s) {key}: ppl {results[key]:.2f}", flush=True)

    header = f"| samples (x {args.seq_len} tokens) | calibration s | " + " | ".join(
        f"{h}/{k}/{m}: median [min, max]" for h, k, m in args.widths) + " |"
    lines = [f"Dense perplexity {dense_ppl:.2f} on {run.eval_ids.numel()} held-out tokens; seeds "
             f"{', '.join(map(str, args.seeds))}; one shot, no training.", "", header,
             "|---:|---:|" + "---:|" * len(args.widths)]
    for n in counts:
        secs = statistics.median(seconds[f"{n}@{s}"] for s in args.seeds)
        cells = []
        for h, k, m in args.widths:
            vals = [results[f"{h}/{k}/{m}@{n}@{s}"] for s in args.seeds]
            cells.append(f"{statistics.median(vals):,.1f} [{min(vals):,.1f}, {max(vals):,.1f}]")
        lines.append(f"| {n} | {secs:.0f} | " + " | ".join(cells) + " |")
    write_result(args.out, {"machine": machine(), "args": vars(args), "dense_perplexity": dense_ppl,
                            "calibration_seconds": seconds, "perplexity": results}, "\n".join(lines))
    plot(counts, args.seeds, args.widths, results, dense_ppl, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
