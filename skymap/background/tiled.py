"""Deprecated: :func:`tiled_fit`, the 0.1 entry point of a tiled pipeline fit.

:func:`skymap.fit` and :meth:`IterativeBackground.fit
<skymap.background.pipeline.IterativeBackground.fit>` take a dask array or a memory map
themselves and run the one pipeline loop through the dask back end
(:mod:`skymap.backends.dask`); ``tile=`` and ``client=`` choose the tiles and the
cluster.
"""

from __future__ import annotations

import warnings
from typing import Any

from skymap.background.defaults import check_options, default_pipeline
from skymap.background.pipeline import BackgroundResult, IterationRecord, IterativeBackground

__all__ = ["TiledFitResult", "TiledIteration", "tiled_fit"]

#: 0.1 names of a tiled fit's result and records: the pipeline's own.
TiledFitResult = BackgroundResult
TiledIteration = IterationRecord


def tiled_fit(
    image: Any,
    mask: Any = None,
    *,
    pipeline: IterativeBackground | None = None,
    tile: int | tuple[int, int] = 1024,
    client: Any = None,
    **options: Any,
) -> BackgroundResult:
    """Deprecated: ``pipeline.fit(image, mask, tile=tile, client=client)``, or
    :func:`skymap.fit` with ``options``.

    Raises
    ------
    ValueError
        ``options`` given with ``pipeline``, or an option :func:`default_pipeline` does
        not take; as :meth:`IterativeBackground.fit` otherwise.

    Examples
    --------
    >>> import warnings
    >>> import numpy as np
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore", DeprecationWarning)
    ...     res = tiled_fit(np.random.default_rng(0).normal(size=(96, 96)), tile=64)
    >>> res.tiles.chunks
    ((64, 32), (64, 32))
    """
    warnings.warn(
        "tiled_fit is deprecated: skymap.fit (or IterativeBackground.fit) takes a dask "
        "array or a memory map, with tile= and client=",
        DeprecationWarning,
        stacklevel=2,
    )
    if pipeline is None:
        check_options(options)
        pipeline = default_pipeline(**options)
    elif options:
        raise ValueError(
            f"options {sorted(options)} apply to the default pipeline only, not to an "
            "explicit pipeline"
        )
    return pipeline.fit(image, mask, tile=tile, client=client)
