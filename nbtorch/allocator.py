"""The memory settings of nbtorch's command-line programs: the C allocator's and the garbage collector's.

Eager tensor code allocates and frees a few-megabyte tensor per elementwise operation.  glibc's malloc serves blocks
that large with fresh ``mmap`` pages and gives them back on free (and trims the top of its heap past 128 KiB–64 MiB),
so every operation pays first-touch page faults on its output: on 2 cores the eager case B (512², 600 samples per
pixel) ran 9.5 s in float32 and 13–15 s in float64, against 3.9–4.9 s and 6.8–7.0 s with the settings below (the
C program: 8.4–9.3 s).  :func:`keep_freed_memory` changes nothing when the user set glibc's own variables
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``), on other C libraries or systems.

Importing torch leaves about a million objects that live as long as the process: the collector's full passes over
them, at least the one as the interpreter exits, took ≈ 0.2 s of every short run.  :func:`freeze_imported_objects`
moves them out of its way (``gc.freeze``).

The programs (``nbtorch``, ``nbtorch-refine``, ``nbtorch-demo``, ``nbtorch-sweep``) call :func:`set_up_program` as
they start; a library user may call either function too.
"""
from __future__ import annotations

import ctypes
import gc
import os
import sys

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory", "freeze_imported_objects", "set_up_program"]

#: Blocks below this size (bytes) come from the heap, not from fresh mmap'ed pages: glibc's largest allowed value on
#: 64-bit systems (32 MiB, above the 2–4 MiB sample tensors of a tile of ``Setup.sample_budget`` samples).
MMAP_THRESHOLD = 32 << 20
#: Free memory at the top of the heap is kept up to this size (bytes) instead of being handed back to the system.
TRIM_THRESHOLD = 1 << 30
#: glibc's ``mallopt`` parameter numbers (malloc.h) and the environment variables that set the same values.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve blocks up to :data:`MMAP_THRESHOLD` from its heap and keep up to
    :data:`TRIM_THRESHOLD` of freed memory for reuse (for this process; ``mallopt``).  Returns True when the
    settings were applied, False where they were left alone (not Linux/glibc, or set by the user's environment)."""
    if not sys.platform.startswith("linux") or any(v in os.environ for v in _USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no mallopt: another C library
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap_set = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    trim_set = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return bool(mmap_set and trim_set)


def freeze_imported_objects() -> bool:
    """Move every object alive now to the garbage collector's permanent generation (``gc.freeze``), once per process:
    for a program that has just started, the objects its imports made, which no later collection (nor the one at
    interpreter exit) then walks again.  Returns whether this call froze them (False after the first time)."""
    if gc.get_freeze_count():
        return False
    gc.freeze()
    return True


def set_up_program() -> None:
    """What a command-line program of nbtorch calls as it starts: :func:`keep_freed_memory` and
    :func:`freeze_imported_objects`."""
    keep_freed_memory()
    freeze_imported_objects()
