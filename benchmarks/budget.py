"""A budget on one real model: every candidate mix of depth and width that ``--budget params=F`` (or
``flops=F``, ``kv=F``) tries (MLP only, heads and MLP, dropped layers with either, depth alone), its loss on
calibration windows its fits did not see (what the budget chooses on), on windows they saw, and its held-out
perplexity, and the candidate chosen. One shot, no training; the pruning is exactly ``transact prune --budget``
(``transact.core.step.budget_step``).

    python benchmarks/budget.py --model builtin:smollm2 --budgets 0.9 0.75 0.6 --out docs/bench/budget/smollm2
    python benchmarks/budget.py --model builtin:gemma3-270m --budgets 0.9 0.8 --loss-samples 4 \
        --out docs/bench/budget/gemma3_270m
    python benchmarks/budget.py --model builtin:smollm2 --budgets flops=0.75 kv=0.5 --out docs/bench/budget/smollm2
    python benchmarks/budget.py --model builtin:smollm2 --budgets flops=0.75 --context 8192 \
        --out docs/bench/budget/smollm2_flops_attention
    python benchmarks/budget.py --model builtin:smollm2 --budgets 0.75 --search-step 128 \
        --out docs/bench/budget/smollm2

With ``--search-step`` the budget runs as ``--budget ... --allocate search`` does: candidates are scored at
uniform widths, and the chosen one's MLP channels are then spread over its layers in steps of the step by the
width search, as many as the step allows (its row records both perplexities).

Each budget's rows are written when it finishes, so an interrupted run continues with the next budget.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, previous_result, write_result

from transact.core.allocate import WidthSearch
from transact.core.budget import CONTEXT_KINDS, Budget
from transact.core.calibrate import sample_windows
from transact.core.depth_calibrate import calibration_loss
from transact.core.step import budget_step
from transact.io.models import load_model, prepare_model
from transact.io.text import read_texts, token_stream
from transact.measure.costs import count_parameters
from transact.measure.perplexity import heldout_perplexity
from transact.recipes import Calibration, HeldoutText, PruneRecipe


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--budgets", nargs="+", type=budget_label, default=["0.9", "0.75", "0.6"],
                    help="shares of the model's parameters to keep (0.6), or KIND=SHARE as --budget takes them "
                    "(flops=0.6, kv=0.5)")
    ap.add_argument("--depths", type=int, default=Budget(0.5).depths)  # the budget's own default
    ap.add_argument("--samples", type=int, default=32, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--loss-samples", type=int, default=8,
                    help="windows the block score and each candidate's calibration loss run on")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--search-step", type=int, default=None,
                    help="run each budget with the per-layer width search of this step (--allocate search)")
    ap.add_argument("--search-generations", type=int, default=WidthSearch().generations)
    ap.add_argument("--context", type=int, default=Budget(0.5).context,
                    help="tokens of context a FLOPs or KV-cache budget counts (--budget-context)")
    ap.add_argument("--out", required=True, help="path prefix for .json and .md")
    return ap.parse_args()


def budget_label(text: str) -> str:
    """'0.6' (a share of the parameters) or 'flops=0.6' as given, checked."""
    Budget.parse(text if "=" in text else f"params={text}")
    return text


def budget_of(label: str, **options) -> Budget:
    kind, share = Budget.parse(label if "=" in label else f"params={label}")
    return Budget(**{kind: share}, **options)


def label_of(record: dict) -> str:
    """A budget row's label (rows written before other kinds than parameters have only 'params')."""
    return record.get("budget", str(record.get("params")))


def table(result: dict) -> str:
    lines = [f"{result['model']}: calibration {result['calibration']} of the built-in text (seed 0), blocks scored "
             f"on its first {result['loss_samples']} windows and candidates on the {result['loss_samples']} after "
             f"them (unseen: the budget chooses on these); held-out perplexity on "
             f"{result['eval_tokens']:,} LAMBADA tokens (dense {result['dense_perplexity']:.2f}). One shot, no "
             "training; '*' marks the candidate the budget chose, 'best' the lowest held-out perplexity.", "",
             "| budget | candidate | mix | params | budget's share | loss on unseen windows | loss on fitted windows "
             "| held-out ppl | |", "|---:|---|---|---:|---:|---:|---:|---:|---|"]
    for budget in result["budgets"]:
        rows = budget["candidates"]
        best = min(range(len(rows)), key=lambda i: rows[i]["perplexity"])
        for i, r in enumerate(rows):
            mark = " ".join(m for m, on in (("*", i == budget["chosen"]), ("best", i == best)) if on)
            share = f"{r['share']:.3f}" if r.get("share") is not None else "-"
            lines.append(f"| {label_of(budget)} | {r['shape']} | {r['mix']} | {r['params_ratio']:.3f} | {share} | "
                         f"{r['unseen_loss']:.4f} | {r['fitted_loss']:.4f} | {r['perplexity']:.2f} | {mark} |")
        chosen = rows[budget["chosen"]]["perplexity"]
        fitted = rows[min(range(len(rows)), key=lambda i: rows[i]["fitted_loss"])]["perplexity"]
        lines.append(f"| | chosen / best held-out: {chosen / rows[best]['perplexity']:.3f} (by the fitted windows' "
                     f"loss: {fitted / rows[best]['perplexity']:.3f}); search and prune {budget['seconds']:.0f} s "
                     "(held-out evaluations not counted) | | | | | | | |")
        if "searched" in budget:
            found = budget["searched"]
            loss = found["calibration_loss"]
            lines.append(f"| | the chosen MLP width spread per layer ({' '.join(map(str, found['widths']))}; "
                         f"{found['generations']} generations, {found['seconds']:.0f} s; calibration loss "
                         f"{loss['uniform']:.4f} -> {loss['searched']:.4f}) | | {found['params_ratio']:.3f} | | | | "
                         f"{found['perplexity']:.2f} | |")
    return "\n".join(lines)


