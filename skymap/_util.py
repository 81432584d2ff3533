"""Helpers shared across skymap's subpackages: constants and small checks.

Private to the package (every name here is public inside skymap, no module imports
another module's underscore names instead).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["MAD_TO_STD", "check_int", "cut_window", "pow2_at_most"]

#: 1 / Phi^-1(3/4): median absolute deviation -> standard deviation of a Gaussian (the
#: constant astropy uses). The one definition in the package.
MAD_TO_STD = 1.482602218505602


def check_int(name: str, value: Any, *, minimum: int = 1, allow_none: bool = False):
    """``value`` if it is an integer (any integral number) >= ``minimum``, else a
    ValueError naming ``name``.

    Examples
    --------
    >>> check_int("max_iter", 3)
    3
    >>> check_int("max_iter", 0)
    Traceback (most recent call last):
    ...
    ValueError: max_iter must be an integer >= 1, got 0
    """
    if value is None and allow_none:
        return value
    try:
        ok = int(value) == value and value >= minimum
    except (TypeError, ValueError):
        ok = False
    if not ok:
        what = f"None or an integer >= {minimum}" if allow_none else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def pow2_at_most(value: float, *limits: int) -> int:
    """Largest power of two <= ``value`` (at least 1, at most ``min(limits)``).

    Examples
    --------
    >>> pow2_at_most(7.9), pow2_at_most(0.3), pow2_at_most(64, 20)
    (4, 1, 20)
    """
    b = 1 << max(0, int(math.floor(math.log2(max(value, 1.0)))))
    return max(1, min((b, *limits)))


def cut_window(a, step: int = 1, window=None):
    """``a[y0:y1:step, x0:x1:step]`` for ``window`` = ((y0, y1), (x0, x1)) (None: the
    whole array): the part of a full map that a window of it at ``step`` holds.

    Examples
    --------
    >>> import numpy as np
    >>> cut_window(np.arange(12).reshape(3, 4), 2, ((1, 3), (0, 4)))
    array([[4, 6]])
    """
    if window is not None:
        (y0, y1), (x0, x1) = window
        a = a[y0:y1, x0:x1]
    return a[::step, ::step] if step > 1 else a
