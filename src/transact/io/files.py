"""Files and directories written atomically: assembled in a hidden sibling and renamed into place, so a
failure never leaves half an output; existing outputs are only replaced when asked."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from transact.errors import TransactError


def _usual_mode(path: Path) -> None:
    """mkdtemp/mkstemp make owner-only entries; give ``path`` the mode a plain mkdir/open would (umask),
    keeping a program runnable (a file its owner may execute gets the execute bits the umask allows)."""
    umask = os.umask(0)
    os.umask(umask)
    runnable = path.is_dir() or path.stat().st_mode & 0o100
    os.chmod(path, (0o777 if runnable else 0o666) & ~umask)


def publish_modes(tree: Path) -> None:
    """Give ``tree`` and everything under it the usual mode (umask), before it is renamed into place:
    writers such as safetensors' ``save_file`` make owner-only files, which a server running as another
    user, or a container, could not read."""
    for entry in (tree, *tree.rglob("*")):
        if not entry.is_symlink():
            _usual_mode(entry)


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


def old_dir(out: Path) -> Path:
    """Where ``replace_dir`` parks the previous ``out`` until the new one is in place."""
    return out.with_name(f".{out.name}.old")


def replace_dir(new: Path, out: Path) -> None:
    """Move ``new`` to ``out``; an existing ``out`` is removed only once ``new`` is in place (until then it
    lies at ``old_dir(out)``). Every entry of ``new`` gets the usual mode first (``publish_modes``)."""
    publish_modes(new)
    old = None
    if out.exists():
        old = old_dir(out)
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    new.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
