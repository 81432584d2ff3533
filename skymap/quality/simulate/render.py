"""Rendering of simulated scenes: the :class:`Scene` container with its truth, and
:func:`render_sources`, which draws many elliptical Gaussian, Moffat and Sersic
profiles into an image stamp by stamp.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from astropy.table import Table

from skymap._validate import check_positive
from skymap.quality.simulate import _kernels as _k

__all__ = ["Scene", "render_sources", "sersic_bn", "sinc_blemishes"]


@dataclass(frozen=True, kw_only=True, eq=False)
class Scene:
    """A simulated image with its truth.

    Attributes
    ----------
    image : ndarray
        What a detector would deliver: ``sky + sources + noise``, then detector effects
        (bad columns, cosmic rays, saturation) where the scene has them.
    sky : ndarray
        The noiseless background: the truth a background model should recover.
    noise : ndarray
        The noise realisation that was added (``image - sky - sources`` away from
        detector effects).
    sources : ndarray
        The noiseless image of the sources alone.
    catalog : astropy.table.Table
        One row per source; always has ``x_mean``, ``y_mean`` (pixels), ``flux`` and
        ``re`` (a characteristic radius in pixels), plus profile-specific columns.
    blemishes : astropy.table.Table or None
        Sinc blemishes (``x``, ``y``, ``width``, ``amplitude``) when the sky has them.
    noise_sigma : float
        Standard deviation of the noise at the background level (same units as image).
    mask : ndarray of bool or None
        Pixels spoiled by detector effects (True = bad): truth for a bad-pixel mask.
    components : dict of str to ndarray
        The additive sky components by name (their sum, times vignetting, plus amplifier
        offsets, is ``sky``), for diagnostics.
    name : str
        What made the scene.
    """

    image: np.ndarray
    sky: np.ndarray
    noise: np.ndarray
    sources: np.ndarray
    catalog: Table
    blemishes: Table | None = None
    noise_sigma: float
    mask: np.ndarray | None = None
    components: dict = field(default_factory=dict)
    name: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        """The image shape (ny, nx)."""
        return self.image.shape


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------

_KINDS = {"gaussian": _k.GAUSSIAN, "moffat": _k.MOFFAT, "sersic": _k.SERSIC}


def _quadratic_form(sx, sy, theta, *, half: bool):
    """Coefficients of q = a dx^2 + b dx dy + c dy^2 for an ellipse of scales (sx, sy)
    rotated by ``theta`` (radians, counter-clockwise from +x).

    With ``half`` the coefficients carry the Gaussian's 1/2 and are evaluated in the same
    order as astropy's ``Gaussian2D`` so that the notebook's scene is reproduced to the
    last bits.
    """
    cost2 = np.cos(theta) ** 2
    sint2 = np.sin(theta) ** 2
    sin2t = np.sin(2.0 * theta)
    xs2 = sx**2
    ys2 = sy**2
    f = 0.5 if half else 1.0
    a = f * ((cost2 / xs2) + (sint2 / ys2))
    b = f * ((sin2t / xs2) - (sin2t / ys2))
    c = f * ((sint2 / xs2) + (cost2 / ys2))
    return a, b, c


def sersic_bn(n):
    """b_n such that the effective radius encloses half the light (Ciotti & Bertin 1999,
    doi:10.48550/arXiv.astro-ph/9911078).

    Examples
    --------
    >>> round(float(sersic_bn(1.0)), 4)
    1.6783
    """
    n = np.asarray(n, dtype=float)
    return 2.0 * n - 1.0 / 3.0 + 4.0 / (405.0 * n) + 46.0 / (25515.0 * n**2)


def render_sources(
    shape,
    *,
    x,
    y,
    amplitude,
    sx,
    sy,
    theta,
    profile="gaussian",
    shape_par=None,
    floor=1e-15,
    max_radius=512,
    oversample=1,
    oversample_radius=1.5,
    dtype=np.float64,
):
    """Render many elliptical sources into a new image, each in its own cutout stamp.

    Each source is evaluated only inside the bounding box of the ellipse where its
    profile exceeds ``floor`` (capped at ``max_radius`` pixels), so the cost grows with
    the sources' footprints, not with the image area times the number of sources.
    Sources are added in catalogue order, in parallel over bands of rows.

    Parameters
    ----------
    shape : tuple of int
        Output shape (ny, nx).
    x, y : array_like
        Source centres in pixels (pixel centres on integers).
    amplitude : array_like
        Peak value of each profile (image units).
    sx, sy : array_like
        Scale lengths along the source's own axes, in pixels: the standard deviations
        for ``"gaussian"``, the core width alpha for ``"moffat"``, the effective
        (half-light) radius along each axis for ``"sersic"``.
    theta : array_like
        Rotation of the ``sx`` axis from +x, counter-clockwise, in radians.
    profile : {"gaussian", "moffat", "sersic"} or array_like of those
        Profile of each source.
    shape_par : array_like, optional
        Moffat beta or Sersic index n (ignored for Gaussians).
    floor : float
        Surface brightness (image units) below which a profile is not rendered.
    max_radius : int
        Largest stamp half-size in pixels.
    oversample : int or array_like of int
        Sub-pixels per axis (per source, or one for all) for pixels whose centre lies
        within ``oversample_radius`` of the source centre (1 = point sampling at pixel
        centres everywhere). Only cuspy profiles (Sersic with n >~ 1.5) need it: for a
        smooth, resolved profile the sum of point samples is already its integral, and
        oversampling only the core would break that.
    oversample_radius : float
        Radius in pixels of the oversampled core.
    dtype : dtype
        Output dtype; accumulation happens in it.

    Returns
    -------
    ndarray
        The image of the sources.

    Notes
    -----
    Profiles: Gaussian ``A exp(-q/2)``, Moffat ``A (1 + q)^-beta`` and Sersic
    ``A exp(-b_n (q^(1/2n) - 1))``, where ``q`` is the squared elliptical radius in units of
    the scale lengths. For Sersic, ``A`` is the surface brightness at the effective radius.

    Examples
    --------
    >>> img = render_sources((32, 32), x=[10.0], y=[12.0], amplitude=[1.0],
    ...                      sx=[2.0], sy=[2.0], theta=[0.0])
    >>> float(img[12, 10])
    1.0
    """
    ny, nx = (int(v) for v in shape)
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    n = x.size
    y = np.broadcast_to(np.asarray(y, dtype=np.float64), (n,)).copy()
    amp = np.broadcast_to(np.asarray(amplitude, dtype=np.float64), (n,)).copy()
    sx = np.broadcast_to(np.asarray(sx, dtype=np.float64), (n,))
    sy = np.broadcast_to(np.asarray(sy, dtype=np.float64), (n,))
    theta = np.broadcast_to(np.asarray(theta, dtype=np.float64), (n,))
    check_positive("floor", floor)
    check_positive("max_radius", max_radius)
    if isinstance(profile, str):
        if profile not in _KINDS:
            raise ValueError(f"profile must be one of {sorted(_KINDS)}, got {profile!r}")
        kind = np.full(n, _KINDS[profile], dtype=np.int64)
    else:
        names = np.broadcast_to(np.asarray(profile), (n,))
        bad = set(names.tolist()) - set(_KINDS)
        if bad:
            raise ValueError(f"profile must be one of {sorted(_KINDS)}, got {sorted(bad)}")
        kind = np.array([_KINDS[p] for p in names.tolist()], dtype=np.int64)
    if shape_par is None:
        shape_par = np.ones(n)
    shape_par = np.broadcast_to(np.asarray(shape_par, dtype=np.float64), (n,)).copy()
    if n and (np.any(sx <= 0) or np.any(sy <= 0)):
        raise ValueError("sx and sy must be > 0 for every source")

    is_gauss = kind == _k.GAUSSIAN
    is_moffat = kind == _k.MOFFAT
    is_sersic = kind == _k.SERSIC
    if np.any(is_moffat & (shape_par <= 1)):
        raise ValueError("shape_par (Moffat beta) must be > 1")
    if np.any(is_sersic & (shape_par <= 0)):
        raise ValueError("shape_par (Sersic n) must be > 0")
    a, b, c = _quadratic_form(sx, sy, theta, half=False)
    ga, gb, gc = _quadratic_form(sx, sy, theta, half=True)
    a = np.where(is_gauss, ga, a)
    b = np.where(is_gauss, gb, b)
    c = np.where(is_gauss, gc, c)
    bn = np.where(is_sersic, sersic_bn(np.where(is_sersic, shape_par, 1.0)), 0.0)

    # Largest q at which |amp| * profile(q) still reaches the floor.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = np.abs(amp) / floor
        lr = np.log(np.maximum(ratio, 1.0))
        qmax = np.where(
            is_gauss,
            lr,
            np.where(
                is_moffat,
                np.expm1(lr / shape_par),
                (1.0 + lr / np.where(is_sersic, bn, 1.0)) ** (2.0 * shape_par),
            ),
        )
        det = a * c - 0.25 * b**2
        hx = np.sqrt(qmax * c / det)
        hy = np.sqrt(qmax * a / det)
    hx = np.minimum(np.nan_to_num(hx, nan=max_radius, posinf=max_radius), max_radius)
    hy = np.minimum(np.nan_to_num(hy, nan=max_radius, posinf=max_radius), max_radius)
    visible = ratio > 1.0
    x_lo = np.maximum(np.ceil(x - hx), 0).astype(np.int64)
    x_hi = np.minimum(np.floor(x + hx), nx - 1).astype(np.int64)
    y_lo = np.maximum(np.ceil(y - hy), 0).astype(np.int64)
    y_hi = np.minimum(np.floor(y + hy), ny - 1).astype(np.int64)
    x_hi[~visible] = -1
    sub_n = np.broadcast_to(np.asarray(oversample, dtype=np.int64), (n,)).copy()
    if np.any(sub_n < 1):
        raise ValueError(f"oversample must be integers >= 1, got {oversample!r}")
    image = np.zeros((ny, nx), dtype=dtype)
    if n:
        _k.render_stamps(
            image,
            x,
            y,
            amp,
            np.ascontiguousarray(a),
            np.ascontiguousarray(b),
            np.ascontiguousarray(c),
            kind,
            shape_par,
            bn,
            x_lo,
            x_hi,
            y_lo,
            y_hi,
            sub_n,
            float(oversample_radius) ** 2,
        )
    return image


# --------------------------------------------------------------------------------------
# The notebook's scene
# --------------------------------------------------------------------------------------


def sinc_blemishes(shape, x, y, width, amplitude, dtype=np.float64):
    """Sum of radial sinc ripples ``a * sin(r/w) / (r/w)`` (r in pixels) centred on
    (``x``, ``y``) with widths ``w`` and amplitudes ``a``.

    Examples
    --------
    >>> float(sinc_blemishes((5, 5), [2.0], [2.0], [3.0], [1.5])[2, 2])
    1.5
    """
    ny, nx = shape
    row, col = np.mgrid[0:ny, 0:nx]
    out = np.zeros(shape, dtype=dtype)
    # A handful of blemishes: one vectorised full-image pass each.
    for xc, yc, w, a in zip(x, y, width, amplitude, strict=True):
        r = np.sqrt((row - yc) ** 2 + (col - xc) ** 2)
        out = out + a * np.sinc(r / (w * np.pi))
    return out
