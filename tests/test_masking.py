"""Tests for skymap.masking: threshold, multi-scale, ring-median and flag maskers."""

import numpy as np
import pytest
import scipy.ndimage as ndi
from astropy.convolution import Tophat2DKernel, convolve
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from photutils.segmentation import detect_sources

from skymap.masking.maskers import (
    BrightSourceMasker,
    FlagMasker,
    Masker,
    MultiScaleMasker,
    RingMedianMasker,
    ThresholdMasker,
    disk_footprint,
    grow_mask,
    segment,
    smooth_masked,
)
from skymap.stats.filters import ring_median


def _scene(rng, shape=(120, 100), nsrc=12):
    """Unit-noise sky with Gaussian sources of assorted widths and amplitudes."""
    ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx]
    img = rng.normal(size=shape)
    for _ in range(nsrc):
        y0, x0 = rng.uniform(0, ny), rng.uniform(0, nx)
        s = rng.uniform(0.8, 4.0)
        img += rng.uniform(2, 60) * np.exp(-0.5 * ((yy - y0) ** 2 + (xx - x0) ** 2) / s**2)
    return img


@pytest.mark.parametrize("radius", [0.5, 1, 1.5, 2, 2.5, 3, 5.2])
def test_grow_mask_equals_binary_dilation_with_disk(rng, radius):
    m = rng.random((70, 65)) < 0.01
    m[0, 0] = m[69, 33] = True  # edge pixels grow inwards only
    expected = ndi.binary_dilation(m, structure=disk_footprint(radius))
    np.testing.assert_array_equal(grow_mask(m, radius), expected)


@pytest.mark.parametrize("radius", [1, 2])
def test_grow_mask_grows_isolated_pixels_where_tophat_trick_deletes_them(radius):
    m = np.zeros((21, 21), dtype=bool)
    m[10, 10] = True
    grown = grow_mask(m, radius)
    assert grown[10, 10]
    assert grown.sum() == disk_footprint(radius).sum() > 1
    # The seed notebook's dilation (threshold a normalised top-hat convolution at
    # 1 / (pi r^2)) loses the pixel altogether at these radii.
    tophat = convolve(m.astype(float), Tophat2DKernel(radius)) >= 1.0 / (np.pi * radius**2)
    assert not tophat.any()


def test_grow_mask_edge_cases():
    empty = np.zeros((4, 5), dtype=bool)
    assert not grow_mask(empty, 3).any()
    full = np.ones((4, 5), dtype=bool)
    assert grow_mask(full, 3).all()
    m = empty.copy()
    m[1, 1] = True
    np.testing.assert_array_equal(grow_mask(m, 0), m)
    with pytest.raises(ValueError, match="radius"):
        grow_mask(m, -1)


@given(
    m=hnp.arrays(bool, st.tuples(st.integers(1, 20), st.integers(1, 20))),
    radius=st.floats(0, 6),
)
def test_grow_mask_is_a_disk_dilation(m, radius):
    got = grow_mask(m, radius)
    assert not (m & ~got).any()  # never removes
    if m.any():
        expected = ndi.binary_dilation(m, structure=disk_footprint(radius))
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("npixels", [1, 5, 12])
def test_segment_identical_to_photutils_detect_sources(rng, connectivity, npixels):
    smoothed = ndi.gaussian_filter(_scene(rng), 1.5)
    threshold = 0.8
    mask = np.zeros(smoothed.shape, dtype=bool)
    mask[40:60, 30:45] = True
    ours = segment(smoothed, threshold, npixels=npixels, connectivity=connectivity, mask=mask)
    ref = detect_sources(
        smoothed, threshold, n_pixels=npixels, connectivity=connectivity, mask=mask
    )
    assert ours.max() > 0
    np.testing.assert_array_equal(ours, ref.data)


def test_segment_with_threshold_map_matches_photutils(rng):
    smoothed = ndi.gaussian_filter(_scene(rng), 1.0)
    thr = np.linspace(0.3, 2.0, smoothed.size).reshape(smoothed.shape)
    ref = detect_sources(smoothed, thr, n_pixels=4)
    np.testing.assert_array_equal(segment(smoothed, thr, npixels=4), ref.data)


