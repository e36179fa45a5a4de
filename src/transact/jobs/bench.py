"""``transact bench``: parameters, KV cache, FLOPs and measured speed and memory of models, interleaved on one
grid of batch sizes and prompt lengths, in transformers, llama.cpp or vLLM."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from transact.errors import TransactError
from transact.extras import require
from transact.io.files import check_output_dir, write_json_atomic
from transact.io.models import load_model, prepare_model
from transact.measure import bench, report
from transact.measure.records import RESULT_FORMAT, machine, model_label
from transact.version import library_versions

ENGINES = ("torch", "llama.cpp", "vllm")


@dataclass(frozen=True)
class BenchJob:
    models: tuple[str, ...]
    grid: bench.BenchGrid = field(default_factory=bench.BenchGrid)
    out: str | None = None  # directory for bench.json (and plots)
    force: bool = False
    device: str = "cpu"
    dtype: str = "auto"
    progress: bool = True
    engine: str = "torch"  # or "llama.cpp", "vllm"
    outtypes: tuple[str, ...] = ("f16", "q8_0")  # GGUF types a Hugging Face model is converted to (llama.cpp)
    threads: int | None = None  # llama.cpp threads (default: all usable cores)
    kv_cache_gib: int = 1  # vLLM: KV-cache memory of each engine in GiB (VLLM_CPU_KVCACHE_SPACE)

    def __post_init__(self) -> None:
        if not self.models:
            raise TransactError("bench needs at least one model")
        if self.engine not in ENGINES:
            raise TransactError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.engine == "llama.cpp":
            from transact.deploy.quantize import check_outtypes

            check_outtypes(self.outtypes)
        if self.engine == "vllm":
            from transact.deploy.vllm import check_kv_cache_gib

            check_kv_cache_gib(self.kv_cache_gib)


def load_models(specs: tuple[str, ...], device: str, dtype: str) -> dict[str, tuple[nn.Module, object, str]]:
    """{label: (model, tokenizer or None, spec)}; every source is resolved before any weights load."""
    preps = [prepare_model(spec, device, dtype) for spec in specs]
    taken: set[str] = set()
    labels = [model_label(spec, taken) for spec in specs]
    loaded = {}
    for label, spec, prep in zip(labels, specs, preps, strict=True):
        model, tokenizer = load_model(prep)
        loaded[label] = (model, tokenizer, spec)
    return loaded


def bench_models(models: dict[str, nn.Module], grid: bench.BenchGrid, progress: bool) -> dict:
    names = list(models)
    rows = bench.add_ratios(bench.run_grid(models, grid, progress=progress), reference=names[0])
    return {"format": RESULT_FORMAT, "reference": names[0], "grid": asdict(grid),
            "models": {n: bench.static_costs(m) for n, m in models.items()}, "rows": rows,
            "machine": machine(), "versions": library_versions(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


class BenchResult(dict):
    """What ``transact bench`` measured (bench.json); ``summary()`` is the table it prints."""

    out: str | None = None

    def summary(self) -> str:
        text = report.speed_table(self)
        if self.get("engine") == "vllm":
            text += "\n\n" + report.concurrency_table(self)
        return text + (f"\n\nwrote bench.json and plots to {self.out}" if self.out else "")


def run(job: BenchJob) -> BenchResult:
    if job.out:
        check_output_dir(job.out, force=job.force)
        require("plots", "bench --out (its plots)")
    if job.engine == "llama.cpp":
        result = bench_llamacpp(job)
    elif job.engine == "vllm":
        result = bench_vllm(job)
    else:
        loaded = load_models(job.models, job.device, job.dtype)
        result = bench_models({label: m for label, (m, _, _) in loaded.items()}, job.grid, job.progress)
        result["sources"] = {label: spec for label, (_, _, spec) in loaded.items()}
    result = BenchResult(result)
    result.out = job.out
    if job.out:
        write_json_atomic(Path(job.out) / "bench.json", result)
        report.plot_speed(result, Path(job.out) / "speed.png")
        report.plot_speedups(result, Path(job.out) / "speedup.png")
        report.plot_flops(result, Path(job.out) / "flops_vs_context.png")
    return result


def bench_llamacpp(job: BenchJob) -> dict:
    """Every model in llama.cpp: a .gguf file as it is, a Hugging Face model converted to each of
    ``job.outtypes`` (into OUT/gguf/, or a temporary directory without --out). Rows are compared with
    the first model in the same format."""
    import tempfile

    from transact.deploy import llamacpp, quantize

    require("gguf", "bench --engine llama.cpp")
    preps = [prepare_model(spec) for spec in job.models]
    sources, configs = [p.source for p in preps], [p.config for p in preps]
    for source, config in zip(sources, configs, strict=True):
        if not source.gguf_file:
            llamacpp.gguf_architecture(config)  # a model llama.cpp cannot take fails before any conversion
    llamacpp.runtime_version()
    taken: set[str] = set()
    labels = [model_label(spec, taken) for spec in job.models]
    with tempfile.TemporaryDirectory(prefix="transact-bench-") as tmp:
        folder = Path(job.out) / "gguf" if job.out else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        models = []
        for label, source, config in zip(labels, sources, configs, strict=True):
            if source.gguf_file:
                path = Path(source.path) / source.gguf_file
                models.append(bench.GgufModel(label, path, "gguf", config, llamacpp.gguf_summary(path)))
                continue
            for outtype in job.outtypes:
                path = folder / f"{label}.{outtype}.gguf"
                if job.progress:
                    print(f"converting {label} to {outtype} GGUF ...")
                quantize.write_gguf(Path(source.path), path, outtype, threads=job.threads, progress=job.progress)
                models.append(bench.GgufModel(f"{label} {outtype}", path, outtype, config,
                                              llamacpp.gguf_summary(path)))
        rows = bench.run_llamacpp_grid(models, job.grid, threads=job.threads, progress=job.progress)
    references = {next(m.name for m in models if m.format == f) for f in {m.format for m in models}}
    rows = bench.add_ratios(rows, reference=references)
    return {"format": RESULT_FORMAT, "engine": "llama.cpp", "reference": sorted(references), "grid": asdict(job.grid),
            "models": {m.name: bench.gguf_static_costs(m) for m in models}, "rows": rows,
            "machine": machine() | {"llama_cpp_threads": job.threads or llamacpp.default_threads()},
            "versions": library_versions() | {"xllamacpp": llamacpp.runtime_version()},
            "sources": dict(zip(labels, job.models, strict=True)), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def bench_vllm(job: BenchJob) -> dict:
    """Every model (a Hugging Face checkpoint) in vLLM's offline engine, one engine per model in one worker
    process, run interleaved; see ``measure.bench.run_vllm_grid``. Each engine gets ``job.kv_cache_gib`` of
    KV cache, so the sequences it can hold at once (the number servers are sized by) are measured too."""
    from transact.deploy import vllm

    preps = [prepare_model(spec, "cpu", job.dtype) for spec in job.models]
    dtype = vllm.vllm_dtype(preps[0].dtype)
    for prep in preps:
        if prep.source.gguf_file:
            raise TransactError(f"{prep.source.spec}: vLLM runs Hugging Face checkpoints here, not GGUF files")
        if note := vllm.head_size_note(prep.shape) or vllm.refusal(prep.config):
            raise TransactError(f"{prep.source.spec}: {note}")
    python = vllm.worker_python()
    taken: set[str] = set()
    labels = [model_label(spec, taken) for spec in job.models]
    models = {label: bench.VllmModel(label, prep.source.path, prep.config, dtype)
              for label, prep in zip(labels, preps, strict=True)}
    rows, loaded, version = bench.run_vllm_grid(models, job.grid, kv_cache_gib=job.kv_cache_gib, python=python,
                                                progress=job.progress)
    rows = bench.add_ratios(rows, reference=labels[0])
    return {"format": RESULT_FORMAT, "engine": "vllm", "reference": labels[0], "grid": asdict(job.grid),
            "models": loaded,
            "rows": rows, "kv_cache_gib": job.kv_cache_gib,
            "machine": machine() | {"vllm_omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")},
            "versions": {"vllm": version}, "sources": dict(zip(labels, job.models, strict=True)),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
