"""The tiled (dask) mesh background and the tiled default pipeline equal the in-memory
fits, and files map over a LocalCluster."""

import functools

import numpy as np
import pytest
from scipy import ndimage

da = pytest.importorskip("dask.array")

distributed = pytest.importorskip("distributed")

import skymap  # noqa: E402
import skymap.backends.dask as dask_backend  # noqa: E402
from skymap.backends.base import block_sums  # noqa: E402
from skymap.backends.dask import (  # noqa: E402
    DaskBackend,
    _final_mask,
    _keep_labels,
    _tile_label_info,
    core_of,
    float_keys,
    key_to_float,
)
from skymap.backends.distributed import (  # noqa: E402
    cluster_client,
    map_files,
    tiled_mesh_background,
)
from skymap.backends.labels import merge_labels  # noqa: E402
from skymap.background.defaults import default_pipeline  # noqa: E402
from skymap.background.interpolate import IDW, SExtractorSpline, ZoomSpline  # noqa: E402
from skymap.background.mesh import MeshBackground  # noqa: E402
from skymap.background.noise import NoiseModel  # noqa: E402
from skymap.background.pipeline import (  # noqa: E402
    IterativeBackground,
    RingMedianGuess,
    Stage,
)
from skymap.background.smooth import ThinPlateSmoother, reference_level  # noqa: E402
from skymap.background.tiled import tiled_fit  # noqa: E402
from skymap.masking import _hysteresis_kernels as _hk  # noqa: E402
from skymap.masking.hysteresis import (  # noqa: E402
    CoarseRMS,
    HysteresisMasker,
    _factor_of,
    _hysteresis,
    _pair_differences,
    seeded_codes,
    tile_sampled_pairs,
)
from skymap.quality.simulate import notebook_scene, scene_by_name  # noqa: E402
from skymap.stats.filters import ring_footprint, ring_median  # noqa: E402


@pytest.fixture(scope="module")
def structured():
    rng = np.random.default_rng(7)
    y, x = np.mgrid[:600, :700]
    sky = 100 + 0.02 * x + 8 * np.sin(x / 60.0) * np.cos(y / 45.0)
    img = (sky + rng.normal(0, 1, x.shape)).astype(np.float32)
    img[rng.random(img.shape) < 0.01] += 50  # sources
    img[100:110, 200:260] = np.nan  # a hole the statistics must skip
    mask = rng.random(img.shape) < 0.05
    return img, mask


@pytest.mark.parametrize(
    "mesh",
    [
        MeshBackground(box_size=24),
        MeshBackground.like_photutils((20, 28)),
        MeshBackground.like_sextractor(32),
        MeshBackground(box_size=30, interpolator=IDW(n_neighbors=8)),
        MeshBackground(box_size=25, interpolator=ZoomSpline(order=5)),
        MeshBackground(box_size=25, interpolator=SExtractorSpline()),
    ],
    ids=["default", "photutils", "sextractor", "idw", "spline5", "sexspline"],
)
def test_tiled_equals_in_memory_to_1e6_of_rms(structured, mesh):
    img, mask = structured
    ref = mesh.fit(img, mask=mask)
    tiled = tiled_mesh_background(da.from_array(img, chunks=150), mesh, mask=mask, tile=100)
    np.testing.assert_array_equal(tiled.mesh.mesh_background, ref.mesh_background)
    tol = 1e-6 * ref.global_rms
    assert np.abs(tiled.background.compute() - ref.background).max() <= tol
    assert np.abs(tiled.rms.compute() - ref.rms).max() <= tol


def test_tiled_coverage_mask_gets_fill_value(structured):
    img, _ = structured
    cov = np.zeros(img.shape, bool)
    cov[:, :50] = True
    mesh = MeshBackground(box_size=32, fill_value=-1.0)
    ref = mesh.fit(img, coverage_mask=cov)
    tiled = tiled_mesh_background(img, mesh, coverage_mask=cov, tile=128)
    bkg = tiled.background.compute()
    assert np.all(bkg[:, :50] == -1.0)
    assert np.abs(bkg - ref.background).max() <= 1e-6 * ref.global_rms


def test_tiles_are_aligned_to_the_mesh(structured):
    img, _ = structured
    tiled = tiled_mesh_background(img, MeshBackground(box_size=32), tile=100)
    assert tiled.tile == (96, 96)
    assert all(c % 32 == 0 for c in tiled.background.chunks[0][:-1])
    assert tiled.halo == 0  # skymap's interpolators evaluate windows exactly


def test_interpolator_without_window_uses_a_halo(structured):
    img, _ = structured

    class NoWindow:
        def __call__(self, values, mask, geometry, shape):
            return ZoomSpline()(values, mask, geometry, shape)

    mesh = MeshBackground(box_size=32, interpolator=NoWindow())
    ref = mesh.fit(img)
    tiled = tiled_mesh_background(img, mesh, tile=128)
    assert tiled.halo > 0
    assert np.abs(tiled.background.compute() - ref.background).max() <= 1e-6 * ref.global_rms


def test_tiled_rejects_bad_input():
    with pytest.raises(ValueError, match="box_size"):
        tiled_mesh_background(np.zeros((10, 10)), MeshBackground(box_size=32))
    with pytest.raises(ValueError, match="2-dimensional"):
        tiled_mesh_background(np.zeros(10), MeshBackground(box_size=2))
    with pytest.raises(ValueError, match="mask"):
        tiled_mesh_background(np.zeros((64, 64)), MeshBackground(box_size=8), mask=np.zeros(3))


def _square_or_fail(x):
    if x < 0:
        raise ValueError("negative input")
    return x * x


@pytest.fixture(scope="module")
def client():
    with cluster_client(workers=1) as c:
        yield c


def test_tiled_on_a_local_cluster_equals_in_memory(structured, client):
    img, mask = structured
    mesh = MeshBackground(box_size=32)
    ref = mesh.fit(img, mask=mask)
    tiled = tiled_mesh_background(img, mesh, mask=mask, tile=128, scheduler=client)
    bkg = client.compute(tiled.background).result()
    assert np.abs(bkg - ref.background).max() <= 1e-6 * ref.global_rms


def test_map_files_on_a_local_cluster_keeps_order_and_reports_failures(client):
    done = []
    rows = map_files(_square_or_fail, [3, -1, 2], client=client, progress=lambda: done.append(1))
    assert [r[0] for r in rows] == [3, -1, 2]
    assert rows[0][1] == 9 and rows[2][1] == 4
    assert isinstance(rows[1][2], ValueError) and rows[1][1] is None
    assert len(done) == 3


# --------------------------------------------------------------------------- tiled fit


@pytest.fixture(scope="module")
def threads_client():
    with cluster_client(workers=2, processes=False) as c:
        yield c


def _crowded(dtype):
    return scene_by_name("crowded_stellar", shape=(192, 288), seed=3).image.astype(dtype)


def _bad_pixels():
    img = _crowded(np.float64)
    img[40:46, 60:250] = np.nan  # a NaN stripe across several tiles
    mask = np.zeros(img.shape, bool)
    mask[150:230, 10:120] = True
    return img, mask


def _assert_same_fit(tiled, ref, client=None, change_rtol=1e-9):
    """A tiled fit equals the in-memory one: maps and masks bit for bit, the history's
    mask statistics exactly, the change (summed tile by tile) to rounding."""
    compute = (
        (lambda xs: client.compute(xs, sync=True))
        if client
        else (lambda xs: [x.compute() for x in xs])
    )
    bkg, rms, final, bad = compute([tiled.background, tiled.rms, tiled.mask, tiled.bad_mask])
    assert bkg.dtype == ref.background.dtype
    assert np.array_equal(bkg, ref.background)
    assert np.array_equal(rms, ref.rms)
    assert np.array_equal(final, ref.mask)
    assert np.array_equal(bad, ref.bad_mask)
    assert [h.mask_fraction for h in tiled.history] == [h.mask_fraction for h in ref.history]
    assert [h.mask_change for h in tiled.history][1:] == [h.mask_change for h in ref.history][1:]
    assert [h.min_scale for h in tiled.history] == [h.min_scale for h in ref.history]
    assert [h.scale for h in tiled.history] == [h.scale for h in ref.history]
    np.testing.assert_allclose(
        [h.change for h in tiled.history], [h.change for h in ref.history], rtol=change_rtol
    )
    assert tiled.noise == ref.noise
    assert tiled.converged == ref.converged and tiled.stop == ref.stop


