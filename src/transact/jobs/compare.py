"""``transact compare``: eval and bench of a dense model and its pruned variants, and one report (report.md and
plots) of what each lost and gained."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from transact.deploy.quantize import IMATRIX_AUTO
from transact.errors import TransactError
from transact.extras import require
from transact.io.files import check_output_dir, write_json_atomic
from transact.io.models import prepare_model
from transact.jobs import bench as bench_job
from transact.jobs import eval as eval_job
from transact.measure import bench, report
from transact.measure.records import model_label


@dataclass(frozen=True)
class CompareJob:
    """Evaluate and benchmark a dense model and its pruned variants; one report for all of them.

    ``eval`` is a template: its ``model`` and ``out`` are replaced for each model.
    """

    models: tuple[str, ...]  # the first is the reference (the dense model)
    out: str
    eval: eval_job.EvalJob
    grid: bench.BenchGrid = field(default_factory=bench.BenchGrid)
    resume: bool = False
    force: bool = False
    quantize: tuple[str, ...] = ()  # llama.cpp types every model is also written and measured at (prune or quantize)
    imatrix: str | None = IMATRIX_AUTO  # importance-matrix text of the quantizer's types, as export --imatrix

    def __post_init__(self) -> None:
        if len(self.models) < 2:
            raise TransactError("compare needs a reference model and at least one other")
        if self.resume and self.force:
            raise TransactError("--resume continues an existing report and --force replaces it; give one")
        if self.quantize:
            from transact.deploy.quantize import check_outtypes

            check_outtypes(self.quantize)
            if not self.eval.texts:
                raise TransactError("--quantize compares perplexity at each type: it needs held-out --text")
        from transact.deploy.quantize import names_imatrix_text

        if names_imatrix_text(self.imatrix):
            _check_imatrix(self.imatrix, self.quantize)


def _check_imatrix(text: str, types: tuple[str, ...]) -> None:
    """--imatrix guides llama.cpp's quantizer: at least one --quantize type must be its, and the text must exist."""
    from transact.deploy.quantize import QUANT_TYPES, is_quantized_type
    from transact.io.text import check_source

    if not any(is_quantized_type(t) for t in types):
        raise TransactError(f"--imatrix guides llama.cpp's quantizer; give --quantize one of its types "
                            f"({', '.join(QUANT_TYPES)})")
    check_source(text, builtin="calibration", what="--imatrix text")


@dataclass(frozen=True)
class CompareResult:
    """The report ``transact compare`` wrote (report.md, beside its plots)."""

    report: Path

    def summary(self) -> str:
        return f"wrote {self.report} and plots"


def run(job: CompareJob) -> CompareResult:
    """Eval every model (results in OUT/eval/<label>.json, resumable), bench them together (OUT/bench.json),
    then write OUT/report.md and the plots."""
    out = Path(job.out)
    if not job.resume:
        check_output_dir(job.out, force=job.force)
    require("plots", "compare (its report plots)")
    if job.eval.tasks:
        require("eval", "task accuracy (--tasks)")
    if job.quantize:
        require("gguf", "compare --quantize")
    taken: set[str] = set()
    labels = [model_label(spec, taken) for spec in job.models]
    preps = [prepare_model(spec, job.eval.device, job.eval.dtype) for spec in job.models]  # before any long step
    if job.quantize:
        from transact.deploy import llamacpp

        for prep in preps:
            if prep.source.gguf_file:
                raise TransactError(f"--quantize writes each model as GGUF files: {prep.source.spec} already is one")
            llamacpp.gguf_architecture(prep.config)  # a family llama.cpp cannot take fails here
    evals = {}
    for label, spec in zip(labels, job.models, strict=True):
        target = out / "eval" / f"{label}.json"
        resume = job.resume and target.exists()
        evals[label] = eval_job.run(replace(job.eval, model=spec, out=str(target), resume=resume, force=not resume))
    bench_path = out / "bench.json"
    if job.resume and bench_path.exists():
        bench_result = json.loads(bench_path.read_text())
    else:
        bench_run = bench_job.BenchJob(models=job.models, grid=job.grid, device=job.eval.device,
                                       dtype=job.eval.dtype, progress=job.eval.progress)
        bench_result = bench_job.run(bench_run)
        write_json_atomic(bench_path, bench_result)
    sources = dict(zip(labels, job.models, strict=True))
    sections = []
    if job.quantize:
        from transact.measure import quantized

        configs = {label: prep.config for label, prep in zip(labels, preps, strict=True)}
        sections = quantized.section(out, _quantized(job, out, sources, configs))
    return CompareResult(report.write_report(out, bench_result, evals, sources, sections=sections))


def _quantized(job: CompareJob, out: Path, sources: dict[str, str], configs: dict[str, object]) -> dict:
    """Every model at every ``job.quantize`` type (files in OUT/gguf/, rows in OUT/quantized.json, resumable):
    file bytes, perplexity of the file's weights on the first held-out text and window, the eval's tasks on
    them (if any), llama.cpp decode speed."""
    from transact.deploy.quantize import imatrix_source
    from transact.io.text import read_texts
    from transact.measure import quantized

    path = out / "quantized.json"
    saved = json.loads(path.read_text()) if job.resume and path.exists() else {"rows": []}
    if saved.get("speed_done") and saved.get("imatrix") == job.imatrix and (
            {r["type"] for r in saved["rows"]} == set(job.quantize)):  # finished as asked now
        return saved
    # a row is reused only if its file was written as this compare writes it (with the same importance matrix)
    done = {(r["model"], r["type"]): r for r in saved["rows"]
            if r["type"] in job.quantize and r.get("imatrix") == imatrix_source(job.imatrix, r["type"])}
    text, window = job.eval.texts[0], job.eval.windows[0]
    heldout = job.eval.heldout(text, window)
    folder = out / "gguf"
    folder.mkdir(parents=True, exist_ok=True)

    def save(row: dict) -> None:
        saved["rows"] = [*saved["rows"], row]
        write_json_atomic(path, saved)

    shots = job.eval.task_shots()
    score_tasks = None
    if shots:
        from transact.measure import tasks

        def score_tasks(model, tokenizer) -> dict:
            return tasks.run_tasks(model, tokenizer, list(shots), shots=shots, limit=job.eval.limit,
                                   batch_size=job.eval.batch_size, progress=job.eval.progress, data=job.eval.task_data)

    rows = quantized.file_rows(sources, job.quantize, folder, read_texts(text, builtin="heldout"), heldout,
                               done=done, save=save, progress=job.eval.progress, score_tasks=score_tasks,
                               imatrix=job.imatrix)
    quantized.decode_speeds(rows, configs, folder, repeats=job.grid.repeats, progress=job.eval.progress)
    result = {"rows": rows, "text": text, "window": window, "tokens": job.eval.tokens, "speed_grid":
              quantized.SPEED_GRID | {"repeats": job.grid.repeats}, "reference": next(iter(sources)),
              "speed_done": True, "imatrix": job.imatrix}
    write_json_atomic(path, result)
    return result
