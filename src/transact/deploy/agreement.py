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
from transact.deploy.quantize import QUANT_TYPES
from transact.errors import TransactError

VERIFY_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "The three primary colors are red,",
    "To make a cup of tea, first boil the water, then",
)
# nats; what llama.cpp's arithmetic moves a log-probability by, with margin (docs/deployment.md). An f32 file
# still runs with llama.cpp's f16 KV cache, so it gets f16's bound.
TOLERANCE = {"f32": 0.05, "f16": 0.05, "bf16": 0.15}
# Files whose types round the weights (q8_0 and the quantizer's) are compared with transformers running the
# file's own dequantized weights. What separates the two then is llama.cpp's 8-bit quantization of the
# activations in its quantized dot products: noise of 0.04-0.06 nats a token on average, but up to 0.76 on one
# token (SmolLM2 dense and 6/2/1024, 4 prompts x 32 tokens). So one token may move by up to 1.5 nats, and the
# mean over all tokens must stay within 0.15 (a wrong norm epsilon in the file gave 0.34; docs/deployment.md).
FILE_WEIGHT_TYPES = ("q8_0", *QUANT_TYPES)
TOLERANCE |= dict.fromkeys(FILE_WEIGHT_TYPES, 1.5)
MEAN_TOLERANCE = dict.fromkeys(FILE_WEIGHT_TYPES, 0.15)
# relative distance of a dequantized tensor from the checkpoint's: far above any type's rounding (worst
# measured: q8_0 0.007, q6_k 0.019, q4_k_m 0.076, q4_0 0.106), far below a tensor of another layer (~1.4)
MAX_WEIGHT_ERROR = dict.fromkeys(FILE_WEIGHT_TYPES, 0.5)


def failure_message(check: dict, outtype: str) -> str:
    lines = [f"llama.cpp's predictions from the {outtype} GGUF disagree with transformers "
             f"(tolerance {check['tolerance']} nats); nothing was written:"]
    for p in check["prompts"]:
        if not p["ok"]:
            lines.append(f"  {p['prompt']!r}: greedy agreement {p['agree']}/{p['steps']}, worst margin "
                         f"{p['max_margin']:.3f}, worst log-prob difference {p['max_logprob_diff']:.3f}"
                         + ("" if p["tokenizer_agrees"] else ", and the tokenizers disagree"))
    if check.get("mean_tolerance") is not None and check["mean_logprob_diff"] > check["mean_tolerance"]:
        lines.append(f"  mean log-prob difference over all tokens {check['mean_logprob_diff']:.3f} nats (at most "
                     f"{check['mean_tolerance']})")
    lines.append("A wrong conversion moves log-probabilities by nats. A model whose own predictions move when its "
                 "weights are rounded (heavily pruned models before recovery training can be that fragile) may "
                 "need a larger --tolerance; check it with benchmarks/gguf_agreement.py.")
    return "\n".join(lines)


def quantized_reference(gguf_file: str | Path, model: nn.Module, outtype: str, *,
                        max_weight_error: float | None = None) -> tuple[nn.Module, dict]:
    """A copy of ``model`` holding a quantized GGUF file's own weights, dequantized (fp32): what llama.cpp
    should compute from the file. Raises if the file does not hold this model: a tensor that is not one of
    its parameters or has another shape, a weight matrix missing, or one further from the model's own than
    ``outtype``'s rounding goes (``max_weight_error``, default ``MAX_WEIGHT_ERROR[outtype]``; a wrong or
    swapped tensor is ~1.4 away). -> (the copy,
    {"worst_weight_error": relative Frobenius distance, "worst_tensor": its name})."""
    import copy

    tensors = _gguf_tensors(gguf_file, model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        errors = {name: float((t.to(p.dtype) - p).norm() / p.norm().clamp_min(1e-30))
                  for name, t in tensors.items() for p in (params[name],)}
    worst = max(errors, key=errors.get)
    bound = MAX_WEIGHT_ERROR[outtype] if max_weight_error is None else max_weight_error
    far = sorted((n for n, e in errors.items() if e > bound), key=errors.get, reverse=True)
    if far:
        raise TransactError(f"the {outtype} GGUF file does not hold this model's weights: {len(far)} tensor(s) "
                            f"differ by more than {outtype}'s rounding allows ({bound:.2f} relative), worst "
                            + ", ".join(f"{n} {errors[n]:.3f}" for n in far[:3]) + "; nothing was written")
    reference = copy.deepcopy(model)
    own = dict(reference.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            own[name].copy_(tensor.to(own[name].dtype))
    return reference, {"worst_weight_error": round(errors[worst], 5), "worst_tensor": worst}


def _gguf_tensors(gguf_file: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The file's tensors, dequantized, under the model's parameter names (transformers' GGUF reader maps
    llama.cpp's names back and undoes the converter's reordering of q/k rows); every tensor must land on a
    parameter of the same shape and every weight matrix must be there."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        tensors = load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=model)["tensors"]
    except (ValueError, KeyError, NotImplementedError) as e:
        raise TransactError(f"transformers cannot read this family's quantized GGUF back ({e}); export with "
                            "--no-verify, or check the file with benchmarks/gguf_agreement.py") from None
    params = dict(model.named_parameters())
    wrong = [f"{n} {tuple(t.shape)} vs {tuple(params[n].shape)}" for n, t in tensors.items()
             if n in params and params[n].shape != t.shape]
    unknown = [n for n in tensors if n not in params]
    missing = [n for n, p in params.items() if p.dim() == 2 and n not in tensors and not _tied(model, n)]
    problems = [f"{what}: {', '.join(names[:3])}" for what, names in
                (("shapes differ", wrong), ("not in the model", unknown), ("not in the file", missing)) if names]
    if problems:
        raise TransactError(f"the GGUF file's tensors do not match the model ({'; '.join(problems)})")
    return tensors


def _tied(model: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` is the output matrix tied to the token embeddings (stored once in a GGUF)."""
    output = model.get_output_embeddings()
    return (output is not None and name.endswith("lm_head.weight")
            and output.weight is model.get_input_embeddings().weight)


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
            rows.append(score_steps(model, ids, chosen, logprobs, tol) | {
                "prompt": text, "tokenizer_agrees": runtime.tokenize(text) == list(ids)})
    for r in rows:
        r["ok"] = r["ok"] and r["tokenizer_agrees"]
    diffs = [d for r in rows for d in r.pop("logprob_diffs")]
    mean_diff = sum(diffs) / max(len(diffs), 1)
    mean_tol = MEAN_TOLERANCE.get(outtype)
    return {"ok": all(r["ok"] for r in rows) and (mean_tol is None or mean_diff <= mean_tol), "tolerance": tol,
            "mean_tolerance": mean_tol, "new_tokens": new_tokens,
            "agree": sum(r["agree"] for r in rows), "steps": sum(r["steps"] for r in rows),
            "max_margin": max(r["max_margin"] for r in rows),
            "max_logprob_diff": max(r["max_logprob_diff"] for r in rows), "mean_logprob_diff": mean_diff,
            "prompts": rows}


def score_steps(model: nn.Module, ids: list[int], chosen: list[int], logprobs: list[float | None],
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
            "logprob_diffs": diffs, "ok": max(margins) <= tol and worst_diff <= tol}
