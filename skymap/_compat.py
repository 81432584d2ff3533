"""Old (0.1) import paths of modules that moved into subpackages.

``import skymap.pipeline`` (and every other 0.1 path) keeps working: a finder on
``sys.meta_path`` hands out the module at its new home under the old name, with a
``DeprecationWarning`` that names the new path. No file is left at the old path, so the
moved module exists once and its classes keep one identity (a config saved under the old
path loads the same class).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: 0.1 module path -> the module's home now
MOVED = {
    "skymap.filters": "skymap.stats.filters",
    "skymap.interpolate": "skymap.background.interpolate",
    "skymap.mesh": "skymap.background.mesh",
    "skymap.smooth": "skymap.background.smooth",
    "skymap.pipeline": "skymap.background.pipeline",
    "skymap.tiled": "skymap.background.tiled",
    "skymap.hysteresis": "skymap.masking.hysteresis",
    "skymap.distributed": "skymap.backends.distributed",
    "skymap.local": "skymap.photometry.local",
    "skymap.skymatch": "skymap.mosaic.skymatch",
    "skymap.evaluate": "skymap.quality.evaluate",
    "skymap.simulate": "skymap.quality.simulate",
    "skymap.cli": "skymap.app.cli",
    "skymap.io": "skymap.app.io",
    "skymap.config": "skymap.app.config",
    "skymap.report": "skymap.app.report",
    "skymap.plot": "skymap.app.plot",
}


def warn_moved(old: str, stacklevel: int = 3) -> None:
    """Tell the caller that ``old`` moved, and where to."""
    warnings.warn(
        f"{old} moved to {MOVED[old]}; import it from there (the old path is deprecated)",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolve a 0.1 module path to the module at its new home."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        warn_moved(spec.name, stacklevel=3)
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        """The new module is already executed: nothing to do."""


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
