"""Regenerate ``spxquery_reference.json``: spxquery's annulus background on a fixed scene.

spxquery (SPHEREx) pins photutils<3 and astropy<8, so it cannot live in skymap's
environment; run this in a separate virtual environment:

    python3 -m venv /tmp/spxvenv && /tmp/spxvenv/bin/pip install spxquery
    /tmp/spxvenv/bin/python tests/data/make_spxquery_reference.py

The test imports :func:`scene` from this file to rebuild the image, flags and positions
(NumPy's PCG64 streams are stable across versions; the JSON's checksums guard that), so
only spxquery's per-source answers and the configurations that produced them are stored.
"""

from __future__ import annotations

import json
import logging
from importlib.metadata import version
from pathlib import Path

import numpy as np

SOURCE_BIT = 1 << 21
BAD_BIT = 1 << 10  # HOT, one of spxquery's bad bits
OTHER_BIT = 1 << 3  # not a bad bit for spxquery: must not exclude anything
SHAPE = (96, 128)
SEED = 20260601
N_POSITIONS = 60

CONFIGS = [
    # spxquery's defaults
    {
        "aperture_radius": 2.0,
        "min_usable_pixels": 10,
        "max_outer_radius": 5.0,
        "bg_sigma_clip_sigma": 3.0,
        "bg_sigma_clip_maxiters": 3,
        "max_annulus_attempts": 5,
        "annulus_expansion_step": 0.5,
        "annulus_inner_offset": 1.414,
    },
    # more pixels wanted than the first annulus holds: growth, then the relaxed retry
    {
        "aperture_radius": 3.0,
        "min_usable_pixels": 40,
        "max_outer_radius": 9.0,
        "bg_sigma_clip_sigma": 2.5,
        "bg_sigma_clip_maxiters": 5,
        "max_annulus_attempts": 5,
        "annulus_expansion_step": 0.75,
        "annulus_inner_offset": 1.5,
    },
]


def scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image, flags and (N, 2) positions (x, y), deterministic from SEED."""
    rng = np.random.default_rng(SEED)
    ny, nx = SHAPE
    y, x = np.mgrid[:ny, :nx]
    image = 50.0 + 0.05 * x - 0.03 * y + rng.normal(0.0, 2.0, SHAPE)
    positions = np.column_stack(
        [rng.uniform(12.0, nx - 13.0, N_POSITIONS), rng.uniform(12.0, ny - 13.0, N_POSITIONS)]
    )
    flags = np.zeros(SHAPE, dtype=np.int32)
    flags[rng.random(SHAPE) < 0.03] |= BAD_BIT
    flags[rng.random(SHAPE) < 0.05] |= OTHER_BIT
    # bright sources with SOURCE-flagged discs; the first few sit on the positions so
    # that their annuli are mostly source-flagged
    for k, (sx, sy) in enumerate(positions[:12]):
        amp, radius = 400.0, (9.0 if k < 6 else 5.0)
        image += amp * np.exp(-0.5 * ((x - sx) ** 2 + (y - sy) ** 2) / 2.0**2)
        flags[(x - sx) ** 2 + (y - sy) ** 2 <= radius**2] |= SOURCE_BIT
    # outliers for the clipping to find
    hits = rng.integers(0, ny * nx, 150)
    image.ravel()[hits] += rng.uniform(30.0, 300.0, hits.size)
    return image, flags, positions


def main() -> None:
    from spxquery.processing.background import estimate_local_background

    logging.disable(logging.CRITICAL)
    image, flags, positions = scene()
    variance = np.ones_like(image)
    results = []
    for cfg in CONFIGS:
        rows = [
            estimate_local_background(image, variance, flags, float(x), float(y), **cfg)
            for x, y in positions
        ]
        results.append(
            {
                "config": cfg,
                "background": [r[0] for r in rows],
                "error": [r[1] for r in rows],
                "n_usable": [int(r[2]) for r in rows],
            }
        )
    out = {
        "spxquery_version": version("spxquery"),
        "numpy_version": np.__version__,
        "seed": SEED,
        "shape": list(SHAPE),
        "n_positions": N_POSITIONS,
        "bits": {"source": SOURCE_BIT, "bad": BAD_BIT, "other": OTHER_BIT},
        "image_checksum": float(image.sum()),
        "flags_checksum": int(flags.astype(np.int64).sum()),
        "results": results,
    }
    path = Path(__file__).with_name("spxquery_reference.json")
    path.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
