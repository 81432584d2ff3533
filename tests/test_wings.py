"""WingMasker (skymap.masking.wings): the growth of the detections into the faint light
around and between them, and the pipeline stage that runs it (default_pipeline(wings=True))."""

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi

import skymap
from skymap.masking import _wings_kernels
from skymap.masking.hysteresis import HysteresisMasker
from skymap.masking.wings import (
    FALL_SIGMA,
    MIN_OUTER,
    MIN_OUTER_SHARE,
    WingMasker,
    pedestal_codes,
    pedestal_of,
    wing_pedestal,
    wing_reach,
    wing_sums,
)

N = 256
YY, XX = np.mgrid[:N, :N].astype(float)


def _reach_by_rings(mean, dist, edges):
    """wing_reach written out ring by ring with boolean selections (equal weights)."""
    reach = 0.0
    for i in range(len(edges) - 1):
        inner = (dist >= edges[i]) & (dist < edges[i + 1])
        outer = dist >= edges[i + 1]
        if outer.sum() < max(MIN_OUTER, MIN_OUTER_SHARE * dist.size):
            break
        if inner.sum() < 2:
            continue
        a, b = mean[inner], mean[outer]
        se = np.sqrt(a.var() / a.size + b.var() / b.size)
        if a.mean() - b.mean() <= FALL_SIGMA * se:
            break
        reach = edges[i + 1]
    return reach


@pytest.mark.parametrize(
    ("amplitude", "scale", "seed"), [(2.0, 5.0, 0), (0.5, 8.0, 1), (0.0, 5.0, 2)]
)
def test_wing_reach_is_where_an_exponential_profile_stops_falling(amplitude, scale, seed):
    rng = np.random.default_rng(seed)
    dist = rng.uniform(0.0, 90.0, 30_000)
    mean = amplitude * np.exp(-dist / scale) + rng.normal(0.0, 0.4, dist.size)
    edges = [0.0, 2.0, 4.0, 6.0, 8.0]
    while edges[-1] <= dist.max():
        edges.append(edges[-1] * 1.5)
    reach = wing_reach(mean, np.ones(dist.size), dist, 2.0)
    assert reach == _reach_by_rings(mean, dist, np.array(edges))
    if amplitude == 0.0:
        assert reach == 0.0
    else:
        # the profile is still well above the noise of a ring's mean inside the reach,
        # and has fallen to about it beyond
        se = 0.4 / np.sqrt(dist.size * 10.0 / 90.0)
        assert amplitude * np.exp(-reach / scale) < 30 * se
        assert amplitude * np.exp(-reach / (1.5 * scale)) > se


def test_the_reach_stops_before_the_few_blocks_of_the_frames_emptiest_corner():
    # a profile that falls on and on (a sky fainter away from the sources), with 60 of
    # 20060 blocks (0.3%) far out at a level of its own: the reach does not go out to
    # them, as it did when 32 blocks beyond were enough
    rng = np.random.default_rng(3)
    near = rng.uniform(1, 60, 20000)
    far = rng.uniform(100, 150, 60)
    dist = np.concatenate([near, far])
    mean = -0.01 * dist + rng.normal(0, 0.05, dist.size)
    mean[near.size :] -= 1.0
    weight = np.ones(dist.size)
    assert MIN_OUTER <= far.size < 0.005 * dist.size
    reach = wing_reach(mean, weight, dist, 4.0)
    assert 0 < reach <= 100
    assert (dist >= reach).sum() >= MIN_OUTER_SHARE * dist.size


def test_block_distances_are_scipys_exact_transform_bit_for_bit():
    rng = np.random.default_rng(4)
    shapes = [(1, 1), (1, 37), (41, 1), (57, 33), (200, 300)]
    for i, (ny, nx) in enumerate(shapes * 3):
        density, unit = [0.001, 0.02, 0.3, 0.9, 0.05][i % 5], [1, 4, 2.5][i % 3]
        seeds = rng.uniform(size=(ny, nx)) < density
        seeds.flat[rng.integers(seeds.size)] = True
        want = unit * ndi.distance_transform_edt(~seeds)
        assert np.array_equal(_wings_kernels.distances(seeds, unit), want)
    # one seed in a corner: the envelope of a single parabola, and the far corner
    corner = np.zeros((300, 200), bool)
    corner[0, -1] = True
    want = 4 * ndi.distance_transform_edt(~corner)
    assert np.array_equal(_wings_kernels.distances(corner, 4), want)


