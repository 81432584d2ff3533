"""Bright sources and their halos (skymap.masking.bright), and the default pipeline's
masks on pure noise, white and correlated."""

from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
from astropy.io import fits
from astropy.stats import sigma_clipped_stats

import skymap
from skymap.masking import BrightSources, HaloMasker, radial_profiles

DATA = Path(__file__).parent / "data"


def _star(shape, y0, x0, flux, *, fwhm=3.0, beta=3.0, halo=0.03, halo_alpha=4.0):
    """Moffat core plus a power-law aureole (a Moffat of beta 1.5) carrying ``halo``
    of the flux; returns the image and its surface-brightness function of radius."""
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    a_core = (1 - halo) * flux * (beta - 1) / (np.pi * alpha**2)
    a_halo = halo * flux * 0.5 / (np.pi * halo_alpha**2)

    def profile(r):
        return (
            a_core * (1 + (r / alpha) ** 2) ** -beta + a_halo * (1 + (r / halo_alpha) ** 2) ** -1.5
        )

    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return profile(np.hypot(yy - y0, xx - x0)), profile


def _true_radius(profile, level):
    r = np.linspace(0.5, 600, 20000)
    return float(r[np.nonzero(profile(r) > level)[0][-1]])


def test_radial_profiles_equal_brute_force_ring_medians():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(60, 70))
    img[5:9, 40:44] = np.nan
    y, x = [30.3, 8.0], [35.6, 41.2]
    r, med, n = radial_profiles(img, y, x, 12.0)
    edges = [0.0, 1.5, 2.5, 3.5, 5.0, 7.0, 10.0, 12.0]
    yy, xx = np.mgrid[:60, :70]
    for k in range(2):
        d = np.hypot(yy - y[k], xx - x[k])
        for j in range(len(edges) - 1):
            sel = (d >= edges[j]) & (d < edges[j + 1]) & np.isfinite(img)
            assert n[k, j] == sel.sum()
            assert med[k, j] == pytest.approx(np.median(img[sel]), abs=1e-12)
            assert r[k, j] == pytest.approx(d[sel].mean())


def test_halo_radius_grows_with_flux_as_the_profile_says():
    # Three isolated stars of 1e4, 1e5 and 1e6 on white noise of 1: the mask radius
    # must follow where each star's own profile falls to wing * sigma.
    shape = (600, 600)
    rng = np.random.default_rng(1)
    img = rng.normal(size=shape)
    profiles = []
    for (y0, x0), flux in zip([(150, 150), (150, 450), (420, 300)], [1e4, 1e5, 1e6], strict=True):
        star, prof = _star(shape, y0, x0, flux)
        img += star
        profiles.append(prof)
    found = HaloMasker().find(img)
    order = np.argsort(found.x + 1000 * (found.y > 300))  # left, right, bottom
    assert len(found) == 3
    radii = found.radius[order]
    assert radii[0] < radii[1] < radii[2]
    for r, prof in zip(radii, profiles, strict=True):
        true = _true_radius(prof, HaloMasker().wing * found.noise)
        assert 0.7 * true <= r <= 1.5 * true, (r, true)


def test_flat_topped_and_nan_cores_are_saturated_and_centred():
    shape = (300, 300)
    rng = np.random.default_rng(2)
    star, _ = _star(shape, 140.3, 160.6, 3e6)
    img = rng.normal(size=shape) + star
    clipped = np.minimum(img, 3000.0)
    holed = np.where(img > 3000.0, np.nan, img)
    unclipped = HaloMasker().find(img)
    for im in (clipped, holed):
        found = HaloMasker().find(im)
        assert len(found) == 1 and bool(found.saturated[0])
        assert found.y[0] == pytest.approx(140.3, abs=0.5)
        assert found.x[0] == pytest.approx(160.6, abs=0.5)
        # The amplitude comes from the wings: clipping does not shrink the halo.
        assert found.radius[0] == pytest.approx(unclipped.radius[0], rel=0.15)
    assert not unclipped.saturated[0]


