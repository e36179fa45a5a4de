"""Validation of recipe values: each failure names the recipe key, as written in a YAML recipe."""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

from transact.errors import TransactError


def fail(key: str, message: str) -> TransactError:
    return TransactError(f"recipe key {key!r}: {message}")


def check_int(key: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise fail(key, f"must be an integer >= {minimum}, got {value!r}")
    return value


def check_float(key: str, value: Any, low: float = 0.0, high: float = math.inf, *, open_low: bool = False) -> float:
    """A finite number in [low, high] (or (low, high] with ``open_low``); numeric strings such as '1e-4'
    are accepted because YAML 1.1 reads exponents without a dot as strings."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise fail(key, f"must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise fail(key, f"must be a finite number, got {value!r}")
    if value < low or value > high or (open_low and value == low):
        bound = f"{'(' if open_low else '['}{low}, {high}]"
        raise fail(key, f"must lie in {bound}, got {value}")
    return float(value)


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise fail(key, f"must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_str(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise fail(key, f"must be a non-empty string, got {value!r}")
    return value


def fields_from(cls: type, data: Any, prefix: str, also: tuple[str, ...] = ()) -> dict[str, Any]:
    """``data`` as keyword arguments of dataclass ``cls`` (and the keys ``also`` names); unknown keys are errors
    that name them."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise fail(prefix, f"must be a mapping, got {data!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known - set(also))
    if unknown:
        raise fail(f"{prefix}.{unknown[0]}", f"unknown key (known under {prefix!r}: {', '.join(sorted(known))})")
    return dict(data)
