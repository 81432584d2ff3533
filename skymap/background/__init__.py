"""Background estimators and the iterative pipeline.

- :mod:`~skymap.background.pipeline`: ``IterativeBackground``, its ``Stage`` s, the one loop
- :mod:`~skymap.background.defaults`: ``fit`` and ``default_pipeline``, the automatic default
- :mod:`~skymap.background.smooth`: the default estimator, a noise-weighted thin-plate
  smoother of masked cell means (GCV)
- :mod:`~skymap.background.mesh`: ``MeshBackground`` (SExtractor / photutils style)
- :mod:`~skymap.background.interpolate`: mesh grid to full resolution
- :mod:`~skymap.background.tiled`: the pipeline tile by tile on dask arrays
"""
