"""Reading and writing a checkpoint a tensor at a time: the layer-wise prune never holds a whole model.

``LazyCheckpoint`` maps every tensor name of a safetensors checkpoint (one file or an index of shards) to
its file and reads single tensors on demand through ``safe_open``. ``ShardWriter`` writes a checkpoint one
shard at a time (each through a staging file and a rename), reads every tensor back to check it, and
finally writes the index that maps names to shards.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import PretrainedConfig

from transact.arch import get_adapter
from transact.errors import TransactError
from transact.io.files import move_into_place, staging_file
from transact.io.models import saved_names, skeleton

INDEX = "model.safetensors.index.json"


def release_freed_memory() -> None:
    """Hand memory freed since the last call back to the operating system.

    glibc's allocator keeps freed blocks of the many differently sized tensors one layer allocates in its
    heaps and reuses them only for allocations that fit, so a layer-by-layer job's resident memory grows
    by tens of MiB per layer (measured on a 2,048-wide Llama: 50-90 MiB a layer) unless the heaps are
    trimmed between layers. Other C libraries (no ``malloc_trim``) are left alone."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library this process runs on, when it has ``malloc_trim`` (glibc)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


class LazyCheckpoint:
    """The tensors of a local safetensors checkpoint, by name, read one at a time.

    Tensors are named as the model's modules name them; ``stored_as`` (module name -> name in the files,
    from ``saved_names``) covers families whose files use another layout. ``stored_name`` gives a tensor's
    name in the files."""

    def __init__(self, folder: str | Path, stored_as: dict[str, str] | None = None) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.folder / file for name, file in weight_map.items()}
        elif (self.folder / "model.safetensors").is_file():
            with safe_open(self.folder / "model.safetensors", framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), self.folder / "model.safetensors")
        else:
            raise TransactError(f"{self.folder} has no safetensors weights (model.safetensors or {INDEX}); a "
                                "layer-wise prune reads its weights lazily from them")
        # stored name -> module name, for the tensors the files hold under another name
        self._module_name = {stored: module for module, stored in (stored_as or {}).items()
                             if stored in self.files and module not in self.files}
        self._stored_name = {module: stored for stored, module in self._module_name.items()}

    @property
    def names(self) -> list[str]:
        """Every tensor, by module name."""
        return [self._module_name.get(stored, stored) for stored in self.files]

    def stored_name(self, name: str) -> str:
        """The name the files hold tensor ``name`` (a module name) under."""
        return self._stored_name.get(name, name)

    def _file_of(self, name: str) -> tuple[Path, str]:
        stored = self.stored_name(name)
        try:
            return self.files[stored], stored
        except KeyError:
            raise TransactError(f"{self.folder} holds no tensor {name!r}") from None

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, as stored (CPU)."""
        path, stored = self._file_of(name)
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(stored)

    def rows(self, name: str, ids: list[int]) -> torch.Tensor:
        """Rows ``ids`` of a 2-D tensor, read without reading the rest of it: -> (len(ids), columns)."""
        path, stored = self._file_of(name)
        with safe_open(path, framework="pt") as f:
            part = f.get_slice(stored)
            return torch.cat([part[i:i + 1] for i in ids])

    def with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with ``prefix``, keyed by the rest of the name."""
        return {name[len(prefix):]: self.tensor(name) for name in self.names if name.startswith(prefix)}


