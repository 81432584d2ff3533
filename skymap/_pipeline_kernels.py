"""Compiled kernels for :mod:`skymap.pipeline`. Not public: call through pipeline.py."""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, nogil=True, parallel=True)
def masked_block_sums(values, excluded, b, noise2):  # pragma: no cover - compiled
    """Sums over b x b blocks of the valid ``values``, of the valid-pixel count, and of
    the valid ``noise2`` (a map of the values' shape, or shape (1, 1) for a constant).
    Partial blocks at the far edges sum what they hold."""
    ny, nx = values.shape
    gy = (ny + b - 1) // b
    gx = (nx + b - 1) // b
    num = np.zeros((gy, gx), np.float32)
    cnt = np.zeros((gy, gx), np.float32)
    var = np.zeros((gy, gx), np.float32)
    scalar = noise2.shape[0] == 1 and noise2.shape[1] == 1
    for by in prange(gy):
        for y in range(by * b, min(ny, (by + 1) * b)):
            for x in range(nx):
                if not excluded[y, x]:
                    bx = x // b
                    num[by, bx] += values[y, x]
                    cnt[by, bx] += 1.0
                    if not scalar:
                        var[by, bx] += noise2[y, x]
        if scalar:
            for bx in range(gx):
                var[by, bx] = cnt[by, bx] * noise2[0, 0]
    return num, cnt, var
