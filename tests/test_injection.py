"""Injection-recovery (skymap.quality.injection) and its peers (skymap.quality.peers),
on the committed real cutouts (tests/data, 64 x 64)."""

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure

from skymap.quality import peers
from skymap.quality.injection import (
    as_method,
    compare,
    injection_recovery,
    plot_comparison,
    prepare,
)
from skymap.quality.signals import MIN_SIZE, make_injections
from skymap.quality.structure import free_pixels, structure_left


@pytest.fixture(scope="module")
def m6707(request):
    path = request.path.parent / "data" / "m6707hh_cutout.fits"
    return fits.getdata(path).astype(np.float32)


@pytest.fixture(scope="module")
def spitzer(request):
    path = request.path.parent / "data" / "spitzer_cutout.fits"
    return fits.getdata(path).astype(np.float32)  # has NaNs


def flat_median(image, mask):
    return np.full(image.shape, np.median(image[~mask]))


def test_flat_background_scores_badly_and_skymap_tracks_the_injected_sky(m6707):
    # the honesty check: a flat background cannot follow a 1-3 sigma sky
    flat = injection_recovery(m6707, flat_median, kinds=("sky",), n_trials=3)
    fit = injection_recovery(m6707, None, kinds=("sky",), n_trials=3)
    assert flat.track > 0.5
    assert fit.track < 0.5 * flat.track
    assert flat.method == "flat_median" and fit.method == "skymap"


def test_scores_match_an_independent_computation_for_a_constant_method(spitzer):
    # a method that never changes gives delta = 0: track is the RMS of the injected sky,
    # leak is 0 -- computed here from make_injections directly
    prep = prepare(spitzer)
    res = injection_recovery(spitzer, lambda i, m: np.zeros(i.shape), n_trials=2, seed=5)
    good = np.isfinite(spitzer)
    for t in range(2):
        inj = make_injections(spitzer.shape, prep.sigma, seed=5, trial=t)
        expect = np.sqrt(np.mean((inj["sky"].signal[good] / prep.sigma) ** 2))
        assert res.trials["track"][t] == pytest.approx(expect, rel=1e-6)
        assert res.trials["leak"][t] == 0.0
        assert res.trials["score"][t] == pytest.approx(expect, rel=1e-6)


def test_a_method_that_follows_everything_tracks_perfectly_and_leaks_the_discs(m6707):
    res = injection_recovery(m6707, lambda image, mask: image, n_trials=1, seed=2)
    prep = prepare(m6707)
    inj = make_injections(m6707.shape, prep.sigma, seed=2)["galaxies"]
    assert res.track == pytest.approx(0.0, abs=1e-3)  # float32 rounding only
    expect = np.mean(inj.signal[inj.footprint]) / prep.sigma
    assert res.leak == pytest.approx(expect, rel=1e-3)


def test_noise_is_measured_robustly_from_pixel_differences():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:128, :128]
    img = 2.0 * rng.normal(size=(128, 128)) + 0.5 * xx  # a strong gradient
    img[40:60, 40:60] += 500.0  # and a bright source: neither inflates sigma
    assert prepare(img).sigma == pytest.approx(2.0, rel=0.05)


def test_error_map_sets_the_unit(m6707):
    err = np.full(m6707.shape, 7.0)
    assert prepare(m6707, error=err).sigma == 7.0
    with pytest.raises(ValueError, match="error must have the image's shape"):
        prepare(m6707, error=np.ones((3, 3)))


def test_injections_follow_the_stated_ranges():
    shape, sigma = (200, 300), 3.0
    inj = make_injections(shape, sigma, kinds=("sky", "galaxies", "stars"), seed=9)
    # discs: SB at r_e 0.3-1 sigma, so the centre (e^b1 brighter) is at most ~5.4 sigma
    gal = inj["galaxies"]
    assert 0.3 * sigma < gal.signal.max() <= np.exp(1.6783) * sigma * 1.0001
    assert gal.signal.min() >= 0 and gal.footprint.any()
    assert np.all(gal.signal[~gal.footprint] < 0.3 * sigma)  # beyond 2 r_e it is faint
    # sky: gradient span <= 3 sigma plus bumps of 1-3 sigma
    sky = inj["sky"].signal
    assert sky.max() - sky.min() > sigma
    assert np.abs(sky).max() < (1.5 + 2 * 3 * 3) * sigma
    star = inj["stars"]
    assert star.signal.max() > 100 * sigma and star.footprint.any()


