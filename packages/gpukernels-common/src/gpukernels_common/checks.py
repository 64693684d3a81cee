"""Argument checks shared by the packages' constructors, so every package words them alike."""

from __future__ import annotations

import math
import numbers


def check_sizes(minimum: int = 1, **sizes) -> tuple[int, ...]:
    """Each size an integer >= `minimum` (Python or numpy; bool refused), else a ValueError naming
    it; returned as Python ints in the order given (a numpy int would not go into a JSON config).
    Checked at construction: a 0 or float size would fail later with an unrelated error (a bare
    TypeError from `torch.empty`, a ZeroDivisionError in an initialisation)."""
    for name, value in sizes.items():
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return tuple(int(value) for value in sizes.values())


def check_numbers(minimum: float, *, above: bool = False, **values) -> None:
    """Each value a finite real number >= `minimum` (> with `above`; bool refused), else a
    ValueError naming it: a NaN or inf coefficient spreads silently, a string fails later."""
    relation = ">" if above else ">="
    for name, value in values.items():
        if (not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value)
                or not (value > minimum if above else value >= minimum)):
            raise ValueError(f"{name} must be a finite number {relation} {minimum:g}, got {value!r}")
