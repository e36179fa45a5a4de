"""Writing a pruned model as a plain Hugging Face checkpoint (safetensors) plus plan.json and report.json.

The directory is assembled in a hidden temporary sibling and renamed into place at the end, so a failure
never leaves a half-written output; an existing non-empty directory is only replaced with ``force``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from transact.arch import get_adapter
from transact.errors import TransactError
from transact.plan import PrunePlan


def _usual_mode(path: Path) -> None:
    """mkdtemp/mkstemp make owner-only entries; give ``path`` the mode a plain mkdir/open would (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def staging_dir(target: Path) -> Path:
    """A hidden empty sibling of ``target`` to assemble it in, renamed into place when complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    _usual_mode(tmp)
    return tmp


def staging_file(target: Path) -> Path:
    """A hidden empty sibling file of ``target`` to write into; ``move_into_place`` publishes it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    return Path(tmp)


def move_into_place(tmp: Path, target: Path) -> None:
    """Rename a finished staging file onto ``target`` (atomic on one filesystem), with the usual mode."""
    _usual_mode(tmp)
    os.replace(tmp, target)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and a rename: a reader (or a rerun after a
    crash) sees the old file or the new one, never half of one."""
    tmp = staging_file(path)
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        move_into_place(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_output_dir(out: str | Path, *, force: bool, inputs: tuple[str | Path, ...] = ()) -> Path:
    """Refuse an output that would clobber work or an input, before any computation starts."""
    out = Path(out).expanduser().resolve()
    for given in inputs:
        src = Path(given).expanduser()
        if src.exists() and (out == src.resolve() or src.resolve() in out.parents):
            raise TransactError(f"the output {out} would overwrite the input {given}")
    if out.exists() and not out.is_dir():
        raise TransactError(f"the output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise TransactError(f"the output directory {out} is not empty (use --force to replace it)")
    check_writable(out)
    return out


def check_writable(path: str | Path) -> None:
    """Refuse ``path`` when its nearest existing ancestor directory cannot be written."""
    parent = Path(path).expanduser().resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not _writable(parent):
        raise TransactError(f"cannot write under {parent}")


def _writable(path: Path) -> bool:
    try:
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


def portable_model(model: nn.Module) -> nn.Module:
    """The model as vanilla transformers will load it from disk.

    Usually ``model`` itself. When the family's config class cannot describe the pruned shape (Llama with
    a head count that does not divide the hidden size), the same tensors are re-homed, without copying,
    into the equivalent class whose config can (see ``transact.arch.llama``).
    """
    config = get_adapter(model).portable_config(model.config)
    if config is model.config:
        return model
    with torch.device("meta"):
        twin = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    twin.load_state_dict(model.state_dict(), assign=True, strict=True)
    if twin.config.tie_word_embeddings:
        twin.tie_weights()
    twin.generation_config = model.generation_config
    return twin.eval()


def write_checkpoint(
    model: nn.Module,
    tokenizer,
    out: str | Path,
    *,
    plan: PrunePlan,
    report: dict,
    save_dtype: torch.dtype,
    force: bool = False,
    verify: Callable[[Path], None] | None = None,
) -> Path:
    """Save ``model`` (cast to ``save_dtype``) with tokenizer, plan.json and report.json, atomically.

    ``verify`` is called on the finished temporary directory before it is moved into place; an exception
    there leaves no output behind.
    """
    out = check_output_dir(out, force=force)
    tmp = staging_dir(out)
    try:
        to_save = portable_model(model)
        if save_dtype == next(to_save.parameters()).dtype:
            to_save.save_pretrained(tmp, safe_serialization=True)
        else:
            _save_cast(to_save, tmp, save_dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        plan.save(tmp / "plan.json")
        (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        if verify is not None:
            verify(tmp)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _save_cast(model: nn.Module, directory: Path, dtype: torch.dtype) -> None:
    """save_pretrained with the floating-point tensors cast to ``dtype``, leaving the model untouched.

    Casting the model itself and back would round its fp32 buffers (the rotary frequencies) for good.
    Tensors that share storage (tied embeddings) stay shared, so the tie is still recognised.
    """
    cast: dict[int, torch.Tensor] = {}
    state = {}
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            t = cast.setdefault(t.data_ptr(), t.to(dtype))
        state[name] = t
    model.save_pretrained(directory, state_dict=state, safe_serialization=True)
    config = json.loads((directory / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def old_dir(out: Path) -> Path:
    """Where ``replace_dir`` parks the previous ``out`` until the new one is in place."""
    return out.with_name(f".{out.name}.old")


def replace_dir(new: Path, out: Path) -> None:
    """Move ``new`` to ``out``; an existing ``out`` is removed only once ``new`` is in place (until then it
    lies at ``old_dir(out)``)."""
    old = None
    if out.exists():
        old = old_dir(out)
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    new.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def reload_and_compare(reference: nn.Module, tokens: torch.Tensor) -> Callable[[Path], None]:
    """A ``verify`` callback: vanilla ``AutoModelForCausalLM`` must reload the directory and, cast to the
    reference's dtype and device, give exactly the reference's logits on ``tokens`` (1, T)."""

    def check(directory: Path) -> None:
        param = next(reference.parameters())
        # Load straight into the reference dtype: casting a loaded model with .to(dtype) would also round
        # its fp32 rotary-frequency buffer, which the reference never had rounded.
        reloaded = AutoModelForCausalLM.from_pretrained(directory, dtype=param.dtype).to(param.device).eval()
        with torch.inference_mode():
            expected = reference(input_ids=tokens.to(param.device)).logits
            got = reloaded(input_ids=tokens.to(param.device)).logits
        if not torch.equal(expected, got):
            diff = (expected - got).abs().max().item()
            raise TransactError(f"the saved checkpoint does not reproduce the pruned model (max |Δlogit| {diff:.3g})")

    return check
