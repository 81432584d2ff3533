"""The iterative multi-scale background pipeline: :class:`IterativeBackground` and its
:class:`Stage` s.

An :class:`IterativeBackground` starts from a first guess (a thin-plate smooth of the
whole image, a coarse mesh or a ring median), then runs its :class:`Stage` s in order.
Each stage masks sources in ``image - background`` with its masker and refits the
background with its estimator on the unmasked pixels, and repeats until the mask has
settled and the background moves by less than a tolerance in units of the background
RMS, or by less than its own statistical error, or its iteration cap is hit; the masks
go deeper from stage to stage. A fit found following source light (higher than a
stiffer fit where the masks are: :mod:`skymap.background.tracking`) is held stiffer
from then on. An optional final estimator refits once with the converged mask.

Every iteration is kept in :attr:`BackgroundResult.history` as an
:class:`IterationRecord` (background, rms, mask, mask fraction, change); the maps are
rebuilt on access from compact forms, so a long history costs little memory.

The automatic default, :func:`~skymap.background.defaults.fit` and
:func:`~skymap.background.defaults.default_pipeline`, lives in
:mod:`skymap.background.defaults`; its names are also reachable from here, as before.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, is_dataclass, replace
from typing import Any

import numpy as np

from skymap._inputs import blank_fill, edge_fill_values, read_image, valid_frame
from skymap._util import check_int, concurrently, pow2_at_most
from skymap._validate import check_bool, check_positive, check_range
from skymap.backends.base import (
    CHANGE_STEP,
    ArrayBackend,
    BinnedStepMasker,
    Tileable,
)
from skymap.backends.dask import DaskBackend, is_tiled_input
from skymap.backends.memory import MemoryBackend
from skymap.background import convergence as _conv
from skymap.background.cells import merged_sums
from skymap.background.cells import valid_counts as pixel_counts
from skymap.background.convergence import ConvergenceWarning
from skymap.background.model import (
    BackgroundEstimator,
    BackgroundModel,
    as_driven,
    maps_only,
)
from skymap.background.noise import NoiseModel, use_error
from skymap.background.result import BackgroundResult, IterationRecord
from skymap.background.ring import RingMedianGuess
from skymap.background.scale import central_window, smoothing_floor, source_scale
from skymap.background.scale import max_source_size as _resolve_size
from skymap.background.tracking import source_tracking
from skymap.masking.bright import HaloMasker
from skymap.masking.halo_tiles import find_tiled
from skymap.masking.maskers import Masker
from skymap.masking.wings import PEDESTAL_BLOCK, pedestal_codes, pedestal_of, residual_sums

__all__ = [
    "BackgroundEstimator",
    "BackgroundModel",
    "BackgroundResult",
    "ConvergenceWarning",
    "IterationRecord",
    "IterativeBackground",
    "RingMedianGuess",
    "Stage",
]

log = logging.getLogger(__name__)

#: The coarser matched scale that ``tracking_scale`` adds is used only where the
#: longest smoothing the fit may reach (``tracking_cap`` of the valid frame's shorter
#: side) is at least this many times that scale (sigma). A detection at that scale,
#: grown to the low threshold, spans about five sigma, and a thin-plate fit bridges a
#: hole up to twice its length (``max_source_size`` and its floor of half of it). On a
#: smaller frame the coarse scale's holes are more than the fit can bridge: they leave
#: too little sky between them, and on 200-256 px cutouts of the shared images the
#: masks ran away in most injected fits.
COARSE_FLOOR = 2.5


def _exclude_blank(inputs):
    """``inputs`` with the image's blank fills (:func:`skymap._inputs.blank_fill`)
    ORed into its mask."""
    blank = blank_fill(inputs.data, inputs.mask)
    if blank is None:
        return inputs
    log.info(
        "excluding %d pixels of exactly constant fill touching the image's edge "
        "(blank_fills=True)",
        int(np.count_nonzero(blank)),
    )
    return replace(inputs, mask=blank if inputs.mask is None else inputs.mask | blank)


def _warn_edge_fills(image, mask) -> None:
    """A tiled image does not look for blank fills: warn when its edges hold runs of
    one value, which may be one."""
    # A memory map's top and bottom rows only: reading down its sides would make the
    # file resident in the driver, whose memory must not grow with the image.
    values = edge_fill_values(image, mask, sides=not isinstance(image, np.memmap))
    if values:
        warnings.warn(
            f"the image's edges hold runs of the constant value(s) {values}: a tiled fit "
            "does not exclude blank fills; pass them as mask= if they are one",
            UserWarning,
            stacklevel=4,
        )


# --------------------------------------------------------------------------- pipeline


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One scale of the pipeline: a masker and a background estimator.

    Parameters
    ----------
    masker : Masker
        Finds the sources in the residual (:class:`~skymap.masking.Masker`:
        ``(residual, rms, mask) -> detections``).
    estimator : BackgroundEstimator
        Refits the background with the mask
        (:class:`~skymap.background.model.BackgroundEstimator`: ``fit(image, mask) ->``
        :class:`~skymap.background.model.BackgroundModel`).
    max_iter : int or None
        Iteration cap of this stage; None: the pipeline's ``max_iter``.
    """

    masker: Masker
    estimator: BackgroundEstimator
    max_iter: int | None = None

    def __post_init__(self):
        check_int("max_iter", self.max_iter, allow_none=True)
        if not callable(self.masker):
            raise ValueError(f"masker must be a Masker (callable), got {self.masker!r}")
        if not callable(getattr(self.estimator, "fit", None)):
            raise ValueError(
                f"estimator must have a fit(image, mask) method, got {self.estimator!r}"
            )


