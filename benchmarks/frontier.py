"""The frontier of one model: width-only, depth-only, depth + width and per-layer (non-uniform) prunes on one
plot of held-out perplexity against llama.cpp's measured decode speed, and against parameters.

    python benchmarks/frontier.py --model builtin:smollm2 --out docs/bench/frontier/smollm2 \
        --variant "mlp 887=--mlp 887" --variant "drop 5 + mlp 1167=--drop-layers 5 --mlp 1167" ...

Each --variant is NAME=FLAGS: ``transact prune MODEL FLAGS`` with the calibration options of this script,
run in its own process and kept in --work (reused on a rerun). Each point named by --recover (a vanilla
checkpoint) is also trained for --recover-tokens tokens by the same short ``transact run``
(docs/recipes/frontier-recovery.yaml: no shot, full fine-tuning of the checkpoint as it is, per-layer
widths included) and appears again as recovered.
Every checkpoint (and the dense model) is scored on the same held-out text in fp32 by transformers, written
as one --outtype GGUF file by transact's export path (the converter; per-layer widths as llama.cpp's
``deci`` architecture), and timed in llama.cpp (xllamacpp), batch 1, a 128-token prompt then 128 new
tokens, the median of --repeats rounds that each time every file once (loaded alone). The kind of each
point (width, depth, depth + width, per-layer) is read from its flags.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, previous_result, write_result

from transact.deploy import deci_gguf, llamacpp, quantize
from transact.errors import TransactError
from transact.io.text import read_texts, token_stream
from transact.measure import bench
from transact.measure.bench import BenchGrid
from transact.measure.costs import count_parameters
from transact.measure.perplexity import heldout_perplexity, perplexity
from transact.recipes import HeldoutText

KINDS = ("dense", "width", "depth", "depth + width", "per-layer")
RECOVERY_RECIPE = Path(__file__).parent.parent / "docs" / "recipes" / "frontier-recovery.yaml"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                    help="a pruned model: its name and the transact prune flags that make it")
    ap.add_argument("--recover", action="append", default=[], metavar="NAME",
                    help="a point to train after its prune as well (repeat for several)")
    ap.add_argument("--recover-tokens", type=int, default=48_000, help="training tokens of each recovery")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows of every prune")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--outtype", default="f16", help="the GGUF type every file is timed in")
    ap.add_argument("--repeats", type=int, default=7, help="rounds of timing every file once")
    ap.add_argument("--work", default="runs/frontier")
    ap.add_argument("--out", required=True, help="path prefix for .json, .md and .png")
    return ap.parse_args()


def kind_of(flags: list[str]) -> str:
    """The point's kind, from the prune flags that made it."""
    if "--allocate" in flags and flags[flags.index("--allocate") + 1] == "search":
        return "per-layer"
    drops = "--drop-layers" in flags
    widths = any(f in flags for f in ("--heads", "--kv-heads", "--mlp"))
    return "depth + width" if drops and widths else "depth" if drops else "width"


