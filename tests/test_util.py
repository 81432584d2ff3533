"""The shared helpers of skymap._util: running a kernel over bands of rows."""

import threading

import numba
import numpy as np
import pytest

from skymap._util import in_bands


@pytest.mark.parametrize("n", [0, 1, 31, 64, 1000])
@pytest.mark.parametrize("grain", [1, 32])
def test_bands_tile_the_range_once_each(n, grain):
    seen = []

    def kernel(tag, lo, hi):
        assert tag == "x"
        seen.append((lo, hi, threading.get_ident()))

    in_bands(kernel, n, "x", grain=grain)
    seen = [s for s in seen if s[0] < s[1]]  # an empty band first compiles a kernel
    covered = sorted(i for lo, hi, _ in seen for i in range(lo, hi))
    assert covered == list(range(n))
    # one band per thread, none thinner than the grain (unless there is only one)
    assert len(seen) <= max(1, numba.get_num_threads())
    assert len(seen) == 1 or all(hi - lo >= grain for lo, hi, _ in seen)


def test_bands_follow_numbas_thread_count():
    seen = []
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        in_bands(lambda lo, hi: seen.append((lo, hi)), 1000, grain=1)
    finally:
        numba.set_num_threads(before)
    assert [s for s in seen if s[0] < s[1]] == [(0, 1000)]


@pytest.mark.parametrize("bad", [0, 999])
def test_an_error_in_any_band_is_raised(bad):
    def kernel(lo, hi):
        if lo <= bad < hi:
            raise ZeroDivisionError(f"band of {bad}")

    with pytest.raises(ZeroDivisionError, match=f"band of {bad}"):
        in_bands(kernel, 1000, grain=1)


def test_a_kernel_is_compiled_in_the_calling_thread_first():
    # so that no helper thread waits on numba's compiler locks, which a Ctrl-C in
    # the middle of a compilation can leave held (a hang seen in `skymap run`)
    calls = []
    main = threading.get_ident()
    in_bands(lambda lo, hi: calls.append((lo, hi, threading.get_ident())), 1000, grain=1)
    assert calls[0] == (0, 0, main)


def test_a_compiled_kernel_fills_every_row():
    @numba.njit(nogil=True)
    def square_rows(a, out, lo, hi):
        for y in range(lo, hi):
            for x in range(a.shape[1]):
                out[y, x] = a[y, x] * a[y, x]

    a = np.arange(300.0 * 7).reshape(300, 7)
    out = np.full_like(a, np.nan)
    in_bands(square_rows, a.shape[0], a, out)
    np.testing.assert_array_equal(out, a * a)
