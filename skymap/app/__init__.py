"""What a user runs: the command line (:mod:`~skymap.app.cli`), FITS in and out
(:mod:`~skymap.app.io`), configuration files (:mod:`~skymap.app.config`), figures
(:mod:`~skymap.app.plot`) and reports (:mod:`~skymap.app.report`)."""
