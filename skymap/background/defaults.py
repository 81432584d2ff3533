"""The automatic default: :func:`default_pipeline`, the :class:`IterativeBackground
<skymap.background.pipeline.IterativeBackground>` that :func:`fit` runs, and the names
of its options.

Thin-plate smoothing of masked cell means (:mod:`skymap.smooth`) whose smoothing length
GCV chooses at every refit, and :class:`HysteresisMasker` s whose thresholds are in
units of the measured noise after smoothing, so nothing in it is a pixel number tuned
to one scene.
"""

from __future__ import annotations

import inspect
from typing import Any

from skymap._validate import as_image, as_mask, check_bool
from skymap.background.pipeline import BackgroundResult, IterativeBackground, Stage
from skymap.background.smooth import ThinPlateSmoother
from skymap.masking.bright import HaloMasker
from skymap.masking.hysteresis import HysteresisMasker
from skymap.masking.wings import WingMasker

__all__ = ["check_options", "default_pipeline", "fit", "pipeline_options"]


def default_pipeline(
    image=None,
    mask=None,
    *,
    high: float = 4.0,
    low: float = 2.0,
    max_iter: int = 8,
    change_tol: float = 0.01,
    mask_tol: float = 0.005,
    error_tol: float = 0.5,
    source_asymmetry: float | None = None,
    source_tracking: float | None = 0.25,
    tracking_inflation: float | None = None,
    tracking_stiffen: float | None = 2.0,
    tracking_cap: float = 0.125,
    tracking_scale: float | None = 2.0,
    cell_size: Any = None,
    gcv_inflation: float = ThinPlateSmoother.gcv_inflation,
    max_source_size: Any = "auto",
    halos: bool = True,
    wings: bool = False,
    wing_pedestal: bool = True,
    blank_fills: bool = True,
    blank_frame: bool = False,
) -> IterativeBackground:
    """The default :class:`IterativeBackground`: nothing in it is a pixel number tuned
    to one scene, so it needs no image.

    Stages are numbered as in :attr:`BackgroundResult.history`, the progress bar and
    the report: -1 is the first guess, 0 and 1 the masking stages, 2 the final refit.

    * First guess: a thin-plate smooth of the whole image with the smoothing chosen by
      GCV (:class:`~skymap.smooth.ThinPlateSmoother`).
    * Stage 0 masks the obvious sources: scales of 2 and 4 px (computed on binned
      images, so cheap), high thresholds; two iterations are enough, as stage 1
      remasks from scratch with the 1-px scale too.
    * Stage 1 masks deep: scales 1-8 px, seeds at 4 sigma of the smoothed noise after
      the surround subtraction, grown over the plain smoothed residual down to 2 sigma.
    * Before the first guess, bright sources and their halos are masked for the whole
      fit (``halos=True``, :class:`~skymap.masking.HaloMasker`): sources far above the
      noise, saturated or with a flagged core, out to where the halo profile measured
      on the image's brightest sources falls below 0.5 sigma.
    * Final refit with the converged mask: GCV's smoothing, stiffened if needed until
      the residual is white in blocks twice the largest masking scale (16 px), so the
      background does not follow the noise on the scales of the sources it masked.
      The result is then lowered by the pedestal of source light the fit took in
      (``wing_pedestal=True``): the level below it of the free pixels beyond the
      distance out to which the stacked residual profile around the detections still
      falls (:func:`~skymap.masking.wings.wing_pedestal`, one number for the frame).
    * ``max_source_size`` (pixels; default ``"auto"``) says how large an object may be
      and still count as a source rather than sky. Every smoothing length (first guess,
      refits, final) is held at or above half of it, so the background follows what is
      broader and never bends round what is smaller (a masked hole of that size is
      bridged). The default is measured from the image at fit time
      (:func:`skymap.background.scale.source_scale`): the larger of 8 PSF FWHM (from
      the half-maximum areas of isolated bright peaks), twice the 90th-percentile
      diameter of the sources above 5 sigma, and 16 px, at most an eighth of the
      longer side of the valid pixels' bounding box. The value used is
      ``BackgroundResult.max_source_size``; pass a smaller one to follow finer sky
      structure (a nebula), a larger one to keep larger galaxies out, None for GCV's
      choice alone. A size given in pixels is
      held: the tracking test below raises the floor past a measured size only.
    * A stage stops when its mask has settled and the background moved by less than
      0.01 of its RMS or half its own statistical error (``error_tol=0.5``), or after
      8 iterations (in stage 1, not counting those that raised the smoothing floor:
      the tracking test below); or when its mask runs away (grows for 3 iterations while the
      background keeps moving, not slowing by 0.7 per iteration): it then goes back
      to the state before the run (:mod:`skymap.background.convergence`).
      ``BackgroundResult.convergence_note`` says which, in words; a fit that stops
      at its cap emits a :class:`ConvergenceWarning`.
    * ``source_tracking=0.25`` replaces the ``source_asymmetry`` stiffening (off by
      default now): after every stage refit, it asks whether the background departs
      from a fit 8 times stiffer in step with where the masks are
      (:func:`skymap.background.tracking.source_tracking`, a correlation). Sky does
      not know where the sources are: higher there, the fit follows source light whose
      reach ``max_source_size`` underestimated; lower, it bends into holes it should
      bridge. Either way, above 0.25 in size (and above its noise), the smoothing floor
      is doubled, refit after refit while that lasts, up to an eighth of the shorter
      side of the valid pixels' bounding box (``tracking_cap``; a blank border does
      not count), or up to half a ``max_source_size`` given in
      pixels. The notebook's, a nebula's, a crowded field's and a detector's skies
      stay below it (-0.02 to 0.17 on the scenes); galaxy outskirts, intracluster
      light and halo wings pass it (0.3-0.5), as do all eight shared real images
      (0.29-0.66, the Galactic-centre MIPS frame at -0.41). Unlike the asymmetry
      test it does not assume that the sky's bumps and dips balance
      (``benchmarks/README.md`` has the injection and scene figures). Where sources
      cluster on a nebula (or the masker eats its knots), masks and sky correlate
      too; the test then sees the unmasked data depart from the stiffer fit by more
      than the noise both above and below it (source light only adds) and does not
      stiffen (``TrackingTest.sky``). Once it has
      found the fit higher where the masks are, the last stage's masker also matches
      a scale twice its largest (``tracking_scale=2``: sigma 16 px), which reaches
      the faint wings the fit was following; not on a frame whose shorter side is
      under 320 px (2.5 times that scale over ``tracking_cap``), where the holes it
      cuts are more than the fit can bridge.
    * A stage whose masked share grows and shrinks by turns (a limit cycle, three
      iterations in a row) keeps what the last two masks both hold and stops there.
      One whose mask has settled but whose background change stopped shrinking
      inside its statistical error (pixels at the thresholds flicker) stops as
      converged too (:func:`skymap.background.convergence.stalled`), as does one
      whose background moved by less than its tolerance twice in a row while its
      mask still crept into faint outskirts (:func:`~skymap.background.convergence.creeping`),
      and one whose small change (within 3 tolerances) stopped shrinking over three
      iterations while its masked share stayed on a plateau, the flicker floor
      (:func:`~skymap.background.convergence.flickering`).
      A stage whose new mask changed in under ``mask_tol`` of the pixels stops
      without refitting: the next stage or the final refit uses that mask
      (``IterativeBackground.refit_settled``).

    Every refit chooses its smoothing length by GCV on the masked image, above the
    floor, so the smoothing follows the data's structure scale and shrinks as the masks
    remove the sources that GCV would otherwise try to follow. Thresholds are in units of the noise
    after smoothing, so they carry over between images of any noise level; the cell
    size follows the image size at fit time.

    Parameters
    ----------
    image, mask : optional
        Accepted for the callers of 0.1, which passed the image: it is only validated.
    high, low : float
        Final hysteresis thresholds in smoothed-noise sigma (stage 1 uses ``high + 1``
        and ``low + 0.5``).
    max_iter, change_tol, mask_tol, error_tol, source_asymmetry, max_source_size
        As for :class:`IterativeBackground` (``source_asymmetry=None`` switches the
        stiffening off; ``max_source_size``: pixels, ``"auto"`` or None).
    source_tracking, tracking_inflation, tracking_stiffen, tracking_cap, tracking_scale
        As for :class:`IterativeBackground` (``source_tracking=None`` switches the
        test off).
    cell_size, gcv_inflation
        As for :class:`~skymap.smooth.ThinPlateSmoother` (``cell_size=None``: from the
        image size at fit time).
    halos : bool
        Mask bright sources and their halos (:class:`~skymap.masking.HaloMasker`)
        before the first guess; False: no halo masking.
    wings : bool
        Add a third masking stage (:class:`~skymap.masking.wings.WingMasker`) that grows
        the detections into the faint light around and between them, out to where the
        stacked distance profile of the residual stops falling, down to 1 sigma of the
        noise smoothed at 4 px. Where no profile falls (sparse sources, pure sky) it
        adds nothing; a runaway in it backs off to where stage 1 ended. For deep and
        confusion-limited fields: on the held-out deep scenes 0.30 / 0.21 / 0.30 -> 0.10
        / 0.09 / 0.11 sigma, the crowded star fields 0.23 / 0.06 / 0.35 -> 0.23 / 0.06 /
        0.24 and the cluster scenes 0.11 / 0.22 / 0.11 -> 0.08 / 0.18 / 0.07, but on a
        star cluster with diffuse light (M6707HH) the injection score worsens (0.42 ->
        0.65 over 3 trials), so it is off by default (``benchmarks/README.md``, seventh
        and eighth waves).
    wing_pedestal : bool
        Lower the final background by the pedestal of source light it took in
        (:attr:`IterativeBackground.wing_pedestal`): on the held-out deep fields 0.31 /
        0.21 / 0.28 -> 0.16 / 0.09 / 0.13 sigma RMS; 0 where no residual profile falls
        around the detections (``benchmarks/README.md``, ninth wave). False: the fit as
        the last refit left it.
    blank_fills : bool
        Exclude exactly constant fills touching the image's edge, as drizzled or
        reprojected frames leave them (:attr:`IterativeBackground.blank_fills`).
    blank_frame : bool
        Fit within the valid pixels' bounding box when blank borders exclude whole
        edge rows or columns (:attr:`IterativeBackground.blank_frame`).

    Examples
    --------
    >>> pipe = default_pipeline(high=5.0)
    >>> len(pipe.stages), pipe.stages[-1].masker.scales, pipe.stages[-1].masker.high
    (2, (1.0, 2.0, 4.0, 8.0), 5.0)
    >>> deep = default_pipeline(wings=True)
    >>> len(deep.stages), type(deep.stages[-1].masker).__name__
    (3, 'WingMasker')
    """
    if image is not None:
        img = as_image(image)
        as_mask(mask, img.shape)
    # the pipeline checks its own switches (blank_fills, blank_frame); these two only
    # choose its parts here
    check_bool("halos", halos)
    check_bool("wings", wings)
    high, low = float(high), float(low)
    scales = (1.0, 2.0, 4.0, 8.0)
    smoother_options = {"cell_size": cell_size, "gcv_inflation": gcv_inflation}
    smoother = ThinPlateSmoother(**smoother_options)
    stages = (
        Stage(
            masker=HysteresisMasker(scales=(2.0, 4.0), high=high + 1.0, low=low + 0.5),
            estimator=smoother,
            max_iter=2,
        ),
        Stage(
            masker=HysteresisMasker(scales=scales, high=high, low=low, grow_plain=True),
            estimator=smoother,
        ),
    )
    if wings:
        stages += (
            Stage(
                masker=WingMasker(scales=scales, high=high, low=low, grow_plain=True),
                estimator=smoother,
            ),
        )
    final = ThinPlateSmoother(**smoother_options, protect_scale=2.0 * max(scales))
    return IterativeBackground(
        first_guess=smoother,
        stages=stages,
        final=final,
        max_iter=max_iter,
        change_tol=change_tol,
        mask_tol=mask_tol,
        error_tol=error_tol,
        source_asymmetry=source_asymmetry,
        source_tracking=source_tracking,
        tracking_inflation=tracking_inflation,
        tracking_stiffen=tracking_stiffen,
        tracking_cap=tracking_cap,
        tracking_scale=tracking_scale,
        max_source_size=max_source_size,
        halos=HaloMasker() if halos else None,
        blank_fills=blank_fills,
        blank_frame=blank_frame,
        wing_pedestal=wing_pedestal,
    )


