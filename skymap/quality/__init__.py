"""How good is a background: scores against truth and statistics
(:mod:`~skymap.quality.evaluate`), and scenes with their truth
(:mod:`~skymap.quality.simulate`)."""
