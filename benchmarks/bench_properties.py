"""The property suite of ``tests/test_properties.py`` with many random examples.

CI runs each property on a few derandomised examples (about a minute in all); this
script runs the same tests with ``--examples`` random ones each, so that hypothesis
searches the input space properly (scale factors 10^-30..10^30 in both dtypes, offsets
up to 1e9 sigma, flips, masked values, one arbitrary pixel, thread counts) for ``fit``,
``MeshBackground.fit``, ``annulus_background`` and ``match``.

Usage::

    python benchmarks/bench_properties.py --examples 100

Prints pytest's summary; the exit status is pytest's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100, help="examples per property")
    parser.add_argument("-k", default=None, help="pytest -k expression (a subset)")
    args = parser.parse_args(argv)
    env = dict(
        os.environ,
        SKYMAP_PROPERTY_EXAMPLES=str(args.examples),
        SKYMAP_PROPERTY_RANDOM="1",
    )
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "pytest", str(root / "tests" / "test_properties.py"), "-q"]
    cmd += ["-p", "no:randomly", "--hypothesis-show-statistics"]
    if args.k:
        cmd += ["-k", args.k]
    return subprocess.call(cmd, env=env, cwd=root)


if __name__ == "__main__":
    sys.exit(main())
