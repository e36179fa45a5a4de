"""How far llama.cpp's predictions from a GGUF file are from transformers', per output type.

    python benchmarks/gguf_agreement.py --models builtin:smollm2 runs/smollm2-6h-2kv-1024 \
        --out docs/bench/gguf_agreement

Each model is converted to every --outtypes with llama.cpp's converter, then compared as ``transact export``
checks a file (teacher-forced along llama.cpp's greedy path, four prompts), with no tolerance applied, so
the table shows the raw distances the export tolerances were chosen from.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import machine, write_result

from transact.deploy import llamacpp
from transact.deploy.agreement import TOLERANCE, compare_predictions
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
                llamacpp.convert(Path(source.path), path, outtype, progress=False)
                check = compare_predictions(path, model, tokenizer, outtype, new_tokens=args.tokens,
                                            tolerance=float("inf"))
                rows.append({"model": spec, "outtype": outtype, "agree": check["agree"], "steps": check["steps"],
                             "max_margin": check["max_margin"], "max_logprob_diff": check["max_logprob_diff"],
                             "tolerance": TOLERANCE[outtype],
                             "tokenizers_agree": all(p["tokenizer_agrees"] for p in check["prompts"])})
                path.unlink()
    lines = ["| model | outtype | greedy agreement | worst margin (nats) | worst log-prob diff (nats) | export "
             "tolerance | tokenizers agree |", "|---|---|---|---:|---:|---:|---|"]
    lines += [f"| {r['model']} | {r['outtype']} | {r['agree']}/{r['steps']} | {r['max_margin']:.4f} | "
              f"{r['max_logprob_diff']:.4f} | {r['tolerance']} | {r['tokenizers_agree']} |" for r in rows]
    write_result(args.out, {"rows": rows, "machine": machine(), "xllamacpp": llamacpp.runtime_version()},
                 "\n".join(lines))


if __name__ == "__main__":
    main()
