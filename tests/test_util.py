"""The shared helpers of skymap._util: running a kernel over bands of rows."""

import threading
import time

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


def _two_threads():
    before = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    return before


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs two numba threads")
def test_helper_bands_run_on_kept_threads():
    # the pool's threads are reused from call to call, not started anew each time
    before = _two_threads()
    try:
        idents = set()

        def band(lo, hi):
            idents.add(threading.get_ident())
            time.sleep(0.002)  # long enough for a pool thread to take its band

        for _ in range(50):
            in_bands(band, 1000, grain=1)
    finally:
        numba.set_num_threads(before)
    assert threading.get_ident() in idents
    assert len(idents) <= 1 + (__import__("os").cpu_count() or 2)
    # daemon threads: nothing a band waits on can hold up the interpreter's exit
    pool = [t for t in threading.enumerate() if t.ident in idents - {threading.get_ident()}]
    assert pool and all(t.daemon for t in pool)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs two numba threads")
def test_bands_that_call_in_bands_and_concurrent_callers_finish():
    # A band running in_bands itself, from many threads at once, with more bands than
    # the pool has threads: bands no pool thread takes run on their caller, so nothing
    # waits on a busy pool forever, and every row is filled exactly once.
    before = _two_threads()
    out = np.zeros((3, 8, 400), np.int64)  # one plane per caller

    def inner(k, row, lo, hi):
        out[k, row, lo:hi] += 1

    def outer(k, lo, hi):
        for row in range(lo, hi):
            in_bands(inner, out.shape[2], k, row, grain=1)

    try:
        threads = [threading.Thread(target=in_bands, args=(outer, 8, k), kwargs={"grain": 1})
                   for k in range(3)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(out, 1)


@pytest.mark.parametrize("threads", [1, 2])
def test_concurrently_returns_both_and_raises_either(threads):
    from skymap._util import concurrently

    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        where = []
        got = concurrently(lambda: where.append(threading.get_ident()) or "a",
                           lambda: where.append(threading.get_ident()) or "b")  # fmt: skip
        assert got == ("a", "b") and len(where) == 2
        if numba.get_num_threads() == 1:
            assert set(where) == {threading.get_ident()}  # one thread: in order, here

        def boom():
            raise KeyError("first")

        with pytest.raises(KeyError, match="first"):
            concurrently(boom, lambda: 1)
        with pytest.raises(ValueError, match="second"):
            concurrently(lambda: 1, lambda: (_ for _ in ()).throw(ValueError("second")))
    finally:
        numba.set_num_threads(before)
