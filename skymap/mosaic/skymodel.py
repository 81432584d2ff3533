"""Polynomial sky models for sky matching: an offset, a plane or a quadratic per image.

:func:`skymap.mosaic.skymatch.match` with ``model='plane'`` or ``'poly2'`` gives each image (or
exposure) a low-order polynomial sky in its own pixel frame instead of one constant, so
that gradients from scattered light, airmass or moonlight are matched too. This module
holds the arithmetic: the polynomial terms, the clipped sky differences in cells of an
overlap, the weighted least squares over all cells, and the full-resolution maps.

Coordinates. Pixel ``(x, y)`` of an image of shape ``(ny, nx)`` has normalised
coordinates ``u = (x - (nx - 1)/2) / h`` and ``v = (y - (ny - 1)/2) / h`` with
``h = max(nx, ny) / 2``: the image centre is ``(0, 0)`` and the longer side spans about
``[-1, 1]``, which keeps the least squares well conditioned. The terms are
``[1]`` ('offset'), ``[1, u, v]`` ('plane') and ``[1, u, v, u**2, u*v, v**2]`` ('poly2'),
so the first coefficient is always the sky at the image centre.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.linalg import LinAlgWarning, cho_factor, cho_solve, eigh
from scipy.sparse import csr_matrix

from skymap.mosaic import _skymatch_kernels as _k

__all__ = [
    "MODELS",
    "N_TERMS",
    "OverlapCells",
    "frame_coords",
    "terms",
    "sky_map",
    "overlap_cells",
    "solve_models",
    "map_error",
]

MODELS = ("offset", "plane", "poly2")
N_TERMS = {"offset": 1, "plane": 3, "poly2": 6}
STAT_CODES = {"mean": 0, "median": 1, "mode": 2}
# The largest system whose null space is looked for by an eigendecomposition; beyond it
# a failed Cholesky factorisation is the only sign of an unconstrained model.
_EIGEN_MAX = 3000
# Eigenvalues of the Jacobi-scaled normal matrix below this fraction of the largest
# are a null direction: that combination of coefficients is not constrained.
_NULL_TOL = 1e-9


def frame_coords(x, y, shape) -> tuple[np.ndarray, np.ndarray]:
    """Normalised coordinates ``(u, v)`` of pixel ``(x, y)`` in an image of ``shape``.

    Examples
    --------
    >>> frame_coords(np.array([0.0, 99.0]), np.array([24.5, 24.5]), (50, 100))
    (array([-0.99,  0.99]), array([0., 0.]))
    """
    ny, nx = shape
    h = max(nx, ny) / 2.0
    return (np.asarray(x, dtype=float) - (nx - 1) / 2.0) / h, (
        np.asarray(y, dtype=float) - (ny - 1) / 2.0
    ) / h


def terms(u, v, model: str) -> np.ndarray:
    """The model's polynomial terms at ``(u, v)``, shape ``(n, N_TERMS[model])``.

    Examples
    --------
    >>> terms(np.array([2.0]), np.array([3.0]), "poly2")
    array([[1., 2., 3., 4., 6., 9.]])
    """
    u = np.asarray(u, dtype=float).ravel()
    v = np.asarray(v, dtype=float).ravel()
    cols = [np.ones_like(u)]
    if model != "offset":
        cols += [u, v]
    if model == "poly2":
        cols += [u * u, u * v, v * v]
    return np.stack(cols, axis=1)


def sky_map(coefficients, shape, model: str) -> np.ndarray:
    """Full-resolution float64 map of a model with ``coefficients`` over ``shape``.

    Examples
    --------
    >>> sky_map([1.0, 2.0, 0.0], (1, 3), "plane")
    array([[-0.33333333,  1.        ,  2.33333333]])
    """
    c = np.asarray(coefficients, dtype=float)
    ny, nx = shape
    u, _ = frame_coords(np.arange(nx), np.zeros(nx), shape)
    _, v = frame_coords(np.zeros(ny), np.arange(ny), shape)
    u, v = u[None, :], v[:, None]
    out = np.full(shape, c[0])
    if model != "offset":
        out += c[1] * u + c[2] * v
    if model == "poly2":
        out += c[3] * u * u + c[4] * u * v + c[5] * v * v
    return out


@dataclass(frozen=True, kw_only=True, eq=False)
class OverlapCells:
    """Clipped sky differences in the cells of one overlap.

    Attributes
    ----------
    value, error : ndarray, shape (n_cells,)
        The statistic of the pixel differences ``i - j`` in each cell, and its standard
        error (NaN for cells with fewer than ``min_pixels`` usable pairs).
    npix : ndarray of int
        Pixel pairs used per cell.
    cell : ndarray of int, shape (n_samples,)
        The cell of each sample.
    used : ndarray of bool, shape (n_samples,)
        Samples that entered their cell's statistic.
    width : float
        Width of the overlap across its narrow direction, in pixels of image i
        (``sqrt(12 * smallest eigenvalue)`` of the covariance of the sample positions:
        the side of a rectangle with the same second moments).
    """

    value: np.ndarray
    error: np.ndarray
    npix: np.ndarray
    cell: np.ndarray
    used: np.ndarray
    width: float

    @property
    def n_valid(self) -> int:
        """Cells that give an equation."""
        return int(np.isfinite(self.value).sum())

    def term_means(self, u, v, model: str) -> np.ndarray:
        """Mean of each model term over each cell's used samples, at sample coordinates
        ``(u, v)``: the cell's equation row, exact for the mean of a polynomial sky."""
        t = terms(u[self.used], v[self.used], model)
        cell = self.cell[self.used]
        n = np.bincount(cell, minlength=self.value.size).astype(float)
        sums = np.stack(
            [
                np.bincount(cell, weights=t[:, k], minlength=self.value.size)
                for k in range(t.shape[1])
            ],
            axis=1,
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            return sums / n[:, None]


def overlap_cells(
    vi,
    vj,
    yi,
    xi,
    *,
    cell_size: int,
    statistic: str,
    efficiency: float,
    lower: float | None,
    upper: float | None,
    nclip: int,
    lsigma: float,
    usigma: float,
    min_pixels: int,
    kept_var: float = 1.0,
    across: int = 1,
) -> OverlapCells:
    """Cut an overlap into ``cell_size`` squares and measure the sky difference in each.

    Parameters
    ----------
    vi, vj : ndarray
        Values of images i and j at the same points of the overlap (j resampled onto i).
    yi, xi : ndarray
        Pixel position of each sample in image i; cells are rectangles of i's pixels,
        counted from the overlap's lowest row and column.
    cell_size : int
        Largest side of a cell in pixels.
    across : int
        Cells are narrowed, where the overlap is narrower than ``across * cell_size``
        along a pixel axis, so that there are ``across`` of them along it: a plane
        needs two positions across a strip, a quadratic three.
    statistic, lower, upper, nclip, lsigma, usigma, min_pixels
        As in :class:`skymap.mosaic.skymatch.SkyMatch`: in each cell both images are clipped
        on their own, the pixels kept by both are differenced, and the clipped
        statistic of the differences is the cell's value. Sources are thus clipped cell
        by cell, against the local sky, so a gradient does not widen the clipping.
    efficiency : float
        Standard error of the statistic in units of ``std / sqrt(n)``.
    kept_var : float
        Fraction of j's noise variance left after resampling (1 without it): the
        difference's scatter understates the error of its mean by
        ``sqrt(2 / (1 + kept_var))`` for equal noise in both images.

    Returns
    -------
    OverlapCells

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> yy, xx = np.mgrid[0:64, 0:64]
    >>> a = 0.01 * xx + rng.normal(size=xx.shape)
    >>> b = rng.normal(size=xx.shape)
    >>> c = overlap_cells(a.ravel(), b.ravel(), yy.ravel(), xx.ravel(), cell_size=32,
    ...                   statistic="mean", efficiency=1.0, lower=None, upper=None,
    ...                   nclip=3, lsigma=4.0, usigma=4.0, min_pixels=25)
    >>> c.n_valid, round(c.width)
    (4, 64)
    """
    yi = np.asarray(yi, dtype=float)
    xi = np.asarray(xi, dtype=float)
    if yi.size == 0:
        empty = np.empty(0)
        return OverlapCells(
            value=empty,
            error=empty,
            npix=np.empty(0, dtype=np.int64),
            cell=np.empty(0, dtype=np.intp),
            used=np.empty(0, dtype=bool),
            width=0.0,
        )
    size = [
        min(cell_size, max(1, int(np.ceil((a.max() - a.min() + 1) / across)))) for a in (yi, xi)
    ]
    cy = ((yi - yi.min()) // size[0]).astype(np.intp)
    cx = ((xi - xi.min()) // size[1]).astype(np.intp)
    key = cy * (int(cx.max()) + 1) + cx
    uniq, cell = np.unique(key, return_inverse=True)
    order = np.argsort(cell, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(cell, minlength=uniq.size))])
    value, std, npix, used = _k.cell_statistics(
        np.ascontiguousarray(vi, dtype=np.float64),
        np.ascontiguousarray(vj, dtype=np.float64),
        order,
        starts,
        -np.inf if lower is None else float(lower),
        np.inf if upper is None else float(upper),
        int(nclip),
        float(lsigma),
        float(usigma),
        STAT_CODES[statistic],
        int(min_pixels),
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        error = efficiency * std / np.sqrt(npix) * np.sqrt(2.0 / (1.0 + kept_var))
    cov = np.cov(np.stack([yi, xi])) if yi.size > 1 else np.zeros((2, 2))
    width = float(np.sqrt(12.0 * max(np.linalg.eigvalsh(cov)[0], 0.0)))
    return OverlapCells(
        value=value, error=error, npix=npix, cell=cell.astype(np.intp), used=used, width=width
    )


def solve_models(
    ea, eb, ti, tj, delta, weight, *, n_exp: int, references
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Weighted least-squares coefficients of every exposure's model.

    Equation ``r`` reads ``ti[r] @ c[ea[r]] - tj[r] @ c[eb[r]] = delta[r]`` with weight
    ``weight[r]``; ``ti``/``tj`` are the mean model terms of the equation's pixels in
    each exposure's frame. Matching fixes the models only up to one common sky model,
    so the coefficients of each exposure in ``references`` (one per group of
    overlapping exposures) are held at zero: every other model is relative to them.

    Returns
    -------
    coefficients : ndarray, shape (n_exp, n_terms)
    covariance : ndarray, shape (n_exp, n_terms, n_terms)
        Each exposure's block of the coefficients' covariance, relative to its group's
        reference (zero for the references): calibrated when ``weight`` is the inverse
        variance. NaN beyond 3000 unknowns (not computed).
    unconstrained : list of int
        Exposures whose coefficients the equations leave free (empty when the solution
        is unique); their coefficients are NaN.

    Examples
    --------
    >>> t = np.array([[1.0, 0.5, 0.0], [1.0, -0.5, 0.0], [1.0, 0.0, 0.5], [1.0, 0.0, -0.5]])
    >>> d = t @ np.array([2.0, 1.0, -1.0])
    >>> c, cov, bad = solve_models(np.ones(4, int), np.zeros(4, int), t, np.zeros((4, 3)), d,
    ...                       np.ones(4), n_exp=2, references=[0])
    >>> np.round(c[1], 6).tolist(), bad
    ([2.0, 1.0, -1.0], [])
    """
    ti = np.asarray(ti, dtype=float)
    tj = np.asarray(tj, dtype=float)
    n_eq, p = ti.shape
    sw = np.sqrt(np.asarray(weight, dtype=float))
    rows = np.repeat(np.arange(n_eq), 2 * p)
    cols = np.concatenate(
        [np.asarray(ea)[:, None] * p + np.arange(p), np.asarray(eb)[:, None] * p + np.arange(p)],
        axis=1,
    ).ravel()
    vals = np.concatenate([sw[:, None] * ti, -sw[:, None] * tj], axis=1).ravel()
    a = csr_matrix((vals, (rows, cols)), shape=(n_eq, n_exp * p))
    free = np.ones(n_exp * p, dtype=bool)
    for r in references:
        free[r * p : (r + 1) * p] = False
    af = a[:, free]
    normal = (af.T @ af).toarray()
    rhs = af.T @ (sw * np.asarray(delta, dtype=float))
    out = np.zeros(n_exp * p)
    cov = np.zeros((n_exp, p, p))
    if normal.size == 0:
        return out.reshape(n_exp, p), cov, []
    col_exp = np.flatnonzero(free) // p
    diag = np.diag(normal).copy()
    zero = diag <= 0
    if zero.any():
        return _unconstrained(out, cov, n_exp, p, col_exp[zero])
    # Jacobi scaling: terms of very different sizes (u*u in a small overlap) do not
    # then look singular.
    s = 1.0 / np.sqrt(diag)
    scaled = normal * s[:, None] * s[None, :]
    if scaled.shape[0] <= _EIGEN_MAX:
        lam, vec = eigh(scaled)
        null = lam < _NULL_TOL * lam[-1]
        if null.any():
            big = np.abs(vec[:, null]) > 0.1 * np.abs(vec[:, null]).max(axis=0)
            return _unconstrained(out, cov, n_exp, p, col_exp[big.any(axis=1)])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", LinAlgWarning)
            factor = cho_factor(scaled)
            x = cho_solve(factor, s * rhs) * s
    except (np.linalg.LinAlgError, LinAlgWarning):
        return _unconstrained(out, cov, n_exp, p, col_exp)
    out[free] = x
    if scaled.shape[0] <= _EIGEN_MAX:
        full = np.zeros((n_exp * p, n_exp * p))
        full[np.ix_(free, free)] = cho_solve(factor, np.diag(s)) * s[:, None]
        cov = np.stack([full[e * p : (e + 1) * p, e * p : (e + 1) * p] for e in range(n_exp)])
    else:
        cov[:] = np.nan
    return out.reshape(n_exp, p), cov, []


def map_error(covariance, shape, model: str) -> float:
    """RMS over the pixels of ``shape`` of the error of a model map whose coefficients
    have ``covariance``: ``sqrt(trace(C M))`` with ``M`` the mean of ``t t^T`` over the
    image (on a 33x33 grid of its pixels).

    Examples
    --------
    >>> round(map_error(np.diag([0.01, 0.0, 0.0]), (64, 64), "plane"), 6)
    0.1
    """
    ny, nx = shape
    yy, xx = np.meshgrid(np.linspace(0, ny - 1, 33), np.linspace(0, nx - 1, 33), indexing="ij")
    t = terms(*frame_coords(xx.ravel(), yy.ravel(), shape), model)
    second = t.T @ t / t.shape[0]
    return float(np.sqrt(max(np.trace(np.asarray(covariance) @ second), 0.0)))


def _unconstrained(out, cov, n_exp, p, exposures):
    bad = sorted({int(e) for e in exposures})
    coef = out.reshape(n_exp, p)
    coef[bad] = np.nan
    cov[bad] = np.nan
    return coef, cov, bad
