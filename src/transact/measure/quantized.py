"""Prune or quantize: every model of a comparison written at each llama.cpp type, and measured by what a user
weighs: file bytes, held-out perplexity and llama.cpp's decode speed (``transact compare --quantize``).

Perplexity is transformers running each file's own weights, dequantized (``agreement.quantized_reference``:
every tensor checked against the checkpoint's first), in fp32 arithmetic; llama.cpp's 8-bit activations are
not modelled (they move a token's log-probability by 0.04-0.06 nats on average, docs/deployment.md). Decode
speed: llama.cpp, batch 1, a 128-token prompt then 64 new tokens, all files loaded together and interleaved.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from transact.deploy.agreement import MAX_WEIGHT_ERROR, quantized_reference
from transact.io.models import load_model, prepare_model
from transact.io.text import read_texts, token_stream
from transact.measure import bench
from transact.measure.perplexity import heldout_perplexity

if TYPE_CHECKING:
    from transact.recipes import HeldoutText

# a tensor further than this from the checkpoint's is a wrong file, whatever the type (MAX_WEIGHT_ERROR's bound)
_WRONG_FILE = 0.5
SPEED_GRID = {"batches": (1,), "contexts": (128,), "gen": 64}


def file_rows(models: dict[str, str], types: tuple[str, ...], folder: Path, docs: list[str], heldout: HeldoutText,
              *, done: dict[tuple[str, str], dict], save: Callable[[dict], None], progress: bool,
              score_tasks: Callable[[object, object], dict] | None = None,
              imatrix: str | None = None) -> list[dict]:
    """One row per model and type (``done`` holds rows of an interrupted run, reused): the GGUF file in
    ``folder``, its bytes, the held-out perplexity of its weights and, given ``score_tasks(model, tokenizer)``,
    its task scores. The quantizer's types are guided by an importance matrix over the text ``imatrix`` names
    (``quantize.imatrix_source``), and their rows name it. ``save(row)`` runs after each new row."""
    from transact.deploy import llamacpp, quantize

    rows = []
    for label, spec in models.items():
        missing = [t for t in types if (label, t) not in done]
        rows += [done[(label, t)] for t in types if (label, t) in done]
        if not missing:
            continue
        prep = prepare_model(spec, "cpu", "float32")
        model, tokenizer = load_model(prep)
        ids = token_stream(tokenizer, docs, limit=heldout.tokens or None)
        for outtype in missing:
            path = folder / f"{label}.{outtype}.gguf"
            if progress:
                print(f"writing {label} as {outtype} GGUF and measuring it ...", flush=True)
            guide = quantize.imatrix_source(imatrix, outtype)
            quantize.write_gguf(Path(prep.source.path), path, outtype, imatrix_text=_text(guide), progress=False)
            reference, weights = quantized_reference(path, model, outtype,
                                                     max_weight_error=MAX_WEIGHT_ERROR.get(outtype, _WRONG_FILE))
            ppl = heldout_perplexity(reference, ids, heldout, progress=False).perplexity
            summary = llamacpp.gguf_summary(path)
            row = {"model": label, "type": outtype, "file_bytes": summary["file_bytes"], "perplexity": ppl,
                   "matrix_types": summary["matrix_types"], "imatrix": guide, **weights}
            if score_tasks is not None:
                row["tasks"] = {name: {"metric": r["metric"], "score": r["score"], "stderr": r["stderr"]}
                                for name, r in score_tasks(reference, tokenizer).items()}
            rows.append(row)
            save(row)
    return rows


@functools.lru_cache(maxsize=2)
def _text(source: str | None) -> str | None:
    """The importance-matrix text ``source`` names, read once for every file it guides."""
    return None if source is None else "\n\n".join(read_texts(source, builtin="calibration", what="--imatrix text"))


def decode_speeds(rows: list[dict], configs: dict[str, object], folder: Path, *, repeats: int,
                  progress: bool) -> None:
    """llama.cpp's decode tokens/s of every row's file (``decode_tokens_per_s``), all run interleaved."""
    from transact.deploy import llamacpp

    files = [bench.GgufModel(f"{r['model']} {r['type']}", folder / f"{r['model']}.{r['type']}.gguf", r["type"],
                             configs[r["model"]], llamacpp.gguf_summary(folder / f"{r['model']}.{r['type']}.gguf"))
             for r in rows]
    grid = bench.BenchGrid(**SPEED_GRID, repeats=repeats, warmup=1)
    speed = {r["model"]: r["decode_tokens_per_s"]
             for r in bench.run_llamacpp_grid(files, grid, progress=progress)}
    for r in rows:
        r["decode_tokens_per_s"] = speed[f"{r['model']} {r['type']}"]


def verdicts(rows: list[dict], reference: str) -> list[str]:
    """For every file of a pruned model: the smallest file of the reference model that is no larger and no worse
    (pruning lost there), or that none is (pruning + quantization is on the front at that size)."""
    dense = sorted((r for r in rows if r["model"] == reference), key=lambda r: r["file_bytes"])
    lines = []
    for r in sorted((r for r in rows if r["model"] != reference), key=lambda r: (r["model"], r["file_bytes"])):
        better = [d for d in dense if d["file_bytes"] <= r["file_bytes"] and d["perplexity"] <= r["perplexity"]]
        what = f"`{r['model']}` {r['type']} ({r['file_bytes'] / 1e6:,.1f} MB, perplexity {r['perplexity']:.2f})"
        if better:
            d = better[0]
            lines.append(f"- {what}: loses to `{reference}` {d['type']} ({d['file_bytes'] / 1e6:,.1f} MB, "
                         f"perplexity {d['perplexity']:.2f}), smaller and better")
        else:
            lines.append(f"- {what}: **no file of `{reference}` is as small and as good**")
    return lines


def section(out: Path, q: dict) -> list[str]:
    """The report's "Prune or quantize" section (markdown lines) for ``q`` (OUT/quantized.json), with its plot
    written to OUT/quantized.png."""
    plot(q["rows"], out / "quantized.png")
    grid = q["speed_grid"]
    return ["## Prune or quantize", "",
            f"Every model written as each GGUF type (llama.cpp's converter and quantizer; files in `gguf/`). "
            f"Perplexity: transformers running each file's own dequantized weights on `{q['text']}` "
            f"({q['tokens'] or 'all'} tokens, window {q['window']}). Decode: llama.cpp, batch 1, a "
            f"{grid['contexts'][0]}-token prompt then {grid['gen']} tokens, median of {grid['repeats']}."
            + _guidance_note(q["rows"]), "",
            table(q["rows"]), "", "![prune or quantize](quantized.png)", "",
            f"Against the files of `{q['reference']}` (a pruned file loses where one of them is no larger and no "
            "worse):", "", *verdicts(q["rows"], q["reference"]), ""]


def _guidance_note(rows: list[dict]) -> str:
    """How the quantizer's files were written: guided by an importance matrix over which text, or not."""
    from transact.deploy.quantize import is_quantized_type

    guides = {r.get("imatrix") for r in rows if is_quantized_type(r["type"])}
    if not guides:
        return ""
    if guides == {None}:
        return " The quantizer's types without an importance matrix (`--imatrix none`)."
    return f" The quantizer's types guided by an importance matrix over `{', '.join(sorted(map(str, guides)))}`."


