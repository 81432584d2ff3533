"""The source-tracking test (skymap.background.tracking) and what the pipeline does with
it: a longer smoothing once the background is found following source light, and
limit cycles resolved."""

from types import SimpleNamespace

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import gaussian_filter

import skymap
from skymap.background import convergence as C
from skymap.background.smooth import ThinPlateSmoother
from skymap.background.tracking import source_tracking
from skymap.quality.simulate import scene_by_name

N = 256
YY, XX = np.mgrid[:N, :N].astype(float)


def _discs(rng, n=12, scale=10.0, amplitude=2.0):
    centres = rng.uniform(20, N - 20, (n, 2))
    return sum(amplitude * np.exp(-np.hypot(YY - y, XX - x) / scale) for y, x in centres)


def _valid(model):
    cy, cx = model.cell_size
    return np.full(model.grid.shape, float(cy * cx))


def test_discs_with_masked_cores_are_found_tracking():
    rng = np.random.default_rng(0)
    disc = _discs(rng)
    img = rng.normal(size=(N, N)) + disc
    model = ThinPlateSmoother().fit(img, disc > 1.0)
    test = source_tracking(model, _valid(model))
    assert test.tracking and test.correlation > 0.3


def test_a_fit_lower_where_the_masks_are_is_tracking_too():
    # The same discs as dips: the fit sinks around the masked cores (as it sinks into
    # holes too large for it), a negative correlation of the same size.
    rng = np.random.default_rng(0)
    disc = _discs(rng)
    model = ThinPlateSmoother().fit(rng.normal(size=(N, N)) - disc, disc > 1.0)
    test = source_tracking(model, _valid(model))
    assert test.tracking and test.correlation < -0.3


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sky_independent_of_the_masks_is_not_tracking(seed):
    # Structure of any shape (here a single broad positive bump plus a smooth random
    # field) laid down independently of where the masks are.
    rng = np.random.default_rng(seed)
    field = gaussian_filter(rng.normal(size=(N, N)), 12.0)
    bump = 3.0 * np.exp(-((YY - 90) ** 2 + (XX - 170) ** 2) / (2 * 50.0**2))
    img = 3.0 * field / field.std() + bump + rng.normal(size=(N, N))
    mask = gaussian_filter(rng.normal(size=(N, N)), 3.0) > 0.12  # ~10% in blobs
    model = ThinPlateSmoother().fit(img, mask)
    test = source_tracking(model, _valid(model))
    assert not test.tracking, test


@pytest.mark.parametrize("seed", [0, 1])
def test_sources_clustered_on_a_nebula_are_not_taken_for_source_light(seed):
    # Stars denser where a nebula (5 sigma, 10-px structure) is bright, and its
    # brightest knots masked, as a masker takes them: masks and sky correlate (0.6),
    # but the unmasked data depart from the stiffer fit far beyond the noise on both
    # sides, which source light never does: sky, so no stiffening.
    rng = np.random.default_rng(seed)
    field = gaussian_filter(rng.normal(size=(N, N)), 10.0)
    field = 5.0 * field / field.std()
    img = field + rng.normal(size=(N, N))
    p = np.exp(field / 2.0).ravel()
    stars = np.zeros(N * N, bool)
    stars[rng.choice(N * N, size=150, p=p / p.sum())] = True
    mask = gaussian_filter(stars.reshape(N, N).astype(float), 2.0) > 0.01
    mask |= field > np.percentile(field, 90)
    model = ThinPlateSmoother().fit(img, mask)
    test = source_tracking(model, _valid(model))
    assert abs(test.correlation) > test.limit  # the correlation alone would stiffen
    assert test.sky and test.structure > 3.0
    assert not test.tracking
    # the discs' outskirts (one-sided) stay below the limit
    disc = _discs(rng)
    wings = ThinPlateSmoother().fit(rng.normal(size=(N, N)) + disc, disc > 1.0)
    found = source_tracking(wings, _valid(wings))
    assert found.tracking and found.structure < found.structure_limit


