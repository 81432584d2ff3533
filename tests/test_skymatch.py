"""Tests for skymap.skymatch: sky levels across overlapping images."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from astropy.nddata import NDData
from astropy.wcs import WCS
from hypothesis import given
from hypothesis import strategies as st

from skymap.mosaic.skymatch import SkyMatch, clipped_statistic, match

DATA = Path(__file__).parent / "data"


def _load_maker():
    spec = importlib.util.spec_from_file_location(
        "stcal_skymatch_make", DATA / "stcal_skymatch_make.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


maker = _load_maker()


def _relative_error(sky, truth):
    """Largest error of the recovered offsets once the free constant is removed."""
    err = (np.asarray(sky) - np.mean(sky)) - (truth - np.mean(truth))
    return float(np.max(np.abs(err)))


def _strip_pair(rng, levels, *, shape=(40, 100), overlap=30, noise=1.0):
    """Images on one grid: image k covers columns [k*(w-overlap), ...) of a long strip."""
    n = len(levels)
    ny, w = shape
    step = w - overlap
    full = (ny, step * (n - 1) + w)
    out = []
    for k, level in enumerate(levels):
        img = np.full(full, np.nan)
        img[:, k * step : k * step + w] = level + noise * rng.standard_normal(shape)
        out.append(img)
    return out


# ------------------------------------------------------------------ statistics


def _brute_clip(x, lower, upper, nclip, lsig, usig):
    """Straightforward re-statement of the imagestats clipping rules."""
    lo = -np.inf if lower is None else lower
    hi = np.inf if upper is None else upper
    base = (lo, hi)
    for it in range(nclip + 1):
        sel = x[(x >= lo) & (x <= hi)]
        mean, std = sel.mean(), sel.std(ddof=1)
        if it < nclip:
            lo, hi = max(base[0], mean - lsig * std), min(base[1], mean + usig * std)
    return sel


@pytest.mark.parametrize("statistic", ["mean", "median", "mode"])
@pytest.mark.parametrize("limits", [(None, None), (-2.0, None), (None, 3.0), (-1.5, 40.0)])
def test_clipped_statistic_matches_brute_force(rng, statistic, limits):
    x = np.concatenate([rng.normal(0, 1, 5000), rng.exponential(30, 300)])
    lower, upper = limits
    sel = _brute_clip(x, lower, upper, 5, 3.0, 2.5)
    ref = {
        "mean": sel.mean(),
        "median": np.median(sel),
        "mode": 2.5 * np.median(sel) - 1.5 * sel.mean(),
    }[statistic]
    value, error, n = clipped_statistic(
        x, statistic=statistic, lower=lower, upper=upper, nclip=5, lsigma=3.0, usigma=2.5
    )
    assert n == sel.size
    assert value == pytest.approx(ref, abs=1e-9)
    assert error > 0


def test_clipped_statistic_error_matches_scatter_of_estimates():
    # The quoted standard error of each statistic agrees with its spread over draws.
    rng = np.random.default_rng(7)
    for statistic in ("mean", "median", "mode"):
        draws = [
            clipped_statistic(rng.normal(5, 2, 2000), statistic=statistic) for _ in range(300)
        ]
        values = np.array([d[0] for d in draws])
        quoted = np.mean([d[1] for d in draws])
        assert np.std(values) == pytest.approx(quoted, rel=0.15)


def test_clipped_statistic_empty_selection_is_nan():
    value, error, n = clipped_statistic(np.arange(10.0), lower=20.0)
    assert np.isnan(value) and np.isnan(error) and n == 0


# ------------------------------------------------------------------ the 3x3 mosaic


@pytest.fixture(scope="module")
def stcal_ref():
    return json.loads((DATA / "stcal_skymatch_skies.json").read_text())


@pytest.fixture(scope="module")
def mosaic(stcal_ref):
    images, wcss, offsets = maker.build_mosaic()
    assert maker.checksum(images) == stcal_ref["checksum"], "mosaic differs from stcal's run"
    return [NDData(im, wcs=w) for im, w in zip(images, wcss, strict=True)], offsets


def test_mosaic_offsets_within_two_hundredths_sigma(mosaic, stcal_ref):
    images, offsets = mosaic
    res = match(images)  # defaults: global+match, mode
    assert res.groups == [list(range(9))]
    ours = _relative_error(res.sky, offsets)
    theirs = _relative_error(stcal_ref["skies"]["global+match|mode"], offsets)
    assert ours < 0.02  # noise sigma is 1
    assert ours <= theirs
    # Adjacent pairs (12) and corner pairs (8) each gave one equation.
    assert len(res.pairs) == 20


def _rms_error(sky, truth):
    err = (np.asarray(sky) - np.mean(sky)) - (truth - np.mean(truth))
    return float(np.sqrt(np.mean(err**2)))


def test_ensemble_at_least_as_accurate_as_stcal(stcal_ref):
    # One noise draw cannot rank two estimators fed the same pixels, so compare the rms
    # error over the 8 draws stcal was run on (512^2 images, same 3x3 layout).
    ours = {s: [] for s in ("mode", "median", "mean")}
    theirs = {s: [] for s in ours}
    for run in stcal_ref["ensemble"]:
        images, wcss, offsets = maker.build_mosaic(seed=run["seed"], size=run["size"])
        assert maker.checksum(images) == run["checksum"]
        nd = [NDData(im, wcs=w) for im, w in zip(images, wcss, strict=True)]
        for statistic in ours:
            sky = match(nd, method="match", statistic=statistic).sky
            ours[statistic].append(_rms_error(sky, offsets))
            theirs[statistic].append(_rms_error(run["skies"][f"match|{statistic}"], offsets))
    rms = {
        s: (np.sqrt(np.mean(np.square(ours[s]))), np.sqrt(np.mean(np.square(theirs[s]))))
        for s in ours
    }
    # stcal's 'mode' is a histogram peak (0.1 sigma bins): ours is several times better.
    assert rms["mode"][0] < 0.25 * rms["mode"][1]
    assert rms["median"][0] <= rms["median"][1]
    # The clipped mean uses the same pixels and the same rule in both: a statistical tie
    # (8 draws resolve differences of about 20 per cent, no better).
    assert rms["mean"][0] <= 1.2 * rms["mean"][1]


@pytest.mark.parametrize("statistic", ["mode", "median", "mean"])
def test_mosaic_each_statistic_within_target(mosaic, statistic):
    images, offsets = mosaic
    res = match(images, method="match", statistic=statistic)
    assert _relative_error(res.sky, offsets) < 0.02
    assert res.reduced_chi2 == pytest.approx(1.0, abs=0.8)


def test_threads_do_not_change_the_result(mosaic):
    images, _ = mosaic
    one = match(images, n_threads=1)
    two = match(images, n_threads=2)
    np.testing.assert_array_equal(one.sky, two.sky)
    np.testing.assert_array_equal(one.pair_residual, two.pair_residual)


def test_mosaic_separate_approach_within_target(mosaic):
    # The original's way of measuring a pair (each image's own pixels) also works.
    images, offsets = mosaic
    res = match(images, method="match", approach="separate")
    assert _relative_error(res.sky, offsets) < 0.02


def test_global_match_adds_min_local_sky(mosaic):
    images, _ = mosaic
    rel = match(images, method="match")
    full = match(images, method="global+match")
    assert np.isnan(rel.local_sky).all()  # not needed by 'match', so not computed
    base = np.min(full.local_sky - rel.sky)
    np.testing.assert_allclose(full.sky, rel.sky + base, rtol=0, atol=1e-9)


# ------------------------------------------------------------------ methods


@pytest.fixture
def strip(rng):
    levels = np.array([10.0, 13.0, 11.5, 12.0])
    return _strip_pair(rng, levels, noise=0.3), levels


def test_local_is_each_images_own_sky(strip):
    images, levels = strip
    res = match(images, method="local", statistic="mean")
    for img, s in zip(images, res.sky, strict=True):
        assert s == pytest.approx(clipped_statistic(img[np.isfinite(img)], statistic="mean")[0])
    np.testing.assert_allclose(res.sky, levels, atol=0.05)


def test_global_is_minimum_local_sky(strip):
    images, levels = strip
    local = match(images, method="local", statistic="median").sky
    res = match(images, method="global", statistic="median")
    np.testing.assert_array_equal(res.sky, np.full(4, local.min()))


@pytest.mark.parametrize("match_down", [True, False])
def test_match_down_and_up(strip, match_down):
    images, levels = strip
    res = match(images, method="match", statistic="mean", match_down=match_down)
    ref = levels - (levels.min() if match_down else levels.max())
    np.testing.assert_allclose(res.sky, ref, atol=0.05)
    assert (res.sky >= 0).all() if match_down else (res.sky <= 0).all()
    assert 0.0 in res.sky


def test_global_plus_match_is_absolute(strip):
    images, levels = strip
    res = match(images, statistic="mean")
    np.testing.assert_allclose(res.sky, levels, atol=0.05)


def test_subtract_returns_copies_and_leaves_inputs_alone(strip):
    images, levels = strip
    before = [im.copy() for im in images]
    f32 = [im.astype(np.float32) for im in images]
    res = match(f32, statistic="mean", subtract=True)
    for im, b in zip(images, before, strict=True):
        np.testing.assert_array_equal(im, b)
    for out, im, s in zip(res.images, f32, res.sky, strict=True):
        assert out.dtype == np.float32
        assert out is not im
        np.testing.assert_allclose(out, im - s, rtol=0, atol=1e-5, equal_nan=True)
    assert match(f32, statistic="mean").images is None


def test_subtract_keeps_nddata_mask_and_wcs():
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [10.0, 20.0]
    w.wcs.cdelt = [-1e-4, 1e-4]
    mask = np.zeros((20, 20), dtype=bool)
    mask[3, 4] = True
    nd = NDData(np.full((20, 20), 5.0), mask=mask, wcs=w, meta={"a": 1})
    res = match([nd], method="local", subtract=True)
    out = res.images[0]
    assert isinstance(out, NDData)
    np.testing.assert_array_equal(out.mask, mask)
    assert out.wcs is w and out.meta == {"a": 1}
    np.testing.assert_allclose(out.data, 0.0)
    np.testing.assert_array_equal(nd.data, 5.0)


# ------------------------------------------------------------------ residuals


def test_residuals_share_a_loop_misclosure():
    # Three noise-free images overlapping pairwise in three separate patches; the
    # levels in the patches make the three differences inconsistent by m = 0.6, so
    # that equal-weight least squares leaves m/3 on each equation.
    a, b, c = (np.full((30, 90), np.nan) for _ in range(3))
    a[:, 0:20], b[:, 0:20] = 0.0, 1.0  # a - b = -1
    b[:, 30:50], c[:, 30:50] = 0.0, 2.0  # b - c = -2
    c[:, 60:80], a[:, 60:80] = 0.0, -3.6  # c - a = +3.6 -> misclosure 0.6
    res = match([a, b, c], method="match", statistic="mean", nclip=0, weighting="uniform")
    assert len(res.pairs) == 3
    # Noise-free overlaps have zero error: inverse-variance weights must still be equal.
    same = match([a, b, c], method="match", statistic="mean", nclip=0)
    np.testing.assert_allclose(same.pair_residual, res.pair_residual, atol=1e-12)
    # Residual of each equation, signed along the loop a->b->c->a.
    loop = {(0, 1): 1, (1, 2): 1, (0, 2): -1}
    signed = [
        loop[tuple(p)] * r for p, r in zip(res.pairs.tolist(), res.pair_residual, strict=True)
    ]
    np.testing.assert_allclose(signed, 0.2, atol=1e-9)


# ------------------------------------------------------------------ masks


def test_masked_overlap_pixels_are_ignored(rng):
    images = _strip_pair(rng, [10.0, 13.0], shape=(60, 120), overlap=50)
    clean = match(images, method="match", statistic="mean", nclip=0)
    polluted = [im.copy() for im in images]
    polluted[1][:, 70:90] += 50.0  # a broad artefact in image 1's part of the overlap
    mask = np.zeros(polluted[1].shape, dtype=bool)
    mask[:, 70:90] = True
    masked = match(
        [polluted[0], NDData(polluted[1], mask=mask)], method="match", statistic="mean", nclip=0
    )
    unmasked = match(polluted, method="match", statistic="mean", nclip=0)
    assert abs(unmasked.sky[1] - clean.sky[1]) > 10  # the artefact matters if not masked
    # Masked: only the remaining overlap is used, in both images.
    assert masked.pair_npix[0] == 60 * 30
    assert masked.sky[1] == pytest.approx(3.0, abs=0.1)


@pytest.mark.parametrize("approach", ["difference", "separate"])
def test_lower_upper_exclude_pixel_values(rng, approach):
    images = _strip_pair(rng, [10.0, 13.0], shape=(60, 120), overlap=50)
    hit = [im.copy() for im in images]
    hit[1][rng.random(hit[1].shape) < 0.05] = 1e5  # cosmic rays, in both images' units
    opts = {"method": "match", "statistic": "mean", "nclip": 0, "approach": approach}
    clean = match(images, **opts)
    assert abs(match(hit, **opts).sky[1] - clean.sky[1]) > 100
    limited = match(hit, upper=1000.0, **opts)
    assert limited.sky[1] == pytest.approx(clean.sky[1], abs=0.1)
    # lower works on values too: everything below 20 (all of image 0) is excluded.
    assert match(images, lower=20.0, **opts).pairs.shape == (0, 2)


def test_fully_masked_overlap_splits_the_groups(rng):
    images = _strip_pair(rng, [10.0, 13.0, 11.0], shape=(30, 80), overlap=20)
    masked = [
        NDData(images[0]),
        NDData(images[1], mask=np.zeros(images[1].shape, bool)),
        NDData(images[2]),
    ]
    masked[1].mask[:, 120:140] = True  # all of the overlap with image 2
    res = match(masked, method="match", statistic="mean")
    assert res.groups == [[0, 1], [2]]
    with pytest.raises(ValueError, match="do not overlap"):
        match(masked, method="match", disjoint="raise")


# ------------------------------------------------------------------ disjoint groups


def test_disjoint_groups_found_and_tied_by_global(rng):
    # Two pairs far apart on one grid: 0-1 overlap, 2-3 overlap, nothing in between.
    ny, nx = 30, 300
    levels = [5.0, 7.0, 20.0, 21.0]
    cols = [(0, 60), (40, 100), (180, 240), (220, 280)]
    images = []
    for lvl, (c0, c1) in zip(levels, cols, strict=True):
        im = np.full((ny, nx), np.nan)
        im[:, c0:c1] = lvl + 0.3 * rng.standard_normal((ny, c1 - c0))
        images.append(im)
    res = match(images, method="match", statistic="mean")
    assert res.groups == [[0, 1], [2, 3]]
    # Within each group the difference is matched; between groups the baselines (the
    # minimum local sky) are aligned, i.e. each group's lowest image gets the same sky.
    assert res.sky[1] - res.sky[0] == pytest.approx(2.0, abs=0.1)
    assert res.sky[3] - res.sky[2] == pytest.approx(1.0, abs=0.1)
    assert res.sky[0] == 0.0 and res.sky[2] == 0.0
    absolute = match(images, method="global+match", statistic="mean")
    np.testing.assert_allclose(absolute.sky, res.sky + 5.0, atol=0.1)
    # disjoint='local': each group keeps its own measured baseline.
    own = match(images, method="global+match", statistic="mean", disjoint="local")
    np.testing.assert_allclose(own.sky, levels, atol=0.1)
    rel_own = match(images, method="match", statistic="mean", disjoint="local")
    np.testing.assert_allclose(rel_own.sky, np.subtract(levels, 5.0), atol=0.1)
    with pytest.raises(ValueError, match=r"\[\[0, 1\], \[2, 3\]\]"):
        match(images, disjoint="raise")
    # 'local' and 'global' do not match, so disjoint groups are only reported.
    assert match(images, method="local", disjoint="raise").groups == [[0, 1], [2, 3]]


# ------------------------------------------------------------------ exposures


def test_exposures_share_one_sky(rng):
    images = _strip_pair(rng, [10.0, 10.0, 14.0, 14.0], shape=(30, 80), overlap=20)
    images[1] = images[1] + 0.5  # a detector whose own sky is higher
    nested = match([images[:2], images[2:]], method="local", statistic="mean")
    flat = match(images, method="local", statistic="mean", exposures=[[0, 1], [2, 3]])
    np.testing.assert_array_equal(nested.sky, flat.sky)
    assert nested.exposures == [[0, 1], [2, 3]]
    # An exposure's local sky is the smallest of its members' (the original's rule).
    assert nested.sky[0] == nested.sky[1] == pytest.approx(10.0, abs=0.1)
    matched = match(images, method="match", statistic="mean", exposures=[[0, 1], [2, 3]])
    assert matched.sky[0] == matched.sky[1] == 0.0
    assert matched.sky[2] == matched.sky[3]
    # Pairs inside one exposure give no equation.
    assert all((p[0] < 2) != (p[1] < 2) for p in matched.pairs.tolist())


def test_exposure_in_mosaic_recovers_shared_offset(mosaic):
    # Images 0 and 1 become two detectors of one exposure (same sky): both get one sky,
    # and the offsets are still recovered.
    images, offsets = mosaic
    offsets = offsets.copy()
    data1 = images[1].data - np.float32(offsets[1] - offsets[0])
    offsets[1] = offsets[0]
    joined = [images[0], NDData(data1, wcs=images[1].wcs), *images[2:]]
    res = match(joined, method="match", exposures=[[0, 1], *[[k] for k in range(2, 9)]])
    assert res.sky[0] == res.sky[1]
    assert _relative_error(res.sky, offsets) < 0.02
    assert not any(set(p) == {0, 1} for p in res.pairs.tolist())


# ------------------------------------------------------------------ WCS geometry


def _tan(crpix, rot_deg=0.0, scale=1e-4):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [30.0, -10.0]
    t = np.radians(rot_deg)
    w.wcs.cd = scale * np.array([[-np.cos(t), np.sin(t)], [np.sin(t), np.cos(t)]])
    w.wcs.crpix = crpix
    return w


def test_rotated_subpixel_wcs_overlap_matches_geometry(rng):
    # Image 1 is rotated by 7 degrees and shifted by a fraction of a pixel; the overlap
    # area found by pixel mapping must match the analytic footprint intersection.
    shape = (200, 200)
    w0 = _tan([100.5, 100.5])
    w1 = _tan([100.5 - 120.3, 100.5 + 10.7], rot_deg=7.0)
    ims = [10.0 + rng.standard_normal(shape), 12.5 + rng.standard_normal(shape)]
    res = match([NDData(ims[0], wcs=w0), NDData(ims[1], wcs=w1)], method="match", statistic="mean")
    assert res.sky[1] - res.sky[0] == pytest.approx(2.5, abs=4 * res.pair_error[0])
    # Brute-force overlap: image-0 pixels whose centre maps inside image 1 (bilinear
    # sampling needs the centre within the outer pixel centres).
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    x1, y1 = w1.world_to_pixel_values(*w0.pixel_to_world_values(xx.ravel(), yy.ravel()))
    inside = (x1 >= 0) & (x1 <= shape[1] - 1) & (y1 >= 0) & (y1 <= shape[0] - 1)
    assert abs(res.pair_npix[0] - inside.sum()) <= 0.02 * inside.sum()


def test_distorted_wcs_mapping_matches_full_wcs():
    # Image 1 has a SIP distortion of a few pixels. Its data are a linear ramp in its own
    # pixel coordinates (bilinear sampling is exact for it), and image 0 holds the same
    # ramp at its pixels' true positions in image 1, minus 2. Any error of the coarse-grid
    # mapping shows up as an error in the measured difference of -2.
    from astropy.wcs import Sip

    shape = (150, 180)
    w0 = _tan([90.5, 75.5])
    w1 = _tan([90.5 - 110.25, 75.5 + 20.6], rot_deg=3.0)
    a = np.zeros((3, 3))
    b = np.zeros((3, 3))
    a[2, 0], a[1, 1], b[0, 2] = 2e-4, -1e-4, 1.5e-4
    w1.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    w1.sip = Sip(a, b, None, None, w1.wcs.crpix)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    x1, y1 = w1.world_to_pixel_values(*w0.pixel_to_world_values(xx, yy))
    ramp = [x1 + 0.5 * y1 - 2.0, xx + 0.5 * yy]
    nd = [NDData(ramp[0], wcs=w0), NDData(ramp[1], wcs=w1)]
    res = match(nd, method="match", statistic="mean", nclip=0)
    # Bilinear interpolation of the mapping errs by at most step^2 / 8 * curvature: here
    # 16^2 / 8 * 4e-4 = 0.013 px on a ramp of slope 1.1 (a distortion far stronger than
    # real instruments'); a finer grid shrinks it as the step squared.
    assert res.pair_delta[0] == pytest.approx(-2.0, abs=0.015)
    fine = match(nd, method="match", statistic="mean", nclip=0, grid_step=4)
    assert fine.pair_delta[0] == pytest.approx(-2.0, abs=0.0015)
    inside = (x1 >= 0) & (x1 <= shape[1] - 1) & (y1 >= 0) & (y1 <= shape[0] - 1)
    assert abs(int(fine.pair_npix[0]) - int(inside.sum())) <= 0.001 * inside.sum()
    # The same check fails when the distortion is ignored: the test can tell.
    plain = _tan([90.5 - 110.25, 75.5 + 20.6], rot_deg=3.0)
    wrong = match([NDData(ramp[0], wcs=w0), NDData(ramp[1], wcs=plain)], method="match")
    assert abs(wrong.pair_delta[0] + 2.0) > 0.05


def test_pair_error_is_honest_after_resampling():
    # Image 1 sits half a pixel off in x and y: its resampled noise is smoothed (a
    # quarter of the variance per sample), yet the quoted error must match the scatter
    # of the measured difference over noise draws.
    rng = np.random.default_rng(5)
    shape = (80, 80)
    w0, w1 = _tan([40.5, 40.5]), _tan([40.5 - 50.5, 40.5 + 0.5])
    deltas, errors = [], []
    for _ in range(200):
        a = NDData(rng.standard_normal(shape), wcs=w0)
        b = NDData(rng.standard_normal(shape), wcs=w1)
        res = match([a, b], method="match", statistic="mean", nclip=0)
        deltas.append(res.pair_delta[0])
        errors.append(res.pair_error[0])
    # Ignoring the smoothing would quote errors 1.26 times too small.
    assert np.std(deltas) == pytest.approx(np.mean(errors), rel=0.12)


def test_wcs_and_grid_inputs_agree(rng):
    # Integer offsets: the same mosaic given with WCS or as images on one grid.
    images, wcss, offsets = maker.build_mosaic(seed=3, size=160, overlap=40, grid=2)
    res_wcs = match(
        [NDData(im, wcs=w) for im, w in zip(images, wcss, strict=True)], statistic="median"
    )
    step = 120
    grid = []
    for k, im in enumerate(images):
        r, c = divmod(k, 2)
        g = np.full((280, 280), np.nan, dtype=np.float32)
        g[r * step : r * step + 160, c * step : c * step + 160] = im
        grid.append(g)
    res_grid = match(grid, statistic="median")
    np.testing.assert_allclose(res_wcs.sky, res_grid.sky, atol=1e-6)
    np.testing.assert_array_equal(res_wcs.pair_npix, res_grid.pair_npix)


# ------------------------------------------------------------------ properties


@given(
    shift=st.floats(-1e3, 1e3),
    perm_seed=st.integers(0, 1000),
    method=st.sampled_from(["local", "global", "match", "global+match"]),
)
def test_constant_shift_and_permutation(shift, perm_seed, method):
    rng = np.random.default_rng(perm_seed)
    images = _strip_pair(rng, list(rng.uniform(0, 10, 4)), shape=(20, 50), overlap=15)
    base = match(images, method=method, statistic="mean", nclip=0)
    shifted = match([im + shift for im in images], method=method, statistic="mean", nclip=0)
    expected = base.sky if method == "match" else base.sky + shift
    np.testing.assert_allclose(shifted.sky, expected, atol=1e-6 * (1 + abs(shift)))
    order = rng.permutation(4)
    permuted = match([images[k] for k in order], method=method, statistic="mean", nclip=0)
    np.testing.assert_allclose(permuted.sky, base.sky[order], atol=1e-8)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"method": "best"}, "method"),
        ({"statistic": "midpt"}, "statistic"),
        ({"approach": "both"}, "approach"),
        ({"disjoint": "ignore"}, "disjoint"),
        ({"min_pixels": 0}, "min_pixels"),
        ({"n_threads": 0}, "n_threads"),
        ({"weighting": "area"}, "weighting"),
        ({"nclip": -1}, "nclip"),
        ({"lsigma": 0}, "lsigma"),
        ({"lower": 5, "upper": 1}, "lower"),
        ({"match_down": "yes"}, "match_down"),
    ],
)
def test_config_errors_name_the_field(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        SkyMatch(**kwargs)


def test_input_errors(rng):
    a = rng.normal(size=(10, 10))
    with pytest.raises(ValueError, match="one pixel grid"):
        match([a, rng.normal(size=(10, 12))])
    with pytest.raises(ValueError, match="WCS"):
        match([NDData(a, wcs=_tan([5, 5])), a])
    with pytest.raises(ValueError, match="exposures"):
        match([a, a], exposures=[[0]])
    with pytest.raises(ValueError, match="exposures"):
        match([[a], [a]], exposures=[[0], [1]])
    with pytest.raises(TypeError, match="images"):
        match(a)


def test_image_without_valid_pixels_warns_and_gets_nan(rng):
    images = _strip_pair(rng, [1.0, 2.0], shape=(20, 50), overlap=15)
    images.append(np.full(images[0].shape, np.nan))
    with pytest.warns(RuntimeWarning, match="no sky"):
        res = match(images, method="local", subtract=True)
    assert np.isnan(res.sky[2]) and np.isfinite(res.sky[:2]).all()
    assert np.isnan(res.images[2]).all()


# ------------------------------------------------------------------ sky models: planes


def _gradient_mosaic(seed, *, size=256, overlap=66, grid=3):
    """3x3 WCS mosaic whose exposures each have their own noise (sigma 1), offset in
    [0, 3] sigma and gradient in [-1.5, 1.5] sigma across the tile in x and in y, over
    common stars. Returns NDData images, the true sky of each tile and tile origins."""
    rng = np.random.default_rng(seed)
    step = size - overlap
    full = step * (grid - 1) + size
    n = grid * grid
    offsets = rng.uniform(0.0, 3.0, n)
    gradients = rng.uniform(-1.5, 1.5, (n, 2))
    sources = np.zeros((full, full))
    sy, sx = np.mgrid[-6:7, -6:7]
    for _ in range(15 * n):
        y, x = rng.uniform(6, full - 7, 2)
        iy, ix = int(y), int(x)
        peak = np.exp(rng.uniform(np.log(3.0), np.log(300.0)))
        g = (sy + iy - y) ** 2 + (sx + ix - x) ** 2
        sources[iy - 6 : iy + 7, ix - 6 : ix + 7] += peak * np.exp(-0.5 * g / 1.5**2)
    u = (np.arange(size) - (size - 1) / 2) / (size / 2)  # spans ~[-1, 1]: coefficient g/2
    centre = (full - 1) / 2.0
    images, truth, origins = [], [], []
    for k in range(n):
        r, c = divmod(k, grid)
        oy, ox = r * step, c * step
        sky = offsets[k] + gradients[k, 0] / 2 * u[None, :] + gradients[k, 1] / 2 * u[:, None]
        img = 100.0 + sky + sources[oy : oy + size, ox : ox + size]
        img = (img + rng.standard_normal((size, size))).astype(np.float32)
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = [150.0, 2.0]
        w.wcs.cdelt = [-0.1 / 3600, 0.1 / 3600]
        w.wcs.crpix = [centre - ox + 1.0, centre - oy + 1.0]
        images.append(NDData(img, wcs=w))
        truth.append(sky)
        origins.append((oy, ox))
    return images, truth, origins


def _rms_after_common_plane(maps, truth, origins):
    """RMS over every pixel of (fitted - true) sky once the one plane that matching
    cannot fix (common to all tiles on the sky) is removed by least squares."""
    res, cols = [], []
    for m, t, (oy, ox) in zip(maps, truth, origins, strict=True):
        yy, xx = np.mgrid[0 : t.shape[0], 0 : t.shape[1]]
        res.append((m - t).ravel())
        cols.append(np.stack([np.ones(t.size), (xx + ox).ravel(), (yy + oy).ravel()], 1))
    r, a = np.concatenate(res), np.concatenate(cols) / [1.0, 1000.0, 1000.0]
    return float(np.sqrt(np.mean((r - a @ np.linalg.lstsq(a, r, rcond=None)[0]) ** 2)))


@pytest.fixture(scope="module")
def gradient_mosaic():
    return _gradient_mosaic(1)


def test_plane_mosaic_recovers_gradients_to_three_hundredths_sigma(gradient_mosaic):
    images, truth, origins = gradient_mosaic
    planes = match(images, method="match", model="plane", statistic="mean")
    maps = [planes.sky_map(i) for i in range(9)]
    # The Cramer-Rao floor of this layout (exact GLS over pixels, Gaussian noise) is
    # 0.031 sigma rms over noise draws; this draw gives 0.020 (20 draws: median 0.030).
    assert _rms_after_common_plane(maps, truth, origins) <= 0.03
    offsets = match(images, method="match", statistic="mean")
    off_maps = [offsets.sky_map(i) for i in range(9)]
    assert _rms_after_common_plane(off_maps, truth, origins) > 0.3  # ~0.38 sigma
    assert planes.reduced_chi2 == pytest.approx(1.0, abs=0.3)
    assert offsets.reduced_chi2 > 50  # constant skies cannot fit the cells
    assert planes.coefficients.shape == (9, 3)
    np.testing.assert_array_equal(planes.sky, planes.coefficients[:, 0])
    # The reference (lowest sky at its centre) is zero everywhere; the rest relative.
    ref = int(np.argmin(planes.sky))
    np.testing.assert_array_equal(planes.coefficients[ref], 0.0)
    assert planes.sky_error[ref] == 0 and (planes.sky_error[planes.sky_error > 0] < 0.3).all()
    assert (planes.pair_cells >= 3).all() and len(planes.pairs) == 20


def test_sky_map_is_the_plane_of_the_coefficients(gradient_mosaic):
    images, _, _ = gradient_mosaic
    res = match(images[:2], model="plane", statistic="mean", subtract=True)
    a, b, c = res.coefficients[1]
    yy, xx = np.mgrid[0:256, 0:256]
    expected = a + b * (xx - 127.5) / 128 + c * (yy - 127.5) / 128
    np.testing.assert_allclose(res.sky_map(1), expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(
        res.images[1].data, (images[1].data - res.sky_map(1)).astype(np.float32)
    )
    assert res.images[1].wcs is images[1].wcs
    with pytest.raises(ValueError, match="image index"):
        res.sky_map(5)


def test_offset_model_is_the_default_and_unchanged(strip):
    images, _ = strip
    default = match(images, statistic="mean")
    explicit = match(images, statistic="mean", model="offset")
    np.testing.assert_array_equal(default.sky, explicit.sky)
    np.testing.assert_array_equal(default.coefficients[:, 0], default.sky)
    assert default.pair_cells is None and default.sky_error is None
    np.testing.assert_array_equal(default.sky_map(2), np.full(images[2].shape, default.sky[2]))


def _planes_on_grid(coefs, *, shape=(160, 160), boxes, noise=0.0, seed=0):
    """Images on one grid: image k holds the plane coefs[k] (in its own frame, the whole
    grid) inside boxes[k] = (y0, y1, x0, x1) and NaN elsewhere."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    h = max(shape) / 2
    u, v = (xx - (shape[1] - 1) / 2) / h, (yy - (shape[0] - 1) / 2) / h
    out = []
    for c, (y0, y1, x0, x1) in zip(coefs, boxes, strict=True):
        sky = c[0] + c[1] * u + c[2] * v
        if len(c) == 6:
            sky = sky + c[3] * u * u + c[4] * u * v + c[5] * v * v
        img = np.full(shape, np.nan)
        img[y0:y1, x0:x1] = (sky + noise * rng.standard_normal(shape))[y0:y1, x0:x1]
        out.append(img)
    return out


