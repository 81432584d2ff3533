"""``skymap run`` with error and weight maps: --error-hdu / --weight-hdu and the
automatic pick-up of ERR / WHT extensions (issue 15)."""

import logging

import numpy as np
import pytest
from astropy.io import fits

import skymap
from skymap.app import cli


@pytest.fixture(scope="module")
def varying_depth(tmp_path_factory):
    """A SCI image whose right half is 4x noisier, with its ERR and WHT maps."""
    rng = np.random.default_rng(1)
    err = np.ones((128, 128), np.float32)
    err[:, 64:] = 4.0
    img = (100 + rng.normal(size=err.shape) * err).astype(np.float32)
    d = tmp_path_factory.mktemp("noise")
    path = d / "hst.fits"
    fits.HDUList(
        [
            fits.PrimaryHDU(),
            fits.ImageHDU(img, name="SCI"),
            fits.ImageHDU(err, name="ERR"),
            fits.ImageHDU(1.0 / err**2, name="WHT"),
        ]
    ).writeto(path)
    bad = d / "bad.fits"
    fits.HDUList(
        [fits.PrimaryHDU(), fits.ImageHDU(img, name="SCI"), fits.ImageHDU(err[:64], name="ERR")]
    ).writeto(bad)
    return path, bad, img, err


def _background(out, stem="hst"):
    return fits.getdata(out / f"{stem}_background.fits")


def test_an_err_extension_is_picked_up_and_said(varying_depth, tmp_path, caplog):
    path, _, img, err = varying_depth
    with caplog.at_level(logging.WARNING, logger="skymap.cli"):
        assert cli.main(["run", str(path), "-o", str(tmp_path), "-q", "--no-report"]) == 0
    assert "using the error map in HDU ERR" in caplog.text
    want = np.asarray(skymap.fit(img, error=err).background, np.float32)
    np.testing.assert_array_equal(_background(tmp_path), want)


def test_weight_hdu_is_read_as_inverse_variance(varying_depth, tmp_path):
    path, _, img, err = varying_depth
    argv = ["run", str(path), "-o", str(tmp_path), "-q", "--no-report"]
    assert cli.main([*argv, "--weight-hdu", "WHT", "--error-hdu", "false"]) == 0
    want = np.asarray(skymap.fit(img, weight=1.0 / err**2).background, np.float32)
    np.testing.assert_array_equal(_background(tmp_path), want)


def test_error_hdu_false_ignores_the_noise_extensions(varying_depth, tmp_path):
    path, _, img, _ = varying_depth
    argv = ["run", str(path), "-o", str(tmp_path), "-q", "--no-report", "--error-hdu", "false"]
    assert cli.main(argv) == 0
    want = np.asarray(skymap.fit(img).background, np.float32)
    np.testing.assert_array_equal(_background(tmp_path), want)


def test_both_maps_or_a_wrong_shape_are_refused_with_exit_2(varying_depth, tmp_path, capsys):
    path, bad, _, _ = varying_depth
    argv = ["run", str(path), "-o", str(tmp_path / "a"), "-q", "--no-report"]
    assert cli.main([*argv, "--error-hdu", "ERR", "--weight-hdu", "WHT"]) == 2
    assert "--error-hdu and --weight-hdu are mutually exclusive" in capsys.readouterr().err
    argv = ["run", str(bad), "-o", str(tmp_path / "b"), "-q", "--no-report"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "HDU 'ERR'" in err and "bad.fits" in err and "(64, 128)" in err
