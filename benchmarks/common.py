"""Helpers shared by the benchmark scripts: machine description and result writing."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from transact.measure import records
from transact.version import library_versions


def machine() -> dict:
    """The machine (as ``transact`` reports it) and the library versions."""
    return {**records.machine(), **library_versions()}


def child_row(argv: list[str]) -> dict:
    """Run one measurement in a fresh process (``argv``); -> the JSON object on its last line of output,
    also echoed to stderr as progress."""
    import subprocess
    import sys

    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    print(row, file=sys.stderr, flush=True)
    return row


def write_result(path: str | Path, result: dict, table: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    path.with_suffix(".md").write_text(table + "\n")
    print(table)


def previous_result(out: Path, settings: dict) -> dict:
    """The rows an earlier run with the same settings wrote to ``out``.json (empty if none), so that a
    benchmark resumes; another run's file is refused rather than mixed in or overwritten."""
    path = out.with_suffix(".json")
    previous = json.loads(path.read_text()) if path.exists() else {}
    if previous and previous.get("settings") != settings:
        raise SystemExit(f"{path} holds another run's rows; choose another --out")
    return previous


def parse_width(text: str) -> tuple[int, int, int]:
    """'6/2/1024' -> (heads, kv_heads, mlp)."""
    heads, kv, mlp = (int(v) for v in text.split("/"))
    return heads, kv, mlp


def add_run_arguments(ap: argparse.ArgumentParser) -> None:
    """The options every one-shot quality benchmark shares: model, calibration, held-out evaluation."""
    from transact.io import assets

    ap.add_argument("--model", default=assets.SMOLLM2)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)


@dataclass
class DenseRun:
    """The dense model in fp32 on CPU, its tokenizer and shape, and the held-out tokens to score on."""

    model: torch.nn.Module
    tokenizer: object
    shape: object
    eval_ids: torch.Tensor
    window: int

    def perplexity(self, model: torch.nn.Module) -> float:
        from transact.measure.perplexity import heldout_perplexity
        from transact.recipes import HeldoutText

        heldout = HeldoutText(tokens=self.eval_ids.numel(), window=self.window)
        return heldout_perplexity(model, self.eval_ids, heldout, progress=False).perplexity


def load_dense_run(args: argparse.Namespace) -> DenseRun:
    from transact.arch import shape_of
    from transact.io.models import load_model, prepare_model
    from transact.io.text import read_texts, token_stream

    model, tok = load_model(prepare_model(args.model, "cpu", "float32"))
    eval_ids = token_stream(tok, read_texts("builtin", builtin="heldout"), limit=args.eval_tokens)
    return DenseRun(model, tok, shape_of(model), eval_ids, args.window)
