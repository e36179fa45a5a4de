"""``transact teach``: the dense model's top-k next-token log-probabilities for exactly the training blocks a
distillation recipe's run will consume, written once (``transact.recovery.teacher``) so that ``transact run``
distils from them with no teacher in memory (``training.kd.teacher_logits``)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from transact.arch import get_adapter
from transact.errors import TransactError
from transact.io.models import dtype_name, load_model, prepare_model, require_tokenizer, resolve_device
from transact.io.text import read_texts, token_stream
from transact.recipes import RunRecipe
from transact.recovery import optim
from transact.recovery import teacher as teacher_files
from transact.recovery.data import BlockStream, check_training_data
from transact.recovery.methods import kd as distillation
from transact.recovery.schedule import phase_steps, schedule_of


@dataclass(frozen=True)
class TeachJob:
    recipe: RunRecipe
    k: int = 64  # log-probabilities kept per token (4 + 6k bytes per token on disk)
    processes: int = 1  # processes the run will train on (their batches consume the stream)
    resume: bool = False  # continue writing after the last complete shard
    progress: bool = True


class TeachResult(dict):
    """teacher.json's content; ``path`` is the directory written, ``summary()`` the text ``transact teach``
    prints."""

    path: Path | None = None

    def summary(self) -> str:
        tokens = self["blocks"] * self["stream"]["seq_len"]
        lines = [f"wrote the top {self['k']} log-probabilities of {tokens:,} tokens ({self['blocks']:,} blocks) to "
                 f"{self.path}: {self['bytes_per_token']} bytes per token, "
                 f"{self['bytes_per_token'] * tokens / 2**20:,.1f} MiB",
                 f"teacher probability outside the top {self['k']}: mean {self['tail_mass']['mean']:.4f}, "
                 f"largest {self['tail_mass']['max']:.4f} (training blocks)"]
        if "heldout" in self:
            h = self["heldout"]
            lines.append(f"held-out text ({h['tokens']:,} tokens): mass outside {h['tail_mass']:.4f}, "
                         f"KL(top-k renormalised || full) {h['kl_topk_vs_full']:.4f} nats per token")
        return "\n".join(lines)


def _check(job: TeachJob) -> Path:
    """The directory to write, after the checks that need no model."""
    out, kd = distillation.offline_target(job.recipe.training), distillation.settings(job.recipe.training)
    if out is None:
        raise TransactError("transact teach writes the teacher logits of a distillation recipe: set "
                            "training.method: kd and training.kd.teacher_logits: DIR")
    if job.k < 1 or (kd.top_k and kd.top_k != job.k):
        raise TransactError(f"--k must be at least 1 and equal training.kd.top_k where that is set, got {job.k}")
    if job.processes < 1:
        raise TransactError(f"--processes must be at least 1, got {job.processes}")
    return out


def run(job: TeachJob) -> TeachResult:
    """Write the dense model's top-``k`` next-token log-probabilities for every block the run of the recipe
    (on ``processes`` processes) will train on, into its ``training.kd.teacher_logits``; measure the
    truncation on the held-out text."""
    recipe, k = job.recipe, job.k
    training, out = recipe.training, _check(job)
    weights, _ = optim.resolve(training, resolve_device(recipe.device))
    prep = prepare_model(recipe.model, recipe.device, dtype_name(weights))
    vocab = prep.shape.vocab_size
    if k > vocab:
        raise TransactError(f"--k {k} exceeds the vocabulary ({vocab:,} tokens)")
    steps = phase_steps(training, len(schedule_of(recipe, prep.shape)), job.processes)
    blocks = teacher_files.blocks_needed(steps, training, job.processes)
    if not blocks:
        raise TransactError("the recipe trains nothing (tokens_per_shot and final_tokens are 0)")
    check_training_data(training.data)
    header = {"teacher": recipe.model, "k": k, "stream": teacher_files.stream_settings(training),
              "vocab_size": vocab, "processes": job.processes, "dtype": dtype_name(prep.dtype)}
    done = teacher_files.resume_point(out, header, job.resume)  # before any weights load
    tokenizer = require_tokenizer(prep.source, "the training stream")
    model, _ = load_model(prep, tokenizer=tokenizer)
    head = partial(get_adapter(model).lm_logits, model)
    chunk = distillation.distill_chunk(model, distillation.settings(training))
    stream = BlockStream(tokenizer, training.data, training.seq_len, training.seed, training.shuffle_buffer)
    meta = TeachResult(teacher_files.write(model, head, stream, out=out, blocks=blocks, k=k,
                                           batch_size=training.batch_size, chunk=chunk, header=header,
                                           done_shards=done, progress=job.progress))
    if recipe.heldout.tokens:
        ids = token_stream(tokenizer, read_texts(recipe.heldout.text, builtin="heldout"), limit=recipe.heldout.tokens)
        meta["heldout"] = teacher_files.truncation_cost(model, head, ids, recipe.heldout.window, k, chunk)
    teacher_files.finish(out, meta)
    meta.path = out
    return meta
