"""The one rule for output files, shared by every writer and every command line of the project (docs/io.md).

Before any work, :func:`check_output_paths` refuses an output (:class:`OutputRefused`: one line naming the option and
both paths) that

* is the same file as an input or as another output: the same device and inode (hard links and symlinks count) or
  the same real path (outputs not written yet); only a character device such as ``/dev/null`` may be repeated among
  the outputs;
* is a directory, a socket, a block device or a symlink loop;
* lies in a folder that is missing or not writable, or exists and is not writable.

When writing, :func:`output_target` says where the bytes go and how (:func:`nbtorch.io.atomic_write` follows it): a
symlink is written through to its target (the link stays a link); a regular file is replaced atomically (temporary
file in the target's folder, then a rename); a character device or a FIFO is opened and written in place, never
replaced; anything else is refused.  Permissions: see :func:`nbtorch.io.atomic_write`.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import Dict, Iterable, NamedTuple, Optional, Tuple, Union

__all__ = ["OutputRefused", "output_target", "check_output_paths", "check_output_folder", "same_file",
           "NEW", "REGULAR", "STREAM"]

NEW = "new"          #: no file there yet: created (in the target's folder)
REGULAR = "regular"  #: a regular file: replaced atomically
STREAM = "stream"    #: a character device or FIFO: opened for writing and written in place

PathLike = Union[str, "os.PathLike[str]"]


class OutputRefused(ValueError):
    """An output path the safe-output rule refuses: a one-line message naming the option and the path(s)."""


def _kind_name(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "is a directory (give a file name)"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a regular file"
    if stat.S_ISBLK(mode):
        return "is a block device, not a regular file"
    return "is not a regular file"


def output_target(path: PathLike) -> Tuple[str, str]:
    """Where a write to ``path`` goes: ``(target, kind)``.

    ``target``: the real path (every symlink followed: writing through a link leaves the link in place); ``kind``:
    :data:`NEW` (nothing there yet), :data:`REGULAR` or :data:`STREAM` (character device or FIFO).  ``OSError`` with
    a short reason (``strerror``) for a directory, a socket, a block device or a symlink loop: never written."""
    path = os.fspath(path)
    target = os.path.realpath(path)
    try:
        mode = os.stat(target).st_mode
    except (FileNotFoundError, NotADirectoryError):
        if os.path.islink(target):  # realpath stops at a link it cannot resolve: a loop
            raise OSError(errno.ELOOP, "is a symlink loop", path) from None
        return target, NEW
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "is a symlink loop", path) from None
        raise
    if stat.S_ISREG(mode):
        return target, REGULAR
    if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
        return target, STREAM
    code = errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL
    raise OSError(code, _kind_name(mode), path)


class _Identity(NamedTuple):
    """A file's identity: ``(device, inode)`` of what exists (symlinks followed), else its real path."""

    key: tuple
    char_device: bool


def _identity(path: str) -> _Identity:
    try:
        st = os.stat(path)
    except OSError:  # not there (yet): the real path it would be created at
        return _Identity(("path", os.path.realpath(path)), False)
    return _Identity(("inode", st.st_dev, st.st_ino), stat.S_ISCHR(st.st_mode))


def same_file(a: PathLike, b: PathLike) -> bool:
    """True when ``a`` and ``b`` name one file: the same device and inode (hard links, symlinks), or, for files that
    do not exist yet, the same real path."""
    return _identity(os.fspath(a)).key == _identity(os.fspath(b)).key


def _folder_problem(folder: str) -> Optional[str]:
    """Why files cannot be created in ``folder`` (None when they can)."""
    if not os.path.isdir(folder):
        return f"{folder} is not a directory" if os.path.exists(folder) else f"the directory {folder} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the directory {folder} is not writable"
    return None


def _writable_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be written by the rule (None when it can)."""
    try:
        target, kind = output_target(path)
    except OSError as exc:
        return exc.strerror or str(exc)
    if kind != NEW and not os.access(target, os.W_OK):
        return "the file exists and is not writable"
    if kind == STREAM:
        return None
    return _folder_problem(os.path.dirname(target))


def check_output_paths(outputs: Iterable[Tuple[str, Optional[PathLike]]],
                       inputs: Iterable[Tuple[str, Optional[PathLike]]] = ()) -> None:
    """Refuse, before any work, outputs the rule cannot write (see the module docstring).

    ``outputs``: ``(option, path)`` pairs in writing order (a ``None`` path is skipped), the option as the messages
    name it (``"-floatfile"``, ``"--json"``; also for a default name the user did not type).  ``inputs``: the
    ``(option, path)`` pairs of every file the run reads.  Raises :class:`OutputRefused` for the first problem."""
    seen: Dict[tuple, Tuple[str, str, bool]] = {}  # identity key → (option, path, is an input); first one kept
    for name, p in inputs:
        if p is not None:
            seen.setdefault(_identity(os.fspath(p)).key, (name, os.fspath(p), True))
    for name, path in outputs:
        if path is None:
            continue
        path = os.fspath(path)
        if not path.strip():
            raise OutputRefused(f"{name}: empty file name")
        ident = _identity(path)
        other = seen.get(ident.key)
        if other is not None and (other[2] or not ident.char_device):
            raise OutputRefused(f"{name} {path}: the same file as the {'input' if other[2] else 'output'} "
                                f"{other[0]} {other[1]}; give {name} another name")
        problem = _writable_problem(path)
        if problem:
            raise OutputRefused(f"{name} {path}: {problem}")
        seen.setdefault(ident.key, (name, path, False))


def check_output_folder(option: str, path: PathLike) -> bool:
    """A folder that outputs are written into (``--plots DIR``, ``--out DIR``): True when it exists (a writable
    directory), False when it will be made (its nearest existing parent is a writable directory).
    :class:`OutputRefused` naming ``option`` otherwise (a regular file, an unwritable place)."""
    path = os.fspath(path)
    if not path.strip():
        raise OutputRefused(f"{option}: empty folder name")
    if os.path.isdir(path):
        problem = _folder_problem(path)
        if problem:
            raise OutputRefused(f"{option} {path}: {problem}")
        return True
    if os.path.exists(path) or os.path.islink(path):
        raise OutputRefused(f"{option} {path}: not a directory (give a folder name)")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    problem = _folder_problem(parent)
    if problem:
        raise OutputRefused(f"{option} {path}: cannot be made: {problem}")
    return False
