"""Small native (C) helpers, compiled on first use with the system C compiler and loaded with :mod:`ctypes`.

torch-free (standard library + numpy).  At present one routine: ``poidev.c``, the Poisson-noise loop of
:meth:`nbtorch.rng.Ran1.poidev_many`, bit-identical to the Python reference (about 25× faster).

Build: ``$CC`` (default ``cc``) with :data:`CFLAGS` — notably *without* ``-ffast-math`` and with
``-ffp-contract=off``, so every float/double rounding is the one the Python code performs.  The shared library goes
to :func:`native_cache_dir` under a name that hashes the C source, the compiler command, the flags and the platform,
so an edited source rebuilds.  The cache rules of :mod:`nbtorch.cachedir` apply: the library is loaded only from a
directory that is the user's own, only when its SHA-256 matches the one recorded when it was built (a truncated or
altered library is rebuilt, with a warning, never loaded), and one process builds it while others wait.  If the
cache directory cannot be written, the library is built in a private temporary directory, loaded, and deleted (this
process only).

Fallback: if the compiler is missing, compilation or loading fails, or the loaded routine disagrees with the Python
reference on a built-in self-check, :func:`poidev_library` returns ``None`` (one debug log line, remembered for the
process) and callers use the Python implementation; so it does, after one warning, when the cache is not the user's
own.  ``NBTORCH_NATIVE=0`` disables the native path.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading

import numpy as np

from ..cachedir import CACHE_ENV, cache_root, cache_subdir, load_or_build

__all__ = ["CACHE_ENV", "NATIVE_ENV", "CFLAGS", "native_cache_dir", "native_enabled", "poidev_library",
           "prepare_in_background", "NativeState"]

_log = logging.getLogger(__name__)

#: Environment variable: "0" disables the native routines (the Python implementations are used).
NATIVE_ENV = "NBTORCH_NATIVE"
#: Compiler flags.  No -ffast-math and no FMA contraction: results must match the Python code bit for bit.
CFLAGS = ("-O2", "-fPIC", "-shared", "-fno-fast-math", "-ffp-contract=off")

_SRC_DIR = pathlib.Path(__file__).resolve().parent
_libs: dict[str, object] = {}  # library name -> loaded ctypes.CDLL, or None after a failure (not retried)
_libs_lock = threading.Lock()  # one thread builds and loads while others wait (see prepare_in_background)


def native_cache_dir() -> pathlib.Path:
    """Directory of the compiled native libraries: ``<cache root>/native`` (see :mod:`nbtorch.cachedir`)."""
    return cache_root() / "native"


def native_enabled() -> bool:
    """False when ``$NBTORCH_NATIVE`` is ``0`` (or ``false``/``no``/``off``): use the Python implementations."""
    return os.environ.get(NATIVE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _library_name(src: pathlib.Path, name: str) -> str:
    """File name of the compiled ``src``: hashes the source, the compiler command, the flags and the platform."""
    key = hashlib.sha256(b"\0".join([src.read_bytes(), " ".join(_cc()).encode(), " ".join(CFLAGS).encode(),
                                     f"{sys.platform}-{platform.machine()}".encode()])).hexdigest()[:16]
    return f"{name}-{key}.so"


def _cc() -> list:
    return shlex.split(os.environ.get("CC") or "cc")


def _compile_to(src: pathlib.Path, out: pathlib.Path) -> None:
    """Compile ``src`` into the shared library ``out``.  Raises ``OSError``/``subprocess.SubprocessError`` when the
    compiler is missing or fails."""
    subprocess.run([*_cc(), *CFLAGS, "-o", str(out), str(src), "-lm"], check=True, capture_output=True, timeout=120)


def _load(src: pathlib.Path, name: str) -> ctypes.CDLL:
    """The compiled ``src`` loaded: from the cache (checked and built there as :func:`nbtorch.cachedir.load_or_build`
    does), or, when the cache directory cannot be written, built in a private temporary directory, loaded and
    deleted.  Raises :class:`~nbtorch.cachedir.UntrustedCacheError` for a cache that is not the user's own."""
    fname = _library_name(src, name)
    try:
        out_dir = cache_subdir("native")
        return load_or_build(out_dir / fname, lambda tmp: _compile_to(src, tmp), lambda p: ctypes.CDLL(str(p)))
    except OSError as err:  # unwritable cache: build privately for this process (the mapping stays valid)
        _log.debug("nbtorch native cache unusable (%s); building privately", err)
    out_dir = pathlib.Path(tempfile.mkdtemp(prefix="nbtorch-native-"))
    try:
        _compile_to(src, out_dir / fname)
        return ctypes.CDLL(str(out_dir / fname))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


class NativeState(ctypes.Structure):
    """ctypes mirror of ``nb_state`` in poidev.c: the full :class:`nbtorch.rng.Ran1` state plus pending uniforms."""

    _fields_ = [
        ("idum", ctypes.c_int64),
        ("iy", ctypes.c_int64),
        ("iv", ctypes.c_int64 * 32),
        ("iset", ctypes.c_int64),
        ("gset", ctypes.c_double),
        ("oldm", ctypes.c_double),
        ("g", ctypes.c_double),
        ("sq", ctypes.c_double),
        ("alxm", ctypes.c_double),
        ("buf", ctypes.POINTER(ctypes.c_double)),
        ("nbuf", ctypes.c_int64),
        ("bpos", ctypes.c_int64),
    ]


def _load_poidev() -> object:
    lib = _load(_SRC_DIR / "poidev.c", "poidev")
    fn = lib.nb_poidev_many
    f32p = np.ctypeslib.ndpointer(dtype=np.float32, flags="C_CONTIGUOUS")
    fn.argtypes = [ctypes.POINTER(NativeState), f32p, f32p, ctypes.c_int64]
    fn.restype = ctypes.c_int64
    return lib


def poidev_library(self_check=None) -> object | None:
    """The loaded poidev library (``lib.nb_poidev_many(state*, means f32[n], out f32[n], n)``), or ``None``.

    Built and loaded on first use; a failure is logged once at debug level and remembered for the process.
    ``self_check``: optional callable ``lib -> bool`` run once after loading; ``False`` disables the library.
    Returns ``None`` whenever :func:`native_enabled` is false.
    """
    if not native_enabled():
        return None
    with _libs_lock:
        if "poidev" not in _libs:
            try:
                lib = _load_poidev()
                if self_check is not None and not self_check(lib):
                    raise RuntimeError("self-check against the Python reference failed")
                _libs["poidev"] = lib
            except Exception as exc:  # noqa: BLE001 - any failure means: use the Python code
                detail = getattr(exc, "stderr", b"") or b""
                _log.debug("nbtorch native poidev unavailable, using Python: %s %s", exc,
                           detail.decode(errors="replace").strip().splitlines()[:1])
                _libs["poidev"] = None
        return _libs["poidev"]


def prepare_in_background(get_library) -> threading.Thread:
    """Call ``get_library`` (e.g. a :func:`poidev_library` with its self-check) in a daemon thread and return the
    thread: a program that will need the library starts it before its long computation, so that a first run on a
    machine (the library not yet in the cache) compiles it (≈ 0.1 s of the C compiler, a separate process) while
    the computation runs.  A later call in another thread waits for that build instead of starting its own."""
    t = threading.Thread(target=get_library, name="nbtorch-native", daemon=True)
    t.start()
    return t
