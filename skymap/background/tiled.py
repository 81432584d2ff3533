"""One image larger than memory through :func:`skymap.fit`'s pipeline, tile by tile.

:func:`tiled_fit` runs the default pipeline (thin-plate smoothers and hysteresis
maskers, a thin-plate or ring-median first guess) on an image held as a ``dask.array``
or a memory map. Cells are summed per tile and solved on the small cell grid in the
driver; the masker's local steps (:meth:`~skymap.hysteresis.HysteresisMasker.scale_maps`,
the dilation) run per tile with halos sized from its kernels; its global steps (the
noise excess from the very same pixel pairs, the reference level, exact medians) are
finished in the driver from small per-tile summaries, and the detections are labelled
per tile and joined across tiles with scipy's connected components. Background and
masks equal the in-memory fit bit for bit. :mod:`skymap.distributed` has the clusters
and the tiled mesh background this builds on.
"""

from __future__ import annotations

import functools
import logging
import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from skymap._validate import as_mask, as_pair, combine_masks, work_dtype
from skymap.backends.distributed import _aligned_chunks
from skymap.background.normalise import Normalisation
from skymap.background.pipeline import (
    IterativeBackground,
    RingMedianGuess,
    _IterationFields,
    _working_rms,
    default_pipeline,
)
from skymap.background.smooth import (
    SmoothResult,
    ThinPlateSmoother,
    cell_sums,
    reference_level,
    reference_step,
    upsample,
)
from skymap.masking.hysteresis import (
    _MAD_TO_STD,
    CoarseRMS,
    HysteresisMasker,
    _gaussian_kernel,
    _noise_step,
    _pow2_at_most,
    _ScaleMaps,
)
from skymap.stats.filters import ring_footprint, ring_median

__all__ = ["TiledFitResult", "TiledIteration", "tiled_fit"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- tiled fit


def _one_thread(func):
    """Run a tile task's numba kernels on one thread: the parallelism of a tiled run is
    the cluster's (workers x threads); kernels that also spread over every core
    oversubscribe it (measured: 1.7x slower on 2 cores with 2 worker processes)."""

    @functools.wraps(func)
    def task(*args, **kwargs):
        import numba

        threads = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            return func(*args, **kwargs)
        finally:
            numba.set_num_threads(threads)

    return task


@dataclass(frozen=True, kw_only=True, eq=False)
class TiledIteration(_IterationFields):
    """One iteration of a :func:`tiled_fit`: the scalar fields of
    :class:`~skymap.pipeline.IterationRecord` and the estimator's (small, grid-level)
    result; the iteration's full-resolution maps are not kept."""


@dataclass(frozen=True, kw_only=True, eq=False)
class TiledFitResult:
    """What :func:`tiled_fit` found: the fields of a
    :class:`~skymap.pipeline.BackgroundResult`, with dask arrays for the maps.

    Attributes
    ----------
    background, rms : dask.array.Array
        Final background and its RMS, evaluated lazily tile by tile from the final
        thin-plate grid (each tile exactly as the in-memory map's).
    mask, bad_mask : dask.array.Array of bool
        Everything the final fit excluded, and the given mask OR non-finite pixels
        (True = excluded); persisted on the cluster.
    history : tuple of TiledIteration
        Every iteration, first guess included.
    config : IterativeBackground
        The pipeline that ran.
    noise : float
        Median of the final working RMS over the valid pixels (exact).
    converged : bool
        Whether the last stage met its tolerances before ``max_iter``.
    tile : (int, int)
        Tile shape in pixels (the last tile of each axis may be shorter).
    halo : int
        Largest halo in pixels read around a tile (see :func:`tiled_fit`).
    """

    background: Any
    rms: Any
    mask: Any
    bad_mask: Any
    history: tuple
    config: IterativeBackground
    noise: float
    converged: bool
    tile: tuple[int, int]
    halo: int

    @property
    def model(self) -> SmoothResult:
        """The final estimator result (cell grid, smoothing, GCV scores)."""
        return self.history[-1].model

    @property
    def source_mask(self):
        """The final detections, ``mask & ~bad_mask`` (lazy)."""
        return self.mask & ~self.bad_mask


def tiled_fit(
    image: Any,
    mask: Any = None,
    *,
    pipeline: IterativeBackground | None = None,
    tile: int | tuple[int, int] = 1024,
    client: Any = None,
    **options: Any,
) -> TiledFitResult:
    """Run :func:`skymap.fit` (or an :class:`IterativeBackground` of thin-plate
    smoothers and hysteresis maskers, with a thin-plate or ring-median first guess) tile
    by tile on an image held as a dask array (or a memory map).

    The driver holds only small things: cell grids, the strided subsamples the global
    statistics read, per-tile counts and the smoother's solve on the cell grid. Every
    full-resolution step runs tile by tile on the cluster; the masks between iterations
    are persisted there as boolean dask arrays.

    Parameters
    ----------
    image : dask.array.Array, memmap or ndarray (ny, nx)
        The image. A dask array (e.g. ``da.from_zarr``) is rechunked to the tiles; a
        memory map of a whole ``.npy`` or raw file (``np.load(path, mmap_mode="r")``,
        ``np.memmap``) is read tile by tile from its file by the tasks; any other
        array (an astropy memory-mapped ``HDU.data`` view included) is sent to the
        cluster once, so this process reads it whole.
    mask : array-like or dask array of bool, optional
        True = excluded. NaN and inf pixels are excluded automatically.
    pipeline : IterativeBackground, optional
        The pipeline to run; default :func:`skymap.pipeline.default_pipeline` with
        ``options``. Its stage estimators and final refit must be
        :class:`~skymap.smooth.ThinPlateSmoother` s, its first guess one too or a
        :class:`~skymap.pipeline.RingMedianGuess`, its maskers
        :class:`~skymap.hysteresis.HysteresisMasker` s.
    tile : int or (int, int)
        Approximate tile shape in pixels, rounded down (but not below) to a multiple of
        the alignment unit (see Notes); an axis shorter than the unit is one tile.
    client : optional
        A ``distributed.Client`` (or any dask scheduler) to run on; default: dask's
        current scheduler. Without a distributed client the persisted masks live in
        this process.
    **options
        Passed to :func:`~skymap.pipeline.default_pipeline` (not allowed with
        ``pipeline``).

    Returns
    -------
    TiledFitResult

    Raises
    ------
    ValueError
        A non-2-D image, a mask of another shape, no valid pixel, ``options`` given
        with ``pipeline``.
    TypeError
        A pipeline with pieces the tiled path cannot split (other estimators or
        maskers).

    Notes
    -----
    What is exact. The background, the masks and the history's mask statistics equal
    the in-memory fit bit for bit: tiles are aligned so that every cell, binning block
    and surround block of the masker lies inside one tile; every local step reads a
    halo wide enough for its kernels; every global statistic reads the same pixels as
    in memory (the reference level's strided subsample, the noise-excess pairs, the
    working RMS's floor sample) and is finished in the driver; the connected regions
    of the hysteresis are labelled per tile and joined across tile boundaries in the
    driver (``scipy.sparse.csgraph.connected_components``), so a region larger than
    any halo is still one region, seeded anywhere. Only the background-change
    statistic is summed tile by tile (a relative difference of ~1e-15, which could
    matter only for a change within that of ``change_tol``).

    Alignment unit, per axis: the least common multiple of 2 (the change statistic's
    ``[::2, ::2]`` subsample), every cell size a smoother may try
    (:meth:`ThinPlateSmoother.cell_sequence`) and ``b * bw`` for every masking scale
    ``s`` (``b = binning(s)``, ``bw`` the surround's block on the binned grid).

    Halo in pixels, the largest over the maskers' scales of

    * maps: ``max(b * r(s / b), b * bw * r(surround * s / (b * bw)))``, the reach of
      the matched filter and of the surround mean, ``r(sigma)`` being the radius of
      the masker's Gaussian kernel of that sigma in its grid's units (``int(3 sigma +
      0.5)``, at least 1);
    * dilation: ``b * (ceil(dilation(s) / b) + 1)``;

    each rounded up to the alignment unit; and for a ring-median first guess, the ring's
    reach ``ring_footprint(radius, width).shape[0] // 2`` (its hole fill and MAD sigma
    are exact medians over the tiles). The noise-excess pairs (``noise_lag`` binned
    pixels apart) read the neighbouring tiles' persisted maps, and the labelling joins
    the tiles' labels, so neither needs a halo. The smoother needs none: its cells are
    summed inside the tiles, and each tile's map is evaluated from the whole (small)
    grid.

    Parallelism is the cluster's: each tile task runs numba's kernels on one thread,
    so give a LocalCluster one worker (process or thread) per core.

    Examples
    --------
    >>> import skymap
    >>> rng = np.random.default_rng(0)
    >>> image = (10 + rng.normal(size=(192, 192))).astype(np.float32)
    >>> image[90:94, 40:44] += 30
    >>> tiled = tiled_fit(image, tile=96)
    >>> ref = skymap.fit(image)
    >>> bool(np.abs(tiled.background.compute() - ref.background).max() <= 1e-6 * ref.noise)
    True
    >>> bool(np.array_equal(tiled.mask.compute(), ref.mask))
    True
    """
    if not hasattr(image, "shape") or not hasattr(image, "dtype"):
        image = np.asarray(image)
    if len(image.shape) != 2:
        raise ValueError(f"image must be 2-dimensional, got shape {image.shape}")
    shape = (int(image.shape[0]), int(image.shape[1]))
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"image must not be empty, got shape {shape}")
    if np.dtype(image.dtype).kind not in "biuf":
        raise TypeError(f"image must hold real numbers (int or float), got dtype {image.dtype}")
    dtype = work_dtype(image.dtype)
    if pipeline is None:
        # default_pipeline only validates its image: a zero-strided stand-in of the
        # right shape and dtype, not the data.
        pipeline = default_pipeline(np.broadcast_to(np.zeros((), dtype), shape), **options)
    elif options:
        raise ValueError(
            f"options {sorted(options)} apply to the default pipeline only, not to an "
            "explicit pipeline"
        )
    _check_tiled_pipeline(pipeline)
    tiling = _Tiling.of(pipeline, shape, as_pair("tile", tile))
    run = _TiledRun(image, mask, pipeline, tiling, dtype, client)
    return run.fit()