@pytest.mark.parametrize(
    ("scene", "options"),
    [
        ("notebook", {}),
        ("crowded_float32", {"max_iter": 2}),
        ("bad_pixels", {"cell_size": 6, "max_iter": 2}),
        ("galaxies_lsb", {"max_iter": 3}),  # the smoothing floor (max_source_size)
    ],
)
def test_fit_of_a_dask_array_equals_in_memory_on_a_local_cluster(scene, options, threads_client):
    if scene == "notebook":
        img, mask = notebook_scene(shrink_factor=8).image, None
    elif scene == "crowded_float32":
        img, mask = _crowded(np.float32), None
    elif scene == "galaxies_lsb":
        img = scene_by_name("galaxies_lsb", shape=(256, 256), seed=1).image
        mask = None
    else:
        img, mask = _bad_pixels()
    ref = skymap.fit(img, mask, **options)
    tiled = skymap.fit(
        da.from_array(img, chunks=100), mask, tile=128, client=threads_client, **options
    )
    assert isinstance(tiled.background, da.Array) and isinstance(tiled.mask, da.Array)
    assert len(tiled.background.chunks[0]) > 1 and len(tiled.background.chunks[1]) > 1
    _assert_same_fit(tiled, ref, threads_client)


def test_each_tile_runs_on_its_worker(threads_client, monkeypatch):
    """The tiles are cut into one contiguous run per worker, and the blocks of every
    array of a tile (a step's output included) are kept on that tile's worker."""
    img = np.random.default_rng(2).normal(size=(256, 256)).astype(np.float32)
    shared = DaskBackend(img, tile=64, unit=(2, 2), client=threads_client)
    # threads of one process read every block in place
    assert shared.placement.shared and shared._near(1, 0)(2, 0)
    # as worker processes would: a border strip from the other worker's blocks
    monkeypatch.setattr(dask_backend, "one_process", lambda workers: False)
    be = DaskBackend(da.from_array(img, chunks=100), tile=64, unit=(2, 2), client=threads_client)
    placement = be.placement
    workers = sorted(threads_client.scheduler_info()["workers"])
    assert placement.grid == (4, 4) and placement.workers == (workers[0],) * 8 + (workers[1],) * 8
    assert placement(("x", 0, 3, 1)) == [workers[1]] and placement("delayed-key") == []
    assert placement(("x", 5, 0)) == []  # not a tile
    (maps,) = be.persist(
        be.map_tiles(lambda a, window, core: a[1:-1, 1:-1] * 2, [be.image], halo=1)
    )
    for arr in (be.bad, maps):
        distributed.wait(arr)
        where = threads_client.who_has(arr)
        for (name, i, j), held in where.items():
            assert list(held) == [placement.worker(i, j)], (name, i, j)
    # a window reads a neighbouring block whole on its own worker, its border strip
    # (a cut task) only from the other worker
    assert be._near(0, 0)(1, 3) and not be._near(1, 0)(2, 0)
    assert DaskBackend(img, tile=64, client="sync").placement is None


def test_thread_workers_keep_their_results_in_a_plain_dict(threads_client):
    """Workers that are threads of this process hold their results in a dict, not a
    spilling buffer (each thread would weigh the whole process against its limit),
    and no memory monitor pauses them."""

    def memory(dask_worker):
        manager = dask_worker.memory_manager
        return type(dask_worker.data).__name__, manager.memory_pause_fraction

    assert list(threads_client.run(memory).values()) == [("dict", False)] * 2
    monitors = threads_client.run(lambda dask_worker: list(dask_worker.periodic_callbacks))
    assert not any("memory_monitor" in names for names in monitors.values())


def test_our_clusters_keep_no_log_of_the_task_specs_sent(threads_client):
    """The scheduler in the driver keeps no log of its messages to the workers: it held
    every task spec of a tiled fit after it (10 of the 56 MB an 8192^2 fit's driver
    kept)."""
    from distributed.batched import BatchedSend

    s = threads_client.cluster.scheduler
    streams = [v for v in s.stream_comms.values() if isinstance(v, BatchedSend)]
    assert len(streams) == 2
    assert all(b.recent_message_log.maxlen == 0 for b in streams)
    threads_client.submit(sum, [1, 2]).result()
    assert all(len(b.recent_message_log) == 0 for b in streams)


def test_a_memory_limit_is_for_worker_processes():
    with (
        pytest.raises(ValueError, match="memory_limit is per worker process"),
        cluster_client(workers=1, memory_limit="1GiB"),
    ):
        pass


def test_small_reductions_of_persisted_blocks_run_in_the_driver_on_threads(
    threads_client, monkeypatch
):
    """Where the workers are threads of this process, the counts, subsamples, extents,
    valid blocks, first valid pixel and values at points of persisted arrays are made
    in the driver from the blocks fetched by reference: no graph is computed, and the
    values are numpy's on the whole arrays (as on a local scheduler, which computes
    them through graphs)."""
    rng = np.random.default_rng(4)
    img = rng.normal(size=(150, 170)).astype(np.float32)
    img[:9, :] = np.nan  # the first valid pixel in a later row of tiles
    img[100:130, 20:90] = np.nan
    mask = np.zeros(img.shape, bool)
    mask[:, 160:] = True
    bad = ~np.isfinite(img) | mask
    ys, xs = rng.integers(0, 150, 40), rng.integers(0, 170, 40)
    local = DaskBackend(img, mask, tile=64, unit=(2, 2), client="sync")

    def no_graph(*args):
        raise AssertionError("a graph was computed")

    monkeypatch.setattr(DaskBackend, "_compute_list", no_graph)
    monkeypatch.setattr(DaskBackend, "_persist_gather", no_graph)
    be = DaskBackend(img, mask, tile=64, unit=(2, 2), client=threads_client)
    assert be.placement.shared and be.nbad == np.count_nonzero(bad)
    _, count, _ = be.mask_stats(be.bad)
    assert count == np.count_nonzero(bad)
    assert np.array_equal(be.subsample(be.bad, 7), bad[::7, ::7])
    assert np.array_equal(be.subsample(be.image, 5), img[::5, ::5], equal_nan=True)
    from skymap.backends.base import extent_of, valid_blocks

    extent = extent_of(bad.all(axis=1), bad.all(axis=0))
    assert extent == (141, 160) and be.valid_extent() == extent

    assert np.array_equal(be.valid_blocks(8), valid_blocks(bad, 8))
    assert be.first_valid(be.bad) == img[9, 0]
    # the halo exclusion's new bad pixels, persisted and counted without a graph
    more = be.bad | (be.image > 1.5)
    kept, count = be.persist_counted(more)
    assert count == np.count_nonzero(bad | (np.nan_to_num(img) > 1.5)) > be.nbad
    assert np.array_equal(np.asarray(kept), bad | (np.nan_to_num(img) > 1.5))
    got = be.values_at([be.image, be.bad], ys, xs)
    assert np.array_equal(got[0], img[ys, xs], equal_nan=True)
    assert np.array_equal(got[1], bad[ys, xs])
    monkeypatch.undo()
    # the graphs' answers on a local scheduler are the same
    assert local.valid_extent() == extent
    assert np.array_equal(local.valid_blocks(8), valid_blocks(bad, 8))
    assert local.first_valid(local.bad) == img[9, 0]
    assert np.array_equal(local.subsample(local.bad, 7), bad[::7, ::7])
    assert local.persist_counted(local.bad | (local.image > 1.5))[1] == count