def test_segment_finds_nothing_gracefully():
    labels = segment(np.zeros((5, 6)), 1.0, npixels=3)
    assert labels.dtype == np.int32 and not labels.any()


def test_threshold_masker_is_smooth_segment_dilate(rng):
    img = _scene(rng)
    mask = np.zeros(img.shape, dtype=bool)
    mask[:10] = True
    tm = ThresholdMasker(nsigma=2.5, fwhm=2.5, npixels=6, dilate=2.0, connectivity=4)
    smoothed = smooth_masked(img, 2.5, mask)
    ref = detect_sources(
        np.nan_to_num(smoothed, nan=-np.inf), 2.5, n_pixels=6, connectivity=4, mask=mask
    )
    expected = ndi.binary_dilation(ref.data > 0, structure=disk_footprint(2.0))
    np.testing.assert_array_equal(tm(img, 1.0, mask), expected)


def test_threshold_masker_rms_map_scales_threshold(rng):
    img = _scene(rng)
    tm = ThresholdMasker(nsigma=3, fwhm=2, npixels=5, dilate=0)
    rms = np.ones(img.shape)
    rms[:, 50:] = 1e6  # nothing can be detected on the right half
    m = tm(img, rms)
    assert m[:, :50].any()
    assert not m[:, 50:].any()
    np.testing.assert_array_equal(tm(img, 1.0), tm(img, np.ones(img.shape)))


def test_threshold_masker_estimates_rms_when_none(rng):
    img = 3.0 * rng.normal(size=(100, 100))
    img[50:53, 50:53] += 200.0
    tm = ThresholdMasker(nsigma=5, fwhm=1.5, npixels=3, dilate=0)
    m = tm(img, None)
    assert m[51, 51]
    np.testing.assert_array_equal(m, tm(img, 3.0))


@given(data=st.data())
def test_masked_pixels_never_feed_the_smoothing(data):
    shape = data.draw(st.tuples(st.integers(3, 25), st.integers(3, 25)))
    img = data.draw(hnp.arrays(np.float64, shape, elements=st.floats(-100, 100)))
    mask = data.draw(hnp.arrays(bool, shape))
    junk = data.draw(hnp.arrays(np.float64, shape, elements=st.floats(allow_nan=True)))
    other = np.where(mask, junk, img)
    np.testing.assert_array_equal(smooth_masked(img, 2.0, mask), smooth_masked(other, 2.0, mask))
    tm = ThresholdMasker(nsigma=1, fwhm=2, npixels=2, dilate=1)
    np.testing.assert_array_equal(tm(img, 10.0, mask), tm(other, 10.0, mask))


def test_smooth_masked_without_mask_matches_gaussian_filter_inside(rng):
    img = rng.normal(size=(60, 60))
    fwhm = 3.0
    sigma = fwhm / (2 * np.sqrt(2 * np.log(2)))
    ref = ndi.gaussian_filter(img, sigma, truncate=4.0)
    inner = (slice(10, -10), slice(10, -10))
    np.testing.assert_allclose(smooth_masked(img, fwhm)[inner], ref[inner], rtol=0, atol=1e-12)
    # A constant image stays constant up to the edges (normalised convolution).
    np.testing.assert_allclose(smooth_masked(np.full((20, 30), 7.0), fwhm), 7.0)


class _Recorder:
    """A masker that records the mask it was given and masks a fixed block."""

    def __init__(self, block):
        self.block = block
        self.seen = []

    def __call__(self, residual, rms, mask=None):
        self.seen.append(None if mask is None else np.array(mask))
        out = np.zeros(np.shape(residual), dtype=bool)
        out[self.block] = True
        return out


