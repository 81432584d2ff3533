"""The ``skymap`` command, driven in-process through ``main([...])``: exit codes, help,
refusal to overwrite, and the commands end to end on small inputs."""

import argparse
import hashlib
import json
import re
import shlex
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from skymap.app import cli, io
from skymap.app.cli import common

SUBCOMMANDS = ("demo", "run", "batch", "simulate", "evaluate", "match", "config")


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_help_lists_commands_and_exit_codes(capsys):
    assert cli.main(["--help"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out
    assert "exit codes:" in out and "--overwrite" in out and "skymap demo" in out


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_command_has_help_with_exit_codes(name, capsys):
    assert cli.main([name, "--help"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith(f"usage: skymap {name}") and "exit codes:" in out


def _subcommands():
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def _help_examples(help_text):
    """The invocations under ``examples:`` (a trailing comment follows two spaces, a
    backslash continues a line, ``&&`` chains two commands)."""
    block = help_text.split("\nexamples:\n", 1)[1].split("\n\n", 1)[0]
    block = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in block.splitlines():
        for command in line.strip().split("&&"):
            commands.append(re.split(r"\s{2,}", command.strip())[0])
    return commands


def test_every_command_help_shows_its_own_examples_and_they_parse(capsys):
    # the subcommands as registered, so a new one without examples fails here
    commands = _subcommands()
    assert {"tune", "compare"} <= set(commands) and set(SUBCOMMANDS) <= set(commands)
    parser = cli.build_parser()
    for name in commands:
        assert cli.main([name, "--help"]) == cli.EXIT_OK
        examples = _help_examples(capsys.readouterr().out)
        own = [e for e in examples if e.split()[:2] == ["skymap", name]]
        assert len(own) >= 2, (name, examples)
        for example in examples:  # each is a valid command line, not prose
            argv = shlex.split(example)
            assert argv[0] == "skymap", example
            parser.parse_args(argv[1:])


def test_scene_choices_are_the_simulators_scenes():
    from skymap.quality import simulate

    assert common.SCENES == simulate.SCENE_NAMES


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "skymap 0.1.0"


@pytest.mark.parametrize(
    "argv",
    [[], ["frobnicate"], ["run"], ["run", "a.fits", "--bogus"], ["batch", "a.fits"]],
)
def test_bad_usage_exits_2(argv, capsys):
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "usage:" in capsys.readouterr().err


def test_missing_input_exits_2_and_names_the_file(tmp_path, capsys):
    code = cli.main(["run", str(tmp_path / "nope.fits"), "-o", str(tmp_path / "o"), "-q"])
    assert code == cli.EXIT_USAGE
    assert "nope.fits does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_dq_bits_exit_2(data_dir, tmp_path, capsys):
    argv = ["run", str(data_dir / "spitzer_cutout.fits"), "-o", str(tmp_path), "-q"]
    assert cli.main([*argv, "--dq-bits", "1,x"]) == cli.EXIT_USAGE
    assert "--dq-bits" in capsys.readouterr().err


def test_run_refuses_to_overwrite_before_any_work(data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "spitzer_cutout_rms.fits").write_bytes(b"precious")

    def must_not_fit(*args, **kwargs):
        raise AssertionError("fitted although the outputs exist")

    monkeypatch.setattr(common, "fit_image", must_not_fit)
    code = cli.main(["run", str(data_dir / "spitzer_cutout.fits"), "-o", str(out), "-q"])
    assert code == cli.EXIT_EXISTS
    err = capsys.readouterr().err
    assert "spitzer_cutout_rms.fits" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["spitzer_cutout_rms.fits"]
    assert (out / "spitzer_cutout_rms.fits").read_bytes() == b"precious"


def test_runtime_failure_exits_1(data_dir, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("the fit fell over")

    monkeypatch.setattr(common, "fit_image", broken)
    code = cli.main(["run", str(data_dir / "spitzer_cutout.fits"), "-o", str(tmp_path), "-q"])
    assert code == cli.EXIT_FAILURE
    assert "the fit fell over" in capsys.readouterr().err


def test_pipeline_iterations_show_on_the_progress_bar(rng):
    from skymap.background.defaults import fit

    class Bar:
        shown = []

        def set_postfix_str(self, text):
            self.shown.append(text)

    res = fit(rng.normal(size=(64, 64)), callback=common.iteration_report(Bar(), quiet=False))
    assert len(Bar.shown) == len(res.history)
    assert Bar.shown[1].startswith("fitting: stage 0 iteration 0: change ")
    assert common.iteration_report(Bar(), quiet=True) is None


def test_simulate_writes_the_scene_and_its_truth(tmp_path):
    from skymap.quality import simulate

    out = tmp_path / "sim"
    assert cli.main(["simulate", "-o", str(out), "--shrink-factor", "8", "-q"]) == 0
    scene = simulate.notebook_scene(seed=4, shrink_factor=8)
    np.testing.assert_array_equal(fits.getdata(out / "notebook_image.fits"), scene.image)
    np.testing.assert_array_equal(fits.getdata(out / "notebook_sky.fits"), scene.sky)
    from astropy.table import Table

    cat = Table.read(out / "notebook_catalog.ecsv")
    np.testing.assert_array_equal(cat["flux"], scene.catalog["flux"])
    assert cli.main(["simulate", "-o", str(out), "--shrink-factor", "8", "-q"]) == 3


def test_evaluate_scores_a_map_against_the_simulated_truth(tmp_path, capsys):
    sim = tmp_path / "sim"
    assert cli.main(["simulate", "-o", str(sim), "--shrink-factor", "8", "-q"]) == 0
    f = {k: str(sim / f"notebook_{k}.fits") for k in ("image", "sky", "noise", "sources")}
    # the true sky as the "background": a perfect model, zero error
    out = tmp_path / "m.json"
    argv = ["evaluate", f["image"], f["sky"], "--truth", f["sky"], "--noise", f["noise"]]
    argv += ["--catalog", str(sim / "notebook_catalog.ecsv"), "-o", str(out)]
    assert cli.main(argv) == 0
    assert "background error RMS = 0.0000 sigma" in capsys.readouterr().out
    ev = json.loads(out.read_text())["evaluation"]
    assert ev["truth"]["rms_error"] == 0.0
    assert ev["rms_vs_scale"]["reference"] == "perfect"
    # no mask given: the residual still holds the sources, far above the noise alone
    assert min(ev["rms_vs_scale"]["ratio"]) > 1.5
    assert ev["bias"] is not None
    # real-data mode: a source mask gives the masked-vs-unmasked test
    io.write_image(tmp_path / "mask.fits", fits.getdata(f["sources"]) > 0.05, product="mask")
    argv = ["evaluate", f["image"], f["sky"], "--mask", str(tmp_path / "mask.fits")]
    assert cli.main([*argv, "-o", str(tmp_path / "r.json"), "-q"]) == 0
    ev = json.loads((tmp_path / "r.json").read_text())["evaluation"]
    assert ev["masked_vs_unmasked"]["n_masked"] > 0 and ev["truth"] is None


# ----------------------------------------------------------------------- sky matching


def _overlapping_pair(tmp_path, offsets=(1.0, 3.5)):
    rng = np.random.default_rng(7)
    paths = []
    for i, level in enumerate(offsets):
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = [150.0, 2.0]
        w.wcs.cdelt = [-1e-4, 1e-4]
        w.wcs.crpix = [50.0 - 60 * i, 50.0]  # the second image starts 60 px further east
        data = level + rng.normal(0, 0.1, (100, 100))
        p = tmp_path / f"tile{i}.fits"
        fits.PrimaryHDU(data.astype(np.float32), header=w.to_header()).writeto(p)
        paths.append(p)
    return paths


def test_match_finds_the_relative_sky_levels(tmp_path):
    paths = _overlapping_pair(tmp_path)
    out = tmp_path / "m"
    argv = ["match", *map(str, paths), "-o", str(out), "--method", "match", "--subtract", "-q"]
    assert cli.main(argv) == 0
    summary = json.loads((out / "skymatch.json").read_text())
    sky = [s["sky"] for s in summary["images"]]
    assert sky[1] - sky[0] == pytest.approx(2.5, abs=0.02)
    assert summary["groups"] == [[0, 1]]
    matched = [fits.getdata(out / f"tile{i}_skymatched.fits") for i in range(2)]
    assert np.median(matched[1]) - np.median(matched[0]) == pytest.approx(0.0, abs=0.03)
    assert fits.getheader(out / "tile1_skymatched.fits")["CRPIX1"] == -10.0
    original = fits.getdata(paths[1]).astype(np.float32)
    np.testing.assert_allclose(matched[1], original - np.float32(sky[1]), rtol=1e-6, atol=1e-5)


# ----------------------------------------------------------------------- end to end


@pytest.fixture
def mesh_toml(tmp_path):
    """A single-pass mesh configuration: run and batch work without the pipeline."""
    from skymap.app import config
    from skymap.background.mesh import MeshBackground

    return config.save_toml(MeshBackground(box_size=16), tmp_path / "mesh.toml")


@pytest.mark.parametrize("name", ["m6707hh_cutout.fits", "spitzer_cutout.fits"])
def test_run_with_a_config_file_on_real_data(name, data_dir, tmp_path, mesh_toml):
    src = data_dir / name
    before = _sha(src)
    out = tmp_path / "out"
    argv = ["run", str(src), "-o", str(out), "--config", str(mesh_toml), "-q", "--no-report"]
    assert cli.main(argv) == 0
    assert _sha(src) == before
    stem = name.removesuffix(".fits")
    image = io.read_image(src)
    background = fits.getdata(out / f"{stem}_background.fits")
    assert np.all(np.isfinite(background[np.isfinite(image.data)]))
    header = fits.getheader(out / f"{stem}_subtracted.fits")
    from skymap.app.config import load_toml

    assert header["SKYPROD"] == "subtracted" and header["SKYSRC"] == name
    assert header["SKYCFGH"] == io.config_hash(load_toml(mesh_toml))
    assert header["TELESCOP"] == image.header["TELESCOP"]
    np.testing.assert_allclose(
        fits.getdata(out / f"{stem}_subtracted.fits"), image.data - background, rtol=1e-6
    )
    mask = fits.getdata(out / f"{stem}_mask.fits")
    np.testing.assert_array_equal(mask.astype(bool), ~np.isfinite(image.data))
    metrics = json.loads((out / f"{stem}_metrics.json").read_text())
    assert metrics["fit"]["finite_background_where_input_finite"] is True
    assert metrics["input"]["nonfinite_pixels"] == int((~np.isfinite(image.data)).sum())
    assert set(metrics["evaluation"]) >= {"rms_vs_scale", "masked_vs_unmasked"}


def test_config_written_by_the_command_drives_run(data_dir, tmp_path, capsys):
    from skymap.app import config
    from skymap.background.mesh import MeshBackground

    assert cli.main(["config", "--kind", "sextractor", "--box-size", "16"]) == 0
    expected = MeshBackground.like_sextractor(box_size=16)
    assert config.loads_toml(capsys.readouterr().out) == expected
    toml = tmp_path / "sex.toml"
    assert cli.main(["config", "--kind", "sextractor", "--box-size", "16", "-o", str(toml)]) == 0
    assert cli.main(["config", "--kind", "mesh", "-o", str(toml), "-q"]) == cli.EXIT_EXISTS
    src = str(data_dir / "spitzer_cutout.fits")
    out = tmp_path / "out"
    assert cli.main(["run", src, "-o", str(out), "--config", str(toml), "-q", "--no-report"]) == 0
    header = fits.getheader(out / "spitzer_cutout_background.fits")
    assert header["SKYCFGH"] == io.config_hash(expected)


def test_pipeline_config_needs_no_image(tmp_path):
    from skymap.app.config import load_toml
    from skymap.background.defaults import default_pipeline

    assert cli.main(["config", "-o", str(tmp_path / "p.toml"), "-q"]) == 0
    assert load_toml(tmp_path / "p.toml") == default_pipeline()


def test_run_on_a_sci_dq_file_masks_the_chosen_flags(tmp_path, rng, mesh_toml):
    sci = rng.normal(100.0, 1.0, (48, 48)).astype(">f4")
    dq = np.zeros(sci.shape, ">i2")
    dq[10, 10], dq[20, 20], dq[30, 30] = 4, 16, 4 | 16
    hdul = fits.HDUList(
        [fits.PrimaryHDU(), fits.ImageHDU(sci, name="SCI"), fits.ImageHDU(dq, name="DQ")]
    )
    hdul.writeto(tmp_path / "exp.fits")
    argv = ["run", str(tmp_path / "exp.fits"), "--config", str(mesh_toml), "-q", "--no-report"]
    assert cli.main([*argv, "-o", str(tmp_path / "o"), "--dq-bits", "bit4"]) == 0
    mask = fits.getdata(tmp_path / "o" / "exp_mask.fits").astype(bool)
    assert list(zip(*np.nonzero(mask), strict=True)) == [(20, 20), (30, 30)]
    metrics = json.loads((tmp_path / "o" / "exp_metrics.json").read_text())
    assert metrics["input"]["hdu"] == "SCI" and metrics["input"]["flagged_pixels"] == 2


def test_later_chips_get_their_own_output_names():
    assert common.output_stem("a/j8xi01flt.fits", "SCI,2") == "j8xi01flt_sci2"
    assert (
        common.output_stem("a/j8xi01flt.fits", "SCI,1")
        == common.output_stem("b/j8xi01flt.fits.fz")
        == "j8xi01flt"
    )


def test_data_the_fit_cannot_use_exits_2(tmp_path, capsys):
    fits.PrimaryHDU(np.full((32, 32), np.nan, np.float32)).writeto(tmp_path / "nan.fits")
    argv = ["run", str(tmp_path / "nan.fits"), "-o", str(tmp_path / "o"), "-q"]
    from skymap.app import config
    from skymap.background.mesh import MeshBackground

    toml = config.save_toml(MeshBackground(box_size=8), tmp_path / "m.toml")
    assert cli.main([*argv, "--config", str(toml)]) == cli.EXIT_USAGE
    assert "cannot fit this image" in capsys.readouterr().err


def test_bad_config_file_exits_2(data_dir, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('type = "skymap.mesh:MeshBackground"\nbox_size = -3\n')
    argv = ["run", str(data_dir / "spitzer_cutout.fits"), "-o", str(tmp_path), "-q"]
    assert cli.main([*argv, "--config", str(bad)]) == cli.EXIT_USAGE
    assert "box_size" in capsys.readouterr().err


def test_batch_on_a_local_dask_cluster_equals_run_file_by_file(data_dir, tmp_path, mesh_toml):
    inputs = [data_dir / "m6707hh_cutout.fits", data_dir / "spitzer_cutout.fits"]
    common = ["--config", str(mesh_toml), "-q", "--no-report"]
    # thread workers: the same LocalCluster and code path without paying, per worker
    # process, the imports and kernel compilation again (see `skymap batch --help`)
    out = str(tmp_path / "b")
    argv = ["batch", *map(str, inputs), "-o", out, "--workers", "2", "--threads", *common]
    assert cli.main(argv) == 0
    for src in inputs:
        stem = src.name.removesuffix(".fits")
        assert cli.main(["run", str(src), "-o", str(tmp_path / "r" / stem), *common]) == 0
        ran = sorted(p.name for p in (tmp_path / "r" / stem).iterdir())
        batched = sorted(p.name for p in (tmp_path / "b" / stem).iterdir())
        assert ran == batched and f"{stem}_metrics.json" in ran
        for name in ran:
            assert _sha(tmp_path / "r" / stem / name) == _sha(tmp_path / "b" / stem / name)
    # a second batch refuses up front, before starting any cluster
    assert cli.main(argv) == cli.EXIT_EXISTS


def test_batch_goes_on_past_a_bad_file_and_reports_it(data_dir, tmp_path, mesh_toml, capsys):
    bad = tmp_path / "broken.fits"
    bad.write_bytes(b"SIMPLE  = this is not FITS")
    good = data_dir / "spitzer_cutout.fits"
    out = tmp_path / "b"
    argv = ["batch", str(bad), str(good), "-o", str(out), "--threads", "--workers", "2"]
    code = cli.main([*argv, "--config", str(mesh_toml), "-q", "--no-report"])
    assert code == cli.EXIT_USAGE
    assert "broken.fits" in capsys.readouterr().err
    assert (out / "spitzer_cutout" / "spitzer_cutout_background.fits").exists()
    assert not (out / "broken").exists()


@pytest.mark.parametrize("name", ["m6707hh_cutout.fits", "spitzer_cutout.fits"])
def test_run_with_the_default_pipeline_on_real_data(name, data_dir, tmp_path, capsys):
    from skymap.background.convergence import SETTLED_STOPS

    src = data_dir / name
    before = _sha(src)
    out = tmp_path / "out"
    assert cli.main(["run", str(src), "-o", str(out), "--no-report"]) == 0
    assert _sha(src) == before
    # a fit whose masks did not settle on their own ends by pointing to a tune
    said = capsys.readouterr().out
    stop = json.loads((out / f"{name.removesuffix('.fits')}_metrics.json").read_text())["fit"]
    assert ("next step:" in said and "skymap tune" in said) == (stop["stop"] not in SETTLED_STOPS)
    stem = name.removesuffix(".fits")
    image = io.read_image(src).data
    background = fits.getdata(out / f"{stem}_background.fits")
    assert np.all(np.isfinite(background[np.isfinite(image)]))
    metrics = json.loads((out / f"{stem}_metrics.json").read_text())
    assert metrics["evaluation"]["masked_vs_unmasked"] is not None


def test_demo_end_to_end_on_a_small_scene(tmp_path):
    out = tmp_path / "demo"
    assert cli.main(["demo", "-o", str(out), "--shrink-factor", "8", "-q"]) == 0
    for product in ("image", "sky", *io.PRODUCTS):
        assert (out / f"notebook_{product}.fits").exists()
    metrics = json.loads((out / "notebook_metrics.json").read_text())
    # a fitted background on this scene is far better than no model at all (error ~ sky)
    assert metrics["evaluation"]["truth"]["rms_error_sigma"] < 1.0
    page = (out / "notebook_report.html").read_text()
    assert page.count("data:image/png;base64,") >= 5
    rms_sigma = metrics["evaluation"]["truth"]["rms_error_sigma"]
    assert f"<b>background error RMS</b>: {rms_sigma:.4f} sigma" in page
    assert cli.main(["demo", "-o", str(out), "--shrink-factor", "8", "-q"]) == cli.EXIT_EXISTS


def test_console_script_points_at_main():
    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert project["project"]["scripts"] == {"skymap": "skymap.app.cli:main"}
    target = EntryPoint("skymap", "skymap.app.cli:main", "console_scripts").load()
    assert target is cli.main


def test_options_file_is_passed_to_the_default_fit(data_dir, tmp_path, monkeypatch):
    seen = {}

    def fake_fit(image, mask=None, callback=None, **options):
        seen.update(options)
        raise ValueError("stop here")

    monkeypatch.setattr("skymap.background.defaults.fit", fake_fit)
    toml = tmp_path / "opts.toml"
    toml.write_text("high = 5.0\nmax_iter = 3\n")
    argv = ["run", str(data_dir / "spitzer_cutout.fits"), "-o", str(tmp_path / "o"), "-q"]
    assert cli.main([*argv, "--config", str(toml)]) == cli.EXIT_USAGE
    seen.pop("callback", None)  # the progress bar's hook
    assert seen == {"high": 5.0, "max_iter": 3}


def test_pipeline_config_file_reproduces_the_default_run(data_dir, tmp_path):
    src = str(data_dir / "spitzer_cutout.fits")
    toml = tmp_path / "pipeline.toml"
    assert cli.main(["config", src, "-o", str(toml), "-q"]) == 0
    for name, extra in (("default", []), ("from_file", ["--config", str(toml)])):
        argv = ["run", src, "-o", str(tmp_path / name), "-q", "--no-report", *extra]
        assert cli.main(argv) == 0
    products = [f"spitzer_cutout_{p}.fits" for p in io.PRODUCTS]
    for name in [*products, "spitzer_cutout_metrics.json"]:
        assert _sha(tmp_path / "default" / name) == _sha(tmp_path / "from_file" / name)


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "a.fits"],
        ["batch", "a.fits", "b.fits"],
        ["match", "a.fits", "b.fits"],
        ["compare", "a.fits"],
        ["tune", "a.fits"],
        ["simulate"],
        ["demo"],
        ["config"],
    ],
    ids=lambda argv: argv[0],
)
def test_an_output_name_too_long_exits_2_naming_it_before_any_work(
    argv, tmp_path, monkeypatch, capsys
):
    # ENAMETOOLONG from a stat is not "does not exist": every command must turn it
    # into a usage error (exit 2) naming the path, not a traceback (exit 1).
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        fits.PrimaryHDU(rng.normal(size=(32, 32)).astype(np.float32)).writeto(f"{name}.fits")
    monkeypatch.setattr(common, "fit_image", lambda *a, **k: pytest.fail("fit before checks"))
    long = "x" * 300
    assert cli.main([*argv, "-o", long, "-q"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert long in err and "name too long" in err.lower() and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.fits", "b.fits"]


def test_only_common_progress_imports_tqdm_auto():
    # tqdm.auto in a notebook without ipywidgets warns "IProgress not found" (issue
    # 16): every command's bar goes through common.progress, which checks first.
    package = Path(cli.__file__).parents[2]
    users = sorted(
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if re.search(r"^\s*(from tqdm\.auto import|import tqdm\.auto)", path.read_text(), re.M)
    )
    assert users == [str(Path("app", "cli", "common.py"))]


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["compare", "a.fits", "--kinds", "nope"], ["--kinds", "sky, galaxies, stars", "nope"]),
        (["compare", "a.fits", "--trials", "0"], ["--trials must be at least 1"]),
        (["tune", "a.fits", "--trials", "0"], ["--trials must be at least 1"]),
        (["compare", "a.fits", "--config", "bad.toml"], ["bad.toml", "high", "expected a number"]),
    ],
    ids=["compare-kinds", "compare-trials", "tune-trials", "compare-config"],
)
def test_tune_and_compare_refuse_bad_options_up_front_in_command_line_words(
    argv, words, tmp_path, monkeypatch, capsys
):
    # a bad config once made `compare` exit 0 with skymap's row marked failed, and
    # --trials 0 said "n_trials" (the API's name)
    monkeypatch.chdir(tmp_path)
    fits.PrimaryHDU(np.zeros((32, 32), np.float32)).writeto("a.fits")
    Path("bad.toml").write_text('high = "five"\n')
    assert cli.main([*argv, "-o", "out", "-q"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert all(word in err for word in words), err
    assert "n_trials" not in err and not Path("out").exists()
