"""Where text comes from and how much of it is used: calibration windows, and held-out perplexity."""

from __future__ import annotations

from dataclasses import dataclass

from transact.checks import check_int, check_str, fail
from transact.errors import TransactError
from transact.io.text import BUILTIN


@dataclass(frozen=True)
class Calibration:
    """Calibration text and the windows cut from it.

    ``text`` is a .txt/.jsonl/.parquet file, a directory of them, a saved dataset, or ``"builtin"`` (the
    offline corpus).
    """

    text: str = BUILTIN
    samples: int = 128
    seq_len: int = 512
    batch_size: int = 4

    def __post_init__(self) -> None:
        for name in ("samples", "seq_len", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TransactError(f"calibration.{name} must be a positive integer, got {value!r}")
        if self.seq_len < 2:
            raise TransactError("calibration.seq_len must be at least 2")


@dataclass(frozen=True)
class HeldoutText:
    """Held-out text for perplexity: a source (path or ``"builtin"``: LAMBADA passages), at most ``tokens``
    of it (0 = all), scored in windows of ``window`` tokens moved by ``stride`` (None: the window, i.e.
    disjoint windows). Windows longer than the model's context are clipped to it."""

    text: str = BUILTIN
    tokens: int = 16384
    window: int = 1024
    stride: int | None = None

    def __post_init__(self) -> None:
        check_str("heldout.text", self.text)
        check_int("heldout.tokens", self.tokens, 0)
        check_int("heldout.window", self.window, 2)
        if self.stride is not None and not 1 <= check_int("heldout.stride", self.stride, 1) <= self.window:
            raise fail("heldout.stride", f"must lie between 1 and the window ({self.window}), got {self.stride}")
