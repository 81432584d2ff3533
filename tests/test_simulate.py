"""Tests for skymap.simulate: the notebook's scene, stamp rendering, the scene builder."""

import numpy as np
import pytest
from astropy.modeling.models import Gaussian2D
from hypothesis import given, settings
from hypothesis import strategies as st

from skymap.quality.simulate import (
    SCENE_NAMES,
    AmplifierOffsets,
    BadColumns,
    CosmicRays,
    GaussianNoise,
    GaussianSources,
    MoffatStars,
    PoissonNoise,
    Polynomial,
    PowerLawField,
    Saturation,
    SersicGalaxies,
    SincBlemishes,
    Vignetting,
    make_scene,
    notebook_scene,
    render_sources,
    scene_by_name,
)


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


# ---------------------------------------------------------------------------------------
# Scene builder
# ---------------------------------------------------------------------------------------


def _small_scene(seed=0):
    return make_scene(
        (96, 128),
        sky=[
            Polynomial(coefficients=((5.0, 1.0), (0.5, 0.0))),
            SincBlemishes(n=2),
            PowerLawField(rms=0.2, slope=3.0),
            Vignetting(depth=0.2),
            AmplifierOffsets(grid=(1, 2), sigma=0.3),
        ],
        sources=[
            GaussianSources(n=20),
            MoffatStars(n=30, flux_min=10, flux_max=1e4),
            SersicGalaxies(n=5, flux=(100, 1000), re=(2, 6)),
        ],
        noise=PoissonNoise(gain=2.0, read_noise=1.0),
        detector=[CosmicRays(n=10), BadColumns(n=2), Saturation(level=200.0)],
        seed=seed,
    )


def test_make_scene_is_seeded_and_reproducible():
    a, b, c = _small_scene(1), _small_scene(1), _small_scene(2)
    np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(a.image, c.image)
    assert len(a.catalog) == 55
    assert len(a.blemishes) == 2


def test_make_scene_truth_adds_up_outside_detector_effects():
    s = _small_scene(3)
    good = ~s.mask
    np.testing.assert_allclose(s.image[good], (s.sky + s.sources + s.noise)[good], atol=1e-9)
    assert s.mask.any()
    assert np.all(s.image <= 200.0)


def test_make_scene_sky_composition():
    s = make_scene(
        (64, 80),
        sky=[Polynomial(coefficients=((2.0, 1.0),)), Vignetting(depth=0.5, power=2.0)],
        noise=GaussianNoise(sigma=0.0),
        seed=0,
    )
    u = np.linspace(-1, 1, 80)[None, :]
    yy, xx = np.mgrid[0:64, 0:80]
    r = np.hypot(yy - 31.5, xx - 39.5) / np.hypot(31.5, 39.5)
    np.testing.assert_allclose(s.sky, (2.0 + u) * (1 - 0.5 * r**2), rtol=1e-12)
    np.testing.assert_array_equal(s.image, s.sky)
    assert s.mask is None


def test_polynomial_matches_numpy_polygrid():
    c = ((1.0, 2.0, 0.5), (0.3, -1.0, 0.0))
    out, _ = Polynomial(coefficients=c).sample((20, 30), None)
    ref = np.polynomial.polynomial.polygrid2d(np.linspace(-1, 1, 20), np.linspace(-1, 1, 30), c)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


def test_power_law_field_has_requested_rms_and_slope():
    rng = np.random.default_rng(0)
    f, _ = PowerLawField(rms=2.0, slope=3.0, min_scale=0.0).sample((256, 256), rng)
    assert f.std() == pytest.approx(2.0)
    assert abs(f.mean()) < 1e-12
    p = np.abs(np.fft.fft2(f)) ** 2
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(256), np.fft.fftfreq(256), indexing="ij"))
    lo = p[(k > 0.02) & (k < 0.03)].mean()
    hi = p[(k > 0.2) & (k < 0.3)].mean()
    # P ~ k^-3: a decade in k is three decades in power.
    assert np.log10(lo / hi) == pytest.approx(3.0, abs=0.3)


def test_amplifier_offsets_are_piecewise_constant():
    out, _ = AmplifierOffsets(grid=(2, 2), sigma=1.0).sample((10, 12), np.random.default_rng(0))
    for sl in [(slice(0, 5), slice(0, 6)), (slice(5, 10), slice(6, 12))]:
        assert np.ptp(out[sl]) == 0.0
    assert len(np.unique(out)) == 4


