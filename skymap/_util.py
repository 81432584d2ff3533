"""Helpers shared across skymap's subpackages: constants and small checks.

Private to the package (every name here is public inside skymap, no module imports
another module's underscore names instead).
"""

from __future__ import annotations

import math
import os
import queue
import threading
from typing import Any

__all__ = [
    "MAD_TO_STD",
    "check_int",
    "concurrently",
    "cut_window",
    "in_bands",
    "nanmedian_rows",
    "pow2_at_most",
]

#: 1 / Phi^-1(3/4): median absolute deviation -> standard deviation of a Gaussian (the
#: constant astropy uses). The one definition in the package.
MAD_TO_STD = 1.482602218505602


def check_int(name: str, value: Any, *, minimum: int = 1, allow_none: bool = False):
    """``value`` if it is an integer (any integral number) >= ``minimum``, else a
    ValueError naming ``name``.

    Examples
    --------
    >>> check_int("max_iter", 3)
    3
    >>> check_int("max_iter", 0)
    Traceback (most recent call last):
    ...
    ValueError: max_iter must be an integer >= 1, got 0
    """
    if value is None and allow_none:
        return value
    try:
        ok = int(value) == value and value >= minimum
    except (TypeError, ValueError):
        ok = False
    if not ok:
        what = f"None or an integer >= {minimum}" if allow_none else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def pow2_at_most(value: float, *limits: int) -> int:
    """Largest power of two <= ``value`` (at least 1, at most ``min(limits)``).

    Examples
    --------
    >>> pow2_at_most(7.9), pow2_at_most(0.3), pow2_at_most(64, 20)
    (4, 1, 20)
    """
    b = 1 << max(0, int(math.floor(math.log2(max(value, 1.0)))))
    return max(1, min((b, *limits)))


def nanmedian_rows(a, overwrite: bool = False):
    """``np.nanmedian(a, axis=1)`` of a 2-D array, NaN for an all-NaN row, without its
    warning: the float rows without a NaN by exact selection
    (:func:`skymap._select_kernels.median_rows`: numpy's values bit for bit), the
    others by ``np.nanmedian`` (which takes long rows one by one in Python).
    ``overwrite``: ``a`` may be reordered.

    Examples
    --------
    >>> import numpy as np
    >>> nanmedian_rows(np.array([[1.0, 3.0, 2.0], [np.nan, 4.0, 5.0], [np.nan] * 3]))
    array([2. , 4.5, nan])
    """
    import numpy as np

    out = np.empty(a.shape[0], a.dtype)
    if a.dtype in (np.float32, np.float64) and a.shape[1] > 0:
        # The rows without a NaN by exact selection: numpy's medians bit for bit, in
        # a third of the time of its partition.
        from skymap._select_kernels import median_rows

        full = median_rows(a, out)
    else:
        full = ~np.isnan(a).any(axis=1)
        if full.all():
            return np.median(a, axis=1, overwrite_input=overwrite).astype(a.dtype, copy=False)
        out[full] = np.median(a[full], axis=1, overwrite_input=True)
    if not full.all():
        # All-NaN rows are NaN here, not numpy's (warned) NaN: no warnings filter is
        # touched, which is not safe while another thread runs (a fit runs some of
        # its steps side by side: skymap._util.concurrently).
        rows = a[~full]
        some = ~np.isnan(rows).all(axis=1)
        part = np.full(rows.shape[0], np.nan, a.dtype)
        if some.any():
            with np.errstate(all="ignore"):
                part[some] = np.nanmedian(rows[some], axis=1)
        out[~full] = part
    return out


def cut_window(a, step: int = 1, window=None):
    """``a[y0:y1:step, x0:x1:step]`` for ``window`` = ((y0, y1), (x0, x1)) (None: the
    whole array): the part of a full map that a window of it at ``step`` holds.

    Examples
    --------
    >>> import numpy as np
    >>> cut_window(np.arange(12).reshape(3, 4), 2, ((1, 3), (0, 4)))
    array([[4, 6]])
    """
    if window is not None:
        (y0, y1), (x0, x1) = window
        a = a[y0:y1, x0:x1]
    return a[::step, ::step] if step > 1 else a


class _Task:
    """A call handed to the band pool; taken once, by a pool thread or by the caller
    (:meth:`cancel`), never both."""

    __slots__ = ("args", "done", "error", "fn", "result_", "state")

    def __init__(self, fn, args):
        self.fn, self.args, self.state = fn, args, 0  # 0 waiting, 1 taken
        self.result_ = self.error = None
        self.done = threading.Event()

    def take(self) -> bool:
        with _TAKE:
            if self.state:
                return False
            self.state = 1
            return True

    def run(self) -> None:
        try:
            self.result_ = self.fn(*self.args)
        except BaseException as err:  # handed to the caller
            self.error = err
        finally:
            self.fn = self.args = None
            self.done.set()

    def cancel(self) -> bool:
        """True if no pool thread had taken the call (the caller runs it)."""
        return self.take()

    def result(self):
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result_


