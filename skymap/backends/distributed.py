"""Scale-out on Dask: many files on a cluster, and one image larger than memory.

Two jobs live here, both on existing engines rather than a home-made pool:

* :func:`map_files` maps a per-file function over a ``dask.distributed`` cluster: a
  ``LocalCluster`` by default, or a running scheduler given by its address. ``skymap
  batch`` is built on it, so each file gets exactly what ``skymap run`` writes.
* :func:`tiled_mesh_background` runs a :class:`~skymap.mesh.MeshBackground` on an image
  held as a ``dask.array`` (or a memory map), tile by tile. Tiles are aligned to the
  mesh grid, so the per-mesh statistics are exact; the small mesh grid is then filtered
  in memory; and the full-resolution maps are interpolated tile by tile from the mesh
  grid with a halo of meshes sized from the interpolator's reach. The result equals the
  in-memory :meth:`MeshBackground.fit` to far better than 1e-6 of the RMS.
* :func:`skymap.fit` itself runs its pipeline the same way on a dask array or a
  memory map, through :class:`~skymap.backends.dask.DaskBackend`.

Examples
--------
>>> import numpy as np
>>> from skymap.background.mesh import MeshBackground
>>> rng = np.random.default_rng(0)
>>> image = rng.normal(10.0, 1.0, (512, 512)).astype(np.float32)
>>> mesh = MeshBackground(box_size=32)
>>> tiled = tiled_mesh_background(image, mesh, tile=128)
>>> ref = mesh.fit(image)
>>> bool(abs(tiled.background.compute() - ref.background).max() < 1e-6 * ref.global_rms)
True
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from skymap._validate import as_mask, check_positive

if TYPE_CHECKING:  # the mesh lives a layer up: imported where it is used
    from skymap.background.mesh import MeshBackground, MeshResult

__all__ = [
    "TiledMeshResult",
    "cluster_client",
    "map_files",
    "tiled_mesh_background",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- clusters


@contextmanager
def cluster_client(
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    processes: bool = False,
    memory_limit: str | float | None = None,
    quiet: bool = True,
) -> Iterator[Any]:
    """A ``dask.distributed`` client: on a running scheduler, or on a new LocalCluster.

    Parameters
    ----------
    workers : int, optional
        Workers of the LocalCluster (one thread each); default: the CPU count.
        Ignored when ``scheduler`` is given.
    scheduler : str, optional
        Address of a running scheduler, e.g. ``"tcp://10.0.0.1:8786"``.
    processes : bool
        LocalCluster workers as threads of this process (default) or as processes.
        Threads suit a tiled fit on one machine: its kernels release the GIL and the
        tiles pass between workers by reference, not pickled (about half the CPU of
        worker processes, ``benchmarks/README.md``). Processes suit Python-heavy work
        per item (:func:`map_files` makes its own cluster of them) and a memory limit
        per worker: threads of one process each measure the whole process's memory
        against their limit, so thread workers hold their results in memory as the
        in-memory fit does: they neither spill them to disk nor pause.
    memory_limit : str or float, optional
        Memory limit per worker process, e.g. ``"4GiB"`` (dask's ``memory_limit``;
        default dask's share of the machine). Worker processes only.
    quiet : bool
        Silence the cluster's own logging below ERROR.

    Yields
    ------
    distributed.Client
        Closed (with its LocalCluster) when the block ends.

    Examples
    --------
    >>> with cluster_client(workers=1) as client:  # doctest: +SKIP
    ...     client.submit(sum, [1, 2]).result()
    3
    """
    from distributed import Client, LocalCluster

    if scheduler:
        client = Client(scheduler)
        cluster = None
    else:
        if workers is not None and int(workers) < 1:
            raise ValueError(f"workers must be >= 1, got {workers!r}")
        if memory_limit is not None and not processes:
            raise ValueError(
                "memory_limit is per worker process: pass processes=True with it "
                f"(got memory_limit={memory_limit!r} with processes=False)"
            )
        import dask

        config = {
            # The workers' statistical profiler samples every thread 100 times a
            # second; with no dashboard nothing reads it (~1% of a core per worker).
            "distributed.worker.profile.enabled": False,
            # The scheduler (in this process) logs the last 1000 messages to each
            # worker for debugging: every task spec it sent, with the data inline in
            # it, kept after the fit (4096^2 with 1024-px tiles: 51 -> 33 MB left in
            # the driver without the log, 11 824 -> 2 583 task specs alive).
            "distributed.admin.low-level-log-length": 0,
        }
        if not processes:
            # Threads keep their results in a plain dict, not a SpillBuffer: its
            # bookkeeping (a sizeof per result, a read per task input) took up to
            # ~0.5 s of the event loop's CPU in a tiled fit with 1024-px tiles, and
            # spilling is no guard here: each thread weighs the whole process against
            # its share of the limit. Nor pausing: with nothing to spill, a worker
            # paused by the driver's own memory would wait for good. A limit per
            # worker is what processes are for.
            for step in ("target", "spill", "pause"):
                config[f"distributed.worker.memory.{step}"] = False
        with dask.config.set(config):
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=processes,
                **({} if memory_limit is None else {"memory_limit": memory_limit}),
                # a command-line run must not grab (or fight over) the dashboard port
                dashboard_address=None,
                scheduler_kwargs={"dashboard": False},
                silence_logs=logging.ERROR if quiet else logging.INFO,
            )
        client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def map_files(
    function: Callable[..., Any],
    items: Sequence[Any],
    *,
    client: Any = None,
    workers: int | None = None,
    scheduler: str | None = None,
    progress: Callable[[], None] | None = None,
    **kwargs: Any,
) -> list[tuple[Any, Any, BaseException | None]]:
    """Apply ``function(item, **kwargs)`` to every item on a Dask cluster.

    One failing item does not stop the others: its exception is returned in its row.

    Parameters
    ----------
    function : callable
        Picklable (module-level) function run on the workers.
    items : sequence
        One call per item (e.g. ``(input_path, output_dir)`` tuples).
    client : distributed.Client, optional
        Use this client; otherwise one is made with :func:`cluster_client`.
    workers, scheduler : optional
        Passed to :func:`cluster_client` when no ``client`` is given.
    progress : callable, optional
        Called once as each item finishes (e.g. a tqdm bar's ``update``).
    **kwargs
        Keyword arguments passed to every call.

    Returns
    -------
    list of (item, result, exception)
        In the order of ``items``; ``result`` is None where ``exception`` is set.

    Examples
    --------
    >>> map_files(abs, [-1, 2], workers=1)  # doctest: +SKIP
    [(-1, 1, None), (2, 2, None)]
    """
    if client is None:
        # whole files per task, much of it Python: worker processes
        with cluster_client(workers=workers, scheduler=scheduler, processes=True) as own:
            return map_files(function, items, client=own, progress=progress, **kwargs)
    from distributed import as_completed

    items = list(items)
    # readable keys on the dashboard, unique across batches sharing one scheduler
    batch = uuid.uuid4().hex[:12]
    futures = [
        client.submit(function, item, key=f"skymap-{_name(function)}-{batch}-{i}", **kwargs)
        for i, item in enumerate(items)
    ]
    index = {f.key: i for i, f in enumerate(futures)}
    rows: list[tuple[Any, Any, BaseException | None]] = [(it, None, None) for it in items]
    for future in as_completed(futures):
        i = index[future.key]
        try:
            rows[i] = (items[i], future.result(), None)
        except Exception as err:  # reported per item; the batch goes on
            log.error("%s: %s", items[i], err)
            rows[i] = (items[i], None, err)
        if progress is not None:
            progress()
    return rows


def _name(function: Callable[..., Any]) -> str:
    return getattr(function, "__name__", type(function).__name__)


# --------------------------------------------------------------------------- tiled mesh


@dataclass(frozen=True, kw_only=True, eq=False)
class TiledMeshResult:
    """A mesh background computed tile by tile.

    Attributes
    ----------
    mesh : MeshResult
        Mesh-level values, exactly those of the in-memory fit. Do not read its
        full-resolution ``background``/``rms`` on a huge image: they are computed in
        memory; use this object's dask arrays instead.
    background, rms : dask.array.Array
        Full-resolution maps, lazily evaluated tile by tile.
    tile : (int, int)
        Tile shape in pixels (a multiple of the box size).
    halo : int
        Halo in meshes around each tile for the interpolation (0 when the interpolator
        evaluates windows exactly).
    """

    mesh: MeshResult
    background: Any
    rms: Any
    tile: tuple[int, int]
    halo: int


def tiled_mesh_background(
    image: Any,
    mesh: MeshBackground | None = None,
    *,
    mask: Any = None,
    coverage_mask: Any = None,
    tile: int | tuple[int, int] = 2048,
    halo: int | None = None,
    scheduler: Any = None,
) -> TiledMeshResult:
    """Run a :class:`MeshBackground` tile by tile on a dask array.

    Parameters
    ----------
    image : ndarray, memmap or dask.array.Array (ny, nx)
        The image; only one tile at a time is loaded per worker.
    mesh : MeshBackground, optional
        The configuration (default: ``MeshBackground()``).
    mask, coverage_mask : array-like of bool, optional
        True = excluded / no data, as in :meth:`MeshBackground.fit`. May be dask arrays.
    tile : int or (int, int)
        Approximate tile size in pixels; rounded down to a multiple of the box size.
    halo : int, optional
        Meshes of halo around each tile, used only for an interpolator without a
        ``window`` method (all of skymap's have one and are evaluated exactly from the
        whole grid); default ``skymap.background.mesh.DEFAULT_HALO`` (24).
    scheduler : optional
        Passed to ``dask.compute`` for the statistics pass (e.g. ``"threads"`` or a
        distributed client); default: dask's current scheduler.

    Returns
    -------
    TiledMeshResult

    Notes
    -----
    Memory: one tile plus its mask per task for the statistics; one tile plus its halo
    of meshes for the maps; the mesh grid itself is small (``ny*nx/box**2`` values).
    The per-mesh statistics of a tile aligned to the grid are those of the whole image,
    bit for bit; the mesh filter and hole filling run on the whole grid in memory.
    """
    import dask.array as da

    from skymap.background.mesh import DEFAULT_HALO, MeshBackground

    mesh = MeshBackground() if mesh is None else mesh
    if not isinstance(mesh, MeshBackground):
        raise TypeError(f"mesh must be a skymap.mesh.MeshBackground, got {type(mesh).__name__}")
    shape = tuple(int(n) for n in getattr(image, "shape", np.shape(image)))
    if len(shape) == 2 and (mesh.box_size[0] > shape[0] or mesh.box_size[1] > shape[1]):
        raise ValueError(f"box_size {mesh.box_size} must not exceed the image shape {shape}")
    if halo is not None:
        check_positive("halo", halo, allow_zero=True)
    from skymap.backends.dask import DaskBackend

    excluded = _exclusion(mask, coverage_mask, shape)
    backend = DaskBackend(image, excluded, tile=tile, unit=mesh.box_size, client=scheduler)
    # the per-mesh statistics per aligned tile, the grid finished in the driver
    result = mesh.fit_on(backend, backend.bad)
    K = 0 if hasattr(mesh.interpolator, "window") else DEFAULT_HALO if halo is None else halo

    def maps(which):
        values = result.mesh_background if which == "background" else result.mesh_rms
        out = da.map_blocks(
            _tile_map, dtype=backend.dtype, chunks=backend.chunks, result=result,
            values=values, halo=K,
        )  # fmt: skip
        if coverage_mask is not None:
            cov = _as_dask_mask(coverage_mask, shape, backend.chunks, "coverage_mask")
            out = da.where(cov, np.asarray(mesh.fill_value, dtype=backend.dtype), out)
        return out

    return TiledMeshResult(
        mesh=result, background=maps("background"), rms=maps("rms"), tile=backend.tile, halo=K
    )


def _as_dask_mask(mask: Any, shape, chunks, name: str):
    import dask.array as da

    if isinstance(mask, da.Array):
        if tuple(mask.shape) != tuple(shape):
            raise ValueError(f"{name} must have the image's shape {shape}, got {mask.shape}")
        return mask.astype(bool).rechunk(chunks)
    return da.from_array(as_mask(mask, shape, name), chunks=chunks)


def _exclusion(mask, coverage_mask, shape):
    parts = [
        _as_dask_mask(m, shape, "auto", name)
        for m, name in ((mask, "mask"), (coverage_mask, "coverage_mask"))
        if m is not None
    ]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else parts[0] | parts[1]


def _tile_map(result, values, halo, block_info=None):
    (y0, y1), (x0, x1) = block_info[None]["array-location"]
    return result.map_window(values, ((y0, y1), (x0, x1)), halo=halo)
