"""The dask back end: one image larger than memory, tile by tile.

:class:`DaskBackend` holds the image as a ``dask.array`` of tiles (a dask array is
rechunked to them; a memory-mapped file is read by each task from its file) and runs
:class:`~skymap.backends.base.ArrayBackend`'s operations on them: every full-resolution
step runs per tile, reading a halo around it where it needs one; the global steps are
finished in the driver from small per-tile summaries: exact medians (order statistics
selected 16 bits at a time from per-tile histograms), the working noise's floor (the
same C-order sample as in memory, over strips of rows), connected regions labelled per
tile and joined across tiles (``scipy.sparse.csgraph.connected_components``). The
driver holds only small things (cell grids, subsamples, per-tile counts); the masks
between iterations are persisted on the cluster.

Tiles are aligned to a unit per axis that the pipeline's pieces ask for (the cells of
a smoother, the binning blocks of a masker), so that every cell and block lies inside
one tile and each tile's sums equal that part of the whole image's, bit for bit.

The functions the graphs run on each tile, window or strip live in
:mod:`skymap.backends._tile_tasks`; this module builds the graphs.

Parallelism is the cluster's: each tile task runs numba's kernels on one thread, so
give a LocalCluster one worker (process or thread) per core. On a ``distributed``
cluster each tile's tasks run on one worker (:class:`TilePlacement`), so that a tile's
blocks stay where they were made and only the halos that cross to another worker's
tiles travel.
"""

from __future__ import annotations

import functools
import math
import mmap
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from skymap._inputs import Normalisation, noise_sigma, noise_value
from skymap._validate import as_pair, work_dtype
from skymap.backends._tile_tasks import (  # the graphs' tile tasks
    _add_up,
    _bad_block,
    _combined,
    _final_mask,
    _initial_exclusion,
    _inlined,
    _item,
    _keep_labels,
    _mask_block,
    _name,
    _native_background,
    _no_noise_block,
    _noise_values,
    _own_task,
    _pick,
    _pieced,
    _read_memmap,
    _split_lazy,
    _strip_positive,
    _subtract,
    _tile_binned_step,
    _tile_change,
    _tile_counts,
    _tile_digest,
    _tile_digit_histogram,
    _tile_first_valid,
    _tile_grid,
    _tile_kept,
    _tile_label_carry,
    _tile_label_info,
    _tile_masker,
    _tile_model_map,
    _tile_residual,
    _tile_residual_map,
    _tile_sum,
    _windowed,
    _work_block,
    core_of,
    float_keys,
    key_to_float,
    one_thread,
    residual_in_one_pass,
)
from skymap.backends.base import (
    CHANGE_STEP,
    ERROR_BLOCK,
    BinnedStepMasker,
    SplitMasker,
    TileMasker,
    block_sums,
    extent_of,
    valid_blocks,
)
from skymap.backends.labels import merge_labels
from skymap.backends.windows import BorderStrips, cover

__all__ = [
    "DaskBackend",
    "TileLayout",
    "TilePlacement",
    "aligned_chunks",
    "core_of",
    "float_keys",
    "is_tiled_input",
    "key_grid",
    "key_to_float",
    "one_process",
    "one_thread",
]


#: The key of :meth:`DaskBackend._tasks`' extra tasks in its ``ref`` mapping.
CUTS = "\0cuts"


def is_tiled_input(data: Any) -> bool:
    """Whether ``data`` takes the tiled path: a dask array, or a memory map of a file."""
    if type(data).__module__.startswith("dask."):
        return True
    return isinstance(data, np.memmap)


def aligned_chunks(n: int, step: int) -> tuple[int, ...]:
    """Chunks of ``step`` along an axis of ``n``, the last one shorter if need be."""
    full, rest = divmod(n, step)
    return (step,) * full + ((rest,) if rest else ())


#: Largest band of a cell grid that :meth:`DaskBackend.cell_grid_bands` reads into the
#: driver at once (bytes).
BAND_BYTES = 4 << 20


def key_grid(arr) -> np.ndarray:
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


def _for_maps(model):
    """``model`` as the tiles' map tasks read it (:func:`~skymap.background.model.maps_only`:
    without the per-cell data of a thin-plate model, most of its bytes, which would ride
    in every graph that maps it and stay in the scheduler with the tasks)."""
    from skymap.background.model import maps_only  # the back ends sit below background

    return maps_only(model)


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


@dataclass(frozen=True, kw_only=True)
class TileLayout:
    """How a tiled fit cut its image: the tile shape (the last tile of each axis may
    be shorter), the chunks along each axis, and the largest halo in pixels that a
    step read around a tile."""

    tile: tuple[int, int]
    chunks: tuple[tuple[int, ...], tuple[int, ...]]
    halo: int


