"""From a low-resolution mesh grid to a full-resolution map.

A mesh estimator (:mod:`skymap.mesh`) measures one background value per box of
``box_size`` pixels. The objects here turn that grid into a map with one value per pixel.
Each is a small frozen configuration that satisfies the :class:`Interpolator` protocol::

    interpolator(mesh_values, mesh_mask, geometry, shape) -> ndarray of ``shape``

- :class:`ZoomSpline`: a spline zoom of the grid (``scipy.ndimage.zoom`` in grid mode),
  clipped to the range of the mesh values, as photutils' ``Background2D`` does.
- :class:`IDW`: Shepard inverse-distance weighting from the unmasked mesh centres through
  a k-d tree (``scipy.spatial.KDTree``).
- :class:`SExtractorSpline`: SExtractor's bicubic spline through the mesh nodes (natural
  cubic splines along y for each node column, then along x for each image row).

Each also offers ``window(mesh_values, mesh_mask, geometry, rows, cols)``: the same map
over the pixel rows ``rows[0]:rows[1]`` and columns ``cols[0]:cols[1]`` only, equal to
that window of the full map, so that tiles of a large image can be evaluated apart
(:mod:`skymap.distributed`).

Excluded meshes (``mesh_mask`` True, or NaN values) are holes: :func:`fill_holes` fills
them from their neighbours before any upsampling, as photutils (inverse-distance weights)
and SExtractor (the mean of the nearest valid meshes) do.

Conventions: arrays are (y, x); pixel centres sit on integers; mesh centres are given in
pixel coordinates by :class:`MeshGeometry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Protocol, runtime_checkable

import numpy as np
from scipy.ndimage import zoom
from scipy.spatial import KDTree

from skymap._validate import as_pair, check_choice, check_positive

__all__ = [
    "IDW",
    "Interpolator",
    "MeshGeometry",
    "SExtractorSpline",
    "ZoomSpline",
    "fill_holes",
]


@dataclass(frozen=True, kw_only=True)
class MeshGeometry:
    """Where the meshes of a grid sit on the image.

    The grid has ``ceil(image_shape / box_size)`` meshes along each axis. Mesh ``(j, i)``
    covers rows ``j*by .. (j+1)*by - 1`` and columns ``i*bx .. (i+1)*bx - 1``, cut at the
    image edge: when the image size is not a multiple of the box, the last row and
    column of meshes are partial. Mesh centres are those of the full boxes, also for the
    partial edge meshes, which is where photutils and SExtractor both place them.

    Parameters
    ----------
    box_size : (int, int)
        Box size ``(by, bx)`` in pixels.
    image_shape : (int, int)
        Shape ``(ny, nx)`` of the full-resolution image.

    Examples
    --------
    >>> g = MeshGeometry(box_size=(4, 4), image_shape=(10, 8))
    >>> g.grid_shape
    (3, 2)
    >>> g.y_centres
    array([1.5, 5.5, 9.5])
    """

    box_size: tuple[int, int]
    image_shape: tuple[int, int]

    def __post_init__(self):
        object.__setattr__(self, "box_size", as_pair("box_size", self.box_size))
        object.__setattr__(self, "image_shape", as_pair("image_shape", self.image_shape))

    @property
    def grid_shape(self) -> tuple[int, int]:
        """Number of meshes ``(my, mx)``, partial edge meshes included."""
        (by, bx), (ny, nx) = self.box_size, self.image_shape
        return -(-ny // by), -(-nx // bx)

    @property
    def padded_shape(self) -> tuple[int, int]:
        """Shape covered by the grid of full boxes, ``grid_shape * box_size``."""
        (my, mx), (by, bx) = self.grid_shape, self.box_size
        return my * by, mx * bx

    @property
    def y_centres(self) -> np.ndarray:
        """Row coordinate (pixels) of the centre of each mesh row."""
        by = self.box_size[0]
        return np.arange(self.grid_shape[0]) * by + (by - 1) / 2.0

    @property
    def x_centres(self) -> np.ndarray:
        """Column coordinate (pixels) of the centre of each mesh column."""
        bx = self.box_size[1]
        return np.arange(self.grid_shape[1]) * bx + (bx - 1) / 2.0

    @property
    def partial(self) -> tuple[bool, bool]:
        """Whether the last mesh row / column is cut by the image edge."""
        (by, bx), (ny, nx) = self.box_size, self.image_shape
        return ny % by != 0, nx % bx != 0


@runtime_checkable
class Interpolator(Protocol):
    """Turns a mesh grid into a full-resolution map.

    ``mesh_values`` has the geometry's ``grid_shape``; ``mesh_mask`` (True = excluded, or
    None) marks the meshes that had no measurement of their own. Interpolators that need
    a complete grid (the splines) use every finite value, so that a caller who filled
    and filtered the grid keeps its values, and fill only NaN holes themselves;
    scattered-data interpolators (IDW) leave the masked meshes out. The result has
    ``shape`` (the geometry's image shape) and the floating dtype of ``mesh_values``.
    """

    def __call__(
        self,
        mesh_values: np.ndarray,
        mesh_mask: np.ndarray | None,
        geometry: MeshGeometry,
        shape: tuple[int, int],
    ) -> np.ndarray: ...


def _holes(values: np.ndarray, mesh_mask: np.ndarray | None) -> np.ndarray:
    holes = ~np.isfinite(values)
    if mesh_mask is not None:
        holes |= np.asarray(mesh_mask, dtype=bool)
    return holes


def fill_holes(
    values: np.ndarray,
    holes: np.ndarray | None = None,
    *,
    method: Literal["idw", "nearest"] = "idw",
    n_neighbors: int = 10,
    power: float = 1.0,
) -> np.ndarray:
    """Fill the holes of a mesh grid from the valid meshes around them.

    Distances are measured in mesh units (grid indices), as both references do.

    Parameters
    ----------
    values : ndarray (my, mx)
        Mesh values; NaN marks a hole too.
    holes : ndarray of bool (my, mx), optional
        True where a mesh is excluded.
    method : {"idw", "nearest"}
        ``"idw"``: inverse-distance weights ``1 / d**power`` over the ``n_neighbors``
        nearest valid meshes (photutils ``Background2D``). ``"nearest"``: the mean of all
        valid meshes at the smallest distance (SExtractor).
    n_neighbors : int
        Neighbours used by ``"idw"``.
    power : float
        Power of the inverse distance for ``"idw"``.

    Returns
    -------
    ndarray
        A new array, same dtype, with every hole filled.

    Raises
    ------
    ValueError
        If every mesh is a hole.

    Examples
    --------
    >>> v = np.array([[1.0, np.nan], [3.0, 5.0]])
    >>> fill_holes(v, method="nearest")
    array([[1., 3.],
           [3., 5.]])
    """
    check_choice("method", method, ("idw", "nearest"))
    check_positive("n_neighbors", n_neighbors)
    values = np.asarray(values)
    holes = _holes(values, holes)
    out = values.copy()
    if not holes.any():
        return out
    if holes.all():
        raise ValueError("values: every mesh is a hole; there is nothing to fill from")
    good_yx = np.column_stack(np.nonzero(~holes)).astype(float)
    hole_idx = np.nonzero(holes)
    hole_yx = np.column_stack(hole_idx).astype(float)
    good_v = values[~holes].astype(np.float64)
    if method == "nearest":
        d2 = ((hole_yx[:, None, :] - good_yx[None, :, :]) ** 2).sum(axis=-1)
        nearest = d2 == d2.min(axis=1, keepdims=True)
        filled = (nearest * good_v).sum(axis=1) / nearest.sum(axis=1)
    else:
        # Same tree (points in row-major order, leafsize 10) as photutils, so that ties
        # among equidistant neighbours on the regular grid resolve identically.
        k = int(min(n_neighbors, len(good_v)))
        dist, idx = KDTree(good_yx, leafsize=10).query(hole_yx, k=k)
        if k == 1:
            filled = good_v[idx]
        else:
            w = 1.0 / dist**power
            filled = (w * good_v[idx]).sum(axis=1) / w.sum(axis=1)
    out[hole_idx] = filled.astype(values.dtype)
    return out


def _check_shape(geometry: MeshGeometry, shape) -> None:
    if tuple(shape) != geometry.image_shape:
        raise ValueError(
            f"shape must equal the geometry's image_shape {geometry.image_shape}, got {shape}"
        )


def _check_window(geometry: MeshGeometry, rows, cols):
    (ny, nx) = geometry.image_shape
    (r0, r1), (c0, c1) = (int(rows[0]), int(rows[1])), (int(cols[0]), int(cols[1]))
    if not (0 <= r0 < r1 <= ny and 0 <= c0 < c1 <= nx):
        raise ValueError(
            f"rows {rows} and cols {cols} must be non-empty ranges inside the image shape "
            f"{geometry.image_shape}"
        )
    return (r0, r1), (c0, c1)


def _check_grid(mesh_values, geometry: MeshGeometry, shape) -> np.ndarray:
    mesh_values = np.asarray(mesh_values)
    if mesh_values.shape != geometry.grid_shape:
        raise ValueError(
            f"mesh_values must have the geometry's grid_shape {geometry.grid_shape}, "
            f"got {mesh_values.shape}"
        )
    _check_shape(geometry, shape)
    if mesh_values.dtype.kind != "f":
        mesh_values = mesh_values.astype(np.float64)
    return mesh_values


@dataclass(frozen=True, kw_only=True)
class ZoomSpline:
    """Spline zoom of the mesh grid, photutils ``Background2D`` style.

    The map is ``scipy.ndimage.zoom(grid, box_size, grid_mode=True)`` (each mesh value
    stands for the centre of its box) over the padded size covered by the full boxes,
    cropped to the image, then clipped to the range of the mesh values because splines
    of order > 1 overshoot. It is computed as the equivalent separable matrix product,
    equal to scipy's result to rounding (1e-15) but several times faster.

    Parameters
    ----------
    order : int
        Spline order, 1 to 5 (3 = bicubic, photutils' default).
    mode : {"reflect", "nearest", "mirror", "grid-wrap", "wrap", "constant", "grid-constant"}
        How the spline extends past the grid (``scipy.ndimage.zoom``'s ``mode``).
    clip : bool
        Clip to ``[min, max]`` of the mesh values.

    Notes
    -----
    Cost: two small matrices (one zoom of an identity per axis) and a product,
    O(ny * nx * my) multiply-adds in BLAS, output written in row blocks.
    NaN holes are filled with :func:`fill_holes` (IDW) first; ``mesh_mask`` is not
    used (see :class:`Interpolator`).

    scipy's ``"reflect"`` prefilter (photutils' choice, the default here for parity)
    starts from an approximate boundary sum, so on grids only a few meshes wide the map
    of ``mesh + c`` differs from ``map + c`` by up to ~1e-5 of ``c``; ``"mirror"`` is
    exactly offset-equivariant.

    Examples
    --------
    >>> g = MeshGeometry(box_size=4, image_shape=(8, 8))
    >>> ZoomSpline(order=1)(np.array([[0.0, 1.0], [0.0, 1.0]]), None, g, (8, 8))[0, :4]
    array([0.   , 0.   , 0.125, 0.375])
    """

    order: int = 3
    mode: str = "reflect"
    clip: bool = True

    def __post_init__(self):
        check_choice("order", self.order, (1, 2, 3, 4, 5))
        check_choice(
            "mode",
            self.mode,
            ("reflect", "nearest", "mirror", "grid-wrap", "wrap", "constant", "grid-constant"),
        )

    def __call__(self, mesh_values, mesh_mask, geometry, shape):
        _check_shape(geometry, shape)
        return self.window(mesh_values, mesh_mask, geometry, (0, shape[0]), (0, shape[1]))

    def window(self, mesh_values, mesh_mask, geometry, rows, cols):
        """The map over pixel rows ``rows[0]:rows[1]`` and columns ``cols[0]:cols[1]``.

        Equal to that window of the full map (to rounding): the whole grid is used,
        and the clip range is the whole grid's.
        """
        (r0, r1), (c0, c1) = _check_window(geometry, rows, cols)
        values = fill_holes(_check_grid(mesh_values, geometry, geometry.image_shape))
        lo, hi = values.min(), values.max()
        if lo == hi:
            return np.full((r1 - r0, c1 - c0), lo, dtype=values.dtype)
        # scipy's spline zoom is linear and separable: zoom(M) = Ly @ M @ Lx.T, where
        # column i of Ly is the 1-D zoom of the i-th unit vector. Building Ly and Lx on
        # the small grid and multiplying gives scipy's map (to rounding) in a fraction of
        # its time, without its float64 full-size intermediate.
        by, bx = geometry.box_size
        my, mx = values.shape
        ly = _zoom_matrix(my, by, self.order, self.mode)[r0:r1]
        lx = _zoom_matrix(mx, bx, self.order, self.mode)[c0:c1]
        t = values.astype(np.float64) @ lx.T
        ny, nx = r1 - r0, c1 - c0
        out = np.empty((ny, nx), dtype=values.dtype)
        step = max(1, self._block_elements // nx)
        buf = np.empty((min(step, ny), nx))
        for y0 in range(0, ny, step):
            y1 = min(ny, y0 + step)
            np.matmul(ly[y0:y1], t, out=buf[: y1 - y0])
            out[y0:y1] = buf[: y1 - y0]
        if self.clip:
            np.clip(out, lo, hi, out=out)
        return out

    # rows of output per matrix product: bounds the float64 block buffer (8 MiB)
    _block_elements = 1 << 20


@lru_cache(maxsize=16)
def _zoom_matrix(n: int, factor: int, order: int, mode: str) -> np.ndarray:
    """(n * factor, n) matrix of scipy's 1-D spline zoom of n samples by ``factor``.

    Column i is the zoom of the i-th unit vector, one 1-D zoom per column: a 2-D zoom of
    the identity would also filter along its second axis, which is not exactly the
    identity for modes with an approximate boundary (``"reflect"``) on short axes.
    Cached: the background and RMS maps of a fit share it.
    """
    eye = np.eye(n)
    cols = [zoom(eye[i], factor, order=order, mode=mode, grid_mode=True) for i in range(n)]
    m = np.column_stack(cols)
    m.flags.writeable = False
    return m


@dataclass(frozen=True, kw_only=True)
class IDW:
    """Shepard inverse-distance weighting from the valid mesh centres.

    Each pixel gets ``sum(w_i v_i) / sum(w_i)`` over its ``n_neighbors`` nearest valid
    mesh centres, with ``w_i = 1 / (d_i**power + regularization)`` and ``d_i`` in pixels.
    A pixel closer than 1e-12 to a centre takes that mesh's value. Excluded meshes are
    left out (not filled), so holes are bridged by their neighbours directly.

    Parameters
    ----------
    n_neighbors : int
        Neighbours per pixel (capped at the number of valid meshes).
    power : float
        Power of the inverse distance; larger is more local.
    regularization : float
        Added to ``d**power``; larger is smoother and avoids the spike at each centre.
    leafsize : int
        Leaf size of the ``scipy.spatial.KDTree``.

    Notes
    -----
    Cost: one k-nearest-neighbour query per pixel, O(ny * nx * n_neighbors * log n_mesh),
    done in row blocks to bound memory; much slower than :class:`ZoomSpline` on large
    images. It reproduces photutils' deprecated ``BkgIDWInterpolator``.

    References
    ----------
    Shepard, D. 1968, Proc. 23rd ACM National Conference, 517,
    https://doi.org/10.1145/800186.810616.

    Examples
    --------
    >>> g = MeshGeometry(box_size=3, image_shape=(3, 6))
    >>> IDW(n_neighbors=2)(np.array([[0.0, 1.0]]), None, g, (3, 6))[1].round(3)
    array([0.2  , 0.   , 0.333, 0.667, 1.   , 0.8  ])
    """

    n_neighbors: int = 10
    power: float = 1.0
    regularization: float = 0.0
    leafsize: int = 10

    def __post_init__(self):
        for name in ("n_neighbors", "leafsize"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        check_positive("power", self.power)
        check_positive("regularization", self.regularization, allow_zero=True)

    # rows of pixels per k-d tree query: bounds the (pixels, n_neighbors) temporaries
    _block_pixels = 1 << 18

    def __call__(self, mesh_values, mesh_mask, geometry, shape):
        _check_shape(geometry, shape)
        return self.window(mesh_values, mesh_mask, geometry, (0, shape[0]), (0, shape[1]))

    def window(self, mesh_values, mesh_mask, geometry, rows, cols):
        """The map over pixel rows ``rows[0]:rows[1]`` and columns ``cols[0]:cols[1]``.

        Equal to the same window of the full map, bit for bit: the k-d tree holds the
        whole grid, so ties between equidistant meshes are broken the same way. This is
        what the tiled path (:mod:`skymap.distributed`) uses.
        """
        (r0, r1), (c0, c1) = _check_window(geometry, rows, cols)
        values = _check_grid(mesh_values, geometry, geometry.image_shape)
        good = ~_holes(values, mesh_mask)
        if not good.any():
            raise ValueError("mesh_mask: every mesh is excluded; nothing to interpolate")
        v = values[good].astype(np.float64)
        if v.min() == v.max():
            return np.full((r1 - r0, c1 - c0), v[0], dtype=values.dtype)
        yy, xx = np.meshgrid(geometry.y_centres, geometry.x_centres, indexing="ij")
        tree = KDTree(np.column_stack((yy[good], xx[good])), leafsize=self.leafsize)
        k = int(min(self.n_neighbors, len(v)))
        nx = c1 - c0
        out = np.empty((r1 - r0, nx), dtype=values.dtype)
        step = max(1, self._block_pixels // nx)
        xs = np.arange(c0, c1, dtype=float)
        for y0 in range(r0, r1, step):
            y1 = min(r1, y0 + step)
            qy, qx = np.meshgrid(np.arange(y0, y1, dtype=float), xs, indexing="ij")
            dist, idx = tree.query(np.column_stack((qy.ravel(), qx.ravel())), k=k, workers=-1)
            if k == 1:
                block = v[idx]
            else:
                with np.errstate(divide="ignore", invalid="ignore"):
                    w = 1.0 / (dist**self.power + self.regularization)
                    block = (w * v[idx]).sum(axis=1) / w.sum(axis=1)
                close = dist[:, 0] <= 1e-12
                block[close] = v[idx[close, 0]]
            out[y0 - r0 : y1 - r0] = block.reshape(y1 - y0, nx)
        return out


@dataclass(frozen=True, kw_only=True)
class SExtractorSpline:
    """SExtractor's bicubic spline through the mesh nodes.

    For every column of nodes a natural cubic spline along y gives the node values at
    the image row; a natural cubic spline through those values along x then gives the
    row. Past the outermost nodes the end intervals' cubics are extrapolated. Node
    spacing is one box; node ``(j, i)`` sits at the centre of box ``(j, i)``.

    Parameters
    ----------
    exact : bool
        True reproduces SExtractor's (and SEP's) maps: (1) its tridiagonal
        back-substitution divides by six at every step, which damps the second
        derivatives of a true natural spline; (2) it places the nodes half a pixel
        higher in y than in x (a row ``y`` sits at ``y / by - 1/2`` mesh units, a column
        ``x`` at ``(x + 1/2) / bx - 1/2``). False gives the true natural bicubic spline
        through the box centres.

    Notes
    -----
    Cost: O(mx) per row plus a few operations per pixel, in a compiled kernel parallel
    over rows. NaN holes are filled first (:func:`fill_holes`, ``"nearest"``,
    SExtractor's rule); ``mesh_mask`` is not used (see :class:`Interpolator`).
    See Bertin & Arnouts (1996), A&AS 117, 393, section 2.

    Examples
    --------
    >>> g = MeshGeometry(box_size=4, image_shape=(8, 8))
    >>> m = SExtractorSpline(exact=False)(np.ones((2, 2)), None, g, (8, 8))
    >>> float(m.min()), float(m.max())
    (1.0, 1.0)
    """

    exact: bool = True

    def __call__(self, mesh_values, mesh_mask, geometry, shape):
        _check_shape(geometry, shape)
        return self.window(mesh_values, mesh_mask, geometry, (0, shape[0]), (0, shape[1]))

    def window(self, mesh_values, mesh_mask, geometry, rows, cols):
        """The map over pixel rows ``rows[0]:rows[1]`` and columns ``cols[0]:cols[1]``,
        equal to that window of the full map."""
        from skymap.background._mesh_kernels import (
            spline_eval,
            spline_second_derivatives,
            threads_for,
        )

        (r0, r1), (c0, c1) = _check_window(geometry, rows, cols)
        values = _check_grid(mesh_values, geometry, geometry.image_shape)
        grid = fill_holes(values, method="nearest").astype(np.float64)
        # second derivatives (over 6) along y, one natural spline per node column
        d2y = spline_second_derivatives(np.ascontiguousarray(grid.T), self.exact).T
        by, bx = geometry.box_size
        y_offset = 0.5 if self.exact else 0.0
        ty = (np.arange(r0, r1) + 0.5 - y_offset) / by - 0.5
        tx = (np.arange(c0, c1) + 0.5) / bx - 0.5
        out = np.empty((r1 - r0, c1 - c0), dtype=values.dtype)
        with threads_for(out.size):
            spline_eval(grid, np.ascontiguousarray(d2y), ty, tx, self.exact, out)
        return out