@pytest.mark.parametrize("model", ["plane", "poly2"])
def test_noise_free_models_recovered_exactly(model):
    rng = np.random.default_rng(4)
    p = 3 if model == "plane" else 6
    coefs = rng.uniform(-2, 2, (4, p))
    coefs[:, 0] += [0.0, 5.0, 6.0, 7.0]  # image 0 is the lowest: the reference
    boxes = [(0, 110, 0, 110), (0, 110, 50, 160), (50, 160, 0, 110), (50, 160, 50, 160)]
    # 60-px overlaps: poly2 needs three cells across, so cells of 16 px. A cell's mean
    # difference is exactly the model at the cell's mean terms (a median or mode is
    # not, where the model curves within a cell).
    images = _planes_on_grid(coefs, boxes=boxes)
    res = match(images, method="match", model=model, cell_size=16, statistic="mean")
    # All images share the grid, so each is recovered relative to the reference exactly.
    np.testing.assert_allclose(res.coefficients, coefs - coefs[0], atol=1e-9)
    assert res.groups == [[0, 1, 2, 3]]


def test_global_match_planes_add_one_constant():
    rng = np.random.default_rng(5)
    coefs = np.c_[[10.0, 13.0, 11.0], rng.uniform(-1, 1, (3, 2))]
    boxes = [(0, 100, 0, 70), (0, 100, 45, 115), (0, 100, 90, 160)]
    images = _planes_on_grid(coefs, shape=(100, 160), boxes=boxes, noise=0.1)
    rel = match(images, method="match", model="plane")
    full = match(images, method="global+match", model="plane")
    shift = full.coefficients - rel.coefficients
    np.testing.assert_allclose(shift[:, 1:], 0.0, atol=1e-12)
    np.testing.assert_allclose(shift[:, 0], shift[0, 0], atol=1e-12)
    assert np.min(full.local_sky - rel.sky) == pytest.approx(shift[0, 0])


