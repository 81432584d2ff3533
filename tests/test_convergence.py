"""The scale that separates sky from sources (``max_source_size``), convergence notes,
the ConvergenceWarning and the runaway back-off of the iterative pipeline."""

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import given
from hypothesis import strategies as st

import skymap
from skymap.background import convergence as C
from skymap.background import pipeline as P
from skymap.background._scale_kernels import box3_mean
from skymap.background.scale import max_source_size, release_broad, source_scale
from skymap.background.smooth import ThinPlateSmoother
from skymap.quality.simulate import scene_by_name

YY, XX = np.mgrid[:192, :192].astype(float)


def _gauss(y, x, sigma, amplitude):
    return amplitude * np.exp(-((YY - y) ** 2 + (XX - x) ** 2) / (2.0 * sigma**2))


def test_broad_bump_is_followed_and_a_smaller_source_is_not():
    rng = np.random.default_rng(1)
    noise = rng.normal(size=YY.shape)
    bump = _gauss(100, 60, 40.0, 3.0)  # sky: ~94 px FWHM, 3 sigma high
    blob = _gauss(96, 150, 3.0, 2.5)  # a source: ~7 px FWHM
    # The knob alone (the asymmetry check, on by default, could only raise the floor).
    res = skymap.fit(noise + bump + blob, max_source_size=32, source_asymmetry=None)
    assert res.max_source_size == 32.0
    assert all(r.min_scale is not None and r.min_scale >= 16.0 for r in res.history)
    # The bump is followed (within 0.4 sigma at its peak) ...
    assert abs(res.background[100, 60] - 3.0) < 0.4
    # ... the source is not: under it the background stays within 0.3 sigma of the sky.
    assert abs(res.background[96, 150] - bump[96, 150]) < 0.3
    # Without the floor, GCV is free to chase the noise more closely: the floored fit
    # is the smoother one.
    free = skymap.fit(noise + bump + blob, max_source_size=None, source_asymmetry=None)
    assert all(r.min_scale is None for r in free.history)
    assert np.std(np.diff(res.background, axis=1)) <= np.std(np.diff(free.background, axis=1))


@pytest.mark.parametrize("bad", [0, -5, float("nan"), float("inf"), "big", True, [3]])
def test_bad_max_source_size_names_the_option(bad):
    with pytest.raises(ValueError, match="max_source_size"):
        skymap.fit(np.zeros((64, 64)), max_source_size=bad)
    with pytest.raises(ValueError, match="max_source_size"):
        max_source_size(bad)


def test_every_previous_option_still_accepted():
    rng = np.random.default_rng(2)
    img = 5 + rng.normal(size=(96, 96))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", C.ConvergenceWarning)
        res = skymap.fit(
            img,
            high=4.0,
            low=2.0,
            max_iter=3,
            change_tol=0.01,
            mask_tol=0.005,
            error_tol=0.5,
            source_asymmetry=2.5,
            cell_size=8,
            gcv_inflation=1.4,
        )
    assert res.background.shape == img.shape
    assert isinstance(res.convergence_note, str) and res.convergence_note


def test_box3_mean_is_scipys_uniform_filter_bit_for_bit():
    # source_scale's 3x3 smoothing: scipy's running sums in its order, edges reflected
    import scipy.ndimage as ndi

    rng = np.random.default_rng(7)
    for shape in ((1, 1), (1, 6), (6, 1), (2, 2), (3, 7), (64, 33), (200, 301)):
        a = rng.normal(size=shape) * 10.0 ** rng.uniform(-3, 3)
        a[rng.random(shape) < 0.3] = 0.0
        np.testing.assert_array_equal(box3_mean(a), ndi.uniform_filter(a, 3))


def test_source_scale_is_measured_from_the_stars():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(256, 256))
    yy, xx = np.mgrid[:256, :256]
    for y, x in rng.uniform(20, 236, (40, 2)):
        img += 300 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 2.0**2))
    s = source_scale(img)
    assert 4.0 < s.fwhm < 5.6  # a 2-px sigma Gaussian: FWHM 4.7
    assert s.n_peaks >= 20
    # 8 FWHM, bounded by an eighth of the longer side (32 px) from above.
    assert s.max_source_size == 32.0
    assert source_scale(np.zeros((64, 64))).max_source_size == 16.0


def test_release_broad_keeps_sources_and_frees_sky():
    det = np.zeros((128, 128), bool)
    det[10:20, 10:20] = True
    det[40:120, 30:120] = True
    out = release_broad(det, 24)
    assert out[15, 15] and not out[80, 80]
    assert not (out & ~det).any()


