"""Ready-made scenes with truth: :func:`notebook_scene` (the STScI notebook's scene,
draw for draw) and the robustness scenes of :func:`scene_by_name`.
"""

from __future__ import annotations

import numpy as np
from astropy.table import Table

from skymap._validate import as_pair, check_choice, check_positive
from skymap.quality.simulate.components import (
    AmplifierOffsets,
    BadColumns,
    CosmicRays,
    GaussianBumps,
    GaussianNoise,
    HaloStars,
    MoffatStars,
    PoissonNoise,
    Polynomial,
    PowerLawField,
    Saturation,
    SersicGalaxies,
    SincBlemishes,
    Vignetting,
    make_scene,
)
from skymap.quality.simulate.render import Scene, render_sources, sinc_blemishes

__all__ = ["SCENE_NAMES", "notebook_scene", "scene_by_name"]


def notebook_scene(seed: int = 4, shrink_factor: int = 2) -> Scene:
    """The STScI "Complex 2D Background" notebook's scene, reproduced draw for draw.

    The notebook seeds numpy's legacy global generator and draws, in this order: the
    blemish row centres, column centres, widths and amplitudes; the Gaussian noise
    (sigma 0.1); one discarded batch of ``nsources`` uniforms; then the sources' x, y,
    flux, x_stddev, y_stddev and theta. The sky is the sum of sinc blemishes plus the
    gradient ``row/nrow + 0.25 col/ncol``; each source is an elliptical Gaussian of
    amplitude ``flux / (2 pi x_stddev y_stddev)`` point-sampled at pixel centres (as the
    old ``photutils.datasets.make_gaussian_sources_image`` did). A private
    :class:`numpy.random.RandomState` is used, so the global generator is untouched.

    Parameters
    ----------
    seed : int
        The notebook's seed (4).
    shrink_factor : int
        The notebook's shrink factor: the image is ``2000 // shrink_factor`` pixels
        square, with ``16 // shrink_factor`` blemishes and ``5000 // shrink_factor**2``
        sources.

    Returns
    -------
    Scene
        ``image`` (the notebook's ``scene``), ``sky`` (``noiseless_sky``), ``noise``,
        ``sources`` (``source_img``), ``catalog``, ``blemishes`` and ``noise_sigma=0.1``.

    Notes
    -----
    Sources are rendered in stamps where their profile exceeds 1e-15, so the source image
    equals the notebook's full-image evaluation to ~1e-13 absolute.

    Examples
    --------
    >>> scene = notebook_scene()
    >>> scene.image.shape, len(scene.catalog), len(scene.blemishes)
    ((1000, 1000), 1250, 8)
    >>> float(scene.blemishes["x"][0])
    252.98236238344396
    """
    check_positive("shrink_factor", shrink_factor)
    shrink_factor = int(shrink_factor)
    rs = np.random.RandomState(seed)
    nrow = ncol = 2000 // shrink_factor
    nblemish = 16 // shrink_factor
    row_centers = ncol * rs.random_sample(size=nblemish)
    col_centers = nrow * rs.random_sample(size=nblemish)
    width = 30 + 100.0 * rs.random_sample(size=nblemish)
    amplitude = 1.0 * rs.random_sample(size=nblemish)
    blemish_sky = sinc_blemishes((nrow, ncol), col_centers, row_centers, width, amplitude)
    row, col = np.mgrid[0:nrow, 0:ncol]
    gradient = (1.0 * row) / nrow + (0.25 * col) / ncol
    sky = blemish_sky + gradient
    noise = rs.normal(scale=0.1, size=(nrow, ncol))

    nsources = 5000 // shrink_factor**2
    rs.random_sample(nsources)  # drawn and unused by the notebook; keeps the stream aligned
    x_mean = 2.0 + (ncol - 4.0) * rs.random_sample(nsources)
    y_mean = 2.0 + (nrow - 4.0) * rs.random_sample(nsources)
    flux = 50 * rs.random_sample(nsources)
    x_stddev = 5.0 * rs.random_sample(nsources)
    y_stddev = 5.0 * rs.random_sample(nsources)
    theta = 180.0 * rs.random_sample(nsources) * np.pi / 180.0
    catalog = Table(
        {
            "x_mean": x_mean,
            "y_mean": y_mean,
            "flux": flux,
            "x_stddev": x_stddev,
            "y_stddev": y_stddev,
            "theta": theta,
            "re": np.sqrt(x_stddev * y_stddev),
        }
    )
    sources = render_sources(
        (nrow, ncol),
        x=x_mean,
        y=y_mean,
        amplitude=flux / (2.0 * np.pi * x_stddev * y_stddev),
        sx=x_stddev,
        sy=y_stddev,
        theta=theta,
        profile="gaussian",
    )
    blemishes = Table(
        [col_centers, row_centers, width, amplitude], names=["x", "y", "width", "amplitude"]
    )
    return Scene(
        image=sources + (sky + noise),
        sky=sky,
        noise=noise,
        sources=sources,
        catalog=catalog,
        blemishes=blemishes,
        noise_sigma=0.1,
        components={"gradient": gradient, "blemishes": blemish_sky},
        name=f"notebook(seed={seed}, shrink_factor={shrink_factor})",
    )