def test_sersic_kernels_carry_the_analytic_flux():
    from scipy import integrate
    from scipy.special import gammaincinv

    from skymap.quality.signals import _sersic_kernel

    # the closed-form flux per unit surface brightness at r_e, against a numerical
    # integral of the profile (n = 1: I_e e^b1 exp(-b1 r / r_e)), and the drawn
    # kernel's own sum (unit sum after scaling; before, within the 8 r_e it reaches)
    for n, re in ((1.0, 3.0), (4.0, 6.0)):
        kern, flux = _sersic_kernel(n, re)
        assert kern.sum() == pytest.approx(1.0)
        b = gammaincinv(2 * n, 0.5)
        ref, _ = integrate.quad(
            lambda r, b=b, n=n, re=re: 2 * np.pi * r * np.exp(-b * ((r / re) ** (1 / n) - 1)),
            0,
            np.inf,
            limit=200,
        )
        assert flux == pytest.approx(ref, rel=1e-6)


def test_deep_population_adds_its_stated_light_with_detectable_cores():
    from skymap.quality.signals import DEEP_LIGHT

    shape, sigma = (400, 500), 2.0
    deep = make_injections(shape, sigma, kinds=("deep",), seed=3)["deep"]
    assert deep.footprint is None  # scored over the whole frame
    # the mean light is DEEP_LIGHT sigma (Poisson count of galaxies: a few per cent)
    assert deep.signal.mean() / sigma == pytest.approx(DEEP_LIGHT, rel=0.15)
    # most pixels hold less than the noise, the brightest cores far more
    assert np.median(deep.signal) < 0.5 * sigma and deep.signal.max() > 20 * sigma
    # adding it does not move the other kinds' draws
    a = make_injections(shape, sigma, kinds=("sky", "galaxies"), seed=3)
    b = make_injections(shape, sigma, kinds=("sky", "galaxies", "deep"), seed=3)
    np.testing.assert_array_equal(a["sky"].signal, b["sky"].signal)
    np.testing.assert_array_equal(a["galaxies"].signal, b["galaxies"].signal)


def test_deep_score_is_the_mean_rise_a_method_absorbs(m6707):
    # A method that returns the image absorbs all of the deep population's light, a
    # constant one none of it, a flat median a part (the median rises with it).
    prep = prepare(m6707)
    inj = make_injections(m6707.shape, prep.sigma, kinds=("deep",), seed=1)["deep"]
    everything = injection_recovery(m6707, lambda i, m: i, kinds=("deep",), n_trials=1, seed=1)
    expect = float(np.mean(inj.signal) / prep.sigma)
    assert everything.mean("deep") == pytest.approx(expect, rel=1e-3)
    assert everything.score == pytest.approx(expect, rel=1e-3)
    const = injection_recovery(
        m6707, lambda i, m: np.zeros(i.shape), kinds=("deep",), n_trials=1, seed=1
    )
    assert const.mean("deep") == 0.0
    flat = injection_recovery(m6707, flat_median, kinds=("deep",), n_trials=1, seed=1)
    assert 0.0 < flat.mean("deep") < expect


def test_injections_are_deterministic_per_seed_and_independent_of_other_kinds():
    a = make_injections((100, 120), 1.0, kinds=("sky", "galaxies"), seed=3, trial=1)
    b = make_injections((100, 120), 1.0, kinds=("galaxies",), seed=3, trial=1)
    c = make_injections((100, 120), 1.0, kinds=("galaxies",), seed=4, trial=1)
    np.testing.assert_array_equal(a["galaxies"].signal, b["galaxies"].signal)
    assert not np.array_equal(b["galaxies"].signal, c["galaxies"].signal)
    # amplitudes are in units of sigma
    d = make_injections((100, 120), 2.5, kinds=("sky",), seed=3, trial=1)
    np.testing.assert_allclose(d["sky"].signal, 2.5 * a["sky"].signal)