def test_converged_scene_says_so_without_warning():
    scene = scene_by_name("crowded_stellar", shape=(192, 192), seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", C.ConvergenceWarning)
        res = skymap.fit(scene.image)
    assert res.converged
    assert res.convergence_note.startswith("converged")
    assert res.stop in C.STOPS and res.stop not in ("backed_off", "cap")
    assert res.max_source_size is not None and 16 <= res.max_source_size <= 32


def test_forced_low_cap_warns_and_says_why():
    scene = scene_by_name("galaxies_lsb", shape=(128, 128), seed=1)
    with pytest.warns(skymap.ConvergenceWarning, match="not converged") as caught:
        res = skymap.fit(scene.image, max_iter=1)
    assert not res.converged and res.stop == "cap"
    assert res.convergence_note.startswith("not converged")
    assert "max_iter" in res.convergence_note
    assert str(caught[0].message) == res.convergence_note
    assert issubclass(skymap.ConvergenceWarning, UserWarning)


def _rec(growth, change, error=0.0):
    return SimpleNamespace(mask_growth=growth, change=change, error=error)


def test_runaway_needs_growth_and_a_background_that_does_not_settle():
    pipe = SimpleNamespace(change_tol=0.01, error_tol=0.5, mask_tol=0.005)
    assert C.runaway(pipe, [_rec(0.1, 0.5), _rec(0.1, 0.45), _rec(0.08, 0.4)])
    # the background converges geometrically: the mask is only getting deeper
    assert not C.runaway(pipe, [_rec(0.1, 0.5), _rec(0.05, 0.2), _rec(0.02, 0.08)])
    # the mask no longer grows
    assert not C.runaway(pipe, [_rec(0.1, 0.5), _rec(0.1, 0.45), _rec(0.001, 0.4)])
    # too few iterations to tell
    assert not C.runaway(pipe, [_rec(0.1, 0.5), _rec(0.1, 0.45)])
    # a mask deepening over faint extended sources: the background moves by little
    # more than its tolerance
    assert not C.runaway(pipe, [_rec(0.009, 0.031), _rec(0.006, 0.028), _rec(0.006, 0.019)])


def _flicker(change, error=0.02, mask_change=0.004, growth=0.001, floor=16.0):
    return SimpleNamespace(
        change=change, error=error, mask_change=mask_change, mask_growth=growth, min_scale=floor
    )


def test_a_stall_is_a_settled_mask_whose_change_no_longer_shrinks_inside_its_error():
    pipe = SimpleNamespace(change_tol=0.01, error_tol=0.5, mask_tol=0.005)
    assert C.stalled(pipe, [_flicker(0.0150), _flicker(0.0145)])
    assert C.stalled(pipe, [_flicker(0.0120), _flicker(0.0190)])
    # still shrinking: the next iteration may meet the tolerance
    assert not C.stalled(pipe, [_flicker(0.018), _flicker(0.012)])
    # outside the statistical error: the data can tell the change from none
    assert not C.stalled(pipe, [_flicker(0.030), _flicker(0.029)])
    assert not C.stalled(pipe, [_flicker(0.015), _flicker(0.015, error=float("nan"))])
    # the mask has not settled (both more pixels flipped and the share moved)
    assert not C.stalled(pipe, [_flicker(0.015), _flicker(0.015, 0.02, 0.01, 0.01)])
    # a raised floor changed the estimator between the two
    assert not C.stalled(pipe, [_flicker(0.015), _flicker(0.015, floor=32.0)])
    # one record is not a trend; no statistical error asked for: no stall
    assert not C.stalled(pipe, [_flicker(0.015)])
    off = SimpleNamespace(change_tol=0.01, error_tol=0.0, mask_tol=0.005)
    assert not C.stalled(off, [_flicker(0.015), _flicker(0.015)])
    note = C.note_stalled(1, 6, [_flicker(0.0150), _flicker(0.0145)])
    assert note.startswith("converged: stage 1 stalled after 6") and "0.0145" in note


def _floor_rec(change, fraction, mask_change=0.008, floor=16.0):
    return SimpleNamespace(
        change=change,
        error=0.006,
        mask_change=mask_change,
        mask_fraction=fraction,
        min_scale=floor,
    )


def test_a_flicker_floor_is_a_small_change_that_no_longer_shrinks_on_a_mask_plateau():
    # The held-out vignetted frame's stage 1 (seed 0): changes 2-3 statistical errors
    # that do not shrink, 0.5-0.9% of the pixels flipping, the share on a plateau.
    pipe = SimpleNamespace(change_tol=0.01, error_tol=0.5, mask_tol=0.005)
    run = [_floor_rec(0.0138, 0.4557), _floor_rec(0.0167, 0.4566), _floor_rec(0.0149, 0.4579)]
    assert C.flickering(pipe, run)
    assert not C.stalled(pipe, run)  # outside the statistical error: not a stall
    # still shrinking geometrically (0.8 a step): the next iterations may settle
    assert not C.flickering(pipe, [_floor_rec(c, 0.456) for c in (0.025, 0.020, 0.016)])
    # the mask still grows over the run: a slow creep or a runaway in the making
    assert not C.flickering(pipe, [_floor_rec(0.015, f) for f in (0.446, 0.452, 0.458)])
    # the background moves by more than a few tolerances: not a floor
    assert not C.flickering(pipe, [_floor_rec(0.035, 0.456) for _ in range(3)])
    # more than flicker: a tenth of the pixels change mask every time
    assert not C.flickering(pipe, [_floor_rec(0.015, 0.456, 0.1) for _ in range(3)])
    # a raised floor inside the run; too few records
    assert not C.flickering(pipe, run[:2] + [_floor_rec(0.0149, 0.4579, floor=32.0)])
    assert not C.flickering(pipe, run[1:])
    note = C.note_flicker(1, 7, run)
    assert note.startswith("converged: stage 1 reached its flicker floor after 7")
    assert "0.0138, 0.0167, 0.0149" in note and "0.22%" in note


def test_a_creep_is_a_settled_background_whose_mask_still_moves():
    pipe = SimpleNamespace(change_tol=0.01, error_tol=0.5, mask_tol=0.005)
    creep = [_flicker(0.0048, 0.0028, 0.039, 0.006), _flicker(0.0075, 0.0028, 0.031, 0.015)]
    assert C.creeping(pipe, creep)
    # the background still moved by more than its tolerance in one of the two
    assert not C.creeping(pipe, [_flicker(0.02, 0.0028, 0.039, 0.006), creep[1]])
    # the mask settled as well: that is plain settling, not a creep
    assert not C.creeping(pipe, [creep[0], _flicker(0.0075, 0.0028, 0.004, 0.001)])
    # a raised floor changed the estimator between the two; one record is not a run
    assert not C.creeping(pipe, [creep[0], _flicker(0.0075, 0.0028, 0.031, 0.015, 32.0)])
    assert not C.creeping(pipe, creep[1:])
    note = C.note_creeping(1, 7, creep, pipe)
    assert note.startswith("converged: stage 1's background settled after 7")
    assert "+1.50%" in note and "0.0075" in note


class _CreepingMasker:
    """A masker whose mask grows by a band of rows at every call, over a sky with a
    slope, so the background keeps moving: a runaway by construction."""

    def __init__(self):
        self.calls = 0

    def __call__(self, residual, rms, mask):
        self.calls += 1
        out = np.zeros(residual.shape, bool)
        out[: 12 * self.calls, :] = True
        return out


def test_runaway_is_backed_off_to_the_state_before_it():
    rng = np.random.default_rng(3)
    img = np.add.outer(0.05 * (np.arange(160.0) - 80) ** 2 / 80.0, np.zeros(160))
    img = img + rng.normal(size=img.shape)
    smoother = ThinPlateSmoother(smoothing=1e6, cell_size=8)
    pipe = P.IterativeBackground(
        first_guess=smoother,
        stages=(P.Stage(masker=_CreepingMasker(), estimator=smoother),),
        max_iter=8,
    )
    res = pipe.fit(img)
    assert res.converged and res.stop == "backed_off"
    assert res.convergence_note.startswith("converged by backing off a runaway")
    stage = [r for r in res.history if r.stage == 0]
    # three growing iterations, then the back-off record
    assert len(stage) == C.RUNAWAY_RUN + 1
    kept = res.history[-C.RUNAWAY_RUN - 2]
    np.testing.assert_array_equal(res.mask, kept.mask)
    np.testing.assert_array_equal(res.background, kept.background)


def test_a_runaway_backs_off_to_where_the_growth_began_not_where_it_was_caught(
    slow_then_fast,
):
    # The run is caught at the 4th iteration (the first three grew while the change
    # shrank), but the mask had grown since the stage began: the back-off goes there.
    # Landing at the state before the last three would keep the first growth, which a
    # fit of nearly the same image, caught one iteration earlier, would not.
    make_pipeline, img = slow_then_fast
    res = make_pipeline().fit(img)
    assert res.convergence_note.startswith("converged by backing off a runaway")
    assert "over 4 iterations" in res.convergence_note
    np.testing.assert_array_equal(res.mask, res.history[0].mask)  # the stage's start
    assert not res.mask.any()


def test_a_back_off_stops_where_the_stage_was_converging_before_its_growth_turned(
    converging_then_runaway,
):
    # Growth 12, 6, 2, 1 rows, then 10: the run is caught at the 5th iteration (2, 1,
    # 10 rows with the background moving). The growth turned at the 4th (1 row, then
    # 10): the stage had two regimes. The walk back from before the caught iterations
    # stops at the 2nd, whose growth (6) was below the 1st's (12): the stage was
    # converging there. The stage's start would throw that deepening away with the run.
    make_pipeline, img = converging_then_runaway
    res = make_pipeline().fit(img)
    assert res.convergence_note.startswith("converged by backing off a runaway")
    kept = [r for r in res.history if r.stage == 0][1]
    assert kept.iteration == 1
    np.testing.assert_array_equal(res.mask, kept.mask)
    assert res.mask[:18].all() and not res.mask[18:].any()


@given(
    growths=st.lists(
        st.sampled_from([-0.01, 0.0, 0.003, 0.006, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12]),
        min_size=1,
        max_size=12,
    ),
    floors=st.lists(st.sampled_from([8.0, 16.0]), min_size=12, max_size=12),
)
def test_the_kept_masks_hold_every_state_a_run_can_back_off_to(growths, floors):
    # A tiled fit backs off to a mask it kept as the records were made: whatever the
    # growth and floors, whenever the last RUNAWAY_RUN records could make a runaway
    # (each grew, at one floor), run_start's state is among the kept ones.
    pipe = SimpleNamespace(mask_tol=0.005)
    first = SimpleNamespace(mask_growth=float("nan"), min_scale=8.0, stage=-1)
    records = [first] + [
        SimpleNamespace(mask_growth=g, min_scale=f, stage=0)
        for g, f in zip(growths, floors, strict=False)
    ]
    kept = C.Landings(pipe)
    kept.start(0, 0)
    for n in range(2, len(records) + 1):
        kept.add(records[:n], n - 1)
        run = records[max(0, n - C.RUNAWAY_RUN - 1) : n]
        if n > C.RUNAWAY_RUN and all(
            r.mask_growth > pipe.mask_tol and r.min_scale == run[0].min_scale for r in run
        ):
            assert kept[C.run_start(pipe, records[:n])] == C.run_start(pipe, records[:n])
        assert len(kept.masks) <= C.RUNAWAY_RUN + 3  # the run, the turn, the latest before


@pytest.mark.parametrize("name", ["spitzer_cutout.fits", "m6707hh_cutout.fits"])
def test_real_cutouts_converge_with_a_sane_mask(data_dir, name):
    img = fits.getdata(data_dir / name).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", C.ConvergenceWarning)
        res = skymap.fit(img)
    assert res.converged, res.convergence_note
    # a 64-px cutout next to bright stars: their halo masks (HaloMasker) cover about half
    assert 0.01 < res.source_mask.mean() < 0.75
    assert res.max_source_size == 16.0  # a 64-px cutout: the lower bound


def test_source_scale_blocks_gathered_as_numpys_padded_reshape():
    # block_rows at step 1: the coarse median's blocks as rows (NaN where not ok or
    # beyond the image) against numpy's padded, masked, reshaped and transposed copy
    from skymap.masking._bright_kernels import block_rows

    rng = np.random.default_rng(3)
    for shape in ((130, 77), (31, 33), (64, 64), (1, 5)):
        data, ok = rng.normal(size=shape), rng.random(shape) > 0.1
        b = 32
        gy, gx = -(-shape[0] // b), -(-shape[1] // b)
        padded = np.full((gy * b, gx * b), np.nan)
        padded[: shape[0], : shape[1]] = np.where(ok, data, np.nan)
        want = padded.reshape(gy, b, gx, b).transpose(0, 2, 1, 3).reshape(gy * gx, b * b)
        got = block_rows(data, ~ok, b, np.empty((gy * gx, b * b)), step=1)
        assert np.array_equal(got, want, equal_nan=True)


def test_source_sizes_component_areas_equal_scipys_label_counts():
    # component_areas: the 4-connected regions' pixel counts in scipy's label order,
    # on sparse and dense maps, single rows and columns, empty and full maps
    from scipy import ndimage

    from skymap.background._scale_kernels import component_areas

    rng = np.random.default_rng(4)
    for shape, p in (((200, 300), 0.3), ((200, 300), 0.6), ((1, 40), 0.5), ((40, 1), 0.5),
                     ((5, 5), 0.0), ((6, 6), 1.0)):  # fmt: skip
        m = rng.random(shape) < p
        lab, n = ndimage.label(m)
        assert np.array_equal(component_areas(m), np.bincount(lab.ravel(), minlength=n + 1)[1:])