@dataclass(frozen=True, eq=False)
class TilePlacement:
    """Which worker of a ``distributed`` cluster runs each tile's tasks: the tiles in
    row-major order cut into one contiguous run per worker (so that most halos are
    read on the worker that holds them).

    Called by the scheduler with each task's key (a global ``workers`` annotation):
    a key ``(name, ..., i, j)`` of tile (i, j) gets that tile's worker, any other key
    no restriction. Every array of a tiled fit has one block per tile, so its block
    keys end with the tile's indices. Without it the scheduler places each task by its
    inputs' bytes, and the blocks of one tile drift between workers, pulling whole
    blocks across for the windows of the next step. The restriction is loose: a task
    whose worker has gone runs elsewhere.

    ``shared``: the workers are threads of one process (an in-process LocalCluster,
    ``inproc://`` addresses), so a block passes between them by reference: a window
    then reads every neighbouring block whole, with no border-strip task.

    Examples
    --------
    >>> p = TilePlacement(workers=("tcp://a:1",) * 2 + ("tcp://b:2",) * 2, grid=(2, 2))
    >>> p(("maps-1f3a", 0, 1, 0)), p("factor-1f3a"), p.shared
    (['tcp://b:2'], [], False)
    """

    workers: tuple[str, ...]
    grid: tuple[int, int]
    shared: bool = False

    @classmethod
    def of(cls, client, grid) -> TilePlacement | None:
        """The placement of the tiles ``grid`` on ``client``'s workers (None: not a
        ``distributed`` client with at least two workers)."""
        info = getattr(client, "scheduler_info", None)
        if info is None:
            return None
        try:
            workers = sorted(info().get("workers", {}))
        except Exception:  # a client without a live scheduler
            return None
        if len(workers) < 2:
            return None
        n = grid[0] * grid[1]
        return cls(
            workers=tuple(workers[t * len(workers) // n] for t in range(n)),
            grid=grid,
            shared=one_process(workers),
        )

    def worker(self, i: int, j: int) -> str:
        """The address of the worker of tile (i, j)."""
        return self.workers[i * self.grid[1] + j]

    def __call__(self, key) -> list[str]:
        if isinstance(key, tuple) and len(key) >= 3:
            i, j = key[-2:]
            if isinstance(i, int) and isinstance(j, int):
                ny, nx = self.grid
                if 0 <= i < ny and 0 <= j < nx:
                    return [self.worker(i, j)]
        return []


def one_process(workers: Sequence[str]) -> bool:
    """Whether the workers at these addresses are threads of this process (dask's
    ``inproc://`` transport: what they exchange is passed by reference, not copied)."""
    return all(str(w).startswith("inproc://") for w in workers)


@dataclass(frozen=True, eq=False)
class _NoiseMap:
    """The working-noise map of ``model`` on a tiled back end: its RMS map floored at
    ``floor`` (None: no floor), rebuilt per window."""

    model: Any
    floor: float | None

    def window(self, window, step: int = 1) -> np.ndarray:
        rms = self.model.rms_map(window=window)
        if step > 1:
            rms = rms[::step, ::step]
        if self.floor is not None:
            floor = rms.dtype.type(self.floor)
            rms = np.where(np.isfinite(rms) & (rms >= floor), rms, floor)
        return rms


class DaskBackend:
    """:class:`~skymap.backends.base.ArrayBackend` on dask arrays of tiles.

    Parameters
    ----------
    image : dask.array.Array, memmap or ndarray (ny, nx)
        A dask array (e.g. ``da.from_zarr``) is rechunked to the tiles; a memory map of
        a whole ``.npy`` or raw file (``np.load(path, mmap_mode="r")``, ``np.memmap``)
        is read tile by tile from its file by the tasks; any other array (an astropy
        memory-mapped ``HDU.data`` view included) is sent to the cluster once.
    mask : array-like or dask array of bool, optional
        True = excluded. NaN and inf pixels are excluded automatically.
    tile : int or (int, int)
        Approximate tile shape in pixels, rounded down (but not below) to a multiple of
        ``unit``; an axis shorter than the unit is one tile.
    unit : (int, int)
        Alignment unit per axis: every tile but the last starts and ends on a multiple
        (also of :data:`~skymap.backends.base.CHANGE_STEP`, and with an error map of
        :data:`~skymap.backends.base.ERROR_BLOCK`).
    client : optional
        A ``distributed.Client`` (or any dask scheduler); default dask's current one.
    error, weight : optional
        1 sigma per pixel, or inverse variance (at most one): a dask array, a memory
        map, an array or Quantity (converted to the image's plain numbers: it must be
        dimensionless) or a scalar. Read per tile like the image and held as ``error``
        (float64 sigma, converted elementwise by :func:`skymap._inputs.noise_sigma`,
        so the pixels equal the in-memory ones); pixels with zero weight or a
        non-finite error are excluded.

    Raises
    ------
    ValueError
        For a non-2-D or empty image, a mask, error or weight of another shape,
        negative errors or weights, both error and weight, or no valid pixel.

    Examples
    --------
    >>> import dask.array as da
    >>> img = da.from_array(np.arange(36.0).reshape(6, 6), chunks=3)
    >>> be = DaskBackend(img, tile=4, unit=(2, 2))
    >>> be.chunks, be.median(lambda a, window: a.ravel(), [be.image])
    (((4, 2), (4, 2)), 17.5)
    """

    tiled = True
    #: Relative inverse variance per pixel (from ``error``, set by the fit), or None.
    weight = None

    def __init__(
        self, image, mask=None, *, tile=1024, unit=(2, 2), client=None, error=None, weight=None
    ):
        if not hasattr(image, "shape") or not hasattr(image, "dtype"):
            image = np.asarray(image)
        if len(image.shape) != 2:
            raise ValueError(f"image must be 2-dimensional, got shape {image.shape}")
        shape = (int(image.shape[0]), int(image.shape[1]))
        if shape[0] == 0 or shape[1] == 0:
            raise ValueError(f"image must not be empty, got shape {shape}")
        if np.dtype(image.dtype).kind not in "biuf":
            raise TypeError(
                f"image must hold real numbers (int or float), got dtype {image.dtype}"
            )
        tile = as_pair("tile", tile)
        self.shape, self.dtype, self.client = shape, np.dtype(work_dtype(image.dtype)), client
        self.size = shape[0] * shape[1]
        # tiles start on the change's subsample (CHANGE_STEP)
        self.unit = tuple(math.lcm(int(u), CHANGE_STEP) for u in unit)
        if error is not None or weight is not None:
            # the maskers' noise from an error map is summed in blocks of ERROR_BLOCK
            self.unit = tuple(math.lcm(u, ERROR_BLOCK) for u in self.unit)
        self.tile = tuple(
            n if n <= u else max(u, t // u * u)
            for n, u, t in zip(shape, self.unit, tile, strict=True)
        )
        self.chunks = tuple(aligned_chunks(n, t) for n, t in zip(shape, self.tile, strict=True))
        self.placement = TilePlacement.of(client, tuple(len(c) for c in self.chunks))
        # block key -> its task, computed inside the tasks that read the block (cheap
        # lookups: the kept labels of label_seeded), and the name of their array
        self._inline: dict = {}
        self._inline_name = None
        # label_seeded's carried blocks, taken out of the labels' results inline
        self._carried: dict = {}
        self._carried_name = None
        # (array name, binning) -> the BorderStrips its windows last read it through
        self._strip_cache: dict = {}
        self.image = self._source(image, _work_block, self.dtype)
        given = None
        if mask is not None:
            if not hasattr(mask, "shape") or not hasattr(mask, "dtype"):
                mask = np.asarray(mask)
            if tuple(mask.shape) != shape:
                raise ValueError(f"mask must have the image's shape {shape}, got {mask.shape}")
            given = self._source(mask, _mask_block, bool)
        import dask.array as da

        self.error, lowest, pname = None, None, None
        if error is not None or weight is not None:
            self.error, lowest, pname = self._noise(error, weight)
            none = self.error.map_blocks(_no_noise_block, dtype=bool)
            given = none if given is None else given | none
        bad = da.map_blocks(
            _bad_block, self.image, *([] if given is None else [given]), dtype=bool
        )
        # Where the cluster has room, the working image is kept from here on:
        # normalise reads it (its subsample, then its tiles) rather than the file
        # twice more. The counts come with the persisted arrays (one submission).
        keep = [self.image, bad] if self._room_for_image() else [bad]
        persisted, nbad, low = self._persist_counted(keep, [] if lowest is None else [lowest])
        if len(keep) == 2:
            self.image = persisted[0]
        self.bad = self.given_bad = persisted[-1]
        if low and low[0] < 0:
            raise ValueError(
                f"{pname} must be >= 0 everywhere, got a minimum of {float(low[0])!r}"
            )
        self.nbad = int(nbad)
        if self.nbad == self.size:
            raise ValueError("image has no valid pixel: everything is masked or non-finite")
        self._last = None
        self._background_model = (None, None)  # the last background map made from a model
        self._image_subsamples: dict = {}
        # (name, step) -> the last mask_stats' mask subsampled (read by the next refit)
        self._mask_subsamples: dict = {}
        # ((mask, last mask) names, mask_stats' result) computed by mask() with its mask
        self._stats = None
        self.halo = 0  # the largest halo read so far (pixels)
        # Full-width strips of about a tile's area, for the C-order noise sample.
        h = max(1, self.tile[0] * self.tile[1] // shape[1])
        self.strips = [(y, min(shape[0], y + h)) for y in range(0, shape[0], h)]

    def normalise(self) -> Normalisation:
        """As :meth:`MemoryBackend.normalise <skymap.backends.memory.MemoryBackend.normalise>`,
        tile by tile: the constants come from the same strided subsample."""
        step = Normalisation.sample_step(self.shape)
        sub, subbad = self._subsamples([self.image, self.bad], step)
        norm = Normalisation.from_sample(sub, subbad, self.dtype)
        image = self.image.map_blocks(norm.apply, dtype=self.dtype)
        bad = self.given_bad | image.map_blocks(norm.outliers, dtype=bool)
        if self._room_for_image():
            # Kept on the workers: every step reads it, and each tile's tasks then run
            # where its pixels are, without reading the file again (the tiles' tasks
            # of both arrays run on the tile's worker: TilePlacement).
            arrays = [image, bad]
        else:
            self.image, arrays = image, [bad]
        persisted, nbad, _ = self._persist_counted(arrays)
        if len(arrays) == 2:
            self.image = persisted[0]
        self.bad, self.nbad = persisted[-1], nbad
        return norm

    def _room_for_image(self) -> bool:
        """Whether the working image fits the cluster: a ``distributed`` client whose
        workers' memory limits add up to 12 times its size or more (a local scheduler
        would hold it in this process). A fit keeps about 6 times the image on the
        workers at its peak (a scale's stacked maps, labels, residual and masks:
        3 GB a worker at 16384x16384 on two workers); the image and its bad pixels
        add 1.25 times, and a worker pauses at 80% of its limit."""
        info = getattr(self.client, "scheduler_info", None)
        if info is None:
            return False
        try:
            workers = info().get("workers", {}).values()
        except Exception:  # a client without a live scheduler
            return False
        limit = sum(int(w.get("memory_limit") or 0) for w in workers)
        return 12 * self.size * self.dtype.itemsize <= limit

    def _noise(self, error, weight):
        """(sigma per tile as a lazy float64 dask array, the lazy minimum of the given
        values (or 0), the parameter's name) for ``error`` or ``weight``."""
        import dask.array as da

        value, pname = noise_value(error, weight)
        if not is_tiled_input(value) and not hasattr(value, "__array_function__"):
            value = np.asarray(value)  # lists, scalars
        if np.ndim(value) == 0:
            value = da.full(self.shape, float(value), chunks=self.chunks)
        if tuple(value.shape) != self.shape:
            raise ValueError(
                f"{pname} must have the image's shape {self.shape}, got {value.shape}"
            )
        raw = self._source(value)
        lowest = da.where(raw < 0, raw, 0).min()  # NaN is not negative
        sigma = raw.map_blocks(noise_sigma, from_weight=weight is not None, dtype=np.float64)
        return sigma, lowest, pname

    def layout(self) -> TileLayout:
        """The tiles: their shape, the chunks and the largest halo read so far."""
        return TileLayout(tile=self.tile, chunks=self.chunks, halo=self.halo)

    # -- dask plumbing

    def _source(self, data, convert=None, dtype=None):
        """``data`` (image or mask) as a dask array of the tiles, never read here, each
        block ``convert``-ed (to ``dtype``) if given. A memory map is read by each task
        from its file (pickling the memmap would ship the whole array with every
        graph), converted by the same task; an in-memory array is sent to the cluster
        once (persisted); a dask array is rechunked to the tiles."""
        import dask.array as da

        def converted(arr):
            return arr if convert is None else arr.map_blocks(convert, dtype=dtype)

        if isinstance(data, da.Array):
            return converted(data.rechunk(self.chunks))
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
            return self._tile_array(
                _read_memmap, lambda i, j, ys, xs, ref: (layout, ys, xs, convert), [],
                self.chunks, data.dtype if convert is None else dtype,
            )  # fmt: skip
        (arr,) = self.persist(da.from_array(np.asarray(data), chunks=self.chunks, name=False))
        return converted(arr)

    def persist(self, *arrays):
        import dask

        with self._placed():
            return dask.persist(*arrays, scheduler=self.client)

    def _placed(self):
        """A context in which the graphs sent to a ``distributed`` cluster carry the
        tiles' placement (:class:`TilePlacement`); a no-op on other schedulers."""
        import contextlib

        import dask

        if self.placement is None:
            return contextlib.nullcontext()
        return dask.annotate(workers=self.placement, allow_other_workers=True)

    def _persist_gather(self, arrays: Sequence, lazies: Sequence) -> tuple[list, list]:
        """(``arrays`` and ``lazies`` persisted, ``lazies`` computed) from one submission
        to the cluster: each graph sent costs ~10 ms of the scheduler's and the
        driver's CPU whatever its size, as much as several tasks."""
        import dask

        with self._placed():
            out = dask.persist(*arrays, *lazies, scheduler=self.client)
        arrays, lazies = list(out[: len(arrays)]), list(out[len(arrays) :])
        gather = getattr(self.client, "gather", None)
        if gather is not None and hasattr(self.client, "scheduler_info"):
            from distributed import futures_of

            # the persisted values fetched, no graph sent again (on threads of this
            # process, by reference)
            return arrays + lazies, list(gather([futures_of(d)[0] for d in lazies]))
        return arrays + lazies, list(dask.compute(*lazies, scheduler=self.client))

    def compute(self, *things):
        """The computed ``things``: one value for one thing, else a list."""
        out = self._compute_list(things)
        return out[0] if len(things) == 1 else out

    def _compute_list(self, things) -> list:
        import dask

        with self._placed():
            return list(dask.compute(*things, scheduler=self.client))

    def persist_counted(self, mask) -> tuple[Any, int]:
        """(``mask`` persisted, its count of True): one submission, or none beyond the
        persist where the workers are threads of this process (the count made here
        from the blocks)."""
        persisted, count, _ = self._persist_counted([mask])
        return persisted[0], count

    def _persist_counted(self, arrays: Sequence, lazies: Sequence = ()) -> tuple[list, int, list]:
        """(``arrays`` persisted, the count of True in the last one, ``lazies``
        computed): counted here from the blocks (:meth:`_here`) where it can, else
        with the arrays in one submission."""
        if not lazies and self._shared():
            persisted = list(self.persist(*arrays))
            here = self._here(persisted[-1])
            if here is not None:
                return persisted, sum(int(np.count_nonzero(b)) for b in here[0].flat), []
            arrays = persisted
        out, got = self._persist_gather(arrays, [arrays[-1].sum(), *lazies])
        return out[: len(arrays)], int(got[0]), got[1:]

    def _shared(self) -> bool:
        """Whether the workers are threads of this process (blocks pass by reference)."""
        return self.placement is not None and self.placement.shared

    def _here(self, *arrays) -> list | None:
        """The blocks of persisted ``arrays``, each as a 2-D object array of ndarrays,
        when the cluster's workers are threads of this process (fetched by reference:
        nothing copied), else None (an array not persisted, worker processes, no
        ``distributed`` cluster). A small reduction of such blocks runs here: one
        fetch (~2 ms) costs far less than a graph (~10 ms) and its tasks (~1 ms
        each), and the driver holds nothing new but the reduction's result."""
        if not self._shared():
            return None
        from distributed import futures_of

        grids = [key_grid(a) for a in arrays]
        held = {f.key: f for a in arrays for f in futures_of(a)}
        keys = [k for g in grids for k in g.flat]
        if not all(k in held for k in keys):
            return None
        got = iter(self.client.gather([held[k] for k in keys]))
        out = []
        for g in grids:
            blocks = np.empty(g.shape, object)
            for idx in np.ndindex(g.shape):
                blocks[idx] = next(got)
            out.append(blocks)
        return out

    def tiles(self):
        """(i, j, (y0, y1), (x0, x1)) of every tile, row by row."""
        ys = np.cumsum((0, *self.chunks[0]))
        xs = np.cumsum((0, *self.chunks[1]))
        for i in range(len(self.chunks[0])):
            for j in range(len(self.chunks[1])):
                yield i, j, (int(ys[i]), int(ys[i + 1])), (int(xs[j]), int(xs[j + 1]))

    def grown(self, rows, cols, halo: int):
        """The tile ``rows`` x ``cols`` grown by ``halo`` pixels (rounded up to the
        alignment unit), cut at the image's edges."""
        hy, hx = (_round_up(halo, u) for u in self.unit)
        (y0, y1), (x0, x1) = rows, cols
        ny, nx = self.shape
        return (max(0, y0 - hy), min(ny, y1 + hy)), (max(0, x0 - hx), min(nx, x1 + hx))

    def edges(self, b: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Block edges along each axis of the arrays binned by ``b``."""
        return tuple(np.cumsum((0, *ch)) for ch in self.binned_chunks(b))

    def binned_chunks(self, b: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        out = []
        for ch in self.chunks:
            e = np.cumsum((0, *ch))
            out.append(
                tuple(int(-(-e1 // b) - e0 // b) for e0, e1 in zip(e[:-1], e[1:], strict=True))
            )
        return tuple(out)

    def _tasks(self, func, args_of, dependencies, lead=(), label=None, **shared):
        """A graph of one task per tile, ``func(*args_of(i, j, rows, cols, ref))``; the
        arguments may hold block keys of ``dependencies`` (in nested lists), and ``ref``
        maps each name of ``shared`` to the key of that object, which is put in the
        graph once rather than in every task (and ``ref[CUTS]`` to a dict of extra
        tasks, :meth:`BorderStrips.cover`'s cuts). Built by hand: a ``dask.delayed`` call per tile
        costs more than the tile's work on small tiles. ``label`` names the tasks
        (default ``func``'s name)."""
        from dask.highlevelgraph import HighLevelGraph

        label = label or getattr(func, "__name__", "task")
        name = f"{label.strip('_')}-{uuid.uuid4().hex}"
        ref = {k: f"{name}-{k}" for k in shared}
        dsk: dict = {ref[k]: v for k, v in shared.items()}
        cuts: dict = {}
        ref[CUTS] = cuts
        keys = {}
        # Only a graph that reads the lookups' array holds their keys: the others are
        # not walked for them (~70 000 calls a fit with 1024-px tiles).
        inline = self._lookups(dependencies)
        for i, j, ys, xs in self.tiles():
            keys[i, j] = (name, *lead, i, j)
            task = (func, *args_of(i, j, ys, xs, ref))
            # a lookup is run inline only where its block lives (else its own task's
            # small output travels, not the block it reads)
            dsk[keys[i, j]] = _inlined(task, inline, self._near(i, j))
        # the strip tasks run where their block lives
        dsk.update({k: _inlined(v, inline, None) for k, v in cuts.items()})
        return name, HighLevelGraph.from_collections(name, dsk, dependencies=dependencies), keys

    def _lookups(self, dependencies) -> dict:
        """The inline tasks of the arrays of ``dependencies`` (the lookups', the
        carried blocks'), by block key."""
        import dask.array as da

        names = {d.name for d in dependencies if isinstance(d, da.Array)}
        if self._carried_name in names:
            return (
                {**self._inline, **self._carried} if self._inline_name in names else self._carried
            )
        return self._inline if self._inline_name in names else {}

    def _tile_array(self, func, args_of, dependencies, chunks, dtype, label=None, **shared):
        import dask.array as da

        lead = (0,) * (len(chunks) - 2)
        name, graph, _ = self._tasks(func, args_of, dependencies, lead, label, **shared)
        return da.Array(graph, name, chunks=chunks, dtype=dtype)

    def _gather(self, func, args_of, dependencies, label=None, **shared) -> list:
        from dask.delayed import Delayed

        name, graph, keys = self._tasks(func, args_of, dependencies, label=label, **shared)
        return self._compute_list([Delayed(key, graph, layer=name) for key in keys.values()])

    def _near(self, i: int, j: int):
        """Whether a block (bi, bj) lives on the worker that runs tile (i, j)'s tasks:
        by the placement on a ``distributed`` cluster of several worker processes; on
        threads of one process (an in-process cluster, any other scheduler) every block
        is read in place."""
        placement = self.placement
        if placement is None or placement.shared:
            return lambda bi, bj: True
        here = placement.worker(i, j)
        return lambda bi, bj: placement.worker(bi, bj) == here

    def _windows(self, inputs, halo, own=()):
        """``args_of`` for :meth:`_tasks`: per tile the covering blocks and slices of
        each ``(array, binning)`` of ``inputs`` over the tile grown by ``halo`` (for
        the indices ``own``, the tile's block and None), then the window and the
        core."""
        grown = [_round_up(halo, u) for u in self.unit]
        # Where every block is read in place (threads of one process, or no cluster),
        # a window names its blocks whole and the slice of their concatenation: no
        # task per block to cut its part (dask converts and walks every nested task of
        # a graph it is sent). The inline lookups are still cut: they run on the
        # window's part of their block only.
        here = self.placement is None or self.placement.shared
        grids = [
            (key_grid(a), b, None)
            if k in own
            else (
                self._strips(a, b, [-(-g // b) + 1 for g in grown]),
                b,
                here and a.name != self._inline_name,
            )
            for k, (a, b) in enumerate(inputs)
        ]
        self.halo = max(self.halo, max(grown, default=0))

        def args(i, j, ys, xs, ref):
            win = self.grown(ys, xs, halo)
            out = []
            for halos, b, whole in grids:
                bwin = tuple((w0 // b, -(-w1 // b)) for w0, w1 in win)
                if whole is None:
                    out.extend((halos[i, j], None))  # the tile's block alone
                elif whole:
                    out.extend(cover(halos.keys, halos.edges, bwin))
                else:
                    out.extend(halos.cover(bwin, ref[CUTS], self._near(i, j)))
            return (*out, win, (ys, xs))

        return args

    def _strips(self, array, b: int, reach) -> BorderStrips:
        """How windows reaching ``reach`` (binned pixels) read ``array`` (binned by
        ``b``): the :class:`BorderStrips` of an earlier call on the same array whose
        strips are as deep, so that both calls take their pieces from the same strip
        tasks (moved between the workers once), else new ones."""
        key = (array.name, b)
        old = self._strip_cache.get(key)
        if old is not None and all(o >= r for o, r in zip(old.reach, reach, strict=True)):
            return old
        new = BorderStrips(key_grid(array), self.edges(b), reach, array)
        self._strip_cache[key] = new
        if len(self._strip_cache) > 16:  # only the last few arrays are read again
            del self._strip_cache[next(iter(self._strip_cache))]
        return new

    def map_tiles(
        self,
        func: Callable,
        arrays: Sequence,
        *,
        halo: int = 0,
        dtype=None,
        block: int = 1,
        layers: int | None = None,
        binning: Sequence = (),
        pieces: bool = False,
        own: Sequence[int] = (),
        **kw,
    ):
        """See :meth:`ArrayBackend.map_tiles`; ``binning`` gives each array's bin factor
        (default 1), ``block`` the output's, ``layers`` a leading axis of the output.
        The keywords ``kw`` are put in the graph once. With ``pieces``, ``func`` reads
        each window as :class:`~skymap.backends.windows.Pieces` (in place: a task that
        needs only a part of a window, or works part by part, copies nothing). The
        arrays of index in ``own`` are read on the tile only: ``func`` gets the tile's
        block itself (its core), and the neighbouring blocks are not inputs of the
        task (each input costs the scheduler and the workers' bookkeeping, and a
        transfer from another worker)."""
        bins = list(binning) + [1] * (len(arrays) - len(binning))
        args, dependencies, kw = self._windowed_args(func, arrays, bins, halo, kw, own)
        chunks = self.binned_chunks(block)
        if layers is not None:
            chunks = ((layers,), *chunks)
        return self._tile_array(
            _pieced if pieces else _windowed, args, dependencies, chunks, dtype or self.dtype,
            _name(func), kw=kw,
        )  # fmt: skip

    def _windowed_args(self, func, arrays, bins, halo, kw, own=()):
        """(``args_of``, dependencies, plain keywords) of a :func:`_windowed` task per
        tile: ``func`` on the windows of ``arrays`` (binned by ``bins``) over the tile
        grown by ``halo`` (the tile's block of those of index in ``own``); the keywords
        go in the graph once, and lazy ones (``dask.delayed``, e.g. :meth:`share`'s or
        :meth:`reduce_windows`') are taken by key."""
        windows = self._windows(list(zip(arrays, bins, strict=True)), halo, own)
        kw, lazy, names, values = _split_lazy(kw)

        def args(i, j, ys, xs, ref):
            return (func, len(arrays), *windows(i, j, ys, xs, ref), ref["kw"], names, *values)

        return args, [*arrays, *lazy.values()], kw

    def share(self, value):
        """``value`` put on the cluster once, as a lazy value (``dask.delayed``) that
        the tasks of :meth:`map_tiles`, :meth:`reduce_windows` and :meth:`label_seeded`
        take as a keyword by its key: the graphs that read it then carry the key, not
        the value pickled again (a noise grid read by every masking scale)."""
        import dask

        lazy = dask.delayed(value, name=f"shared-{uuid.uuid4().hex}", traverse=False)
        (lazy,) = self.persist(lazy)
        return lazy

    def gather_tiles(
        self, func: Callable, arrays: Sequence, *, reach: int = 0, block: int = 1, **kw
    ) -> list:
        """``func(*windows, window=, core=, **kw)`` per tile, computed, row by row: the
        arrays (binned by ``block``) read over the tile's binned core grown by
        ``reach`` binned pixels forward along each axis (cut at the edge)."""
        from dask.delayed import Delayed

        name, graph, keys = self._forward_tasks(func, arrays, reach, block, kw)
        return self._compute_list([Delayed(key, graph, layer=name) for key in keys.values()])

    def gather_windows(self, func: Callable, arrays: Sequence, *, halo: int = 0, **kw) -> list:
        """``func(*windows, window=, core=, **kw)`` per tile, computed, row by row: the
        arrays read over the tile grown by ``halo`` pixels (rounded up to the unit,
        cut at the image's edges)."""
        args, dependencies, kw = self._windowed_args(func, arrays, [1] * len(arrays), halo, kw)
        return self._gather(_windowed, args, dependencies, _name(func), kw=kw)

    def values_at(self, arrays: Sequence, ys, xs) -> list[np.ndarray]:
        """The pixels of each of ``arrays`` at the integer indices (``ys``, ``xs``)
        (arrays of one shape, inside the image), read by the tiles that hold them:
        one task per tile with points, each given only its own points."""
        ys, xs = np.asarray(ys), np.asarray(xs)
        fy, fx = ys.ravel(), xs.ravel()
        ey, ex = self.edges()
        ti = np.searchsorted(ey, fy, side="right") - 1
        tj = np.searchsorted(ex, fx, side="right") - 1
        ntx = ex.size - 1
        tile = ti * ntx + tj
        order = np.argsort(tile, kind="stable")
        bounds = np.searchsorted(tile[order], np.arange((ey.size - 1) * ntx + 1))
        grids = [key_grid(a) for a in arrays]

        def args(i, j, rows, cols, ref):
            sel = order[bounds[i * ntx + j] : bounds[i * ntx + j + 1]]
            return (fy[sel] - rows[0], fx[sel] - cols[0], *(g[i, j] for g in grids))

        here = self._here(*arrays)
        if here is None:
            blocks = self._gather(_pick, args, list(arrays))
        else:
            blocks = [
                _pick(*args(i, j, ys, xs, None)[:2], *(h[i, j] for h in here))
                for i, j, ys, xs in self.tiles()
            ]
        out = [np.empty(fy.size, a.dtype) for a in arrays]
        for (i, j, _, _), got in zip(self.tiles(), blocks, strict=True):
            sel = order[bounds[i * ntx + j] : bounds[i * ntx + j + 1]]
            for o, g in zip(out, got, strict=True):
                o[sel] = g
        return [o.reshape(ys.shape) for o in out]

    def reduce_windows(
        self,
        func: Callable,
        arrays: Sequence,
        combine: Callable,
        *,
        halo: int = 0,
        keep: bool = False,
        pieces: bool = False,
        binning: Sequence = (),
        **kw,
    ):
        """``func(*windows, window=, core=, **kw)`` per tile (the arrays read over the
        tile grown by ``halo`` pixels, as :meth:`gather_windows`), then
        ``combine(per_tile_results)`` (row by row) as one more task of the graph: a lazy
        value (``dask.delayed``) that later tasks take as a keyword (of
        :meth:`map_tiles`, :meth:`label_seeded`) without a round trip through the
        driver.

        With ``keep``, ``func`` returns a pair: ``combine`` reads the first items, and
        the second ones stay on the tiles' workers for :meth:`map_kept` (what a later
        step would compute again from the same windows); returns (the lazy value, the
        kept values). With ``pieces``, ``func`` reads each window as
        :class:`~skymap.backends.windows.Pieces` (in place), not copied out.
        ``binning`` gives each array's bin factor (default 1), as in :meth:`map_tiles`."""
        bins = list(binning) + [1] * (len(arrays) - len(binning))
        args, dependencies, kw = self._windowed_args(func, arrays, bins, halo, kw)
        task = _pieced if pieces else _windowed
        name, graph, keys = self._tasks(task, args, dependencies, label=_name(func), kw=kw)
        apart = self.placement is not None and not self.placement.shared
        combined = _combined(name, graph, keys, combine, dependencies, keep, apart)
        return (combined, (combined, keys)) if keep else combined

    def map_kept(
        self, func: Callable, kept, *, dtype, block: int = 1, layers: int | None = None, **kw
    ):
        """``func(value, core=, **kw)`` per tile on the values kept by
        :meth:`reduce_windows` (``keep=True``), run where they are: a dask array of
        the tiles binned by ``block`` (``layers``: with a leading axis of that length);
        lazy keywords are taken by key."""
        source, keys = kept  # the combined value's graph holds the tile tasks
        kw, lazy, names, values = _split_lazy(kw)

        def args(i, j, ys, xs, ref):
            return ((_item, keys[i, j], 1), (ys, xs), ref["kw"], names, *values)

        chunks = self.binned_chunks(block)
        if layers is not None:
            chunks = ((layers,), *chunks)
        return self._tile_array(
            functools.partial(_tile_kept, func), args, [source, *lazy.values()],
            chunks, dtype, _name(func), kw=kw,
        )  # fmt: skip

    def _forward_tasks(self, func, arrays, reach, block, kw):
        b = block
        halos = [BorderStrips(key_grid(a), self.edges(b), (reach, reach), a) for a in arrays]
        gy, gx = (-(-n // b) for n in self.shape)

        def args(i, j, ys, xs, ref):
            core = ((ys[0] // b, -(-ys[1] // b)), (xs[0] // b, -(-xs[1] // b)))
            win = (
                (core[0][0], min(gy, core[0][1] + reach)),
                (core[1][0], min(gx, core[1][1] + reach)),
            )
            out = []
            for h in halos:
                out.extend(h.cover(win, ref[CUTS], self._near(i, j)))
            return (func, len(halos), *out, win, core, ref["kw"])

        return self._tasks(_windowed, args, list(arrays), label=_name(func), kw=kw)

    def per_tile_sums(self, func, arrays, *, width: int, **kwargs) -> np.ndarray:
        """Sum over the tiles of ``func(blocks..., window=...)``, a vector of ``width``
        numbers per tile: one task per tile and one that adds them up (row by row), or
        (persisted ``arrays`` on threads of this process, :meth:`_here`) made here."""
        here = self._here(*arrays)
        if here is not None:
            # made here from the blocks fetched by reference (no graph, no tasks), added
            # up in the same order as the graph's combine task
            return _add_up(
                [
                    _tile_sum(func, kwargs, (ys, xs), *(h[i, j] for h in here))
                    for i, j, ys, xs in self.tiles()
                ]
            )
        grids = [key_grid(a) for a in arrays]

        def args(i, j, ys, xs, ref):
            return (func, ref["kw"], (ys, xs), *(g[i, j] for g in grids))

        name, graph, keys = self._tasks(
            _tile_sum, args, list(arrays), label=_name(func), kw=kwargs
        )
        return np.asarray(self.compute(_combined(name, graph, keys, _add_up, arrays)))

    # -- the loop's operations

    def background(self, model, deferred=False):
        # lazy either way: the residual's tasks make the map where the image is
        import dask.array as da

        native = _native_background(model)
        if native is not None:
            return native
        model = _for_maps(model)
        bkg = da.map_blocks(
            _tile_model_map, dtype=self.dtype, chunks=self.chunks, model=model, which="background"
        )
        self._background_model = (bkg.name, model)
        return bkg

    def residual(self, background):
        import dask.array as da

        name, model = self._background_model
        if getattr(background, "name", None) == name:
            # the model's map made by the task that subtracts it, where the image is
            # (in one pass where the model can: no map of the tile in fresh memory)
            fused = residual_in_one_pass(model, self.dtype)
            task = _tile_residual_map if fused else _tile_residual
            return da.map_blocks(task, self.image, model=model, dtype=self.dtype)
        return da.map_blocks(_subtract, self.image, background, dtype=self.dtype)

    def fit(self, estimator, mask, **hints):
        return estimator.fit_on(self, mask, **hints)

    def mask(self, masker, residual, noise, window_of):
        import dask.array as da
        from dask.delayed import Delayed

        excl = da.map_blocks(_initial_exclusion, residual, self.bad, dtype=bool)
        residual, excl = self.persist(residual, excl)
        if isinstance(masker, SplitMasker):
            excl = masker.mask_on(self, residual, noise, excl, window_of)
        elif isinstance(masker, BinnedStepMasker):
            b = int(masker.block(self.shape))
            sums = self.cell_grid(block_sums, [residual, excl], (b, b), 2, b=b)
            state = masker.global_step(sums[0], sums[1])
            det = self.map_tiles(
                _tile_binned_step, [residual, self.bad], halo=int(masker.halo(self.shape)),
                dtype=bool, masker=masker, noise=noise, window_of=window_of, state=state,
            )  # fmt: skip
            excl = excl | det
        elif isinstance(masker, TileMasker):
            det = self.map_tiles(
                _tile_masker, [residual, self.bad], halo=int(masker.halo(self.shape)),
                dtype=bool, masker=masker, noise=noise, window_of=window_of,
            )  # fmt: skip
            excl = excl | det
        else:
            # a masker with no tiled form: called once on the gathered residual
            det = np.asarray(
                masker(self.gather(residual), noise, self.gather(self.bad)), dtype=bool
            )
            excl = excl | da.from_array(det, chunks=self.chunks)
        # The masker's last lazy step (a scale's dilation) runs inside the final mask's
        # task: a task a tile less.
        excl_graph = excl.__dask_graph__()
        ek, rk, bk = (key_grid(a) for a in (excl, residual, self.bad))
        new = self._tile_array(
            _final_mask, lambda i, j, *_: (_own_task(excl_graph, ek[i, j]), rk[i, j], bk[i, j]),
            [excl, residual, self.bad], self.chunks, bool,
        )  # fmt: skip
        # mask_stats' counts (its next call) made here from the persisted blocks, or
        # persisted with their tasks in one submission
        parts = None
        if self._shared():
            (new,) = self.persist(new)
            parts = self._stats_here(new)
        if parts is None:
            name, graph, keys = self._tasks(*self._stats_tasks(new))
            lazies = [Delayed(key, graph, layer=name) for key in keys.values()]
            (new, *_), parts = self._persist_gather([new], lazies)
        self._stats = self._stats_of(new, parts)
        return new

    def noise_map(self, model):
        import dask

        slim = _for_maps(model)
        counts = self._compute_list(
            [dask.delayed(_strip_positive)(slim, rows) for rows in self.strips]
        )
        total = int(sum(counts))
        if total == 0:
            return _NoiseMap(model=model, floor=None)
        step = max(1, total // 250_000)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        samples = self._compute_list(
            [
                dask.delayed(_strip_positive)(slim, rows, int(-f % step), step)
                for rows, f in zip(self.strips, first, strict=True)
            ]
        )
        return _NoiseMap(model=model, floor=0.5 * float(np.median(np.concatenate(samples))))

    def change(self, background, model, previous, noise, noise_model) -> float:
        # per tile from the models (a quarter of the pixels), not from `background`

        arrays = [self.bad]
        old = _native_background(previous)
        if old is not None:
            arrays.append(old)
            previous = None
        total, n = self.per_tile_sums(
            _tile_change, arrays, width=2, new=_for_maps(model),
            old=None if previous is None else _for_maps(previous), noise=noise,
            window_of=noise_model.window,
        )  # fmt: skip
        return float(np.sqrt(total / n)) if n else 0.0

    def mask_stats(self, new):
        last = None if self._last is None else self._last.name
        stats = self._stats
        if stats is None or stats[0] != (new.name, last):
            parts = self._stats_here(new)
            if parts is None:
                parts = self._gather(*self._stats_tasks(new))
            stats = self._stats_of(new, parts)
        self._last, self._stats = new, None
        return stats[1]

    def _stats_tasks(self, new):
        """The tasks of :meth:`mask_stats` (``_gather``'s arguments): one per tile
        counts both, its results summed in the driver (no reduction tree). The same
        task takes the mask's subsamples at the steps the image was read at (a refit
        reads its mask there, :meth:`subsample`): no graph of their own."""
        arrays = [new] if self._last is None else [new, self._last]
        grids = [key_grid(a) for a in arrays]
        steps = sorted(self._image_subsamples)

        def args(i, j, ys, xs, ref):
            starts = tuple((-ys[0] % step, -xs[0] % step, step) for step in steps)
            return (starts, *(g[i, j] for g in grids))

        return _tile_counts, args, arrays

    def _stats_here(self, new) -> list | None:
        """:meth:`_stats_tasks`' results made here from the blocks fetched by
        reference (:meth:`_here`), or None."""
        func, args_of, arrays = self._stats_tasks(new)
        here = self._here(*arrays)
        if here is None:
            return None
        return [
            func(args_of(i, j, ys, xs, None)[0], *(h[i, j] for h in here))
            for i, j, ys, xs in self.tiles()
        ]

    def _stats_of(self, new, parts):
        """((new's name, the last mask's name), mask_stats' result) from the tasks'
        ``parts``; the subsamples are kept for :meth:`subsample`."""
        count, flips = np.sum([p[:2] for p in parts], axis=0)
        ny, nx = (len(c) for c in self.chunks)
        self._mask_subsamples = {
            (new.name, step): np.block(
                [[parts[i * nx + j][2][k] for j in range(nx)] for i in range(ny)]
            )
            for k, step in enumerate(sorted(self._image_subsamples))
        }
        last = None if self._last is None else self._last.name
        return (new.name, last), (int(flips), int(count), None)

    def median_where(self, values, excluded) -> float:
        return self.median(_noise_values, [excluded], noise=values)

    def any_nonfinite(self, array) -> bool:
        import dask.array as da

        return bool(self.compute((~da.isfinite(array)).any()))

    def valid_extent(self) -> tuple[int, int]:
        here = self._here(self.given_bad)
        if here is None:
            # two small reductions in one graph
            return extent_of(*self.compute(self.given_bad.all(axis=1), self.given_bad.all(axis=0)))
        rows, cols = np.ones(self.shape[0], bool), np.ones(self.shape[1], bool)
        for i, j, (y0, y1), (x0, x1) in self.tiles():
            block = here[0][i, j]
            rows[y0:y1] &= block.all(axis=1)
            cols[x0:x1] &= block.all(axis=0)
        return extent_of(rows, cols)

    def valid_blocks(self, q: int) -> np.ndarray:
        here = self._here(self.bad)
        if here is not None:
            return np.block([[valid_blocks(b, q) for b in row] for row in here[0]])
        chunks = tuple(tuple(-(-c // q) for c in ch) for ch in self.chunks)
        return self.compute(self.bad.map_blocks(valid_blocks, q=q, dtype=bool, chunks=chunks))

    def result(self, array):
        return array

    def result_rms(self, model):
        import dask.array as da

        return da.map_blocks(
            _tile_model_map,
            dtype=self.dtype,
            chunks=self.chunks,
            model=_for_maps(model),
            which="rms",
        )

    # -- primitives

    def gather(self, array) -> np.ndarray:
        return np.asarray(self.compute(array))

    def subsample(self, array, step: int) -> np.ndarray:
        # the image's subsamples are read once (every refit asks for its reference level)
        if array is self.image and step in self._image_subsamples:
            return self._image_subsamples[step]
        sub = self._mask_subsamples.get((getattr(array, "name", None), step))
        if sub is not None:
            return sub
        (sub,) = self._subsamples([array], step)
        if array is self.image:
            self._image_subsamples[step] = sub
        return sub

    def _subsamples(self, arrays, step: int) -> list[np.ndarray]:
        """``array[::step, ::step]`` of each of ``arrays``: from the blocks fetched by
        reference (:meth:`_here`) where it can, else in one graph."""
        here = self._here(*arrays)
        if here is None:
            return [np.asarray(a) for a in self._compute_list([a[::step, ::step] for a in arrays])]
        out = []
        for blocks in here:
            rows = [[None] * blocks.shape[1] for _ in range(blocks.shape[0])]
            for i, j, ys, xs in self.tiles():
                rows[i][j] = blocks[i, j][-ys[0] % step :: step, -xs[0] % step :: step]
            out.append(np.block(rows))
        return out

    def first_valid(self, mask) -> float:
        import dask.array as da

        width = self.shape[1]
        here = self._here(mask, self.image)
        if here is not None:
            firsts = []
            for i, j, ys, xs in self.tiles():
                at = {0: {"array-location": (ys, xs)}}
                firsts.append((int(_tile_first_valid(here[0][i, j], width, at)[0, 0]), i, j))
            first, i, j = min(firsts)
            y0, x0 = (int(e[k]) for e, k in zip(self.edges(), (i, j), strict=True))
            y, x = divmod(first, width)
            return float(here[1][i, j][y - y0, x - x0])
        ny, nx = (len(c) for c in self.chunks)
        flat = da.map_blocks(
            _tile_first_valid, mask, nx=self.shape[1], dtype=np.int64,
            chunks=((1,) * ny, (1,) * nx),
        )  # fmt: skip
        y, x = divmod(int(self.compute(flat.min())), self.shape[1])
        return float(self.compute(self.image[y, x]))

    def cell_grid(self, func, arrays, block, layers, **kw):
        """See :meth:`ArrayBackend.cell_grid`: a task per tile, or (persisted ``arrays``
        on threads of this process, :meth:`_here`) made here from the blocks."""

        here = self._here(*arrays)
        if here is not None:
            # the tiles' grids made here from the blocks fetched by reference: no graph
            # and no task per tile (each costs the scheduler more than its sums)
            grids = [[] for _ in self.chunks[0]]
            for i, j, ys, xs in self.tiles():
                at = {0: {"array-location": [ys, xs]}}
                blocks = (h[i, j] for h in here)
                grids[i].append(_tile_grid(*blocks, task=func, kw=kw, block_info=at))
            return np.block(grids)  # the tiles' grids side by side (their last two axes)
        return np.asarray(self.compute(self._lazy_grid(func, arrays, block, layers, kw)))

    def _lazy_grid(self, func, arrays, block, layers, kw):
        """The cell grid of :meth:`cell_grid` as a lazy dask array: a task per tile."""
        import dask.array as da

        chunks = (
            (layers,),
            *(tuple(-(-c // s) for c in ch) for ch, s in zip(self.chunks, block, strict=True)),
        )
        return da.map_blocks(
            _tile_grid, *arrays, task=func, kw=kw, dtype=np.float64, chunks=chunks, new_axis=0
        )

    def cell_grid_bands(self, func, arrays, block, layers, digest, band_layers=None, **kw):
        grid = self._lazy_grid(func, arrays, block, layers, kw)
        codes = grid.map_blocks(
            _tile_digest, task=digest, block=block, dtype=np.uint8, drop_axis=0
        )
        # the grid stays on the workers; its digest comes here with it
        grid, codes = self._persist_gather([grid, codes], [])[0]
        here = self._here(codes, grid)
        if here is not None:
            codes = np.block([[np.asarray(c) for c in row] for row in here[0]])
        else:
            codes = np.asarray(self.compute(codes))
        keep = layers if band_layers is None else band_layers
        # Bands of whole rows of tiles, cut to at most BAND_BYTES each: the driver's
        # memory stays flat with the image's height and grows slowly with its width.
        step = max(1, BAND_BYTES // (8 * keep * codes.shape[1]))
        bounds = np.cumsum((0, *grid.chunks[1]))
        rows = [
            (int(r), int(min(r + step, b)), i)
            for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
            for r in range(a, b, step)
        ]

        def read(k):
            r0, r1, i = rows[k]
            y0 = int(bounds[i])
            if here is not None:  # by reference on threads of this process
                return np.concatenate([t[:keep, r0 - y0 : r1 - y0] for t in here[1][i]], axis=2)
            return np.asarray(self.compute(grid[:keep, r0:r1]))

        return codes, read, [r[:2] for r in rows]

    def median(self, values, arrays, **kw) -> float:
        """Exact ``np.median`` of ``values(*blocks, window=, **kw)`` over the tiles (one
        value per valid pixel): the middle order statistic(s) selected 16 bits at a
        time from per-tile histograms of their order keys."""
        n = self.size - self.nbad
        picked = self._select(values, arrays, sorted({(n - 1) // 2, n // 2}), kw)
        return float(np.median(np.array(picked, dtype=self.dtype)))

    def _select(self, values, arrays, ks, kw) -> list:
        """The order statistics ``ks`` (0-based ranks): one histogram pass per 16-bit
        digit and distinct prefix, so the two middle ones share their passes while
        their higher digits agree."""
        bits = self.dtype.itemsize * 8
        state = [[k, 0] for k in ks]  # rank left within the prefix, prefix
        for shift in range(bits - 16, -1, -16):
            cums: dict = {}
            for st in state:
                k, prefix = st
                if prefix not in cums:
                    cums[prefix] = np.cumsum(
                        self.per_tile_sums(
                            _tile_digit_histogram,
                            arrays,
                            width=1 << 16,
                            values=values,
                            shift=shift,
                            prefix=prefix,
                            bits=bits,
                            kw=kw,
                        )  # fmt: skip
                    )
                cum = cums[prefix]
                digit = int(np.searchsorted(cum, k, side="right"))
                st[0] = k - (int(cum[digit - 1]) if digit else 0)
                st[1] = (prefix << 16) | digit
        return [key_to_float(prefix, self.dtype) for _, prefix in state]

    def label_seeded(
        self, maps, codes: Callable, *, block: int, keep: Sequence = (), carry=None, **kw
    ):
        """Regions of ``codes(maps_block, which="region", **kw)`` (bool per binned
        pixel) that hold a pixel of ``codes(..., which="seed", **kw)``, 8-connected
        across tiles, as a bool array binned by ``block``: each block a lookup in the
        tile's persisted labels, run inside the tasks on its worker that read it (a
        task of its own for the others). Each tile is labelled on its own by flood
        fills (:func:`~skymap.backends._tile_kernels.seeded_labels`: one label for
        the regions that hold a seed there, one for each other region on the tile's
        edge, none for the rest, which no other tile can reach); the labels that
        touch across a tile boundary are joined by labelling the two-pixel strips
        along every boundary, and ``scipy.sparse.csgraph.connected_components``
        merges them.

        One task per tile labels it and finds the labels' join information; a lazy
        ``maps`` is computed inside it (its tasks are not run on their own: nothing
        else may read it). The labels are persisted with the arrays of ``keep`` (e.g.
        a lazy input of the maps that later steps read again) in one submission to
        the cluster with the computation of the join information. Returns the regions
        and the persisted ``keep``, as a list.

        ``carry``: a lazy array of the tiles (e.g. :meth:`map_kept`'s) whose block
        each label task makes too and keeps with the labels; appended to the list, as
        an array of getters of those blocks, which the windows of later tasks take out
        inline on threads of this process (no task of their own)."""
        from dask.delayed import Delayed

        maps_k = key_grid(maps)
        maps_graph = maps.__dask_graph__()
        # lazy keywords (e.g. a factor computed by reduce_windows) are passed by key
        kw, lazy, names, values = _split_lazy(kw)
        # One task per tile labels it and finds its join information; the maps' own
        # task runs inside it (nothing else reads them): one task where there were
        # three (the maps, the labels, the information).
        args = [maps, *lazy.values()]
        if carry is None:
            func, carried_of = _tile_label_info, lambda i, j: ()
        else:
            carry_k, carry_graph = key_grid(carry), carry.__dask_graph__()
            func, carried_of = (
                _tile_label_carry,
                lambda i, j: (_own_task(carry_graph, carry_k[i, j]),),
            )
            args.append(carry)
        name, graph, keys = self._tasks(
            func,
            lambda i, j, *_: (
                *carried_of(i, j), _own_task(maps_graph, maps_k[i, j]), codes, kw, names, *values
            ),
            args, label="tile_label",
        )  # fmt: skip
        parts = [Delayed(key, graph, layer=name) for key in keys.values()]
        if self.placement is None or self.placement.shared:
            # the labels and their information fetched by reference (or computed here)
            persisted, got = self._persist_gather(keep, parts)
            gathered = [g[1] for g in got]
        else:
            # the information alone travels to the driver: a small task per tile
            from dask.highlevelgraph import HighLevelGraph

            info = {("info-" + name, *key[1:]): (_item, key, 1) for key in keys.values()}
            graph = HighLevelGraph.from_collections("info-" + name, info, dependencies=parts)
            persisted, gathered = self._persist_gather(
                [*keep, *parts], [Delayed(key, graph, layer="info-" + name) for key in info]
            )
        kept, labels = persisted[: len(keep)], persisted[len(keep) : len(keep) + len(parts)]
        info = np.empty(maps_k.shape, object)
        for n, item in enumerate(gathered):
            info.flat[n] = item
        keep = merge_labels(info)
        # each tile's labels: the first item of its task's result, taken where read
        labels_k = np.empty(maps_k.shape, object)
        for (i, j), key in keys.items():
            labels_k[i, j] = (_item, key, 0)
        det = self._tile_array(
            _keep_labels, lambda i, j, *_: (labels_k[i, j], keep[i][j]), labels,
            self.binned_chunks(block), bool,
        )  # fmt: skip
        # Not persisted: the windows on a block's worker compute its lookup themselves
        # (see _tasks), most of a task layer less per masking scale.
        dk = key_grid(det)
        self._inline_name = det.name
        self._inline = {
            dk[i, j]: ((_keep_labels, labels_k[i, j], keep[i][j]), (i, j))
            for i, j, _, _ in self.tiles()
        }
        if carry is not None:
            carried = self._tile_array(
                _item, lambda i, j, *_: (keys[i, j], 2), labels, carry.chunks, carry.dtype,
                "carried",
            )  # fmt: skip
            kept.append(carried)
            if self.placement is None or self.placement.shared:
                ck = key_grid(carried)
                self._carried_name = carried.name
                self._carried = {
                    ck[i, j]: ((_item, keys[i, j], 2), (i, j), False)
                    for i, j, _, _ in self.tiles()
                }
        return det, kept