def test_scores_are_deterministic_for_a_seed(m6707):
    r1 = injection_recovery(m6707, None, kinds="galaxies", n_trials=1, seed=11)
    r2 = injection_recovery(m6707, None, kinds="galaxies", n_trials=1, seed=11)
    assert r1.to_dict()["scores"] == r2.to_dict()["scores"]


def test_photutils_callable_plugs_in_unchanged(spitzer):
    from photutils.background import Background2D

    def photutils_bkg(image, mask):
        return Background2D(image, 16, mask=mask, filter_size=3)  # has .background

    res = injection_recovery(spitzer, photutils_bkg, n_trials=1)
    assert np.isfinite(res.track) and np.isfinite(res.leak)
    # compare runs it on the same injections, so the same scores
    table = compare(spitzer, {"b2d": photutils_bkg, "flat": flat_median}, n_trials=1)
    assert table["score"][0] == pytest.approx(res.score)
    assert list(table["status"]) == ["ok", "ok"]


def test_ready_made_peers_run_and_are_listed(m6707):
    available = peers.peers(noisechisel_runs=False)
    assert {"photutils_1pass", "photutils_2pass"} <= set(available)
    for name in ("sep_1pass", "sep_2pass"):
        if name in available:
            bkg = available[name](m6707, np.zeros(m6707.shape, bool))
            assert bkg.shape == m6707.shape and np.isfinite(bkg).all()
    with pytest.raises(peers.PeerFailed) if not peers.noisechisel_available() else _noop():
        peers.noisechisel_structured(np.ones((8, 8)))


class _noop:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True  # NoiseChisel, where installed, may run or fail on 8 x 8 pixels


def test_compare_marks_a_failing_method_and_keeps_going(m6707):
    def broken(image, mask):
        raise RuntimeError("no sky today")

    table = compare(m6707, {"flat": flat_median, "broken": broken}, kinds="sky", n_trials=1)
    assert table["status"][0] == "ok"
    assert "broken" in table["status"][1] and "no sky today" in table["status"][1]
    assert np.isnan(table["score"][1]) and np.isnan(table["structure"][1])
    assert table.meta["noise_sigma"] > 0


def test_compare_counts_the_fits_that_did_not_settle(m6707):
    # a result that says it did not converge (stopped at its cap) is unsettled; a bare
    # array says nothing, and counts as settled
    from types import SimpleNamespace

    def capped(image, mask):
        return SimpleNamespace(background=flat_median(image, mask), converged=False)

    table = compare(m6707, {"flat": flat_median, "capped": capped}, n_trials=2)
    assert list(table["fits"]) == [4, 4]  # 2 trials x (sky, galaxies)
    assert list(table["unsettled"]) == [0, 4]
    assert table["score"][0] == pytest.approx(table["score"][1])


@pytest.mark.parametrize(
    ("method", "match"),
    [
        (lambda image, mask: 1 / 0, "method '<lambda>' failed: ZeroDivisionError"),
        (lambda image, mask: np.zeros((5, 5)), r"'<lambda>' returned a background of shape"),
        (lambda image, mask: np.full(image.shape, np.nan), "non-finite"),
        (42, "method must be None"),
    ],
)
def test_bad_methods_are_refused_by_name(m6707, method, match):
    with pytest.raises(ValueError, match=match):
        injection_recovery(m6707, method, kinds="sky", n_trials=1)


def test_too_small_image_is_refused_with_the_minimum_size():
    with pytest.raises(ValueError, match=f"at least {MIN_SIZE} pixels"):
        injection_recovery(np.zeros((MIN_SIZE - 1, 200)), flat_median)