def test_flagged_core_in_the_mask_is_a_saturated_core():
    shape = (200, 200)
    rng = np.random.default_rng(3)
    star, _ = _star(shape, 100, 100, 1e6)
    img = rng.normal(size=shape) + star
    flags = img > 2000.0
    img[flags] = 2000.0 + rng.normal(size=flags.sum())  # not flat: only the flag says so
    masker = HaloMasker()
    found = masker.find(img, None, flags)
    assert len(found) == 1 and bool(found.saturated[0])
    m = masker(img, None, flags)
    assert not (m & flags).any()  # detections only, the given mask left out
    assert m[100, 100 + int(found.radius[0]) - 1] and not m[100, 100 + int(found.radius[0]) + 2]


def test_paint_windows_tile_the_full_mask():
    src = BrightSources(
        x=np.array([10.2, 40.0]),
        y=np.array([12.5, 30.0]),
        amplitude=np.ones(2),
        saturated=np.zeros(2, bool),
        radius=np.array([7.5, 15.0]),
        profile_radius=np.zeros(0),
        profile=np.zeros(0),
        noise=1.0,
    )
    masker = HaloMasker()
    full = masker.paint(src, (50, 60))
    yy, xx = np.mgrid[:50, :60]
    want = (np.hypot(yy - 12.5, xx - 10.2) <= 7.5) | (np.hypot(yy - 30, xx - 40) <= 15)
    np.testing.assert_array_equal(full, want)
    tiles = np.block(
        [[masker.paint(src, (50, 60), (a, b), (c, d)) for c, d in ((0, 25), (25, 60))]
         for a, b in ((0, 20), (20, 50))]
    )  # fmt: skip
    np.testing.assert_array_equal(tiles, full)


def test_halo_masker_rejects_bad_settings():
    with pytest.raises(ValueError, match="wing"):
        HaloMasker(wing=0)
    with pytest.raises(ValueError, match="seed must be <= nsigma"):
        HaloMasker(seed=60, nsigma=50)
    with pytest.raises(ValueError, match="stack"):
        HaloMasker(stack=0)


def test_saturated_star_on_a_real_plate_is_masked_with_its_halo():
    # A 256x256 cutout of a 1949 photographic plate (tests/data/README.md): the star
    # centred near (x, y) = (78, 128) is saturated at the plate's density limit (its
    # plateau spans x = 50-105), with a halo.
    img = fits.getdata(DATA / "plate_ngc6819_saturated.fits").astype(np.float32)
    found = HaloMasker().find(img)
    i = int(np.argmin(np.hypot(found.x - 78, found.y - 128)))
    assert np.hypot(found.x[i] - 78, found.y[i] - 128) < 4
    assert bool(found.saturated[i])
    assert found.radius[i] >= 40
    m = HaloMasker()(img)
    assert m[128, 78] and m[128, 78 + 40] and m.mean() < 0.5
    # The halo really is there: the image 40 px out is still well above the sky
    # 90-120 px out, by more than the noise (so a background fitted through it
    # would rise).
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    d = np.hypot(yy - 128, xx - 78)
    _, sky, _ = sigma_clipped_stats(img[(d >= 90) & (d < 120)], sigma=3.0)
    _, ring40, _ = sigma_clipped_stats(img[(d >= 36) & (d < 44)], sigma=3.0)
    assert ring40 - sky > found.noise


@pytest.mark.parametrize("kernel", ["white", "gauss0.7", "gauss3", "box3"])
def test_pure_noise_white_or_correlated_is_not_masked(kernel):
    # Drizzled, resampled or mosaicked images have noise correlated over a few
    # pixels: the thresholds are in units of the noise measured at each scale, so
    # pure noise of any of these kinds gives a mask under 1%.
    rng = np.random.default_rng(4)
    w = rng.normal(size=(256, 256))
    if kernel.startswith("gauss"):
        w = ndi.gaussian_filter(w, float(kernel[5:]))
    elif kernel == "box3":
        w = ndi.uniform_filter(w, 3)
    img = (100 + w / w.std()).astype(np.float32)
    res = skymap.fit(img)
    assert res.source_mask.mean() < 0.01


