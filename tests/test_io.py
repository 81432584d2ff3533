"""FITS input/output: HDU choice, DQ bits, header and WCS carry-over, provenance, atomic
writes and the refusal to overwrite."""

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import skymap
from skymap.app import io


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _history_config(header):
    lines = [str(v) for v in header["HISTORY"]]
    start = lines.index("skymap configuration (JSON, wrapped):")
    return json.loads("".join(lines[start + 1 :]))


# ---------------------------------------------------------------- reading real data


def test_big_endian_int16_with_odd_cards_reads_as_native_float32(data_dir):
    path = data_dir / "m6707hh_cutout.fits"
    before = _sha(path)
    raw = fits.getdata(path)
    img = io.read_image(path)
    assert raw.dtype == np.dtype(">i2")
    assert img.data.dtype == np.float32 and img.data.dtype.isnative
    np.testing.assert_array_equal(img.data, raw.astype(np.float32))
    assert img.hdu == "PRIMARY" and img.mask is None
    # the blank-keyword acknowledgement cards of the DSS header survive
    assert any("Palomar" in str(v) for v in img.header[""])
    assert _sha(path) == before


def test_non_standard_cards_neither_crash_nor_vanish(tmp_path):
    # Raw header bytes: astropy refuses to write most of these cards itself.
    cards = [
        "SIMPLE  =                    T",
        "BITPIX  =                  -32",
        "NAXIS   =                    2",
        "NAXIS1  =                    4",
        "NAXIS2  =                    3",
        "HIERARCH ESO DET CHIP NAME = 'CCD-44'",
        "BADVAL  = 'unterminated string",
        "lowcase =                    3",
        "ESO-LOG 12:00:01> EXPSTART  exposure started",
        "LONGSTR = 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa&'",
        "CONTINUE  'bbbbbbbbbb'",
        "END",
    ]
    header = b"".join(c.ljust(80).encode() for c in cards).ljust(2880, b" ")
    data = np.arange(12, dtype=">f4").tobytes().ljust(2880, b"\0")
    (tmp_path / "odd.fits").write_bytes(header + data)
    img = io.read_image(tmp_path / "odd.fits")
    np.testing.assert_array_equal(img.data, np.arange(12).reshape(3, 4))
    out = io.write_image(tmp_path / "out.fits", img.data, header=img.header)
    text = out.read_bytes()[: 2880 * 2].decode("latin-1")
    for needle in ("HIERARCH ESO DET CHIP NAME = 'CCD-44'", "ESO-LOG 12:00:01>", "LOWCASE"):
        assert needle in text
    # read_image logs, rather than warns about, the cards astropy finds odd
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert io.read_image(out).header["LONGSTR"] == "a" * 65 + "bbbbbbbbbb"


def test_nan_pixels_are_kept_and_not_put_in_the_mask(data_dir):
    img = io.read_image(data_dir / "spitzer_cutout.fits")
    assert img.data.dtype == np.float32
    assert np.isnan(img.data).sum() == 2
    assert img.mask is None


def test_read_returns_a_writable_copy_not_the_file_buffer(data_dir):
    img = io.read_image(data_dir / "m6707hh_cutout.fits")
    img.data[0, 0] = -1.0
    assert io.read_image(data_dir / "m6707hh_cutout.fits").data[0, 0] != -1.0


def test_real_file_round_trip_keeps_wcs_and_cards(data_dir, tmp_path):
    img = io.read_image(data_dir / "spitzer_cutout.fits")
    out = io.write_image(tmp_path / "b.fits", img.data, header=img.header, product="background")
    h = fits.getheader(out)
    w_in, w_out = img.wcs, WCS(h)
    pix = np.array([[0.0, 0.0], [10.5, 40.0], [63.0, 63.0]])
    np.testing.assert_allclose(w_out.wcs_pix2world(pix, 0), w_in.wcs_pix2world(pix, 0))
    assert h["INSTRUME"] == img.header["INSTRUME"]
    np.testing.assert_array_equal(fits.getdata(out), img.data)


# ---------------------------------------------------------------- HDUs and DQ flags


