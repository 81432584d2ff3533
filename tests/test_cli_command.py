"""The real ``skymap`` command, run as a subprocess in a temporary folder: every
documented exit code of every subcommand, the messages a user reads, the names of the
products, and what the report says (unit, convergence, verdicts).

The command is the installed console script when it points at this checkout's
``skymap.app.cli:main``, else ``python -m skymap`` (the same ``main``).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from skymap.app import cli
from skymap.app.cli import common
from skymap.background.convergence import STOPS

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
SPITZER = DATA / "spitzer_cutout.fits"  # 64 x 64, BUNIT = MJy/sr


def _command() -> list[str]:
    exe = shutil.which("skymap")
    scripts = [ep.value for ep in entry_points(group="console_scripts") if ep.name == "skymap"]
    if exe and scripts == ["skymap.app.cli:main"]:
        return [exe]
    return [sys.executable, "-m", "skymap"]


CMD = _command()
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    "PYTHONWARNINGS": "ignore::DeprecationWarning",
}


def skymap(*args, cwd, check=None):
    proc = subprocess.run(
        [*CMD, *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600
    )
    if check is not None:
        assert proc.returncode == check, proc.stderr
    return proc


def _image(path, shape=(48, 64), seed=0, *, bunit="ADU", extra=()):
    rng = np.random.default_rng(seed)
    data = (100 + rng.normal(0, 1, shape)).astype(np.float32)
    hdr = fits.Header({"BUNIT": bunit})
    fits.HDUList([fits.PrimaryHDU(data, header=hdr), *extra]).writeto(path)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """One folder of small inputs shared by the tests below."""
    d = tmp_path_factory.mktemp("cli")
    _image(d / "a.fits", seed=1)
    _image(d / "b.fits", seed=2)
    (d / "text.fits").write_text("this is a text file, not FITS\n")
    whole = (d / "a.fits").read_bytes()
    (d / "truncated.fits").write_bytes(whole[: len(whole) - 4000])
    fits.HDUList(
        [fits.PrimaryHDU(), fits.BinTableHDU.from_columns([fits.Column("x", "E", array=[1.0])])]
    ).writeto(d / "table.fits")
    dq = fits.ImageHDU(np.zeros((48, 64), np.int16), name="DQ")
    _image(d / "withdq.fits", extra=(dq,))
    (d / "mesh.toml").write_text('type = "skymap.background.mesh:MeshBackground"\nbox_size = 16\n')
    shutil.copy(SPITZER, d / "spitzer.fits")
    shutil.copy(d / "a.fits", d / f"{'x' * 240}.fits")  # its outputs' names are too long
    return d


# --------------------------------------------------------------------------- exit 2


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (
            ["run", "a.fits", "--hdu", "99"],
            ["hdu '99' not found in a.fits", "0 PRIMARY (image 48 x 64)", "--hdu"],
        ),
        (["run", "text.fits"], ["text.fits is not a FITS file"]),
        (["run", "truncated.fits"], ["truncated.fits is truncated"]),
        (["run", "table.fits"], ["table.fits holds no 2D image", "table, 1 rows"]),
        (["run", "withdq.fits", "--dq-bits", "bit70"], ["--dq-bits 'bit70'", "bit63"]),
        (["run", "nope.fits"], ["nope.fits does not exist"]),
        (["run", "a.fits", "-o", "a.fits"], ["a.fits is an existing file, not a directory"]),
        (["run", "a.fits", "--bogus"], ["unrecognized arguments: --bogus"]),
        (["run", f"{'x' * 240}.fits"], ["is longer than the 255 bytes"]),
        (["batch", "a.fits", "-o", "x", "--workers", "0"], ["--workers must be >= 1"]),
        (["batch", "a.fits", "sub/a.fits", "-o", "x"], ["share the name 'a'"]),
        (["evaluate", "a.fits", "nope.fits"], ["nope.fits does not exist"]),
        (
            ["evaluate", "a.fits", "spitzer.fits"],
            ["has shape (64, 64), image a.fits has (48, 64)"],
        ),
        (["match", "a.fits"], ["needs at least two images"]),
        (["match", "a.fits", "sub/a.fits"], ["share the name 'a'"]),
        (["demo", "--scene", "nebula", "--size", "2"], ["--size must be at least"]),
        (["simulate", "--scene", "nebula", "--size", "-5"], ["--size must be at least"]),
        (["config", "--kind", "mesh", "--box-size", "0"], ["box_size"]),
        (["config", "nope.fits"], ["nope.fits does not exist"]),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, list) and v and v[0] in cli.COMMANDS else None,
)
def test_bad_input_exits_2_with_a_message_naming_it(work, args, words):
    (work / "sub").mkdir(exist_ok=True)
    shutil.copy(work / "a.fits", work / "sub" / "a.fits")
    proc = skymap(*args, "-q", cwd=work)
    assert proc.returncode == cli.EXIT_USAGE, proc.stderr
    err = proc.stderr
    for word in words:
        assert word in err
    assert "Traceback" not in err and "=True" not in err and "hdu=" not in err
    assert not (work / "skymap_out").exists() and not (work / "x").exists()


@pytest.mark.parametrize(
    ("toml", "words"),
    [
        ('high = "five"\n', ["high", "expected a number", "'five'"]),
        ("max_iter = true\n", ["max_iter", "expected an integer", "True"]),
        ('type = "skymap.stats:SigmaClip"\nsigma = "3"\n', ["sigma", "expected a number"]),
        ('type = "skymap.stats:SigmaClip"\nmaxiters = 2.5\n', ["maxiters", "expected an integer"]),
    ],
)
def test_config_type_errors_name_the_key_and_the_type(work, toml, words):
    bad = work / f"bad{abs(hash(toml))}.toml"
    bad.write_text(toml)
    proc = skymap("run", "a.fits", "--config", bad, "-o", "cfg", "-q", cwd=work)
    assert proc.returncode == cli.EXIT_USAGE
    assert all(w in proc.stderr for w in words), proc.stderr
    assert not (work / "cfg").exists()


# --------------------------------------------------------------------------- success,
# names, overwrite, report


@pytest.fixture(scope="module")
def spitzer_run(work):
    """``skymap run`` on the real Spitzer cutout with the default fit, report on."""
    proc = skymap("run", "spitzer.fits", "-o", "out", cwd=work, check=0)
    return proc, work / "out"


def test_products_are_named_after_the_input(spitzer_run):
    _, out = spitzer_run
    names = sorted(p.name for p in out.iterdir())
    assert all(n.startswith("spitzer_") for n in names), names
    assert {"spitzer_metrics.json", "spitzer_report.html", "spitzer_background.fits"} <= set(names)


def test_metrics_and_report_state_convergence_unit_and_honest_verdicts(spitzer_run):
    proc, out = spitzer_run
    metrics = json.loads((out / "spitzer_metrics.json").read_text())
    fit = metrics["fit"]
    assert isinstance(fit["converged"], bool) and fit["iterations"] >= 2
    assert metrics["input"]["dtype"] == "float32"
    page = (out / "spitzer_report.html").read_text()
    assert "MJy/sr" in page
    assert fit["stop"] in STOPS
    if fit["stop"] == "backed_off":  # converged, but not by settling: the page says so
        assert "backing off a runaway mask" in page
    else:
        assert ("converged after" in page) if fit["converged"] else ("NOT CONVERGED" in page)
    if not fit["converged"]:
        assert "did not converge" in proc.stderr
    # 64 x 64: no large block width has 25 clean blocks, so no ratio and no verdict
    rms = metrics["evaluation"]["rms_vs_scale"]
    assert rms["large_scale_ratio"] is None
    assert "n/a (too few clean blocks)" in page
    assert "OVERFIT" not in page and "0.000 (" not in page


def test_unconverged_fit_is_said_everywhere(work):
    (work / "short.toml").write_text("max_iter = 1\n")
    proc = skymap(
        "run", "spitzer.fits", "--config", "short.toml", "-o", "short", "-q", cwd=work, check=0
    )
    fit = json.loads((work / "short" / "spitzer_metrics.json").read_text())["fit"]
    assert fit["converged"] is False and fit["reason"] and fit["stop"] == "cap"
    assert "warning" in proc.stderr and "did not converge" in proc.stderr
    assert "NOT CONVERGED" in (work / "short" / "spitzer_report.html").read_text()


def test_two_inputs_share_a_folder_and_overwrite_replaces_only_their_own(work):
    skymap("run", "a.fits", "-o", "shared", "--config", "mesh.toml", "-q", cwd=work, check=0)
    skymap("run", "b.fits", "-o", "shared", "--config", "mesh.toml", "-q", cwd=work, check=0)
    d = work / "shared"
    names = {p.name for p in d.iterdir()}
    assert {"a_report.html", "b_report.html", "a_metrics.json", "b_metrics.json"} <= names
    b_before = {p.name: p.read_bytes() for p in d.glob("b_*")}
    # again without --overwrite: exit 3, nothing touched
    proc = skymap("run", "a.fits", "-o", "shared", "--config", "mesh.toml", cwd=work)
    assert proc.returncode == cli.EXIT_EXISTS and "--overwrite" in proc.stderr
    # --overwrite --no-report: a's products replaced, a's old report removed, b untouched
    a_mtime = (d / "a_background.fits").stat().st_mtime_ns
    skymap("run", "a.fits", "-o", "shared", "--overwrite", "--no-report", "-q", cwd=work, check=0)
    assert (d / "a_background.fits").stat().st_mtime_ns != a_mtime
    assert not list(d.glob("a_report*"))
    assert {p.name: p.read_bytes() for p in d.glob("b_*")} == b_before
    assert json.loads((d / "a_metrics.json").read_text())["input"]["file"] == "a.fits"


def test_concurrent_runs_on_one_folder_one_wins_the_other_writes_nothing(work):
    args = [*CMD, "run", "a.fits", "-o", "race", "--config", "mesh.toml", "-q"]
    procs = [
        subprocess.Popen(args, cwd=work, env=ENV, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    codes = sorted(p.wait(timeout=600) for p in procs)
    assert codes == [cli.EXIT_OK, cli.EXIT_EXISTS]
    # the winner's complete set (a mesh fit: no convergence figure), no lock, no temp
    names = sorted(p.name for p in (work / "race").iterdir())
    products = [f"a_{p}.fits" for p in ("background", "rms", "mask", "subtracted")]
    figures = [f"a_report_{f}.png" for f in ("maps", "mesh", "residuals", "rms_vs_scale")]
    assert names == sorted([*products, "a_metrics.json", "a_report.html", *figures])


def test_non_ascii_paths(work):
    folder = work / "démo"
    folder.mkdir()
    shutil.copy(work / "a.fits", folder / "ímage☃.fits")
    skymap(
        "run",
        folder / "ímage☃.fits",
        "-o",
        folder / "sortie",
        "--config",
        "mesh.toml",
        "-q",
        cwd=work,
        check=0,
    )
    out = folder / "sortie"
    header = fits.getheader(out / "ímage☃_background.fits")
    assert header["SKYSRC"] == "\\xedmage\\u2603.fits"
    assert any("d\\xe9mo" in str(h) for h in header["HISTORY"])
    metrics = json.loads((out / "ímage☃_metrics.json").read_text(encoding="utf-8"))
    assert metrics["input"]["file"] == str(folder / "ímage☃.fits")


def test_run_with_input_selection_options(work):
    mask = np.zeros((48, 64), np.uint8)
    mask[:4] = 1
    fits.PrimaryHDU(mask).writeto(work / "stars.fits")
    args = ["run", "withdq.fits", "--hdu", "0", "--dq-hdu", "DQ", "--dq-bits", "4"]
    args += ["--mask", "stars.fits", "--config", "mesh.toml", "--no-report", "-o", "sel"]
    skymap(*args, "-q", cwd=work, check=0)
    metrics = json.loads((work / "sel" / "withdq_metrics.json").read_text())
    assert metrics["input"]["hdu"] == "PRIMARY" and metrics["input"]["flagged_pixels"] == 4 * 64


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_interrupted_run_exits_130_and_leaves_no_products(work):
    rng = np.random.default_rng(3)
    big = work / "big.fits"
    # Large enough that the fit lasts seconds on a fast machine: the interrupt must land
    # while it runs, however loaded the machine is when "fitting" is read.
    fits.PrimaryHDU(rng.normal(0, 1, (3000, 3000)).astype(np.float32)).writeto(big)
    out = work / "interrupted"
    proc = subprocess.Popen(
        [*CMD, "run", "big.fits", "-o", "interrupted"],
        cwd=work,
        env=ENV,
        stderr=subprocess.PIPE,
        text=True,
        # As from a terminal: a test runner's worker may ignore SIGINT, and an ignored
        # signal stays ignored in its children (Python then installs no handler).
        preexec_fn=_default_sigint,
    )
    # the progress bar (stderr) says "fitting" once the fit runs: interrupt it then
    seen = ""
    deadline = time.monotonic() + 300
    while "fitting" not in seen and proc.poll() is None and time.monotonic() < deadline:
        seen += proc.stderr.read(1)
    assert (out / ".big.skymap-lock").exists(), "the run never reserved its outputs"
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=120)
    err = seen + proc.stderr.read()
    assert code == cli.EXIT_INTERRUPTED, err
    assert "interrupted" in err
    assert not out.exists() or not list(out.iterdir())


# --------------------------------------------------------------------------- exit 3 / 0
# for the other subcommands


def test_simulate_and_demo_refuse_and_demo_overwrites(work):
    args = ["simulate", "--scene", "nebula", "--size", "64", "-o", "sim", "-q"]
    skymap(*args, cwd=work, check=0)
    assert skymap(*args, cwd=work).returncode == cli.EXIT_EXISTS
    demo = ["demo", "--scene", "nebula", "--size", "64", "-o", "demo", "-q"]
    demo += ["--config", "mesh.toml"]
    skymap(*demo, cwd=work, check=0)
    assert (work / "demo" / "nebula_report.html").exists()
    assert skymap(*demo, cwd=work).returncode == cli.EXIT_EXISTS
    skymap(*demo, "--overwrite", cwd=work, check=0)


def test_evaluate_warns_without_a_mask_and_refuses_to_overwrite(work, spitzer_run):
    _, out = spitzer_run
    args = ["evaluate", "spitzer.fits", out / "spitzer_background.fits", "-o", "ev.json"]
    proc = skymap(*args, cwd=work, check=0)
    assert "without --mask" in proc.stderr
    assert skymap(*args, cwd=work).returncode == cli.EXIT_EXISTS
    proc = skymap(*args, "--mask", out / "spitzer_mask.fits", "--overwrite", cwd=work, check=0)
    assert "without --mask" not in proc.stderr
    assert "n/a (too few clean blocks)" in proc.stdout


def test_config_without_an_image_is_commented_and_world_readable(work):
    old = os.umask(0o022)
    try:
        skymap("config", "-o", "fit.toml", "-q", cwd=work, check=0)
    finally:
        os.umask(old)
    path = work / "fit.toml"
    assert path.stat().st_mode & 0o777 == 0o644
    text = path.read_text()
    assert "__none__" not in text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if not line.startswith("#"):
            assert lines[i - 1].startswith("#"), f"no comment above {line!r}"
    assert skymap("config", "-o", "fit.toml", cwd=work).returncode == cli.EXIT_EXISTS
    from skymap.app.config import load_toml
    from skymap.background.defaults import default_pipeline

    assert load_toml(path) == default_pipeline()


def test_match_refuses_to_overwrite(work):
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [10.0, 20.0]
    w.wcs.crpix = [32.0, 24.0]
    w.wcs.cdelt = [-1e-4, 1e-4]
    rng = np.random.default_rng(5)
    for name, level in (("m1", 10.0), ("m2", 12.0)):
        fits.PrimaryHDU(
            (level + rng.normal(0, 1, (48, 64))).astype(np.float32), header=w.to_header()
        ).writeto(work / f"{name}.fits")
    args = ["match", "m1.fits", "m2.fits", "-o", "matched", "--statistic", "median", "-q"]
    skymap(*args, cwd=work, check=0)
    assert skymap(*args, cwd=work).returncode == cli.EXIT_EXISTS
    skymap(*args, "--overwrite", cwd=work, check=0)


# --------------------------------------------------------------------------- exit 1,
# in-process (a failure has to be provoked)


def test_disk_full_names_the_file_removes_partial_products_and_exits_1(
    work, tmp_path, monkeypatch, capsys
):
    import errno

    from skymap.app import io as skyio

    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 3:  # the third product: two are written already
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(skyio.os, "fsync", fsync)
    out = tmp_path / "full"
    argv = ["run", str(work / "a.fits"), "-o", str(out), "--config", str(work / "mesh.toml")]
    assert cli.main([*argv, "-q"]) == cli.EXIT_FAILURE
    err = capsys.readouterr().err
    assert "No space left on device: " in err and "a_mask.fits" in err
    assert not out.exists() or not list(out.iterdir())


def test_batch_exits_1_when_a_worker_fails(work, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("the fit fell over")

    monkeypatch.setattr(common, "fit_image", broken)
    argv = ["batch", str(work / "a.fits"), "-o", str(tmp_path / "b"), "--threads", "-q"]
    assert cli.main(argv) == cli.EXIT_FAILURE
    assert "the fit fell over" in capsys.readouterr().err


def test_a_cold_kernel_cache_is_announced_once(tmp_path):
    code = "from skymap.app.cli import common; common.announce_compiling(quiet=False)"
    env = {**ENV, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert "compiling kernels, once: ~" in proc.stderr
