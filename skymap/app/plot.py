"""Figures of a background fit: maps, mesh grid, RMS against scale, bias, convergence.

Every function returns a :class:`matplotlib.figure.Figure` built without ``pyplot``, so
that figures can be made from worker threads and never open a window; render one to PNG
bytes with :func:`to_png`. Inputs are plain arrays and sequences, so the functions work
with any result object (see :mod:`skymap.report` for the glue from fit results).

Arrays are (y, x) and shown with the origin at the bottom left, as astronomers do.
Masks: True = excluded.
"""

from __future__ import annotations

import io as _stdio
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter

from skymap._util import MAD_TO_STD

__all__ = [
    "plot_bias",
    "plot_convergence",
    "plot_maps",
    "plot_mesh_grid",
    "plot_residual_histogram",
    "plot_rms_vs_scale",
    "to_png",
]

# Images larger than this (per axis) are shown decimated: a figure panel cannot show
# more pixels than this anyway, and rendering stays fast on large frames.
_MAX_DISPLAY = 1024
_PANEL_INCHES = 3.6
# Mesh grids with more meshes than this per axis are drawn without grid lines.
_MAX_GRID_LINES = 48


def to_png(fig: Figure, *, dpi: int = 100) -> bytes:
    """Render ``fig`` to PNG bytes (Agg backend, no display needed).

    Examples
    --------
    >>> to_png(plot_maps(np.ones((8, 8)), np.ones((8, 8))))[:4]
    b'\\x89PNG'
    """
    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buf = _stdio.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _display(arr: np.ndarray) -> np.ndarray:
    """Every k-th pixel, at most _MAX_DISPLAY per axis: a copy when decimated, so that
    a figure never keeps a full-size array alive."""
    arr = np.asarray(arr)
    step = max(1, -(-max(arr.shape) // _MAX_DISPLAY))
    return arr if step == 1 else arr[::step, ::step].copy()


def _robust_limits(values: np.ndarray, lo: float = 1.0, hi: float = 99.0):
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    vmin, vmax = np.percentile(finite, [lo, hi])
    if vmax <= vmin:
        vmax = vmin + 1.0
    return float(vmin), float(vmax)


def _symmetric_limit(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 1.0
    # 3 robust sigma: noise-dominated residuals show structure without saturating.
    mad = np.median(np.abs(finite - np.median(finite)))
    lim = 3.0 * MAD_TO_STD * mad
    if not lim > 0:
        lim = float(np.max(np.abs(finite))) or 1.0
    return float(lim)


def _show(fig, ax, arr, *, title, cmap="viridis", norm=None, colorbar=True, unit=None, shape=None):
    """One map in pixel coordinates (decimated for display, axes in the pixels of the
    full ``shape``), with a colour bar labelled with the unit."""
    ny, nx = np.shape(arr) if shape is None else shape
    im = ax.imshow(
        _display(arr),
        origin="lower",
        cmap=cmap,
        norm=norm,
        interpolation="nearest",
        extent=(-0.5, nx - 0.5, -0.5, ny - 0.5),
    )
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("x (pixel)", fontsize=8)
    ax.set_ylabel("y (pixel)", fontsize=8)
    ax.tick_params(labelsize=7)
    if colorbar:
        bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        bar.ax.tick_params(labelsize=7)
        if unit:
            bar.set_label(unit, fontsize=8)
    return im


def _sky_norm(image: np.ndarray):
    """An asinh stretch between the 1st and 99.8th percentiles: the sky's noise and
    gradients show, and bright stars do not saturate everything else."""
    from astropy.visualization import AsinhStretch, AsymmetricPercentileInterval, ImageNormalize

    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return Normalize(0.0, 1.0)
    vmin, vmax = AsymmetricPercentileInterval(1.0, 99.8).get_limits(finite)
    if not vmax > vmin:
        vmax = vmin + 1.0
    return ImageNormalize(vmin=vmin, vmax=vmax, stretch=AsinhStretch(0.1), clip=False)


def _outline(ax, mask: np.ndarray, shape) -> None:
    """The mask's outline over an image panel."""
    m = _display(np.asarray(mask, dtype=np.uint8))
    if not m.any() or m.all():
        return
    ny, nx = shape
    ax.contour(
        m,
        levels=[0.5],
        colors="orange",
        linewidths=0.5,
        origin="lower",
        extent=(-0.5, nx - 0.5, -0.5, ny - 0.5),
    )


def plot_maps(
    image: np.ndarray,
    background: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    rms: np.ndarray | None = None,
    truth: np.ndarray | None = None,
    title: str | None = None,
    unit: str | None = None,
) -> Figure:
    """Image, background, residual, mask (and rms, and background minus truth).

    The image is shown with an asinh stretch (so that the sky shows, not only the
    stars) and the mask's outline; every panel has axes in pixels and a colour bar
    labelled with ``unit``.

    Parameters
    ----------
    image, background : ndarray
        The input and the fitted background, (y, x).
    mask : ndarray of bool, optional
        Final source/bad-pixel mask (True = excluded).
    rms : ndarray, optional
        Fitted background rms.
    truth : ndarray, optional
        The true sky of a simulation: adds a ``background - truth`` panel.
    title : str, optional
        Figure title.
    unit : str, optional
        The image's unit (FITS ``BUNIT``), for the colour bars.

    Returns
    -------
    Figure

    Examples
    --------
    >>> fig = plot_maps(np.random.default_rng(0).normal(size=(32, 32)), np.zeros((32, 32)))
    >>> [ax.get_title() for ax in fig.axes if ax.get_title()]
    ['image', 'background', 'image - background']
    """
    # Decimated first: a large image costs the figure no full-size temporary.
    shape = np.shape(image)
    image = _display(image)
    background = _display(background)
    residual = image - background
    panels = [("image", image), ("background", background), ("image - background", residual)]
    if mask is not None:
        mask_fraction = float(np.mean(mask))
        mask = _display(np.asarray(mask, dtype=bool))
        panels.append(("mask (excluded)", mask))
    if rms is not None:
        panels.append(("background rms", _display(rms)))
    if truth is not None:
        panels.append(("background - truth", background - _display(truth)))
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = Figure(
        figsize=(_PANEL_INCHES * ncols, _PANEL_INCHES * nrows * 0.95), layout="constrained"
    )
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (name, arr) in zip(axes, panels, strict=False):
        if name == "image":
            _show(
                fig,
                ax,
                arr,
                title=name,
                cmap="gray",
                norm=_sky_norm(_display(arr)),
                unit=unit,
                shape=shape,
            )
            if mask is not None:
                _outline(ax, mask, shape)
        elif name.startswith("mask"):
            frac = mask_fraction
            _show(
                fig,
                ax,
                arr.astype(np.uint8),
                title=f"{name}: {frac:.1%}",
                cmap="gray_r",
                norm=Normalize(0, 1),
                colorbar=False,
                shape=shape,
            )
        elif name in ("image - background", "background - truth"):
            if name == "image - background":
                lim = _symmetric_limit(_display(arr))
            else:
                # An error map is smooth, not noisy: scale to its own extremes.
                finite = np.abs(arr[np.isfinite(arr)])
                lim = float(np.percentile(finite, 99.5)) if finite.size else 1.0
                lim = lim if lim > 0 else 1.0
            _show(
                fig,
                ax,
                arr,
                title=name,
                cmap="RdBu_r",
                norm=Normalize(-lim, lim),
                unit=unit,
                shape=shape,
            )
        else:
            norm = Normalize(*_robust_limits(_display(arr), 0.5, 99.5))
            _show(fig, ax, arr, title=name, norm=norm, unit=unit, shape=shape)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return fig


def plot_mesh_grid(
    background: np.ndarray,
    mesh_values: np.ndarray,
    box_size: Sequence[int] | int,
    *,
    mesh_mask: np.ndarray | None = None,
    title: str | None = None,
) -> Figure:
    """The mesh: per-mesh background values and the box grid drawn on the full map.

    Parameters
    ----------
    background : ndarray
        Full-resolution background, (y, x).
    mesh_values : ndarray
        Background value of each mesh, (ny_mesh, nx_mesh).
    box_size : int or (by, bx)
        Mesh box size in pixels.
    mesh_mask : ndarray of bool, optional
        Meshes that were rejected and filled (True = rejected); drawn with a cross.
    title : str, optional
        Figure title.

    Returns
    -------
    Figure

    Examples
    --------
    >>> fig = plot_mesh_grid(np.zeros((40, 40)), np.zeros((4, 4)), 10)
    >>> len([a for a in fig.axes if a.get_title()])
    2
    """
    background = np.asarray(background)
    mesh_values = np.asarray(mesh_values)
    by, bx = (int(box_size), int(box_size)) if np.ndim(box_size) == 0 else map(int, box_size)
    fig = Figure(figsize=(2 * _PANEL_INCHES + 0.6, _PANEL_INCHES), layout="constrained")
    ax_mesh, ax_full = fig.subplots(1, 2)
    norm = Normalize(*_robust_limits(mesh_values, 0.5, 99.5))
    # Meshes drawn in pixel coordinates, so both panels share axes and grid lines.
    ny, nx = mesh_values.shape
    ax_mesh.imshow(
        mesh_values,
        origin="lower",
        cmap="viridis",
        norm=norm,
        interpolation="nearest",
        extent=(-0.5, nx * bx - 0.5, -0.5, ny * by - 0.5),
    )
    ax_mesh.set_title(f"mesh values ({ny} x {nx} meshes of {by} x {bx} px)", fontsize=10)
    # Crosses and grid lines only while meshes are big enough on the page to see them;
    # a fine grid gets a translucent overlay for rejected meshes and no lines.
    coarse = max(ny, nx) <= _MAX_GRID_LINES
    if mesh_mask is not None:
        rejected = np.asarray(mesh_mask, dtype=bool)
        yy, xx = np.nonzero(rejected)
        if coarse:
            ax_mesh.plot(
                (xx + 0.5) * bx - 0.5, (yy + 0.5) * by - 0.5, "rx", ms=5, label="rejected"
            )
        elif yy.size:
            overlay = np.ma.masked_array(np.ones(rejected.shape), mask=~rejected)
            ax_mesh.imshow(
                overlay,
                origin="lower",
                cmap="autumn",
                alpha=0.5,
                interpolation="nearest",
                extent=(-0.5, nx * bx - 0.5, -0.5, ny * by - 0.5),
            )
            ax_mesh.plot([], [], "s", color="red", alpha=0.5, label="rejected")
        if yy.size:
            ax_mesh.legend(fontsize=7, loc="upper right")
    im = ax_full.imshow(
        _display(background),
        origin="lower",
        cmap="viridis",
        norm=norm,
        interpolation="nearest",
        extent=(-0.5, background.shape[1] - 0.5, -0.5, background.shape[0] - 0.5),
    )
    ax_full.set_title("background with mesh grid", fontsize=10)
    for ax in (ax_mesh, ax_full):
        for x in np.arange(0, nx + 1) * bx - 0.5 if coarse else ():
            ax.axvline(x, color="w", lw=0.4, alpha=0.6)
        for y in np.arange(0, ny + 1) * by - 0.5 if coarse else ():
            ax.axhline(y, color="w", lw=0.4, alpha=0.6)
        ax.set_xlim(-0.5, background.shape[1] - 0.5)
        ax.set_ylim(-0.5, background.shape[0] - 0.5)
        ax.tick_params(labelsize=7)
    fig.colorbar(im, ax=ax_full, fraction=0.046, pad=0.03).ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title)
    return fig


def plot_residual_histogram(
    residual: np.ndarray,
    rms: np.ndarray | float,
    *,
    mask: np.ndarray | None = None,
    title: str | None = None,
) -> Figure:
    """Histogram of the unmasked residual in units of the fitted rms, against the noise
    model (a unit Gaussian): a wider core means the rms is underestimated, a shifted
    one a biased background, a heavy right tail sources the mask missed.

    Examples
    --------
    >>> r = np.random.default_rng(0).normal(size=(64, 64))
    >>> len(plot_residual_histogram(r, 1.0).axes[0].get_lines())
    1
    """
    residual = np.asarray(residual)
    rms = np.broadcast_to(np.asarray(rms), residual.shape)
    # a regular subsample of at most ~1 million pixels: enough for any histogram, and
    # no float64 copies of a large image
    step = max(1, int(np.ceil(np.sqrt(residual.size / (1 << 20)))))
    residual = residual[::step, ::step].astype(np.float64)
    rms = rms[::step, ::step].astype(np.float64)
    ok = np.isfinite(residual) & np.isfinite(rms) & (rms > 0)
    if mask is not None:
        ok &= ~np.asarray(mask, dtype=bool)[::step, ::step]
    z = residual[ok] / rms[ok]
    fig = Figure(figsize=(5.5, 3.8), layout="constrained")
    ax = fig.subplots()
    edges = np.linspace(-6.0, 6.0, 121)
    if z.size:
        ax.hist(
            np.clip(z, -6, 6),
            bins=edges,
            density=True,
            color="C0",
            alpha=0.6,
            label=f"unmasked pixels ({z.size})",
        )
    x = 0.5 * (edges[1:] + edges[:-1])
    ax.plot(x, np.exp(-0.5 * x**2) / np.sqrt(2 * np.pi), "k--", lw=1, label="noise model N(0, 1)")
    ax.set_yscale("log")
    ax.set_ylim(1e-5, 1.0)
    ax.set_xlabel("(image - background) / rms")
    ax.set_ylabel("probability density")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "residuals against the noise model", fontsize=10)
    return fig


def plot_rms_vs_scale(
    widths: Sequence[float],
    curves: Mapping[str, Sequence[float]],
    *,
    references: Mapping[str, Sequence[float]] | None = None,
    title: str | None = None,
) -> Figure:
    """RMS of block-averaged residuals against block width, with reference curves.

    Parameters
    ----------
    widths : sequence of float
        Block widths in pixels.
    curves : mapping of label -> sequence
        Measured curves (e.g. ``{"skymap": rms}``), one value per width.
    references : mapping of label -> sequence, optional
        Reference curves drawn dashed: the perfect background (noise alone) or white
        noise ``sigma / w``.
    title : str, optional

    Returns
    -------
    Figure

    Examples
    --------
    >>> w = np.arange(3, 30)
    >>> fig = plot_rms_vs_scale(w, {"fit": 0.1 / w + 0.001}, references={"white": 0.1 / w})
    >>> len(fig.axes[0].get_lines())
    2
    """
    widths = np.asarray(widths, dtype=float)
    fig = Figure(figsize=(5.5, 4.0), layout="constrained")
    ax = fig.subplots()
    for label, values in curves.items():
        ax.plot(widths, np.asarray(values, dtype=float), "o-", ms=3, label=label)
    for label, values in (references or {}).items():
        ax.plot(widths, np.asarray(values, dtype=float), "k--", lw=1, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    # plain numbers for block widths: "3, 5, 10, 20" reads better than "3x10^0"
    ticks = [t for t in (1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 500) if t <= widths.max()]
    ax.set_xticks([t for t in ticks if t >= widths.min()] or [widths.min()])
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("block width (pixels)")
    ax.set_ylabel("RMS of block-mean residual")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "residual RMS against scale", fontsize=10)
    return fig


def plot_bias(
    flux: Sequence[float],
    radius: Sequence[float],
    bias: Sequence[float],
    *,
    masked: Sequence[bool] | None = None,
    control: Sequence[float] | None = None,
    title: str | None = None,
) -> Figure:
    """Background bias under sources against source flux and radius.

    Parameters
    ----------
    flux, radius, bias : sequence of float
        One value per source: its flux, its radius (pixels), and ``background - truth``
        measured under it.
    masked : sequence of bool, optional
        Whether the source was covered by the mask; masked and unmasked sources are drawn
        in different colours.
    control : sequence of float, optional
        The same measurement at random positions; its spread is drawn as a band.
    title : str, optional

    Returns
    -------
    Figure

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> fig = plot_bias(rng.random(20) * 100, rng.random(20) * 5, rng.normal(size=20))
    >>> len(fig.axes)
    2
    """
    flux = np.asarray(flux, dtype=float)
    radius = np.asarray(radius, dtype=float)
    bias = np.asarray(bias, dtype=float)
    groups = [("sources", np.ones(bias.shape, bool), "C0")]
    if masked is not None:
        masked = np.asarray(masked, dtype=bool)
        groups = [("masked", masked, "C3"), ("unmasked", ~masked, "C0")]
    fig = Figure(figsize=(9.0, 3.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, x, xlabel in ((axes[0], flux, "source flux"), (axes[1], radius, "radius (pixels)")):
        if control is not None:
            c = np.asarray(control, dtype=float)
            c = c[np.isfinite(c)]
            if c.size:
                lo, mid, hi = np.percentile(c, [16, 50, 84])
                ax.axhspan(lo, hi, color="0.85", label="random positions (16-84%)")
                ax.axhline(mid, color="0.5", lw=1)
        for label, sel, color in groups:
            if np.any(sel):
                ax.scatter(x[sel], bias[sel], s=8, color=color, alpha=0.7, label=label)
        ax.axhline(0.0, color="k", lw=0.8)
        positive = x[np.isfinite(x) & (x > 0)]
        if positive.size and positive.max() / positive.min() > 20:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("background - truth")
    axes[0].legend(fontsize=7)
    fig.suptitle(title or "bias under sources")
    return fig


def _field(record: Any, *names: str):
    for name in names:
        if isinstance(record, Mapping) and name in record:
            return record[name]
        if hasattr(record, name):
            return getattr(record, name)
    return None


def plot_convergence(history: Iterable[Any], *, title: str | None = None) -> Figure:
    """Convergence of an iterative fit: change, mask fraction and scale (or rms).

    Parameters
    ----------
    history : iterable of records
        One record per iteration (mapping or object, e.g.
        :class:`skymap.pipeline.IterationRecord`) with some of: ``change`` (how much the
        background moved, in units of its rms), ``mask_fraction``, ``scale`` (smoothing
        length in pixels) or else ``rms`` (a map or a number), and ``stage`` (stage
        boundaries are drawn as dotted lines).
    title : str, optional

    Returns
    -------
    Figure

    Examples
    --------
    >>> hist = [{"change": 1.0, "mask_fraction": 0.1}, {"change": 0.1, "mask_fraction": 0.12}]
    >>> len(plot_convergence(hist).axes)
    3
    """
    records = list(history)
    it = np.arange(1, len(records) + 1)

    def series(*names):
        out = []
        for r in records:
            v = _field(r, *names)
            if v is None:
                out.append(np.nan)
            else:
                v = np.asarray(v, dtype=float)
                out.append(float(np.nanmedian(v)) if v.ndim else float(v))
        return np.asarray(out, dtype=float)

    # The smoothing scale is a scalar on the record; the rms is a full map that would be
    # rebuilt for every iteration, so it is only read when no scale is recorded.
    third = series("scale")
    third_label = "smoothing scale (pixels)"
    if not np.any(np.isfinite(third)):
        third, third_label = series("rms", "noise"), "median background rms"
    panels = [
        ("change", series("change", "delta", "max_change"), "background change"),
        ("mask_fraction", series("mask_fraction", "masked_fraction"), "mask fraction"),
        ("third", third, third_label),
    ]
    stages = series("stage")
    boundaries = it[1:][np.diff(stages) != 0] - 0.5 if len(it) > 1 else []
    fig = Figure(figsize=(10.0, 3.2), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, (key, values, label) in zip(axes, panels, strict=True):
        ok = np.isfinite(values)
        if np.any(ok):
            ax.plot(it[ok], values[ok], "o-", ms=4)
            if key == "change" and np.all(values[ok] > 0):
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
        for b in boundaries:
            ax.axvline(b, color="0.5", ls=":", lw=1)
        # the stage of each run of iterations, numbered as in the history table
        starts = [0, *[int(b - 0.5) for b in boundaries]] if len(it) else []
        for k, start in enumerate(starts):
            if np.isfinite(stages[start]):
                end = starts[k + 1] if k + 1 < len(starts) else len(it)
                ax.text(
                    0.5 * (start + 1 + end),
                    1.0,
                    f"stage {int(stages[start])}",
                    transform=ax.get_xaxis_transform(),
                    ha="center",
                    va="bottom",
                    fontsize=6,
                    color="0.4",
                )
        ax.set_xlabel("iteration" + (" (dotted: new stage)" if len(boundaries) else ""))
        ax.set_title(label, fontsize=10, pad=12)
        ax.grid(True, alpha=0.3)
        if 0 < len(it) <= 12:
            ax.set_xticks(it)
    fig.suptitle(title or "convergence")
    return fig
