"""The jobs behind ``transact eval``, ``bench`` and ``compare``: what a model lost (perplexity, task
accuracy) and what it gained (parameters, KV cache, FLOPs, measured speed and memory).

Every check of the user's input (model paths, task names, texts, output paths) happens before any
weights are loaded. Evaluation results are written after every finished unit (one perplexity setting,
one task), atomically, so an interrupted run resumes from them with ``resume=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from transact.errors import TransactError
from transact.extras import require
from transact.io.files import check_output_dir, check_writable, write_json_atomic
from transact.io.models import ModelSource, load_model, prepare_model, require_tokenizer
from transact.io.text import read_texts, token_stream
from transact.measure import bench, costs, tasks
from transact.measure.perplexity import heldout_perplexity
from transact.recipes import HeldoutText
from transact.version import library_versions

RESULT_FORMAT = 1


def machine() -> dict:
    device = {"device": "cpu"}
    if torch.cuda.is_available():
        device = {"device": "cuda", "gpu": torch.cuda.get_device_name()}
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), **device}


def fingerprint(source: ModelSource) -> str:
    """Identifies a model's files (config and weight file names and sizes) without hashing gigabytes."""
    h = hashlib.sha256(source.spec.encode())
    folder = Path(source.path)
    if source.gguf_file:
        names = [source.gguf_file]
    else:
        names = ["config.json", *sorted(p.name for p in folder.glob("*.safetensors"))]
    for name in names:
        path = folder / name
        if path.is_file():
            h.update(name.encode())
            h.update(str(path.stat().st_size).encode())
            if name == "config.json":
                h.update(path.read_bytes())
    return h.hexdigest()[:16]


def model_label(spec: str, taken: set[str]) -> str:
    """A short unique name for a model in tables and plots: the directory or file name."""
    label = spec.split(":", 1)[1] if spec.startswith("builtin:") else Path(spec.rstrip("/")).name or spec
    base, n = label, 2
    while label in taken:
        label, n = f"{base}-{n}", n + 1
    taken.add(label)
    return label


# ---------------------------------------------------------------- eval

@dataclass(frozen=True)
class EvalJob:
    """Perplexity on held-out texts at one or more window lengths, and lm-eval tasks."""

    model: str
    texts: tuple[str, ...] = ("builtin",)  # empty: no perplexity
    windows: tuple[int, ...] = (1024,)
    tokens: int = HeldoutText.tokens
    stride: int | None = None
    tasks: tuple[str, ...] = ()
    shots: str | int = "default"  # each task's own (5 for MMLU, 0 for the others; the paper's with "paper")
    task_data: str = "offline"  # or "hub": lm-eval's stock tasks with their data from the Hugging Face hub
    limit: int | None = None
    batch_size: int = 8
    out: str | None = None  # JSON result, written after every finished unit
    resume: bool = False
    force: bool = False
    device: str = "cpu"
    dtype: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.texts and not self.tasks:
            raise TransactError("nothing to evaluate: give held-out text for perplexity and/or --tasks")
        if not self.windows or min(self.windows) < 2:
            raise TransactError(f"perplexity windows must be integers >= 2, got {self.windows}")
        if self.tokens < 0 or (self.stride is not None and self.stride < 1):
            raise TransactError("--eval-tokens must be >= 0 and --stride >= 1")
        if self.limit is not None and self.limit < 1:
            raise TransactError(f"--limit must be a positive number of items, got {self.limit}")
        if self.batch_size < 1:
            raise TransactError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.resume and self.force:
            raise TransactError("--resume continues an existing result and --force replaces it; give one")
        if self.resume and not self.out:
            raise TransactError("--resume needs --json OUT: the partial result it continues from")
        self.task_shots()  # bad task names and shot counts are refused before any model is read

    def task_shots(self) -> dict[str, int]:
        """Each task to score, in order, with its number of few-shot examples ({} without tasks)."""
        if not self.tasks:
            return {}
        return tasks.resolve_shots(tasks.parse_tasks(list(self.tasks), self.task_data),
                                   tasks.shots_mode(self.tasks, self.shots))

    def settings(self) -> dict:
        return {"max_tokens": self.tokens, "stride": self.stride, "limit": self.limit, "dtype": self.dtype,
                "task_data": self.task_data}

    def heldout(self, text: str, window: int) -> HeldoutText:
        """The settings of one perplexity (one text at one window); a stride longer than a short window
        is clipped to it."""
        stride = min(self.stride, window) if self.stride else None
        return HeldoutText(text=text, tokens=self.tokens, window=window, stride=stride)


