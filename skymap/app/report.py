"""A report of a background fit: PNG figures and one self-contained HTML page.

:func:`report_figures` turns a fit result and its evaluation (:mod:`skymap.evaluate`,
which carries the truth of a simulation when there is one) into the standard figures of
:mod:`skymap.plot`; :func:`render_html`
lays figures and a metrics table out on one page whose images are embedded as base64
PNG, so the page can be mailed or archived alone; :func:`write_report` writes the PNGs
and the page, atomically and without overwriting unless asked.

The page holds no scripts and loads nothing from the network.
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from skymap.app.io import atomic_write, check_outputs

if TYPE_CHECKING:  # matplotlib is imported when a figure is made, not to name files
    from matplotlib.figure import Figure

__all__ = [
    "CAPTIONS",
    "flatten_metrics",
    "render_html",
    "report_figures",
    "report_paths",
    "write_report",
]

#: Caption shown under each standard figure.
CAPTIONS = {
    "maps": "The input image (asinh stretch, so that the sky shows; orange: the outline of "
    "the final mask), the fitted background, the residual (image - background), the final "
    "mask (black = excluded from the fit), the background rms and, for simulations, the "
    "error of the background against the true sky. Axes in pixels; colour bars in the "
    "image's unit.",
    "cells": "The default fit's grid: the masked mean of each cell (left) and the "
    "smooth background through them (right), with the smoothing length chosen by "
    "generalised cross-validation in the title. Cells with no unmasked pixel are marked.",
    "mesh": "The mesh: the value measured in each box (rejected boxes marked), and the "
    "full-resolution background interpolated from the boxes (grid lines drawn when the "
    "boxes are large enough to see).",
    "residuals": "Histogram of the unmasked residual divided by the fitted rms, against "
    "the noise model (dashed, a unit Gaussian). A wider core means the rms is too small; "
    "a shifted one a biased background; a heavy right tail, sources the mask missed.",
    "rms_vs_scale": "RMS of the residual averaged in square blocks, against block width. "
    "A perfect background leaves only noise: the dashed reference. Excess at large widths "
    "is background structure the model missed; a curve below the reference means the "
    "background follows the noise. Widths with fewer clean (unmasked) blocks than the "
    "stated minimum give no verdict.",
    "bias": "Background error under each catalogued source against its flux and radius; "
    "the grey band is the same measurement at random positions.",
    "convergence": "How the iterative fit converged, one point per iteration: change of "
    "the background (in units of its rms), mask fraction, and smoothing length. Stages "
    "are numbered as in the fit's history table and the progress bar: stage -1 is the "
    "first guess, stages 0, 1, ... mask and refit, and the last stage is the final refit "
    "with the converged mask (no new masking); its jump in the change panel is that "
    "refit's different smoothing, not a failure to converge. Dotted lines mark new "
    "stages.",
}

# Lists longer than this are summarised in the table (the JSON keeps them whole).
_MAX_LIST = 8

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1150px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
.meta { color: #555; font-size: 0.9em; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #444; margin-top: 0.3em; }
table { border-collapse: collapse; font-size: 0.88em; margin: 1em 0; }
table.list { font-size: 0.8em; display: inline-table; margin-right: 1em; }
h3 { font-size: 1.05em; margin: 1.2em 0 0.2em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.num { text-align: right; font-family: ui-monospace, monospace; }
th { background: #f0f0f0; }
"""


def _format(value: Any) -> tuple[str, bool]:
    """Table text for a value, and whether it is numeric (right-aligned)."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)), False
    if isinstance(value, (int, np.integer)):
        return str(int(value)), True
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return ("nan" if math.isnan(v) else f"{v:.5g}"), True
    if value is None:
        return "-", False
    return str(value), False


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Flatten nested metrics into ``(dotted.key, value)`` rows for a table.

    Sequences of at most 8 scalars are shown inline; longer ones are summarised by their
    length (the metrics JSON keeps them whole).

    Examples
    --------
    >>> flatten_metrics({"a": 1, "b": {"c": 2.5, "d": list(range(20))}})
    [('a', 1), ('b.c', 2.5), ('b.d', '[20 values]')]
    """
    rows: list[tuple[str, Any]] = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.extend(flatten_metrics(value, prefix=f"{name}."))
        elif isinstance(value, (list, tuple, np.ndarray)):
            arr = np.asarray(value, dtype=object).ravel()
            if arr.size <= _MAX_LIST and all(np.isscalar(v) for v in arr):
                rows.append((name, ", ".join(_format(v)[0] for v in arr)))
            else:
                rows.append((name, f"[{arr.size} values]"))
        else:
            rows.append((name, value))
    return rows


def _attr(obj: Any, *names: str):
    """The first of ``names`` that ``obj`` has (attribute or mapping key), else None."""
    for name in names:
        if isinstance(obj, Mapping) and name in obj:
            return obj[name]
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return None


