"""Where the jobs behind ``transact eval``, ``bench`` and ``compare`` lived before they moved to
``transact.jobs.eval``, ``transact.jobs.bench`` and ``transact.jobs.compare``; their names stay importable
from here, with the results they returned (``run_compare``: the report's path)."""

from __future__ import annotations

from pathlib import Path

from transact.jobs.bench import ENGINES, BenchJob, bench_llamacpp, bench_models, load_models
from transact.jobs.bench import run as run_bench
from transact.jobs.compare import CompareJob
from transact.jobs.compare import run as _compare
from transact.jobs.eval import EvalJob
from transact.jobs.eval import run as run_eval
from transact.measure.records import RESULT_FORMAT, fingerprint, machine, model_label

__all__ = ["ENGINES", "RESULT_FORMAT", "BenchJob", "CompareJob", "EvalJob", "bench_llamacpp", "bench_models",
           "fingerprint", "load_models", "machine", "model_label", "run_bench", "run_compare", "run_eval"]


def run_compare(job: CompareJob) -> Path:
    """``transact compare``; -> the report's path."""
    return _compare(job).report
