"""How good is a background: scores against truth and statistics
(:mod:`~skymap.quality.evaluate`), scenes with their truth
(:mod:`~skymap.quality.simulate`), injection-recovery on a real image and peer
comparison (:mod:`~skymap.quality.injection`, :mod:`~skymap.quality.peers`), and tuning
by it (:mod:`~skymap.quality.tune`)."""