def _mesh_figure(result: Any):
    """The mesh-grid figure, when the result exposes its per-mesh values and box size:
    a :class:`skymap.mesh.MeshResult` (``mesh_background``, ``geometry.box_size``) or a
    :class:`skymap.smooth.SmoothResult` (``cell_values``, ``cell_size``), directly or as
    the ``mesh`` / final ``model`` of a pipeline result."""
    model = _attr(result, "mesh", "model")
    source = model if model is not None else result
    values = _attr(source, "mesh_background", "cell_values")
    box = _attr(source, "box_size", "cell_size")
    for holder in ("geometry", "config"):
        box = box if box is not None else _attr(_attr(source, holder), "box_size")
    if values is None or box is None:
        return None
    excluded = _attr(source, "mesh_excluded")
    pixels = _attr(source, "cell_pixels")
    if excluded is None and pixels is not None:
        excluded = np.asarray(pixels) == 0
    from skymap.app import plot

    if _attr(source, "cell_values") is not None:
        scale = _attr(result, "scale") or _attr(source, "smoothing")
        title = f"cell grid; smoothing length {float(scale):.3g} px" if scale else "cell grid"
        fig = plot.plot_mesh_grid(result.background, values, box, mesh_mask=excluded, title=title)
        return "cells", fig
    return "mesh", plot.plot_mesh_grid(result.background, values, box, mesh_mask=excluded)


def report_figures(result: Any, evaluation: Any, *, unit: str | None = None) -> dict[str, Figure]:
    """The standard figures of a fit, by name: maps, mesh (a mesh fit) or cells (the
    default fit's grid), residuals, rms_vs_scale, bias, convergence.

    Parameters
    ----------
    result : BackgroundResult-like
        Has ``background``, ``rms`` and optionally ``mask``, ``history`` and mesh values
        (a :class:`skymap.pipeline.BackgroundResult` whose final model is a mesh or a
        smoother grid, or anything with a ``mesh`` like :class:`skymap.mesh.MeshResult`).
    evaluation : skymap.evaluate.Evaluation
        The scores of ``result`` (:func:`skymap.evaluate.evaluate`): it supplies the image,
        the truth when known, the RMS-vs-scale curves and the bias under sources.
    unit : str, optional
        The image's unit (FITS ``BUNIT``), for the colour bars.

    Returns
    -------
    dict of str -> Figure
        The figures the inputs allow: no mesh figure without mesh values, no bias figure
        without truth and catalogue, no convergence figure without a history.

    Examples
    --------
    >>> from skymap.quality.evaluate import evaluate
    >>> from skymap.quality.simulate import notebook_scene
    >>> scene = notebook_scene(shrink_factor=8)
    >>> class Fit:  # any object with background, rms and mask
    ...     background, rms, mask = scene.sky, scene.sky * 0 + 0.1, scene.sources > 0.05
    >>> sorted(report_figures(Fit, evaluate(None, Fit, scene=scene)))
    ['bias', 'maps', 'residuals', 'rms_vs_scale']
    """
    from skymap.app import plot

    ev = evaluation
    background = np.asarray(result.background)
    mask = ev.mask if ev.mask is not None else _attr(result, "mask")
    rms = _attr(result, "rms")
    figures = {
        "maps": plot.plot_maps(ev.image, background, mask=mask, rms=rms, truth=ev.truth, unit=unit)
    }
    mesh = _mesh_figure(result)
    if mesh is not None:
        figures[mesh[0]] = mesh[1]
    if rms is not None:
        # a regular subsample (<= ~1 Mpixel): no full-size residual for a histogram
        k = max(1, int(np.ceil(np.sqrt(background.size / (1 << 20)))))
        figures["residuals"] = plot.plot_residual_histogram(
            ev.image[::k, ::k] - background[::k, ::k],
            np.broadcast_to(np.asarray(rms), background.shape)[::k, ::k],
            mask=None if mask is None else np.asarray(mask)[::k, ::k],
        )
    if ev.rms_perfect is not None:
        refs = {"perfect (noise alone)": ev.rms_perfect}
    else:
        refs = {f"white noise {ev.noise_sigma:.3g}/w": ev.rms_white}
    verdict = ev.ratio_verdict.split(":")[0]
    figures["rms_vs_scale"] = plot.plot_rms_vs_scale(
        ev.widths,
        {"image - background": ev.rms},
        references=refs,
        title=f"RMS vs scale, large scales: {verdict}",
    )
    if ev.bias is not None:
        b = ev.bias
        figures["bias"] = plot.plot_bias(
            b.flux, b.radius, b.residual, masked=b.masked, control=b.random_residual
        )
    history = list(_attr(result, "history") or [])
    if history:
        figures["convergence"] = plot.plot_convergence(history)
    return figures


def _png_bytes(figure: Figure | bytes) -> bytes:
    from skymap.app import plot

    return figure if isinstance(figure, bytes) else plot.to_png(figure)