def test_block_distances_of_a_band_of_rows_are_those_of_the_whole_map():
    # rows=(y0, y1) searches the rows outside for the nearest seeds above and below:
    # bands of any heights give the whole map's distances bit for bit (scipy's)
    rng = np.random.default_rng(11)
    for ny, nx, density in ((1, 30, 0.1), (90, 70, 0.002), (120, 50, 0.05), (64, 64, 0.6)):
        seeds = rng.uniform(size=(ny, nx)) < density
        seeds.flat[rng.integers(seeds.size)] = True
        want = 4 * ndi.distance_transform_edt(~seeds)
        cuts = sorted({0, ny, *rng.integers(0, ny, 4).tolist()})
        rows = zip(cuts[:-1], cuts[1:], strict=True)
        got = [_wings_kernels.distances(seeds, 4, rows=r) for r in rows]
        assert np.array_equal(np.concatenate(got), want)
    # a seedless column and a lone seed far below the band
    seeds = np.zeros((200, 5), bool)
    seeds[190, 2] = True
    want = 4 * ndi.distance_transform_edt(~seeds)
    assert np.array_equal(_wings_kernels.distances(seeds, 4, rows=(10, 20)), want[10:20])


def test_ring_sums_are_numpys_digitized_bincounts_bit_for_bit():
    # every value with a given mean, and the blocks a mask selects with their mean
    # num / cnt (the pedestal's grids), against the gathered arrays' digitize + bincount
    rng = np.random.default_rng(5)
    for n in (1, 7, 20_000):
        # block distances (values on the edges) and arbitrary ones
        for dist in (4.0 * np.floor(rng.uniform(0, 60, n)), rng.uniform(0, 300, n)):
            num, cnt = rng.normal(size=n) * 16, rng.integers(0, 17, n).astype(float)
            keep = cnt > 0
            keep[0] = True  # one value at least
            cnt[0] = max(cnt[0], 1.0)
            edges = [0.0, 4.0, 8.0, 12.0, 16.0]
            while edges[-1] <= dist.max():
                edges.append(edges[-1] * 1.5)
            edges = np.asarray(edges)
            for sel in (np.zeros(0, bool), keep):
                if sel.size == 0:  # all the values: all with pixels
                    cnt = np.maximum(cnt, 1.0)
                take = slice(None) if sel.size == 0 else sel
                mean = num[take] / cnt[take]
                weight, d = cnt[take], dist[take]
                ring, m = np.digitize(d, edges) - 1, edges.size
                square = np.square(mean)
                square *= weight
                want = [np.bincount(ring, weights=weight, minlength=m),
                        np.bincount(ring, weights=weight * mean, minlength=m),
                        np.bincount(ring, weights=square, minlength=m),
                        np.bincount(ring, minlength=m).astype(np.float64)]  # fmt: skip
                got = _wings_kernels.ring_sums(num, cnt, cnt, dist, sel, edges)
                assert np.array_equal(got, want)
                every = np.zeros(0, bool)
                given = _wings_kernels.ring_sums(mean, np.ones(1), weight, d, every, edges)
                assert np.array_equal(given, want)


def test_wing_sums_of_aligned_tiles_are_the_whole_images():
    rng = np.random.default_rng(3)
    v = rng.normal(size=(64, 48))
    ex, bad = rng.uniform(size=v.shape) < 0.3, rng.uniform(size=v.shape) < 0.1
    whole = wing_sums(v, ex, bad, 8)
    part = wing_sums(v[16:48, 8:40], ex[16:48, 8:40], bad[16:48, 8:40], 8)
    assert np.array_equal(part, whole[:, 2:6, 1:5])
    assert np.array_equal(whole[1], np.add.reduceat(np.add.reduceat(~ex, np.arange(0, 64, 8), 0),
                                                    np.arange(0, 48, 8), 1))  # fmt: skip


