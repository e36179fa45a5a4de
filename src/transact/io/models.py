"""Loading models: a local Hugging Face directory, a hub id (where a network exists), a .gguf file, or
``builtin:smollm2``, through one path with clear failures.

``prepare_model`` resolves everything from the config alone (family, shape, device, dtypes) and checks the
weight files without reading the weights (a truncated or corrupt file, shapes that disagree with the
config, a missing shard), so every command refuses a model it cannot load before any work starts and
before anything is written; ``load_model`` then reads the weights, turning any failure into a one-line
error that names the model and the reason.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from transact.arch import ModelShape, get_adapter, shape_of
from transact.errors import TransactError
from transact.io import assets
from transact.io.files import publish_modes, staging_dir
from transact.io.per_layer import own_code_config

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16": how configs, plans and reports write a dtype."""
    return str(dtype).removeprefix("torch.")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


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
    spec = str(spec)
    if spec.startswith(assets.BUILTIN):
        return ModelSource(spec, str(builtin_dir(spec)))
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


def builtin_dir(spec: str) -> Path:
    """The fp32 Hugging Face copy of a built-in model (``builtin:NAME``), converted from its packaged GGUF on
    first use (the parts joined in a staging directory, dequantized, saved; nothing is left half-written)."""
    model_info = assets.builtin_model(spec)
    target = assets.cache_dir() / model_info.cache_name
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    parts = assets.gguf_parts(model_info)
    tmp = staging_dir(target)
    try:
        gguf = parts[0] if len(parts) == 1 else _joined(parts, tmp / "joined.gguf")
        try:
            model, tokenizer = load_gguf(gguf)
        except Exception as e:  # the GGUF reader and transformers raise their own types
            raise TransactError(f"could not read {gguf}: {_first_line(e)}") from None
        if gguf.parent == tmp:
            gguf.unlink()  # the joined file is no part of the checkpoint
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        publish_modes(tmp)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _joined(parts: list[Path], out: Path) -> Path:
    """The parts of a split file, concatenated in order into ``out``."""
    with open(out, "wb") as joined:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, joined, length=16 * 2**20)
    return out


def smollm2_dir() -> Path:
    """The fp32 Hugging Face copy of SmolLM2-135M-Instruct (``builtin:smollm2``)."""
    return builtin_dir(assets.SMOLLM2)


def load_config(source: ModelSource) -> PretrainedConfig:
    """The config (and with it the family check) without reading weights."""
    own = own_code_config(Path(source.path), source.spec) if source.gguf_file is None else None
    try:
        config = own or AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file)
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


