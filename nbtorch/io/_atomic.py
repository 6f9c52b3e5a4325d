"""Atomic file writing shared by every writer in :mod:`nbtorch.io`, under the safe-output rule
(:mod:`nbtorch.io.safe_output`).

A file is written to a temporary file in the destination's folder, flushed and fsync'ed, and then moved over the
destination with :func:`os.replace`.  An interrupted run therefore never leaves a truncated image behind: the
destination holds either its old content or the complete new one.  A symlink is written through to its target; a
character device or FIFO is written in place; a directory, socket or block device is never replaced.
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable, TypeVar

import numpy as np

from .safe_output import NEW, STREAM, output_target

__all__ = ["atomic_write", "atomic_write_from", "check_finite"]

T = TypeVar("T")


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


def _write_in_place(target: str, data: bytes) -> None:
    """Write ``data`` into a character device or FIFO (opened for writing, never created, truncated or replaced)."""
    view = memoryview(data)
    fd = os.open(target, os.O_WRONLY | os.O_NOCTTY)
    try:
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` (bytes) to ``path`` under the safe-output rule.

    ``path`` is resolved first (:func:`~nbtorch.io.safe_output.output_target`): a symlink is written through to its
    target and stays a link; a character device or FIFO is opened for writing and written in place (no temporary
    file; a FIFO waits for its reader, as any writer does); a directory, socket, block device or symlink loop raises
    ``OSError`` and nothing is written.  A regular or new file gets the bytes in a hidden temporary file
    ``.<name>.<random>.tmp`` in the target's folder, fsync'ed and renamed over the target with :func:`os.replace`
    (atomic on POSIX); on any error the temporary file is removed and the exception propagates, the target untouched.

    Permissions: a new file gets ``0o666 & ~umask`` (as ``open`` would give); a replaced file keeps its permission
    bits ``& 0o777`` — never setuid, setgid or sticky bits.
    """
    target, kind = output_target(path)
    if kind == STREAM:
        _write_in_place(target, data)
        return
    mode = 0o666 & ~_UMASK
    if kind != NEW:
        try:
            mode = os.stat(target).st_mode & 0o777
        except FileNotFoundError:  # removed meanwhile: a new file
            pass
    directory, base = os.path.split(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(memoryview(data))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_from(path: str | os.PathLike, produce: Callable[[str], T]) -> T:
    """For writers that need a file name (matplotlib's ``savefig``): ``produce(scratch)`` writes a scratch file with
    ``path``'s extension in a private temporary folder; its bytes then go to ``path`` by :func:`atomic_write`.
    Returns what ``produce`` returned.  ``path`` is checked (:func:`output_target`) before ``produce`` runs."""
    output_target(path)
    with tempfile.TemporaryDirectory(prefix="nbtorch-out-") as folder:
        scratch = os.path.join(folder, "out" + os.path.splitext(os.fspath(path))[1])
        value = produce(scratch)
        with open(scratch, "rb") as fh:
            data = fh.read()
    atomic_write(path, data)
    return value


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