def test_source_fluxes_are_conserved_by_rendering():
    # Isolated sources, well inside the image, rendered to a tiny floor.
    s = make_scene(
        (400, 400),
        sources=[
            MoffatStars(n=1, fwhm=3.0, beta=3.0, flux_min=1000.0, flux_max=1000.0),
        ],
        noise=GaussianNoise(sigma=0.0),
        render_floor=1e-9,
        seed=5,
    )
    row = s.catalog[0]
    if 40 < row["x_mean"] < 360 and 40 < row["y_mean"] < 360:
        assert s.sources.sum() == pytest.approx(1000.0, rel=2e-3)
    gal = SersicGalaxies(n=1, flux=(500.0, 500.0), re=(3.0, 3.0), sersic_n=(1.0, 1.0))
    cat = gal.sample((200, 200), np.random.default_rng(0))
    img = render_sources(
        (200, 200),
        x=[100.0],
        y=[100.0],
        amplitude=cat["amplitude"],
        sx=cat["sx"],
        sy=cat["sy"],
        theta=cat["theta"],
        profile="sersic",
        shape_par=cat["shape_par"],
        floor=1e-9,
        oversample=8,
        oversample_radius=4.0,
    )
    assert img.sum() == pytest.approx(500.0, rel=5e-3)


def test_luminosity_function_puts_most_stars_below_detection():
    s = scene_by_name("crowded_stellar", shape=(256, 256), seed=0)
    below = np.mean(s.catalog["peak"] < 5 * s.noise_sigma)
    assert below > 0.9
    assert s.sources.mean() > 0.1 * s.noise_sigma  # unmaskable light matters


def test_poisson_noise_variance():
    rng = np.random.default_rng(0)
    noise = PoissonNoise(gain=2.0, read_noise=3.0)
    n = noise.sample(np.full((300, 300), 50.0), rng)
    assert n.std() == pytest.approx(noise.sigma_at(50.0), rel=0.02)
    assert noise.sigma_at(50.0) == pytest.approx(np.sqrt(25.0 + 9.0))


def test_detector_effects_mask_exactly_what_they_touch():
    rng = np.random.default_rng(0)
    img = np.zeros((50, 60))
    m = BadColumns(n=3, value=-5.0, partial_fraction=0.0).apply(img, rng)
    assert m.all(axis=0).sum() == np.unique(np.nonzero(m)[1]).size
    np.testing.assert_array_equal(img[m], -5.0)
    img = np.zeros((50, 60))
    m = CosmicRays(n=5, amplitude=(100.0, 100.0)).apply(img, rng)
    np.testing.assert_array_equal(m, img > 0)
    img = np.linspace(0, 10, 3000).reshape(50, 60)
    m = Saturation(level=7.0).apply(img, rng)
    assert img.max() == 7.0 and m.sum() == (np.linspace(0, 10, 3000) >= 7.0).sum()


@pytest.mark.parametrize("name", [n for n in SCENE_NAMES if n != "notebook"])
def test_named_scenes_build(name):
    s = scene_by_name(name, shape=(128, 160), seed=1)
    assert s.image.shape == (128, 160)
    assert np.isfinite(s.image).all()
    assert s.name == name
    assert s.noise_sigma > 0


def test_named_scenes_are_reproducible_by_default():
    a = scene_by_name("nebula", shape=(64, 64))
    b = scene_by_name("nebula", shape=(64, 64))
    np.testing.assert_array_equal(a.image, b.image)


def test_named_notebook_scene_and_bad_names():
    assert scene_by_name("notebook", shape=(500, 500)).blemishes["x"][0] == pytest.approx(
        notebook_scene(shrink_factor=4).blemishes["x"][0]
    )
    with pytest.raises(ValueError, match="name"):
        scene_by_name("nope")
    with pytest.raises(ValueError, match="shape"):
        scene_by_name("notebook", shape=(300, 300))


