"""Plug-in options: each metric and corrector declares its own options as a frozen dataclass whose fields carry
their help text and bounds (``option``), checked when the value is made (``check_options``). A recipe holds the
chosen plug-in's options value (``build_options`` turns a mapping from YAML, JSON or the command line into it,
naming unknown keys), and the command line builds a flag for every field (``option_flags``).

Field types understood: ``float`` and ``int`` (optionally ``| None``), ``bool``, ``str`` and ``Literal[...]``
choices. Numeric strings such as '1e-4' are read as numbers (YAML 1.1 reads exponents without a dot as
strings)."""

from __future__ import annotations

import math
import typing
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, is_dataclass
from typing import Any, Literal

from transact.errors import TransactError


def option(default: Any, help: str, *, low: float | None = None, high: float | None = None) -> Any:
    """A field of a plug-in's options: its default, its help (shown by ``--help``), and for numbers the
    closed range [low, high] it must lie in."""
    return field(default=default, metadata={"help": help, "low": low, "high": high})


@dataclass(frozen=True)
class NoOptions:
    """The options of a plug-in that has none."""


@dataclass(frozen=True)
class OptionSpec:
    """One option as the command line offers it: the field's name, its value type (float, int, bool, str),
    its choices (a ``Literal`` field) and its help."""

    name: str
    kind: type
    choices: tuple[Any, ...] | None
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _value_type(annotation: Any) -> tuple[type, tuple[Any, ...] | None, bool]:
    """(the value type, the Literal choices or None, whether None is allowed) of a field's annotation."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    if optional:
        rest = [a for a in args if a is not type(None)]
        annotation = rest[0] if len(rest) == 1 else annotation
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), choices, optional
    return annotation, None, optional


def specs(cls: type) -> list[OptionSpec]:
    """The options of options class ``cls``, as the command line offers them."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        kind, choices, _ = _value_type(hints[f.name])
        out.append(OptionSpec(f.name, kind, choices, f.metadata.get("help", "")))
    return out


def _checked(f: Field, annotation: Any, value: Any) -> Any:
    kind, choices, optional = _value_type(annotation)
    if value is None and optional:
        return None
    if choices is not None:
        if value not in choices:
            raise TransactError(f"option {f.name!r} must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if kind is bool or kind is str:
        if not isinstance(value, kind):
            raise TransactError(f"option {f.name!r} must be {'true or false' if kind is bool else 'text'}, "
                                f"got {value!r}")
        return value
    return _number(f, kind, value)


def _number(f: Field, kind: type, value: Any) -> float | int:
    if isinstance(value, str) and kind is float:
        try:
            value = float(value)
        except ValueError:
            raise TransactError(f"option {f.name!r} must be a number, got {value!r}") from None
    allowed = (int, float) if kind is float else (int,)
    if isinstance(value, bool) or not isinstance(value, allowed) or not math.isfinite(value):
        raise TransactError(f"option {f.name!r} must be a finite {'number' if kind is float else 'integer'}, "
                            f"got {value!r}")
    low, high = f.metadata.get("low"), f.metadata.get("high")
    if (low is not None and value < low) or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise TransactError(f"option {f.name!r} must be {bound}, got {value}")
    return kind(value)


def check_options(options: Any) -> None:
    """Check (and normalise: numeric strings to numbers) every field of an options value against its type and
    bounds; a TransactError names the field. Called by each options class's ``__post_init__``."""
    hints = typing.get_type_hints(type(options))
    for f in fields(options):
        object.__setattr__(options, f.name, _checked(f, hints[f.name], getattr(options, f.name)))


def build_options(cls: type, value: Any, owner: str) -> Any:
    """An options value of class ``cls`` from ``value``: None (the defaults), a mapping of field names (unknown
    keys refused by name), or a value of ``cls`` itself. ``owner`` ("metric 'transact'") prefixes errors."""
    if value is None:
        value = {}
    if isinstance(value, cls):
        return value
    if is_dataclass(value) or not isinstance(value, dict):
        raise TransactError(f"{owner}: options must be a mapping of option names to values, got {value!r}")
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(value) - set(known))
    if unknown:
        has = f"its options are {', '.join(known)}" if known else "it has no options"
        raise TransactError(f"{owner} has no option {unknown[0]!r} ({has})")
    try:
        return cls(**value)
    except TransactError as e:
        raise TransactError(f"{owner}: {e}") from None


def options_json(options: Any) -> dict[str, Any]:
    """An options value as the JSON a plan records."""
    return asdict(options)


def defaults(cls: type) -> dict[str, Any]:
    """Each option's default (for help texts)."""
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}
