"""nbtorch's on-disk cache of compiled code: one root, one sub-directory per kind.

``$NBTORCH_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/nbtorch``, else ``~/.cache/nbtorch``; below it ``aot/``
(ahead-of-time compiled forward tiles, :mod:`nbtorch.aot`), ``inductor/`` (``torch.compile``'s cache, for the
reverse-mode kernels) and ``native/`` (small C helpers, :mod:`nbtorch.native`).  Deleting the directory is always
safe: everything in it is rebuilt on demand.
"""
from __future__ import annotations

import os
import pathlib

__all__ = ["CACHE_ENV", "cache_root"]

#: Environment variable: the root of nbtorch's on-disk cache.
CACHE_ENV = "NBTORCH_CACHE_DIR"


def cache_root() -> pathlib.Path:
    """The cache root (see the module docstring)."""
    if os.environ.get(CACHE_ENV):
        return pathlib.Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "nbtorch"
