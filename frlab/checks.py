"""Argument checks with one-line messages: a hyper-parameter of the wrong type or outside its range
fails where it is given, not steps later inside a kernel.

    s = number("s", s, above=0)                    # a float > 0
    m = number("m", m, lo=0, hi=math.pi / 2)       # a float in [0, pi/2]
    k = integer("k", k, lo=1, hi=num_classes - 1)  # an int in [1, C - 1]
    mode = choice("form", form, ("code", "paper"))
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any


def _where(lo, hi, above, below) -> str:
    left = f"({above}" if above is not None else (f"[{lo}" if lo is not None else "(-inf")
    right = f"{below})" if below is not None else (f"{hi}]" if hi is not None else "inf)")
    return f"{left}, {right}"


def number(
    name: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    above: float | None = None,
    below: float | None = None,
    finite: bool = True,
) -> float:
    """`value` as a finite float (with `finite` False: or an infinite one, never NaN) within
    [lo, hi] (or the open bounds `above` / `below`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)):
        raise ValueError(f"{name} must be {'finite' if finite else 'a number, not NaN'}, got {value}")
    if (
        (lo is not None and value < lo)
        or (hi is not None and value > hi)
        or (above is not None and value <= above)
        or (below is not None and value >= below)
    ):
        raise ValueError(f"{name} must lie in {_where(lo, hi, above, below)}, got {value:g}")
    return value


def integer(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """`value` as an int within [lo, hi] (bools and floats are refused, even 3.0)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must lie in {_where(lo, hi, None, None)}, got {value}")
    return value


def choice(name: str, value: Any, options: Iterable[str]) -> str:
    """`value` if it is one of `options`."""
    options = tuple(options)
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value


def flag(name: str, value: Any) -> bool:
    """`value` if it is a bool (1 and 0 are not)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value
