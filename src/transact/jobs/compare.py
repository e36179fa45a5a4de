"""``transact compare``: eval and bench of a dense model and its pruned variants, and one report (report.md and
plots) of what each lost and gained."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

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

    def __post_init__(self) -> None:
        if len(self.models) < 2:
            raise TransactError("compare needs a reference model and at least one other")
        if self.resume and self.force:
            raise TransactError("--resume continues an existing report and --force replaces it; give one")


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
    taken: set[str] = set()
    labels = [model_label(spec, taken) for spec in job.models]
    for spec in job.models:  # every model and its weight files are checked before the first long step
        prepare_model(spec, job.eval.device, job.eval.dtype)
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
    return CompareResult(report.write_report(out, bench_result, evals, sources))
