"""The tiled path without the image in the driver: the halo masker's catalogue found tile
by tile (skymap.masking.halo_tiles) equals the in-memory one, and the back end's
window plumbing (cut halo strips, point reads) gives the same pixels."""

import numpy as np
import pytest

da = pytest.importorskip("dask.array")

import skymap  # noqa: E402
import skymap.backends.dask as dask_backend  # noqa: E402
import skymap.backends.windows as windows  # noqa: E402
from skymap.backends.dask import DaskBackend  # noqa: E402
from skymap.backends.distributed import cluster_client  # noqa: E402
from skymap.backends.windows import assemble  # noqa: E402
from skymap.masking.bright import HaloMasker  # noqa: E402
from skymap.masking.halo_tiles import find_tiled  # noqa: E402
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
