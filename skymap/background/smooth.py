"""Noise-weighted thin-plate smoothing of a masked image, with the smoothing chosen by
generalised cross-validation (GCV).

The image is first reduced to small cells: each cell keeps the mean of its unmasked
pixels, their number (the cell's weight: the mean's variance is sigma^2 / n) and their
centroid. The cell means are then smoothed on the regular cell grid by minimising

    sum_i n_i (y_i - z_i)^2 + lam * integral (z_xx^2 + 2 z_xy^2 + z_yy^2) dA,

a discrete thin-plate spline. Its null space holds planes, so a gradient passes through
unbiased, and its equivalent kernel is a fourth-order low-pass filter: far less bias on
curved sky than a box or Gaussian mean of the same noise. Cells with no unmasked pixel
get weight 0 and are filled by the penalty, which is how masked sources are bridged.
``lam`` has units of pixel^4, so ``lam ** 0.25`` is the smoothing length in pixels
whatever the cell size.

The linear system is solved by conjugate gradients, preconditioned in the cosine
(DCT-II) basis where the penalty is diagonal. GCV needs the trace of the hat matrix;
it is taken from the same cosine spectrum with the mean weight, which is exact when
nothing is masked and a good approximation when the mask is scattered.

A masked cell mean estimates the sky at the centroid of the cell's unmasked pixels,
not at the cell centre. After the first solve, each mean is moved to the centre with
the fitted gradient, and the system is solved again.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
from scipy import fft, ndimage, sparse

from skymap._util import pow2_at_most
from skymap._validate import as_image, as_mask, as_pair, check_positive, check_range, combine_masks
from skymap.background import _smooth_kernels as _k
from skymap.masking.hysteresis import CoarseRMS

__all__ = ["SmoothResult", "ThinPlateSmoother", "cell_sums", "smooth_grid", "weighted_sums"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- grid maths


def _thin_plate(z: np.ndarray, hy: float, hx: float, out: np.ndarray | None = None) -> np.ndarray:
    """Apply the discrete thin-plate penalty operator (times the cell area) to ``z``.

    Second differences are scaled to pixel units with the cell spacings ``hy``, ``hx``.
    """
    area = hy * hx
    if out is None:
        out = np.empty_like(z)
    return _k.thin_plate_apply(z, area / hy**4, area / hx**4, 2.0 * area / (hy * hx) ** 2, out)


def _spectrum(shape: tuple[int, int], hy: float, hx: float) -> np.ndarray:
    """Eigenvalues of the squared Neumann Laplacian in the DCT-II basis (times the area):
    the thin-plate operator away from the edges."""
    ly = (2.0 - 2.0 * np.cos(np.pi * np.arange(shape[0]) / shape[0])) / hy**2
    lx = (2.0 - 2.0 * np.cos(np.pi * np.arange(shape[1]) / shape[1])) / hx**2
    return (ly[:, None] + lx[None, :]) ** 2 * (hy * hx)


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    # einsum, not BLAS: BLAS threads contend on busy machines for arrays this small.
    return float(np.einsum("ij,ij->", a, b))


class _System:
    """The weighted thin-plate system on one grid, for any smoothing ``lam``."""

    def __init__(self, weights: np.ndarray, hy: float, hx: float):
        self.w = weights
        self.hy, self.hx = hy, hx
        self.spec = _spectrum(weights.shape, hy, hx)
        self.wbar = float(weights.mean())
        self.nobs = int(np.count_nonzero(weights))

    def solve(self, y, lam, z0=None, *, rtol=1e-6, maxiter=1000):
        w, hy, hx = self.w, self.hy, self.hx
        inv = 1.0 / (self.wbar + lam * self.spec)

        def precondition(r):
            return fft.idctn(inv * fft.dctn(r, norm="ortho"), norm="ortho")

        buf = np.empty_like(y)
        b = w * y
        z = precondition(b) if z0 is None else z0.copy()
        r = b - (w * z + lam * _thin_plate(z, hy, hx, buf))
        p = precondition(r)
        rz = float(_dot(r, p))
        bnorm = float(np.sqrt(_dot(b, b))) or 1.0
        iterations = 0
        while iterations < maxiter:
            if np.sqrt(_dot(r, r)) <= rtol * bnorm:
                break
            iterations += 1
            ap = w * p + lam * _thin_plate(p, hy, hx, buf)
            alpha = rz / float(_dot(p, ap))
            z += alpha * p
            r -= alpha * ap
            q = precondition(r)
            rz_new = float(_dot(r, q))
            p = q + (rz_new / rz) * p
            rz = rz_new
        else:
            log.warning("thin-plate solve did not converge in %d iterations", maxiter)
        return z, iterations

    def trace(self, lam: float) -> float:
        """Approximate trace of the hat matrix over the observed cells."""
        full = float(np.sum(self.wbar / (self.wbar + lam * self.spec)))
        return full * self.nobs / self.w.size

    def gcv(self, y, z, lam, inflation: float = 1.0) -> float:
        resid = float(np.sum(self.w * (y - z) ** 2))
        n = self.nobs
        dof = max(n - inflation * self.trace(lam), 1e-3)
        return n * resid / dof**2


def smooth_grid(
    values,
    weights,
    *,
    spacing=(1.0, 1.0),
    smoothing: float | None = None,
    smoothing_range: tuple[float, float] = (1e-1, 1e12),
    smoothing_start: float = 1e6,
    smoothing_step: float = 1.0,
    gcv_inflation: float = 1.0,
    offsets=None,
    rtol: float = 1e-6,
):
    """Smooth a weighted grid with the thin-plate penalty; choose ``smoothing`` by GCV.

    Parameters
    ----------
    values, weights : ndarray (gy, gx)
        Grid values and their weights (inverse variances up to a common factor);
        weight 0 (or a non-finite value) marks a missing node.
    spacing : pair of float
        Node spacing (y, x) in pixels, so that ``smoothing`` is in pixel^4.
    smoothing : float or None
        The penalty weight ``lam``; None chooses it by GCV within ``smoothing_range``,
        starting the search at ``smoothing_start`` and walking downhill by
        ``smoothing_step`` decades (use a small step when the start is already close).
        With weights that are pixel counts,
        ``lam`` is in pixel^4 and ``lam ** 0.25`` is about the smoothing length.
    gcv_inflation : float
        Factor on the hat-matrix trace in GCV (1 = classical GCV; values near 1.4 are
        the usual guard against GCV's tendency to under-smooth).
    offsets : pair of ndarray or None
        (dy, dx) in pixels from each node to where its value was measured (the centroid
        of the pixels that made it); the values are moved to the nodes with the fitted
        gradient and the grid is solved again.
    rtol : float
        Relative residual at which the conjugate-gradient solves of a given
        ``smoothing`` and of the offset correction stop.

    Returns
    -------
    z : ndarray (gy, gx)
        The smoothed grid (float64).
    lam : float
        The smoothing used.
    scores : dict
        ``{lam: gcv}`` for every smoothing tried (empty when ``smoothing`` was given).

    Examples
    --------
    >>> g = np.add.outer(np.arange(20.0), np.arange(30.0))
    >>> z, lam, _ = smooth_grid(g, np.ones_like(g), smoothing=100.0)
    >>> bool(np.allclose(z, g))
    True
    """
    y = np.asarray(values, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if y.ndim != 2 or y.shape != w.shape:
        raise ValueError(f"values and weights must be 2-D of one shape, got {y.shape}, {w.shape}")
    bad = ~(np.isfinite(y) & np.isfinite(w)) | (w <= 0)
    if bad.all():
        raise ValueError("smooth_grid needs at least one node with a finite value and weight > 0")
    w = np.where(bad, 0.0, w)
    # Centre and scale so that tolerances mean the same on any data.
    good = ~bad
    ref = float(np.sum(w[good] * y[good]) / np.sum(w[good]))
    y = np.where(bad, 0.0, y - ref)
    hy, hx = (float(s) for s in spacing)
    system = _System(w, hy, hx)
    scores: dict[float, float] = {}
    if smoothing is None:
        z, lam = _gcv_search(
            system, y, smoothing_range, smoothing_start, smoothing_step, gcv_inflation, scores
        )
    else:
        lam = float(smoothing)
        z, _ = system.solve(y, lam, rtol=rtol)
    if offsets is not None:
        gy_, gx_ = np.gradient(z, hy, hx) if min(z.shape) > 1 else (np.zeros_like(z),) * 2
        dy, dx = (np.where(bad, 0.0, np.asarray(o, dtype=np.float64)) for o in offsets)
        z, _ = system.solve(y - gy_ * dy - gx_ * dx, lam, z, rtol=rtol)
    return z + ref, lam, scores


def _gcv_search(system: _System, y, smoothing_range, start, step, inflation, scores):
    """Minimise GCV over log10(lam): with ``step >= 1`` scan the range by decades from
    the stiff end, otherwise walk downhill from ``start`` by ``step``; then refine by
    halving the step down to an eighth of a decade. Each solve warm-starts from its
    neighbour."""
    lo, hi = (np.log10(float(v)) for v in smoothing_range)
    solutions: dict[float, np.ndarray] = {}

    def score(loglam):
        loglam = float(np.clip(loglam, lo, hi))
        lam = 10.0**loglam
        if lam not in scores:
            near = min(solutions, key=lambda k: abs(np.log10(k) - loglam)) if solutions else None
            # GCV compares fits that differ by far more than 1e-4: the search solves
            # loosely, and only the chosen fit is polished below.
            z, _ = system.solve(y, lam, solutions.get(near), rtol=1e-4)
            solutions[lam] = z
            scores[lam] = system.gcv(y, z, lam, inflation)
        return scores[lam], loglam

    if step >= 1.0:
        # Cold start: scan every decade from smooth to rough. GCV is flat over the
        # over-smoothed plateau, so a downhill walk from a too-stiff start can stall
        # there; the scan stops once GCV has clearly risen two decades past the best.
        centre, best = None, np.inf
        v = hi
        while True:
            s, v = score(v)
            if s < best:
                best, centre = s, v
            elif v <= centre - 2.0 and s > 1.05 * best:
                break
            if v <= lo:
                break
            v -= step
    else:
        centre = float(np.clip(np.log10(start), lo, hi))
        best, centre = score(centre)
        for direction in (step, -step):
            while True:
                s, v = score(centre + direction)
                if s >= best or v == centre:
                    break
                best, centre = s, v
    fine = step / 2.0
    while fine >= 0.125 - 1e-12:
        for v in (centre - fine, centre + fine):
            s, v = score(v)
            if s < best:
                best, centre = s, v
        fine /= 2.0
    lam = 10.0**centre
    z, _ = system.solve(y, lam, solutions[lam])
    return z, lam


# --------------------------------------------------------------------------- image level


def cell_sums(image: np.ndarray, bad: np.ndarray, cells, ref: float, origin=(0, 0)):
    """Per-cell sums of the good (not ``bad``) pixels of ``image``: count, sum and sum
    of squares of ``image - ref``, and sums of the y and x pixel coordinates, stacked
    as one (5, gy, gx) float64 array.

    The sums of an image cut into pieces along cell boundaries are the pieces' sums,
    bit for bit (each cell is summed in the same pixel order), so a tiled caller bins
    its tiles with this and puts the grids side by side. ``origin`` is the (y, x) pixel
    of ``image[0, 0]`` in the whole image, for the coordinate sums; it must sit on a
    cell boundary.

    Examples
    --------
    >>> img = np.arange(16.0).reshape(4, 4)
    >>> whole = cell_sums(img, np.zeros((4, 4), bool), (2, 2), 0.0)
    >>> right = cell_sums(img[:, 2:], np.zeros((4, 2), bool), (2, 2), 0.0, origin=(0, 2))
    >>> bool(np.array_equal(whole[:, :, 1:], right))
    True
    """
    cy, cx = cells
    n, s1, s2, sy, sx = _k.bin_cells(image, bad, cy, cx, ref)
    # Integer coordinate sums are exact in float64 (< 2**53), so shifting is exact.
    if origin[0]:
        sy += n * origin[0]
    if origin[1]:
        sx += n * origin[1]
    return np.stack([n, s1, s2, sy, sx])


def reference_level(sub: np.ndarray, subbad: np.ndarray) -> float | None:
    """The level subtracted before binning, for numerical accuracy only: the median of
    the good pixels of a subsample (``image[::s, ::s]`` with ``s`` from
    :func:`reference_step`); None when the subsample has no good pixel (the caller then
    takes the first good pixel of the image)."""
    return float(np.median(sub[~subbad])) if not subbad.all() else None


def reference_step(shape) -> int:
    """Stride of the subsample :func:`reference_level` reads (about 250 000 pixels)."""
    return max(1, int(np.sqrt(shape[0] * shape[1] / 250_000)))


def weighted_sums(image, bad, weight, cells, ref: float, origin=(0, 0)) -> np.ndarray:
    """:func:`cell_sums` plus two rows: per-cell sums of ``weight`` and of
    ``weight * (image - ref)`` over the good pixels, a (7, gy, gx) float64 array. The
    smoother then weights each cell by its summed weight and takes the weighted mean;
    the variance (the RMS map) stays that of the pixels."""
    plain = cell_sums(image, bad, cells, ref, origin)
    w = np.asarray(weight, dtype=np.float64)
    wsum = _k.bin_cells(w, bad, cells[0], cells[1], 0.0)[1]
    wx = _k.bin_cells(w * (image - ref), bad, cells[0], cells[1], 0.0)[1]
    return np.concatenate([plain, wsum[None], wx[None]])


def _bin(sums: np.ndarray, cy: int, cx: int, ref: float):
    """Per-cell count, mean, variance, centroid offset and weight of the good pixels
    (the weight is the count, or the summed pixel weights of :func:`weighted_sums`,
    and the mean then the weighted mean)."""
    n, s1, s2, sy, sx = sums[:5]
    iy = np.arange(n.shape[0]) * cy
    ix = np.arange(n.shape[1]) * cx
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / n
        var = (s2 - n * mean**2) / (n - 1)
        dy = sy / n - (iy[:, None] + (cy - 1) / 2.0)
        dx = sx / n - (ix[None, :] + (cx - 1) / 2.0)
        if len(sums) == 7:
            w = np.where(n > 0, sums[5], 0.0)
            return n, sums[6] / sums[5] + ref, var, dy, dx, w
    return n, mean + ref, var, dy, dx, n


def _bspline_weights(pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Base index and the four cubic B-spline weights (unit knot spacing, coefficient
    k at position k) of each position; the weights apply to coefficients base-1..base+2."""
    base = np.floor(pos).astype(np.int64)
    t = pos - base
    weights = np.stack(
        [
            (1 - t) ** 3 / 6,
            (3 * t**3 - 6 * t**2 + 4) / 6,
            (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6,
            t**3 / 6,
        ],
        axis=1,
    )
    return base, weights


def upsample(
    grid: np.ndarray,
    cell_size,
    shape,
    dtype=np.float64,
    step: int = 1,
    offset: float = 0.0,
    window=None,
) -> np.ndarray:
    """Cubic-spline interpolation of a cell grid (node i at pixel ``i*c + (c-1)/2``) to
    the full ``shape``; beyond the outer nodes the grid is extended linearly, so a
    gradient carries on to the image edge. With ``step`` > 1 only every ``step``-th
    pixel along each axis is evaluated (exactly ``upsample(...)[::step, ::step]``), at
    positions shifted by ``offset`` pixels (``(step - 1) / 2``: the blocks' centres).
    ``window`` = ((y0, y1), (x0, x1)) evaluates only those rows and columns, exactly
    ``upsample(...)[y0:y1:step, x0:x1:step]`` (each pixel is computed on its own from
    the whole grid), which is how a tiled caller evaluates one tile.

    Examples
    --------
    >>> g = np.add.outer(np.arange(5.0), np.zeros(4))
    >>> upsample(g, 4, (20, 16))[:, 0][[0, 1, 18, 19]].round(6)
    array([-0.375, -0.125,  4.125,  4.375])
    """
    cy, cx = as_pair("cell_size", cell_size)
    # The IIR spline prefilter decays by 0.27 per node: 12 nodes of linear extension
    # make the mirror boundary invisible (< 1e-6) at the outer pixels.
    pad = 12
    z = np.asarray(grid, dtype=np.float64)
    z = _extend_linear(_extend_linear(z, pad, 0), pad, 1)
    coef = ndimage.spline_filter(z, order=3, mode="mirror")
    (y0, y1), (x0, x1) = ((0, shape[0]), (0, shape[1])) if window is None else window
    uy = (np.arange(y0, y1, step) + offset - (cy - 1) / 2.0) / cy + pad
    ux = (np.arange(x0, x1, step) + offset - (cx - 1) / 2.0) / cx + pad
    # Along y on the small grid (sparse, cheap), then along x pixel by pixel.
    by, wy = _bspline_weights(uy)
    rows = np.repeat(np.arange(uy.size), 4)
    cols = (by[:, None] + np.arange(-1, 3)[None, :]).ravel()
    ymat = sparse.csr_matrix((wy.ravel(), (rows, cols)), shape=(uy.size, coef.shape[0]))
    tmp = np.ascontiguousarray(ymat @ coef)
    bx, wx = _bspline_weights(ux)
    out = np.empty((uy.size, ux.size), dtype=dtype)
    return _k.bspline_rows(tmp, bx, wx, out)


def _extend_linear(z: np.ndarray, pad: int, axis: int) -> np.ndarray:
    z = np.moveaxis(z, axis, 0)
    n = z.shape[0]
    if n == 1:
        ext = np.concatenate([np.repeat(z, pad, 0), z, np.repeat(z, pad, 0)])
    else:
        k = np.arange(1, pad + 1)[:, None, ...]
        lo = z[0] - k[::-1] * (z[1] - z[0])
        hi = z[-1] + k * (z[-1] - z[-2])
        ext = np.concatenate([lo, z, hi])
    return np.moveaxis(ext, 0, axis)


@dataclass(frozen=True, kw_only=True)
class ThinPlateSmoother:
    """Background as a noise-weighted thin-plate smooth of the masked image.

    Parameters
    ----------
    cell_size : int, pair of int, or None
        Side (y, x) in pixels of the cells the image is reduced to before smoothing.
        None picks about one cell per 128th of the longer image side, at least 2 and at
        most 32 pixels, and halves the cells while GCV asks for a smoothing below the
        cell size (down to 2 pixels, or 512 cells along the longer side). Cells should
        be several times smaller than the smoothing length.
    smoothing : float or None
        Penalty weight in pixel^4 (``smoothing ** 0.25`` is roughly the smoothing
        length in pixels). None chooses it by GCV.
    smoothing_range : pair of float
        Range searched by GCV.
    gcv_inflation : float
        Factor on the effective number of parameters in GCV. Classical GCV (1.0)
        tends to under-smooth, all the more when faint undetected sources add correlated
        "noise"; 1.4 is the customary guard (Kim & Gu 2004).
    protect_scale : float or None
        Width in pixels of the blocks at which the background must not follow the
        noise. After GCV, the smoothing is raised by eighth decades until the residual's
        block means at this width (over blocks of unmasked cells) scatter at least
        ``protect_level`` times as much as white noise of the measured pixel variance
        does: the notebook's RMS-versus-scale test, used as a constraint. None: GCV
        alone.
    protect_level : float
        See ``protect_scale``.
    rms_smoothing_factor : float
        The noise map is smoothed with ``smoothing * rms_smoothing_factor``: the noise
        varies more slowly than the sky and is measured less precisely.
    min_pixels : int
        Cells with fewer unmasked pixels are treated as missing.

    References
    ----------
    Duchon, J. 1977, in Constructive Theory of Functions of Several Variables, Lecture
    Notes in Mathematics 571, 85 (thin-plate splines), https://doi.org/10.1007/BFb0086566.
    Craven, P. & Wahba, G. 1979, Numer. Math. 31, 377 (generalised cross-validation),
    https://doi.org/10.1007/BF01404567.
    Wahba, G. 1990, Spline Models for Observational Data (SIAM),
    https://doi.org/10.1137/1.9781611970128.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> yy, xx = np.mgrid[:200, :300]
    >>> image = 5 + 0.01 * xx + rng.normal(0, 1, (200, 300))
    >>> res = ThinPlateSmoother().fit(image)
    >>> bool(np.abs(res.background - (5 + 0.01 * xx)).max() < 0.2)
    True
    """

    cell_size: Any = None
    smoothing: float | None = None
    smoothing_range: tuple[float, float] = (1.0, 1e16)
    gcv_inflation: float = 1.4
    protect_scale: float | None = None
    protect_level: float = 0.97
    rms_smoothing_factor: float = 16.0
    min_pixels: int = 1

    def __post_init__(self):
        if self.cell_size is not None:
            as_pair("cell_size", self.cell_size)
        check_positive("smoothing", self.smoothing, allow_none=True)
        rng = tuple(self.smoothing_range)
        if len(rng) != 2 or not all(np.isfinite(v) and v > 0 for v in rng) or rng[0] >= rng[1]:
            raise ValueError(
                "smoothing_range must be two positive numbers (low, high) with low < high, "
                f"got {self.smoothing_range!r}"
            )
        check_positive("gcv_inflation", self.gcv_inflation)
        check_positive("protect_scale", self.protect_scale, allow_none=True)
        check_range("protect_level", self.protect_level, 0.0, 1.0)
        check_positive("rms_smoothing_factor", self.rms_smoothing_factor)
        if int(self.min_pixels) != self.min_pixels or self.min_pixels < 1:
            raise ValueError(f"min_pixels must be an integer >= 1, got {self.min_pixels!r}")

    def cells_for(self, shape) -> tuple[int, int]:
        """The cell size used for an image of ``shape``."""
        if self.cell_size is not None:
            return as_pair("cell_size", self.cell_size)
        c = int(np.clip(np.ceil(max(shape) / 128), 2, 32))
        return c, c

    def tile_unit(self, shape) -> tuple[int, int]:
        """Tiles align to every cell size a fit may try and to the blocks of its coarse
        noise map, so that each cell and block lies inside one tile."""
        units = [1, 1]
        for cells in self.cell_sequence(shape):
            q = pow2_at_most(min(cells) / 2.0, *shape)
            units = [math.lcm(u, c, q) for u, c in zip(units, cells, strict=True)]
        return units[0], units[1]

    def cell_sequence(self, shape) -> list[tuple[int, int]]:
        """Every cell size a fit of an image of ``shape`` may bin into, in the order
        tried: the :meth:`cells_for` cells, then (automatic cells only) halved while GCV
        asks for a smoothing below the cell size, down to 2 pixels or a grid of 512
        cells along the longer side (the solver's cost grows with the grid)."""
        cells = self.cells_for(shape)
        out = [cells]
        if self.cell_size is None:
            finest = max(2, int(np.ceil(max(shape) / 512)))
            while min(cells) // 2 >= finest:
                cells = (max(finest, cells[0] // 2), max(finest, cells[1] // 2))
                out.append(cells)
        return out

    def fit(
        self,
        image,
        mask=None,
        *,
        smoothing_start: float | None = None,
        min_smoothing: float | None = None,
        weight=None,
    ) -> SmoothResult:
        """Fit the smooth background of ``image`` ignoring ``mask`` (True = excluded).

        ``weight`` (optional, the image's shape) is each pixel's relative inverse
        variance: cells are then weighted by their summed weight and take the weighted
        mean of their pixels (:func:`weighted_sums`); the RMS map stays the pixels'.
        With one smoothing for the image, the effective length where the noise is
        sigma goes as ``(smoothing / weight) ** 0.25``, i.e. as ``sigma ** 0.5``: the
        generalised-least-squares fit, right for sky with structure on every scale,
        but on sky smoother than that a noisy region is smoothed longer than its own
        optimum (``benchmarks/README.md``, "varying depth": with a right half 4x
        noisier, the deep half's error falls from 0.077 to 0.030 sigma and the noisy
        half's rises from 0.024 to 0.027, mean of 14 scenes).

        ``smoothing_start`` seeds the GCV search (an iterative caller passes the
        previous smoothing, which saves solves); None starts from the image size.
        ``min_smoothing`` (pixel^4) raises the lower end of the GCV search: an
        iterative caller that has found the fit following source light passes a
        stiffer floor. Neither applies when ``smoothing`` is fixed.
        """
        img = as_image(image)
        bad = combine_masks(img, as_mask(mask, img.shape))
        if bad.all():
            raise ValueError("image has no valid pixel: everything is masked or non-finite")
        # A reference level for numerical accuracy only: a subsample's median will do,
        # and never copies the whole image.
        step = reference_step(img.shape)
        ref = reference_level(img[::step, ::step], bad[::step, ::step])
        if ref is None:
            ref = float(img[~bad][0])
        if weight is not None:
            w = as_image(weight, "weight")
            if w.shape != img.shape:
                raise ValueError(f"weight must have the image's shape {img.shape}, got {w.shape}")

            def sums(cells):
                return weighted_sums(img, bad, w, cells, ref)
        else:

            def sums(cells):
                return cell_sums(img, bad, cells, ref)

        return self.fit_sums(
            sums,
            img.shape,
            img.dtype,
            ref,
            smoothing_start=smoothing_start,
            min_smoothing=min_smoothing,
        )

    def fit_on(
        self,
        backend,
        mask,
        *,
        start_scale: float | None = None,
        min_scale: float | None = None,
    ) -> SmoothResult:
        """:meth:`fit` through an array back end
        (:class:`~skymap.backends.base.ArrayBackend`: in memory, or tile by tile), as
        the pipeline calls it: the cells are summed by the back end, the GCV search
        starts at the smoothing length ``start_scale`` and stays at or above
        ``min_scale`` (pixels). Identical to :meth:`fit` on the back end's image with
        ``mask`` (which must hold its bad pixels)."""
        shape = backend.shape
        step = reference_step(shape)
        ref = reference_level(
            backend.subsample(backend.image, step), backend.subsample(mask, step)
        )
        if ref is None:
            ref = backend.first_valid(mask)
        if backend.weight is None:

            def sums(cells):
                return backend.cell_grid(
                    cell_sums, [backend.image, mask], cells, 5, cells=cells, ref=ref
                )
        else:
            # an error map given to the fit: weighted cell means and weights

            def sums(cells):
                arrays = [backend.image, mask, backend.weight]
                return backend.cell_grid(weighted_sums, arrays, cells, 7, cells=cells, ref=ref)

        return self.fit_sums(
            sums,
            shape,
            backend.dtype,
            ref,
            smoothing_start=None if start_scale is None else start_scale**4,
            min_smoothing=None if min_scale is None else min_scale**4,
        )

    def fit_sums(
        self,
        sums,
        shape,
        dtype,
        ref: float,
        *,
        smoothing_start: float | None = None,
        min_smoothing: float | None = None,
    ) -> SmoothResult:
        """Fit from per-cell sums instead of the image: what :meth:`fit` does after
        reading the pixels, for a caller that bins the image elsewhere (tile by tile:
        :meth:`fit_on` with a tiled back end).

        Parameters
        ----------
        sums : callable
            ``sums(cells)`` returns the :func:`cell_sums` of the whole image (its good
            pixels, about ``ref``) for a cell size of :meth:`cell_sequence`.
        shape, dtype
            The image's shape and (working) dtype.
        ref : float
            The level the sums were taken about.
        smoothing_start, min_smoothing : float or None
            As for :meth:`fit`.

        Returns
        -------
        SmoothResult
            Identical to :meth:`fit` on the image the sums came from.

        Examples
        --------
        >>> rng = np.random.default_rng(0)
        >>> img = 5 + rng.normal(0, 1, (64, 96))
        >>> tps = ThinPlateSmoother(cell_size=8, smoothing=1e6)
        >>> ok = np.zeros(img.shape, bool)
        >>> ref = float(np.median(img))
        >>> res = tps.fit_sums(lambda c: cell_sums(img, ok, c, ref), img.shape, img.dtype, ref)
        >>> bool(np.array_equal(res.grid, tps.fit(img).grid))
        True
        """
        shape = (int(shape[0]), int(shape[1]))
        for cells in self.cell_sequence(shape):
            fitted = self._fit_grid(sums(cells), shape, cells, ref, smoothing_start, min_smoothing)
            # Automatic cells: when GCV wants a smoothing below the cell size, the grid
            # is too coarse for this sky; refit on the next, finer cells.
            if not fitted[-1]:
                break
            smoothing_start = fitted[1]
        z, lam, scores, n, mean, var, offsets, w, _ = fitted
        cy, cx = cells
        vw = np.where((n >= 2) & np.isfinite(var), n - 1.0, 0.0)
        if np.any(vw > 0):
            zvar, _, _ = smooth_grid(
                var, vw, spacing=(cy, cx), smoothing=lam * self.rms_smoothing_factor
            )
        else:
            zvar = np.full_like(z, float(np.nanmean(var)) if np.isfinite(var).any() else 0.0)
        zrms = np.sqrt(np.maximum(zvar, 0.0))
        # The smoothed variance can undershoot towards zero where few pixels are left
        # (masked crowds, the rims of blank regions); a near-zero noise there would make
        # every fluctuation significant. Floor it at half the typical noise.
        measured = zrms[vw > 0]
        if measured.size:
            zrms = np.maximum(zrms, 0.5 * float(np.median(measured)))
        return SmoothResult(
            shape=shape,
            dtype=np.dtype(dtype),
            cell_size=(cy, cx),
            grid=z,
            rms_grid=zrms,
            cell_values=mean,
            cell_pixels=n,
            smoothing=lam,
            gcv=scores,
            config=self,
            error=_statistical_error(np.where(n >= self.min_pixels, w, 0.0), lam, (cy, cx)),
            cell_offsets=offsets,
            cell_weights=None if w is n else w,
        )

    def _weights(self, n: np.ndarray) -> np.ndarray:
        return np.where(n >= self.min_pixels, n, 0.0)

    def _fit_grid(self, sums, shape, cells, ref, smoothing_start, min_smoothing=None):
        """Smooth the cell grid of ``sums``; also says whether GCV hit the cell-size
        floor."""
        cy, cx = cells
        lo, hi = self.smoothing_range
        n, mean, var, dy, dx, w = _bin(sums, cy, cx, ref)
        weights = np.where(n >= self.min_pixels, w, 0.0)
        if not np.any(weights > 0):
            raise ValueError("no cell has enough unmasked pixels; lower min_pixels")
        start = (max(shape) / 16.0) ** 4 if smoothing_start is None else smoothing_start
        # Below about a cell the grid cannot represent the fit; beyond a few image
        # sizes every fit is the same plane.
        lo = max(lo, float(max(cy, cx)) ** 4)
        # The refinement test looks at the grid's own floor, not at a caller's.
        floor = lo
        if min_smoothing is not None:
            lo = max(lo, float(min_smoothing))
        hi = max(lo, min(hi, (4.0 * max(shape)) ** 4))
        start = min(max(start, lo), hi)
        grid = {"spacing": (cy, cx), "offsets": (dy, dx)}
        z, lam, scores = smooth_grid(
            mean,
            weights,
            smoothing=self.smoothing,
            smoothing_range=(lo, max(hi, lo)),
            smoothing_start=start,
            smoothing_step=1.0 if smoothing_start is None else 0.25,
            gcv_inflation=self.gcv_inflation,
            **grid,
        )
        at_floor = self.smoothing is None and lam <= floor * 10.0**0.2
        if self.smoothing is None and self.protect_scale is not None:
            # Stiffen until the residual is white at the protected scale.
            while lam < hi and _whiteness(mean, z, n, var, (cy, cx), self.protect_scale) < (
                self.protect_level
            ):
                lam *= 10.0**0.125
                z, _, _ = smooth_grid(mean, weights, smoothing=lam, **grid)
        return z, lam, scores, n, mean, var, (dy, dx), w, at_floor


def _statistical_error(weights, lam, cells) -> float:
    """RMS over the grid of the fit's error due to the pixel noise, in units of the
    pixel RMS. The fit is ``z = (W + lam K)^-1 W y`` with ``cov(y) = sigma^2 W^-1``, so
    ``cov(z) = sigma^2 A^-1 W A^-1``; with the weights replaced by their mean ``w``
    (as for the GCV trace) its eigenvalues in the cosine basis are
    ``sigma^2 h_k^2 / w`` with ``h_k = w / (w + lam s_k)``, and the mean variance is
    their average. Exact for an unmasked image; with a mask it is the error of the
    same number of pixels spread evenly (larger in the holes, smaller elsewhere)."""
    wbar = float(np.mean(weights))
    if wbar <= 0:
        return float("inf")
    h = wbar / (wbar + lam * _spectrum(weights.shape, *cells))
    return float(np.sqrt(np.sum(h * h) / (weights.size * wbar)))


def _whiteness(values, z, n, var, cells, width) -> float:
    """Ratio of the scatter of the residual's block means at ``width`` pixels to that of
    white noise with the pooled within-cell variance, over blocks of complete cells;
    +inf when there are too few such blocks to tell."""
    cy, cx = cells
    ky, kx = max(1, round(width / cy)), max(1, round(width / cx))
    full = n >= cy * cx
    gy, gx = (n.shape[0] // ky) * ky, (n.shape[1] // kx) * kx
    if gy == 0 or gx == 0 or not full.any():
        return float("inf")
    r = np.where(full, values - z, 0.0)[:gy, :gx].reshape(gy // ky, ky, gx // kx, kx)
    ok = full[:gy, :gx].reshape(gy // ky, ky, gx // kx, kx).all(axis=(1, 3))
    if ok.sum() < 50:
        return float("inf")
    means = r.mean(axis=(1, 3))[ok]
    pixel_var = float(np.mean(var[full & np.isfinite(var)]))
    white = np.sqrt(pixel_var / (ky * cy * kx * cx))
    return float(means.std() / white) if white > 0 else float("inf")


@dataclass(frozen=True, kw_only=True)
class SmoothResult:
    """What :class:`ThinPlateSmoother` fitted.

    ``grid`` and ``rms_grid`` are the smoothed cell grids (cheap); ``background`` and
    ``rms`` are the full-resolution maps, interpolated on first access and cached.
    ``cell_values``, ``cell_pixels`` and ``cell_offsets`` are the binned data (cell
    means, unmasked pixel counts, and (dy, dx) from each cell centre to the centroid of
    its pixels). ``error`` is the RMS over the grid of the background's statistical
    error (from the pixel noise alone), in units of the pixel RMS.
    """

    shape: tuple[int, int]
    dtype: Any
    cell_size: tuple[int, int]
    grid: np.ndarray
    rms_grid: np.ndarray
    cell_values: np.ndarray
    cell_pixels: np.ndarray
    smoothing: float
    gcv: dict = field(repr=False)
    config: ThinPlateSmoother
    error: float
    cell_offsets: tuple = field(repr=False)
    cell_weights: np.ndarray | None = field(default=None, repr=False)
    #: :meth:`background_map` makes a new array at every call (see BackgroundModel).
    new_maps: ClassVar[bool] = True

    @property
    def scale(self) -> float:
        """Smoothing length in pixels, ``smoothing ** 0.25``."""
        return float(self.smoothing) ** 0.25

    def asymmetry(self, stiffer: float = 4.0, tail: float = 0.01) -> float:
        """Ratio of the upper to the lower tail of (this fit - a fit ``stiffer`` times
        longer, same cells and weights), about the median, at the ``tail`` quantiles.

        Sky structure that this fit follows and the stiffer one does not is as often a
        dip as a bump, so the ratio is near 1; source light left in the unmasked pixels
        (the faint wings of extended sources) only ever raises the fit, so it gives
        bumps and no dips, and a ratio well above 1.

        Examples
        --------
        >>> rng = np.random.default_rng(2)
        >>> yy, xx = np.mgrid[:256, :256]
        >>> wings = sum(np.exp(-np.hypot(yy - y, xx - x) / 12.0)
        ...             for y, x in ((60, 70), (180, 90), (120, 200)))
        >>> res = ThinPlateSmoother().fit(rng.normal(size=(256, 256)) + 3 * wings)
        >>> bool(res.asymmetry() > 3)
        True
        """
        check_positive("stiffer", stiffer)
        check_range("tail", tail, 0.0, 0.5)
        # Tail quantiles of a difference of two fits need no more than this rtol.
        stiff = self.stiffer_grid(stiffer, rtol=1e-3)
        rms = np.asarray(self.rms_grid)
        ok = rms > 0
        if not ok.any():
            return 1.0
        d = (self.grid - stiff)[ok] / rms[ok]
        lo, mid, hi = np.quantile(d, [tail, 0.5, 1.0 - tail])
        return float((hi - mid) / (mid - lo)) if mid > lo else 1.0

    def stiffer_grid(self, stiffer: float, rtol: float = 1e-6) -> np.ndarray:
        """The grid of a fit ``stiffer`` times longer to the same cells and weights
        (conjugate gradients stopped at ``rtol``).

        Examples
        --------
        >>> rng = np.random.default_rng(0)
        >>> res = ThinPlateSmoother(smoothing=16.0**4).fit(rng.normal(size=(64, 64)))
        >>> res.stiffer_grid(4.0).shape == res.grid.shape
        True
        """
        weights = self.config._weights(self.cell_pixels)
        if self.cell_weights is not None:
            weights = np.where(weights > 0, self.cell_weights, 0.0)
        values = np.where(weights > 0, self.cell_values, 0.0)
        stiff, _, _ = smooth_grid(
            values,
            weights,
            spacing=self.cell_size,
            smoothing=float(self.smoothing) * stiffer**4,
            offsets=self.cell_offsets,
            rtol=rtol,
        )
        return stiff

    def background_map(self, step: int = 1, window=None) -> np.ndarray:
        """Interpolate the background to full resolution (a new array, not cached), or
        to every ``step``-th pixel along each axis, over ``window`` = ((y0, y1), (x0,
        x1)) if given (see :func:`upsample`)."""
        return upsample(self.grid, self.cell_size, self.shape, self.dtype, step, window=window)

    def rms_map(self, window=None) -> np.ndarray:
        """Interpolate the RMS to full resolution (a new array, not cached), over
        ``window`` if given."""
        return upsample(self.rms_grid, self.cell_size, self.shape, self.dtype, window=window)

    def constant_rms(self) -> float | None:
        """The median of the RMS grid when it varies by less than 5%, else None."""
        g = np.asarray(self.rms_grid)
        g = g[np.isfinite(g)]
        if g.size and g.min() > 0 and g.max() <= 1.05 * g.min():
            return float(np.median(g))
        return None

    def noise_block(self) -> int:
        """Side of the blocks of :meth:`coarse_rms`: the largest power of two <= half
        a cell (1: the cells are too small for blocks)."""
        return pow2_at_most(min(self.cell_size) / 2.0, *self.shape)

    def coarse_rms(self) -> CoarseRMS | None:
        """The RMS at the centres of :meth:`noise_block` blocks (float32, unfloored):
        the noise map is smooth over many cells, so one value per block of half a cell
        loses nothing. None when the cells are too small for blocks."""
        q = self.noise_block()
        if q == 1:
            return None
        values = upsample(self.rms_grid, self.cell_size, self.shape, np.float32, q, (q - 1) / 2.0)
        return CoarseRMS(values=values, step=q, shape=self.shape)

    @cached_property
    def background(self) -> np.ndarray:
        """Full-resolution background (input dtype), computed on first access."""
        return self.background_map()

    @cached_property
    def rms(self) -> np.ndarray:
        """Full-resolution background RMS (pixel noise, input dtype), on first access."""
        return self.rms_map()
