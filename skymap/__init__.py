"""skymap: model, validate and match the 2D sky background of astronomical images.

Subpackages hold one job each (see ``docs/architecture.md``): ``stats``, ``masking``,
``background``, ``backends``, ``photometry``, ``mosaic``, ``quality`` and ``app``. The
default path is exported here: :func:`fit` (a ``ThinPlateSmoother`` with a
``HysteresisMasker``, iterated by ``IterativeBackground``). Submodules and names are
imported lazily so that ``import skymap`` stays cheap and the
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
import warnings

__version__ = "0.1.0"

from skymap import _compat

_compat.install()

# photutils imports tqdm.auto when first imported, which in a notebook without
# ipywidgets warns "IProgress not found" although nothing shows a bar; skymap's own
# bars use tqdm.auto only where ipywidgets is installed.
warnings.filterwarnings("ignore", message="IProgress not found")

_SUBMODULES = (
    "stats",
    "masking",
    "background",
    "backends",
    "photometry",
    "mosaic",
    "quality",
    "app",
)

# public name -> submodule that defines it
_NAMES = {
    "fit": "background.defaults",
    "default_pipeline": "background.defaults",
    "IterativeBackground": "background.pipeline",
    "BackgroundResult": "background.pipeline",
    "ConvergenceWarning": "background.convergence",
    "Stage": "background.pipeline",
    "ThinPlateSmoother": "background.smooth",
    "HysteresisMasker": "masking.hysteresis",
    "MeshBackground": "background.mesh",
    "MeshResult": "background.mesh",
    "LocalBackground": "photometry.local",
    "annulus_background": "photometry.local",
    "aperture_sum": "photometry.local",
    "SkyMatch": "mosaic.skymatch",
    "SkyMatchResult": "mosaic.skymatch",
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
    old = f"skymap.{name}"
    if old in _compat.MOVED:
        _compat.warn_moved(old)
        return importlib.import_module(_compat.MOVED[old])
    raise AttributeError(f"module 'skymap' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
