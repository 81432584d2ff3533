"""The protocols the pipeline's pieces follow: :class:`BackgroundEstimator` and the
:class:`BackgroundModel` it returns.

:class:`~skymap.background.pipeline.IterativeBackground` never asks which class it holds:
it reads a model through :class:`BackgroundModel` (background and RMS maps, whole or a
window; the grid; the smoothing scale; the statistical error) and fits an estimator
through :meth:`DrivenEstimator.fit_on`. :func:`as_model` and :func:`as_driven` adapt
the plain forms (an estimator with only ``fit(image, mask)``, a result with only
``background`` and ``rms`` arrays), so a user's own pieces work in every back end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from skymap._util import cut_window

__all__ = [
    "BackgroundEstimator",
    "BackgroundModel",
    "DrivenEstimator",
    "MapMethods",
    "MapModel",
    "as_driven",
    "as_model",
    "maps_only",
]


@runtime_checkable
class BackgroundModel(Protocol):
    """What a background estimator fitted.

    Attributes
    ----------
    shape : (int, int)
        The image's shape.
    grid : ndarray or None
        The coarse grid the maps are made from (None: the model is a map).
    scale : float or None
        Smoothing length in pixels, when the model has one.
    error : float
        RMS statistical error of the background in units of its RMS (NaN: unknown).

    Notes
    -----
    A model may also say ``new_maps = True`` (not required): its
    :meth:`background_map` makes a new array at every call, which the caller may then
    overwrite (the in-memory back end writes the residual into it, one image of memory
    less); if its :meth:`background_map` also takes ``out=`` (an array of the map's
    shape and ``dtype``, which the model then has as an attribute), the in-memory back
    end passes the last residual's memory there: no fresh image, whose pages the system
    would zero first. A model with ``residual_map(image, step=1, out=None)`` (``image
    - background_map(step)`` made in one pass, the map rounded to the model's
    ``dtype`` first; ``out`` may be ``image``) gives the in-memory back end the
    residuals of the maps the loop reads only through a residual and the change,
    without the maps, and the change's differences in one subsample's memory; if its
    ``residual_map`` also takes ``window=`` (the image's pixels of that window), the
    dask back end makes each tile's residual in one pass too. A model with
    ``maps_only()`` (a copy without the data it was fitted from, that still makes the
    same maps) is sent to tiles and kept in a tiled fit's history that way
    (:func:`maps_only`).
    """

    shape: tuple[int, int]

    @property
    def grid(self) -> np.ndarray | None: ...

    @property
    def scale(self) -> float | None: ...

    @property
    def error(self) -> float: ...

    def background_map(self, step: int = 1, window=None) -> np.ndarray:
        """The background at every ``step``-th pixel, over ``window`` = ((y0, y1), (x0,
        x1)) if given: exactly that part of the whole map (read only: it may be a view
        of a cached map)."""

    def rms_map(self, window=None) -> np.ndarray:
        """The RMS map (pixel noise), over ``window`` if given: a new array, which the
        caller may modify."""

    def constant_rms(self) -> float | None:
        """The RMS as one number when it is constant to 5%, else None."""

    def coarse_rms(self) -> Any:
        """The RMS as a :class:`~skymap.masking.CoarseRMS` (one value per block) when it
        is smooth over blocks of several pixels, else None."""

    def asymmetry(self, stiffer: float = 4.0) -> float:
        """Upper-to-lower tail ratio of (this background - one ``stiffer`` times
        smoother), NaN when the model cannot tell."""


@runtime_checkable
class BackgroundEstimator(Protocol):
    """Anything with ``fit(image, mask) -> result`` whose result has ``background`` and
    ``rms`` maps (a :class:`BackgroundModel`, or adapted by :func:`as_model`):
    :class:`~skymap.background.smooth.ThinPlateSmoother`,
    :class:`~skymap.background.mesh.MeshBackground`,
    :class:`~skymap.background.ring.RingMedianGuess`, ..."""

    def fit(self, image: Any, mask: Any = None) -> Any: ...


@runtime_checkable
class DrivenEstimator(Protocol):
    """An estimator the pipeline fits through a back end: ``fit_on(backend, mask, *,
    start_scale=None, min_scale=None)`` builds the model from the back end's
    primitives (:class:`~skymap.backends.base.ArrayBackend`), starts its search at the
    previous ``start_scale`` (pixels) and stays at or above ``min_scale`` (pixels)."""

    def fit_on(
        self, backend: Any, mask: Any, *, start_scale: float | None = None,
        min_scale: float | None = None,
    ) -> BackgroundModel: ...  # fmt: skip


class MapMethods:
    """The :class:`BackgroundModel` methods of a model held as full maps, its
    ``background`` and ``rms`` attributes (no grid, no coarse form, no asymmetry)."""

    grid = None

    def background_map(self, step: int = 1, window=None) -> np.ndarray:
        return cut_window(np.asarray(self.background), step, window)

    def rms_map(self, window=None) -> np.ndarray:
        rms = np.asarray(self.rms)
        return rms.copy() if rms.ndim == 0 else cut_window(rms, 1, window).copy()

    def constant_rms(self) -> None:
        return None

    def coarse_rms(self) -> None:
        return None

    def asymmetry(self, stiffer: float = 4.0) -> float:
        return float("nan")


@dataclass(frozen=True, kw_only=True, eq=False)
class MapModel(MapMethods):
    """A :class:`BackgroundModel` held as full-resolution maps.

    Examples
    --------
    >>> m = MapModel(background=np.zeros((4, 6)), rms=np.ones((4, 6)))
    >>> m.background_map(2).shape, m.rms_map(((1, 2), (0, 3))).shape, m.constant_rms()
    ((2, 3), (1, 3), None)
    """

    background: np.ndarray
    rms: np.ndarray
    scale: float | None = None
    error: float = float("nan")
    source: Any = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(np.shape(self.background))


def as_model(result: Any) -> BackgroundModel:
    """``result`` if it follows :class:`BackgroundModel`, else a :class:`MapModel` of its
    ``background`` and ``rms`` (and ``scale``, ``error`` if it has them; the result
    itself as ``source``)."""
    if isinstance(result, BackgroundModel):
        return result
    scale, error = getattr(result, "scale", None), getattr(result, "error", None)
    return MapModel(
        background=result.background,
        rms=result.rms,
        scale=None if scale is None else float(scale),
        error=float("nan") if error is None else float(error),
        source=result,
    )


@dataclass(frozen=True, eq=False)
class _Gathered:
    """A plain estimator driven through a back end: fitted on the gathered image."""

    estimator: Any

    def fit_on(self, backend, mask, *, start_scale=None, min_scale=None):
        image, mask = backend.gather(backend.image), backend.gather(mask)
        return as_model(self.estimator.fit(image, mask))


def maps_only(model: Any) -> Any:
    """``model`` with only what its maps read: its ``maps_only()`` if it has one (a
    thin-plate model without its per-cell data, most of its bytes), else ``model``.

    Examples
    --------
    >>> from skymap.background.smooth import ThinPlateSmoother
    >>> res = ThinPlateSmoother().fit(np.random.default_rng(0).normal(size=(64, 64)))
    >>> maps_only(res).cell_values is None, maps_only(res.background) is res.background
    (True, True)
    """
    slim = getattr(model, "maps_only", None)
    return model if slim is None else slim()


def as_driven(estimator: Any) -> DrivenEstimator:
    """``estimator`` if it follows :class:`DrivenEstimator`, else an adapter that fits
    it (``fit(image, mask)``) on the back end's gathered image and adapts its result
    with :func:`as_model`."""
    return estimator if isinstance(estimator, DrivenEstimator) else _Gathered(estimator)
