"""Whether llama.cpp computes what transformers computes: a GGUF file's greedy predictions scored by the model in
transformers (``transact export`` checks every file it writes with it).

The comparison is teacher-forced along llama.cpp's own greedy path, so a near-tie that rounding flips
does not derail the rest of the sequence: at every step the token llama.cpp picked must be transformers'
best token or within ``tolerance`` nats of it, and llama.cpp's log-probability of that token must agree
with transformers' within ``tolerance``. The tolerance depends on the output type (what its rounding
can move, measured on SmolLM2, see docs/deployment.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from transact.deploy import llamacpp
from transact.errors import TransactError

VERIFY_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "The three primary colors are red,",
    "To make a cup of tea, first boil the water, then",
)
# nats; what converting fp32 weights to each type moves a log-probability by, with margin
TOLERANCE = {"f32": 0.02, "f16": 0.05, "bf16": 0.15, "q8_0": 0.75}


def failure_message(check: dict, outtype: str) -> str:
    lines = [f"llama.cpp's predictions from the {outtype} GGUF disagree with transformers "
             f"(tolerance {check['tolerance']} nats); nothing was written:"]
    for p in check["prompts"]:
        if not p["ok"]:
            lines.append(f"  {p['prompt']!r}: greedy agreement {p['agree']}/{p['steps']}, worst margin "
                         f"{p['max_margin']:.3f}, worst log-prob difference {p['max_logprob_diff']:.3f}"
                         + ("" if p["tokenizer_agrees"] else ", and the tokenizers disagree"))
    lines.append("A wrong conversion moves log-probabilities by nats. A model whose own predictions move when its "
                 "weights are rounded (heavily pruned models before recovery training can be that fragile) may "
                 "need a larger --tolerance; check it with benchmarks/gguf_agreement.py.")
    return "\n".join(lines)


@torch.inference_mode()
def compare_predictions(gguf_file: str | Path, model: nn.Module, tokenizer, outtype: str, *,
                        prompts: tuple[str, ...] = VERIFY_PROMPTS, new_tokens: int = 16,
                        tolerance: float | None = None, threads: int | None = None) -> dict:
    """llama.cpp's greedy continuation of each prompt, scored by ``model`` (fp32) step by step."""
    tol = TOLERANCE[outtype] if tolerance is None else tolerance
    rows = []
    with llamacpp.Runtime(gguf_file, context=128 + new_tokens, threads=threads) as runtime:
        for text in prompts:
            ids = tokenizer(text).input_ids
            chosen, logprobs = runtime.greedy(ids, new_tokens)
            rows.append(_score_steps(model, ids, chosen, logprobs, tol) | {
                "prompt": text, "tokenizer_agrees": runtime.tokenize(text) == list(ids)})
    for r in rows:
        r["ok"] = r["ok"] and r["tokenizer_agrees"]
    return {"ok": all(r["ok"] for r in rows), "tolerance": tol, "new_tokens": new_tokens,
            "agree": sum(r["agree"] for r in rows), "steps": sum(r["steps"] for r in rows),
            "max_margin": max(r["max_margin"] for r in rows),
            "max_logprob_diff": max(r["max_logprob_diff"] for r in rows), "prompts": rows}


def _score_steps(model: nn.Module, ids: list[int], chosen: list[int], logprobs: list[float | None],
                 tol: float) -> dict:
    """Teacher-forced log-probabilities of llama.cpp's chosen tokens under ``model``."""
    if not chosen:
        raise TransactError("llama.cpp generated no token for a verification prompt")
    seq = torch.tensor([list(ids) + chosen[:-1]])
    logp = torch.log_softmax(model(seq).logits[0, len(ids) - 1:].float(), dim=-1)
    picked = logp[torch.arange(len(chosen)), torch.tensor(chosen)]
    margins = (logp.max(-1).values - picked).tolist()
    diffs = [abs(lp - p) for lp, p in zip(logprobs, picked.tolist(), strict=True) if lp is not None]
    agree = sum(int(t == b) for t, b in zip(chosen, logp.argmax(-1).tolist(), strict=True))
    worst_diff = max(diffs, default=0.0)
    return {"steps": len(chosen), "agree": agree, "max_margin": max(margins), "max_logprob_diff": worst_diff,
            "ok": max(margins) <= tol and worst_diff <= tol}
