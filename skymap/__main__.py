"""``python -m skymap``: the same as the ``skymap`` command."""

import sys

from .cli import main

sys.exit(main())
