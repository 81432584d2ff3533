"""Windows of a tiled array: which blocks cover a tile's window grown by its halo,
and the window copied out of them (:func:`assemble`) or read in place, part by part
(:class:`Pieces`). Large blocks send their
neighbours only their border strips (:class:`BorderStrips`), through one task per
block run where the block lives, so that a window does not pull whole neighbouring
blocks between workers."""

from __future__ import annotations

import uuid

import numpy as np

__all__ = [
    "CUT_BYTES",
    "RING_SHARE",
    "BorderStrips",
    "Pieces",
    "assemble",
    "border_strips",
    "cover",
    "piece",
    "pixel_bytes",
]

#: Blocks at least this large (bytes) send the windows of neighbouring tiles only
#: their border strips (see :class:`BorderStrips`); smaller ones travel whole (a task
#: costs more).
CUT_BYTES = 4 << 20
#: ... and whose border strips hold at most this share of their pixels.
RING_SHARE = 0.5


def cover(blocks, edges, window):
    """The blocks (a 2-D object array of keys) of an array with block edges ``edges``
    that cover ``window``, as a nested list, and the slice of their concatenation that
    is the window."""
    index, slices = [], []
    for e, (w0, w1) in zip(edges, window, strict=True):
        i0 = int(np.searchsorted(e, w0, side="right")) - 1
        i1 = int(np.searchsorted(e, w1, side="left"))
        index.append(range(i0, i1))
        slices.append(slice(int(w0 - e[i0]), int(w1 - e[i0])))
    return [[blocks[i, j] for j in index[1]] for i in index[0]], tuple(slices)


class BorderStrips:
    """How the windows of one call read an array's blocks: whole, or (blocks of
    :data:`CUT_BYTES` or more whose border ring is at most :data:`RING_SHARE` of them) through
    one task per block, run where the block lives, that copies its border strips
    ``reach`` = (rows, columns) deep (top, bottom, left, right): only those strips
    travel to the windows of the neighbouring tiles, not the whole block."""

    def __init__(self, keys, edges, reach, array):
        self.keys, self.edges, self.reach = keys, edges, reach
        h, w = (int(np.diff(e).max()) for e in edges)
        ring = 2 * (reach[0] * w + reach[1] * h)
        self.use = h * w * pixel_bytes(array) >= CUT_BYTES and ring <= RING_SHARE * h * w
        self.name = f"ring-{uuid.uuid4().hex}"

    def cover(self, window, extra, near=None):
        """As :func:`cover`; with strips, each block partly in the window is a piece of
        the block's strip (or, where the strips do not reach, of the block) taken by
        an inline task, and the pieces make up exactly the window. ``extra`` gathers
        the strip tasks (once per block). ``near(i, j)``, if given, tells whether block
        (i, j) lives where the window is read: such a block is read whole (nothing
        travels, no strip task). Without strips every block is read whole. A block
        partly in the window is ``(piece, key, side, slice)``, so that a step run
        inside the task on the block (:func:`skymap.backends.dask.DaskBackend`'s
        inline lookups) can run on the piece only."""
        if not self.use:
            # every block is read whole, a piece of it taken inside the task
            near = _everywhere
        (ey, ex), (hy, hx) = self.edges, self.reach
        (w0, w1), (u0, u1) = window
        rows = range(int(np.searchsorted(ey, w0, "right")) - 1, int(np.searchsorted(ey, w1)))
        cols = range(int(np.searchsorted(ex, u0, "right")) - 1, int(np.searchsorted(ex, u1)))
        parts = []
        for i in rows:
            bh, r0, r1 = ey[i + 1] - ey[i], max(w0, ey[i]) - ey[i], min(w1, ey[i + 1]) - ey[i]
            row = []
            for j in cols:
                bw, c0, c1 = ex[j + 1] - ex[j], max(u0, ex[j]) - ex[j], min(u1, ex[j + 1]) - ex[j]
                if (r0, r1, c0, c1) == (0, bh, 0, bw):
                    row.append(self.keys[i, j])  # wholly inside the window
                    continue
                if near is not None and near(i, j):
                    row.append((piece, self.keys[i, j], None, (slice(r0, r1), slice(c0, c1))))
                    continue
                side, dy, dx = None, 0, 0
                if (r0, r1) != (0, bh):
                    if r0 == 0 and r1 <= hy:
                        side = 0
                    elif r1 == bh and bh - r0 <= hy:
                        side, dy = 1, bh - min(hy, bh)
                elif c0 == 0 and c1 <= hx:
                    side = 2
                elif c1 == bw and bw - c0 <= hx:
                    side, dx = 3, bw - min(hx, bw)
                sl = (slice(int(r0 - dy), int(r1 - dy)), slice(int(c0 - dx), int(c1 - dx)))
                if side is None:
                    row.append((piece, self.keys[i, j], None, sl))
                    continue
                key = (self.name, i, j)
                if key not in extra:
                    extra[key] = (border_strips, self.keys[i, j], hy, hx)
                row.append((piece, key, side, sl))
            parts.append(row)
        return parts, (slice(0, int(w1 - w0)), slice(0, int(u1 - u0)))


