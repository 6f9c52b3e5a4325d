"""The native poidev routine (nbtorch/native/poidev.c) against the pure-Python Ran1._poidev_many_py: bit-identical
outputs and the same generator state afterwards, plus the build cache and the fallbacks (no compiler,
NBTORCH_NATIVE=0, special seeds)."""
from __future__ import annotations

import copy

import numpy as np
import pytest

import nbtorch.native as native
import nbtorch.rng as rngmod
from nbtorch.rng import IM, Ran1

SPECIAL_SEEDS = [-(2**31 - 1), -(2**31)]


@pytest.fixture
def lib(monkeypatch):
    """The native library (built on first use); skips the test when it cannot be built on this machine."""
    monkeypatch.delenv(native.NATIVE_ENV, raising=False)
    lib = rngmod._native_poidev()
    if lib is None:
        pytest.skip("native poidev unavailable (no C compiler, or the build failed)")
    return lib


@pytest.fixture
def spy(monkeypatch):
    """Counts calls of the native path."""
    calls = []
    orig = Ran1._poidev_many_native

    def wrapped(self, lib, arr):
        calls.append(arr.size)
        return orig(self, lib, arr)

    monkeypatch.setattr(Ran1, "_poidev_many_native", wrapped)
    return calls


def _state(r: Ran1) -> bytes:
    """The parts of the state that are not look-ahead: gasdev spare and poidev cache (NaN-safe, bit-exact)."""
    return np.array([float(r._iset), r._gset, r._oldm, r._g, r._sq, r._alxm]).tobytes()


def _assert_same(a: Ran1, b: Ran1, got: np.ndarray, ref: np.ndarray) -> None:
    """Same outputs (bits, dtype, shape) and the same generator afterwards (a few more draws of each kind)."""
    assert got.dtype == ref.dtype == np.float32 and got.shape == ref.shape
    assert got.tobytes() == ref.tobytes()
    assert _state(a) == _state(b)
    assert a.uniforms(40).tobytes() == b.uniforms(40).tobytes()
    assert [a.gasdev() for _ in range(3)] == [b.gasdev() for _ in range(3)]
    assert a.uniform() == b.uniform()
    more = np.array([3.0, 40.0, 2e6, 0.0], np.float32)
    assert a.poidev_many(more).tobytes() == b._poidev_many_py(more).tobytes()


