"""One-shot held-out perplexity with and without the least-squares refit (``--reconstruct``, the ``refit``
corrector) for every metric at several widths, FLAP with its bias compensation beside them, and the
refit's damping swept for the transact metric. One calibration of the dense model (every statistic the
variants need, collected together) serves every variant; each variant starts from a fresh copy.

    python benchmarks/reconstruct.py --out docs/bench/reconstruct
    python benchmarks/reconstruct.py --from-json docs/bench/reconstruct.json --out docs/bench/reconstruct  # redraw
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import add_run_arguments, load_dense_run, machine, parse_width, write_result

from transact.core.calibrate import collect_statistics
from transact.core.correct.refit import DEFAULT_DAMP, damp_for
from transact.core.metrics import metric_names
from transact.core.step import calibration_windows, prune_step
from transact.measure import report
from transact.recipes import Calibration, PruneRecipe

DEFAULT_METRICS = ("transact", "flap", "minitron", "taylor", "random", "magnitude")


def _damp(recipe: PruneRecipe) -> float | None:
    """The refit's damping the recipe sets (None: the refit's default, or no refit)."""
    options = recipe.options_of("refit")
    return None if options is None else options.damp


def variants(metrics: list[str], damps: list[float], default: float) -> list[tuple[str, str, tuple[str, ...],
                                                                                float | None]]:
    """(label, metric, correctors, damp) of every variant measured at each width; the refit rows use the
    default damping (``default`` for this calibration), the sweep adds every other value."""
    out = []
    for metric in metrics:
        out += [(metric, metric, (), None), (f"{metric}+refit", metric, ("refit",), None)]
    if "flap" in metrics:
        out.append(("flap+bias", "flap", ("flap_bias",), None))
    out += [(f"transact+refit λ={d:g}", "transact", ("refit",), d) for d in damps if d != default]
    return out


def plot(rows: list[dict], widths: list[str], dense_ppl: float, path: Path) -> None:
    """Perplexity per variant (bars, log scale) grouped by widths; plain metrics hatched, refits solid."""
    plt = report.pyplot()
    labels = list(dict.fromkeys(r["variant"] for r in rows if "λ" not in r["variant"]))
    ppl = {(r["variant"], r["widths"]): r["perplexity"] for r in rows}
    bar = 0.85 / len(labels)
    fig, ax = plt.subplots(figsize=(max(7.0, 2 + 0.32 * len(labels) * len(widths)), 4.5))
    colors = plt.get_cmap("tab10")
    metrics = list(dict.fromkeys(label.split("+")[0] for label in labels))
    for i, label in enumerate(labels):
        base = label.split("+")[0]
        hatch = ".." if label.endswith("+bias") else "" if "+" in label else "//"
        ax.bar([j + i * bar for j in range(len(widths))], [ppl[label, w] for w in widths], width=bar, label=label,
               color=colors(metrics.index(base)), hatch=hatch, edgecolor="white")
    ax.axhline(dense_ppl, color="grey", linestyle="--", label="dense")
    ax.set_xticks([j + 0.425 - bar / 2 for j in range(len(widths))], widths)
    ax.set(yscale="log", xlabel="widths per layer (heads/kv_heads/mlp)", ylabel="held-out perplexity",
           title="One-shot pruning: plain (//), with the least-squares refit (solid), FLAP+bias (..)")
    handles, names = ax.get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 8), fontsize="x-small")
    report.save_figure(fig, path, rect=(0, 0.07 * (1 + len(names) // 8), 1, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", nargs="+", type=parse_width,
                    default=[(6, 2, 1024), (4, 2, 768), (3, 1, 512), (9, 3, 768)], help="heads/kv_heads/mlp per layer")
    ap.add_argument("--metrics", nargs="+", choices=metric_names(), default=list(DEFAULT_METRICS))
    ap.add_argument("--damps", nargs="+", type=float, default=[0.0, 0.001, 0.01, 0.1],
                    help="damping values of the refit tried with the transact metric")
    add_run_arguments(ap)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", default="docs/bench/reconstruct")
    ap.add_argument("--from-json", default=None, help="redraw the plot of a saved result instead of measuring")
    args = ap.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        plot(saved["rows"], saved["args"]["widths"], saved["dense_perplexity"], Path(args.out).with_suffix(".png"))
        return

    run = load_dense_run(args)
    dense, tok = run.model, run.tokenizer
    calibration = Calibration(samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size)
    def recipe(metric, correctors=(), damp=None):
        options = {"refit": {"damp": damp}} if "refit" in correctors else {}
        return PruneRecipe(heads=run.shape.num_heads, metric=metric, correctors=correctors, corrector_options=options,
                           seed=args.seed, calibration=calibration)

    corrections = {m: [(), ("refit",)] + ([("flap_bias",)] if m == "flap" else []) for m in args.metrics}
    names = tuple(dict.fromkeys(s for m in args.metrics for c in corrections[m] for s in recipe(m, c).statistics))
    t = time.perf_counter()
    stats = collect_statistics(dense, calibration_windows(tok, recipe("transact")), names,
                               batch_size=args.batch_size, progress=False)
    calibration_seconds = time.perf_counter() - t
    print(f"statistics {', '.join(names)} in {calibration_seconds:.0f} s", flush=True)
    damp = damp_for(stats)
    todo = variants(args.metrics, args.damps, damp)
    recipes = {label: recipe(metric, correctors, d) for label, metric, correctors, d in todo}

    dense_ppl = run.perplexity(dense)
    rows, widths = [], [f"{h}/{k}/{m}" for h, k, m in args.widths]
    for (heads, kv, mlp), width in zip(args.widths, widths, strict=True):
        for label, *_ in todo:
            model = copy.deepcopy(dense)
            recipe = recipes[label]
            t = time.perf_counter()
            prune_step(model, tok, dataclasses.replace(recipe, heads=heads, kv_heads=kv, mlp=mlp), statistics=stats)
            seconds = time.perf_counter() - t
            rows.append({"variant": label, "widths": width, "metric": recipe.metric,
                         "correctors": list(recipe.correctors), "damp": _damp(recipe), "step_seconds": seconds,
                         "perplexity": run.perplexity(model)})
            print(f"{width} {label}: ppl {rows[-1]['perplexity']:.2f} ({seconds:.1f} s)", flush=True)

    table = {(r["variant"], r["widths"]): r["perplexity"] for r in rows}
    lines = [f"Dense perplexity {dense_ppl:.2f} on {run.eval_ids.numel()} held-out tokens (window {args.window}); "
             f"calibration {args.samples} x {args.seq_len} tokens (seed {args.seed}), one pass for every variant "
             f"({calibration_seconds:.0f} s for {', '.join(names)}); one shot, no training; refit damping "
             f"{damp:g}{'' if damp == DEFAULT_DAMP else ' (the default for this calibration)'} unless stated.", "",
             "| variant | " + " | ".join(widths) + " |", "|---|" + "---:|" * len(widths)]
    for label, *_ in todo:
        lines.append(f"| {label} | " + " | ".join(f"{table[label, w]:,.1f}" for w in widths) + " |")
    write_result(args.out, {"machine": machine(), "args": vars(args) | {"widths": widths},
                            "statistics": list(names), "calibration_seconds": calibration_seconds,
                            "dense_perplexity": dense_ppl, "rows": rows}, "\n".join(lines))
    plot(rows, widths, dense_ppl, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
