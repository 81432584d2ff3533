"""Tests for skymap.evaluate: the notebook's RMS-vs-scale, bias under sources and the
masked-versus-unmasked test."""

import json

import numpy as np
import pytest
from astropy.nddata import block_reduce
from astropy.table import Table
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from skymap.quality.evaluate import (
    bias_under_sources,
    evaluate,
    fit_line,
    masked_vs_unmasked,
    pixel_sigma,
    rms_vs_scale,
    white_noise_curve,
)
from skymap.quality.simulate import notebook_scene


def _notebook_rms(img, mask, widths):
    # The notebook's smoothsample_masked / calculate_stats, re-expressed independently.
    nrow, ncol = img.shape
    out = []
    for width in widths:
        w = width / 2
        row, col = np.mgrid[0:nrow, 0:ncol]
        m = mask | (row < w) | (row > nrow - w) | (col < w) | (col > ncol - w)
        mm = block_reduce(m, width)
        means = block_reduce(img, width, func=np.mean)
        out.append(means[np.where(mm == 0)].std())
    return np.array(out)


def test_rms_vs_scale_equals_notebook_definition(rng):
    img = rng.normal(size=(203, 190)) + np.linspace(0, 1, 190)[None, :]
    mask = rng.random((203, 190)) < 0.002
    widths = np.arange(3, 30)
    np.testing.assert_allclose(
        rms_vs_scale(img, mask, widths), _notebook_rms(img, mask, widths), rtol=1e-12
    )


def test_rms_vs_scale_white_noise_scales_as_one_over_w(rng):
    img = rng.normal(0, 0.5, (1200, 1200))
    widths = [2, 4, 8, 16]
    rms = rms_vs_scale(img, None, widths)
    ratio = rms / white_noise_curve(0.5, widths)
    # Number of blocks >= 70**2, so the std of the std is < 1.5%; allow 5 sigma.
    np.testing.assert_allclose(ratio, 1.0, atol=0.08)


def test_rms_vs_scale_constant_residual_is_zero():
    np.testing.assert_array_equal(rms_vs_scale(np.full((64, 64), 3.25), None, [2, 4, 8]), 0.0)


def test_rms_vs_scale_drops_masked_blocks():
    # Blocks of alternating value: masking every block holding a "high" pixel leaves a
    # constant, hence zero RMS.
    img = np.zeros((40, 40))
    img[10:20, 10:20] = 5.0
    mask = np.zeros((40, 40), bool)
    assert rms_vs_scale(img, mask, [10])[0] > 0
    mask[15, 15] = True
    assert rms_vs_scale(img, mask, [10])[0] == 0.0


def test_rms_vs_scale_nan_pixels_are_masked():
    img = np.zeros((40, 40))
    img[10:20, 10:20] = np.nan
    assert rms_vs_scale(img, None, [10])[0] == 0.0


def test_rms_vs_scale_too_wide_gives_nan():
    assert np.isnan(rms_vs_scale(np.zeros((8, 8)), None, [9])[0])


@pytest.mark.parametrize("bad", [[0], [2.5], [], [[3, 4]]])
def test_rms_vs_scale_rejects_bad_widths(bad):
    with pytest.raises(ValueError, match="widths"):
        rms_vs_scale(np.zeros((8, 8)), None, bad)


@settings(max_examples=30)
@given(
    seed=st.integers(0, 2**31),
    shift=st.floats(-1e3, 1e3),
    scale=st.floats(0.01, 100),
    ny=st.integers(12, 60),
    nx=st.integers(12, 60),
)
def test_rms_vs_scale_invariances(seed, shift, scale, ny, nx):
    # Shift-invariant, scales with |scale|, and blind to the values of masked pixels.
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(ny, nx))
    mask = rng.random((ny, nx)) < 0.01
    widths = [2, 3, 5]
    base = rms_vs_scale(img, mask, widths)
    np.testing.assert_allclose(rms_vs_scale(img + shift, mask, widths), base, atol=1e-9)
    np.testing.assert_allclose(rms_vs_scale(img * -scale, mask, widths), scale * base, rtol=1e-9)
    spoiled = np.where(mask, np.nan, img)
    np.testing.assert_array_equal(rms_vs_scale(spoiled, mask, widths), base)
    f32 = rms_vs_scale(img.astype(np.float32), mask, widths)
    np.testing.assert_allclose(f32, base, rtol=1e-5)


def test_pixel_sigma_ignores_smooth_structure(rng):
    yy, xx = np.mgrid[0:300, 0:300]
    img = 0.3 * rng.normal(size=(300, 300)) + np.sin(xx / 50.0) * 2 + yy * 0.1
    assert pixel_sigma(img) == pytest.approx(0.3, rel=0.03)


# ---------------------------------------------------------------------------------------
# Bias under sources
# ---------------------------------------------------------------------------------------


