"""Injection-recovery: how well does a background method do on *this* real image?

A real image has no true sky, so its fit cannot be compared with one. What can be done
is to add a known signal to the real image, keeping its real noise, sources and
artefacts, fit the image with and without it, and measure what came back (as Blanton
et al. 2011 did with fake galaxies on SDSS, and Haigh et al. 2021 to tune SExtractor
and NoiseChisel):

* ``sky``: a smooth field, a gradient plus broad Gaussian bumps and dips, that the
  background must follow. ``track`` is the RMS over valid pixels of
  ``fit(image + sky) - fit(image) - sky``.
* ``galaxies``: faint extended exponential discs that the background must *not*
  follow. ``leak`` is the mean of ``fit(image + discs) - fit(image)`` under the discs
  (within two effective radii), ``leak_p95`` its 95th percentile.
* ``stars`` (optional): a bright star with a power-law halo, whose light must stay out
  of the background. ``halo`` is the mean rise of the background within the halo.
* ``deep`` (optional): a deep field's galaxy population (bright cores, wings under
  the noise), 0.25 sigma of light on the mean pixel, whose light the background must
  not absorb. ``deep`` is the mean rise of the background over the frame. The other
  scores are differences of two fits and cannot see a bias that both share; this one
  measures how much of the outskirts' light that every real image holds goes into its
  background.

Every amplitude and every score is in units of the image's pixel noise, measured
robustly from differences of neighbouring pixels (:func:`skymap.quality.evaluate.pixel_sigma`;
the sources and the sky structure cancel in the differences), so scores compare across
images. ``score`` is ``track + |leak| (+ |halo|) (+ |deep|)``.

:func:`injection_recovery` scores one method; :func:`compare` scores several on the same
injections and times them. The signals are made by :mod:`skymap.quality.signals`;
ready-made peers (photutils, SEP, NoiseChisel) are in
:mod:`skymap.quality.peers`.

References
----------
Blanton, M. R., et al. 2011, AJ 142, 31, "Improved background subtraction for the Sloan
Digital Sky Survey images", doi:10.1088/0004-6256/142/1/31

Haigh, C., et al. 2021, A&A 645, A107, "Optimising and comparing source-extraction
tools using objective segmentation quality criteria", doi:10.1051/0004-6361/201936561
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from skymap._inputs import blank_fill, read_image
from skymap._util import check_int
from skymap._validate import as_mask, check_choice, combine_masks
from skymap.background.convergence import BACKED_OFF
from skymap.quality.evaluate import pixel_sigma
from skymap.quality.signals import KINDS, MIN_SIZE, Injection, make_injections
from skymap.quality.structure import free_pixels, structure_left

__all__ = [
    "KINDS",
    "MIN_SIZE",
    "Injection",
    "InjectionResult",
    "Prepared",
    "as_method",
    "compare",
    "evaluate_method",
    "fit_background",
    "injection_recovery",
    "make_injections",
    "plot_comparison",
    "prepare",
    "results_table",
    "table_rows",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- methods


def _name_of(method: Any) -> str:
    if method is None:
        return "skymap"
    if isinstance(method, str | os.PathLike):
        return PurePath(method).name
    return getattr(method, "__name__", None) or type(method).__name__


def _load_method(path) -> Any:
    """A saved configuration, as ``skymap run --config`` reads it: a table with a
    ``type`` key is a configuration object, anything else options of :func:`skymap.fit`."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    if "type" not in data:
        return data
    # decoding configuration objects is the application layer's job; imported only
    # when a saved configuration object is given
    from skymap.app.config import from_dict

    return from_dict(data)


