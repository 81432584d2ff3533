"""Accuracy of the default ``skymap.fit`` against truth on simulated scenes.

The notebook scene is fitted at full size (1000 x 1000) once per module; the other scene
kinds run small. Reference figures for the peers come from
``benchmarks/bench_pipeline.py --accuracy`` (see benchmarks/README.md); SEP, being fast,
is rerun here on the small scenes.
"""

import numpy as np
import pytest

import skymap
from skymap.quality.evaluate import bias_under_sources, perfect_curve, rms_vs_scale
from skymap.quality.simulate import notebook_scene, scene_by_name

# The notebook's hand-tuned five-step recipe rebuilt on photutils 3
# (benchmarks/bench_pipeline.py): RMS error and mean residual under the sources.
RECIPE_RMS_SIGMA = 0.0764
RECIPE_BIAS_UNDER_SOURCES_SIGMA = 0.0177


def _rms_sigma(bkg, scene):
    valid = np.ones(bkg.shape, bool) if scene.mask is None else ~scene.mask
    err = (np.asarray(bkg, np.float64) - scene.sky)[valid]
    return float(np.sqrt(np.mean(err**2)) / scene.noise_sigma)


def _sep(image, mask):
    import sep

    data = np.ascontiguousarray(image, dtype=np.float64)
    return sep.Background(data, mask=None if mask is None else np.ascontiguousarray(mask)).back()


@pytest.fixture(scope="module")
def notebook():
    scene = notebook_scene()
    return scene, skymap.fit(scene.image)


def test_notebook_rms_error_beats_target_and_recipe(notebook):
    scene, res = notebook
    rms = _rms_sigma(res.background, scene)
    assert rms <= 0.045  # the README states 0.043 at full size
    assert rms <= 0.85 * RECIPE_RMS_SIGMA


def test_notebook_bias_under_sources_not_larger_than_recipe(notebook):
    scene, res = notebook
    bias = bias_under_sources(res.background, scene.sky, scene.catalog, res.mask)
    under = abs(float(np.mean(bias.residual))) / scene.noise_sigma
    assert under <= RECIPE_BIAS_UNDER_SOURCES_SIGMA


def test_notebook_rms_vs_scale_matches_perfect(notebook):
    scene, res = notebook
    widths = (4, 8, 16)
    ratio = rms_vs_scale(scene.image - res.background, res.mask, widths) / perfect_curve(
        scene.noise, res.mask, widths
    )
    assert np.all(ratio >= 0.95) and np.all(ratio <= 1.05), ratio


def test_notebook_history_converged(notebook):
    _, res = notebook
    assert res.converged
    last_stage = len(res.config.stages) - 1
    last = [r for r in res.history if r.stage == last_stage][-1]
    cfg = res.config
    # Converged: the background moved by less than change_tol or half its own
    # statistical error, and the mask settled (few flips, or no net growth).
    assert last.change <= max(cfg.change_tol, cfg.error_tol * last.error)
    assert min(last.mask_change, abs(last.mask_growth)) <= cfg.mask_tol
    # The final refit reuses the converged mask.
    assert res.history[-1].stage == len(res.config.stages)
    np.testing.assert_array_equal(res.history[-1].mask, last.mask)


@pytest.mark.parametrize(
    ("name", "factor"),
    [
        ("crowded_stellar", 1.0),
        ("detector_artifacts", 0.8),
        ("nebula", 0.5),
        # Extended low-surface-brightness wings: 0.19 sigma against SEP's 0.45 before the
        # max_source_size floor and halo masks (issue 13); 0.36 against 0.45 since: a
        # known regression, recorded in benchmarks/README.md, guarded at 1.15x by
        # test_accuracy_guards.
        ("galaxies_lsb", 0.9),
    ],
)
def test_other_scenes_beat_sep(name, factor):
    scene = scene_by_name(name, shape=(384, 384), seed=3)
    res = skymap.fit(scene.image, scene.mask)
    ours = _rms_sigma(res.background, scene)
    theirs = _rms_sigma(_sep(scene.image, scene.mask), scene)
    assert ours <= factor * theirs, (ours, theirs)
