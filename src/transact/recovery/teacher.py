"""The offline teacher: a teacher's top-k next-token log-probabilities for exactly the training blocks a
``transact run`` recipe will consume, written once by ``transact teach`` so that distillation
(``training.kd.teacher_logits``) runs without the teacher in memory.

A teacher directory holds:

- ``teacher.json``: the format, the teacher, ``k``, the training stream it follows (data, seq_len, seed,
  shuffle_buffer), ``blocks`` written, the vocabulary size, the shard files, bytes per token, and the
  truncation's cost: the teacher's probability outside its top k (mean and largest over every position
  written) and, on the recipe's held-out text, the mean KL(top-k renormalised || full) = -log(top-k mass).
- ``shard-NNNNN.safetensors`` (``SHARD_BLOCKS`` blocks each): ``ids`` (n, L) int32, the blocks themselves
  (a run checks them against its own stream); ``indices`` (n, L, k) int32, the k most likely next tokens by
  descending probability; ``logprobs`` (n, L, k) float16, their log-probabilities over the full vocabulary
  at temperature 1 (absolute rounding error at most 2^-11 |log p|).

Bytes per token: 4 + 6k (388 at k = 64), where fp16 full logits would take 2 x vocabulary (303,872 at
151,936). Shards are written whole and renamed into place, so ``--resume`` after a kill continues after
the last complete shard.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from transact.errors import TransactError
from transact.io.files import write_json_atomic
from transact.recovery.chunked import final_hidden, teacher_topk

TEACHER_FORMAT = 1
SHARD_BLOCKS = 256
STREAM_KEYS = ("data", "seq_len", "seed", "shuffle_buffer")  # what fixes the sequence of training blocks


def bytes_per_token(k: int) -> int:
    """Disk bytes per token: its id (int32), k indices (int32) and k log-probabilities (fp16)."""
    return 4 + 6 * k


def blocks_needed(steps_per_phase: list[int], training, processes: int) -> int:
    """Training blocks a run consumes: every optimizer step takes batch_size x grad_accum blocks per process."""
    return sum(steps_per_phase) * training.batch_size * training.grad_accum * processes


def stream_settings(training) -> dict:
    return {key: getattr(training, key) for key in STREAM_KEYS}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


# ---------------------------------------------------------------- reading

@dataclass
class OfflineTeacher:
    """A teacher directory opened for reading; ``topk`` gives the rows of given global block positions."""

    path: Path
    meta: dict

    @classmethod
    def open(cls, path: str | Path) -> OfflineTeacher:
        where = Path(path).expanduser()
        meta_file = where / "teacher.json"
        if not meta_file.is_file():
            partial = " (its writing has not finished: transact teach ... --resume)" if (
                where / "progress.json").is_file() else ""
            raise TransactError(f"training.kd.teacher_logits: {where} holds no teacher.json{partial}; "
                                "write it with transact teach RECIPE")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != TEACHER_FORMAT:
            raise TransactError(f"{meta_file} was written by another version of transact (format "
                                f"{meta.get('format')})")
        for shard in meta["shards"]:
            if not (where / shard["file"]).is_file():
                raise TransactError(f"training.kd.teacher_logits: {where / shard['file']} is missing")
        return cls(where, meta)

    @property
    def k(self) -> int:
        return self.meta["k"]

    def check(self, training, blocks: int, vocab_size: int) -> None:
        """Refuse, before any weights load, logits that do not follow this run's training stream, are too few
        for it, or come from another vocabulary."""
        mine = stream_settings(training)
        theirs = self.meta["stream"]
        differ = [f"{key} {theirs.get(key)!r} (the recipe: {mine[key]!r})" for key in STREAM_KEYS
                  if theirs.get(key) != mine[key]]
        if differ:
            raise TransactError(f"training.kd.teacher_logits: {self.path} follows another training stream: "
                                f"{'; '.join(differ)}")
        if self.meta["blocks"] < blocks:
            raise TransactError(f"training.kd.teacher_logits: {self.path} holds {self.meta['blocks']:,} blocks, the "
                                f"run needs {blocks:,}; write them with transact teach for this recipe")
        if self.meta["vocab_size"] != vocab_size:
            raise TransactError(f"training.kd.teacher_logits: {self.path} has a vocabulary of "
                                f"{self.meta['vocab_size']:,} tokens, the model {vocab_size:,}")
        top_k = training.settings_of("kd").top_k
        if top_k and top_k != self.k:
            raise TransactError(f"training.kd.top_k is {top_k}, but {self.path} holds the top "
                                f"{self.k}; leave top_k at 0 or set it to {self.k}")

    def topk(self, positions: list[int], ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored top-k of the blocks at global ``positions`` -> (indices (B, L, k) int64, log-probabilities
        (B, L, k) fp16); ``ids`` (B, L) must equal the stored blocks."""
        by_shard: dict[int, list[int]] = {}  # positions ascend, so shards and rows come out in their order
        for position in positions:
            shard, row = divmod(position, self.meta["shard_blocks"])
            by_shard.setdefault(shard, []).append(row)
        parts = [self._rows(shard, rows) for shard, rows in by_shard.items()]
        stored, indices, logprobs = (torch.cat([part[i] for part in parts]) for i in range(3))
        if not torch.equal(stored.long(), ids.cpu()):
            raise TransactError(f"training.kd.teacher_logits: the blocks at positions {positions[0]}.. differ from "
                                "the run's: the logits were written from other data or another tokenizer")
        return indices.long(), logprobs

    def _rows(self, shard: int, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, indices, logprobs) of ``rows`` of one shard, read in one opening of its file."""
        with safe_open(str(self.path / shard_name(shard)), framework="pt") as f:
            return tuple(torch.stack([f.get_slice(name)[row] for row in rows])
                         for name in ("ids", "indices", "logprobs"))


# ---------------------------------------------------------------- writing

def write(model: torch.nn.Module, head, stream, *, out: Path, blocks: int, k: int, batch_size: int, chunk: int,
          header: dict, done_shards: int, progress: bool = True) -> dict:
    """Write the top-k of ``model`` for the first ``blocks`` blocks of ``stream`` (a fresh BlockStream with
    one process) into ``out``, after the ``done_shards`` already there (``resume_point``); -> teacher.json's
    content (``finish`` writes it). ``head``: final hidden states (N, H) -> logits (N, V); ``header``: the
    keys teacher.json starts with."""
    progress_file = out / "progress.json"
    shards = math.ceil(blocks / SHARD_BLOCKS)
    tail = json.loads(progress_file.read_text())["tail"] if done_shards else {"sum": 0.0, "max": 0.0, "tokens": 0}
    bar = tqdm(total=blocks, initial=min(blocks, done_shards * SHARD_BLOCKS), desc="teacher top-k", unit="block",
               disable=not progress)
    for _ in range(done_shards * SHARD_BLOCKS):  # skip what the finished shards hold
        stream.take(1)
    model.eval()
    device = next(model.parameters()).device
    for shard in range(done_shards, shards):
        count = min(SHARD_BLOCKS, blocks - shard * SHARD_BLOCKS)
        ids_all, indices_all, logprobs_all = [], [], []
        for start in range(0, count, batch_size):
            ids = stream.take(min(batch_size, count - start))  # (b, L)
            with torch.no_grad():
                hidden = final_hidden(model, ids.to(device))  # (b, L, H)
            b, length, _ = hidden.shape
            indices, logprobs, tail_sum = teacher_topk(hidden.reshape(b * length, -1), head, k, chunk)
            tail["sum"] += tail_sum
            tail["max"] = max(tail["max"], 1.0 - logprobs.float().exp().sum(-1).min().item())
            tail["tokens"] += b * length
            ids_all.append(ids.int())
            indices_all.append(indices.reshape(b, length, k).int().cpu())
            logprobs_all.append(logprobs.reshape(b, length, k).cpu())
            bar.update(b)
        tmp = out / f".{shard_name(shard)}.tmp"
        save_file({"ids": torch.cat(ids_all), "indices": torch.cat(indices_all), "logprobs": torch.cat(logprobs_all)},
                  str(tmp))
        os.replace(tmp, out / shard_name(shard))
        write_json_atomic(progress_file, {"header": header, "shards": shard + 1, "tail": tail})
    bar.close()
    meta = {"format": TEACHER_FORMAT, **header, "blocks": blocks, "shard_blocks": SHARD_BLOCKS,
            "shards": [{"file": shard_name(i), "blocks": min(SHARD_BLOCKS, blocks - i * SHARD_BLOCKS)}
                       for i in range(shards)],
            "bytes_per_token": bytes_per_token(k),
            "tail_mass": {"mean": tail["sum"] / max(1, tail["tokens"]), "max": tail["max"]}}
    return meta


def truncation_cost(model: torch.nn.Module, head, ids: torch.Tensor, window: int, k: int, chunk: int) -> dict:
    """What keeping the top k loses on held-out ``ids`` (N,), in windows of ``window`` tokens: the teacher's
    mean probability outside its top k, and the mean KL(top-k renormalised || full) = -log(top-k mass)."""
    device = next(model.parameters()).device
    tail, kl, tokens = 0.0, 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        part = ids[start:start + window].to(device)[None]
        with torch.no_grad():
            hidden = final_hidden(model, part)[0]  # (L, H)
        _, logprobs, _ = teacher_topk(hidden, head, k, chunk)
        mass = logprobs.float().exp().sum(-1).clamp(max=1.0)
        tail += (1.0 - mass).sum().item()
        kl += (-mass.log()).sum().item()
        tokens += mass.numel()
    return {"tokens": tokens, "tail_mass": tail / tokens, "kl_topk_vs_full": kl / tokens}


def finish(out: Path, meta: dict) -> None:
    """Write teacher.json (the directory is complete from now on) and drop the resume record."""
    write_json_atomic(out / "teacher.json", meta)
    (out / "progress.json").unlink(missing_ok=True)


def resume_point(out: Path, header: dict, resume: bool) -> int:
    """Shards already complete in ``out`` (0 for a new directory); refuses a directory of something else."""
    progress_file = out / "progress.json"
    if not resume:
        if out.exists() and any(out.iterdir()):
            raise TransactError(f"{out} is not empty; to continue writing there add --resume, or choose another "
                                "training.kd.teacher_logits")
        out.mkdir(parents=True, exist_ok=True)
        return 0
    if (out / "teacher.json").is_file():
        raise TransactError(f"{out} already holds finished teacher logits")
    if not progress_file.is_file():
        raise TransactError(f"--resume: {out} holds no unfinished transact teach output")
    saved = json.loads(progress_file.read_text())
    if saved["header"] != header:
        raise TransactError(f"--resume: {out} was started with other settings; a resumed teach must use the same")
    return saved["shards"]
