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

Images of varying depth. With pixel weights (an error map), a cell's weight is its
summed inverse variance, and one ``lam`` would make the smoothing length go as
``(lam / weight) ** 0.25``, i.e. as ``sigma ** 0.5``: twice as long where the noise is
4x higher, past the optimum of a smooth sky there. When the cells' depth ``d`` (mean
relative inverse variance of their pixels) varies, the penalty follows it instead:
``lam * d ** p`` where each second difference is taken, so that the length goes as
``d ** ((p - 1) / 4)``, and GCV chooses ``p`` in [0, 1] along with ``lam`` (the log of
the penalty linear in the log of the depth, in the manner of Ruppert & Carroll's
spatially adaptive penalties). The GCV trace then sums each observed node's diagonal
as that of a uniform grid of its own ``lam * d ** p`` and local weight (the
equivalent-kernel view of a spline: its local length is set by the penalty over the
local weight, Silverman 1984).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, ClassVar

import numba
import numpy as np
from scipy import fft, ndimage

from skymap._util import concurrently, pow2_at_most
from skymap._validate import as_image, as_mask, as_pair, check_positive, check_range, combine_masks
from skymap.background import _smooth_kernels as _k
from skymap.background.cells import (
    cell_stats,
    cell_sums,
    merged_sums,
    reference_level,
    reference_step,
    upsample,
    weighted_sums,
)
from skymap.masking.hysteresis import CoarseRMS

