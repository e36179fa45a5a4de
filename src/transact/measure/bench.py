"""Measured speed and memory of one or more models over a batch × context grid.

Every grid point runs all models back to back (their order rotated on each repeat), so that slow drifts
of the machine (thermal state, other processes) hit every model alike and the ratios stay fair. Each
measurement is a prefill of ``batch × context`` random tokens followed by ``gen`` greedy decode steps
with the KV cache, timed separately; end-to-end latency is their sum. Times are medians over repeats.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on Linux CPUs the process's peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs``) above what it held before the measurement. On CPU
that is only what the allocator had to add: memory it kept from earlier runs is reused without showing,
so later or smaller runs often read 0. CUDA figures are exact allocations.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from transact.arch import shape_of
from transact.errors import TransactError
from transact.measure import costs

FLOP_CONTEXTS = (256, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class BenchGrid:
    batches: tuple[int, ...] = (1, 4)
    contexts: tuple[int, ...] = (256, 1024)
    gen: int = 32
    repeats: int = 3
    warmup: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.batches or not self.contexts or min(self.batches) < 1 or min(self.contexts) < 1:
            raise TransactError("bench: batch sizes and context lengths must be positive integers")
        if self.gen < 1 or self.repeats < 1 or self.warmup < 0:
            raise TransactError("bench: --gen and --repeats must be >= 1, --warmup >= 0")


def parse_int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise TransactError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise TransactError(f"{what}: expected positive integers, got {text!r}")
    return values


class _PeakMemory:
    """Peak memory above the starting point while the block runs (bytes), or None where unknown."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak: int | None = None

    @staticmethod
    def _status_kb(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise OSError(field)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
                self._start = self._status_kb("VmRSS")
            except OSError:
                self._start = None
        return self

    def __exit__(self, *exc):
        if self._start is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self.peak = self._status_kb("VmHWM") - self._start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_once(model: nn.Module, ids: torch.Tensor, gen: int) -> dict:
    """Prefill ``ids`` (B, T), then ``gen`` greedy decode steps with the KV cache; returns the times, the
    peak memory and the ``gen + 1`` greedy tokens (B, gen + 1)."""
    from transformers import DynamicCache

    device = ids.device
    cache = DynamicCache(config=model.config)
    with _PeakMemory(device) as mem:
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
        _sync(device)
        t1 = time.perf_counter()
        for _ in range(gen):
            out = model(input_ids=tokens[-1], past_key_values=cache, use_cache=True)
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
        _sync(device)
        t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "peak_bytes": mem.peak, "tokens": torch.cat(tokens, 1)}


def analytic(model: nn.Module, batch: int, context: int, gen: int) -> dict:
    """Costs a measurement should track: prefill FLOPs, and bytes a decode step must read (every weight
    once, in a mixture of experts only the experts the batch is routed to, and each sequence's KV cache at
    its mean length during the decode)."""
    shape = shape_of(model)
    kv = costs.kv_cache_bytes_per_token(shape, next(model.parameters()).dtype)
    return {
        "prefill_flops": costs.prefill_flops(shape, context),
        "decode_bytes_per_step": costs.decode_weight_bytes(model, batch) + batch * kv * (context + gen // 2),
    }


def _interleaved(names: list[str], grid: BenchGrid, bar, measure: Callable[[str, int, int, int], dict]) -> list[dict]:
    """Every grid point with all models back to back, their order rotated on each repeat (so slow drifts of
    the machine hit every model alike); ``measure(name, batch, context, repeat)`` is one run. Warm-up runs
    are dropped. -> one (name, batch, context, samples) per model and point, in grid order."""
    points = []
    for batch, context in [(b, c) for b in grid.batches for c in grid.contexts]:
        samples: dict[str, list[dict]] = {n: [] for n in names}
        for rep in range(grid.warmup + grid.repeats):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                result = measure(name, batch, context, rep)
                if rep >= grid.warmup:
                    samples[name].append(result)
                bar.update()
        points += [(name, batch, context, samples[name]) for name in names]
    return points


def _bar(grid: BenchGrid, models: int, desc: str, progress: bool):
    runs = len(grid.batches) * len(grid.contexts) * (grid.warmup + grid.repeats) * models
    return tqdm(total=runs, desc=desc, unit="run", disable=not progress)


def _random_prompts(vocab_size: int, batch: int, context: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, context), generator=torch.Generator().manual_seed(seed))


