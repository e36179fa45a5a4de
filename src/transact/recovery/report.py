"""The report of ``transact run``: a markdown table of every phase, the loss curve over held-out
perplexity (loss.png), and the final outputs written beside the checkpoint."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from torch import nn

from transact.core.plan import PrunePlan
from transact.io.checkpoint import write_verified
from transact.io.files import move_into_place
from transact.measure.report import pyplot, save_figure
from transact.recovery.schedule import compose_plans
from transact.version import library_versions


def report_markdown(report: dict) -> str:
    d = report["dense"]
    lines = ["| phase | widths (heads/kv/mlp[/experts]) | params | ppl after pruning | train tokens | train s | "
             "tokens/s | ppl |",
             "|---|---|---:|---:|---:|---:|---:|---:|",
             f"| {'input' if report.get('schedule') == [] else 'dense'} | {d['heads']}/{d['kv_heads']}/{d['mlp']} | "
             f"{d['params'] / 1e6:.1f} M | | | | | "
             f"{_num(d.get('perplexity'))} |"]
    for p in report["phases"]:
        name = f"shot {p['phase']}" if "widths" in p else "final"
        widths = "/".join(map(str, p["widths"])) if "widths" in p else ""
        lines.append(f"| {name} | {widths} | {p['params'] / 1e6:.1f} M | {_num(p.get('perplexity_pruned'))} | "
                     f"{p.get('train_tokens', 0):,} | {p['train_seconds']:.0f} | "
                     f"{_num(p.get('train_tokens_per_second'))} | {_num(p.get('perplexity'))} |")
    lr = report.get("recipe", {}).get("training", {}).get("lr")
    warnings = [w for p in report["phases"] if (w := training_hurt(p, lr))]
    return "\n".join(lines + (["", *warnings] if warnings else []))


def training_hurt(phase: dict, lr: float | None) -> str | None:
    """A warning where a shot's training left the held-out perplexity higher than its pruning did (None:
    training helped, or there was no held-out text). Recovery at the learning rate that helped SmolLM2-135M
    and Gemma-3-270M made Qwen2.5-Coder-0.5B worse (docs/results.md), so a run says so rather than leave the
    user to read it from the table."""
    before, after = phase.get("perplexity_pruned"), phase.get("perplexity")
    if before is None or after is None or after <= before:
        return None
    rate = f" (training.lr {lr:g})" if lr is not None else ""
    return (f"warning: shot {phase['phase']}'s training raised the held-out perplexity from {before:.2f} to "
            f"{after:.2f}: it moved the model away from the held-out text. Try a lower learning rate{rate}, or "
            "training data closer to what the model is used for.")


def write_run_outputs(out: Path, model: nn.Module, tokenizer, plans: list[dict], losses: list[dict], report: dict,
                      *, recipe: dict, save_dtype: torch.dtype, probe: torch.Tensor | None) -> None:
    """The run's final checkpoint (the shots' ``plans`` composed into one plan.json, reloaded and checked
    against ``model`` on ``probe``; no plan.json after a run without shots, which removed nothing),
    plans.json, losses.json, report.md and loss.png, staged and moved into ``out`` file by file."""
    parsed = [PrunePlan.from_json(p) for p in plans]
    composed = parsed[0] if parsed else None
    for plan in parsed[1:]:
        composed = compose_plans(composed, plan, recipe=recipe, versions=library_versions())
    staged = out / ".final"
    shutil.rmtree(staged, ignore_errors=True)
    model.eval()
    write_verified(model, tokenizer, staged, composed, report, save_dtype=save_dtype, force=True, probe=probe)
    (staged / "plans.json").write_text(json.dumps({"shots": plans}, indent=1) + "\n")
    (staged / "losses.json").write_text(json.dumps(losses) + "\n")
    (staged / "report.md").write_text(report_markdown(report) + "\n")
    plot_training(losses, report["phases"], report["dense"].get("perplexity"), staged / "loss.png")
    for f in sorted(staged.iterdir()):
        move_into_place(f, out / f.name)
    shutil.rmtree(staged, ignore_errors=True)

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
