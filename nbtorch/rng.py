"""Bit-exact re-implementation of nanoBragg's random-number generators (spec §6).

nanoBragg uses the Numerical Recipes generators:

* ``ran1`` — Park–Miller "minimal standard" multiplicative congruential generator (a = 16807, m = 2³¹ − 1, evaluated
  with Schrage's factorisation q = 127773, r = 2836) followed by a 32-entry Bays–Durham shuffle.  A seed ≤ 0
  (re)initialises the generator: the seed is negated (0 → 1), 8 warm-up steps are discarded and the next 32 fill the
  shuffle table.  Each output is the C ``float`` ``(float)(iy / (2³¹ − 1))`` capped at RNMX = 1 − 1.2e−7.
* ``gasdev`` — polar Box–Muller normal deviate; one spare value is cached between calls.
* ``gammln`` — ln Γ(x) by the 6-term Lanczos series.
* ``poidev`` — Poisson deviate: mean > 1e6 → mean + √mean·gasdev; mean < 12 → multiply uniforms until the product is
  ≤ e^{−mean}; otherwise the rejection method with a Lorentzian comparison function.

All arithmetic is carried out with the same precision the C program uses (``float`` where it declares ``float``,
``double`` for libm calls and double constants) so that every value is reproduced to the last bit.  Values are
returned as Python floats (or numpy ``float32`` arrays) that hold exact float32 numbers.

In the C program the generator state (``iy``, the shuffle table, the Box–Muller spare and the Poisson cache) is one
set of ``static`` variables shared by every consumer.  Because every consumer (mosaic domains, random misset, noise
image) starts from its own *negative* seed, which re-initialises the state, each stream is reproduced by a fresh
:class:`Ran1` instance; here all state is held explicitly in the instance.

:meth:`Ran1.poidev_many` (the noise image) runs a small C routine, ``nbtorch/native/poidev.c``, compiled on first use
(:mod:`nbtorch.native`): a line-by-line translation of the Python code here, bit-identical in its outputs and in the
generator state it leaves (about 2.5 µs → 0.07 µs per pixel).  The Python code remains the reference and the fallback
(no C compiler, special seeds, ``NBTORCH_NATIVE=0``).
"""
from __future__ import annotations

import ctypes
import math
import struct

import numpy as np

from nbtorch.native import NativeState, poidev_library, prepare_in_background

__all__ = [
    "IA", "IM", "AM", "IQ", "IR", "NTAB", "NDIV", "EPS", "RNMX",
    "f32", "gammln", "Ran1", "gasdev", "poidev",
]

# --- Numerical Recipes ran1 constants -------------------------------------------------------------------------------
IA = 16807
IM = 2147483647  # 2**31 - 1
AM = 1.0 / IM  # double in C
IQ = 127773
IR = 2836
NTAB = 32
NDIV = 1 + (IM - 1) // NTAB  # 67108864 == 2**26
EPS = 1.2e-7
RNMX = 1.0 - EPS  # double in C; returned through a float
_RNMX_F32 = float(np.float32(RNMX))

_F32 = struct.Struct("<f")
_pack = _F32.pack
_unpack = _F32.unpack


def f32(x: float) -> float:
    """Round a Python float (double) to the nearest float32 (ties to even), returned as a Python float.

    Emulates a C assignment of a ``double`` expression to a ``float`` variable.  Overflow gives ±inf.
    """
    try:
        return _unpack(_pack(x))[0]
    except OverflowError:  # struct refuses finite doubles beyond the float range
        return math.copysign(math.inf, x)


def _exp(x: float) -> float:
    """C ``exp``: +inf on overflow instead of raising."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


# Lanczos coefficients of Numerical Recipes' gammln (double precision).
_GAMMLN_COF = (
    76.18009172947146,
    -86.50532032941677,
    24.01409824083091,
    -1.231739572450155,
    0.1208650973866179e-2,
    -0.5395239384953e-5,
)


def gammln(xx: float) -> float:
    """ln Γ(xx) for xx > 0 by NR's Lanczos approximation; float32 in, float32 out (as a Python float).

    ``xx`` is first rounded to float32 (the C argument type); the series is evaluated in double precision and the
    result rounded to float32 (the C return type).  Absolute error of the approximation < 2e−10 before rounding.
    """
    x = y = f32(xx)
    tmp = x + 5.5
    tmp -= (x + 0.5) * math.log(tmp)
    ser = 1.000000000190015
    for c in _GAMMLN_COF:
        y += 1.0
        ser += c / y
    return f32(-tmp + math.log(2.5066282746310005 * ser / x))


def _ints_to_uniforms(iys: list[int]) -> np.ndarray:
    """Raw shuffle outputs ``iy`` → ran1's float32 uniforms (``(float)(AM*iy)`` capped at RNMX)."""
    u = (np.asarray(iys, dtype=np.float64) * AM).astype(np.float32)
    u[u.astype(np.float64) > RNMX] = np.float32(RNMX)
    return u


