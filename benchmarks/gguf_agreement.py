"""How far llama.cpp's predictions from a GGUF file are from transformers', per output type.

    python benchmarks/gguf_agreement.py --models builtin:smollm2 runs/smollm2-6h-2kv-1024 \
        --out docs/bench/gguf_agreement

Each model is written as every --outtypes (llama.cpp's converter, and its quantizer for the 4-6-bit types),
then compared as ``transact export`` checks a file (teacher-forced along llama.cpp's greedy path, four
prompts), with no tolerance applied, so the table shows the raw distances the export tolerances were chosen
from. For the types that round weights (q8_0 and the quantizer's), the file is compared twice: with the
checkpoint's own weights, and with the file's dequantized weights (what export checks), and the worst
relative distance of a dequantized tensor from the checkpoint's is reported (the bound export applies).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import machine, write_result

from transact.deploy import llamacpp, quantize
from transact.deploy.agreement import (
    FILE_WEIGHT_TYPES,
    MAX_WEIGHT_ERROR,
    MEAN_TOLERANCE,
    TOLERANCE,
    compare_predictions,
    quantized_reference,
)
from transact.io.models import load_model, prepare_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--outtypes", default="f32,f16,bf16,q8_0")
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    ap.add_argument("--out", required=True, help="path stem for .json and .md")
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models:
            prep = prepare_model(spec, "cpu", "float32")
            source = prep.source
            model, tokenizer = load_model(prep)
            for outtype in args.outtypes.split(","):
                path = Path(tmp) / f"model.{outtype}.gguf"
                done = quantize.write_gguf(Path(source.path), path, outtype, progress=False)
                rows.append(_row(spec, outtype, "checkpoint", compare_predictions(
                    path, model, tokenizer, outtype, new_tokens=args.tokens, tolerance=float("inf"))))
                if outtype in FILE_WEIGHT_TYPES:
                    reference, weights = quantized_reference(path, model, outtype, max_weight_error=float("inf"))
                    check = compare_predictions(path, reference, tokenizer, outtype, new_tokens=args.tokens,
                                                tolerance=float("inf"))
                    rows.append(_row(spec, outtype, "file's weights", check) | weights
                                | {"max_weight_error": MAX_WEIGHT_ERROR[outtype],
                                   "fallbacks": len(done.get("fallbacks", []))})
                path.unlink()
    lines = ["| model | outtype | compared with | greedy agreement | worst margin (nats) | worst log-prob diff "
             "(nats) | mean log-prob diff | export tolerance (mean) | worst tensor distance (bound) | "
             "tokenizers agree |", "|---|---|---|---|---:|---:|---:|---:|---|---|"]
    lines += [f"| {r['model']} | {r['outtype']} | {r['reference']} | {r['agree']}/{r['steps']} | "
              f"{r['max_margin']:.4f} | {r['max_logprob_diff']:.4f} | {r['mean_logprob_diff']:.4f} | "
              f"{'-' if r['tolerance'] is None else r['tolerance']}"
              + (f" ({r['mean_tolerance']})" if r["mean_tolerance"] else "") + " | "
              + (f"{r['worst_weight_error']:.4f} ({r['max_weight_error']}) | " if "worst_weight_error" in r else "| ")
              + f"{r['tokenizers_agree']} |" for r in rows]
    write_result(args.out, {"rows": rows, "machine": machine(), "xllamacpp": llamacpp.runtime_version()},
                 "\n".join(lines))


def _row(model: str, outtype: str, reference: str, check: dict) -> dict:
    return {"model": model, "outtype": outtype, "reference": reference, "agree": check["agree"],
            "steps": check["steps"], "max_margin": check["max_margin"], "max_logprob_diff": check["max_logprob_diff"],
            "mean_logprob_diff": check["mean_logprob_diff"],
            # what export applies: for the rounding types only to the comparison with the file's own weights
            "tolerance": None if reference == "checkpoint" and outtype in FILE_WEIGHT_TYPES else TOLERANCE[outtype],
            "mean_tolerance": MEAN_TOLERANCE.get(outtype) if reference == "file's weights" else None,
            "tokenizers_agree": all(p["tokenizer_agrees"] for p in check["prompts"])}


if __name__ == "__main__":
    main()
