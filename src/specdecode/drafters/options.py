"""Checks for options (the drafters', the batch scheduler's, the server's): a bad value is an
``InvalidArgument`` naming the option."""

from __future__ import annotations

import math

from ..errors import InvalidArgument


def integer(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgument(name, f"expected an integer >= {minimum}, got {value!r}")
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
