import pytest

import skymap


def test_version_and_lazy_submodules():
    assert skymap.__version__ == "0.1.0"
    assert "stats" in dir(skymap)
    with pytest.raises(AttributeError, match="no attribute"):
        skymap.not_a_thing


OLD_PATHS = [
    ("skymap.filters", "skymap.stats.filters", "ring_median"),
    ("skymap.interpolate", "skymap.background.interpolate", "ZoomSpline"),
    ("skymap.mesh", "skymap.background.mesh", "MeshBackground"),
    ("skymap.smooth", "skymap.background.smooth", "ThinPlateSmoother"),
    ("skymap.pipeline", "skymap.background.pipeline", "IterativeBackground"),
    ("skymap.tiled", "skymap.background.tiled", "tiled_fit"),
    ("skymap.hysteresis", "skymap.masking.hysteresis", "HysteresisMasker"),
    ("skymap.distributed", "skymap.backends.distributed", "map_files"),
    ("skymap.local", "skymap.photometry.local", "annulus_background"),
    ("skymap.skymatch", "skymap.mosaic.skymatch", "match"),
    ("skymap.evaluate", "skymap.quality.evaluate", "evaluate"),
    ("skymap.simulate", "skymap.quality.simulate", "notebook_scene"),
    ("skymap.cli", "skymap.app.cli", "main"),
    ("skymap.io", "skymap.app.io", "read_image"),
    ("skymap.config", "skymap.app.config", "to_dict"),
    ("skymap.report", "skymap.app.report", "write_report"),
    ("skymap.plot", "skymap.app.plot", "plot_maps"),
]


@pytest.mark.parametrize(("old", "new", "name"), OLD_PATHS, ids=[p[0] for p in OLD_PATHS])
def test_every_0_1_module_path_still_imports_with_a_deprecation_warning(old, new, name):
    import importlib
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        moved = importlib.import_module(old)
    assert moved is importlib.import_module(new)
    assert getattr(moved, name) is getattr(importlib.import_module(new), name)


def test_the_0_1_names_stay_where_they_were():
    from skymap.masking import FlagMasker, HysteresisMasker, ThresholdMasker  # noqa: F401
    from skymap.stats import MMM, SigmaClip, sigma_clipped_stats  # noqa: F401

    assert skymap.fit is skymap.background.defaults.fit
    # the default fit's names, moved out of the pipeline module, are still reachable there
    assert skymap.background.pipeline.fit is skymap.fit
    assert skymap.background.pipeline.default_pipeline is skymap.default_pipeline
    assert skymap.MeshBackground is skymap.background.mesh.MeshBackground


def test_a_config_saved_under_a_0_1_class_path_still_loads():
    import sys

    from skymap.app.config import from_dict
    from skymap.masking import HysteresisMasker

    sys.modules.pop("skymap.hysteresis", None)
    with pytest.warns(DeprecationWarning):
        obj = from_dict({"type": "skymap.hysteresis:HysteresisMasker"})
    assert obj == HysteresisMasker()
