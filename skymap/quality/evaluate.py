"""Scoring a background model: against truth on simulations, against statistics alone on
real data.

* :func:`rms_vs_scale` - the RMS of block means of a residual as a function of block
  width, as defined in the STScI "Complex 2D Background" notebook, with its two reference
  curves (:func:`perfect_curve` when the noise is known, :func:`white_noise_curve` from
  the measured pixel-to-pixel sigma otherwise).
* :func:`bias_under_sources` - the residual ``background - truth`` in a 3x3 box at each
  catalogued source, split by mask, with a random-position control and linear fits
  against flux and radius.
* :func:`masked_vs_unmasked` - is the background under masked pixels higher than
  elsewhere? The standard error comes from shifting the mask cyclically over the map
  (or from a block jackknife), so it accounts for the spatial correlation of a smooth
  map; the seeds' ``mean / (sqrt(N) std)`` does not.
* :func:`evaluate` - all of the above in one :class:`Evaluation`, with a JSON-ready
  :meth:`Evaluation.to_dict`.

Masks follow the package convention: True = excluded; non-finite pixels are excluded
automatically. Arrays are (y, x).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from skymap._inputs import read_image, strip_unit
from skymap._validate import as_image, check_positive, json_float
from skymap.quality.masked_bias import MaskedVsUnmasked, masked_vs_unmasked
from skymap.quality.rms_scale import (
    as_widths,
    perfect_curve,
    pixel_sigma,
    rms_vs_scale,
    white_noise_curve,
)
from skymap.quality.source_bias import (
    BiasResult,
    GroupStats,
    LineFit,
    bias_under_sources,
    fit_line,
)

__all__ = [
    "MIN_CLEAN_BLOCKS",
    "BiasResult",
    "Evaluation",
    "GroupStats",
    "LineFit",
    "MaskedVsUnmasked",
    "bias_under_sources",
    "evaluate",
    "fit_line",
    "masked_verdict",
    "masked_vs_unmasked",
    "perfect_curve",
    "ratio_verdict",
    "pixel_sigma",
    "rms_vs_scale",
    "white_noise_curve",
]


#: Fewest clean blocks at a width for it to count in the large-scale ratio.
MIN_CLEAN_BLOCKS = 25


@dataclass(frozen=True, kw_only=True, eq=False)
class Evaluation:
    """Everything :func:`evaluate` measured about one background.

    Attributes
    ----------
    widths : ndarray
        Block widths of the RMS-vs-scale curves (pixels).
    rms : ndarray
        :func:`rms_vs_scale` of ``image - background`` with the fit's mask.
    rms_white : ndarray
        White-noise expectation ``noise_sigma / w``.
    rms_perfect : ndarray or None
        :func:`perfect_curve` of the known noise (simulations only).
    noise_sigma : float
        Pixel-to-pixel sigma of ``image - background`` (:func:`pixel_sigma`).
    reference : str
        ``"perfect"`` when the noise is known, else ``"white"``: the curve the ratio and
        the over-fitting flag use.
    large_scale_ratio : float
        Median of ``rms / reference`` over the largest third of the widths, counting only
        widths with at least ``min_clean_blocks`` clean blocks: ~1 is ideal, above 1
        means structure left in the residual. NaN when no large width has enough clean
        blocks (a small or heavily masked image cannot tell).
    overfit : bool
        ``large_scale_ratio < overfit_threshold``: the background follows the noise (it
        removed power the noise should have). Reported as a failure, never as a gain.
    clean_blocks : ndarray of int
        Number of clean blocks behind each point of ``rms``.
    min_clean_blocks : int
        Fewest clean blocks for a width to count in ``large_scale_ratio``.
    truth_metrics : dict or None
        With truth: ``rms_error`` (RMS of ``background - truth`` over valid pixels),
        ``rms_error_sigma`` (the same in units of the true noise sigma when known, else of
        ``noise_sigma``), ``mean_error``, ``mean_error_sigma``, ``max_abs_error``,
        ``p99_abs_error``, and ``rms_error_unmasked`` / ``rms_error_masked``.
    bias : BiasResult or None
        :func:`bias_under_sources` (needs truth and a catalogue).
    masked_vs_unmasked : MaskedVsUnmasked or None
        :func:`masked_vs_unmasked` (needs a mask with both groups).
    image, background, mask, truth : ndarray or None
        The inputs, kept for :meth:`plot`.
    """

    widths: np.ndarray
    rms: np.ndarray
    rms_white: np.ndarray
    rms_perfect: np.ndarray | None
    noise_sigma: float
    reference: str
    large_scale_ratio: float
    overfit: bool
    overfit_threshold: float
    truth_metrics: dict | None
    bias: BiasResult | None
    masked_vs_unmasked: MaskedVsUnmasked | None
    image: np.ndarray
    background: np.ndarray
    mask: np.ndarray | None
    truth: np.ndarray | None
    clean_blocks: np.ndarray | None = None
    min_clean_blocks: int = MIN_CLEAN_BLOCKS

    @property
    def ratio_verdict(self) -> str:
        """The large-scale ratio in plain words."""
        return ratio_verdict(self.large_scale_ratio, self.reference, self.overfit_threshold)

    @property
    def mask_verdict(self) -> str | None:
        """The masked-vs-unmasked test in plain words (None without the test)."""
        t = self.masked_vs_unmasked
        return None if t is None else masked_verdict(t.difference, t.stderr, t.z)

    @property
    def ratio(self) -> np.ndarray:
        """``rms`` divided by the reference curve (perfect if known, else white)."""
        ref = self.rms_perfect if self.reference == "perfect" else self.rms_white
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.rms / ref

    def to_dict(self) -> dict:
        """JSON-serialisable summary (NaN becomes None). Keys:

        * ``n_pixels``, ``mask_fraction``, ``noise_sigma``;
        * ``rms_vs_scale``: ``widths``, ``rms``, ``white``, ``perfect`` (or None),
          ``reference``, ``ratio``, ``large_scale_ratio``, ``overfit``,
          ``overfit_threshold``;
        * ``truth``: the ``truth_metrics`` dict, or None;
        * ``bias``: :meth:`BiasResult.to_dict` (``masked``/``unmasked``/``random`` each
          with ``n``, ``mean``, ``excess``, ``stderr``, ``naive_stderr``, ``z``;
          ``flux_fit`` and ``radius_fit`` each with those three groups holding
          ``slope``, ``intercept``, ``slope_err``, ``intercept_err``, ``n``), or None;
        * ``masked_vs_unmasked``: :meth:`MaskedVsUnmasked.to_dict` (``difference``,
          ``stderr``, ``z``, ``p_value``, ``method``, ``mean_masked``, ``mean_unmasked``,
          ``n_masked``, ``n_unmasked``, ``n_blocks``, ``naive_stderr``, ``n_eff``), or
          None.
        """
        mask_fraction = float(self.mask.mean()) if self.mask is not None else 0.0
        return {
            "n_pixels": int(self.image.size),
            "mask_fraction": mask_fraction,
            "noise_sigma": json_float(self.noise_sigma),
            "rms_vs_scale": {
                "widths": [int(w) for w in self.widths],
                "rms": [json_float(v) for v in self.rms],
                "white": [json_float(v) for v in self.rms_white],
                "perfect": None
                if self.rms_perfect is None
                else [json_float(v) for v in self.rms_perfect],
                "reference": self.reference,
                "ratio": [json_float(v) for v in self.ratio],
                "large_scale_ratio": json_float(self.large_scale_ratio),
                "overfit": bool(self.overfit),
                "overfit_threshold": float(self.overfit_threshold),
                "clean_blocks": None
                if self.clean_blocks is None
                else [int(n) for n in self.clean_blocks],
                "min_clean_blocks": int(self.min_clean_blocks),
                "verdict": self.ratio_verdict,
            },
            "truth": None
            if self.truth_metrics is None
            else {k: json_float(v) for k, v in self.truth_metrics.items()},
            "bias": None if self.bias is None else self.bias.to_dict(),
            "masked_vs_unmasked": None
            if self.masked_vs_unmasked is None
            else {**self.masked_vs_unmasked.to_dict(), "verdict": self.mask_verdict},
        }

    def to_table(self, *, wide: bool = False):
        """The scalar metrics as an :class:`astropy.table.Table`.

        By default one row per metric (columns ``metric`` and ``value``, nested keys of
        :meth:`to_dict` joined by ``.``), which prints readably. With ``wide=True``, one
        row holding every metric as a column (missing values masked), ready to
        ``vstack`` over many runs. The curves are in :meth:`rms_table`.
        """
        from astropy.table import Table

        flat = {}
        _flatten(self.to_dict(), "", flat)
        cols = {k: [v] for k, v in flat.items() if not isinstance(v, list)}
        if not wide:
            rows = [
                (k, "-" if v[0] is None else str(_short(v[0])))
                for k, v in cols.items()
                if not k.endswith("verdict")  # sentences: in to_dict and the report
            ]
            return Table(rows=rows, names=("metric", "value"))
        table = Table(
            {k: [np.nan if v[0] is None else v[0]] for k, v in cols.items()}, masked=True
        )
        for k, v in cols.items():
            if v[0] is None:
                table[k].mask = [True]
        return table

    def rms_table(self):
        """:class:`astropy.table.Table` of the RMS-vs-scale curves, one row per width."""
        from astropy.table import Table

        t = Table({"width": self.widths, "rms": self.rms, "white": self.rms_white})
        if self.rms_perfect is not None:
            t["perfect"] = self.rms_perfect
        t["ratio"] = self.ratio
        return t

    def plot(self, *, title=None):
        """A matplotlib Figure (no pyplot): the residual map, the mask with masked and
        unmasked sources, RMS against scale with its references, and the residual under
        sources against flux and against radius (when truth and a catalogue were given).
        """
        from matplotlib.figure import Figure

        has_bias = self.bias is not None
        fig = Figure(figsize=(15.0, 8.5 if has_bias else 4.5), layout="constrained")
        axes = fig.subplots(2 if has_bias else 1, 3, squeeze=False)
        step = max(1, -(-max(self.image.shape) // 1024))
        if self.truth is not None:
            resid, label = self.background - self.truth, "background - truth"
        else:
            resid, label = self.image - self.background, "image - background"
        shown = resid[::step, ::step]
        finite = np.abs(shown[np.isfinite(shown)])
        lim = float(np.percentile(finite, 99.5)) if finite.size else 1.0
        lim = lim if lim > 0 else 1.0
        ax = axes[0, 0]
        im = ax.imshow(shown, origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim)
        fig.colorbar(im, ax=ax, fraction=0.046)
        ax.set_title(label)

        ax = axes[0, 1]
        mask = self.mask if self.mask is not None else np.zeros(self.image.shape, bool)
        ax.imshow(mask[::step, ::step], origin="lower", cmap="gray_r", vmin=0, vmax=1)
        if has_bias and self.bias.residual.size:
            b = self.bias
            for sel, color, name in ((b.masked, "C3", "masked"), (~b.masked, "C0", "unmasked")):
                ax.scatter(b.x[sel] / step, b.y[sel] / step, s=4, c=color, label=name)
            ax.legend(fontsize=7, loc="upper right")
        ax.set_title(f"mask ({float(mask.mean()):.1%} excluded)")

        ax = axes[0, 2]
        ax.loglog(self.widths, self.rms, "o-", ms=3, label="image - background")
        ax.loglog(self.widths, self.rms_white, "k--", lw=1, label="white noise sigma/w")
        if self.rms_perfect is not None:
            ax.loglog(self.widths, self.rms_perfect, "k-", lw=1, label="perfect (noise only)")
        ax.set_xlabel("block width (pixels)")
        ax.set_ylabel("RMS of block means")
        flag = " - OVERFIT" if self.overfit else ""
        ax.set_title(f"RMS vs scale: large-scale ratio {self.large_scale_ratio:.2f}{flag}")
        ax.legend(fontsize=7)

        if has_bias:
            b = self.bias
            for ax, x, rx, fits, xlabel in (
                (axes[1, 0], b.flux, b.random_flux, b.flux_fits, "flux"),
                (axes[1, 1], b.radius, b.random_radius, b.radius_fits, "radius (pixels)"),
            ):
                ax.scatter(rx, b.random_residual, s=3, c="0.6", marker="+", label="random")
                for sel, color, name in (
                    (~b.masked, "k", "unmasked"),
                    (b.masked, "C3", "masked"),
                ):
                    ax.scatter(x[sel], b.residual[sel], s=5, c=color, alpha=0.5, label=name)
                xs = np.linspace(0.0, np.nanmax(x) if x.size else 1.0, 10)
                for name, color in (("unmasked", "k"), ("masked", "C3"), ("random", "C0")):
                    f = fits[name]
                    if np.isfinite(f.slope):
                        ax.plot(xs, f.intercept + f.slope * xs, color=color, lw=1)
                ax.axhline(0.0, color="0.3", lw=0.5)
                ax.set_xlabel(xlabel)
                ax.set_ylabel("background - truth (3x3 box)")
                ax.legend(fontsize=7)
            axes[1, 2].axis("off")
            lines = [
                f"{g}: mean {s.mean:+.3g}, excess {s.excess:+.3g} +- {s.stderr:.2g} (n={s.n})"
                for g, s in (
                    ("masked", b.masked_stats),
                    ("unmasked", b.unmasked_stats),
                    ("random", b.random_stats),
                )
            ]
            if self.truth_metrics is not None:
                lines.append(f"rms error / sigma = {self.truth_metrics['rms_error_sigma']:.3g}")
            axes[1, 2].text(0.0, 0.9, "\n".join(lines), va="top", family="monospace")
        if title:
            fig.suptitle(title)
        return fig


def _short(value):
    return f"{value:.4g}" if isinstance(value, float) else value


def ratio_verdict(ratio: float, reference: str = "white", overfit_threshold: float = 0.9) -> str:
    """A large-scale RMS ratio (:attr:`Evaluation.large_scale_ratio`) in plain words.

    Examples
    --------
    >>> ratio_verdict(float("nan"))
    'n/a (too few clean blocks)'
    >>> ratio_verdict(1.05, "perfect")
    'good: the residual at large scales is as flat as perfect noise (ratio 1.05)'
    """
    if not np.isfinite(ratio):
        return "n/a (too few clean blocks)"
    noise = "perfect noise" if reference == "perfect" else "white noise"
    if ratio < overfit_threshold:
        return (
            f"OVERFIT: the residual at large scales is {ratio:.2f}x {noise}; the "
            "background follows the noise"
        )
    if ratio <= 1.25:
        return f"good: the residual at large scales is as flat as {noise} (ratio {ratio:.2f})"
    if ratio <= 2.0:
        return (
            f"some structure left: the residual at large scales is {ratio:.2f}x {noise}; "
            "the background misses some large-scale structure"
        )
    return (
        f"structure left: the residual at large scales is {ratio:.1f}x {noise}; the "
        "background misses large-scale structure (or sources the mask missed remain)"
    )


def masked_verdict(difference: float, stderr: float, z: float) -> str:
    """The masked-vs-unmasked test (background under the mask minus elsewhere) in plain
    words; ``z`` is the difference in standard errors.

    Examples
    --------
    >>> masked_verdict(0.5, 0.1, 5.0)[:42]
    'biased: the background is 0.5 higher under'
    """
    if not np.isfinite(z):
        return "n/a (no standard error)"
    if abs(z) < 3:
        return (
            f"no significant difference: the background under the mask differs from "
            f"elsewhere by {difference:.3g}, {abs(z):.1f} standard errors"
        )
    side = "higher" if z > 0 else "lower"
    why = (
        "source light leaks into the background (masks too small)"
        if z > 0
        else "the mask sits on low sky, or the fit dips under sources"
    )
    return (
        f"biased: the background is {abs(difference):.3g} {side} under the mask than "
        f"elsewhere ({abs(z):.1f} standard errors): {why}"
    )


def _flatten(d, prefix, out):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            _flatten(v, key + ".", out)
        else:
            out[key] = v


def evaluate(
    image,
    result,
    *,
    truth=None,
    catalog=None,
    mask=None,
    noise=None,
    scene=None,
    widths=range(3, 30),
    overfit_threshold=0.9,
    min_clean_blocks=MIN_CLEAN_BLOCKS,
    seed=0,
) -> Evaluation:
    """Score a background: against truth when there is one, against statistics always.

    Parameters
    ----------
    image : array_like or None
        The image the background was fitted to (``scene.image`` when None and a scene is
        given).
    result : array_like or object
        The background map, or a result object with a ``background`` attribute (and
        optionally ``mask``, the fit's final mask), e.g. a pipeline result.
    truth : array_like, optional
        The true sky (simulations).
    catalog : astropy.table.Table, optional
        Sources (``x_mean``, ``y_mean``, ``flux``, ``re``) for the bias under sources.
    mask : array_like of bool, optional
        The mask the fit used (True = excluded); defaults to ``result.mask``.
    noise : array_like, optional
        The noise realisation, for the "perfect" curve.
    scene : skymap.simulate.Scene, optional
        Supplies ``truth``, ``catalog``, ``noise`` and the true noise sigma; its bad-pixel
        mask is added to ``mask``.
    widths : sequence of int
        Block widths for :func:`rms_vs_scale`.
    overfit_threshold : float
        Large-scale ratio below which the fit is flagged as over-fitting.
    min_clean_blocks : int
        Fewest clean blocks for a width to count in the large-scale ratio (the relative
        error of an RMS of n block means is about ``1 / sqrt(2 n)``: 14% at 25).
    seed : int
        Seed of the random control positions.

    Returns
    -------
    Evaluation
        ``to_dict()`` gives the JSON metrics the CLI writes.

    Examples
    --------
    >>> from skymap.quality.simulate import notebook_scene
    >>> scene = notebook_scene(shrink_factor=8)
    >>> ev = evaluate(None, scene.sky, scene=scene)
    >>> ev.truth_metrics["rms_error"], ev.reference
    (0.0, 'perfect')
    """
    if scene is not None:
        truth = scene.sky if truth is None else truth
        catalog = scene.catalog if catalog is None else catalog
        noise = scene.noise if noise is None else noise
        image = scene.image if image is None else image
    if image is None:
        raise ValueError("image is required unless a scene is given")
    if mask is None:
        mask = getattr(result, "mask", None)
    inp = read_image(image, mask)
    img, m = inp.data, inp.mask
    bkg = getattr(result, "background", result)
    bkg = as_image(strip_unit(bkg, inp.unit, "background"), "background")
    if bkg.shape != img.shape:
        raise ValueError(f"background must have the image's shape {img.shape}, got {bkg.shape}")
    if scene is not None and scene.mask is not None:
        m = scene.mask.copy() if m is None else (m | scene.mask)
    check_positive("overfit_threshold", overfit_threshold)
    check_positive("min_clean_blocks", min_clean_blocks)
    ws = as_widths(widths)

    resid = img - bkg
    sigma = pixel_sigma(resid, m)
    rms, blocks = rms_vs_scale(resid, m, ws, return_counts=True)
    white = white_noise_curve(sigma, ws)
    perfect = None
    if noise is not None:
        perfect = perfect_curve(as_image(noise, "noise"), m, ws)
    reference = "perfect" if perfect is not None else "white"
    ref = perfect if perfect is not None else white
    # a width counts only with enough clean blocks: the scatter of a few block means is
    # noise (one block gives 0, a false OVERFIT)
    large = (ws >= np.quantile(ws, 2.0 / 3.0)) & (blocks >= min_clean_blocks)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (rms / ref)[large]
    r = r[np.isfinite(r)]
    large_ratio = float(np.median(r)) if r.size else float("nan")
    overfit = bool(np.isfinite(large_ratio) and large_ratio < overfit_threshold)

    truth_metrics = None
    bias = None
    tru = None
    if truth is not None:
        tru = as_image(truth, "truth")
        if tru.shape != img.shape:
            raise ValueError(f"truth must have the image's shape {img.shape}, got {tru.shape}")
        true_sigma = scene.noise_sigma if scene is not None else sigma
        truth_metrics = _truth_metrics(bkg, tru, m, true_sigma)
        if catalog is not None:
            bias = bias_under_sources(bkg, tru, catalog, m, seed=seed)
    mvu = None
    if m is not None and m.any() and not m.all():
        mvu = masked_vs_unmasked(bkg, m)
    return Evaluation(
        widths=ws,
        rms=rms,
        rms_white=white,
        rms_perfect=perfect,
        noise_sigma=sigma,
        reference=reference,
        large_scale_ratio=large_ratio,
        overfit=overfit,
        overfit_threshold=float(overfit_threshold),
        truth_metrics=truth_metrics,
        bias=bias,
        masked_vs_unmasked=mvu,
        # Copies, read-only: editing the caller's arrays afterwards must not change
        # the evaluation (to_dict reads the mask).
        image=_frozen(img, image),
        background=_frozen(bkg, result),
        mask=_frozen(m, mask),
        truth=_frozen(tru, truth),
        clean_blocks=blocks,
        min_clean_blocks=int(min_clean_blocks),
    )


def _frozen(arr, source):
    """``arr`` read-only, copied first when it may share memory with the caller's
    ``source`` (an array, or an object whose ``background`` it came from)."""
    if arr is None:
        return None
    given = getattr(source, "background", source)
    if isinstance(given, np.ndarray) and np.may_share_memory(arr, given):
        arr = arr.copy()
    arr.setflags(write=False)
    return arr


def _truth_metrics(bkg, truth, mask, sigma):
    err = bkg.astype(np.float64) - truth
    # Detector-spoiled pixels (NaN background) carry no information; the source mask is
    # not applied: the background must be right under the sources too.
    valid = np.isfinite(err)
    e = err[valid]
    if e.size == 0:
        nan = float("nan")
        return dict.fromkeys(
            (
                "rms_error",
                "rms_error_sigma",
                "mean_error",
                "mean_error_sigma",
                "max_abs_error",
                "p99_abs_error",
                "rms_error_unmasked",
                "rms_error_masked",
            ),
            nan,
        )
    rms = float(np.sqrt(np.mean(e**2)))
    mean = float(e.mean())
    s = float(sigma) if sigma and np.isfinite(sigma) and sigma > 0 else float("nan")
    if mask is None:
        rms_u, rms_m = rms, float("nan")
    else:
        eu = err[valid & ~mask]
        em = err[valid & mask]
        rms_u = float(np.sqrt(np.mean(eu**2))) if eu.size else float("nan")
        rms_m = float(np.sqrt(np.mean(em**2))) if em.size else float("nan")
    return {
        "rms_error": rms,
        "rms_error_sigma": rms / s,
        "mean_error": mean,
        "mean_error_sigma": mean / s,
        "max_abs_error": float(np.abs(e).max()),
        "p99_abs_error": float(np.percentile(np.abs(e), 99)),
        "rms_error_unmasked": rms_u,
        "rms_error_masked": rms_m,
    }
