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
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from skymap.app import plot
from skymap.app.io import atomic_write, check_outputs

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
    "maps": "The input image, the fitted background, the residual (image - background), "
    "the final mask (True = excluded), the background rms and, for simulations, the error "
    "of the background against the true sky.",
    "mesh": "The mesh: the value measured in each box (rejected boxes marked), and the "
    "full-resolution background interpolated from the boxes (grid lines drawn when the "
    "boxes are large enough to see).",
    "rms_vs_scale": "RMS of the residual averaged in square blocks, against block width. "
    "A perfect background leaves only noise: the dashed reference. Excess at large widths "
    "is background structure the model missed.",
    "bias": "Background error under each catalogued source against its flux and radius; "
    "the grey band is the same measurement at random positions.",
    "convergence": "How the iterative fit converged: change of the background (in units "
    "of its rms), mask fraction, and smoothing scale (or median rms) at each iteration; "
    "dotted lines mark new stages.",
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
    return plot.plot_mesh_grid(result.background, values, box, mesh_mask=excluded)


def report_figures(result: Any, evaluation: Any) -> dict[str, Figure]:
    """The standard figures of a fit, by name: maps, mesh, rms_vs_scale, bias, convergence.

    Parameters
    ----------
    result : BackgroundResult-like
        Has ``background``, ``rms`` and optionally ``mask``, ``history`` and mesh values
        (a :class:`skymap.pipeline.BackgroundResult` whose final model is a mesh or a
        smoother grid, or anything with a ``mesh`` like :class:`skymap.mesh.MeshResult`).
    evaluation : skymap.evaluate.Evaluation
        The scores of ``result`` (:func:`skymap.evaluate.evaluate`): it supplies the image,
        the truth when known, the RMS-vs-scale curves and the bias under sources.

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
    ['bias', 'maps', 'rms_vs_scale']
    """
    ev = evaluation
    background = np.asarray(result.background)
    mask = ev.mask if ev.mask is not None else _attr(result, "mask")
    figures = {
        "maps": plot.plot_maps(
            ev.image, background, mask=mask, rms=_attr(result, "rms"), truth=ev.truth
        )
    }
    mesh = _mesh_figure(result)
    if mesh is not None:
        figures["mesh"] = mesh
    if ev.rms_perfect is not None:
        refs = {"perfect (noise alone)": ev.rms_perfect}
    else:
        refs = {f"white noise {ev.noise_sigma:.3g}/w": ev.rms_white}
    verdict = " - OVERFIT" if ev.overfit else ""
    figures["rms_vs_scale"] = plot.plot_rms_vs_scale(
        ev.widths,
        {"image - background": ev.rms},
        references=refs,
        title=f"RMS vs scale: large-scale ratio to {ev.reference} "
        f"{ev.large_scale_ratio:.3f}{verdict}",
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
        parts.append("<h2>Metrics</h2><table><tr><th>metric</th><th>value</th></tr>")
        for key, value in flatten_metrics(metrics):
            text, numeric = _format(value)
            cls = ' class="num"' if numeric else ""
            parts.append(f"<tr><td>{esc(key)}</td><td{cls}>{esc(text)}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


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