@dataclass(frozen=True, kw_only=True)
class IterativeBackground:
    """First guess, then stages of (mask, refit), each iterated to convergence.

    Parameters
    ----------
    first_guess : BackgroundEstimator
        Fitted to the image with only the given mask: a stiff
        :class:`~skymap.smooth.ThinPlateSmoother`, a coarse
        :class:`~skymap.mesh.MeshBackground`, or a :class:`RingMedianGuess`.
    stages : sequence of Stage
        Run in order; usually the smoothing shrinks and the masks deepen.
    final : BackgroundEstimator or None
        Refitted once with the last stage's converged mask, without masking again: the
        place for a smoothing that must not feed back into the masks (a stiffer one
        would let the masks creep into sky it does not follow).
    max_iter : int
        Iteration cap per stage (a raised smoothing floor, see ``source_asymmetry``,
        does not restart the count). In every stage after the first (and in a single
        one), an iteration that raised the floor (``source_tracking``) does not count:
        the estimator changed and the mask gets its iterations at the new floor; each
        raise at least doubles the floor up to its cap, so raises are few (at most 4-5
        on a 1-4 Mpix frame).
    change_tol : float
        A stage has converged when the background moved by less than this RMS (in
        units of the background RMS), or by less than ``error_tol`` times its own
        statistical error if that is larger ...
    mask_tol : float
        ... and the mask has settled: fewer than this share of the pixels changed mask
        state, or the masked share grew or shrank by less than this (a plateau, where
        pixels at the thresholds only flip back and forth). The default, 0.5%, is
        where a further iteration no longer moves the background measurably: on the
        crowded 4096x4096 field, the iteration after a 0.4% mask change moved it by
        0.0008 of its RMS; on the benchmark scenes 0.5% instead of 0.2% changed the
        RMS error by at most 0.0006 sigma (detector_artifacts improved, 0.053 to 0.047)
        and saved one full masking pass on most of them.
    error_tol : float
        See ``change_tol``. The statistical error is the RMS error the pixel noise
        leaves in the fitted background (``SmoothResult.error``, in units of the
        background RMS; estimators that do not report one use ``change_tol`` alone): a
        change well inside it is one the data cannot tell from none, however many
        iterations are run. 0 switches it off.
    source_asymmetry : float or None
        In the last stage, after each refit by a
        :class:`~skymap.smooth.ThinPlateSmoother`, the upper-to-lower tail ratio of
        (background - a fit ``stiffen`` times longer) is measured
        (:meth:`~skymap.smooth.SmoothResult.asymmetry`). Sky structure gives as many
        dips as bumps; a ratio above this means the background is following source
        light left unmasked (faint extended wings), which only ever raises it. The
        smoothing is then held at least ``stiffen`` times longer for the rest of the
        stage and the final refit, so that the wings stay in the residual and get
        masked. None switches it off.
    stiffen : float
        See ``source_asymmetry``.
    source_tracking : float or None
        After each stage refit by a :class:`~skymap.smooth.ThinPlateSmoother`, the
        correlation between where the background departs from a fit 8 times longer
        and where the masks are is measured
        (:func:`skymap.background.tracking.source_tracking`). Sky structure does not
        know where the sources are. A background higher where the masks are follows
        source light left unmasked (faint outskirts, wings, halos, intracluster
        light): the sources reach further than ``max_source_size`` said; one lower
        there bends into masked holes it should bridge. When the correlation's size
        is above this value (and above 3 over the square root of the number of
        independent patches), the smoothing floor is raised to
        ``tracking_stiffen`` times the fit's length (at most ``tracking_cap`` of
        the shorter side, and never past the floor of a ``max_source_size`` given in
        pixels), after every refit that finds it, and that iteration does not
        count as settled; with ``tracking_inflation``, GCV also counts the fit's
        degrees of freedom that many times from then on. Each record carries the
        correlation (``IterationRecord.tracking``). None: never measured. Nothing
        is raised when the unmasked data depart from the stiffer fit by more than
        the pixel noise both above and below it (``TrackingTest.sky``): sky
        structure, on which sources may cluster, not source light, which only adds.
        A mask eating a broad sky bump can read as tracking too (the fit under it
        stays above the stiffer one); the runaway back-off still applies then.
    tracking_stiffen, tracking_inflation : float or None
        See ``source_tracking``; None leaves the floor, or GCV's inflation, as it
        is.
    tracking_cap : float
        The longest floor the tracking test may raise, as a share of the image's
        shorter side (default an eighth; of the valid pixels' bounding box, so that a
        blank border of NaN, masked or fill pixels changes nothing). A smaller cap
        keeps the background free to follow sky structure narrower than that, where
        the masks sit in structured sky; a larger one keeps more of the faint
        outskirts out. Which is right depends on the image: :func:`skymap.tune` tries
        a sixteenth.
    tracking_scale : float or None
        Once the tracking test has found the fit higher where the masks are (a
        positive correlation: source light left unmasked), the last stage's masker (a
        dataclass with ``scales``, such as :class:`~skymap.masking.HysteresisMasker`)
        also matches a scale this many times its largest. The light the fit was following
        lies in wings too faint per pixel for the finer scales; a coarser matched
        filter reaches it, as the noise it leaves falls with the area it averages. A
        fit the test never flags, or finds only lower where the masks are (bending
        into holes), is masked exactly as before, and so is one whose longest floor
        (``tracking_cap`` of the valid frame's shorter side) is under
        :data:`COARSE_FLOOR` times the coarse scale: the holes that scale cuts would
        be more than the fit can bridge. None: the scales stay as given.
    max_source_size : float, "auto" or None
        How large (in pixels) an object may be and still count as a source rather than
        sky. The thin-plate smoothers' smoothing length is held at or above half of it
        (GCV chooses only above that floor; the first guess and the final refit too):
        a Gaussian bump of this FWHM is followed by at most about a third of its
        height, one four times broader by more than 90%, and masked holes up to this
        size are bridged, never bent round. ``"auto"`` measures it from the image
        (:func:`skymap.background.scale.source_scale`: 8 PSF FWHM, twice the
        90th-percentile size of the sources above 5 sigma, at least 16 px and at most
        an eighth of the valid pixels' longer side), an estimate that
        ``source_tracking`` may find too small and raise; a size given in pixels is the
        caller's definition of sky and no test raises the floor past its half; None
        sets no floor.
    halos : Masker or None
        Applied once, to the image itself (``halos(image, None, mask)``) before the
        first guess, such as :class:`~skymap.masking.HaloMasker`: its detections
        (bright sources and their halos) stay masked for the whole fit. A bright
        star's halo is measured best on the image, before any background has had a
        chance to follow part of it.
    refit_settled : bool
        A stage whose mask changed in fewer than ``mask_tol`` of the pixels since its
        previous iteration (from its second on, and unless that one raised the
        smoothing floor) stops there, settled, without the refit, when a later step
        takes over (the next stage, which masks afresh from this background, or
        ``final``, which refits with that mask): a refit would move the background by
        less than the tolerance (see ``mask_tol``), and the record keeps the previous
        background (change 0). On
        the 4096x4096 crowded field this saves one refit, its background map and
        its checks (~0.1 s of ~2.2 s). True refits anyway.
    blank_fills : bool
        Exclude, like NaN, the exactly constant fills that drizzled, reprojected and
        mosaicked frames leave where no input covered them (often exact 0): regions of
        one value touching the image's edge, of 100 pixels or more, at or below the
        sky, whose value is rare elsewhere (:func:`skymap._inputs.blank_fill`). They
        are in ``BackgroundResult.bad_mask``. A sky with noise is never exactly
        constant over so many pixels; a fill left in drags the background down
        around it (a rotated frame's corner wedges of 0 on ``M6707HH.fits``: 5.3
        sigma RMS, ``benchmarks/README.md``, fifth wave). A tiled fit of a dask array
        or memory map only warns when its edges hold such runs (pass them as
        ``mask=``). False: no detection.
    blank_frame : bool
        Where fills (with ``blank_fills``), NaN or the given mask exclude whole edge
        rows or columns, fit in memory on the bounding box of the valid pixels, so
        that a blank border changes nothing: the cell grid, the measured scales and
        the normalisation see the data alone (:attr:`BackgroundResult.frame` says
        where; the history is in that frame). Off by default: on the MIPS frame,
        whose fill is a border, the halo masker's result swings with the grid's
        offset (``benchmarks/README.md``, fifth wave).
    wing_pedestal : bool
        Lower the final background by the pedestal of source light it took in: the
        level below it of the free pixels beyond the distance out to which the stacked
        profile of the residual around the detections still falls
        (:func:`~skymap.masking.wings.wing_pedestal`; one number for the frame, 0
        where no profile falls; :attr:`BackgroundResult.pedestal`). Source light
        falls off with distance from its source, sky does not know where the sources
        are: the free pixels near the detections hold the wings of detected sources
        and the light of undetected ones, which a fit through all the free pixels
        follows. On deep and crowded fields this is most of the error that masking
        leaves (``benchmarks/README.md``, ninth wave).

    Examples
    --------
    >>> from skymap.background.smooth import ThinPlateSmoother
    >>> from skymap.masking.hysteresis import HysteresisMasker
    >>> rng = np.random.default_rng(3)
    >>> img = 10 + rng.normal(size=(128, 128))
    >>> img[60:64, 60:64] += 50
    >>> pipe = IterativeBackground(
    ...     first_guess=ThinPlateSmoother(smoothing_range=(1e6, 1e16)),
    ...     stages=(Stage(masker=HysteresisMasker(), estimator=ThinPlateSmoother()),))
    >>> res = pipe.fit(img)
    >>> bool(res.source_mask[61, 61]), bool(abs(res.background[61, 61] - 10) < 0.2)
    (True, True)
    """

    first_guess: BackgroundEstimator
    stages: Sequence[Stage]
    final: BackgroundEstimator | None = None
    max_iter: int = 5
    change_tol: float = 0.01
    mask_tol: float = 0.005
    error_tol: float = 0.5
    source_asymmetry: float | None = None
    stiffen: float = 4.0
    source_tracking: float | None = None
    tracking_inflation: float | None = None
    tracking_stiffen: float | None = 2.0
    tracking_cap: float = 0.125
    tracking_scale: float | None = None
    max_source_size: Any = None
    halos: Any = None
    refit_settled: bool = False
    blank_fills: bool = False
    blank_frame: bool = False
    wing_pedestal: bool = False

    def __post_init__(self):
        if not callable(getattr(self.first_guess, "fit", None)):
            raise ValueError(
                f"first_guess must have a fit(image, mask) method, got {self.first_guess!r}"
            )
        stages = tuple(self.stages)
        if not stages:
            raise ValueError("stages must hold at least one Stage")
        for i, st in enumerate(stages):
            if not isinstance(st, Stage):
                raise ValueError(f"stages[{i}] must be a Stage, got {st!r}")
        object.__setattr__(self, "stages", stages)
        if self.final is not None and not callable(getattr(self.final, "fit", None)):
            raise ValueError(
                f"final must be None or have a fit(image, mask) method, got {self.final!r}"
            )
        check_int("max_iter", self.max_iter)
        check_positive("change_tol", self.change_tol, allow_zero=True)
        check_positive("mask_tol", self.mask_tol, allow_zero=True)
        check_positive("error_tol", self.error_tol, allow_zero=True)
        check_positive("source_asymmetry", self.source_asymmetry, allow_none=True)
        if self.source_asymmetry is not None and self.source_asymmetry <= 1:
            raise ValueError(
                f"source_asymmetry must be None or > 1, got {self.source_asymmetry!r}"
            )
        if not self.stiffen > 1:
            raise ValueError(f"stiffen must be > 1, got {self.stiffen!r}")
        if self.source_tracking is not None:
            check_range("source_tracking", self.source_tracking, 0.0, 1.0)
        check_positive("tracking_inflation", self.tracking_inflation, allow_none=True)
        _check_factor("tracking_stiffen", self.tracking_stiffen)
        check_range("tracking_cap", self.tracking_cap, 0.0, 1.0)
        if not float(self.tracking_cap) > 0:
            raise ValueError(f"tracking_cap must be in (0, 1], got {self.tracking_cap!r}")
        _check_factor("tracking_scale", self.tracking_scale)
        if not (isinstance(self.max_source_size, str) and self.max_source_size == "auto"):
            _resolve_size(self.max_source_size)  # raises, naming max_source_size
        for name in ("refit_settled", "blank_fills", "blank_frame", "wing_pedestal"):
            check_bool(name, getattr(self, name))
        if self.halos is not None and not callable(self.halos):
            raise ValueError(f"halos must be None or a Masker (callable), got {self.halos!r}")

    def fit(
        self,
        image,
        mask=None,
        *,
        callback: Callable[[IterationRecord], Any] | None = None,
        tile: int | tuple[int, int] | None = None,
        client: Any = None,
        backend: ArrayBackend | None = None,
        error: Any = None,
        weight: Any = None,
    ) -> BackgroundResult:
        """Fit the background of ``image`` (y, x), ignoring ``mask`` (True = excluded).

        The loop runs on a normalised copy, ``(image - level) / scale``
        (:class:`~skymap._inputs.Normalisation`), so that the result scales exactly
        with the input; the result's maps are in the input's units, the history's
        models in the normalised ones.

        Parameters
        ----------
        image : array_like, MaskedArray, Quantity, NDData or CCDData (ny, nx)
            The image (ignored when ``backend`` is given, which holds it). Its own
            mask is ORed with ``mask``, its unit carried to the outputs, an NDData
            uncertainty read as ``error`` (:func:`skymap._inputs.read_image`).
        mask : array_like of bool, optional
            True = excluded; NaN and inf pixels are excluded automatically.
        error, weight : array_like or Quantity, optional
            1 sigma per pixel, or inverse variance; at most one. For a tiled fit either may
            be a dask array or a memory map, read tile by tile.
            The maskers threshold in units of this map (times the noise excess they
            measure) and thin-plate smoothers weight their cells by it. Zero weight or
            a non-finite error excludes the pixel.
        callback : callable, optional
            Called with each :class:`IterationRecord` as it is made (the first guess,
            every iteration, the final refit): progress reports.
        tile, client : optional
            For the tiled back end (see :meth:`backend_for`).
        backend : ArrayBackend, optional
            Where the pixels live (:mod:`skymap.backends`); default
            :meth:`backend_for` on ``image`` and ``mask``.

        Raises
        ------
        ValueError
            For a non-2-D image, a mask, error or weight of another shape, negative
            errors or weights, units that do not convert, or no valid pixel.
        """
        inputs = None
        noisy = error is not None or weight is not None
        if backend is not None:
            if noisy:
                raise ValueError(
                    "error and weight go to the back end when backend= is given "
                    "(MemoryBackend(..., error=), DaskBackend(..., error=/weight=))"
                )
            be = backend
        elif is_tiled_input(image):
            if self.blank_fills:
                _warn_edge_fills(image, mask)
            be = self.backend_for(
                image, mask, tile=tile, client=client, error=error, weight=weight
            )
        else:
            # astropy inputs are read here for either back end, so that their masks,
            # units and uncertainties count with tile= or client= too
            inputs = read_image(image, mask, error=error, weight=weight)
            if self.blank_fills:
                inputs = _exclude_blank(inputs)
            if self.blank_frame and tile is None and client is None:
                frame = valid_frame(inputs.data, inputs.mask)
                if frame is not None:
                    return self._fit_frame(inputs, frame, callback)
            if tile is None and client is None:
                be = MemoryBackend(inputs.data, inputs.mask, error=inputs.error)
            else:
                be = self.backend_for(
                    inputs.data, inputs.mask, tile=tile, client=client, error=inputs.error
                )
            inputs = replace(inputs, error=None)
        norm = be.normalise()
        masker_noise = None
        if be.error is not None:
            masker_noise = use_error(be, norm)
        record = functools.partial(_record, norm=norm)
        noise_model = NoiseModel.for_maskers(st.masker for st in self.stages)
        history: list[IterationRecord] = []
        # A tiled fit's history keeps no masks: the last two recorded ones (a limit
        # cycle keeps what both hold) and those of the states a runaway could back off
        # to (_conv.Landings) are kept here.
        masks = collections.deque(maxlen=2)
        landings = _conv.Landings(self)
        # Nor, on tiles, the per-cell data of the models the fit will not read again:
        # they grow with the image (a 16384^2 fit's thin-plate model of 512^2 cells
        # holds 12 MB, 4 MB of them its maps' grids) and stayed in the driver.
        whole: set[int] = set()

        def keep(record: IterationRecord, mask=None) -> IterationRecord:
            """Append ``record`` (and, on tiles, the ``mask`` it was made with)."""
            history.append(record)
            if be.tiled and mask is not None:
                masks.append(mask)
                landings.add(history, mask)
            if be.tiled:
                # The last record's model is the one the next steps read (tracking,
                # asymmetry, a refit's start); a back-off's landing becomes that again.
                whole.add(len(history) - 1)
                for i in whole - set(landings.masks) - {len(history) - 1}:
                    history[i] = replace(history[i], model=maps_only(history[i].model))
                    whole.discard(i)
            if callback is not None:
                callback(record)
            return record

        def restate(model, previous, mask, k, it, rec, floor):
            """Record a state the stage stops in (a back-off, a resolved cycle): its
            background and working noise, its change from ``previous``."""
            bkg = be.background(model, deferred=deferrable(k))
            noise = noise_model.working(model, be)
            change = be.change(bkg, model, previous, noise, NoiseModel)
            flips, count, kept = be.mask_stats(mask)
            keep(record(be, k, it, model, count, kept, change, flips / be.size, rec,
                        floor=floor), mask)  # fmt: skip
            return bkg, noise

        # The sources' sizes are measured before the halo disks hide the largest of
        # them: a bright galaxy is a source however the halo masker treats it.
        # Sizes taken as shares of the frame (the tracking cap, the largest measured
        # source size) are shares of the valid pixels' bounding box: a 64-px NaN border
        # round M6707HH raised the cap from 132 to 148 px and moved the fit by 0.13
        # sigma RMS.
        extent = be.valid_extent()
        size = self.source_size(be, extent)
        if self.halos is not None:
            # Not beside the size measurement: each holds several maps at once, and
            # side by side they raised the 4096^2 fit's peak memory from 3.8 to 4.1
            # times the image (benchmarks/README.md, fifteenth wave).
            _exclude_halos(be, self.halos)
        # Smoothing floor in pixels: half the largest source size, raised (never
        # lowered) when the last stage's fit is found following source light.
        floor = None if size is None else smoothing_floor(size)
        longest = self._longest_floor(floor, extent, size)
        model = _fit(be, self.first_guess, be.bad, None, floor)
        # Maps the loop reads only through the next residual and the change are
        # deferred: all but one that may become the result.
        bkg = be.background(model, deferred=True)
        noise = noise_model.working(model, be)
        current = be.bad
        _, count, kept = be.mask_stats(current)
        keep(record(be, -1, 0, model, count, kept, None, None, floor=floor), current)
        converged, note, stop = False, "", ""
        last = len(self.stages) - 1

        def deferrable(k):
            # stage k's map may become the result only in the last stage, with no
            # final refit after it
            return k < last or self.final is not None

        # Whether the fit was found following source light (``source_tracking``), and
        # the valid pixels per cell that the check reads, per cell size.
        stiff, valid_counts = False, {}
        # Whether the test has found the fit higher where the masks are (the last
        # stage's masker then reaches further: ``tracking_scale``).
        tracked = False
        for k, stage in enumerate(self.stages):
            converged = False
            full = self._full(k)
            cap = self.max_iter if stage.max_iter is None else stage.max_iter
            it = done = 0
            raised = False  # whether the last iteration raised the smoothing floor
            start = len(history)
            if be.tiled:  # a back-off goes no further than the state the stage starts from
                landings.start(start - 1, current)
            while done < cap:
                # Only the residual is kept through the masking (memory): the previous
                # background is rebuilt from its model for the change, and the previous
                # mask is in the history, bit-packed, for the mask change (it goes
                # before the residual is made).
                del current
                resid = be.residual(bkg)
                del bkg
                new = be.mask(
                    self._masker(stage.masker, tracked and full, longest),
                    resid,
                    noise if masker_noise is None else masker_noise,
                    NoiseModel.window,
                )
                del resid, noise
                flips, count, kept = be.mask_stats(new)
                if it > 0 and not raised and self._skips_refit(k == last, flips / be.size):
                    rec = keep(record(be, k, it, model, count, kept, 0.0, flips / be.size,
                                      history[-1], floor=floor), new)  # fmt: skip
                    noise = noise_model.working(model, be)
                    bkg = be.background(model, deferred=True) if k < last else None
                    current = new
                    del new
                    converged, note = True, _conv.note_mask_settled(k, it + 1, rec, self)
                    stop = "mask_settled"
                    break
                previous = model
                model = _fit(
                    be, self._estimator(stage.estimator, stiff), new, history[-1].scale, floor
                )
                bkg = be.background(model, deferred=deferrable(k))
                noise = noise_model.working(model, be)
                measure = functools.partial(be.change, bkg, model, previous, noise, NoiseModel)
                test = None
                if self.source_tracking is None:
                    change = measure()
                elif be.tiled:
                    change = measure()
                    test = self._check_tracking(be, model, valid_counts)
                else:
                    # Independent reads of the refit: side by side in memory, the change
                    # (its subsampled maps) on this thread: memory a pool thread frees
                    # stays with that thread's heap, out of this one's reach.
                    test, change = concurrently(
                        functools.partial(self._check_tracking, be, model, valid_counts), measure
                    )
                del previous, measure
                asymmetry, raised, tracking = float("nan"), False, float("nan")
                if k == last and self.source_asymmetry is not None:
                    asymmetry, floor, raised = self._check_asymmetry(model, floor)
                if test is not None:
                    tracking = test.correlation
                    if test.tracking:
                        # Higher where the masks are: unmasked source light, which
                        # a coarser scale can mask (lower: it bends into holes).
                        tracked = tracked or test.correlation > 0
                        floor, raised, stiff = self._stiffen(model, floor, stiff, longest)
                rec = keep(
                    record(
                        be,
                        k,
                        it,
                        model,
                        count,
                        kept,
                        change,
                        flips / be.size,
                        history[-1],
                        asymmetry=asymmetry,
                        tracking=tracking,
                        floor=floor,
                    ),  # fmt: skip
                    new,
                )
                log.debug(
                    "stage %d iteration %d: change %.4g (error %.4g), mask change %.4g "
                    "(growth %+.4g), mask %.3f, asymmetry %.3g, tracking %.3g, floor %s",
                    k,
                    it,
                    change,
                    rec.error,
                    rec.mask_change,
                    rec.mask_growth,
                    rec.mask_fraction,
                    asymmetry,
                    tracking,
                    floor,
                )
                current = new
                del new
                it += 1
                # In a full stage, an iteration that raised the floor does not count
                # towards the cap: the estimator changed, and the mask needs its
                # iterations at the new floor. Raises are few (each at least doubles the
                # floor, up to its cap). An earlier stage is a first pass whose mask the
                # next one remakes: its cap stands.
                done += 0 if raised and full else 1
                if not raised and self.settled(rec):
                    converged = True
                    note, stop = _conv.note_converged(k, it, rec, self), "settled"
                    break
                if not raised and _conv.stalled(self, history[start:]):
                    converged = True
                    note, stop = _conv.note_stalled(k, it, history[start:]), "stalled"
                    break
                if not raised and _conv.creeping(self, history[start:]):
                    converged = True
                    note, stop = _conv.note_creeping(k, it, history[start:], self), "creeping"
                    break
                if not raised and _conv.flickering(self, history[start:]):
                    converged = True
                    note, stop = _conv.note_flicker(k, it, history[start:]), "flicker"
                    break
                if _conv.cycling(self, history[start:]):
                    # A limit cycle: the mask flips between two states. Keep what
                    # both masked (what they agree is source) and refit once.
                    other = masks[-2] if be.tiled else be.result(history[-2].mask)
                    current = current & other
                    del bkg
                    est = self._estimator(stage.estimator, stiff)
                    model, previous = _fit(be, est, current, rec.scale, floor), model
                    bkg, noise = restate(model, previous, current, k, it, rec, floor)
                    del previous
                    note = _conv.note_cycle(k, history[-_conv.CYCLE_RUN - 2 : -1], self)
                    stop = "cycle"
                    converged = not _conv.wild_cycle(self, history[-2])
                    break
                if _conv.runaway(self, history[start:]):
                    # Back off to the state before the growth began, the last in which
                    # mask and background agreed, and stop the stage there.
                    run = history[start - 1 :]
                    j = _conv.run_start(self, run)
                    back = run[j]
                    note, stop = _conv.note_backed_off(k, run[j + 1 :], back), "backed_off"
                    current = landings[start - 1 + j] if be.tiled else be.result(back.mask)
                    del bkg
                    previous, model, floor = model, back.model, back.min_scale
                    bkg, noise = restate(model, previous, current, k, it, rec, floor)
                    del previous
                    converged = True
                    break
            else:
                note, stop = _conv.note_stopped(k, cap, history[-1], self, it), "cap"
        typical = NoiseModel.typical(noise, be)
        del noise
        if self.final is not None:
            # The previous background is rebuilt from its model for the change (memory).
            del bkg
            previous = model
            model = _fit(be, self._estimator(self.final, stiff), current, history[-1].scale, floor)
            bkg = be.background(model)
            change = be.change(bkg, model, previous, noise_model.working(model, be), NoiseModel)
            rec = history[-1]
            keep(
                record(
                    be,
                    len(self.stages),
                    0,
                    model,
                    None,
                    rec.packed_mask,
                    change,
                    0.0,
                    rec,
                    floor=floor,
                )  # fmt: skip
            )
        reuse = getattr(model, "new_maps", False)
        pedestal = self._pedestal(be, bkg, current) if self.wing_pedestal else 0.0
        lowered = pedestal if pedestal > 0 else 0.0
        lazy_rms = be.result_rms(model)
        if not converged:
            warnings.warn(note, ConvergenceWarning, stacklevel=2)
        return BackgroundResult(
            # A map made for this call alone becomes the result (memory).
            # The pedestal comes off in the same pass (in the map's dtype).
            background=be.result(norm.undo(bkg, reuse=reuse, minus=lowered)),
            mask=be.result(current),
            bad_mask=be.result(be.given_bad),
            history=tuple(history),
            config=self,
            noise=float(typical) * norm.scale,
            converged=converged,
            lazy_rms=None if lazy_rms is None else norm.undo(lazy_rms, offset=False),
            tiles=be.layout() if be.tiled else None,
            normalisation=norm,
            inputs=None if inputs is None else replace(inputs, data=None, mask=None),
            convergence_note=note,
            stop=stop,
            max_source_size=size,
            pedestal=pedestal * norm.scale,
        )

    def source_size(self, backend: ArrayBackend, extent=None) -> float | None:
        """``max_source_size`` in pixels for the image ``backend`` holds: "auto" is
        measured on its central window (:func:`~skymap.background.scale.source_scale`),
        the same pixels whatever the back end, and bounded by the frame ``extent``
        (default: the image's shape; the fit passes its valid pixels' bounding box)."""
        value = self.max_source_size
        if not (isinstance(value, str) and value == "auto"):
            return _resolve_size(value)
        win = central_window(backend.shape)
        image = np.asarray(backend.image[win])
        bad = np.asarray(backend.bad[win])
        frame = backend.shape if extent is None else extent
        return source_scale(image, bad, frame).max_source_size

    def _fit_frame(self, inputs, frame, callback) -> BackgroundResult:
        """The fit of ``inputs`` within ``frame`` (the valid pixels' bounding box),
        its maps padded back to the full image with their edge values (every pixel
        outside is excluded)."""
        sub = replace(self, blank_fills=False, blank_frame=False).fit(
            inputs.data[frame],
            None if inputs.mask is None else inputs.mask[frame],
            error=None if inputs.error is None else inputs.error[frame],
            callback=callback,
        )
        shape = inputs.data.shape
        pads = tuple((sl.start, n - sl.stop) for sl, n in zip(frame, shape, strict=True))
        return BackgroundResult(
            background=np.pad(sub.background, pads, mode="edge"),
            mask=np.pad(sub.mask, pads, constant_values=True),
            bad_mask=np.pad(sub.bad_mask, pads, constant_values=True),
            history=sub.history,
            config=self,
            noise=sub.noise,
            converged=sub.converged,
            lazy_rms=np.pad(sub.rms, pads, mode="edge"),
            normalisation=sub.normalisation,
            inputs=replace(inputs, data=None, mask=None, error=None),
            convergence_note=sub.convergence_note,
            stop=sub.stop,
            max_source_size=sub.max_source_size,
            frame=frame,
            pedestal=sub.pedestal,
        )

    def backend_for(
        self, image, mask=None, *, tile=None, client=None, error=None, weight=None
    ) -> ArrayBackend:
        """The back end for ``image``: tiles (:class:`~skymap.backends.dask.DaskBackend`)
        for a dask array or a memory-mapped file, or when ``tile`` or ``client`` is
        given; else in memory (:class:`~skymap.backends.memory.MemoryBackend`).

        Parameters
        ----------
        image, mask
            As for :meth:`fit`.
        tile : int or (int, int), optional
            Approximate tile shape in pixels (default 1024), rounded down (not below)
            to a multiple of :meth:`tile_unit`.
        client : optional
            A ``distributed.Client`` (or any dask scheduler) to run the tiles on;
            default dask's current scheduler.
        error, weight : optional
            As for :meth:`fit` (a dask array or memory map stays lazy in the tiled
            back end, whose tiles then also align to the error's noise blocks).
        """
        if tile is None and client is None and not is_tiled_input(image):
            inputs = read_image(image, mask, error=error, weight=weight)
            return MemoryBackend(inputs.data, inputs.mask, error=inputs.error)
        shape = tuple(getattr(image, "shape", np.shape(image)))
        unit = self.tile_unit(shape) if len(shape) == 2 else (2, 2)
        tile = 1024 if tile is None else tile
        return DaskBackend(
            image, mask, tile=tile, unit=unit, client=client, error=error, weight=weight
        )

    def tile_unit(self, shape) -> tuple[int, int]:
        """Alignment unit per axis of the tiles for an image of ``shape``: the least
        common multiple of :data:`~skymap.backends.base.CHANGE_STEP` (the change's
        subsample) and every piece's :meth:`~skymap.backends.base.Tileable.tile_unit`
        (cells, binning blocks)."""
        units = (CHANGE_STEP, CHANGE_STEP)
        pieces = [self.first_guess, self.final]
        for st in self.stages:
            pieces += [st.masker, st.estimator]
        # the maskers as the tracking test may extend them
        pieces += [
            self._masker(st.masker, True) for k, st in enumerate(self.stages) if self._full(k)
        ]
        if self.wing_pedestal:
            b = pow2_at_most(PEDESTAL_BLOCK, *shape)
            units = (math.lcm(units[0], b), math.lcm(units[1], b))
        for piece in pieces:
            if isinstance(piece, Tileable):
                units = tuple(map(math.lcm, units, piece.tile_unit(shape)))
            elif isinstance(piece, BinnedStepMasker):
                units = tuple(math.lcm(u, int(piece.block(shape))) for u in units)
        return units

    def settled(self, rec: IterationRecord) -> bool:
        """Whether the iteration ``rec`` meets the tolerances (see ``change_tol``): a
        stage stops at the first that does, and the fit has converged if its last
        stage did (:func:`skymap.background.convergence.settled`)."""
        return _conv.settled(self, rec)

    def _skips_refit(self, last: bool, mask_change: float) -> bool:
        """Whether a stage iteration whose mask changed in a share ``mask_change`` of
        the pixels stops without a refit (``refit_settled``; the caller checks that it
        is not the stage's first and that the previous one raised no floor, which a
        refit must follow): its mask has settled, so a refit with it would move the
        background by less than the tolerance (``mask_tol``), and a later fit uses it
        (the next stage's, or ``final``). Not in a last stage whose refits the
        asymmetry check reads."""
        if self.refit_settled or mask_change > self.mask_tol:
            return False
        if last:
            return self.final is not None and self.source_asymmetry is None
        return True

    def _estimator(self, estimator, stiff: bool):
        """``estimator``, its GCV inflation raised to ``tracking_inflation`` when the
        fit was found following source light (estimators without one: as they are)."""
        inflation = getattr(estimator, "gcv_inflation", None)
        target = self.tracking_inflation
        if not stiff or inflation is None or target is None or inflation >= target:
            return estimator
        return replace(estimator, gcv_inflation=target)

    def _pedestal(self, be: ArrayBackend, bkg: Any, current: Any) -> float:
        """The final background's :func:`~skymap.masking.wings.wing_pedestal` (in the
        normalised units; :func:`~skymap.masking.wings.pedestal_of`), from the block
        sums of its residual with the final mask ``current`` excluded (per tile on a
        tiled back end: the tiles align to the block, :meth:`tile_unit`). The last
        reader of the back end's image, which it lets go."""
        b = pow2_at_most(PEDESTAL_BLOCK, *be.shape)
        # the halo masker's sources are in ``bad`` for the loop, but are detections here
        arrays = [be.image, bkg, current, be.given_bad]
        # The sums stay where they are made, read a band at a time: on tiles the
        # driver holds the blocks' codes (a byte per 16 pixels), not the sums (1.5
        # bytes a pixel, 1 x a 16384^2 image with the profile's maps).
        digest = functools.partial(pedestal_codes, shape=be.shape, b=b)
        codes, read, rows = be.cell_grid_bands(
            residual_sums, arrays, (b, b), 3, digest, band_layers=2, b=b
        )
        del arrays
        # The normalised image goes before the profile's maps are made: with it they
        # would set the fit's memory peak (4096^2: 3.7 -> 4.4 x the image).
        with contextlib.suppress(AttributeError):
            be.image = None
        pedestal = pedestal_of(codes, read, rows, b=b)
        log.debug("wing pedestal %.4g (normalised units)", pedestal)
        return pedestal

    def _full(self, k: int) -> bool:
        """Whether stage ``k`` is a full masking stage: any after the first pass, or
        the only one. Its floor raises do not count towards its cap, and its masker
        gets ``tracking_scale`` once the fit is found following source light."""
        return k > 0 or k == len(self.stages) - 1

    def _masker(self, masker, coarser: bool, longest: float | None = None):
        """``masker``, with a scale ``tracking_scale`` times its largest added when
        ``coarser`` (the fit was found following source light) and the ``longest``
        smoothing the fit may reach (pixels; None: no limit) is at least
        :data:`COARSE_FLOOR` times that scale; maskers that are not dataclasses with
        ``scales``: as they are."""
        scales = getattr(masker, "scales", None)
        if not coarser or self.tracking_scale is None or not scales or not is_dataclass(masker):
            return masker
        coarse = self.tracking_scale * max(scales)
        if longest is not None and longest < COARSE_FLOOR * coarse:
            return masker
        return replace(masker, scales=(*scales, coarse))

    def _longest_floor(self, floor, extent, size) -> float | None:
        """The longest smoothing floor the fit may reach, in pixels: the tracking
        test's cap (``tracking_cap`` of the shorter side of ``extent``, at most the
        ceiling of a ``max_source_size`` given in pixels), or the starting ``floor`` if
        longer; the starting ``floor`` when the test raises none."""
        if self.source_tracking is None or self.tracking_stiffen is None:
            return floor
        cap = min(extent) * self.tracking_cap
        ceiling = self._ceiling(size)
        if ceiling is not None:
            cap = min(cap, ceiling)
        return cap if floor is None else max(floor, cap)

    def _ceiling(self, size) -> float | None:
        """The longest floor the tracking test may raise to, in pixels, beyond
        ``tracking_cap``: the floor of a ``max_source_size`` given in pixels
        (:func:`~skymap.background.scale.smoothing_floor`), None for ``"auto"`` or None.
        A measured size is an estimate that the test may find too small; a stated one
        is the caller's definition of what is sky."""
        value = self.max_source_size
        if size is None or value is None or isinstance(value, str):
            return None
        return smoothing_floor(size)

    def _stiffen(self, model, floor, stiff, longest):
        """(floor, raised, stiff) after a refit found following source light: the
        smoothing floor raised to ``tracking_stiffen`` times the fit's length, at most
        to ``longest`` (:meth:`_longest_floor`), and GCV's inflation switched to
        ``tracking_inflation`` for the rest of the fit."""
        raised = False
        if self.tracking_inflation is not None and not stiff:
            stiff = raised = True
        if self.tracking_stiffen is not None:
            # The sources' light reaches further than their measured size.
            longer = min(self.tracking_stiffen * model.scale, longest)
            if floor is None or longer > floor * 1.01:
                floor, raised = longer, True
        return floor, raised, stiff

    def _check_tracking(self, backend, model, valid_counts: dict):
        """:func:`~skymap.background.tracking.source_tracking` of a stage refit (None for
        an estimator without thin-plate cells). ``valid_counts`` keeps each cell size's
        count of valid pixels per cell: they depend on the given mask only, so the image
        is binned for them once per cell size, not at every refit."""
        if not hasattr(model, "cell_pixels") or getattr(model, "smoothing", None) is None:
            return None
        cells = tuple(model.cell_size)
        if cells not in valid_counts:
            # Binned as the fit was (coarser cells are sums of those: tiles align to them)
            binned = tuple(getattr(model, "binned_cells", None) or cells)
            counts = backend.cell_grid(pixel_counts, [backend.given_bad], binned, 1, cells=binned)
            valid_counts[cells] = merged_sums(counts, cells[0] // binned[0])[0]
        valid = valid_counts[cells]
        return source_tracking(model, valid, floor=self.source_tracking)

    def _check_asymmetry(self, model, floor):
        """(asymmetry, new floor, whether it was raised) after a last-stage refit."""
        asymmetry = model.asymmetry(self.stiffen)
        if not asymmetry > self.source_asymmetry:
            return asymmetry, floor, False
        stiff = self.stiffen * model.scale
        # A fit already at the image's stiffest plane cannot be stiffened further.
        limit = 4.0 * max(model.shape)
        if stiff >= limit or (floor is not None and stiff <= floor):
            return asymmetry, floor, False
        return asymmetry, stiff, True


def _check_factor(name: str, value) -> None:
    """ValueError naming ``name`` unless ``value`` is None or a finite number > 1."""
    if value is None:
        return
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and value > 1):
        raise ValueError(f"{name} must be None or a finite number > 1, got {value!r}")