def as_method(method: Any = None) -> tuple[Callable[[np.ndarray, Any], Any], str]:
    """Turn anything :func:`injection_recovery` accepts as a method into
    ``(fn(image, mask) -> raw result, name)``.

    Parameters
    ----------
    method
        None (:func:`skymap.fit` with its defaults); a path to a TOML configuration
        (as ``skymap run --config`` reads: a configuration object or options of
        :func:`skymap.fit`); a mapping of :func:`skymap.fit` options; an object with
        ``fit(image, mask)`` (a skymap estimator or pipeline); or a callable
        ``(image, mask) -> background`` (an array, or anything with ``.background``).

    Examples
    --------
    >>> fn, name = as_method(lambda image, mask: np.zeros_like(image))
    >>> name
    '<lambda>'
    """
    name = _name_of(method)
    if isinstance(method, str | os.PathLike):
        try:
            method = _load_method(method)
        except Exception as err:
            raise ValueError(f"method {name!r}: cannot load this configuration: {err}") from err
    if method is None or isinstance(method, Mapping):
        from skymap.background.defaults import fit

        options = dict(method or {})
        return (lambda image, mask: fit(image, mask, **options)), name
    if callable(getattr(method, "fit", None)):
        return (lambda image, mask: method.fit(image, mask)), name
    if callable(method):
        return method, name
    raise ValueError(
        f"method must be None, a configuration path, a mapping of fit options, an object "
        f"with fit(image, mask) or a callable (image, mask) -> background; got {method!r}"
    )


def _settled(out: Any) -> bool:
    """Whether a fit stopped in a regular state, where its result says how it stopped
    (:class:`~skymap.background.result.BackgroundResult`): converged, and not by backing
    off a runaway mask (its ``stop``, or for results without one, its note). A result
    that does not say counts as settled."""
    if not getattr(out, "converged", True):
        return False
    stop = getattr(out, "stop", "")
    if stop:
        return stop != "backed_off"
    return BACKED_OFF not in str(getattr(out, "convergence_note", ""))


def _background(fn, name: str, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, bool]:
    """Run a method and check what it returns: a ValueError names the method. It gets
    copies: a method that writes into its input must not change the image (the
    caller's array) or the mask the next trial uses. Returns the background and whether
    the fit settled (:func:`_settled`)."""
    try:
        out = fn(image.copy(), mask.copy())
    except Exception as err:
        raise ValueError(f"method {name!r} failed: {type(err).__name__}: {err}") from err
    bkg = getattr(out, "background", out)
    try:
        bkg = np.asarray(bkg, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"method {name!r} did not return a background array: {err}") from err
    if bkg.shape != image.shape:
        raise ValueError(
            f"method {name!r} returned a background of shape {bkg.shape}, "
            f"expected the image's {image.shape}"
        )
    if not np.isfinite(bkg[~mask]).all():
        raise ValueError(f"method {name!r} returned non-finite background on valid pixels")
    return bkg, _settled(out)


# --------------------------------------------------------------------------- result


_SCORES = ("track", "leak", "leak_p95", "halo", "halo_p95", "deep", "score")


