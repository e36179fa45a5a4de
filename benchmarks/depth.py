"""Depth pruning on one real model: at each depth (a fraction of the layers), the block each score chooses
(angular distance of its input and output hidden states; calibration loss with the block skipped), removed
alone and with the map folded into the layer before it (least-squares, or per channel where a norm follows
the MLP). One shot, no training; held-out perplexity and parameters against the dense model.

    python benchmarks/depth.py --model builtin:smollm2 --out docs/bench/depth/smollm2
    python benchmarks/depth.py --model builtin:qwen2.5-coder-0.5b --out docs/bench/depth/qwen2_5_coder_0_5b
    python benchmarks/depth.py --model builtin:smollm2 --block 10:9 --damps 0.001 0.1 1 \
        --out docs/bench/depth/smollm2_damping

With ``--block START:COUNT`` the one block is measured with the map at each of ``--damps`` instead.

Rows are written after every variant, so an interrupted run continues where it stopped (same settings).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, previous_result, write_result

from transact.core.calibrate import sample_windows
from transact.core.depth import DepthOptions, block_scores, drop_block_, layers_to_drop
from transact.io.models import load_model, prepare_model
from transact.io.text import read_texts, token_stream
from transact.measure.costs import count_parameters
from transact.measure.perplexity import heldout_perplexity
from transact.recipes import HeldoutText


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.2, 0.3],
                    help="layers dropped, as fractions of the model's layers")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows (block scores, map fit)")
    ap.add_argument("--loss-samples", type=int, default=8,
                    help="of those, the windows the loss score runs per candidate block (one pass each)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--damp", type=float, default=DepthOptions(1).damp)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--block", default=None, metavar="START:COUNT",
                    help="measure this one block with the map at each of --damps (kept or not) instead")
    ap.add_argument("--damps", nargs="+", type=float, default=[])
    ap.add_argument("--out", required=True, help="path prefix for .json and .md")
    return ap.parse_args()


def table(result: dict) -> str:
    dense = result["dense_perplexity"]
    lines = [f"{result['model']} ({result['layers']} layers), calibration {result['calibration']} (loss score: first "
             f"{result['loss_samples']} windows), held-out perplexity on {result['eval_tokens']:,} LAMBADA tokens "
             f"(dense {dense:.2f}); one shot, no training.", "",
             "| dropped | params | score | block | alone | with map | map kind | calibration loss alone -> with map |",
             "|---:|---:|---|---|---:|---:|---|---|"]
    rows = result["rows"]
    for (count, score), group in _groups(rows).items():
        alone = next((r for r in group if not r["map"]), None)
        mapped = next((r for r in group if r["map"]), None)
        first = alone or mapped
        comp = mapped["compensation"] if mapped else {}
        loss = comp.get("calibration_loss")
        kept = "" if not comp else ("" if comp.get("applied") else " (not kept)")
        losses = f"{loss['without']:.3f} -> {loss['with']:.3f}" if loss else "-"
        lines.append(
            f"| {count} | {first['params_ratio']:.3f} | {score} | {first['dropped'][0]}-{first['dropped'][-1]} | "
            f"{_ppl(alone)} | {_ppl(mapped)}{kept} | {comp.get('kind', comp.get('reason', '-'))} | "
            f"{losses} |")
    return "\n".join(lines)


def _groups(rows: list[dict]) -> dict[tuple[int, str], list[dict]]:
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((len(r["dropped"]), r["score"]), []).append(r)
    return dict(sorted(groups.items()))


def _ppl(row: dict | None) -> str:
    return "-" if row is None else f"{row['perplexity']:.2f}"


def damping_sweep(args, dense, windows, ppl) -> None:
    """One block with the map fitted at each damping: calibration loss and held-out perplexity."""
    start, count = (int(v) for v in args.block.split(":"))
    rows = []
    for damp in args.damps:
        model = copy.deepcopy(dense)
        plan = drop_block_(model, windows, start, DepthOptions(count, damp=damp), progress=False)
        rows.append({"damp": damp, "compensation": plan.compensation, "perplexity": ppl(model)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    lines = [f"{args.model}, layers {start}-{start + count - 1} dropped, the map fitted at each damping on "
             f"{args.samples} x {args.seq_len} calibration tokens; held-out perplexity on {args.eval_tokens:,} "
             "LAMBADA tokens of the model as the drop leaves it (the map folded where it was kept).", "",
             "| damping | calibration loss alone -> with map | map kept | perplexity |", "|---:|---|---|---:|"]
    for r in rows:
        loss = r["compensation"]["calibration_loss"]
        lines.append(f"| {r['damp']} | {loss['without']:.3f} -> {loss['with']:.3f} | "
                     f"{'yes' if r['compensation']['applied'] else 'no'} | {r['perplexity']:.2f} |")
    write_result(args.out, {"model": args.model, "block": args.block, "rows": rows, "machine": machine()},
                 "\n".join(lines))


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    settings = {"model": args.model, "calibration": f"{args.samples} x {args.seq_len}",
                "loss_samples": args.loss_samples, "eval_tokens": args.eval_tokens, "window": args.window,
                "damp": args.damp}
    previous = previous_result(out, settings)
    dense, tok = load_model(prepare_model(args.model, "cpu", "float32"))
    windows = sample_windows(tok, read_texts("builtin"), args.samples, args.seq_len, 0)
    ids = token_stream(tok, read_texts("builtin", builtin="heldout"), limit=args.eval_tokens)
    heldout = HeldoutText(tokens=args.eval_tokens, window=args.window)

    def ppl(model) -> float:
        return round(heldout_perplexity(model, ids, heldout, progress=False).perplexity, 3)

    if args.block:
        return damping_sweep(args, dense, windows, ppl)
    layers = dense.config.get_text_config().num_hidden_layers
    result = previous or {"settings": settings, **settings, "layers": layers, "dense_perplexity": ppl(dense),
                          "dense_params": count_parameters(dense), "rows": [], "machine": machine()}
    done = {(len(r["dropped"]), r["score"], r["map"]) for r in result["rows"]}
    for fraction in args.fractions:
        count = layers_to_drop(fraction, layers)
        starts = {}
        for score in ("angular", "loss"):
            options = DepthOptions(count, score=score, damp=args.damp, loss_samples=args.loss_samples)
            if all((count, score, m) in done for m in (False, True)):
                continue
            t = time.perf_counter()
            values = block_scores(dense, windows, count, options, progress=True)
            starts[score] = (int(values.argmin()), [round(float(v), 5) for v in values], time.perf_counter() - t)
            for use_map in (False, True):
                if (count, score, use_map) in done:
                    continue
                model = copy.deepcopy(dense)
                t = time.perf_counter()
                plan = drop_block_(model, windows, starts[score][0],
                                   DepthOptions(count, score=score, compensate=use_map, damp=args.damp),
                                   progress=False)
                row = {"fraction": fraction, "score": score, "map": use_map, "dropped": plan.dropped,
                       "scores": starts[score][1], "score_seconds": round(starts[score][2], 1),
                       "drop_seconds": round(time.perf_counter() - t, 1), "compensation": plan.compensation,
                       "params_ratio": round(count_parameters(model) / result["dense_params"], 4),
                       "perplexity": ppl(model)}
                del model
                result["rows"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "scores"}), file=sys.stderr, flush=True)
                write_result(out, result, table(result))
    write_result(out, result, table(result))


if __name__ == "__main__":
    main()