def test_the_halo_finder_labels_regions_as_scipy_numbers_them():
    # the bright regions' labels (sources are ordered by them on ties) come from a
    # labelling that visits the region pixels only: equal to scipy's, number for number
    from skymap.masking._bright_kernels import label8

    rng = np.random.default_rng(4)
    for shape, p in [((61, 83), 0.45), ((40, 9), 0.6), ((128, 128), 0.05)]:
        region = rng.random(shape) < p
        labels, n = label8(region)
        want, m = ndi.label(region, structure=np.ones((3, 3), bool))
        assert n == m
        np.testing.assert_array_equal(labels, want)
    # one region whose labelling holds ~94 000 pixels on its stack at once (it starts
    # at 65 536 entries and is grown between passes of the labelling loop)
    region = np.ones((700, 400), bool)
    region[::7, 3::11] = False
    region[:, 300] = False
    labels, n = label8(region)
    want, m = ndi.label(region, structure=np.ones((3, 3), bool))
    assert n == m == 2
    np.testing.assert_array_equal(labels, want)


def test_extended_emission_around_the_brightest_peak_is_not_a_halo():
    # A nebula's knot: far above the noise, but its light falls slower than 1/r, which
    # no point source's wings do (finite flux). The halo finder must not spread it
    # over the frame as the "halo" of every bright source (the Galactic-centre MIPS
    # frame with an injected sky had 80% of its pixels masked that way).
    rng = np.random.default_rng(2)
    n = 256
    yy, xx = np.mgrid[:n, :n]
    r = np.hypot(yy - 128.0, xx - 128.0)
    knot = 400.0 / np.sqrt(1.0 + r / 3.0)
    img = (100 + knot + rng.normal(size=(n, n))).astype(np.float32)
    found = HaloMasker().find(img)
    assert len(found) == 0
    # The same peak with a point source's wings (r**-3) keeps its halo.
    star = 400.0 / (1.0 + r / 3.0) ** 3
    found = HaloMasker().find((100 + star + rng.normal(size=(n, n))).astype(np.float32))
    assert len(found) >= 1 and found.radius.max() > 5


def test_box_means_are_scipys_3x3_means_of_image_minus_sky_in_any_window():
    # The halo finder's 3x3 means (in memory at the region pixels, on tiles in each
    # window) against scipy's uniform filter of the whole (image - sky) map, invalid
    # pixels as 0; a window cut at an offset gives the whole image's numbers at its
    # inner pixels (float32 and float64, with invalid pixels and the image's edges)
    from scipy.ndimage import uniform_filter

    from skymap.masking import bright as B

    rng = np.random.default_rng(7)
    for dtype, shape in [(np.float32, (70, 90)), (np.float64, (33, 130))]:
        img = rng.normal(size=shape).astype(dtype)
        img[rng.random(shape) < 0.01] = np.nan
        invalid = ~np.isfinite(img) | (rng.random(shape) < 0.05)
        sky = B._CoarseSky(img, invalid, 16)
        full = np.repeat(np.repeat(sky.grid, 16, 0), 16, 1)[: shape[0], : shape[1]]
        values = np.where(invalid, 0.0, img.astype(np.float64) - full)
        want = uniform_filter(values, 3, mode="nearest")
        flat = np.flatnonzero(rng.random(shape) < 0.3)
        got = B.box_means(img, sky.grid, 16, invalid, flat)
        np.testing.assert_allclose(got, want.ravel()[flat], rtol=0, atol=1e-6)
        # a window starting at (5, 21): its inner pixels
        win = (slice(5, 30), slice(21, 80))
        sub = img[win]
        wy, wx = np.mgrid[1:24, 1:58]
        inner = (wy * sub.shape[1] + wx).ravel()
        at = B.box_means(sub, sky.grid, 16, invalid[win], inner, (5, 21))
        whole = ((wy + 5) * shape[1] + wx + 21).ravel()
        np.testing.assert_array_equal(at, B.box_means(img, sky.grid, 16, invalid, whole))