@dataclass(frozen=True, kw_only=True, eq=False)
class InjectionResult:
    """Scores of one method on one image, per trial, in units of the pixel noise.

    Attributes
    ----------
    method : str
        The method's name.
    noise_sigma : float
        The pixel noise the amplitudes and scores are in units of.
    kinds : tuple of str
        What was injected.
    seed : int
        Trial ``i`` used the injections of ``make_injections(..., seed=seed, trial=i)``.
    trials : dict
        ``{score name: array over trials}`` for ``track``, ``leak``, ``leak_p95``,
        ``halo``, ``halo_p95``, ``deep`` and ``score`` (NaN where the kind was not
        injected).
    seconds, cpu_seconds : float
        Mean wall-clock and CPU time (this process and its children) of one fit.
    unsettled : ndarray of int
        Per trial, how many fits of the injected images did not settle: stopped at
        their iteration cap, or backed off a runaway mask (for methods whose result
        says how it stopped, as :func:`skymap.fit`'s does; 0 for the others). Such a
        fit changed regime under the injection, and its score says more about that
        injection than about the method.
    maps : dict
        First trial's maps for :meth:`plot`, ``{kind: (injected, recovered)}`` with
        ``recovered = fit(image + injected) - fit(image)``, in sigma.
    structure : float
        What the scores cannot see (they cancel the fit of the image itself): the
        structure the method's fit of the image leaves in its residual over pixels no
        bright source reaches (:func:`skymap.quality.structure.structure_left`), in
        sigma. A method can win ``leak`` by not following the sky, and then leaves it
        here; faint source light under the cut counts too, so read it with ``leak``.
    """

    method: str
    noise_sigma: float
    kinds: tuple[str, ...]
    seed: int
    trials: dict = field(repr=False)
    seconds: float
    cpu_seconds: float
    unsettled: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, int))
    maps: dict = field(repr=False, default_factory=dict)
    structure: float = float("nan")

    @property
    def n_trials(self) -> int:
        return len(self.trials["score"])

    def values(self, name: str) -> np.ndarray:
        """A score per trial; NaN for a score ``trials`` does not hold (its kind was not
        injected, or the result was made before that score existed)."""
        v = self.trials.get(name)
        return np.full(self.n_trials, np.nan) if v is None else np.asarray(v, dtype=float)

    def mean(self, name: str) -> float:
        """Mean of a score over trials."""
        return float(np.mean(self.values(name)))

    def spread(self, name: str) -> float:
        """Standard deviation of a score across trials (0 for one trial)."""
        v = self.values(name)
        return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0

    @property
    def track(self) -> float:
        return self.mean("track")

    @property
    def leak(self) -> float:
        return self.mean("leak")

    @property
    def score(self) -> float:
        return self.mean("score")

    def to_dict(self) -> dict:
        """JSON-ready summary: means, spreads and per-trial values of every score."""
        scores = {
            name: {
                "mean": self.mean(name),
                "std": self.spread(name),
                "trials": [float(v) for v in self.values(name)],
            }
            for name in _SCORES
            if np.isfinite(self.values(name)).any()
        }
        return {
            "method": self.method,
            "noise_sigma": self.noise_sigma,
            "kinds": list(self.kinds),
            "seed": self.seed,
            "n_trials": self.n_trials,
            "seconds_per_fit": self.seconds,
            "cpu_seconds_per_fit": self.cpu_seconds,
            "unsettled": [int(v) for v in self.unsettled],
            "structure": self.structure,
            "scores": scores,
        }

    def to_table(self):
        """An astropy Table, one row per trial; the means are in ``meta``."""
        from astropy.table import Table

        cols = {"trial": np.arange(self.n_trials)}
        cols.update({k: np.asarray(v, dtype=float) for k, v in self.trials.items()})
        t = Table(cols)
        t.meta.update({k: v for k, v in self.to_dict().items() if k != "scores"})
        t.meta["means"] = {k: v["mean"] for k, v in self.to_dict()["scores"].items()}
        return t

    def plot(self, *, figsize=None):
        """Injected, recovered and error maps of the first trial, in sigma, one row per
        kind (error = recovered - injected for ``sky``, the recovered map itself for
        the kinds the background must not follow). Returns a matplotlib Figure (no
        pyplot state)."""
        from matplotlib.figure import Figure

        rows = [k for k in self.kinds if k in self.maps]
        fig = Figure(figsize=figsize or (11, 3.4 * max(1, len(rows))), layout="constrained")
        axes = fig.subplots(max(1, len(rows)), 3, squeeze=False)
        for ax_row, kind in zip(axes, rows, strict=False):
            injected, recovered = self.maps[kind]
            error = recovered - injected if kind == "sky" else recovered
            lim = max(np.nanpercentile(np.abs(injected), 99.5), 0.5)
            if kind == "stars":
                lim = 2.0
            elim = max(np.nanpercentile(np.abs(error), 99.5), 0.1)
            titles = (
                f"{kind}: injected",
                f"recovered ({self.method})",
                "recovered - injected" if kind == "sky" else "recovered (should be 0)",
            )
            for ax, arr, vmax, title in zip(
                ax_row, (injected, recovered, error), (lim, lim, elim), titles, strict=True
            ):
                im = ax.imshow(arr, origin="lower", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
                ax.set_title(title, fontsize=9)
                ax.set_xticks([])
                ax.set_yticks([])
                fig.colorbar(im, ax=ax, shrink=0.8, label="sigma")
        fig.suptitle(
            f"{self.method}: track {self.mean('track'):.3f}, leak {self.mean('leak'):+.3f}, "
            f"score {self.score:.3f} sigma ({self.n_trials} trials)"
            if rows
            else self.method,
            fontsize=10,
        )
        return fig


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True, kw_only=True, eq=False)
class Prepared:
    """An image checked and measured once for many injection runs (see :func:`prepare`):
    ``image`` (float), ``bad`` (True = excluded: the mask, non-finite pixels and blank
    fills), ``sigma`` (the unit of amplitudes and scores), ``kinds`` and ``free``, the
    pixels no bright source reaches (:func:`~skymap.quality.structure.free_pixels`)."""

    image: np.ndarray = field(repr=False)
    bad: np.ndarray = field(repr=False)
    sigma: float
    kinds: tuple[str, ...]
    free: np.ndarray = field(repr=False)


