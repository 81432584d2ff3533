"""The thin-plate smoother (skymap.background.smooth) against independent references:
a sparse direct solve of the penalty's definition (scipy), the exact dense GCV, weighted
least squares (scipy) in the stiff limit, numpy block sums, and analytic planes."""

import numpy as np
import pytest
from scipy import linalg, sparse
from scipy.sparse.linalg import spsolve

from skymap.background.cells import merged_sums, valid_counts
from skymap.background.smooth import (
    ThinPlateSmoother,
    _gcv_search,
    _System,
    cell_sums,
    depth_grid,
    smooth_grid,
)


def _penalty(gy, gx, hy, hx, field=None):
    """The discrete thin-plate energy, built from its definition (natural boundaries:
    second differences only where they fit), times the cell area; with ``field``, each
    second difference weighted by the field where it is taken (the middle node; the
    mean of the four corners for the cross term)."""

    def d2(n):
        return sparse.diags([1.0, -2.0, 1.0], [0, 1, 2], shape=(n - 2, n), dtype=float)

    def d1(n):
        return sparse.diags([-1.0, 1.0], [0, 1], shape=(n - 1, n), dtype=float)

    f = np.ones((gy, gx)) if field is None else field
    fyy = sparse.diags(f[1:-1, :].ravel())
    fxx = sparse.diags(f[:, 1:-1].ravel())
    fxy = sparse.diags((0.25 * (f[1:, 1:] + f[1:, :-1] + f[:-1, 1:] + f[:-1, :-1])).ravel())
    iy, ix = sparse.eye(gy), sparse.eye(gx)
    dyy = sparse.kron(d2(gy), ix) / hy**2
    dxx = sparse.kron(iy, d2(gx)) / hx**2
    dxy = sparse.kron(d1(gy), d1(gx)) / (hy * hx)
    return hy * hx * (dyy.T @ fyy @ dyy + 2.0 * dxy.T @ fxy @ dxy + dxx.T @ fxx @ dxx)


def _direct(y, w, lam, hy, hx):
    p = _penalty(*y.shape, hy, hx)
    wd = sparse.diags(w.ravel())
    return spsolve((wd + lam * p).tocsc(), wd @ y.ravel()).reshape(y.shape)


@pytest.mark.parametrize("lam", [1.0, 3e3, 1e7])
def test_solution_equals_a_sparse_direct_solve_of_the_definition(lam):
    rng = np.random.default_rng(1)
    y = rng.normal(size=(12, 17))
    w = rng.uniform(0.5, 2.0, size=y.shape)
    w[3:6, 4:9] = 0.0  # a masked hole, bridged by the penalty alone
    z, used, scores = smooth_grid(y, w, spacing=(4.0, 3.0), smoothing=lam, rtol=1e-13)
    assert used == lam and scores == {}
    np.testing.assert_allclose(z, _direct(y, w, lam, 4.0, 3.0), rtol=0, atol=1e-9)


def test_values_of_missing_nodes_never_matter():
    rng = np.random.default_rng(2)
    y = rng.normal(size=(10, 14))
    w = np.ones_like(y)
    w[2:5, 3:7] = 0.0
    other = y.copy()
    other[2:5, 3:7] = 1e30
    a = smooth_grid(y, w, smoothing=50.0, rtol=1e-12)[0]
    b = smooth_grid(other, w, smoothing=50.0, rtol=1e-12)[0]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("lam", [1e-1, 1e4, 1e10])
def test_a_plane_passes_through_unchanged_at_any_smoothing(lam):
    yy, xx = np.mgrid[:15, :21]
    plane = 3.0 - 0.7 * yy + 0.25 * xx
    w = np.ones(plane.shape)
    w[4:9, 5:12] = 0.0
    z = smooth_grid(plane, w, spacing=(2.0, 2.0), smoothing=lam, rtol=1e-12)[0]
    np.testing.assert_allclose(z, plane, rtol=0, atol=1e-8)


