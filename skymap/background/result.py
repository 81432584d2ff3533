"""What a fit returns: :class:`BackgroundResult` and, one per iteration,
:class:`IterationRecord` (split from :mod:`skymap.background.pipeline`, which
re-exports both)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from skymap._validate import check_choice

if TYPE_CHECKING:  # annotations only: the pipeline imports this module
    from skymap._inputs import ImageInput, Normalisation
    from skymap.background.pipeline import IterativeBackground

__all__ = ["BackgroundResult", "IterationRecord"]


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, kw_only=True, eq=False)
class IterationRecord:
    """One iteration of an :class:`IterativeBackground` fit.

    ``background``, ``rms`` and ``mask`` are rebuilt from compact forms on each access
    (the estimator's own result and a bit-packed mask), so keeping every iteration is
    cheap; the scalar fields describe the convergence.

    Attributes
    ----------
    stage : int
        -1 for the first guess, then the stage index; ``len(stages)`` for the final
        refit.
    iteration : int
        Iteration within the stage (0-based).
    mask_fraction : float
        Share of the image excluded (given mask, non-finite pixels and detections).
    mask_change : float
        Share of pixels whose mask state changed since the previous iteration.
    mask_growth : float
        Change of ``mask_fraction`` since the previous iteration (NaN for the first
        guess): near 0 while ``mask_change`` is not, the mask only flickers at its
        edges.
    change : float
        RMS over valid pixels of (new - previous background) / rms.
    error : float
        RMS statistical error of this background in units of its RMS, when the
        estimator reports one (``SmoothResult.error``), else NaN.
    scale : float or None
        Smoothing length in pixels, when the estimator reports one.
    asymmetry : float
        Upper-to-lower tail ratio of (background - a stiffer fit), when measured
        (see ``IterativeBackground.source_asymmetry``), else NaN.
    tracking : float
        Correlation of (background - a stiffer fit) with the masked share, when
        measured (see ``IterativeBackground.source_tracking``), else NaN.
    min_scale : float or None
        Smoothing floor in pixels this fit was held to (None: GCV's choice alone).
    model : BackgroundModel
        The estimator's result for this iteration. A tiled fit keeps, of the models
        it will no longer read, only what their maps need
        (:func:`~skymap.background.model.maps_only`: a thin-plate model without its
        per-cell data).
    packed_mask : ndarray of uint8 or None
        The mask, bit-packed (None for a tiled fit, which keeps only the last mask).
    shape : (int, int)
        The image's shape.
    """

    stage: int
    iteration: int
    mask_fraction: float
    mask_change: float
    change: float
    scale: float | None
    mask_growth: float = float("nan")
    error: float = float("nan")
    asymmetry: float = float("nan")
    tracking: float = float("nan")
    min_scale: float | None = None
    model: Any = field(repr=False)
    packed_mask: np.ndarray | None = field(repr=False)
    shape: tuple[int, int]
    normalisation: Normalisation | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        """The scalar fields, for tables and JSON."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("model", "packed_mask", "shape", "normalisation")
        }

    @property
    def background(self) -> np.ndarray:
        """Background map of this iteration, in the image's units (the model's are
        the normalised ones)."""
        bkg = self.model.background_map()
        return bkg if self.normalisation is None else self.normalisation.undo(bkg)

    @property
    def rms(self) -> np.ndarray:
        """RMS map of this iteration, in the image's units."""
        rms = self.model.rms_map()
        return rms if self.normalisation is None else self.normalisation.undo(rms, offset=False)

    @property
    def mask(self) -> np.ndarray:
        """Mask (True = excluded) this iteration's background was fitted with.

        Raises
        ------
        ValueError
            For an iteration of a tiled fit, which keeps no masks but the last.
        """
        if self.packed_mask is None:
            raise ValueError("a tiled fit keeps no iteration's mask; see BackgroundResult.mask")
        n = self.shape[0] * self.shape[1]
        return np.unpackbits(self.packed_mask, count=n).astype(bool).reshape(self.shape)


@dataclass(frozen=True, kw_only=True, eq=False)
class BackgroundResult:
    """What :meth:`IterativeBackground.fit` (and :func:`fit`) found.

    Attributes
    ----------
    background : ndarray (ny, nx)
        Final background, in the input's float dtype.
    rms : ndarray (ny, nx)
        Its RMS (pixel noise), interpolated on first access (a property).
    mask : ndarray of bool
        Everything the final fit excluded: ``bad_mask | source_mask``.
    source_mask : ndarray of bool
        The final detections (a property).
    bad_mask : ndarray of bool
        The given mask OR non-finite pixels.
    history : tuple of IterationRecord
        Every iteration, first guess included.
    config : IterativeBackground
        The configuration that made this result.
    noise : float
        Median of the final RMS.
    tiles : TileLayout or None
        For a tiled fit: the tile shape, the chunks and the largest halo read.
    converged : bool
        Whether an iteration of the last stage met the tolerances
        (:meth:`IterativeBackground.settled`: the background moved by less than
        ``change_tol`` or ``error_tol`` times its statistical error, and the mask
        settled) within ``max_iter``, or the stage stopped a runaway mask by going
        back to the state before it. False means the last background may still be
        moving by more than the data can vouch for (a
        :class:`~skymap.background.convergence.ConvergenceWarning` was emitted).
    convergence_note : str
        Why the fit stopped, in words: settled (after how many iterations, by how
        much the background still moved), backed off a runaway mask (which state it
        went back to), or stopped at the iteration cap (what still moved).
    stop : str
        How the last stage stopped, in one word of
        :data:`skymap.background.convergence.STOPS` ("" for a result made otherwise):
        ``backed_off`` is converged, but the stage did not settle on its own, so a
        program need not read the note to tell.
    max_source_size : float or None
        The size in pixels separating sources from sky that the fit used
        (``IterativeBackground.max_source_size`` resolved; None: no such floor).
    frame : (slice, slice) or None
        Where the image's excluded pixels fill whole edge rows or columns (a blank
        border), the (rows, cols) bounding box of the valid pixels that the fit ran on
        (``IterativeBackground.blank_frame``): ``history``, ``model`` and the records'
        maps are in that frame, ``background`` and ``rms`` are padded out from its
        edges. None: the whole image.
    pedestal : float
        In the image's units, what ``background`` was lowered by below the final
        model's map (``IterativeBackground.wing_pedestal``; 0 when off or when no
        profile fell): ``model`` and the records' maps do not include it.
    """

    background: np.ndarray
    mask: np.ndarray
    bad_mask: np.ndarray
    history: tuple
    config: IterativeBackground
    noise: float
    converged: bool
    lazy_rms: Any = field(default=None, repr=False)
    tiles: Any = None
    normalisation: Normalisation | None = field(default=None, repr=False)
    inputs: ImageInput | None = field(default=None, repr=False)

    def __post_init__(self):
        # Units in, units out: a Quantity when the image had a unit.
        if self.inputs is not None and self.inputs.unit is not None:
            object.__setattr__(self, "background", self.inputs.wrap(self.background))

    convergence_note: str = ""
    stop: str = ""
    max_source_size: float | None = None
    frame: tuple | None = None
    pedestal: float = 0.0

    @cached_property
    def rms(self) -> np.ndarray:
        """Background RMS map (input dtype and unit), interpolated on first access (a
        lazy dask array for a tiled fit)."""
        if self.lazy_rms is not None:
            return self.lazy_rms if self.inputs is None else self.inputs.wrap(self.lazy_rms)
        rms = np.asarray(self.history[-1].model.rms_map(), dtype=self.background.dtype)
        if self.normalisation is not None:
            rms = self.normalisation.undo(rms, offset=False)
        return rms if self.inputs is None else self.inputs.wrap(rms)

    @property
    def unit(self):
        """The image's unit (None for a unitless image)."""
        return None if self.inputs is None else self.inputs.unit

    @property
    def wcs(self):
        """The image's WCS (NDData/CCDData input), else None."""
        return None if self.inputs is None else self.inputs.wcs

    def as_nddata(self, which: str = "background"):
        """``background`` or ``rms`` as a CCDData (for CCDData input) or NDData, with
        the image's unit, WCS and meta."""
        check_choice("which", which, ("background", "rms"))
        values = np.asarray(getattr(self, which))
        return (self.inputs or ImageInput(data=values)).as_nddata(values)

    @cached_property
    def source_mask(self) -> np.ndarray:
        """The final detections: ``mask & ~bad_mask``."""
        return self.mask & ~self.bad_mask

    @property
    def model(self) -> Any:
        """The final estimator result (mesh grid, smoothing, GCV scores, ...)."""
        return self.history[-1].model

    @property
    def scale(self) -> float | None:
        """Final smoothing length in pixels, when the estimator reports one."""
        return self.history[-1].scale

    @cached_property
    def table(self):
        """The convergence history as an astropy Table (one row per iteration)."""
        from astropy.table import Table

        return Table(rows=[r.to_dict() for r in self.history])