__all__ = [
    "SmoothResult",
    "ThinPlateSmoother",
    "cell_sums",
    "depth_grid",
    "merge_cells",
    "smooth_grid",
    "weighted_sums",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- grid maths


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
    """The weighted thin-plate system on one grid, for any smoothing ``lam``.

    With ``penalty`` (a positive per-node field) the penalty is ``lam * penalty`` where
    each second difference is taken, and ``local`` holds each node's local weight: the
    weight a node would have if its neighbourhood were as deep as it is and masked as
    the whole grid, for the trace (see :meth:`trace`)."""

    def __init__(self, weights: np.ndarray, hy: float, hx: float, penalty=None, local=None):
        self.w = weights
        self.hy, self.hx = hy, hx
        self.spec = _spectrum(weights.shape, hy, hx)
        # The preconditioner's cosine transforms run on the grid padded with zeros to
        # lengths of small primes: a DCT of a prime length (83 cells) is 3-4x slower.
        # E' M E with E the zero padding is as symmetric and positive definite as M, so
        # conjugate gradients converge to the same solution.
        self.padded = tuple(fft.next_fast_len(int(n), real=True) for n in weights.shape)
        self.pspec = self.spec if self.padded == weights.shape else _spectrum(self.padded, hy, hx)
        self.wbar = float(weights.mean())
        self.nobs = int(np.count_nonzero(weights))
        self.penalty = penalty
        self.fbar = 1.0
        if penalty is not None:
            f = np.asarray(penalty, dtype=np.float64)
            self._fields = (
                np.ascontiguousarray(f[1:-1, :]),
                np.ascontiguousarray(f[:, 1:-1]),
                0.25 * (f[1:, 1:] + f[1:, :-1] + f[:-1, 1:] + f[:-1, :-1]),
            )
            # The preconditioner's penalty: the field's mean where the data are.
            obs = weights > 0
            self.fbar = float(np.exp(np.mean(np.log(f[obs])))) if obs.any() else 1.0
            self.ratio = f / local
            self._spectrum_counts()

    def _spectrum_counts(self):
        # The cosine spectrum, binned in log for the local traces (< 1e-3 relative).
        s = self.spec.ravel()
        pos = s[s > 0]
        self.n_zero = s.size - pos.size
        edges = np.geomspace(pos.min(), pos.max() * (1 + 1e-12), 513)
        counts, _ = np.histogram(pos, edges)
        keep = counts > 0
        self.s_bins = np.sqrt(edges[:-1] * edges[1:])[keep]
        self.s_counts = counts[keep].astype(np.float64)

    def _scratch(self):
        # Zero-bordered second differences for the gathered operator (see
        # _smooth_kernels.thin_plate_matvec), allocated once per system and thread
        # (the GCV search may solve two smoothings at once).
        buffers = self.__dict__.setdefault("_buffers", {})
        key = threading.get_ident()
        if key not in buffers:
            ny, nx = self.w.shape
            buffers[key] = (
                np.zeros((ny + 2, nx)),
                np.zeros((ny, nx + 2)),
                np.zeros((ny + 1, nx + 1)),
            )
        return buffers[key]

    def matvec(self, z, lam, out) -> float:
        """``out = (W + lam K) z``, the system's matrix applied to ``z``; returns
        ``z . out``. The second differences are scaled to pixel units with the cell
        spacings (times the cell area)."""
        area = self.hy * self.hx
        cyy, cxx = lam * area / self.hy**4, lam * area / self.hx**4
        cxy = 2.0 * lam * area / (self.hy * self.hx) ** 2
        if self.penalty is None:
            return _k.thin_plate_matvec(z, self.w, cyy, cxx, cxy, *self._scratch(), out)
        out = _k.thin_plate_apply_field(z, cyy, cxx, cxy, *self._fields, out)
        out += self.w * z
        return _dot(z, out)

    def solve(self, y, lam, z0=None, *, rtol=1e-6, maxiter=1000):
        w = self.w
        inv = 1.0 / (self.wbar + lam * self.fbar * self.pspec)
        gy, gx = w.shape
        # The transforms run in place on buffers of this solve, the spectrum scaled in
        # place (the same values): no new arrays per iteration, which on threads of a
        # pool would each grow that thread's heap (the driver of a 16384^2 tiled fit
        # solves 512^2 grids there). The result is the buffer: read before the next call.
        if self.padded == w.shape:
            work = np.empty(w.shape)

            def precondition(r):
                work[...] = r
                spec = fft.dctn(work, norm="ortho", overwrite_x=True)
                spec *= inv
                return fft.idctn(spec, norm="ortho", overwrite_x=True)
        else:
            pad = np.zeros(self.padded)
            out = np.empty(w.shape)

            def precondition(r):
                pad[:gy, :gx] = r
                pad[gy:, :] = 0.0
                pad[:gy, gx:] = 0.0
                spec = fft.dctn(pad, norm="ortho", overwrite_x=True)
                spec *= inv
                out[...] = fft.idctn(spec, norm="ortho", overwrite_x=True)[:gy, :gx]
                return out

        ap = np.empty_like(y)
        b = w * y
        z = (precondition(b) if z0 is None else z0).copy()
        self.matvec(z, lam, ap)
        r = b - ap
        p = precondition(r).copy()
        rz = _dot(r, p)
        rr = _dot(r, r)
        bnorm = float(np.sqrt(_dot(b, b))) or 1.0
        iterations = 0
        while iterations < maxiter:
            if np.sqrt(rr) <= rtol * bnorm:
                break
            iterations += 1
            alpha = rz / self.matvec(p, lam, ap)
            rr = _k.cg_step(z, r, p, ap, alpha)
            rz = _k.cg_direction(p, precondition(r), r, rz)
        else:
            log.warning("thin-plate solve did not converge in %d iterations", maxiter)
        return z, iterations

    def local_mean(self, t: np.ndarray, power: int = 1) -> np.ndarray:
        """``mean_k (1 / (1 + t s_k)) ** power`` over the cosine spectrum ``s_k``, for
        each of ``t``: the diagonal of the hat matrix (``power`` 1) of a uniform grid
        whose ``lam / weight`` is ``t``, and the variance factor (``power`` 2)."""
        t = np.asarray(t, dtype=np.float64)
        lo, hi = float(t.min()), float(t.max())
        grid = np.geomspace(lo, hi, 65) if hi > lo * (1 + 1e-9) else np.array([lo])
        h = 1.0 / (1.0 + grid[:, None] * self.s_bins[None, :])
        k = (self.n_zero + (h**power) @ self.s_counts) / self.spec.size
        if grid.size == 1:
            return np.full(t.shape, k[0])
        return np.interp(np.log(t), np.log(grid), k)

    def trace(self, lam: float) -> float:
        """Approximate trace of the hat matrix over the observed cells.

        With one penalty, from the cosine spectrum with the mean weight. With a penalty
        field, each observed node's diagonal is taken as that of a uniform grid with
        its own ``lam * penalty / local weight`` (the equivalent-kernel approximation:
        a node's fit depends on its neighbourhood's noise and penalty)."""
        if self.penalty is None:
            full = float(np.sum(self.wbar / (self.wbar + lam * self.spec)))
            return full * self.nobs / self.w.size
        obs = self.w > 0
        return float(np.sum(self.local_mean(lam * self.ratio[obs])))

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
    penalty=None,
    local_weights=None,
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
    penalty : ndarray (gy, gx) or None
        A positive field multiplying ``smoothing`` node by node (a penalty that varies
        across the grid: ``depth ** p`` of :func:`depth_grid`); None: one penalty
        everywhere.
    local_weights : ndarray (gy, gx) or None
        With ``penalty``: each node's local weight for the GCV trace (the mean weight
        times the node's depth).

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
    z, lam, scores, _ = _smooth(
        values,
        weights,
        spacing=spacing,
        smoothing=smoothing,
        smoothing_range=smoothing_range,
        smoothing_start=smoothing_start,
        smoothing_step=smoothing_step,
        gcv_inflation=gcv_inflation,
        offsets=offsets,
        rtol=rtol,
        penalty=penalty,
        local_weights=local_weights,
    )
    return z, lam, scores


def _smooth(values, weights, *, spacing, smoothing, smoothing_range, smoothing_start,
            smoothing_step, gcv_inflation, offsets, rtol, penalty, local_weights,
            alongside=None):  # fmt: skip
    """:func:`smooth_grid`, and ``alongside(lam)`` (None: not called, None returned)
    once GCV has chosen ``lam``: it runs beside the chosen fit's last solves
    (:func:`skymap._util.concurrently`), for a caller with a solve of its own that
    needs only ``lam``."""
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
    if penalty is not None:
        for name, f in (("penalty", penalty), ("local_weights", local_weights)):
            f = None if f is None else np.asarray(f, dtype=np.float64)
            if f is None or f.shape != y.shape or not (np.all(np.isfinite(f)) and f.min() > 0):
                raise ValueError(
                    f"{name} must be a positive, finite field of the grid's shape {y.shape} "
                    "when penalty is given"
                )
    system = _System(w, hy, hx, penalty, local_weights)
    scores: dict[float, float] = {}
    if smoothing is None:
        lam, chosen = _gcv_search(
            system, y, smoothing_range, smoothing_start, smoothing_step, gcv_inflation, scores
        )
    else:
        lam, chosen = float(smoothing), None

    def finish():
        # The chosen smoothing's search solve, polished (it was solved loosely).
        if chosen is not None:
            z, _ = system.solve(y, lam, chosen)
        else:
            z, _ = system.solve(y, lam, rtol=rtol)
        if offsets is not None:
            gy_, gx_ = np.gradient(z, hy, hx) if min(z.shape) > 1 else (np.zeros_like(z),) * 2
            dy, dx = (np.where(bad, 0.0, np.asarray(o, dtype=np.float64)) for o in offsets)
            z, _ = system.solve(y - gy_ * dy - gx_ * dx, lam, z, rtol=rtol)
        return z

    if alongside is None:
        z, extra = finish(), None
    else:
        extra, z = concurrently(functools.partial(alongside, lam), finish)
    return z + ref, lam, scores, extra


def _gcv_search(
    system: _System, y, smoothing_range, start, step, inflation, scores, *, keep_all=False
):
    """Minimise GCV over log10(lam): with ``step >= 1`` scan the range by decades from
    the stiff end, otherwise walk downhill from ``start`` by ``step``; then refine by
    halving the step down to an eighth of a decade. Each solve warm-starts from its
    neighbour. Returns the chosen ``lam`` and its (loose) search solution.
    ``keep_all`` keeps every solution, not only those a later solve may start from
    (the same result: for tests)."""
    lo, hi = (np.log10(float(v)) for v in smoothing_range)
    solutions: dict[float, np.ndarray] = {}
    # Solves made ahead of their turn (prefetch), with the start each was made from.
    ahead: dict[float, tuple] = {}

    def nearest(loglam):
        return min(solutions, key=lambda k: abs(np.log10(k) - loglam)) if solutions else None

    def solve(lam, near):
        # GCV compares fits that differ by far more than 1e-4: the search solves
        # loosely, and only the chosen fit is polished below.
        z, _ = system.solve(y, lam, solutions.get(near), rtol=1e-4)
        return z, system.gcv(y, z, lam, inflation)

    def score(loglam):
        loglam = float(np.clip(loglam, lo, hi))
        lam = 10.0**loglam
        if lam not in scores:
            near = nearest(loglam)
            made = ahead.pop(lam, None)
            # A solve made ahead is the one made now if it started from the same
            # solution (a solve depends on nothing else).
            z, gcv = made[1:] if made is not None and made[0] == near else solve(lam, near)
            solutions[lam] = z
            scores[lam] = gcv
        return scores[lam], loglam

    def forget(centre, last=np.inf):
        """Drop the solutions no later solve can start from. Every later query lies
        within a step of a centre the search can still reach: this one, or, scanning
        from rough to smooth, one past ``last``, the latest query (a walk's centre
        moves on from this one, and a refinement's stays within a step of it). It
        starts from the nearest solution, no farther than a step (its centre). So a
        solution more than two steps from all of them is never that nearest: the
        starts, and so the scores, are those of keeping every solution (on a 16384^2
        tiled fit's 512^2 cells, 2 MB each, up to ~30 a search)."""
        if keep_all:
            return
        for k in [k for k in solutions if k != 10.0**centre]:
            v = np.log10(k)
            if abs(v - centre) > 2.0 * step and v < last - 2.0 * step:
                del solutions[k]

    def prefetch(first, second):
        """Solve two smoothings that the search may score next side by side (numba
        threads > 1), each from the solution :func:`score` would start it from: the
        nearest solved, when the other is farther from it than that (otherwise the
        second waits for its turn)."""
        if numba.get_num_threads() < 2:
            return
        todo = []
        for v in (first, second):
            v = float(np.clip(v, lo, hi))
            lam = 10.0**v
            if lam in scores or lam in ahead or any(lam == t[0] for t in todo):
                return
            todo.append((lam, v, nearest(v)))
        (la, va, na), (lb, vb, nb) = todo
        if na is None or nb is None or abs(np.log10(la) - vb) <= abs(np.log10(nb) - vb):
            return
        a, b = concurrently(functools.partial(solve, la, na), functools.partial(solve, lb, nb))
        ahead[la], ahead[lb] = (na, *a), (nb, *b)

    if step >= 1.0:
        # Cold start: scan the decades below the stiff end (``hi - k step``, and the
        # rough end ``lo``) from rough to smooth. GCV is flat over the over-smoothed
        # plateau, so a downhill walk from a too-stiff start can stall there; the scan
        # stops two decades past the best once GCV has clearly risen (5%), or has risen
        # at every decade since the best: past its minimum, over-smoothing adds bias
        # that grows with the smoothing, and GCV climbs steadily towards the plateau
        # (noise on a flat plateau goes up and down). From the rough end it meets the
        # minimum before the plateau, and skips the stiff solves, the slowest to
        # converge (the same decades as a scan from the stiff end: the same choice
        # unless GCV, after rising two decades in a row or by 5%, falls below its
        # best again).
        grid, v = [hi], hi
        while v > lo:
            v -= step
            grid.append(max(v, lo))
        centre, best = None, np.inf
        last, rising = np.inf, False
        for v in dict.fromkeys(reversed(grid)):
            s, v = score(v)
            if s <= best:
                best, centre, rising = s, v, True
            else:
                rising = rising and s > last
                if v >= centre + 2.0 and (s > 1.05 * best or rising):
                    break
            last = s
            forget(centre, v)
    else:
        centre = float(np.clip(np.log10(start), lo, hi))
        best, centre = score(centre)
        # The first step either way, side by side: the walk takes the second unless
        # the first goes downhill (then it is dropped unused).
        prefetch(centre + step, centre - step)
        for direction in (step, -step):
            while True:
                s, v = score(centre + direction)
                if s >= best or v == centre:
                    break
                best, centre = s, v
                forget(centre)
    fine = step / 2.0
    while fine >= 0.125 - 1e-12:
        prefetch(centre - fine, centre + fine)
        for v in (centre - fine, centre + fine):
            s, v = score(v)
            if s < best:
                best, centre = s, v
        forget(centre)
        fine /= 2.0
    lam = 10.0**centre
    return lam, solutions[lam]


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
    Silverman, B. W. 1984, Ann. Stat. 12, 898 (the equivalent variable kernel of a
    spline), https://doi.org/10.1214/aos/1176346710.
    Ruppert, D. & Carroll, R. J. 2000, Aust. N. Z. J. Stat. 42, 205 (spatially
    adaptive penalties chosen by GCV), https://doi.org/10.1111/1467-842X.00119.

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
        Where the weights' depth varies across the image (the cells' 95th percentile
        over their 5th above :data:`DEPTH_SPREAD`) and ``smoothing`` is chosen by GCV,
        the penalty follows the depth (the module's notes, :func:`depth_grid`): with a
        right half 4x noisier, 14 scenes of ``benchmarks/bench_depth.py``, the noisy
        half's error is 0.0198 sigma against 0.0242 unweighted and 0.0274 with one
        penalty, the deep half's 0.0294 against 0.0773 and 0.0304
        (``benchmarks/README.md``, "varying depth"). A uniform weight map, or none,
        keeps one penalty.

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
        for binned in self.cell_sequence(shape):
            grid_sums, cells = sums(binned), binned
            factor = self.coarsening(binned, shape, min_smoothing)
            if factor > 1:
                cells = (binned[0] * factor, binned[1] * factor)
                grid_sums = merged_sums(grid_sums, factor)
            fitted = self._fit_grid(grid_sums, shape, cells, ref, smoothing_start, min_smoothing)
            # Automatic cells: when GCV wants a smoothing below the cell size, the grid
            # is too coarse for this sky; refit on the next, finer cells.
            if not fitted[-1]:
                break
            smoothing_start = fitted[1]
        z, lam, scores, n, mean, var, offsets, w, penalty, zvar, _ = fitted
        cy, cx = cells
        vw = _variance_weights(n, var)
        if zvar is None:
            zvar = self._variance(n, var, cells, lam)
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
            error=_statistical_error(
                np.where(n >= self.min_pixels, w, 0.0), lam, (cy, cx), penalty
            ),
            cell_offsets=offsets,
            cell_weights=None if w is n else w,
            penalty=penalty,
            binned_cells=binned,
        )

    def coarsening(self, cells, shape, min_smoothing: float | None) -> int:
        """Factor by which the fit merges ``cells`` (blocks of cells summed,
        :func:`~skymap.background.cells.merged_sums`) when the smoothing may not go
        below ``min_smoothing``.

        A fit held at or above a length ``L`` needs no cells finer than ``L /``
        :data:`CELLS_PER_LENGTH` (4): merging up to that changes nothing that matters.
        The automatic cells of a small image are small (a fixed ~1e4-cell grid, most of
        its CPU time: ``benchmarks/README.md``, "small-frame speed"), so cells below
        :data:`COST_CELL` (8 px, what a 1024^2 frame gets) are also merged towards it
        while ``L`` stays at least two cells, the ratio at which the default already
        fits 1024^2 frames (0.002 sigma from a fine grid), and while 32 cells remain
        across the shorter side. Automatic cells only, GCV only (1 otherwise), never
        coarser than the 32 px of :meth:`cells_for` nor fewer than 16 cells across the
        shorter side.

        Examples
        --------
        >>> tps = ThinPlateSmoother()
        >>> tps.cells_for((300, 300)), tps.coarsening((3, 3), (300, 300), 28.0**4)
        ((3, 3), 3)
        >>> tps.coarsening((8, 8), (1000, 1000), 28.0**4), tps.coarsening((3, 3), (300, 300), None)
        (1, 1)
        """
        if self.cell_size is not None or self.smoothing is not None or not min_smoothing:
            return 1
        c = max(cells)
        length = float(min_smoothing) ** 0.25
        fine = int(length // (CELLS_PER_LENGTH * c))
        # ... and on a grid still 32 cells across (smaller ones cost nothing anyway)
        cost = min(-(-COST_CELL // c), int(length // (2 * c)), int(min(shape) // (32 * c)))
        factor = min(max(fine, cost), 32 // c, int(min(shape) // (16 * c)))
        return max(1, factor)

    def _weights(self, n: np.ndarray) -> np.ndarray:
        return np.where(n >= self.min_pixels, n, 0.0)

    def _protect(self, mean, weights, fit, hi, n, var, depth, grid):
        """Stiffen by eighth decades until the residual is white at ``protect_scale``.

        With a penalty that follows the depth (``penalty`` = (field, local weights,
        power)), the test allows for the scatter of its own statistic: the smoothing
        is raised only while the whiteness is below ``protect_level`` by more than two
        of its standard errors, ``1 / sqrt(2 N)``, ``N`` the effective number of blocks
        (the blocks weighted by their noise variance, as the statistic weights them).
        At one level the guard is stricter on the weighted fit than on an unweighted
        one of the same image: the unweighted fit's deep parts, smoothed too long,
        leave sky in their residual and pass the test for the noisy parts
        (``benchmarks/README.md``, "varying depth")."""
        z, lam, penalty = fit
        cells = grid["spacing"]
        level = self.protect_level
        if penalty is None:
            while lam < hi and _whiteness(mean, z, n, var, cells, self.protect_scale) < level:
                lam *= 10.0**0.125
                z, _, _ = smooth_grid(mean, weights, smoothing=lam, **grid)
            return z, lam, None
        field, local, power = penalty
        blocks = _effective_blocks(n, 1.0 / depth, cells, self.protect_scale)
        level -= 2.0 / np.sqrt(2.0 * blocks)
        obs = weights > 0
        shallow, deep = np.quantile(depth[obs], [0.05, 0.95])
        # The power step that stiffens the shallow end by an eighth decade.
        step = 0.125 * np.log(10.0) / np.log(deep / shallow)
        while lam < hi and _whiteness(mean, z, n, var, cells, self.protect_scale) < level:
            if power > 0:
                new = max(0.0, power - step)
                lam *= deep ** (power - new)
                power = new
                field = depth**power
            else:
                lam *= 10.0**0.125
            z, _, _ = smooth_grid(
                mean, weights, smoothing=lam, penalty=field, local_weights=local, **grid
            )
        return z, lam, (field, local, power)

    def _variance(self, n, var, cells, lam):
        """The cells' pixel variance ``var`` smoothed for the noise map: weighted by
        their degrees of freedom, ``rms_smoothing_factor`` times stiffer than the
        background's ``lam``."""
        vw = _variance_weights(n, var)
        if np.any(vw > 0):
            zvar, _, _ = smooth_grid(
                var, vw, spacing=cells, smoothing=lam * self.rms_smoothing_factor
            )
            return zvar
        return np.full(var.shape, float(np.nanmean(var)) if np.isfinite(var).any() else 0.0)

    def _fit_grid(self, sums, shape, cells, ref, smoothing_start, min_smoothing=None):
        """Smooth the cell grid of ``sums``; also says whether GCV hit the cell-size
        floor. When GCV's choice is the smoothing used (no depth-following penalty,
        no ``protect_scale``), the noise map's variance grid is smoothed beside the
        fit's last solves (:meth:`_variance`; None otherwise)."""
        cy, cx = cells
        lo, hi = self.smoothing_range
        n, mean, var, dy, dx, w = cell_stats(sums, cy, cx, ref)
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
        search = {
            "smoothing_range": (lo, max(hi, lo)),
            "smoothing_start": start,
            "smoothing_step": 1.0 if smoothing_start is None else 0.25,
            "gcv_inflation": self.gcv_inflation,
        }
        depth = None if self.smoothing is not None or w is n else depth_grid(n, w, weights)

        def at_floor(lam):
            # GCV wants a smoothing below the cells: the caller refits on finer ones
            return self.smoothing is None and lam <= floor * 10.0**0.2

        zvar = None
        if depth is None:
            alongside = None
            if (
                self.smoothing is None
                and self.protect_scale is None
                and numba.get_num_threads() > 1
            ):

                def alongside(lam):
                    return None if at_floor(lam) else self._variance(n, var, cells, lam)

            z, lam, scores, zvar = _smooth(mean, weights, smoothing=self.smoothing, **search,
                                           **grid, rtol=1e-6, penalty=None, local_weights=None,
                                           alongside=alongside)  # fmt: skip
            penalty = None
        else:
            z, lam, scores, penalty, power = _depth_search(mean, weights, depth, search, grid)
            penalty = (*penalty, power)
        floored = at_floor(lam)
        if self.smoothing is None and self.protect_scale is not None:
            # Stiffen until the residual is white at the protected scale.
            fit = (z, lam, penalty)
            z, lam, penalty = self._protect(mean, weights, fit, hi, n, var, depth, grid)
        return z, lam, scores, n, mean, var, (dy, dx), w, penalty, zvar, floored


#: Cells per smoothing length below which :meth:`ThinPlateSmoother.coarsening` does
#: not merge cells: a thin-plate fit of length ``L`` passes wavelengths above
#: ``2 pi L``, so that is over 25 cells per passed wavelength.
CELLS_PER_LENGTH = 4
#: Cell side (px) towards which :meth:`ThinPlateSmoother.coarsening` merges smaller
#: cells while the smoothing length stays two cells or more.
COST_CELL = 8

#: Depth spread (ratio of the 95th to the 5th percentile of the cells' mean inverse
#: variance) below which a weighted fit keeps one penalty for the grid.
DEPTH_SPREAD = 1.2
#: Powers of the depth that the penalty field may follow (0: one penalty).
DEPTH_POWERS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _variance_weights(n, var) -> np.ndarray:
    """The cells' weights in the noise map's variance fit: their degrees of freedom
    (0 for cells with fewer than two pixels or no finite variance)."""
    return np.where((n >= 2) & np.isfinite(var), n - 1.0, 0.0)


def depth_grid(n, w, weights) -> np.ndarray | None:
    """Each cell's depth, the mean relative inverse variance of its pixels ``w / n``
    (cells without pixels take their nearest cell's), over its mean over the pixels of
    the weighted cells; None when it varies by less than :data:`DEPTH_SPREAD`.

    ``n`` are the cells' pixel counts, ``w`` their summed pixel weights and ``weights``
    the smoother's cell weights (0: not used).

    Examples
    --------
    >>> n = np.full((2, 4), 16.0)
    >>> w = n * np.array([1.0, 1.0, 1 / 16, 1 / 16])  # right half 4x noisier
    >>> depth_grid(n, w, w).round(3)
    array([[1.882, 1.882, 0.118, 0.118],
           [1.882, 1.882, 0.118, 0.118]])
    >>> depth_grid(n, n, n) is None
    True
    """
    has = n > 0
    obs = weights > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(has, w / n, np.nan)
    ok = has & np.isfinite(d) & (d > 0)
    if not ok.any():
        return None
    lo, hi = np.quantile(d[ok & obs] if (ok & obs).any() else d[ok], [0.05, 0.95])
    if not hi > DEPTH_SPREAD * lo:
        return None
    if not ok.all():
        idx = ndimage.distance_transform_edt(~ok, return_distances=False, return_indices=True)
        d = d[tuple(idx)]
    return d / (float(np.sum(w[obs])) / float(np.sum(n[obs])))


def _depth_search(mean, weights, depth, search, grid):
    """GCV over the smoothing and the power of the depth that the penalty follows.

    The penalty at a cell of depth ``d`` (relative inverse variance) is
    ``lam * d ** p``, so the smoothing length there goes as ``d ** ((p - 1) / 4)``:
    ``p = 0`` is the generalised-least-squares fit (length as ``sigma ** 0.5``),
    ``p = 1`` one length everywhere. Each power of :data:`DEPTH_POWERS` gets its own
    GCV search of ``lam``; the lowest GCV wins."""
    wbar = float(np.mean(weights))
    local = wbar * depth
    best = None
    search = dict(search)
    for power in DEPTH_POWERS:
        field = depth**power
        z, lam, scores = smooth_grid(
            mean, weights, penalty=field, local_weights=local, **search, **grid
        )
        score = scores.get(lam, np.inf)
        log.debug("depth power %.2f: smoothing %.4g, GCV %.6g", power, lam, score)
        if best is None or score < best[0]:
            best = (score, z, lam, scores, (field, local), power)
        # The next power starts from this one's smoothing.
        search["smoothing_start"], search["smoothing_step"] = lam, 0.25
    score, z, lam, scores, penalty, power = best
    log.debug("depth power %.2f chosen", power)
    return z, lam, scores, penalty, power


def _statistical_error(weights, lam, cells, penalty=None) -> float:
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
    if penalty is not None:
        # With a penalty field, each node as a uniform grid of its own local weight.
        field, local = penalty[0], penalty[1]
        system = _System(weights, *cells, field, local)
        factor = system.local_mean(lam * system.ratio, power=2)
        return float(np.sqrt(np.mean(factor / local)))
    h = wbar / (wbar + lam * _spectrum(weights.shape, *cells))
    return float(np.sqrt(np.sum(h * h) / (weights.size * wbar)))


def _field_args(penalty) -> dict:
    """:func:`smooth_grid`'s keywords for a fit's ``penalty`` (field, local weights,
    power)."""
    return {"penalty": penalty[0], "local_weights": penalty[1]}


def merge_cells(values, weights, offsets, cells, factor: int):
    """Blocks of ``factor`` x ``factor`` cells merged into one: the weighted mean of
    their values, their summed weight, and the offsets of their weighted centroid from
    the merged cell's centre (what binning at the merged size gives when the weights
    are pixel counts, up to rounding). Missing cells (weight 0) take no part.

    Examples
    --------
    >>> v, w = np.arange(16.0).reshape(4, 4), np.ones((4, 4))
    >>> zero = (np.zeros((4, 4)), np.zeros((4, 4)))
    >>> mv, mw, (dy, dx) = merge_cells(v, w, zero, (2, 2), 2)
    >>> mv, mw, dy
    (array([[ 2.5,  4.5],
           [10.5, 12.5]]), array([[4., 4.],
           [4., 4.]]), array([[0., 0.],
           [0., 0.]]))
    """
    w = np.where(weights > 0, weights, 0.0)
    cy, cx = cells
    gy, gx = w.shape
    iy = np.arange(gy)[:, None] * cy + (cy - 1) / 2.0
    ix = np.arange(gx)[None, :] * cx + (cx - 1) / 2.0
    dy, dx = (
        np.where(w > 0, np.nan_to_num(np.asarray(o, dtype=np.float64)), 0.0) for o in offsets
    )
    sw, sv, sy, sx = merged_sums(
        np.stack([w, w * np.where(w > 0, values, 0.0), w * (iy + dy), w * (ix + dx)]), factor
    )
    my, mx = sw.shape
    cy2, cx2 = cy * factor, cx * factor
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(sw > 0, sv / sw, 0.0)
        ody = np.where(sw > 0, sy / sw - (np.arange(my)[:, None] * cy2 + (cy2 - 1) / 2.0), 0.0)
        odx = np.where(sw > 0, sx / sw - (np.arange(mx)[None, :] * cx2 + (cx2 - 1) / 2.0), 0.0)
    return mean, sw, (ody, odx)


def _effective_blocks(n, noise_var, cells, width) -> float:
    """The effective number of the complete blocks :func:`_whiteness` reads, each
    weighted by its mean ``noise_var`` (per cell): ``(sum v) ** 2 / sum v ** 2``."""
    cy, cx = cells
    ky, kx = max(1, round(width / cy)), max(1, round(width / cx))
    gy, gx = (n.shape[0] // ky) * ky, (n.shape[1] // kx) * kx
    if gy == 0 or gx == 0:
        return 1.0
    full = (n >= cy * cx)[:gy, :gx].reshape(gy // ky, ky, gx // kx, kx).all(axis=(1, 3))
    v = noise_var[:gy, :gx].reshape(gy // ky, ky, gx // kx, kx).mean(axis=(1, 3))[full]
    return float(v.sum() ** 2 / np.sum(v**2)) if v.size else 1.0


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
    error (from the pixel noise alone), in units of the pixel RMS. ``penalty`` is None
    (one penalty, ``smoothing``) or, for a weighted fit of varying depth, the field the
    penalty followed: (``depth ** power`` per cell, the cells' local weights, power);
    ``smoothing`` is then the penalty at the mean depth. ``binned_cells`` is the cell
    size the image was binned to: ``cell_size`` itself, or smaller when the fit merged
    blocks of those cells into its ``cell_size`` (:meth:`ThinPlateSmoother.coarsening`);
    None for a result made without it (read as ``cell_size``).
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
    penalty: tuple | None = field(default=None, repr=False)
    binned_cells: tuple[int, int] | None = field(default=None, repr=False)
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

    def stiffer_grid(self, stiffer: float, rtol: float = 1e-6, merge: bool = True) -> np.ndarray:
        """The grid of a fit ``stiffer`` times longer to the same cells and weights
        (conjugate gradients stopped at ``rtol``).

        With ``merge`` (and one penalty) the longer fit is solved on blocks of cells
        (:func:`merge_cells`; at least :data:`CELLS_PER_LENGTH` of them per its length
        and 16 across the shorter side) and interpolated back to this grid: its cost is
        that of a grid up to ``stiffer ** 2`` times smaller, and on 1e4-cell grids it
        was a fifth of a small frame's fit (``benchmarks/README.md``, "small-frame
        speed").

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
        lam = float(self.smoothing) * stiffer**4
        cells, offsets = self.cell_size, self.cell_offsets
        factor = 1
        if merge and self.penalty is None:
            c = max(cells)
            factor = int(lam**0.25 // (CELLS_PER_LENGTH * c))
            factor = max(1, min(factor, min(values.shape) // 16))
        if factor > 1:
            values, weights, offsets = merge_cells(values, weights, offsets, cells, factor)
            cells = (cells[0] * factor, cells[1] * factor)
        stiff, _, _ = smooth_grid(
            values,
            weights,
            spacing=cells,
            smoothing=lam,
            offsets=offsets,
            rtol=rtol,
            **({} if self.penalty is None else _field_args(self.penalty)),
        )
        if factor > 1:
            # node k of the merged grid sits at node k f + (f - 1) / 2 of this one
            stiff = upsample(stiff, factor, self.grid.shape)
        return stiff

    def maps_only(self) -> SmoothResult:
        """This model without its per-cell data (values, counts, offsets, weights, the
        penalty field, the GCV scores): all that :meth:`background_map` and
        :meth:`rms_map` read, a fifth of the bytes, for the tasks of a tiled fit (a
        model in a graph is held by the scheduler as long as the tasks are).

        Examples
        --------
        >>> res = ThinPlateSmoother().fit(np.random.default_rng(0).normal(size=(64, 64)))
        >>> slim = res.maps_only()
        >>> slim.cell_pixels is None, bool(np.array_equal(slim.background_map(), res.background))
        (True, True)
        """
        return replace(
            self, cell_values=None, cell_pixels=None, cell_offsets=(), cell_weights=None,
            penalty=None, gcv={},
        )  # fmt: skip

    def background_map(self, step: int = 1, window=None, out=None) -> np.ndarray:
        """Interpolate the background to full resolution (a new array, not cached, or
        ``out``), or to every ``step``-th pixel along each axis, over ``window`` =
        ((y0, y1), (x0, x1)) if given (see :func:`upsample`)."""
        return upsample(
            self.grid, self.cell_size, self.shape, self.dtype, step, window=window, out=out
        )

    def residual_map(self, image: np.ndarray, step: int = 1, out=None, window=None) -> np.ndarray:
        """``image - background_map(step, window)`` in one pass, into ``out`` if given
        (an array of that map's shape and the model's dtype; it may be ``image``
        itself): the map's values are rounded to the model's dtype first, so the result
        is numpy's difference bit for bit where ``image`` has that dtype. ``image`` is
        the window's pixels when ``window`` = ((y0, y1), (x0, x1)) is given (a tile)."""
        return upsample(
            self.grid, self.cell_size, self.shape, self.dtype, step, window=window, out=out,
            subtract_from=image,
        )  # fmt: skip

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
        a cell as binned (``binned_cells``, before any :meth:`~ThinPlateSmoother.coarsening`,
        so that tiles stay aligned to the blocks), 1 when the cells are too small for
        blocks."""
        cells = self.cell_size if self.binned_cells is None else self.binned_cells
        return pow2_at_most(min(cells) / 2.0, *self.shape)

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