def _exclude_halos(backend, halos) -> None:
    """OR ``halos``' detections on the whole image into the back end's bad-pixel mask,
    so that every later fit and mask excludes them. On tiles, a
    :class:`~skymap.masking.HaloMasker` finds the sources and their profiles tile by
    tile (:func:`~skymap.masking.halo_tiles.find_tiled`: small tables in the driver)
    and paints the disks per tile; any other halo masker reads the gathered image."""
    if not backend.tiled:
        image, bad = backend.gather(backend.image), backend.gather(backend.bad)
        if isinstance(halos, HaloMasker) and type(halos).__call__ is HaloMasker.__call__:
            # The disks painted straight into a copy of the bad pixels (bad | disks:
            # what the masker's own map ORed with them makes, in one pass fewer).
            sources = halos.find(image, None, bad)
            new = halos.paint(sources, image.shape, into=np.array(bad, dtype=bool))
        else:
            new = bad | np.asarray(halos(image, None, bad), dtype=bool)
        backend.bad = new
        backend.nbad = int(np.count_nonzero(new))
        return
    if isinstance(halos, HaloMasker):
        sources = find_tiled(halos, backend)
    elif hasattr(halos, "find") and hasattr(halos, "paint"):
        sources = halos.find(backend.gather(backend.image), None, backend.gather(backend.bad))
    else:
        import dask.array as da

        det = halos(backend.gather(backend.image), None, backend.gather(backend.bad))
        new = backend.bad | da.from_array(np.asarray(det, dtype=bool), chunks=backend.chunks)
        sources = None
    if sources is not None:
        new = backend.map_tiles(_paint_tile, [backend.bad], halo=0, dtype=bool, halos=halos,
                                sources=sources, shape=backend.shape)  # fmt: skip
    if hasattr(backend, "persist_counted"):
        backend.bad, backend.nbad = backend.persist_counted(new)
    else:
        (backend.bad,) = backend.persist(new)
        backend.nbad = int(backend.compute(backend.bad.sum()))


