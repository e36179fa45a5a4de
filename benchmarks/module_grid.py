"""Module redundancy (the paper's Figure 8): held-out perplexity after one-shot pruning over a grid of
attention widths x MLP widths, from one calibration pass, as a table and a heatmap.

Cells whose parameter counts lie within ``--param-tol`` of each other (as fractions of the dense model)
form an equal-parameter group: the heatmap labels each such group with one letter and frames its best cell, so
the question "at this size, prune attention or MLP?" can be read off directly. Cells on the Pareto
frontier (no other cell has both fewer parameters and a lower perplexity) are marked with a star.

    python benchmarks/module_grid.py --out docs/bench/module_grid
    python benchmarks/module_grid.py --from-json docs/bench/module_grid.json --out docs/bench/module_grid
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import string
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import add_run_arguments, load_dense_run, machine, write_result

from transact.core.step import gather_statistics, prune_step
from transact.measure import report
from transact.measure.costs import count_parameters
from transact.recipes import Calibration, PruneRecipe


def parse_attention(text: str) -> tuple[int, int]:
    """'6/2' -> (heads, kv_heads)."""
    heads, kv = (int(v) for v in text.split("/"))
    return heads, kv


def equal_param_groups(fractions: dict[tuple, float], tol: float) -> dict[tuple, str]:
    """Cells -> group letter. Going from the largest model down, a group takes every following cell whose
    parameter fraction is within ``tol`` of the group's first; groups of one cell get no letter."""
    groups: list[list[tuple]] = []
    for cell in sorted(fractions, key=fractions.get, reverse=True):
        if groups and fractions[groups[-1][0]] - fractions[cell] <= tol:
            groups[-1].append(cell)
        else:
            groups.append([cell])
    shared = [g for g in groups if len(g) > 1]
    return {cell: string.ascii_uppercase[i % 26] for i, g in enumerate(shared) for cell in g}


def pareto_cells(fractions: dict[tuple, float], ppl: dict[tuple, float]) -> list[tuple]:
    """The cells no other cell beats on both counts (fewer or equal parameters and lower perplexity),
    from the largest model down."""
    front, best = [], math.inf
    for cell in sorted(fractions, key=lambda c: (fractions[c], ppl[c])):
        if ppl[cell] < best:
            front.append(cell)
            best = ppl[cell]
    return front[::-1]


def plot_heatmap(attn: list, mlp: list, ppl: dict, fractions: dict, groups: dict, front: list, dense_ppl: float,
                 path: Path) -> None:
    plt = report.pyplot()
    from matplotlib.patches import Rectangle

    grid = [[math.log10(ppl[(a, m)]) for m in mlp] for a in attn]
    fig, ax = plt.subplots(figsize=(1.3 * len(mlp) + 2.5, 0.9 * len(attn) + 2))
    im = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    fig.colorbar(im, ax=ax, label="log10 held-out perplexity")
    best = {}
    for cell, letter in groups.items():
        if letter not in best or ppl[cell] < ppl[best[letter]]:
            best[letter] = cell
    for i, a in enumerate(attn):
        for j, m in enumerate(mlp):
            cell = (a, m)
            star = "★ " if cell in front else ""
            label = f"{star}{ppl[cell]:,.0f}\n{fractions[cell]:.2f}x" + (f"  {groups[cell]}" if cell in groups else "")
            dark = grid[i][j] > (min(map(min, grid)) + max(map(max, grid))) / 2
            ax.text(j, i, label, ha="center", va="center", fontsize=8, color="white" if dark else "black")
            if cell in best.values():
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    ax.set_xticks(range(len(mlp)), [str(m) for m in mlp])
    ax.set_yticks(range(len(attn)), [f"{h}/{k}" for h, k in attn])
    ax.set_xlabel("MLP channels per layer")
    ax.set_ylabel("query heads / KV heads per layer")
    ax.set_title(f"One-shot pruning: perplexity (dense {dense_ppl:.1f}) and params vs dense\n"
                 "letters: equal-parameter groups; red frame: best of its group; "
                 "★: Pareto frontier (params vs perplexity)", fontsize=9)
    report.save_figure(fig, path)


