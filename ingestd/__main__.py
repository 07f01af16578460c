"""``python -m ingestd``: the ``ingestd`` command line (:mod:`ingestd.cli`)."""

import sys

from ingestd.cli import main

if __name__ == "__main__":
    sys.exit(main())
