"""Tile tasks of :class:`~skymap.backends.dask.DaskBackend`: the functions its dask
graphs run on each tile, window or border strip (labelling and its joins, masking
steps, cell sums, maps, changes, histograms), and the helpers they share. Split from
:mod:`skymap.backends.dask`, which builds the graphs; nothing here builds one.
"""

from __future__ import annotations

import functools

import numpy as np

from skymap._validate import as_image, as_mask, combine_masks
from skymap.backends._memory_kernels import subsampled_change_rows
from skymap.backends._tile_kernels import exclusion_is_final, kept_labels, seeded_labels
from skymap.backends.base import (
    CHANGE_STEP,
    NativeMaps,
)
from skymap.backends.windows import Pieces, assemble, piece


def one_thread(func):
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


def _native_background(model):
    """The model's background when it is already a dask array (a map made tile by
    tile, e.g. a ring median), else None (a model on a grid: evaluated per tile). Read
    through :class:`~skymap.backends.base.NativeMaps` only, so that a model's
    full-resolution property is never computed in the driver."""
    import dask.array as da

    if isinstance(model, NativeMaps):
        native = model.native_background()
        if isinstance(native, da.Array):
            return native
    return None


# --------------------------------------------------------------------------- labels


def _split_lazy(kw: dict):
    """(plain keywords, lazy ones (``dask.delayed``), the lazy ones' names, their
    keys): a task takes a lazy keyword by its key."""
    from dask.delayed import Delayed

    lazy = {k: v for k, v in kw.items() if isinstance(v, Delayed)}
    plain = {k: v for k, v in kw.items() if k not in lazy}
    return plain, lazy, tuple(lazy), [v.key for v in lazy.values()]


@one_thread
def _tile_label_info(maps, codes, kw, names=(), *values):
    """A tile's labels and what the driver needs to join them across tiles
    (:func:`~skymap.backends.labels.merge_labels`), from one task: the labels of
    :func:`~skymap.backends._tile_kernels.seeded_labels` (1 the regions holding a seed,
    2, 3, ... the others that touch the tile's edge, 0 the rest), their count, the
    seeded labels, and the tile's four edges (top, bottom rows; left, right columns)."""
    kw = {**kw, **dict(zip(names, values, strict=True))}
    region = codes(maps, which="region", **kw)
    seed = codes(maps, which="seed", **kw)
    labels, count, seeded = seeded_labels(region, seed)
    edges = (labels[0].copy(), labels[-1].copy(), labels[:, 0].copy(), labels[:, -1].copy())
    return labels, (count, np.array([1] if seeded else [], np.int32), edges)


def _tile_label_carry(carried, *args):
    """:func:`_tile_label_info` ``(*args)`` and ``carried`` (a block made in the same
    task, kept with the tile's labels)."""
    return (*_tile_label_info(*args), carried)


def _own_task(graph, key):
    """The task of ``key`` in ``graph`` when it is one to run inside another task (a
    tuple task of ours), else the key itself (e.g. a persisted block)."""
    try:
        task = graph[key]
    except KeyError:
        return key
    return task if isinstance(task, tuple) and task and callable(task[0]) else key


def _inlined(task, inline: dict, near=None):
    """``task`` with the keys of ``inline`` (key -> (task, block index[, False])) in it, in
    nested tuples and lists, replaced by their tasks, run inside it: all of them, or
    (``near`` given) those whose block ``near(i, j)`` says lives where ``task`` runs.
    The inline tasks ``(func, source, *rest)`` are elementwise (lookups): a window's
    piece of such a block, ``(piece, key, side, slice)``, becomes ``func`` on the
    source's piece only (not those marked False: a piece of them is cut from the
    whole block)."""
    if not inline:
        return task
    if isinstance(task, tuple) and len(task) == 4 and task[0] is piece:
        found = inline.get(task[1])
        # (a block carried with the labels, found[2] False, is taken out whole below)
        if found is not None and len(found) == 2 and (near is None or near(*found[1])):
            func, source, *rest = found[0]
            return (func, (piece, source, *task[2:]), *rest)
    if isinstance(task, (str, tuple)):
        try:
            found = inline.get(task)
        except TypeError:  # a tuple holding unhashable things (slices): not a key
            found = None
        if found is not None:
            return found[0] if near is None or near(*found[1]) else task
    if isinstance(task, tuple):
        return tuple(_inlined(t, inline, near) for t in task)
    if isinstance(task, list):
        return [_inlined(t, inline, near) for t in task]
    return task


