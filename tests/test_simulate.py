"""Tests for skymap.simulate: the notebook's scene, stamp rendering, the scene builder."""

import numpy as np
import pytest
from astropy.modeling.models import Gaussian2D

from skymap.simulate import notebook_scene, render_sources


@pytest.fixture(scope="module")
def nb():
    return notebook_scene()


def test_notebook_first_blemish_row_matches_printed_table(nb):
    row = nb.blemishes[0]
    assert row["x"] == 252.98236238344396
    assert row["y"] == 967.0298390136767
    assert row["width"] == 30.8986097667555
    assert row["amplitude"] == 0.17316542149594816


def test_notebook_last_blemish_row_matches_printed_table(nb):
    row = nb.blemishes[-1]
    assert row["x"] == 597.3339439328593
    assert row["y"] == 6.230255204589863
    assert row["width"] == 116.62892985816984
    assert row["amplitude"] == 0.937571583950942


def test_notebook_shapes_and_lengths(nb):
    assert nb.image.shape == nb.sky.shape == nb.noise.shape == nb.sources.shape == (1000, 1000)
    assert len(nb.catalog) == 1250
    assert len(nb.blemishes) == 8
    assert nb.noise_sigma == 0.1
    assert set(nb.catalog.colnames) >= {
        "x_mean",
        "y_mean",
        "flux",
        "x_stddev",
        "y_stddev",
        "theta",
        "re",
    }
    np.testing.assert_array_equal(nb.image, nb.sources + (nb.sky + nb.noise))


def test_notebook_draw_order_independent_replay(nb):
    # Replay the notebook's RandomState stream independently of the module.
    rs = np.random.RandomState(4)
    rs.random_sample(8 * 4)
    noise = rs.normal(scale=0.1, size=(1000, 1000))
    rs.random_sample(1250)
    x = 2.0 + 996.0 * rs.random_sample(1250)
    np.testing.assert_array_equal(nb.noise, noise)
    np.testing.assert_array_equal(nb.catalog["x_mean"], x)


def test_notebook_sky_is_sinc_plus_gradient(nb):
    row, col = np.mgrid[0:1000, 0:1000]
    expect = (1.0 * row) / 1000 + (0.25 * col) / 1000
    for b in nb.blemishes:
        r = np.hypot(row - b["y"], col - b["x"])
        expect = expect + b["amplitude"] * np.sinc(r / (b["width"] * np.pi))
    np.testing.assert_allclose(nb.sky, expect, rtol=0, atol=1e-14)


def test_notebook_is_deterministic_and_seed_dependent(nb):
    again = notebook_scene(shrink_factor=4)
    assert again.image.shape == (500, 500)
    np.testing.assert_array_equal(again.image, notebook_scene(shrink_factor=4).image)
    other = notebook_scene(seed=5, shrink_factor=4)
    assert not np.array_equal(other.image, again.image)


def test_notebook_sources_match_astropy_full_image_evaluation(nb):
    # Brute force: the old photutils rendered each Gaussian2D over the full image.
    yy, xx = np.mgrid[300:500, 300:500]
    ref = np.zeros(xx.shape)
    cat = nb.catalog
    near = (
        (cat["x_mean"] > 250)
        & (cat["x_mean"] < 550)
        & (cat["y_mean"] > 250)
        & (cat["y_mean"] < 550)
    )
    for r in cat[near]:
        amp = r["flux"] / (2 * np.pi * r["x_stddev"] * r["y_stddev"])
        g = Gaussian2D(amp, r["x_mean"], r["y_mean"], r["x_stddev"], r["y_stddev"], r["theta"])
        ref += g(xx, yy)
    # Sources farther than 50 px contribute < 1e-15 at these pixels.
    np.testing.assert_allclose(nb.sources[300:500, 300:500], ref, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(
    "profile,shape_par", [("gaussian", None), ("moffat", 2.5), ("sersic", 1.5)]
)
def test_render_matches_brute_force(profile, shape_par):
    rng = np.random.default_rng(3)
    n = 12
    x = rng.uniform(-5, 45, n)
    y = rng.uniform(-5, 35, n)
    amp = rng.uniform(0.5, 5, n)
    sx = rng.uniform(0.8, 3, n)
    sy = rng.uniform(0.8, 3, n)
    th = rng.uniform(0, np.pi, n)
    floor = 1e-12
    img = render_sources(
        (30, 40),
        x=x,
        y=y,
        amplitude=amp,
        sx=sx,
        sy=sy,
        theta=th,
        profile=profile,
        shape_par=shape_par,
        floor=floor,
    )
    yy, xx = np.mgrid[0:30, 0:40]
    ref = np.zeros((30, 40))
    for i in range(n):
        dx, dy = xx - x[i], yy - y[i]
        c, s = np.cos(th[i]), np.sin(th[i])
        u = (dx * c + dy * s) / sx[i]
        v = (-dx * s + dy * c) / sy[i]
        q = u**2 + v**2
        if profile == "gaussian":
            f = np.exp(-q / 2)
        elif profile == "moffat":
            f = (1 + q) ** -shape_par
        else:
            nn = shape_par
            bn = 2 * nn - 1 / 3 + 4 / (405 * nn) + 46 / (25515 * nn**2)
            f = np.exp(-bn * (q ** (0.5 / nn) - 1))
        ref += amp[i] * f
    # Truncation drops at most `floor` per source per pixel.
    np.testing.assert_allclose(img, ref, rtol=1e-10, atol=n * floor)