def test_wings_reach_further_than_the_plain_masker_and_not_into_empty_sky():
    rng = np.random.default_rng(2)
    r = np.hypot(YY - 128, XX - 128)
    img = 6.0 * np.exp(-r / 6.0) + rng.normal(size=r.shape)
    plain = HysteresisMasker()(img, 1.0)
    deep = WingMasker()(img, 1.0)
    assert not (plain & ~deep).any()  # it only adds
    # it reaches where the exponential is below a per-pixel threshold's reach
    assert r[deep].max() > r[plain].max() + 4
    assert deep[r > 60].mean() < 0.01


def test_on_pure_noise_the_wings_add_nothing():
    img = np.random.default_rng(5).normal(size=(N, N))
    assert np.array_equal(WingMasker()(img, 1.0), HysteresisMasker()(img, 1.0))


def test_wing_masker_checks_its_options():
    with pytest.raises(ValueError, match="wing_threshold"):
        WingMasker(wing_threshold=0.0)
    with pytest.raises(ValueError, match="wing_scale"):
        WingMasker(wing_scale=-1.0)
    for name in ("wings", "halos", "wing_pedestal"):
        with pytest.raises(ValueError, match=f"{name} must be True or False"):
            skymap.fit(np.zeros((64, 64)), **{name: "yes"})


def _deep_field(seed=1, count=400):
    """Hundreds of faint exponential galaxies on a flat sky of 0: most of their light is
    in wings under the noise."""
    rng = np.random.default_rng(seed)
    src = np.zeros((N, N))
    for _ in range(count):
        y, x = rng.uniform(0, N, 2)
        h, a = rng.uniform(1.5, 5.0), 0.8 * rng.pareto(1.5) + 0.3
        src += a * np.exp(-np.hypot(YY - y, XX - x) / h)
    return src + rng.normal(size=(N, N))


def test_a_deep_field_fits_lower_with_wings():
    img = _deep_field()
    plain, deep = skymap.fit(img), skymap.fit(img, wings=True)
    assert max(h.stage for h in deep.history[:-1]) == 2  # the wing stage ran
    # the true sky is 0: the fit absorbs less of the unmasked wing light
    assert deep.converged and "stage 2" in deep.convergence_note
    assert np.mean(deep.background) < 0.9 * np.mean(plain.background)
    assert deep.mask.mean() > plain.mask.mean() + 0.01


def test_the_wing_stage_adds_nothing_where_no_profile_falls():
    # one compact source on white noise: the fit is not found tracking, the wing stage
    # runs, finds no falling profile and leaves stage 1's mask and background alone
    img = np.random.default_rng(6).normal(size=(N, N))
    img[100:110, 100:110] += 10
    plain, deep = skymap.fit(img), skymap.fit(img, wings=True)
    assert all(h.tracking < 0.25 or h.tracking != h.tracking for h in plain.history)
    assert {h.stage for h in deep.history} == {-1, 0, 1, 2, 3}
    assert np.array_equal(deep.mask, plain.mask)
    np.testing.assert_allclose(deep.background, plain.background, rtol=0, atol=1e-6)


def test_a_tiled_fit_with_wings_equals_the_in_memory_one():
    img = _deep_field().astype(np.float32)
    ref = skymap.fit(img, wings=True)
    with dask.config.set(scheduler="sync"):
        tiled = skymap.fit(da.from_array(img, chunks=128), tile=128, wings=True)
        bkg, mask = dask.compute(tiled.background, tiled.mask)
    assert max(h.stage for h in ref.history[:-1]) == 2
    assert np.array_equal(mask, ref.mask)
    np.testing.assert_allclose(bkg, ref.background, rtol=0, atol=1e-6 * float(ref.noise))