@pytest.mark.parametrize("fall", [0.0, 0.2])
def test_a_plateau_around_the_brightest_star_is_not_its_halo(fall):
    # A saturated star on a bright patch of sky that falls slowly (as r**-fall: a
    # nebula's knot, or a faint galaxy under it: the Galactic-centre MIPS frame with
    # an injected disc had 82% of its pixels masked this way; with its blank border
    # masked, its flagged sources on the nebula got 80-95 px halos). The patch's rings
    # were carried outwards and every bright source got a 100-px halo. The stars'
    # wings (r**-3) reach 0.5 sigma at ~36 px.
    rng = np.random.default_rng(1)
    n = 600
    yy, xx = np.mgrid[:n, :n]
    r = np.hypot(yy - 300.0, xx - 300.0)
    patch = np.interp(r, [0, 60, 75], [30.0, 29.94, 0.0]) * (np.maximum(r, 5) / 5) ** -fall
    img = np.where(r < 75, 0.0, rng.normal(size=(n, n))) + patch
    img += 200.0 * (5.0 / np.maximum(r, 5.0)) ** 3
    img[r < 5] = np.nan
    for y, x in [(100, 100), (500, 480), (120, 450)]:
        img += 3e3 * (1 + ((yy - y) ** 2 + (xx - x) ** 2) / 4.0) ** -1.5
    found = HaloMasker().find(img)
    assert len(found) == 4 and found.saturated.sum() == 1
    assert np.all((found.radius > 25) & (found.radius < 50)), found.radius


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_median_rows_are_numpys_medians_bit_for_bit(dtype):
    from skymap._select_kernels import median_rows

    rng = np.random.default_rng(3)
    for n in (1, 2, 65, 1024):
        a = rng.normal(size=(12, n)).astype(dtype)
        a[2:5] = rng.integers(-2, 3, size=(3, n))  # ties at the middle ranks
        a[6] = 1.5
        a[8, n // 2] = np.nan  # left to the caller
        out = np.zeros(12, dtype)
        full = median_rows(a, out)
        assert full.tolist() == [i != 8 for i in range(12)]
        assert out[full].tobytes() == np.median(a[full], axis=1).tobytes()


def _knots(levels, seed, n=400):
    # Flat-topped blobs a few sigma above the sky (a nebula's knots; or, when their
    # tops share one level, a plate's saturated stars) and 12 bright point sources,
    # whose 1-pixel tops set the typical top.
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n]
    img = rng.normal(size=(n, n))
    spots = [(y, x) for y in range(50, n - 40, 75) for x in range(50, n - 40, 75)]
    for (y, x), a in zip(rng.permutation(spots), levels, strict=False):
        img += np.minimum(1.6 * a * np.exp(-(((yy - y) ** 2 + (xx - x) ** 2) / 81.0)), a)
    for y, x in rng.uniform(20, n - 20, (12, 2)):
        img += 80.0 * (1 + ((yy - y) ** 2 + (xx - x) ** 2) / 3.0) ** -2.5
    return img