# --------------------------------------------------------------------------------------


def _crowded_stellar(shape, seed):
    # Sky ~100 ADU, sigma ~11 ADU: a star is detectable (peak > 5 sigma) above ~1300 ADU,
    # so about 99% of the 0.02 stars per pixel hide in the noise and add ~3 ADU of
    # unmaskable light; beta = 2 gives wide wings around the bright ones.
    return make_scene(
        shape,
        sky=[
            Polynomial(coefficients=((100.0, 3.0), (2.0, 0.0))),
            PowerLawField(rms=1.0, slope=3.0, min_scale=20.0),
        ],
        sources=[
            MoffatStars(density=0.02, fwhm=3.5, beta=2.0, flux_min=5.0, flux_max=2e5, lf_slope=1.8)
        ],
        noise=PoissonNoise(gain=1.0, read_noise=5.0),
        seed=seed,
        name="crowded_stellar",
    )


def _galaxies_lsb(shape, seed):
    # Sersic galaxies up to re = 40 px with n up to 4: their wings stay above 0.1 sigma
    # out to several re, beyond any threshold mask.
    return make_scene(
        shape,
        sky=[Polynomial(coefficients=((10.0, 0.5), (0.3, 0.0)))],
        sources=[
            SersicGalaxies(density=2e-4, flux=(100.0, 3e4), re=(3.0, 40.0), sersic_n=(0.5, 4.0)),
            MoffatStars(density=1e-3, fwhm=3.0, beta=3.0, flux_min=20.0, flux_max=1e5),
        ],
        noise=GaussianNoise(sigma=1.0),
        seed=seed,
        name="galaxies_lsb",
    )


def _nebula(shape, seed):
    # Power-law structure of 5 sigma rms on all scales above 3 px: the background is
    # itself "source-like", so a model must follow real sky without eating the stars.
    return make_scene(
        shape,
        sky=[
            Polynomial(coefficients=((10.0, 1.0), (1.0, 0.0))),
            PowerLawField(rms=5.0, slope=3.5, min_scale=3.0),
            SincBlemishes(n=4, width=(30.0, 130.0), amplitude=(0.0, 3.0)),
        ],
        sources=[MoffatStars(density=3e-3, fwhm=3.0, beta=3.0, flux_min=20.0, flux_max=1e5)],
        noise=GaussianNoise(sigma=1.0),
        seed=seed,
        name="nebula",
    )


def _detector_artifacts(shape, seed):
    # Vignetting, a 2x2 amplifier layout with offsets of ~0.3 sigma, bad columns, cosmic
    # rays and saturated stars; the spoiled pixels are in Scene.mask.
    return make_scene(
        shape,
        sky=[
            Polynomial(coefficients=((100.0, 3.0), (2.0, 0.0))),
            PowerLawField(rms=1.0, slope=3.0, min_scale=20.0),
            Vignetting(depth=0.3, power=2.0),
            AmplifierOffsets(grid=(2, 2), sigma=3.0),
        ],
        sources=[
            MoffatStars(
                density=2e-3, fwhm=3.0, beta=2.5, flux_min=50.0, flux_max=1e6, lf_slope=1.8
            )
        ],
        noise=PoissonNoise(gain=1.0, read_noise=5.0),
        detector=[
            CosmicRays(density=5e-5, amplitude=(100.0, 2000.0)),
            BadColumns(n=4, value=0.0),
            Saturation(level=1e4),
        ],
        seed=seed,
        name="detector_artifacts",
    )


def _saturated_halos(shape, seed):
    # Bright stars whose aureoles (3% of the flux, r**-3 beyond 4 px) stay above 0.1
    # sigma out to 100-200 px, their cores clipped at 2e4 (Scene.mask holds the
    # clipped pixels), on a sky with one broad scattered-light bump of ~2 sigma.
    return make_scene(
        shape,
        sky=[
            Polynomial(coefficients=((100.0, 1.0), (0.5, 0.0))),
            GaussianBumps(n=1, width=(0.15, 0.25), amplitude=(2.0, 2.0)),
        ],
        sources=[
            HaloStars(density=5e-6, flux_min=1e6, flux_max=3e7),
            MoffatStars(density=2e-3, fwhm=3.0, beta=3.0, flux_min=20.0, flux_max=1e5),
        ],
        noise=GaussianNoise(sigma=1.0),
        detector=[Saturation(level=2e4)],
        seed=seed,
        name="saturated_halos",
    )


