"""Ready-made peer methods for :func:`~skymap.quality.injection.compare`: the recipes
users run today, each as a callable ``(image, mask) -> background``.

* :func:`photutils_one_pass` / :func:`photutils_two_pass`: photutils ``Background2D``
  (box 64, 3x3 median filter); the two-pass recipe detects sources at 2 sigma above the
  first background with photutils' segmentation, dilates their mask and refits.
* :func:`sep_one_pass` / :func:`sep_two_pass`: SEP's ``Background`` (SExtractor's
  algorithm, same box and filter), two-pass with ``sep.extract``; only if ``sep`` is
  installed.
* :func:`noisechisel` / :func:`noisechisel_structured`: Gnuastro's NoiseChisel, its
  ``SKY`` extension, with its defaults or a configuration for structured skies; only if
  ``astnoisechisel`` is on the PATH. It is a benchmark peer, never a dependency.

Each peer imports its package when called, so importing this module costs nothing.
:func:`peers` lists those that can run here.

References
----------
Bertin, E., & Arnouts, S. 1996, A&AS 117, 393, "SExtractor: Software for source
extraction", doi:10.1051/aas:1996164

Barbary, K. 2016, JOSS 1(6), 58, "SEP: Source Extractor as a library",
doi:10.21105/joss.00058

Akhlaghi, M., & Ichikawa, T. 2015, ApJS 220, 1, "Noise-based detection and
segmentation of nebulous objects", doi:10.1088/0067-0049/220/1/1
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

__all__ = [
    "NOISECHISEL_STRUCTURED",
    "PeerFailed",
    "noisechisel",
    "noisechisel_structured",
    "peers",
    "photutils_one_pass",
    "photutils_two_pass",
    "sep_one_pass",
    "sep_two_pass",
]

BOX = 64
FILTER = 3
DETECT_SIGMA = 2.0
REFIT_EXCLUDE = 50.0  # Background2D's exclude_percentile for the refit of the two-pass
DILATE = 5  # px: the source mask is grown by a disc of this diameter before the refit
#: NoiseChisel options for structured skies (smaller tiles, fewer neighbours).
NOISECHISEL_STRUCTURED = (
    "--tilesize=15,15",
    "--largetilesize=150,150",
    "--interpnumngb=4",
    "--smoothwidth=3",
)
NOISECHISEL_TIMEOUT = 600.0

log = logging.getLogger(__name__)


class PeerFailed(RuntimeError):
    """A peer could not produce a background for this image (e.g. NoiseChisel's
    "only N neighbors found"); the message says why."""


def _inputs(image, mask):
    img = np.asarray(image, dtype=np.float64)
    bad = ~np.isfinite(img)
    if mask is not None:
        bad |= np.asarray(mask, dtype=bool)
    return img, bad


def _box(shape):
    # photutils and SEP refuse a box larger than the image; a small image gets at least
    # 2 x 2 boxes so that a few masked pixels do not leave no usable box
    return max(8, min(BOX, min(shape) // 2))


def _disc(diameter: int) -> np.ndarray:
    r = (diameter - 1) / 2
    y, x = np.mgrid[:diameter, :diameter]
    return np.hypot(y - r, x - r) <= r + 1e-9


# --------------------------------------------------------------------------- photutils


def _background2d(img, bad, exclude_percentile=10.0):
    from photutils.background import Background2D

    box = _box(img.shape)
    try:
        return Background2D(
            img, box, mask=bad, filter_size=FILTER, exclude_percentile=exclude_percentile
        )
    except ValueError as err:
        # "All boxes contain <= N unmasked or finite pixels": what a user does next is
        # accept boxes up to half excluded
        if "exclude_percentile" not in str(err) or exclude_percentile >= REFIT_EXCLUDE:
            raise
        log.info("Background2D refused every box; retrying with exclude_percentile=50")
        return Background2D(
            img, box, mask=bad, filter_size=FILTER, exclude_percentile=REFIT_EXCLUDE
        )


def photutils_one_pass(image, mask=None) -> np.ndarray:
    """photutils ``Background2D`` with a 64-px box and a 3x3 median filter (the
    defaults otherwise: 3-sigma clipping, SExtractor's mode estimator). An image under
    128 px on a side gets half its side as the box (SEP's peers likewise). When
    ``Background2D`` refuses every box (more than 10% of each excluded), it is run
    again accepting boxes up to half excluded, as a user would."""
    img, bad = _inputs(image, mask)
    return _background2d(img, bad).background


def photutils_two_pass(image, mask=None) -> np.ndarray:
    """``Background2D``, then sources detected at 2 sigma above it (photutils
    segmentation on the residual smoothed by a 3-px FWHM Gaussian, 5 connected pixels,
    the threshold in units of the unsmoothed RMS as in photutils' documentation),
    their mask dilated by a 5-px disc, and ``Background2D`` again with it, accepting
    boxes up to half masked (``exclude_percentile=50``)."""
    from astropy.convolution import Gaussian2DKernel, convolve
    from photutils.segmentation import detect_sources

    img, bad = _inputs(image, mask)
    first = _background2d(img, bad)
    resid = np.where(bad, 0.0, img - first.background)
    kernel = Gaussian2DKernel(3.0 / 2.3548, x_size=7, y_size=7)
    smooth = convolve(resid, kernel, mask=bad, normalize_kernel=True)
    # photutils' recipe: the threshold in units of the unsmoothed RMS, applied to the
    # smoothed residual (as SExtractor and SEP do)
    threshold = DETECT_SIGMA * first.background_rms
    seg = detect_sources(smooth, threshold, 5, mask=bad)
    sources = np.zeros(img.shape, bool) if seg is None else seg.data > 0
    sources = ndimage.binary_dilation(sources, _disc(DILATE))
    # with sources masked, most boxes of a crowded field lose more than the default 10%
    # of their pixels and Background2D would refuse them all
    return _background2d(img, bad | sources, exclude_percentile=REFIT_EXCLUDE).background


# --------------------------------------------------------------------------- SEP


def _sep_arrays(image, mask):
    img, bad = _inputs(image, mask)
    data = np.ascontiguousarray(np.where(bad, 0.0, img), dtype=np.float64)
    return data, np.ascontiguousarray(bad)


def sep_one_pass(image, mask=None) -> np.ndarray:
    """SEP's ``Background`` (SExtractor's algorithm) with a 64-px box and 3x3 filter."""
    import sep

    data, bad = _sep_arrays(image, mask)
    b = _box(data.shape)
    return sep.Background(data, mask=bad, bw=b, bh=b, fw=FILTER, fh=FILTER).back()


def sep_two_pass(image, mask=None) -> np.ndarray:
    """SEP's ``Background``, then ``sep.extract`` at 2 sigma (global RMS, 5 pixels,
    SExtractor's default 3x3 filter), the segmentation dilated by a 5-px disc, and
    ``Background`` again with it."""
    import sep

    data, bad = _sep_arrays(image, mask)
    b = _box(data.shape)
    first = sep.Background(data, mask=bad, bw=b, bh=b, fw=FILTER, fh=FILTER)
    resid = np.ascontiguousarray(data - first.back())
    sep.set_extract_pixstack(max(300000, data.size))
    sep.set_sub_object_limit(4096)
    try:
        _, seg = sep.extract(
            resid,
            DETECT_SIGMA,
            err=first.globalrms,
            mask=bad,
            minarea=5,
            segmentation_map=True,
        )
    except Exception as err:  # SEP raises bare Exceptions for overflows
        raise PeerFailed(f"sep.extract: {err}") from err
    sources = ndimage.binary_dilation(seg > 0, _disc(DILATE))
    mask2 = np.ascontiguousarray(bad | sources)
    return sep.Background(data, mask=mask2, bw=b, bh=b, fw=FILTER, fh=FILTER).back()


# --------------------------------------------------------------------------- NoiseChisel


def noisechisel_available() -> bool:
    """Whether ``astnoisechisel`` (Gnuastro) is on the PATH."""
    return shutil.which("astnoisechisel") is not None


def _run_noisechisel(image, mask, options=()) -> np.ndarray:
    from astropy.io import fits

    exe = shutil.which("astnoisechisel")
    if exe is None:
        raise PeerFailed("astnoisechisel (Gnuastro) is not on the PATH")
    img, bad = _inputs(image, mask)
    # NoiseChisel treats NaN as blank: that is how the mask reaches it
    data = np.where(bad, np.nan, img).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="skymap_nc_") as tmp:
        src, out = Path(tmp) / "in.fits", Path(tmp) / "out.fits"
        fits.writeto(src, data)
        cmd = [exe, str(src), "--hdu=0", f"--output={out}", "--quiet", *options]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=NOISECHISEL_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired as err:
            raise PeerFailed(f"NoiseChisel timed out after {NOISECHISEL_TIMEOUT:.0f} s") from err
        if proc.returncode != 0 or not out.exists():
            reason = (
                _noisechisel_error(proc.stderr or proc.stdout) or f"exit code {proc.returncode}"
            )
            raise PeerFailed(f"NoiseChisel failed: {reason}")
        with fits.open(out) as hdul:
            sky = np.asarray(hdul["SKY"].data, dtype=np.float64)
    if sky.shape != img.shape:
        raise PeerFailed(f"NoiseChisel's SKY has shape {sky.shape}, not {img.shape}")
    return sky


def _noisechisel_error(text: str) -> str:
    # Its messages start "astnoisechisel: ..."; warnings (e.g. about 0.0-valued edges)
    # come first, the error last, then paragraphs of advice.
    lines = [ln for ln in text.splitlines() if ln.startswith(("astnoisechisel:", "/"))]
    errors = [ln for ln in lines if "astnoisechisel:" in ln and "WARNING" not in ln]
    pick = errors[-1] if errors else (lines[0] if lines else text.strip()[:200])
    return pick.split("astnoisechisel: ", 1)[-1].strip()


def noisechisel(image, mask=None) -> np.ndarray:
    """Gnuastro NoiseChisel with its defaults; the background is its ``SKY`` extension.
    Raises :class:`PeerFailed` when it does not run (not installed, or it fails on the
    image, as its defaults often do on real frames: "only N neighbors found")."""
    return _run_noisechisel(image, mask)


def noisechisel_structured(image, mask=None) -> np.ndarray:
    """NoiseChisel with ``NOISECHISEL_STRUCTURED`` (15-px tiles, 150-px large tiles, 4
    interpolation neighbours, 3-px smoothing) for structured skies."""
    return _run_noisechisel(image, mask, NOISECHISEL_STRUCTURED)


# --------------------------------------------------------------------------- registry


def peers(*, noisechisel_runs: bool | None = None) -> dict:
    """The peers that can run here, ``{name: callable}``: photutils always, SEP if
    installed, NoiseChisel if on the PATH (or as ``noisechisel_runs`` says).

    Examples
    --------
    >>> sorted(peers(noisechisel_runs=False))[:2]
    ['photutils_1pass', 'photutils_2pass']
    """
    out = {"photutils_1pass": photutils_one_pass, "photutils_2pass": photutils_two_pass}
    if importlib.util.find_spec("sep") is not None:
        out.update(sep_1pass=sep_one_pass, sep_2pass=sep_two_pass)
    if noisechisel_available() if noisechisel_runs is None else noisechisel_runs:
        out.update(noisechisel=noisechisel, noisechisel_structured=noisechisel_structured)
    return out
