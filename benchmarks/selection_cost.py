"""What the refit-aware choices of ``transact_residual`` cost at a large model's shape: one layer's KV-group
choice (every set of groups compared, ``salience.least_error_groups``), its query-head choice inside the kept
groups (greedy optimal-brain-surgeon removal, ``salience.refit_greedy_heads``) and the MLP channels' refit
errors (``--mlp-score consumer_error``, ``salience.refit_removal_errors``), timed on synthetic Gram matrices
of the shape's widths (the cost does not depend on their values) and multiplied by the number of layers.

    python benchmarks/selection_cost.py --shape llama-3-8b --out docs/bench/selection_cost
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from common import machine, write_result

from transact.core import salience

# hidden, heads, kv groups, head_dim, MLP width, layers (from the models' config.json)
SHAPES = {
    "llama-3-8b": (4096, 32, 8, 128, 14336, 32),
    "qwen2.5-7b": (3584, 28, 4, 128, 18944, 28),
    "qwen2.5-coder-0.5b": (896, 14, 2, 64, 4864, 24),
}


def synthetic_gram(channels: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    """(C, C) fp32 positive definite: a low-rank part plus a diagonal, like activations' Gram matrices."""
    factor = torch.randn(channels, rank, generator=generator)
    return factor @ factor.T + channels * torch.eye(channels)


def timed(work) -> tuple[float, object]:
    start = time.perf_counter()
    result = work()
    return time.perf_counter() - start, result


def attention_costs(shape: tuple[int, ...], keep_groups: int, per_group: int, damp: float) -> dict:
    hidden, heads, groups, head_dim = shape[:4]
    gen = torch.Generator().manual_seed(0)
    o_weight = torch.randn(hidden, heads * head_dim, generator=gen)
    gram = synthetic_gram(heads * head_dim, 256, gen)
    size = heads // groups
    error = salience.ConsumerError(o_weight, gram, "refit", damp=damp)

    def group_error(kept: list[int]) -> float:
        return error(torch.tensor([c for g in kept for c in range(g * size * head_dim, (g + 1) * size * head_dim)]))

    group_s, kept = timed(lambda: salience.least_error_groups(group_error, groups, keep_groups))
    in_groups = [list(range(g * size, (g + 1) * size)) for g in kept]
    heads_s, _ = timed(lambda: salience.refit_greedy_heads(o_weight, gram, head_dim, damp, in_groups, per_group))
    return {"group_sets": math.comb(groups, keep_groups), "group_choice_s": round(group_s, 2),
            "head_choices": salience.head_choices(in_groups, per_group), "head_greedy_s": round(heads_s, 2)}


def mlp_costs(shape: tuple[int, ...], damp: float) -> dict:
    hidden, mlp = shape[0], shape[4]
    gen = torch.Generator().manual_seed(1)
    down = torch.randn(hidden, mlp, generator=gen)
    gram = synthetic_gram(mlp, 256, gen)
    mlp_s, _ = timed(lambda: salience.refit_removal_errors(down, gram, damp))
    return {"mlp_channels": mlp, "mlp_errors_s": round(mlp_s, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", nargs="+", choices=sorted(SHAPES), default=["llama-3-8b"])
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = []
    for name in args.shape:
        shape = SHAPES[name]
        groups, layers = shape[2], shape[5]
        keep = groups // 2  # the most sets there are: C(groups, groups / 2)
        per_group = (shape[1] // groups) * 3 // 4 or 1
        cost = {**attention_costs(shape, keep, per_group, args.damp), **mlp_costs(shape, args.damp)}
        total = cost["group_choice_s"] + cost["head_greedy_s"] + cost["mlp_errors_s"]
        rows.append({"shape": name, "layers": layers, "keep_groups": keep, "per_group": per_group, **cost,
                     "model_s": round(total * layers, 1)})
        print(rows[-1], flush=True)
    head = ("| shape | layers | KV groups kept | sets | group choice s/layer | heads kept per group | head choices "
            "| greedy heads s/layer | MLP channels | MLP errors s/layer | all three, whole model s |\n"
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [f"| {r['shape']} | {r['layers']} | {r['keep_groups']} | {r['group_sets']} | {r['group_choice_s']} | "
             f"{r['per_group']} | {r['head_choices']} | {r['head_greedy_s']} | {r['mlp_channels']} | "
             f"{r['mlp_errors_s']} | {r['model_s']} |" for r in rows]
    write_result(args.out, {"machine": machine(), "damp": args.damp, "rows": rows}, "\n".join([head, *lines]))


if __name__ == "__main__":
    main()