def test_the_stiff_limit_is_the_weighted_least_squares_plane():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:16, :20].astype(float)
    y = np.sin(yy / 3.0) + np.cos(xx / 5.0) + rng.normal(0, 0.1, yy.shape)
    w = rng.uniform(0.2, 3.0, size=y.shape)
    z = smooth_grid(y, w, smoothing=1e16, rtol=1e-14)[0]
    a = np.column_stack([np.ones(y.size), yy.ravel(), xx.ravel()])
    sw = np.sqrt(w.ravel())
    coef = linalg.lstsq(a * sw[:, None], y.ravel() * sw)[0]
    np.testing.assert_allclose(z.ravel(), a @ coef, rtol=0, atol=1e-5)


def test_gcv_chooses_near_the_exact_dense_gcv_minimum():
    """With equal weights GCV's trace approximation is close to exact: the choice lies
    within half a decade of the minimum of the exact GCV (dense hat matrix)."""
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[:14, :18].astype(float)
    truth = np.sin(yy / 4.0) * np.cos(xx / 6.0)
    y = truth + rng.normal(0, 0.3, truth.shape)
    w = np.ones_like(y)
    _, lam, _ = smooth_grid(y, w, smoothing_range=(1e-2, 1e8))
    # Equal unit weights: hat = (I + lam P)^-1 = V diag(1 / (1 + lam e)) V^T.
    e, v = np.linalg.eigh(_penalty(*y.shape, 1.0, 1.0).toarray())
    coef = v.T @ y.ravel()
    n = y.size
    best, best_v = None, np.inf
    for loglam in np.arange(-2.0, 8.0 + 1e-9, 0.125):
        shrink = 1.0 / (1.0 + 10.0**loglam * e)
        rss = np.sum(((1.0 - shrink) * coef) ** 2)
        score = n * rss / (n - shrink.sum()) ** 2
        if score < best_v:
            best, best_v = loglam, score
    assert abs(np.log10(lam) - best) <= 0.5


def test_cell_sums_equal_numpy_block_sums_with_a_mask_and_ragged_edges():
    rng = np.random.default_rng(5)
    img = rng.normal(10.0, 2.0, size=(23, 30))
    bad = rng.random(img.shape) < 0.2
    ref = 10.0
    sums = cell_sums(img, bad, (4, 7), ref)
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    good = ~bad
    for i in range(sums.shape[1]):
        for j in range(sums.shape[2]):
            sl = np.s_[4 * i : 4 * i + 4, 7 * j : 7 * j + 7]
            g = good[sl]
            d = img[sl][g] - ref
            expect = [g.sum(), d.sum(), (d**2).sum(), yy[sl][g].sum(), xx[sl][g].sum()]
            np.testing.assert_allclose(sums[:, i, j], expect, rtol=1e-12, atol=1e-9)


