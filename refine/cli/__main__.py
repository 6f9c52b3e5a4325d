"""``python -m refine.cli``: ``nbtorch-refine``."""
import sys

from .fit import main

sys.exit(main())