def _cluster_icl(shape, seed):
    # A galaxy cluster: a brightest cluster galaxy (n = 4, re = 30 px), 80 members
    # scattered by 150 px around it, and intracluster light (n = 1, re = 100 px, 2
    # sigma at the centre), sizes for a 1024-px frame and scaled with the frame's
    # shorter side (fluxes with the area, so surface brightnesses stay). Truth
    # convention: the ICL is a SOURCE (in Scene.sources, population "icl"), not sky: it
    # is smaller than the frame's sky structure.
    f = min(shape) / 1024.0
    centre = (0.5, 0.5)
    return make_scene(
        shape,
        sky=[Polynomial(coefficients=((10.0, 0.5), (0.3, 0.0)))],
        sources=[
            SersicGalaxies(
                n=1, flux=3.3e4 * f**2, re=100.0 * f, sersic_n=1.0, axis_ratio=0.75,
                center=centre, name="icl",
            ),
            SersicGalaxies(
                n=1, flux=3e5 * f**2, re=30.0 * f, sersic_n=4.0, axis_ratio=0.8,
                center=centre, name="bcg",
            ),
            SersicGalaxies(
                n=80, flux=(500.0, 5e4), re=(3.0, 15.0), sersic_n=(0.7, 4.0), center=centre,
                spread=150.0 * f, name="members",
            ),
            SersicGalaxies(density=5e-5, flux=(100.0, 1e4), re=(2.0, 10.0)),
            MoffatStars(density=5e-4, fwhm=3.0, beta=3.0, flux_min=20.0, flux_max=1e5),
        ],
        noise=GaussianNoise(sigma=1.0),
        seed=seed,
        name="cluster_icl",
    )  # fmt: skip


def _notebook(shape, seed):
    n = shape[0]
    if shape[0] != shape[1] or 2000 % n or n > 2000:
        raise ValueError(
            f"shape must be square with 2000 divisible by its side for 'notebook', got {shape}"
        )
    return notebook_scene(seed=4 if seed is None else seed, shrink_factor=2000 // n)


_NAMED = {
    "notebook": _notebook,
    "crowded_stellar": _crowded_stellar,
    "galaxies_lsb": _galaxies_lsb,
    "nebula": _nebula,
    "detector_artifacts": _detector_artifacts,
    "saturated_halos": _saturated_halos,
    "cluster_icl": _cluster_icl,
}

#: Names accepted by :func:`scene_by_name`.
SCENE_NAMES = tuple(_NAMED)


def scene_by_name(name: str, *, shape=None, seed=None) -> Scene:
    """Build one of the ready-made robustness scenes.

    * ``"notebook"``: :func:`notebook_scene` (shape must be 2000/k square, default
      1000x1000; ``seed`` defaults to the notebook's 4).
    * ``"crowded_stellar"``: 0.02 Moffat stars per pixel with wide wings (beta 2), ~99%
      of them below 5 sigma, on a ~100 ADU sky with Poisson + read noise.
    * ``"galaxies_lsb"``: Sersic galaxies (re 3-40 px, n 0.5-4) with low-surface-brightness
      wings, plus stars, Gaussian noise of 1.
    * ``"nebula"``: power-law (slope 3.5) structure of 5 sigma rms plus sinc blemishes and
      stars.
    * ``"detector_artifacts"``: vignetting, 2x2 amplifier offsets, bad columns, cosmic
      rays and saturated stars, with the bad-pixel mask as truth.
    * ``"saturated_halos"``: stars of 1e6-3e7 whose power-law aureoles (3% of the
      flux) reach 100-200 px, cores clipped at 2e4 (the clipped pixels are the mask),
      among fainter stars, on a sky with one broad bump of 2 sigma; Gaussian noise of 1.
    * ``"cluster_icl"``: a galaxy cluster (a brightest cluster galaxy, 80 members and
      intracluster light of re = 100 px, 2 sigma at its centre, at 1024 px; sizes scale
      with the frame) on a gently sloped sky.
      The intracluster light is a source: it is in ``sources``, not in ``sky``.

    Parameters
    ----------
    name : str
        One of :data:`SCENE_NAMES`.
    shape : tuple of int, optional
        Image shape (ny, nx); default (1024, 1024), or (1000, 1000) for the notebook.
        Source densities are per pixel, so counts scale with the area.
    seed : int, optional
        Seed of the scene's generator; a named scene is reproducible by default (seed 0,
        or the notebook's 4).

    Examples
    --------
    >>> scene = scene_by_name("detector_artifacts", shape=(256, 256), seed=0)
    >>> scene.name, scene.mask.shape
    ('detector_artifacts', (256, 256))
    """
    check_choice("name", name, SCENE_NAMES)
    if shape is None:
        shape = (1000, 1000) if name == "notebook" else (1024, 1024)
    if seed is None and name != "notebook":
        seed = 0
    return _NAMED[name](as_pair("shape", shape), seed)