def run_grid(models: dict[str, nn.Module], grid: BenchGrid, *, progress: bool = True) -> list[dict]:
    """One row per (model, batch, context): medians of prefill/decode throughput, latency and peak memory."""
    def measure(name: str, batch: int, context: int, rep: int) -> dict:
        model = models[name]
        ids = _random_prompts(shape_of(model).vocab_size, batch, context, grid.seed + rep)
        return measure_once(model, ids.to(next(model.parameters()).device), grid.gen)

    bar = _bar(grid, len(models), "bench", progress)
    points = _interleaved(list(models), grid, bar, measure)
    bar.close()
    return [_row(name, models[name], batch, context, grid.gen, samples) for name, batch, context, samples in points]


def _row(name: str, model: nn.Module, batch: int, context: int, gen: int, samples: list[dict]) -> dict:
    return _timing_row(name, batch, context, gen, samples) | analytic(model, batch, context, gen)


def _timing_row(name: str, batch: int, context: int, gen: int, samples: list[dict]) -> dict:
    prefill = statistics.median(s["prefill_s"] for s in samples)
    decode = statistics.median(s["decode_s"] for s in samples)
    latency = statistics.median(s["prefill_s"] + s["decode_s"] for s in samples)
    peaks = [s["peak_bytes"] for s in samples if s["peak_bytes"] is not None]
    return {
        "model": name,
        "batch": batch,
        "context": context,
        "gen": gen,
        "prefill_tokens_per_s": batch * context / prefill,
        "decode_tokens_per_s": batch * gen / decode,
        "latency_s": latency,
        "peak_memory_bytes": max(peaks) if peaks else None,
        "repeats": len(samples),
    }