def _ppl_key(text: str, window: int) -> str:
    return f"{text}@{window}"


def _load_previous(job: EvalJob, fp: str) -> dict:
    """The partial result to continue from, or {} for a fresh run; refuses to mix different runs."""
    if not job.out:
        return {}
    path = Path(job.out)
    if path.is_dir():
        raise TransactError(f"--json {path} is a directory; give a file name")
    if not path.exists():
        return {}
    if not job.resume and not job.force:
        raise TransactError(f"{path} exists; pass --resume to continue from its finished parts, or --force to "
                            "replace it")
    if job.force:
        return {}
    try:
        previous = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TransactError(f"cannot resume from {path}: {e}") from None
    settings = {"task_data": "offline", **previous.get("settings", {})}  # results from before the hub option
    if previous.get("fingerprint") != fp or settings != job.settings():
        raise TransactError(f"{path} holds results of another model or other settings; use --force to replace it")
    return previous


def _perplexities(model, tokenizer, job: EvalJob, texts: dict[str, list[str]], result: dict, save) -> None:
    for text, docs in texts.items():
        ids = None
        for window in job.windows:
            key = _ppl_key(text, window)
            if key in result["perplexity"]:
                continue
            if ids is None:
                ids = token_stream(tokenizer, docs, limit=job.tokens or None)
            ppl = heldout_perplexity(model, ids, job.heldout(text, window), progress=job.progress)
            result["perplexity"][key] = {"text": text, "requested_window": window, **ppl.to_json()}
            save()


def _eval_throughput(model: nn.Module, result: dict, batch_size: int) -> None:
    """Evaluation tokens/s against the model's raw forward tokens/s at the evaluation's mean batch shape."""
    done = [t for t in result["tasks"].values() if t.get("tokens")]
    if not done:
        return
    tokens = sum(t["tokens"] for t in done)
    seconds = sum(t["seconds"] for t in done)
    padded = sum(t["padded_tokens"] for t in done)
    calls_len = max(8, round(padded / max(1, sum(t["rows"] for t in done))))
    raw = bench.forward_throughput(model, batch_size, calls_len)
    result["throughput"] = {
        "eval_tokens_per_s": tokens / seconds,
        "raw_forward_tokens_per_s": raw,
        "raw_shape": [batch_size, calls_len],
        "ratio": tokens / seconds / raw,
        "padding_fraction": 1 - tokens / padded,
    }


def run_eval(job: EvalJob) -> dict:
    """Perplexity and task accuracy of one model; returns (and writes to ``job.out``) the result."""
    shots = job.task_shots()
    task_names = list(shots)
    if task_names:
        require("eval", "task accuracy (--tasks)")
    texts = {t: read_texts(t, builtin="heldout") for t in job.texts}
    if job.out:
        check_writable(job.out)
    prep = prepare_model(job.model, job.device, job.dtype)
    fp = fingerprint(prep.source)
    previous = _load_previous(job, fp)
    tokenizer = require_tokenizer(prep.source, "perplexity and tasks")

    model, tokenizer = load_model(prep, tokenizer=tokenizer)
    result = {
        "format": RESULT_FORMAT, "model": job.model, "fingerprint": fp, "settings": job.settings(),
        **bench.static_costs(model), "summary": costs.model_summary(model),
        "perplexity": previous.get("perplexity", {}), "tasks": previous.get("tasks", {}),
        "machine": machine(), "versions": library_versions(),
    }
    resumed = {t: r for t, r in result["tasks"].items() if r.get("shots") == shots.get(t)}

    def save() -> None:
        if job.out:
            write_json_atomic(Path(job.out), result)

    _perplexities(model, tokenizer, job, texts, result, save)
    if task_names:
        def on_result(name: str, task_result: dict) -> None:
            result["tasks"][name] = task_result
            save()

        result["tasks"] = tasks.run_tasks(model, tokenizer, task_names, shots=shots, limit=job.limit,
                                          batch_size=job.batch_size, done=resumed, on_result=on_result,
                                          progress=job.progress, data=job.task_data)
        _eval_throughput(model, result, job.batch_size)
    save()
    return result