@pytest.mark.parametrize("seed", [0, 1])
def test_faint_flat_tops_at_their_own_levels_are_not_saturated(seed):
    # Knots of emission flat at 6, 10.5 and 15 sigma, each at its own level, are not
    # clipped cores: which of them came out flat swung with the noise, and the
    # "saturated" ones led the halo profile (the Galactic-centre MIPS frame: 31 such
    # tops spread over 36 sigma; 72 to 161 sources masked as the frame was flipped).
    # The 12 point sources make the catalogue. Flat tops at one level (a clipped
    # scale, an emulsion's density limit) are saturated cores.
    found = HaloMasker().find(_knots([6.0, 10.5, 15.0], seed))
    assert len(found) == 12 and not found.saturated.any()
    assert HaloMasker().find(_knots([9.0, 9.0, 9.0], seed)).saturated.sum() >= 2


def test_saturated_stars_sunk_in_emission_plateaus_give_no_halo_profile():
    # Every star of the stack has a flagged core in a knot of emission flat out to
    # ~40 px: outside the cores the rings are a plateau, and the stacked profile was
    # 1-2 rings long, every radius then its extrapolation (the MIPS frame's NaN-core
    # stars on the nebula). Fewer than MIN_RINGS rings: no halos.
    rng = np.random.default_rng(0)
    n = 512
    yy, xx = np.mgrid[:n, :n]
    img = rng.normal(size=(n, n))
    for y in (90, 250, 420):
        for x in (90, 250, 420):
            r = np.hypot(yy - y, xx - x)
            img += rng.uniform(20, 40) * np.exp(-((r / 45.0) ** 4))
            img += 300.0 * (1 + r**2 / 4.0) ** -1.5
            img[r < 3] = np.nan
    assert len(HaloMasker().find(img)) == 0


@pytest.mark.parametrize("passing, expect", [((1, 2, 3, 4, 5), 1), ((6, 7), None), ((), None)])
def test_a_lead_whose_rings_are_no_halo_does_not_speak_for_the_frame(monkeypatch, passing, expect):
    # Which source leads swung with the noise where the brightest few are flat-topped
    # knots of about one size (M51: no halos in 2 of 6 injected fits; a 2MASS tile: 0
    # or 190 sources). Where the first lead's rings are no halo, the frame has a profile
    # when most of the stack, each leading, give one; the brightest of those leads.
    rng = np.random.default_rng(0)
    n = 256
    yy, xx = np.mgrid[:n, :n]
    img = rng.normal(size=(n, n))
    for y, x in [(40, 40), (40, 210), (210, 40), (210, 210), (128, 40), (128, 210),
                 (40, 128), (210, 128)]:  # fmt: skip
        img += 3e3 * (1 + ((yy - y) ** 2 + (xx - x) ** 2) / 4.0) ** -1.5
    leads = []

    def led(self, p, lead, radii, core):
        leads.append(lead)
        return np.full(radii.size, float(lead + 1)) if lead in passing else None

    monkeypatch.setattr(HaloMasker, "_led_profile", led)
    found = HaloMasker().find(img)
    assert leads[0] == 0  # the brightest is asked first
    if expect is None:
        assert len(found) == 0
    else:
        assert len(found) > 0 and np.all(found.profile == expect + 1)


def test_a_galaxy_filling_its_frame_keeps_its_halo_answer_under_an_added_sky():
    # M51 (tests/data/README.md): the brightest regions are the galaxy's flat-topped
    # knots, cores of 1.7-2.0 px. Which of them led the stack swung with a smooth sky
    # of 1-3 sigma added (the injection test's), and with the first lead's rings no
    # halo, 4 of 12 injected frames got no halo disks at all where the others got ~30.
    from skymap.quality.injection import prepare
    from skymap.quality.signals import make_injections

    img = fits.getdata(DATA / "m51_kpno_b.fits").astype(np.float32)
    prep = prepare(img)
    counts = [len(HaloMasker().find(prep.image, mask=prep.bad))]
    for seed in (0, 7):
        for trial in range(3):
            sky = make_injections(img.shape, prep.sigma, kinds=("sky",), seed=seed, trial=trial)
            added = prep.image + sky["sky"].signal.astype(np.float32)
            counts.append(len(HaloMasker().find(added, mask=prep.bad)))
    assert min(counts) >= 20 and max(counts) <= 40, counts


