"""nbtorch's on-disk cache of compiled code: one root, one sub-directory per kind, and the rules for trusting it.

``$NBTORCH_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/nbtorch``, else ``~/.cache/nbtorch``; below it ``aot/``
(ahead-of-time compiled forward tiles, :mod:`nbtorch.aot`), ``inductor/`` (``torch.compile``'s cache, for the
reverse-mode kernels) and ``native/`` (small C helpers, :mod:`nbtorch.native`).  Deleting the directory is always
safe: everything in it is rebuilt on demand.

Compiled code runs as the user who loads it, so the cache is used only when it is the user's own
(:func:`cache_subdir`): directories nbtorch creates get mode 0700 whatever the umask; before anything is loaded, the
root (after following a symbolic link that the user or root owns) and the sub-directory must be directories owned
by the effective user and not writable by group or others.  Otherwise one warning says which directory and why, and
nothing is loaded from it or built into it (:class:`UntrustedCacheError`; callers run eager/Python code).

Inside a trusted sub-directory every compiled file ``F`` has a record of its SHA-256 in ``F.sha256`` (the format of
``sha256sum``), written after ``F`` when ``F`` is built; :func:`load_or_build` loads ``F`` only when it is a regular
file owned by the user, not writable by group or others, and its hash matches the record.  A file that fails any of
these checks, or fails to load, is rebuilt (one warning) into a fresh temporary file that is renamed into place.
One process builds a file at a time: builders hold ``fcntl.flock`` on ``F.lock``; a process that finds the lock
taken waits, then loads what the other built.  Temporary files (``.F.<random>.tmp…``) whose builder died (its lock
is free) are deleted by the next process that loads from the directory.
"""
from __future__ import annotations

import atexit
import fcntl
import hashlib
import logging
import os
import pathlib
import re
import shutil
import stat
import tempfile
import warnings
from typing import Callable, Optional, TypeVar

__all__ = ["CACHE_ENV", "SHARED_ENV", "UntrustedCacheError", "builder_lock", "cache_root", "cache_subdir",
           "file_problem", "load_or_build", "load_shared", "scratch_dir", "sha256_of", "shared_subdir"]

#: Environment variable: a shared, read-only cache of compiled kernels, looked at before the user's own.
SHARED_ENV = "NBTORCH_SHARED_CACHE"
#: Environment variable: the root of nbtorch's on-disk cache.
CACHE_ENV = "NBTORCH_CACHE_DIR"
#: Suffix of a compiled file's hash record.
HASH_SUFFIX = ".sha256"
#: Suffix of a compiled file's builder lock.
LOCK_SUFFIX = ".lock"

_log = logging.getLogger(__name__)
_TMP_RE = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]+\.tmp(\.[A-Za-z0-9]+)?$")
_warned: set = set()
_swept: set = set()
_scratch: list = []
T = TypeVar("T")


class UntrustedCacheError(RuntimeError):
    """A cache directory is not the user's own (the message says which and why); nothing may be loaded from it."""


def cache_root() -> pathlib.Path:
    """The cache root (see the module docstring); not created, not checked."""
    if os.environ.get(CACHE_ENV):
        return pathlib.Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "nbtorch"


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _describe(path, st: os.stat_result) -> str:
    return f"{path} (owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})"


def _stat_problem(path, st: os.stat_result, want_dir: bool, shared: bool = False) -> Optional[str]:
    """Why the entry ``path`` with ``lstat`` result ``st`` is not the user's own (with ``shared``: the user's or
    root's), or None."""
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if want_dir and not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if not want_dir and not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_uid != os.geteuid() and not (shared and st.st_uid == 0):
        return f"{_describe(path, st)} is owned by another user (this process runs as uid {os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{_describe(path, st)} is writable by group or others"
    return None


def _make_private(path: pathlib.Path) -> None:
    """Create ``path`` and any missing parent with mode 0700 (whatever the umask); existing ones are left alone."""
    missing = []
    p = path
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:  # created meanwhile by someone else: checked like any existing directory
            continue
        os.chmod(p, 0o700)


