"""Tests for skymap.pipeline (IterativeBackground, fit) and skymap.smooth (thin-plate)."""

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from scipy.sparse.linalg import spsolve

from skymap.backends.memory import MemoryBackend
from skymap.background import pipeline as P
from skymap.background.cells import _bspline_weights, _extend_linear
from skymap.background.model import MapModel, as_model
from skymap.background.noise import NoiseModel
from skymap.background.smooth import ThinPlateSmoother, smooth_grid, upsample
from skymap.masking import hysteresis as H


def _scene(rng, shape=(96, 96), nsrc=12, sigma=1.0):
    """Gradient sky + Gaussian blobs + white noise; returns image, sky."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    sky = 10.0 + 0.02 * yy - 0.01 * xx + 0.5 * np.sin(xx / 25.0)
    img = sky + rng.normal(0, sigma, shape)
    for _ in range(nsrc):
        y0, x0 = rng.uniform(5, shape[0] - 5), rng.uniform(5, shape[1] - 5)
        s = rng.uniform(1.0, 2.5)
        img += rng.uniform(20, 80) * np.exp(-((yy - y0) ** 2 + (xx - x0) ** 2) / (2 * s * s))
    return img, sky


# --------------------------------------------------------------------------- smooth.py


def _dense_thin_plate(shape, hy, hx):
    """Independent construction of the thin-plate penalty matrix from Kronecker
    products of explicit difference matrices."""
    ny, nx = shape

    def d(n, k):
        return sp.csr_matrix(np.diff(np.eye(n), k, axis=0))

    iy, ix = sp.identity(ny), sp.identity(nx)
    area = hy * hx
    dyy = sp.kron(d(ny, 2), ix) / hy**2
    dxx = sp.kron(iy, d(nx, 2)) / hx**2
    dxy = sp.kron(d(ny, 1), d(nx, 1)) / (hy * hx)
    return area * (dyy.T @ dyy + dxx.T @ dxx + 2 * dxy.T @ dxy)


def test_smooth_grid_matches_direct_sparse_solve(rng):
    shape = (13, 17)
    y = rng.normal(size=shape)
    w = rng.uniform(0.0, 4.0, shape)
    w[3:6, 4:9] = 0.0  # a hole bridged by the penalty
    lam = 7.0
    z, used, scores = smooth_grid(y, w, spacing=(2.0, 3.0), smoothing=lam)
    a = sp.diags(w.ravel()) + lam * _dense_thin_plate(shape, 2.0, 3.0)
    ref = spsolve(a.tocsc(), (w * y).ravel()).reshape(shape)
    assert used == lam and scores == {}
    np.testing.assert_allclose(z, ref, atol=1e-5 * np.abs(ref).max())


def test_smooth_grid_passes_planes_exactly():
    yy, xx = np.mgrid[:20, :30]
    plane = 3.0 + 0.2 * yy - 0.7 * xx
    w = np.ones_like(plane)
    w[5:15, 5:15] = 0.0
    for lam in (1e-2, 1e3, 1e8):
        z, _, _ = smooth_grid(plane, w, smoothing=lam)
        np.testing.assert_allclose(z, plane, atol=1e-3)  # the solver tolerance


def test_gcv_choice_close_to_exact_gcv(rng):
    # Exact GCV with the dense hat matrix on a small grid with uniform weights.
    shape = (16, 16)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    truth = np.sin(yy / 4.0) + np.cos(xx / 5.0)
    y = truth + rng.normal(0, 0.3, shape)
    w = np.ones(shape)
    pen = _dense_thin_plate(shape, 1.0, 1.0).toarray()
    lams = 10.0 ** np.arange(-2, 4.01, 0.25)
    exact = []
    for lam in lams:
        hat = np.linalg.inv(np.eye(y.size) + lam * pen)
        resid = y.ravel() - hat @ y.ravel()
        exact.append(y.size * resid @ resid / (y.size - np.trace(hat)) ** 2)
    best = lams[int(np.argmin(exact))]
    _, lam, _ = smooth_grid(y, w, smoothing_range=(1e-2, 1e4), smoothing_start=1.0)
    assert abs(np.log10(lam) - np.log10(best)) <= 0.5


def test_upsample_interpolates_nodes_and_keeps_gradients():
    g = np.add.outer(2.0 * np.arange(6.0), np.arange(5.0))
    out = upsample(g, 4, (24, 20))
    # Node (i, j) sits on pixel (4 i + 1.5, 4 j + 1.5): between pixels, so compare the
    # linear function itself everywhere, edges included (linear extension).
    yy, xx = np.mgrid[:24, :20]
    np.testing.assert_allclose(out, 2.0 * (yy - 1.5) / 4 + (xx - 1.5) / 4, atol=1e-6)
    curved = np.random.default_rng(0).normal(size=(7, 9))
    out = upsample(curved, 1, (7, 9))
    np.testing.assert_allclose(out, curved, atol=1e-10)


@settings(max_examples=20, deadline=None)
@given(step=st.integers(1, 5), ny=st.integers(1, 40), nx=st.integers(1, 40))
def test_upsample_step_is_the_exact_subsample(step, ny, nx):
    g = np.random.default_rng(ny * 41 + nx).normal(size=(6, 5))
    full = upsample(g, (3, 4), (ny, nx), np.float32)
    np.testing.assert_array_equal(
        upsample(g, (3, 4), (ny, nx), np.float32, step), full[::step, ::step]
    )


def test_upsample_is_scipys_spline_products_bit_for_bit():
    # Along x: each coefficient row's four weighted nodes summed from 0 in order, as
    # scipy's CSR product does; along y: four rows combined in order, in float64.
    rng = np.random.default_rng(12)
    for gshape, cells, shape in (((6, 5), (3, 4), (17, 19)), ((9, 12), (32, 32), (300, 389))):
        g = rng.normal(size=gshape) * 10.0 ** rng.integers(-3, 4)
        pad = 12
        z = _extend_linear(_extend_linear(g, pad, 0), pad, 1)
        coef = ndimage.spline_filter(z, order=3, mode="mirror")
        uy, ux = (
            (np.arange(n) - (c - 1) / 2.0) / c + pad for n, c in zip(shape, cells, strict=True)
        )
        bx, wx = _bspline_weights(ux)
        cols = (bx[:, None] + np.arange(-1, 3)[None, :]).ravel()
        xmat = sp.csr_matrix((wx.ravel(), (np.repeat(np.arange(ux.size), 4), cols)),
                             shape=(ux.size, coef.shape[1]))  # fmt: skip
        tmp = (xmat @ coef.T).T
        by, wy = _bspline_weights(uy)
        want = np.empty(shape, np.float32)
        for y in range(shape[0]):
            b, w = by[y] - 1, wy[y]
            want[y] = w[0] * tmp[b] + w[1] * tmp[b + 1] + w[2] * tmp[b + 2] + w[3] * tmp[b + 3]
        got = upsample(g, cells, shape, np.float32)
        assert got.tobytes() == want.tobytes()


def test_upsample_writes_into_out_the_same_values():
    g = np.random.default_rng(5).normal(size=(6, 5))
    out = np.full((17, 19), np.nan, np.float32)
    got = upsample(g, (3, 4), (17, 19), np.float32, out=out)
    assert got is out
    np.testing.assert_array_equal(out, upsample(g, (3, 4), (17, 19), np.float32))
    with pytest.raises(ValueError, match="out must be"):
        upsample(g, (3, 4), (17, 19), np.float64, out=out)


def test_upsample_reuses_a_grids_coefficients_only_while_its_bits_are_the_same():
    """A tile's map is one window of the whole map bit for bit whether or not the
    grid's prefiltered coefficients come from the cache; a grid written in place is
    filtered again, a grid's entry goes with the grid, and only the last few grids'
    are kept."""
    import gc

    from skymap.background import cells

    rng = np.random.default_rng(9)
    g = rng.normal(size=(9, 11))
    whole = upsample(g, (8, 8), (72, 88), np.float32, 2)
    tile = ((16, 48), (24, 72))
    for _ in range(2):  # the second call takes the cached coefficients
        part = upsample(g, (8, 8), (72, 88), np.float32, 2, window=tile)
        assert part.tobytes() == whole[8:24, 12:36].tobytes()
    assert id(g) in cells._COEFFICIENTS
    g[4, 5] += 1.0  # in place: the cache must not answer
    fresh = upsample(g.copy(), (8, 8), (72, 88), np.float32, 2, window=tile)
    assert upsample(g, (8, 8), (72, 88), np.float32, 2, window=tile).tobytes() == fresh.tobytes()
    assert fresh.tobytes() != part.tobytes()
    key = id(g)
    del g
    gc.collect()
    assert key not in cells._COEFFICIENTS
    grids = [rng.normal(size=(5, 6)) for _ in range(cells._KEEP + 3)]  # all alive
    for grid in grids:
        upsample(grid, 4, (20, 24), np.float32)
    assert len(cells._COEFFICIENTS) <= cells._KEEP and id(grids[-1]) in cells._COEFFICIENTS


def test_the_next_background_map_is_written_into_the_last_residual():
    # The loop reads a residual no more once it asks for the next map: the in-memory
    # back end writes that map into the residual's memory (no fresh image), the same
    # values as a new map.
    rng = np.random.default_rng(8)
    img = rng.normal(size=(64, 80)).astype(np.float32)
    be = MemoryBackend(img)
    first = ThinPlateSmoother(cell_size=8).fit(img)
    second = ThinPlateSmoother(cell_size=8, smoothing=20.0**4).fit(img)
    resid = be.residual(be.background(first))
    np.testing.assert_array_equal(resid, img - first.background_map())
    bkg = be.background(second)
    assert bkg is resid
    np.testing.assert_array_equal(bkg, second.background_map())
    # a residual that was not written in place is not taken
    assert be.background(first) is not bkg

    class NewMaps:  # new maps, but no out= (the protocol before): a new map each time
        new_maps = True
        shape, dtype = img.shape, img.dtype

        def background_map(self, step=1, window=None):
            return first.background_map()

    resid = be.residual(be.background(first))
    bkg = be.background(NewMaps())
    assert bkg is not resid
    np.testing.assert_array_equal(bkg, first.background_map())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_upsample_subtracted_from_an_image_is_numpys_difference_bit_for_bit(dtype):
    rng = np.random.default_rng(6)
    g = rng.normal(size=(6, 5))
    img = rng.normal(size=(17, 19)).astype(dtype)
    want = img - upsample(g, (3, 4), (17, 19), dtype)
    np.testing.assert_array_equal(upsample(g, (3, 4), (17, 19), dtype, subtract_from=img), want)
    out = np.full((17, 19), np.nan, dtype)
    assert upsample(g, (3, 4), (17, 19), dtype, out=out, subtract_from=img) is out
    np.testing.assert_array_equal(out, want)
    # in place, and at a step
    inplace = img.copy()
    assert upsample(g, (3, 4), (17, 19), dtype, out=inplace, subtract_from=inplace) is inplace
    np.testing.assert_array_equal(inplace, want)
    sub = img[::2, ::2].copy()
    upsample(g, (3, 4), (17, 19), dtype, 2, out=sub, subtract_from=sub)
    np.testing.assert_array_equal(sub, want[::2, ::2])
    with pytest.raises(ValueError, match="subtract_from must"):
        upsample(g, (3, 4), (17, 19), dtype, subtract_from=img[1:])


def test_a_deferred_background_gives_the_same_residual_and_change():
    # A map the loop reads only through the residual and the change is not made: the
    # residual comes from the model in one pass (into the last residual's memory), the
    # change from the model's subsample; both equal those of the map bit for bit.
    rng = np.random.default_rng(9)
    img = rng.normal(size=(64, 80)).astype(np.float32)
    be, ref = MemoryBackend(img), MemoryBackend(img)
    first = ThinPlateSmoother(cell_size=8).fit(img)
    second = ThinPlateSmoother(cell_size=8, smoothing=20.0**4).fit(img)
    resid = be.residual(be.background(first, deferred=True))
    np.testing.assert_array_equal(resid, img - first.background_map())
    pending = be.background(second, deferred=True)
    noise = NoiseModel.for_maskers([H.HysteresisMasker()]).working(second, be)
    assert be.change(pending, second, first, noise, NoiseModel) == ref.change(
        ref.background(second), second, first, noise, NoiseModel
    )
    # the change from the same map (not deferred), and between models of either kind
    plain = MapModel(background=first.background, rms=first.rms)
    want = ref.change(ref.background(second), second, plain, noise, NoiseModel)
    assert be.change(pending, second, plain, noise, NoiseModel) == want
    again = be.residual(pending)
    assert again is resid
    np.testing.assert_array_equal(again, img - second.background_map())
    assert ref.change(ref.background(plain), plain, second, noise, NoiseModel) == be.change(
        be.background(plain, deferred=True), plain, second, noise, NoiseModel
    )
    # a model without residual_map gets its map
    assert isinstance(be.background(plain, deferred=True), np.ndarray)


def test_smoother_recovers_smooth_sky_under_mask(rng):
    img, sky = _scene(rng, shape=(128, 160), nsrc=0)
    mask = np.zeros(img.shape, bool)
    mask[40:70, 50:90] = True
    img_masked = img.copy()
    img_masked[mask] = 1e6
    res = ThinPlateSmoother(cell_size=4).fit(img_masked, mask)
    assert res.background.shape == img.shape
    err = res.background - sky
    assert np.sqrt(np.mean(err**2)) < 0.2
    assert abs(np.median(res.rms) - 1.0) < 0.1
    assert res.scale > 4


def test_smoother_refines_cells_for_fine_structure(rng):
    # Structure on ~6 px scales: GCV wants less smoothing than the automatic 8-px cells
    # allow, so the cells are halved until it does not.
    yy, xx = np.mgrid[:512, :512]
    sky = 5.0 * np.sin(xx / 4.0) * np.cos(yy / 5.0)
    img = sky + rng.normal(0, 0.5, sky.shape)
    res = ThinPlateSmoother().fit(img)
    assert res.cell_size[0] < ThinPlateSmoother().cells_for(img.shape)[0]
    assert np.sqrt(np.mean((res.background - sky) ** 2)) < 0.5
    fixed = ThinPlateSmoother(cell_size=8).fit(img)
    assert fixed.cell_size == (8, 8)


def test_protect_scale_stiffens_until_white(rng):
    """An over-fitting GCV (inflation 0.2) absorbs the noise at 16-px blocks; with
    protect_scale=16 the residual's 16-px block means scatter like white noise again,
    measured here directly (std of block means against sigma / 16)."""
    img = rng.normal(0, 1.0, (256, 256))

    def whiteness(res):
        blocks = (img - res.background).reshape(16, 16, 16, 16).mean(axis=(1, 3))
        return blocks.std() / (1.0 / 16)

    free = ThinPlateSmoother(cell_size=4, gcv_inflation=0.2).fit(img)
    protected = ThinPlateSmoother(cell_size=4, gcv_inflation=0.2, protect_scale=16).fit(img)
    assert whiteness(free) < 0.6  # the unprotected fit follows the noise
    assert whiteness(protected) > 0.85
    assert protected.smoothing > free.smoothing


def test_smoother_validation():
    with pytest.raises(ValueError, match="smoothing_range"):
        ThinPlateSmoother(smoothing_range=(10.0, 1.0))
    with pytest.raises(ValueError, match="cell_size"):
        ThinPlateSmoother(cell_size=0)
    with pytest.raises(ValueError, match="gcv_inflation"):
        ThinPlateSmoother(gcv_inflation=-1)
    with pytest.raises(ValueError, match="no valid pixel"):
        ThinPlateSmoother().fit(np.full((10, 10), np.nan))


# --------------------------------------------------------------------------- masker


def test_hysteresis_masker_finds_sources_and_not_noise(rng):
    img, sky = _scene(rng, nsrc=10)
    m = H.HysteresisMasker()(img - sky, 1.0)
    noise_only = H.HysteresisMasker()(rng.normal(size=(96, 96)), 1.0)
    assert noise_only.mean() < 0.01
    yy, xx = np.mgrid[:96, :96]
    assert m.mean() > 0.03
    blob = np.zeros((96, 96))
    blob += 30 * np.exp(-((yy - 48) ** 2 + (xx - 48) ** 2) / 4.0)
    mb = H.HysteresisMasker()(blob + rng.normal(size=blob.shape), 1.0)
    assert mb[48, 48] and mb[48, 52] and not mb[10, 10]


def test_hysteresis_masker_ignores_masked_values(rng):
    r = rng.normal(size=(64, 64))
    mask = np.zeros(r.shape, bool)
    mask[20:30, 20:30] = True
    r2 = r.copy()
    r2[mask] = 1e9
    a = H.HysteresisMasker()(r, 1.0, mask)
    b = H.HysteresisMasker()(r2, 1.0, mask)
    np.testing.assert_array_equal(a, b)
    assert not a[mask].any()


def _hysteresis_flood(snr, grow, low, high):
    """Brute-force reference: breadth-first flood from every seed over 8-neighbours."""
    ny, nx = snr.shape
    out = np.zeros(snr.shape, bool)
    queue = [tuple(p) for p in np.argwhere(snr > high)]
    for y, x in queue:
        out[y, x] = True
    while queue:
        y, x = queue.pop()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                v, u = y + dy, x + dx
                if 0 <= v < ny and 0 <= u < nx and not out[v, u] and grow[v, u] > low:
                    out[v, u] = True
                    queue.append((v, u))
    return out


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), plain=st.booleans())
def test_hysteresis_matches_flood_fill(seed, plain):
    r = np.random.default_rng(seed)
    snr = r.normal(size=(40, 50)).astype(np.float32) * 1.5
    grow = (snr + r.normal(size=snr.shape).astype(np.float32)) if plain else snr
    want = _hysteresis_flood(snr, grow, 1.0, 3.0)
    got = H._hysteresis(snr.copy(), 1.0, 3.0, grow.copy() if plain else None)
    assert got.dtype == bool
    np.testing.assert_array_equal(got, want)


def test_hysteresis_masker_detections_exclude_mask_and_nonfinite(rng):
    r = rng.normal(size=(64, 64))
    r[30:34, 30:34] += 40.0
    r[10, 10] = np.nan
    mask = np.zeros(r.shape, bool)
    mask[31, :] = True
    r0, m0 = r.copy(), mask.copy()
    m = H.HysteresisMasker()(r, 1.0, mask)
    np.testing.assert_array_equal(r, r0)
    np.testing.assert_array_equal(mask, m0)
    assert not m[mask].any() and not m[10, 10]
    assert m[30, 30] and m[33, 33]


def test_working_rms_floors_at_half_the_median_without_touching_the_model(rng):
    rms = rng.uniform(0.5, 2.0, size=(300, 400)).astype(np.float32)
    rms[:5] = 0.0
    rms[10, :7] = np.nan
    rms[11, :3] = np.inf
    rms[12, 40:60] = 0.01

    class Model:
        def __init__(self, rms):
            self.rms = rms
            self.background = np.zeros_like(rms)

    model = Model(rms.copy())
    backend = MemoryBackend(np.zeros(rms.shape))
    got = NoiseModel(coarse=False).working(as_model(model), backend)
    ok = np.isfinite(rms) & (rms > 0)
    floor = 0.5 * float(np.median(rms[ok]))
    want = np.where(np.isfinite(rms), np.maximum(rms, floor), floor).astype(np.float32)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(model.rms, rms)


def test_hysteresis_masker_validation():
    with pytest.raises(ValueError, match="low"):
        H.HysteresisMasker(high=2.0, low=3.0)
    with pytest.raises(ValueError, match="scales"):
        H.HysteresisMasker(scales=())
    with pytest.raises(ValueError, match="surround"):
        H.HysteresisMasker(surround=0.5)


# --------------------------------------------------------------------------- pipeline


def test_fit_recovers_background_and_masks_sources(rng):
    img, sky = _scene(rng, shape=(128, 128), nsrc=20)
    res = P.fit(img)
    err = res.background - sky
    assert np.sqrt(np.mean(err**2)) < 0.25
    assert res.source_mask.mean() > 0.02
    assert abs(res.noise - 1.0) < 0.1
    assert res.history[0].stage == -1 and len(res.history) >= 3
    assert res.config == P.default_pipeline(img)


def test_history_is_complete_and_plottable(rng):
    from skymap.app.plot import plot_convergence

    img, _ = _scene(rng, shape=(96, 96))
    res = P.fit(img)
    for rec in res.history:
        assert rec.background.shape == img.shape and rec.rms.shape == img.shape
        assert rec.mask.dtype == bool and rec.mask.shape == img.shape
        assert 0 <= rec.mask_fraction <= 1
        assert abs(rec.mask.mean() - rec.mask_fraction) < 1e-12
    np.testing.assert_array_equal(res.history[-1].mask, res.mask)
    np.testing.assert_allclose(res.history[-1].background, res.background)
    assert len(res.table) == len(res.history)
    assert len(plot_convergence(res.history).axes) == 3


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="2-dimensional"):
        P.fit(np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="shape"):
        P.fit(np.zeros((32, 32)), mask=np.zeros((32, 31), bool))
    with pytest.raises(ValueError, match="no valid pixel"):
        P.fit(np.zeros((32, 32)), mask=np.ones((32, 32), bool))
    with pytest.raises(ValueError, match="no valid pixel"):
        P.fit(np.full((32, 32), np.nan))
    with pytest.raises(ValueError, match="unknown option"):
        P.fit(np.zeros((32, 32)), box=3)
    with pytest.raises(ValueError, match="stages"):
        P.IterativeBackground(first_guess=ThinPlateSmoother(), stages=())
    stage = P.Stage(masker=H.HysteresisMasker(), estimator=ThinPlateSmoother())
    with pytest.raises(ValueError, match="max_iter"):
        P.IterativeBackground(first_guess=ThinPlateSmoother(), stages=(stage,), max_iter=0)
    with pytest.raises(ValueError, match="first_guess"):
        P.IterativeBackground(first_guess=3, stages=(stage,))
    with pytest.raises(ValueError, match="final"):
        P.IterativeBackground(first_guess=ThinPlateSmoother(), stages=(stage,), final=3)
    with pytest.raises(ValueError, match="max_iter"):
        P.Stage(masker=H.HysteresisMasker(), estimator=ThinPlateSmoother(), max_iter=0)


def test_nan_masked_inputs_untouched_float32_kept(rng):
    img, sky = _scene(rng, shape=(80, 80))
    img = img.astype(np.float32)
    img[10, 10] = np.nan
    img[20, 30] = np.inf
    mask = np.zeros(img.shape, bool)
    mask[50:55, 50:55] = True
    img_copy, mask_copy = img.copy(), mask.copy()
    res = P.fit(img, mask)
    np.testing.assert_array_equal(img, img_copy)
    np.testing.assert_array_equal(mask, mask_copy)
    assert res.background.dtype == np.float32 and res.rms.dtype == np.float32
    assert np.all(np.isfinite(res.background))
    assert res.bad_mask[10, 10] and res.bad_mask[20, 30] and res.bad_mask[52, 52]


def test_masked_pixel_values_do_not_matter(rng):
    img, _ = _scene(rng, shape=(96, 96))
    mask = np.zeros(img.shape, bool)
    mask[30:50, 40:60] = True
    mask[:, 5] = True
    other = img.copy()
    other[mask] = rng.normal(1e4, 1e3, mask.sum())
    a = P.fit(img, mask)
    b = P.fit(other, mask)
    np.testing.assert_array_equal(a.background, b.background)
    np.testing.assert_array_equal(a.mask, b.mask)


def test_ring_median_first_guess(rng):
    img, sky = _scene(rng, shape=(96, 96))
    pipe = P.IterativeBackground(
        first_guess=P.RingMedianGuess(radius=6, width=3),
        stages=(P.Stage(masker=H.HysteresisMasker(), estimator=ThinPlateSmoother()),),
    )
    res = pipe.fit(img)
    assert np.sqrt(np.mean((res.background - sky) ** 2)) < 0.3


@settings(max_examples=4)
@given(
    seed=st.integers(0, 2**16),
    offset=st.floats(-1e3, 1e3),
    scale=st.floats(0.01, 100.0),
)
def test_offset_scale_transpose_invariance(seed, offset, scale):
    rng = np.random.default_rng(seed)
    img, _ = _scene(rng, shape=(48, 64), nsrc=5)
    base = P.fit(img)
    tol = 1e-5 * base.noise
    shifted = P.fit(img * scale + offset)
    np.testing.assert_allclose(
        shifted.background, base.background * scale + offset, atol=tol * scale + 1e-9 * abs(offset)
    )
    np.testing.assert_array_equal(shifted.source_mask, base.source_mask)
    transposed = P.fit(img.T)
    np.testing.assert_allclose(transposed.background, base.background.T, atol=tol)
    np.testing.assert_array_equal(transposed.source_mask, base.source_mask.T)


def test_default_pipeline_round_trips_through_toml():
    from skymap.app import config

    pipe = P.default_pipeline(np.zeros((64, 64)))
    assert config.loads_toml(config.dumps_toml(pipe)) == pipe


# --------------------------------------------------------------------------- statistical
# error, asymmetry, smoothing floor


def test_statistical_error_matches_monte_carlo():
    # Pure noise, fixed smoothing: the RMS of (fit - truth) over realisations is the
    # fit's statistical error, which the smoother predicts from its spectrum.
    smoother = ThinPlateSmoother(cell_size=2, smoothing=6.0**4)
    rng = np.random.default_rng(5)
    errs, predicted = [], []
    for _ in range(12):
        res = smoother.fit(rng.normal(0, 2.0, (96, 96)))
        errs.append(np.mean(res.grid**2) / 4.0)
        predicted.append(res.error)
    assert np.ptp(predicted) < 1e-12
    assert abs(np.sqrt(np.mean(errs)) / predicted[0] - 1) < 0.15


def test_statistical_error_shrinks_with_smoothing_and_limits():
    img = np.random.default_rng(6).normal(size=(64, 64))
    rough = ThinPlateSmoother(cell_size=2, smoothing=2.0**4).fit(img).error
    stiff = ThinPlateSmoother(cell_size=2, smoothing=1e12).fit(img).error
    # Between a mean of all 4096 pixels and a mean of one 4-pixel cell.
    assert 1 / 64 <= stiff < rough < 0.5
    assert abs(stiff - 1 / 64) < 0.01


def _wing_field(sign, n=256, seed=2):
    """Noise plus exponential-profile blobs of one ``sign``: bumps (source wings) or
    dips."""
    yy, xx = np.mgrid[:n, :n]
    rng = np.random.default_rng(seed)
    blobs = sum(
        np.exp(-np.hypot(yy - y, xx - x) / 12.0) for y, x in rng.uniform(20, n - 20, (4, 2))
    )
    return rng.normal(size=(n, n)) + sign * 3.0 * blobs


def test_asymmetry_separates_bumps_from_dips_and_sky():
    smoother = ThinPlateSmoother()
    bumps = smoother.fit(_wing_field(+1)).asymmetry()
    dips = smoother.fit(_wing_field(-1)).asymmetry()
    assert bumps > 3 and dips < 1 / 2
    # Structure of both signs (a smooth random field) is symmetric.
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(3)
    field = gaussian_filter(rng.normal(size=(256, 256)), 10.0)
    sky = smoother.fit(field / field.std() + rng.normal(size=(256, 256))).asymmetry()
    assert 1 / 2 < sky < 2
    with pytest.raises(ValueError, match="tail"):
        smoother.fit(field).asymmetry(tail=0.7)


def test_min_smoothing_is_a_floor_for_gcv(rng):
    img = _wing_field(+1)
    free = ThinPlateSmoother().fit(img)
    floored = ThinPlateSmoother().fit(img, min_smoothing=(4 * free.scale) ** 4)
    assert floored.scale >= 4 * free.scale * (1 - 1e-9)
    # The caller's floor does not make the automatic cells refine; it may merge them.
    base = ThinPlateSmoother().cells_for(img.shape)
    assert floored.binned_cells == base
    factor = ThinPlateSmoother().coarsening(base, img.shape, (4 * free.scale) ** 4)
    assert floored.cell_size == (base[0] * factor, base[1] * factor)


def test_source_asymmetry_stiffens_under_extended_wings():
    # Faint extended wings around compact cores on a flat sky: without the check the
    # fit follows the unmasked wings and sits high under the sources.
    from skymap.quality.simulate import scene_by_name

    scene = scene_by_name("galaxies_lsb", shape=(192, 192), seed=0)
    under = scene.sources > scene.noise_sigma

    def bias(res):
        d = (res.background - scene.sky) / scene.noise_sigma
        return float(np.mean(d[under]) - np.mean(d))

    # The check is an option (off by default); without max_source_size's floor, so
    # that the floors seen are the check's.
    off = {"max_source_size": None, "source_tracking": None}
    plain = P.fit(scene.image, source_asymmetry=None, **off)
    checked = P.fit(scene.image, source_asymmetry=2.5, **off)
    floors = [r.min_scale for r in checked.history if r.min_scale is not None]
    assert floors and checked.history[-1].min_scale == max(floors)
    assert all(r.min_scale is None for r in plain.history)
    assert bias(checked) < 0.5 * bias(plain)
    assert np.isfinite(checked.history[-2].asymmetry)


def test_source_asymmetry_leaves_symmetric_sky_alone():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(4)
    field = gaussian_filter(rng.normal(size=(192, 192)), 6.0)
    img, _ = _scene(rng, shape=(192, 192), nsrc=15)
    res = P.fit(
        img + 3.0 * field / field.std(),
        source_asymmetry=2.5,
        max_source_size=None,
        source_tracking=None,
    )
    assert all(r.min_scale is None for r in res.history)
    last = [r for r in res.history if r.stage == len(res.config.stages) - 1]
    measured = [r.asymmetry for r in last if np.isfinite(r.asymmetry)]
    assert measured and all(a < res.config.source_asymmetry for a in measured)


def _meets_tolerances(cfg, rec):
    tol = max(cfg.change_tol, cfg.error_tol * rec.error)
    mask_ok = rec.mask_change <= cfg.mask_tol or abs(rec.mask_growth) <= cfg.mask_tol
    return rec.change <= tol and mask_ok


def test_converged_means_the_last_stage_met_its_tolerances(rng):
    img, _ = _scene(rng, shape=(128, 128), nsrc=20)
    res = P.fit(img)
    last = [r for r in res.history if r.stage == len(res.config.stages) - 1]
    assert res.converged == _meets_tolerances(res.config, last[-1])
    # No earlier iteration of the stage met them (it would have stopped there).
    assert not any(_meets_tolerances(res.config, r) for r in last[:-1])
    for r in res.history:
        assert np.isfinite(r.error) and 0 < r.error < 1
    # The mask growth is the step in the masked share.
    fractions = np.array([r.mask_fraction for r in res.history])
    growth = np.array([r.mask_growth for r in res.history[1:]])
    np.testing.assert_allclose(growth, np.diff(fractions), atol=1e-12)


def _record(**kw):
    fields = {"stage": 1, "iteration": 3, "mask_fraction": 0.2, "scale": 4.0, "model": None}
    return P.IterationRecord(**fields, packed_mask=np.zeros(1, np.uint8), shape=(2, 4), **kw)


@pytest.mark.parametrize(
    ("change", "error", "flips", "growth", "settled"),
    [
        (0.005, np.nan, 0.001, 0.001, True),  # below change_tol, few flips
        (0.02, np.nan, 0.001, 0.001, False),  # no error reported: change_tol alone
        (0.02, 0.05, 0.001, 0.001, True),  # jitter within half the statistical error
        (0.03, 0.05, 0.001, 0.001, False),  # more than half of it
        (0.02, 0.05, 0.01, 0.001, True),  # edges flicker, the mask does not grow
        (0.02, 0.05, 0.01, 0.02, False),  # the mask still grows
        (0.02, 0.05, 0.01, -0.02, False),  # ... or shrinks
    ],
)
def test_settled_judges_change_against_statistical_error(change, error, flips, growth, settled):
    pipe = P.default_pipeline(np.zeros((64, 64)))
    rec = _record(change=change, error=error, mask_change=flips, mask_growth=growth)
    assert pipe.settled(rec) is settled
    strict = P.IterativeBackground(first_guess=pipe.first_guess, stages=pipe.stages, error_tol=0.0)
    assert strict.settled(rec) is (change <= 0.01 and settled)


def test_new_pipeline_options_validated():
    st_ = P.Stage(masker=H.HysteresisMasker(), estimator=ThinPlateSmoother())
    for kw, match in (
        ({"error_tol": -1}, "error_tol"),
        ({"source_asymmetry": 1.0}, "source_asymmetry"),
        ({"stiffen": 1.0}, "stiffen"),
    ):
        with pytest.raises(ValueError, match=match):
            P.IterativeBackground(first_guess=ThinPlateSmoother(), stages=(st_,), **kw)


def test_a_settled_mask_is_not_refitted_when_a_later_fit_uses_it():
    # crowded 256^2: stage 1's second mask changes in < mask_tol of the pixels; the
    # stage stops without a refit (the record keeps the previous
    # model), and the final refit gives the background a refit would have led to
    from dataclasses import replace

    from skymap.quality.simulate import scene_by_name

    image = scene_by_name("crowded_stellar", shape=(256, 256), seed=0).image
    skipped = P.fit(image)
    refit = replace(P.default_pipeline(), refit_settled=True).fit(image)
    pairs = list(zip(skipped.history[:-1], skipped.history[1:], strict=True))
    lazy = [(a, b) for a, b in pairs if b.model is a.model]
    # stage 1's second iteration, at least (stage 0's too while its mask settles)
    assert (1, 1) in [(b.stage, b.iteration) for _, b in lazy]
    assert all(b.change == 0.0 and b.mask_change <= 0.005 and b.iteration for _, b in lazy)
    h = refit.history
    assert not any(b.model is a.model for a, b in zip(h[:-1], h[1:], strict=True))
    assert skipped.converged and "not refitted" in skipped.convergence_note
    assert len(skipped.history) == len(refit.history)
    d = np.abs(skipped.background - refit.background).max() / skipped.noise
    assert d < 0.01
    with pytest.raises(ValueError, match="refit_settled"):
        replace(P.default_pipeline(), refit_settled=1)


def test_a_fit_on_two_threads_is_the_one_thread_fit_and_leaves_the_warnings_filters(
    monkeypatch,
):
    # With two numba threads, steps run side by side (a refit's change beside its
    # tracking test, pairs of GCV solves, the noise map's solve beside the polish,
    # kernels in bands of rows): the same
    # background and mask as on one thread, bit for bit, on a frame with bright stars
    # and a blank corner (all-NaN block medians); and the fit never changes the
    # warnings filters (warnings.catch_warnings), which is not safe while another
    # thread runs: an exit can restore another thread's filters for good.
    import warnings

    import numba

    def refused(*args, **kwargs):
        raise AssertionError("the fit entered warnings.catch_warnings")

    import skymap
    from skymap.quality.simulate import scene_by_name

    image = scene_by_name("saturated_halos", shape=(768, 768), seed=3).image.astype(np.float32)
    image[:150, :200] = np.nan
    skymap.fit(image[:256, :256])  # the imports (astropy's use catch_warnings) done
    before = numba.get_num_threads()
    fits = []
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            filters = list(warnings.filters)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RuntimeWarning)
                with monkeypatch.context() as m:
                    m.setattr(warnings, "catch_warnings", refused)
                    fits.append(skymap.fit(image))
            assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
            assert list(warnings.filters) == filters
    finally:
        numba.set_num_threads(before)
    a, b = fits
    assert a.background.tobytes() == b.background.tobytes()
    assert a.mask.tobytes() == b.mask.tobytes() and a.history[-1].scale == b.history[-1].scale
