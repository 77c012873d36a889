"""``python -m kdfast``: the ``kdfast`` command line (see :mod:`kdfast.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
