"""Quality that transfers: every registered metric × corrector at mild, medium and severe widths (attention
only, MLP only, both) of one real model, one shot, with one calibration; optionally the refit's damping
swept and the layer-wise pipeline (sequential statistics) beside the whole-model step. Every variant starts
from a fresh copy of the dense model; the statistics every variant needs are collected once.

    python benchmarks/transfer.py --model builtin:qwen2.5-coder-0.5b --samples 128 --layerwise \
        --damps 0.001 0.01 0.1 --out docs/bench/transfer/qwen2_5-coder-0_5b_128x256
    python benchmarks/transfer.py --model builtin:smollm2 --samples 16 --out docs/bench/transfer/smollm2_16x256

Rows are written after every variant, so an interrupted run continues where it stopped (same settings).
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
from common import machine, previous_result, write_result

from transact.arch import shape_of
from transact.core.calibrate import collect_statistics
from transact.core.layerwise import prune_by_layer
from transact.core.metrics import metric_names
from transact.core.step import calibration_windows, check_step, prune_step
from transact.core.targets import resolve_targets
from transact.errors import TransactError
from transact.io.models import load_model, prepare_model
from transact.io.text import read_texts, token_stream
from transact.measure.perplexity import heldout_perplexity
from transact.recipes import Calibration, HeldoutText, PruneRecipe

# (heads, kv_heads, mlp) per model: attention only, MLP only, and both at mild, medium and severe widths.
WIDTHS = {
    "builtin:smollm2": {"attention": ["6/2/1536", "6/3/1536"], "mlp": ["9/3/1024", "9/3/768"],
                        "both": ["6/3/1152", "6/2/1024", "3/1/512"]},
    "builtin:qwen2.5-coder-0.5b": {"attention": ["12/2/4864", "7/1/4864"], "mlp": ["14/2/3648", "14/2/2432"],
                                   "both": ["12/2/3648", "7/1/3072", "4/1/2048"]},
    "builtin:gemma3-270m": {"attention": ["2/1/2048"], "mlp": ["4/1/1536", "4/1/1024"],
                            "both": ["2/1/1536", "2/1/1024", "1/1/512"]},
}
# the metric the damping sweep and the layer-wise rows use (at the widths that prune both attention and MLP)
CANDIDATE = "transact_residual"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--widths", nargs="+", help="heads/kv/mlp (default: the model's mild/medium/severe set)")
    ap.add_argument("--metrics", nargs="+", default=None,
                    help="default: every registered metric; NAME:OPTION=VALUE,... measures one with options")
    ap.add_argument("--plain-metrics", nargs="*", default=None, metavar="METRIC",
                    help="the metrics also measured without a corrector (default: every one)")
    ap.add_argument("--bias-metrics", nargs="*", default=None, metavar="METRIC",
                    help="the metrics also measured with flap_bias (default: every one)")
    ap.add_argument("--extras-at", nargs="*", default=None, metavar="WIDTH",
                    help="the widths of the damping sweep and the layer-wise rows (default: every 'both' width)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--damps", nargs="*", type=float, default=[],
                    help=f"refit dampings swept with {CANDIDATE} (at the widths that prune attention and MLP)")
    ap.add_argument("--layerwise", action="store_true",
                    help=f"also {CANDIDATE} layer by layer on sequential statistics (same widths)")
    ap.add_argument("--out", required=True, help="path prefix for .json and .md")
    return ap.parse_args()


def widths_of(args) -> list[tuple[str, str]]:
    """(kind, heads/kv/mlp) of every width measured."""
    if args.widths:
        return [("given", w) for w in args.widths]
    if args.model not in WIDTHS:
        raise SystemExit(f"no default widths for {args.model}; give --widths")
    return [(kind, w) for kind, ws in WIDTHS[args.model].items() for w in ws]


def recipe_for(width: str, metric: str, correctors: tuple, calibration: Calibration, damp=None) -> PruneRecipe:
    """``metric`` is a metric's name, or name:option=value,... for one of its options (e.g.
    transact_residual:mlp_score=consumer_error)."""
    heads, kv, mlp = (int(v) for v in width.split("/"))
    options = {"refit": {"damp": damp}} if damp is not None else {}
    name, _, given = metric.partition(":")
    metric_options = dict(pair.split("=", 1) for pair in given.split(",")) if given else None
    return PruneRecipe(heads=heads, kv_heads=kv, mlp=mlp, metric=name, metric_options=metric_options,
                       correctors=correctors, corrector_options=options, calibration=calibration)


def variants(args, dense) -> list[dict]:
    """Every (width, metric, correctors, mode[, damp]) to measure; combinations a family cannot carry, or a
    metric cannot score, left out."""
    calibration = Calibration(samples=args.samples, seq_len=args.seq_len)
    out = []
    for kind, width in widths_of(args):
        for metric in args.metrics or metric_names():
            for correctors in corrector_sets(args, metric):
                recipe = recipe_for(width, metric, correctors, calibration)
                try:
                    check_step(dense.config, recipe, resolve_targets(recipe, shape_of(dense)))
                except TransactError:
                    continue
                out.append({"kind": kind, "width": width, "metric": metric, "correctors": list(correctors),
                            "mode": "whole"})
        if kind not in ("both", "given") if args.extras_at is None else width not in args.extras_at:
            continue
        out += [{"kind": kind, "width": width, "metric": CANDIDATE, "correctors": ["refit"], "mode": "whole",
                 "damp": d} for d in args.damps]
        if args.layerwise:
            out.append({"kind": kind, "width": width, "metric": CANDIDATE, "correctors": ["refit"],
                        "mode": "layerwise"})
    return sorted(out, key=priority)


def corrector_sets(args, metric: str) -> list[tuple[str, ...]]:
    """The corrector combinations measured with ``metric``: the refit always, none and flap_bias as asked."""
    sets = [("refit",)]
    if args.plain_metrics is None or metric in args.plain_metrics:
        sets.insert(0, ())
    if args.bias_metrics is None or metric in args.bias_metrics:
        sets.append(("flap_bias",))
    return sets


def priority(v: dict) -> int:
    """Order of measurement: every metric with the refit first, then the other correctors, then the damping
    sweep and the layer-wise rows, so that an interrupted run has the comparisons that matter most."""
    if v["mode"] != "whole" or v.get("damp") is not None:
        return 2
    return 0 if v["correctors"] == ["refit"] else 1


def key(v: dict) -> str:
    return f"{v['width']}|{v['metric']}|{'+'.join(v['correctors']) or 'none'}|{v['mode']}|{v.get('damp')}"


def measure(v: dict, dense, tok, stats, texts, args, ppl) -> dict:
    calibration = Calibration(samples=args.samples, seq_len=args.seq_len)
    recipe = recipe_for(v["width"], v["metric"], tuple(v["correctors"]), calibration, v.get("damp"))
    model = copy.deepcopy(dense)
    t = time.perf_counter()
    if v["mode"] == "layerwise":
        plan = prune_by_layer(model, tok, recipe, sequential=True, texts=texts, progress=False)
    else:
        plan = prune_step(model, tok, recipe, statistics=stats, texts=texts, progress=False)
    seconds = time.perf_counter() - t
    row = {**v, "perplexity": ppl(model), "prune_seconds": round(seconds, 1), "corrections": plan.corrections,
           "kv_groups": [layer.kv_heads for layer in plan.layers]}
    if "mlp_score_choice" in plan.recipe:  # mlp_score compare: both rankings' losses on unseen calibration windows
        row["mlp_score_choice"] = plan.recipe["mlp_score_choice"]
    del model
    return row


def table(result: dict) -> str:
    dense = result["dense_perplexity"]
    rows = [r for r in result["rows"] if r["mode"] == "whole" and r.get("damp") is None]
    sets = [s for s in ("none", "refit", "flap_bias") if any(("+".join(r["correctors"]) or "none") == s for r in rows)]
    lines = [f"{result['model']}, calibration {result['calibration']}, held-out perplexity on "
             f"{result['eval_tokens']:,} LAMBADA tokens (dense {dense:.2f}); one shot, no training.", "",
             "| width | kind | metric | " + " | ".join(sets) + " |", "|---|---|---|" + "---:|" * len(sets)]
    ppl = {(r["width"], r["metric"], "+".join(r["correctors"]) or "none"): r["perplexity"] for r in rows}
    for width in dict.fromkeys(r["width"] for r in rows):
        best = min(v for (w, _, _), v in ppl.items() if w == width)
        for metric in dict.fromkeys(r["metric"] for r in rows if r["width"] == width):
            cells = []
            for s in sets:
                value = ppl.get((width, metric, s))
                cells.append("-" if value is None else (f"**{value:.2f}**" if value == best else f"{value:.2f}"))
            kind = next(r["kind"] for r in rows if r["width"] == width)
            lines.append(f"| {width} | {kind} | {metric} | " + " | ".join(cells) + " |")
    extra = [r for r in result["rows"] if r["mode"] != "whole" or r.get("damp") is not None]
    if extra:
        lines += ["", "| width | variant | perplexity |", "|---|---|---:|"]
        lines += [f"| {r['width']} | {r['metric']} + refit, {_variant(r)} | {r['perplexity']:.2f} |" for r in extra]
    return "\n".join(lines)


def _variant(row: dict) -> str:
    return f"damping {row['damp']}" if row.get("damp") is not None else "layer-wise, sequential statistics"


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    if "." in out.name:  # the .json and .md beside it are named by replacing the suffix
        raise SystemExit(f"--out {out.name!r}: a name without dots, please (e.g. qwen2_5-coder_128x256)")
    settings = {"model": args.model, "calibration": f"{args.samples} x {args.seq_len}", "eval_tokens": args.eval_tokens,
                "window": args.window}
    previous = previous_result(out, settings)
    dense, tok = load_model(prepare_model(args.model, "cpu", "float32"))
    ids = token_stream(tok, read_texts("builtin", builtin="heldout"), limit=args.eval_tokens)
    heldout = HeldoutText(tokens=args.eval_tokens, window=args.window)

    def ppl(model) -> float:
        return heldout_perplexity(model, ids, heldout, progress=False).perplexity

    todo = variants(args, dense)
    done = {key(r): r for r in previous.get("rows", [])}
    result = {"settings": settings, **settings, "machine": machine(),
              "dense_perplexity": previous.get("dense_perplexity") or ppl(dense), "rows": list(done.values())}
    texts = read_texts("builtin")
    calibration = Calibration(samples=args.samples, seq_len=args.seq_len)
    names = tuple(dict.fromkeys(s for v in todo if v["mode"] == "whole"
                                for s in recipe_for(v["width"], v["metric"], tuple(v["correctors"]),
                                                    calibration).statistics))
    stats = None
    for v in todo:
        if key(v) in done:
            continue
        if stats is None and v["mode"] == "whole":
            t = time.perf_counter()
            windows = calibration_windows(tok, dataclasses.replace(PruneRecipe(), calibration=calibration), texts)
            stats = collect_statistics(dense, windows, names, batch_size=4, progress=False)
            result["calibration_seconds"] = round(time.perf_counter() - t, 1)
        try:
            row = measure(v, dense, tok, stats, texts, args, ppl)
        except (TransactError, RuntimeError) as e:  # recorded, not fatal: the rest still measures
            row = {**v, "perplexity": float("nan"), "error": str(e).splitlines()[0]}
        result["rows"].append(row)
        print(f"{key(v)}: {row['perplexity']:.2f} ({row.get('prune_seconds')} s)", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    write_result(out, result, table(result))


if __name__ == "__main__":
    main()