def test_cell_sums_add_each_column_row_by_row_then_the_columns_bit_for_bit():
    # the order the tiles share: each column over a cell row's pixel rows in row order
    # (four at a time in the kernel), then each cell's columns in x order; bad pixels
    # may be NaN
    rng = np.random.default_rng(6)
    img = rng.normal(10.0, 2.0, size=(39, 30)) * 10.0 ** rng.uniform(-3, 3, (39, 30))
    bad = rng.random(img.shape) < 0.2
    img[bad & (rng.random(img.shape) < 0.5)] = np.nan
    for cy, cx in ((4, 7), (3, 5), (5, 4), (9, 2), (1, 1)):
        got = cell_sums(img, bad, (cy, cx), 10.0)
        gy, gx = got.shape[1:]
        want = np.zeros((2, gy, gx))
        for i in range(gy):
            cols = np.zeros((2, img.shape[1]))
            for y in range(i * cy, min(img.shape[0], (i + 1) * cy)):
                v = np.where(bad[y], 0.0, img[y] - 10.0)
                cols[0] = cols[0] + v
                cols[1] = cols[1] + v * v
            for x in range(img.shape[1]):
                want[:, i, x // cx] = want[:, i, x // cx] + cols[:, x]
        np.testing.assert_array_equal(got[1:3], want)


@pytest.mark.parametrize("shape", [(1, 9), (2, 7), (3, 3), (5, 4), (9, 13)])
def test_the_gathered_operator_equals_the_sparse_definition(shape):
    # The CG's matrix (W + lam K) z, its curvature z . (W + lam K) z, on grids down to
    # one row (no second difference fits: the penalty is zero there).
    rng = np.random.default_rng(11)
    z, w = rng.normal(size=shape), rng.uniform(0.0, 3.0, shape)
    system = _System(w, 2.0, 3.0)
    out = np.empty(shape)
    curv = system.matvec(z, 7.0, out)
    # The penalty from dense difference matrices (np.diff has no row for a short axis).
    ny, nx = shape
    iy, ix = np.eye(ny), np.eye(nx)
    dyy = np.kron(np.diff(iy, 2, axis=0), ix) / 4.0
    dxx = np.kron(iy, np.diff(ix, 2, axis=0)) / 9.0
    dxy = np.kron(np.diff(iy, 1, axis=0), np.diff(ix, 1, axis=0)) / 6.0
    pen = 6.0 * (dyy.T @ dyy + dxx.T @ dxx + 2.0 * dxy.T @ dxy)
    expect = w.ravel() * z.ravel() + 7.0 * (pen @ z.ravel())
    np.testing.assert_allclose(out.ravel(), expect, rtol=1e-12, atol=1e-12)
    assert curv == pytest.approx(float(z.ravel() @ expect), rel=1e-12)


def test_a_padded_preconditioner_leaves_the_solution_that_of_the_definition():
    # Grids of prime lengths precondition on zero-padded transforms (fast lengths);
    # the solution is still the direct solve's.
    rng = np.random.default_rng(15)
    y = rng.normal(size=(23, 31))
    w = rng.uniform(0.5, 2.0, size=y.shape)
    w[rng.random(y.shape) < 0.3] = 0.0
    assert _System(w, 3.0, 3.0).padded == (24, 32)
    for lam in (10.0, 1e5):
        z, _, _ = smooth_grid(y, w, spacing=(3.0, 3.0), smoothing=lam, rtol=1e-13)
        np.testing.assert_allclose(z, _direct(y, w, lam, 3.0, 3.0), rtol=0, atol=1e-9)


def test_merged_sums_equal_binning_afresh_at_the_larger_cells():
    rng = np.random.default_rng(12)
    img = rng.normal(10.0, 2.0, size=(47, 61))
    bad = rng.random(img.shape) < 0.3
    small = cell_sums(img, bad, (3, 3), 10.0)
    for factor in (2, 3, 5):
        large = cell_sums(img, bad, (3 * factor, 3 * factor), 10.0)
        np.testing.assert_allclose(merged_sums(small, factor), large, rtol=1e-12)


def test_a_merged_grid_is_the_fit_binned_at_the_merged_cells():
    # A floor of many cells merges the automatic cells; the fit is then the one binned
    # at the merged size directly (same grid, GCV choice and noise map to rounding).
    rng = np.random.default_rng(13)
    yy, xx = np.mgrid[:300, :300]
    img = 0.3 * np.sin(xx / 40.0) * np.cos(yy / 55.0) + rng.normal(size=(300, 300))
    mask = rng.random(img.shape) < 0.2
    floor = 30.0**4
    merged = ThinPlateSmoother().fit(img, mask, min_smoothing=floor)
    assert merged.binned_cells == (3, 3) and merged.cell_size == (9, 9)
    direct = ThinPlateSmoother(cell_size=9).fit(img, mask, min_smoothing=floor)
    assert merged.smoothing == direct.smoothing
    np.testing.assert_allclose(merged.grid, direct.grid, rtol=0, atol=1e-9)
    np.testing.assert_allclose(merged.rms_grid, direct.rms_grid, rtol=1e-9)
    # the noise blocks stay those of the binned cells (tiles align to them)
    assert merged.noise_block() == 1 and direct.noise_block() == 4


def test_the_cold_gcv_scan_stops_two_decades_above_a_rough_minimum():
    # Rough structure and a low floor: the scan from the rough end finds the minimum
    # and never solves the stiff decades, and the choice is the best GCV it saw.
    rng = np.random.default_rng(14)
    yy, xx = np.mgrid[:60, :60]
    y = np.sin(xx / 3.0) + np.cos(yy / 4.0) + rng.normal(0, 0.3, (60, 60))
    _, lam, scores = smooth_grid(y, np.ones_like(y), smoothing_range=(1.0, 1e12))
    assert max(scores) <= 1e6
    assert scores[lam] == min(scores.values())
    assert lam < 1e3


def test_the_cold_gcv_scan_stops_after_two_decades_of_steady_rise():
    # Faint structure under noise: past its minimum GCV climbs by under 5% to a flat
    # plateau. The scan stops two decades past the best, as GCV rose at each, and the
    # stiffer decades it skipped all score worse than its choice.
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:64, :64]
    y = 0.2 * np.sin(xx / 9.0) + rng.normal(0, 1.0, (64, 64))
    w = np.ones_like(y)
    _, lam, scores = smooth_grid(y, w, smoothing_range=(1.0, 1e12))
    assert max(scores) <= 1e5 * (1 + 1e-9)
    assert scores[lam] == min(scores.values())
    system = _System(w, 1.0, 1.0)
    yc = y - y.mean()
    for k in range(6, 13):
        z, _ = system.solve(yc, 10.0**k, rtol=1e-4)
        assert system.gcv(yc, z, 10.0**k) > scores[lam]


