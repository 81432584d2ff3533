"""Figures: each plot shows exactly the data it is given, and renders to PNG headlessly."""

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from skymap.app import plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _images(fig):
    return [a for ax in fig.axes for a in ax.get_children() if isinstance(a, AxesImage)]


def _titled(fig):
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


def test_maps_show_image_background_residual_and_optional_panels(rng):
    image = rng.normal(10, 1, (40, 50))
    background = np.full_like(image, 10.0)
    mask = image > 11
    fig = plot.plot_maps(image, background)
    assert list(_titled(fig)) == ["image", "background", "image - background"]
    fig = plot.plot_maps(image, background, mask=mask, rms=np.ones_like(image), truth=image * 0)
    titles = list(_titled(fig))
    assert titles[3] == f"mask (excluded): {mask.mean():.1%}"
    assert titles[4:] == ["background rms", "background - truth"]
    residual_ax = _titled(fig)["image - background"]
    shown = [a for a in residual_ax.get_children() if isinstance(a, AxesImage)][0]
    np.testing.assert_allclose(shown.get_array(), image - background)


def test_maps_do_not_touch_inputs(rng):
    image = rng.normal(size=(16, 16))
    before = image.copy()
    plot.plot_maps(image, image * 0.5, mask=image > 0)
    np.testing.assert_array_equal(image, before)


def test_large_images_are_decimated_for_display():
    big = np.zeros((2100, 1500), np.float32)
    fig = plot.plot_maps(big, big)
    assert all(max(im.get_array().shape) <= 1024 for im in _images(fig))


def test_mesh_grid_draws_one_line_per_box_edge():
    fig = plot.plot_mesh_grid(np.zeros((60, 80)), np.arange(12.0).reshape(3, 4), (20, 20))
    mesh_ax = fig.axes[0]
    vertical = [ln for ln in mesh_ax.get_lines() if np.ptp(ln.get_xdata()) == 0]
    assert len(vertical) == 4 + 1
    assert len(mesh_ax.get_lines()) == (4 + 1) + (3 + 1)
    assert "3 x 4 meshes of 20 x 20 px" in mesh_ax.get_title()


def test_mesh_grid_marks_rejected_meshes():
    rejected = np.zeros((3, 4), bool)
    rejected[1, 2] = True
    fig = plot.plot_mesh_grid(np.zeros((60, 80)), np.zeros((3, 4)), 20, mesh_mask=rejected)
    crosses = [ln for ln in fig.axes[0].get_lines() if ln.get_label() == "rejected"]
    np.testing.assert_allclose(crosses[0].get_xydata(), [[2.5 * 20 - 0.5, 1.5 * 20 - 0.5]])


def test_fine_mesh_grid_gets_an_overlay_not_lines():
    rejected = np.zeros((100, 100), bool)
    rejected[:10] = True
    fig = plot.plot_mesh_grid(np.zeros((200, 200)), np.zeros((100, 100)), 2, mesh_mask=rejected)
    assert fig.axes[0].get_lines()[0].get_label() == "rejected"
    assert len(fig.axes[0].get_lines()) == 1
    assert len(_images(fig)) == 3  # mesh values, rejected overlay, full background


def test_rms_vs_scale_plots_curves_and_dashed_references():
    w = np.arange(3, 30)
    fig = plot.plot_rms_vs_scale(w, {"fit": 0.2 / w}, references={"white": 0.1 / w})
    ax = fig.axes[0]
    fit, ref = ax.get_lines()
    np.testing.assert_allclose(fit.get_ydata(), 0.2 / w)
    assert ref.get_linestyle() == "--"
    assert ax.get_xscale() == ax.get_yscale() == "log"


def test_bias_separates_masked_and_unmasked_sources(rng):
    n = 30
    masked = np.arange(n) % 3 == 0
    fig = plot.plot_bias(
        rng.random(n) * 50, rng.random(n) * 5, rng.normal(size=n), masked=masked, control=[0, 1]
    )
    counts = {c.get_label(): len(c.get_offsets()) for c in fig.axes[0].collections}
    assert counts == {"masked": masked.sum(), "unmasked": (~masked).sum()}


def test_convergence_reads_mappings_and_attributes_and_says_what_is_missing():
    class Record:
        def __init__(self, change, rms):
            self.change = change
            self.rms = rms

    fig = plot.plot_convergence([Record(1.0, np.full((3, 3), 2.0)), Record(0.01, 1.5)])
    change_ax, mask_ax, rms_ax = fig.axes[:3]
    np.testing.assert_allclose(change_ax.get_lines()[0].get_ydata(), [1.0, 0.01])
    np.testing.assert_allclose(rms_ax.get_lines()[0].get_ydata(), [2.0, 1.5])
    assert change_ax.get_yscale() == "log"
    assert [t.get_text() for t in mask_ax.texts] == ["not recorded"]
    assert rms_ax.get_title() == "median background rms"


def test_convergence_prefers_the_scale_and_marks_stages():
    hist = [
        {"stage": -1, "change": np.nan, "mask_fraction": 0.0, "scale": 100.0},
        {"stage": 0, "change": 1.0, "mask_fraction": 0.1, "scale": 50.0},
        {"stage": 0, "change": 0.1, "mask_fraction": 0.12, "scale": 50.0},
        {"stage": 1, "change": 0.05, "mask_fraction": 0.13, "scale": 25.0},
    ]
    fig = plot.plot_convergence(hist)
    assert fig.axes[2].get_title() == "smoothing scale (pixels)"
    dotted = [ln for ln in fig.axes[0].get_lines() if ln.get_linestyle() == ":"]
    assert [ln.get_xdata()[0] for ln in dotted] == [1.5, 3.5]


@pytest.mark.parametrize(
    "make",
    [
        lambda: plot.plot_maps(np.ones((8, 8)), np.ones((8, 8))),
        lambda: plot.plot_rms_vs_scale([3, 4], {"a": [1.0, 0.5]}),
        lambda: plot.plot_convergence([]),
    ],
)
def test_figures_render_to_png_of_the_requested_size(make):
    fig = make()
    assert isinstance(fig, Figure)
    png = plot.to_png(fig, dpi=50)
    assert png.startswith(PNG_MAGIC)
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    w_in, h_in = fig.get_size_inches()
    assert (width, height) == (round(w_in * 50), round(h_in * 50))
