"""vLLM in a process of its own, driven by JSON lines (``transact.deploy.vllm.Runtime`` starts it).

It runs in whichever Python has vLLM (its CPU build pins its own torch and transformers, so it usually lives
in a virtual environment of its own), and therefore imports nothing of transact: only the standard library
and vLLM. One request per line on stdin, one answer per line on the protocol pipe (the process's original
stdout; everything vLLM prints goes to stderr):

- ``{"op": "load", "name": N, "model": DIR, "dtype": "float32", "max_model_len": L, "max_num_seqs": S,
  "hf_overrides": {...} or null}``
  -> ``{"kv_cache_tokens": T, "block_size": B, "load_s": s, "version": v}``
- ``{"op": "generate", "name": N, "prompts": [[ids], ...], "max_tokens": K, "logprobs": true}``
  -> ``{"tokens": [[ids], ...], "logprobs": [[float, ...], ...] or null, "wall_s": s}`` (greedy, going on
  past end-of-sequence, so every prompt gets exactly K tokens; ``min_tokens`` would do that by masking the
  end-of-sequence token, which changes the greedy choice)
- ``{"op": "exit"}``

An error answers ``{"error": "Type: message"}`` and the worker goes on.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

# Run as a script, this file's directory (transact/deploy, which holds transact's own vllm.py) comes first on
# sys.path and would shadow the vllm package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


def _protocol_pipe():
    """The original stdout as the answer channel; file descriptor 1 becomes stderr, so that whatever vLLM
    or its workers print cannot corrupt an answer."""
    pipe = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return pipe


def _kv_cache(llm) -> tuple[int | None, int | None]:
    """(KV-cache tokens the engine allocated, its block size): what decides how many sequences run at once."""
    config = llm.llm_engine.vllm_config.cache_config
    blocks = getattr(config, "num_gpu_blocks", None)
    if blocks is None:  # the engine core ran in another process; its figure came back in the engine's stats
        blocks = getattr(getattr(llm.llm_engine, "engine_core", None), "num_gpu_blocks", None)
    return (blocks * config.block_size if blocks else None), config.block_size


class Worker:
    def __init__(self):
        self.engines = {}

    def load(self, name: str, model: str, dtype: str, max_model_len: int, max_num_seqs: int,
             hf_overrides: dict | None = None) -> dict:
        import vllm

        t0 = time.perf_counter()
        # a checkpoint that brings its own configuration and modeling code (transact's DeciLM layout for
        # per-layer widths names them in auto_map) is read with it
        config = Path(model) / "config.json"
        own_code = config.is_file() and "auto_map" in json.loads(config.read_text())
        llm = vllm.LLM(model=model, dtype=dtype, enforce_eager=True, max_model_len=max_model_len,
                       max_num_seqs=max_num_seqs, enable_prefix_caching=False, seed=0, hf_overrides=hf_overrides,
                       trust_remote_code=own_code)
        self.engines[name] = llm
        tokens, block = _kv_cache(llm)
        return {"kv_cache_tokens": tokens, "block_size": block, "load_s": time.perf_counter() - t0,
                "version": vllm.__version__}

    def generate(self, name: str, prompts: list[list[int]], max_tokens: int, logprobs: bool) -> dict:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                logprobs=1 if logprobs else None)
        inputs = [{"prompt_token_ids": list(p)} for p in prompts]
        t0 = time.perf_counter()
        outputs = self.engines[name].generate(inputs, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        picked = None
        if logprobs:
            picked = [[step[token].logprob for token, step in zip(ids, o.outputs[0].logprobs, strict=True)]
                      for ids, o in zip(tokens, outputs, strict=True)]
        return {"tokens": tokens, "logprobs": picked, "wall_s": wall}

    def handle(self, request: dict) -> dict:
        op = request.pop("op")
        if op == "load":
            return self.load(**request)
        if op == "generate":
            return self.generate(**request)
        raise ValueError(f"unknown op {op!r}")


def main() -> None:
    pipe = _protocol_pipe()
    worker = Worker()
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") == "exit":
            break
        try:
            answer = worker.handle(request)
        except Exception as e:  # every failure goes back to the caller, which decides what it means
            answer = {"error": f"{type(e).__name__}: {e}"}
        pipe.write(json.dumps(answer) + "\n")
    pipe.close()


if __name__ == "__main__":  # vLLM starts its engine with spawn, which re-imports the main module
    main()
