"""The back-end interface: the pixel operations :meth:`IterativeBackground.fit
<skymap.background.pipeline.IterativeBackground.fit>` needs, whatever holds the pixels.

The loop is written once, against :class:`ArrayBackend`; a back end decides where the
pixels live and how a full-resolution step runs: :class:`~skymap.backends.memory.MemoryBackend`
on numpy arrays in one piece, :class:`~skymap.backends.dask.DaskBackend` tile by tile
with halos, finishing its global reductions (exact medians, noise excess, labels joined
across tiles) in the driver. The arrays the loop passes around (image, masks,
residuals) are the back end's own ("native": ndarray or dask array); what comes back to
the loop is small (models on cell grids, scalars, subsamples).

Components take part through small protocols, so that a user's masker or estimator
runs in every back end without back-end code of its own:

* an estimator with ``fit_on(backend, mask, *, start_scale, min_scale)`` builds its fit
  from the back end's primitives (:meth:`ArrayBackend.subsample`,
  :meth:`ArrayBackend.cell_grid`, :meth:`ArrayBackend.map_tiles`,
  :meth:`ArrayBackend.median`); any other estimator is fitted on the gathered image;
* a masker is called per tile on a window grown by its declared :meth:`TileMasker.halo`
  (:class:`TileMasker`), or drives the back end itself for the steps that are global
  (:class:`SplitMasker`: e.g. the hysteresis masker's noise excess and labelling), or
  has one global step on binned data between local ones (:class:`BinnedStepMasker`:
  the back end bins, the masker only computes); any other masker is called on the
  gathered residual.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from skymap._inputs import valid_bounds
from skymap._util import in_bands
from skymap.backends._memory_kernels import block_sums_small

__all__ = [
    "ERROR_BLOCK",
    "ArrayBackend",
    "BinnedStepMasker",
    "NativeMaps",
    "SplitMasker",
    "TileMasker",
    "Tileable",
    "Window",
    "block_sums",
    "extent_of",
    "valid_blocks",
]

#: ((y0, y1), (x0, x1)): the pixel rows and columns of a tile or of its grown window.
Window = tuple[tuple[int, int], tuple[int, int]]

#: Block (pixels) in which the pipeline sums an error map for the maskers' noise (at
#: most this, a power of two, on small images): a tiled back end given an error map
#: aligns its tiles to it.
ERROR_BLOCK = 4


#: Stride of the subsample on which :meth:`ArrayBackend.change` compares two
#: backgrounds: they are smooth over tens of pixels, so every 4th pixel along each axis
#: (1/16 of them) measures the RMS of their difference as well as all of them.
CHANGE_STEP = 4


def extent_of(rows_bad, cols_bad) -> tuple[int, int]:
    """Height and width of the bounding box of the valid pixels, from which rows and
    which columns are wholly bad (1-D bool); the whole shape when none is valid.

    Examples
    --------
    >>> extent_of(np.array([True, False, False, True]), np.array([False, True, False]))
    (2, 3)
    """
    box = valid_bounds(rows_bad, cols_bad)
    if box is None:
        return len(rows_bad), len(cols_bad)
    return box[0].stop - box[0].start, box[1].stop - box[1].start


@runtime_checkable
class ArrayBackend(Protocol):
    """Where the pixels of one fit live, and the operations on them.

    Attributes
    ----------
    shape : (int, int)
        The image's shape.
    dtype : numpy.dtype
        Its working float dtype.
    image, bad
        The working image and its bad-pixel mask (given mask OR non-finite, and after
        :meth:`normalise` the image's extreme negative pixels), native.
    given_bad
        The given mask OR the non-finite pixels (of the image and of ``error``), native.
    error
        1 sigma per pixel in the image's units (float64, ``inf`` where a pixel has
        none), native, or None: the error map given to the fit.
    weight
        Relative inverse variance per pixel (native, float32), or None: set by the fit
        from ``error`` (the smoothers weight their cells by it).
    size : int
        Number of pixels.
    nbad : int
        Number of bad pixels.
    tiled : bool
        Whether full-resolution steps run tile by tile (False: one piece).
    """

    shape: tuple[int, int]
    dtype: np.dtype
    image: Any
    bad: Any
    given_bad: Any
    error: Any
    weight: Any
    size: int
    nbad: int
    tiled: bool

    def normalise(self) -> Any:
        """Make ``image`` the normalised copy ``(image - level) / scale`` and exclude
        its extreme negative pixels from ``bad``; returns the
        :class:`~skymap._inputs.Normalisation` (called once, before the fit)."""

    # -- the loop's operations

    def background(self, model: Any, deferred: bool = False) -> Any:
        """``model``'s full background map, native (lazy for a tiled back end).
        ``deferred``: the loop reads the map only through :meth:`residual` and
        :meth:`change`, so a back end may return a stand-in that they read (the
        in-memory one makes the residual from the model in one pass)."""

    def residual(self, background: Any) -> Any:
        """``image - background`` in the image's dtype, native. The loop reads
        ``background`` no more: a back end may write the residual into it (the
        in-memory one does, for a map it made from a model with ``new_maps``). The loop
        reads the residual no more once the next :meth:`background` is asked for: a
        back end may write that map into the residual (the in-memory one does)."""

    def fit(self, estimator: Any, mask: Any, **hints: Any) -> Any:
        """``estimator`` fitted to the image with ``mask`` (True = excluded)."""

    def mask(self, masker: Any, residual: Any, noise: Any, window_of: Callable) -> Any:
        """``bad | masker(residual, noise, bad)``, native. ``window_of(noise, window)``
        cuts the working noise to a window, for maskers run per tile."""

    def noise_map(self, model: Any) -> Any:
        """``model``'s RMS map, floored at half the median of its finite positive
        values (an object that rebuilds any window of it, for a tiled back end)."""

    def change(
        self, background: Any, model: Any, previous: Any, noise: Any, noise_model: Any
    ) -> float:
        """RMS over the valid pixels of ``[::CHANGE_STEP, ::CHANGE_STEP]`` of
        ``(model's background - previous's background) / noise`` (``background`` is
        the model's native map).
        ``noise_model`` reads the working ``noise``: ``grid(noise)`` -> (float32
        values, block) for the compiled kernel, ``window(noise, window, step)``."""

    def mask_stats(self, new: Any) -> tuple[int, int, Any]:
        """(pixels that changed state since the last mask given here, pixels
        excluded, what the history keeps of ``new``); ``new`` becomes the last mask."""

    def median_where(self, values: Any, excluded: Any) -> float:
        """Exact ``np.median`` of ``values`` (a native map, or what :meth:`noise_map`
        returned) over the pixels not ``excluded``."""

    def any_nonfinite(self, array: Any) -> bool:
        """Whether the native ``array`` holds a NaN or an infinity."""

    def valid_extent(self) -> tuple[int, int]:
        """Height and width of the bounding box of the pixels not ``given_bad``
        (:func:`extent_of`)."""

    def valid_blocks(self, q: int) -> np.ndarray:
        """Which ``q`` x ``q`` blocks hold a pixel that is not bad (see
        :func:`valid_blocks`)."""

    def result(self, array: Any) -> Any:
        """A final map as the caller gets it (ndarray, or a lazy dask array)."""

    def result_rms(self, model: Any) -> Any:
        """The final RMS map as the caller gets it, or None to let the result
        interpolate it from ``model`` on first access."""

    # -- primitives the components build on

    def gather(self, array: Any) -> np.ndarray:
        """A native array as one ndarray (for pieces that only work on a whole image)."""

    def subsample(self, array: Any, step: int) -> np.ndarray:
        """``array[::step, ::step]`` as an ndarray."""

    def first_valid(self, mask: Any) -> float:
        """The image's first pixel not ``mask`` in C order."""

    def cell_grid(
        self, func: Callable, arrays: Sequence, block: tuple[int, int], layers: int, **kw
    ) -> Any:
        """``func(*arrays, origin=(y0, x0), **kw)`` per tile, grids side by side: the
        tiles are aligned to ``block`` and ``func`` returns a float64 (layers, gy, gx)
        array per tile."""

    def cell_grid_bands(
        self, func: Callable, arrays: Sequence, block: tuple[int, int], layers: int,
        digest: Callable, band_layers: int | None = None, **kw,
    ) -> tuple[np.ndarray, Callable, list]:  # fmt: skip
        """:meth:`cell_grid` kept where it is made, for a reader that needs the whole
        grid only in bands: ``(digest(grid, origin=(y0, x0)) of the tiles side by side,
        read(k), rows)``, where ``read(k)`` gives the grid's band ``k`` (its first
        ``band_layers`` layers, None: all), its block rows ``rows[k]`` = (r0, r1) (the
        bands in order, covering the grid). On tiles a band is at most a row of tiles:
        the driver holds the small digest and one band at a time, never the grid."""

    def map_tiles(self, func: Callable, arrays: Sequence, *, halo: int, dtype, **kw) -> Any:
        """``func(*windows, window=, core=, **kw)`` per tile, native: each array read
        over the tile grown by ``halo`` pixels (cut at the image's edges); ``func``
        returns the values of its ``core``."""

    def median(self, values: Callable, arrays: Sequence, **kw) -> float:
        """Exact ``np.median`` of the values ``values(*blocks, window=, **kw)`` of all
        tiles."""


@runtime_checkable
class NativeMaps(Protocol):
    """A model whose background map is already a back end's array (made per tile, e.g.
    a ring median): ``native_background()`` returns it, and a tiled back end uses it
    as it is instead of evaluating the model per tile."""

    def native_background(self) -> Any: ...


@runtime_checkable
class Tileable(Protocol):
    """A piece that sums pixels in blocks: tiles must be aligned to ``tile_unit``."""

    def tile_unit(self, shape: tuple[int, int]) -> tuple[int, int]: ...


@runtime_checkable
class TileMasker(Protocol):
    """A masker whose detections at a pixel depend only on the residual, noise and mask
    within ``halo(shape)`` pixels of it: a tiled back end calls it per tile on the tile
    grown by that halo, and keeps the tile's core."""

    def __call__(self, residual: Any, rms: Any, mask: Any = None) -> np.ndarray: ...

    def halo(self, shape: tuple[int, int]) -> int: ...


@runtime_checkable
class BinnedStepMasker(Protocol):
    """A masker with one global step on binned data, then a local one: a tiled back
    end gathers the masked block sums of the residual (:func:`block_sums` over blocks
    of ``block(shape)`` pixels, tiles aligned to them) into the driver, calls
    ``global_step(sums, counts)`` there once, and runs ``local_step(residual, rms,
    mask, state)`` per tile on a window grown by ``halo(shape)``. Its ``__call__`` must
    do the same on the whole image, with the residual's non-finite pixels and ``mask``
    excluded from the sums, for the back ends to agree bit for bit."""

    def __call__(self, residual: Any, rms: Any, mask: Any = None) -> np.ndarray: ...

    def halo(self, shape: tuple[int, int]) -> int: ...

    def block(self, shape: tuple[int, int]) -> int: ...

    def global_step(self, sums: np.ndarray, counts: np.ndarray) -> Any: ...

    def local_step(self, residual: Any, rms: Any, mask: Any, state: Any) -> np.ndarray: ...


@runtime_checkable
class SplitMasker(Protocol):
    """A masker with global steps (a statistic of the whole image, labels of regions of
    any size): ``mask_on`` drives the back end's primitives itself and returns
    ``excluded`` OR its detections, native (``excluded``: the bad pixels and the
    residual's non-finite ones; ``window_of(noise, window)`` cuts the noise to a
    tile's window). A back end in one piece calls the masker itself instead.
    ``tile_unit`` aligns the tiles to its binning blocks."""

    def __call__(self, residual: Any, rms: Any, mask: Any = None) -> np.ndarray: ...

    def mask_on(
        self, backend: Any, residual: Any, noise: Any, excluded: Any, window_of: Callable
    ) -> Any: ...

    def tile_unit(self, shape: tuple[int, int]) -> tuple[int, int]: ...


def block_sums(
    values: np.ndarray, excluded: np.ndarray, b: int, origin=(0, 0), minus=None, out=None
):
    """Sums (float64) and counts of the ``values`` not ``excluded`` in ``b`` x ``b``
    blocks, stacked as a (2, gy, gx) array; partial blocks at the far edges sum what
    they hold. Each block is summed in the same order wherever it lies, so the block
    sums of tiles aligned to ``b`` are those of the whole image, bit for bit
    (``origin``, the tile's place, is not needed: the signature of
    :meth:`ArrayBackend.cell_grid`'s functions). ``minus``, if given, is subtracted
    from ``values`` first (in their dtypes: ``values - minus``, without the copy);
    ``out``, if given, a float64 array of the result's shape, receives it.

    Examples
    --------
    >>> v = np.arange(12.0).reshape(3, 4); ex = np.zeros(v.shape, bool); ex[0, 0] = True
    >>> block_sums(v, ex, 2)
    array([[[10., 18.],
            [17., 21.]],
    <BLANKLINE>
           [[ 3.,  4.],
            [ 2.,  2.]]])
    """
    ny, nx = values.shape
    gy, gx = -(-ny // b), -(-nx // b)
    excluded = np.asarray(excluded, bool)
    native = (np.dtype(np.float32), np.dtype(np.float64))
    if b < 8 and values.dtype in native and (minus is None or np.asarray(minus).dtype in native):
        # compiled, in numpy's order, without the float64 copies (16 bytes a pixel)
        sums = np.empty((2, gy, gx)) if out is None else out
        other = np.zeros((1, 1), values.dtype) if minus is None else np.asarray(minus)
        in_bands(block_sums_small, gy, values, other, excluded, b, sums, grain=64)
        return sums
    if minus is not None:
        values = np.subtract(values, minus)
    pad = np.zeros((2, gy * b, gx * b))
    ok = ~excluded
    pad[0, :ny, :nx] = np.where(ok, values, 0.0)
    pad[1, :ny, :nx] = ok
    # along x within each row (contiguous), then along y: one order for every block
    rows = pad.reshape(2, gy * b, gx, b).sum(axis=3)
    return rows.reshape(2, gy, b, gx).sum(axis=2, out=out)


def valid_blocks(bad: np.ndarray, q: int) -> np.ndarray:
    """Which ``q`` x ``q`` blocks of ``bad`` hold a pixel that is not bad (partial
    blocks at the far edges count what they hold).

    Examples
    --------
    >>> bad = np.ones((3, 5), bool); bad[2, 4] = False
    >>> valid_blocks(bad, 2).astype(int)
    array([[0, 0, 0],
           [0, 0, 1]])
    """
    ny, nx = bad.shape
    # "all bad" over q rows (contiguous: fast), then over q columns of the small result
    fy, fx = ny // q * q, nx // q * q
    rows = np.logical_and.reduce(bad[:fy].reshape(ny // q, q, nx), axis=1)
    if fy < ny:
        rows = np.vstack([rows, bad[fy:].all(axis=0, keepdims=True)])
    out = np.logical_and.reduce(rows[:, :fx].reshape(rows.shape[0], nx // q, q), axis=2)
    if fx < nx:
        out = np.hstack([out, rows[:, fx:].all(axis=1, keepdims=True)])
    return ~out