def _trusted_root(root: pathlib.Path, shared: bool = False) -> pathlib.Path:
    """The real path of ``root`` once it is checked to be the user's own (``shared``: or root's); raises
    UntrustedCacheError."""
    st = os.lstat(root)
    if stat.S_ISLNK(st.st_mode) and st.st_uid not in (os.geteuid(), 0):
        raise UntrustedCacheError(f"{_describe(root, st)} is a symbolic link owned by another user")
    real = pathlib.Path(os.path.realpath(root))
    problem = _stat_problem(real, os.lstat(real), want_dir=True, shared=shared)
    if problem:
        raise UntrustedCacheError(problem)
    return real


def cache_subdir(kind: str, root: Optional[pathlib.Path] = None) -> pathlib.Path:
    """The real path of ``<root>/<kind>`` (``root``: :func:`cache_root` by default), created with mode 0700 (and any
    missing parent) if absent, after checking that the root and it are directories of the effective user that
    group and others cannot write.  Raises :class:`UntrustedCacheError` (after one warning per reason and process)
    when they are not, ``OSError`` when they cannot be created."""
    root = pathlib.Path(root) if root is not None else cache_root()
    _make_private(root)
    try:
        real = _trusted_root(root) / kind
        _make_private(real)
        problem = _stat_problem(real, os.lstat(real), want_dir=True)
        if problem:
            raise UntrustedCacheError(problem)
    except UntrustedCacheError as err:
        _warn_once(str(err), f"nbtorch: compiled code is not loaded from the cache {root}: {err}; eager/Python code "
                   "or a private temporary cache is used instead (make the directory yours with mode 700, or set "
                   f"{CACHE_ENV} to a private one)")
        raise
    return real


def shared_subdir(kind: str) -> Optional[pathlib.Path]:
    """The real path of ``<shared cache>/<kind>`` when :data:`SHARED_ENV` names a shared, read-only cache (one that
    ``python -m nbtorch.precompile`` filled, e.g. in a container image or on a cluster's file system) and it is
    there: the directory and its ``kind`` sub-directory must belong to the user or to root and not be writable by
    group or others (else one warning, and None).  Never created or written."""
    root = os.environ.get(SHARED_ENV)
    if not root or not os.path.isdir(os.path.join(root, kind)):
        return None
    try:
        real = _trusted_root(pathlib.Path(root), shared=True) / kind
        problem = _stat_problem(real, os.lstat(real), want_dir=True, shared=True)
        if problem:
            raise UntrustedCacheError(problem)
    except UntrustedCacheError as err:
        _warn_once(str(err), f"nbtorch: the shared kernel cache {root} is not used: {err}")
        return None
    return real


def load_shared(path: pathlib.Path, load: Callable[[pathlib.Path], T]) -> Optional[T]:
    """``load(path)`` for a compiled file in a directory :func:`shared_subdir` returned, when it passes
    :func:`file_problem` (the user's or root's, its hash matching its record) and loads; None otherwise (one warning
    when the file is there but not usable).  Nothing is built or written."""
    if not os.path.lexists(path):
        return None
    problem = file_problem(path, shared=True)
    if problem is None:
        try:
            return load(path)
        except Exception as err:  # noqa: BLE001 - an unusable shared file is skipped, not fatal
            problem = f"loading it failed ({type(err).__name__}: {str(err)[:200]})"
    _warn_once(f"shared {path}", f"nbtorch: shared cached compiled code {path} is not used ({problem})")
    return None


def scratch_dir() -> pathlib.Path:
    """A private temporary directory (mode 0700) for this process, deleted when it exits."""
    if not _scratch:
        _scratch.append(pathlib.Path(tempfile.mkdtemp(prefix="nbtorch-cache-")))
        atexit.register(shutil.rmtree, str(_scratch[0]), True)
    return _scratch[0]


