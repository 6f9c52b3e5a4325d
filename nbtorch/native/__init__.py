"""Small native (C) helpers, compiled on first use with the system C compiler and loaded with :mod:`ctypes`.

torch-free (standard library + numpy).  At present one routine: ``poidev.c``, the Poisson-noise loop of
:meth:`nbtorch.rng.Ran1.poidev_many`, bit-identical to the Python reference (about 25× faster).

Build: ``$CC`` (default ``cc``) with :data:`CFLAGS` — notably *without* ``-ffast-math`` and with
``-ffp-contract=off``, so every float/double rounding is the one the Python code performs.  The shared library goes
to :func:`native_cache_dir` under a name that hashes the C source, the compiler command, the flags and the platform,
so an edited source rebuilds; it is compiled to a temporary file in the same directory and renamed into place
(atomic, so concurrent processes never load a half-written file).  If the cache directory cannot be written, the
library is built in a private temporary directory, loaded, and deleted (this process only).

Fallback: if the compiler is missing, compilation or loading fails, or the loaded routine disagrees with the Python
reference on a built-in self-check, :func:`poidev_library` returns ``None`` (one debug log line, remembered for the
process) and callers use the Python implementation.  ``NBTORCH_NATIVE=0`` disables the native path.
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

import numpy as np

from ..cachedir import CACHE_ENV, cache_root

__all__ = ["CACHE_ENV", "NATIVE_ENV", "CFLAGS", "native_cache_dir", "native_enabled", "poidev_library",
           "NativeState"]

_log = logging.getLogger(__name__)

#: Environment variable: "0" disables the native routines (the Python implementations are used).
NATIVE_ENV = "NBTORCH_NATIVE"
#: Compiler flags.  No -ffast-math and no FMA contraction: results must match the Python code bit for bit.
CFLAGS = ("-O2", "-fPIC", "-shared", "-fno-fast-math", "-ffp-contract=off")

_SRC_DIR = pathlib.Path(__file__).resolve().parent
_libs: dict[str, object] = {}  # library name -> loaded ctypes.CDLL, or None after a failure (not retried)


def native_cache_dir() -> pathlib.Path:
    """Directory of the compiled native libraries: ``<cache root>/native`` (see :mod:`nbtorch.cachedir`)."""
    return cache_root() / "native"


def native_enabled() -> bool:
    """False when ``$NBTORCH_NATIVE`` is ``0`` (or ``false``/``no``/``off``): use the Python implementations."""
    return os.environ.get(NATIVE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _compile(src: pathlib.Path, name: str) -> pathlib.Path:
    """Compile ``src`` into a shared library (cached; see the module docstring) and return its path.

    Raises ``OSError``/``subprocess.SubprocessError`` when the compiler is missing or fails.
    """
    cc = shlex.split(os.environ.get("CC") or "cc")
    code = src.read_bytes()
    key = hashlib.sha256(b"\0".join([code, " ".join(cc).encode(), " ".join(CFLAGS).encode(),
                                     f"{sys.platform}-{platform.machine()}".encode()])).hexdigest()[:16]
    fname = f"{name}-{key}.so"
    try:
        out_dir = native_cache_dir()
        target = out_dir / fname
        if target.exists():
            return target
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so.tmp", dir=out_dir)
    except OSError:  # unwritable cache: build privately for this process
        out_dir = pathlib.Path(tempfile.mkdtemp(prefix="nbtorch-native-"))
        target = out_dir / fname
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so.tmp", dir=out_dir)
    os.close(fd)
    try:
        subprocess.run([*cc, *CFLAGS, "-o", tmp, str(src), "-lm"], check=True, capture_output=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


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
    path = _compile(_SRC_DIR / "poidev.c", "poidev")
    try:
        lib = ctypes.CDLL(str(path))
    finally:
        if path.parent != native_cache_dir():  # private build (unwritable cache): the loaded mapping stays valid
            shutil.rmtree(path.parent, ignore_errors=True)
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
