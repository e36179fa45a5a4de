"""``transact eval``: perplexity on held-out texts at one or more window lengths, and lm-eval task accuracy, of
one model.

Every check of the user's input (model path, task names, texts, output path) happens before any weights are
loaded. The result is written after every finished unit (one perplexity setting, one task), atomically, so an
interrupted run resumes from it with ``resume=True``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from transact.errors import TransactError
from transact.extras import require
from transact.io.files import check_writable, write_json_atomic
from transact.io.models import load_model, prepare_model, require_tokenizer
from transact.io.text import read_texts, token_stream
from transact.measure import bench, costs, tasks
from transact.measure.perplexity import heldout_perplexity
from transact.measure.records import RESULT_FORMAT, fingerprint, machine
from transact.recipes import HeldoutText
from transact.version import library_versions


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


class EvalResult(dict):
    """What ``transact eval`` measured (the JSON it writes); ``summary()`` is the text it prints."""

    out: str | None = None

    def summary(self) -> str:
        lines = [f"perplexity {ppl['perplexity']:.3f} over {ppl['tokens']} tokens (window {ppl['window']}, stride "
                 f"{ppl['stride']}, text: {ppl['text']})" for ppl in self["perplexity"].values()]
        for name, r in self["tasks"].items():
            score = "-" if r["score"] is None else f"{r['score']:.4f} ± {r['stderr'] or 0:.4f}"
            lines.append(f"{name:<15} {r['metric']:<12} {score}  ({r['items']} items, {r['shots']}-shot, "
                         f"{r['tokens_per_second'] or 0:.0f} tokens/s)")
            for category, part in r.get("categories", {}).items():  # MMLU's, as lm-eval aggregates them
                lines.append(f"  {category:<15} {r['metric']:<12} {part['score']:.4f}")
        if "throughput" in self:
            t = self["throughput"]
            lines.append(f"evaluation {t['eval_tokens_per_s']:.0f} tokens/s = {t['ratio']:.0%} of the raw forward "
                         f"{t['raw_forward_tokens_per_s']:.0f} tokens/s (batch x length {t['raw_shape']})")
        if self.out:
            lines.append(f"wrote {self.out}")
        return "\n".join(lines)


def run(job: EvalJob) -> EvalResult:
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
    result = EvalResult({
        "format": RESULT_FORMAT, "model": job.model, "fingerprint": fp, "settings": job.settings(),
        **bench.static_costs(model), "summary": costs.model_summary(model),
        "perplexity": previous.get("perplexity", {}), "tasks": previous.get("tasks", {}),
        "machine": machine(), "versions": library_versions(),
    })
    result.out = job.out
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
