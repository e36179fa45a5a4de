"""Held-out perplexity, parameters and KV cache of a model pruned one-shot by several salience metrics
at several widths, and the time each metric's scoring pass takes. Each metric scores the dense model once
(timed) and serves every width; every variant starts from a fresh copy of the dense model and is scored
on the same held-out tokens.

    python benchmarks/compare_metrics.py --metrics transact random magnitude --out docs/bench/smollm2_widths
    python benchmarks/compare_metrics.py --out docs/bench/metrics     # all six metrics
    python benchmarks/compare_metrics.py --metrics transact random --random-seeds 0 1 2 3 4 --out ...
    python benchmarks/compare_metrics.py --metrics transact flap --flap-bias --out docs/bench/flap_bias
    python benchmarks/compare_metrics.py --flap-bias --tasks piqa,lambada --task-limit 200 --out ...

With ``--tasks``, every variant (the dense model included) is also scored zero-shot on those lm-eval tasks,
in memory, on the first ``--task-limit`` items of each.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import add_run_arguments, load_dense_run, machine, parse_width, write_result

from transact.core.metrics import metric_names
from transact.core.step import plan_step, prune_step
from transact.io.text import read_texts
from transact.measure import report, tasks
from transact.measure.costs import model_summary
from transact.recipes import Calibration, PruneRecipe

# The order of the rows in docs/bench/metrics.*: TransAct, the other tools' metrics, the data-free controls.
DEFAULT_METRICS = ("transact", "flap", "minitron", "taylor", "random", "magnitude")


def score_text(task: dict) -> str:
    """0.655 ± 0.034 (or the score alone where lm-eval gave no standard error)."""
    stderr = f" ± {task['stderr']:.3f}" if task["stderr"] is not None else ""
    return f"{task['score']:.3f}{stderr}"


def plot(rows: list[dict], path: Path) -> None:
    """Held-out perplexity per metric (bars, log scale), grouped by widths; the dense model as a line."""
    plt = report.pyplot()

    pruned = [r for r in rows if r.get("metric")]
    widths = list(dict.fromkeys(r["variant"].split(" ", 1)[1] for r in pruned))
    metrics = list(dict.fromkeys(r["metric"] for r in pruned))
    ppl = {(r["metric"], r["variant"].split(" ", 1)[1]): r["perplexity"] for r in pruned}
    bar = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(1.2 + 0.35 * len(metrics) * len(widths), 4))
    for i, metric in enumerate(metrics):
        xs = [j + i * bar for j, w in enumerate(widths) if (metric, w) in ppl]
        ax.bar(xs, [ppl[metric, w] for w in widths if (metric, w) in ppl], width=bar, label=metric)
    ax.axhline(rows[0]["perplexity"], color="grey", linestyle="--", label="dense")
    ax.set_xticks([j + 0.4 - bar / 2 for j in range(len(widths))], widths)
    ax.set(yscale="log", xlabel="widths per layer (heads/kv_heads/mlp)", ylabel="held-out perplexity",
           title="One-shot pruning by salience metric")
    ax.legend(fontsize="small", ncol=2)
    report.save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", nargs="+", default=[(6, 2, 1024), (4, 2, 768), (3, 1, 512)], type=parse_width,
                    help="heads/kv_heads/mlp per layer")
    ap.add_argument("--metrics", nargs="+", choices=metric_names(), default=list(DEFAULT_METRICS))
    ap.add_argument("--random-seeds", nargs="+", type=int, default=None,
                    help="run the random metric once per seed (rows 'random#SEED'); default: --seed only")
    ap.add_argument("--flap-bias", action="store_true",
                    help="also FLAP with its bias compensation (rows 'flap+bias'; needs flap among --metrics)")
    add_run_arguments(ap)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--tasks", default=None, help="lm-eval tasks to score every variant on, e.g. piqa,lambada")
    ap.add_argument("--task-limit", type=int, default=200, help="items per task (default 200)")
    ap.add_argument("--out", default="docs/bench/metrics")
    args = ap.parse_args()
    task_names = tasks.parse_tasks(args.tasks) if args.tasks else []

    run = load_dense_run(args)
    dense, tok, shape, eval_ids, ppl = run.model, run.tokenizer, run.shape, run.eval_ids, run.perplexity
    calib_texts = read_texts("builtin")
    calibration = Calibration(samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size)

    def measured(variant: str, metric: str | None, model) -> dict:
        row = {"variant": variant, "metric": metric, **model_summary(model), "perplexity": ppl(model)}
        if task_names:
            found = tasks.run_tasks(model, tok, task_names, shots=dict.fromkeys(task_names, 0),
                                    limit=args.task_limit, progress=False)
            row["tasks"] = {name: {"score": r["score"], "stderr": r["stderr"], "metric": r["metric"]}
                            for name, r in found.items()}
        scores_text = "".join(f", {n} {t['score']:.3f}" for n, t in row.get("tasks", {}).items())
        print(f"{variant}: ppl {row['perplexity']:.2f}{scores_text}", flush=True)
        return row

    rows = [measured("dense", None, dense)]
    seconds, stats, recipes = {}, {}, {}
    runs = [(f"random#{s}", "random", s) for s in args.random_seeds] if args.random_seeds is not None else []
    runs = [(m, m, args.seed) for m in args.metrics if not (m == "random" and runs)] + runs
    for label, metric, seed in runs:
        recipes[label] = PruneRecipe(correctors=(), heads=shape.num_heads, metric=metric, seed=seed,
                                     calibration=calibration)
        t = time.perf_counter()  # calibration and scoring: a step's plan, made once per metric
        _, stats[label] = plan_step(copy.deepcopy(dense), tok, recipes[label], texts=calib_texts, progress=False)
        seconds[label] = time.perf_counter() - t
        print(f"{label}: scored in {seconds[label]:.1f} s", flush=True)
    variants = [(label, label, ()) for label, _, _ in runs]
    if args.flap_bias and "flap" in stats:
        variants.append(("flap+bias", "flap", ("flap_bias",)))
    for heads, kv, mlp in args.widths:
        for label, source, correctors in variants:
            recipe = dataclasses.replace(recipes[source], heads=heads, kv_heads=kv, mlp=mlp, correctors=correctors)
            model = copy.deepcopy(dense)
            prune_step(model, tok, recipe, statistics=stats[source])
            rows.append(measured(f"{label} {heads}/{kv}/{mlp}", label, model))

    d = rows[0]
    timing = ", ".join(f"{m} {s:.0f} s" for m, s in seconds.items())
    lines = [f"Held-out: {eval_ids.numel()} tokens of LAMBADA passages, window {args.window}. "
             f"Calibration: {args.samples} x {args.seq_len} tokens (seed {args.seed}). Scoring time: {timing}.", "",
             "| variant (heads/kv/mlp) | params | params vs dense | KV bytes/token | perplexity |"
             + "".join(f" {n} |" for n in task_names),
             "|---|---:|---:|---:|---:|" + "---:|" * len(task_names)]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['params'] / 1e6:.1f} M | {r['params'] / d['params']:.2f} | "
                     f"{r['kv_cache_bytes_per_token']:,} | {r['perplexity']:.2f} |"
                     + "".join(f" {score_text(t)} |" for t in r.get("tasks", {}).values()))
    if task_names:
        lines += ["", f"Tasks: zero-shot, first {args.task_limit} items each; score ± its standard error."]
    write_result(args.out, {"machine": machine(), "args": vars(args) | {"widths": args.widths},
                            "scoring_seconds": seconds, "rows": rows}, "\n".join(lines))
    plot(rows, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