def pipeline_options() -> tuple[str, ...]:
    """The names of the options :func:`default_pipeline` (and :func:`fit`) accept."""
    params = inspect.signature(default_pipeline).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def check_options(options) -> None:
    """ValueError naming any of ``options`` that :func:`default_pipeline` does not take."""
    known = set(pipeline_options())
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}; accepted: {sorted(known)}")


def fit(
    image,
    mask=None,
    *,
    error=None,
    weight=None,
    callback=None,
    tile=None,
    client=None,
    **options,
) -> BackgroundResult:
    """Fit the background of ``image`` with the default pipeline.

    Parameters
    ----------
    image : array_like, MaskedArray, Quantity, NDData, CCDData, dask array or memory map
        (ny, nx). Integer input becomes float32; float32 stays float32. The image's own
        mask is ORed with ``mask``; its unit is carried to ``background`` and ``rms``
        (as Quantities: ``image - result.background`` works for arrays, Quantities and
        CCDData; :meth:`BackgroundResult.as_nddata` gives a CCDData/NDData with the
        WCS); an NDData uncertainty is read as ``error``. A dask array or a memory map
        of a file is fitted tile by tile (:class:`~skymap.backends.dask.DaskBackend`),
        with the same result, its maps as lazy dask arrays.
    mask : array_like of bool, optional
        True = excluded. NaN and inf pixels are excluded automatically.
    error, weight : array_like or Quantity, optional
        1 sigma per pixel, or inverse variance (drizzle WHT, inverted JWST VAR_*); at
        most one. The maskers then threshold in units of this map, times the noise
        excess they measure (correlated noise), and the smoother weights its cells by
        it. Zero weight or a non-finite error excludes the pixel; negative values
        raise ValueError. A dask array or memory map is read tile by tile (with a
        tiled image; the result equals the in-memory fit). Where the depth varies,
        the smoothing penalty follows it (:meth:`ThinPlateSmoother.fit
        <skymap.background.smooth.ThinPlateSmoother.fit>`): on a half 4x noisier
        than the other, both halves are more accurate than without the map (noisy
        0.024 -> 0.020 sigma, deep 0.077 -> 0.029, ``benchmarks/README.md``).
    callback : callable, optional
        Called with each :class:`IterationRecord` as the fit makes it (progress).
    tile, client : optional
        Tile shape and dask scheduler of a tiled fit (either one makes the fit tiled);
        see :meth:`IterativeBackground.backend_for`.
    **options
        Passed to :func:`default_pipeline`.

    Returns
    -------
    BackgroundResult

    Examples
    --------
    >>> import numpy as np
    >>> from skymap.quality.simulate import notebook_scene
    >>> scene = notebook_scene(shrink_factor=8)
    >>> res = fit(scene.image)
    >>> err = np.sqrt(np.mean((res.background - scene.sky) ** 2)) / scene.noise_sigma
    >>> bool(err < 0.2)
    True
    """
    check_options(options)
    pipe = default_pipeline(**options)
    return pipe.fit(
        image, mask, error=error, weight=weight, callback=callback, tile=tile, client=client
    )