def add_ratios(rows: list[dict], reference: str | set[str]) -> list[dict]:
    """Speedups of every row against the reference model's row at the same grid point (and the same
    file format, for llama.cpp rows), next to the analytic ratios (FLOPs for prefill, bytes read per
    step for decode). ``reference`` names the reference model, or one per format."""
    refs = {reference} if isinstance(reference, str) else set(reference)
    ref = {(r.get("format"), r["batch"], r["context"]): r for r in rows if r["model"] in refs}
    for r in rows:
        base = ref[(r.get("format"), r["batch"], r["context"])]
        r["prefill_speedup"] = r["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
        r["decode_speedup"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        r["latency_speedup"] = base["latency_s"] / r["latency_s"]
        r["prefill_speedup_analytic"] = base["prefill_flops"] / r["prefill_flops"]
        r["decode_speedup_analytic"] = base["decode_bytes_per_step"] / r["decode_bytes_per_step"]
    return rows


def static_costs(model: nn.Module, contexts: tuple[int, ...] = FLOP_CONTEXTS) -> dict:
    """Parameters, weight bytes, KV cache per token and forward FLOPs per context length."""
    summary = costs.model_summary(model)
    return {
        "params": summary["params"],
        "weight_bytes": costs.weight_bytes(model),
        "dtype": summary["dtype"],
        "kv_cache_bytes_per_token": summary["kv_cache_bytes_per_token"],
        "forward_flops": {str(c): costs.forward_flops(shape_of(model), c) for c in contexts},
    }


@torch.inference_mode()
def forward_throughput(model: nn.Module, batch: int, seq_len: int, repeats: int = 3) -> float:
    """Raw forward tokens/s (no cache, full logits) at one shape: the ceiling an evaluation can reach."""
    device = next(model.parameters()).device
    ids = _random_prompts(shape_of(model).vocab_size, batch, seq_len, 0).to(device)
    times = []
    for rep in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        _sync(device)
        if rep:
            times.append(time.perf_counter() - t0)
    return batch * seq_len / statistics.median(times)


# ---------------------------------------------------------------- llama.cpp


# llama.cpp keeps its KV cache in f16 unless told otherwise.
LLAMACPP_KV_DTYPE = torch.float16


@dataclass(frozen=True)
class GgufModel:
    """One GGUF file in a llama.cpp bench: its row name, format, the HF config it was made from (for FLOPs
    and the KV cache) and ``llamacpp.gguf_summary`` of the file."""

    name: str
    path: Path
    format: str
    config: object  # transformers PretrainedConfig
    summary: dict


def gguf_analytic(model: GgufModel, batch: int, context: int, gen: int) -> dict:
    """As ``analytic``, for llama.cpp: the weights as the file stores them (quantized bytes), and the
    KV cache in llama.cpp's dtype; of a mixture of experts only the experts the batch is routed to."""
    shape = shape_of(model.config)
    kv = costs.kv_cache_bytes_per_token(shape, LLAMACPP_KV_DTYPE)
    idle = round(model.summary.get("expert_bytes", 0) * (1 - costs.experts_read(shape, batch)))
    return {
        "prefill_flops": costs.prefill_flops(shape, context),
        "decode_bytes_per_step": model.summary["bytes_per_decode_step"] - idle + batch * kv * (context + gen // 2),
    }


def gguf_static_costs(model: GgufModel, contexts: tuple[int, ...] = FLOP_CONTEXTS) -> dict:
    """As ``static_costs``, for a GGUF file."""
    return {
        "format": model.format,
        "architecture": model.summary["architecture"],
        "file_bytes": model.summary["file_bytes"],
        "bytes_per_decode_step": model.summary["bytes_per_decode_step"],
        "kv_cache_bytes_per_token": costs.kv_cache_bytes_per_token(shape_of(model.config), LLAMACPP_KV_DTYPE),
        "forward_flops": {str(c): costs.forward_flops(shape_of(model.config), c) for c in contexts},
    }


def run_llamacpp_grid(models: list[GgufModel], grid: BenchGrid, *, threads: int | None = None,
                      progress: bool = True) -> list[dict]:
    """``run_grid`` in llama.cpp: all models loaded at once, each with a slot per sequence of the largest
    batch, run interleaved; see ``_llamacpp_once`` for how a run is timed. Latency is the wall time."""
    from transact.deploy import llamacpp

    by_name = {m.name: m for m in models}
    context = max(grid.contexts) + grid.gen + 8
    bar = _bar(grid, len(models), "bench llama.cpp", progress)
    with llamacpp.runtimes({m.name: m.path for m in models}, context=context, slots=max(grid.batches),
                           threads=threads) as loaded:
        def measure(name: str, batch: int, ctx: int, rep: int) -> dict:
            vocab = shape_of(by_name[name].config).vocab_size
            return _llamacpp_once(loaded[name], _random_prompts(vocab, batch, ctx, grid.seed + rep).tolist(), grid.gen)

        points = _interleaved([m.name for m in models], grid, bar, measure)
    bar.close()
    rows = []
    for name, batch, ctx, samples in points:
        m = by_name[name]
        row = _timing_row(name, batch, ctx, grid.gen, samples)
        rows.append(row | {"format": m.format, "latency_s": statistics.median(s["wall_s"] for s in samples)}
                    | gguf_analytic(m, batch, ctx, grid.gen))
    return rows


def _llamacpp_once(runtime, prompts: list[list[int]], gen: int) -> dict:
    """One measurement. A single sequence is timed by llama.cpp itself (prompt and generation phases).
    For a batch, llama.cpp reports one sequence's phases only, which overlap the others' work, so the
    batch is timed from outside: one request for the prompts plus one token (prefill), another for the
    prompts plus ``gen + 1`` tokens; decode is the difference."""
    if len(prompts) == 1:
        t0 = time.perf_counter()
        timings = runtime.complete(prompts[0], gen)["timings"]
        wall = time.perf_counter() - t0
        if timings["prompt_n"] != len(prompts[0]) or timings["predicted_n"] != gen:
            raise TransactError("llama.cpp did not process the whole prompt or stopped early")
        return {"prefill_s": timings["prompt_ms"] / 1e3, "decode_s": timings["predicted_ms"] / 1e3,
                "peak_bytes": None, "wall_s": wall}
    prefill = runtime.complete_batch(prompts, 1)
    total = runtime.complete_batch(prompts, gen + 1)
    return {"prefill_s": prefill, "decode_s": max(total - prefill, 1e-9), "peak_bytes": None, "wall_s": total}


# ---------------------------------------------------------------- vLLM


@dataclass(frozen=True)
class VllmModel:
    """One checkpoint in a vLLM bench: its row name, directory, HF config and the dtype vLLM computes in."""

    name: str
    path: str
    config: object  # transformers PretrainedConfig
    dtype: str  # "float32" or "bfloat16"


def _meta_model(config, dtype: str) -> nn.Module:
    """The model's modules on the meta device: parameter counts and bytes without reading any weight."""
    from transact.arch import get_adapter

    with torch.device("meta"):
        return get_adapter(config).model_class().from_config(config, dtype=getattr(torch, dtype))


def run_vllm_grid(models: dict[str, VllmModel], grid: BenchGrid, *, kv_cache_gib: int, python: str | None = None,
                  progress: bool = True) -> tuple[list[dict], dict[str, dict], str]:
    """``run_grid`` in vLLM: one engine per model (each with ``kv_cache_gib`` of KV cache and room for the
    largest batch and context), run interleaved. A point is timed as for a llama.cpp batch: one request for
    the prompts plus one token (prefill), another for the prompts plus ``gen + 1`` tokens; decode is the
    difference. Prefix caching is off, so the second request computes its prefill again.
    -> (rows, {name: ``static_costs`` from its config (in vLLM's dtype) and what its engine reported at load:
    KV-cache tokens, load time}, vLLM's version)."""
    from transact.deploy import vllm
    from transact.io.models import load_tokenizer, resolve_source

    max_len = max(grid.contexts) + grid.gen + 8
    metas = {name: _meta_model(m.config, m.dtype) for name, m in models.items()}  # before the long part
    with vllm.Runtime(kv_cache_gib=kv_cache_gib, python=python) as runtime:
        loaded, vocab = {}, {}
        for name, m in models.items():
            if progress:
                print(f"loading {name} in vLLM ...", flush=True)
            loaded[name] = static_costs(metas[name]) | runtime.load(
                name, m.path, dtype=m.dtype, max_model_len=max_len, max_num_seqs=max(grid.batches),
                hf_overrides=vllm.serve_overrides(m.config))
            # prompts drawn from ids the tokenizer knows: vLLM refuses ids past it (Qwen2's embedding is larger)
            tokenizer = load_tokenizer(resolve_source(m.path))
            vocab[name] = min(shape_of(m.config).vocab_size, len(tokenizer) if tokenizer else 10**9)

        def measure(name: str, batch: int, ctx: int, rep: int) -> dict:
            prompts = _random_prompts(vocab[name], batch, ctx, grid.seed + rep).tolist()
            prefill = runtime.generate(name, prompts, 1)["wall_s"]
            total = runtime.generate(name, prompts, grid.gen + 1)["wall_s"]
            return {"prefill_s": prefill, "decode_s": max(total - prefill, 1e-9), "peak_bytes": None, "wall_s": total}

        bar = _bar(grid, len(models), "bench vLLM", progress)
        points = _interleaved(list(models), grid, bar, measure)
        bar.close()
    rows = []
    for name, batch, ctx, samples in points:
        kv_tokens = loaded[name]["kv_cache_tokens"]
        rows.append(_timing_row(name, batch, ctx, grid.gen, samples)
                    | {"latency_s": statistics.median(s["wall_s"] for s in samples),
                       "concurrent_sequences": kv_tokens // (ctx + grid.gen) if kv_tokens else None}
                    | analytic(metas[name], batch, ctx, grid.gen))
    return rows, loaded, runtime.version