class _BandPool:
    """Daemon threads kept for :func:`in_bands` and :func:`concurrently`, started as
    calls need them, up to one per core. Starting a thread for every call cost ~0.2 ms
    (~0.03 s of a 4096^2 fit). Daemon threads, so that nothing they wait on (numba's
    compiler lock left held by a Ctrl-C, say) can hold up the interpreter's exit."""

    def __init__(self):
        self.queue = queue.SimpleQueue()
        self.threads = 0
        self.limit = os.cpu_count() or 2

    def submit(self, fn, *args) -> _Task:
        task = _Task(fn, args)
        self.queue.put(task)
        with _TAKE:
            start = self.threads < self.limit
            self.threads += start
        if start:
            threading.Thread(target=self._work, daemon=True, name="skymap-band").start()
        return task

    def _work(self) -> None:
        while True:
            task = self.queue.get()
            if task.take():
                task.run()


_TAKE = threading.Lock()
_POOL: _BandPool | None = None


def _band_pool() -> _BandPool:
    global _POOL
    if _POOL is None:
        _POOL = _BandPool()
    return _POOL


def _forget_pool() -> None:
    # A forked child has none of its parent's threads: it starts a pool of its own.
    global _POOL, _TAKE
    _POOL, _TAKE = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def in_bands(kernel, n: int, *args, grain: int = 32) -> None:
    """Run ``kernel(*args, lo, hi)`` over bands ``[lo, hi)`` that tile ``range(n)``,
    one band per numba thread (``numba.get_num_threads()``, so ``set_num_threads`` and
    ``NUMBA_NUM_THREADS`` apply), the bands on the threads of a pool kept for the
    purpose and the last on the calling thread; fewer bands when a band would have
    under ``grain`` items.

    For kernels compiled with ``nogil=True`` whose bands are independent, so the result
    does not depend on the number of bands. Why not numba's ``parallel=True``: each
    such kernel costs ~1 s more CPU to compile than the plain one (its parallel loops
    become separately compiled functions), which a user pays on the first run.
    A band no pool thread has started when the caller's own is done (the pool busy
    with other callers' bands, or a band calling this) runs on the calling thread.

    Examples
    --------
    >>> import numpy as np
    >>> out = np.zeros(100)
    >>> def fill(a, lo, hi):
    ...     a[lo:hi] = np.arange(lo, hi)
    >>> in_bands(fill, 100, out)
    >>> bool(np.array_equal(out, np.arange(100)))
    True
    """
    import numba

    bands = max(1, min(numba.get_num_threads(), n // max(1, grain)))
    if bands == 1:
        kernel(*args, 0, n)
        return
    # An empty band first: numba compiles (or loads) the kernel here, in the calling
    # thread, and no pool thread ever waits on numba's compiler locks (which a
    # Ctrl-C in the middle of a compilation can leave held).
    kernel(*args, 0, 0)
    edges = [n * i // bands for i in range(bands + 1)]
    pool = _band_pool()
    helpers = [pool.submit(kernel, *args, edges[i], edges[i + 1]) for i in range(bands - 1)]
    try:
        kernel(*args, edges[-2], edges[-1])
    except BaseException as err:
        # No band outlives a failed call: those not started are dropped, the others
        # waited for (not on a Ctrl-C, which leaves at once).
        for future in helpers:
            if not future.cancel() and isinstance(err, Exception):
                future.done.wait()
        raise
    # Bands no pool thread has started yet (cancel succeeds only for those) run here.
    errors = []
    for i, future in enumerate(helpers):
        try:
            if future.cancel():
                kernel(*args, edges[i], edges[i + 1])
            else:
                future.result()
        except Exception as err:
            errors.append(err)
    if errors:
        raise errors[0]


def concurrently(first, second):
    """``(first(), second())``, ``first`` on a thread of :func:`in_bands`' pool while
    ``second`` runs on the calling thread, when numba has more than one thread
    (``numba.get_num_threads()``); one after the other otherwise, or when no pool
    thread has taken ``first`` by the time ``second`` is done. For two independent
    steps that each run mostly outside the GIL (numba kernels, large numpy calls);
    neither may change what the other reads. If ``second`` fails, ``first`` is dropped
    when no thread has taken it (else waited for) and ``second``'s error is raised;
    otherwise ``first``'s error, if any.

    Examples
    --------
    >>> concurrently(lambda: 1 + 1, lambda: "b")
    (2, 'b')
    """
    import numba

    if numba.get_num_threads() < 2:
        return first(), second()
    future = _band_pool().submit(first)
    try:
        other = second()
    except BaseException as err:
        if not future.cancel() and isinstance(err, Exception):
            future.done.wait()
        raise
    return (first() if future.cancel() else future.result()), other