def sha256_of(path) -> str:
    """Hex SHA-256 of the file ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _record(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + HASH_SUFFIX)


def file_problem(path: pathlib.Path, shared: bool = False) -> Optional[str]:
    """Why the compiled file ``path`` (in a directory :func:`cache_subdir` or :func:`shared_subdir` returned) must
    not be loaded — missing, not the user's own regular file (``shared``: nor root's), no readable hash record, or a
    hash that does not match it — or None."""
    try:
        problem = _stat_problem(path, os.lstat(path), want_dir=False, shared=shared)
        if problem:
            return problem
        rec = _record(path)
        if _stat_problem(rec, os.lstat(rec), want_dir=False, shared=shared):
            return f"its hash record {rec} is not the user's own regular file"
        fields = rec.read_text(encoding="ascii", errors="replace").split()
        if not fields or fields[0] != sha256_of(path):
            return f"its SHA-256 does not match the record in {rec}"
    except FileNotFoundError as err:
        return f"{err.filename} is missing"
    except OSError as err:
        return f"{err.filename}: {err.strerror}"
    return None


def _tmp_file(path: pathlib.Path) -> pathlib.Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    return pathlib.Path(tmp)


def builder_lock(path: pathlib.Path, blocking: bool = True, create: bool = True) -> Optional[int]:
    """An open descriptor holding the exclusive builder lock of ``path``, or None when ``blocking`` is False and
    another process holds it (or, with ``create`` False, when there is no lock file).  Release with ``os.close``."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path.with_name(path.name + LOCK_SUFFIX), flags, 0o600)
    except FileNotFoundError:
        if create:
            raise
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _sweep(directory: pathlib.Path, held: str) -> None:
    """Delete temporary files in ``directory`` whose builder died: its target's lock is free or absent (``held``:
    the name of the target whose lock this process holds — its temporary files are all stale)."""
    for entry in os.scandir(directory):
        m = _TMP_RE.match(entry.name)
        if not m:
            continue
        target = directory / m["target"]
        if m["target"] != held and os.path.lexists(target.with_name(target.name + LOCK_SUFFIX)):
            fd = builder_lock(target, blocking=False, create=False)
            if fd is None:
                continue  # its builder is still at work
            os.close(fd)  # (a builder starting now makes a temporary file of another name)
        try:
            os.unlink(entry.path)
            _log.debug("removed stale temporary file %s", entry.path)
        except OSError:
            pass


def _build(path: pathlib.Path, build: Callable[[pathlib.Path], None]) -> None:
    """Build ``path`` (the caller holds its lock): into a fresh temporary file, group/other bits cleared, renamed
    into place, then its hash record written and renamed likewise."""
    tmp = _tmp_file(path)
    rec_tmp = None
    try:
        _log.info("building %s", path)
        build(tmp)
        os.chmod(tmp, (os.stat(tmp).st_mode & 0o700) | 0o600)
        digest = sha256_of(tmp)
        os.replace(tmp, path)
        rec_tmp = _tmp_file(path)
        rec_tmp.write_text(f"{digest}  {path.name}\n", encoding="ascii")
        os.replace(rec_tmp, _record(path))
    finally:
        for t in (tmp, rec_tmp):
            if t is not None and os.path.lexists(t):
                os.unlink(t)


def _identity(path: pathlib.Path) -> Optional[tuple]:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def load_or_build(path: pathlib.Path, build: Callable[[pathlib.Path], None], load: Callable[[pathlib.Path], T],
                  build_missing: bool = True) -> Optional[T]:
    """``load(path)`` for the compiled file ``path`` in a directory :func:`cache_subdir` returned, checked first
    (:func:`file_problem`).  When it is missing, fails a check or fails to load: None if not ``build_missing``,
    else, holding its lock, ``build(tmp)`` writes a new one (one warning unless it was merely missing; nothing is
    built if another process built a good one meanwhile) and its load is returned.  Raises what ``build`` raises,
    or what ``load`` raises for a freshly built file."""
    if path.parent not in _swept:
        _swept.add(path.parent)
        _sweep(path.parent, held="")
    before = _identity(path)
    problem, load_failed = file_problem(path), False
    if problem is None:
        try:
            return load(path)
        except Exception as err:  # noqa: BLE001 - a file that does not load is rebuilt
            problem = f"loading it failed ({type(err).__name__}: {str(err)[:200]})"
            load_failed = True
    if not build_missing:
        return None
    fd = builder_lock(path, blocking=False)
    if fd is None:
        _log.info("waiting for another process building %s", path)
        fd = builder_lock(path)
    try:
        _sweep(path.parent, held=path.name)
        if file_problem(path) is None and not (load_failed and _identity(path) == before):
            return load(path)  # built by another process while this one waited
        if os.path.lexists(path):
            warnings.warn(f"nbtorch: cached compiled code {path} is not used ({problem}); rebuilding it",
                          RuntimeWarning, stacklevel=2)
        _build(path, build)
        return load(path)
    finally:
        os.close(fd)