class ShardWriter:
    """Writes ``total`` shards named as ``save_pretrained`` names them, then the index.

    Each shard is written to a staging file, renamed into place, and read back tensor by tensor to check
    that the file holds exactly what was meant (only one shard's tensors are in memory at a time)."""

    def __init__(self, folder: Path, total: int) -> None:
        self.folder, self.total = folder, total

    def shard_name(self, number: int) -> str:
        return f"model-{number:05d}-of-{self.total:05d}.safetensors"

    def write(self, number: int, tensors: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
        """Write shard ``number`` (1-based) and check it; -> (its file name, its tensors as read back)."""
        name = self.shard_name(number)
        target = self.folder / name
        tmp = staging_file(target)
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                      metadata={"format": "pt"})
            move_into_place(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        back = load_file(str(target))
        if set(back) != set(tensors):
            raise TransactError(f"{target} does not hold the tensors written to it")
        for key, expected in tensors.items():
            if not torch.equal(back[key], expected.detach().cpu()):
                raise TransactError(f"{target}: {key} reads back different values than were written")
        return name, back

    def copy_tensor(self, number: int, source: LazyCheckpoint, name: str, dtype: torch.dtype) -> str:
        """Shard ``number`` holding tensor ``name`` (as stored) of ``source`` cast to ``dtype``, copied
        CHUNK_BYTES at a time with plain file reads (an embedding of a large vocabulary never sits in memory
        whole, nor mapped), then read back chunk by chunk and compared. -> its file name."""
        file = self.shard_name(number)
        target = self.folder / file
        where = _locate(source.files[name], name)
        header = {name: {"dtype": SAFETENSORS_DTYPES[dtype], "shape": where.shape,
                         "data_offsets": [0, math.prod(where.shape) * dtype.itemsize]},
                  "__metadata__": {"format": "pt"}}
        tmp = staging_file(target)
        try:
            with open(tmp, "wb") as out:
                out.write(_header_bytes(header))
                for chunk in where.chunks(dtype):
                    out.write(_as_bytes(chunk))
            move_into_place(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        written = _locate(target, name)
        for original, back in zip(where.chunks(dtype), written.chunks(dtype), strict=True):
            if not torch.equal(original, back):
                raise TransactError(f"{target}: {name} reads back different values than were written")
        return file

    def write_index(self, shards: Iterable[tuple[str, Iterable[str]]]) -> None:
        """``shards``: (file name, tensor names in it) for every shard."""
        weight_map = {key: file for file, keys in shards for key in keys}
        size = sum((self.folder / file).stat().st_size for file in set(weight_map.values()))
        index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


CHUNK_BYTES = 64 * 2**20
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
TORCH_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class _Stored:
    """Where one tensor's bytes lie in a safetensors file."""

    path: Path
    dtype: torch.dtype
    shape: list[int]
    start: int  # absolute byte offset of its data

    def chunks(self, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        """The tensor in row ranges of about CHUNK_BYTES (the same ranges for every stored dtype), read with
        plain reads and cast to ``dtype`` (flattened)."""
        rows = self.shape[0] if self.shape else 1
        row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        step = max(1, CHUNK_BYTES // max(math.prod(self.shape[1:]) * 8, 1))
        with open(self.path, "rb") as f:
            for first in range(0, rows, step):
                f.seek(self.start + first * row_bytes)
                raw = bytearray(f.read((min(first + step, rows) - first) * row_bytes))
                yield torch.frombuffer(raw, dtype=self.dtype).to(dtype)


def _locate(path: Path, name: str) -> _Stored:
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(length))[name]
    return _Stored(path, TORCH_DTYPES[entry["dtype"]], entry["shape"], 8 + length + entry["data_offsets"][0])


def _header_bytes(header: dict) -> bytes:
    """The 8-byte little-endian length and the JSON header, padded with spaces to a multiple of 8."""
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _as_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


# ---------------------------------------------------------------- a model's checkpoint, layer by layer

def checkpoint_of(folder: str | Path, config: PretrainedConfig) -> LazyCheckpoint:
    """The tensors of the local checkpoint of a model with ``config``, by the names its modules give them,
    checked to hold the family's decoder layers under their module names."""
    weights = LazyCheckpoint(folder, saved_names(skeleton(config)))
    prefix = get_adapter(config).layers_path
    if not any(name.startswith(f"{prefix}.0.") for name in weights.names):
        raise TransactError(f"{folder}: no tensor is named {prefix}.0.*; the checkpoint's layout is not the one "
                            "this family's modules use")
    return weights


def embedding_name(weights: LazyCheckpoint, config: PretrainedConfig) -> str:
    """The checkpoint name of the input embedding, from the family's own module layout (a tied embedding may
    be stored under the LM head's name)."""
    model = skeleton(config)
    target = model.get_input_embeddings().weight
    names = [name for name, param in model.named_parameters(remove_duplicate=False) if param is target]
    held = set(weights.names)
    for name in names:
        if name in held:
            return name
    raise TransactError(f"{weights.folder}: no tensor holds the input embedding ({' or '.join(names)})")


def non_layer_tensors(weights: LazyCheckpoint, config: PretrainedConfig) -> list[str]:
    """Every tensor of the model outside the decoder layers (embedding, final norm, LM head, a vision tower),
    by its stored name. Tensors the model class does not load (Qwen3.5's multi-token prediction head) are left
    out, as transformers' own save of a model leaves them out."""
    prefix = get_adapter(config).layers_path
    model_names = set(skeleton(config).state_dict())
    return [weights.stored_name(name) for name in weights.names
            if not name.startswith(f"{prefix}.") and name in model_names]