# ---------------------------------------------------------------- bench

ENGINES = ("torch", "llama.cpp")


@dataclass(frozen=True)
class BenchJob:
    models: tuple[str, ...]
    grid: bench.BenchGrid = field(default_factory=bench.BenchGrid)
    out: str | None = None  # directory for bench.json (and plots)
    force: bool = False
    device: str = "cpu"
    dtype: str = "auto"
    progress: bool = True
    engine: str = "torch"  # or "llama.cpp"
    outtypes: tuple[str, ...] = ("f16", "q8_0")  # GGUF types a Hugging Face model is converted to (llama.cpp)
    threads: int | None = None  # llama.cpp threads (default: all usable cores)

    def __post_init__(self) -> None:
        if not self.models:
            raise TransactError("bench needs at least one model")
        if self.engine not in ENGINES:
            raise TransactError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.engine == "llama.cpp":
            from transact.deploy.llamacpp import check_outtypes

            check_outtypes(self.outtypes)


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


def run_bench(job: BenchJob) -> dict:
    if job.out:
        check_output_dir(job.out, force=job.force)
        require("plots", "bench --out (its plots)")
    if job.engine == "llama.cpp":
        result = bench_llamacpp(job)
    else:
        loaded = load_models(job.models, job.device, job.dtype)
        result = bench_models({label: m for label, (m, _, _) in loaded.items()}, job.grid, job.progress)
        result["sources"] = {label: spec for label, (_, _, spec) in loaded.items()}
    if job.out:
        from transact.measure import report

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

    from transact.deploy import llamacpp

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
                llamacpp.convert(Path(source.path), path, outtype, progress=job.progress)
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


# ---------------------------------------------------------------- compare

@dataclass(frozen=True)
class CompareJob:
    """Evaluate and benchmark a dense model and its pruned variants; one report for all of them.

    ``eval`` is a template: its ``model`` and ``out`` are replaced for each model.
    """

    models: tuple[str, ...]  # the first is the reference (the dense model)
    out: str
    eval: EvalJob
    grid: bench.BenchGrid = field(default_factory=bench.BenchGrid)
    resume: bool = False
    force: bool = False

    def __post_init__(self) -> None:
        if len(self.models) < 2:
            raise TransactError("compare needs a reference model and at least one other")
        if self.resume and self.force:
            raise TransactError("--resume continues an existing report and --force replaces it; give one")


def run_compare(job: CompareJob) -> Path:
    """Eval every model (results in OUT/eval/<label>.json, resumable), bench them together (OUT/bench.json),
    then write OUT/report.md and the plots. Returns the report's path."""
    from transact.measure import report

    out = Path(job.out)
    if not job.resume:
        check_output_dir(job.out, force=job.force)
    require("plots", "compare (its report plots)")
    if job.eval.tasks:
        require("eval", "task accuracy (--tasks)")
    taken: set[str] = set()
    labels = [model_label(spec, taken) for spec in job.models]
    for spec in job.models:  # every model and its weight files are checked before the first long step
        prepare_model(spec, job.eval.device, job.eval.dtype)
    evals = {}
    for label, spec in zip(labels, job.models, strict=True):
        target = out / "eval" / f"{label}.json"
        resume = job.resume and target.exists()
        evals[label] = run_eval(replace(job.eval, model=spec, out=str(target), resume=resume, force=not resume))
    bench_path = out / "bench.json"
    if job.resume and bench_path.exists():
        bench_result = json.loads(bench_path.read_text())
    else:
        bench_job = BenchJob(models=job.models, grid=job.grid, device=job.eval.device, dtype=job.eval.dtype,
                             progress=job.eval.progress)
        bench_result = run_bench(bench_job)
        write_json_atomic(bench_path, bench_result)
    sources = dict(zip(labels, job.models, strict=True))
    return report.write_report(out, bench_result, evals, sources)