def _pick(ys, xs, *blocks):
    return [b[ys, xs] for b in blocks]


def _keep_labels(labels, keep):
    if labels.ndim == 2 and labels.dtype.kind in "iu":
        return kept_labels(labels, keep)
    return keep[labels]


def _name(func) -> str:
    return getattr(func, "__name__", "task")


@one_thread
def _windowed(func, n, *args):
    """``func(*windows, window=, core=, **kw)`` from ``n`` (blocks, slice) pairs (or
    (block, None): the tile's own block), then the window, the core, the keywords and
    (optionally) the names of more keywords and their values."""
    return _on_windows(func, n, args, assemble)


@one_thread
def _pieced(func, n, *args):
    """:func:`_windowed` with each window given as :class:`Pieces` (read in place)."""
    return _on_windows(func, n, args, Pieces)


def _on_windows(func, n, args, window_of):
    # a block given with no slice is the tile's own block, read as it is
    arrays = [
        args[2 * k] if args[2 * k + 1] is None else window_of(args[2 * k], args[2 * k + 1])
        for k in range(n)
    ]
    window, core, kw, *more = args[2 * n :]
    if more and more[0]:
        kw = {**kw, **dict(zip(more[0], more[1:], strict=True))}
    return func(*arrays, window=window, core=core, **kw)


