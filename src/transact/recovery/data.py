"""Training data: documents streamed from files or a saved dataset, tokenized and packed into fixed-length
blocks, shuffled in a bounded buffer. Nothing holds the corpus in memory, so a corpus larger than memory
works; the stream is deterministic for a seed, so a resumed run skips exactly the blocks it has used.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from transact.errors import TransactError
from transact.io.text import check_source, document_ids, iter_documents

TEXT_CHUNK_CHARS = 1 << 20  # a plain-text file is streamed in pieces of about this many characters


def check_training_data(source: str) -> None:
    """Fail now, naming the problem, if ``source`` cannot give training text."""
    check_source(source, builtin="training", what="training data")


def training_documents(source: str) -> Iterator[str]:
    """The training corpus, lazily (see ``transact.io.text``; ``builtin`` is the built-in training corpus)."""
    return iter_documents(source, builtin="training", what="training data", chunk_chars=TEXT_CHUNK_CHARS)


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
    for ids in document_ids(tokenizer, training_documents(source)):
        pending.extend(ids)
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
        self.last_positions: list[int] = []  # global positions of the blocks the last take gave this process
        self._blocks = packed_blocks(tokenizer, source, seq_len, seed, shuffle_buffer)
        for _ in range(position):  # a resumed run regenerates and skips what it used
            next(self._blocks)
        self.position = position

    def take(self, per_process: int) -> torch.Tensor:
        """This process's share of the next global batch: (per_process, seq_len)."""
        rows = [next(self._blocks) for _ in range(per_process * self.world)]
        self.last_positions = list(range(self.position + self.rank, self.position + len(rows), self.world))
        self.position += len(rows)
        return torch.stack(rows[self.rank :: self.world])
