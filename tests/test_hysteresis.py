"""HysteresisMasker's compiled steps against scipy references, the coarse noise map,
and the pipeline's use of it (working noise, background change)."""

import numpy as np
import pytest
import scipy.ndimage as ndi
from scipy import signal

import skymap.masking.hysteresis as H
from skymap.backends.base import CHANGE_STEP
from skymap.backends.memory import MemoryBackend
from skymap.background.model import MapModel
from skymap.background.noise import NoiseModel
from skymap.background.smooth import ThinPlateSmoother


def _reference_snr(res, excluded, s, b, sigma_full, surround_local=None):
    """snr of the masked normalised Gaussian smoothing on the b-binned grid, in float64
    with scipy: (G*v) / sqrt(sigma**2 * G2*c), sigma read at each binned pixel's
    representative full-resolution pixel (y*b + b//2, x*b + b//2)."""
    v = np.where(excluded, 0.0, res).astype(np.float64)
    c = (~excluded).astype(np.float64)
    ny, nx = res.shape
    gy, gx = -(-ny // b), -(-nx // b)
    if b > 1:
        vp = np.zeros((gy * b, gx * b))
        cp = np.zeros_like(vp)
        vp[:ny, :nx], cp[:ny, :nx] = v, c
        v = vp.reshape(gy, b, gx, b).sum(axis=(1, 3))
        c = cp.reshape(gy, b, gx, b).sum(axis=(1, 3))
    # The documented kernel: a Gaussian truncated at 3 sigma (radius >= 1), normalised;
    # built with scipy, not with the module's helper.
    sig = s / b
    radius = max(1, int(3.0 * sig + 0.5))
    g = signal.windows.gaussian(2 * radius + 1, sig)
    g /= g.sum()

    def conv(a, k):
        a = ndi.correlate1d(a, k, axis=1, mode="constant")
        return ndi.correlate1d(a, k, axis=0, mode="constant")

    yy = np.minimum(np.arange(gy) * b + b // 2, ny - 1)
    xx = np.minimum(np.arange(gx) * b + b // 2, nx - 1)
    sig = np.asarray(sigma_full, dtype=np.float64)
    sig = sig[np.ix_(yy, xx)] if sig.ndim else sig
    nv = sig**2 * conv(c, g * g)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(nv > 0, conv(v, g) / np.sqrt(nv), 0.0)


@pytest.mark.parametrize("s", [1.0, 2.0, 3.0, 8.0])
@pytest.mark.parametrize("noise_kind", ["scalar", "full", "coarse"])
def test_scale_maps_match_scipy_normalised_convolution(rng, s, noise_kind):
    res = rng.normal(size=(203, 170)).astype(np.float32)
    excluded = rng.random(res.shape) < 0.15
    res[excluded] = np.nan  # excluded values must never matter
    values = (1.0 + rng.random((26, 22))).astype(np.float32)
    coarse = H.CoarseRMS(values=values, step=8, shape=res.shape)
    noise = {
        "scalar": np.asarray(np.float32(1.7)),
        "full": np.asarray(coarse),
        "coarse": coarse,
    }[noise_kind]
    masker = H.HysteresisMasker(surround=0, grow_plain=True)
    maps = masker.scale_maps(res, noise, excluded, s)
    ref = _reference_snr(res, excluded, s, maps.block, np.asarray(noise))
    # documented binning: the largest power of two <= s
    assert maps.block == {1.0: 1, 2.0: 2, 3.0: 2, 8.0: 8}[s]
    np.testing.assert_allclose(maps.snr, ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(maps.plain, ref, atol=2e-5, rtol=2e-5)


def test_surround_mean_is_subtracted_in_units_of_the_noise(rng):
    # A constant residual is all "surround": the difference of Gaussians removes it
    # wherever the wide kernel sees the same level, far from the edges.
    res = np.full((256, 256), 3.0, np.float32)
    excluded = np.zeros(res.shape, bool)
    maps = H.HysteresisMasker(grow_plain=True).scale_maps(res, np.asarray(1.0), excluded, 2.0)
    inner = (slice(16, -16), slice(16, -16))  # binned by 2
    assert np.abs(maps.snr[inner]).max() < 1e-4
    assert maps.plain[inner].min() > 1.0  # the plain map keeps the level


def test_detections_into_equals_detections_ored(rng):
    res = rng.normal(size=(160, 150)).astype(np.float32)
    yy, xx = np.mgrid[:160, :150]
    res += 6 * np.exp(-((yy - 80) ** 2 + (xx - 70) ** 2) / 18.0)
    excluded = rng.random(res.shape) < 0.02
    masker = H.HysteresisMasker(grow_plain=True)
    for s in masker.scales:
        plain = masker._detect(res, np.asarray(1.0), excluded, s)
        into = excluded.copy()
        got = masker._detect(res, np.asarray(1.0), excluded, s, into=into)
        assert got is into
        np.testing.assert_array_equal(into, excluded | plain)
        assert not (plain & excluded).any()


def test_coarse_rms_validates_and_expands():
    c = H.CoarseRMS(values=np.arange(6.0).reshape(2, 3), step=4, shape=(7, 9))
    full = np.asarray(c)
    assert full.shape == (7, 9)
    assert full[3, 3] == 0 and full[4, 4] == 4 and full[6, 8] == 5
    with pytest.raises(ValueError, match="values must have shape"):
        H.CoarseRMS(values=np.ones((2, 2)), step=4, shape=(7, 9))
    with pytest.raises(ValueError, match="step must be an integer >= 1"):
        H.CoarseRMS(values=np.ones((2, 2)), step=0, shape=(7, 9))
    with pytest.raises(ValueError, match="rms must describe an image of shape"):
        H.HysteresisMasker()(np.zeros((8, 9)), c)


def test_masker_reads_a_coarse_map_like_its_expansion(rng):
    res = rng.normal(size=(128, 128)).astype(np.float32)
    res[60:66, 60:66] += 8.0
    c = H.CoarseRMS(values=(1 + rng.random((16, 16))).astype(np.float32), step=8, shape=(128, 128))
    m = H.HysteresisMasker()
    np.testing.assert_array_equal(m(res, c), m(res, np.asarray(c)))


def test_working_rms_coarse_samples_the_smooth_noise_map_at_block_centres(rng):
    yy, xx = np.mgrid[:256, :256]
    image = rng.normal(size=(256, 256)) * (1.0 + xx / 256.0)
    model = ThinPlateSmoother(cell_size=16).fit(image)
    backend = MemoryBackend(image)
    got = NoiseModel(coarse=True).working(model, backend)
    assert isinstance(got, H.CoarseRMS) and got.step == 8
    full = model.rms_map()
    # Block (i, j) holds the map at pixel (8 i + 3.5, 8 j + 3.5): between its neighbours.
    lo = np.minimum(full[3::8, 3::8], full[4::8, 4::8])
    hi = np.maximum(full[3::8, 3::8], full[4::8, 4::8])
    assert np.all((got.values >= lo - 1e-6) & (got.values <= hi + 1e-6))
    full_floor = NoiseModel(coarse=False).working(model, backend)
    assert full_floor.shape == (256, 256)


def test_smoother_noise_grid_is_floored_at_half_its_median(rng):
    image = rng.normal(size=(256, 256))
    image[:, :128] *= 0.01  # a near-silent half
    model = ThinPlateSmoother(cell_size=16).fit(image)
    grid = model.rms_grid
    assert grid.min() >= 0.5 * np.median(grid) - 1e-12


@pytest.mark.parametrize("kind", ["scalar", "full", "coarse"])
def test_change_is_the_rms_of_the_subsampled_difference_in_noise_units(rng, kind):
    new = rng.normal(size=(61, 50)).astype(np.float32)
    old = rng.normal(size=(61, 50)).astype(np.float32)
    bad = rng.random(new.shape) < 0.2
    new[bad] = np.nan
    coarse = H.CoarseRMS(
        values=(1 + rng.random((8, 7))).astype(np.float32), step=8, shape=(61, 50)
    )
    rms = {"scalar": 2.0, "full": np.asarray(coarse), "coarse": coarse}[kind]
    full = np.broadcast_to(np.asarray(rms, dtype=np.float64), new.shape)
    k = CHANGE_STEP
    d = ((new - old) / full)[::k, ::k][~bad[::k, ::k]]
    want = np.sqrt(np.mean(d.astype(np.float64) ** 2))
    backend = MemoryBackend(new, bad)
    got = backend.change(new, None, MapModel(background=old, rms=old), rms, NoiseModel)
    assert got == pytest.approx(want, rel=1e-6)


def test_change_leaves_out_pixels_of_zero_noise(rng):
    # A noise map that is zero somewhere (a fit whose cells lost every pixel) must not
    # crash the change (numba raises on x / 0): those pixels drop out, as numpy's
    # inf and nan do in the tiled path; all zero gives 0.
    new = rng.normal(size=(40, 40)).astype(np.float32)
    old = rng.normal(size=(40, 40)).astype(np.float32)
    bad = np.zeros(new.shape, bool)
    rms = np.ones(new.shape, np.float32)
    rms[:20] = 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        d = ((new - old) / rms)[::CHANGE_STEP, ::CHANGE_STEP]
    want = np.sqrt(np.mean(d[np.isfinite(d)].astype(np.float64) ** 2))
    backend = MemoryBackend(new, bad)
    model = MapModel(background=old, rms=old)
    assert backend.change(new, None, model, rms, NoiseModel) == pytest.approx(want, rel=1e-6)
    zero = np.zeros(new.shape, np.float32)
    assert backend.change(new, None, model, zero, NoiseModel) == 0.0


@pytest.mark.parametrize("s", [1.0, 1.5])
def test_unmasked_rows_take_the_shortcut_bit_for_bit(rng, s):
    # Rows without an excluded pixel share their weight sums (a shortcut); masking
    # column 0 of every row forces the general path, which must agree bit for bit
    # beyond the kernel's reach of that column.
    res = rng.normal(size=(120, 140)).astype(np.float32)
    masker = H.HysteresisMasker(grow_plain=True)
    clean = np.zeros(res.shape, bool)
    edge = clean.copy()
    edge[:, 0] = True
    a = masker.scale_maps(res, np.asarray(np.float32(1.1)), clean, s)
    b = masker.scale_maps(res, np.asarray(np.float32(1.1)), edge, s)
    reach = 2 * max(1, int(3.0 * s + 0.5)) + 1  # beyond the 3-sigma kernel and the surround's bins
    far = (slice(None), slice(4 * reach, None))
    np.testing.assert_array_equal(a.plain[far], b.plain[far])
    assert np.abs(a.snr[far] - b.snr[far]).max() < 1e-5  # the surround mean differs


def test_scale_maps_do_not_depend_on_the_thread_count(rng):
    # The kernels run over bands of rows, one per numba thread: the maps must be the
    # same bit for bit on one thread, on the unbinned (s=1) and binned (s=4) paths.
    import numba

    res = rng.normal(size=(300, 170)).astype(np.float32)
    excluded = rng.random(res.shape) < 0.05
    masker = H.HysteresisMasker(grow_plain=True)
    noise = np.asarray(np.float32(1.0))
    before = numba.get_num_threads()
    for s in (1.0, 4.0):
        many = masker.scale_maps(res, noise, excluded, s)
        numba.set_num_threads(1)
        try:
            one = masker.scale_maps(res, noise, excluded, s)
        finally:
            numba.set_num_threads(before)
        np.testing.assert_array_equal(many.snr, one.snr)
        np.testing.assert_array_equal(many.plain, one.plain)


def test_the_fused_snr_pass_spreads_over_the_threads(rng, monkeypatch):
    # dog_snr hands in_bands its bands of strips (not rows): with a grain in rows it
    # once ran on one thread only
    import numba

    from skymap.masking import _hysteresis_kernels as K

    if numba.get_num_threads() < 2:
        pytest.skip("one numba thread")
    calls = {}
    real = K.in_bands

    def spy(kernel, n, *args, grain=32):
        calls[kernel.__name__] = min(numba.get_num_threads(), n // grain)
        return real(kernel, n, *args, grain=grain)

    monkeypatch.setattr(K, "in_bands", spy)
    res = rng.normal(size=(400, 150)).astype(np.float32)
    H.HysteresisMasker().scale_maps(res, np.asarray(np.float32(1.0)), res > 3, 1.0)
    assert calls["_dog_bands"] >= 2 and calls["_clean_rows"] >= 2


def test_flood_fill_keeps_the_regions_that_hold_a_seed_as_labelling_does(rng):
    # the in-memory hysteresis floods from the seeds instead of labelling: the same
    # pixels as scipy's 8-connected labels that hold a code-2 pixel
    from skymap.masking import _hysteresis_kernels as K

    codes = rng.choice(np.array([0, 1, 2], np.uint8), p=[0.55, 0.43, 0.02], size=(97, 131))
    labels, _ = ndi.label(codes > 0, structure=np.ones((3, 3), bool))
    seeded = np.unique(labels[codes == 2])
    want = np.isin(labels, seeded[seeded > 0])
    got = K.flood_seeded(codes.copy()).view(bool)
    np.testing.assert_array_equal(got, want)
    # painted as the flood reaches them: the same pixels dilated by a disk, OR-ed in
    for radius in (0.0, 1.5, 2.0):
        into = rng.random(codes.shape) < 0.01
        dilated = ndi.binary_dilation(want, H.disk_footprint(radius)) | into
        K.flood_seeded_into(codes.copy(), H._disk_offsets(radius), into)
        np.testing.assert_array_equal(into, dilated)


@pytest.mark.parametrize("bands", [1, 2, 7])
def test_flood_fill_in_bands_is_one_flood(rng, monkeypatch, bands):
    # The flood runs in bands of rows (each from its own seeds, within its rows), then
    # across the seams: the same pixels as scipy's labels holding a seed, and the same
    # painted disks, for regions that wind across many seams (growth near the
    # percolation threshold, few seeds) and disks up to radius 3 crossing them.
    import types

    from skymap.masking import _hysteresis_kernels as K

    monkeypatch.setattr(K, "_FLOOD_ROWS", 8)
    monkeypatch.setattr(K, "numba", types.SimpleNamespace(get_num_threads=lambda: bands))
    for p_seed in (0.0005, 0.01):
        codes = rng.choice(np.array([0, 1, 2], np.uint8), p=[0.4, 0.6 - p_seed, p_seed],
                           size=(203, 157))  # fmt: skip
        labels, _ = ndi.label(codes > 0, structure=np.ones((3, 3), bool))
        seeded = np.unique(labels[codes == 2])
        want = np.isin(labels, seeded[seeded > 0])
        np.testing.assert_array_equal(K.flood_seeded(codes.copy()).view(bool), want)
        for radius in (0.0, 1.5, 3.0):
            into = rng.random(codes.shape) < 0.01
            dilated = ndi.binary_dilation(want, H.disk_footprint(radius)) | into
            K.flood_seeded_into(codes.copy(), H._disk_offsets(radius), into)
            np.testing.assert_array_equal(into, dilated)


def test_flood_fill_grows_its_stack_for_a_large_region():
    # one seed in a region of ~150 000 pixels, whose flood holds ~89 000 pixels on its
    # stack at once (it starts at 65 536 entries, and the flood pops and pushes in a
    # loop that hands it back to be grown), with holes and a radius-3 disk that
    # reaches past the edges
    from skymap.masking import _hysteresis_kernels as K

    codes = np.ones((520, 400), np.uint8)
    codes[::7, 3::11] = 0
    codes[:, 300] = 0  # a wall: the right part holds no seed
    codes[260, 40] = 2
    want = np.zeros(codes.shape, bool)
    want[:, :300] = codes[:, :300] > 0
    got = K.flood_seeded(codes.copy()).view(bool)
    np.testing.assert_array_equal(got, want)
    into = np.zeros(codes.shape, bool)
    K.flood_seeded_into(codes.copy(), H._disk_offsets(3.0), into)
    np.testing.assert_array_equal(into, ndi.binary_dilation(want, H.disk_footprint(3.0)))


def test_sampled_detection_equals_the_maps_path(rng):
    # _detect_sampled (sampled noise excess, fused codes, the flood painting the
    # dilation in place) against scale_maps + snr_factor + scale_mask, unbinned and
    # binned, with the noise factor above 1 (correlated noise) and not
    masker = H.HysteresisMasker(grow_plain=True)
    white = rng.normal(size=(160, 150)).astype(np.float32)
    for res in (white, ndi.uniform_filter(white, 3) * 3):
        res = res.copy()
        res[40:52, 30:45] += 8.0
        excluded = np.zeros(res.shape, bool)
        excluded[100:110, 20:60] = True
        for s in (1.0, 2.0):
            maps = masker.scale_maps(res, np.float32(1.0), excluded, s)
            factor = masker.snr_factor(maps.snr, maps.invalid, s, maps.block)
            want = masker.scale_mask(maps, factor, s, excluded, into=excluded.copy())
            inputs = masker._dog_inputs(res, np.float32(1.0), excluded, s)
            got = masker._detect_sampled(inputs, s, excluded, into=excluded.copy())
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("sampled", [False, True])
def test_binned_scales_chained_equal_each_scale_from_the_image(rng, monkeypatch, sampled):
    # _SumsChain: a binned scale's sums from the previous binned scale's with its
    # detected blocks zeroed, and the detections OR-ed in once at the end, against
    # each scale summing the image with the earlier scales' detections excluded; odd
    # shapes (partial blocks), a repeated binning, an unbinned scale after binned ones;
    # the maps path and the sampled one (which large maps take)
    monkeypatch.setattr(H, "_samples_pay", lambda shape, b: sampled)
    res = rng.normal(size=(203, 181)).astype(np.float32)
    yy, xx = np.mgrid[:203, :181]
    for y, x, r in ((50, 60, 6.0), (150, 120, 12.0), (100, 30, 3.0)):
        res += 6.0 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * r * r))
    given = np.zeros(res.shape, bool)
    given[120:140, :30] = True
    for scales in ((2.0, 4.0), (1.0, 2.0, 4.0, 8.0, 16.0), (2.0, 3.0, 8.0, 1.0)):
        masker = H.HysteresisMasker(scales=scales, grow_plain=True)
        got = masker.mask_with(res, np.float32(1.0), given)
        want = given.copy()
        for s in scales:
            masker._detect(res, np.float32(1.0), want, s, into=want)
        np.testing.assert_array_equal(got, want)
        assert got.sum() > given.sum() + 200


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_nonfinite_map_is_numpys(rng, dtype):
    # _k.nonfinite_or against numpy: the map and the non-finite pixels outside `given`
    from skymap.masking import _hysteresis_kernels as K

    values = rng.normal(size=(37, 45)).astype(dtype)
    values.flat[rng.integers(values.size, size=40)] = rng.choice([np.nan, np.inf, -np.inf], 40)
    values[0, :3] = [np.finfo(dtype).max, -np.finfo(dtype).max, np.finfo(dtype).tiny]
    bad = ~np.isfinite(values)
    for given in (None, rng.random(values.shape) < 0.3):
        got = np.empty(values.shape, bool)
        outside = K.nonfinite_or(values, given, got)
        want = bad if given is None else bad | given
        np.testing.assert_array_equal(got, want)
        assert outside == int((bad if given is None else bad & ~given).sum())


def test_the_nonfinite_map_and_the_first_pair_sums_in_one_pass(rng):
    # _k.nonfinite_or_sums against nonfinite_or then masked_block_sums of blocks of 2:
    # odd shapes, non-finite pixels inside and outside the given mask, no mask
    from skymap.masking import _hysteresis_kernels as K

    for shape in ((1, 1), (7, 5), (36, 41), (203, 181)):
        values = rng.normal(size=shape).astype(np.float32)
        values.flat[rng.integers(values.size, size=4)] = [np.nan, np.inf, -np.inf, np.nan]
        for given in (None, rng.random(shape) < 0.3):
            want = np.empty(shape, bool)
            outside = K.nonfinite_or(values, given, want)
            half = (-(-shape[0] // 2), -(-shape[1] // 2))
            got, num, cnt = (
                np.empty(shape, bool),
                np.empty(half, np.float32),
                np.empty(half, np.float32),
            )
            assert K.nonfinite_or_sums(values, given, got, num, cnt) == outside
            np.testing.assert_array_equal(got, want)
            for a, b in zip((num, cnt), H.masked_block_sums(values, want, 2), strict=True):
                np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("surround", [4.0, 0.0])
def test_masks_from_the_first_pass_sums_equal_those_from_the_image(rng, monkeypatch, surround):
    # the first scale's sums (binned, or an unbinned scale's surround) made with the
    # non-finite map, against summing the image after it (_first_sums_block 1)
    res = rng.normal(size=(203, 181)).astype(np.float32)
    res[50:56, 60:70] += 8.0
    res[150:170, 100:130] += 3.0
    res[5, 5] = res[100, 100] = np.nan
    given = np.zeros(res.shape, bool)
    given[:10] = True
    for scales in ((1.0, 2.0, 4.0, 8.0), (2.0, 4.0), (4.0, 8.0), (1.0,), (3.0, 1.0)):
        masker = H.HysteresisMasker(scales=scales, surround=surround)
        got = masker.mask_with(res, np.float32(1.0), given)
        with monkeypatch.context() as m:
            m.setattr(H.HysteresisMasker, "_first_sums_block", lambda self, shape: 1)
            want = masker.mask_with(res, np.float32(1.0), given)
        np.testing.assert_array_equal(got, want)
        assert got.sum() > given.sum() + 30


def test_expand_mask_into_ors_the_small_map_repeated(rng):
    # blocks of 2 and 4 (16- and 32-bit products), others byte by byte; odd shapes,
    # a strided small map (a tile's part of the grid)
    from skymap.masking import _hysteresis_kernels as K

    for b in (1, 2, 3, 4, 5, 8):
        for shape in ((7, 9), (33, 31), (64, 64)):
            gy, gx = -(-shape[0] // b), -(-shape[1] // b)
            small = (rng.random((gy + 2, gx + 3)) < 0.2)[1:-1, 2:-1]
            out = rng.random(shape) < 0.1
            big = np.repeat(np.repeat(small, b, axis=0), b, axis=1)[: shape[0], : shape[1]]
            want = out | big
            np.testing.assert_array_equal(K.expand_mask_into(small, b, out), want)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_surround_filters_y_pass_adds_its_rows_in_order(rng, threads):
    # gaussian_separable: the x pass each pixel's padded row times the taps summed
    # from 0 in their order (correlate1d, mode constant) in float32; each output row
    # the kernel's x-passed rows summed from 0 in the order of the taps (four rows a
    # pass, from a ring per band of rows); into a new array or in place, in one band
    # or two (the rows near the band edge made before either band writes)
    import numba

    from skymap.masking import _hysteresis_kernels as K

    cases = (
        ((40, 33), 2.0),
        ((9, 17), 1.0),
        ((5, 3), 3.0),
        ((130, 21), 4.0),
        ((70, 8), 1.0),
        ((70, 9), 12.0),
    )
    previous = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        for size, sigma in cases:
            a = rng.normal(size=size).astype(np.float32)
            k = H._gaussian_kernel(sigma)
            r = k.size // 2
            pad = np.pad(a, ((0, 0), (r, r)))
            xpass = np.zeros_like(a)
            for j in range(k.size):
                xpass = xpass + k[j] * pad[:, j : j + size[1]]
            want = np.empty_like(a)
            for y in range(size[0]):
                acc = np.zeros(size[1], np.float32)
                for i in range(max(0, y - r), min(size[0] - 1, y + r) + 1):
                    acc = acc + k[i - y + r] * xpass[i]
                want[y] = acc
            np.testing.assert_array_equal(K.gaussian_separable(a, k, np.empty_like(a)), want)
            np.testing.assert_array_equal(K.gaussian_separable(a, k, a), want)
    finally:
        numba.set_num_threads(previous)


def test_masked_block_sums_of_powers_of_two_are_halved_pair_sums(rng):
    values = rng.normal(size=(37, 45)).astype(np.float32)
    excluded = rng.random(values.shape) < 0.2
    for b in (4, 8, 16):
        num, cnt = H.masked_block_sums(values, excluded, b)
        v = np.where(excluded, 0.0, values).astype(np.float64)
        ny, nx = -(-37 // b), -(-45 // b)
        pad = np.zeros((ny * b, nx * b))
        pad[:37, :45] = v
        np.testing.assert_allclose(num, pad.reshape(ny, b, nx, b).sum(axis=(1, 3)), atol=1e-4)
        pad[:37, :45] = ~excluded
        np.testing.assert_array_equal(cnt, pad.reshape(ny, b, nx, b).sum(axis=(1, 3)))
        two = H.masked_block_sums(values, excluded, 2)
        for got, want in zip((num, cnt), H.halved_sums(*two, b // 2), strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "b, plain, width", [(1, True, 1.5), (1, False, 1.0), (2, True, 1.5), (2, False, 1.0)]
)
def test_sampled_rows_and_columns_and_fused_codes_equal_the_full_maps(rng, b, plain, width):
    # _detect_sampled's pieces against scale_maps, bit for bit: the snr of the
    # sampled rows and columns (windows stacked, image edges included), and the codes
    # of the fused pass against thresholding the maps after the noise division
    masker = H.HysteresisMasker(grow_plain=plain)
    res = rng.normal(size=(203, 190)).astype(np.float32)
    res[50:60, 70:90] += 6.0
    excluded = np.zeros(res.shape, bool)
    excluded[120:140, :30] = True
    excluded[46, 92:] = True  # on a sampled row and column
    res[excluded] = np.nan  # never read
    noise = H.CoarseRMS(
        values=rng.uniform(0.8, 1.2, size=(13, 12)).astype(np.float32), step=16, shape=res.shape
    )
    s = width * b  # 11 taps (the general loops) or 7 (the unrolled ones)
    maps = masker.scale_maps(res, noise, excluded, s)
    inputs = masker._dog_inputs(res, noise, excluded, s)
    assert inputs[-1] == b
    step = 23
    ny, nx = inputs[0].shape
    rows, cols = H._sampled_snr(inputs, np.arange(0, ny, step), np.arange(0, nx, step))
    np.testing.assert_array_equal(rows, maps.snr[::step])
    np.testing.assert_array_equal(cols, maps.snr[:, ::step])
    factor = 1.37
    codes = H._dog_codes(inputs, factor, masker)
    snr = maps.snr / np.float32(factor)
    grow = (maps.plain if plain else maps.snr) / np.float32(factor)
    seed, grown = snr > np.float32(masker.high), grow > np.float32(masker.low)
    want = np.where(seed, 2, np.where(grown, 1, 0))
    np.testing.assert_array_equal(codes, want)


@pytest.mark.parametrize("sigma", [1.0, 1.5])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("strip", [64, 8])
def test_the_fused_pass_sums_the_taps_in_order_in_float32(rng, sigma, sparse, strip):
    # bit for bit against the float32 sums in tap order (x pass, then y pass) that the
    # tiled path's bit-identity rests on, for the unrolled 7-tap kernel (sigma 1) and
    # the general loop (sigma 1.5); excluded pixels everywhere, or a few (rows with
    # excluded pixels whose other columns take a clean row's weights, which are not
    # written to the strip's buffers: short strips reuse them, with the last strip's
    # values left in the columns not written)
    from skymap.masking import _hysteresis_kernels as K

    res = rng.normal(size=(90, 70)).astype(np.float32)
    if sparse:
        exc = np.zeros(res.shape, bool)
        exc[10:13, 20:22] = exc[30, 5] = exc[31:60, 60:] = exc[80:, :3] = True
    else:
        exc = rng.random(res.shape) < 0.05
        exc[40:45] = False  # some clean rows
    g = H._gaussian_kernel(sigma)
    r = g.size // 2
    m = np.float32(0.3)  # the surround mean
    snr, grow = np.empty(res.shape, np.float32), np.empty(res.shape, np.float32)
    K.dog_snr(
        res, res, exc, g, g * g, np.full((1, 1), m), 90, np.ones((1, 1), np.float32),
        1, 1, snr, grow, H._dog_work(res.shape, r, strip),
    )  # fmt: skip

    def taps(a, k, axis):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        a = np.pad(a, pad)
        out = np.zeros(res.shape, np.float32)
        for j in range(k.size):
            out += k[j] * (a[:, j : j + res.shape[1]] if axis else a[j : j + res.shape[0]])
        return out

    an = taps(taps(np.where(exc, 0, res).astype(np.float32), g, 1), g, 0)
    ac = taps(taps(np.where(exc, 0, 1).astype(np.float32), g, 1), g, 0)
    av = taps(taps(np.where(exc, 0, 1).astype(np.float32), g * g, 1), g * g, 0)
    with np.errstate(divide="ignore"):  # windows wholly excluded: 0
        inv = np.where(av > 0, 1.0 / np.sqrt(av).astype(np.float64), 0.0).astype(np.float32)
    np.testing.assert_array_equal(grow, an * inv)
    np.testing.assert_array_equal(snr, (an - ac * m) * inv)


@pytest.mark.parametrize("nan_outside", [False, True])
def test_mask_with_is_the_given_mask_or_the_detections(rng, nan_outside):
    # the in-memory back end's union, with the residual's non-finite pixels all in the
    # given mask (the pipeline's case: no pass takes them out) or some outside it
    masker = H.HysteresisMasker()
    res = rng.normal(size=(120, 110)).astype(np.float32)
    res[40:48, 50:60] += 9.0
    given = np.zeros(res.shape, bool)
    given[:10] = given[60:70, 20:30] = True
    res[5, 5] = res[65, 25] = np.nan
    if nan_outside:
        res[44, 55] = res[100, 100] = np.inf
    got = masker.mask_with(res, np.float32(1.0), given)
    want = given | masker(res, np.float32(1.0), given)
    np.testing.assert_array_equal(got, want)
    assert got[42, 52] and not (nan_outside and got[100, 100])
    assert np.array_equal(masker.mask_with(res, 1.0, None), masker(res, 1.0, None))


@pytest.mark.parametrize("n", [1, 2, 65, 200, 4097])
def test_median_mad32_is_numpys_bit_for_bit(n):
    from skymap._select_kernels import median_mad32

    rng = np.random.default_rng(n)
    cases = (
        rng.normal(size=n),
        rng.integers(-3, 4, size=n),  # ties at the middle ranks
        rng.standard_cauchy(size=n) * 1e3,  # a wide range: several histogram levels
        np.full(n, 2.5),
    )
    for d in (np.asarray(c, np.float32) for c in cases):
        med = np.median(d)
        got = median_mad32(d)
        assert got[0] == med
        assert np.float32(got[1]).tobytes() == np.median(np.abs(d - med)).tobytes()


def test_zero_where_is_numpys_masked_assignment(rng):
    # the chain zeroes a scale's sums under its detections in bands of rows
    from skymap.masking import _hysteresis_kernels as K

    for dtype in (np.float32, np.float64):
        num = rng.normal(size=(301, 77)).astype(dtype)
        cnt = rng.integers(0, 5, size=(301, 77)).astype(dtype)
        det = rng.random((301, 77)) < 0.3
        want_num, want_cnt = num.copy(), cnt.copy()
        want_num[det] = 0
        want_cnt[det] = 0
        K.zero_where(num, cnt, det)
        assert num.tobytes() == want_num.tobytes() and cnt.tobytes() == want_cnt.tobytes()


def test_divide_finite_is_numpys_division_with_non_finite_quotients_zeroed(rng):
    # the surround mean's division (_dog_inputs) bit for bit: zeros, infinities and NaN
    # in either map, signed zeros kept
    from skymap.masking import _hysteresis_kernels as K

    for shape in [(203, 190), (1, 1), (3, 70)]:
        num = rng.normal(size=shape).astype(np.float32)
        den = rng.uniform(-1, 1, size=shape).astype(np.float32)
        num.flat[::10] = 0.0
        num.flat[1::10] = -0.0
        den.flat[::7] = 0.0
        num.flat[3::11] = np.inf
        den.flat[5::13] = np.nan
        with np.errstate(all="ignore"):
            want = num / den
        want[~np.isfinite(want)] = 0
        got = num.copy()
        K.divide_finite(got, den)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("b", [1, 2, 3, 4, 8])
def test_expand_mask_into_a_new_block_is_the_source_or_the_expanded_detections(b):
    """``expand_mask_into(small, b, out, src=excl)`` writes ``excl | small`` expanded
    b x b (cut at the far edges) into ``out`` in one pass, leaving ``excl`` as it was;
    without ``src`` it ORs into ``out`` in place, as before. Strided ``small`` (the
    core of a dilated window) and a block whose size is no multiple of ``b``."""
    from skymap.masking import _hysteresis_kernels as K

    rng = np.random.default_rng(b)
    shape = (4 * b + 3, 5 * b + 1)
    gy, gx = -(-shape[0] // b), -(-shape[1] // b)
    window = rng.random((gy + 4, gx + 6)) < 0.3
    small = window[2 : 2 + gy, 3 : 3 + gx]  # a view, as _tile_dilate passes it
    excl = rng.random(shape) < 0.2
    expected = excl | np.repeat(np.repeat(small, b, 0), b, 1)[: shape[0], : shape[1]]
    before = excl.copy()
    out = np.empty(shape, bool)
    assert K.expand_mask_into(small, b, out, src=excl) is out
    assert np.array_equal(out, expected) and np.array_equal(excl, before)
    inplace = excl.copy()
    K.expand_mask_into(np.ascontiguousarray(small), b, inplace)
    assert np.array_equal(inplace, expected)
