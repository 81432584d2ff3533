"""``python -m skymap``: the same as the ``skymap`` command."""

import sys

from skymap.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