def test_small_overlap_falls_back_to_an_offset_with_a_warning():
    # Images 1 and 3 share an 8-px strip, 0 and 3 an 8x10 corner: each gives one offset
    # equation; the other overlaps (>= 20 px wide) pin every plane.
    coefs = np.array([[1.0, 0.5, -0.3], [2.0, -0.4, 0.2], [3.0, 0.1, 0.6], [4.0, 0.3, 0.3]])
    boxes = [(0, 100, 0, 90), (0, 100, 60, 160), (80, 160, 0, 100), (92, 160, 80, 160)]
    images = _planes_on_grid(coefs, boxes=boxes)
    with pytest.warns(RuntimeWarning, match="too small to constrain a plane") as record:
        res = match(images, method="match", model="plane", statistic="mean")
    message = str(record[0].message)
    assert "images 0 and 3" in message and "images 1 and 3" in message
    assert "images 2 and 3" not in message
    np.testing.assert_allclose(res.coefficients, coefs - coefs[0], atol=1e-9)
    cells = dict(zip(map(tuple, res.pairs), res.pair_cells, strict=True))
    assert cells[(0, 3)] == cells[(1, 3)] == 0 and cells[(2, 3)] >= 3


def test_plane_that_nothing_constrains_names_the_pair():
    # Two images sharing an 8-pixel strip: too thin for a plane, and nothing else.
    boxes = [(0, 100, 0, 64), (0, 100, 56, 120)]
    images = _planes_on_grid(np.ones((2, 3)), shape=(100, 120), boxes=boxes, noise=0.1)
    too_small = pytest.warns(RuntimeWarning, match="too small")
    with too_small, pytest.raises(ValueError, match=r"images \[1\].*overlaps \(0, 1\)"):
        match(images, method="match", model="plane")
    assert match(images, method="match").groups == [[0, 1]]  # offsets are fine


