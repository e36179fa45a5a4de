"""How much a model's own predictions move when its weight matrices are rounded to f16 / bf16 (computed in
fp32, in transformers): the floor below which no GGUF conversion of it can agree with the fp32 model.

    python benchmarks/rounding_sensitivity.py --models runs/smollm2-6h-2kv-1024 runs/smollm2-3h-1kv-512 \
        --out docs/bench/rounding_sensitivity

Along the fp32 model's greedy continuation of the export check's prompts: the worst margin (how much worse,
under fp32, the rounded model's greedy choice is) and the worst log-probability difference of a token.
"""

from __future__ import annotations

import argparse
import copy

import torch
from common import machine, write_result

from transact.deploy.agreement import VERIFY_PROMPTS
from transact.io.models import load_model, prepare_model


@torch.inference_mode()
def sensitivity(model, tokenizer, dtype: torch.dtype, tokens: int) -> tuple[float, float]:
    rounded = copy.deepcopy(model)
    for p in rounded.parameters():
        if p.dim() == 2:
            p.copy_(p.to(dtype).float())
    worst_margin = worst_diff = 0.0
    for text in VERIFY_PROMPTS:
        ids = tokenizer(text).input_ids
        seq = model.generate(torch.tensor([ids]), max_new_tokens=tokens, do_sample=False)
        ref = torch.log_softmax(model(seq).logits[0, len(ids) - 1:-1], -1)
        new = torch.log_softmax(rounded(seq).logits[0, len(ids) - 1:-1], -1)
        choice = new.argmax(-1, keepdim=True)
        worst_margin = max(worst_margin, (ref.max(-1).values - ref.gather(1, choice)[:, 0]).max().item())
        taken = seq[0, len(ids):, None]
        worst_diff = max(worst_diff, (ref.gather(1, taken) - new.gather(1, taken)).abs().max().item())
    return worst_margin, worst_diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", required=True, help="path stem for .json and .md")
    args = ap.parse_args()
    rows = []
    for spec in args.models:
        model, tokenizer = load_model(prepare_model(spec, "cpu", "float32"))
        for name, dtype in (("f16", torch.float16), ("bf16", torch.bfloat16)):
            margin, diff = sensitivity(model, tokenizer, dtype, args.tokens)
            rows.append({"model": spec, "rounded_to": name, "max_margin": margin, "max_logprob_diff": diff})
    lines = ["| model | weights rounded to | worst margin (nats) | worst log-prob diff (nats) |", "|---|---|---:|---:|"]
    lines += [f"| {r['model']} | {r['rounded_to']} | {r['max_margin']:.3f} | {r['max_logprob_diff']:.3f} |"
              for r in rows]
    write_result(args.out, {"rows": rows, "machine": machine()}, "\n".join(lines))


if __name__ == "__main__":
    main()