def prepare(image, *, mask=None, error=None, kinds=("sky", "galaxies")) -> Prepared:
    """Check ``image`` for injection runs and measure its noise (see
    :func:`injection_recovery` for the arguments)."""
    # arrays, MaskedArrays, Quantities, NDData/CCDData (mask ORed, uncertainty read)
    inp = read_image(image, mask, error=error)
    img, mask, error = inp.data, inp.mask, inp.error
    if min(img.shape) < MIN_SIZE:
        raise ValueError(
            f"image is too small for the injections: shape {img.shape}; both sides must be "
            f"at least {MIN_SIZE} pixels"
        )
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if not kinds:
        raise ValueError(f"kinds must name at least one of {KINDS}")
    for k in kinds:
        check_choice("kinds", k, KINDS)
    bad = combine_masks(img, as_mask(mask, img.shape))
    # A blank fill (exact 0 where a drizzled or reprojected frame had no data) holds no
    # sky to add a signal to: excluded like NaN for every method, so that the fits of
    # the image and of the image plus a signal see the same pixels.
    blank = blank_fill(img, bad)
    if blank is not None:
        bad |= blank
    if bad.all():
        raise ValueError("image has no valid pixel (all masked or non-finite)")
    if error is not None:
        err = np.asarray(error, dtype=np.float64)
        if err.shape != img.shape:
            raise ValueError(f"error must have the image's shape {img.shape}, got {err.shape}")
        ok = ~bad & np.isfinite(err) & (err > 0)
        if not ok.any():
            raise ValueError("error has no finite positive value on a valid pixel")
        sigma = float(np.median(err[ok]))
    else:
        sigma = pixel_sigma(img, bad)
    if not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"cannot measure the image's noise (pixel sigma {sigma!r})")
    free = free_pixels(img, bad, sigma)
    return Prepared(image=img, bad=bad, sigma=sigma, kinds=kinds, free=free)


def _check_trials(n_trials) -> int:
    return int(check_int("n_trials", n_trials))


def _timed(fn, name, image, mask, clock):
    """:func:`_background`, timed: appends ``(wall, cpu, settled)`` to ``clock``."""
    t0, c0 = time.perf_counter(), _cpu()
    bkg, settled = _background(fn, name, image, mask)
    clock.append((time.perf_counter() - t0, _cpu() - c0, settled))
    return bkg


def _cpu() -> float:
    t = os.times()  # this process's threads and finished children (NoiseChisel runs)
    return t.user + t.system + t.children_user + t.children_system


def _leak(delta, footprint, good, sigma):
    sel = footprint & good
    if not sel.any():
        return float("nan"), float("nan")
    v = delta[sel] / sigma
    return float(np.mean(v)), float(np.percentile(v, 95))


def fit_background(prep: Prepared, method: Any = None, *, name: str | None = None):
    """Fit ``prep.image`` once with ``method`` (anything :func:`as_method` accepts):
    returns ``(background, seconds)``, the background checked as in
    :func:`injection_recovery` (a ValueError names a failing method)."""
    fn, default_name = as_method(method)
    clock: list[tuple[float, float, bool]] = []
    bkg = _timed(fn, name or default_name, prep.image, prep.bad, clock)
    return bkg, clock[0][0]