@pytest.fixture
def mef(tmp_path, rng):
    sci = rng.normal(10, 1, (20, 30)).astype(">f8")
    dq = np.zeros((20, 30), dtype=">i4")
    dq[2, 3] = 1
    dq[4, 5] = 4
    dq[6, 7] = 5
    dq[8, 9] = 1024
    hdr = fits.Header({"CRPIX1": 3.0, "CRPIX2": 4.0, "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN"})
    hdul = fits.HDUList(
        [
            fits.PrimaryHDU(),
            fits.ImageHDU(sci, header=hdr, name="SCI"),
            fits.ImageHDU(dq, name="DQ"),
            fits.ImageHDU(np.ones((20, 30), np.float32), name="ERR"),
        ]
    )
    path = tmp_path / "mef.fits"
    hdul.writeto(path)
    return path, sci, dq


def test_sci_extension_is_found_and_any_dq_flag_masks_by_default(mef):
    path, sci, dq = mef
    img = io.read_image(path)
    assert img.hdu == "SCI"
    assert img.data.dtype == np.float64 and img.data.dtype.isnative
    np.testing.assert_array_equal(img.data, sci)
    np.testing.assert_array_equal(img.mask, dq != 0)
    assert img.header["CRPIX1"] == 3.0


def test_dq_bits_select_flags(mef):
    path, _, dq = mef
    img = io.read_image(path, dq_bits="4,1024")
    np.testing.assert_array_equal(img.mask, (dq & (4 | 1024)) != 0)
    assert img.mask.sum() == 3  # (4,5), (6,7) has 4|1, (8,9)


def test_dq_can_be_ignored_and_named_hdus_chosen(mef):
    path, _, _ = mef
    assert io.read_image(path, dq=False).mask is None
    err = io.read_image(path, hdu="ERR", dq=False)
    assert np.all(err.data == 1)
    assert io.read_image(path, hdu="2", dq=False).hdu == "DQ"


def test_second_chip_takes_its_own_dq_version(tmp_path):
    chips = []
    for ver in (1, 2):
        dq = np.zeros((6, 7), np.int16)
        dq[ver, ver] = 8
        chips += [
            fits.ImageHDU(np.full((6, 7), ver, np.float32), name="SCI", ver=ver),
            fits.ImageHDU(dq, name="DQ", ver=ver),
        ]
    fits.HDUList([fits.PrimaryHDU(), *chips]).writeto(tmp_path / "flt.fits")
    img = io.read_image(tmp_path / "flt.fits", hdu="SCI,2")
    assert img.hdu == "SCI,2" and np.all(img.data == 2)
    assert list(zip(*np.nonzero(img.mask), strict=True)) == [(2, 2)]
    first = io.read_image(tmp_path / "flt.fits")
    assert first.hdu == "SCI" and list(zip(*np.nonzero(first.mask), strict=True)) == [(1, 1)]
    # a DQ named explicitly, by index given as text (as on the command line)
    other = io.read_image(tmp_path / "flt.fits", hdu="SCI,2", dq="2")
    assert list(zip(*np.nonzero(other.mask), strict=True)) == [(1, 1)]


def test_missing_hdu_error_lists_the_hdus(mef):
    path, _, _ = mef
    with pytest.raises(ValueError, match=r"hdu 'NOPE'.*SCI"):
        io.read_image(path, hdu="NOPE")


def test_dq_bits_without_dq_extension_is_an_error(data_dir):
    with pytest.raises(ValueError, match="no DQ extension"):
        io.read_image(data_dir / "spitzer_cutout.fits", dq_bits=4)


def test_mask_file_is_ored_with_dq(mef, tmp_path):
    path, _, dq = mef
    extra = np.zeros(dq.shape, bool)
    extra[0, :] = True
    io.write_image(tmp_path / "m.fits", extra, product="mask")
    img = io.read_image(path, mask=tmp_path / "m.fits")
    np.testing.assert_array_equal(img.mask, extra | (dq != 0))
    with pytest.raises(ValueError, match="shape"):
        io.read_image(path, mask=np.zeros((3, 3), bool))


