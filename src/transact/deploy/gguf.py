"""Deployment: a pruned (or any supported) checkpoint as a GGUF file that llama.cpp loads, checked.

``run_gguf_export`` converts with llama.cpp's own converter (``transact.llamacpp``), loads the result in
llama.cpp and compares its greedy predictions with transformers' before the file is renamed into place.
The comparison is teacher-forced along llama.cpp's own greedy path, so a near-tie that rounding flips
does not derail the rest of the sequence: at every step the token llama.cpp picked must be transformers'
best token or within ``tolerance`` nats of it, and llama.cpp's log-probability of that token must agree
with transformers' within ``tolerance``. The tolerance depends on the output type (what its rounding
can move, measured on SmolLM2, see docs/deployment.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from transact.deploy import llamacpp
from transact.errors import TransactError
from transact.io.files import check_writable, move_into_place, staging_file
from transact.io.models import load_model, prepare_model, require_tokenizer

VERIFY_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "The three primary colors are red,",
    "To make a cup of tea, first boil the water, then",
)
# nats; what converting fp32 weights to each type moves a log-probability by, with margin
TOLERANCE = {"f32": 0.02, "f16": 0.05, "bf16": 0.15, "q8_0": 0.75}


@dataclass(frozen=True)
class GgufExportJob:
    model: str  # a Hugging Face model directory or builtin:smollm2
    out: str  # the .gguf file to write
    outtype: str = "f16"
    verify: bool = True
    force: bool = False
    new_tokens: int = 16  # greedy tokens compared per verification prompt
    tolerance: float | None = None  # nats; None = TOLERANCE[outtype]
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        llamacpp.check_outtypes([self.outtype])
        if not str(self.out).endswith(".gguf"):
            raise TransactError(f"the output {self.out} must be a .gguf file name")
        if self.new_tokens < 1:
            raise TransactError("the number of compared tokens must be >= 1")
        if self.tolerance is not None and not self.tolerance > 0:
            raise TransactError("--tolerance must be a positive number of nats")


def check_gguf_output(out: str | Path, *, force: bool) -> Path:
    out = Path(out).expanduser().resolve()
    if out.is_dir():
        raise TransactError(f"the output {out} is a directory; give a .gguf file name")
    if out.exists() and not force:
        raise TransactError(f"{out} exists (use --force to replace it)")
    check_writable(out)
    return out


def run_gguf_export(job: GgufExportJob) -> dict:
    """Convert, verify in llama.cpp, then move into place; returns what was written and checked."""
    prep = prepare_model(job.model, "cpu", "float32")  # family and weight files checked
    source = prep.source
    if source.gguf_file or not source.is_local:
        raise TransactError(f"{job.model!r}: export needs a local Hugging Face model directory")
    arch = llamacpp.gguf_architecture(prep.config)
    out = check_gguf_output(job.out, force=job.force)
    tokenizer = require_tokenizer(source, "GGUF conversion (the vocabulary goes into the file)")
    llamacpp.runtime_version()
    llamacpp.converter_dir(progress=job.progress)

    t0 = time.perf_counter()
    tmp = staging_file(out)
    try:
        if job.progress:
            print(f"converting {job.model} to {job.outtype} GGUF (llama.cpp architecture {arch}) ...")
        llamacpp.convert(Path(source.path), tmp, job.outtype, progress=job.progress)
        result = {"model": job.model, "out": str(out), "outtype": job.outtype, "architecture": arch,
                  "convert_seconds": round(time.perf_counter() - t0, 2)}
        if job.verify:
            if job.progress:
                print("checking llama.cpp's predictions against transformers ...")
            model, _ = load_model(prep, tokenizer=tokenizer)
            check = compare_predictions(tmp, model, tokenizer, job.outtype, new_tokens=job.new_tokens,
                                        tolerance=job.tolerance, threads=job.threads)
            result["verification"] = check
            if not check["ok"]:
                raise TransactError(_failure_message(check, job.outtype))
        move_into_place(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    result["summary"] = llamacpp.gguf_summary(out)
    return result


def _failure_message(check: dict, outtype: str) -> str:
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