# Margin that makes the double-precision product of k <= _KMAX float32 uniforms decide ``product > g`` exactly as the
# float32 product would (each float32 rounding perturbs by at most 2**-24 relative; _KMAX * 2**-24 = 3.58e-6).
_KMAX = 60
_TOL = 4.0e-6


class Ran1:
    """Numerical Recipes ``ran1`` uniform generator with explicit state, plus ``gasdev`` and ``poidev``.

    Parameters
    ----------
    seed:
        The value nanoBragg stores in its ``long`` seed variable, i.e. **negative** for a user seed: ``-mosaic_seed 777``
        → ``Ran1(-777)``, ``-seed 12345`` → ``Ran1(-12345)``.  Seed 0 behaves as −1.  As in NR, a *positive* seed on a
        fresh generator also triggers initialisation, which then uses seed 1 (NR's ``if (-(*idum) < 1) *idum = 1``), so
        every positive seed gives the stream of seed −1.  ``|seed|`` ≤ 2³¹.

    State: the Park–Miller value ``idum``, the last output ``iy``, the 32-entry shuffle table, the Box–Muller spare
    and the Poisson cache.  Vectorised methods may draw uniforms ahead of time; those are kept in an internal buffer
    and handed out first by every later draw, so the sequence seen by a caller never depends on which methods were
    used.
    """

    def __init__(self, seed: int) -> None:
        self.reseed(seed)

    # ----------------------------------------------------------------------------------------------------- state --
    def reseed(self, seed: int) -> None:
        """Reset all state as a fresh generator with ``seed`` (the stored nanoBragg value, normally negative).

        ``|seed|`` must be ≤ 2³¹ (nanoBragg parses seeds as C ``int``); larger values raise ``ValueError``.
        """
        if abs(int(seed)) > 2**31:
            raise ValueError(f"seed {seed} out of range: |seed| must be <= 2**31")
        self._idum = int(seed)
        self._iy = 0
        self._iv = [0] * NTAB
        self._buf: list[float] = []  # uniforms drawn ahead of time; self._buf[self._pos:] not yet handed out
        self._pos = 0
        # gasdev spare
        self._iset = False
        self._gset = 0.0
        # poidev cache (C statics: oldm, g, sq, alxm)
        self._oldm = -1.0
        self._g = 0.0
        self._sq = 0.0
        self._alxm = 0.0

    def _init_table(self) -> None:
        """NR initialisation: negate the seed (0 → 1), 8 warm-up steps, then fill the shuffle table."""
        idum = self._idum
        idum = 1 if -idum < 1 else -idum
        iv = self._iv
        for j in range(NTAB + 7, -1, -1):
            k = idum // IQ if idum >= 0 else -((-idum) // IQ)  # C integer division truncates toward zero
            idum = IA * (idum - k * IQ) - IR * k
            if idum < 0:
                idum += IM
            if j < NTAB:
                iv[j] = idum
        self._idum = idum
        self._iy = iv[0]

    def _draw_ints(self, n: int) -> list[int]:
        """Advance the generator ``n`` steps and return the raw shuffled integers ``iy`` (before scaling)."""
        out: list[int] = []
        if n <= 0:
            return out
        if self._idum <= 0 or self._iy == 0:
            self._init_table()
        idum, iy, iv = self._idum, self._iy, self._iv
        append = out.append
        if 0 < idum < IM:
            # Schrage's step equals (IA*idum) mod IM exactly for 0 <= idum < IM, and the result stays in (0, IM).
            for _ in range(n):
                idum = (idum * IA) % IM
                j = iy // NDIV
                iy = iv[j]
                iv[j] = idum
                append(iy)
        else:  # seeds -(2**31 - 1) and -(2**31) (idum >= IM): follow the C code literally, step by step
            for i in range(n):
                if i > 0 and (idum <= 0 or iy == 0):  # the C re-checks on every call after the first
                    self._idum = idum
                    self._init_table()
                    idum, iy = self._idum, self._iy
                k = idum // IQ if idum >= 0 else -((-idum) // IQ)
                idum = IA * (idum - k * IQ) - IR * k
                if idum < 0:
                    idum += IM
                j = iy // NDIV
                iy = iv[j]
                iv[j] = idum
                append(iy)
        self._idum, self._iy = idum, iy
        return out

    def _take(self, n: int) -> list[float]:
        """Next ``n`` uniforms as a list of Python floats (buffered values first)."""
        buf, pos = self._buf, self._pos
        got = buf[pos:pos + n]
        if got:
            self._buf, self._pos = (buf, pos + len(got)) if pos + len(got) < len(buf) else ([], 0)
        if len(got) < n:
            got.extend(_ints_to_uniforms(self._draw_ints(n - len(got))).tolist())
        return got

    # -------------------------------------------------------------------------------------------------- uniforms --
    def uniform(self) -> float:
        """One ran1 deviate in (0, 1): a Python float holding the exact float32 value returned by the C ``ran1``."""
        pos = self._pos
        if pos < len(self._buf):
            self._pos = pos + 1
            return self._buf[pos]
        if self._buf:
            self._buf, self._pos = [], 0
        (iy,) = self._draw_ints(1)
        u = f32(AM * iy)
        return _RNMX_F32 if u > RNMX else u

    def uniforms(self, n: int) -> np.ndarray:
        """The next ``n`` ran1 deviates, shape ``[n]``, dtype float32 (identical to ``n`` calls of :meth:`uniform`)."""
        return np.asarray(self._take(int(n)), dtype=np.float32).reshape(int(n))

    # --------------------------------------------------------------------------------------------------- gaussian --
    def gasdev(self) -> float:
        """Standard normal deviate by NR's polar Box–Muller ``gasdev`` (float32 value as a Python float).

        Draws two uniforms per accepted pair and returns one value, caching the other for the next call.
        """
        if self._iset:
            self._iset = False
            return self._gset
        while True:
            v1 = f32(2.0 * self.uniform() - 1.0)
            v2 = f32(2.0 * self.uniform() - 1.0)
            rsq = f32(f32(v1 * v1) + f32(v2 * v2))
            if not (rsq >= 1.0 or rsq == 0.0):
                break
        fac = f32(math.sqrt(-2.0 * math.log(rsq) / rsq))
        self._gset = f32(v1 * fac)
        self._iset = True
        return f32(v2 * fac)

    # ---------------------------------------------------------------------------------------------------- poisson --
    def poidev(self, mean: float) -> float:
        """One Poisson deviate with the given mean (photons), as NR/nanoBragg ``poidev`` computes it in float32.

        ``mean`` is rounded to float32 first.  Returns a float32 value as a Python float: an integer count for
        mean ≤ 1e6, and the Gaussian approximation mean + √mean·gasdev (not rounded to an integer) above 1e6.
        Reference (unoptimised) implementation; :meth:`poidev_many` is the fast equivalent.
        """
        xm = f32(mean)
        if xm > 1.0e6:
            return f32(xm + math.sqrt(xm) * self.gasdev())
        if xm < 12.0:
            if xm != self._oldm:
                self._oldm = xm
                self._g = f32(_exp(-xm))
            g = self._g
            em = -1.0
            t = 1.0
            while True:
                em += 1.0
                t = f32(t * self.uniform())
                if not t > g:
                    break
            return em
        return self._poidev_reject(xm)

    def _poidev_reject(self, xm: float, uniform=None) -> float:
        """NR rejection branch for 12 ≤ xm ≤ 1e6 (xm already float32)."""
        if uniform is None:
            uniform = self.uniform
        if xm != self._oldm:
            self._oldm = xm
            self._sq = f32(math.sqrt(2.0 * xm))
            self._alxm = f32(math.log(xm))
            self._g = f32(f32(xm * self._alxm) - gammln(xm + 1.0))
        sq, alxm, g = self._sq, self._alxm, self._g
        pi = math.pi
        while True:
            while True:
                y = f32(math.tan(pi * uniform()))
                em = f32(f32(sq * y) + xm)
                if not em < 0.0:
                    break
            em = float(math.floor(em)) if em == em else em  # NaN mean propagates as in C
            t = f32(0.9 * (1.0 + f32(y * y)) * _exp(f32(f32(f32(em * alxm) - gammln(em + 1.0)) - g)))
            if not uniform() > t:
                return em

    def poidev_many(self, means: np.ndarray) -> np.ndarray:
        """Poisson deviates for a sequence of means, drawn in order from this stream.

        ``means``: array of any shape (photons), processed in C (row-major) order, rounded to float32.
        Returns float32 counts of the same shape, bit-identical to calling :meth:`poidev` on each element in turn
        (and leaving the generator in the same state).  Runs the native routine (``nbtorch/native/poidev.c``, about
        0.07 µs per pixel of a typical image) when it is available and the generator is in its ordinary state
        (``0 < idum < 2³¹−1`` after initialisation); otherwise the pure-Python :meth:`_poidev_many_py` (~2.5 µs/pixel).
        """
        arr = np.asarray(means, dtype=np.float32)
        lib = _native_poidev() if arr.size else None
        if lib is not None and self._native_ready():
            return self._poidev_many_native(lib, arr)
        return self._poidev_many_py(arr)

    def _native_ready(self) -> bool:
        """True if the next draws take the ordinary ``0 < idum < IM`` path of :meth:`_draw_ints` (initialising the
        table first, exactly as the next draw would).  Seed −(2³¹−1), whose table is all zeros, leaves the state
        untouched and gives False, as does any state outside that ordinary branch."""
        if self._idum <= 0 or self._iy == 0:
            saved = (self._idum, self._iy, list(self._iv))
            self._init_table()
            if not 0 < self._idum < IM:
                self._idum, self._iy, self._iv = saved
                return False
        return 0 < self._idum < IM and 0 <= self._iy < IM and all(0 <= v < IM for v in self._iv)

    def _poidev_many_native(self, lib, arr: np.ndarray) -> np.ndarray:
        """:meth:`poidev_many` by the C routine ``nb_poidev_many``: the state (including pending buffered uniforms)
        goes in, the updated state is written back.  ``arr``: float32 means, any shape; returns float32, same shape."""
        flat = np.ascontiguousarray(arr.reshape(-1))
        out = np.empty(flat.shape, dtype=np.float32)
        pending = np.asarray(self._buf[self._pos:], dtype=np.float64)
        st = NativeState(idum=self._idum, iy=self._iy, iset=int(self._iset), gset=self._gset, oldm=self._oldm,
                         g=self._g, sq=self._sq, alxm=self._alxm, nbuf=pending.size, bpos=0)
        st.iv[:] = self._iv
        st.buf = pending.ctypes.data_as(ctypes.POINTER(ctypes.c_double))
        lib.nb_poidev_many(ctypes.byref(st), flat, out, flat.size)
        used = int(st.bpos)
        if used:
            pos = self._pos + used
            self._buf, self._pos = (self._buf, pos) if pos < len(self._buf) else ([], 0)
        self._idum, self._iy, self._iv = int(st.idum), int(st.iy), list(st.iv)
        self._iset, self._gset = bool(st.iset), float(st.gset)
        self._oldm, self._g, self._sq, self._alxm = float(st.oldm), float(st.g), float(st.sq), float(st.alxm)
        return out.reshape(arr.shape)

    def _poidev_many_py(self, means: np.ndarray) -> np.ndarray:
        """Pure-Python :meth:`poidev_many` (the reference for the native routine, and its fallback).

        Several times faster than per-element :meth:`poidev`: uniforms are generated in blocks and the small-mean
        product is evaluated in double precision with an exact float32 fallback whenever the comparison with
        e^{−mean} is too close to call.
        """
        arr = np.asarray(means, dtype=np.float32)
        xs = arr.ravel().tolist()
        out = [0.0] * len(xs)
        # Expected uniforms per pixel, to size the blocks generated ahead of time.
        per_pixel = float(np.nan_to_num(arr, nan=0.0).clip(0.0, 12.0).mean()) + 1.0 if arr.size else 1.0
        nxs = len(xs)

        # The uniform buffer self._buf (exact float32 values as Python floats) is used through local aliases.  A
        # refill keeps the uniforms of the pixel in progress (from ``start``) so an exact recomputation can revisit them.
        buf, pos = self._buf, self._pos
        draw_ints = self._draw_ints
        exp = _exp
        oldm, g, g_hi, g_lo = None, 0.0, 0.0, 0.0
        for i, xm in enumerate(xs):
            if xm < 12.0:
                if xm != oldm:
                    oldm = xm
                    g = f32(exp(-xm))
                    g_hi = g * (1.0 + _TOL)
                    g_lo = g * (1.0 - _TOL)
                start = pos
                t = 1.0
                k = 0
                exact = False
                while True:
                    if pos >= len(buf):
                        m = min(max(int(per_pixel * (nxs - i)) + 64, 256), 1 << 16)
                        buf = buf[start:] + _ints_to_uniforms(draw_ints(m)).tolist()
                        pos -= start
                        start = 0
                    t *= buf[pos]
                    pos += 1
                    k += 1
                    if k < _KMAX:
                        if t > g_hi:
                            continue
                        if t < g_lo:
                            break
                    exact = True
                    break
                if exact:  # too close to call: redo this pixel with float32 rounding after every multiplication
                    pos = start
                    t = 1.0
                    k = 0
                    while True:
                        if pos >= len(buf):
                            m = min(max(int(per_pixel * (nxs - i)) + 64, 256), 1 << 16)
                            buf = buf[start:] + _ints_to_uniforms(draw_ints(m)).tolist()
                            pos -= start
                            start = 0
                        t = f32(t * buf[pos])
                        pos += 1
                        k += 1
                        if not t > g:
                            break
                out[i] = float(k - 1)
            else:
                self._buf, self._pos = buf, pos
                out[i] = self.poidev(xm)
                buf, pos = self._buf, self._pos
        self._buf, self._pos = buf, pos
        if oldm is not None and (nxs == 0 or xs[-1] < 12.0):
            self._oldm, self._g = oldm, g  # keep the C cache consistent (it never changes results)
        return np.asarray(out, dtype=np.float32).reshape(arr.shape)