def _paint_tile(bad, *, window, core, halos, sources, shape):
    """One tile of :func:`_exclude_halos`: the tile's bad pixels OR its halo disks."""
    (y0, y1), (x0, x1) = core
    (wy0, _), (wx0, _) = window
    return bad[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0] | halos.paint(
        sources, shape, (y0, y1), (x0, x1)
    )


def _fit(backend, estimator, mask, scale=None, floor=None) -> BackgroundModel:
    """``estimator`` fitted through ``backend`` with ``mask``, its search started at the
    previous smoothing length ``scale`` and held at or above ``floor`` (pixels)."""
    return backend.fit(as_driven(estimator), mask, start_scale=scale, min_scale=floor)


def _record(
    backend,
    stage,
    it,
    model,
    count,
    packed,
    change,
    mask_change,
    previous=None,
    *,
    asymmetry=float("nan"),
    tracking=float("nan"),
    floor=None,
    norm=None,
) -> IterationRecord:
    scale, error = model.scale, model.error
    fraction = previous.mask_fraction if count is None else float(count) / backend.size
    return IterationRecord(
        stage=stage,
        iteration=it,
        mask_fraction=fraction,
        mask_change=float("nan") if mask_change is None else mask_change,
        mask_growth=float("nan") if previous is None else fraction - previous.mask_fraction,
        change=float("nan") if change is None else change,
        error=float("nan") if error is None else float(error),
        scale=None if scale is None else float(scale),
        asymmetry=float(asymmetry),
        tracking=float(tracking),
        min_scale=None if floor is None else float(floor),
        model=model,
        packed_mask=packed,
        shape=tuple(backend.shape),
        normalisation=norm,
    )


#: Names that moved to :mod:`skymap.background.defaults`, still reachable from here
#: (imported on first use: that module imports this one).
_DEFAULTS = ("default_pipeline", "fit", "check_options", "pipeline_options")


def __getattr__(name: str):
    if name in _DEFAULTS:
        from skymap.background import defaults

        return getattr(defaults, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
