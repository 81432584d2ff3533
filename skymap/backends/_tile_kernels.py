"""Compiled kernels of the dask back end's tile tasks (:mod:`skymap.backends._tile_tasks`)."""

from __future__ import annotations

import numpy as np
from numba import njit


def kept_labels(labels, keep) -> np.ndarray:
    """``keep[labels]`` (a new bool array) for a 2-D int ``labels`` map, each label in
    ``range(keep.size)``: a plain loop over the pixels, ~3.5 times faster than numpy's
    fancy indexing (which gathers through a general index path), strided views
    included."""
    return _kept_labels(labels, keep, np.empty(labels.shape, bool))


@njit(cache=True, nogil=True)
def _kept_labels(labels, keep, out):  # pragma: no cover - compiled
    ny, nx = labels.shape
    for y in range(ny):
        row = labels[y]
        orow = out[y]
        for x in range(nx):
            orow[x] = keep[row[x]]
    return out