def evaluate_method(
    prep: Prepared,
    method: Any = None,
    *,
    n_trials: int = 3,
    seed: int = 0,
    base: np.ndarray | None = None,
    keep_maps: bool = True,
    name: str | None = None,
    together: bool = False,
) -> tuple[InjectionResult, np.ndarray]:
    """:func:`injection_recovery` on a :class:`Prepared` image; also returns the fit of
    the image without injections, which a later call on other seeds can reuse as
    ``base`` (it is not timed again).

    ``together=True`` injects all kinds into one image per trial (one fit instead of
    one per kind, as :func:`~skymap.quality.tune.tune` does while choosing): ``track``
    is then scored away from the injected sources, and ``leak`` / ``halo`` after
    subtracting the injected sky. No maps are kept."""
    n_trials = _check_trials(n_trials)
    fn, default_name = as_method(method)
    name = name or default_name
    img, bad, sigma = prep.image, prep.bad, prep.sigma
    clock: list[tuple[float, float, bool]] = []
    if base is None:
        base = _timed(fn, name, img, bad, clock)
    structure = structure_left(img - base, prep.free, sigma)
    good = ~bad
    trials = {k: np.full(n_trials, np.nan) for k in _SCORES}
    unsettled = np.zeros(n_trials, dtype=int)
    maps = {}
    for t in range(n_trials):
        injections = make_injections(img.shape, sigma, kinds=prep.kinds, seed=seed, trial=t)
        for group in (
            [list(injections.values())] if together else [[v] for v in injections.values()]
        ):
            signal = sum(inj.signal for inj in group)
            injected = (img + signal.astype(img.dtype)).astype(img.dtype, copy=False)
            delta = _timed(fn, name, injected, bad, clock) - base
            unsettled[t] += not clock[-1][2]
            # what the background should have gained: the sky, not the sources
            sky = next((inj.signal for inj in group if inj.kind == "sky"), 0.0)
            sources = [inj.footprint for inj in group if inj.footprint is not None]
            for inj in group:
                if inj.kind == "sky":
                    # in a joint fit the sky is scored away from the injected sources
                    # (the deep population is everywhere: its absorbed light enters
                    # track there too)
                    sel = good & ~np.logical_or.reduce(sources) if sources else good
                    err = (delta - inj.signal)[sel] / sigma
                    trials["track"][t] = float(np.sqrt(np.mean(err**2)))
                elif inj.kind == "deep":
                    trials["deep"][t] = float(np.mean((delta - sky)[good]) / sigma)
                else:
                    key = "leak" if inj.kind == "galaxies" else "halo"
                    trials[key][t], trials[f"{key}_p95"][t] = _leak(
                        delta - sky, inj.footprint, good, sigma
                    )
                if t == 0 and keep_maps and not together:
                    inj_map = np.where(good, inj.signal / sigma, np.nan).astype(np.float32)
                    rec_map = np.where(good, delta / sigma, np.nan).astype(np.float32)
                    maps[inj.kind] = (inj_map, rec_map)
        parts = [trials["track"][t]] + [abs(trials[k][t]) for k in ("leak", "halo", "deep")]
        trials["score"][t] = float(np.nansum(parts))
    result = InjectionResult(
        method=name,
        noise_sigma=sigma,
        kinds=prep.kinds,
        seed=int(seed),
        trials=trials,
        seconds=float(np.mean([c[0] for c in clock])),
        cpu_seconds=float(np.mean([c[1] for c in clock])),
        unsettled=unsettled,
        maps=maps,
        structure=structure,
    )
    return result, base