def _region_stats_by_sorting(where, lab, bad, vals, box, n, width):
    """region_stats as it was written with numpy: sorted by label, then value."""
    vals = np.where(bad, -np.inf, vals)
    order = np.lexsort((vals, lab))
    where, lab, bad, vals, box = where[order], lab[order], bad[order], vals[order], box[order]
    last = np.cumsum(np.bincount(lab, minlength=n)) - 1
    peak = vals[last]
    boxmax = np.full(n, -np.inf)
    np.maximum.at(boxmax, lab, box)
    near = vals >= 0.9 * peak[lab]
    core = near | bad
    ry, rx = np.divmod(where, width)
    py, px = np.divmod(where[last], width)
    return {
        "peak_y": py,
        "peak_x": px,
        "masked": np.bincount(lab, bad, minlength=n),
        "boxmax": boxmax,
        "top": np.bincount(lab, near, minlength=n),
        "repeats": np.bincount(lab, vals >= peak[lab] - 1e-6 * np.abs(peak[lab]), minlength=n),
        "area": np.bincount(lab, core, minlength=n),
        "sum_y": np.bincount(lab, core * ry, minlength=n),
        "sum_x": np.bincount(lab, core * rx, minlength=n),
    }


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_region_stats_equal_those_of_sorting_the_pixels(dtype):
    # peaks with ties (the last in C order wins), clipped cores (repeats), regions
    # wholly excluded (a peak of -inf), values near 90% of the peak
    from skymap.masking.bright import region_stats

    rng = np.random.default_rng(9)
    n, width = 300, 97
    where = np.sort(rng.choice(97 * 80, 5000, replace=False)).astype(np.int64)
    lab = rng.integers(0, n, where.size)
    lab[:n] = np.arange(n)  # every region holds a pixel
    vals = np.round(rng.exponential(3.0, where.size), 1).astype(dtype)
    bad = rng.random(where.size) < 0.1
    bad[lab == 7] = True
    box = rng.normal(size=where.size)
    got = region_stats(where, lab, bad, vals, box, n, width)
    want = _region_stats_by_sorting(where, lab, bad, vals, box, n, width)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        assert got[key].dtype == want[key].dtype, key


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_above_sky_is_numpys_difference_against_the_threshold(dtype):
    # one pass against numpy's image - expanded sky > threshold (the threshold in the
    # difference's dtype: 0.1 is not a float32), NaN pixels, a window off the origin
    from skymap.masking.bright import above_sky

    rng = np.random.default_rng(10)
    img = rng.normal(size=(70, 90)).astype(dtype)
    img[3, 4] = np.nan
    grid = rng.normal(size=(5, 6)).astype(np.float32) * 0.1
    invalid = rng.random(img.shape) < 0.1
    sky = np.repeat(np.repeat(grid, 16, axis=0), 16, axis=1)
    for (y0, x0), thr in (((0, 0), 0.1), ((7, 21), 0.3)):
        win = img[: 70 - y0, : 90 - x0]
        with np.errstate(invalid="ignore"):
            want = win - sky[y0 : y0 + win.shape[0], x0 : x0 + win.shape[1]] > thr
        want &= ~invalid[: win.shape[0], : win.shape[1]]
        got = above_sky(win, grid, 16, thr, invalid[: win.shape[0], : win.shape[1]], (y0, x0))
        np.testing.assert_array_equal(got, want)