def skeleton(config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The model a config describes, on the meta device (shapes only, no memory, no weights read), with tied
    embeddings tied (transformers 5.0 leaves a meta-device model untied)."""
    with torch.device("meta"):
        model = get_adapter(config).model_class().from_config(config, dtype=dtype)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def saved_names(model: torch.nn.Module) -> dict[str, str]:
    """Each state-dict name of ``model`` -> the name ``save_pretrained`` stores it under. transformers 5
    writes some families in their original hub layout (a multimodal Gemma 3's ``model.language_model.*``
    as ``language_model.model.*``) and renames on load; the others keep their names. Tensors a conversion
    merges or splits (not renames) keep their own names here (see ``saved_layout``)."""
    return saved_layout(model)[0]


def split_tensors(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The tensors ``save_pretrained`` writes by splitting (or merging) the model's own (see ``saved_layout``)."""
    return saved_layout(model)[1]


def saved_layout(model: torch.nn.Module) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """How ``save_pretrained`` lays out ``model``'s tensors, from one run of transformers' conversion for
    saving on meta tensors: (state-dict name -> stored name, for the tensors it stores whole; stored name ->
    shape, for those it writes by splitting or merging: a mixture of experts' fused expert parameters become
    one tensor per expert and projection)."""
    from transformers.core_model_loading import revert_weight_conversion

    probes = {name: torch.empty_like(t, device="meta") for name, t in model.state_dict().items()}
    reverted = revert_weight_conversion(model, dict(probes))
    module_name = {id(t): name for name, t in probes.items()}
    renamed = {module_name[id(t)]: saved for saved, t in reverted.items() if id(t) in module_name}
    split = {saved: tuple(t.shape) for saved, t in reverted.items() if id(t) not in module_name}
    return renamed, split


# ---------------------------------------------------------------- one loading path

@dataclass(frozen=True)
class PreparedModel:
    """A model resolved and checked from its config and file headers alone, ready to load."""

    source: ModelSource
    config: PretrainedConfig
    shape: ModelShape
    device: torch.device
    dtype: torch.dtype  # compute dtype
    save_dtype: torch.dtype  # what a pruned checkpoint of it is written in


def prepare_model(spec: str, device: str = "cpu", dtype: str = "auto") -> PreparedModel:
    """Resolve a model's source, family, shape, device and dtypes and check its weight files (no weights
    read); every failure is a TransactError naming the file and the reason."""
    source = resolve_source(spec)
    config = load_config(source)
    stored = checkpoint_dtype(config, source)
    compute = resolve_dtype(dtype, stored)
    check_weight_files(source, config)
    return PreparedModel(source, config, shape_of(config), resolve_device(device), compute,
                         _save_dtype(stored, compute))


def with_compute_dtype(prepared: PreparedModel, dtype: torch.dtype) -> PreparedModel:
    """``prepared`` computing in ``dtype`` instead (its saved dtype follows), without reading anything again."""
    stored = checkpoint_dtype(prepared.config, prepared.source)
    return replace(prepared, dtype=dtype, save_dtype=_save_dtype(stored, dtype))


def _save_dtype(stored: torch.dtype, compute: torch.dtype) -> torch.dtype:
    # Pruning only copies values, so an upcast compute dtype saves back exactly in the stored dtype;
    # a narrower compute dtype has already rounded the weights, so they are saved as they are.
    return stored if torch.finfo(compute).bits >= torch.finfo(stored).bits else compute


def load_model(prepared: PreparedModel, *, tokenizer=None, device: torch.device | None = None):
    """-> (model in eval mode on ``device`` (default: the prepared one) in the compute dtype, tokenizer or
    None); a ``tokenizer`` already loaded (by require_tokenizer) is reused rather than read again."""
    source, dtype = prepared.source, prepared.dtype
    try:
        if source.gguf_file and tokenizer is None:
            model, tokenizer = load_gguf(Path(source.path) / source.gguf_file, dtype)
        elif source.gguf_file:
            model = load_gguf_weights(Path(source.path) / source.gguf_file, dtype)
        else:
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(source)
            model = get_adapter(prepared.config).model_class().from_pretrained(source.path, dtype=dtype)
    except Exception as e:  # safetensors, transformers and torch each raise their own types for a bad file
        raise TransactError(f"could not load {source.spec!r}: {_first_line(e)}") from None
    get_adapter(model)
    return model.to(device or prepared.device).eval(), tokenizer


def check_weight_files(source: ModelSource, config: PretrainedConfig) -> None:
    """Refuse, before loading, weights that cannot load: a missing shard, a truncated or corrupt file, a
    tensor whose shape disagrees with the config, a tensor the config needs that no file holds."""
    if source.gguf_file:
        _check_gguf(Path(source.path) / source.gguf_file)
        return
    if not source.is_local:
        return  # a hub download is checked by transformers as it arrives
    headers = {}
    for path in _safetensors_files(Path(source.path)):
        headers.update({name: (path, shape) for name, shape in _safetensors_shapes(path).items()})
    if headers:
        _check_against_config(headers, config)


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        single = folder / "model.safetensors"
        return [single] if single.is_file() else []
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise TransactError(f"{index} is not a valid safetensors index ({_first_line(e)})") from None
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise TransactError(f"{folder / missing[0]}{more} listed in {index.name} is missing")
    return [folder / s for s in shards]


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, after checking that the file holds all the bytes it
    describes. The layout: an 8-byte little-endian header length, the JSON header, the tensor data."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or length > size - 8:
                raise ValueError(f"its header claims {length:,} bytes but the file has {size:,}")
            header = json.loads(f.read(length))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((int(t["data_offsets"][1]) for t in tensors.values()), default=0)
        shapes = {k: tuple(int(d) for d in t["shape"]) for k, t in tensors.items()}
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise TransactError(f"{path} is not a valid safetensors file: {_first_line(e)}") from None
    if 8 + length + end > size:
        raise TransactError(f"{path} is truncated: {size:,} bytes, its header describes {8 + length + end:,}")
    return shapes


def _check_against_config(headers: dict[str, tuple[Path, tuple[int, ...]]], config: PretrainedConfig) -> None:
    model = skeleton(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    stored, split = saved_layout(model)
    if set(split) & set(headers):  # experts stored one by one, as save_pretrained writes them
        _check_split_tensors(headers, split)
        expected = {name: shape for name, shape in expected.items() if name in stored}
    # the names save_pretrained writes for this family (where they differ from the modules'): check the
    # tensors under those names
    headers = {**headers, **{module: headers[name] for module, name in stored.items()
                             if module not in headers and name in headers}}
    if not set(expected) & set(headers):
        return  # names the loader maps on its own (an older layout): leave the check to it
    for name, (path, shape) in sorted(headers.items()):
        if name in expected and expected[name] != shape:
            raise TransactError(f"{path}: {name} has shape {list(shape)} but the config implies "
                                f"{list(expected[name])}; the weights do not match config.json")
    absent = sorted(names[0] for names in _tensor_names(model, expected).values() if not set(names) & set(headers))
    if absent:
        more = f" and {len(absent) - 1} more" if len(absent) > 1 else ""
        raise TransactError(f"{next(iter(headers.values()))[0].parent}: no weight file holds {absent[0]}{more}, "
                            "which the config needs")


def _check_split_tensors(headers: dict[str, tuple[Path, tuple[int, ...]]], split: dict[str, tuple[int, ...]]) -> None:
    """The tensors stored one per expert: each present, with the shape the config implies."""
    for name, shape in sorted(split.items()):
        if name not in headers:
            folder = next(iter(headers.values()))[0].parent
            raise TransactError(f"{folder}: no weight file holds {name}, which the config needs")
        path, found = headers[name]
        if found != shape:
            raise TransactError(f"{path}: {name} has shape {list(found)} but the config implies {list(shape)}; the "
                                "weights do not match config.json")


def _tensor_names(model: torch.nn.Module, saved: dict) -> dict[int, list[str]]:
    """The state-dict names of each distinct tensor: tied embeddings are one tensor under two names, and a
    checkpoint needs to hold it under one of them."""
    names: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if name in saved:
            names.setdefault(id(t), []).append(name)
    return names


def _check_gguf(path: Path) -> None:
    from gguf import GGUFReader

    try:
        GGUFReader(str(path))
    except Exception as e:  # the reader raises several types for a damaged file
        raise TransactError(f"{path} is not a readable GGUF file: {_first_line(e)}") from None


# ---------------------------------------------------------------- GGUF and tokenizers

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


def load_tokenizer(source: ModelSource):
    """The model's tokenizer, or None when it ships none (pruning by plan or by weights needs none).

    transformers 5 builds an *empty* tokenizer for some families (Qwen2: a vocabulary of 1 that turns
    every text into no tokens) when a directory has no tokenizer files, so a local directory must hold one of
    ``TOKENIZER_FILES`` and the result must have a real vocabulary. Never a checkpoint's own code."""
    if source.is_local and not source.gguf_file and not any((Path(source.path) / f).is_file() for f in TOKENIZER_FILES):
        return None
    own = own_code_config(Path(source.path), source.spec) if source.is_local and not source.gguf_file else None
    try:  # a per-layer config gets the project's class: transformers' base class warns it "can yield errors"
        tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file, trust_remote_code=False,
                                                  **({"config": own} if own is not None else {}))
    except (OSError, ValueError):
        return None
    return tokenizer if len(tokenizer) > 1 else None


def require_tokenizer(source: ModelSource, purpose: str):
    """The tokenizer, loaded before the weights so that a missing one fails early (hand it to load_model)."""
    tokenizer = load_tokenizer(source)
    if tokenizer is None:
        raise TransactError(f"{source.spec!r} has no tokenizer files, which {purpose} needs")
    return tokenizer


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
