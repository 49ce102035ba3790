"""``python -m graphprune``: the ``graphprune`` command."""

import sys

from graphprune.cli import main

if __name__ == "__main__":
    sys.exit(main())
