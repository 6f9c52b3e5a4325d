"""Tests for nbtorch.rng: NR ran1 / gasdev / gammln / poidev as used by nanoBragg (spec §6)."""
from __future__ import annotations

import math

import numpy as np
import pytest

import nbtorch.rng as rngmod
from nbtorch.rng import IM, RNMX, Ran1, f32, gammln


def _reference_ran1(seed: int, n: int) -> np.ndarray:
    """Literal, unoptimised transcription of the NR ran1 algorithm (Schrage steps, C truncating division)."""

    def step(z: int) -> int:
        k = z // 127773 if z >= 0 else -((-z) // 127773)  # C division truncates toward zero
        z = 16807 * (z - k * 127773) - 2836 * k
        return z + IM if z < 0 else z

    idum, iy, iv = seed, 0, [0] * 32
    out = np.empty(n, dtype=np.float32)
    for i in range(n):
        if idum <= 0 or iy == 0:
            idum = 1 if -idum < 1 else -idum
            for j in range(39, -1, -1):
                idum = step(idum)
                if j < 32:
                    iv[j] = idum
            iy = iv[0]
        idum = step(idum)
        j = iy // (1 + (IM - 1) // 32)
        iy = iv[j]
        iv[j] = idum
        temp = np.float32(iy * (1.0 / IM))
        out[i] = np.float32(RNMX) if float(temp) > RNMX else temp
    return out


@pytest.mark.parametrize("seed", [-1, -777, -12345, -12345678, 0, 5, -(2**31 - 2), -(2**31 - 1), -(2**31)])
def test_ran1_matches_literal_reference(seed):
    ref = _reference_ran1(seed, 3000)
    got = Ran1(seed).uniforms(3000)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, ref)


def test_seed_zero_and_positive_behave_as_minus_one():
    # NR: a seed <= 0 is negated with 0 -> 1; a positive seed on a fresh generator re-initialises with 1.
    a = Ran1(-1).uniforms(50)
    np.testing.assert_array_equal(Ran1(0).uniforms(50), a)
    np.testing.assert_array_equal(Ran1(99).uniforms(50), a)
    assert not np.array_equal(Ran1(-2).uniforms(50), a)


def test_seed_range_checked():
    with pytest.raises(ValueError):
        Ran1(-(2**31) - 1)


def test_park_miller_minimal_standard_check_value():
    # Park & Miller (1988): starting from z = 1, the 10000th iterate of z -> 16807 z mod (2^31-1) is 1043618065.
    # ran1(-1) makes 40 initialisation steps, then one step per deviate.
    r = Ran1(-1)
    r.uniforms(10000 - 40)
    assert r._idum == 1043618065


def test_uniform_and_uniforms_interleave():
    a = Ran1(-4242)
    b = Ran1(-4242)
    seq = [a.uniform() for _ in range(10)] + a.uniforms(25).tolist() + [a.uniform() for _ in range(5)]
    np.testing.assert_array_equal(np.array(seq, np.float32), b.uniforms(40))
    # uniform() returns a Python float holding an exact float32 value
    u = Ran1(-1).uniform()
    assert isinstance(u, float) and float(np.float32(u)) == u


def test_uniform_range_and_moments():
    u = Ran1(-31337).uniforms(200_000).astype(np.float64)
    assert u.min() > 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / u.size)
    assert abs(u.var() - 1 / 12) < 0.002


def test_rnmx_cap():
    u = rngmod._ints_to_uniforms([IM - 1, IM - 64, IM - 200, 1, 2**30])
    rnmx32 = np.float32(RNMX)
    assert u[0] == rnmx32 and u[1] == rnmx32  # would round to 1.0 / 1-2^-24 in float32
    assert u[2] == np.float32((IM - 200) / IM) and u[2] <= rnmx32
    assert u[3] == np.float32(1 / IM)
    assert u[4] == np.float32(2**30 / IM)


def test_f32_rounding():
    assert f32(0.1) == float(np.float32(0.1))
    assert f32(1.0 + 2.0**-24) == 1.0  # tie -> even
    assert f32(1.0 + 3 * 2.0**-24) == 1.0 + 2.0**-22
    assert f32(1e300) == math.inf and f32(-1e300) == -math.inf


def test_gammln_accuracy():
    for x in [0.5, 1.0, 1.5, 2.0, 3.7, 10.0, 12.5, 100.0, 1234.5, 1e6]:
        g = gammln(x)
        assert g == float(np.float32(g))
        assert abs(g - math.lgamma(x)) <= 2e-7 * max(1.0, abs(math.lgamma(x))) + 1e-6


def test_gasdev_caches_spare_and_is_normal():
    r = Ran1(-99)
    r.gasdev()
    buffered = r._iset
    state = (r._idum, r._iy, list(r._iv), r._pos, len(r._buf))
    r.gasdev()  # second value of the pair: no uniforms drawn
    assert buffered and state == (r._idum, r._iy, list(r._iv), r._pos, len(r._buf))
    g = np.array([r.gasdev() for _ in range(40_000)])
    assert abs(g.mean()) < 5 / math.sqrt(g.size)
    assert abs(g.var() - 1.0) < 5 * math.sqrt(2 / g.size)