def test_profile_match_is_numpys_median_ratio():
    # HaloMasker's scale of one profile on another: the median ratio over the rings
    # both measured, as np.median gives it (odd and even counts, ties, none)
    from skymap.masking.bright import _match

    rng = np.random.default_rng(11)
    for _ in range(2000):
        p = np.round(rng.normal(size=rng.integers(1, 25)) * 10.0 ** rng.uniform(-3, 3), 2)
        ref = np.round(rng.normal(size=rng.integers(1, 25)), 1)
        p[rng.random(p.size) < 0.2] = np.nan
        m = min(p.size, ref.size)
        ok = np.isfinite(p[:m]) & (ref[:m] > 0)
        want = float(np.median(p[:m][ok] / ref[:m][ok])) if ok.any() else float("nan")
        got = _match(p, ref)
        assert got == want or (np.isnan(got) and np.isnan(want))


def test_nan_cores_join_their_regions_with_their_pixels_values_and_box_means():
    # The candidates' labelling runs beside their per-pixel values; NaN cores that
    # join a region afterwards get theirs merged in place: the statistics equal those
    # of the joined pixels measured directly (region_stats of the same pixels).
    from skymap.masking import bright as B

    rng = np.random.default_rng(6)
    shape = (400, 400)
    img = rng.normal(size=shape).astype(np.float32)
    for y, x in ((100, 120), (300, 260), (200, 50)):
        star, _ = _star(shape, y, x, 4e5)
        img += star.astype(np.float32)
        img[y - 2 : y + 3, x - 2 : x + 3] = np.nan
    masker = HaloMasker()
    invalid = ~np.isfinite(img)
    sky = B._CoarseSky(img, invalid, B.SKY_BLOCK)
    step = B.mad_step(shape)
    det = sky.subsample(step)
    det[invalid[::step, ::step]] = np.nan
    sigma = B.mad_sigma(det)
    stats = masker._candidates(sky, invalid, sigma, masker.limit(shape))
    # the reference: scipy's 8-connected labels of the region with its touching NaN
    # cores, every statistic from those pixels
    region = B.touching(sky.above(masker.seed * sigma, invalid), invalid)
    pieces, _ = ndi.label(invalid, structure=np.ones((3, 3), bool))
    cores = np.isin(pieces, np.unique(pieces[region & invalid])) & (pieces > 0)
    labels, n = ndi.label(region | cores, structure=np.ones((3, 3), bool))
    where = np.flatnonzero(labels)
    ry, rx = np.divmod(where, shape[1])
    box = B.box_means(img, sky.grid, sky.block, invalid, where)
    want = B.region_stats(where, labels.ravel()[where] - 1, invalid.ravel()[where],
                          sky.at(ry, rx), box, n, shape[1])  # fmt: skip
    assert (cores & ~region).sum() == 27  # the inner 3 x 3 of each core joins afterwards
    assert (stats["masked"] == 25).sum() == 3
    for key in want:
        assert np.array_equal(stats[key], want[key]), key


def test_paint_into_ors_the_disks_into_the_given_map_in_place():
    rng = np.random.default_rng(7)
    shape = (120, 150)
    src = BrightSources(x=np.array([20.0, 140.5, 75.2]), y=np.array([30.0, 5.0, 119.0]),
                        amplitude=np.ones(3), saturated=np.zeros(3, bool),
                        radius=np.array([6.0, 12.5, 30.0]), profile_radius=np.zeros(0),
                        profile=np.zeros(0), noise=1.0)  # fmt: skip
    masker = HaloMasker()
    bad = rng.random(shape) < 0.2
    into = bad.copy()
    out = masker.paint(src, shape, into=into)
    assert out is into
    assert np.array_equal(out, bad | masker.paint(src, shape))
    window = bad[10:90, 40:150].copy()
    got = masker.paint(src, shape, (10, 90), (40, 150), into=window)
    assert np.array_equal(got, bad[10:90, 40:150] | masker.paint(src, shape)[10:90, 40:150])


