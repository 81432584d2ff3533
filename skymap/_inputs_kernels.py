"""Compiled kernels for :mod:`skymap._inputs`. Not public: call through _inputs.py."""

from __future__ import annotations

import numpy as np
from numba import njit

from skymap._util import in_bands


def normalised_into(image, level, inv, clip, out):
    """``out = (image - level) * inv``, clipped at +/- ``clip`` where ``image`` is
    finite, in ``out``'s dtype (``image``'s: float32 or float64, C-contiguous, 2-D),
    with numpy's operations in numpy's order: the values of
    :meth:`~skymap._inputs.Normalisation.apply`'s passes in one."""
    t = out.dtype.type
    in_bands(_normalised, image.shape[0], image, t(level), t(inv), t(clip), out, grain=32)
    return out


@njit(cache=True, nogil=True)
def _normalised(image, level, inv, clip, out, lo, hi):  # pragma: no cover - compiled
    for y in range(lo, hi):
        src, dst = image[y], out[y]
        for x in range(src.size):
            v = src[x]
            w = (v - level) * inv
            if np.isfinite(v):
                w = min(max(w, -clip), clip)
            dst[x] = w
