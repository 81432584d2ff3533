"""Parts a simulated scene is composed of (sky components, source populations, noise
models, detector effects) and :func:`make_scene`, which composes them with one seeded
generator and returns the image with its truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft
from astropy.table import Table

from skymap._validate import as_pair, check_positive, check_range
from skymap.quality.simulate.render import Scene, render_sources, sersic_bn, sinc_blemishes

__all__ = [
    "AmplifierOffsets",
    "BadColumns",
    "CosmicRays",
    "GaussianBumps",
    "GaussianNoise",
    "GaussianSources",
    "HaloStars",
    "MoffatStars",
    "PoissonNoise",
    "PowerLawField",
    "Polynomial",
    "Saturation",
    "SersicGalaxies",
    "SincBlemishes",
    "Vignetting",
    "make_scene",
]


def _check_interval(name, value, *, lower=None, strict=False):
    """Validate a (lo, hi) pair (a scalar means lo == hi) and return it as floats."""
    arr = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if arr.ndim != 1 or arr.size not in (1, 2) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be a number or a (low, high) pair, got {value!r}")
    lo, hi = float(arr[0]), float(arr[-1])
    if hi < lo:
        raise ValueError(f"{name} must have low <= high, got {value!r}")
    if lower is not None and (lo < lower or (strict and lo == lower)):
        op = ">" if strict else ">="
        raise ValueError(f"{name} must be {op} {lower}, got {value!r}")
    return lo, hi


def _uniform(rng, interval, n):
    lo, hi = interval
    return rng.uniform(lo, hi, n) if hi > lo else np.full(n, lo)


def _count(density, n, shape):
    """Number of objects: ``n`` if given, else ``density`` per pixel times the area."""
    if n is not None:
        return int(n)
    return int(round(density * shape[0] * shape[1]))


@dataclass(frozen=True, kw_only=True)
class Polynomial:
    """Additive polynomial sky ``sum c[i][j] v**i u**j``, with ``u`` and ``v`` the x and y
    pixel coordinates mapped linearly onto [-1, 1].

    Examples
    --------
    >>> Polynomial(coefficients=((10.0, 0.5), (0.25, 0.0))).coefficients[0][1]
    0.5
    """

    coefficients: tuple = ((0.0,),)

    kind = "additive"

    def __post_init__(self):
        c = np.asarray(self.coefficients, dtype=np.float64)
        if c.ndim != 2 or c.size == 0 or not np.all(np.isfinite(c)):
            raise ValueError(
                "coefficients must be a non-empty 2-D nested sequence c[i][j] of finite "
                f"numbers (power i of y, power j of x), got {self.coefficients!r}"
            )

    def sample(self, shape, rng):
        ny, nx = shape
        v = np.linspace(-1.0, 1.0, ny) if ny > 1 else np.zeros(1)
        u = np.linspace(-1.0, 1.0, nx) if nx > 1 else np.zeros(1)
        c = np.asarray(self.coefficients, dtype=np.float64)
        # Separable: (ny, i) Vandermonde @ c @ (j, nx) Vandermonde, one BLAS product.
        vy = np.polynomial.polynomial.polyvander(v, c.shape[0] - 1)
        vx = np.polynomial.polynomial.polyvander(u, c.shape[1] - 1)
        out = (vy @ c) @ vx.T
        return out, None


@dataclass(frozen=True, kw_only=True)
class SincBlemishes:
    """Additive radial sinc ripples ``a sin(r/w)/(r/w)`` at random centres, as in the
    notebook: ``n`` blemishes with ``width`` and ``amplitude`` drawn uniformly from the
    given (low, high) intervals. Their table is returned as ``Scene.blemishes``.

    Examples
    --------
    >>> sky, table = SincBlemishes(n=3).sample((64, 64), np.random.default_rng(0))
    >>> sky.shape, len(table)
    ((64, 64), 3)
    """

    n: int = 8
    width: tuple = (30.0, 130.0)
    amplitude: tuple = (0.0, 1.0)

    kind = "additive"

    def __post_init__(self):
        if int(self.n) != self.n or self.n < 0:
            raise ValueError(f"n must be an integer >= 0, got {self.n!r}")
        _check_interval("width", self.width, lower=0.0, strict=True)
        _check_interval("amplitude", self.amplitude)

    def sample(self, shape, rng):
        ny, nx = shape
        n = int(self.n)
        x = rng.uniform(0, nx, n)
        y = rng.uniform(0, ny, n)
        w = _uniform(rng, _check_interval("width", self.width), n)
        a = _uniform(rng, _check_interval("amplitude", self.amplitude), n)
        table = Table([x, y, w, a], names=["x", "y", "width", "amplitude"])
        return sinc_blemishes(shape, x, y, w, a), table


@dataclass(frozen=True, kw_only=True)
class GaussianBumps:
    """Additive round Gaussian bumps (or dips, for negative amplitudes), such as
    scattered light or a reflection: ``n`` of them, with standard deviation ``width``
    (a fraction of the image's smaller side) and ``amplitude`` (sky units, the peak)
    drawn uniformly from the given (low, high) intervals, centred uniformly in the
    middle ``spread`` of the frame. Their table (``x``, ``y``, ``width`` in pixels,
    ``amplitude``) is returned as ``Scene.blemishes``.

    Examples
    --------
    >>> sky, table = GaussianBumps(n=1, amplitude=2.0).sample((64, 64),
    ...                                                      np.random.default_rng(0))
    >>> round(float(sky.max()), 2), len(table)
    (2.0, 1)
    """

    n: int = 1
    width: tuple = (0.15, 0.3)
    amplitude: tuple = (1.0, 3.0)
    spread: float = 0.6

    kind = "additive"

    def __post_init__(self):
        if int(self.n) != self.n or self.n < 0:
            raise ValueError(f"n must be an integer >= 0, got {self.n!r}")
        _check_interval("width", self.width, lower=0.0, strict=True)
        _check_interval("amplitude", self.amplitude)
        check_range("spread", self.spread, 0.0, 1.0)

    def sample(self, shape, rng):
        ny, nx = shape
        n = int(self.n)
        lo, hi = 0.5 - self.spread / 2.0, 0.5 + self.spread / 2.0
        x = nx * rng.uniform(lo, hi, n)
        y = ny * rng.uniform(lo, hi, n)
        w = min(ny, nx) * _uniform(rng, _check_interval("width", self.width), n)
        a = _uniform(rng, _check_interval("amplitude", self.amplitude), n)
        yy, xx = np.mgrid[0:ny, 0:nx]
        out = np.zeros(shape)
        for xc, yc, wk, ak in zip(x, y, w, a, strict=True):
            out += ak * np.exp(-0.5 * ((xx - xc) ** 2 + (yy - yc) ** 2) / wk**2)
        table = Table([x, y, w, a], names=["x", "y", "width", "amplitude"])
        return out, table


@dataclass(frozen=True, kw_only=True)
class PowerLawField:
    """Additive Gaussian random field with power spectrum ``P(k) ~ k**-slope``.

    The spectrum is tapered by ``exp(-(k min_scale)**2)`` (``k`` in cycles per pixel) so
    that the field carries no pixel-scale power, its mean is zero and its standard
    deviation is scaled to ``rms`` (image units). ``slope`` near 3 to 4 looks like
    Galactic cirrus and nebulosity.

    Examples
    --------
    >>> field, _ = PowerLawField(rms=2.0).sample((64, 64), np.random.default_rng(0))
    >>> round(float(field.std()), 6)
    2.0
    """

    rms: float = 0.1
    slope: float = 3.0
    min_scale: float = 4.0

    kind = "additive"

    def __post_init__(self):
        check_positive("rms", self.rms, allow_zero=True)
        check_positive("slope", self.slope, allow_zero=True)
        check_positive("min_scale", self.min_scale, allow_zero=True)

    def sample(self, shape, rng):
        ny, nx = shape
        ky = np.fft.fftfreq(ny).astype(np.float32)[:, None]
        kx = np.fft.rfftfreq(nx).astype(np.float32)[None, :]
        k2 = ky**2 + kx**2
        k2[0, 0] = 1.0  # the mean is removed below; avoid 0 ** negative
        amp = np.exp(
            -k2 * np.float32(self.min_scale**2) - np.float32(self.slope / 4.0) * np.log(k2)
        )
        amp[0, 0] = 0.0
        # White noise drawn directly in Fourier space (one inverse FFT instead of a
        # forward and an inverse), in single precision: the field is renormalised below
        # and float32 resolves it to ~1e-7 of its rms.
        spec = rng.standard_normal(amp.shape, dtype=np.float32) * amp
        spec = spec + 1j * (rng.standard_normal(amp.shape, dtype=np.float32) * amp)
        field = scipy.fft.irfft2(spec, s=(ny, nx), workers=-1).astype(np.float64)
        field -= field.mean()
        std = field.std()
        if std > 0:
            field *= self.rms / std
        return field, None


@dataclass(frozen=True, kw_only=True)
class Vignetting:
    """Multiplicative illumination ``1 - depth (r / r_corner)**power`` about the image
    centre, applied to the additive sky and to the sources (flat-field-like).

    Examples
    --------
    >>> v, _ = Vignetting(depth=0.3).sample((65, 65), None)
    >>> float(v[32, 32]), round(float(v[0, 0]), 6)
    (1.0, 0.7)
    """

    depth: float = 0.2
    power: float = 2.0

    kind = "multiplicative"

    def __post_init__(self):
        check_range("depth", self.depth, 0.0, 1.0)
        check_positive("power", self.power)

    def sample(self, shape, rng):
        ny, nx = shape
        yc, xc = (ny - 1) / 2.0, (nx - 1) / 2.0
        r = np.hypot(np.arange(ny)[:, None] - yc, np.arange(nx)[None, :] - xc)
        r_corner = max(np.hypot(yc, xc), 1.0)
        return 1.0 - self.depth * (r / r_corner) ** self.power, None


@dataclass(frozen=True, kw_only=True)
class AmplifierOffsets:
    """Additive constant offset per amplifier region: the image is split into a
    ``grid = (ny_amps, nx_amps)`` of equal sections, each offset by a draw from
    N(0, ``sigma``). Applied after vignetting (it is electronic, not optical).

    Examples
    --------
    >>> off, _ = AmplifierOffsets(grid=(1, 2)).sample((4, 6), np.random.default_rng(0))
    >>> len(np.unique(off))
    2
    """

    grid: tuple = (1, 2)
    sigma: float = 0.05

    kind = "offset"

    def __post_init__(self):
        as_pair("grid", self.grid)
        check_positive("sigma", self.sigma, allow_zero=True)

    def sample(self, shape, rng):
        gy, gx = as_pair("grid", self.grid)
        ny, nx = shape
        offsets = rng.normal(0.0, self.sigma, (gy, gx))
        iy = np.minimum(np.arange(ny) * gy // ny, gy - 1)
        ix = np.minimum(np.arange(nx) * gx // nx, gx - 1)
        return offsets[iy[:, None], ix[None, :]], None


def _power_law_fluxes(rng, n, fmin, fmax, slope):
    """Inverse-CDF draws from dN/dF ~ F**-slope on [fmin, fmax]."""
    u = rng.random(n)
    if fmax == fmin:
        return np.full(n, fmin)
    if np.isclose(slope, 1.0):
        return fmin * (fmax / fmin) ** u
    e = 1.0 - slope
    return (fmin**e + u * (fmax**e - fmin**e)) ** (1.0 / e)


def _catalog(population, profile, x, y, flux, amplitude, sx, sy, theta, re, shape_par):
    n = len(x)
    # A Sersic amplitude is the surface brightness at re; its centre is e**b_n brighter.
    peak = amplitude * np.exp(sersic_bn(shape_par)) if profile == "sersic" else amplitude
    return Table(
        {
            "population": np.full(n, population, dtype="U16"),
            "profile": np.full(n, profile, dtype="U8"),
            "x_mean": x,
            "y_mean": y,
            "flux": flux,
            "amplitude": amplitude,
            "peak": peak,
            "sx": sx,
            "sy": sy,
            "theta": theta,
            "re": re,
            "shape_par": shape_par,
        }
    )


@dataclass(frozen=True, kw_only=True)
class GaussianSources:
    """Elliptical Gaussian sources with uniform positions, fluxes, widths and angles.

    ``n`` sources (or ``density`` per pixel times the image area when ``n`` is None);
    ``flux`` (image units summed over pixels) and ``sigma`` (pixels, drawn independently
    for each axis) are uniform on their (low, high) intervals.

    Examples
    --------
    >>> cat = GaussianSources(n=10).sample((64, 64), np.random.default_rng(0))
    >>> len(cat), str(cat["profile"][0])
    (10, 'gaussian')
    """

    n: int | None = None
    density: float = 1e-3
    flux: tuple = (0.0, 50.0)
    sigma: tuple = (0.5, 5.0)
    name: str = "gaussian"

    def __post_init__(self):
        _check_n_density(self.n, self.density)
        _check_interval("flux", self.flux, lower=0.0)
        _check_interval("sigma", self.sigma, lower=0.0, strict=True)

    def sample(self, shape, rng):
        ny, nx = shape
        n = _count(self.density, self.n, shape)
        x = rng.uniform(-0.5, nx - 0.5, n)
        y = rng.uniform(-0.5, ny - 0.5, n)
        flux = _uniform(rng, _check_interval("flux", self.flux), n)
        sig = _check_interval("sigma", self.sigma)
        sx = _uniform(rng, sig, n)
        sy = _uniform(rng, sig, n)
        theta = rng.uniform(0.0, np.pi, n)
        peak = flux / (2.0 * np.pi * sx * sy)
        return _catalog(
            self.name, "gaussian", x, y, flux, peak, sx, sy, theta, np.sqrt(sx * sy), np.ones(n)
        )


def _moffat_alpha(fwhm: float, beta: float) -> float:
    """Moffat core width in pixels for a FWHM and beta."""
    return fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))


def _check_moffat_beta(name: str, value: float) -> None:
    if not (np.isfinite(value) and value > 1.0):
        raise ValueError(f"{name} must be a finite number > 1, got {value!r}")


def _check_stars(stars) -> None:
    """The checks every star population shares: count or density, a Moffat core
    (``fwhm``, ``beta``) and a power-law luminosity function."""
    _check_n_density(stars.n, stars.density)
    check_positive("fwhm", stars.fwhm)
    _check_moffat_beta("beta", stars.beta)
    check_positive("flux_min", stars.flux_min)
    check_positive("flux_max", stars.flux_max)
    if stars.flux_max < stars.flux_min:
        raise ValueError(
            f"flux_max must be >= flux_min, got {stars.flux_max!r} < {stars.flux_min!r}"
        )
    check_positive("lf_slope", stars.lf_slope, allow_zero=True)


def _place_stars(stars, shape, rng):
    """(x, y, flux) of a star population: uniform positions over the frame, fluxes
    from its power law (drawn in that order, so a seed gives the same stars)."""
    ny, nx = shape
    n = _count(stars.density, stars.n, shape)
    x = rng.uniform(-0.5, nx - 0.5, n)
    y = rng.uniform(-0.5, ny - 0.5, n)
    return x, y, _power_law_fluxes(rng, n, stars.flux_min, stars.flux_max, stars.lf_slope)


@dataclass(frozen=True, kw_only=True)
class MoffatStars:
    """Round Moffat stars ``(1 + r**2/alpha**2)**-beta`` with a power-law luminosity
    function ``dN/dF ~ F**-lf_slope`` between ``flux_min`` and ``flux_max``.

    A steep function (``lf_slope`` around 2) with ``flux_min`` below the detection limit
    puts most stars under the noise, where they bias a background estimate without ever
    being masked. Small ``beta`` (around 2) gives wide PSF wings.

    Examples
    --------
    >>> stars = MoffatStars(n=1000, flux_min=1.0, flux_max=1e4, lf_slope=2.0)
    >>> cat = stars.sample((256, 256), np.random.default_rng(0))
    >>> bool(np.median(cat["flux"]) < 3.0)  # most stars are faint
    True
    """

    n: int | None = None
    density: float = 5e-3
    fwhm: float = 3.0
    beta: float = 2.5
    flux_min: float = 1.0
    flux_max: float = 1e4
    lf_slope: float = 2.0
    name: str = "stars"

    def __post_init__(self):
        _check_stars(self)

    @property
    def alpha(self) -> float:
        """Core width in pixels, from the FWHM."""
        return _moffat_alpha(self.fwhm, self.beta)

    def sample(self, shape, rng):
        x, y, flux = _place_stars(self, shape, rng)
        n = x.size
        alpha = np.full(n, self.alpha)
        peak = flux * (self.beta - 1.0) / (np.pi * alpha**2)
        return _catalog(
            self.name,
            "moffat",
            x,
            y,
            flux,
            peak,
            alpha,
            alpha,
            np.zeros(n),
            np.full(n, 0.5 * self.fwhm),
            np.full(n, self.beta),
        )


@dataclass(frozen=True, kw_only=True)
class HaloStars:
    """Bright stars with an extended PSF halo: a Moffat core (``fwhm``, ``beta``) plus a
    power-law aureole, a Moffat of small ``halo_beta`` (surface brightness falling as
    ``r**(-2 halo_beta)`` beyond ``halo_alpha``) carrying ``halo_fraction`` of the flux,
    with a power-law luminosity function ``dN/dF ~ F**-lf_slope`` between ``flux_min``
    and ``flux_max``. Clip them with :class:`Saturation` for saturated cores.

    Each star gives two catalogue rows at the same position: its core (population
    ``name``) and its aureole (population ``name + "_halo"``); ``flux`` is each part's
    share.

    Examples
    --------
    >>> cat = HaloStars(n=2).sample((256, 256), np.random.default_rng(0))
    >>> cat["population"].tolist(), bool(cat["x_mean"][0] == cat["x_mean"][2])
    (['halo_stars', 'halo_stars', 'halo_stars_halo', 'halo_stars_halo'], True)
    """

    n: int | None = None
    density: float = 5e-6
    fwhm: float = 3.0
    beta: float = 3.0
    flux_min: float = 1e6
    flux_max: float = 3e7
    lf_slope: float = 1.0
    halo_fraction: float = 0.03
    halo_alpha: float = 4.0
    halo_beta: float = 1.5
    name: str = "halo_stars"

    def __post_init__(self):
        _check_stars(self)
        check_positive("halo_alpha", self.halo_alpha)
        _check_moffat_beta("halo_beta", self.halo_beta)
        check_range("halo_fraction", self.halo_fraction, 0.0, 1.0)

    def sample(self, shape, rng):
        x, y, flux = _place_stars(self, shape, rng)
        n = x.size
        alpha = _moffat_alpha(self.fwhm, self.beta)
        rows = []
        for part, share, a, b in (
            (self.name, 1.0 - self.halo_fraction, alpha, self.beta),
            (self.name + "_halo", self.halo_fraction, self.halo_alpha, self.halo_beta),
        ):
            f = share * flux
            peak = f * (b - 1.0) / (np.pi * a**2)
            ones = np.ones(n)
            rows.append(
                _catalog(part, "moffat", x, y, f, peak, a * ones, a * ones, 0 * ones, a * ones,
                         b * ones)
            )  # fmt: skip
        return _vstack(rows)


@dataclass(frozen=True, kw_only=True)
class SersicGalaxies:
    """Elliptical Sersic galaxies: uniform effective radius ``re`` (pixels, major axis),
    index ``sersic_n``, axis ratio and angle, and log-uniform flux. Positions are
    uniform over the frame, or, with ``center`` ((x, y) as fractions of the frame),
    scattered around it by a Gaussian of ``spread`` pixels (0: all at the centre), as
    the members of a cluster, a brightest cluster galaxy or intracluster light.

    Large ``re`` with ``sersic_n`` near 4 gives extended low-surface-brightness wings that
    escape any threshold mask and bias the background upwards around the galaxy.

    Examples
    --------
    >>> cat = SersicGalaxies(n=5).sample((128, 128), np.random.default_rng(0))
    >>> bool(np.all(cat["peak"] > cat["amplitude"]))  # centre brighter than at re
    True
    """

    n: int | None = None
    density: float = 2e-4
    flux: tuple = (50.0, 5e4)
    re: tuple = (2.0, 20.0)
    sersic_n: tuple = (0.5, 4.0)
    axis_ratio: tuple = (0.3, 1.0)
    center: tuple | None = None
    spread: float = 0.0
    name: str = "galaxies"

    def __post_init__(self):
        _check_n_density(self.n, self.density)
        _check_interval("flux", self.flux, lower=0.0, strict=True)
        _check_interval("re", self.re, lower=0.0, strict=True)
        _check_interval("sersic_n", self.sersic_n, lower=0.2)
        lo, hi = _check_interval("axis_ratio", self.axis_ratio, lower=0.0, strict=True)
        if hi > 1.0:
            raise ValueError(f"axis_ratio must lie in (0, 1], got {self.axis_ratio!r}")
        if self.center is not None:
            c = np.asarray(self.center, dtype=float)
            if c.shape != (2,) or not np.all((c >= 0) & (c <= 1)):
                raise ValueError(
                    f"center must be None or (x, y) fractions of the frame in [0, 1], "
                    f"got {self.center!r}"
                )
        check_positive("spread", self.spread, allow_zero=True)

    def sample(self, shape, rng):
        from scipy.special import gamma

        ny, nx = shape
        n = _count(self.density, self.n, shape)
        if self.center is None:
            x = rng.uniform(-0.5, nx - 0.5, n)
            y = rng.uniform(-0.5, ny - 0.5, n)
        else:
            # A cluster: Gaussian scatter of `spread` pixels around the centre.
            x = self.center[0] * (nx - 1) + self.spread * rng.standard_normal(n)
            y = self.center[1] * (ny - 1) + self.spread * rng.standard_normal(n)
        lf = np.log(_check_interval("flux", self.flux))
        flux = np.exp(_uniform(rng, (lf[0], lf[1]), n))
        re = _uniform(rng, _check_interval("re", self.re), n)
        ns = _uniform(rng, _check_interval("sersic_n", self.sersic_n), n)
        q = _uniform(rng, _check_interval("axis_ratio", self.axis_ratio), n)
        theta = rng.uniform(0.0, np.pi, n)
        bn = sersic_bn(ns)
        # Total flux of a Sersic profile with surface brightness Ie at re (Graham & Driver
        # 2005, eq. 4), times the axis ratio for an ellipse.
        per_ie = 2.0 * np.pi * q * re**2 * ns * np.exp(bn) * bn ** (-2.0 * ns) * gamma(2.0 * ns)
        ie = flux / per_ie
        return _catalog(self.name, "sersic", x, y, flux, ie, re, re * q, theta, re, ns)


def _check_n_density(n, density):
    if n is not None and (int(n) != n or n < 0):
        raise ValueError(f"n must be None or an integer >= 0, got {n!r}")
    check_positive("density", density, allow_zero=True)


@dataclass(frozen=True, kw_only=True)
class GaussianNoise:
    """Additive white Gaussian noise of standard deviation ``sigma`` (image units).

    Examples
    --------
    >>> GaussianNoise(sigma=0.5).sigma_at(100.0)
    0.5
    """

    sigma: float = 0.1

    def __post_init__(self):
        check_positive("sigma", self.sigma, allow_zero=True)

    def sigma_at(self, level):
        """Noise standard deviation at a given expected pixel value."""
        return float(self.sigma)

    def sample(self, expected, rng):
        return rng.normal(0.0, self.sigma, expected.shape)


@dataclass(frozen=True, kw_only=True)
class PoissonNoise:
    """Photon noise plus read noise: the expected image (ADU) times ``gain`` (e-/ADU) is
    drawn from a Poisson law, divided back by the gain, and Gaussian read noise of
    ``read_noise`` ADU is added. Negative expectations count as zero photons.

    Examples
    --------
    >>> PoissonNoise(gain=2.0, read_noise=3.0).sigma_at(50.0)
    5.830951894845301
    """

    gain: float = 1.0
    read_noise: float = 5.0

    def __post_init__(self):
        check_positive("gain", self.gain)
        check_positive("read_noise", self.read_noise, allow_zero=True)

    def sigma_at(self, level):
        """Noise standard deviation at a given expected pixel value (ADU)."""
        return float(np.sqrt(max(float(level), 0.0) / self.gain + self.read_noise**2))

    def sample(self, expected, rng):
        counts = rng.poisson(np.maximum(expected * self.gain, 0.0))
        out = rng.normal(0.0, self.read_noise, expected.shape)
        out += counts / self.gain
        out -= expected
        return out


@dataclass(frozen=True, kw_only=True)
class BadColumns:
    """``n`` bad columns set to ``value`` (0 = dead, a large number = hot). Each spans the
    full height or, with probability ``partial_fraction``, runs from a random row to the
    top or bottom edge (a charge trap). The pixels go into the truth mask.

    Examples
    --------
    >>> img = np.ones((8, 10))
    >>> mask = BadColumns(n=1, partial_fraction=0.0).apply(img, np.random.default_rng(0))
    >>> int(mask.sum()), float(img[mask].max())
    (8, 0.0)
    """

    n: int = 3
    value: float = 0.0
    partial_fraction: float = 0.5

    def __post_init__(self):
        if int(self.n) != self.n or self.n < 0:
            raise ValueError(f"n must be an integer >= 0, got {self.n!r}")
        if not np.isfinite(self.value):
            raise ValueError(f"value must be a finite number, got {self.value!r}")
        check_range("partial_fraction", self.partial_fraction, 0.0, 1.0)

    def apply(self, image, rng):
        ny, nx = image.shape
        n = int(self.n)
        cols = rng.integers(0, nx, n)
        partial = rng.random(n) < self.partial_fraction
        start = rng.integers(0, ny, n)
        upward = rng.random(n) < 0.5
        rows = np.arange(ny)[:, None]
        lo = np.where(partial & upward, start, 0)
        hi = np.where(partial & ~upward, start, ny - 1)
        hit = (rows >= lo[None, :]) & (rows <= hi[None, :])
        mask = np.zeros(image.shape, dtype=bool)
        yy, kk = np.nonzero(hit)
        mask[yy, cols[kk]] = True
        image[mask] = self.value
        return mask


@dataclass(frozen=True, kw_only=True)
class CosmicRays:
    """Straight cosmic-ray tracks: ``n`` (or ``density`` per pixel) tracks of 1 to
    ``max_length`` pixels at random angles, each pixel receiving a charge uniform on
    ``amplitude`` (image units). Hit pixels go into the truth mask.

    Examples
    --------
    >>> img = np.zeros((32, 32))
    >>> mask = CosmicRays(n=3).apply(img, np.random.default_rng(0))
    >>> bool(np.all(img[mask] >= 50.0)), bool(np.all(img[~mask] == 0.0))
    (True, True)
    """

    n: int | None = None
    density: float = 2e-5
    max_length: int = 8
    amplitude: tuple = (50.0, 500.0)

    def __post_init__(self):
        _check_n_density(self.n, self.density)
        if int(self.max_length) != self.max_length or self.max_length < 1:
            raise ValueError(f"max_length must be an integer >= 1, got {self.max_length!r}")
        _check_interval("amplitude", self.amplitude, lower=0.0)

    def apply(self, image, rng):
        ny, nx = image.shape
        n = _count(self.density, self.n, (ny, nx))
        x0 = rng.uniform(0, nx, n)
        y0 = rng.uniform(0, ny, n)
        length = rng.integers(1, int(self.max_length) + 1, n)
        angle = rng.uniform(0.0, np.pi, n)
        amp = _uniform(rng, _check_interval("amplitude", self.amplitude), n)
        t = np.arange(int(self.max_length))[None, :]
        xs = np.rint(x0[:, None] + t * np.cos(angle)[:, None]).astype(np.int64)
        ys = np.rint(y0[:, None] + t * np.sin(angle)[:, None]).astype(np.int64)
        keep = (t < length[:, None]) & (xs >= 0) & (xs < nx) & (ys >= 0) & (ys < ny)
        charge = np.broadcast_to(amp[:, None], keep.shape)[keep]
        np.add.at(image, (ys[keep], xs[keep]), charge)
        mask = np.zeros(image.shape, dtype=bool)
        mask[ys[keep], xs[keep]] = True
        return mask


@dataclass(frozen=True, kw_only=True)
class Saturation:
    """Pixels at or above ``level`` (image units) are clipped to it and masked, as a
    saturated detector would deliver them.

    Examples
    --------
    >>> img = np.array([[1.0, 5.0, 20.0]])
    >>> Saturation(level=10.0).apply(img, None).tolist(), img.tolist()
    ([[False, False, True]], [[1.0, 5.0, 10.0]])
    """

    level: float = 1e4

    def __post_init__(self):
        if not np.isfinite(self.level):
            raise ValueError(f"level must be a finite number, got {self.level!r}")

    def apply(self, image, rng):
        mask = image >= self.level
        image[mask] = self.level
        return mask


_SKY_TYPES = (
    Polynomial,
    SincBlemishes,
    GaussianBumps,
    PowerLawField,
    Vignetting,
    AmplifierOffsets,
)
_SOURCE_TYPES = (GaussianSources, MoffatStars, HaloStars, SersicGalaxies)
_NOISE_TYPES = (GaussianNoise, PoissonNoise)
_DETECTOR_TYPES = (BadColumns, CosmicRays, Saturation)


def _check_parts(name, parts, types):
    parts = tuple(parts)
    for p in parts:
        if not isinstance(p, types):
            allowed = ", ".join(t.__name__ for t in types)
            raise ValueError(f"{name} must hold only {allowed}; got {type(p).__name__}")
    return parts


def make_scene(
    shape=(1024, 1024),
    *,
    sky=(),
    sources=(),
    noise=None,
    detector=(),
    seed=None,
    render_floor=None,
    max_radius=256,
    name="custom",
) -> Scene:
    """Compose a simulated scene from sky components, source populations, a noise model
    and detector effects, returning the image with its truth.

    The parts are drawn from one ``numpy.random.default_rng(seed)`` in the order sky,
    sources, noise, detector, each in the order given, so a seed fixes the scene.

    1. ``sky``: additive components (:class:`Polynomial`, :class:`SincBlemishes`,
       :class:`GaussianBumps`, :class:`PowerLawField`) are summed, multiplied by every
       :class:`Vignetting`, and :class:`AmplifierOffsets` are added. That is
       ``Scene.sky``, the truth.
    2. ``sources``: the populations (:class:`GaussianSources`, :class:`MoffatStars`,
       :class:`HaloStars`, :class:`SersicGalaxies`) are catalogued and rendered
       together in stamps (Sersic cores oversampled 8x8 within 4 pixels; other
       profiles point-sampled), then vignetted like the sky.
    3. ``noise`` (:class:`GaussianNoise` by default, sigma 0.1, or :class:`PoissonNoise`)
       is drawn around ``sky + sources``.
    4. ``detector`` effects (:class:`CosmicRays`, :class:`BadColumns`,
       :class:`Saturation`) alter the image in the order given; the pixels they touch
       form ``Scene.mask``.

    Parameters
    ----------
    shape : tuple of int
        Image shape (ny, nx).
    sky, sources, detector : sequence
        Component instances as listed above.
    noise : GaussianNoise or PoissonNoise, optional
        Noise model.
    seed : int or numpy.random.Generator, optional
        Seed of the single generator every part draws from.
    render_floor : float, optional
        Surface brightness below which a source profile is not rendered; default 1e-3 of
        the noise sigma at the median sky level.
    max_radius : int
        Largest source stamp half-size, pixels.
    name : str
        Stored as ``Scene.name``.

    Returns
    -------
    Scene
        ``noise_sigma`` is the noise standard deviation at the median sky level.

    Examples
    --------
    >>> scene = make_scene((128, 128), sky=[Polynomial(coefficients=((5.0, 1.0),))],
    ...                    sources=[MoffatStars(n=50)], noise=GaussianNoise(sigma=1.0),
    ...                    detector=[CosmicRays(n=5)], seed=1)
    >>> len(scene.catalog), scene.noise_sigma, bool(scene.mask.any())
    (50, 1.0, True)
    """
    shape = as_pair("shape", shape)
    sky = _check_parts("sky", sky, _SKY_TYPES)
    sources = _check_parts("sources", sources, _SOURCE_TYPES)
    detector = _check_parts("detector", detector, _DETECTOR_TYPES)
    if noise is None:
        noise = GaussianNoise()
    _check_parts("noise", (noise,), _NOISE_TYPES)
    check_positive("render_floor", render_floor, allow_none=True)
    check_positive("max_radius", max_radius)
    rng = np.random.default_rng(seed)

    additive = np.zeros(shape)
    illumination = None
    offsets = None
    components = {}
    blemish_tables = []
    for i, comp in enumerate(sky):
        arr, table = comp.sample(shape, rng)
        components[f"{i}:{type(comp).__name__}"] = arr
        if table is not None:
            blemish_tables.append(table)
        if comp.kind == "additive":
            additive += arr
        elif comp.kind == "multiplicative":
            illumination = arr if illumination is None else illumination * arr
        else:
            offsets = arr if offsets is None else offsets + arr
    sky_img = additive if illumination is None else additive * illumination
    if offsets is not None:
        sky_img = sky_img + offsets
    sigma = noise.sigma_at(np.median(sky_img))

    tables = [pop.sample(shape, rng) for pop in sources]
    catalog = _empty_catalog() if not tables else _vstack(tables)
    floor = render_floor if render_floor is not None else 1e-3 * (sigma if sigma > 0 else 1.0)
    src_img = render_sources(
        shape,
        x=np.asarray(catalog["x_mean"]),
        y=np.asarray(catalog["y_mean"]),
        amplitude=np.asarray(catalog["amplitude"]),
        sx=np.asarray(catalog["sx"]),
        sy=np.asarray(catalog["sy"]),
        theta=np.asarray(catalog["theta"]),
        profile=np.asarray(catalog["profile"]),
        shape_par=np.asarray(catalog["shape_par"]),
        floor=floor,
        max_radius=max_radius,
        oversample=np.where(catalog["profile"] == "sersic", 8, 1),
        oversample_radius=4.0,
    )
    if illumination is not None:
        src_img *= illumination
    expected = sky_img + src_img
    noise_img = noise.sample(expected, rng)
    image = expected + noise_img

    mask = None
    for effect in detector:
        hit = effect.apply(image, rng)
        mask = hit if mask is None else mask | hit

    blemishes = None
    if blemish_tables:
        blemishes = blemish_tables[0] if len(blemish_tables) == 1 else _vstack(blemish_tables)
    return Scene(
        image=image,
        sky=sky_img,
        noise=noise_img,
        sources=src_img,
        catalog=catalog,
        blemishes=blemishes,
        noise_sigma=sigma,
        mask=mask,
        components=components,
        name=name,
    )


def _vstack(tables):
    from astropy.table import vstack

    return vstack(tables, join_type="exact")


def _empty_catalog():
    z = np.zeros(0)
    return _catalog("", "gaussian", z, z, z, z, z, z, z, z, z)
