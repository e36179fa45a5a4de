"""Where a llama.cpp quantization type costs a model its quality: the held-out perplexity of the model with the
file's own dequantized weights, of the model with one kind of matrix rounded and every other left whole ("only"),
and with one kind left whole and every other rounded ("all but"), beside each kind's mean relative weight error
and, per layer, how far the MLP input's channels stand out (the activations an importance matrix weighs).

    python benchmarks/quantization_sensitivity.py --models dense=builtin:qwen2.5-coder-0.5b \
        "recovered=runs/prune_vs_quantize/recovered-qwen-12-2-3072-lr2e-5" --type q4_0 \
        --out docs/bench/prune_vs_quantize/qwen2_5_coder_0_5b_q4_0_sensitivity

Each model is written once as a --type GGUF file (llama.cpp's converter and quantizer, no importance matrix;
kept in --work and reused) and evaluated by transformers on the file's dequantized weights, as
``benchmarks/prune_vs_quantize.py`` does.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from common import machine, write_result

from transact.deploy import quantize
from transact.deploy.agreement import quantized_reference
from transact.io.models import load_model, prepare_model
from transact.io.text import read_texts, token_stream
from transact.measure.perplexity import heldout_perplexity
from transact.recipes import HeldoutText


def kind_of(name: str) -> str:
    """'model.layers.3.mlp.up_proj.weight' -> 'mlp.up_proj.weight'."""
    return re.sub(r"^model\.layers\.\d+\.", "", name)


def mlp_input_outliers(model, ids: torch.Tensor) -> list[dict]:
    """Per layer, over ``ids``: the largest channel's mean square over the median channel's at the MLP input
    (the up projection's input), and the largest absolute value there."""
    stats, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        def hook(module, args, i=i):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            square = x.pow(2).mean(0)
            stats[i] = {"max_over_median": round(float(square.max() / square.median()), 2),
                        "max_abs": round(float(x.abs().max()), 2)}
        hooks.append(layer.mlp.up_proj.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(ids.view(1, -1))
    finally:
        for h in hooks:
            h.remove()
    return [stats[i] for i in sorted(stats)]


@contextmanager
def holding(model, values: dict[str, torch.Tensor], names: list[str]) -> Iterator[None]:
    """Within the block the parameters ``names`` of ``model`` hold ``values``' tensors; restored on exit."""
    own = dict(model.named_parameters())
    kept = {n: own[n].detach().clone() for n in names}
    try:
        with torch.no_grad():
            for n in names:
                own[n].copy_(values[n])
        yield
    finally:
        with torch.no_grad():
            for n in names:
                own[n].copy_(kept[n])


def measure(name: str, spec: str, args) -> dict:
    prep = prepare_model(spec, "cpu", "float32")
    model, tokenizer = load_model(prep)
    ids = token_stream(tokenizer, read_texts("builtin", builtin="heldout"), limit=args.eval_tokens)
    heldout = HeldoutText(tokens=args.eval_tokens, window=args.window)

    def ppl(m) -> float:
        return round(heldout_perplexity(m, ids, heldout, progress=False).perplexity, 2)

    path = Path(args.work) / f"{name}.{args.type}.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        quantize.write_gguf(Path(prep.source.path), path, args.type, progress=False)
    rounded, _ = quantized_reference(path, model, args.type, max_weight_error=float("inf"))
    whole = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 2}
    file_weights = {n: p.detach().clone() for n, p in rounded.named_parameters() if n in whole}
    errors = {n: float((file_weights[n] - whole[n]).norm() / whole[n].norm()) for n in whole}
    kinds = sorted({kind_of(n) for n in whole})
    row = {"model": name, "spec": spec, "checkpoint": ppl(model), "file": ppl(rounded), "kinds": {}}
    for kind in kinds:
        mine = [n for n in whole if kind_of(n) == kind]
        others = [n for n in whole if kind_of(n) != kind]
        with holding(model, file_weights, mine):
            only = ppl(model)
        with holding(model, file_weights, others):
            all_but = ppl(model)
        row["kinds"][kind] = {"weight_error": round(sum(errors[n] for n in mine) / len(mine), 4),
                              "only": only, "all_but": all_but}
        print(name, kind, row["kinds"][kind], flush=True)
    row["mlp_input"] = mlp_input_outliers(model, ids[: args.window])
    return row


def table(result: dict) -> str:
    lines = []
    for row in result["rows"]:
        lines += [f"{row['model']} ({row['spec']}): held-out perplexity {row['checkpoint']:.2f} with its own "
                  f"weights, {row['file']:.2f} with the {result['type']} file's ({result['eval_tokens']:,} tokens)", "",
                  "| matrices | mean relative weight error | perplexity, only these rounded | "
                  "perplexity, all but these rounded |", "|---|---:|---:|---:|"]
        for kind, k in row["kinds"].items():
            lines.append(f"| {kind} | {k['weight_error']:.4f} | {k['only']:.2f} | {k['all_but']:.2f} |")
        outliers = " ".join(f"{s['max_over_median']:.0f}" for s in row["mlp_input"])
        lines += ["", f"MLP input, largest channel's mean square over the median channel's, per layer: {outliers}", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", required=True, metavar="NAME=SPEC")
    ap.add_argument("--type", default="q4_0")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--work", default="runs/quantization_sensitivity")
    ap.add_argument("--out", required=True, help="path prefix for .json and .md")
    args = ap.parse_args()
    quantize.check_outtypes([args.type])
    models = [item.partition("=")[::2] for item in args.models]
    if any(not spec for _, spec in models):
        raise SystemExit("--models: give NAME=SPEC for each")
    result = {"type": args.type, "eval_tokens": args.eval_tokens, "window": args.window, "machine": machine(),
              "rows": [measure(name, spec, args) for name, spec in models]}
    write_result(args.out, result, table(result))


if __name__ == "__main__":
    main()