def _self_check_means() -> np.ndarray:
    """A fixed mix of means covering every branch of poidev (0, tiny, < 12, 12, rejection, Gaussian, repeats, NaN)."""
    base = [0.0, 1e-3, 0.5, 3.0, 3.0, 11.999999, 12.0, 12.0, 37.5, 250.0, 4.0e4, 9.9e5, 2.5e6, float("nan"), 7.0]
    ramp = (np.arange(200, dtype=np.float64) * 0.37) % 40.0
    return np.concatenate([np.asarray(base * 4), ramp]).astype(np.float32)


def _native_self_check(lib) -> bool:
    """True if the native routine reproduces :meth:`Ran1._poidev_many_py` (outputs and the next draws) on
    :func:`_self_check_means`; run once after the library is loaded."""
    x = _self_check_means()
    a, b = Ran1(-20240611), Ran1(-20240611)
    if not a._native_ready():
        return False
    got = a._poidev_many_native(lib, x)
    ref = b._poidev_many_py(x)
    return (got.tobytes() == ref.tobytes() and a.uniforms(16).tobytes() == b.uniforms(16).tobytes()
            and a.gasdev() == b.gasdev())


def _native_poidev():
    """The native poidev library (see :mod:`nbtorch.native`), or ``None`` → use the Python code."""
    return poidev_library(self_check=_native_self_check)


def prepare_native_poidev() -> None:
    """Load the native poidev library in a background thread (compiled there on a machine's first run), so that a
    program that will draw a noise image does not wait for the C compiler after its simulation."""
    prepare_in_background(_native_poidev)


def gasdev(rng: Ran1) -> float:
    """Standard normal deviate from ``rng`` (see :meth:`Ran1.gasdev`)."""
    return rng.gasdev()


def poidev(mean: float, rng: Ran1) -> float:
    """Poisson deviate with ``mean`` (photons) from ``rng`` (see :meth:`Ran1.poidev`)."""
    return rng.poidev(mean)
