"""Simulated scenes with known truth: the sky, the sources, the noise and the catalogue.

Two entry points:

* :func:`notebook_scene` reproduces, draw for draw, the scene of the STScI "Complex 2D
  Background" notebook (a gradient plus sinc blemishes, Gaussian noise of 0.1 and
  elliptical Gaussian sources), so that results can be compared with that notebook.
* :func:`make_scene` composes sky components, source populations, detector effects and a
  noise model, all seeded through one :class:`numpy.random.Generator`;
  :func:`scene_by_name` builds the ready-made robustness scenes listed in
  :data:`SCENE_NAMES`.

Every scene is a :class:`Scene`: ``image = sky + sources + noise`` (before detector
effects, which are recorded in ``mask``). ``sky`` is the truth a background model should
recover. Arrays are (y, x); pixel centres sit on integer coordinates.
"""

from skymap.quality.simulate import components as _components
from skymap.quality.simulate import render as _render
from skymap.quality.simulate import scenes as _scenes
from skymap.quality.simulate.components import *  # noqa: F403
from skymap.quality.simulate.render import *  # noqa: F403
from skymap.quality.simulate.scenes import *  # noqa: F403

__all__ = [*_render.__all__, *_components.__all__, *_scenes.__all__]
