"""The tiled path without the image in the driver: the halo masker's catalogue found tile
by tile (skymap.masking.halo_tiles) equals the in-memory one, and the back end's
window plumbing (cut halo strips, point reads) gives the same pixels."""

import functools

import numpy as np
import pytest

da = pytest.importorskip("dask.array")

import skymap  # noqa: E402
import skymap.backends.dask as dask_backend  # noqa: E402
import skymap.backends.windows as windows  # noqa: E402
from skymap.backends.dask import DaskBackend  # noqa: E402
from skymap.backends.distributed import cluster_client  # noqa: E402
from skymap.backends.windows import Pieces, assemble  # noqa: E402
from skymap.masking import _hysteresis_kernels as _hk  # noqa: E402
from skymap.masking.bright import HaloMasker  # noqa: E402
from skymap.masking.halo_tiles import find_tiled  # noqa: E402
from skymap.masking.hysteresis import (  # noqa: E402
    _chained_sums,
    _sums_into,
    masked_block_sums,
)
from skymap.quality.simulate import scene_by_name  # noqa: E402

FIELDS = ("x", "y", "amplitude", "saturated", "radius", "profile_radius", "profile")


def _stars(seed, n=320):
    """Moffat-like stars (some clipped flat, some across tile edges), NaN cores on a
    tile edge, a masked strip crossing every tile and a masked square core."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n]
    img = rng.normal(10.0, 1.0, (n, n))
    centres = [(*rng.uniform(0, n, 2), 10 ** rng.uniform(1.5, 5)) for _ in range(30)]
    centres += [(128, 128, 3e5), (95, 200, 3e5), (250, 64, 3e5), (300, 300, 3e5)]
    for y, x, a in centres:
        img += a * (1 + ((yy - y) ** 2 + (xx - x) ** 2) / 4.0) ** -1.5
    img = np.minimum(img, 2e4).astype(np.float32)
    img[126:131, 126:131] = np.nan
    img[60:63, 190:194] = np.nan
    mask = np.zeros((n, n), bool)
    mask[:, 250:256] = True
    mask[297:304, 296:303] = True
    return img, mask


@pytest.mark.parametrize("seed", [0, 1])
def test_halo_catalogue_found_tile_by_tile_equals_the_whole_images(seed):
    img, mask = _stars(seed)
    masker = HaloMasker(max_radius=64.0, stack=4)
    whole = masker.find(img, None, mask | ~np.isfinite(img))
    assert whole.saturated.sum() >= 4 and len(whole) > 10
    # tiles on and off the 64-px sky blocks, one narrower than a block
    for tile, unit in [(128, (2, 2)), (96, (2, 2)), (48, (16, 16))]:
        be = DaskBackend(da.from_array(img, chunks=100), mask, tile=tile, unit=unit)
        tiled = find_tiled(masker, be)
        assert tiled.noise == whole.noise
        for f in FIELDS:
            assert np.array_equal(getattr(tiled, f), getattr(whole, f), equal_nan=True), f


@pytest.mark.filterwarnings("ignore::skymap.background.pipeline.ConvergenceWarning")
def test_a_tiled_fit_never_gathers_the_image(monkeypatch):
    # The driver holds small tables only: no back-end call gathers a full array.
    img = scene_by_name("saturated_halos", shape=(256, 256), seed=2).image
    ref = skymap.fit(img, max_iter=2)

    def refuse(self, array):
        raise AssertionError("gathered a full array in the driver")

    monkeypatch.setattr(DaskBackend, "gather", refuse)
    tiled = skymap.fit(da.from_array(img, chunks=100), tile=128, max_iter=2)
    assert np.array_equal(tiled.background.compute(), ref.background)
    assert np.array_equal(tiled.mask.compute(), ref.mask)


@pytest.mark.filterwarnings("ignore::skymap.background.pipeline.ConvergenceWarning")
def test_windows_from_border_strips_give_the_in_memory_fit(monkeypatch):
    # Every block partly in a window sends its border strips (however deep), as
    # between worker processes.
    monkeypatch.setattr(dask_backend, "one_process", lambda workers: False)
    monkeypatch.setattr(windows, "CUT_BYTES", 0)
    monkeypatch.setattr(windows, "RING_SHARE", 100.0)
    img = scene_by_name("crowded_stellar", shape=(128, 192), seed=4).image.astype(np.float32)
    ref = skymap.fit(img, max_iter=1)
    with cluster_client(workers=2, processes=False) as client:
        tiled = skymap.fit(da.from_array(img, chunks=64), tile=64, client=client, max_iter=1)
        bkg, mask = client.compute([tiled.background, tiled.mask], sync=True)
    assert np.array_equal(bkg, ref.background)
    assert np.array_equal(mask, ref.mask)
    assert [h.mask_fraction for h in tiled.history] == [h.mask_fraction for h in ref.history]


def test_values_at_reads_the_pixels_of_every_tile():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(70, 90))
    be = DaskBackend(da.from_array(img, chunks=32), tile=32, unit=(2, 2))
    ys, xs = rng.integers(0, 70, (5, 40)), rng.integers(0, 90, (5, 40))
    values, bad = be.values_at([be.image, be.bad], ys, xs)
    assert np.array_equal(values, img[ys, xs]) and not bad.any()


def test_assemble_copies_the_window_of_nested_blocks():
    rng = np.random.default_rng(2)
    for t in range(50):
        hs, ws = rng.integers(1, 7, 3), rng.integers(1, 7, 3)
        whole = rng.normal(size=(() if t % 2 else (2,)) + (hs.sum(), ws.sum()))
        ys, xs = np.cumsum([0, *hs]), np.cumsum([0, *ws])
        blocks = [
            [whole[..., ys[i] : ys[i + 1], xs[j] : xs[j + 1]] for j in range(3)] for i in range(3)
        ]
        y0, y1 = rng.integers(0, hs[0]), rng.integers(ys[2] + 1, ys[3] + 1)
        x0, x1 = rng.integers(0, ws[0]), rng.integers(xs[2] + 1, xs[3] + 1)
        got = assemble(blocks, (slice(y0, y1), slice(x0, x1)))
        assert np.array_equal(got, whole[..., y0:y1, x0:x1])


def _nested(whole, hs, ws):
    ys, xs = np.cumsum([0, *hs]), np.cumsum([0, *ws])
    return [
        [whole[..., ys[i] : ys[i + 1], xs[j] : xs[j + 1]] for j in range(len(ws))]
        for i in range(len(hs))
    ]


def test_pieces_read_a_window_in_place_and_copy_it_out_equal():
    """Pieces: the window copied out equals assemble's; a region inside one part is a
    view of that block (nothing copied), one across parts an equal copy."""
    rng = np.random.default_rng(3)
    for t in range(50):
        hs, ws = rng.integers(1, 7, 3), rng.integers(1, 7, 3)
        whole = rng.normal(size=(() if t % 2 else (2,)) + (hs.sum(), ws.sum()))
        blocks = _nested(whole, hs, ws)
        y0, y1 = int(rng.integers(0, hs[0])), int(rng.integers(hs[:2].sum() + 1, hs.sum() + 1))
        x0, x1 = int(rng.integers(0, ws[0])), int(rng.integers(ws[:2].sum() + 1, ws.sum() + 1))
        w = Pieces(blocks, (slice(y0, y1), slice(x0, x1)))
        assert w.shape == whole[..., y0:y1, x0:x1].shape
        assert np.array_equal(w.whole(), assemble(blocks, (slice(y0, y1), slice(x0, x1))))
        # the middle block lies wholly inside the window: a view of it
        r0, c0 = hs[0] - y0, ws[0] - x0
        mid = w.region((slice(r0, r0 + hs[1]), slice(c0, c0 + ws[1])))
        assert np.shares_memory(mid, blocks[1][1]) and np.array_equal(mid, blocks[1][1])
        across = w.region((slice(0, r0 + 1), slice(0, c0 + 1)))
        assert np.array_equal(across, whole[..., y0 : hs[0] + 1, x0 : ws[0] + 1])


@pytest.mark.parametrize("b", [2, 4, 8])
def test_pieces_block_sums_part_by_part_equal_the_whole_windows(b):
    """Masked block sums run on each part of a window and joined equal those of the
    copied window bit for bit when the parts start on block edges (as the tiles of a
    tiled fit do: the pairs' tasks of a binned masking scale read them so), with
    partial blocks at the far edges; a part off the blocks' edges gives None."""
    rng = np.random.default_rng(b)
    for _ in range(10):
        hs = b * rng.integers(1, 9, 3) + np.array([0, 0, rng.integers(0, b)])
        ws = b * rng.integers(1, 9, 3) + np.array([0, 0, rng.integers(0, b)])
        img = rng.normal(100.0, 30.0, (hs.sum(), ws.sum())).astype(np.float32)
        img[rng.random(img.shape) < 0.01] = np.nan
        excl = ~np.isfinite(img) | (rng.random(img.shape) < 0.2)
        y0, x0 = b * int(rng.integers(0, hs[0] // b)), b * int(rng.integers(0, ws[0] // b))
        sl = (slice(y0, int(hs.sum())), slice(x0, int(ws.sum())))
        w = Pieces(_nested(img, hs, ws), sl)
        e = Pieces(_nested(excl, hs, ws), sl)
        got = w.binned_into(functools.partial(_sums_into, b=b), b, 2, e)
        want = masked_block_sums(img[sl], excl[sl], b)
        assert all(np.array_equal(g, x, equal_nan=True) for g, x in zip(got, want, strict=True))
        off = (slice(y0 + 1, int(hs.sum())), slice(x0, int(ws.sum())))
        assert Pieces(_nested(img, hs, ws), off).binned_into(_sums_into, b, 2) is None


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint32)


@pytest.mark.parametrize(("b0", "b"), [(2, 4), (2, 8), (4, 8), (4, 16)])
def test_chained_sums_equal_the_sums_of_the_full_resolution_window_bit_for_bit(b0, b):
    """A binned masking scale's masked block sums from the previous scale's (binned by
    ``b0``, read as a window of their tiles, zeroed where the exclusion after that
    scale covers whole blocks, summed 2 x 2) equal masked_block_sums of the image
    with that exclusion, bit for bit (signed zeros too), on windows cut at the far
    edges mid-block, one block alone (a view: the previous sums are not written),
    with NaN pixels, excluded pixels and detections of whole ``b0`` blocks; the
    previous scale's sums are left as they were."""
    rng = np.random.default_rng(b0 * 100 + b)
    for k in range(12):
        n = 1 if k == 0 else 3
        hs = b * rng.integers(2, 7, n) + np.array([0] * (n - 1) + [rng.integers(0, b)])
        ws = b * rng.integers(2, 7, n) + np.array([0] * (n - 1) + [rng.integers(0, b)])
        img = rng.normal(0.0, 30.0, (hs.sum(), ws.sum())).astype(np.float32)
        img[rng.random(img.shape) < 0.01] = np.nan
        excl = ~np.isfinite(img) | (rng.random(img.shape) < 0.2)
        excl[:b0, :b0] = True  # a block excluded before the previous scale too
        prev = np.stack(masked_block_sums(img, excl, b0))
        before = prev.copy()
        det = rng.random(prev.shape[1:]) < 0.15
        det[-1, -1] = True  # a block at the far corner, partial where the image ends
        new = _hk.expand_mask_into(det, b0, excl.copy())
        y0 = b * int(rng.integers(0, hs[0] // b)) if n > 1 else 0
        x0 = b * int(rng.integers(0, ws[0] // b)) if n > 1 else 0
        sl = (slice(y0, int(hs.sum())), slice(x0, int(ws.sum())))
        bsl = (slice(y0 // b0, prev.shape[1]), slice(x0 // b0, prev.shape[2]))
        ph, pw = (np.diff(-(-np.cumsum([0, *e]) // b0)) for e in (hs, ws))
        got = _chained_sums(
            Pieces(_nested(prev, ph, pw), bsl), Pieces(_nested(new, hs, ws), sl), b0, b
        )
        want = masked_block_sums(img[sl], new[sl], b)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape
            assert np.array_equal(_bits(g), _bits(w))
        assert np.array_equal(_bits(prev), _bits(before))
