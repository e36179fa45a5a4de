"""Text in: one reader for every document source (calibration, held-out and training text), and one way
to turn documents into tokens.

A source is ``builtin`` (the offline corpora), a .txt/.md file (one document, or pieces of about
``chunk_chars`` characters cut at line ends when streaming a large file), a .jsonl[.gz] or .parquet file
(a string field/column ``text``), a directory of such files (sorted by path), or a folder written by
``datasets``' ``save_to_disk`` (its ``train`` split if it is a DatasetDict; column ``text``). Documents are
yielded lazily, so no corpus has to fit in memory.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from transact.errors import TransactError

BUILTIN = "builtin"
TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".jsonl.gz", ".parquet")
SEPARATOR = "\n\n"  # between documents: see token_stream
BUILTIN_CORPORA = ("calibration", "heldout", "training")


def _builtin(corpus: str) -> Iterable[str]:
    from transact.io import assets

    return {"calibration": assets.calibration_texts, "heldout": assets.heldout_texts,
            "training": assets.training_texts}[corpus]()


def iter_documents(source: str | Path, *, builtin: str, what: str = "text source",
                   chunk_chars: int | None = None) -> Iterator[str]:
    """Documents of ``source`` in a fixed order (see the module docstring); ``builtin`` names the corpus
    ``"builtin"`` stands for, ``what`` the source in error messages."""
    if str(source) == BUILTIN:
        yield from _builtin(builtin)
        return
    path = Path(source)
    if _is_saved_dataset(path):
        yield from _saved_dataset_texts(path)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise TransactError(f"{what} directory {path} holds no {'/'.join(TEXT_SUFFIXES)} files")
        for f in files:
            yield from _file_texts(f, chunk_chars)
    elif path.is_file():
        yield from _file_texts(path, chunk_chars)
    else:
        raise TransactError(f"{what} {path} does not exist")


def read_texts(source: str | Path, *, builtin: str = "calibration", what: str = "text source") -> list[str]:
    """Every non-empty document of ``source``, in memory (calibration and held-out text). Empty input is
    an error."""
    docs = [d for d in iter_documents(source, builtin=builtin, what=what) if d.strip()]
    if not docs:
        raise TransactError(f"{what} {source} contains no text")
    return docs


def check_source(source: str | Path, *, builtin: str, what: str) -> None:
    """Fail now, naming the problem, if ``source`` cannot give text (reads up to the first document)."""
    for doc in iter_documents(source, builtin=builtin, what=what, chunk_chars=1 << 16):
        if doc.strip():
            return
    raise TransactError(f"{what} {source} contains no text")


def _file_texts(path: Path, chunk_chars: int | None) -> Iterator[str]:
    name = path.name
    if name.endswith(".parquet"):
        yield from _parquet_texts(path)
    elif name.endswith((".jsonl", ".jsonl.gz")):
        yield from jsonl_texts(path)
    elif name.endswith(".json"):
        raise TransactError(f"{path}: use .jsonl (one JSON object with a 'text' field per line)")
    else:
        yield from _plain_texts(path, chunk_chars)


def _plain_texts(path: Path, chunk_chars: int | None) -> Iterator[str]:
    """The file as one document, or (``chunk_chars`` set) in pieces of about that size cut at line ends."""
    try:
        with open(path, encoding="utf-8") as f:
            if chunk_chars is None:
                yield f.read()
                return
            piece: list[str] = []
            size = 0
            for line in f:
                piece.append(line)
                size += len(line)
                if size >= chunk_chars:
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
    from transact.extras import require

    require("train", f"reading {path.name} (parquet)")
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise TransactError(f"{path} is not a readable parquet file: {e}") from None
    if "text" not in table.schema_arrow.names:
        raise TransactError(f"{path}: no column 'text' (columns: {', '.join(table.schema_arrow.names)})")
    for batch in table.iter_batches(columns=["text"], batch_size=1024):
        yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str))


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _saved_dataset_texts(path: Path) -> Iterator[str]:
    from transact.extras import require

    require("train", f"reading the saved dataset {path}")
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


# ---------------------------------------------------------------- tokens

def document_ids(tokenizer, docs: Iterable[str]) -> Iterator[list[int]]:
    """Each non-empty document's token ids with the separator appended.

    Documents are joined by a blank line rather than the EOS token: chat models' EOS (``<|im_end|>``) is
    not a document boundary they saw in pre-training text, and it inflates held-out perplexity.
    """
    for doc in docs:
        if doc.strip():
            yield tokenizer(doc + SEPARATOR, add_special_tokens=False)["input_ids"]


def token_stream(tokenizer, texts: Iterable[str], limit: int | None = None) -> torch.Tensor:
    """Documents tokenized as one text (see ``document_ids``), stopping once ``limit`` tokens exist. -> (N,)."""
    ids: list[int] = []
    for doc in document_ids(tokenizer, texts):
        ids.extend(doc)
        if limit is not None and len(ids) >= limit:
            break
    return torch.tensor(ids if limit is None else ids[:limit], dtype=torch.long)