def test_the_wing_pedestal_brings_a_deep_fields_fit_down_towards_its_sky():
    # the true sky is 0; without the pedestal the fit takes in the unmasked wings
    img = _deep_field()
    fit, plain = skymap.fit(img), skymap.fit(img, wing_pedestal=False)
    assert fit.pedestal > 0.01 * float(fit.noise)
    np.testing.assert_allclose(fit.background, plain.background - fit.pedestal, atol=1e-6)
    assert 0 < np.mean(fit.background) < np.mean(plain.background)
    # the command line's metrics and report say by how much it was lowered
    from skymap.app.cli.common import sky_scale

    assert sky_scale(fit)["wing_pedestal"] == fit.pedestal
    assert sky_scale(plain)["wing_pedestal"] == 0.0


def _wings_on(rng, shape, count, sky):
    """A residual of exponential wings (scale 4 px) around ``count`` detections (the
    mask: within 5 px) on a sky at ``sky``, white noise of 0.5; and the mask."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(float)
    light, mask = np.zeros(shape), np.zeros(shape, bool)
    for y, x in rng.uniform(10, N - 10, (count, 2)):
        r = np.hypot(yy - y, xx - x)
        light += 4.0 * np.exp(-r / 4.0)
        mask |= r < 5
    return light + sky + rng.normal(0, 0.5, light.shape), mask


def test_the_wing_pedestal_is_the_sky_level_beyond_the_reach():
    # a residual whose sky beyond the wings sits at -0.3: exponential wings around
    # detections (the mask), white noise; against the mean taken directly
    rng = np.random.default_rng(7)
    res, mask = _wings_on(rng, (N, N), 30, -0.3)
    sums = wing_sums(res, mask, np.zeros_like(mask), 4)
    num, cnt, _ = sums
    seeds = cnt <= 8
    dist = 4 * ndi.distance_transform_edt(~seeds)
    free = (cnt > 0) & ~seeds
    reach = wing_reach(num[free] / cnt[free], cnt[free], dist[free], 4.0)
    assert reach > 0
    beyond = free & (dist >= reach)
    assert wing_pedestal(sums, res.shape, b=4) == pytest.approx(
        -num[beyond].sum() / cnt[beyond].sum()
    )
    assert wing_pedestal(sums, res.shape, b=4) == pytest.approx(0.3, abs=0.05)
    # a sky above the fit is not lowered, and flat noise has no profile
    up = wing_sums(res + 1.0, mask, np.zeros_like(mask), 4)
    assert wing_pedestal(up, res.shape, b=4) == 0.0
    flat = wing_sums(rng.normal(size=(N, N)), mask, np.zeros_like(mask), 4)
    assert wing_pedestal(flat, res.shape, b=4) == 0.0


def test_the_wing_pedestal_read_in_bands_is_the_whole_grids_bit_for_bit():
    # what the tiled back end does: codes per tile (their origin), the sums a band of
    # rows at a time; the same pedestal as the whole grid's, and the level is the
    # free blocks' mean beyond the reach (sums taken directly)
    res, mask = _wings_on(np.random.default_rng(3), (N, N + 64), 40, -0.2)
    sums = wing_sums(res, mask, np.zeros_like(mask), 4)
    whole = wing_pedestal(sums, res.shape, b=4)
    codes = pedestal_codes(sums, res.shape, b=4)
    tiles = [
        [pedestal_codes(sums[:, i : i + 16, j : j + 24], res.shape, b=4, origin=(4 * i, 4 * j))
         for j in range(0, sums.shape[2], 24)]
        for i in range(0, sums.shape[1], 16)
    ]  # fmt: skip
    assert np.array_equal(np.block(tiles), codes)
    for cuts in ([0, 64], [0, 16, 32, 48, 64], [0, 1, 63, 64], [0, 40, 64]):
        rows = list(zip(cuts[:-1], cuts[1:], strict=True))
        read = []

        def band(k, rows=rows, read=read):
            read.append(k)
            return sums[:, slice(*rows[k])]

        got = pedestal_of(codes, band, rows, b=4)
        assert got == whole
        assert read == list(range(len(rows)))  # each band once, in order
    num, cnt, _ = sums
    seeds, free = (codes & 1) > 0, (codes & 2) > 0
    dist = 4 * ndi.distance_transform_edt(~seeds)
    reach = wing_reach(num[free] / cnt[free], cnt[free], dist[free], 4.0)
    beyond = free & (dist >= reach)
    assert whole == pytest.approx(-num[beyond].sum() / cnt[beyond].sum(), rel=1e-12)
    assert whole == pytest.approx(0.2, abs=0.05)


def test_a_tiled_pedestal_never_gathers_the_whole_grid():
    # the driver holds the codes and one row of tiles' sums at a time (flat memory),
    # and the tiled fit equals the in-memory one bit for bit
    from skymap.backends.dask import DaskBackend

    img = _deep_field()
    bands, gathered = [], []
    original_bands, original_grid = DaskBackend.cell_grid_bands, DaskBackend.cell_grid

    def bands_of(self, *args, **kw):
        codes, read, rows = original_bands(self, *args, **kw)

        def reading(k):
            band = read(k)
            bands.append(band.shape)
            return band

        return codes, reading, rows

    def grid_of(self, func, *args, **kw):
        gathered.append(func.__name__)
        return original_grid(self, func, *args, **kw)

    ref = skymap.fit(img)
    DaskBackend.cell_grid_bands, DaskBackend.cell_grid = bands_of, grid_of
    try:
        with dask.config.set(scheduler="sync"):
            tiled = skymap.fit(da.from_array(img, chunks=128), tile=128)
            bkg, mask = dask.compute(tiled.background, tiled.mask)
    finally:
        DaskBackend.cell_grid_bands, DaskBackend.cell_grid = original_bands, original_grid
    assert ref.pedestal > 0 and tiled.pedestal == ref.pedestal
    assert np.array_equal(bkg, ref.background) and np.array_equal(mask, ref.mask)
    assert "residual_sums" not in gathered
    gy = -(-img.shape[0] // 4)
    assert bands == [(2, 32, -(-img.shape[1] // 4))] * (gy // 32)  # rows of tiles
    # bands cut to BAND_BYTES: the same fit
    import skymap.backends.dask as dask_backend

    budget, bands[:] = dask_backend.BAND_BYTES, []
    dask_backend.BAND_BYTES = 8 * 2 * 64 * 5  # 5 rows of the 64-block-wide grid
    DaskBackend.cell_grid_bands = bands_of
    try:
        with dask.config.set(scheduler="sync"):
            cut = skymap.fit(da.from_array(img, chunks=128), tile=128)
    finally:
        DaskBackend.cell_grid_bands, dask_backend.BAND_BYTES = original_bands, budget
    assert cut.pedestal == ref.pedestal
    assert [b[1] for b in bands] == [5] * 6 + [2] + [5] * 6 + [2]


def test_seed_and_free_blocks_in_one_pass_equal_the_area_formula():
    # _seeds_free's compiled pass against the block areas' formula (partial blocks at
    # the far edges), counts drawn up to each block's area
    from skymap.masking.wings import _seeds_free

    rng = np.random.default_rng(4)
    for shape, b in (((1001, 999), 4), ((37, 50), 8), ((64, 64), 4)):
        gy, gx = -(-shape[0] // b), -(-shape[1] // b)
        hy = np.minimum(b, shape[0] - b * np.arange(gy))
        hx = np.minimum(b, shape[1] - b * np.arange(gx))
        area = np.outer(hy, hx).astype(np.float64)
        cnt = np.floor(rng.random((gy, gx)) * (area + 1))
        nbad = np.floor(rng.random((gy, gx)) * (area - cnt + 1))
        seeds, free = _seeds_free(np.stack([np.zeros((gy, gx)), cnt, nbad]), shape, b)
        want = (cnt <= 0.5 * area) & (nbad < 0.5 * area)
        assert np.array_equal(seeds, want) and want.any() and (~want).any()
        assert np.array_equal(free, (cnt > 0) & ~want)
