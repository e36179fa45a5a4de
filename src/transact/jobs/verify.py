"""``transact verify``: does a serving engine load a checkpoint as it is, and compute what transformers computes?

vLLM (its CPU build, in an environment of its own, see ``transact.deploy.vllm``) loads the checkpoint
directory unchanged; its greedy continuations of four prompts are scored by transformers step by step, as
``transact export`` checks the GGUF files it writes for llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass

from transact.deploy import vllm
from transact.errors import TransactError
from transact.io.models import load_model, prepare_model, require_tokenizer

ENGINES = ("vllm",)


@dataclass(frozen=True)
class VerifyJob:
    model: str
    engine: str = "vllm"
    dtype: str = "float32"  # what vLLM computes in: float32 or bfloat16
    new_tokens: int = 16
    tolerance: float | None = None  # nats; default by dtype (vllm.TOLERANCE)
    kv_cache_gib: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise TransactError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)} (llama.cpp "
                                "files are checked by `transact export` as it writes them)")
        if self.dtype not in vllm.DTYPES:
            raise TransactError(f"--dtype must be one of {', '.join(vllm.DTYPES)}, not {self.dtype!r}")
        if self.new_tokens < 1:
            raise TransactError("--verify-tokens must be at least 1")
        if self.tolerance is not None and self.tolerance <= 0:
            raise TransactError("--tolerance must be positive")
        vllm.check_kv_cache_gib(self.kv_cache_gib)


class VerifyResult(dict):
    """What ``transact verify`` measured; ``summary()`` is what it prints."""

    def summary(self) -> str:
        lines = [f"{self['model']}: vLLM {self['version']} loads it as {self['architecture']} ({self['dtype']}) "
                 f"and agrees with transformers: greedy {self['agree']}/{self['steps']} tokens, worst log-prob "
                 f"difference {self['max_logprob_diff']:.2g} nats, mean {self['mean_logprob_diff']:.2g} "
                 f"(tolerance {self['tolerance']})",
                 f"KV cache: {self['kv_cache_tokens']:,} tokens in {self['kv_cache_gib']:g} GiB",
                 f"serve it with: {vllm.serve_command(self['model_dir'], self['hf_overrides'])}"]
        if self["hf_overrides"]:
            lines.insert(1, "vLLM's own model for this family cannot take its pruned heads; it was loaded, and must "
                         "be served, with the --hf-overrides below (docs/deployment.md)")
        return "\n".join(lines)


def run(job: VerifyJob) -> VerifyResult:
    prep = prepare_model(job.model, "cpu", "float32")
    if prep.source.gguf_file:
        raise TransactError("verify takes a Hugging Face checkpoint directory; GGUF files are checked by "
                            "`transact export` as it writes them")
    if note := vllm.head_size_note(prep.shape):
        raise TransactError(f"{job.model}: {note}")
    if reason := vllm.refusal(prep.config):
        raise TransactError(f"{job.model}: {reason}")
    vllm.worker_python()  # not installed: say so before loading anything
    tokenizer = require_tokenizer(prep.source, "verify")
    model, tokenizer = load_model(prep, tokenizer=tokenizer)
    if job.progress:
        print(f"loading {job.model} in vLLM ({job.dtype}) ...", flush=True)
    check = vllm.compare_predictions(prep.source.path, model, tokenizer, dtype=job.dtype, new_tokens=job.new_tokens,
                                     tolerance=job.tolerance, kv_cache_gib=job.kv_cache_gib)
    if not check["ok"]:
        raise TransactError(vllm.failure_message(check))
    architecture = (prep.config.architectures or ["?"])[0]
    if check["hf_overrides"]:
        architecture = check["hf_overrides"]["architectures"][0]
    return VerifyResult(check | {"model": job.model, "model_dir": prep.source.path, "architecture": architecture,
                                 "kv_cache_gib": job.kv_cache_gib})