def test_bad_arguments_are_refused(m6707):
    with pytest.raises(ValueError, match="kinds"):
        injection_recovery(m6707, flat_median, kinds=("clouds",))
    with pytest.raises(ValueError, match="n_trials"):
        injection_recovery(m6707, flat_median, n_trials=0)
    with pytest.raises(ValueError, match="no valid pixel"):
        injection_recovery(m6707, flat_median, mask=np.ones(m6707.shape, bool))


def test_a_saved_configuration_is_a_method(m6707, tmp_path):
    path = tmp_path / "opts.toml"
    path.write_text("high = 5.0\n")
    fn, name = as_method(path)
    assert name == "opts.toml"
    a = injection_recovery(m6707, path, kinds="sky", n_trials=1)
    b = injection_recovery(m6707, {"high": 5.0}, kinds="sky", n_trials=1)
    assert a.track == b.track
    with pytest.raises(ValueError, match="missing.toml"):
        as_method(tmp_path / "missing.toml")


def test_result_table_dict_and_plot(spitzer):
    res = injection_recovery(spitzer, flat_median, kinds=("sky", "galaxies", "stars"), n_trials=2)
    t = res.to_table()
    assert len(t) == 2 and {"track", "leak", "halo", "score"} <= set(t.colnames)
    d = res.to_dict()
    assert d["scores"]["score"]["mean"] == pytest.approx(np.mean(t["score"]))
    assert d["n_trials"] == 2 and d["kinds"] == ["sky", "galaxies", "stars"]
    fig = res.plot()
    assert isinstance(fig, Figure) and len(fig.axes) >= 9  # 3 kinds x 3 maps (+ colorbars)


@settings(max_examples=15)
@given(
    ny=st.integers(MIN_SIZE, 160),
    nx=st.integers(MIN_SIZE, 160),
    sigma=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31),
)
def test_injections_scale_with_sigma_and_stay_in_range(ny, nx, sigma, seed):
    kinds = ("sky", "galaxies", "stars")
    unit = make_injections((ny, nx), 1.0, kinds=kinds, seed=seed)
    scaled = make_injections((ny, nx), sigma, kinds=kinds, seed=seed)
    for kind in kinds:
        assert scaled[kind].signal.shape == (ny, nx)
        expect = sigma * unit[kind].signal
        np.testing.assert_allclose(scaled[kind].signal, expect, rtol=1e-9, atol=1e-9 * sigma)
    gal = unit["galaxies"]
    assert gal.footprint.any() and gal.signal.min() >= 0
    assert gal.signal.max() <= np.exp(1.6783) * 1.0001  # 1 sigma at r_e, e^b1 at centre
    sky = unit["sky"].signal
    assert np.isfinite(sky).all() and sky.max() - sky.min() > 0.5


def test_a_method_that_writes_into_its_input_changes_nothing(m6707):
    def vandal(image, mask):
        bkg = np.full(image.shape, np.median(image))
        image[:] = 0.0
        mask[:] = True
        return bkg

    before = m6707.copy()
    res = injection_recovery(m6707, vandal, n_trials=2)
    np.testing.assert_array_equal(m6707, before)
    assert res.trials["track"][0] == injection_recovery(m6707, flat_median, n_trials=1).track


def test_injected_fits_that_did_not_settle_are_counted_per_trial(m6707):
    from types import SimpleNamespace

    notes = iter(["converged: settled", "converged by backing off a runaway mask: ..."] * 9)

    def reports_how_it_stopped(image, mask):
        # the untouched fit (first call) settles; then runaway, settled, runaway, ...
        note = next(notes)
        return SimpleNamespace(
            background=np.full(image.shape, np.median(image[~mask])),
            converged=True,
            convergence_note=note,
        )

    res = injection_recovery(m6707, reports_how_it_stopped, n_trials=2)
    # two kinds per trial: each trial has one settled fit and one that backed off
    assert res.unsettled.tolist() == [1, 1]
    capped = injection_recovery(
        m6707,
        lambda i, m: SimpleNamespace(background=np.zeros(i.shape), converged=False),
        kinds=("sky",),
        n_trials=2,
    )
    assert capped.unsettled.tolist() == [1, 1]
    # a plain array says nothing about how it stopped: settled
    assert injection_recovery(m6707, flat_median, n_trials=1).unsettled.tolist() == [0]
    assert res.to_dict()["unsettled"] == [1, 1]


