"""Astropy-native inputs (issue 15): arrays, MaskedArray, Quantity, NDData, CCDData give
the same fit as a plain array plus mask, with masks ORed, units carried and
uncertainties read as error maps; error= / weight= for images of varying depth."""

import warnings

import astropy.units as u
import numpy as np
import pytest
from astropy.nddata import (
    CCDData,
    InverseVariance,
    NDData,
    StdDevUncertainty,
    VarianceUncertainty,
)
from astropy.wcs import WCS

import skymap
from skymap._inputs import read_image
from skymap.background.mesh import MeshBackground
from skymap.mosaic.skymatch import match
from skymap.photometry.local import annulus_background, aperture_sum
from skymap.quality.evaluate import evaluate
from skymap.quality.injection import injection_recovery

UNIT = u.electron / u.s


def _scene(shape=(96, 96), seed=0, noise=None):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    sky = 50 + 0.03 * xx + 2 * np.sin(yy / 30.0)
    sigma = np.ones(shape) if noise is None else noise
    img = sky + rng.normal(size=shape) * sigma
    for _ in range(8):
        y, x = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        img += rng.uniform(20, 200) * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 4.5)
    mask = np.zeros(shape, bool)
    mask[10:20, 30:45] = True
    return img, sky, mask


@pytest.fixture(scope="module")
def scene():
    return _scene()


@pytest.fixture(scope="module")
def reference(scene):
    img, _, mask = scene
    return skymap.fit(img, mask)


def _wcs():
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.cdelt = [-1e-4, 1e-4]
    return w


@pytest.mark.parametrize("kind", ["ccddata", "nddata", "masked", "quantity"])
def test_every_input_type_gives_the_plain_array_and_mask_background(scene, reference, kind):
    img, _, mask = scene
    if kind == "ccddata":
        image, kw = CCDData(img, unit=UNIT, mask=mask, wcs=_wcs()), {}
    elif kind == "nddata":
        image, kw = NDData(img, unit=UNIT, mask=mask, wcs=_wcs()), {}
    elif kind == "masked":
        image, kw = np.ma.MaskedArray(img, mask=mask), {}
    else:
        image, kw = img * UNIT, {"mask": mask}
    res = skymap.fit(image, **kw)
    bkg = res.background
    np.testing.assert_allclose(
        np.asarray(getattr(bkg, "value", bkg)), reference.background, rtol=0, atol=1e-6
    )
    np.testing.assert_array_equal(res.mask, reference.mask)
    if kind == "masked":
        assert not isinstance(bkg, u.Quantity) and res.unit is None
        assert isinstance(image - bkg, np.ndarray)
    else:
        assert bkg.unit == UNIT and res.rms.unit == UNIT and res.unit == UNIT
        np.testing.assert_allclose(res.rms.value, reference.rms, atol=1e-6)
    if kind in ("ccddata", "quantity"):
        # the README's own idiom
        resid = image - bkg
        np.testing.assert_allclose(resid.value, img - reference.background, atol=1e-6)
    if kind in ("ccddata", "nddata"):
        out = res.as_nddata("background")
        assert type(out) is (CCDData if kind == "ccddata" else NDData)
        assert out.wcs is not None and out.unit == UNIT
        np.testing.assert_allclose(out.data, reference.background, atol=1e-6)


def test_a_mask_hidden_in_ccddata_changes_the_result_exactly_as_mask_does(scene):
    img, _, _ = scene
    hidden = np.zeros(img.shape, bool)
    hidden[40:70, 20:60] = True  # a large region: the fit must change
    plain = skymap.fit(img)
    given = skymap.fit(img, hidden)
    inside = skymap.fit(CCDData(img, unit="adu", mask=hidden))
    assert np.abs(given.background - plain.background).max() > 1e-3
    np.testing.assert_array_equal(inside.background.value, given.background)
    np.testing.assert_array_equal(inside.bad_mask, given.bad_mask)
    # ORed with mask=, never dropped
    extra = np.zeros(img.shape, bool)
    extra[:5] = True
    both = skymap.fit(CCDData(img, unit="adu", mask=hidden), mask=extra)
    np.testing.assert_array_equal(both.bad_mask, skymap.fit(img, hidden | extra).bad_mask)


def test_mesh_background_reads_every_input_type(scene):
    img, _, mask = scene
    mb = MeshBackground(box_size=16)
    ref = mb.fit(img, mask)
    for image, kw in [
        (CCDData(img, unit=UNIT, mask=mask), {}),
        (np.ma.MaskedArray(img, mask=mask), {}),
        (img * UNIT, {"mask": mask.astype(int)}),  # a plain-number mask with a Quantity
    ]:
        res = mb.fit(image, **kw)
        np.testing.assert_array_equal(
            np.asarray(getattr(res.background, "value", res.background)), ref.background
        )
    assert res.background.unit == UNIT and res.rms.unit == UNIT