def injection_recovery(
    image,
    method: Any = None,
    *,
    mask=None,
    error=None,
    kinds: Sequence[str] = ("sky", "galaxies"),
    n_trials: int = 3,
    seed: int = 0,
) -> InjectionResult:
    """Score a background method on a real image by injecting known signal into it.

    The image is fitted once as it is; then, for each trial and each kind, once with the
    kind's signal added. What the fit changed, ``fit(image + signal) - fit(image)``, is
    compared with what it should have changed: the whole signal for ``sky``, nothing
    for ``galaxies`` and ``stars``. See the module docstring for the injections.

    Parameters
    ----------
    image : array_like (ny, nx)
        The real image; both sides at least ``MIN_SIZE`` (64) pixels.
    method : optional
        None for :func:`skymap.fit` with its defaults; a path to a TOML configuration
        (what ``skymap run --config`` reads); a mapping of :func:`skymap.fit` options; a
        skymap estimator or pipeline object (anything with ``fit(image, mask)`` whose
        result has ``.background``); or a callable ``(image, mask) -> background``
        returning an array or an object with ``.background``. The mask handed to it is
        boolean, True = excluded (the given mask plus non-finite pixels).
    mask : array_like of bool, optional
        True = excluded, from the fits and the scores.
    error : array_like, optional
        Per-pixel noise sigma; its median over valid pixels is then the unit of the
        amplitudes and scores instead of the measured pixel noise.
    kinds : sequence of {"sky", "galaxies", "stars", "deep"}
        What to inject (each kind in its own fit).
    n_trials : int
        Independent placements; the spread across them is reported.
    seed : int
        Trial ``i`` uses ``make_injections(..., seed=seed, trial=i)``: the same seed
        gives the same injections for every method, and the same scores for a
        deterministic method.

    Returns
    -------
    InjectionResult

    Raises
    ------
    ValueError
        If the method raises or returns something that is not a finite background of
        the image's shape (the message names the method), if the image is smaller than
        ``MIN_SIZE`` on a side, or for an unknown kind.

    Notes
    -----
    Costs ``1 + n_trials * len(kinds)`` fits. The image's own sources stay in it, so a
    method that masks them badly is punished for it on every injection, as it would be
    on the real sky; an injected disc that falls on a bright star is scored like any
    other.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> img = 100 + rng.normal(size=(96, 96))
    >>> flat = lambda image, mask: np.full(image.shape, np.median(image[~mask]))
    >>> res = injection_recovery(img, flat, n_trials=1)
    >>> bool(res.trials["track"][0] > 0.5), round(res.noise_sigma, 1)
    (True, 1.0)
    """
    n_trials = _check_trials(n_trials)
    prep = prepare(image, mask=mask, error=error, kinds=kinds)
    return evaluate_method(prep, method, n_trials=n_trials, seed=int(seed))[0]


# --------------------------------------------------------------------------- compare


def _named(methods) -> dict[str, Any]:
    if isinstance(methods, Mapping):
        return dict(methods)
    out: dict[str, Any] = {}
    for m in methods:
        name = _name_of(m)
        key, i = name, 2
        while key in out:
            key, i = f"{name}_{i}", i + 1
        out[key] = m
    return out


def results_table(results: Mapping[str, InjectionResult | str], prep: Prepared, seed: int):
    """One row per method from ``{name: InjectionResult, or the reason it failed}``:
    the :func:`compare` table."""
    from astropy.table import Table

    scores = [s for s in _SCORES if s != "score"]
    rows = []
    for name, res in results.items():
        row: dict[str, Any] = {"method": name}
        if isinstance(res, InjectionResult):
            row["status"] = "ok"
            for k in (*scores, "score"):
                row[k], row[f"{k}_std"] = res.mean(k), res.spread(k)
            row["seconds"], row["cpu_seconds"] = res.seconds, res.cpu_seconds
            # fits that backed off a runaway or stopped at their cap: a score over
            # such fits says where each landed (InjectionResult.unsettled)
            row["unsettled"] = int(np.sum(res.unsettled))
            row["fits"] = res.n_trials * len(res.kinds)
            row["structure"] = res.structure
        else:
            row["status"] = str(res).splitlines()[0][:200] if str(res) else "failed"
            for k in (*scores, "score"):
                row[k] = row[f"{k}_std"] = float("nan")
            row["seconds"] = row["cpu_seconds"] = float("nan")
            row["unsettled"] = row["fits"] = 0
            row["structure"] = float("nan")
        rows.append(row)
    keep = ["method", "status"]
    for k in (*scores, "score"):
        if k == "score" or any(np.isfinite(r[k]) for r in rows):
            keep += [k, f"{k}_std"]
    keep += ["seconds", "cpu_seconds", "unsettled", "fits", "structure"]
    table = Table(rows=[[r[k] for k in keep] for r in rows], names=keep)
    n = [r.n_trials for r in results.values() if isinstance(r, InjectionResult)]
    table.meta.update(
        {
            "noise_sigma": prep.sigma,
            "seed": int(seed),
            "n_trials": max(n, default=0),
            "kinds": list(prep.kinds),
        }
    )
    return table