def measure_grid(args: argparse.Namespace) -> tuple[dict, dict, float, int]:
    """One calibration, then every cell pruned from a fresh copy: (perplexity, params fraction, dense
    perplexity, held-out tokens)."""
    run = load_dense_run(args)
    dense, shape = run.model, run.shape
    calibrate_only = PruneRecipe(correctors=(), heads=shape.num_heads, seed=args.seed,
                                 calibration=Calibration(samples=args.samples, seq_len=args.seq_len))
    stats = gather_statistics(dense, run.tokenizer, calibrate_only, progress=False)
    dense_params = count_parameters(dense)

    ppl, fractions = {}, {}
    for heads, kv in args.attention:
        for m in args.mlp:
            model = copy.deepcopy(dense)
            prune_step(model, None, PruneRecipe(correctors=(), heads=heads, kv_heads=kv, mlp=m), statistics=stats)
            cell = ((heads, kv), m)
            fractions[cell] = count_parameters(model) / dense_params
            ppl[cell] = run.perplexity(model)
            print(f"{heads}/{kv}/{m}: params {fractions[cell]:.3f}x ppl {ppl[cell]:.2f}", flush=True)
    dense_ppl = ppl.get(((shape.num_heads, shape.num_kv_heads), shape.intermediate_size)) or run.perplexity(dense)
    return ppl, fractions, dense_ppl, run.eval_ids.numel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attention", nargs="+", type=parse_attention,
                    default=[(9, 3), (6, 3), (6, 2), (3, 3), (3, 1)], help="heads/kv_heads per layer")
    ap.add_argument("--mlp", nargs="+", type=int, default=[1536, 1280, 1024, 768, 512, 256])
    ap.add_argument("--param-tol", type=float, default=0.02,
                    help="cells whose params/dense differ by at most this form an equal-parameter group")
    add_run_arguments(ap)
    ap.add_argument("--from-json", default=None,
                    help="redraw the table and heatmap from a saved result instead of measuring")
    ap.add_argument("--out", default="docs/bench/module_grid")
    args = ap.parse_args()

    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        cells = saved["cells"]
        ppl = {((c["heads"], c["kv_heads"]), c["mlp"]): c["perplexity"] for c in cells}
        fractions = {((c["heads"], c["kv_heads"]), c["mlp"]): c["params_fraction"] for c in cells}
        args.attention = list(dict.fromkeys((c["heads"], c["kv_heads"]) for c in cells))
        args.mlp = list(dict.fromkeys(c["mlp"] for c in cells))
        dense_ppl, eval_tokens, computed_on = saved["dense_perplexity"], saved["eval_tokens"], saved["machine"]
        for key in ("samples", "seq_len", "seed"):
            setattr(args, key, saved["args"][key])
        run_args = saved["args"] | {"param_tol": args.param_tol}
    else:
        ppl, fractions, dense_ppl, eval_tokens = measure_grid(args)
        computed_on, run_args = machine(), vars(args)
    groups = equal_param_groups(fractions, args.param_tol)
    front = pareto_cells(fractions, ppl)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_heatmap(args.attention, args.mlp, ppl, fractions, groups, front, dense_ppl, out.with_suffix(".png"))

    lines = [f"Dense perplexity {dense_ppl:.2f} on {eval_tokens} held-out tokens; calibration "
             f"{args.samples} x {args.seq_len} tokens (seed {args.seed}); one shot, no training. "
             "Cells: perplexity (params vs dense).", "",
             "| heads/kv \\ MLP | " + " | ".join(map(str, args.mlp)) + " |", "|---|" + "---:|" * len(args.mlp)]
    for a in args.attention:
        lines.append(f"| {a[0]}/{a[1]} | " + " | ".join(
            f"{ppl[(a, m)]:,.1f} ({fractions[(a, m)]:.2f})" for m in args.mlp) + " |")
    lines += ["", f"Equal-parameter groups (params within {args.param_tol} of dense of each other), best first:", ""]
    for letter in sorted(set(groups.values())):
        cells = sorted((c for c in groups if groups[c] == letter), key=ppl.get)
        lines.append(f"- {letter}: " + ", ".join(
            f"{a[0]}/{a[1]}/{m} {ppl[(a, m)]:,.1f} ({fractions[(a, m)]:.3f})" for a, m in cells))
    if not groups:
        lines.append("- none: no two cells are that close in size")
    lines += ["", "Pareto frontier (no cell has both fewer parameters and a lower perplexity), largest first: "
              + ", ".join(f"{a[0]}/{a[1]}/{m} ({fractions[(a, m)]:.2f}, {ppl[(a, m)]:,.1f})" for a, m in front)]
    write_result(out, {"machine": computed_on, "args": run_args, "dense_perplexity": dense_ppl,
                       "eval_tokens": eval_tokens,
                       "cells": [{"heads": a[0], "kv_heads": a[1], "mlp": m, "params_fraction": fractions[(a, m)],
                                  "perplexity": ppl[(a, m)], "group": groups.get((a, m)),
                                  "pareto": (a, m) in front} for a, m in ppl]},
                 "\n".join(lines))


if __name__ == "__main__":
    main()