def _catalog(rng, n, shape):
    return Table(
        {
            "x_mean": rng.uniform(2, shape[1] - 3, n),
            "y_mean": rng.uniform(2, shape[0] - 3, n),
            "flux": rng.uniform(0, 100, n),
            "re": rng.uniform(0.5, 5, n),
        }
    )


def test_bias_box_is_a_true_3x3():
    truth = np.zeros((20, 20))
    bkg = np.zeros((20, 20))
    bkg[9:12, 4:7] = 9.0  # exactly the 3x3 box about (y=10, x=5)
    cat = Table({"x_mean": [5.2], "y_mean": [9.8], "flux": [1.0], "re": [1.0]})
    res = bias_under_sources(bkg, truth, cat)
    assert res.residual[0] == 9.0
    bkg[12, 5] = 100.0  # outside the box: no effect
    assert bias_under_sources(bkg, truth, cat).residual[0] == 9.0


def test_bias_box_clipped_at_edges_and_nan_ignored():
    bkg = np.arange(25.0).reshape(5, 5)
    bkg[1, 1] = np.nan
    cat = Table({"x_mean": [0.0, 10.0], "y_mean": [0.0, 2.0], "flux": [1.0, 1.0], "re": [1, 1]})
    res = bias_under_sources(bkg, np.zeros((5, 5)), cat)
    assert res.residual[0] == pytest.approx((0 + 1 + 5) / 3)
    assert np.isnan(res.residual[1])  # off the image


def test_bias_fits_recover_planted_slopes(rng):
    shape = (300, 300)
    cat = _catalog(rng, 400, shape)
    truth = np.zeros(shape)
    bkg = truth + rng.normal(0, 0.01, shape)
    # Plant 0.002 per unit flux + 0.01 per pixel of radius in the box under each source.
    for r in cat:
        x, y = int(np.rint(r["x_mean"])), int(np.rint(r["y_mean"]))
        bkg[y - 1 : y + 2, x - 1 : x + 2] = 0.002 * r["flux"] + 0.01 * r["re"]
    mask = np.zeros(shape, bool)
    half = np.asarray(cat["x_mean"]) < 150
    for r in cat[half]:
        mask[int(np.rint(r["y_mean"])), int(np.rint(r["x_mean"]))] = True
    res = bias_under_sources(bkg, truth, cat, mask, seed=1)
    np.testing.assert_array_equal(res.masked, half)
    for group in ("masked", "unmasked"):
        fit = res.flux_fits[group]
        assert abs(fit.slope - 0.002) < 4 * fit.slope_err + 2e-4
        assert fit.slope_err > 0
    # The control sits away from the sources: no trend with flux there.
    rf = res.flux_fits["random"]
    assert abs(rf.slope) < 5 * rf.slope_err + 1e-5
    assert res.random_stats.n > 0


def test_fit_line_errors_are_calibrated():
    # Over many noisy lines, (slope - true) / slope_err behaves like a t variable.
    rng = np.random.default_rng(7)
    x = np.linspace(0, 10, 30)
    pulls = []
    for _ in range(400):
        f = fit_line(x, 1.0 + 0.5 * x + rng.normal(0, 0.3, x.size))
        pulls.append((f.slope - 0.5) / f.slope_err)
    assert np.std(pulls) == pytest.approx(1.0, abs=0.1)


def test_bias_group_errors_are_calibrated_for_clustered_sources():
    # Sources in tight groups on a smooth residual unrelated to them: the excess over the
    # map mean must be within 2 stderr in ~95% of maps. The per-source std/sqrt(n) treats
    # the 10 members of a group as independent and fails badly.
    rng = np.random.default_rng(5)
    z, naive = [], []
    for i in range(200):
        f = ndimage.gaussian_filter(rng.normal(size=(96, 96)), 6.0, mode="wrap")
        f = f + rng.normal() * f.std() * np.linspace(-1, 1, 96)[None, :]
        centres = rng.uniform(0, 95, (30, 2))
        pos = (centres[:, None, :] + rng.normal(0, 2, (30, 10, 2))).reshape(-1, 2) % 95
        cat = Table(
            {"x_mean": pos[:, 0], "y_mean": pos[:, 1], "flux": np.ones(300), "re": np.ones(300)}
        )
        g = bias_under_sources(f, np.zeros_like(f), cat, seed=i, n_random=10).unmasked_stats
        z.append(g.z)
        naive.append(g.excess / g.naive_stderr)
    assert 0.02 <= np.mean(np.abs(z) > 2) <= 0.09
    assert np.mean(np.abs(naive) > 2) > 0.3


# ---------------------------------------------------------------------------------------
# Masked versus unmasked
# ---------------------------------------------------------------------------------------


def _disc_mask(rng, shape, n, rmin, rmax):
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    cy = rng.uniform(0, shape[0], n)[:, None, None]
    cx = rng.uniform(0, shape[1], n)[:, None, None]
    r = rng.uniform(rmin, rmax, n)[:, None, None]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2).any(axis=0)


