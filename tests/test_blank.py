"""Blank fills: exactly constant regions at an image's edge, as drizzled and reprojected
frames leave them, are excluded like NaN by the default fit (``blank_fills=True``), and
nothing else is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

import skymap
from skymap._inputs import blank_fill, edge_fill_values
from skymap.backends.dask import DaskBackend
from skymap.backends.memory import MemoryBackend

DATA = Path(__file__).parent / "data"


def _corner_wedges(shape, angle=12.0):
    """True outside a frame-shaped rectangle rotated by ``angle`` degrees (the four
    corner wedges a rotated mosaic leaves)."""
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    a = np.deg2rad(angle)
    u = (xx - (nx - 1) / 2) * np.cos(a) + (yy - (ny - 1) / 2) * np.sin(a)
    v = -(xx - (nx - 1) / 2) * np.sin(a) + (yy - (ny - 1) / 2) * np.cos(a)
    f = min(nx / (nx * np.cos(a) + ny * np.sin(a)), ny / (nx * np.sin(a) + ny * np.cos(a)))
    return (np.abs(u) > f * nx / 2) | (np.abs(v) > f * ny / 2)


@pytest.fixture(scope="module")
def plate():
    # 256x256 of a photographic plate scan with a saturated star (tests/data/README.md)
    return fits.getdata(DATA / "plate_ngc6819_saturated.fits").astype(np.float32)


@pytest.mark.parametrize("skysub", [False, True])
def test_zero_wedges_fit_as_if_masked(plate, skysub):
    # The fit with the wedges filled by exact 0 equals the fit told where they are, on
    # the sky level (a deep hole) and on a sky-subtracted frame (0 at the sky level).
    img = plate - np.float32(np.median(plate)) if skysub else plate
    wedge = _corner_wedges(img.shape)
    filled = img.copy()
    filled[wedge] = 0.0
    res = skymap.fit(filled)
    ref = skymap.fit(img, mask=wedge)
    # every wedge pixel, plus at most a few sky pixels of value 0 that touch it (an
    # integer image: the sky-subtracted plate has 0.07% of them)
    assert res.bad_mask[wedge].all()
    assert np.count_nonzero(res.bad_mask & ~wedge) <= 0.001 * wedge.sum()
    # the two fits stop on masks that differ by a few pixels flickering at the
    # thresholds: the backgrounds agree to 0.005 sigma RMS, 0.013 at most
    diff = np.abs(res.background - ref.background)[~wedge] / ref.noise
    assert np.sqrt(np.mean(diff**2)) < 0.01 and diff.max() < 0.02
    # without the detection the zeros drag the sky down by many sigma (sky level case)
    if not skysub:
        off = skymap.fit(filled, blank_fills=False, max_iter=2)
        drop = np.mean((off.background - ref.background)[~wedge]) / ref.noise
        assert drop < -1.0


def test_zero_border_of_majority_size():
    # A frame padded with zeros that cover more than half of it: the normalisation's
    # median would be the fill; with the fill excluded the sky is the sky.
    rng = np.random.default_rng(1)
    img = np.zeros((160, 160), np.float32)
    img[40:120, 40:120] = 500 + 10 * rng.normal(size=(80, 80))
    res = skymap.fit(img)
    assert res.bad_mask.sum() == 160 * 160 - 80 * 80
    inner = res.background[40:120, 40:120]
    assert abs(float(np.mean(inner)) - 500) < 2


def test_fills_that_are_not_blank():
    rng = np.random.default_rng(2)
    sky = 100 + rng.normal(size=(96, 96))
    # an interior constant patch (a source's flat top, not an edge fill)
    inner = sky.copy()
    inner[30:60, 30:60] = 0.0
    assert blank_fill(inner) is None
    # a small edge fill (< 100 pixels)
    small = sky.copy()
    small[:9, :9] = 0.0
    assert blank_fill(small) is None
    # a saturated plateau at the edge, above the sky: a source, left to the maskers
    sat = sky.copy()
    sat[:20, :20] = 65535.0
    assert blank_fill(sat) is None
    # a low-count image: 0 counts is the common sky value, and its clusters are sky
    counts = rng.poisson(0.05, size=(96, 96)).astype(np.float32)
    counts[:, :12] = 0.0
    assert blank_fill(counts) is None


def test_integer_sky_subtracted_fill():
    # Quantised at 8 ADU per sigma around 0, value 0 makes up ~5% of the sky: a wedge of
    # 0 is still told apart, and nothing else is taken.
    rng = np.random.default_rng(3)
    img = np.round(8 * rng.normal(size=(128, 128))).astype(np.int32)
    wedge = _corner_wedges(img.shape)
    img[wedge] = 0
    blank = blank_fill(img.astype(np.float32))
    assert blank[wedge].all()
    # sky pixels of value 0 touching the wedge join it: a few along its edges
    extra = np.count_nonzero(blank & ~wedge)
    assert extra <= 0.02 * wedge.sum()


def test_edge_values_and_tiled_warning():
    img = np.arange(64.0 * 64).reshape(64, 64)
    assert edge_fill_values(img) == []
    img[:, -10:] = -1.0
    assert edge_fill_values(img) == [-1.0]
    # without the sides (a memory map's driver stays small): top and bottom rows only
    side = np.arange(64.0 * 64).reshape(64, 64)
    side[:, :3] = 0.0
    assert edge_fill_values(side) == [0.0]
    assert edge_fill_values(side, sides=False) == []
    side[-1, :] = 0.0
    assert edge_fill_values(side, sides=False) == [0.0]
    da = pytest.importorskip("dask.array")
    rng = np.random.default_rng(4)
    sky = (100 + rng.normal(size=(64, 64))).astype(np.float32)
    sky[:, -10:] = 0.0
    with pytest.warns(UserWarning, match="tiled fit does not exclude blank fills"):
        skymap.fit(da.from_array(sky, chunks=32), max_iter=1)


def test_blank_border_changes_nothing(plate):
    # A NaN border, and a zero fill inside it (a reprojected tile of a mosaic whose
    # outside is NaN): with blank_frame, the fit runs on the valid frame and equals the
    # fit without them.
    ref = skymap.fit(plate, blank_frame=True)
    padded = np.full((plate.shape[0] + 40, plate.shape[1] + 24), np.nan, np.float32)
    padded[20:-20, 12:-12] = 0.0
    padded[24:-24, 16:-16] = plate[4:-4, 4:-4]
    inner = skymap.fit(plate[4:-4, 4:-4])
    res = skymap.fit(padded, blank_frame=True)
    assert res.frame == (slice(24, padded.shape[0] - 24), slice(16, padded.shape[1] - 16))
    np.testing.assert_array_equal(res.background[24:-24, 16:-16], inner.background)
    assert (res.stop, res.convergence_note) == (inner.stop, inner.convergence_note)
    assert res.bad_mask[:24].all() and not res.bad_mask[24:-24, 16:-16].any()
    assert res.rms.shape == padded.shape and np.isfinite(res.background).all()
    assert ref.frame is None and skymap.fit(padded).frame is None


def test_a_nan_border_alone_is_cut_without_a_mask(plate):
    # only NaN outside (no zero fill, no mask given): the fit on the valid frame (it
    # raised a TypeError: no mask to cut)
    padded = np.full((plate.shape[0] + 16, plate.shape[1] + 8), np.nan, np.float32)
    padded[8:-8, 4:-4] = plate
    res = skymap.fit(padded, blank_frame=True)
    assert res.frame == (slice(8, padded.shape[0] - 8), slice(4, padded.shape[1] - 4))
    np.testing.assert_array_equal(res.background[8:-8, 4:-4], skymap.fit(plate).background)


def test_the_tracking_cap_is_a_share_of_the_valid_frame(plate):
    # A NaN border three times the plate's side: the floor the tracking test raises is
    # still capped at an eighth of the plate (32 px), not of the array (it reached 61),
    # and the tiled back end reads the same frame.
    padded = np.pad(plate, 256, constant_values=np.nan)
    assert MemoryBackend(padded).valid_extent() == plate.shape
    da = pytest.importorskip("dask.array")
    tiled = DaskBackend(da.from_array(padded, chunks=256), tile=256, client="sync")
    assert tiled.valid_extent() == plate.shape
    res = skymap.fit(padded)
    assert max(h.min_scale for h in res.history) == pytest.approx(plate.shape[0] / 8)


def _runs_by_shifted_ands(image, bad, run, step, axis):
    """run_values' run map as whole-array comparisons (the reference)."""
    lines = (slice(None), slice(None, None, step)) if axis == 0 else (slice(None, None, step),)
    a = np.moveaxis(image[lines], axis, 0)
    same = a[1:] == a[:-1]
    if bad is not None:
        m = np.moveaxis(bad[lines], axis, 0)
        same &= ~m[1:] & ~m[:-1]
    width = a.shape[0] - run + 1
    runs = same[:width].copy()
    for k in range(1, run - 1):
        runs &= same[k : k + width]
    return runs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_runs_equal_shifted_comparisons(seed):
    from skymap._inputs_kernels import sampled_runs

    rng = np.random.default_rng(seed)
    ny, nx = rng.integers(9, 70, size=2)
    # few distinct values, so that runs of every length occur, plus NaN and a mask
    img = rng.integers(0, 2, size=(ny, nx)).astype(np.float32)
    img[rng.random((ny, nx)) < 0.02] = np.nan
    img[: ny // 3, : nx // 2] = 0.0
    bad = rng.random((ny, nx)) < 0.05
    for b in (None, bad):
        for run in (2, 3, 8):
            for step in (1, 3, 8):
                for axis in (0, 1):
                    got = sampled_runs(img, b, run, step, axis)
                    want = _runs_by_shifted_ands(img, b, run, step, axis)
                    assert np.array_equal(got, want), (b is None, run, step, axis)