@pytest.mark.parametrize("quantum", [1.0, 3.0, 1e6])
def test_ring_medians_select_the_elements_of_numpys_stable_sort(quantum):
    # ring_profiles' medians by selection against v[np.argsort(key, kind="stable")]:
    # labels in any order, empty labels, and values quantised so that keys tie (the
    # stable order then decides which value is in the middle)
    from skymap.masking._bright_kernels import ring_medians

    rng = np.random.default_rng(int(quantum))
    for _ in range(60):
        nlab, n = int(rng.integers(1, 40)), int(rng.integers(1, 2000))
        labels = rng.integers(0, nlab, n)
        v = np.round(rng.normal(size=n) * quantum) / 7
        span = np.ptp(v)
        key = labels + (0.5 * (v - v.min()) / span if span > 0 else 0.0)
        ordered = v[np.argsort(key, kind="stable")]
        count = np.bincount(labels, minlength=nlab)
        start = np.concatenate([[0], np.cumsum(count)[:-1]])
        want = np.full(nlab, np.nan)
        have = count > 0
        want[have] = 0.5 * (ordered[(start + (count - 1) // 2)[have]]
                            + ordered[(start + count // 2)[have]])  # fmt: skip
        got = np.full(nlab, np.nan)
        ring_medians(labels, key, v, got)
        assert np.array_equal(got, want, equal_nan=True)


def test_radial_profiles_equal_each_rings_median_taken_directly():
    # ring_profiles' compiled sampling and selection against a direct reading: per
    # source and ring, np.median of the sampled pixels that are finite, unmasked, on
    # the image and inside rmax (sources off the edge too); mean radii and counts alike
    from skymap.masking.bright import _EDGES, _sample_offsets

    rng = np.random.default_rng(11)
    img = rng.normal(size=(300, 260)).astype(np.float32)
    img[rng.random(img.shape) < 0.02] = np.nan
    mask = rng.random(img.shape) < 0.05
    y, x, rmax = np.array([150.2, 3.0, 290.7, -5.0]), np.array([130.0, 250.4, 10.1, 20.0]), 40.0
    r, med, n = radial_profiles(img, y, x, rmax, mask)
    edges = np.append(_EDGES[rmax > _EDGES], rmax)
    dy, dx = _sample_offsets(rmax)
    for s in range(y.size):
        yy, xx = np.rint(y[s]).astype(int) + dy, np.rint(x[s]).astype(int) + dx
        on = (yy >= 0) & (yy < img.shape[0]) & (xx >= 0) & (xx < img.shape[1])
        yy, xx = yy[on], xx[on]
        rr = np.hypot(yy - y[s], xx - x[s])
        ok = np.isfinite(img[yy, xx]) & ~mask[yy, xx] & (rr < rmax)
        ring = np.searchsorted(edges, rr, side="right") - 1
        for j in range(edges.size - 1):
            sel = ok & (ring == j)
            assert n[s, j] == sel.sum()
            if sel.any():
                assert med[s, j] == np.median(img[yy[sel], xx[sel]].astype(np.float64))
                assert r[s, j] == pytest.approx(rr[sel].mean(), rel=1e-12)
            else:
                assert np.isnan(med[s, j])


def test_paint_draws_every_pixel_within_each_radius():
    # the compiled disks against the formula over the whole frame, windows included
    rng = np.random.default_rng(12)
    shape = (170, 230)
    k = 25
    src = BrightSources(x=rng.uniform(-30, 260, k), y=rng.uniform(-30, 200, k),
                        amplitude=np.ones(k), saturated=np.zeros(k, bool),
                        radius=rng.uniform(0, 35, k), profile_radius=np.zeros(0),
                        profile=np.zeros(0), noise=1.0)  # fmt: skip
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    want = np.zeros(shape, bool)
    for y, x, r in zip(src.y, src.x, src.radius, strict=True):
        want |= (yy - y) ** 2 + (xx - x) ** 2 <= r * r
    masker = HaloMasker()
    assert np.array_equal(masker.paint(src, shape), want) and want.any()
    assert np.array_equal(masker.paint(src, shape, (40, 170), (7, 99)), want[40:, 7:99])