@pytest.mark.parametrize("threads", [1, 2])
def test_the_gcv_search_forgets_solutions_no_later_solve_starts_from(threads, monkeypatch):
    # Cold scans and warm walks from either side of the minimum, on grids with holes:
    # the search that drops far solutions solves from the same starts (so the same
    # scores, choice and solution, bit for bit) as one that keeps them all, and holds
    # fewer at once (the solutions still alive when each solve starts).
    import hashlib
    import weakref
    from collections import Counter

    import numba

    rng = np.random.default_rng(21)
    yy, xx = np.mgrid[:48, :56]
    starts, made = [], []
    real = _System.solve

    def solve(self, y, lam, z0=None, **kw):
        starts.append(None if z0 is None else hashlib.sha1(z0).hexdigest())
        held.append(sum(r() is not None for r in made))
        z, it = real(self, y, lam, z0, **kw)
        made.append(weakref.ref(z))
        return z, it

    monkeypatch.setattr(_System, "solve", solve)
    old = numba.get_num_threads()
    numba.set_num_threads(threads)
    saved = 0
    try:
        for k, (start, step) in enumerate([(1e6, 1.0), (1e1, 0.25), (1e8, 0.25), (1e4, 0.5)]):
            scale = 4.0 + k if k % 2 else 19.0  # a rough minimum, or a smooth one
            y = np.sin(xx / scale) + np.cos(yy / 6.0) + rng.normal(0, 0.5 + k % 2, xx.shape)
            w = np.where(rng.random(y.shape) < 0.15, 0.0, 1.0)
            system = _System(w, 2.0, 2.0)
            runs = []
            for keep_all in (True, False):
                starts.clear()
                made.clear()
                held, scores = [], {}
                lam, z = _gcv_search(system, y, (1e-1, 1e12), start, step, 1.4, scores,
                                     keep_all=keep_all)  # fmt: skip
                runs.append((lam, z.tobytes(), scores, Counter(starts), max(held)))
            # (two solves may run side by side: their starts in either order)
            assert runs[0][:4] == runs[1][:4]
            assert len(scores) >= 7
            assert runs[0][4] >= len(scores) - 2  # every solution kept (two may be ahead)
            assert runs[1][4] <= min(runs[0][4], 9), (runs[0][4], runs[1][4])
            saved += runs[0][4] - runs[1][4]
    finally:
        numba.set_num_threads(old)
    assert saved >= 20  # the long walk's far solutions above all


def test_the_stated_statistical_error_matches_the_scatter_over_noise_draws():
    """``SmoothResult.error`` (RMS error from the pixel noise, in pixel-sigma) is honest:
    over independent noise draws the fitted flat sky scatters by that much."""
    rng = np.random.default_rng(6)
    smoother = ThinPlateSmoother(cell_size=8, smoothing=40.0**4)
    errs, stated = [], []
    for _ in range(12):
        res = smoother.fit(rng.normal(0.0, 1.0, (128, 160)))
        errs.append(np.sqrt(np.mean(res.grid**2)))
        stated.append(res.error)
    ratio = np.sqrt(np.mean(np.square(errs))) / np.mean(stated)
    assert 0.7 < ratio < 1.4, ratio


