"""The default fit on correlated noise and crowded fields: the mask must not run away."""

from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from skymap.background.defaults import fit
from skymap.masking.hysteresis import HysteresisMasker

DATA = Path(__file__).parent / "data"


def _crowded_correlated(rng, n=256, stars=400, corr=1.0):
    """Flat sky 100, unit-std noise correlated over ``corr`` px, and ``stars`` point
    sources (Gaussian PSF of 1.5 px, log-normal fluxes)."""
    noise = gaussian_filter(rng.normal(size=(n, n)), corr)
    noise /= noise.std()
    points = np.zeros((n, n))
    np.add.at(points, tuple(rng.integers(0, n, (2, stars))), rng.lognormal(3, 1, stars))
    return (100.0 + noise + gaussian_filter(points, 1.5)).astype(np.float32)


def test_masker_rescales_correlated_noise(rng):
    # Source-free correlated noise: with the white-noise rms, a plain matched filter
    # flags a large share of the pixels; the empirical rescaling keeps it near zero.
    noise = gaussian_filter(rng.normal(size=(256, 256)), 1.0).astype(np.float32)
    noise /= noise.std()
    det = HysteresisMasker()(noise, 1.0)
    assert det.mean() < 0.02


def test_crowded_correlated_field_mask_stays_bounded(rng):
    img = _crowded_correlated(rng)
    res = fit(img)
    fractions = [r.mask_fraction for r in res.history]
    assert max(fractions) < 0.15  # 0.11 when written
    assert np.isfinite(res.history[-2].change) and res.history[-2].change < 0.5
    err = float(np.median(res.background) - 100.0)
    assert abs(err) < 0.3


def test_tiny_crowded_image_does_not_diverge():
    # 64x64, crowded, correlated noise: the fit used to mask every pixel and fail.
    img = _crowded_correlated(np.random.default_rng(0), n=64, stars=60)
    res = fit(img)
    records = list(res.history[1:])
    if res.convergence_note.startswith("converged by backing off"):
        # the back-off record's change is the jump back to the state before the run
        del records[-2]
    changes = np.array([r.change for r in records])
    assert np.all(np.isfinite(changes)) and changes.max() < 1.5  # 1.07 when written
    assert res.history[-1].mask_fraction < 0.5
    assert abs(float(np.median(res.background)) - 100.0) < 0.5


@pytest.mark.parametrize("seed", [0])
def test_white_noise_not_rescaled(seed):
    # White noise of the stated rms: the rescaling must leave detections alone.
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(256, 256)).astype(np.float32)
    img[100:104, 100:104] += 6.0
    det = HysteresisMasker()(img, 1.0)
    assert det[101, 101] and det.mean() < 0.01


@pytest.mark.parametrize("bad", [0.0, 0.5, -1e-3, 1.0])
def test_false_rate_validated(bad):
    with pytest.raises(ValueError, match="false_rate"):
        HysteresisMasker(false_rate=bad)


def test_a_frame_of_galactic_emission_in_physical_units_says_when_it_did_not_settle():
    # MSX band E of the Galactic centre (tests/data/README.md): 149 x 149 in W/m^2/sr
    # near 4e-6, the plane's emission across the whole frame, so no mask leaves a sky
    # the fit can trust. Whatever the fit does there, it must say so (converged, or a
    # ConvergenceWarning and a note), and scaling the units must change nothing else.
    import warnings

    import astropy.units as u
    from astropy.io import fits

    from skymap.background.convergence import STOPS, ConvergenceWarning

    data = fits.getdata(DATA / "msx_galactic_centre.fits").astype(np.float64)
    keep = data.copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = fit(data)
    warned = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert res.converged or (warned and "not converged" in res.convergence_note)
    # how it stopped, in one word a program can read
    assert res.stop in STOPS
    if res.stop == "cap":
        assert not res.converged
    elif res.stop != "cycle":  # a cycle is converged unless it jumped
        assert res.converged
    np.testing.assert_array_equal(data, keep)
    bkg = np.asarray(res.background)
    assert np.isfinite(bkg).all() and 1e-7 < np.median(bkg) < 1e-4
    # the same fit in other units: to 1e-6 of the noise, and the same masks
    for factor in (1e6, 1e-3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            other = fit(data * factor * u.W / u.m**2 / u.sr)
        assert other.background.unit == u.W / u.m**2 / u.sr
        diff = other.background.value / factor - bkg
        assert np.abs(diff).max() < 1e-6 * res.noise
        np.testing.assert_array_equal(np.asarray(other.mask), np.asarray(res.mask))