def _check_tiled_pipeline(pipeline: Any) -> None:
    if not isinstance(pipeline, IterativeBackground):
        raise TypeError(
            "pipeline must be a skymap.pipeline.IterativeBackground, got "
            f"{type(pipeline).__name__}"
        )
    pieces = [("first_guess", pipeline.first_guess, (ThinPlateSmoother, RingMedianGuess))]
    for i, st in enumerate(pipeline.stages):
        pieces.append((f"stages[{i}].estimator", st.estimator, ThinPlateSmoother))
        pieces.append((f"stages[{i}].masker", st.masker, HysteresisMasker))
    if pipeline.final is not None:
        pieces.append(("final", pipeline.final, ThinPlateSmoother))
    for name, obj, kind in pieces:
        if not isinstance(obj, kind):
            kinds = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise TypeError(
                f"tiled_fit runs {kinds} as {name}, got {type(obj).__name__}; run "
                "this pipeline in memory (IterativeBackground.fit)"
            )


def _surround_block(masker: HysteresisMasker, s: float, b: int, shape) -> int:
    """The surround's block on the binned grid, as ``scale_maps`` picks it for the
    whole image (a tile's window is never smaller than one such block)."""
    if not masker.surround:
        return 1
    binned = (-(-shape[0] // b), -(-shape[1] // b))
    return _pow2_at_most(masker.surround * s / (2.0 * b), *binned)


def _kernel_radius(sigma: float) -> int:
    # the radius of scale_maps' Gaussian kernels, in grid units
    return _gaussian_kernel(sigma).size // 2


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


@dataclass(frozen=True)
class _Tiling:
    """Tiles aligned to every cell and block grid of a pipeline, with their halos."""

    shape: tuple[int, int]
    chunks: tuple[tuple[int, ...], tuple[int, ...]]
    tile: tuple[int, int]
    halo_maps: dict  # (masker index, scale) -> (hy, hx) pixels
    halo_dilate: dict
    halo_ring: int = 0

    @classmethod
    def of(cls, pipeline: IterativeBackground, shape, tile) -> _Tiling:
        smoothers = [pipeline.first_guess, *(st.estimator for st in pipeline.stages)]
        if pipeline.final is not None:
            smoothers.append(pipeline.final)
        smoothers = [sm for sm in smoothers if isinstance(sm, ThinPlateSmoother)]
        units = [2, 2]
        for sm in smoothers:
            for cells in sm.cell_sequence(shape):
                # the cells, and the blocks of the coarse noise map made from them
                q = _pow2_at_most(min(cells) / 2.0, *shape)
                units = [math.lcm(u, c, q) for u, c in zip(units, cells, strict=True)]
        reach: dict = {}
        for k, st in enumerate(pipeline.stages):
            m = st.masker
            for s in m.scales:
                b = m.binning(s, shape)
                bw = _surround_block(m, s, b, shape)
                units = [math.lcm(u, b * bw) for u in units]
                maps = b * _kernel_radius(s / b)
                if m.surround:
                    maps = max(maps, b * bw * _kernel_radius(m.surround * s / (b * bw)))
                dilate = b * (math.ceil(m.dilation(s) / b) + 1)
                reach[k, s] = (maps, dilate)
        tiles = tuple(
            n if n <= u else max(u, t // u * u) for n, u, t in zip(shape, units, tile, strict=True)
        )
        chunks = tuple(_aligned_chunks(n, t) for n, t in zip(shape, tiles, strict=True))
        halo_maps = {key: tuple(_round_up(r[0], u) for u in units) for key, r in reach.items()}
        halo_dilate = {key: tuple(_round_up(r[1], u) for u in units) for key, r in reach.items()}
        ring = 0
        if isinstance(pipeline.first_guess, RingMedianGuess):
            g = pipeline.first_guess
            ring = ring_footprint(g.radius, g.width).shape[0] // 2
        return cls(shape, chunks, tiles, halo_maps, halo_dilate, ring)

    @property
    def halo(self) -> int:
        reach = (max(h) for h in (*self.halo_maps.values(), *self.halo_dilate.values()))
        return max([self.halo_ring, *reach])

    def tiles(self) -> Iterator[tuple[int, int, tuple[int, int], tuple[int, int]]]:
        """(i, j, (y0, y1), (x0, x1)) of every tile, row by row."""
        ys = np.cumsum((0, *self.chunks[0]))
        xs = np.cumsum((0, *self.chunks[1]))
        for i in range(len(self.chunks[0])):
            for j in range(len(self.chunks[1])):
                yield i, j, (int(ys[i]), int(ys[i + 1])), (int(xs[j]), int(xs[j + 1]))

    def window(self, rows, cols, halo) -> tuple[tuple[int, int], tuple[int, int]]:
        """The tile ``rows`` x ``cols`` grown by ``halo`` = (hy, hx), cut at the edges."""
        (y0, y1), (x0, x1) = rows, cols
        ny, nx = self.shape
        return (max(0, y0 - halo[0]), min(ny, y1 + halo[0])), (
            max(0, x0 - halo[1]),
            min(nx, x1 + halo[1]),
        )

    def edges(self, b: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Block edges along each axis of the arrays binned by ``b``."""
        return tuple(np.cumsum((0, *ch)) for ch in self.binned_chunks(b))

    def binned_chunks(self, b: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        out = []
        for ch in self.chunks:
            edges = np.cumsum((0, *ch))
            out.append(
                tuple(
                    int(-(-e1 // b) - e0 // b)
                    for e0, e1 in zip(edges[:-1], edges[1:], strict=True)
                )
            )
        return tuple(out)


# The working noise. pipeline._working_rms hands the maskers a scalar, a CoarseRMS (one
# value per q x q block: small, made in the driver by _working_rms itself) or, for
# models whose cells are too small for blocks (q = 1) and for a ring-median guess, a
# full-resolution map, which a tiled run never holds: only what rebuilds any window of
# it. _working_noise and _noise_window are the only places that know this, so that a
# change in _working_rms is followed here (and nowhere else).


@dataclass(frozen=True, kw_only=True, eq=False)
class _NoiseMap:
    """The working-noise map of ``model``: its RMS grid interpolated, floored."""

    model: SmoothResult
    floor: float | None


@dataclass(frozen=True, kw_only=True, eq=False)
class _RingModel:
    """A tiled :class:`~skymap.pipeline.RingMedianGuess` result: its background (a
    persisted dask array) and its RMS, one value (``sigma`` in the image's dtype)."""

    background: Any
    sigma: Any


def _working_noise(model: SmoothResult | _RingModel, strips, compute) -> Any:
    """``pipeline._working_rms(model, coarse=True)`` without a full-resolution map: the
    same scalar or :class:`CoarseRMS`, or the same full map as a :class:`_NoiseMap`.
    Its floor, half the median of every step-th finite positive value in C order
    (``_k.positive_sample(rms, 250_000)``), is taken from the same values: counted,
    then sampled, over full-width strips of rows. A ring-median guess's RMS is a
    constant map, its own floor: it stays that map (an array of one value, broadcast
    per window)."""
    if isinstance(model, _RingModel):
        return np.asarray(model.sigma)
    if _coarse_step(model) > 1:
        return _working_rms(model, coarse=True)
    g = np.asarray(model.rms_grid)
    g = g[np.isfinite(g)]
    if g.size and g.min() > 0 and g.max() <= 1.05 * g.min():
        return float(np.median(g))
    import dask

    counts = compute([dask.delayed(_strip_positive)(model, rows) for rows in strips])
    total = int(sum(counts))
    if total == 0:
        return _NoiseMap(model=model, floor=None)
    step = max(1, total // 250_000)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    samples = compute(
        [
            dask.delayed(_strip_positive)(model, rows, int(-f % step), step)
            for rows, f in zip(strips, first, strict=True)
        ]
    )
    return _NoiseMap(model=model, floor=0.5 * float(np.median(np.concatenate(samples))))


def _coarse_step(model: SmoothResult) -> int:
    # the block of _working_rms's CoarseRMS for a thin-plate model (1: no blocks)
    return _pow2_at_most(min(model.cell_size) / 2.0, *model.shape)


def _noise_window(noise, window, step: int = 1):
    """The working noise over ``window`` = ((y0, y1), (x0, x1)) (which starts on a
    block of a CoarseRMS): at ``step`` 1 what the masker takes for that window (the
    scalar, a CoarseRMS of the window, the window of the floored or constant map);
    with ``step`` > 1, the noise at every ``step``-th pixel as an array (a CoarseRMS
    read at ``[y // q, x // q]``, edge-clamped), or the scalar."""
    (y0, y1), (x0, x1) = window
    if isinstance(noise, CoarseRMS):
        q, (gy, gx) = noise.step, noise.values.shape
        if step == 1:
            values = noise.values[y0 // q : -(-y1 // q), x0 // q : -(-x1 // q)]
            return CoarseRMS(values=values, step=q, shape=(y1 - y0, x1 - x0))
        rows = np.minimum(np.arange(y0, y1, step) // q, gy - 1)
        cols = np.minimum(np.arange(x0, x1, step) // q, gx - 1)
        return noise.values[np.ix_(rows, cols)]
    if isinstance(noise, np.ndarray):
        return np.full((len(range(y0, y1, step)), len(range(x0, x1, step))), noise)
    if not isinstance(noise, _NoiseMap):
        return noise
    m = noise.model
    rms = upsample(m.rms_grid, m.cell_size, m.shape, m.dtype, step, window=window)
    if noise.floor is not None:
        floor = rms.dtype.type(noise.floor)
        rms = np.where(np.isfinite(rms) & (rms >= floor), rms, floor)
    return rms


@_one_thread
def _strip_positive(model: SmoothResult, rows, start: int | None = None, step: int = 1):
    """The count (``start`` None) or the ``[start::step]`` sample of the finite
    positive values of the unfloored RMS map's rows ``rows``, in C order."""
    rms = upsample(
        model.rms_grid,
        model.cell_size,
        model.shape,
        model.dtype,
        window=(rows, (0, model.shape[1])),
    )
    v = rms[np.isfinite(rms) & (rms > 0)]
    return v.size if start is None else v[start::step]


class _TiledRun:
    """One :func:`tiled_fit`: the driver's side of the pipeline, step for step as
    :meth:`IterativeBackground.fit`."""

    def __init__(self, image, mask, pipeline, tiling: _Tiling, dtype, client):
        import dask.array as da

        self.pipe, self.t, self.dtype, self.client = pipeline, tiling, np.dtype(dtype), client
        shape = tiling.shape
        raw = self.source(image).map_blocks(_work_block, dtype=self.dtype)
        given = None
        if mask is not None:
            if not hasattr(mask, "shape") or not hasattr(mask, "dtype"):
                mask = np.asarray(mask)
            if tuple(mask.shape) != shape:
                raise ValueError(f"mask must have the image's shape {shape}, got {mask.shape}")
            given = self.source(mask).map_blocks(_mask_block, dtype=bool)
        bad = da.map_blocks(_bad_block, raw, *([] if given is None else [given]), dtype=bool)
        (self.given_bad,) = self.persist(bad)
        self.size = shape[0] * shape[1]
        if int(self.compute(self.given_bad.sum())) == self.size:
            raise ValueError("image has no valid pixel: everything is masked or non-finite")
        # As IterativeBackground.fit: the normalised image, from the same subsample, and
        # the extreme negative pixels excluded from the start.
        step = Normalisation.sample_step(shape)
        self.norm = Normalisation.from_sample(
            *self.compute(raw[::step, ::step], self.given_bad[::step, ::step]), self.dtype
        )
        self.img = raw.map_blocks(self.norm.apply, dtype=self.dtype)
        outliers = self.img.map_blocks(self.norm.outliers, dtype=bool)
        (self.bad,) = self.persist(self.given_bad | outliers)
        self.nbad = int(self.compute(self.bad.sum()))
        self.ref_step = reference_step(shape)
        self.ref_sub = self.compute(self.img[:: self.ref_step, :: self.ref_step])
        # Full-width strips of about a tile's area, for the C-order noise sample.
        h = max(1, tiling.tile[0] * tiling.tile[1] // shape[1])
        self.strips = [(y, min(shape[0], y + h)) for y in range(0, shape[0], h)]

    # -- dask

    def source(self, data):
        """``data`` (image or mask) as a dask array of the tiles, never read here. A
        memory map is read by each task from its file (pickling the memmap would ship
        the whole array with every graph); an in-memory array is sent to the cluster
        once (persisted); a dask array is rechunked to the tiles."""
        import mmap

        import dask.array as da

        t = self.t
        if isinstance(data, da.Array):
            return data.rechunk(t.chunks)
        if (
            isinstance(data, np.memmap)
            and isinstance(data.base, mmap.mmap)
            and (data.flags.c_contiguous or data.flags.f_contiguous)
        ):
            layout = (
                data.filename,
                data.dtype,
                data.offset,
                data.shape,
                "C" if data.flags.c_contiguous else "F",
            )
            return self.tile_array(
                _read_memmap, lambda i, j, ys, xs, ref: (layout, ys, xs), [], t.chunks, data.dtype
            )
        (arr,) = self.persist(da.from_array(np.asarray(data), chunks=t.chunks, name=False))
        return arr

    def persist(self, *arrays):
        import dask

        return dask.persist(*arrays, scheduler=self.client)

    def compute(self, *things):
        """The computed ``things``: one value for one thing, else a list."""
        out = self.compute_list(things)
        return out[0] if len(things) == 1 else out

    def compute_list(self, things) -> list:
        import dask

        return list(dask.compute(*things, scheduler=self.client))

    def tile_map(self, function, *arrays, dtype, chunks=None, **kwargs):
        import dask.array as da

        return da.map_blocks(function, *arrays, dtype=dtype, chunks=chunks, **kwargs)

    def per_tile_sums(self, function, *arrays, width: int, **kwargs) -> np.ndarray:
        """Sum over the tiles of ``function(blocks..., window=...)``, a vector of
        ``width`` numbers per tile."""
        ny, nx = (len(c) for c in self.t.chunks)
        parts = self.tile_map(
            _with_window,
            *arrays,
            task=function,
            dtype=np.float64,
            chunks=((1,) * ny, (1,) * nx, (width,)),
            new_axis=2,
            **kwargs,
        )
        return np.asarray(self.compute(parts.sum(axis=(0, 1))))

    # -- the pipeline

    def fit(self) -> TiledFitResult:
        pipe = self.pipe
        history: list[TiledIteration] = []
        if isinstance(pipe.first_guess, RingMedianGuess):
            model = self.fit_ring(pipe.first_guess)
        else:
            model = self.fit_smoother(pipe.first_guess, self.bad, None)
        noise = self.working_noise(model)
        current, count = self.bad, self.nbad
        history.append(self.record(-1, 0, model, count, float("nan"), float("nan")))
        converged = False
        # As IterativeBackground.fit: the smoothing floor (pixels) raised when the last
        # stage's fit follows source light, the stage's count restarted then.
        floor = None
        last = len(pipe.stages) - 1
        for k, stage in enumerate(pipe.stages):
            converged = False
            cap = pipe.max_iter if stage.max_iter is None else stage.max_iter
            it = done = 0
            while done < cap:
                new = self.mask(k, stage.masker, model, noise)
                previous = model
                model = self.fit_smoother(stage.estimator, new, history[-1].scale, floor)
                noise = self.working_noise(model)
                change = self.change(model, previous, noise)
                flips, count = self.compute((new ^ current).sum(), new.sum())
                mask_change = float(flips) / self.size
                asymmetry, raised = float("nan"), False
                if k == last and pipe.source_asymmetry is not None:
                    asymmetry, floor, raised = pipe._check_asymmetry(model, floor)
                rec = self.record(
                    k, it, model, int(count), change, mask_change, history[-1], asymmetry, floor
                )
                history.append(rec)
                log.debug(
                    "tiled stage %d iteration %d: change %.4g, mask change %.4g",
                    k,
                    it,
                    change,
                    mask_change,
                )
                current = new
                it += 1
                done = 0 if raised else done + 1
                if not raised and pipe.settled(rec):
                    converged = True
                    break
        final_noise = self.typical_noise(noise)
        if pipe.final is not None:
            previous = model
            model = self.fit_smoother(pipe.final, current, history[-1].scale, floor)
            change = self.change(model, previous, self.working_noise(model))
            history.append(
                self.record(
                    len(pipe.stages), 0, model, int(count), change, 0.0, history[-1], floor=floor
                )
            )
        maps = {
            which: self.tile_map(
                _tile_map_of, dtype=self.dtype, chunks=self.t.chunks, model=model, which=which
            )
            for which in ("grid", "rms_grid")
        }
        norm = self.norm
        return TiledFitResult(
            background=maps["grid"].map_blocks(norm.undo, dtype=self.dtype),
            rms=maps["rms_grid"].map_blocks(norm.undo, offset=False, dtype=self.dtype),
            mask=current,
            bad_mask=self.given_bad,
            history=tuple(history),
            config=pipe,
            noise=float(final_noise) * norm.scale,
            converged=converged,
            tile=self.t.tile,
            halo=self.t.halo,
        )

    def record(
        self,
        stage,
        it,
        model,
        count,
        change,
        mask_change,
        previous=None,
        asymmetry=float("nan"),
        floor=None,
    ) -> TiledIteration:
        """As ``pipeline._record``."""
        scale, error = getattr(model, "scale", None), getattr(model, "error", None)
        fraction = float(count) / self.size
        return TiledIteration(
            stage=stage,
            iteration=it,
            mask_fraction=fraction,
            mask_change=mask_change,
            change=change,
            scale=None if scale is None else float(scale),
            mask_growth=float("nan") if previous is None else fraction - previous.mask_fraction,
            error=float("nan") if error is None else float(error),
            asymmetry=float(asymmetry),
            min_scale=None if floor is None else float(floor),
            model=model,
        )

    def working_noise(self, model):
        return _working_noise(model, self.strips, self.compute_list)

    def fit_smoother(self, smoother: ThinPlateSmoother, mask, scale, floor=None) -> SmoothResult:
        """``pipeline._fit_estimator``: ``smoother.fit(image, mask)`` from tile-summed
        cells, started at the previous ``scale`` and held above ``floor`` (pixels)."""
        step = self.ref_step
        ref = reference_level(self.ref_sub, self.compute(mask[::step, ::step]))
        if ref is None:
            ref = self.first_valid(mask)
        t = self.t

        def sums(cells):
            cy, cx = cells
            chunks = (
                (5,),
                *(tuple(-(-c // s) for c in ch) for ch, s in zip(t.chunks, cells, strict=True)),
            )
            blocks = self.tile_map(
                _tile_cell_sums,
                self.img,
                mask,
                cells=cells,
                ref=ref,
                dtype=np.float64,
                chunks=chunks,
                new_axis=0,
            )
            return np.asarray(self.compute(blocks))

        return smoother.fit_sums(
            sums,
            t.shape,
            self.dtype,
            ref,
            smoothing_start=None if scale is None else scale**4,
            min_smoothing=None if floor is None else floor**4,
        )

    def first_valid(self, mask) -> float:
        """The image's first good pixel in C order (when the reference subsample has none)."""
        ny, nx = (len(c) for c in self.t.chunks)
        flat = self.tile_map(
            _tile_first_valid,
            mask,
            nx=self.t.shape[1],
            dtype=np.int64,
            chunks=((1,) * ny, (1,) * nx),
        )
        y, x = divmod(int(self.compute(flat.min())), self.t.shape[1])
        return float(self.compute(self.img[y, x]))

    def change(self, new: SmoothResult, old, noise) -> float:
        """``pipeline._change``: RMS of (new - old) / noise on the [::2, ::2] subsample of
        the valid pixels, summed tile by tile."""
        if isinstance(old, _RingModel):
            arrays, old = [self.bad, old.background], None
        else:
            arrays = [self.bad]
        total, n = self.per_tile_sums(
            _tile_change, *arrays, width=2, new=new, old=old, noise=noise
        )
        return float(np.sqrt(total / n)) if n else 0.0

    def typical_noise(self, noise) -> float:
        """``pipeline._typical_noise``: the scalar; for a CoarseRMS the median of its
        values over the blocks holding a valid pixel (a per-tile map of those blocks,
        gathered); for a full map ``median(rms[~bad])``, exactly."""
        if isinstance(noise, float):
            return noise
        if isinstance(noise, CoarseRMS):
            q = noise.step
            chunks = tuple(tuple(-(-c // q) for c in ch) for ch in self.t.chunks)
            valid = self.compute(
                self.tile_map(_valid_blocks, self.bad, q=q, dtype=bool, chunks=chunks)
            )
            return float(np.median(noise.values[valid]))
        return float(self.median(_noise_values, [self.bad], noise=noise))

    def median(self, values, arrays, **kw):
        """``np.median`` of the values ``values(*blocks, window=, **kw)`` of the tiles
        (one per valid pixel), exactly: the middle order statistic(s) selected 16 bits
        at a time from per-tile histograms of their order keys."""
        n = self.size - self.nbad
        picked = [self.select(values, arrays, k, kw) for k in sorted({(n - 1) // 2, n // 2})]
        return np.median(np.array(picked, dtype=self.dtype))

    def select(self, values, arrays, k: int, kw):
        bits = self.dtype.itemsize * 8
        prefix = 0
        for shift in range(bits - 16, -1, -16):
            hist = self.per_tile_sums(
                _tile_digit_histogram,
                *arrays,
                width=1 << 16,
                values=values,
                shift=shift,
                prefix=prefix,
                bits=bits,
                kw=kw,
            )
            cum = np.cumsum(hist)
            digit = int(np.searchsorted(cum, k, side="right"))
            k -= int(cum[digit - 1]) if digit else 0
            prefix = (prefix << 16) | digit
        return _key_to_float(prefix, self.dtype)

    def fit_ring(self, guess: RingMedianGuess) -> _RingModel:
        """``RingMedianGuess.fit(image, bad)``: the ring median per tile (a halo of the
        ring's reach), its holes filled with the exact median of the valid pixels, and
        the exact MAD sigma of the residual."""
        t = self.t
        img_k, bad_k, edges = _key_grid(self.img), _key_grid(self.bad), t.edges()
        halo = (t.halo_ring, t.halo_ring)

        def args(i, j, ys, xs, ref):
            win = t.window(ys, xs, halo)
            return (
                *_cover(img_k, edges, win),
                *_cover(bad_k, edges, win),
                win,
                (ys, xs),
                guess.radius,
                guess.width,
            )

        import dask.array as da

        bkg = self.tile_array(_tile_ring, args, [self.img, self.bad], t.chunks, self.dtype)
        (bkg,) = self.persist(bkg)
        if self.compute((~da.isfinite(bkg)).any()):
            fill = self.median(_valid_values, [self.img, self.bad])
            (bkg,) = self.persist(self.tile_map(_fill_holes, bkg, fill=fill, dtype=self.dtype))
        centre = self.median(_residual_values, [self.img, bkg, self.bad])
        mad = self.median(_residual_values, [self.img, bkg, self.bad], centre=centre)
        sigma = _MAD_TO_STD * float(mad)
        return _RingModel(background=bkg, sigma=self.dtype.type(sigma))

    def mask(self, k: int, masker: HysteresisMasker, model, noise):
        """``bad | masker(image - background, noise, bad)``, tile by tile."""
        if isinstance(model, _RingModel):
            res = self.tile_map(_subtract, self.img, model.background, dtype=self.dtype)
        else:
            res = self.tile_map(_tile_residual, self.img, model=model, dtype=self.dtype)
        excl = self.tile_map(_initial_exclusion, res, self.bad, dtype=bool)
        res, excl = self.persist(res, excl)
        for s in masker.scales:
            excl = self.scale(k, masker, s, res, noise, excl)
        (new,) = self.persist(self.tile_map(_final_mask, excl, res, self.bad, dtype=bool))
        return new

    def tasks(self, func, args_of, dependencies, lead=(), **shared):
        """A graph of one task per tile, ``func(*args_of(i, j, rows, cols, ref))``; the
        arguments may hold block keys of ``dependencies`` (in nested lists), and ``ref``
        maps each name of ``shared`` to the key of that object, which is put in the
        graph once rather than in every task. Built by hand: a ``dask.delayed`` call
        per tile costs more than the tile's work on small tiles.

        ``lead`` are the key's leading block indices (``(0,)`` for a stacked array).
        Returns the layer name, the graph and the tiles' keys ``{(i, j): key}``."""
        from dask.highlevelgraph import HighLevelGraph

        name = f"{func.__name__.strip('_')}-{uuid.uuid4().hex}"
        ref = {k: f"{name}-{k}" for k in shared}
        dsk: dict = {ref[k]: v for k, v in shared.items()}
        keys = {}
        for i, j, ys, xs in self.t.tiles():
            keys[i, j] = (name, *lead, i, j)
            dsk[keys[i, j]] = (func, *args_of(i, j, ys, xs, ref))
        return name, HighLevelGraph.from_collections(name, dsk, dependencies=dependencies), keys

    def tile_array(self, func, args_of, dependencies, chunks, dtype, **shared):
        """:meth:`tasks` as a dask array of ``chunks`` (one block per tile)."""
        import dask.array as da

        lead = (0,) * (len(chunks) - 2)
        name, graph, _ = self.tasks(func, args_of, dependencies, lead, **shared)
        return da.Array(graph, name, chunks=chunks, dtype=dtype)

    def gather(self, func, args_of, dependencies, **shared) -> list:
        """:meth:`tasks` computed: the tiles' results, row by row."""
        from dask.delayed import Delayed

        name, graph, keys = self.tasks(func, args_of, dependencies, **shared)
        return self.compute_list([Delayed(key, graph, layer=name) for key in keys.values()])

    def scale(self, k, masker: HysteresisMasker, s, res, noise, excl):
        """One scale of ``HysteresisMasker``: maps per tile (local), the noise excess
        (global, from the same pairs), hysteresis labelled across tiles (global),
        dilation and expansion per tile (local). Returns the new exclusion mask."""
        t = self.t
        b = masker.binning(s, t.shape)
        bchunks = t.binned_chunks(b)
        res_k, excl_k = _key_grid(res), _key_grid(excl)
        edges, bedges = t.edges(), t.edges(b)
        layers = 3 if masker.grow_plain else 2

        def maps_args(i, j, ys, xs, ref):
            win = t.window(ys, xs, t.halo_maps[k, s])
            return (
                *_cover(res_k, edges, win),
                *_cover(excl_k, edges, win),
                ref["noise"],
                win,
                (ys, xs),
                ref["masker"],
                s,
            )

        # snr, (plain,) invalid stacked in one float32 block per tile
        maps = self.tile_array(
            _tile_scale_maps,
            maps_args,
            [res, excl],
            ((layers,), *bchunks),
            np.float32,
            noise=noise,
            masker=masker,
        )
        (maps,) = self.persist(maps)
        factor = masker.factor_from_differences(self.pairs(masker, s, b, maps), s)
        det = self.hysteresis(masker, factor, maps, b)
        del maps
        # Dilation and expansion to full resolution: masker.scale_mask on each tile's
        # window of the (already global) detections.
        det_k = _key_grid(det)

        def dilate_args(i, j, ys, xs, ref):
            win = t.window(ys, xs, t.halo_dilate[k, s])
            bwin = tuple((w0 // b, -(-w1 // b)) for w0, w1 in win)
            return (
                *_cover(det_k, bedges, bwin),
                *_cover(excl_k, edges, win),
                win,
                (ys, xs),
                ref["masker"],
                s,
                b,
            )

        grown = self.tile_array(
            _tile_dilate, dilate_args, [det, excl], t.chunks, bool, masker=masker
        )
        (new,) = self.persist(grown)
        return new

    def pairs(self, masker: HysteresisMasker, s, b: int, maps) -> list[np.ndarray]:
        """The pair differences of ``HysteresisMasker.snr_factor`` (pipeline's
        ``_pair_differences``), gathered from the tiles: each tile gives the pairs that
        start in it, reading ``noise_lag`` binned pixels of its neighbours."""
        lag = masker.noise_lag(s, b)
        _, gy, gx = maps.shape
        step = _noise_step((gy, gx))
        maps_k, bedges = _key_grid(maps), self.t.edges(b)

        def args(i, j, ys, xs, ref):
            core = ((ys[0] // b, -(-ys[1] // b)), (xs[0] // b, -(-xs[1] // b)))
            win = (
                (core[0][0], min(gy, core[0][1] + lag)),
                (core[1][0], min(gx, core[1][1] + lag)),
            )
            return (*_cover(maps_k, bedges, win), win, core, lag, step)

        return [p for parts in self.gather(_tile_pairs, args, [maps]) for p in parts]

    def hysteresis(self, masker: HysteresisMasker, factor: float, maps, b: int):
        """Detections of ``HysteresisMasker.scale_mask``'s hysteresis on the binned
        maps: regions above ``low`` holding a seed above ``high``, 8-connected across
        tiles. Each tile is labelled on its own (scipy); the labels that touch across
        a tile boundary are joined by labelling the two-pixel strips along every
        boundary, and ``scipy.sparse.csgraph.connected_components`` merges them."""
        maps_k = _key_grid(maps)
        kw = {"factor": factor, "low": masker.low, "high": masker.high}
        bchunks = self.t.binned_chunks(b)
        labels = self.tile_array(
            _tile_label, lambda i, j, *_: (maps_k[i, j], kw), [maps], bchunks, np.int32
        )
        (labels,) = self.persist(labels)
        labels_k = _key_grid(labels)
        gathered = self.gather(
            _label_info, lambda i, j, *_: (labels_k[i, j], maps_k[i, j], kw), [labels, maps]
        )
        info = np.empty(labels_k.shape, object)
        for n, item in enumerate(gathered):
            info.flat[n] = item
        keep = _merge_labels(info)
        det = self.tile_array(
            _keep_labels, lambda i, j, *_: (labels_k[i, j], keep[i][j]), [labels], bchunks, bool
        )
        (det,) = self.persist(det)
        return det


def _mask_block(block):
    return as_mask(block, block.shape)


def _key_grid(arr) -> np.ndarray:
    """The block keys of a 2-D (or stacked 3-D, one block deep) dask array as a 2-D
    object array."""
    keys = arr.__dask_keys__()
    if arr.ndim == 3:
        keys = keys[0]
    out = np.empty((len(keys), len(keys[0])), object)
    for i, row in enumerate(keys):
        for j, key in enumerate(row):
            out[i, j] = key
    return out


@_one_thread
def _tile_label(maps, kw):
    """A tile's hysteresis regions labelled on their own (int32, 0 = none)."""
    from scipy import ndimage

    region = _hysteresis_codes(*_snr_plain(maps), which="region", **kw)
    labels = np.zeros(region.shape, np.int32)
    ndimage.label(region, structure=np.ones((3, 3), bool), output=labels)
    return labels


def _label_info(labels, maps, kw):
    """What the driver needs to join a tile's labels across tiles: their count, those
    holding a seed, and the tile's four edges (top, bottom rows; left, right columns)."""
    seed = _hysteresis_codes(*_snr_plain(maps), which="seed", **kw)
    edges = (labels[0].copy(), labels[-1].copy(), labels[:, 0].copy(), labels[:, -1].copy())
    return int(labels.max(initial=0)), np.unique(labels[seed]), edges


def _snr_plain(maps):
    # the stacked maps of _tile_scale_maps: snr, (plain,) invalid
    return (maps[0], maps[1] if len(maps) == 3 else None)


def _merge_labels(info) -> list[list[np.ndarray]]:
    """Per tile, which of its labels (index = label) belong to a region that holds a
    seed anywhere: tile labels made global by offsets, joined where they touch across
    a tile boundary (8-connected), grouped by connected components."""
    from scipy import ndimage, sparse
    from scipy.sparse.csgraph import connected_components

    nty, ntx = info.shape
    counts = np.array([[info[i, j][0] for j in range(ntx)] for i in range(nty)])
    offset = np.concatenate([[0], np.cumsum(counts.ravel())])[:-1].reshape(nty, ntx)
    total = int(counts.sum())

    def glob(i, j, lab):
        return np.where(lab > 0, lab + offset[i, j], 0)

    pairs = []
    # The two-pixel strip along each boundary, labelled 8-connected: labels in one
    # piece of a strip touch across the boundary (diagonals included).
    for j in range(ntx - 1):
        strip = np.stack(
            [
                np.concatenate([glob(i, j, info[i, j][2][3]) for i in range(nty)]),
                np.concatenate([glob(i, j + 1, info[i, j + 1][2][2]) for i in range(nty)]),
            ],
            axis=1,
        )
        pairs.append(_touching(strip, ndimage))
    for i in range(nty - 1):
        strip = np.stack(
            [
                np.concatenate([glob(i, j, info[i, j][2][1]) for j in range(ntx)]),
                np.concatenate([glob(i + 1, j, info[i + 1, j][2][0]) for j in range(ntx)]),
            ]
        )
        pairs.append(_touching(strip, ndimage))
    edges = np.concatenate([np.zeros((2, 0), np.int64), *pairs], axis=1)
    graph = sparse.coo_matrix(
        (np.ones(edges.shape[1], np.int8), (edges[0], edges[1])), shape=(total + 1, total + 1)
    )
    _, component = connected_components(graph, directed=False)
    seeded = np.zeros(component.max() + 1, bool)
    for i in range(nty):
        for j in range(ntx):
            s = info[i, j][1]
            seeded[component[s[s > 0] + offset[i, j]]] = True
    return [
        [
            np.concatenate(
                [[False], seeded[component[offset[i, j] + 1 : offset[i, j] + counts[i, j] + 1]]]
            )
            for j in range(ntx)
        ]
        for i in range(nty)
    ]


def _touching(strip: np.ndarray, ndimage) -> np.ndarray:
    """(2, m) pairs of the labels of ``strip`` that lie in one 8-connected piece."""
    pieces, _ = ndimage.label(strip > 0, structure=np.ones((3, 3), bool))
    ok = pieces > 0
    order = np.argsort(pieces[ok], kind="stable")
    p, lab = pieces[ok][order], strip[ok][order]
    same = p[1:] == p[:-1]
    return np.stack([lab[:-1][same], lab[1:][same]]).astype(np.int64)


def _keep_labels(labels, keep):
    return keep[labels]


def _cover(blocks, edges, window):
    """The blocks (a 2-D object array, e.g. ``to_delayed()``) of an array with block
    edges ``edges`` that cover ``window``, as a nested list, and the slice of their
    concatenation that is the window."""
    index, slices = [], []
    for e, (w0, w1) in zip(edges, window, strict=True):
        i0 = int(np.searchsorted(e, w0, side="right")) - 1
        i1 = int(np.searchsorted(e, w1, side="left"))
        index.append(range(i0, i1))
        slices.append(slice(int(w0 - e[i0]), int(w1 - e[i0])))
    return [[blocks[i, j] for j in index[1]] for i in index[0]], tuple(slices)


def _assemble(blocks, sl) -> np.ndarray:
    """The window ``sl`` (over the last two axes) of the nested ``blocks``."""
    whole = np.block(blocks) if len(blocks) > 1 or len(blocks[0]) > 1 else blocks[0][0]
    return whole[..., sl[0], sl[1]]


# --------------------------------------------------------------------------- tile tasks


def _location(block_info) -> tuple[tuple[int, int], tuple[int, int]]:
    (y0, y1), (x0, x1) = block_info[0]["array-location"][-2:]
    return (y0, y1), (x0, x1)


def _read_memmap(layout, rows, cols):
    filename, dtype, offset, shape, order = layout
    m = np.memmap(filename, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)
    return np.array(m[rows[0] : rows[1], cols[0] : cols[1]])


def _work_block(block):
    from skymap._validate import as_image

    return as_image(block)


def _bad_block(img, given=None):
    return combine_masks(img, given)


def _with_window(*blocks, task, block_info=None, **kwargs):
    window = _location(block_info)
    return np.asarray(task(*blocks, window=window, **kwargs), dtype=np.float64)[None, None]


@_one_thread
def _tile_map_of(model: SmoothResult, which: str, block_info=None):
    window = block_info[None]["array-location"]
    grid = getattr(model, which)
    return upsample(grid, model.cell_size, model.shape, model.dtype, window=window)


@_one_thread
def _tile_cell_sums(img, mask, cells, ref, block_info=None):
    (y0, _), (x0, _) = _location(block_info)
    return cell_sums(img, mask, cells, ref, origin=(y0, x0))


def _tile_first_valid(mask, nx, block_info=None):
    (y0, _), (x0, _) = _location(block_info)
    ys, xs = np.nonzero(~mask)
    first = (ys[0] + y0) * nx + xs[0] + x0 if ys.size else np.iinfo(np.int64).max
    return np.array([[first]], dtype=np.int64)


@_one_thread
def _tile_change(bad, old_map=None, *, window, new, old, noise):
    """Sum of squares and count of the finite (new - old) / noise on the tile's
    [::2, ::2] subsample of valid pixels (the tile starts on an even pixel); the old
    background is a thin-plate result, or (``old`` None) the block ``old_map``."""
    a = upsample(new.grid, new.cell_size, new.shape, new.dtype, 2, window=window)
    if old is None:
        b = old_map[::2, ::2]
    else:
        b = upsample(old.grid, old.cell_size, old.shape, old.dtype, 2, window=window)
    # the noise as _change reads it (pipeline._noise_grid: float32)
    sigma = np.asarray(_noise_window(noise, window, 2), dtype=np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = ((a - b) / sigma)[~bad[::2, ::2]]
    d = d[np.isfinite(d)]
    return [np.sum(d * d, dtype=np.float64), d.size]


def _float_keys(v: np.ndarray) -> np.ndarray:
    """Unsigned integers in the order of the floats ``v``."""
    u = v.view(np.dtype(f"u{v.dtype.itemsize}"))
    top = u.dtype.type(1 << (8 * v.dtype.itemsize - 1))
    return np.where(u & top, ~u, u | top)


def _key_to_float(key: int, dtype) -> float:
    bits = 8 * np.dtype(dtype).itemsize
    top = 1 << (bits - 1)
    u = key ^ top if key & top else ~key & ((1 << bits) - 1)
    return np.array([u], dtype=f"u{bits // 8}").view(dtype)[0]


@_one_thread
def _tile_digit_histogram(*blocks, window, values, shift, prefix, bits, kw):
    """Histogram of the 16-bit digit at ``shift`` of the order keys of the tile's
    ``values(*blocks, window=window, **kw)`` whose higher bits are ``prefix``."""
    keys = _float_keys(np.ascontiguousarray(values(*blocks, window=window, **kw)))
    if shift + 16 < bits:
        keys = keys[(keys >> (shift + 16)) == prefix]
    return np.bincount(((keys >> shift) & 0xFFFF).astype(np.int64), minlength=1 << 16)


def _valid_blocks(bad, q):
    """Which q x q blocks of the tile hold a valid pixel (partial blocks at the far
    edges count what they hold)."""
    ny, nx = bad.shape
    ok = np.zeros((-(-ny // q) * q, -(-nx // q) * q), bool)
    ok[:ny, :nx] = ~bad
    return ok.reshape(ok.shape[0] // q, q, ok.shape[1] // q, q).any(axis=(1, 3))


def _noise_values(bad, window, noise):
    return _noise_window(noise, window)[~bad]


def _valid_values(img, bad, window):
    return img[~bad]


def _residual_values(img, bkg, bad, window, centre=None):
    r = (img - bkg)[~bad]
    return r if centre is None else np.abs(r - centre)


@_one_thread
def _tile_ring(img, img_sl, bad, bad_sl, window, core, radius, width):
    """The ring median of a tile, from its window (a halo of the ring's reach)."""
    img, bad = _assemble(img, img_sl), _assemble(bad, bad_sl)
    bkg = np.asarray(ring_median(img, radius, width, mask=bad), dtype=img.dtype)
    return np.ascontiguousarray(bkg[_core(window, core)])


def _fill_holes(bkg, fill):
    # RingMedianGuess: pixels whose ring holds no valid pixel take the global median
    return np.where(np.isfinite(bkg), bkg, fill)


def _subtract(img, bkg):
    return np.subtract(img, bkg, dtype=img.dtype)


@_one_thread
def _tile_residual(img, model: SmoothResult, block_info=None):
    window = _location(block_info)
    bkg = upsample(model.grid, model.cell_size, model.shape, model.dtype, window=window)
    return np.subtract(img, bkg, dtype=img.dtype)


def _initial_exclusion(res, bad):
    return combine_masks(res, bad)


def _final_mask(excl, res, bad):
    # HysteresisMasker returns (excluded & finite) & ~given; the pipeline ORs in `bad`.
    return bad | (excl & np.isfinite(res))


def _core(window, core, b: int = 1) -> tuple[slice, slice]:
    """The slices of a window's (binned by ``b``) array that hold its core tile."""
    return tuple(
        slice((c0 - w0) // b, -(-(c1 - w0) // b))
        for (w0, _), (c0, c1) in zip(window, core, strict=True)
    )


@_one_thread
def _tile_scale_maps(res, res_sl, excl, excl_sl, noise, window, core, masker, s):
    """``masker.scale_maps`` on a tile's window, cut to the tile (binned): snr,
    (plain,) and invalid (as 0/1) stacked in one float32 array."""
    res, excl = _assemble(res, res_sl), _assemble(excl, excl_sl)
    rms = _noise_window(noise, window)
    if not isinstance(rms, CoarseRMS):
        rms = np.asarray(rms, dtype=np.float32)  # as HysteresisMasker.__call__ does
    maps = masker.scale_maps(res, rms, excl, s)
    sl = _core(window, core, maps.block)
    layers = [maps.snr] + ([] if maps.plain is None else [maps.plain]) + [maps.invalid]
    return np.stack([m[sl] for m in layers]).astype(np.float32, copy=False)


def _tile_pairs(maps, maps_sl, window, core, lag, step):
    """The pairs of ``pipeline._pair_differences`` that start in the tile ``core``
    (binned coordinates): along x on the rows ``y % step == 0``, along y on the columns
    ``x % step == 0``, ``lag`` apart, both ends valid; ``window`` reaches ``lag``
    beyond the core (cut at the map's edge)."""
    maps = _assemble(maps, maps_sl)
    v, bad = maps[0], maps[-1] > 0
    (w0, _), (u0, _) = window
    (r0, r1), (c0, c1) = core
    ny, nx = v.shape
    parts = []
    # along x: rows of the core on the global stride, pairs starting in the core
    rows = slice((-r0) % step + r0 - w0, r1 - w0, step)
    n = min(c1 - u0, nx - lag)
    if n > c0 - u0:
        a, b_ = v[rows, c0 - u0 : n], v[rows, c0 - u0 + lag : n + lag]
        ok = ~(bad[rows, c0 - u0 : n] | bad[rows, c0 - u0 + lag : n + lag])
        parts.append((b_ - a)[ok])
    cols = slice((-c0) % step + c0 - u0, c1 - u0, step)
    n = min(r1 - w0, ny - lag)
    if n > r0 - w0:
        a, b_ = v[r0 - w0 : n, cols], v[r0 - w0 + lag : n + lag, cols]
        ok = ~(bad[r0 - w0 : n, cols] | bad[r0 - w0 + lag : n + lag, cols])
        parts.append((b_ - a)[ok])
    return parts


def _hysteresis_codes(snr, plain=None, *, factor, low, high, which):
    """Seeds (``snr > high``) or regions (seeds, or growth ``> low``) of
    ``HysteresisMasker.scale_mask``, after its division by the noise factor."""
    if factor > 1.0:
        snr = snr / np.float32(factor)
        plain = None if plain is None else plain / np.float32(factor)
    seed = snr > np.float32(high)
    if which == "seed":
        return seed
    return seed | ((snr if plain is None else plain) > np.float32(low))


@_one_thread
def _tile_dilate(det, det_sl, excl, excl_sl, window, core, masker, s, b):
    """The tile's exclusion OR its (dilated, expanded) detections of scale ``s``:
    ``masker.scale_mask`` on the window, fed maps whose hysteresis keeps exactly the
    globally labelled detections ``det``."""
    det, excl = _assemble(det, det_sl), _assemble(excl, excl_sl)
    inf = np.float32(np.inf)
    maps = _ScaleMaps(snr=np.where(det, inf, -inf), plain=None, invalid=None, block=b)
    grown = masker.scale_mask(maps, 1.0, s, excl)
    sl = _core(window, core)
    return excl[sl] | grown[sl]