def _null_z(method, n_maps=300, smooth=8.0, seed=11):
    rng = np.random.default_rng(seed)
    zs, naive = [], []
    for _ in range(n_maps):
        f = ndimage.gaussian_filter(rng.normal(size=(96, 96)), smooth, mode="wrap")
        f = f + rng.normal() * f.std() * np.linspace(-1, 1, 96)[None, :]
        m = _disc_mask(rng, (96, 96), 12, 2, 5)
        t = masked_vs_unmasked(f, m, method=method)
        zs.append(t.z)
        naive.append(t.difference / t.naive_stderr)
    return np.array(zs), np.array(naive)


def test_masked_vs_unmasked_is_calibrated_under_the_null():
    # Smooth random maps unrelated to random-disc masks: |z| > 2 in ~5% of cases.
    # 300 maps: binomial sd 1.3%, so [2%, 9%] is a ~3-sigma window.
    z, naive = _null_z("shift")
    rate = np.mean(np.abs(z) > 2)
    assert 0.02 <= rate <= 0.09
    # The per-pixel error bar the seeds used would cry wolf most of the time.
    assert np.mean(np.abs(naive) > 2) > 0.4


def test_masked_vs_unmasked_detects_a_real_offset(rng):
    f = ndimage.gaussian_filter(rng.normal(size=(128, 128)), 8.0, mode="wrap")
    m = _disc_mask(rng, (128, 128), 20, 2, 5)
    t = masked_vs_unmasked(f + 2.0 * f.std() * m, m)
    assert t.z > 3
    assert t.p_value < 0.01
    assert t.n_eff < t.n_masked + t.n_unmasked


def test_masked_vs_unmasked_means_and_jackknife():
    bkg = np.zeros((64, 64))
    m = np.zeros((64, 64), bool)
    m[::4, ::4] = True
    bkg[m] = 1.0
    for method in ("shift", "jackknife"):
        t = masked_vs_unmasked(bkg, m, method=method)
        assert t.difference == 1.0
        assert t.mean_masked == 1.0 and t.mean_unmasked == 0.0
    assert masked_vs_unmasked(bkg, m, method="jackknife").n_blocks == 64
    with pytest.raises(ValueError, match="method"):
        masked_vs_unmasked(bkg, m, method="bootstrap")


def test_masked_vs_unmasked_ignores_nan():
    rng = np.random.default_rng(2)
    bkg = rng.normal(size=(64, 64))
    m = rng.random((64, 64)) < 0.2
    nan_bkg = bkg.copy()
    nan_bkg[:, :8] = np.nan
    t = masked_vs_unmasked(nan_bkg, m)
    sub_m = m[:, 8:]
    assert t.difference == pytest.approx(bkg[:, 8:][sub_m].mean() - bkg[:, 8:][~sub_m].mean())
    assert np.isfinite(t.stderr)


# ---------------------------------------------------------------------------------------
# One-call evaluation
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_scene():
    return notebook_scene(shrink_factor=4)


def test_evaluate_perfect_background_on_notebook_scene(small_scene):
    s = small_scene
    mask = s.sources > 0.05
    ev = evaluate(None, s.sky, scene=s, mask=mask)
    d = ev.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["truth"]["rms_error"] == 0.0
    assert d["rms_vs_scale"]["reference"] == "perfect"
    # image - truth = sources + noise; with sources masked the curve is near perfect.
    assert 0.95 < ev.large_scale_ratio < 1.3
    assert not ev.overfit
    assert d["bias"]["unmasked"]["mean"] == 0.0
    assert d["masked_vs_unmasked"]["difference"] == pytest.approx(
        s.sky[mask].mean() - s.sky[~mask].mean()
    )
    assert ev.to_table(wide=True)["truth.rms_error"][0] == 0.0
    assert len(ev.rms_table()) == 27


def test_evaluate_flags_overfitting(small_scene):
    # A "background" that absorbed the noise leaves less than the noise at every scale.
    s = small_scene
    ev = evaluate(None, s.sky + 0.8 * s.noise, scene=s, mask=s.sources > 0.05)
    assert ev.overfit
    assert ev.large_scale_ratio < 0.5


def test_evaluate_real_data_uses_white_reference(rng):
    img = rng.normal(0, 2.0, (200, 200)) + 10.0
    ev = evaluate(img, np.full(img.shape, 10.0))
    assert ev.reference == "white"
    assert ev.noise_sigma == pytest.approx(2.0, rel=0.05)
    assert ev.truth_metrics is None and ev.bias is None and ev.masked_vs_unmasked is None
    assert 0.8 < ev.large_scale_ratio < 1.2
    json.dumps(ev.to_dict(), allow_nan=False)


def test_evaluate_accepts_result_objects_and_plots(small_scene):
    s = small_scene

    class Result:
        background = s.sky + 0.01
        mask = s.sources > 0.05

    ev = evaluate(s.image, Result(), truth=s.sky, catalog=s.catalog)
    assert ev.truth_metrics["mean_error"] == pytest.approx(0.01)
    assert ev.reference == "white"
    fig = ev.plot(title="t")
    assert len(fig.axes) >= 5
