"""A report of a background fit: PNG figures and one self-contained HTML page.

:func:`report_figures` turns a fit result (and, when there is one, an evaluation and the
simulated truth) into the standard figures of :mod:`skymap.plot`; :func:`render_html`
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

from skymap import plot
from skymap.io import atomic_write, check_outputs

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
    "mesh": "The mesh: background value of each box, and the box grid over the "
    "full-resolution background.",
    "rms_vs_scale": "RMS of the residual averaged in square blocks, against block width. "
    "A perfect background leaves only noise: the dashed reference. Excess at large widths "
    "is background structure the model missed.",
    "bias": "Background error under each catalogued source against its flux and radius; "
    "the grey band is the same measurement at random positions.",
    "convergence": "How the iterative fit converged: change of the background, mask "
    "fraction and median rms at each iteration.",
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
    """The mesh-grid figure, when the result exposes its mesh values and box size."""
    mesh = _attr(result, "mesh", "mesh_result")
    source = mesh if mesh is not None else result
    values = _attr(source, "mesh_background", "mesh_values", "background_mesh")
    box = _attr(source, "box_size")
    if box is None:
        box = _attr(_attr(source, "config"), "box_size")
    if values is None or box is None:
        return None
    return plot.plot_mesh_grid(
        result.background,
        values,
        box,
        mesh_mask=_attr(source, "mesh_mask", "rejected"),
    )


def _source_bias(background, truth, catalog, mask, *, seed: int = 0):
    """Mean of ``background - truth`` in the 3x3 box at each source and at random spots."""
    err = np.asarray(background, dtype=np.float64) - np.asarray(truth, dtype=np.float64)
    ny, nx = err.shape
    # A true 3x3 box: rows y-1..y+1 and columns x-1..x+1, clipped at the edges.
    dy, dx = np.mgrid[-1:2, -1:2]

    def boxes(y, x):
        yy = np.clip(np.rint(y).astype(int)[:, None] + dy.ravel(), 0, ny - 1)
        xx = np.clip(np.rint(x).astype(int)[:, None] + dx.ravel(), 0, nx - 1)
        return np.nanmean(err[yy, xx], axis=1), yy[:, 4], xx[:, 4]

    x = np.asarray(catalog["x_mean"], dtype=float)
    y = np.asarray(catalog["y_mean"], dtype=float)
    bias, yc, xc = boxes(y, x)
    masked = np.asarray(mask, dtype=bool)[yc, xc] if mask is not None else None
    rng = np.random.default_rng(seed)
    control, _, _ = boxes(rng.uniform(0, ny - 1, 2000), rng.uniform(0, nx - 1, 2000))
    return bias, masked, control


def report_figures(
    image: np.ndarray,
    result: Any,
    *,
    evaluation: Any = None,
    truth: np.ndarray | None = None,
    catalog: Any = None,
    widths: Sequence[int] = range(3, 30),
) -> dict[str, Figure]:
    """The standard figures of a fit, by name: maps, mesh, rms_vs_scale, bias, convergence.

    Parameters
    ----------
    image : ndarray
        The fitted image.
    result : BackgroundResult-like
        Has ``background``, ``rms``, ``mask`` and optionally ``history`` and mesh values.
    evaluation : optional
        Unused fields are ignored; reserved for scores computed elsewhere.
    truth : ndarray, optional
        True sky (simulations): adds the error map, the perfect RMS-vs-scale reference
        and, with ``catalog``, the bias under sources.
    catalog : Table, optional
        True sources with ``x_mean``, ``y_mean``, ``flux`` and ``re`` columns.
    widths : sequence of int
        Block widths of the RMS-vs-scale curve.

    Returns
    -------
    dict of str -> Figure
        Figures that the inputs allow (no mesh figure without mesh values, no bias
        figure without truth and catalogue).
    """
    from skymap import evaluate

    image = np.asarray(image)
    background = np.asarray(result.background)
    mask = None if result.mask is None else np.asarray(result.mask, dtype=bool)
    figures = {"maps": plot.plot_maps(image, background, mask=mask, rms=result.rms, truth=truth)}
    mesh = _mesh_figure(result)
    if mesh is not None:
        figures["mesh"] = mesh
    residual = image - background
    widths = list(widths)
    curves = {"image - background": evaluate.rms_vs_scale(residual, mask, widths)}
    if truth is not None:
        refs = {"perfect: image - true sky": evaluate.rms_vs_scale(image - truth, mask, widths)}
    else:
        sigma = evaluate.pixel_sigma(residual, mask)
        refs = {f"white noise {sigma:.3g}/w": evaluate.white_noise_curve(sigma, widths)}
    figures["rms_vs_scale"] = plot.plot_rms_vs_scale(widths, curves, references=refs)
    if truth is not None and catalog is not None and len(catalog):
        bias, masked, control = _source_bias(background, truth, catalog, mask)
        figures["bias"] = plot.plot_bias(
            catalog["flux"], catalog["re"], bias, masked=masked, control=control
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
    """One self-contained HTML page: title, run details, figures and a metrics table.

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
    if metrics:
        parts.append("<h2>Metrics</h2><table><tr><th>metric</th><th>value</th></tr>")
        for key, value in flatten_metrics(metrics):
            text, numeric = _format(value)
            cls = ' class="num"' if numeric else ""
            parts.append(f"<tr><td>{esc(key)}</td><td{cls}>{esc(text)}</td></tr>")
        parts.append("</table>")
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
