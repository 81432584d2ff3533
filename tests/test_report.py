"""The HTML report: self-contained, escaped, complete, written safely, and rendered by a
real headless browser."""

import base64
import re
import shutil
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
from matplotlib.image import imread

from skymap.app import io, plot, report
from skymap.background.convergence import SETTLED_STOPS, STOPS
from skymap.quality.evaluate import evaluate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _result(rng, shape=(96, 96), box=32):
    background = np.add.outer(np.linspace(0, 1, shape[0]), np.linspace(0, 0.5, shape[1]))
    image = background + rng.normal(0, 0.1, shape)
    history = [
        {"change": 1.0, "mask_fraction": 0.05, "rms": 0.11},
        {"change": 0.02, "mask_fraction": 0.06, "rms": 0.1},
    ]
    mesh = SimpleNamespace(
        mesh_background=background[box // 2 :: box, box // 2 :: box], box_size=box
    )
    result = SimpleNamespace(
        background=background,
        rms=np.full(shape, 0.1),
        mask=image - background > 0.25,
        history=history,
        mesh=mesh,
    )
    return image, result


@pytest.fixture(scope="module")
def real_report(tmp_path_factory, data_dir_module):
    """The report of the default fit of a real image (the Spitzer cutout, MJy/sr)."""
    from skymap.app.cli.run import run_file

    out = tmp_path_factory.mktemp("real")
    info = run_file(data_dir_module / "spitzer_cutout.fits", out)
    return info, out / "spitzer_cutout_report.html"


@pytest.fixture(scope="module")
def data_dir_module():
    from pathlib import Path

    return Path(__file__).parent / "data"


@pytest.mark.parametrize("stop", STOPS)
def test_the_headline_points_to_a_tune_where_the_masks_did_not_settle(stop):
    from types import SimpleNamespace

    from skymap.app.cli.common import headline

    result = SimpleNamespace(
        mask=np.zeros((4, 4), bool), history=[], converged=stop != "cap", stop=stop,
        convergence_note=f"stopped: {stop}",
    )  # fmt: skip
    ev = SimpleNamespace(truth_metrics=None, reference="white", ratio_verdict="ok",
                         masked_vs_unmasked=None)  # fmt: skip
    lines = headline(result, ev)
    assert ("next step" in lines) == (stop not in SETTLED_STOPS)
    if stop not in SETTLED_STOPS:
        assert f"stop: {stop}" in lines["next step"] and "skymap tune" in lines["next step"]


def test_real_image_report_states_unit_convergence_and_no_false_verdict(real_report):
    info, html_path = real_report
    page = html_path.read_text()
    fit = info["metrics"]["fit"]
    assert "<b>unit</b>: MJy/sr" in page
    if fit["stop"] == "backed_off":  # converged, but not by settling: the page says so
        assert "converged by backing off a runaway mask" in page
    else:
        assert ("converged after" in page) if fit["converged"] else ("NOT CONVERGED" in page)
    # a fit whose masks did not settle on their own points the reader to a tune
    assert ("skymap tune IMAGE" in page) == (fit["stop"] not in SETTLED_STOPS)
    # 64 x 64 with most pixels masked: too few clean blocks for any ratio
    assert "n/a (too few clean blocks)" in page and "OVERFIT" not in page
    # the default fit shows its cell grid, not a mesh figure; every figure has a caption
    assert 'id="cells"' in page and 'id="mesh"' not in page
    assert page.count("<figcaption>") == page.count("<figure")
    assert "stage -1 is the first guess" in page
    # the sky/source scale is stated, with the source-tracking check's doing if any
    assert fit["max_source_size"] > 0 and fit["smoothing_floor"] >= fit["max_source_size"] / 2
    assert "sky/source scale" in page and "max_source_size" in page
    if fit["floor_raised_by_tracking"]:
        assert "source-tracking correlation" in page
    # grouped metrics: lists as small tables, not "[27 values]"
    assert "<h3>evaluation.rms_vs_scale</h3>" in page and "values]" not in page


def test_maps_have_pixel_axes_unit_colour_bars_and_the_mask_outline(rng):
    image, result = _result(rng)
    fig = plot.plot_maps(image, result.background, mask=result.mask, unit="MJy/sr")
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert all(ax.get_xlabel() == "x (pixel)" for ax in titled)
    bars = [ax for ax in fig.axes if not ax.get_title() and ax.get_visible()]
    assert {ax.get_ylabel() for ax in bars} == {"MJy/sr"}
    from astropy.visualization import AsinhStretch

    assert isinstance(titled[0].images[0].norm.stretch, AsinhStretch)
    assert titled[0].collections  # the mask's contour


def test_residual_histogram_matches_the_noise_model(rng):
    residual = rng.normal(0, 2.0, (128, 128))
    fig = plot.plot_residual_histogram(residual, 2.0)
    heights = np.array([p.get_height() for p in fig.axes[0].patches])
    centres = np.array([p.get_x() + p.get_width() / 2 for p in fig.axes[0].patches])
    core = np.abs(centres) < 1
    gauss = np.exp(-0.5 * centres[core] ** 2) / np.sqrt(2 * np.pi)
    np.testing.assert_allclose(heights[core], gauss, rtol=0.15)


@pytest.fixture(scope="module")
def pngs():
    """The standard figures of a small fit, rendered once for the tests that write pages."""
    image, result = _result(np.random.default_rng(3))
    figs = report.report_figures(result, evaluate(image, result))
    return {name: plot.to_png(fig, dpi=40) for name, fig in figs.items()}


def test_flatten_metrics_nests_and_summarises_long_lists():
    rows = report.flatten_metrics({"a": {"b": {"c": 1}}, "l": [1, 2], "long": np.arange(30)})
    assert rows == [("a.b.c", 1), ("l", "1, 2"), ("long", "[30 values]")]


def test_page_is_self_contained_and_escaped():
    png = b"\x89PNG\r\n\x1a\nfake"
    page = report.render_html(
        title="<script>alert(1)</script>",
        figures={"maps": png},
        metrics={"rms<": 0.123456789, "flag": True, "nan": float("nan")},
        meta={"input": "a&b.fits"},
    )
    assert "<script>" not in page
    assert "&lt;script&gt;" in page and "a&amp;b.fits" in page
    assert not re.search(r"(src|href)=\"(?!data:)", page)  # nothing loaded from outside
    embedded = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    assert base64.b64decode(embedded) == png
    assert '<td class="num">0.12346</td>' in page and "<td>True</td>" in page
    assert '<td class="num">nan</td>' in page


def test_report_figures_from_a_fit_with_truth(rng):
    from astropy.table import Table

    image, result = _result(rng)
    catalog = Table({"x_mean": [10.0, 50.0], "y_mean": [20.0, 60.0], "flux": [1.0, 9.0]})
    catalog["re"] = [1.0, 2.0]
    noise = image - result.background
    ev = evaluate(image, result, truth=result.background, noise=noise, catalog=catalog)
    figs = report.report_figures(result, ev)
    assert list(figs) == ["maps", "mesh", "residuals", "rms_vs_scale", "bias", "convergence"]
    assert "background - truth" in [ax.get_title() for ax in figs["maps"].axes]
    # background = truth, so the residual is the noise: the curve equals the perfect one
    fit, perfect = figs["rms_vs_scale"].axes[0].get_lines()
    assert perfect.get_label() == "perfect (noise alone)"
    np.testing.assert_allclose(fit.get_ydata(), perfect.get_ydata())
    # and every source shows zero bias
    points = [c for c in figs["bias"].axes[0].collections if c.get_label() != "_nolegend_"]
    assert all(np.allclose(np.asarray(c.get_offsets())[:, 1], 0.0) for c in points)


def test_report_figures_on_real_data_use_the_white_noise_reference(rng):
    image, result = _result(rng)
    del result.mesh
    result.history = []
    figs = report.report_figures(result, evaluate(image, result))
    assert list(figs) == ["maps", "residuals", "rms_vs_scale"]
    labels = [ln.get_label() for ln in figs["rms_vs_scale"].axes[0].get_lines()]
    sigma = float(re.match(r"white noise ([0-9.]+)/w", labels[1]).group(1))
    assert sigma == pytest.approx(0.1, rel=0.1)


def test_write_report_writes_pngs_and_page_and_refuses_to_overwrite(tmp_path, pngs):
    figs = pngs
    paths = report.write_report(tmp_path, title="t", figures=figs, metrics={"x": 1})
    assert set(paths) == {"html", *figs}
    for name, png in figs.items():
        assert paths[name].read_bytes() == png
    with pytest.raises(io.OutputExistsError, match="--overwrite"):
        report.write_report(tmp_path, title="t", figures=figs)
    report.write_report(tmp_path, title="again", figures=figs, overwrite=True)
    assert "<title>again</title>" in paths["html"].read_text()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Appended to a copy of the page: after load, record how many images actually decoded.
_PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute("data-decoded", ok + "/" + imgs.length);
});
</script>"""


@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"
)
@pytest.mark.parametrize("which", ["synthetic", "real image"])
def test_report_renders_in_headless_chromium(tmp_path, pngs, real_report, which):
    if which == "synthetic":
        figs = pngs
        paths = report.write_report(tmp_path / "r", title="browser check", figures=figs)
    else:
        html_path = real_report[1]
        figs = list(html_path.parent.glob("*_report_*.png"))
        paths = {"html": html_path}
    probe = tmp_path / "probe.html"
    probe.write_text(paths["html"].read_text() + _PROBE)
    profile = tmp_path / "profile"
    base = [CHROMIUM, *_FLAGS, f"--user-data-dir={profile}"]
    dom = subprocess.run(
        [*base, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert f'data-decoded="{len(figs)}/{len(figs)}"' in dom
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*base, "--window-size=1000,1400", f"--screenshot={shot}", paths["html"].as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    pixels = imread(shot)
    assert pixels.shape[:2] == (1400, 1000)
    # a rendered page: mostly white background, but with figures and text drawn on it
    dark = (pixels[..., :3].mean(axis=-1) < 0.5).mean()
    assert 0.01 < dark < 0.9