def test_a_masked_square_is_bridged_by_the_sky_around_it():
    yy, xx = np.mgrid[:160, :200]
    sky = 100.0 + 0.05 * xx - 0.03 * yy
    img = sky + np.random.default_rng(7).normal(0, 1.0, sky.shape)
    mask = np.zeros(sky.shape, bool)
    mask[50:90, 80:130] = True
    img[mask] = 1e6  # a saturated source under the mask
    res = ThinPlateSmoother().fit(img, mask=mask)
    assert np.abs(res.background - sky).max() < 0.3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"smoothing_range": (10.0, 1.0)}, "smoothing_range"),
        ({"smoothing": -1.0}, "smoothing"),
        ({"cell_size": 0}, "cell_size"),
    ],
)
def test_bad_configuration_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ThinPlateSmoother(**kwargs)


def test_bad_grids_are_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="one shape"):
        smooth_grid(np.zeros((4, 4)), np.ones((4, 5)))
    with pytest.raises(ValueError, match="at least one node"):
        smooth_grid(np.zeros((4, 4)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="no valid pixel"):
        ThinPlateSmoother().fit(np.full((32, 32), np.nan))


def _two_depths(gy=24, gx=32, ratio=16.0):
    """Cell weights of 4 pixels each, the right half ``ratio`` times noisier, and the
    depth grid the smoother reads from them."""
    n = np.full((gy, gx), 4.0)
    d = np.ones((gy, gx))
    d[:, gx // 2 :] = 1.0 / ratio
    w = n * d
    return n, w, depth_grid(n, w, w)


def test_a_penalty_field_equals_a_sparse_direct_solve_of_its_definition():
    rng = np.random.default_rng(8)
    n, w, depth = _two_depths(12, 17)
    w[3:6, 4:9] = 0.0
    y = rng.normal(size=w.shape)
    field = depth**0.5
    z, _, _ = smooth_grid(
        y, w, spacing=(4.0, 3.0), smoothing=300.0, penalty=field,
        local_weights=w.mean() * depth, rtol=1e-13,
    )  # fmt: skip
    p = _penalty(*y.shape, 4.0, 3.0, field)
    wd = sparse.diags(w.ravel())
    direct = spsolve((wd + 300.0 * p).tocsc(), wd @ y.ravel()).reshape(y.shape)
    np.testing.assert_allclose(z, direct, rtol=0, atol=1e-9)


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
def test_the_local_trace_is_as_close_to_the_exact_trace_as_with_one_depth(power):
    """GCV's trace with a penalty that follows the depth (each node's diagonal from a
    uniform grid of its own penalty and local weight) errs against the exact trace of
    the dense hat matrix by what the trace of one depth does: the depth costs it no
    accuracy (both err alike at the edges, where the cosine spectrum is not exact)."""
    ratios = []
    for ratio in (1.0, 16.0):
        n, w, depth = _two_depths(ratio=ratio)
        depth = np.ones_like(w) if depth is None else depth
        field = depth**power
        system = _System(w, 2.0, 2.0, field, w.mean() * depth)
        p = _penalty(*w.shape, 2.0, 2.0, field).toarray()
        wd = np.diag(w.ravel())
        ratios.append(
            [system.trace(lam) / np.trace(np.linalg.solve(wd + lam * p, wd)) for lam in (1e2, 1e3)]
        )
    np.testing.assert_allclose(ratios[1], ratios[0], rtol=0.05)


def test_the_penalty_follows_the_depth_only_where_the_weights_vary():
    rng = np.random.default_rng(9)
    img = rng.normal(size=(96, 128))
    weight = np.ones(img.shape)
    assert ThinPlateSmoother().fit(img, weight=weight).penalty is None
    weight[:, 64:] = 1.0 / 16.0
    img[:, 64:] *= 4.0
    varied = ThinPlateSmoother().fit(img, weight=weight)
    field, local, power = varied.penalty
    assert 0.0 <= power <= 1.0 and field.shape == local.shape == varied.grid.shape
    # a fixed smoothing keeps one penalty: there is no GCV to choose the power
    assert ThinPlateSmoother(smoothing=1e5).fit(img, weight=weight).penalty is None
    # the stiffer fit of the asymmetry and tracking tests keeps the field
    assert varied.stiffer_grid(4.0).shape == varied.grid.shape


def test_a_bad_penalty_field_is_refused_naming_it():
    y, w = np.zeros((6, 7)), np.ones((6, 7))
    with pytest.raises(ValueError, match="penalty"):
        smooth_grid(y, w, smoothing=1.0, penalty=np.ones((6, 6)), local_weights=w)
    with pytest.raises(ValueError, match="local_weights"):
        smooth_grid(y, w, smoothing=1.0, penalty=w, local_weights=None)


def test_the_merged_stiffer_fit_stays_close_to_the_fine_one():
    # The tracking check's 8x stiffer fit is solved on merged cells and interpolated
    # back: it must stay a small fraction of what it is compared with (the fit's own
    # departure from it), not just have the right shape.
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:500, :600]
    sky = 2.0 * np.sin(xx / 90.0) + 1.5 * np.cos(yy / 70.0)
    res = ThinPlateSmoother(cell_size=4).fit(sky + rng.normal(size=sky.shape))
    for stiffer in (2.0, 8.0):
        merged, fine = res.stiffer_grid(stiffer), res.stiffer_grid(stiffer, merge=False)
        spread = np.std(res.grid - fine)
        assert np.sqrt(np.mean((merged - fine) ** 2)) < 0.05 * spread


def test_valid_counts_are_the_count_layer_of_the_cell_sums(rng):
    # ragged last cells, a mask along edges and scattered
    img = rng.normal(size=(45, 70)).astype(np.float32)
    bad = rng.random(img.shape) < 0.3
    bad[:, :5] = True
    for cells in ((8, 8), (5, 16), (45, 3)):
        want = cell_sums(img, bad, cells, 0.0)[0]
        np.testing.assert_array_equal(valid_counts(bad, cells)[0], want)


def test_a_fit_keeps_no_view_of_its_cell_sums(rng):
    # The model's counts and weights are kept (in every record of a fit's history):
    # a view of the sums would keep all their layers alive with it.
    img = rng.normal(size=(96, 128)).astype(np.float32)
    res = ThinPlateSmoother().fit(img)
    for name in ("cell_pixels", "cell_weights", "cell_values", "grid"):
        value = getattr(res, name)
        if value is not None:
            assert value.base is None or value.base.size == value.size, name
    counts = cell_sums(img, np.zeros(img.shape, bool), res.cell_size, 0.0)[0]
    np.testing.assert_array_equal(res.cell_pixels, counts)


@pytest.mark.parametrize("start", [None, 3e5])
def test_the_search_is_the_same_on_one_thread_or_two(start):
    # With two numba threads the GCV search solves pairs of smoothings side by side
    # (the refinement's two neighbours, the walk's first step either way), each from
    # the solution it would start from in turn: the same fit, smoothing and GCV
    # scores, in the same order, bit for bit.
    import numba

    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[:60, :80]
    values = np.sin(yy / 9.0) + 0.02 * xx + rng.normal(0, 0.3, yy.shape)
    weights = rng.integers(0, 30, yy.shape).astype(float)
    kwargs = {"smoothing_start": start, "smoothing_step": 1.0 if start is None else 0.25}
    before = numba.get_num_threads()
    runs = []
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            runs.append(smooth_grid(values, weights, spacing=(4.0, 4.0), **kwargs))
    finally:
        numba.set_num_threads(before)
    (z1, lam1, s1), (z2, lam2, s2) = runs
    assert z1.tobytes() == z2.tobytes() and lam1 == lam2
    assert list(s1.items()) == list(s2.items()) and len(s1) >= 5


def test_a_fit_is_the_same_on_one_thread_or_two():
    # With two threads the noise map's variance grid is smoothed beside the
    # background's last solves: the same maps, smoothing and scores, bit for bit.
    import numba

    rng = np.random.default_rng(8)
    yy, xx = np.mgrid[:240, :320]
    image = 3 + np.cos(xx / 60.0) + (1 + yy / 240.0) * rng.normal(0, 1, yy.shape)
    mask = rng.random(yy.shape) < 0.05
    before = numba.get_num_threads()
    fits = []
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            fits.append(ThinPlateSmoother().fit(image, mask, smoothing_start=2e6))
    finally:
        numba.set_num_threads(before)
    a, b = fits
    assert a.grid.tobytes() == b.grid.tobytes() and a.rms_grid.tobytes() == b.rms_grid.tobytes()
    assert a.smoothing == b.smoothing and list(a.gcv.items()) == list(b.gcv.items())
