"""Layer-wise pruning (``transact prune --layerwise``): quality of the two statistics streams, and memory and
time against the whole-model path.

quality: one-shot held-out perplexity of SmolLM2 pruned layer by layer, each layer calibrated on the
dense model's activations (``dense``: the same statistics as the whole-model path) or on what the
already-pruned layers produce (``sequential``), for each metric and width, with and without the refit.

memory: a random Llama-shaped model saved as sharded bf16 safetensors, pruned by ``transact prune`` in a
fresh process without ``--layerwise``, with it (sequential statistics, the default) and with
``--layerwise --no-sequential``; peak RSS (the process's maximum resident set) and wall time
of each, beside the bound the layer-wise design promises.

    python benchmarks/layerwise.py quality --out docs/bench/layerwise_quality
    python benchmarks/layerwise.py memory --out docs/bench/layerwise_memory
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch
from common import add_run_arguments, load_dense_run, machine, parse_width, write_result

from transact.api import PruneJob, run_prune
from transact.recipes import Calibration, PruneRecipe

GIB = 2**30
MODES = {"whole": [], "layerwise": ["--layerwise"], "layerwise-dense": ["--layerwise", "--no-sequential"]}


def quality(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM

    run = load_dense_run(args)
    dense_ppl = run.perplexity(run.model)
    del run.model
    calibration = Calibration(samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size)
    rows, widths = [], [f"{h}/{k}/{m}" for h, k, m in args.widths]
    with tempfile.TemporaryDirectory() as tmp:
        for (heads, kv, mlp), width in zip(args.widths, widths, strict=True):
            for metric in args.metrics:
                for correctors in ((), ("refit",)) if args.plain else (("refit",),):
                    for stream in args.streams:
                        damping = {"refit": {"damp": args.damp}} if correctors else {}
                        recipe = PruneRecipe(heads=heads, kv_heads=kv, mlp=mlp, metric=metric, correctors=correctors,
                                             corrector_options=damping, seed=args.seed, calibration=calibration)
                        out = Path(tmp) / "out"
                        t = time.perf_counter()
                        run_prune(PruneJob(args.model, str(out), recipe, layerwise=True, force=True,
                                           sequential=stream == "sequential", progress=False))
                        seconds = time.perf_counter() - t
                        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
                        label = metric + ("+refit" if correctors else "")
                        rows.append({"variant": label, "stream": stream, "widths": width, "damp": args.damp,
                                     "seconds": seconds, "perplexity": run.perplexity(model)})
                        print(f"{width} {label} {stream}: ppl {rows[-1]['perplexity']:.2f} ({seconds:.0f} s)",
                              flush=True)
                        _write_quality(args, rows, dense_ppl, run.eval_ids.numel())  # after every row: a long
                        # run stopped early keeps what it measured


def _write_quality(args: argparse.Namespace, rows: list[dict], dense_ppl: float, eval_tokens: int) -> None:
    widths = list(dict.fromkeys(r["widths"] for r in rows))
    table = {(r["variant"], r["stream"], r["widths"]): r["perplexity"] for r in rows}
    lines = [f"Dense perplexity {dense_ppl:.2f} on {eval_tokens} held-out tokens (window {args.window}); "
             f"calibration {args.samples} x {args.seq_len} tokens (seed {args.seed}); one shot, no training; "
             f"refit damping {'the default' if args.damp is None else args.damp}.", "",
             "| variant | statistics | " + " | ".join(widths) + " |", "|---|---|" + "---:|" * len(widths)]
    for variant, stream in dict.fromkeys((r["variant"], r["stream"]) for r in rows):
        lines.append(f"| {variant} | {stream} | " + " | ".join(f"{table[variant, stream, w]:,.1f}"
                                                               if (variant, stream, w) in table else "" for w in widths)
                     + " |")
    write_result(args.out, {"machine": machine(), "args": vars(args) | {"widths": widths},
                            "dense_perplexity": dense_ppl, "rows": rows}, "\n".join(lines))


# ---------------------------------------------------------------- memory and time


def random_llama(folder: Path, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
                 vocab: int) -> int:
    """A Llama-shaped model of random bf16 weights saved as sharded safetensors, with SmolLM2's tokenizer;
    built layer by layer on the meta device so that building it needs no more memory than one shard.
    -> parameter count."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from transact.io.lazy import ShardWriter
    from transact.io.models import skeleton, smollm2_dir

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    config.dtype = torch.bfloat16
    folder.mkdir(parents=True, exist_ok=True)
    model = skeleton(config, torch.bfloat16)
    groups: dict[str, dict[str, tuple]] = {}
    for name, param in model.named_parameters():
        key = ".".join(name.split(".")[:3]) if ".layers." in name else "rest"
        groups.setdefault(key, {})[name] = tuple(param.shape)
    writer, shards, generator = ShardWriter(folder, len(groups)), [], torch.Generator().manual_seed(0)
    for number, (_, shapes) in enumerate(groups.items(), start=1):
        tensors = {name: (torch.ones(shape) if "norm" in name else
                          torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
                   for name, shape in shapes.items()}
        shards.append((writer.shard_name(number), list(tensors)))
        save_file(tensors, str(folder / shards[-1][0]), metadata={"format": "pt"})
    writer.write_index(shards)
    config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_dir()).save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def memory(args: argparse.Namespace) -> None:
    from transact.io.models import prepare_model
    from transact.measure.costs import layerwise_memory

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        base = Path(tmp) / "base"
        params = random_llama(base, args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads,
                              args.vocab)
        prune = ["--heads", str(args.prune_heads), "--kv-heads", str(args.prune_kv), "--mlp", str(args.prune_mlp),
                 "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--dtype", args.dtype,
                 "--batch-size", str(args.batch_size), "--reconstruct" if args.reconstruct else "--no-reconstruct"]
        rows = {}
        for mode in args.modes:
            extra = MODES[mode]
            # One child per measurement, each reading its own peak (see peak_rss_bytes).
            result = subprocess.run([sys.executable, __file__, "one", str(base), str(Path(tmp) / mode), *extra,
                                     *prune], check=True, capture_output=True, text=True)
            rows[mode] = json.loads(result.stdout.strip().splitlines()[-1])
            print(mode, rows[mode], flush=True)
        prep = prepare_model(str(base), "cpu", args.dtype)
        bound = layerwise_memory(prep.shape, prep.dtype, Calibration(samples=args.samples, seq_len=args.seq_len,
                                                                     batch_size=args.batch_size),
                                 refit=args.reconstruct)
    lines = [f"Random Llama-shaped model: {params / 1e9:.2f} B parameters ({args.layers} layers, hidden {args.hidden}, "
             f"MLP {args.intermediate}, {args.heads}/{args.kv_heads} heads, vocab {args.vocab}), sharded bf16 "
             f"safetensors; pruned to {args.prune_heads}/{args.prune_kv}/{args.prune_mlp} with compute dtype "
             f"{args.dtype}, calibration {args.samples} x {args.seq_len} tokens"
             f"{', refit' if args.reconstruct else ''}.", "",
             "| mode | peak RSS (GiB) | wall time (s) |", "|---|---:|---:|"]
    lines += [f"| {mode} | {r['peak_rss_bytes'] / GIB:.2f} | {r['seconds']:.0f} |" for mode, r in rows.items()]
    lines += ["", "Layer-wise bound (`transact info`):", "", "| part | GiB |", "|---|---:|"]
    lines += [f"| {part} | {size / GIB:.2f} |" for part, size in bound.items()]
    write_result(args.out, {"machine": machine(), "args": vars(args), "params": params, "rows": rows,
                            "bound_bytes": bound}, "\n".join(lines))


