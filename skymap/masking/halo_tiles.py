""":meth:`HaloMasker.find <skymap.masking.bright.HaloMasker.find>` tile by tile: the same
catalogue from a tiled back end (:class:`~skymap.backends.dask.DaskBackend`), with only
small tables in the driver.

The steps of ``find`` and where they run:

1. The coarse sky: each tile takes the 64-px blocks that start in it (reading up to 63
   px past its end) and returns their medians; the driver fills and filters the small
   grid (:func:`~skymap.masking.bright.filled_sky`).
2. The noise: each tile returns its part of the strided subsample of the image minus
   that sky (about 250 000 values in all); the driver takes the MAD (a median does not
   depend on the order of the values).
3. The candidate regions: each tile, read with a 1-px halo, labels its regions and its
   masked pieces. A region that touches no inner tile edge and no masked piece that
   does is whole: its :func:`~skymap.masking.bright.region_stats` are final in the
   tile, and only the rows that may come out bright are returned (with the top counts
   of the others, for the typical top). The other regions' pixels, and the masked
   pieces that touch an inner edge, are returned as pixels; the driver joins them
   across the edges (8-connected) and measures those regions the same way.
4. The profiles: :meth:`~skymap.masking.bright.HaloMasker.measure` reads the pixels it
   samples around the brightest sources through
   :meth:`~skymap.backends.dask.DaskBackend.values_at`.

Regions are put in the order of their first pixel (C order), which is scipy's label
order, so the catalogue is the in-memory one, bit for bit.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi

from skymap._validate import combine_masks
from skymap.masking import _bright_kernels as _kb
from skymap.masking.bright import (
    SKY_BLOCK,
    BrightSources,
    HaloMasker,
    above_sky,
    box_means,
    filled_sky,
    joined_cores,
    mad_sigma,
    mad_step,
    region_stats,
    sky_blocks,
    touching,
)

__all__ = ["find_tiled"]

_EIGHT = np.ones((3, 3), bool)


def find_tiled(masker: HaloMasker, backend) -> BrightSources:
    """``masker.find(image, None, bad)`` of the back end's ``image`` and ``bad``, tile
    by tile (see the module docstring); the same :class:`BrightSources`.

    Examples
    --------
    >>> import dask.array as da
    >>> from skymap.backends.dask import DaskBackend
    >>> yy, xx = np.mgrid[:256, :256]
    >>> img = np.random.default_rng(0).normal(size=(256, 256))
    >>> img += 5e4 * (1 + ((yy - 120) ** 2 + (xx - 130) ** 2) / 4.0) ** -1.5
    >>> be = DaskBackend(da.from_array(img), tile=128, unit=(2, 2), client="sync")
    >>> tiled, whole = find_tiled(HaloMasker(), be), HaloMasker().find(img)
    >>> bool(np.array_equal(tiled.radius, whole.radius)), len(tiled)
    (True, 1)
    """
    shape = backend.shape
    arrays = [backend.image, backend.bad]
    parts = backend.gather_tiles(_sky_part, arrays, reach=SKY_BLOCK - 1, block=1, shape=shape)
    grid = np.full((-(-shape[0] // SKY_BLOCK), -(-shape[1] // SKY_BLOCK)), np.nan, np.float32)
    for (by, bx), part in parts:
        grid[by : by + part.shape[0], bx : bx + part.shape[1]] = part
    sky = filled_sky(grid)
    step = mad_step(shape)
    values = backend.gather_tiles(_noise_part, arrays, sky=sky, step=step)
    sigma = mad_sigma(np.concatenate(values))
    limit = masker.limit(shape)
    tiles = backend.gather_windows(
        _region_part, arrays, halo=1, sky=sky, sigma=sigma, masker=masker, shape=shape,
        core_limit=masker.core_limit(limit),
    )  # fmt: skip
    stats, tops = _join_regions(tiles, masker.core_limit(limit), shape[1])

    def sample(cy, cx):
        v, bad = backend.values_at(arrays, cy, cx)
        return v, bad | ~np.isfinite(v)

    return masker.measure(stats, sigma, sample, shape, tops=tops)


# --------------------------------------------------------------------------- tile tasks


def _sky_part(img, bad, *, window, core, shape):
    """((first block row, column), medians) of the sky blocks that start in the tile."""
    (wy0, wy1), (wx0, wx1) = window
    b = SKY_BLOCK
    (by0, by1), (bx0, bx1) = (
        (-(-c0 // b), -(-c1 // b)) for c0, c1 in core
    )  # blocks starting in the core
    if by0 >= by1 or bx0 >= bx1:
        return (by0, bx0), np.zeros((0, 0), np.float32)
    rows = slice(by0 * b - wy0, min(wy1, by1 * b) - wy0)
    cols = slice(bx0 * b - wx0, min(wx1, bx1 * b) - wx0)
    sub = img[rows, cols]
    return (by0, bx0), sky_blocks(sub, combine_masks(sub, bad[rows, cols]), b)


def _sky_at(img, window, sky, rows, cols):
    """``image - sky`` at the window's pixels (``rows``, ``cols``) (arrays that
    broadcast), the sky read from its grid of ``SKY_BLOCK`` blocks."""
    (y0, _), (x0, _) = window
    b = SKY_BLOCK
    return img[rows, cols] - sky[(rows + y0) // b, (cols + x0) // b]


def _above(img, invalid, window, sky, threshold: float) -> np.ndarray:
    """``image - sky > threshold`` and not ``invalid`` over the window
    (:func:`~skymap.masking.bright.above_sky`)."""
    (y0, _), (x0, _) = window
    return above_sky(img, sky, SKY_BLOCK, threshold, invalid, origin=(y0, x0))


def _noise_part(img, bad, *, window, core, sky, step):
    """The tile's valid pixels of the ``[::step, ::step]`` subsample of the detection
    image (read at the subsample only)."""
    (y0, y1), (x0, x1) = window
    ys = np.arange(-y0 % step, y1 - y0, step)[:, None]
    xs = np.arange(-x0 % step, x1 - x0, step)[None, :]
    det = _sky_at(img, window, sky, ys, xs)
    return det[~combine_masks(img[ys, xs], bad[ys, xs])]


def _region_part(img, bad, *, window, core, sky, sigma, masker, shape, core_limit):
    """A tile's candidate regions: the rows of its whole ones that may be bright (with
    their first pixel), the top counts of the others, and as pixels the regions and
    masked pieces that reach across an inner tile edge. Full-size maps are only the
    bool ones and the labels; the values are read at the region and masked pixels."""
    (wy0, _), (wx0, _) = window
    (y0, y1), (x0, x1) = core
    ny, nx = shape
    inv_w = combine_masks(img, bad)
    above_w = _above(img, inv_w, window, sky, masker.seed * sigma)
    cs = (slice(y0 - wy0, y1 - wy0), slice(x0 - wx0, x1 - wx0))
    region = touching(above_w, inv_w)[cs]
    inv = inv_w[cs]
    out = {"above": bool(above_w[cs].any())}
    del above_w
    labels, n = _kb.label8(region)
    width = region.shape[1]
    iv = np.flatnonzero(inv)
    if iv.size:
        pieces, npieces = ndi.label(inv, structure=_EIGHT)
        pc = pieces.ravel()[iv]
        del pieces
    else:
        npieces, pc = 0, np.zeros(0, np.int32)
    lab_iv = labels.ravel()[iv]
    # The inner edges: pixels next to another tile.
    iy, ix = np.divmod(iv, width)
    on_edge = (
        ((iy == 0) & (y0 > 0))
        | ((iy == region.shape[0] - 1) & (y1 < ny))
        | ((ix == 0) & (x0 > 0))
        | ((ix == width - 1) & (x1 < nx))
    )
    open_piece = np.zeros(npieces + 1, bool)
    open_piece[pc[on_edge]] = True
    open_piece[0] = False
    psize = np.bincount(pc, minlength=npieces + 1)
    hit = lab_iv > 0
    # Regions on an inner edge or touching a piece that is go to the driver.
    open_region = np.zeros(n + 1, bool)
    for side in (
        labels[0] if y0 > 0 else None,
        labels[-1] if y1 < ny else None,
        labels[:, 0] if x0 > 0 else None,
        labels[:, -1] if x1 < nx else None,
    ):
        if side is not None:
            open_region[side] = True
    open_region[lab_iv[hit & open_piece[pc]]] = True
    open_region[0] = False
    # The pieces inside the tile join a region here, as in HaloMasker.find.
    big = psize > core_limit
    add, join = joined_cores(pc, lab_iv, open_piece | big)
    reg = np.flatnonzero(labels)
    where = np.concatenate([reg, iv[join]])
    order = np.argsort(where, kind="stable")
    where = where[order]
    lab = np.concatenate([labels.ravel()[reg], add[join]])[order] - 1
    orig = np.concatenate([np.ones(reg.size, bool), np.zeros(int(join.sum()), bool)])[order]
    del labels
    ly, lx = np.divmod(where, width)
    flat = (ly + y0) * nx + (lx + x0)
    wy, wx = ly + (y0 - wy0), lx + (x0 - wx0)
    wwidth = inv_w.shape[1]
    box = box_means(img, sky, SKY_BLOCK, inv_w, wy * wwidth + wx, (wy0, wx0))
    pbad, pval = inv_w[wy, wx], _sky_at(img, window, sky, wy, wx)
    stats = region_stats(flat, lab, pbad, pval, box, n, nx)
    first = np.full(n, np.iinfo(np.int64).max)
    np.minimum.at(first, lab[orig], flat[orig])
    whole = ~open_region[1:]
    keep = whole & masker.keep_region(stats, sigma)
    out["rows"] = {k: v[keep] for k, v in stats.items()} | {"first": first[keep]}
    out["tops"] = np.bincount(stats["top"][whole & ~keep].astype(np.int64))
    inc = open_region[1:][lab]
    out["pixels"] = (flat[inc], lab[inc], pbad[inc], pval[inc], box[inc], orig[inc])
    # Open pieces: every pixel of the small ones (they may join a region), the edge
    # pixels of those already too large (they only pass that on to their neighbours).
    take = open_piece[pc] & (~big[pc] | on_edge)
    py, px = iy[take], ix[take]
    pflat = (py + y0) * nx + (px + x0)
    pbox = box_means(
        img, sky, SKY_BLOCK, inv_w, (py + y0 - wy0) * wwidth + px + x0 - wx0, (wy0, wx0)
    )
    out["open"] = (pflat, pc[take] - 1, lab_iv[take] > 0, pbox)
    out["piece_size"] = psize[1:]
    return out


# --------------------------------------------------------------------------- driver


def _neighbour_pairs(flat: np.ndarray, group: np.ndarray, width: int) -> np.ndarray:
    """(2, m) pairs of the groups of 8-adjacent pixels (``flat`` indices, unique)."""
    order = np.argsort(flat)
    f, g = flat[order], group[order]
    pairs = [np.stack([g, g])]
    x = f % width
    for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):
        nb = f + dy * width + dx
        pos = np.minimum(np.searchsorted(f, nb), f.size - 1)
        ok = (f[pos] == nb) & (x + dx >= 0) & (x + dx < width)
        pairs.append(np.stack([g[ok], g[pos[ok]]]))
    return np.concatenate(pairs, axis=1)


def _components(flat, group, ngroups: int, width: int) -> np.ndarray:
    """The connected component of each group, groups joined where their pixels are
    8-adjacent."""
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    e = _neighbour_pairs(flat, group, width)
    graph = sparse.coo_matrix(
        (np.ones(e.shape[1], np.int8), (e[0], e[1])), shape=(ngroups, ngroups)
    )
    return connected_components(graph, directed=False)[1]


def _join_regions(tiles, core_limit: float, width: int):
    """(:func:`region_stats` of every candidate region that may be bright, in the
    order of their first pixel, or None; the top counts of the others)."""
    if not any(t["above"] for t in tiles):
        return None, None
    tops = np.concatenate([np.repeat(np.arange(t["tops"].size), t["tops"]) for t in tiles])
    rows = [t["rows"] for t in tiles]
    # The regions across inner edges: group = (tile, label), joined by adjacency.
    flat, lab, bad, val, box, orig = (
        np.concatenate([t["pixels"][k] for t in tiles]) for k in range(6)
    )
    offsets = np.cumsum([0] + [int(t["pixels"][1].max(initial=-1)) + 1 for t in tiles])
    key = np.concatenate([t["pixels"][1] + o for t, o in zip(tiles, offsets, strict=False)])
    keys, group = np.unique(key, return_inverse=True)
    region = _components(flat, group, keys.size, width)[group] if flat.size else group
    # The masked pieces across inner edges, and the regions they join.
    pflat, ppiece, pin, pbox = (np.concatenate([t["open"][k] for t in tiles]) for k in range(4))
    poff = np.cumsum([0] + [t["piece_size"].size for t in tiles])
    pkey = np.concatenate([t["open"][1] + o for t, o in zip(tiles, poff, strict=False)])
    sizes = np.concatenate([t["piece_size"] for t in tiles])
    if pflat.size:
        pkeys, pgroup = np.unique(pkey, return_inverse=True)
        comp = _components(pflat, pgroup, pkeys.size, width)
        csize = np.bincount(comp, sizes[pkeys], minlength=comp.max() + 1)
        pcomp = comp[pgroup]
        # A hit: a region pixel that is masked and in an open piece; each piece joins
        # the region of its last hit (C order).
        order = np.argsort(pflat)
        pos = np.minimum(np.searchsorted(pflat[order], flat), pflat.size - 1)
        hit = bad & (pflat[order][pos] == flat)
        hflat, hcomp, hreg = flat[hit], pcomp[order][pos][hit], region[hit]
        touched = np.full(csize.size, -1)
        last = np.lexsort((hflat, hcomp))
        touched[hcomp[last]] = hreg[last]  # sorted by flat: the last write is the last hit
        touched[csize > core_limit] = -1
        joins = ~pin & (touched[pcomp] >= 0)
        flat = np.concatenate([flat, pflat[joins]])
        region = np.concatenate([region, touched[pcomp[joins]]])
        bad = np.concatenate([bad, np.ones(joins.sum(), bool)])
        val = np.concatenate([val, np.zeros(joins.sum(), val.dtype)])
        box = np.concatenate([box, pbox[joins]])
        orig = np.concatenate([orig, np.zeros(joins.sum(), bool)])
    if flat.size:
        nreg = int(region.max()) + 1
        order = np.argsort(flat)
        flat, region, bad, val, box, orig = (a[order] for a in (flat, region, bad, val, box, orig))
        joined = region_stats(flat, region, bad, val, box, nreg, width)
        first = np.full(nreg, np.iinfo(np.int64).max)
        np.minimum.at(first, region[orig], flat[orig])
        rows.append(joined | {"first": first})
    stats = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    if stats["first"].size == 0:
        return None, None
    order = np.argsort(stats.pop("first"))
    return {k: v[order] for k, v in stats.items()}, tops