def test_blank_border_is_not_taken_for_sources():
    # A border of blank (given-bad) pixels: the masked share is counted against the
    # valid pixels, so the border adds nothing.
    rng = np.random.default_rng(4)
    img = rng.normal(size=(N, N)) + 0.01 * XX
    bad = np.zeros((N, N), bool)
    bad[:, :40] = True
    model = ThinPlateSmoother().fit(img, bad)
    cy, cx = model.cell_size
    valid = (~bad).reshape(N // cy, cy, N // cx, cx).sum(axis=(1, 3)).astype(float)
    assert not source_tracking(model, valid).tracking


def test_bad_valid_grid_names_the_parameter():
    model = ThinPlateSmoother().fit(np.random.default_rng(0).normal(size=(64, 64)))
    with pytest.raises(ValueError, match="valid"):
        source_tracking(model, np.ones((3, 3)))


@settings(max_examples=12, deadline=None)
@given(st.floats(-6, 6), st.floats(-3, 3))
def test_correlation_is_unchanged_by_scale_and_offset(log_scale, offset):
    # Pixels in other units, or on another zero point: the same verdict and value.
    rng = np.random.default_rng(5)
    disc = _discs(rng, n=8)
    img = rng.normal(size=(N, N)) + disc
    mask = disc > 1.0
    a = 10.0**log_scale
    base = ThinPlateSmoother(smoothing=30.0**4).fit(img, mask)
    moved = ThinPlateSmoother(smoothing=30.0**4).fit(a * img + offset * a, mask)
    t0, t1 = source_tracking(base, _valid(base)), source_tracking(moved, _valid(moved))
    assert t1.correlation == pytest.approx(t0.correlation, abs=1e-6)


def test_pipeline_stiffens_when_the_background_follows_galaxy_outskirts():
    scene = scene_by_name("cluster_icl", shape=(256, 256), seed=1)
    on = skymap.fit(scene.image, scene.mask)
    off = skymap.fit(scene.image, scene.mask, source_tracking=None)
    measured = [r.tracking for r in on.history if np.isfinite(r.tracking)]
    assert measured and max(measured) > on.config.source_tracking
    assert all(not np.isfinite(r.tracking) for r in off.history)
    # The intracluster light (a source by the scene's convention) stays out.
    err_on = np.sqrt(np.mean((on.background - scene.sky) ** 2))
    err_off = np.sqrt(np.mean((off.background - scene.sky) ** 2))
    assert err_on < 0.7 * err_off
    # What the metrics and the report say about it.
    from skymap.app.cli.common import sky_scale

    said = sky_scale(on)
    assert said["floor_raised_by_tracking"] and said["source_tracking"] > 0.25
    assert said["smoothing_floor"] > said["max_source_size"] / 2
    assert not sky_scale(off)["floor_raised_by_tracking"]


def test_tracking_raises_the_floor_up_to_an_eighth_of_the_image():
    scene = scene_by_name("galaxies_lsb", shape=(256, 256), seed=1)
    res = skymap.fit(scene.image, scene.mask)
    floors = [r.min_scale for r in res.history]
    # It only ever rises, and never beyond an eighth of the shorter side.
    assert all(b >= a for a, b in zip(floors, floors[1:], strict=False))
    assert floors[-1] > floors[0] and floors[-1] <= 256 / 8.0
    # tracking_cap moves that ceiling, and nothing else.
    low = skymap.fit(scene.image, scene.mask, tracking_cap=1 / 16)
    assert max(r.min_scale for r in low.history) <= 256 / 16.0 < floors[-1]
    for bad in (0.0, -0.1, 1.5, "x"):
        with pytest.raises(ValueError, match="tracking_cap"):
            skymap.default_pipeline(tracking_cap=bad)
    # The other form: GCV told to count degrees of freedom 12 times, floor untouched.
    pipe = skymap.default_pipeline(tracking_stiffen=None, tracking_inflation=12.0)
    smoother = pipe.stages[-1].estimator
    assert pipe._estimator(smoother, True).gcv_inflation == 12.0
    assert pipe._estimator(smoother, False) is smoother


def test_a_stated_max_source_size_bounds_the_tracking_raise():
    # Discs whose outskirts the fit follows: the test fires, and with a measured
    # ("auto") size it raises the floor past that size's; a size given in pixels is
    # the caller's definition of sky, which the raise does not override.
    rng = np.random.default_rng(0)
    img = rng.normal(size=(N, N)) + _discs(rng)
    auto = skymap.fit(img)
    assert max(r.min_scale for r in auto.history) > auto.max_source_size / 2
    stated = skymap.fit(img, max_source_size=24)
    assert max(r.tracking for r in stated.history if np.isfinite(r.tracking)) > 0.25
    assert {r.min_scale for r in stated.history} == {12.0}


def test_iterations_that_raise_the_floor_do_not_count_towards_the_last_stage_cap():
    # Intracluster light: the tracking test raises the floor during the last stage;
    # those iterations change the estimator, and the mask still gets max_iter of its own
    # (a held-out cluster spent 4 of its 8 on raises and stopped still improving).
    scene = scene_by_name("cluster_icl", shape=(256, 256), seed=1)
    res = skymap.fit(scene.image, scene.mask, tracking_cap=0.5, max_iter=3)
    last = [r for r in res.history if r.stage == 1]
    before = [r for r in res.history if r.stage == 0][-1]
    raises = sum(b.min_scale > a.min_scale for a, b in zip([before, *last], last, strict=False))
    assert raises >= 1
    assert len(last) == 3 + raises
    assert "do not count" in res.convergence_note


def test_a_fit_found_tracking_masks_at_a_coarser_scale_too():
    # Intracluster light too faint per pixel for sigma 8 px: once the tracking test
    # fires, the last stage also matches sigma 16 px, masks more of it and the sky
    # comes out closer to the truth (0.094 -> 0.072 sigma on this seed).
    scene = scene_by_name("cluster_icl", shape=(384, 384), seed=2)
    on = skymap.fit(scene.image, scene.mask)
    off = skymap.fit(scene.image, scene.mask, tracking_scale=None)
    assert max(r.tracking for r in on.history if np.isfinite(r.tracking)) > 0.25
    assert on.source_mask.mean() > off.source_mask.mean() + 0.02
    err_on = np.sqrt(np.mean((on.background - scene.sky) ** 2)) / scene.noise_sigma
    err_off = np.sqrt(np.mean((off.background - scene.sky) ** 2)) / scene.noise_sigma
    assert err_on < 0.85 * err_off
    pipe = skymap.default_pipeline()
    masker = pipe.stages[-1].masker
    assert pipe._masker(masker, True).scales == (*masker.scales, 16.0)
    assert pipe._masker(masker, False) is masker
    assert skymap.default_pipeline(tracking_scale=None)._masker(masker, True) is masker
    for bad in (1.0, 0.5, -2, "2", [2], float("inf"), True):
        with pytest.raises(ValueError, match="tracking_scale"):
            skymap.default_pipeline(tracking_scale=bad)
    # the longest floor a frame allows decides whether the coarse scale is used
    assert pipe._masker(masker, True, 2.5 * 16.0).scales[-1] == 16.0
    assert pipe._masker(masker, True, 2.5 * 16.0 - 1) is masker
    assert pipe._longest_floor(None, (256, 1024), None) == 256 / 8
    assert pipe._longest_floor(50.0, (256, 1024), None) == 50.0
    # a masker with scales that is not a dataclass cannot be rebuilt: it is kept
    plain = SimpleNamespace(scales=(1.0, 2.0))
    assert pipe._masker(plain, True) is plain


def test_a_fit_lower_where_the_masks_are_keeps_its_scales(monkeypatch):
    # Bending into holes (a negative correlation) calls for a longer smoothing, not
    # for masking more: only a positive correlation adds the coarser scale.
    import skymap.background.pipeline as P
    from skymap.background.tracking import TrackingTest

    rng = np.random.default_rng(0)
    img = rng.normal(size=(128, 128)).astype(np.float32)
    for sign, expect in ((-1.0, False), (1.0, True)):
        asked = []
        monkeypatch.setattr(
            P, "source_tracking", lambda *a, _s=sign, **k: TrackingTest(correlation=_s, limit=0.1)
        )
        pipe = skymap.default_pipeline()
        monkeypatch.setattr(
            P.IterativeBackground,
            "_masker",
            lambda self, m, coarser, longest=None, _a=asked: _a.append(coarser) or m,
        )
        pipe.fit(img)
        assert any(asked) is expect


def test_pipeline_leaves_the_notebook_sky_alone():
    from skymap.quality.simulate import notebook_scene

    scene = notebook_scene(shrink_factor=8)
    res = skymap.fit(scene.image, scene.mask)
    measured = [r.tracking for r in res.history if np.isfinite(r.tracking)]
    assert measured and all(t < res.config.source_tracking for t in measured)


def test_bad_source_tracking_names_the_option():
    for bad in (-0.1, 1.5, "x"):
        with pytest.raises(ValueError, match="source_tracking"):
            skymap.fit(np.zeros((64, 64)), source_tracking=bad)
    with pytest.raises(ValueError, match="tracking_inflation"):
        skymap.fit(np.zeros((64, 64)), tracking_inflation=0)
    with pytest.raises(ValueError, match="tracking_stiffen"):
        skymap.fit(np.zeros((64, 64)), tracking_stiffen=-2)


def _rec(growth, change=0.05, floor=None):
    return SimpleNamespace(mask_growth=growth, change=change, error=0.0, min_scale=floor)


def test_a_raised_floor_is_not_a_runaway():
    # The background moved because the smoothing floor went up (source tracking), not
    # because the mask ran away; at one floor the same run is a runaway.
    pipe = SimpleNamespace(change_tol=0.01, error_tol=0.0, mask_tol=0.005)
    steady = [_rec(0.03, c, floor=16.0) for c in (0.3, 0.3, 0.26, 0.23)]
    assert C.runaway(pipe, steady)
    raised = [
        _rec(0.03, c, floor=f) for c, f in ((0.3, 16.0), (0.3, 32.0), (0.26, 64.0), (0.23, 64.0))
    ]
    assert not C.runaway(pipe, raised)


def test_a_raised_floor_is_not_a_cycle():
    # Held-out cluster scene: source tracking doubled the floor each iteration and the
    # masked share went 12.4%, 16.2%, 15.7%, 19.1%; the "cycle" was the estimator
    # changing, and resolving it (mask intersection) took the fit from 0.26 to 0.41
    # sigma. Each mask is made from the previous background, so the floor must have
    # held over the run, the record before it and the one before that.
    pipe = SimpleNamespace(change_tol=0.01, error_tol=0.0, mask_tol=0.005)
    growth = (0.03, 0.038, -0.006, 0.034, -0.01)
    assert C.cycling(pipe, [_rec(g, floor=208.0) for g in growth])
    floors = (32.0, 65.0, 130.0, 208.0, 208.0)
    assert not C.cycling(pipe, [_rec(g, floor=f) for g, f in zip(growth, floors, strict=True)])
    # nor is a run that starts at a stage's first record (its mask growth is against
    # the previous stage's mask)
    assert not C.cycling(pipe, [_rec(g, floor=208.0) for g in growth[1:]])


def test_cycle_is_detected_and_explained():
    pipe = SimpleNamespace(change_tol=0.01, error_tol=0.0, mask_tol=0.005)
    run = [_rec(g) for g in (0.03, 0.02, 0.02, -0.01, 0.012)]
    assert C.cycling(pipe, run)
    assert not C.cycling(pipe, [_rec(g) for g in (0.03, 0.02, 0.02, 0.01, 0.012)])
    # Settled changes are not a cycle, however the mask flickers.
    assert not C.cycling(pipe, [_rec(g, change=0.001) for g in (0.03, 0.02, 0.02, -0.01, 0.012)])
    recs = [SimpleNamespace(mask_fraction=f, change=0.03) for f in (0.2, 0.22, 0.21)]
    note = C.note_cycle(1, recs)
    assert "cycle" in note and "20.0%" in note and "both" in note


def test_a_cycle_between_skies_far_apart_is_not_called_converged():
    # The Galactic-centre MIPS frame with an injected sky cycled between 94% and 97%
    # masked while the background jumped by 4.5 of its RMS: the intersection stops the
    # loop but is no state of agreement, and the note must say so.
    pipe = SimpleNamespace(change_tol=0.01, error_tol=0.5, mask_tol=0.005)
    mild = [SimpleNamespace(mask_fraction=f, change=0.025, error=0.01) for f in (0.2, 0.22, 0.21)]
    wild = [SimpleNamespace(mask_fraction=f, change=4.5, error=0.01) for f in (0.94, 0.97, 0.94)]
    assert not C.wild_cycle(pipe, mild[-1]) and C.wild_cycle(pipe, wild[-1])
    assert C.note_cycle(1, mild, pipe).startswith("converged by resolving a cycle")
    note = C.note_cycle(1, wild, pipe)
    assert note.startswith("not converged") and "94.0%" in note and "do not trust" in note


def test_a_small_crowded_frame_masks_without_the_coarse_scale(data_dir):
    # A 256-px corner of the Spitzer GLIMPSE field, stars everywhere: the tracking test
    # flags the fit, and with the 16-px scale (holes some 80 px across on a frame whose
    # fit may reach 32 px) the last stage's mask ran away (0.30 -> 0.92 of the frame)
    # and backed off to 0.69. Its longest floor is under 2.5 times that scale, so the
    # stage masks at its own scales, settles, and keeps more of the frame as sky.
    image = fits.getdata(data_dir / "spitzer_crowded_256.fits")
    res = skymap.fit(image)
    assert max(r.tracking for r in res.history if np.isfinite(r.tracking)) > 0.25
    assert res.converged and "runaway" not in res.convergence_note
    assert "settled" in res.convergence_note
    assert res.source_mask.mean() < 0.6