def measure_budget(label: str, args, dense, tok, texts: list[str], ppl) -> dict:
    """Prune a copy of ``dense`` to the budget, every candidate's held-out perplexity and its loss on the first
    ``--loss-samples`` calibration windows, which its fits saw (the budget scores on the windows after them),
    measured as it is scored; -> the budget's row."""
    fitted = sample_windows(tok, texts, args.loss_samples, args.seq_len, 0)
    total = count_parameters(dense)
    budget = budget_of(label, depths=args.depths, score_samples=args.loss_samples,
                       depth={"loss_samples": args.loss_samples}, context=args.context)
    search = None if args.search_step is None else WidthSearch(step=args.search_step,
                                                                  generations=args.search_generations)
    recipe = PruneRecipe(budget=budget, allocation=search,
                         calibration=Calibration("builtin", samples=args.samples, seq_len=args.seq_len))
    measured, evaluating = [], [0.0]

    def held_out(candidate, pruned) -> None:
        started = time.perf_counter()
        measured.append({"shape": candidate.describe(), "mix": candidate.mix,
                         "params_ratio": round(count_parameters(pruned) / total, 4), "perplexity": ppl(pruned),
                         "fitted_loss": round(calibration_loss(pruned, fitted), 6)})
        print(f"{label}: {measured[-1]}", file=sys.stderr, flush=True)
        evaluating[0] += time.perf_counter() - started

    model = copy.deepcopy(dense)
    t = time.perf_counter()
    plan = budget_step(model, tok, recipe, texts=texts, inspect=held_out)
    seconds = time.perf_counter() - t
    record = plan.budget
    rows = [{**m, "unseen_loss": c["calibration_loss"], "share": c["share"]}
            for m, c in zip(measured, record["candidates"], strict=True)]
    out = {"budget": run_label(label, args), "candidates": rows, "chosen": record["chosen"],
           "seconds": round(seconds - evaluating[0], 1)}
    if plan.allocation is None:
        assert abs(ppl(model) - rows[record["chosen"]]["perplexity"]) < 1e-2, "the pruned model is not the chosen one"
        return out
    loss = plan.allocation["calibration_loss"]
    return {**out, "searched": {"widths": plan.mlp_widths, "perplexity": ppl(model),
                                "params_ratio": round(count_parameters(model) / total, 4),
                                "calibration_loss": loss, "generations": plan.allocation["generations"],
                                "seconds": plan.allocation["seconds"]}}


def run_label(label: str, args) -> str:
    """The budget's label, with the width search's step where it runs ('0.75 + search (step 64)') and the
    context where it is not the default one ('flops=0.75 at 8192 tokens')."""
    if args.context != Budget(0.5).context and budget_of(label).kind in CONTEXT_KINDS:
        label = f"{label} at {args.context} tokens"
    return label if args.search_step is None else f"{label} + search (step {args.search_step})"


def label_key(label: str) -> str | float:
    """Labels compared as budgets: '0.75' and 'params=0.75' written before budgets had kinds are one."""
    return float(label) if "=" not in label and "search" not in label else label


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    settings = {"model": args.model, "calibration": f"{args.samples} x {args.seq_len}", "depths": args.depths,
                "loss_samples": args.loss_samples, "eval_tokens": args.eval_tokens, "window": args.window}
    previous = previous_result(out, settings)
    dense, tok = load_model(prepare_model(args.model, "cpu", "float32"))
    texts = read_texts("builtin")
    ids = token_stream(tok, read_texts("builtin", builtin="heldout"), limit=args.eval_tokens)
    heldout = HeldoutText(tokens=args.eval_tokens, window=args.window)

    def ppl(model) -> float:
        return round(heldout_perplexity(model, ids, heldout, progress=False).perplexity, 3)

    result = previous or {"settings": settings, **settings, "dense_perplexity": ppl(dense),
                          "dense_params": count_parameters(dense), "budgets": [], "machine": machine()}
    done = {label_key(label_of(b)) for b in result["budgets"]}
    for label in args.budgets:
        if label_key(run_label(label, args)) not in done:
            result["budgets"].append(measure_budget(label, args, dense, tok, texts, ppl))
            write_result(out, result, table(result))
    write_result(out, result, table(result))


if __name__ == "__main__":
    main()
