"""Prune or quantize? Dense and pruned models at each llama.cpp type, on one plot of held-out perplexity
against file bytes, with llama.cpp's decode speed.

    python benchmarks/prune_vs_quantize.py --model builtin:smollm2 --widths 4/2/1024 6/2/1024 \
        --out docs/bench/prune_vs_quantize/smollm2

Each pruned model is the default one-shot pipeline (``transact prune``, 128 x 256 calibration tokens),
kept in --work and reused on a rerun; --recovered adds checkpoints pruned and trained by ``transact run``
(NAME=DIR). Every model is written as each --types GGUF file (llama.cpp's converter, and its own
quantizer for the 4-6-bit types; ``q4_0+imatrix`` with an importance matrix over --imatrix text, as
``transact export --imatrix`` writes it) and evaluated on the held-out text by transformers running the file's
own dequantized weights (fp32 arithmetic; llama.cpp's 8-bit activations are not modelled). Decode speed:
llama.cpp (xllamacpp), batch 1, a 128-token prompt then 64 new tokens, median of --repeats, all files of
one table loaded together and run interleaved.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import machine, parse_width, write_result

from transact.deploy import llamacpp, quantize
from transact.deploy.agreement import quantized_reference
from transact.io.models import load_model, prepare_model
from transact.io.text import read_texts, token_stream
from transact.jobs import prune
from transact.measure import bench
from transact.measure.bench import BenchGrid
from transact.measure.perplexity import heldout_perplexity
from transact.recipes import Calibration, HeldoutText, PruneRecipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--widths", nargs="*", default=[], help="heads/kv/mlp of each pruned model")
    ap.add_argument("--recovered", nargs="*", default=[], metavar="NAME=DIR",
                    help="checkpoints of transact run (pruned and recovered), each under its name")
    ap.add_argument("--types", default="f16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0",
                    help="llama.cpp types; TYPE+imatrix quantizes guided by an importance matrix over --imatrix")
    ap.add_argument("--imatrix", default="builtin", help="text of the +imatrix types' importance matrix")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="runs/prune_vs_quantize")
    ap.add_argument("--out", required=True, help="path stem for .json, .md and .png")
    ap.add_argument("--speed-only", action="store_true",
                    help="measure decode speed again; perplexities from --out's JSON, files from --work")
    args = ap.parse_args()

    work = Path(args.work) / args.model.replace(":", "_").replace("/", "_")
    checkpoints = {"dense": args.model} | {w: str(_pruned(args, w, work)) for w in args.widths}
    checkpoints |= dict(_named(item) for item in args.recovered)
    heldout = HeldoutText(tokens=args.eval_tokens, window=args.window)
    guided_text = "\n\n".join(read_texts(args.imatrix, builtin="calibration")) if "+imatrix" in args.types else None
    rows, files = [], []
    if args.speed_only:  # perplexities from the last run's JSON, files from --work
        rows = json.loads(Path(args.out).with_suffix(".json").read_text())["rows"]
        for r in rows:
            if r["file_mb"] is not None:
                path = work / "gguf" / f"{r['variant'].replace('/', '-')}.{r['type']}.gguf"
                config = prepare_model(checkpoints[r["variant"]], "cpu", "float32").config
                outtype = r["type"].removesuffix("+imatrix")
                files.append(bench.GgufModel(f"{r['variant']} {r['type']}", path, outtype, config,
                                             llamacpp.gguf_summary(path)))
    for variant, spec in checkpoints.items() if not args.speed_only else ():
        prep = prepare_model(spec, "cpu", "float32")
        model, tokenizer = load_model(prep)
        ids = token_stream(tokenizer, read_texts("builtin", builtin="heldout"), limit=args.eval_tokens)
        row = {"variant": variant, "type": "fp32 (checkpoint)",
               "perplexity": heldout_perplexity(model, ids, heldout, progress=False).perplexity}
        rows.append(row | {"file_mb": None, "params": sum(p.numel() for p in model.parameters())})
        for label in args.types.split(","):
            outtype, guided = label.removesuffix("+imatrix"), label.endswith("+imatrix")
            path = work / "gguf" / f"{variant.replace('/', '-')}.{label}.gguf"
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                quantize.write_gguf(Path(prep.source.path), path, outtype, imatrix_text=guided_text if guided else None,
                                    progress=False)
            reference, weights = quantized_reference(path, model, outtype, max_weight_error=float("inf"))
            ppl = heldout_perplexity(reference, ids, heldout, progress=False).perplexity
            summary = llamacpp.gguf_summary(path)
            rows.append({"variant": variant, "type": label, "perplexity": ppl,
                         "file_mb": summary["file_bytes"] / 1e6, "matrix_types": summary["matrix_types"],
                         "params": rows[-1]["params"]} | weights)
            files.append(bench.GgufModel(f"{variant} {label}", path, outtype, prep.config, summary))
            print(json.dumps(rows[-1]), flush=True)
    speed = _decode_speed(files, args.repeats)
    for row in rows:
        row["decode_tok_s"] = speed.get(f"{row['variant']} {row['type']}")
    table = _table(args.model, rows)
    write_result(args.out, {"model": args.model, "rows": rows, "heldout": vars(heldout), "machine": machine(),
                            "xllamacpp": llamacpp.runtime_version(), "command": vars(args)}, table)
    _plot(args.model, rows, Path(args.out).with_suffix(".png"))


def _named(item: str) -> tuple[str, str]:
    """NAME=DIR -> (NAME, DIR), the directory checked to be a finished ``transact run``."""
    name, sep, directory = item.partition("=")
    if not sep or not (Path(directory) / "plans.json").is_file():
        raise SystemExit(f"--recovered {item!r}: give NAME=DIR, DIR a finished transact run (with plans.json)")
    return name, directory


def _pruned(args, width: str, work: Path) -> Path:
    """The default one-shot prune at ``width`` (reused when ``work`` already holds it)."""
    out = work / width.replace("/", "-")
    if (out / "plan.json").is_file():
        return out
    heads, kv, mlp = parse_width(width)
    recipe = PruneRecipe(heads=heads, kv_heads=kv, mlp=mlp,
                         calibration=Calibration(samples=args.samples, seq_len=args.seq_len))
    prune.run(prune.PruneJob(model=args.model, out=str(out), recipe=recipe, progress=False, force=True))
    return out


def _decode_speed(files: list[bench.GgufModel], repeats: int) -> dict[str, float]:
    """Decode tokens/s of every file, measured a type at a time (dense and pruned of one type loaded together
    and interleaved): with every file of the table loaded at once, llama.cpp's idle thread pools of the
    others slowed each measurement unevenly."""
    grid = BenchGrid(batches=(1,), contexts=(128,), gen=64, repeats=repeats, warmup=1)
    speed = {}
    for outtype in dict.fromkeys(f.format for f in files):
        rows = bench.run_llamacpp_grid([f for f in files if f.format == outtype], grid, progress=False)
        speed |= {r["model"]: r["decode_tokens_per_s"] for r in rows}
    return speed


def _table(model: str, rows: list[dict]) -> str:
    dense_fp32 = rows[0]["perplexity"]
    lines = [f"{model}: held-out perplexity by the file's dequantized weights (dense fp32 {dense_fp32:.2f})", "",
             "| model | type | file MB | perplexity | vs dense fp32 | decode tok/s | matrix types |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        mb = "" if r["file_mb"] is None else f"{r['file_mb']:.1f}"
        speed = "" if r.get("decode_tok_s") is None else f"{r['decode_tok_s']:.1f}"
        lines.append(f"| {r['variant']} | {r['type']} | {mb} | {r['perplexity']:.2f} | "
                     f"{r['perplexity'] / dense_fp32:.2f}x | {speed} | {', '.join(r.get('matrix_types', []))} |")
    return "\n".join(lines)


def _plot(model: str, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        points = [r for r in rows if r["variant"] == variant and r["file_mb"] is not None]
        ax.plot([r["file_mb"] for r in points], [r["perplexity"] for r in points], "o-", label=variant)
        for r in points:
            ax.annotate(r["type"], (r["file_mb"], r["perplexity"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("GGUF file size (MB)")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.set_title(f"{model}: prune, quantize, or both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
