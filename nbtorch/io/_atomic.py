"""Atomic file writing shared by every writer in :mod:`nbtorch.io`.

A file is written to a temporary file in the destination directory, flushed and fsync'ed, and then moved over the
destination with :func:`os.replace`.  An interrupted run therefore never leaves a truncated image behind: the
destination holds either its old content or the complete new one.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

__all__ = ["atomic_write", "check_finite"]


def _current_umask() -> int:
    """The process umask (read once; the set/restore dance is done at import time)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


_UMASK = _current_umask()


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` (bytes) to ``path`` atomically.

    The bytes go to a hidden temporary file ``.<name>.<random>.tmp`` in the same directory, which is fsync'ed and then
    renamed over ``path`` with :func:`os.replace` (atomic on POSIX and Windows for same-filesystem renames).  On any
    error the temporary file is removed and the exception propagates; ``path`` is left untouched.

    The new file gets the permissions of the file it replaces, or ``0o666 & ~umask`` if it is new (as ``open`` would
    give), rather than the 0o600 of :func:`tempfile.mkstemp`.
    """
    path = os.fspath(path)
    directory, base = os.path.split(os.path.abspath(path))
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~_UMASK
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(memoryview(data))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def check_finite(image, what: str) -> None:
    """Refuse to write a float image with NaN or ±inf pixels (every image writer calls this before writing).

    ``image``: array [slow, fast] (integer arrays pass); ``what``: the writer and file for the message.  Raises
    ``ValueError`` naming the counts and the likely cause; nothing is written."""
    arr = np.asarray(image)
    if arr.dtype.kind not in "fc":
        return
    finite = np.isfinite(arr)
    if finite.all():
        return
    nan = int(np.isnan(arr).sum())
    inf = int(arr.size - finite.sum()) - nan
    causes = []
    if nan:
        causes.append("NaN comes from NaN inputs or a singular geometry")
    if inf:
        causes.append("inf from values beyond the file's number type (lower the fluence, F, N or water)")
    raise ValueError(f"{what}: the image has {nan} NaN and {inf} infinite pixels ({'; '.join(causes)}): not written")
