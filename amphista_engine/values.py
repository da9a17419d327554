"""Type tests for values users pass in: Python's bool is an int (True would pass as 1 head, 1 layer, a seed),
so every integer or number check in the package goes through here."""
from __future__ import annotations

import math
import numbers


def is_int(x) -> bool:
    """A Python int, not a bool."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_integral(x) -> bool:
    """Any integer type (numpy's too, as metadata readers return them), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_real(x, finite: bool = True) -> bool:
    """A real number of any type (numpy's too), not a bool; finite unless finite=False (the caller names it)."""
    if not isinstance(x, numbers.Real) or isinstance(x, bool):
        return False
    try:
        return not finite or math.isfinite(x)
    except OverflowError:       # an int past a float's range (10**400): a number, but no finite float
        return False
