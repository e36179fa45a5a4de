"""Training data: documents streamed from files or a saved dataset, tokenized and packed into fixed-length
blocks, shuffled in a bounded buffer. Nothing holds the corpus in memory, so a corpus larger than memory
works; the stream is deterministic for a seed, so a resumed run skips exactly the blocks it has used.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterator
from pathlib import Path

import torch

from transact.errors import TransactError
from transact.recipe import BUILTIN

DATA_SUFFIXES = (".txt", ".md", ".jsonl", ".jsonl.gz", ".parquet")
TEXT_CHUNK_CHARS = 1 << 20  # a plain-text file is streamed in pieces of about this many characters
SEPARATOR = "\n\n"  # between documents, as in held-out perplexity (see calibrate.token_stream)


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _data_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(DATA_SUFFIXES))
    if not files:
        raise TransactError(f"training data directory {path} holds no {'/'.join(DATA_SUFFIXES)} files")
    return files


def check_source(source: str) -> None:
    """Fail now, naming the problem, if ``source`` cannot give training text (reads at most one record)."""
    if source == BUILTIN:
        return
    path = Path(source)
    if not path.exists():
        raise TransactError(f"training data {path} does not exist")
    if path.is_file() and not path.name.endswith(DATA_SUFFIXES):
        raise TransactError(f"training data {path}: expected one of {', '.join(DATA_SUFFIXES)}, a directory, "
                            "or a dataset saved with datasets.save_to_disk")
    for doc in iter_documents(source):
        if doc.strip():
            return
    raise TransactError(f"training data {path} contains no text")


def iter_documents(source: str) -> Iterator[str]:
    """Documents, lazily, in a fixed order: ``builtin``; a .txt/.md file (in ~1 MiB pieces cut at line
    ends); .jsonl[.gz] or .parquet (a string field/column ``text``); a directory of such files (sorted by
    path); or a ``save_to_disk`` dataset (its ``train`` split if it is a DatasetDict; column ``text``)."""
    if source == BUILTIN:
        from transact import assets

        yield from assets.training_texts()
        return
    path = Path(source)
    if _is_saved_dataset(path):
        yield from _saved_dataset_texts(path)
    elif path.is_dir():
        for f in _data_files(path):
            yield from _file_texts(f)
    else:
        yield from _file_texts(path)


def _file_texts(path: Path) -> Iterator[str]:
    name = path.name
    if name.endswith(".parquet"):
        yield from _parquet_texts(path)
    elif name.endswith((".jsonl", ".jsonl.gz")):
        yield from jsonl_texts(path)
    else:
        try:
            with open(path, encoding="utf-8") as f:
                piece: list[str] = []
                size = 0
                for line in f:
                    piece.append(line)
                    size += len(line)
                    if size >= TEXT_CHUNK_CHARS:
                        yield "".join(piece)
                        piece, size = [], 0
                if piece:
                    yield "".join(piece)
        except UnicodeDecodeError:
            raise TransactError(f"{path} is not UTF-8 text") from None


def jsonl_texts(path: Path) -> Iterator[str]:
    """The string field ``text`` of every non-empty line of a .jsonl or .jsonl.gz file, streamed."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TransactError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise TransactError(f"{path}:{lineno}: each line needs a string field 'text'")
            yield row["text"]


def _parquet_texts(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise TransactError(f"{path} is not a readable parquet file: {e}") from None
    if "text" not in table.schema_arrow.names:
        raise TransactError(f"{path}: no column 'text' (columns: {', '.join(table.schema_arrow.names)})")
    for batch in table.iter_batches(columns=["text"], batch_size=1024):
        yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str))


def _saved_dataset_texts(path: Path) -> Iterator[str]:
    import datasets

    ds = datasets.load_from_disk(str(path))  # memory-mapped arrow files; rows are read as iterated
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise TransactError(f"dataset {path} has splits {', '.join(ds)}; expected a 'train' split")
        ds = ds["train"]
    if "text" not in ds.column_names:
        raise TransactError(f"dataset {path}: no column 'text' (columns: {', '.join(ds.column_names)})")
    for row in ds.select_columns(["text"]):
        if isinstance(row["text"], str):
            yield row["text"]


def packed_blocks(tokenizer, source: str, seq_len: int, seed: int, shuffle_buffer: int) -> Iterator[torch.Tensor]:
    """An endless stream of (seq_len,) token blocks: documents tokenized and joined by a blank line, cut
    into consecutive blocks, passed through a seeded shuffle buffer of ``shuffle_buffer`` blocks; when the
    source ends it starts over (the next epoch, reshuffled)."""
    epoch = 0
    while True:
        rng = random.Random(seed * 1_000_003 + epoch)
        buffer: list[torch.Tensor] = []
        produced = 0
        for block in _blocks(tokenizer, source, seq_len):
            produced += 1
            if len(buffer) < shuffle_buffer:
                buffer.append(block)
                continue
            j = rng.randrange(len(buffer))
            yield buffer[j]
            buffer[j] = block
        if produced == 0:
            raise TransactError(f"training data {source} has fewer than seq_len = {seq_len} tokens")
        rng.shuffle(buffer)
        yield from buffer
        epoch += 1


def _blocks(tokenizer, source: str, seq_len: int) -> Iterator[torch.Tensor]:
    pending: list[int] = []
    for doc in iter_documents(source):
        if not doc.strip():
            continue
        pending.extend(tokenizer(doc + SEPARATOR, add_special_tokens=False)["input_ids"])
        while len(pending) >= seq_len:
            yield torch.tensor(pending[:seq_len], dtype=torch.long)
            del pending[:seq_len]


class BlockStream:
    """``packed_blocks`` with a position: the number of blocks taken so far, across all processes.

    Process ``rank`` of ``world`` takes every ``world``-th block of each global batch, so the processes
    see disjoint data and together the same blocks a single process would.
    """

    def __init__(self, tokenizer, source: str, seq_len: int, seed: int, shuffle_buffer: int, *,
                 position: int = 0, rank: int = 0, world: int = 1) -> None:
        self.position = 0
        self.rank, self.world = rank, world
        self._blocks = packed_blocks(tokenizer, source, seq_len, seed, shuffle_buffer)
        for _ in range(position):  # a resumed run regenerates and skips what it used
            next(self._blocks)
        self.position = position

    def take(self, per_process: int) -> torch.Tensor:
        """This process's share of the next global batch: (per_process, seq_len)."""
        rows = [next(self._blocks) for _ in range(per_process * self.world)]
        self.position += len(rows)
        return torch.stack(rows[self.rank :: self.world])