def one(argv: list[str]) -> None:
    """Run one prune in this process (a child of ``memory``) and print its peak RSS and time as JSON."""
    from transact.cli import main

    t = time.perf_counter()
    main(["prune", argv[0], "--out", argv[1], "--force", "--quiet", *argv[2:]])
    print(json.dumps({"peak_rss_bytes": peak_rss_bytes(), "seconds": time.perf_counter() - t}))


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started its program: the kernel's VmHWM. (Not
    ``getrusage``'s ru_maxrss: Linux carries the pre-exec high-water mark into it, and a child forked
    from the benchmark inherits the parent's resident pages before exec, so every child reported at
    least the parent's size.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: the memory benchmark needs Linux")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "one":
        one(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--widths", nargs="+", type=parse_width,
                   default=[(6, 2, 1024), (4, 2, 768), (3, 1, 512), (9, 3, 768)], help="heads/kv_heads/mlp per layer")
    q.add_argument("--metrics", nargs="+", default=["transact"])
    q.add_argument("--streams", nargs="+", choices=("dense", "sequential"), default=["sequential"])
    q.add_argument("--plain", action="store_true", help="also without the refit")
    q.add_argument("--damp", type=float, default=None)
    q.add_argument("--batch-size", type=int, default=4)
    q.add_argument("--out", default="docs/bench/layerwise_quality")
    add_run_arguments(q)
    m = sub.add_parser("memory")
    for name, value in (("layers", 24), ("hidden", 2048), ("intermediate", 8192), ("heads", 32), ("kv-heads", 8),
                        ("vocab", 128256), ("prune-heads", 16), ("prune-kv", 4), ("prune-mlp", 4096), ("samples", 16),
                        ("seq-len", 256), ("batch-size", 4)):
        m.add_argument(f"--{name}", type=int, default=value)
    m.add_argument("--dtype", default="float32")
    m.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=True)
    m.add_argument("--modes", nargs="+", choices=tuple(MODES),
                   default=["whole", "layerwise", "layerwise-dense"])
    m.add_argument("--tmp", default=None, help="where to build the model (needs its size in free disk, twice)")
    m.add_argument("--out", default="docs/bench/layerwise_memory")
    args = ap.parse_args()
    quality(args) if args.command == "quality" else memory(args)


if __name__ == "__main__":
    main()
