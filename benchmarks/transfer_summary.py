"""The transfer benchmark's verdict, from the JSON files ``benchmarks/transfer.py`` wrote: per model and width,
the default pipeline (transact_residual + refit) against the best metric + corrector combination measured and
against random selection with the same corrector; the layer-wise default against the whole-model step; the
refit against slicing alone.

    python benchmarks/transfer_summary.py docs/bench/transfer/*_128x256.json > docs/bench/transfer/summary.md
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

DEFAULT = ("transact_residual", "refit")


def combo(row: dict) -> str:
    return f"{row['metric']} + {'+'.join(row['correctors']) or 'none'}"


def whole_rows(result: dict) -> list[dict]:
    return [r for r in result["rows"] if r["mode"] == "whole" and r.get("damp") is None
            and not math.isnan(r["perplexity"])]


def verdict_table(results: list[dict]) -> str:
    lines = ["| model | width | kind | default | best (combination) | default / best | random + refit | "
             "default / random |", "|---|---|---|---:|---|---:|---:|---:|"]
    for result in results:
        rows = whole_rows(result)
        for width in dict.fromkeys(r["width"] for r in rows):
            here = [r for r in rows if r["width"] == width]
            default = next((r for r in here if (r["metric"], "+".join(r["correctors"])) == DEFAULT), None)
            random = next((r for r in here if (r["metric"], "+".join(r["correctors"])) == ("random", "refit")), None)
            if default is None:
                continue
            best = min(here, key=lambda r: (r["perplexity"], r is not default))  # the default where it ties
            to_best = default["perplexity"] / best["perplexity"]
            to_random = default["perplexity"] / random["perplexity"] if random else float("nan")
            lines.append(f"| {result['model'].removeprefix('builtin:')} | {width} | {here[0]['kind']} | "
                         f"{default['perplexity']:.2f} | {best['perplexity']:.2f} ({combo(best)}) | "
                         f"{_mark(to_best, 1.05)} | {random['perplexity'] if random else float('nan'):.2f} | "
                         f"{_mark(to_random, 0.8)} |")
    return "\n".join(lines)


def _mark(ratio: float, target: float) -> str:
    return f"{ratio:.3f}" if ratio <= target else f"**{ratio:.3f}** (missed)"


def extras_table(results: list[dict]) -> str:
    lines = ["| model | width | whole, damping default | refit off (slicing) | damping 0.001 | damping 0.1 | "
             "layer-wise sequential | sequential / whole |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for result in results:
        rows = result["rows"]
        widths = dict.fromkeys(r["width"] for r in rows if r["mode"] == "layerwise" or r.get("damp") is not None)
        for width in widths:
            whole = find(rows, width, mode="whole", damp=None, correctors=["refit"])
            plain = find(rows, width, mode="whole", damp=None, correctors=[])
            seq = find(rows, width, mode="layerwise")
            damped = [find(rows, width, mode="whole", damp=d) for d in (0.001, 0.1)]
            cells = [whole, plain, *damped, seq]
            ratio = seq / whole if seq and whole else None
            lines.append(f"| {result['model'].removeprefix('builtin:')} | {width} | "
                         + " | ".join("-" if c is None else f"{c:.2f}" for c in cells)
                         + f" | {'-' if ratio is None else f'{ratio:.3f}'} |")
    return "\n".join(lines)


def find(rows: list[dict], width: str, **want) -> float | None:
    """The default metric's perplexity at ``width`` in the row that has every field of ``want``."""
    for r in rows:
        if r["width"] == width and r["metric"] == DEFAULT[0] and all(r.get(k) == v for k, v in want.items()):
            return r["perplexity"]
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path)
    args = ap.parse_args()
    results = [json.loads(p.read_text()) for p in args.results]
    print(verdict_table(results))
    print()
    print(extras_table(results))


if __name__ == "__main__":
    main()
