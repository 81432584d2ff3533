"""Tests of skymap.stats against astropy and photutils, plus invariants."""

import warnings

import astropy.stats as astats
import numpy as np
import photutils.background as pb
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from skymap.stats import _kernels as K
from skymap.stats import estimators as S

LOCATIONS = [
    S.Mean(),
    S.Median(),
    S.SExtractorMode(),
    S.ModeEstimator(),
    S.MMM(),
    S.BiweightLocation(),
]
SCALES = [S.StdDev(), S.MADStd(), S.BiweightScale()]


def _stack(rng, nrow=300, ncol=40):
    """Gaussian rows with a skewed tail, missing values, and awkward rows."""
    x = rng.normal(10.0, 2.0, size=(nrow, ncol))
    x[:, ::5] += rng.exponential(8.0, size=x[:, ::5].shape)
    x[rng.random(x.shape) < 0.15] = np.nan
    x[0] = np.nan  # all missing
    x[1, 1:] = np.nan  # a single value
    x[2] = 4.0  # constant
    x[3] = np.round(x[3])  # ties
    x[4, :2] = [1.0, 2.0]  # two values
    x[4, 2:] = np.nan
    return x


def _astropy_clip(x, clip, axis=1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return astats.sigma_clip(
            x,
            sigma_lower=clip.lower,
            sigma_upper=clip.upper,
            maxiters=clip.maxiters,
            cenfunc=clip.cenfunc,
            stdfunc=clip.stdfunc,
            axis=axis,
            masked=False,
        )


@pytest.mark.parametrize("cenfunc", ["median", "mean"])
@pytest.mark.parametrize("stdfunc", ["std", "mad_std"])
@pytest.mark.parametrize("maxiters", [None, 1, 3, 10])
@pytest.mark.parametrize("sigmas", [(3.0, 3.0), (2.0, 4.0), (1.5, 2.5)])
def test_sigma_clip_matches_astropy_row_by_row(rng, cenfunc, stdfunc, maxiters, sigmas):
    x = _stack(rng)
    clip = S.SigmaClip(
        sigma_lower=sigmas[0],
        sigma_upper=sigmas[1],
        maxiters=maxiters,
        cenfunc=cenfunc,
        stdfunc=stdfunc,
    )
    got, lo, hi = clip(x, return_bounds=True)
    want = _astropy_clip(x, clip)
    np.testing.assert_array_equal(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, wlo, whi = astats.SigmaClip(
            sigma_lower=sigmas[0],
            sigma_upper=sigmas[1],
            maxiters=maxiters,
            cenfunc=cenfunc,
            stdfunc=stdfunc,
        )(x, axis=1, masked=False, return_bounds=True)
    np.testing.assert_allclose(lo, wlo, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(hi, whi, rtol=1e-12, atol=1e-12)


def test_sigma_clip_other_axis_dtype_and_no_mutation(rng):
    x = _stack(rng).astype(np.float32)
    before = x.copy()
    got = S.SigmaClip(sigma=2.5)(x.T, axis=0)
    assert got.dtype == np.float32
    assert got.shape == x.T.shape
    np.testing.assert_array_equal(got, _astropy_clip(x.T, S.SigmaClip(sigma=2.5), axis=0))
    np.testing.assert_array_equal(x, before)
    ints = S.SigmaClip()(np.array([[1, 2, 3, 2, 100]]))
    assert ints.dtype == np.float32
    masked = np.ma.array([[1, 2, 3, 2, 100, 7]], mask=[[0, 0, 0, 0, 0, 1]])
    np.testing.assert_array_equal(
        S.SigmaClip(sigma=1.5)(masked), [[1.0, 2.0, 3.0, 2.0, np.nan, np.nan]]
    )
    assert S.Median()(masked) == 2.0
    big_endian = np.array([[1.0, 2.0, 3.0, 2.0, 100.0]], dtype=">f8")
    np.testing.assert_array_equal(
        S.SigmaClip(sigma=1.5)(big_endian), [[1.0, 2.0, 3.0, 2.0, np.nan]]
    )
    assert S.SigmaClip()(big_endian.astype(np.float16)).dtype == np.float32
    cube = rng.normal(size=(3, 4, 50))
    np.testing.assert_array_equal(S.SigmaClip()(cube), _astropy_clip(cube, S.SigmaClip(), axis=-1))


def test_sigma_clip_function_forms_and_clipped_stats(rng):
    x = _stack(rng)
    clip = S.SigmaClip(sigma=2.5, maxiters=5)
    np.testing.assert_array_equal(S.sigma_clip(x, sigma=2.5, maxiters=5), clip(x))
    mean, median, std = S.sigma_clipped_stats(x, sigma=2.5, maxiters=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wmean, wmed, wstd = astats.sigma_clipped_stats(x, sigma=2.5, maxiters=5, axis=1)
    np.testing.assert_allclose(mean, wmean, rtol=1e-12)
    np.testing.assert_allclose(median, wmed, rtol=1e-12)
    np.testing.assert_allclose(std, wstd, rtol=1e-10, atol=1e-14)
    st_ = clip.stats(x)
    np.testing.assert_array_equal(st_.count, np.sum(np.isfinite(clip(x)), axis=1))
    np.testing.assert_allclose(st_.location("biweight"), S.BiweightLocation()(clip(x)))
    np.testing.assert_allclose(st_.scale(S.MADStd()), st_.mad_std)


def test_sigma_clip_validation_names_the_field():
    for kwargs, name in [
        ({"sigma": -1}, "sigma"),
        ({"sigma_upper": 0}, "sigma_upper"),
        ({"maxiters": 0}, "maxiters"),
        ({"maxiters": 2.5}, "maxiters"),
        ({"cenfunc": "mode"}, "cenfunc"),
        ({"stdfunc": "iqr"}, "stdfunc"),
    ]:
        with pytest.raises(ValueError, match=name):
            S.SigmaClip(**kwargs)


def test_as_sigma_clip_maps_astropy_instances(rng):
    x = _stack(rng)
    assert S.as_sigma_clip(None) is None
    ours = S.as_sigma_clip(astats.SigmaClip(sigma=2.0, sigma_upper=3.0, maxiters=None))
    assert ours == S.SigmaClip(sigma=2.0, sigma_lower=2.0, sigma_upper=3.0, maxiters=None)
    assert S.as_sigma_clip(astats.SigmaClip(maxiters=0)).maxiters is None
    with pytest.raises(ValueError, match="grow"):
        S.as_sigma_clip(astats.SigmaClip(grow=1.5))
    with pytest.raises(TypeError, match="sigma_clip"):
        S.as_sigma_clip("3 sigma")

    def p25(a, axis=None):
        return np.nanpercentile(a, 25, axis=axis)

    custom = astats.SigmaClip(sigma=2.0, cenfunc=p25, maxiters=4)
    wrapped = S.as_sigma_clip(custom)
    assert isinstance(wrapped, S.WrappedSigmaClip)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = custom(x, axis=1, masked=False)
    np.testing.assert_array_equal(wrapped(x), want)
    assert wrapped.stats(x).count.shape == (x.shape[0],)


def test_locations_and_scales_match_astropy(rng):
    x = _stack(rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refs = [
            (S.Mean(), np.nanmean(x, axis=1)),
            (S.Median(), np.nanmedian(x, axis=1)),
            (S.StdDev(), np.nanstd(x, axis=1)),
            (S.MADStd(), astats.mad_std(x, axis=1, ignore_nan=True)),
            (S.BiweightLocation(), astats.biweight_location(x, axis=1, ignore_nan=True)),
            (
                S.BiweightLocation(c=4.0),
                astats.biweight_location(x, c=4.0, axis=1, ignore_nan=True),
            ),
            (S.BiweightScale(), astats.biweight_scale(x, axis=1, ignore_nan=True)),
            (
                S.BiweightScale(modify_sample_size=True),
                astats.biweight_scale(x, axis=1, ignore_nan=True, modify_sample_size=True),
            ),
        ]
    for est, want in refs:
        np.testing.assert_allclose(est(x), want, rtol=1e-12, atol=1e-12, err_msg=repr(est))


PHOTUTILS_LOCATIONS = [
    pb.MeanBackground,
    pb.MedianBackground,
    pb.SExtractorBackground,
    pb.MMMBackground,
    pb.ModeEstimatorBackground,
    pb.BiweightLocationBackground,
]
PHOTUTILS_SCALES = [pb.StdBackgroundRMS, pb.MADStdBackgroundRMS, pb.BiweightScaleBackgroundRMS]


@pytest.mark.parametrize("cls", PHOTUTILS_LOCATIONS + PHOTUTILS_SCALES)
def test_photutils_estimators_map_and_agree(rng, cls):
    x = _stack(rng)
    clip = S.SigmaClip()
    adapt = S.as_location if cls in PHOTUTILS_LOCATIONS else S.as_scale
    ours = adapt(cls())
    assert not isinstance(ours, S.PhotutilsEstimator)
    # photutils clips inside the estimator; we clip first, then estimate
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = cls(sigma_clip=astats.SigmaClip(sigma=3.0, maxiters=10))(x, axis=1)
    np.testing.assert_allclose(ours(clip(x)), want, rtol=1e-11, atol=1e-11)


def test_photutils_subclass_is_wrapped_without_mutation(rng):
    class Quartile(pb.BackgroundBase):
        def calc_background(self, data, *, axis=None, masked=False):
            return np.nanpercentile(data, 25, axis=axis)

    inst = Quartile()
    est = S.as_location(inst)
    assert isinstance(est, S.PhotutilsEstimator)
    x = _stack(rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = np.nanpercentile(x, 25, axis=1)
    np.testing.assert_allclose(est(x), want)
    assert inst.sigma_clip is not None


def test_adapters_accept_names_and_reject_bad_input():
    assert S.as_location("sextractor") == S.SExtractorMode()
    assert S.as_scale("mad_std") == S.MADStd()
    with pytest.raises(ValueError, match="estimator"):
        S.as_location("mode3")
    with pytest.raises(ValueError, match="rms_estimator"):
        S.as_scale("iqr")
    with pytest.raises(TypeError, match="estimator"):
        S.as_location(3.0)
    with pytest.raises(ValueError, match="c must"):
        S.BiweightLocation(c=0)
    with pytest.raises(ValueError, match="skew_limit"):
        S.SExtractorMode(skew_limit=-1)


def test_sextractor_mode_switches_exactly():
    # symmetric: 2.5 med - 1.5 mean; constant: the mean; skewed: the median
    sym = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    assert S.SExtractorMode()(sym) == pytest.approx(2.0)
    assert S.SExtractorMode()(np.full(7, 3.25)) == 3.25
    skew = np.array([0.0, 0.0, 0.0, 0.0, 10.0])  # |mean-med|/std = 2/4 = 0.5
    assert S.SExtractorMode()(skew) == 0.0
    # |mean - med| / std exactly 0.3 (mean -6, median -7.5, std 5) switches to the median
    edge = np.array([-10.0, -10.0, -10.0, -5.0, -5.0, 4.0])
    assert S.SExtractorMode()(edge) == -7.5
    assert S.SExtractorMode(skew_limit=0.31)(edge) == pytest.approx(2.5 * -7.5 + 1.5 * 6.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert pb.SExtractorBackground(sigma_clip=None)(edge) == -7.5
    mild = np.array([0.0, 1.0, 2.0, 2.0, 3.5])  # mean 1.7, median 2, ratio 0.26
    assert S.SExtractorMode(median_factor=3.5)(mild) == pytest.approx(3.5 * 2 - 2.5 * 1.7)
    assert S.SExtractorMode(median_factor=3.0, mean_factor=2.0)(mild) == pytest.approx(
        S.MMM()(mild)
    )


@pytest.mark.parametrize("est", LOCATIONS + SCALES, ids=repr)
def test_edge_rows(est):
    x = np.array([[np.nan] * 4, [5.0, np.nan, np.nan, np.nan], [2.0, 2.0, 2.0, 2.0]])
    out = est(x)
    assert out.shape == (3,)
    assert np.isnan(out[0])
    expected = 5.0 if est in LOCATIONS else 0.0
    assert out[1] == expected
    assert out[2] == (2.0 if est in LOCATIONS else 0.0)


# ------------------------------------------------------------------ properties

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
rows = arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 12)), elements=finite)


@given(rows, st.floats(-1e3, 1e3), st.floats(0.01, 100.0))
def test_location_offset_and_scale_equivariance(x, offset, factor):
    for est in LOCATIONS:
        base = est(x)
        np.testing.assert_allclose(est(x + offset), base + offset, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(est(x * factor), base * factor, rtol=1e-6, atol=1e-6)


@given(rows, st.floats(-1e3, 1e3), st.floats(0.01, 100.0))
def test_scale_offset_invariance_and_scale_equivariance(x, offset, factor):
    for est in SCALES:
        base = est(x)
        np.testing.assert_allclose(est(x + offset), base, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(est(x * factor), base * factor, rtol=1e-6, atol=1e-6)


@given(rows, st.randoms(use_true_random=False))
def test_permutation_within_a_row_changes_nothing(x, rnd):
    perm = list(range(x.shape[1]))
    rnd.shuffle(perm)
    y = x[:, perm]
    for est in LOCATIONS + SCALES:
        np.testing.assert_allclose(est(y), est(x), rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(S.SigmaClip()(y), S.SigmaClip()(x)[:, perm])


@given(rows, st.lists(st.integers(0, 12), max_size=5))
def test_missing_values_are_ignored(x, where):
    """Inserting all-NaN columns anywhere leaves every result unchanged, and the clip
    keeps or rejects the valid values exactly as before."""
    positions = [min(w, x.shape[1]) for w in where]
    padded = np.insert(x, positions, np.nan, axis=1)
    valid = ~np.isnan(np.insert(np.zeros_like(x), positions, np.nan, axis=1)[0])
    for est in LOCATIONS + SCALES:
        np.testing.assert_allclose(est(padded), est(x), rtol=1e-12, atol=1e-12)
    clip = S.SigmaClip(sigma=2.0)
    np.testing.assert_array_equal(clip(padded)[:, valid], clip(x))


def _wide_rows(rng):
    """Rows long enough for the histogram-narrowed selection (> 64 values), with
    extreme ranges, subnormals, heavy ties and outliers."""
    n = 3001
    return np.stack(
        [
            rng.normal(100.0, 5.0, n),
            np.round(rng.normal(0.0, 2.0, n)),
            np.r_[np.zeros(n // 2), np.ones(n - n // 2)],
            np.r_[rng.normal(size=n - 2), 1e308, -1e308],
            np.r_[rng.normal(size=n - 1), 1e300],
            rng.normal(size=n) * 1e-310,
            rng.exponential(size=n) ** 6,
            np.r_[np.full(n - 5, 7.0), rng.normal(size=5)],
            np.where(rng.random(n) < 0.5, np.nan, rng.normal(size=n)),
        ]
    )


def test_wide_rows_match_numpy_and_astropy(rng):
    x = _wide_rows(rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_array_equal(S.Median()(x), np.nanmedian(x, axis=1))
        np.testing.assert_array_equal(S.Median()(x[:, :-1]), np.nanmedian(x[:, :-1], axis=1))
        np.testing.assert_array_equal(S.MADStd()(x), astats.mad_std(x, axis=1, ignore_nan=True))
        for cenfunc in ("median", "mean"):
            for stdfunc in ("std", "mad_std"):
                clip = S.SigmaClip(sigma=2.5, cenfunc=cenfunc, stdfunc=stdfunc, maxiters=None)
                np.testing.assert_array_equal(clip(x), _astropy_clip(x, clip))


@given(
    arrays(
        np.float64,
        st.integers(65, 600),
        elements=st.floats(-1e6, 1e6, allow_nan=False, width=32)
        | st.sampled_from([0.0, 1.0, -1.0, 5e-324]),
    )
)
def test_median_of_long_rows_is_exact(x):
    assert S.Median()(x[None, :])[0] == np.median(x)
    assert S.Median()(x[None, 1:])[0] == np.median(x[1:])


small_ints = arrays(
    np.float64,
    st.tuples(st.integers(1, 3), st.integers(1, 15)),
    elements=st.integers(-3, 3).map(float) | st.just(np.nan),
)


@given(
    small_ints,
    st.sampled_from(["median", "mean"]),
    st.sampled_from(["std", "mad_std"]),
    st.sampled_from([None, 1, 2]),
    st.floats(0.5, 3.0),
)
def test_sigma_clip_matches_astropy_on_ties_and_tiny_rows(x, cenfunc, stdfunc, maxiters, sigma):
    """Heavily tied, tiny and partly missing rows: exactly astropy's result."""
    clip = S.SigmaClip(sigma=sigma, maxiters=maxiters, cenfunc=cenfunc, stdfunc=stdfunc)
    np.testing.assert_array_equal(clip(x), _astropy_clip(x, clip))


# ------------------------------------------------------- truncation correction


def test_truncation_factor_known_values():
    full = S.SigmaClip(sigma=3.0, maxiters=None)
    # the classic number: iterated 3-sigma clipping of Gaussian noise returns ~0.985 sigma
    assert S.clip_truncation_factor(full) == pytest.approx(0.98485, abs=2e-5)
    # one iteration of a 3-sigma clip about the true centre/width: analytic truncated std
    one = S.SigmaClip(sigma=3.0, maxiters=1)
    from scipy.stats import truncnorm

    assert S.clip_truncation_factor(one) == pytest.approx(truncnorm(-3, 3).std(), rel=1e-12)
    # wider clips truncate less
    assert S.clip_truncation_factor(S.SigmaClip(sigma=5.0, maxiters=None)) > 0.9999
    with pytest.raises(ValueError, match="scale"):
        S.clip_truncation_factor(full, scale=S.Median())


@pytest.mark.parametrize(
    "clip",
    [
        S.SigmaClip(sigma=3.0, maxiters=None),
        S.SigmaClip(sigma_lower=2.0, sigma_upper=3.5, maxiters=None),
        S.SigmaClip(sigma=2.5, maxiters=2, cenfunc="mean"),
        S.SigmaClip(sigma=3.0, stdfunc="mad_std", maxiters=None),
    ],
    ids=repr,
)
@pytest.mark.parametrize("scale", [S.StdDev(), S.MADStd(), S.BiweightScale()], ids=repr)
def test_truncation_factor_matches_monte_carlo(clip, scale):
    rng = np.random.default_rng(7)
    x = rng.normal(0.0, 1.0, size=(40, 20000))
    measured = np.mean(scale(clip(x)))
    factor = S.clip_truncation_factor(clip, scale=scale)
    # 800k samples: the statistical error of the mean is about 1e-3 at most
    assert measured == pytest.approx(factor, abs=3e-3)
    corrected = S.with_clip_correction(scale, clip)
    assert np.mean(corrected(clip(x))) == pytest.approx(1.0, abs=3e-3)


@given(
    arrays(
        np.float64,
        st.integers(1, 150),
        elements=st.floats(-1e6, 1e6) | st.sampled_from([0.0, 1.0]),
    ),
    st.floats(0.0, 1.0, exclude_max=True),
)
def test_shared_selection_helpers_match_numpy(values, frac):
    """The in-place order statistics that skymap.local's kernels import from here."""
    n = values.size
    k = int(frac * n)
    a = values.copy()
    kth = K.kth_smallest(a, n, k)
    assert kth == np.partition(values, k)[k]
    # a permutation of the input, partitioned around position k
    assert np.array_equal(np.sort(a), np.sort(values))
    assert np.all(a[:k] <= kth) and np.all(a[k:] >= kth)
    b = values.copy()
    assert K.median_inplace(b, n) == np.median(values)
    mean, std = K.mean_std(values.copy(), n)
    np.testing.assert_allclose([mean, std], [values.mean(), values.std()], rtol=1e-9, atol=1e-6)


def test_exact_median_is_numpys_bit_for_bit():
    from skymap._select_kernels import exact_median

    rng = np.random.default_rng(5)
    for dtype in (np.float32, np.float64):
        for n in (1, 2, 201, 4096):
            for v in (rng.normal(size=n), rng.integers(-2, 3, size=n), np.full(n, 0.1)):
                v = v.astype(dtype)
                assert np.float64(exact_median(v)).tobytes() == np.float64(np.median(v)).tobytes()
    with_nan = np.array([1.0, np.nan, 3.0])
    assert np.isnan(exact_median(with_nan))  # numpy's answer, by numpy


@pytest.mark.parametrize("threads", [1, 2])
def test_medians_of_long_rows_are_numpys_bit_for_bit(threads):
    # Rows of SAMPLED_ROW values and more take their middle ranks in one pass between
    # bounds from a sample (sampled_pair): heavy tails, ties at the middle, a
    # constant, even and odd lengths, infinities, a NaN, float32 and float64, rows in
    # bands, and a row whose sampled pixels all lie far above the rest (the sample
    # misses: the ranks are taken the other way).
    import numba

    from skymap._select_kernels import SAMPLED_ROW, exact_median, median_rows, sampled_pair

    rng = np.random.default_rng(11)
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        for dtype in (np.float32, np.float64):
            for n in (SAMPLED_ROW, SAMPLED_ROW + 1, 3 * SAMPLED_ROW + 7, 70_001):
                missed = rng.normal(size=n)
                s = min(n, 8192, max(1024, n >> 6))
                missed[(np.arange(s, dtype=np.int64) * 2654435761) % n] = 1e6
                assert sampled_pair(missed, n // 2, n // 2, np.empty(n))[0] == -1
                cases = [
                    rng.standard_cauchy(n),
                    rng.integers(-2, 3, size=n),
                    np.full(n, 0.1),
                    np.concatenate([rng.normal(size=n - 2), [np.inf, -np.inf]]),
                    np.concatenate([rng.normal(size=n - 1), [1e30]]),
                    missed,
                ]
                for v in cases:
                    v = v.astype(dtype)
                    want = np.float64(np.median(v)).tobytes()
                    assert np.float64(exact_median(v)).tobytes() == want
                rows = rng.normal(size=(5, n)).astype(dtype)
                rows[3, n // 3] = np.nan
                out = np.full(5, 7, dtype)
                full = median_rows(rows, out)
                assert full.tolist() == [True, True, True, False, True] and out[3] == 7
                assert out[full].tobytes() == np.median(rows[full], axis=1).tobytes()
                assert np.isnan(exact_median(rows[3]))
    finally:
        numba.set_num_threads(before)