def compare(
    image,
    methods,
    *,
    mask=None,
    error=None,
    kinds: Sequence[str] = ("sky", "galaxies"),
    n_trials: int = 3,
    seed: int = 0,
    results: dict | None = None,
):
    """Score several methods side by side on the same injections.

    Parameters
    ----------
    image, mask, error, kinds, n_trials, seed
        As for :func:`injection_recovery`; every method sees the same injections.
    methods : mapping of name -> method, or sequence of methods
        Anything :func:`injection_recovery` accepts (None = skymap's default). Peers:
        :func:`skymap.quality.peers.peers`.
    results : dict, optional
        If given, filled with ``{name: InjectionResult}`` for the methods that ran (for
        their maps and :meth:`InjectionResult.plot`).

    Returns
    -------
    astropy.table.Table
        One row per method: ``method``, ``status`` ("ok", or why it failed), the mean
        and spread over trials of ``track``, ``leak``, ``leak_p95`` (and ``halo``),
        ``score``, ``seconds`` / ``cpu_seconds`` per fit, and ``unsettled`` of its
        ``fits`` injected fits (backed off a runaway mask or stopped at their cap:
        :attr:`InjectionResult.unsettled`), and the ``structure`` its fit of the image
        leaves in the residual, which the scores cannot see
        (:attr:`InjectionResult.structure`). A method that fails gets NaN scores and
        its error in ``status``. ``meta`` holds the noise sigma and
        the seed.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> img = 100 + rng.normal(size=(96, 96))
    >>> flat = lambda image, mask: np.full(image.shape, np.median(image[~mask]))
    >>> t = compare(img, {"flat": flat, "zero": lambda i, m: np.zeros((3, 3))}, n_trials=1)
    >>> str(t["status"][0]), bool(np.isnan(t["score"][1]))
    ('ok', True)
    """
    n_trials = _check_trials(n_trials)
    prep = prepare(image, mask=mask, error=error, kinds=kinds)
    named = _named(methods)
    if not named:
        raise ValueError("methods must hold at least one method")
    out: dict[str, InjectionResult | str] = {}
    for name, method in named.items():
        try:
            out[name] = evaluate_method(prep, method, n_trials=n_trials, seed=seed, name=name)[0]
        except ValueError as err:
            log.warning("compare: %s", err)
            out[name] = str(err)
    if results is not None:
        results.update({k: v for k, v in out.items() if isinstance(v, InjectionResult)})
    return results_table(out, prep, seed)


def table_rows(table) -> list[dict]:
    """The rows of an astropy Table as JSON-ready dicts (numpy scalars as Python ones)."""
    return [
        {
            k: (v.item() if hasattr(v, "item") else v)
            for k, v in zip(table.colnames, r, strict=True)
        }
        for r in table
    ]


def plot_comparison(table, *, figsize=(7, 3.5)):
    """Bar chart of a :func:`compare` table: ``track`` and ``|leak|`` per method with
    their spreads across trials, and each method's ``structure`` as a marker (what the
    scores cannot see; not a score); failed methods are marked. Returns a matplotlib
    Figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.subplots()
    names = list(table["method"])
    x = np.arange(len(names))
    parts = [("track", "track"), ("leak", "|leak|"), ("halo", "|halo|"), ("deep", "|deep|")]
    parts = [(k, lab) for k, lab in parts if k in table.colnames]
    width = 0.8 / max(1, len(parts))
    for i, (k, label) in enumerate(parts):
        v = np.abs(np.asarray(table[k], dtype=float))
        ax.bar(
            x + (i - (len(parts) - 1) / 2) * width,
            np.nan_to_num(v),
            width,
            yerr=np.nan_to_num(np.asarray(table[f"{k}_std"], dtype=float)),
            label=label,
        )
    if "structure" in table.colnames:
        left = np.asarray(table["structure"], dtype=float)
        ax.plot(x, left, "kD", ms=5, label="structure left (not a score)")
    for xi, status in zip(x, table["status"], strict=True):
        if status != "ok":
            ax.text(xi, 0, "failed", rotation=90, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("sigma (pixel noise)")
    ax.set_title("injection-recovery: lower is better", fontsize=10)
    ax.legend(fontsize=8)
    return fig
