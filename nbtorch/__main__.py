"""``python -m nbtorch``: the nanoBragg-compatible command line (see :mod:`nbtorch.cli`)."""
import sys

from .cli import main

sys.exit(main())
