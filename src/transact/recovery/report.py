"""The report of ``transact run``: a markdown table of every phase, and the loss curve over held-out
perplexity (loss.png)."""

from __future__ import annotations

import math
from pathlib import Path

from transact.measure.report import pyplot, save_figure


def report_markdown(report: dict) -> str:
    d = report["dense"]
    lines = ["| phase | widths (heads/kv/mlp[/experts]) | params | ppl after pruning | train tokens | train s | "
             "tokens/s | ppl |",
             "|---|---|---:|---:|---:|---:|---:|---:|",
             f"| dense | {d['heads']}/{d['kv_heads']}/{d['mlp']} | {d['params'] / 1e6:.1f} M | | | | | "
             f"{_num(d.get('perplexity'))} |"]
    for p in report["phases"]:
        name = f"shot {p['phase']}" if "widths" in p else "final"
        widths = "/".join(map(str, p["widths"])) if "widths" in p else ""
        lines.append(f"| {name} | {widths} | {p['params'] / 1e6:.1f} M | {_num(p.get('perplexity_pruned'))} | "
                     f"{p.get('train_tokens', 0):,} | {p['train_seconds']:.0f} | "
                     f"{_num(p.get('train_tokens_per_second'))} | {_num(p.get('perplexity'))} |")
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.2f}"


def plot_training(losses: list[dict], phases: list[dict], dense_ppl: float | None, path: Path) -> None:
    """Training loss against tokens (shot boundaries marked) over held-out perplexity after each phase."""
    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), gridspec_kw={"height_ratios": [3, 2]})
    if losses:
        top.plot([r["tokens"] for r in losses], [r["loss"] for r in losses], lw=0.8, color="tab:blue")
    seen = 0
    for p in phases:
        top.axvline(seen, color="grey", ls=":", lw=0.8)
        label = f"shot {p['phase']}" if "widths" in p else "final"
        top.annotate(label, (seen, 1.0), xycoords=("data", "axes fraction"), fontsize=7, va="top", rotation=90)
        seen += p.get("train_tokens", 0)
    top.set_xlabel("training tokens")
    top.set_ylabel("training loss")
    top.set_title("Recovery training", fontsize=10)
    names, pruned, trained = [], [], []
    for p in phases:
        names.append(f"shot {p['phase']}" if "widths" in p else "final")
        pruned.append(p.get("perplexity_pruned"))
        trained.append(p.get("perplexity"))
    x = list(range(len(names)))
    if any(v is not None for v in trained):
        bottom.plot([i for i, v in zip(x, pruned, strict=True) if v is not None],
                    [v for v in pruned if v is not None], "v", color="tab:red", label="after pruning")
        bottom.plot([i for i, v in zip(x, trained, strict=True) if v is not None],
                    [v for v in trained if v is not None], "o-", color="tab:green", label="after training")
        if dense_ppl is not None:
            bottom.axhline(dense_ppl, color="black", ls="--", lw=0.8, label="dense")
        bottom.set_yscale("log")
        bottom.legend(fontsize=8)
    bottom.set_xticks(x, names)
    bottom.set_ylabel("held-out perplexity")
    save_figure(fig, path)
