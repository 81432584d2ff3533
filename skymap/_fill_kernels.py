"""Compiled stack fills shared by the maskers' and the tiled back end's labelling (both
layers import this module; it imports nothing from skymap). Not public."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def grown_to(stack, n):  # pragma: no cover - compiled
    """A stack twice as long holding the first ``n`` entries of ``stack``."""
    bigger = np.empty(2 * stack.size, stack.dtype)
    bigger[:n] = stack[:n]
    return bigger


@njit(cache=True, nogil=True)
def fill_stack(region, labels, ny, nx, label, stack, n):  # pragma: no cover - compiled
    """Pops the first ``n`` entries of a fill's ``stack`` (the tiled back end's join
    labels, the halo masker's ``label8``) and pushes the unlabelled ``region`` pixels
    next to them, labelled ``label``, until it is empty (returns 0) or could overflow
    (returns the count left). The stack is never reassigned here: the loop then holds
    no reference counting (which costs more than the fill)."""
    while n:
        if n + 8 > stack.size:
            return n
        n -= 1
        i = stack[n]
        y = i // nx
        x = i - y * nx
        if 0 < y < ny - 1 and 0 < x < nx - 1:
            for j0 in (i - nx - 1, i - 1, i + nx - 1):
                for j in range(j0, j0 + 3):
                    if region[j] and labels[j] == 0:
                        labels[j] = label
                        stack[n] = j
                        n += 1
            continue
        for yy in range(max(0, y - 1), min(ny, y + 2)):
            for xx in range(max(0, x - 1), min(nx, x + 2)):
                j = yy * nx + xx
                if region[j] and labels[j] == 0:
                    labels[j] = label
                    stack[n] = j
                    n += 1
    return 0


@njit(cache=True, nogil=True)
def fill(region, labels, ny, nx, i, label, stack):  # pragma: no cover - compiled
    """Label ``label`` on pixel ``i`` and the pixels 8-connected to it through
    ``region`` that have none yet; returns the stack (grown if it had to be)."""
    labels[i] = label
    stack[0] = i
    n = 1
    while n:
        n = fill_stack(region, labels, ny, nx, label, stack, n)
        if n:
            stack = grown_to(stack, n)
    return stack
