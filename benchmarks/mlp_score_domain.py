"""Which MLP ranking is best depends on the text it is judged on: ``transact_residual``'s two MLP channel rankings
(eq5, consumer_error) and the choice ``mlp_score=compare`` makes between them, each judged by held-out perplexity
on two texts: the built-in LAMBADA passages (another distribution than the calibration text, as
benchmarks/transfer.py measures) and windows of the calibration text itself that neither the fits nor compare's
comparison saw (the calibration windows, then compare's 16 scoring windows, then these).

    python benchmarks/mlp_score_domain.py --model builtin:gemma3-270m --widths 4/1/1536 4/1/1024 2/1/1536 \
        2/1/1024 1/1/512 --out docs/bench/transfer/mlp_score_domain_gemma3-270m

One calibration (128 x 256 tokens of the built-in text, seed 0) serves every row; every row starts from a fresh
copy of the dense model and keeps the refit. Rows are written after every width.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_result

from transact.core.calibrate import collect_statistics, sample_windows
from transact.core.step import MLP_SCORE_WINDOWS, calibration_windows, prune_step
from transact.io.models import load_model, prepare_model
from transact.io.text import read_texts, token_stream
from transact.measure.perplexity import heldout_perplexity, perplexity
from transact.recipes import Calibration, HeldoutText, PruneRecipe

RANKINGS = ("eq5", "consumer_error")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--widths", nargs="+", required=True, help="heads/kv/mlp")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--in-domain-windows", type=int, default=32, help="calibration-text windows scored (after "
                    "the calibration's and compare's)")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--out", required=True, help="path prefix for .json and .md")
    return ap.parse_args()


def _cell(row: dict, text: str, ranking: str) -> str:
    value = row[ranking][text]
    best = min(row[other][text] for other in RANKINGS)
    return f"**{value:.2f}**" if value == best else f"{value:.2f}"


def table(result: dict) -> str:
    dense = result["dense"]
    lines = [f"{result['model']}: held-out perplexity after one shot with the refit, calibration "
             f"{result['calibration']}; LAMBADA {result['eval_tokens']:,} tokens (dense {dense['lambada']:.2f}), "
             f"calibration text {result['in_domain_tokens']:,} unseen tokens (dense {dense['in_domain']:.2f}).", "",
             "| width | eq5 LAMBADA | consumer_error LAMBADA | eq5 in-domain | consumer_error in-domain "
             "| compare keeps |",
             "|---|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['width']} | {_cell(r, 'lambada', 'eq5')} | {_cell(r, 'lambada', 'consumer_error')} | "
                     f"{_cell(r, 'in_domain', 'eq5')} | {_cell(r, 'in_domain', 'consumer_error')} | {r['auto']} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    dense, tok = load_model(prepare_model(args.model, "cpu", "float32"))
    calibration = Calibration(samples=args.samples, seq_len=args.seq_len)
    texts = read_texts("builtin")
    skip = args.samples + MLP_SCORE_WINDOWS
    in_domain = sample_windows(tok, texts, skip + args.in_domain_windows, args.seq_len, 0)[skip:].reshape(-1)
    lambada = token_stream(tok, read_texts("builtin", builtin="heldout"), limit=args.eval_tokens)
    heldout = HeldoutText(tokens=args.eval_tokens, window=1024)

    def ppl(model) -> dict:
        return {"lambada": heldout_perplexity(model, lambada, heldout, progress=False).perplexity,
                "in_domain": perplexity(model, in_domain, window=args.seq_len, progress=False).perplexity}

    base = PruneRecipe(correctors=("refit",), calibration=calibration, metric_options={"mlp_score": "compare"})
    windows = calibration_windows(tok, base, texts)
    stats = collect_statistics(dense, windows, base.statistics, batch_size=4, progress=False)
    result = {"model": args.model, "calibration": f"{args.samples} x {args.seq_len}", "eval_tokens": args.eval_tokens,
              "in_domain_tokens": int(in_domain.numel()), "machine": machine(), "dense": ppl(dense), "rows": []}
    for width in args.widths:
        heads, kv, mlp = (int(v) for v in width.split("/"))
        recipe = replace(base, heads=heads, kv_heads=kv, mlp=mlp)
        compared = prune_step(copy.deepcopy(dense), tok, recipe, statistics=stats, texts=texts, progress=False)
        row = {"width": width, "auto": compared.recipe["mlp_score_choice"]["chosen"],
               "auto_losses": compared.recipe["mlp_score_choice"]["losses"]}
        for ranking in RANKINGS:
            model = copy.deepcopy(dense)
            prune_step(model, tok, replace(recipe, metric_options={"mlp_score": ranking}), statistics=stats,
                       progress=False)
            row[ranking] = ppl(model)
            del model
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    write_result(args.out, result, table(result))


if __name__ == "__main__":
    main()