def _mixed_means(n: int, seed: int) -> np.ndarray:
    rs = np.random.default_rng(seed)
    parts = [
        rs.uniform(0, 12, n),  # product branch
        rs.choice([0.0, 1e-3, 11.999999, 12.0], n),  # edges
        rs.uniform(12, 80, n // 4),  # rejection branch
        np.repeat(rs.uniform(20, 30, 4), n // 16),  # repeated means exercise the cache
        rs.uniform(1e6, 3e6, n // 16),  # Gaussian branch
        np.repeat(rs.uniform(0, 5, 3), n // 16),
    ]
    x = np.concatenate(parts).astype(np.float32)
    rs.shuffle(x)
    return x


def _use_impl(monkeypatch, impl: str) -> None:
    """Select the poidev_many implementation: the pure-Python one, or the native routine (skipped if unavailable)."""
    if impl == "python":
        monkeypatch.setenv("NBTORCH_NATIVE", "0")
    else:
        monkeypatch.delenv("NBTORCH_NATIVE", raising=False)
        if rngmod._native_poidev() is None:
            pytest.skip("native poidev unavailable (no C compiler, or the build failed)")


@pytest.mark.parametrize("impl", ["python", "native"])
@pytest.mark.parametrize("force_exact", [False, True])
def test_poidev_many_equals_scalar(monkeypatch, force_exact, impl):
    _use_impl(monkeypatch, impl)
    if force_exact:  # every comparison "too close to call" -> exact float32 path; also the k >= KMAX path
        monkeypatch.setattr(rngmod, "_TOL", 10.0)
        monkeypatch.setattr(rngmod, "_KMAX", 3)
    x = _mixed_means(1500, 7)
    a, b = Ran1(-2024), Ran1(-2024)
    got = a.poidev_many(x)
    ref = np.array([b.poidev(v) for v in x], dtype=np.float32)
    np.testing.assert_array_equal(got, ref)
    # identical generator state afterwards (buffered look-ahead included)
    np.testing.assert_array_equal(a.uniforms(100), b.uniforms(100))
    assert a.gasdev() == b.gasdev()


@pytest.mark.parametrize("impl", ["python", "native"])
def test_poidev_many_long_small_mean_run_crosses_blocks(monkeypatch, impl):
    _use_impl(monkeypatch, impl)
    x = np.full(40_000, 7.5, dtype=np.float32)  # ~340k uniforms: several refills
    a, b = Ran1(-5), Ran1(-5)
    got = a.poidev_many(x)
    ref = np.array([b.poidev(7.5) for _ in range(x.size)], dtype=np.float32)
    np.testing.assert_array_equal(got, ref)


def test_poidev_small_mean_draw_counts():
    # mean 0 -> exactly one uniform drawn, result 0
    a, b = Ran1(-11), Ran1(-11)
    assert a.poidev(0.0) == 0.0
    b.uniform()
    assert a.uniform() == b.uniform()
    # result k consumes k+1 uniforms; the product of the first k stays above exp(-x)
    r, ref = Ran1(-12), Ran1(-12)
    for _ in range(200):
        k = int(r.poidev(3.0))
        us = ref.uniforms(k + 1)
        t = np.float32(1.0)
        for u in us[:-1]:
            t = np.float32(t * u)
            assert t > np.float32(math.exp(-3.0))
        assert np.float32(t * us[-1]) <= np.float32(math.exp(-3.0))


@pytest.mark.parametrize("mean,n", [(0.5, 40_000), (5.0, 40_000), (50.0, 15_000), (5000.0, 15_000), (2e6, 15_000)])
def test_poidev_statistics(mean, n):
    x = np.full(n, mean, dtype=np.float32)
    k = Ran1(-(1000 + int(mean))).poidev_many(x).astype(np.float64)
    if mean <= 1e6:
        assert np.all(k == np.floor(k)) and k.min() >= 0
    se_mean = math.sqrt(mean / n)
    se_var = math.sqrt((mean + 2 * mean * mean) / n)  # Var(s^2) for Poisson: (mu4 - sigma^4)/n
    assert abs(k.mean() - mean) < 5 * se_mean
    assert abs(k.var() - mean) < 5 * se_var


def test_poidev_small_mean_distribution():
    # exact pmf check for the product branch: chi-square over k = 0..8
    n, mean = 60_000, 2.5
    k = Ran1(-77).poidev_many(np.full(n, mean, np.float32)).astype(int)
    obs = np.bincount(k, minlength=20)[:9].astype(float)
    pmf = np.array([math.exp(-mean) * mean**j / math.factorial(j) for j in range(9)])
    chi2 = float(((obs - n * pmf) ** 2 / (n * pmf)).sum())
    assert chi2 < 35.0  # 9 bins: p(chi2 > 35) ~ 6e-5


def test_poidev_nan_mean_propagates():
    assert math.isnan(Ran1(-3).poidev(float("nan")))
