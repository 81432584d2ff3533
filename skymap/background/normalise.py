"""The affine map the pipeline works in: ``(image - level) / scale``.

Results must scale exactly with the input, from 1e-30 to 1e30 and in float32 as in
float64. The pipeline therefore works on a normalised copy: a robust level (a median)
is subtracted, which keeps float32 arithmetic on images with a large offset as precise
as the data, and the result is divided by a robust scale (a MAD) rounded to a power of
two, so that the division and its undoing are exact and no square of a pixel value
under- or overflows. The statistics read a strided subsample of the image (so a tiled
caller computes the same constants from the same pixels) and ignore any single value,
however extreme.

Normalised values beyond ``CLIP`` (1e8 robust sigmas) are clipped there: such a pixel is
a source or a defect whatever its exact value, and the clip keeps its square and its
sums finite and its share of a cell mean from swamping the fit before the masker has
seen it. Pixels more than ``NEGATIVE`` (50) robust sigmas below the level are
:meth:`Normalisation.outliers`: dead pixels, bad columns, negative saturation codes
(-32768). No sky dips that deep below an image's median, and the maskers look for
sources above the background only, so the pipeline excludes them from the start, as it
does non-finite pixels, and reports them with the detections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["CLIP", "NEGATIVE", "Normalisation"]

CLIP = 1e8
NEGATIVE = 50.0

_MAD_TO_STD = 1.482602218505602


def _step(shape) -> int:
    # about 250 000 pixels, as the smoother's reference level
    return max(1, int(np.sqrt(shape[0] * shape[1] / 250_000)))


@dataclass(frozen=True)
class Normalisation:
    """``work = (image - level) / scale``; ``scale`` is a power of two.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> img = 1e9 + 10 * rng.normal(size=(64, 64))
    >>> norm = Normalisation.of(img, np.zeros(img.shape, bool))
    >>> work = norm.apply(img)
    >>> bool(0.5 < work.std() < 2), bool(np.allclose(norm.undo(work), img))
    (True, True)
    """

    level: float
    scale: float
    spread: float = 1.0

    @classmethod
    def of(cls, image: np.ndarray, bad: np.ndarray) -> Normalisation:
        """The normalisation of ``image`` ignoring ``bad`` (True = excluded), from a
        strided subsample (:meth:`from_sample`)."""
        s = _step(image.shape)
        return cls.from_sample(image[::s, ::s], bad[::s, ::s], image.dtype)

    @staticmethod
    def sample_step(shape) -> int:
        """Stride of the subsample :meth:`of` reads."""
        return _step(shape)

    @classmethod
    def from_sample(cls, sub: np.ndarray, subbad: np.ndarray, dtype) -> Normalisation:
        """The normalisation from the subsample ``sub`` of an image of ``dtype``.

        The level is the median of the good samples, rounded to ``dtype`` (so that it is
        subtracted exactly); the scale is the MAD about it (or, when more than half the
        samples share one value, the mean absolute deviation, or 1) rounded to a power
        of two."""
        v = np.asarray(sub, dtype=np.float64)[~np.asarray(subbad)]
        v = v[np.isfinite(v)]
        if v.size == 0:
            return cls(level=0.0, scale=1.0, spread=1.0)
        # The lower middle value: a sample value, so exact in the image's dtype.
        level = float(np.partition(v, (v.size - 1) // 2)[(v.size - 1) // 2])
        dev = np.abs(v - level)
        spread = _MAD_TO_STD * float(np.median(dev))
        if not spread > 0:
            spread = float(np.mean(dev))
        if not (spread > 0 and math.isfinite(spread)):
            spread = 1.0 if level == 0 else abs(level)
        scale = 2.0 ** round(math.log2(spread))
        return cls(level=float(np.dtype(dtype).type(level)), scale=float(scale), spread=spread)

    def apply(self, image: np.ndarray, dtype=None) -> np.ndarray:
        """A new normalised array (``dtype``, default the image's), clipped at
        +/- ``CLIP``; non-finite values stay non-finite."""
        dtype = np.dtype(dtype or image.dtype)
        out = np.empty(image.shape, dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            np.subtract(image, dtype.type(self.level), out=out, casting="unsafe")
            # The scale is a power of two: multiplying by its inverse is exact.
            np.multiply(out, dtype.type(1.0 / self.scale), out=out)
        finite = np.isfinite(image)
        np.clip(out, -CLIP, CLIP, out=out, where=finite)
        return out

    def outliers(self, work: np.ndarray) -> np.ndarray:
        """Pixels of the normalised ``work`` more than ``NEGATIVE`` robust sigmas below
        the level (a new boolean array)."""
        return work < work.dtype.type(-NEGATIVE * self.spread / self.scale)

    def undo(self, work: np.ndarray, *, offset: bool = True) -> np.ndarray:
        """``work * scale + level`` in ``work``'s dtype (a new array); ``offset=False``
        for spreads (rms, errors), which only scale."""
        work = np.asarray(work)
        dtype = work.dtype if work.dtype.kind == "f" else np.dtype(np.float64)
        out = np.multiply(work, dtype.type(self.scale), dtype=dtype)
        if offset:
            np.add(out, dtype.type(self.level), out=out)
        return out
