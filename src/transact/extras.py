"""Optional dependency groups. The core (prune, apply-plan, info, perplexity) needs none of them; every
command that does checks for its group before any work and names the extra to install."""

from __future__ import annotations

import importlib.util

from transact.errors import TransactError

# extra -> {importable module: the distribution pyproject.toml installs it from}.
EXTRAS: dict[str, dict[str, str]] = {
    "eval": {"lm_eval": "lm-eval"},
    "train": {"accelerate": "accelerate", "peft": "peft", "datasets": "datasets", "pyarrow": "pyarrow",
              "torchao": "torchao"},
    "gguf": {"gguf": "gguf", "xllamacpp": "xllamacpp", "sentencepiece": "sentencepiece", "google.protobuf": "protobuf"},
    "plots": {"matplotlib": "matplotlib"},
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package ("google" for google.protobuf)
        return False


def missing(extra: str) -> list[str]:
    """The distributions of ``extra`` whose modules cannot be imported here."""
    return [dist for module, dist in EXTRAS[extra].items() if not _installed(module)]


def require(extra: str, purpose: str) -> None:
    """Raise, naming the extra, when ``purpose`` cannot run for lack of its optional dependencies."""
    absent = missing(extra)
    if absent:
        raise TransactError(f"{purpose} needs the optional dependencies transact[{extra}] ({', '.join(absent)} "
                            f"not installed): pip install 'transact[{extra}]'")