def test_cell_and_tile_sums_of_persisted_blocks_run_in_the_driver_on_threads(
    threads_client, monkeypatch
):
    """Where the workers are threads of this process, the cell grids and the per-tile
    sums of persisted arrays are made in the driver from the blocks fetched by
    reference (no graph, no task per tile), equal bit for bit to a local scheduler's
    graphs and to the whole image's block sums; an array not persisted (lazy) still
    goes through a graph."""
    from skymap.backends._tile_tasks import _tile_change
    from skymap.backends.base import CHANGE_STEP as k
    from skymap.backends.base import block_sums

    rng = np.random.default_rng(7)
    img = rng.normal(size=(150, 170)).astype(np.float32)
    img[100:130, 20:90] = np.nan
    local = DaskBackend(img, tile=64, unit=(8, 8), client="sync")
    be = DaskBackend(img, tile=64, unit=(8, 8), client=threads_client)
    assert be.placement.shared and len(be.chunks[0]) > 1 and len(be.chunks[1]) > 1
    lazy = be.bad | (be.image > 1.0)

    class Flat:
        """A model whose maps are constants (what _tile_change reads)."""

        def __init__(self, level):
            self.level = level

        def background_map(self, step=1, *, window):
            (y0, y1), (x0, x1) = window
            return np.full((-(-(y1 - y0) // step), -(-(x1 - x0) // step)), self.level)

    class Noise:
        def window(self, window, step=1):
            return Flat(np.float32(0.5)).background_map(step, window=window)

    change = {"new": Flat(np.float32(1.25)), "old": Flat(np.float32(0.5)), "noise": None,
              "window_of": lambda noise, window, step: Noise().window(window, step)}  # fmt: skip
    want = local.per_tile_sums(_tile_change, [local.bad], width=2, **change)
    want_grid = local.cell_grid(block_sums, [local.image, local.bad], (8, 8), 2, b=8)
    assert np.array_equal(want_grid, block_sums(img, ~np.isfinite(img), 8), equal_nan=True)
    computed = []

    def no_graph(self, things):
        computed.append(len(things))
        raise AssertionError("a graph was computed")

    monkeypatch.setattr(DaskBackend, "_compute_list", no_graph)
    got = be.cell_grid(block_sums, [be.image, be.bad], (8, 8), 2, b=8)
    assert got.dtype == np.float64 and np.array_equal(got, want_grid, equal_nan=True)
    got = be.per_tile_sums(_tile_change, [be.bad], width=2, **change)
    assert np.array_equal(got, want) and got[1] == np.count_nonzero(np.isfinite(img[::k, ::k]))
    with pytest.raises(AssertionError, match="a graph was computed"):
        be.cell_grid(block_sums, [be.image, lazy], (8, 8), 2, b=8)
    assert computed == [1]


def _task_functions(task) -> set:
    """The functions of the nested tasks inside one task of a hand-built graph."""
    if isinstance(task, (tuple, list)):
        found = {task[0]} if isinstance(task, tuple) and task and callable(task[0]) else set()
        for t in task[1:] if found else task:
            found |= _task_functions(t)
        return found
    return set()


@pytest.mark.parametrize("where", ["local", "threads"])
def test_arrays_read_on_the_tile_alone_take_only_its_block(where, request):
    """``map_tiles(..., own=(k,))``: the array ``k`` is given to the tile's function as
    the tile's block itself (its core), and its neighbouring blocks are not inputs of
    the task; the other arrays are read over the grown window as before, and the
    result equals reading every array over the window and cutting the core."""
    from dask.core import keys_in_tasks

    client = "sync" if where == "local" else request.getfixturevalue("threads_client")
    rng = np.random.default_rng(9)
    img = rng.normal(size=(96, 128)).astype(np.float32)
    flags = rng.random(img.shape) < 0.3
    be = DaskBackend(img, flags, tile=32, unit=(8, 8), client=client)
    flags_da = be.bad

    def windowed(a, f, *, window, core):
        sl = core_of(window, core)
        return np.ascontiguousarray(a[sl]) + a.mean() + f[sl]

    def owned(a, f, *, window, core):
        assert isinstance(f, np.ndarray) and f.shape == tuple(e - s for s, e in core)
        return np.ascontiguousarray(a[core_of(window, core)]) + a.mean() + f

    want = be.map_tiles(windowed, [be.image, flags_da], halo=8, dtype=np.float32)
    got = be.map_tiles(owned, [be.image, flags_da], halo=8, dtype=np.float32, own=(1,))
    graph = dict(got.__dask_graph__())
    image_keys, flag_keys = (set(dask_backend.key_grid(a).ravel()) for a in (be.image, flags_da))
    fk = dask_backend.key_grid(flags_da)
    for (i, j), key in np.ndenumerate(dask_backend.key_grid(got)):
        deps = keys_in_tasks(set(graph), [graph[key]])
        assert deps & flag_keys == {fk[i, j]}
        assert len(deps & image_keys) > 1  # the window still reads the neighbours
    a, b = be.compute(want, got)
    assert np.array_equal(a, b)


def test_windows_read_in_place_name_whole_blocks_and_cut_only_the_lookups(synchronous):
    """Where every block is read in place (no cluster, or threads of one process), a
    window names its blocks whole with the slice of their concatenation (no nested
    task per block); the inline lookups of a labelling are still cut to the window's
    part of their block. The windows are the same either way."""
    from skymap.backends.windows import piece

    rng = np.random.default_rng(4)
    img = rng.normal(size=(96, 128)).astype(np.float32)
    be = DaskBackend(da.from_array(img, chunks=32), tile=32, unit=(8, 8))
    assert be.placement is None

    def shifted(a, *, window, core):
        return np.ascontiguousarray(a[core_of(window, core)]) + a.mean()

    out = be.map_tiles(shifted, [be.image], halo=8, dtype=np.float32)
    graph = dict(out.__dask_graph__())
    tasks = [graph[k] for k in dask_backend.key_grid(out).ravel()]
    assert not any(piece in _task_functions(t) for t in tasks)
    want = np.empty_like(img)
    for _, _, (y0, y1), (x0, x1) in be.tiles():
        (w0, w1), (u0, u1) = be.grown((y0, y1), (x0, x1), 8)
        want[y0:y1, x0:x1] = img[y0:y1, x0:x1] + img[w0:w1, u0:u1].mean()
    assert np.array_equal(np.asarray(out.compute()), want)
    # the lookups of label_seeded: each window computes them on its part only
    codes = be.map_tiles(
        lambda a, *, window, core: np.where(a > 2, 2, np.where(a > 0.5, 1, 0)).astype(np.uint8),
        [be.image], dtype=np.uint8,
    )  # fmt: skip
    det, _ = be.label_seeded(codes, seeded_codes, block=1)
    grown = be.map_tiles(
        lambda d, *, window, core: np.ascontiguousarray(d[core_of(window, core)]),
        [det], halo=8, dtype=bool,
    )  # fmt: skip
    graph = dict(grown.__dask_graph__())
    inner = [graph[k] for k in dask_backend.key_grid(grown).ravel()]
    assert all({piece, _keep_labels} <= _task_functions(t) for t in inner[4:5])
    assert np.array_equal(np.asarray(grown.compute()), np.asarray(det.compute()))


def _sum_and_window(a, *, window, core):
    return float(a.sum()), (a.copy(), window)


def _core_of_kept(kept, *, core, scale):
    a, window = kept
    return a[core_of(window, core)] * scale


@pytest.mark.parametrize("apart", [False, True])
def test_kept_values_of_reduce_windows_are_mapped_where_they_are(
    threads_client, monkeypatch, apart
):
    """reduce_windows(keep=True): the combine sees the first items only, map_kept the
    second ones, on threads of one process and (a task per tile) between processes."""
    if apart:
        monkeypatch.setattr(dask_backend, "one_process", lambda workers: False)
    img = np.random.default_rng(4).normal(size=(96, 128)).astype(np.float32)
    be = DaskBackend(da.from_array(img, chunks=40), tile=32, unit=(2, 2), client=threads_client)
    assert be.placement.shared is not apart
    total, kept = be.reduce_windows(_sum_and_window, [be.image], sum, halo=4, keep=True)
    out = be.map_kept(_core_of_kept, kept, dtype=np.float32, scale=total)
    got = be.compute(out)
    windows = sum(float(img[slice(*r), slice(*c)].sum()) for r, c in (
        be.grown(ys, xs, 4) for _, _, ys, xs in be.tiles()
    ))  # fmt: skip
    np.testing.assert_allclose(float(be.compute(total)), windows, rtol=1e-6)
    np.testing.assert_allclose(got, img * np.float32(be.compute(total)), rtol=1e-6)


def _stacked_core(kept, *, core):
    a, window = kept
    return np.stack((a[core_of(window, core)], -a[core_of(window, core)]))


@pytest.mark.parametrize("apart", [False, True])
def test_blocks_carried_with_the_labels_are_read_inline_on_threads(
    threads_client, monkeypatch, apart
):
    """label_seeded(carry=): each label task makes its tile's block of the lazy array
    too and keeps it with the labels; the returned array (the last kept item) holds
    those blocks, and windows over it on threads of one process take them out of the
    labels' results inline (none of its keys is an input of their tasks), between
    processes through a getter task per block. The windows read the same values."""
    from dask.core import keys_in_tasks

    if apart:
        monkeypatch.setattr(dask_backend, "one_process", lambda workers: False)
    img = np.random.default_rng(6).normal(size=(96, 128)).astype(np.float32)
    be = DaskBackend(da.from_array(img, chunks=32), tile=32, unit=(2, 2), client=threads_client)
    _, kept = be.reduce_windows(_sum_and_window, [be.image], sum, halo=4, keep=True)
    carry = be.map_kept(_stacked_core, kept, dtype=np.float32, layers=2)
    codes = be.map_tiles(
        lambda a, *, window, core: np.where(a > 2, 2, np.where(a > 0.5, 1, 0)).astype(np.uint8),
        [be.image], dtype=np.uint8,
    )  # fmt: skip
    det, (carried,) = be.label_seeded(codes, seeded_codes, block=1, carry=carry)
    assert carried.shape == (2, *img.shape)
    out = be.map_tiles(
        lambda c, *, window, core: c[0][core_of(window, core)] + c[1].sum(),
        [carried], halo=4, dtype=np.float32,
    )  # fmt: skip
    graph = dict(out.__dask_graph__())
    carried_keys = {k for row in carried.__dask_keys__()[0] for k in row}
    deps = keys_in_tasks(set(graph), [graph[k] for k in dask_backend.key_grid(out).ravel()])
    assert bool(deps & carried_keys) is apart
    want = np.empty_like(img)
    for _, _, (y0, y1), (x0, x1) in be.tiles():
        (w0, w1), (u0, u1) = be.grown((y0, y1), (x0, x1), 4)
        want[y0:y1, x0:x1] = img[y0:y1, x0:x1] - img[w0:w1, u0:u1].sum(dtype=np.float32)
    np.testing.assert_allclose(be.compute(out), want, rtol=1e-5, atol=1e-3)
    assert np.array_equal(be.compute(carried), np.stack((img, -img)))


def test_fit_runs_an_explicit_pipeline_on_a_memmap(tmp_path):
    rng = np.random.default_rng(5)
    y, x = np.mgrid[:200, :260]
    img = 20 + 0.02 * x + rng.normal(size=x.shape) * (1 + x / 130.0)  # varying noise
    img[rng.random(img.shape) < 0.003] += 80
    img = img.astype(np.float32)
    np.save(tmp_path / "img.npy", img)
    pipe = IterativeBackground(
        first_guess=ThinPlateSmoother(cell_size=10, smoothing=1e7),
        stages=(
            Stage(
                # dilation 5 px: the EDT path of the dilation; no surround
                masker=HysteresisMasker(scales=(1.0, 3.0), dilate=5.0, surround=0.0),
                estimator=ThinPlateSmoother(cell_size=(10, 8)),
            ),
        ),
        max_iter=2,
    )
    ref = pipe.fit(img)
    tiled = pipe.fit(np.load(tmp_path / "img.npy", mmap_mode="r"), tile=64)
    # units lcm(2, cells 10, blocks 1 and 2) = 10 along y, lcm(2, 10, 8, 1, 2) = 40 along x
    assert tiled.tiles.tile == (60, 40)
    _assert_same_fit(tiled, ref)


@pytest.fixture
def synchronous():
    """dask's synchronous scheduler, even while the module's LocalCluster client is the
    default one (its overhead dominates fits this small)."""
    import dask

    with dask.config.set(scheduler="sync"):
        yield


def _varying_depth(shape=(128, 192), seed=4):
    """Sky, sources and noise 4x deeper on the left than on the right, with a mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    noise = np.where(xx < shape[1] // 2, 1.0, 4.0)
    img = 100 + 0.02 * xx + 3 * np.sin(yy / 60.0) + rng.normal(size=shape) * noise
    for _ in range(30):
        y, x = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        img += rng.uniform(5, 80) * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 4.5)
    mask = np.zeros(shape, bool)
    mask[20:30, 40:90] = True
    return img.astype(np.float32), mask, noise


def test_an_error_map_as_a_dask_array_gives_the_in_memory_fit(threads_client):
    img, mask, noise = _varying_depth(shape=(96, 128))
    err = noise.copy()
    err[5, 7], err[90, 100] = np.inf, np.nan  # no information: excluded
    ref = skymap.fit(img, mask, error=err, max_iter=2)
    # the error map is used: without it the fit differs
    assert not np.array_equal(skymap.fit(img, mask, max_iter=2).background, ref.background)
    # the error map chunked unlike the image, both unlike the tiles
    tiled = skymap.fit(
        da.from_array(img, chunks=50), mask, tile=48, client=threads_client, max_iter=2,
        error=da.from_array(err, chunks=70),
    )  # fmt: skip
    assert isinstance(tiled.background, da.Array) and len(tiled.tiles.chunks[1]) > 2
    bad = threads_client.compute(tiled.bad_mask, sync=True)
    assert bad[5, 7] and bad[90, 100]
    _assert_same_fit(tiled, ref, threads_client)


def test_a_weight_memmap_and_a_ccddata_uncertainty_fit_tiled_as_in_memory(tmp_path, synchronous):
    from astropy.nddata import CCDData, StdDevUncertainty

    img, mask, noise = _varying_depth(seed=5)
    weight = 1.0 / noise**2
    weight[3, 3] = 0.0
    np.save(tmp_path / "wht.npy", weight)
    ref = skymap.fit(img, mask, weight=weight, max_iter=2)
    tiled = skymap.fit(
        da.from_array(img, chunks=64), mask, tile=64, max_iter=2,
        weight=np.load(tmp_path / "wht.npy", mmap_mode="r"),
    )  # fmt: skip
    assert tiled.bad_mask[3, 3].compute()
    _assert_same_fit(tiled, ref)
    # an in-memory CCDData with tile=: its mask and uncertainty count as in memory
    with np.errstate(divide="ignore"):
        ccd = CCDData(
            img, unit="electron/s", mask=mask, uncertainty=StdDevUncertainty(weight**-0.5)
        )
    res = skymap.fit(ccd, tile=64, max_iter=2)
    assert res.unit == "electron/s" and res.rms.unit == "electron/s"
    assert np.array_equal(res.background.value, ref.background)
    assert np.array_equal(res.rms.value, ref.rms)
    assert np.array_equal(np.asarray(res.bad_mask), ref.bad_mask)


@pytest.mark.filterwarnings("ignore::skymap.background.convergence.ConvergenceWarning")
def test_tiles_align_to_the_error_blocks_of_any_pipeline(synchronous):
    img, _, noise = _varying_depth(shape=(120, 150))
    pipe = IterativeBackground(
        first_guess=ThinPlateSmoother(cell_size=(6, 10), smoothing=1e7),
        stages=(
            Stage(
                masker=HysteresisMasker(scales=(1.0,), surround=0.0),
                estimator=ThinPlateSmoother(cell_size=(6, 10)),
            ),
        ),
        max_iter=2,
    )
    # the cells and the change's subsample (4 px): lcm(6, 4) = 12, lcm(10, 4) = 20
    assert pipe.tile_unit(img.shape) == (12, 20)
    ref = pipe.fit(img, error=noise)
    tiled = pipe.fit(img, error=noise, tile=40)
    assert tiled.tiles.tile == (36, 40)
    _assert_same_fit(tiled, ref)
    # a back end built by hand aligns its tiles to the error blocks by itself
    be = DaskBackend(img, tile=40, unit=(6, 10), error=noise)
    assert be.unit == (12, 20)
    _assert_same_fit(pipe.fit(None, backend=be), ref)


def test_a_tiled_error_map_is_checked_like_an_in_memory_one(synchronous):
    img, _, noise = _varying_depth(shape=(64, 64))
    bad = noise.copy()
    bad[10, 10] = -1.0
    with pytest.raises(ValueError, match="error must be >= 0 everywhere"):
        skymap.fit(da.from_array(img, chunks=32), error=da.from_array(bad, chunks=32))
    with pytest.raises(ValueError, match="weight must have the image's shape"):
        skymap.fit(da.from_array(img, chunks=32), weight=da.ones((64, 63)))
    with pytest.raises(ValueError, match="not both"):
        skymap.fit(img, tile=32, error=noise, weight=noise)
    be = default_pipeline().backend_for(img, tile=32)
    with pytest.raises(ValueError, match="go to the back end"):
        default_pipeline().fit(None, backend=be, error=noise)


def test_merged_cells_fit_tiled_as_in_memory():
    # A small frame whose fits merge their 2-3 px cells (ThinPlateSmoother.coarsening):
    # the tiles still bin at the automatic cells, so the tiled fit is the in-memory one.
    from skymap.quality.simulate import scene_by_name

    img = scene_by_name("galaxies_lsb", shape=(192, 256), seed=2).image.astype(np.float32)
    pipe = default_pipeline()
    mem = pipe.fit(img)
    assert any(h.model.cell_size != h.model.binned_cells for h in mem.history)
    til = pipe.fit(img, tile=128)
    np.testing.assert_array_equal(np.asarray(til.background), mem.background)
    np.testing.assert_array_equal(np.asarray(til.mask), mem.mask)


def test_fit_with_a_ring_median_first_guess_equals_in_memory():
    img = _crowded(np.float32)[:200, :260]
    mask = np.zeros(img.shape, bool)
    mask[60:120, 80:150] = True  # far wider than the ring: pixels with an empty ring
    pipe = IterativeBackground(
        first_guess=RingMedianGuess(radius=6, width=3),
        stages=(Stage(masker=HysteresisMasker(scales=(1.0, 2.0)), estimator=ThinPlateSmoother()),),
        final=ThinPlateSmoother(protect_scale=8.0),
        max_iter=2,
    )
    ref = pipe.fit(img, mask)
    assert np.isnan(ring_median(img, 6, 3, mask=mask)).any()
    tiled = pipe.fit(da.from_array(img), mask, tile=64)
    assert tiled.tiles.halo >= ring_footprint(6, 3).shape[0] // 2
    # the models are in the normalised units both fits work in
    np.testing.assert_array_equal(
        tiled.history[0].model.background.compute(), ref.history[0].model.background
    )
    _assert_same_fit(tiled, ref, change_rtol=1e-12)


def test_reference_level_falls_back_to_the_first_valid_pixel():
    # Every pixel of the reference subsample (step 2 at 1024^2) is masked: the level
    # is then the first valid pixel in C order, which the tiles must find too.
    rng = np.random.default_rng(3)
    img = (5 + rng.normal(size=(1024, 1024))).astype(np.float32)
    yy, xx = np.mgrid[:1024, :1024]
    mask = (yy % 2 == 0) & (xx % 2 == 0)
    mask[:600, :] = True  # the first valid pixel is in the second row of tiles
    assert reference_level(img[::2, ::2], mask[::2, ::2]) is None
    pipe = IterativeBackground(
        first_guess=ThinPlateSmoother(cell_size=64, smoothing=1e9),
        stages=(
            Stage(
                masker=HysteresisMasker(scales=(2.0,)),
                estimator=ThinPlateSmoother(cell_size=64, smoothing=1e9),
            ),
        ),
        max_iter=1,
    )
    ref = pipe.fit(img, mask)
    tiled = pipe.fit(img, mask, tile=512)
    assert tiled.history[0].model.grid.tolist() == ref.history[0].model.grid.tolist()
    assert np.array_equal(tiled.mask.compute(), ref.mask)


def test_a_mesh_pipeline_runs_on_dask_from_per_tile_statistics():
    img = _crowded(np.float32)[:192, :256]
    # IDW evaluates any window of its map bit for bit: the whole fit is then exact
    mesh = MeshBackground(box_size=16, interpolator=IDW(n_neighbors=8))
    pipe = IterativeBackground(
        first_guess=mesh,
        stages=(Stage(masker=HysteresisMasker(scales=(1.0, 2.0)), estimator=mesh),),
        max_iter=2,
    )
    ref = pipe.fit(img)
    tiled = pipe.fit(da.from_array(img, chunks=64), tile=64)
    assert tiled.tiles.tile == (64, 64)
    _assert_same_fit(tiled, ref)


# A user's own pieces, following the protocols only: they run in every back end.


class _PeakMasker:
    """Masks pixels above 5 noise sigma and their 8 neighbours: local, 1-px halo."""

    def __call__(self, residual, rms, mask=None):
        from scipy import ndimage

        hot = np.asarray(residual) > 5 * np.asarray(rms)
        grown = ndimage.binary_dilation(hot, np.ones((3, 3), bool))
        return grown if mask is None else grown & ~mask

    def halo(self, shape):
        return 1


class _PlaneEstimator:
    """A least-squares plane through the unmasked pixels, with a constant rms."""

    def fit(self, image, mask=None):
        ok = ~mask & np.isfinite(image)
        yy, xx = np.nonzero(ok)
        a = np.column_stack([np.ones(yy.size), yy, xx])
        coef, *_ = np.linalg.lstsq(a, image[ok], rcond=None)
        gy, gx = np.mgrid[: image.shape[0], : image.shape[1]]
        bkg = (coef[0] + coef[1] * gy + coef[2] * gx).astype(image.dtype)
        r = (image - bkg)[ok]
        rms = np.full(image.shape, 1.4826 * np.median(np.abs(r - np.median(r))), image.dtype)

        class Result:  # background and rms only: adapted by the pipeline
            pass

        res = Result()
        res.background, res.rms = bkg, rms
        return res


class _BrightBlockMasker:
    """Masks the 8-px blocks whose mean residual is far above the typical block's (a
    global step on binned data), grown by 2 px with a 5x5 box (a local step)."""

    def block(self, shape):
        return 8

    def halo(self, shape):
        return 4 + 2  # the 8-px box filter's reach, then the growth

    def global_step(self, sums, counts):
        means = sums[counts > 0] / counts[counts > 0]
        mad = np.median(np.abs(means - np.median(means)))
        return float(np.median(means) + 8 * 1.4826 * mad)

    def local_step(self, residual, rms, mask, state):
        from scipy import ndimage

        hot = ndimage.uniform_filter(np.nan_to_num(residual), 8) > state
        return ndimage.binary_dilation(hot, np.ones((5, 5), bool)) & ~mask

    def __call__(self, residual, rms, mask=None):
        mask = np.zeros(residual.shape, bool) if mask is None else mask
        sums = block_sums(residual, mask | ~np.isfinite(residual), 8)
        return self.local_step(residual, rms, mask, self.global_step(sums[0], sums[1]))


def test_block_sums_of_aligned_tiles_are_the_whole_images():
    rng = np.random.default_rng(9)
    v = rng.normal(size=(70, 90)).astype(np.float32) * 1e3
    ex = rng.random(v.shape) < 0.3
    whole = block_sums(v, ex, 8)
    tiles = np.block(
        [
            [block_sums(v[y : y + 32, x : x + 48], ex[y : y + 32, x : x + 48], 8) for x in (0, 48)]
            for y in (0, 32, 64)
        ]
    )
    assert np.array_equal(tiles, whole)


@pytest.mark.parametrize("b", [2, 3, 4, 7, 8])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_block_sums_are_numpys_sums_of_the_padded_copy_bit_for_bit(b, dtype):
    # The compiled path (b < 8) sums in numpy's order; float64 values of spread
    # magnitudes tell the orders apart. A NaN under the exclusion never enters.
    rng = np.random.default_rng(b)
    v = (rng.normal(size=(53, 38)) * 10 ** rng.uniform(-3, 3, (53, 38))).astype(dtype)
    bkg = rng.normal(size=v.shape).astype(dtype)
    ex = rng.random(v.shape) < 0.3
    v[0, 0], ex[0, 0] = np.nan, True
    for minus in (None, bkg):
        res = v if minus is None else v - minus
        gy, gx = -(-53 // b), -(-38 // b)
        pad = np.zeros((2, gy * b, gx * b))
        pad[0, :53, :38] = np.where(ex, 0.0, res)
        pad[1, :53, :38] = ~ex
        ref = pad.reshape(2, gy * b, gx, b).sum(axis=3).reshape(2, gy, b, gx).sum(axis=2)
        assert np.array_equal(block_sums(v, ex, b, minus=minus), ref)


def test_mask_stats_pack_and_count_as_numpy():
    # the in-memory back end's packed mask, count and flips in one pass, against
    # np.packbits, count_nonzero and the popcount of the XOR; ragged sizes (a last
    # partial byte)
    from skymap.backends._memory_kernels import pack_stats

    rng = np.random.default_rng(12)
    for shape in ((1, 1), (3, 5), (7, 9), (64, 64), (33, 17)):
        a, b = rng.random(shape) < 0.3, rng.random(shape) < 0.3
        last = np.packbits(a.ravel())
        want = np.packbits(b.ravel())
        flips, count, packed = pack_stats(b, last)
        assert np.array_equal(packed, want) and count == np.count_nonzero(b)
        assert flips == np.bitwise_count(want ^ last).sum()
        assert pack_stats(b, None)[0] == 0


def test_mask_stats_in_bands_of_chunks_count_as_numpy():
    # pack_stats' bands: masks spanning several chunks of _PACK_CHUNK words (the last
    # partial, the last byte ragged), on 1, 2 and 3 threads, against numpy
    import numba

    from skymap.backends import _memory_kernels as mk

    rng = np.random.default_rng(13)
    words = mk._PACK_CHUNK
    before = numba.get_num_threads()
    try:
        for shape in ((8 * words * 3 // 512 + 1, 512 - 3), (2 * words // 64, 64 * 8 + 5)):
            a, b = rng.random(shape) < 0.3, rng.random(shape) < 0.7
            last, want = np.packbits(a.ravel()), np.packbits(b.ravel())
            assert want.size > 2 * words
            for threads in (1, 2, 3):
                numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
                flips, count, packed = mk.pack_stats(b, last)
                assert np.array_equal(packed, want) and count == np.count_nonzero(b)
                assert flips == np.bitwise_count(want ^ last).sum()
    finally:
        numba.set_num_threads(before)


def test_tiled_mask_stats_come_with_the_mask_and_keep_its_subsamples(synchronous, monkeypatch):
    """DaskBackend.mask computes the counts mask_stats returns in the submission that
    makes the mask, and with them the mask's subsamples at the steps the image was
    read at, which the refit's subsample then reads without a graph of its own: all
    equal to numpy's on the gathered masks (tiles that do not start on the step)."""
    rng = np.random.default_rng(5)
    img = rng.normal(size=(90, 110)).astype(np.float32)
    img[10:20, 30:45] += 50.0
    img[60:62, 80:83] += 50.0
    be = DaskBackend(da.from_array(img, chunks=40), tile=32, unit=(2, 2))
    assert np.array_equal(be.subsample(be.image, 7), img[::7, ::7])  # the step read

    def window(noise, window, step=1):
        return noise

    first = be.mask(_PeakMasker(), be.image, 1.0, window)
    want_first = np.asarray(first.compute())
    img2 = img.copy()
    img2[60:62, 80:83] = 0.0
    second = be.mask(_PeakMasker(), da.from_array(img2, chunks=32), 1.0, window)
    want_second = np.asarray(second.compute())
    assert np.count_nonzero(want_first ^ want_second) > 0
    # mask_stats of the first mask: not the one mask() last counted, so computed
    flips, count, _ = be.mask_stats(first)
    assert (flips, count) == (0, np.count_nonzero(want_first))

    def no_graph(things):
        raise AssertionError("a graph was computed")

    third = be.mask(_PeakMasker(), be.image, 1.0, window)
    monkeypatch.setattr(be, "_compute_list", no_graph)
    flips, count, _ = be.mask_stats(third)
    assert (flips, count) == (0, np.count_nonzero(want_first))
    assert np.array_equal(be.subsample(third, 7), want_first[::7, ::7])
    monkeypatch.undo()
    # after a mask() whose stats were not asked for, those of another mask are its own
    be.mask(_PeakMasker(), be.image, 1.0, window)
    flips, count, _ = be.mask_stats(second)
    assert flips == np.count_nonzero(want_first ^ want_second)
    assert count == np.count_nonzero(want_second)
    assert np.array_equal(be.subsample(second, 7), want_second[::7, ::7])


def test_a_lazy_blocks_own_task_runs_inside_its_reader(synchronous):
    """_own_task: a block of ours still to compute is its task (run inside the one
    task that reads it: the fused labelling, the final mask), a computed block or
    one of a dask layer of another kind its key; the fused task gives the same."""
    from skymap.backends._tile_tasks import _own_task

    img = np.arange(48.0, dtype=np.float32).reshape(6, 8)
    be = DaskBackend(da.from_array(img, chunks=4), tile=4, unit=(2, 2))
    doubled = be.map_tiles(lambda a, *, window, core: 2 * a, [be.image], dtype=np.float32)
    key = doubled.__dask_keys__()[1][0]
    task = _own_task(doubled.__dask_graph__(), key)
    assert isinstance(task, tuple) and callable(task[0])
    (persisted,) = be.persist(doubled)
    assert _own_task(persisted.__dask_graph__(), key) == key
    summed = be.image + 1
    assert (
        _own_task(summed.__dask_graph__(), summed.__dask_keys__()[0][0])
        == (summed.__dask_keys__()[0][0])
    )
    assert _own_task({}, key) == key
    graph, keys = doubled.__dask_graph__(), dask_backend.key_grid(doubled)
    fused = be._tile_array(
        np.negative, lambda i, j, *_: (_own_task(graph, keys[i, j]),), [doubled], be.chunks,
        np.float32,
    )  # fmt: skip
    assert np.array_equal(np.asarray(fused.compute()), -2 * img)


class _NoWindowResidual:
    """A model whose ``residual_map`` takes no window (a user's): its tiles' residuals
    are the map subtracted."""

    def __init__(self, model):
        self.model, self.dtype, self.shape = model, model.dtype, model.shape

    def background_map(self, step=1, window=None):
        return self.model.background_map(step, window=window)

    def residual_map(self, image, step=1, out=None):
        raise AssertionError("a tile's residual read residual_map without a window")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_tiles_residual_is_made_in_one_pass_and_equals_the_subtracted_map(synchronous, dtype):
    """A thin-plate model's tiles' residuals come from ``residual_map(tile,
    window=...)`` (no map of the tile made first) when the model works in the image's
    dtype, else from its map subtracted; equal bit for bit either way."""
    from skymap.backends._tile_tasks import residual_in_one_pass

    rng = np.random.default_rng(0)
    img = (rng.normal(size=(96, 136)) + np.linspace(0, 5, 136)).astype(np.float32)
    model = ThinPlateSmoother(cell_size=8).fit(img.astype(dtype), np.zeros(img.shape, bool))
    assert model.dtype == dtype
    be = DaskBackend(da.from_array(img, chunks=40), tile=32, unit=(8, 8))
    one_pass = residual_in_one_pass(model, be.dtype)
    assert one_pass == (dtype == np.float32)
    res = be.residual(be.background(model))
    assert res.name.startswith("_tile_residual_map" if one_pass else "_tile_residual-")
    want = np.subtract(np.asarray(be.image), model.background_map(), dtype=be.dtype)
    assert np.array_equal(np.asarray(res.compute()), want)
    # a residual_map without a window: the map subtracted
    slim = _NoWindowResidual(model)
    assert not residual_in_one_pass(slim, model.dtype)
    assert np.array_equal(np.asarray(be.residual(be.background(slim)).compute()), want)


@pytest.mark.parametrize("tiled", [False, True])
def test_a_users_own_masker_and_estimator_run_in_every_back_end(tiled):
    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[:96, :128]
    img = (3.0 + 0.01 * yy - 0.02 * xx + rng.normal(size=yy.shape)).astype(np.float32)
    img[40:44, 60:64] += 40.0
    pipe = IterativeBackground(
        first_guess=_PlaneEstimator(),
        stages=(
            Stage(masker=_BrightBlockMasker(), estimator=_PlaneEstimator(), max_iter=1),
            Stage(masker=_PeakMasker(), estimator=_PlaneEstimator()),
        ),
        max_iter=3,
    )
    ref = pipe.fit(img)
    assert ref.source_mask[41, 61] and ref.source_mask[39, 59]  # the dilation
    assert abs(float(ref.background[42, 62]) - (3.0 + 0.42 - 1.24)) < 0.2
    if tiled:
        res = pipe.fit(da.from_array(img, chunks=50), tile=32)
        assert len(res.tiles.chunks[1]) == 4
        _assert_same_fit(res, ref)


def test_tiles_align_to_cells_and_blocks_and_halos_follow_the_kernels():
    pipe = default_pipeline()
    shape = (1000, 1000)
    # cells 8 (halved to 4, 2), blocks b * bw = 2, 4, 8, 16, and 32 for the scale 16
    # the tracking test may add to the last stage's masker: unit 32
    assert pipe.tile_unit(shape) == (32, 32)
    assert default_pipeline(tracking_scale=None).tile_unit(shape) == (16, 16)
    be = DaskBackend(np.zeros(shape, np.float32), tile=300, unit=pipe.tile_unit(shape))
    assert be.tile == (288, 288)
    assert all(c % 32 == 0 for c in be.chunks[0][:-1])
    masker = pipe.stages[1].masker
    # scale 8: b = 8, bw = 2, surround kernel radius int(3 * 32 / 16 + 0.5) = 6 blocks
    # of 16 px; dilation 8 * (ceil(5 / 8) + 1)
    assert masker.halos(8.0, shape) == (96, 16)
    # scale 1: the surround's 6 blocks of 2 px, rounded up to the unit in the windows
    assert masker.halos(1.0, shape)[0] == 12
    assert be.grown((288, 576), (0, 288), 12) == ((256, 608), (0, 320))


def test_binned_masking_scales_on_tiles_sum_the_previous_scales_sums(synchronous, monkeypatch):
    # The tiled masking sums only its first binned scale from full resolution; the
    # later ones sum the previous scale's sums of the tiles (as the in-memory
    # _SumsChain does), and the fit is the in-memory fit bit for bit.
    import skymap.masking.hysteresis as hy

    img, mask = _bad_pixels()
    ref = skymap.fit(img, mask, max_iter=2)
    summed, chained = [], []
    sums_into, chained_sums = hy._sums_into, hy._chained_sums

    def spy_sums(values, excluded, *, b, out):
        summed.append(b)
        return sums_into(values, excluded, b=b, out=out)

    def spy_chained(prev, excl, b0, b):
        chained.append((b0, b))
        return chained_sums(prev, excl, b0, b)

    monkeypatch.setattr(hy, "_sums_into", spy_sums)
    monkeypatch.setattr(hy, "_chained_sums", spy_chained)
    tiled = skymap.fit(da.from_array(img, chunks=100), mask, tile=64, max_iter=2)
    assert set(summed) == {2}
    assert set(chained) == {(2, 4), (4, 8)}
    _assert_same_fit(tiled, ref)


@pytest.mark.parametrize("s", [1.0, 2.0])
def test_noise_pairs_sampled_per_tile_are_the_in_memory_pairs_and_factor(s):
    # tile_sampled_pairs on each tile's window (reading the snr of its sampled rows
    # and columns only) gives the in-memory maps' pairs, bit for bit; reduce_windows
    # combines them into the in-memory factor in the graph (the noise shared once)
    rng = np.random.default_rng(3)
    shape = (200, 176)
    res = rng.normal(scale=1.7, size=shape).astype(np.float32)
    res[40:50, 60:70] += 30.0
    excl = rng.random(shape) < 0.05
    excl[96:100, :] = True  # a masked strip across a tile edge
    noise = CoarseRMS(values=np.full((25, 22), 1.1, np.float32), step=8, shape=shape)
    masker = HysteresisMasker()
    maps = masker.scale_maps(res, noise, excl, s)
    b = maps.block
    lag = masker.noise_lag(s, b)
    step = 5
    ref = _pair_differences(maps.snr, maps.invalid, lag, step)
    unit = np.lcm(masker.tile_unit(shape)[0], 8)
    be = DaskBackend(da.from_array(res, chunks=64), tile=64, unit=(unit, unit), client="sync")
    excl_d = da.from_array(excl, chunks=be.chunks)
    halo = masker.halos(s, shape)[0] + lag * b
    kw = {"halo": halo, "masker": masker, "s": s, "window_of": NoiseModel.window}
    kw.update(lag=lag, step=step)
    assert len(be.chunks[0]) >= 3
    parts = be.gather_windows(tile_sampled_pairs, [be.image, excl_d], noise=noise, **kw)
    got = np.sort(np.concatenate([p for ps in parts for p in ps]))
    assert np.array_equal(got, np.sort(np.concatenate(ref)))
    lazy = be.reduce_windows(
        tile_sampled_pairs, [be.image, excl_d], functools.partial(_factor_of, masker, s),
        noise=be.share(noise), **kw,
    )  # fmt: skip
    want = masker.factor_from_differences(ref, s)
    assert want > 1.0
    assert lazy.compute(scheduler="sync") == want


def test_hysteresis_joined_across_tiles_equals_whole_image_labelling():
    rng = np.random.default_rng(4)
    # smooth noise: regions that snake across several tiles
    snr = ndimage.gaussian_filter(rng.normal(size=(120, 150)), 3).astype(np.float32) * 12
    ref = _hysteresis(snr.copy(), 1.0, 2.5)
    ys, xs = (0, 40, 80, 120), (0, 50, 100, 150)
    info = np.empty((3, 3), object)
    labels = np.empty((3, 3), object)
    codes = _hk.hysteresis_codes(
        snr, snr, np.float32(1.0), np.float32(2.5), np.empty(snr.shape, np.uint8)
    )
    for i in range(3):
        for j in range(3):
            block = codes[ys[i] : ys[i + 1], xs[j] : xs[j + 1]]
            labels[i, j], info[i, j] = _tile_label_info(block, seeded_codes, {})
    keep = merge_labels(info)
    tiled = np.block(
        [[_keep_labels(labels[i, j], keep[i][j]) for j in range(3)] for i in range(3)]
    )
    assert ndimage.label(ref)[1] < 0.5 * ndimage.label(snr > 1.0)[1]  # some regions dropped
    assert np.array_equal(tiled, ref)


@pytest.mark.parametrize("shape", [(90, 120), (1, 50), (40, 1), (300, 300)])
def test_seeded_labels_mark_seeded_regions_and_the_edges_others_as_scipy_finds_them(shape):
    """A tile's labels for the join: 1 on every region (8-connected) holding a seed, a
    label of its own for each other region on the tile's edge, 0 on the rest; the
    count and the seeded flag with them. (300 x 300: one region of ~55% of the
    pixels, whose fill grows the stack.)"""
    from skymap.backends._tile_kernels import seeded_labels

    rng = np.random.default_rng(sum(shape))
    smooth = ndimage.gaussian_filter(rng.normal(size=shape), 2.0 if min(shape) > 1 else 0)
    region = smooth > (-0.02 if shape == (300, 300) else 0.3 * smooth.std())
    for seed in (smooth > 1.5 * smooth.std(), np.zeros(shape, bool)):
        labels, count, seeded = seeded_labels(region, seed)
        ref, n = ndimage.label(region, structure=np.ones((3, 3), bool))
        has_seed = np.zeros(n + 1, bool)
        has_seed[ref[seed & region]] = True
        has_seed[0] = False
        edge = np.zeros(shape, bool)
        edge[[0, -1]] = edge[:, [0, -1]] = True
        on_edge = np.zeros(n + 1, bool)
        on_edge[ref[edge]] = True
        on_edge[0] = False
        assert seeded == bool(has_seed.any())
        assert np.array_equal(labels == 1, has_seed[ref])
        others = on_edge & ~has_seed
        assert np.array_equal(labels > 1, others[ref])
        assert count == 1 + int(others.sum())
        # one label per region: the same pixels as scipy's
        for k in np.flatnonzero(others):
            assert np.unique(labels[ref == k]).size == 1
        assert np.unique(labels[labels > 1]).size == count - 1
        if shape == (300, 300) and seed.any():
            assert (labels == 1).sum() > 1 << 14


def test_seeded_labels_are_uint16_where_the_edge_bounds_their_count():
    """A tile's labels take the smallest integer type that holds one label per edge
    pixel and the seeded one (uint16 up to ~16 000 px a side), and their lookup and
    join give the same regions as int32 labels would."""
    from skymap.backends._tile_kernels import kept_labels, label_dtype, seeded_labels

    assert label_dtype((2048, 2048)) == np.uint16 and label_dtype((1, 60000)) == np.uint16
    assert label_dtype((16383, 16383)) == np.uint16  # 1 + 2 * 32766 labels at most
    assert label_dtype((16384, 16384)) == np.int32 and label_dtype((8, 40000)) == np.int32
    rng = np.random.default_rng(8)
    smooth = ndimage.gaussian_filter(rng.normal(size=(200, 260)), 1.5)
    region, seed = smooth > 0.2 * smooth.std(), smooth > 2.0 * smooth.std()
    labels, count, _ = seeded_labels(region, seed)
    assert labels.dtype == np.uint16 and count > 2
    keep = rng.random(count + 1) < 0.5
    assert np.array_equal(kept_labels(labels, keep), keep[labels.astype(np.int32)])
    assert np.array_equal(kept_labels(labels[1::2, ::3], keep), keep[labels[1::2, ::3]])


def test_kept_labels_is_numpys_lookup_on_blocks_and_strided_pieces():
    """The compiled lookup of the labelling's kept labels equals ``keep[labels]`` on a
    block and on the strided pieces of it that windows read in place."""
    from skymap.backends._tile_kernels import kept_labels

    rng = np.random.default_rng(5)
    labels = rng.integers(0, 40, (64, 80)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.6] = 0
    keep = rng.random(40) < 0.5
    keep[0] = False
    for view in (labels, labels[3:50, 7:61], labels[:, ::3], labels[::2, 5:6]):
        got = kept_labels(view, keep)
        assert got.dtype == bool and got.flags.c_contiguous
        assert np.array_equal(got, keep[view])
    assert np.array_equal(_keep_labels(labels, keep), keep[labels])


@pytest.mark.parametrize("noise_kind", ["coarse", "scalar", "map"])
def test_tiled_change_is_the_in_memory_change(noise_kind, threads_client):
    """The change statistic summed per tile (a compiled kernel on the tile's blocks of
    a coarse noise, numpy on a scalar or a map) equals the in-memory one: bad and
    non-finite pixels dropped, a block of zero noise left out, tiles of the driver
    (threads) and of the synchronous scheduler, the far tiles cut by the edge."""
    from skymap.backends.memory import MemoryBackend
    from skymap.background.noise import NoiseModel
    from skymap.background.smooth import ThinPlateSmoother
    from skymap.masking.hysteresis import CoarseRMS

    rng = np.random.default_rng(21)
    img = rng.normal(100.0, 5.0, size=(200, 232)).astype(np.float32)
    img[:, :] += np.linspace(0, 40, 232, dtype=np.float32)
    mask = np.zeros(img.shape, bool)
    mask[40:60, 100:180] = True
    img[150:154, 10:14] = np.nan
    old = ThinPlateSmoother(cell_size=8, smoothing=30.0**4).fit(img, mask | ~np.isfinite(img))
    new = ThinPlateSmoother(cell_size=8, smoothing=12.0**4).fit(img, mask | ~np.isfinite(img))
    if noise_kind == "coarse":
        values = rng.uniform(3.0, 7.0, size=(50, 58)).astype(np.float32)
        values[10, 20] = 0.0  # no noise there: its ratios are left out
        noise = CoarseRMS(values=values, step=4, shape=img.shape)
    elif noise_kind == "scalar":
        noise = 5.0
    else:
        noise = rng.uniform(3.0, 7.0, size=img.shape).astype(np.float32)
    memory = MemoryBackend(img, mask)
    want = memory.change(memory.background(new), new, old, noise, NoiseModel())
    for client in (threads_client, "sync"):
        tiled = DaskBackend(img, mask, tile=64, unit=(4, 4), client=client)
        got = tiled.change(tiled.background(new), new, old, noise, NoiseModel())
        assert want > 0 and got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_final_mask_is_the_formula_and_the_exclusion_itself_only_where_they_agree(dtype):
    """The tiled final mask is ``bad | (excl & isfinite(res))`` bit for bit; it hands
    back the exclusion's own block only where that formula changes nothing (a NaN or
    inf outside ``bad`` in any row, or a ``bad`` pixel outside ``excl``, makes it
    compute). The test reads strided blocks too and writes nothing."""
    from skymap.backends._tile_kernels import exclusion_is_final

    rng = np.random.default_rng(11)
    shape = (37, 53)
    for case in range(40):
        res = rng.normal(size=shape).astype(dtype)
        bad = rng.random(shape) < 0.1
        excl = bad | (rng.random(shape) < 0.3)
        kind = case % 5
        y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        if kind == 1:  # a non-finite pixel inside bad: still the exclusion
            bad[y, x] = excl[y, x] = True
            res[y, x] = (np.nan, np.inf, -np.inf)[case % 3]
        elif kind == 2:  # a non-finite pixel outside bad, excluded: taken out
            bad[y, x], excl[y, x] = False, True
            res[y, x] = (np.nan, np.inf, -np.inf)[case % 3]
        elif kind == 3:  # a bad pixel the exclusion lacks: put in
            bad[y, x], excl[y, x] = True, False
        elif kind == 4:  # strided views of larger blocks
            big = [np.repeat(np.repeat(a, 2, axis=0), 3, axis=1) for a in (res, bad, excl)]
            res, bad, excl = (a[::2, ::3] for a in big)
        before = [a.copy() for a in (excl, res, bad)]
        expected = bad | (excl & np.isfinite(res))
        got = _final_mask(excl, res, bad)
        assert got.dtype == bool and np.array_equal(got, expected)
        assert (got is excl) == (kind in (0, 1, 4))
        assert exclusion_is_final(excl, res, bad) == (kind in (0, 1, 4))
        for a, b in zip((excl, res, bad), before, strict=True):
            assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_order_keys_round_trip_and_sort(dtype):
    v = np.array([-3.5, -0.0, 0.0, 1e-30, 2.0, 7.25, -1e30], dtype=dtype)
    keys = float_keys(v)
    assert [float(key_to_float(int(k), dtype)) for k in keys] == v.tolist()
    np.testing.assert_array_equal(np.argsort(keys, kind="stable")[[0, -1]], [6, 5])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("middle", [(1.0, 1.0 + 2**-20), (-3.0, 7.0e5)])
def test_tiled_median_is_numpys_when_the_middle_values_share_digits_or_not(dtype, middle):
    """The two middle order statistics share their histogram passes while their high
    digits agree (the first pair) and take their own when not (the second)."""
    rng = np.random.default_rng(4)
    low, high = rng.uniform(-1e6, middle[0], 2046), rng.uniform(middle[1], 1e6, 2046)
    v = np.concatenate([low, middle, high, [np.nan, np.nan]])  # 4094 values, not NaNs
    img = rng.permutation(v).astype(dtype).reshape(64, 64)
    be = DaskBackend(da.from_array(img, chunks=16), tile=32, unit=(2, 2), client="sync")
    got = be.median(lambda a, window: a[np.isfinite(a)], [be.image])
    assert got == float(np.median(img[np.isfinite(img)]))
    assert got == float(np.mean(np.array(middle, dtype)))


def test_tiled_fit_is_deprecated_and_keeps_its_errors():
    img = np.random.default_rng(0).normal(size=(64, 64))
    with pytest.warns(DeprecationWarning, match="tiled_fit"):
        res = tiled_fit(img, tile=32)
    assert np.array_equal(res.background.compute(), skymap.fit(img).background)
    with pytest.warns(DeprecationWarning):
        with pytest.raises(ValueError, match="2-dimensional"):
            tiled_fit(np.zeros(10))
        with pytest.raises(ValueError, match="mask"):
            tiled_fit(np.zeros((64, 64)), np.zeros((3, 3), bool))
        with pytest.raises(ValueError, match="no valid pixel"):
            tiled_fit(np.full((64, 64), np.nan))
        with pytest.raises(ValueError, match="unknown option"):
            tiled_fit(np.zeros((64, 64)), hig=3.0)
        pipe = default_pipeline()
        with pytest.raises(ValueError, match="explicit pipeline"):
            tiled_fit(np.zeros((64, 64)), pipeline=pipe, high=3.0)
        with pytest.raises(ValueError, match="tile"):
            tiled_fit(np.zeros((64, 64)), tile=0)


class _FixedThenFifty:
    """Rows 0-5, plus 50 pixels from the second call on: a mask that settles (the
    refit is skipped) in stage 0."""

    def __init__(self):
        self.calls = 0

    def __call__(self, residual, rms, mask):
        self.calls += 1
        out = np.zeros(residual.shape, bool)
        out[:6] = True
        if self.calls > 1:
            out[100, :50] = True
        return out


class _Creep:
    """A band of rows that grows by 12 at every call: a runaway."""

    def __init__(self):
        self.calls = 0

    def __call__(self, residual, rms, mask):
        self.calls += 1
        out = np.zeros(residual.shape, bool)
        out[: 12 * self.calls] = True
        return out


def test_a_back_off_past_the_last_iterations_keeps_the_same_mask_on_tiles(slow_then_fast):
    # The back-off state lies before the last RUNAWAY_RUN records: the tiled fit keeps
    # its mask (the last state that started a run), not just the last few.
    make_pipeline, img = slow_then_fast
    mem = make_pipeline().fit(img)
    tiled = make_pipeline().fit(da.from_array(img), tile=64)
    assert "over 4 iterations" in mem.convergence_note
    np.testing.assert_array_equal(np.asarray(tiled.mask), mem.mask)
    np.testing.assert_array_equal(np.asarray(tiled.background), mem.background)


def test_a_back_off_to_where_the_stage_converged_is_the_same_on_tiles(
    converging_then_runaway,
):
    # The tiled fit keeps the masks of the states a back-off can land in, those inside
    # the caught run (growth 2, then 1 row) among them.
    make_pipeline, img = converging_then_runaway
    mem = make_pipeline().fit(img)
    tiled = make_pipeline().fit(da.from_array(img), tile=64)
    assert mem.mask[:18].all() and not mem.mask[18:].any()
    np.testing.assert_array_equal(np.asarray(tiled.mask), mem.mask)
    np.testing.assert_array_equal(np.asarray(tiled.background), mem.background)
    # the landing's model is the result's: kept whole, per-cell data and all
    assert tiled.stop == mem.stop == "backed_off"
    np.testing.assert_array_equal(
        tiled.history[-1].model.cell_values, mem.history[-1].model.cell_values
    )


def test_a_tiled_history_keeps_only_the_maps_of_models_it_no_longer_reads():
    # A thin-plate model's per-cell data grow with the image (12 MB a record at
    # 16384^2, 4 MB of them the maps): the tiled history keeps them for the last record
    # alone (and states a back-off can land in), and every record's maps stay those of
    # the in-memory fit.
    img = _crowded(np.float32)
    pipe = default_pipeline()
    mem = pipe.fit(img)
    tiled = pipe.fit(da.from_array(img), tile=64)
    assert len(tiled.history) == len(mem.history) >= 4
    slim = [h.model.cell_values is None for h in tiled.history]
    assert not slim[-1] and any(slim)
    assert not any(h.model.cell_values is None for h in mem.history)
    np.testing.assert_array_equal(
        tiled.history[-1].model.cell_pixels, mem.history[-1].model.cell_pixels
    )
    for t, m in zip(tiled.history, mem.history, strict=True):
        np.testing.assert_array_equal(t.background, m.background)
        np.testing.assert_array_equal(t.rms, m.rms)
    _assert_same_fit(tiled, mem)


@pytest.mark.parametrize("refit_settled", [False, True])
def test_a_back_off_after_a_skipped_refit_keeps_the_same_mask_on_tiles(refit_settled):
    # The tiled history keeps the masks themselves; a skipped refit or a restated
    # state must keep them in step with the records, or a back-off lands one
    # iteration off.
    rng = np.random.default_rng(3)
    sky = np.add.outer(0.05 * (np.arange(160.0) - 80) ** 2 / 80.0, np.zeros(160))
    img = (sky + rng.normal(size=sky.shape)).astype(np.float32)
    sm = ThinPlateSmoother(smoothing=1e6, cell_size=8)

    def pipe():
        stages = (
            Stage(masker=_FixedThenFifty(), estimator=sm),
            Stage(masker=_Creep(), estimator=sm),
        )
        return IterativeBackground(
            first_guess=sm, stages=stages, max_iter=8, refit_settled=refit_settled
        )

    mem = pipe().fit(img)
    tiled = pipe().fit(da.from_array(img), tile=64)
    assert "backing off a runaway" in mem.convergence_note
    np.testing.assert_array_equal(np.asarray(tiled.mask), mem.mask)
    np.testing.assert_array_equal(np.asarray(tiled.background), mem.background)
