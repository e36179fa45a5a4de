"""Where ``transact run`` and ``transact teach`` lived before they moved to ``transact.jobs.run`` and
``transact.jobs.teach``; their names stay importable from here, with their former signatures."""

from __future__ import annotations

from transact.jobs.run import Run, RunJob, RunResult, check_out
from transact.jobs.run import run as _run
from transact.jobs.teach import TeachJob
from transact.jobs.teach import run as _teach
from transact.recipes import RunRecipe
from transact.recovery.schedule import phase_steps, schedule_of

__all__ = ["Run", "RunResult", "check_out", "phase_steps", "run", "schedule_of", "teach"]


def run(recipe: RunRecipe, *, resume: bool = False, progress: bool = True) -> RunResult:
    """``transact run`` of ``recipe`` (see ``transact.jobs.run``)."""
    return _run(RunJob(recipe, resume, progress))


def teach(recipe: RunRecipe, *, k: int = 64, processes: int = 1, resume: bool = False, progress: bool = True) -> dict:
    """``transact teach`` of ``recipe`` (see ``transact.jobs.teach``); -> teacher.json's content."""
    return _teach(TeachJob(recipe, k, processes, resume, progress))
