"""What every command's flags share: defaults read from the job and recipe dataclasses (so the command line and
the Python API cannot drift apart), value parsers, and the runtime flags."""

from __future__ import annotations

import argparse
import dataclasses

from transact.errors import TransactError
from transact.recipes import Width

MODEL_HELP = "a Hugging Face model directory, a hub id, a .gguf file, or builtin:smollm2"


def default(cls: type, name: str):
    """The default of dataclass field ``name`` (the CLI's defaults are the API's)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def csv(values: tuple) -> str:
    return ",".join(map(str, values))


def width(text: str) -> Width:
    try:
        return Width.parse(text)
    except TransactError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def multiple_of(text: str) -> int:
    """--multiple-of: a positive integer, or a llama.cpp type whose block the widths should fill (q4_k_m: 256)."""
    from transact.deploy.quantize import QUANT_TYPES, block_of

    name = text.strip().lower()
    if name in QUANT_TYPES or name == "q8_0":
        return block_of(name)
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or a llama.cpp type ({', '.join(QUANT_TYPES)}, "
                                         f"q8_0), got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def add_runtime(p: argparse.ArgumentParser, device: str, dtype: str) -> None:
    p.add_argument("--device", default=device, help=f"cpu, cuda, cuda:N or auto (default: {device})")
    p.add_argument("--dtype", default=dtype, help="compute dtype: auto (the checkpoint's), float32, bfloat16, float16")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