def _waved_sky(scale=1.0):
    """A 256^2 image: a 3-sigma product of sines (periods 128 and 160 px), white noise,
    and 30 bright stars; and its true sky."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:256, :256]
    sky = 100.0 + 3.0 * np.sin(2 * np.pi * yy / 128) * np.cos(2 * np.pi * xx / 160)
    img = sky + rng.normal(size=sky.shape)
    for y, x in rng.uniform(8, 248, (30, 2)):
        img += 200.0 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 4.0)
    return img * scale, sky * scale


def test_structure_sees_the_sky_a_method_does_not_follow():
    # The injection scores cancel a method's fit of the image itself; `structure` is the
    # sky that fit leaves: for a flat background the RMS of the sines' product (3 / 2,
    # a little less after 16-px block means), for the true sky nothing.
    img, sky = _waved_sky()
    truth = lambda image, mask: sky  # noqa: E731
    table = compare(img, {"flat": flat_median, "truth": truth}, kinds="sky", n_trials=1)
    flat, exact = (float(v) for v in table["structure"])
    assert 1.3 < flat < 1.55
    assert exact < 0.05
    # and the stars are not what it measures: they are outside the free pixels, the
    # sky's crests are not
    free = free_pixels(img, np.zeros(img.shape, bool), 1.0)
    assert not free[img - sky > 8.0].any()  # star light only reaches 8 sigma
    assert 0.85 < free.mean() < 1.0


def test_structure_is_in_units_of_the_noise_whatever_the_image_units():
    img, sky = _waved_sky()
    big, _ = _waved_sky(scale=1e6)
    a = injection_recovery(img, flat_median, kinds=("sky",), n_trials=1).structure
    b = injection_recovery(big, flat_median, kinds=("sky",), n_trials=1).structure
    assert a == pytest.approx(b, rel=1e-9)
    # white noise alone leaves none, a block mean's noise is not structure
    noise = np.random.default_rng(0).normal(size=(256, 256))
    assert structure_left(noise, np.ones(noise.shape, bool), 1.0) < 0.02


def test_the_comparison_figure_marks_the_structure_left():
    img, sky = _waved_sky()
    table = compare(img, {"flat": flat_median}, kinds="sky", n_trials=1)
    fig = plot_comparison(table)
    (ax,) = fig.axes
    (line,) = [ln for ln in ax.get_lines() if ln.get_label().startswith("structure")]
    assert np.allclose(line.get_ydata(), table["structure"])


@settings(max_examples=25, deadline=None)
@given(
    scale=st.floats(1e-6, 1e6),
    offset=st.floats(-1e6, 1e6),
    junk=st.floats(-1e30, 1e30),
    seed=st.integers(0, 2**16),
)
def test_structure_is_equivariant_and_blind_to_pixels_it_does_not_read(scale, offset, junk, seed):
    rng = np.random.default_rng(seed)
    yy = np.mgrid[:96, :96][0]
    residual = rng.normal(size=(96, 96)) + np.sin(yy / 9.0)
    free = rng.uniform(size=residual.shape) > 0.2
    ref = structure_left(residual, free, 1.0)
    # an offset of up to 1e6 times the noise (beyond that float64 keeps too few of the
    # noise's digits for any method)
    moved = structure_left(residual * scale + offset * scale, free, scale)
    assert moved == pytest.approx(ref, rel=1e-6, abs=1e-9)
    spoiled = np.where(free, residual, junk)
    spoiled[~free & (rng.uniform(size=free.shape) > 0.5)] = np.nan
    assert structure_left(spoiled, free, 1.0) == ref
