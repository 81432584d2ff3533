"""The in-memory back end: the whole image as one numpy array.

Every operation of :class:`~skymap.backends.base.ArrayBackend` on one piece, with the
memory care of a large image: the masks the history keeps are bit-packed, the change
is measured on a quarter subsample by a compiled kernel, and the noise map is floored
in place.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from skymap._inputs import Normalisation
from skymap._validate import as_image, as_mask, combine_masks
from skymap.backends import _memory_kernels as _k
from skymap.backends.base import CHANGE_STEP, extent_of, valid_blocks

__all__ = ["MemoryBackend", "floor_at_half_median"]


def floor_at_half_median(values: np.ndarray) -> None:
    """Floor ``values`` in place at half the median of its finite positive values (of
    every ``step``-th of them in C order, ``step = max(1, n // 250_000)``); non-finite
    values become the floor. Nothing changes when no value is finite and positive.

    Examples
    --------
    >>> v = np.array([np.nan, 0.0, 2.0, 4.0, 6.0])
    >>> floor_at_half_median(v); v
    array([2., 2., 2., 4., 6.])
    """
    sample = _k.positive_sample(values, 250_000)
    if sample.size:
        _k.floor_in_place(values, values.dtype.type(0.5 * float(np.median(sample))))


class MemoryBackend:
    """:class:`~skymap.backends.base.ArrayBackend` on ndarrays.

    Parameters
    ----------
    image : array_like (ny, nx)
        Integer input becomes float32; float32 stays float32.
    mask : array_like of bool, optional
        True = excluded; NaN and inf pixels are excluded automatically.
    error : ndarray (ny, nx), optional
        1 sigma per pixel, as :func:`skymap._inputs.read_noise` returns it (float64,
        ``inf`` where a pixel has none: those pixels are excluded). Held as it is.

    Raises
    ------
    ValueError
        For a non-2-D image, a mask or error of another shape, or no valid pixel.

    Examples
    --------
    >>> be = MemoryBackend(np.array([[1.0, np.nan], [3.0, 4.0]]))
    >>> be.nbad, be.first_valid(be.bad), be.median_where(be.image, be.bad)
    (1, 1.0, 3.0)
    """

    tiled = False
    #: Relative inverse variance per pixel (from ``error``, set by the fit), or None.
    weight = None

    def __init__(self, image: Any, mask: Any = None, *, error: np.ndarray | None = None):
        self.image = as_image(image)
        self.bad = combine_masks(self.image, as_mask(mask, self.image.shape))
        self.error = error
        if error is not None:
            if np.shape(error) != self.image.shape:
                raise ValueError(
                    f"error must have the image's shape {self.image.shape}, got {np.shape(error)}"
                )
            self.bad |= ~np.isfinite(error)
        self.given_bad = self.bad
        self.shape = self.image.shape
        self.dtype = self.image.dtype
        self.size = self.image.size
        self.nbad = int(np.count_nonzero(self.bad))
        if self.nbad == self.bad.size:
            raise ValueError("image has no valid pixel: everything is masked or non-finite")
        self._last = None
        self._spare = self._buffer = None

    def normalise(self) -> Normalisation:
        """Replace the image by ``(image - level) / scale`` (a new array; see
        :class:`~skymap._inputs.Normalisation`) and exclude its extreme negative
        pixels; ``given_bad`` keeps the given mask OR non-finite pixels. Returns the
        normalisation, which maps the fit's results back."""
        norm = Normalisation.of(self.image, self.bad)
        self.image, self.bad = norm.apply_excluding(self.image, self.given_bad)
        self.nbad = int(np.count_nonzero(self.bad))
        return norm

    # -- the loop's operations

    def background(self, model, deferred=False):
        if deferred and self._makes_residual(model):
            # The map is read by the residual and the change only: the residual is made
            # from the model in one pass, the change from its subsample (no map).
            return _Deferred(model)
        # The last residual written in place is read no more (the loop's order): a
        # model with new maps writes this one into its memory, which is then not
        # fresh (the system zeroes a fresh image's pages first: ~9 ms at 4096^2).
        buffer, self._buffer = self._buffer, None
        if (
            buffer is not None
            and getattr(model, "new_maps", False)
            and getattr(model, "dtype", None) == buffer.dtype
            and tuple(model.shape) == buffer.shape
            and "out" in inspect.signature(model.background_map).parameters
        ):
            bkg = model.background_map(out=buffer)
        else:
            bkg = model.background_map()
        # A map made for this call alone (the model says new_maps) may take the
        # residual in its place (residual): an image of memory less at the peak.
        self._spare = weakref.ref(bkg) if getattr(model, "new_maps", False) else None
        return bkg

    def _makes_residual(self, model) -> bool:
        return (
            callable(getattr(model, "residual_map", None))
            and getattr(model, "dtype", None) == self.dtype
            and tuple(getattr(model, "shape", ())) == self.shape
        )

    def residual(self, background):
        if isinstance(background, _Deferred):
            # into the last residual's memory, read no more (the loop's order)
            buffer, self._buffer = self._buffer, None
            self._spare = None
            self._buffer = background.model.residual_map(self.image, out=buffer)
            return self._buffer
        spare = None if self._spare is None else self._spare()
        self._spare = None
        if (
            spare is background
            and background.dtype == self.dtype
            and background.shape == self.shape
            and background.flags.writeable
        ):
            self._buffer = background
            return np.subtract(self.image, background, out=background)
        return np.subtract(self.image, background, dtype=self.dtype)

    def fit(self, estimator, mask, **hints):
        return estimator.fit_on(self, mask, **hints)

    def mask(self, masker, residual, noise, window_of=None):
        # A masker that gives the union itself (HysteresisMasker.mask_with) saves the
        # passes that take the bad pixels out of its map and the OR that puts them in.
        union = getattr(masker, "mask_with", None)
        if callable(union):
            return np.asarray(union(residual, noise, self.bad), dtype=bool)
        return self.bad | np.asarray(masker(residual, noise, self.bad), dtype=bool)

    def noise_map(self, model):
        # A fresh map of our own, floored in place: the masked copies and temporaries of
        # a vectorised floor were the fit's memory peak.
        rms = np.ascontiguousarray(model.rms_map())
        if rms.ndim == 0:
            return rms  # a positive constant is its own floor
        floor_at_half_median(rms)
        return rms

    def change(self, background, model, previous, noise, noise_model):
        sigma, q = noise_model.grid(noise)
        # new - old at the subsample, in the memory of a subsample made for this call
        # (not in a second fresh one)
        step = CHANGE_STEP
        if isinstance(background, _Deferred):
            new = model.background_map(step)
            if not (getattr(model, "new_maps", False) and new.flags.writeable):
                diff = np.subtract(new, previous.background_map(step))
            elif self._makes_residual(previous):
                diff = previous.residual_map(new, step, out=new)
            else:
                diff = np.subtract(new, previous.background_map(step), out=new)
        else:
            old = previous.background_map(step)
            own = getattr(previous, "new_maps", False) and old.flags.writeable
            diff = np.subtract(background[::step, ::step], old, out=old if own else None)
        return _k.subsampled_change(diff, self.bad, sigma, q, step)

    def mask_stats(self, new):
        # the packed mask, its count and its flips from the last, in one pass
        flips, count, packed = _k.pack_stats(new, self._last)
        self._last = packed
        return flips, count, packed

    def median_where(self, values, excluded):
        # The selection is a fresh copy: the median may partition it in place.
        return float(np.median(np.asarray(values)[~excluded], overwrite_input=True))

    def any_nonfinite(self, array) -> bool:
        return not np.isfinite(array).all()

    def valid_blocks(self, q: int) -> np.ndarray:
        return valid_blocks(self.bad, q)

    def valid_extent(self) -> tuple[int, int]:
        return extent_of(self.given_bad.all(axis=1), self.given_bad.all(axis=0))

    def result(self, array):
        return array

    def result_rms(self, model) -> None:
        return None  # the result interpolates the model's RMS on first access

    # -- primitives

    def gather(self, array) -> np.ndarray:
        return array

    def subsample(self, array, step: int) -> np.ndarray:
        return array[::step, ::step]

    def first_valid(self, mask) -> float:
        return float(self.image[~mask][0])

    def cell_grid(self, func: Callable, arrays: Sequence, block, layers, **kw):
        return func(*arrays, origin=(0, 0), **kw)

    def cell_grid_bands(
        self, func: Callable, arrays: Sequence, block, layers, digest, band_layers=None, **kw
    ):
        grid = func(*arrays, origin=(0, 0), **kw)
        band = grid if band_layers is None else grid[:band_layers]
        return digest(grid, origin=(0, 0)), lambda k: band, [(0, grid.shape[1])]

    def map_tiles(self, func: Callable, arrays: Sequence, *, halo: int = 0, dtype=None, **kw):
        whole = ((0, self.shape[0]), (0, self.shape[1]))
        return func(*arrays, window=whole, core=whole, **kw)

    def median(self, values: Callable, arrays: Sequence, **kw) -> float:
        whole = ((0, self.shape[0]), (0, self.shape[1]))
        return float(np.median(values(*arrays, window=whole, **kw)))


class _Deferred:
    """A background map not made: its model, whose ``residual_map`` gives the
    residual (:meth:`MemoryBackend.background` with ``deferred``)."""

    __slots__ = ("model",)

    def __init__(self, model):
        self.model = model
