"""Where the tiled fit's time goes beyond the in-memory fit's: the tiled path's own work,
the scheduler, and the scheduler's floor for the graphs the fit sends.

On the ``bench_distributed.py`` scene (``crowded_stellar``, float32, ``--size`` px a
side, tiled from a memory map), each kind in a fresh process, with
``NUMBA_NUM_THREADS=1`` (set here) so that CPU time is the work done, each figure the
median of ``--repeat`` warm fits (the first full-size fit of each kind is left out: it
also pays the heap's growth):

* ``memory``: ``skymap.fit(image)``;
* ``synchronous``: ``skymap.fit(memmap, tile=)`` on dask's synchronous scheduler: the
  tiled path's own cost (halos, window copies, per-tile work, graph building), no
  scheduler;
* ``cluster``: the same on ``cluster_client(workers=2)`` (threads of this process),
  its CPU split by thread (the workers, the event loop that runs the scheduler and
  the workers' state machines, the driver), its task count by kind and the graphs it
  sends;
* ``floor``: graphs of trivial tasks on the same cluster, one task per tile, each
  reading its tile's and its neighbours' blocks of the previous graph (as a window
  does): the CPU per task and per graph the scheduler needs whatever the tasks do.
  ``floor x fit`` prices the fit's own task and graph counts at that rate: what the
  tiled fit would cost over the synchronous one if its tasks cost the scheduler no
  more than trivial ones.

Run:  python benchmarks/bench_tiled_overhead.py --size 4096 --tile 2048 1024
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ["NUMBA_NUM_THREADS"] = "1"

import argparse
import collections
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import numpy as np


def _thread_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of each thread of this process, by native id."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _role(name: str) -> str:
    """The part a thread of this process plays in a LocalCluster of threads."""
    if name == "MainThread":
        return "driver"
    if name.startswith("IO loop"):
        return "event loop"
    if "Dask-Default-Threads" in name:  # the workers' task threads
        return "workers"
    return "other"  # e.g. the scheduler's offload thread (graphs unpacked)


def _by_role(before, after, names) -> dict[str, float]:
    roles = collections.Counter()
    for tid, cpu in after.items():
        roles[_role(names.get(tid, ""))] += cpu - before.get(tid, 0.0)
    return dict(roles)


def _cpu() -> float:
    return time.process_time()


def memory_fit(path, repeat):
    import skymap

    image = np.load(path)
    skymap.fit(image[:256, :256].copy())
    skymap.fit(image)  # the heap's growth left out
    cpus = []
    for _ in range(repeat):
        c = _cpu()
        skymap.fit(image)
        cpus.append(_cpu() - c)
    return statistics.median(cpus)


def synchronous_fit(path, tile, repeat):
    import dask

    import skymap

    image = np.load(path, mmap_mode="r")
    with dask.config.set(scheduler="synchronous"):
        skymap.fit(np.asarray(image[:256, :256]), tile=128)
        np.asarray(skymap.fit(image, tile=tile).background)
        cpus = []
        for _ in range(repeat):
            c = _cpu()
            np.asarray(skymap.fit(image, tile=tile).background)
            cpus.append(_cpu() - c)
    return statistics.median(cpus)


def cluster_fit(client, path, tile, repeat):
    """(median CPU, median CPU by role, tasks by kind, graphs sent) of the tiled fit."""
    import distributed
    from dask.utils import key_split
    from distributed import wait

    import skymap

    image = np.load(path, mmap_mode="r")

    def fit():
        res = skymap.fit(image, tile=tile, client=client)
        wait(client.persist([res.background, res.mask]))

    skymap.fit(np.asarray(image[:256, :256]), tile=128, client=client)
    fit()
    cpus, roles = [], []
    for _ in range(repeat):
        names = {t.native_id: t.name for t in threading.enumerate()}
        before, c = _thread_cpu(), _cpu()
        fit()
        cpus.append(_cpu() - c)
        names.update({t.native_id: t.name for t in threading.enumerate()})
        roles.append(_by_role(before, _thread_cpu(), names))
    # one more fit, counted (the task stream and the graph count cost CPU of their own)
    graphs = [0]
    send = distributed.Client._graph_to_futures

    def counted(self, *args, **kwargs):
        graphs[0] += 1
        return send(self, *args, **kwargs)

    distributed.Client._graph_to_futures = counted
    try:
        with distributed.get_task_stream(client) as stream:
            fit()
    finally:
        distributed.Client._graph_to_futures = send
    tasks = collections.Counter(key_split(t["key"]) for t in stream.data)
    median_roles = {k: statistics.median(r.get(k, 0.0) for r in roles) for k in roles[0]}
    return statistics.median(cpus), median_roles, tasks, graphs[0]


def floor(client, grid, graphs, repeat):
    """(CPU per task, CPU per graph) of trivial window-like graphs on ``client``: one
    task per tile of a ``grid`` x ``grid`` tiling, reading its 3 x 3 neighbourhood's
    blocks of the previous graph; ``graphs`` graphs sent one after the other, each
    persisted and waited for: CPU = graphs x (per graph + tiles x per task), fitted
    on one tile and on ``2 grid`` tiles a side."""
    import dask
    import dask.array as da
    from dask.highlevelgraph import HighLevelGraph
    from distributed import wait

    from skymap.backends.dask import TilePlacement

    def first(*blocks):
        return blocks[0]

    def run(n):
        placement = TilePlacement.of(client, (n, n))
        x = da.zeros((16 * n, 16 * n), chunks=16).persist()
        wait(x)
        cpus = []
        for _ in range(repeat):
            c, y = _cpu(), x
            for _ in range(graphs):
                name = f"floor-{uuid.uuid4().hex}"
                dsk = {
                    (name, i, j): (
                        first,
                        *[
                            (y.name, a, b)
                            for a in range(max(i - 1, 0), min(i + 2, n))
                            for b in range(max(j - 1, 0), min(j + 2, n))
                        ],
                    )
                    for i in range(n)
                    for j in range(n)
                }
                graph = HighLevelGraph.from_collections(name, dsk, dependencies=[y])
                y = da.Array(graph, name, chunks=x.chunks, dtype=x.dtype)
                with dask.annotate(workers=placement, allow_other_workers=True):
                    (y,) = dask.persist(y, scheduler=client)
                wait(y)
            cpus.append((_cpu() - c) / graphs)
        return statistics.median(cpus)

    one, many = run(1), run(2 * grid)
    per_task = (many - one) / (4 * grid * grid - 1)
    return per_task, one - per_task


def phase(which, path, tile, size, repeat):
    """One phase in this (fresh) process; prints its JSON line."""
    from skymap.backends.distributed import cluster_client

    if which == "memory":
        out = {"cpu": memory_fit(path, repeat)}
    elif which == "synchronous":
        out = {"cpu": synchronous_fit(path, tile, repeat)}
    else:
        with cluster_client(workers=2) as client:
            if which == "cluster":
                cpu, roles, tasks, graphs = cluster_fit(client, path, tile, repeat)
                out = {"cpu": cpu, "roles": roles, "tasks": dict(tasks), "graphs": graphs}
            else:
                per_task, per_graph = floor(client, -(-size // tile), 20, repeat)
                out = {"per_task": per_task, "per_graph": per_graph}
    print(json.dumps(out))


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--tile", type=int, nargs="+", default=[1024])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:
        phase(args.run, args.path, args.tile[0], args.size, args.repeat)
        return
    from skymap.quality.simulate import scene_by_name

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "image.npy")
        shape = (args.size, args.size)
        image = scene_by_name("crowded_stellar", shape=shape, seed=0).image
        np.save(path, image.astype(np.float32))
        del image

        def run(which, tile=0):
            cmd = [sys.executable, __file__, "--run", which, "--path", path]
            cmd += ["--tile", str(tile), "--size", str(args.size), "--repeat", str(args.repeat)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            return json.loads(out.stdout.strip().splitlines()[-1])

        mem = run("memory")["cpu"]
        print(
            f"{args.size}^2 crowded_stellar, NUMBA_NUM_THREADS=1, each kind in a fresh "
            f"process, CPU medians of {args.repeat} warm fits; in memory {mem:.2f} s"
        )
        for tile in args.tile:
            sync = run("synchronous", tile)["cpu"]
            cl = run("cluster", tile)
            fl = run("floor", tile)
            tasks = collections.Counter(cl["tasks"])
            n_tasks, graphs = sum(tasks.values()), cl["graphs"]
            priced = n_tasks * fl["per_task"] + graphs * fl["per_graph"]
            roles = sorted(cl["roles"].items(), key=lambda r: -r[1])
            print(f"tile {tile} ({-(-args.size // tile)}^2 tiles):")
            print(f"  synchronous  {sync:.2f} s = {sync / mem:.2f} x in memory (no scheduler)")
            print(
                f"  cluster      {cl['cpu']:.2f} s = {cl['cpu'] / mem:.2f} x in memory: "
                + ", ".join(f"{k} {v:.2f}" for k, v in roles)
            )
            extra = cl["cpu"] - sync
            print(
                f"  scheduler    {extra:.2f} s = {extra / mem:.2f} x in memory (cluster - "
                f"synchronous), {n_tasks} tasks, {graphs} graphs"
            )
            print(
                f"  floor        {fl['per_task'] * 1e3:.2f} ms a task, "
                f"{fl['per_graph'] * 1e3:.1f} ms a graph: the fit's tasks and graphs "
                f"{priced:.2f} s = {priced / mem:.2f} x in memory"
            )
            common = ", ".join(f"{k} {v}" for k, v in tasks.most_common(8))
            print(f"  tasks by kind: {common}, ...")


if __name__ == "__main__":
    main()
