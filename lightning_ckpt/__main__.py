"""``python -m lightning_ckpt``: the ``lightning-ckpt`` command line (see :mod:`lightning_ckpt.cli`)."""

import sys

from lightning_ckpt.cli.app import main

if __name__ == "__main__":
    sys.exit(main())
