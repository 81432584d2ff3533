"""What a user of the command line pays: peak memory of ``skymap run`` and of its
evaluation on a large image, and the time of a first ``skymap demo`` (numba compiling).

    python benchmarks/bench_cli.py --memory 8192      # peak extra RSS / image size
    python benchmarks/bench_cli.py --first-run        # cold and warm `skymap demo`

Memory: the image (float32 FITS, sky gradient + noise + stars) is written once; then, in
a fresh process each, (a) ``evaluate()`` of a background of the same size and (b) the
whole ``skymap run`` (fit, evaluation, FITS products, report). Each figure is the peak
RSS (``VmHWM``) above the RSS just before the step, with the inputs loaded and every
module imported, divided by the image's size in memory.

First run: ``skymap demo`` in a fresh process with an empty numba cache directory
(``NUMBA_CACHE_DIR``), which is what a new installation has, then again with the cache
filled. Times are CPU seconds of the child process (user + system), which a loaded
machine does not inflate the way it does wall time; wall time is printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


def _child(code: str, env=None) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}", **(env or {})},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


_MAKE = """
import numpy as np
from astropy.io import fits
n = {n}
rng = np.random.default_rng(0)
yy, xx = np.ogrid[:n, :n]
img = (100 + 5 * xx / n + 3 * yy / n + rng.normal(0, 1, (n, n))).astype(np.float32)
for y, x in rng.integers(20, n - 20, (n * n // 20000, 2)):
    img[y - 2 : y + 3, x - 2 : x + 3] += 50
fits.PrimaryHDU(img).writeto({path!r})
print("{{}}")
"""

_EVALUATE = """
import json
import numpy as np
from astropy.io import fits
from _memory import reset_peak, status_kb
from skymap.quality.evaluate import evaluate
img = fits.getdata({path!r}).astype(np.float32)
bkg = np.full_like(img, 100.0)
mask = img > 110
evaluate(img[:64, :64], bkg[:64, :64], mask=mask[:64, :64])  # imports and compiles
base = reset_peak()
ev = evaluate(img, bkg, mask=mask)
print(json.dumps({{"extra_kb": status_kb("VmHWM") - base, "image_kb": img.nbytes / 1024}}))
"""

_RUN = """
import json
import numpy as np
from astropy.io import fits
from _memory import reset_peak, status_kb
from skymap.app import cli
import skymap.app.report, skymap.app.plot, skymap.quality.evaluate  # noqa: F401
import skymap.background.defaults  # noqa: F401
nbytes = fits.getheader({path!r})["NAXIS1"] * fits.getheader({path!r})["NAXIS2"] * 4
base = reset_peak()
code = cli.main(["run", {path!r}, "-o", {out!r}, "-q"])
print(json.dumps({{"extra_kb": status_kb("VmHWM") - base, "image_kb": nbytes / 1024,
                  "code": code}}))
"""


def memory(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "big.fits")
        _child(_MAKE.format(n=n, path=path))
        ev = _child(_EVALUATE.format(path=path))
        run = _child(_RUN.format(path=path, out=str(Path(tmp) / "out")))
    print(f"{n}x{n} float32 ({ev['image_kb'] / 1024:.0f} MB):")
    print(f"  evaluate()     peak extra RSS {ev['extra_kb'] / ev['image_kb']:.2f} x image")
    print(
        f"  skymap run     peak extra RSS {run['extra_kb'] / run['image_kb']:.2f} x image "
        f"(exit {run['code']})"
    )


def _demo(out: str, env: dict) -> tuple[float, float, str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "skymap", "demo", "-o", out],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall, proc.stderr


def first_run() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = {"NUMBA_CACHE_DIR": str(Path(tmp) / "numba")}
        cold = _demo(str(Path(tmp) / "a"), env)
        warm = _demo(str(Path(tmp) / "b"), env)
    print("skymap demo (notebook scene, 1000x1000), empty numba cache then filled:")
    print(f"  first run  CPU {cold[0]:6.1f} s  wall {cold[1]:6.1f} s")
    print(f"  second run CPU {warm[0]:6.1f} s  wall {warm[1]:6.1f} s")
    said = [ln for ln in cold[2].splitlines() if "compiling" in ln]
    print(f"  first run said: {said[0] if said else '(nothing about compiling)'}")
    print(f"  second run said it too: {any('compiling' in ln for ln in warm[2].splitlines())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory", type=int, metavar="N", help="image side for the memory run")
    parser.add_argument("--first-run", action="store_true", help="cold and warm skymap demo")
    args = parser.parse_args()
    if args.memory:
        memory(args.memory)
    if args.first_run:
        first_run()
    if not (args.memory or args.first_run):
        parser.print_help()


if __name__ == "__main__":
    main()
