"""Make the README picture, ``docs/images/overview.png``.

A 2 x 2 panel on the STScI "Complex 2D Background" scene
(:func:`skymap.simulate.notebook_scene`, 1000 x 1000, noise sigma 0.1): the simulated
image, the background found by :func:`skymap.fit`, that background minus the true sky
(in units of sigma) and the final source mask. Figures are built without pyplot, as in
:mod:`skymap.plot`, so the script never opens a window.

Usage::

    python docs/make_figures.py [--outdir docs/images]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

import skymap
from skymap.quality.simulate import notebook_scene

log = logging.getLogger("make_figures")


def overview_figure(scene, result) -> Figure:
    """The four panels: scene, fitted background, background - truth, mask."""
    sigma = scene.noise_sigma
    error = (result.background - scene.sky) / sigma
    rms_error = float(np.sqrt(np.mean(error**2)))
    sky_lo, sky_hi = np.percentile(scene.sky, (0.5, 99.5))
    # the scene shares the sky's scale, stretched upwards so that the galaxies show
    img_lo, img_hi = sky_lo - 2 * sigma, sky_hi + 4 * sigma
    err_lim = float(np.percentile(np.abs(error), 99.5))

    fig = Figure(figsize=(8.0, 8.0))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex=True, sharey=True)
    panels = [
        (scene.image, "simulated scene (STScI notebook)", "gray", img_lo, img_hi, None),
        (result.background, "skymap.fit background", "viridis", sky_lo, sky_hi, None),
        (
            error,
            f"background - true sky (RMS {rms_error:.3f} sigma)",
            "RdBu_r",
            -err_lim,
            err_lim,
            "sigma",
        ),
        (
            result.mask,
            f"source mask ({result.mask.mean():.0%} of pixels)",
            "gray_r",
            0,
            1,
            None,
        ),
    ]
    for ax, (data, title, cmap, lo, hi, unit) in zip(axes.flat, panels, strict=True):
        im = ax.imshow(data, origin="lower", cmap=cmap, vmin=lo, vmax=hi)
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=8)
        if unit:
            cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
            cbar.set_label(unit, fontsize=8)
            cbar.ax.tick_params(labelsize=8)
    fig.tight_layout()
    return fig


def save_png(fig: Figure, path: Path, cmaps: dict[str, int], dpi: int = 80) -> None:
    """Save ``fig`` as an optimised PNG with a palette made of its colour maps.

    The noisy image panel does not compress in true colour (about 270 kB at 80 dpi). A
    generic 256-colour quantisation bands the smooth maps, so the palette is built from
    ``cmaps`` (name -> number of levels, 256 in all) and the figure is dithered onto it:
    about 110 kB with no visible change.
    """
    levels = [colormaps[name](np.linspace(0.0, 1.0, n))[:, :3] for name, n in cmaps.items()]
    palette = np.round(np.concatenate(levels) * 255).astype(np.uint8)
    holder = Image.new("P", (1, 1))
    holder.putpalette(palette.ravel().tolist())
    fig.set_dpi(dpi)
    fig.canvas.draw()
    rgb = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
    rgb.quantize(palette=holder, dither=Image.Dither.FLOYDSTEINBERG).save(path, optimize=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--outdir",
        type=Path,
        default=Path(__file__).parent / "images",
        help="directory for the PNG files (default: docs/images next to this script)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    scene = notebook_scene(shrink_factor=2)
    result = skymap.fit(scene.image)
    args.outdir.mkdir(parents=True, exist_ok=True)
    path = args.outdir / "overview.png"
    # gray and gray_r share the gray levels; black and white are their ends
    save_png(overview_figure(scene, result), path, {"gray": 96, "viridis": 72, "RdBu_r": 88})
    log.info("wrote %s (%d kB)", path, path.stat().st_size // 1024)


if __name__ == "__main__":
    main()