@pytest.mark.parametrize(
    "factory,match",
    [
        (lambda: MoffatStars(beta=1.0), "beta"),
        (lambda: SersicGalaxies(axis_ratio=(0.5, 1.5)), "axis_ratio"),
        (lambda: GaussianSources(sigma=(0.0, 1.0)), "sigma"),
        (lambda: Vignetting(depth=2.0), "depth"),
        (lambda: PoissonNoise(gain=0.0), "gain"),
        (lambda: CosmicRays(max_length=0), "max_length"),
        (lambda: Polynomial(coefficients=(1.0, 2.0)), "coefficients"),
        (lambda: make_scene((8, 8), sky=[GaussianNoise()]), "sky"),
    ],
)
def test_configs_reject_bad_values(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


@settings(max_examples=25)
@given(
    x=st.floats(-3, 20),
    y=st.floats(-3, 20),
    sx=st.floats(0.3, 4),
    sy=st.floats(0.3, 4),
    theta=st.floats(0, np.pi),
)
def test_render_single_gaussian_property(x, y, sx, sy, theta):
    # Linear in amplitude, non-negative, and peaked at the pixel nearest the centre
    # (for a round source).
    kw = {"x": [x], "y": [y], "sx": [sx], "sy": [sy], "theta": [theta], "floor": 1e-12}
    a = render_sources((18, 18), amplitude=[1.0], **kw)
    b = render_sources((18, 18), amplitude=[3.0], **kw)
    np.testing.assert_allclose(b, 3 * a, rtol=1e-12, atol=1e-11)
    assert (a >= 0).all()
    r = render_sources((18, 18), amplitude=[1.0], **{**kw, "sy": [sx]})
    iy, ix = int(np.rint(y)), int(np.rint(x))
    if 0 <= iy < 18 and 0 <= ix < 18:
        assert r[iy, ix] == pytest.approx(r.max())


def test_saturated_halos_scene_truth():
    from skymap.quality.simulate import scene_by_name

    sc = scene_by_name("saturated_halos", shape=(512, 512), seed=2)
    cat = sc.catalog
    cores = cat[cat["population"] == "halo_stars"]
    halos = cat[cat["population"] == "halo_stars_halo"]
    assert len(cores) == len(halos) >= 1
    # The aureole carries 3% of each star's flux.
    np.testing.assert_allclose(halos["flux"] / (cores["flux"] + halos["flux"]), 0.03)
    # Saturated cores: clipped at 2e4, and exactly the clipped pixels are the mask.
    assert sc.image.max() == 2e4
    np.testing.assert_array_equal(sc.mask, sc.image >= 2e4)
    assert sc.mask.any()
    # The brightest star's halo is still above 0.1 sigma 100 px out.
    b = int(np.argmax(cores["flux"]))
    y, x = int(round(cores["y_mean"][b])), int(round(cores["x_mean"][b]))
    yy, xx = np.mgrid[:512, :512]
    ring = np.abs(np.hypot(yy - y, xx - x) - 100) < 1
    assert np.median(sc.sources[ring]) > 0.1 * sc.noise_sigma
    # One broad scattered-light bump of 2 sigma on the sky, in the blemish table.
    assert len(sc.blemishes) == 1 and sc.blemishes["amplitude"][0] == 2.0
    bump = [v for k, v in sc.components.items() if "GaussianBumps" in k][0]
    assert bump.max() == pytest.approx(2.0 * sc.noise_sigma, rel=0.01)


def test_cluster_icl_scene_truth_puts_the_icl_in_the_sources():
    from skymap.quality.simulate import scene_by_name

    sc = scene_by_name("cluster_icl", shape=(512, 512), seed=2)
    pops = list(sc.catalog["population"])
    assert pops.count("icl") == 1 and pops.count("bcg") == 1 and pops.count("members") == 80
    icl = sc.catalog[sc.catalog["population"] == "icl"][0]
    assert (icl["x_mean"], icl["y_mean"]) == (255.5, 255.5)
    # Truth convention: the ICL is a source. The sky is the polynomial alone (no
    # component holds it), and the sources hold >= 2 sigma of it at the centre.
    assert list(sc.components) == ["0:Polynomial"]
    np.testing.assert_array_equal(sc.sky, sc.components["0:Polynomial"])
    assert icl["peak"] == pytest.approx(2.0 * sc.noise_sigma, rel=0.02)
    assert sc.sources[256, 256] > icl["peak"]
    # Members crowd the centre.
    m = sc.catalog[sc.catalog["population"] == "members"]
    assert np.median(np.hypot(m["x_mean"] - 255.5, m["y_mean"] - 255.5)) < 200
