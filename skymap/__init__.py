"""skymap: model, validate and match the 2D sky background of astronomical images.

The package is flat, one module per job (see ``docs/architecture.md``). Submodules and
the most used names are imported lazily so that ``import skymap`` stays cheap and the
compiled kernels are only built when first needed.

Examples
--------
>>> import numpy as np
>>> import skymap
>>> skymap.__version__
'0.1.0'
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "stats",
    "interpolate",
    "mesh",
    "filters",
    "masking",
    "hysteresis",
    "simulate",
    "evaluate",
    "local",
    "skymatch",
    "pipeline",
    "io",
    "plot",
    "report",
    "distributed",
    "tiled",
    "cli",
    "config",
)

# public name -> submodule that defines it
_NAMES = {
    "MeshBackground": "mesh",
    "MeshResult": "mesh",
    "IterativeBackground": "pipeline",
    "BackgroundResult": "pipeline",
    "fit": "pipeline",
    "LocalBackground": "local",
    "annulus_background": "local",
    "aperture_sum": "local",
    "SkyMatch": "skymatch",
    "SkyMatchResult": "skymatch",
    "injection_recovery": "quality.injection",
    "compare": "quality.injection",
    "tune": "quality.tune",
}

__all__ = ["__version__", *_SUBMODULES, *_NAMES]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"skymap.{name}")
    if name in _NAMES:
        module = importlib.import_module(f"skymap.{_NAMES[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'skymap' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