def _everywhere(i: int, j: int) -> bool:
    return True


def pixel_bytes(arr) -> int:
    """Bytes per pixel of the last two axes of a dask array (its layers included)."""
    return int(np.prod(arr.shape[:-2], dtype=np.int64)) * arr.dtype.itemsize


def border_strips(block, hy: int, hx: int):
    """Copies of a block's border strips ``hy`` rows and ``hx`` columns deep: top,
    bottom (full width), left, right (full height)."""
    h, w = block.shape[-2:]
    return tuple(
        np.ascontiguousarray(block[..., sy, sx])
        for sy, sx in (
            (slice(0, hy), slice(None)),
            (slice(max(0, h - hy), h), slice(None)),
            (slice(None), slice(0, hx)),
            (slice(None), slice(max(0, w - hx), w)),
        )
    )


def piece(source, side, sl):
    """``sl`` of a block (``side`` None) or of its border strip ``side``."""
    part = source if side is None else source[side]
    return part[..., sl[0], sl[1]]


def assemble(blocks, sl) -> np.ndarray:
    """The window ``sl`` (over the last two axes) of the nested ``blocks``: only the
    window's part of each block is copied (one block: a view)."""
    if len(blocks) == 1 and len(blocks[0]) == 1:
        return blocks[0][0][..., sl[0], sl[1]]
    first = blocks[0][0]
    ys = np.cumsum([0] + [row[0].shape[-2] for row in blocks])
    xs = np.cumsum([0] + [b.shape[-1] for b in blocks[0]])
    (y0, y1), (x0, x1) = ((s.start, s.stop) for s in sl)
    dtype = np.result_type(*(b.dtype for row in blocks for b in row))
    out = np.empty((*first.shape[:-2], y1 - y0, x1 - x0), dtype)
    for i, row in enumerate(blocks):
        a, b = max(y0, ys[i]), min(y1, ys[i + 1])
        if a >= b:
            continue
        for j, block in enumerate(row):
            c, d = max(x0, xs[j]), min(x1, xs[j + 1])
            if c < d:
                out[..., a - y0 : b - y0, c - x0 : d - x0] = block[
                    ..., a - ys[i] : b - ys[i], c - xs[j] : d - xs[j]
                ]
    return out


