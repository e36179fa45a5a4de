"""One table (and plot) from several ``transact run`` outputs and their ``transact eval`` results: held-out
perplexity after each phase, final perplexity and task accuracy, training tokens, wall time, throughput.

    python benchmarks/iterative_summary.py --runs runs/iterative/* --dense-eval runs/iterative/dense-eval.json \
        --out docs/bench/iterative_smollm2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_result

from transact.measure import report


def task_scores(eval_json: dict) -> dict[str, float]:
    return {name: t["score"] for name, t in eval_json.get("tasks", {}).items()}


def final_perplexity(eval_json: dict) -> float | None:
    for entry in eval_json.get("perplexity", {}).values():
        return entry["perplexity"]
    return None


def summarise(run_dir: Path, eval_name: str) -> dict:
    report = json.loads((run_dir / "report.json").read_text())
    recipe = report["recipe"]
    phases = report["phases"]
    row = {"run": run_dir.name, "shots": len(report["schedule"]), "method": recipe["training"]["method"],
           "schedule": ["/".join(map(str, w)) for w in report["schedule"]],
           "train_tokens": sum(p.get("train_tokens", 0) for p in phases),
           "train_seconds": round(sum(p["train_seconds"] for p in phases), 1),
           "run_seconds": report["seconds_this_process"],
           "phase_perplexity": [[p.get("perplexity_pruned"), p.get("perplexity")] for p in phases],
           "params": report["final"]["params"], "dense_run_perplexity": report["dense"].get("perplexity")}
    if not row["train_tokens"]:
        row["method"] = "none"
    # the correctors after every shot: the recipe's prune section, or (runs written before it) reconstruct
    correctors = recipe["prune"]["correctors"] if "prune" in recipe else ["refit"] * bool(recipe.get("reconstruct"))
    row["method"] += "".join(f" + {name}" for name in correctors)
    row["train_tokens_per_s"] = round(row["train_tokens"] / row["train_seconds"], 1) if row["train_seconds"] else None
    eval_path = run_dir / eval_name
    if eval_path.is_file():
        ev = json.loads(eval_path.read_text())
        row["perplexity"], row["tasks"] = final_perplexity(ev), task_scores(ev)
    return row


def plot(rows: list[dict], dense_ppl: float | None, path: Path) -> None:
    plt = report.pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        xs, ys = [], []
        for i, (pruned, trained) in enumerate(row["phase_perplexity"]):
            xs += [i + 0.5, i + 1] if pruned is not None else [i + 1]
            ys += [pruned, trained] if pruned is not None else [trained]
        ax.plot([x / len(row["phase_perplexity"]) for x in xs], ys, marker=".", label=row["run"])
    if dense_ppl:
        ax.axhline(dense_ppl, color="black", ls="--", lw=0.8, label="dense (same held-out tokens)")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of the run (each shot: pruned, then trained)")
    ax.set_ylabel("held-out perplexity (run's own held-out set)")
    ax.legend(fontsize=7)
    report.save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--eval-name", default="eval.json", help="the transact eval JSON inside each run directory")
    ap.add_argument("--dense-eval", default=None, help="transact eval JSON of the dense model")
    ap.add_argument("--out", default="docs/bench/iterative_smollm2")
    args = ap.parse_args()

    rows = [summarise(Path(r), args.eval_name) for r in args.runs if (Path(r) / "report.json").is_file()]
    dense = json.loads(Path(args.dense_eval).read_text()) if args.dense_eval else None
    tasks = sorted({t for r in rows for t in r.get("tasks", {})})
    lines = ["| run | method | schedule (heads/kv/mlp) | train tokens | train s | tokens/s | ppl after each shot "
             "| final ppl |" + "".join(f" {t} |" for t in tasks),
             "|---|---|---|---:|---:|---:|---|---:|" + "---:|" * len(tasks)]
    if dense:
        lines.append("| dense | | 9/3/1536 | | | | | " + f"{final_perplexity(dense):.2f} |"
                     + "".join(f" {task_scores(dense).get(t, float('nan')):.3f} |" for t in tasks))
    for r in rows:
        per_shot = " → ".join(f"{a:,.0f}/{b:,.1f}" if a is not None else f"{b:,.1f}" for a, b in r["phase_perplexity"])
        tps = f"{r['train_tokens_per_s']:,.0f}" if r["train_tokens_per_s"] else ""
        ppl = f"{r['perplexity']:,.2f}" if r.get("perplexity") else ""
        lines.append(f"| {r['run']} | {r['method']} | {' → '.join(r['schedule'])} | {r['train_tokens']:,} | "
                     f"{r['train_seconds']:.0f} | {tps} | {per_shot} | {ppl} |"
                     + "".join(f" {r.get('tasks', {}).get(t, float('nan')):.3f} |" for t in tasks))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, rows[0]["dense_run_perplexity"] if rows else None, out.with_suffix(".png"))
    dense_row = {"perplexity": final_perplexity(dense), "tasks": task_scores(dense)} if dense else None
    write_result(out, {"machine": machine(), "args": vars(args), "rows": rows, "dense": dense_row},
                 "\n".join(lines))


if __name__ == "__main__":
    main()