def test_degenerate_cube_is_squeezed_and_real_cube_refused(tmp_path):
    fits.PrimaryHDU(np.ones((1, 5, 6), np.float32)).writeto(tmp_path / "c1.fits")
    fits.PrimaryHDU(np.ones((2, 5, 6), np.float32)).writeto(tmp_path / "c2.fits")
    assert io.read_image(tmp_path / "c1.fits").data.shape == (5, 6)
    with pytest.raises(ValueError, match="2D image"):
        io.read_image(tmp_path / "c2.fits", hdu=0)


def test_tile_compressed_image_is_read_from_its_extension(tmp_path, rng):
    data = rng.normal(size=(32, 40)).astype(np.float32)
    hdr = fits.Header({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRPIX1": 3.0})
    comp = fits.CompImageHDU(data, header=hdr, compression_type="GZIP_2", quantize_level=0.0)
    fits.HDUList([fits.PrimaryHDU(), comp]).writeto(tmp_path / "c.fits.fz")
    img = io.read_image(tmp_path / "c.fits.fz")
    np.testing.assert_array_equal(img.data, data)
    out = io.write_image(tmp_path / "p.fits", img.data, header=img.header)
    assert fits.getheader(out)["CRPIX1"] == 3.0


def test_missing_input_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        io.read_image(tmp_path / "nope.fits")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("1,4,0x10", 21), ("bit0+bit3", 9), ("2 | 8", 10), (6, 6), ([1, 2, 2], 3), (None, None)],
)
def test_parse_dq_bits(spec, expected):
    assert io.parse_dq_bits(spec) == expected


@pytest.mark.parametrize("spec", ["", "1,x", [-1], 0, "bitz"])
def test_parse_dq_bits_rejects_nonsense_naming_the_parameter(spec):
    with pytest.raises(ValueError, match="dq_bits"):
        io.parse_dq_bits(spec)


@given(
    dq=hnp.arrays(np.int32, (7, 5), elements=st.integers(0, 2**31 - 1)),
    bits=st.integers(1, 2**31 - 1),
)
def test_dq_to_mask_matches_per_pixel_bit_test(dq, bits):
    expected = np.array([[(int(v) & bits) != 0 for v in row] for row in dq])
    np.testing.assert_array_equal(io.dq_to_mask(dq.astype(">i4"), bits), expected)
    np.testing.assert_array_equal(io.dq_to_mask(dq), dq != 0)
    # exact-integer float flags, as some pipelines store them
    np.testing.assert_array_equal(io.dq_to_mask(dq.astype(np.float64), bits), expected)


def test_dq_to_mask_edge_dtypes():
    flags = np.array([[True, False]])
    np.testing.assert_array_equal(io.dq_to_mask(flags, 2), [[False, False]])
    np.testing.assert_array_equal(io.dq_to_mask(flags), [[True, False]])
    high = np.array([[1 << 63, 1]], dtype=np.uint64)  # the top bit of a 64-bit flag
    np.testing.assert_array_equal(io.dq_to_mask(high, "bit63"), [[True, False]])
    with pytest.raises(ValueError, match="integer flag values"):
        io.dq_to_mask(np.array([[0.5]]))
    with pytest.raises(TypeError, match="dq"):
        io.dq_to_mask(np.array([["a"]]))


# ---------------------------------------------------------------- writing


def test_provenance_cards_and_history_carry_the_configuration(tmp_path):
    cfg = {"box_size": [64, 64], "estimator": "mode", "nsigma": 3.0}
    out = io.write_image(
        tmp_path / "x.fits",
        np.zeros((4, 4), np.float32),
        product="rms",
        config=cfg,
        source="/some/dir/input.fits",
        history=["fitted in 3 iterations"],
    )
    h = fits.getheader(out)
    assert h["SKYMAPV"] == skymap.__version__
    assert h["SKYPROD"] == "rms"
    assert h["SKYSRC"] == "input.fits"
    assert h["SKYCFGH"] == io.config_hash(cfg) != io.config_hash({**cfg, "nsigma": 2.5})
    assert _history_config(h) == cfg
    assert "fitted in 3 iterations" in [str(v) for v in h["HISTORY"]]