def test_multiscale_passes_earlier_masks_to_later_scales():
    shape = (10, 12)
    user = np.zeros(shape, dtype=bool)
    user[0, 0] = True
    a, b, c = _Recorder(np.s_[2:4, 2:4]), _Recorder(np.s_[3:6, 3:6]), _Recorder(np.s_[8, :])
    res = MultiScaleMasker(maskers=[a, b, c]).apply(np.zeros(shape), 1.0, user)
    np.testing.assert_array_equal(a.seen[0], user)
    expected_b = user.copy()
    expected_b[2:4, 2:4] = True
    np.testing.assert_array_equal(b.seen[0], expected_b)
    expected_c = expected_b.copy()
    expected_c[3:6, 3:6] = True
    np.testing.assert_array_equal(c.seen[0], expected_c)
    assert not res.mask[0, 0]  # the input mask is not part of the result
    assert res.bits[3, 3] == 0b011 and res.tier[3, 3] == 1
    assert res.bits[5, 5] == 0b010 and res.tier[5, 5] == 2
    assert res.bits[8, 0] == 0b100 and res.tier[8, 0] == 3
    np.testing.assert_array_equal(res.mask, res.bits != 0)
    np.testing.assert_array_equal(MultiScaleMasker(maskers=[a, b, c])(np.zeros(shape)), res.mask)


def test_multiscale_of_threshold_maskers_differs_from_independent_passes(rng):
    # A bright core with a faint wide halo: with the core masked, the wide pass sees the
    # halo alone; without (the seed notebook's bug) the core dominates its smoothing.
    yy, xx = np.mgrid[:128, :128]
    r2 = (yy - 64.0) ** 2 + (xx - 64.0) ** 2
    img = rng.normal(size=yy.shape) + 400 * np.exp(-r2 / 4.0) + 2.5 * np.exp(-r2 / 300.0)
    small = ThresholdMasker(nsigma=3, fwhm=1.5, npixels=5, dilate=2)
    wide = ThresholdMasker(nsigma=1.5, fwhm=10, npixels=50, dilate=2)
    res = MultiScaleMasker(maskers=[small, wide]).apply(img, 1.0)
    wide_alone = wide(img, 1.0)
    np.testing.assert_array_equal(res.mask, small(img, 1.0) | wide(img, 1.0, small(img, 1.0)))
    # Smoothing in the core spreads its light: the blind wide pass masks a larger area.
    assert wide_alone.sum() > (res.bits & 0b10).astype(bool).sum()


def test_multiscale_validates_maskers():
    with pytest.raises(ValueError, match="maskers"):
        MultiScaleMasker(maskers=[])
    with pytest.raises(ValueError, match="maskers"):
        MultiScaleMasker(maskers=[ThresholdMasker(), 3])


def test_ring_median_masker_finds_sources_on_a_sloped_sky(rng):
    ny, nx = 100, 90
    yy, xx = np.mgrid[:ny, :nx]
    sky = 100 + 0.5 * xx - 0.3 * yy
    img = sky + rng.normal(size=(ny, nx))
    img[30:33, 40:43] += 40
    mask = np.zeros((ny, nx), dtype=bool)
    mask[70:80, 10:20] = True
    img[70:80, 10:20] = 1e9  # hidden by the mask: must not be detected or leak
    rmm = RingMedianMasker(radius=8, width=3, nsigma=4, fwhm=2, npixels=4, dilate=1)
    m = rmm(img, 1.0, mask)
    assert m[31, 41]
    assert m.sum() < 60
    diff = img - ring_median(img, 8, 3, mask=mask)
    expected = ThresholdMasker(nsigma=4, fwhm=2, npixels=4, dilate=1)(diff, 1.0, mask)
    np.testing.assert_array_equal(m, expected)


def test_configs_validate_and_name_the_field():
    with pytest.raises(ValueError, match="nsigma"):
        ThresholdMasker(nsigma=0)
    with pytest.raises(ValueError, match="npixels"):
        ThresholdMasker(npixels=2.5)
    with pytest.raises(ValueError, match="connectivity"):
        ThresholdMasker(connectivity=6)
    with pytest.raises(ValueError, match="dilate"):
        RingMedianMasker(dilate=-1)
    with pytest.raises(ValueError, match="width"):
        RingMedianMasker(width=0)
    with pytest.raises(ValueError, match="convention"):
        FlagMasker(convention="hst")
    with pytest.raises(ValueError, match="bits"):
        FlagMasker(bits=["NOT_A_FLAG"])
    with pytest.raises(ValueError, match="bits"):
        FlagMasker(bits=5)
    with pytest.raises(ValueError, match="bitmask"):
        FlagMasker(bitmask=-1)
    assert ThresholdMasker(nsigma=2) == ThresholdMasker(nsigma=2.0)