def test_local_skymatch_and_evaluate_read_astropy_inputs(scene, reference):
    img, _, mask = scene
    ccd = CCDData(img, unit=UNIT, mask=mask)
    pos = [(20.0, 15.0), (70.0, 60.0)]
    a = annulus_background(ccd, pos, 4, 9)
    b = annulus_background(img, pos, 4, 9, mask=mask)
    np.testing.assert_array_equal(a.background, b.background)
    np.testing.assert_array_equal(
        aperture_sum(ccd, pos, 3)[0], aperture_sum(img, pos, 3, mask=mask)[0]
    )
    levels = match([np.ma.MaskedArray(img, mask=mask), (img + 5) * u.adu]).sky
    assert levels[1] - levels[0] == pytest.approx(5, abs=0.05)
    ev = evaluate(ccd, skymap.fit(ccd))
    ref = evaluate(img, reference, mask=reference.mask)
    assert ev.noise_sigma == pytest.approx(ref.noise_sigma, rel=1e-9)


def test_injection_recovery_reads_the_mask_hidden_in_ccddata():
    rng = np.random.default_rng(2)
    img = 10 + rng.normal(size=(64, 64))
    mask = np.zeros(img.shape, bool)
    mask[:, :20] = True
    img[mask] += 50.0  # what the mask hides would move a masked median a lot

    def masked_median(image, m):
        return np.full(image.shape, np.median(image[~m]))

    kw = {"kinds": ("sky",), "n_trials": 1}
    a = injection_recovery(CCDData(img, unit=UNIT, mask=mask), masked_median, **kw)
    b = injection_recovery(img, masked_median, mask=mask, **kw)
    c = injection_recovery(img, masked_median, **kw)
    np.testing.assert_array_equal(a.trials["track"], b.trials["track"])
    assert not np.array_equal(a.trials["track"], c.trials["track"])


# --------------------------------------------------------------------------- error maps


def test_uncertainties_weights_and_errors_give_one_answer(scene):
    img, _, mask = scene
    rng = np.random.default_rng(3)
    err = rng.uniform(0.8, 1.5, img.shape)
    ref = skymap.fit(img, mask, error=err)
    assert np.abs(ref.background - skymap.fit(img, mask).background).max() > 0  # it is used
    for unc in (StdDevUncertainty(err), VarianceUncertainty(err**2), InverseVariance(err**-2)):
        res = skymap.fit(CCDData(img, unit=UNIT, mask=mask, uncertainty=unc))
        np.testing.assert_allclose(res.background.value, ref.background, atol=1e-6)
    res = skymap.fit(img, mask, weight=1 / err**2)
    np.testing.assert_allclose(res.background, ref.background, atol=1e-6)
    # an error Quantity in convertible units is converted
    res = skymap.fit(img * UNIT, mask, error=err * 1000 * u.electron / u.ks)
    np.testing.assert_allclose(res.background.value, ref.background, atol=1e-6)


def test_zero_weight_and_non_finite_error_exclude_the_pixel(scene):
    img, _, _ = scene
    w = np.ones(img.shape)
    w[5, 5] = 0
    err = np.ones(img.shape)
    err[7, 9] = np.nan
    assert skymap.fit(img, weight=w).bad_mask[5, 5]
    assert skymap.fit(img, error=err).bad_mask[7, 9]


def test_with_an_error_map_both_halves_of_an_image_of_varying_depth_gain():
    """Right half 4x noisier (issue 15): with error= at most 2% of its pure-noise pixels
    are masked, the noisy half is at least as accurate as without the error map and the
    deep half gains from the weighting. One smoothing for the image would smooth the
    noisy half twice as long as the deep one, past its optimum: on this scene (seed 3 of
    ``benchmarks/bench_depth.py``) the noisy half's error then rose from 0.031 to 0.043
    sigma; the penalty that follows the depth brings it to 0.018."""
    n = 192
    noise = np.ones((n, n))
    noise[:, n // 2 :] = 4.0
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:n, :n]
    sky = 100 + 0.02 * xx + 3 * np.sin(yy / 60.0)
    src = np.zeros((n, n))
    for _ in range(40):
        y, x = rng.uniform(0, n, 2)
        src += rng.uniform(5, 80) * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 4.5)
    img = sky + src + rng.normal(size=(n, n)) * noise
    pure, right = src < 0.01, xx >= n // 2

    def score(res):
        e = (res.background - sky) / noise
        return np.sqrt(np.mean(e[right] ** 2)), np.sqrt(np.mean(e[~right] ** 2))

    without = skymap.fit(img)
    with_err = skymap.fit(img, error=noise)
    assert with_err.mask[pure & right].mean() <= 0.02
    (r0, l0), (r1, l1) = score(without), score(with_err)
    # Over 14 such scenes: noisy 0.0242 -> 0.0198 sigma, deep 0.0773 -> 0.0294
    # (benchmarks/README.md, "varying depth").
    assert r1 <= r0
    assert l1 < l0


