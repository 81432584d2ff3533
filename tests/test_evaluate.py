"""Tests for skymap.evaluate: the notebook's RMS-vs-scale, bias under sources and the
masked-versus-unmasked test."""

import numpy as np
import pytest
from astropy.nddata import block_reduce

from skymap.evaluate import pixel_sigma, rms_vs_scale, white_noise_curve


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


def test_pixel_sigma_ignores_smooth_structure(rng):
    yy, xx = np.mgrid[0:300, 0:300]
    img = 0.3 * rng.normal(size=(300, 300)) + np.sin(xx / 50.0) * 2 + yy * 0.1
    assert pixel_sigma(img) == pytest.approx(0.3, rel=0.03)
