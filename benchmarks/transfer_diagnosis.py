"""Why a KV-group choice fails, layer by layer: for every layer of a model, which KV groups eq. 5 (``transact``),
FLAP and ``transact_residual`` keep when pruning to ``--kv-heads`` groups, the output error of o_proj the
refit leaves for each set of groups (from the Gram matrix of its input), and how each group's output splits
into a constant part (its mean over the calibration tokens) and a fluctuating part, both measured through
o_proj's columns, as energies per token.

    python benchmarks/transfer_diagnosis.py --model builtin:qwen2.5-coder-0.5b --kv-heads 1 \
        --out docs/bench/transfer/diagnosis_qwen2_5-coder-0_5b
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_result

from transact.arch import get_adapter, shape_of
from transact.core import salience
from transact.core.correct.refit import damp_for
from transact.core.metrics import get_metric
from transact.core.select import make_plan
from transact.core.step import gather_statistics
from transact.core.targets import resolve_targets
from transact.io.models import load_model, prepare_model
from transact.recipes import Calibration, PruneRecipe

METRICS = ("transact", "flap", "transact_residual")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--kv-heads", type=int, default=1, help="KV groups kept per layer (all their heads)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", required=True)
    return ap.parse_args()


def energies(attn, stats, i: int, tokens: int) -> list[tuple[float, float]]:
    """(constant, fluctuating) output energy per token of each KV group through o_proj."""
    head_dim, g = attn.head_dim, attn.num_heads // attn.num_kv_heads
    mean = stats.activation("attn", "sum")[i].double() / tokens
    cov = stats.activation("attn", "gram")[i].double() / tokens - torch.outer(mean, mean)
    w = attn.o.weight.detach().double()
    out = []
    for k in range(attn.num_kv_heads):
        span = slice(k * g * head_dim, (k + 1) * g * head_dim)
        w_k = w[:, span]
        out.append((float((w_k @ mean[span]).square().sum()), float(torch.trace(w_k @ cov[span, span] @ w_k.T))))
    return out


def layer_row(i: int, attn, stats, plans: dict, damp: float, kv: int) -> dict:
    tokens = stats.activations.tokens
    error = salience.ConsumerError(attn.o.weight, stats.activation("attn", "gram")[i], "refit", damp=damp)
    width = attn.num_heads // attn.num_kv_heads * attn.head_dim
    sets = {"+".join(map(str, groups)): error(torch.cat([torch.arange(k * width, (k + 1) * width) for k in groups]))
            / tokens for groups in itertools.combinations(range(attn.num_kv_heads), kv)}
    return {"layer": i, "kept": {m: plans[m].layers[i].kv_heads for m in METRICS}, "refit_error": sets,
            "constant_fluctuating": energies(attn, stats, i, tokens)}


def table(result: dict) -> str:
    lines = [f"{result['model']}, every layer pruned to {result['kv_heads']} KV group(s), calibration "
             f"{result['calibration']}: the groups each metric keeps; o_proj's output error per token the refit "
             "leaves for each set of kept groups (damping as the refit's default); each group's constant / "
             "fluctuating output energy per token through o_proj.", "",
             "| layer | " + " | ".join(METRICS) + " | refit error by kept groups | constant / fluctuating per group |",
             "|---:|" + "---|" * len(METRICS) + "---|---|"]
    for r in result["layers"]:
        best = min(r["refit_error"], key=r["refit_error"].get)
        errors = ", ".join(f"{'**' if k == best else ''}{k}: {v:.3f}{'**' if k == best else ''}"
                           for k, v in r["refit_error"].items())
        split = ", ".join(f"{c:.2f} / {f:.2f}" for c, f in r["constant_fluctuating"])
        lines.append(f"| {r['layer']} | " + " | ".join(str(r["kept"][m]) for m in METRICS) + f" | {errors} | {split} |")
    agree = sum(r["kept"]["transact"] == r["kept"]["transact_residual"] for r in result["layers"])
    lines += ["", f"eq. 5 keeps the groups the refit repairs best in {agree} of {len(result['layers'])} layers."]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    model, tok = load_model(prepare_model(args.model, "cpu", "float32"))
    shape = shape_of(model)
    calibration = Calibration(samples=args.samples, seq_len=args.seq_len)
    heads = args.kv_heads * shape.group_size
    recipes = {m: PruneRecipe(heads=heads, kv_heads=args.kv_heads, metric=m, calibration=calibration)
               for m in METRICS}
    stats = gather_statistics(model, tok, recipes["transact_residual"], progress=False)  # sum, sum_sq, gram
    targets = resolve_targets(recipes["transact"], shape)
    plans = {}
    for m, r in recipes.items():
        s = get_metric(m).score(model, stats, shape, r)
        plans[m] = make_plan(s.heads, s.mlp, targets, shape, s.experts, s.shared, s.groups)
    damp = damp_for(stats, recipes["transact_residual"].options_of("refit"))
    layers = [layer_row(i, attn, stats, plans, damp, args.kv_heads)
              for i, (attn, _) in enumerate(get_adapter(model).layer_parts(model)) if attn is not None]
    result = {"model": args.model, "kv_heads": args.kv_heads, "calibration": f"{args.samples} x {args.seq_len}",
              "damp": damp, "layers": layers, "machine": machine()}
    write_result(args.out, result, table(result))


if __name__ == "__main__":
    main()