class Pieces:
    """A window of a tiled array held as the parts of its blocks that tile it (views,
    nothing copied), for a tile task that can work part by part or on a part alone:
    :meth:`whole` copies the window out (:func:`assemble`), :meth:`region` is a view
    where one part holds the region, and :meth:`binned_into` runs a block-wise reduction
    on each part, writing into the (smaller) joined results.

    Parameters
    ----------
    blocks : nested list of arrays
        The blocks covering the window, row by row (:func:`assemble`'s input).
    sl : (slice, slice)
        The window in the blocks' concatenation (over the last two axes).

    Examples
    --------
    >>> a = np.arange(36.0).reshape(6, 6)
    >>> w = Pieces([[a[:4, :4], a[:4, 4:]], [a[4:, :4], a[4:, 4:]]], (slice(1, 6), slice(2, 6)))
    >>> w.shape, bool(np.array_equal(w.whole(), a[1:, 2:]))
    ((5, 4), True)
    >>> np.shares_memory(w.region((slice(0, 3), slice(0, 2))), a)
    True
    """

    def __init__(self, blocks, sl):
        ys = np.cumsum([0] + [row[0].shape[-2] for row in blocks])
        xs = np.cumsum([0] + [b.shape[-1] for b in blocks[0]])
        (y0, y1), (x0, x1) = ((s.start, s.stop) for s in sl)
        rows = [i for i in range(len(blocks)) if max(y0, ys[i]) < min(y1, ys[i + 1])]
        cols = [j for j in range(len(blocks[0])) if max(x0, xs[j]) < min(x1, xs[j + 1])]
        #: The parts, row by row, and their edges along each axis in the window.
        self.parts = [
            [
                blocks[i][j][
                    ...,
                    max(y0, ys[i]) - ys[i] : min(y1, ys[i + 1]) - ys[i],
                    max(x0, xs[j]) - xs[j] : min(x1, xs[j + 1]) - xs[j],
                ]
                for j in cols
            ]
            for i in rows
        ]
        self.edges = tuple(
            np.array([0] + [min(e1, e[k + 1]) - e0 for k in idx], dtype=np.int64)
            for e, idx, e0, e1 in ((ys, rows, y0, y1), (xs, cols, x0, x1))
        )
        self.shape = (*blocks[0][0].shape[:-2], y1 - y0, x1 - x0)

    def whole(self) -> np.ndarray:
        """The window as one array: a copy, or a view when one part is all of it."""
        return assemble(self.parts, self._full())

    def _full(self) -> tuple[slice, slice]:
        return slice(0, self.shape[-2]), slice(0, self.shape[-1])

    def region(self, sl) -> np.ndarray:
        """``sl`` (slices with starts and stops, over the last two axes) of the window:
        a view where one part holds it, else a copy."""
        (y0, y1), (x0, x1) = ((s.start, s.stop) for s in sl)
        (ey, ex) = self.edges
        i0 = int(np.searchsorted(ey, y0, side="right")) - 1
        j0 = int(np.searchsorted(ex, x0, side="right")) - 1
        if y1 <= ey[i0 + 1] and x1 <= ex[j0 + 1]:
            part = self.parts[i0][j0]
            return part[..., y0 - ey[i0] : y1 - ey[i0], x0 - ex[j0] : x1 - ex[j0]]
        return assemble(self.parts, sl)

    def binned_into(self, func, b: int, n: int, *others: Pieces):
        """A block-wise reduction run part by part: ``n`` float32 maps of the window
        binned by ``b`` (zeros first), each part's share of them written by
        ``func(part, *others' parts, out=views)`` (arrays reduced ``b`` x ``b`` block by
        block, a partial block only at the far edges), where it goes (nothing joined
        afterwards). Equal to the reduction of the whole window wherever each part
        starts on a block's edge; None where one does not (the caller then reads
        :meth:`whole`). ``others`` are windows of arrays of the same blocks; a part
        not C-contiguous (a column strip) is copied first. The maps are the layers of
        one array (their ``base``), so that a core of all of them is one view."""
        if not self._on_blocks(b, others):
            return None
        shape = tuple(-(-m // b) for m in self.shape[-2:])
        outs = tuple(np.zeros((n, *shape), np.float32))
        (ey, ex) = (e // b for e in self.edges)
        for i, row in enumerate(self.parts):
            for j, part in enumerate(row):
                sl = (slice(ey[i], ey[i] + -(-part.shape[-2] // b)),
                      slice(ex[j], ex[j] + -(-part.shape[-1] // b)))  # fmt: skip
                parts = (np.ascontiguousarray(w.parts[i][j]) for w in (self, *others))
                func(*parts, out=tuple(o[sl] for o in outs))
        return outs

    def _on_blocks(self, b: int, others) -> bool:
        """Whether every part starts on an edge of the ``b`` x ``b`` blocks, and the
        ``others`` are cut alike."""
        inner = [e[1:-1] for e in self.edges]
        return not any(np.any(e % b) for e in inner) and all(
            np.array_equal(o.edges[k], self.edges[k]) for o in others for k in (0, 1)
        )
