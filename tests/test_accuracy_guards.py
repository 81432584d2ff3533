"""Regression guards: the default fit on every simulated scene stays within 15% of its
recorded RMS error, and its ``converged`` flag does not flip.

The figures, and the commit they were measured at, are in
``tests/data/accuracy_guards.json``; ``python tests/data/make_accuracy_guards.py``
regenerates them (only for a change that is meant to move them).
"""

import json
from pathlib import Path

import numpy as np
import pytest

import skymap
from skymap.quality.simulate import SCENE_NAMES, scene_by_name

GUARDS = json.loads((Path(__file__).parent / "data" / "accuracy_guards.json").read_text())
TOLERANCE = 1.15


def test_every_scene_has_a_recorded_figure():
    assert set(GUARDS["scenes"]) == set(SCENE_NAMES)


@pytest.mark.parametrize("name", sorted(GUARDS["scenes"]))
def test_default_fit_accuracy_does_not_regress(name):
    want = GUARDS["scenes"][name]
    shape = tuple(GUARDS["shape"])
    scene = scene_by_name(name, shape=shape, seed=GUARDS["seed"])
    res = skymap.fit(scene.image, scene.mask)
    valid = np.ones(shape, bool) if scene.mask is None else ~scene.mask
    err = (np.asarray(res.background, np.float64) - scene.sky)[valid]
    rms = float(np.sqrt(np.mean(err**2)) / scene.noise_sigma)
    assert rms <= TOLERANCE * want["rms_sigma"], (rms, want)
    assert bool(res.converged) == want["converged"], getattr(res, "convergence_note", "")