def test_poly2_on_tiny_overlaps_is_refused_with_the_minimum_size(gradient_mosaic):
    images, _, _ = gradient_mosaic
    with pytest.raises(ValueError, match=r"at least 96 pixels wide.*images 0 and 1.*66 pix"):
        match(images, method="match", model="poly2")


def test_poorly_constrained_poly2_warns(gradient_mosaic):
    # Cells of 16 px pass the size rule, but 66-px strips cannot pin curvature on 256^2
    # tiles: the predicted error (from the least-squares covariance) says so.
    images, _, _ = gradient_mosaic
    with pytest.warns(RuntimeWarning, match="poorly"):
        res = match(images, method="match", model="poly2", cell_size=16, statistic="mean")
    assert res.sky_error.max() > 1.0


def test_plane_disjoint_groups_and_exposures():
    coefs = np.array([[1.0, 0.5, -0.3], [2.0, -0.4, 0.2], [3.0, 0.1, 0.6], [5.0, 0.3, 0.3]])
    boxes = [(0, 60, 0, 60), (0, 60, 30, 90), (100, 160, 0, 60), (100, 160, 30, 90)]
    images = _planes_on_grid(coefs, boxes=boxes)
    res = match(images, method="match", model="plane")
    assert res.groups == [[0, 1], [2, 3]]
    np.testing.assert_allclose(res.coefficients[1], coefs[1] - coefs[0], atol=1e-9)
    np.testing.assert_allclose(res.coefficients[3], coefs[3] - coefs[2], atol=1e-9)
    np.testing.assert_array_equal(res.coefficients[[0, 2]], 0.0)
    # Images 1 and 2 as one exposure: one plane for both, tying the two groups.
    coefs[2] = coefs[1]
    images = _planes_on_grid(coefs, boxes=boxes)
    res = match(images, method="match", model="plane", exposures=[[0], [1, 2], [3]])
    assert res.groups == [[0, 1, 2, 3]]
    np.testing.assert_allclose(res.coefficients, coefs - coefs[0], atol=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"model": "cubic"}, "model"),
        ({"model": "plane", "method": "local"}, "method"),
        ({"model": "plane", "approach": "separate"}, "approach"),
        ({"cell_size": 2}, "cell_size"),
    ],
)
def test_model_config_errors_name_the_field(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        SkyMatch(**kwargs)


@given(
    plane=st.tuples(st.floats(-1e3, 1e3), st.floats(-50, 50), st.floats(-50, 50)),
    seed=st.integers(0, 100),
)
def test_common_plane_does_not_change_matched_planes(plane, seed):
    # A plane common to every image on one grid cancels in every pixel difference.
    rng = np.random.default_rng(seed)
    boxes = [(0, 48, 0, 40), (0, 48, 24, 64)]
    coefs = np.c_[rng.uniform(0, 5, 2), rng.uniform(-1, 1, (2, 2))]
    base = _planes_on_grid(coefs, shape=(48, 64), boxes=boxes, noise=0.2, seed=seed)
    common = _planes_on_grid([plane] * 2, shape=(48, 64), boxes=boxes)
    kw = {"method": "match", "model": "plane", "statistic": "mean", "nclip": 0, "cell_size": 8}
    a = match(base, **kw).coefficients
    b = match([x + y for x, y in zip(base, common, strict=True)], **kw).coefficients
    np.testing.assert_allclose(b, a, atol=1e-9 * (1 + np.abs(plane).max()))


# ------------------------------------------------------------------ CLI without WCS


def test_cli_matches_fits_without_celestial_wcs_on_one_grid(tmp_path, capsys):
    from astropy.io import fits

    from skymap.app import cli

    coefs = np.array([[1.0, 0.5, -0.3], [2.0, -0.4, 0.2]])
    boxes = [(0, 100, 0, 70), (0, 100, 40, 120)]
    paths = []
    for k, img in enumerate(_planes_on_grid(coefs, shape=(100, 120), boxes=boxes, noise=0.05)):
        paths.append(tmp_path / f"t{k}.fits")
        fits.PrimaryHDU(img.astype(np.float32)).writeto(paths[-1])
    out = tmp_path / "m"
    argv = ["match", *map(str, paths), "-o", str(out), "--method", "match", "--model", "plane"]
    assert cli.main(argv) == 0
    assert "one pixel grid" in capsys.readouterr().out
    summary = json.loads((out / "skymatch.json").read_text())
    assert summary["model"] == "plane"
    got = np.array([im["coefficients"] for im in summary["images"]])
    np.testing.assert_allclose(got, coefs - coefs[0], atol=0.02)
    # A file with a celestial WCS among files without one is refused, naming the others.
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    fits.PrimaryHDU(np.zeros((100, 120), np.float32), header=w.to_header()).writeto(
        tmp_path / "sky.fits"
    )
    argv = ["match", str(tmp_path / "sky.fits"), str(paths[0]), "-o", str(tmp_path / "x")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "celestial WCS" in err and "t0.fits" in err
