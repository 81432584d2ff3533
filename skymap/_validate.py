"""Input validation shared by every module.

Errors name the offending parameter and the accepted values, so that a user reading the
message knows what to change. Nothing here mutates its input.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = [
    "as_image",
    "as_mask",
    "as_pair",
    "check_choice",
    "check_positive",
    "check_range",
    "combine_masks",
    "json_float",
    "work_dtype",
]


def as_image(image: Any, name: str = "image", *, ndim: int = 2) -> np.ndarray:
    """Return ``image`` as a floating-point ndarray of ``ndim`` dimensions, never a view
    that aliases writable caller memory in a way we might modify.

    Integer and boolean input becomes float32; float16 becomes float32; big-endian data
    is converted to native byte order. Float32/float64 input keeps its dtype. The returned
    array may share memory with the input: callers must not write into it.

    Examples
    --------
    >>> as_image(np.ones((2, 3), dtype=">i2")).dtype
    dtype('float32')
    """
    if isinstance(image, np.ma.MaskedArray):
        raise TypeError(
            f"{name} must be a plain ndarray; pass a MaskedArray's mask through `mask=`"
        )
    arr = np.asarray(image)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers (int or float), got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    dtype = work_dtype(arr.dtype)
    return arr if arr.dtype == dtype else arr.astype(dtype)


def work_dtype(dtype: Any) -> np.dtype:
    """The dtype skymap computes in for input of ``dtype``, without touching any data.

    Integer, boolean and half-precision input becomes float32; float32/float64 keep
    their precision in native byte order; long double becomes float64.

    Examples
    --------
    >>> work_dtype(">i2"), work_dtype(">f8")
    (dtype('float32'), dtype('float64'))
    """
    dtype = np.dtype(dtype)
    if dtype.kind in "biu" or dtype.itemsize < 4:
        return np.dtype(np.float32)
    if dtype.itemsize > 8:
        # long double: the compiled kernels work in float64 at most
        return np.dtype(np.float64)
    return dtype.newbyteorder("=")


def as_mask(mask: Any, shape: tuple[int, ...], name: str = "mask") -> np.ndarray | None:
    """Return ``mask`` as a boolean array of ``shape`` (True = excluded), or None."""
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise ValueError(f"{name} must have the image's shape {tuple(shape)}, got {m.shape}")
    if m.dtype != bool:
        if m.dtype.kind not in "biu":
            raise TypeError(
                f"{name} must be boolean or integer (nonzero = excluded), got {m.dtype}"
            )
        m = m != 0
    return m


def _plain_mask(m, shape) -> bool:
    return (
        isinstance(m, np.ndarray) and m.dtype == bool and m.shape == shape and m.flags.c_contiguous
    )


def combine_masks(image: np.ndarray, *masks: np.ndarray | None) -> np.ndarray:
    """OR the given masks with the non-finite pixels of ``image`` (a new array)."""
    given = [m for m in masks if m is not None]
    if (
        isinstance(image, np.ndarray)
        and not isinstance(image, np.ma.MaskedArray)
        and image.ndim == 2
        and image.dtype in (np.float32, np.float64)
        and image.size >= 1 << 18
        and all(_plain_mask(m, image.shape) for m in given)
    ):
        # Large images: one compiled pass in bands of rows (numba's threads).
        from skymap._inputs_kernels import nonfinite_or

        out = np.empty(image.shape, bool)
        nonfinite_or(image, given[0] if given else None, out)
        for m in given[1:]:
            out |= m
        return out
    out = np.isfinite(image)
    np.logical_not(out, out=out)  # in place: no second full-size temporary
    for m in masks:
        if m is not None:
            out |= m
    return out


def as_pair(name: str, value: Any, *, lower: int = 1) -> tuple[int, int]:
    """Return ``value`` (an int or a pair of ints) as a ``(ny, nx)`` tuple of ints >= lower.

    Examples
    --------
    >>> as_pair("box_size", 64)
    (64, 64)
    >>> as_pair("box_size", (32, 48))
    (32, 48)
    """
    arr = np.atleast_1d(np.asarray(value))
    if arr.ndim != 1 or arr.size not in (1, 2):
        raise ValueError(f"{name} must be an int or a pair of ints (ny, nx), got {value!r}")
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(int)
        else:
            raise ValueError(f"{name} must be an int or a pair of ints (ny, nx), got {value!r}")
    if np.any(arr < lower):
        raise ValueError(f"{name} must be >= {lower}, got {value!r}")
    if arr.size == 1:
        return int(arr[0]), int(arr[0])
    return int(arr[0]), int(arr[1])


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Raise ValueError naming ``name`` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}")
    return value


def check_positive(name: str, value: Any, *, allow_zero: bool = False, allow_none: bool = False):
    """Raise ValueError naming ``name`` unless ``value`` is a finite number > 0 (or >= 0)."""
    if value is None and allow_none:
        return value
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    ok = np.isfinite(v) and (v >= 0 if allow_zero else v > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return value


def check_bool(name: str, value: Any):
    """Raise ValueError naming ``name`` unless ``value`` is True or False (a truthy
    string or number would otherwise pass silently as a switch).

    Examples
    --------
    >>> check_bool("halos", True)
    True
    """
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_range(name: str, value: Any, lo: float, hi: float):
    """Raise ValueError naming ``name`` unless ``lo <= value <= hi``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}") from None
    if not (lo <= v <= hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")
    return value


def json_float(value: Any) -> float | None:
    """A float for JSON: NaN and inf become None."""
    value = float(value)
    return value if np.isfinite(value) else None