def split_named(item: str, what: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise SystemExit(f"{what} {item!r}: give NAME=VALUE")
    return name.strip(), value.strip()


def pruned(args: argparse.Namespace, work: Path, name: str, flags: list[str]) -> Path:
    """``transact prune`` with ``flags`` into ``work``/name (reused when it already holds a finished prune)."""
    out = work / name.replace(" ", "_").replace("/", "-").replace("+", "and")
    if not (out / "plan.json").is_file():
        cmd = [sys.executable, "-m", "transact.cli", "prune", args.model, "--out", str(out), "--force",
               "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--quiet", *flags]
        print("$", shlex.join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
    return out


def own_code(spec: str) -> bool:
    """Whether a checkpoint has per-layer widths (the DeciLM layout transact writes)."""
    return Path(spec).is_dir() and deci_gguf.is_per_layer(Path(spec))


def recovered(args: argparse.Namespace, work: Path, name: str, checkpoint: Path) -> Path:
    """``checkpoint`` after the short recovery run (reused when ``work`` already holds it)."""
    out = work / "recovered" / checkpoint.name
    if not (out / "report.json").is_file():
        cmd = [sys.executable, "-m", "transact.cli", "run", str(RECOVERY_RECIPE), f"model={checkpoint}",
               f"out={out}", f"training.final_tokens={args.recover_tokens}", "--quiet",
               *(["--resume"] if out.exists() else [])]
        print("$", shlex.join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
    return out


def load(spec: str):
    """Any checkpoint in fp32 on CPU; per-layer widths through the project's own DeciLM classes."""
    from transact.io.models import load_model, prepare_model
    from transact.io.per_layer import load_per_layer

    if own_code(spec):
        return load_per_layer(Path(spec))
    return load_model(prepare_model(spec, "cpu", "float32"))[0]


def config_of(spec: str):
    from transact.io.models import prepare_model

    if own_code(spec):  # what the llama.cpp bench reads of it (the vocabulary): the Llama config it fits inside
        from transformers import LlamaConfig

        from transact.decilm.configuration_decilm import DeciLMConfig

        return LlamaConfig(**DeciLMConfig.from_pretrained(spec).uniform_llama())
    return prepare_model(spec, "cpu", "float32").config


def measure_quality(spec: str, ids, heldout: HeldoutText) -> dict:
    model = load(spec)
    if own_code(spec):  # no family adapter to read the trained context from: the window as given
        ppl = perplexity(model, ids, window=heldout.window, progress=False).perplexity
    else:
        ppl = heldout_perplexity(model, ids, heldout, progress=False).perplexity
    return {"perplexity": round(ppl, 3),
            "params": count_parameters(model), "layers": model.config.num_hidden_layers}


def gguf_file(spec: str, work: Path, name: str, outtype: str) -> Path:
    path = work / "gguf" / f"{name.replace(' ', '_').replace('/', '-').replace('+', 'and')}.{outtype}.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        source = spec if Path(spec).is_dir() else str(_dense_dir(spec))
        quantize.write_gguf(Path(source), path, outtype, progress=False)
    return path


def _dense_dir(spec: str) -> Path:
    from transact.io.models import prepare_model

    return Path(prepare_model(spec, "cpu", "float32").source.path)


def decode_speed(files: dict[str, tuple[Path, object]], outtype: str, rounds: int) -> dict[str, dict]:
    """Decode tokens/s of each file: ``rounds`` rounds, each timing every file once, loaded alone (with many
    files loaded at once llama.cpp's idle thread pools slowed the others unevenly,
    benchmarks/prune_vs_quantize.py), so that a slow spell of the machine touches every file alike; the
    median over the rounds, with the lowest and highest."""
    grid = BenchGrid(batches=(1,), contexts=(128,), gen=128, repeats=1, warmup=1)
    models = {name: bench.GgufModel(name, path, outtype, config, llamacpp.gguf_summary(path))
              for name, (path, config) in files.items()}
    seen: dict[str, list[float]] = {name: [] for name in files}
    for round_ in range(rounds):
        for name, model in models.items():
            seen[name].append(bench.run_llamacpp_grid([model], grid, progress=False)[0]["decode_tokens_per_s"])
        print(f"round {round_ + 1}/{rounds}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in seen.items()),
              file=sys.stderr, flush=True)
    return {name: {"median": statistics.median(v), "low": min(v), "high": max(v)} for name, v in seen.items()}


def table(result: dict) -> str:
    dense = result["rows"][0]
    lines = [f"{result['model']}: one-shot prunes ({result['calibration']} calibration tokens of the built-in "
             f"text), held-out perplexity on {result['eval_tokens']:,} LAMBADA tokens (fp32, transformers); decode "
             f"speed in llama.cpp ({result['outtype']}, batch 1, 128-token prompt + 128 new; median, lowest and "
             f"highest of {result['repeats']} rounds, each round timing every file once)", "",
             "| point | kind | layers | params | perplexity | decode tok/s | speed-up |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        speed, base = r.get("decode_tok_s"), dense.get("decode_tok_s")
        speed_up = f"{speed / base:.2f}x" if speed and base else ""
        shown = f"{speed:.1f} ({r['decode_low']:.1f}-{r['decode_high']:.1f})" if speed is not None \
            else f"not run: {r['llamacpp_refused'].split(';')[0]}" if r.get("llamacpp_refused") else ""
        lines.append(f"| {r['name']} | {r['kind']} | {r['layers']} | {r['params'] / dense['params']:.3f} | "
                     f"{r['perplexity']:.2f} | {shown} | {speed_up} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    dense = result["rows"][0]
    for ax, x, label in ((axes[0], "decode_tok_s", "llama.cpp decode tokens/s (batch 1)"),
                         (axes[1], "params", "parameters / dense")):
        for (kind, marker), color in zip(zip(KINDS, "*osD^", strict=True), ("k", "C0", "C1", "C2", "C3"), strict=True):
            for trained in (False, True):
                rows = [r for r in result["rows"]
                        if r["kind"] == kind and r.get("recovered", False) == trained and r.get(x) is not None]
                xs = [r[x] / (dense[x] if x == "params" else 1) for r in rows]
                if rows:
                    ax.scatter(xs, [r["perplexity"] for r in rows], marker=marker, s=60, edgecolors=color,
                               facecolors="none" if trained else color,
                               label=f"{kind} (recovered)" if trained else kind)
                for r, xv in zip(rows, xs, strict=True):
                    ax.annotate(r["name"].replace(" (recovered)", ""), (xv, r["perplexity"]), fontsize=6,
                                xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out perplexity")
    axes[0].legend(fontsize=8)
    trained = f"; hollow: after {result['recover_tokens']:,} training tokens" if result["recover_tokens"] else ""
    fig.suptitle(f"{result['model']}: one-shot prunes{trained}; {result['outtype']} in llama.cpp")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    work = Path(args.work) / args.model.replace(":", "_").replace("/", "_")
    settings = {"model": args.model, "calibration": f"{args.samples} x {args.seq_len}",
                "eval_tokens": args.eval_tokens, "window": args.window, "outtype": args.outtype,
                "recover_tokens": args.recover_tokens if args.recover else 0}
    out = Path(args.out)
    result = previous_result(out, settings) or {"settings": settings, **settings, "rows": [], "machine": machine()}
    result["repeats"] = args.repeats
    kinds = {name: kind_of(shlex.split(flags)) for name, flags in (split_named(i, "--variant") for i in args.variant)}
    for name in args.recover:
        if name not in kinds:
            raise SystemExit(f"--recover {name!r}: not the name of a --variant")
    points = [("dense", "dense", args.model, False)]
    for item in args.variant:
        name, flags = split_named(item, "--variant")
        kind = kind_of(shlex.split(flags))
        checkpoint = pruned(args, work, name, shlex.split(flags))
        points.append((name, kind, str(checkpoint), False))
        if name in args.recover:
            points.append((f"{name} (recovered)", kind, str(recovered(args, work, name, checkpoint)), True))

    from transact.io.models import load_model, prepare_model

    tokenizer = load_model(prepare_model(args.model, "cpu", "float32"))[1]
    ids = token_stream(tokenizer, read_texts("builtin", builtin="heldout"), limit=args.eval_tokens)
    heldout = HeldoutText(tokens=args.eval_tokens, window=args.window)
    done = {r["name"]: r for r in result["rows"]}
    result["rows"] = [done.get(name) or {"name": name, "kind": kind, "recovered": trained, "source": spec,
                                        **measure_quality(spec, ids, heldout)} for name, kind, spec, trained in points]
    write_result(out, result, table(result))
    files, refused = {}, {}
    for name, _, spec, _ in points:
        try:
            files[name] = (gguf_file(spec, work, name, args.outtype), config_of(spec))
        except TransactError as e:  # a shape llama.cpp cannot run (e.g. a layer pattern it fixes): no speed
            refused[name] = str(e).splitlines()[0]
    speed = decode_speed(files, args.outtype, args.repeats)
    for row in result["rows"]:
        measured = speed.get(row["name"], {})
        row["decode_tok_s"], row["decode_low"], row["decode_high"] = (measured.get(k)
                                                                     for k in ("median", "low", "high"))
        row["llamacpp_refused"] = refused.get(row["name"])
    result["xllamacpp"] = llamacpp.runtime_version()
    write_result(out, result, table(result))
    plot(result, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
