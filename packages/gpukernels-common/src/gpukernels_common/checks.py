"""Argument checks shared by the packages' constructors, so every package words them alike."""

from __future__ import annotations

import numbers


def check_sizes(minimum: int = 1, **sizes) -> None:
    """Each size an int >= `minimum` (bool refused), else a ValueError naming it. Checked at
    construction: a 0 or float size would fail later with an unrelated error (a bare TypeError
    from `torch.empty`, a ZeroDivisionError in an initialisation)."""
    for name, value in sizes.items():
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
