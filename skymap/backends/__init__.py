"""Where the pixels live: Dask clusters, batches of files and tiled runs
(:mod:`~skymap.backends.distributed`)."""