def test_structural_cards_describe_the_new_data(data_dir, tmp_path):
    # int16 input with scaling cards: the float product must not inherit BZERO/BSCALE
    raw = np.arange(12, dtype=np.int16).reshape(3, 4)
    hdu = fits.PrimaryHDU(raw)
    hdu.header["BZERO"] = 32768
    hdu.header["BSCALE"] = 2.0
    hdu.header["DATAMAX"] = 1e9
    hdu.writeto(tmp_path / "scaled.fits", output_verify="ignore")
    img = io.read_image(tmp_path / "scaled.fits")
    np.testing.assert_array_equal(img.data, raw * 2.0 + 32768)
    out = io.write_image(tmp_path / "p.fits", img.data, header=img.header)
    h = fits.getheader(out)
    assert "BZERO" not in h and "BSCALE" not in h and "DATAMAX" not in h
    np.testing.assert_array_equal(fits.getdata(out), img.data)


def test_mask_written_as_uint8_and_read_back(tmp_path, rng):
    m = rng.random((9, 11)) < 0.3
    out = io.write_image(tmp_path / "m.fits", m, product="mask")
    assert fits.getdata(out).dtype == np.uint8
    np.testing.assert_array_equal(io.read_mask(out), m)


def test_refuses_to_overwrite_and_says_how(tmp_path):
    p = tmp_path / "a.fits"
    io.write_image(p, np.zeros((3, 3), np.float32))
    before = _sha(p)
    with pytest.raises(io.OutputExistsError, match="--overwrite") as err:
        io.write_image(p, np.ones((3, 3), np.float32))
    assert isinstance(err.value, FileExistsError) and err.value.paths == [p]
    assert _sha(p) == before
    io.write_image(p, np.ones((3, 3), np.float32), overwrite=True)
    assert np.all(fits.getdata(p) == 1)


def test_failed_write_leaves_no_file_and_no_temporary(tmp_path):
    def broken(fh):
        fh.write(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        io.atomic_write(tmp_path / "x.fits", broken)
    assert os.listdir(tmp_path) == []
    # an existing file survives a failed overwrite untouched
    (tmp_path / "y.txt").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        io.atomic_write(tmp_path / "y.txt", broken, overwrite=True)
    assert (tmp_path / "y.txt").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["y.txt"]


def test_written_files_get_the_usual_permissions_not_the_temporary_ones(tmp_path):
    p = io.atomic_write(tmp_path / "x.bin", lambda fh: fh.write(b"x"))
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask


def test_write_products_checks_every_output_before_writing(tmp_path, rng):
    image = rng.normal(5, 1, (8, 8)).astype(np.float32)
    bkg = np.full_like(image, 5.0)
    kw = {"image": image, "background": bkg, "rms": np.ones_like(image), "mask": image > 6}
    paths = io.write_products(tmp_path / "out", "img", **kw)
    assert list(paths) == list(io.PRODUCTS)
    np.testing.assert_allclose(fits.getdata(paths["subtracted"]), image - bkg)
    assert fits.getheader(paths["mask"])["SKYPROD"] == "mask"
    os.remove(paths["rms"])
    os.remove(paths["background"])
    with pytest.raises(io.OutputExistsError, match="img_mask.fits.*img_subtracted.fits"):
        io.write_products(tmp_path / "out", "img", **kw)
    # refused before writing anything
    assert not paths["rms"].exists() and not paths["background"].exists()
    io.write_products(tmp_path / "out", "img", overwrite=True, **kw)
    assert all(p.exists() for p in paths.values())


def test_identical_writes_are_byte_identical(tmp_path):
    data = np.arange(20, dtype=np.float32).reshape(4, 5)
    a = io.write_image(tmp_path / "a.fits", data, config={"k": 1}, product="background")
    b = io.write_image(tmp_path / "b.fits", data, config={"k": 1}, product="background")
    assert _sha(a) == _sha(b)


def test_json_is_written_atomically_with_numpy_values(tmp_path):
    p = io.write_json(tmp_path / "m.json", {"a": np.float32(1.5), "b": np.arange(3)})
    assert json.loads(p.read_text()) == {"a": 1.5, "b": [0, 1, 2]}
    with pytest.raises(io.OutputExistsError):
        io.write_json(p, {})
