"""Tests for skymap.filters: ring footprint, exact ring median / percentile."""

import numpy as np
import pytest
import scipy.ndimage as ndi
from astropy.convolution import Ring2DKernel
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from skymap.stats.filters import (
    approximate_ring_median,
    ring_footprint,
    ring_median,
    ring_percentile,
)


def _image_with_sources(rng, shape, dtype=np.float32, nsrc=6):
    """Gaussian noise on a gradient, with a few bright Gaussian blobs and repeated values."""
    ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx]
    img = 10.0 + 0.01 * xx - 0.02 * yy + rng.normal(size=shape)
    for _ in range(nsrc):
        y0, x0 = rng.uniform(0, ny), rng.uniform(0, nx)
        img += rng.uniform(5, 500) * np.exp(-0.5 * ((yy - y0) ** 2 + (xx - x0) ** 2) / 2.0**2)
    # Ties must not upset exactness: quantise a patch so that many values repeat.
    img[: ny // 3, : nx // 3] = np.round(img[: ny // 3, : nx // 3])
    return img.astype(dtype)


def _brute_force_percentile(image, valid, footprint, percentile):
    """Reference: reflect-pad, gather each ring, drop invalid, scipy's rank rule."""
    half = footprint.shape[0] // 2
    ny, nx = image.shape
    iy = np.arange(-half, ny + half)
    ix = np.arange(-half, nx + half)
    # scipy's 'reflect' extension: period 2n, mirrored about the edge between pixels.
    ry = np.where(iy % (2 * ny) < ny, iy % (2 * ny), 2 * ny - 1 - iy % (2 * ny))
    rx = np.where(ix % (2 * nx) < nx, ix % (2 * nx), 2 * nx - 1 - ix % (2 * nx))
    pimg = image[np.ix_(ry, rx)]
    pvalid = valid[np.ix_(ry, rx)]
    dy, dx = np.nonzero(footprint)
    out = np.full(image.shape, np.nan, dtype=image.dtype)
    for y in range(ny):
        for x in range(nx):
            v = pimg[y + dy, x + dx][pvalid[y + dy, x + dx]]
            if v.size:
                v = np.sort(v)
                out[y, x] = v[min(int(float(v.size) * percentile / 100.0), v.size - 1)]
    return out


@pytest.mark.parametrize(
    ("radius", "width"),
    [(0, 1), (0, 0.5), (1, 1), (2.5, 1.5), (3, 2), (3.7, 2.2), (10, 0.3), (15, 5), (20, 7.5)],
)
def test_ring_footprint_matches_astropy_ring2dkernel(radius, width):
    expected = Ring2DKernel(radius, width).array > 0
    got = ring_footprint(radius, width)
    assert got.dtype == bool
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("shape", "radius", "width"),
    [
        ((64, 64), 3, 2),
        ((37, 53), 5, 2.5),
        ((101, 77), 15, 5),
        ((9, 130), 4, 3),  # thinner than the footprint: multiple reflections in y
        ((5, 7), 4, 2),  # smaller than the footprint in both directions
        ((1, 40), 2, 1),
        ((150, 140), 1, 1),
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ring_median_equals_scipy_median_filter_bit_for_bit(rng, shape, radius, width, dtype):
    img = _image_with_sources(rng, shape, dtype)
    expected = ndi.median_filter(img, footprint=ring_footprint(radius, width), mode="reflect")
    got = ring_median(img, radius, width)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got.view(np.uint8), expected.view(np.uint8))


@pytest.mark.parametrize("percentile", [0, 5, 25, 37.5, 50, 84.13, 99, 100])
def test_ring_percentile_equals_scipy_percentile_filter(rng, percentile):
    img = _image_with_sources(rng, (83, 71), np.float64)
    fp = ring_footprint(6, 3)
    expected = ndi.percentile_filter(img, percentile, footprint=fp, mode="reflect")
    np.testing.assert_array_equal(ring_percentile(img, 6, 3, percentile), expected)


@pytest.mark.parametrize("percentile", [0, 30, 50, 100])
def test_masked_and_nan_pixels_follow_brute_force_reference(rng, percentile):
    img = _image_with_sources(rng, (41, 35), np.float32)
    mask = rng.random(img.shape) < 0.3
    mask[10:20, 5:30] = True  # a large hole: some rings are nearly empty
    img[rng.random(img.shape) < 0.05] = np.nan
    img[3, 4] = np.inf
    valid = ~mask & np.isfinite(img)
    fp = ring_footprint(3, 2)
    expected = _brute_force_percentile(img, valid, fp, percentile)
    got = ring_percentile(img, 3, 2, percentile, mask=mask)
    np.testing.assert_array_equal(got, expected)


def test_even_count_takes_upper_middle_value():
    # Ring(1, 1) around the centre holds 12 pixels; mask all but 4 with values 1, 2, 3, 4.
    img = np.zeros((5, 5))
    mask = np.ones((5, 5), dtype=bool)
    for value, (y, x) in zip([4.0, 1.0, 3.0, 2.0], [(0, 2), (2, 0), (2, 4), (4, 2)], strict=True):
        img[y, x] = value
        mask[y, x] = False
    assert ring_median(img, 1, 1, mask=mask)[2, 2] == 3.0


def test_rings_without_valid_pixels_give_nan():
    img = np.ones((20, 20), dtype=np.float32)
    mask = np.ones_like(img, dtype=bool)
    mask[0, 0] = False
    out = ring_median(img, 2, 1, mask=mask)
    assert np.isnan(out[10, 10])
    assert np.isfinite(out).sum() > 0
    assert np.isnan(ring_median(img, 2, 1, mask=np.ones_like(mask))).all()


def test_ceiling_clips_before_filtering(rng):
    img = _image_with_sources(rng, (60, 50), np.float32)
    got = ring_median(img, 4, 2, ceiling=12.0)
    expected = ring_median(np.minimum(img, np.float32(12.0)), 4, 2)
    np.testing.assert_array_equal(got, expected)
    assert got.max() <= 12.0
    with pytest.raises(ValueError, match="ceiling"):
        ring_median(img, 4, 2, ceiling=np.nan)


def test_inputs_are_not_mutated_and_integers_become_float32(rng):
    img = rng.integers(0, 100, size=(30, 31)).astype(np.int16)
    mask = rng.random(img.shape) < 0.2
    img_copy, mask_copy = img.copy(), mask.copy()
    out = ring_median(img, 3, 2, mask=mask, ceiling=50)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(img, img_copy)
    np.testing.assert_array_equal(mask, mask_copy)


def test_bad_parameters_name_the_parameter():
    img = np.zeros((10, 10))
    with pytest.raises(ValueError, match="width"):
        ring_median(img, 3, 0)
    with pytest.raises(ValueError, match="radius"):
        ring_median(img, -1, 2)
    with pytest.raises(ValueError, match="percentile"):
        ring_percentile(img, 3, 2, 101)
    with pytest.raises(ValueError, match="mask"):
        ring_median(img, 3, 2, mask=np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="factor"):
        approximate_ring_median(img, 3, 2, factor=2.5)


def test_approximate_ring_median_tracks_exact_on_smooth_sky(rng):
    ny, nx = 192, 160
    yy, xx = np.mgrid[:ny, :nx]
    sky = 100.0 + 5.0 * np.sin(xx / 40.0) + 0.03 * yy
    img = (sky + rng.normal(size=(ny, nx))).astype(np.float32)
    exact = ring_median(img, 16, 6)
    approx = approximate_ring_median(img, 16, 6, factor=4)
    assert approx.shape == img.shape and approx.dtype == np.float32
    inner = (slice(20, -20), slice(20, -20))
    diff = np.abs(approx - exact)[inner]
    assert np.median(diff) < 0.15 and diff.max() < 1.0
    assert np.abs(approx - sky)[inner].max() < 0.8
    np.testing.assert_array_equal(approximate_ring_median(img, 16, 6, factor=1), exact)


_small_images = hnp.arrays(
    np.float64,
    st.tuples(st.integers(1, 24), st.integers(1, 24)),
    elements=st.floats(-1e6, 1e6, allow_nan=False, width=64),
)


@given(img=_small_images, data=st.data())
def test_masked_pixel_values_never_matter(img, data):
    mask = data.draw(hnp.arrays(bool, img.shape))
    junk = data.draw(
        hnp.arrays(np.float64, img.shape, elements=st.floats(allow_nan=True, allow_infinity=True))
    )
    other = np.where(mask, junk, img)
    np.testing.assert_array_equal(
        ring_median(img, 2, 1.5, mask=mask), ring_median(other, 2, 1.5, mask=mask)
    )


@given(img=_small_images, data=st.data())
def test_flips_commute_with_ring_percentile(img, data):
    mask = data.draw(hnp.arrays(bool, img.shape))
    q = data.draw(st.floats(0, 100))
    axis = data.draw(st.sampled_from([0, 1]))
    base = ring_percentile(img, 1.5, 2, q, mask=mask)
    flipped = ring_percentile(np.flip(img, axis), 1.5, 2, q, mask=np.flip(mask, axis))
    np.testing.assert_array_equal(flipped, np.flip(base, axis))
    transposed = ring_percentile(img.T, 1.5, 2, q, mask=mask.T)
    np.testing.assert_array_equal(transposed, base.T)


@given(img=_small_images, q=st.floats(0, 100))
def test_any_percentile_matches_scipy_rank_rule(img, q):
    fp = ring_footprint(1, 1.5)
    expected = ndi.percentile_filter(img, q, footprint=fp, mode="reflect")
    np.testing.assert_array_equal(ring_percentile(img, 1, 1.5, q), expected)
