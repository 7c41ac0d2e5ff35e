"""Argument checks, one module for all (the drafters' options, the engine's and the batch
scheduler's limits, the server's, the sampling settings, the benchmark's): a bad value is an
``InvalidArgument`` naming the argument and saying what was expected."""

from __future__ import annotations

import math

from .errors import InvalidArgument


def integer(name: str, value, minimum: int = 1, meaning: str = "") -> int:
    """``value`` if it is an integer >= ``minimum`` (``meaning``: what it stands for, said in the
    error, e.g. "0 = off")."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise InvalidArgument(name, f"expected {what}{f' ({meaning})' if meaning else ''}, got {value!r}")
    return value


def number(name: str, value, low: float = 0.0, high: float = math.inf, *, open_low: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and value <= high
    if not ok:
        bracket = "(" if open_low else "["
        upper = "inf)" if high == math.inf else f"{high}]"
        raise InvalidArgument(name, f"expected a number in {bracket}{low}, {upper}, got {value!r}")
    return float(value)


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(name, f"expected true or false, got {value!r}")
    return value


SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def size(name: str, value) -> int:
    """A memory size: a positive integer of bytes, or text such as ``4GiB``, ``512MB``, ``1.5 GiB``."""
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(digits):]
        try:
            if unit not in SIZE_UNITS:
                raise ValueError
            value = int(float(digits) * SIZE_UNITS[unit])
        except ValueError:
            raise InvalidArgument(name, f"expected a size such as 4GiB, 512MiB or a number of bytes, got {value!r}") from None
    return integer(name, value)

