"""Loading models: a local Hugging Face directory, a hub id (where a network exists), a .gguf file, or
``builtin:smollm2``. The family is checked from the config before any weights are read."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from transact.arch import get_adapter
from transact.errors import TransactError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, resolved without loading weights."""

    spec: str  # what the user wrote
    path: str  # directory or hub id handed to from_pretrained
    gguf_file: str | None = None

    @property
    def is_local(self) -> bool:
        return Path(self.path).is_dir()


def resolve_source(spec: str | Path) -> ModelSource:
    from transact import assets

    spec = str(spec)
    if spec == assets.SMOLLM2:
        return ModelSource(spec, str(assets.smollm2_dir()))
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise TransactError(f"{path} is a file but not a .gguf model; give a model directory or a .gguf file")
        return ModelSource(spec, str(path.parent), gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TransactError(f"{path} is not a Hugging Face model directory (no config.json)")
        return ModelSource(spec, str(path))
    if path.is_absolute() or spec.startswith(".") or not _HUB_ID.match(spec):
        raise TransactError(f"model {spec!r} does not exist")
    return ModelSource(spec, spec)  # a hub id


def load_config(source: ModelSource) -> PretrainedConfig:
    """The config (and with it the family check) without reading weights."""
    try:
        config = AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file)
    except (OSError, ValueError) as e:
        raise TransactError(f"could not read the config of {source.spec!r}: {_first_line(e)}") from None
    get_adapter(config)
    return config


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TransactError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TransactError("--device cuda was requested but no CUDA device is available")
    return dev


def checkpoint_dtype(config: PretrainedConfig, source: ModelSource) -> torch.dtype:
    """The dtype the weights are stored in (GGUF weights are dequantized to fp32)."""
    if source.gguf_file:
        return torch.float32
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype, torch.float32)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def resolve_dtype(name: str, default: torch.dtype) -> torch.dtype:
    if name == "auto":
        return default
    try:
        return DTYPES[name]
    except KeyError:
        raise TransactError(f"unknown dtype {name!r}; use auto, {', '.join(sorted(DTYPES))}") from None


def load_gguf_weights(path: Path, dtype: torch.dtype = torch.float32):
    """Dequantize a GGUF file's weights into a plain transformers model (no quantizer attached)."""
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # Weights are already dequantized; the quantizer marker only blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def load_gguf(path: Path, dtype: torch.dtype = torch.float32):
    """-> (dequantized model, tokenizer) from a GGUF file."""
    return load_gguf_weights(path, dtype), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(source: ModelSource):
    """The model's tokenizer, or None when it ships none (pruning by plan or by weights needs none).

    transformers 5 builds an *empty* tokenizer for some families (Qwen2: a vocabulary of 1 that turns
    every text into no tokens) when a directory has no tokenizer files, so a local directory must hold
    one of ``TOKENIZER_FILES`` and the result must have a real vocabulary.
    """
    if source.is_local and not source.gguf_file and not any((Path(source.path) / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    except (OSError, ValueError):
        return None
    return tokenizer if len(tokenizer) > 1 else None


def require_tokenizer(source: ModelSource, purpose: str):
    """The tokenizer, loaded before the weights so that a missing one fails early (hand it to load_model)."""
    tokenizer = load_tokenizer(source)
    if tokenizer is None:
        raise TransactError(f"{source.spec!r} has no tokenizer files, which {purpose} needs")
    return tokenizer


def load_model(source: ModelSource, *, device: torch.device, dtype: torch.dtype, tokenizer=None):
    """-> (model in eval mode on ``device`` in ``dtype``, tokenizer or None); a ``tokenizer`` already
    loaded (by require_tokenizer) is reused rather than read again."""
    try:
        if source.gguf_file and tokenizer is None:
            model, tokenizer = load_gguf(Path(source.path) / source.gguf_file, dtype)
        elif source.gguf_file:
            model = load_gguf_weights(Path(source.path) / source.gguf_file, dtype)
        else:
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(source)
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
    except OSError as e:
        raise TransactError(f"could not load {source.spec!r}: {_first_line(e)}") from None
    get_adapter(model)
    return model.to(device).eval(), tokenizer


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