def table(rows: list[dict]) -> str:
    tasks = list(dict.fromkeys(t for r in rows for t in r.get("tasks", {})))
    metric = {t: r["tasks"][t]["metric"] for r in rows for t in r.get("tasks", {})}
    lines = ["| model | type | file MB | perplexity | decode tok/s (llama.cpp) |"
             + "".join(f" {t} ({metric[t]}) |" for t in tasks), "|---|---|---:|---:|---:|" + "---:|" * len(tasks)]
    for r in sorted(rows, key=lambda r: (r["model"], -r["file_bytes"])):
        speed = r.get("decode_tokens_per_s")
        scores = [r.get("tasks", {}).get(t) for t in tasks]
        lines.append(f"| {r['model']} | {r['type']} | {r['file_bytes'] / 1e6:,.1f} | {r['perplexity']:.2f} | "
                     + ("-" if speed is None or math.isnan(speed) else f"{speed:,.1f}") + " |"
                     + "".join(f" {_score(s)} |" for s in scores))
    return "\n".join(lines)


def _score(task: dict | None) -> str:
    return "-" if not task or task["score"] is None else f"{task['score']:.3f} ± {task['stderr'] or 0:.3f}"


def plot(rows: list[dict], path: Path) -> None:
    """Held-out perplexity (log scale) against file size, one line per model, each point named by its type."""
    from transact.measure.report import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in dict.fromkeys(r["model"] for r in rows):
        points = sorted((r for r in rows if r["model"] == name), key=lambda r: r["file_bytes"])
        ax.plot([r["file_bytes"] / 1e6 for r in points], [r["perplexity"] for r in points], marker="o", label=name)
        for r in points:
            ax.annotate(r["type"], (r["file_bytes"] / 1e6, r["perplexity"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("GGUF file size (MB)")
    ax.set_ylabel("held-out perplexity (the file's weights)")
    ax.set_title("Prune or quantize: perplexity against file size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
