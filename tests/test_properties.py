"""Invariants of fit, MeshBackground.fit, annulus_background and match (issue 17's
property suite): scale equivariance over 60 decades in both dtypes, offset equivariance,
transpose and flip commutation, masked values never matter, one arbitrary finite pixel
changes the background little away from it, and the same answer on any thread count.

CI runs a few derandomised examples on small images (about a minute in all);
``benchmarks/bench_properties.py`` runs the same tests with many random examples
(``SKYMAP_PROPERTY_EXAMPLES``, ``SKYMAP_PROPERTY_RANDOM=1``).
"""

import os

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import skymap
from skymap.background.mesh import MeshBackground
from skymap.mosaic.skymatch import match
from skymap.photometry.local import annulus_background

EXAMPLES = int(os.environ.get("SKYMAP_PROPERTY_EXAMPLES", "2"))
RANDOM = os.environ.get("SKYMAP_PROPERTY_RANDOM", "0") == "1"
prop = settings(max_examples=EXAMPLES, derandomize=not RANDOM, deadline=None)

N = 64
NOISE = 1.0
seeds = st.integers(0, 2**16)
dtypes = st.sampled_from([np.float32, np.float64])
# any finite value a float32 image can hold, extremes included
extreme = st.one_of(
    st.sampled_from([-1e38, 1e38, -32768.0, 1e22, -1e22, 0.0]),
    st.floats(-1e38, 1e38, allow_nan=False, allow_infinity=False),
)


def _scene(seed: int, n: int = N) -> np.ndarray:
    """Sloped, curved sky with unit white noise and a few stars (float64)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n]
    img = 20 + 0.05 * xx + np.sin(yy / 15.0) + NOISE * rng.normal(size=(n, n))
    for _ in range(4):
        y, x = rng.uniform(0, n, 2)
        img += rng.uniform(10, 100) * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 4.0)
    return img


def _fit(img, mask=None):
    return np.asarray(skymap.fit(img, mask).background, np.float64)


def _mesh(img, mask=None):
    return np.asarray(MeshBackground(box_size=16).fit(img, mask).background, np.float64)


POSITIONS = [(20.0, 20.0), (45.0, 30.0), (32.0, 50.0)]


def _annulus(img, mask=None):
    return annulus_background(img, POSITIONS, 4.0, 9.0, mask=mask).background


def _match(img, mask=None):
    other = img[:, ::-1]  # a second exposure, of the field flipped
    m2 = None if mask is None else mask[:, ::-1]
    items = [img if mask is None else np.ma.MaskedArray(img, mask), other]
    if m2 is not None:
        items[1] = np.ma.MaskedArray(other, m2)
    return np.asarray(match(items).sky, np.float64)


ESTIMATORS = {"fit": _fit, "mesh": _mesh, "annulus": _annulus, "match": _match}


def _close(a, b, tol):
    np.testing.assert_allclose(a, b, rtol=0, atol=tol)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@prop
@given(seed=seeds, k=st.integers(-30, 30), dtype=dtypes)
def test_results_scale_with_the_input_over_sixty_decades(seed, name, k, dtype):
    est = ESTIMATORS[name]
    img = _scene(seed)
    factor = 10.0**k
    ref = est(img.astype(dtype))
    out = est((img * factor).astype(dtype)) / factor
    # float32: the scaled input is rounded afresh (relative 6e-8 of values ~100 sigma)
    _close(out, ref, 1e-9 if dtype == np.float64 else 2e-4)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@prop
@given(seed=seeds, offset=st.floats(-1e9, 1e9))
def test_results_follow_an_offset_in_float64(seed, name, offset):
    est = ESTIMATORS[name]
    img = _scene(seed)
    ref = est(img)
    out = est(img + offset) - offset
    # The input itself is rounded at 1e9: 1.2e-7 per pixel. The mesh works on the raw
    # values (its arithmetic is photutils'), so that rounding can move a pixel across
    # a clip bound or switch SExtractor's mode estimator in a mesh.
    _close(out, ref, (1e-2 if name == "mesh" else 1e-5) * NOISE)


@pytest.mark.parametrize("name", ["fit", "mesh"])
@prop
@given(seed=seeds, how=st.sampled_from(["T", "x", "y"]))
def test_maps_commute_with_transposes_and_flips(seed, name, how):
    est = ESTIMATORS[name]
    img = _scene(seed)
    op = {"T": np.transpose, "x": lambda a: a[:, ::-1], "y": lambda a: a[::-1]}[how]
    ref = est(img)
    out = op(est(np.ascontiguousarray(op(img))))
    # Not bit for bit. The mesh fills an excluded mesh from its k nearest valid meshes
    # by inverse distance, as photutils does, and equidistant neighbours are taken in
    # the k-d tree's order, which a flip changes (hole_fill="nearest" commutes
    # exactly). The maskers estimate their noise excess from pixel pairs on every
    # step-th row and column counted from 0, a sample a flip changes
    # (hysteresis._pair_differences), so masks at the thresholds may differ by a few
    # pixels.
    _close(out, ref, (0.05 if name == "mesh" else 0.02) * NOISE)


@prop
@given(seed=seeds, how=st.sampled_from(["T", "x", "y"]))
def test_annulus_and_match_commute_with_transposes_and_flips(seed, how):
    img = _scene(seed)
    if how == "T":
        moved = np.ascontiguousarray(img.T)
        pos = [(y, x) for x, y in POSITIONS]
    elif how == "x":
        moved = np.ascontiguousarray(img[:, ::-1])
        pos = [(N - 1 - x, y) for x, y in POSITIONS]
    else:
        moved = np.ascontiguousarray(img[::-1])
        pos = [(x, N - 1 - y) for x, y in POSITIONS]
    ref = annulus_background(img, POSITIONS, 4.0, 9.0).background
    _close(annulus_background(moved, pos, 4.0, 9.0).background, ref, 0)
    ref = np.asarray(match([img, img + 2.0]).sky)
    _close(np.asarray(match([moved, moved + 2.0]).sky), ref, 1e-9)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@prop
@given(seed=seeds, value=extreme, nan=st.booleans())
def test_masked_values_never_matter(seed, name, value, nan):
    est = ESTIMATORS[name]
    img = _scene(seed)
    mask = np.zeros(img.shape, bool)
    rng = np.random.default_rng(seed)
    mask[rng.random(img.shape) < 0.05] = True
    mask[10:20, 40:56] = True
    changed = img.copy()
    changed[mask] = np.nan if nan else value
    _close(est(changed, mask), est(img, mask), 0)


@pytest.mark.parametrize("name", ["fit", "mesh"])
@prop
@given(
    seed=seeds,
    value=extreme,
    y=st.integers(0, N - 1),
    x=st.integers(0, N - 1),
    dtype=dtypes,
)
def test_one_arbitrary_pixel_changes_the_background_little_away_from_it(
    seed, name, value, y, x, dtype
):
    est = ESTIMATORS[name]
    img = _scene(seed).astype(dtype)
    hit = img.copy()
    hit[y, x] = value
    ref, out = est(img), est(hit)
    yy, xx = np.mgrid[:N, :N]
    # "away": beyond the reach of a mesh (16 px box) and of the masks' dilation
    away = np.hypot(yy - y, xx - x) > 16
    assert np.abs(out - ref)[away].max() <= 0.1 * NOISE


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@prop
@given(seed=seeds)
def test_same_answer_on_any_thread_count(seed, name):
    est = ESTIMATORS[name]
    img = _scene(seed)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = est(img)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = est(img)
    finally:
        numba.set_num_threads(threads)
    _close(many, one, 0)
