"""Optional dependency groups. The core (prune, apply-plan, info, perplexity) needs none of them; every
command that does checks for its group before any work and names the extra to install."""

from __future__ import annotations

import importlib.util

from transact.errors import TransactError

# extra -> the importable modules it provides (pyproject.toml lists the distributions).
EXTRAS: dict[str, tuple[str, ...]] = {
    "eval": ("lm_eval",),
    "train": ("accelerate", "peft", "datasets", "pyarrow"),
    "gguf": ("xllamacpp", "sentencepiece", "google.protobuf"),
    "plots": ("matplotlib",),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package ("google" for google.protobuf)
        return False


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here."""
    return [m for m in EXTRAS[extra] if not _installed(m)]


def require(extra: str, purpose: str) -> None:
    """Raise, naming the extra, when ``purpose`` cannot run for lack of its optional dependencies."""
    absent = missing(extra)
    if absent:
        raise TransactError(f"{purpose} needs the optional dependencies transact[{extra}] ({', '.join(absent)} "
                            f"not installed): pip install 'transact[{extra}]'")