def render_html(
    *,
    title: str,
    figures: Mapping[str, Figure | bytes],
    metrics: Mapping[str, Any] | None = None,
    captions: Mapping[str, str] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> str:
    """One self-contained HTML page: title, run details, figures, then a metrics table.

    Parameters
    ----------
    title : str
        Page title.
    figures : mapping of name -> Figure or PNG bytes
        Shown in order, each embedded as a base64 PNG.
    metrics : mapping, optional
        Nested metrics, shown flattened (see :func:`flatten_metrics`).
    captions : mapping of name -> str, optional
        Captions by figure name; default :data:`CAPTIONS`.
    meta : mapping, optional
        Run details listed under the title (input file, skymap version, configuration).

    Returns
    -------
    str

    Examples
    --------
    >>> page = render_html(title="t", figures={}, metrics={"x": 1.0})
    >>> "<td class=\\"num\\">1</td>" in page
    True
    """
    captions = CAPTIONS if captions is None else captions
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    if meta:
        items = "".join(
            f"<li><b>{esc(str(k))}</b>: {esc(_format(v)[0])}</li>" for k, v in meta.items()
        )
        parts.append(f'<ul class="meta">{items}</ul>')
    if figures:
        parts.append("<h2>Figures</h2>")
    for name, figure in figures.items():
        data = base64.b64encode(_png_bytes(figure)).decode("ascii")
        caption = captions.get(name, "")
        parts.append(
            f'<figure id="{esc(name)}"><img alt="{esc(name)}" '
            f'src="data:image/png;base64,{data}">'
            f"<figcaption><b>{esc(name)}</b>. {esc(caption)}</figcaption></figure>"
        )
    if metrics:
        parts.append("<h2>Metrics</h2>")
        parts.extend(_metrics_tables(metrics))
    parts.append("</body></html>")
    return "\n".join(parts)


def _metrics_tables(metrics: Mapping[str, Any]) -> list[str]:
    """The metrics as one table per group (``fit``, ``evaluation.rms_vs_scale``, ...):
    scalars as rows, and lists of equal length side by side as one small table."""
    esc = html.escape
    groups: dict[str, dict[str, Any]] = {}

    def walk(d: Mapping[str, Any], prefix: str) -> None:
        for key, value in d.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping) and value:
                walk(value, f"{name}.")
            else:
                group, _, leaf = name.rpartition(".")
                groups.setdefault(group or "run", {})[leaf] = value

    walk(metrics, "")
    out = []
    for group, items in groups.items():
        out.append(f"<h3>{esc(group)}</h3>")
        scalars = {k: v for k, v in items.items() if not isinstance(v, (list, tuple, np.ndarray))}
        lists = {k: list(v) for k, v in items.items() if k not in scalars}
        if scalars:
            out.append("<table><tr><th>metric</th><th>value</th></tr>")
            for key, value in scalars.items():
                text, numeric = _format(value)
                cls = ' class="num"' if numeric else ""
                out.append(f"<tr><td>{esc(key)}</td><td{cls}>{esc(text)}</td></tr>")
            out.append("</table>")
        by_length: dict[int, dict[str, list]] = {}
        for key, values in lists.items():
            by_length.setdefault(len(values), {})[key] = values
        for columns in by_length.values():
            head = "".join(f"<th>{esc(k)}</th>" for k in columns)
            rows = []
            for row in zip(*columns.values(), strict=True):
                cells = []
                for v in row:
                    text, numeric = _format(v)
                    cls = ' class="num"' if numeric else ""
                    cells.append(f"<td{cls}>{esc(text)}</td>")
                rows.append(f"<tr>{''.join(cells)}</tr>")
            out.append(f'<table class="list"><tr>{head}</tr>{"".join(rows)}</table>')
    return out


def report_paths(
    directory: os.PathLike | str, names: Sequence[str], *, stem: str = "report"
) -> dict[str, Path]:
    """Paths written by :func:`write_report`: ``html`` plus one PNG per figure name."""
    directory = Path(directory)
    paths = {"html": directory / f"{stem}.html"}
    paths.update({name: directory / f"{stem}_{name}.png" for name in names})
    return paths


def write_report(
    directory: os.PathLike | str,
    *,
    title: str,
    figures: Mapping[str, Figure | bytes],
    metrics: Mapping[str, Any] | None = None,
    captions: Mapping[str, str] | None = None,
    meta: Mapping[str, Any] | None = None,
    stem: str = "report",
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write each figure as ``<stem>_<name>.png`` and the page as ``<stem>.html``.

    All files are checked before any is written; existing files raise
    :class:`skymap.io.OutputExistsError` unless ``overwrite``.

    Returns
    -------
    dict
        ``"html"`` and each figure name -> path.
    """
    paths = report_paths(directory, list(figures), stem=stem)
    check_outputs(paths.values(), overwrite=overwrite)
    Path(directory).mkdir(parents=True, exist_ok=True)
    pngs = {name: _png_bytes(fig) for name, fig in figures.items()}
    for name, png in pngs.items():
        atomic_write(paths[name], lambda fh, png=png: fh.write(png), overwrite=overwrite)
    page = render_html(title=title, figures=pngs, metrics=metrics, captions=captions, meta=meta)
    atomic_write(paths["html"], lambda fh: fh.write(page.encode("utf-8")), overwrite=overwrite)
    return paths