def _means(n: int, seed: int) -> np.ndarray:
    """Means covering every branch: 0, tiny, < 12, exactly 12 and its neighbours, 12..1e6, 1e6, > 1e6, repeats."""
    rs = np.random.default_rng(seed)
    edges = [0.0, 1e-30, 1e-3, 11.999999, 12.0, 12.000001, 1e6, float(np.nextafter(np.float32(1e6), np.float32(2e6)))]
    parts = [
        rs.choice(edges, n // 4),
        rs.uniform(0, 12, n),
        10 ** rs.uniform(np.log10(12), 6, n // 4),
        10 ** rs.uniform(6, 9, n // 16),
        np.repeat(rs.uniform(0, 30, 4), n // 16),  # repeated means exercise the caches
    ]
    x = np.concatenate(parts).astype(np.float32)
    rs.shuffle(x)
    return x


@pytest.mark.parametrize("seed", [-1, -777, -12345, 0, 5, -(2**31 - 2), *SPECIAL_SEEDS])
def test_native_matches_python_mixed_means(lib, spy, seed):
    x = _means(2000, abs(seed) % 1000)
    a, b = Ran1(seed), Ran1(seed)
    got, ref = a.poidev_many(x), b._poidev_many_py(x)
    native_calls = list(spy)
    _assert_same(a, b, got, ref)
    # seed -(2**31 - 1) gives a shuffle table of zeros that only the Python code follows (as the C does, literally)
    assert native_calls == ([] if seed == -(2**31 - 1) else [x.size])


def test_special_seed_state_untouched_by_failed_probe():
    r = Ran1(-(2**31 - 1))
    assert not r._native_ready()
    assert (r._idum, r._iy, r._iv) == (-(2**31 - 1), 0, [0] * 32)


@pytest.mark.parametrize("vals", [
    [float("nan"), 3.0, float("nan"), 50.0, float("nan")],
    [float("inf"), 3.0, float("-inf"), 2e6, float("inf"), -float("inf")],
    [-5.0, -100.0, -800.0, -1e30, 0.0, -0.0, 13.0, -0.0],
])
def test_native_matches_python_non_finite_and_negative(lib, spy, vals):
    x = np.array(vals * 7, dtype=np.float32)
    a, b = Ran1(-31), Ran1(-31)
    got, ref = a.poidev_many(x), b._poidev_many_py(x)
    assert spy == [x.size]
    _assert_same(a, b, got, ref)
    c = Ran1(-31)  # and both equal the scalar reference
    scalar = np.array([c.poidev(v) for v in x], dtype=np.float32)
    assert scalar.tobytes() == ref.tobytes()


@pytest.mark.parametrize("after", [np.zeros(3, np.float32),  # consumes part of the buffered uniforms
                                   np.array([2e6, 50.0, 3.0, 0.0], np.float32),
                                   np.full(3000, 9.0, np.float32)])  # consumes all of them, then the generator
def test_native_hands_out_buffered_uniforms_first(lib, spy, after):
    r = Ran1(-4242)
    r._poidev_many_py(np.full(300, 2.5, np.float32))  # leaves uniforms drawn ahead of time in r._buf
    r.uniforms(5)
    assert len(r._buf) > r._pos
    a, b = r, copy.deepcopy(r)
    got, ref = a.poidev_many(after), b._poidev_many_py(after)
    assert spy == [after.size]
    _assert_same(a, b, got, ref)


def test_native_uses_pending_gasdev_spare_and_poidev_cache(lib, spy):
    a = Ran1(-8)
    a.gasdev()  # spare pending
    a.poidev(30.0)  # rejection cache holds 30
    b = copy.deepcopy(a)
    x = np.array([2e6, 30.0, 30.0, 2.0, 2e6, 2e6], np.float32)
    got, ref = a.poidev_many(x), b._poidev_many_py(x)
    assert spy == [x.size]
    _assert_same(a, b, got, ref)


def test_native_empty_and_shapes(lib, spy):
    a, b = Ran1(-3), Ran1(-3)
    for shape in [(0,), (0, 4)]:
        got = a.poidev_many(np.zeros(shape, np.float32))
        assert got.shape == shape and got.dtype == np.float32
    assert spy == [] and (a._idum, a._iy) == (-3, 0)  # nothing drawn, not even initialised
    img = _means(600, 3)[:600].reshape(20, 30).astype(np.float64)[:, ::2]  # float64, non-contiguous
    got, ref = a.poidev_many(img), b._poidev_many_py(img)
    assert spy == [img.size]
    _assert_same(a, b, got, ref)


def test_native_disabled_by_environment(monkeypatch, spy):
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    x = _means(200, 1)
    a, b = Ran1(-5), Ran1(-5)
    got, ref = a.poidev_many(x), b._poidev_many_py(x)
    assert spy == []
    _assert_same(a, b, got, ref)


def test_build_cache_and_no_compiler_fallback(lib, monkeypatch, tmp_path, spy):
    # a fresh cache directory: one library named by the source/flags hash (with its hash record and builder lock,
    # see tests/nbtorch/test_cache_trust.py), no temporary files left behind
    monkeypatch.setattr(native, "_libs", {})
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    assert rngmod._native_poidev() is not None
    built = sorted(p.name for p in (tmp_path / "cache" / "native").iterdir())
    assert len(built) == 3 and built[0].startswith("poidev-") and built[0].endswith(".so")
    assert built[1:] == [built[0] + ".lock", built[0] + ".sha256"]
    assert spy == [rngmod._self_check_means().size]  # the self-check ran once, after loading
    spy.clear()
    # no compiler and no cached library: silent fallback to Python, remembered for the process
    monkeypatch.setattr(native, "_libs", {})
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "empty"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert rngmod._native_poidev() is None
    assert native._libs == {"poidev": None}
    left = [p.name for p in (tmp_path / "empty" / "native").iterdir()]
    assert len(left) == 1 and left[0].endswith(".so.lock")  # no temporary output left
    x = _means(200, 2)
    a, b = Ran1(-6), Ran1(-6)
    got, ref = a.poidev_many(x), b._poidev_many_py(x)
    assert spy == []
    _assert_same(a, b, got, ref)


def test_a_library_prepared_in_the_background_is_built_once(lib, monkeypatch, tmp_path, spy):
    """prepare_native_poidev compiles the library in a thread while the caller goes on; the caller's own request
    then waits for that build instead of starting another (one compiler run, one self-check), and the programs
    that write a noise image start it before simulating."""
    import threading
    import time

    monkeypatch.setattr(native, "_libs", {})
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    compiled, started = [], threading.Event()
    real = native._compile_to

    def slow_compile(src, out):
        started.set()
        time.sleep(0.3)  # the caller asks for the library while this build runs
        compiled.append(out)
        real(src, out)

    monkeypatch.setattr(native, "_compile_to", slow_compile)
    rngmod.prepare_native_poidev()
    assert started.wait(30)
    lib_now = rngmod._native_poidev()
    assert lib_now is not None and len(compiled) == 1
    assert spy == [rngmod._self_check_means().size]


def test_the_command_line_prepares_the_noise_routine_only_for_a_noise_image(monkeypatch, tmp_path):
    import nbtorch.cli

    calls = []
    monkeypatch.setattr(nbtorch.cli, "prepare_native_poidev", lambda: calls.append(1))
    monkeypatch.chdir(tmp_path)
    small = "-default_F 10 -cell 50 50 50 90 90 90 -N 2 -detpixels 4 -distance 50 -floatfile f.bin".split()
    assert nbtorch.cli.main(small + ["-nonoise"]) == 0
    assert calls == []
    assert nbtorch.cli.main(small + ["-noisefile", "n.img"]) == 0
    assert calls == [1] and (tmp_path / "n.img").exists()


def test_native_ready_checks_the_state():
    r = Ran1(-10)
    assert r._native_ready() and 0 < r._idum < IM  # initialises the table, as the first draw would
    ref = Ran1(-10)
    assert r.uniforms(5).tobytes() == ref.uniforms(5).tobytes()
    r._iv[3] = IM  # not a state the ordinary branch can produce
    assert not r._native_ready()


def test_poidev_tiny_negative_mean_gives_zero_like_c():
    # exp(-mean) overflows for mean < -709.78: C gives inf (so 0 photons); Python used to raise OverflowError
    assert Ran1(-1).poidev(-1000.0) == 0.0
    assert Ran1(-1)._poidev_many_py(np.array([-1e4, -800.0, 3.0], np.float32))[:2].tolist() == [0.0, 0.0]