def test_maskers_follow_the_protocol_and_do_not_mutate(rng):
    img = _scene(rng, (40, 40))
    mask = rng.random(img.shape) < 0.1
    img_copy, mask_copy = img.copy(), mask.copy()
    for masker in (
        ThresholdMasker(),
        MultiScaleMasker(maskers=[ThresholdMasker(fwhm=1), ThresholdMasker(fwhm=4)]),
        RingMedianMasker(radius=5, width=2),
        FlagMasker(),
    ):
        assert isinstance(masker, Masker)
        out = masker(img, 1.0, mask)
        assert out.dtype == bool and out.shape == img.shape
    np.testing.assert_array_equal(img, img_copy)
    np.testing.assert_array_equal(mask, mask_copy)


def test_flag_masker_bits_names_and_bitmasks():
    dq = np.array([[0, 1, 2, 4], [8, 2**11, 2**31, 3]], dtype=np.uint32)
    np.testing.assert_array_equal(FlagMasker().to_mask(dq), dq != 0)
    np.testing.assert_array_equal(FlagMasker(bits=[1, 2]).to_mask(dq), (dq & 6) != 0)
    jwst = FlagMasker(bits=["DO_NOT_USE", "hot", "reference_pixel"])
    np.testing.assert_array_equal(jwst.to_mask(dq), (dq & (1 | 2**11 | 2**31)) != 0)
    # The same bit 31 in a signed 32-bit flag array is a negative number.
    np.testing.assert_array_equal(jwst.to_mask(dq.view(np.int32)), jwst.to_mask(dq))
    spherex = FlagMasker(bits=["TRANSIENT", "HOT"], bitmask=0b100, convention="spherex")
    assert spherex.value == 1 | 2**10 | 4
    np.testing.assert_array_equal(spherex.to_mask(dq), (dq & (1 | 4 | 2**10)) != 0)
    np.testing.assert_array_equal(FlagMasker(bitmask=8)(np.zeros(dq.shape), None, dq), dq == 8)
    assert not FlagMasker()(np.zeros((2, 3)), None, None).any()
    with pytest.raises(TypeError, match="flags"):
        FlagMasker().to_mask(np.zeros((2, 2)))


def test_bright_source_masker_grows_with_flux(rng):
    yy, xx = np.mgrid[:160, :160]
    img = rng.normal(size=yy.shape)
    amps = [(40, 40, 8.0), (40, 120, 80.0), (120, 80, 3000.0)]
    for y0, x0, amp in amps:
        img += amp * np.exp(-((yy - y0) ** 2 + (xx - x0) ** 2) / 4.0)
    detect = ThresholdMasker(nsigma=3, fwhm=2, npixels=3, dilate=1)
    bsm = BrightSourceMasker(detect=detect, flux_ref=50.0, radius_ref=2.0, max_radius=20)
    labels, radius = bsm.radii(img, 1.0)
    np.testing.assert_array_equal(labels, detect.segment(img, 1.0))
    flux = ndi.sum_labels(img, labels, np.arange(labels.max() + 1))
    raw = np.clip(2.0 * np.clip(flux / 50.0, 0, None) ** 0.5, 1, 20)
    ladder = np.array([0, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24])
    for lab in range(1, labels.max() + 1):
        expected = min(ladder[ladder >= raw[lab] - 1e-9][0], 20)
        assert radius[lab] == expected
    # Brighter sources get larger radii; the brightest is capped.
    by_source = [radius[labels[y0, x0]] for y0, x0, _ in amps]
    assert by_source[0] < by_source[1] < by_source[2] == 20
    # Each region is dilated by its own disk.
    expected_mask = np.zeros(img.shape, dtype=bool)
    for lab in range(1, labels.max() + 1):
        expected_mask |= ndi.binary_dilation(labels == lab, structure=disk_footprint(radius[lab]))
    got = bsm(img, 1.0)
    np.testing.assert_array_equal(got, expected_mask)
    assert not (detect(img, 1.0) & ~got).any()
    with pytest.raises(ValueError, match="flux_ref"):
        BrightSourceMasker(flux_ref=0)