def test_bad_inputs_name_what_is_wrong(scene):
    img, _, _ = scene
    with pytest.raises(ValueError, match="uncertainty"):
        skymap.fit(CCDData(img, unit="adu", uncertainty=StdDevUncertainty(np.ones((3, 3)))))
    with pytest.raises(ValueError, match="error"):
        skymap.fit(img, error=-np.ones(img.shape))
    with pytest.raises(ValueError, match="weight"):
        skymap.fit(img, weight=np.full(img.shape, -1.0))
    with pytest.raises(ValueError, match="not both"):
        skymap.fit(img, error=np.ones(img.shape), weight=np.ones(img.shape))
    with pytest.raises(ValueError, match="error must have the image's shape"):
        skymap.fit(img, error=np.ones((4, 4)))
    with pytest.raises(ValueError, match=r"electron / s.*\bm\b|\bm\b.*electron / s"):
        skymap.fit(img * UNIT, error=np.ones(img.shape) * u.m)
    empty = NDData(np.ones((4, 4)))
    empty._data = None
    with pytest.raises(ValueError, match="data=None"):
        read_image(empty)


def test_attributes_skymap_cannot_use_are_named_in_a_warning(scene):
    img, _, _ = scene
    with pytest.warns(UserWarning, match="flags"):
        read_image(CCDData(img, unit="adu", flags=np.zeros(img.shape, int)))
    with pytest.warns(UserWarning, match="psf"):
        read_image(NDData(img, psf=np.ones((3, 3)) / 9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_image(NDData(img, meta={"a": 1}))  # meta is carried, not warned about


def test_normalisation_in_one_pass_equals_numpys_passes(rng):
    # the compiled apply against subtract, multiply and clip where finite, float32
    # and float64, with NaN, infinities and values that overflow when scaled
    from skymap._inputs import CLIP, Normalisation

    for dtype in (np.float32, np.float64):
        img = (rng.normal(size=(37, 41)) * 1e3 + 5e3).astype(dtype)
        img[1, 1], img[2, 2], img[3, 3] = np.nan, np.inf, -np.inf
        img[4, 4], img[5, 5] = np.finfo(dtype).max, -np.finfo(dtype).max
        norm = Normalisation(level=4321.5, scale=0.25, spread=1.0)
        with np.errstate(over="ignore", invalid="ignore"):
            want = (img - dtype(norm.level)) * dtype(1.0 / norm.scale)
        np.clip(want, -CLIP, CLIP, out=want, where=np.isfinite(img))
        got = norm.apply(img)
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, want)


def test_normalised_image_and_outliers_in_one_pass_equal_the_two_steps():
    # Normalisation.apply_excluding: the compiled pass against apply() then
    # given | outliers(), bit for bit; a strided image takes the two steps
    from skymap._inputs import Normalisation

    rng = np.random.default_rng(8)
    for dtype in (np.float32, np.float64):
        img = (rng.standard_cauchy(size=(300, 257)) * 30 + 1000).astype(dtype)
        img[rng.random(img.shape) < 0.01] = np.nan
        img[2, 2], img[3, 3] = np.inf, -np.inf
        given = rng.random(img.shape) < 0.05
        norm = Normalisation.of(img, given)
        for im, g in ((img, given), (img[:, ::2], given[:, ::2].copy())):
            work, bad = norm.apply_excluding(im, g)
            want = norm.apply(im)
            assert np.array_equal(work.view(np.uint8), want.view(np.uint8))
            assert np.array_equal(bad, g | norm.outliers(want)) and (bad & ~g).any()


def test_undo_with_a_pedestal_subtracts_it_in_the_maps_dtype_first():
    # undo(minus=): (work - minus) in work's dtype, then * scale + level, as numpy's
    # passes; in place with reuse=; lazily for dask
    import dask.array as da

    from skymap._inputs import Normalisation

    rng = np.random.default_rng(9)
    for dtype in (np.float32, np.float64):
        work = (rng.normal(size=(130, 70)) * 40).astype(dtype)
        work[1, 1], work[2, 2] = np.nan, -0.0
        norm = Normalisation(level=1234.567, scale=0.125)
        for minus in (0.0, 0.0371, 3.7):
            shifted = work - np.asarray(minus, dtype=dtype) if minus else work
            want = np.add(np.multiply(shifted, dtype(0.125)), dtype(1234.567))
            got = norm.undo(work, minus=minus)
            assert got.dtype == dtype and np.array_equal(got.view(np.uint8), want.view(np.uint8))
            mine = work.copy()
            assert norm.undo(mine, reuse=True, minus=minus) is mine
            assert np.array_equal(mine.view(np.uint8), want.view(np.uint8))
            lazy = norm.undo(da.from_array(work, chunks=50), minus=minus).compute()
            assert np.array_equal(lazy.view(np.uint8), want.view(np.uint8))