def core_of(window, core, b: int = 1) -> tuple[slice, slice]:
    """The slices of a window's (binned by ``b``) array that hold its core tile."""
    return tuple(
        slice((c0 - w0) // b, -(-(c1 - w0) // b))
        for (w0, _), (c0, c1) in zip(window, core, strict=True)
    )


def _tile_binned_step(res, bad, *, window, core, masker, noise, window_of, state):
    det = np.asarray(masker.local_step(res, window_of(noise, window), bad, state), dtype=bool)
    return np.ascontiguousarray(det[core_of(window, core)])


def _tile_masker(res, bad, *, window, core, masker, noise, window_of):
    det = np.asarray(masker(res, window_of(noise, window), bad), dtype=bool)
    return np.ascontiguousarray(det[core_of(window, core)])


# --------------------------------------------------------------------------- tile tasks


def _location(block_info) -> tuple[tuple[int, int], tuple[int, int]]:
    (y0, y1), (x0, x1) = block_info[0]["array-location"][-2:]
    return (y0, y1), (x0, x1)


def _read_memmap(layout, rows, cols, convert=None):
    """The block ``rows`` x ``cols`` of a memory-mapped file, ``convert``-ed if given
    (in the same task: no task of its own per block)."""
    filename, dtype, offset, shape, order = layout
    m = np.memmap(filename, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)
    block = np.array(m[rows[0] : rows[1], cols[0] : cols[1]])
    return block if convert is None else convert(block)


def _work_block(block):
    return as_image(block)


def _mask_block(block):
    return as_mask(block, block.shape)


def _no_noise_block(sigma):
    return ~np.isfinite(sigma)


def _bad_block(img, given=None):
    return combine_masks(img, given)


def _combined(name, graph, keys, combine, arrays, first=False, apart=False):
    """``combine([results of the tasks keys])`` as one more task of the layer ``name``
    of ``graph`` (whose tasks read ``arrays``), a lazy value. With ``first``, each
    task's result is a pair and ``combine`` reads the first items only: taken out
    inside the combine task, or (``apart``: workers in other processes) by a task per
    tile where it ran, so that the second items stay there."""
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph

    # one layer with the tile tasks, so that the combine task's keys are resolved
    layer = dict(graph.layers[name])
    parts = list(keys.values())
    if first and not apart:
        parts = [(_item, key, 0) for key in parts]
    elif first:
        parts = []
        for key in keys.values():
            parts.append((f"first-{name}", *key[1:]))
            layer[parts[-1]] = (_item, key, 0)
    layer[name] = (combine, parts)
    graph = HighLevelGraph.from_collections(name, layer, dependencies=list(arrays))
    return Delayed(name, graph, layer=name)


@one_thread
def _tile_kept(func, kept, core, kw, names=(), *values):
    """``func(kept, core=, **kw)`` on a value a tile task kept (its lazy keywords
    given by key)."""
    if names:
        kw = {**kw, **dict(zip(names, values, strict=True))}
    return func(kept, core=core, **kw)


def _tile_sum(func, kw, window, *blocks):
    return np.asarray(func(*blocks, window=window, **kw), dtype=np.float64)


def _add_up(parts):
    total = parts[0].copy()
    for part in parts[1:]:
        total += part
    return total


@one_thread
def _tile_model_map(model, which: str, block_info=None):
    window = tuple(tuple(w) for w in block_info[None]["array-location"])
    if which == "background":
        return model.background_map(window=window)
    return model.rms_map(window=window)


@one_thread
def _tile_grid(*blocks, task, kw, block_info=None):
    (y0, _), (x0, _) = _location(block_info)
    return task(*blocks, origin=(y0, x0), **kw)


def _tile_digest(grid, *, task, block, block_info=None):
    """``task(grid, origin=)`` of a tile's :meth:`DaskBackend.cell_grid` block, its
    origin in pixels (the grid's blocks are ``block`` pixels)."""
    (y0, _), (x0, _) = _location(block_info)
    return task(grid, origin=(y0 * block[0], x0 * block[1]))


def _tile_counts(starts, new, last=None):
    """(masked pixels, pixels that changed from ``last``, the tile's part of each
    whole-image subsample ``new[::step, ::step]``: ``new[y0::step, x0::step]`` for
    each (y0, x0, step) of ``starts``) of a tile."""
    flips = 0 if last is None else np.count_nonzero(new ^ last)
    subs = [new[y0::step, x0::step] for y0, x0, step in starts]
    return np.count_nonzero(new), flips, subs


def _tile_first_valid(mask, nx, block_info=None):
    (y0, _), (x0, _) = _location(block_info)
    ys, xs = np.nonzero(~mask)
    first = (ys[0] + y0) * nx + xs[0] + x0 if ys.size else np.iinfo(np.int64).max
    return np.array([[first]], dtype=np.int64)


@one_thread
def _tile_change(bad, old_map=None, *, window, new, old, noise, window_of):
    """Sum of squares and count of the finite (new - old) / noise on the tile's
    [::CHANGE_STEP, ::CHANGE_STEP] subsample of valid pixels (the tile starts on a
    multiple of it); the old background is a model, or (``old`` None) the block
    ``old_map``."""
    k = CHANGE_STEP
    a = new.background_map(k, window=window)
    b = old_map[::k, ::k] if old is None else old.background_map(k, window=window)
    (y0, _), (x0, _) = window
    q = getattr(noise, "step", None)
    blocks = hasattr(noise, "values") and isinstance(q, int | np.integer) and q > 0
    if blocks and y0 % q == x0 % q == 0:
        # A noise of one value per q x q block (CoarseRMS), read as the in-memory
        # change reads it (MemoryBackend.change, its kernel) from the tile's own blocks
        # (window_of's; the tile's last block is the image's at its far edge, so the
        # kernel clamps where the image's does): no noise expanded per pixel, no
        # masked copies.
        grid = np.asarray(window_of(noise, window).values, np.float32)
        sums, counts = subsampled_change_rows(np.subtract(a, b), bad, grid, int(q), k)
        return [np.sum(sums), int(np.sum(counts))]
    # the noise as the in-memory change reads it (float32)
    sigma = np.asarray(window_of(noise, window, k), dtype=np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = ((a - b) / sigma)[~bad[::k, ::k]]
    d = d[np.isfinite(d)]
    return [np.sum(d * d, dtype=np.float64), d.size]


def float_keys(v: np.ndarray) -> np.ndarray:
    """Unsigned integers in the order of the floats ``v``."""
    u = v.view(np.dtype(f"u{v.dtype.itemsize}"))
    top = u.dtype.type(1 << (8 * v.dtype.itemsize - 1))
    return np.where(u & top, ~u, u | top)


def key_to_float(key: int, dtype) -> float:
    """The float of ``dtype`` whose :func:`float_keys` key is ``key``."""
    bits = 8 * np.dtype(dtype).itemsize
    top = 1 << (bits - 1)
    u = key ^ top if key & top else ~key & ((1 << bits) - 1)
    return np.array([u], dtype=f"u{bits // 8}").view(dtype)[0]


@one_thread
def _tile_digit_histogram(*blocks, window, values, shift, prefix, bits, kw):
    """Histogram of the 16-bit digit at ``shift`` of the order keys of the tile's
    ``values(*blocks, window=window, **kw)`` whose higher bits are ``prefix``."""
    keys = float_keys(np.ascontiguousarray(values(*blocks, window=window, **kw)))
    if shift + 16 < bits:
        keys = keys[(keys >> (shift + 16)) == prefix]
    return np.bincount(((keys >> shift) & 0xFFFF).astype(np.int64), minlength=1 << 16)


def _noise_values(bad, window, noise):
    return np.asarray(noise.window(window))[~bad]


@one_thread
def _strip_positive(model, rows, start: int | None = None, step: int = 1):
    """The count (``start`` None) or the ``[start::step]`` sample of the finite
    positive values of the unfloored RMS map's rows ``rows``, in C order."""
    rms = model.rms_map(window=(rows, (0, model.shape[1])))
    v = rms[np.isfinite(rms) & (rms > 0)]
    return v.size if start is None else v[start::step]


@one_thread
def _tile_residual(img, model, block_info=None):
    window = tuple(tuple(w) for w in block_info[None]["array-location"])
    return _subtract(img, model.background_map(window=window))


@one_thread
def _tile_residual_map(img, model, block_info=None):
    """:func:`_tile_residual` in one pass (:func:`residual_in_one_pass`): no map of
    the tile made, then read again, in fresh memory."""
    window = tuple(tuple(w) for w in block_info[None]["array-location"])
    return model.residual_map(img, window=window)


def residual_in_one_pass(model, dtype) -> bool:
    """Whether a tile's residual is ``model.residual_map(tile, window=window)``: the
    model makes residuals of windows (``residual_map`` takes ``window``) in the
    image's working ``dtype``, where that is ``image - background_map(window)`` bit
    for bit."""
    import inspect

    fused = getattr(model, "residual_map", None)
    if not callable(fused) or getattr(model, "dtype", None) != dtype:
        return False
    try:
        return "window" in inspect.signature(fused).parameters
    except (TypeError, ValueError):  # no signature to read
        return False


def _item(pair, k):
    return pair[k]


def _subtract(img, bkg):
    return np.subtract(img, bkg, dtype=img.dtype)


def _initial_exclusion(res, bad):
    return combine_masks(res, bad)


def _final_mask(excl, res, bad):
    # A masker returns (excluded & finite) & ~given; the pipeline ORs in `bad`. Where
    # that changes nothing (every non-finite pixel is bad, as the pipeline makes them,
    # and excl holds bad), the exclusion's block is the mask: only the test's one
    # reading pass, as the in-memory HysteresisMasker.mask_with skips the same passes.
    if exclusion_is_final(excl, res, bad):
        return excl
    return bad | (excl & np.isfinite(res))
