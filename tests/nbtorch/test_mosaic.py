"""Tests for nbtorch.mosaic: mosaic-domain matrices (golden 09) and -misset random angles."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbtorch.mosaic import (
    DEFAULT_MOSAIC_SEED,
    matrix_to_xyz_angles,
    mosaic_domain_count,
    mosaic_domains,
    mosaic_matrices,
    random_misset_angles,
    random_misset_matrix,
    rodrigues_matrix,
    xyz_rotation_matrix,
)

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
SPREAD = 0.017453292519943295  # 1 degree in rad


def _golden_umats(case: str = "09_mosaic") -> np.ndarray:
    rows = {}
    for line in (GOLDEN / case / "geom.txt").read_text().splitlines():
        if line.startswith("umat "):
            p = line.split()
            rows[int(p[1])] = np.array([float(v) for v in p[2:11]]).reshape(3, 3)
    return np.stack([rows[i] for i in range(len(rows))])


def test_golden_mosaic_matrices():
    ref = _golden_umats()
    assert ref.shape == (12, 3, 3)
    got = mosaic_matrices(SPREAD, 12, 777)
    assert got.shape == (12, 3, 3) and got.dtype == np.float64
    assert np.abs(got - ref).max() <= 1e-8
    np.testing.assert_array_equal(got[0], np.eye(3))
    # a different seed must not reproduce them
    assert np.abs(mosaic_matrices(SPREAD, 12, 778) - ref)[1:].max() > 1e-4


def test_golden_via_axes_and_fractions():
    ref = _golden_umats()
    axes, frac = mosaic_domains(SPREAD, 12, 777)
    assert axes.shape == (12, 3) and frac.shape == (12,)
    assert frac[0] == 0.0 and np.all((frac >= 0) & (frac <= 1))
    np.testing.assert_allclose(np.linalg.norm(axes, axis=1), 1.0, atol=1e-15)
    # fractions are float32 values
    np.testing.assert_array_equal(frac.astype(np.float32).astype(np.float64), frac)
    assert np.abs(rodrigues_matrix(axes, SPREAD * frac) - ref).max() <= 1e-8
    # exact_angles reproduces the C float32 angle through the product spread * fraction
    axes2, frac2 = mosaic_domains(SPREAD, 12, 777, exact_angles=True)
    np.testing.assert_array_equal(axes2, axes)
    assert np.abs(rodrigues_matrix(axes2, SPREAD * frac2) - ref).max() <= 1e-14


def test_default_seed_and_count_rules():
    assert DEFAULT_MOSAIC_SEED == 12345678
    np.testing.assert_array_equal(mosaic_matrices(0.01, 5), mosaic_matrices(0.01, 5, 12345678))
    assert not np.allclose(mosaic_matrices(0.01, 5), mosaic_matrices(0.01, 5, 1234567))
    assert mosaic_domain_count(0.01, None) == (0.01, 10)
    assert mosaic_domain_count(0.0, 12) == (0.0, 1)
    assert mosaic_domain_count(-1.0, None) == (0.0, 1)
    assert mosaic_domain_count(0.02, 7) == (0.02, 7)
    assert mosaic_domain_count(0.02, 0) == (0.02, 1)
    assert mosaic_matrices(0.01, 0).shape == (0, 3, 3)


def test_prefix_property_and_rotation_properties():
    big = mosaic_matrices(0.05, 200, 31)
    np.testing.assert_array_equal(mosaic_matrices(0.05, 20, 31), big[:20])  # one stream, drawn in order
    eye = np.broadcast_to(np.eye(3), big.shape)
    np.testing.assert_allclose(big @ big.transpose(0, 2, 1), eye, atol=1e-14)
    np.testing.assert_allclose(np.linalg.det(big), 1.0, atol=1e-14)
    angles = np.arccos(np.clip((np.trace(big, axis1=1, axis2=2) - 1) / 2, -1, 1))
    assert angles.max() <= 0.05 + 1e-9 and angles[1:].min() > 0.0
    # distribution ∝ (1 - r3^2)^(1/3) with r3 uniform: E[theta/spread] = 0.8413 (numerically)
    _, frac = mosaic_domains(1.0, 4001, 9)
    assert abs(frac[1:].mean() - 0.8413) < 0.02


def test_rodrigues_matches_vector_formula():
    rs = np.random.default_rng(3)
    u = rs.normal(size=(50, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    t = rs.uniform(-3, 3, 50)
    v = rs.normal(size=(50, 3))
    U = rodrigues_matrix(u, t)
    expect = (v * np.cos(t)[:, None] + np.cross(u, v) * np.sin(t)[:, None]
              + u * np.sum(u * v, axis=1, keepdims=True) * (1 - np.cos(t))[:, None])
    np.testing.assert_allclose(np.einsum("nij,nj->ni", U, v), expect, atol=1e-14)


def test_xyz_matrix_matches_torch_rotation_convention():
    torch = pytest.importorskip("torch")
    from nbtorch.rotation import rot_xyz

    ang = (0.3, -1.1, 2.4)
    ref = rot_xyz(torch.tensor(ang, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(xyz_rotation_matrix(*ang), ref, atol=1e-15)


@settings(max_examples=200, deadline=None)
@given(
    rx=st.floats(-math.pi, math.pi),
    ry=st.floats(-math.pi / 2, math.pi / 2),
    rz=st.floats(-math.pi, math.pi),
)
def test_xyz_decomposition_round_trip(rx, ry, rz):
    U = xyz_rotation_matrix(rx, ry, rz)
    a = matrix_to_xyz_angles(U)
    assert -math.pi / 2 <= a[1] <= math.pi / 2
    np.testing.assert_allclose(xyz_rotation_matrix(*a), U, atol=1e-9)


@pytest.mark.parametrize("ry", [math.pi / 2, -math.pi / 2])
def test_xyz_decomposition_gimbal_lock(ry):
    U = xyz_rotation_matrix(0.7, ry, -0.4)
    a = matrix_to_xyz_angles(U)
    assert a[2] == 0.0 and abs(a[1] - ry) < 1e-7
    np.testing.assert_allclose(xyz_rotation_matrix(*a), U, atol=1e-12)


def test_xyz_decomposition_random_rotations():
    rs = np.random.default_rng(11)
    for _ in range(200):
        q = rs.normal(size=4)
        q /= np.linalg.norm(q)
        w, x, y, z = q
        U = np.array([
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ])
        np.testing.assert_allclose(xyz_rotation_matrix(*matrix_to_xyz_angles(U)), U, atol=1e-12)


def test_random_misset():
    from nbtorch.mosaic import _draw

    U = random_misset_matrix(12345)
    np.testing.assert_allclose(U @ U.T, np.eye(3), atol=1e-14)
    np.testing.assert_allclose(np.linalg.det(U), 1.0, atol=1e-14)
    # the first draw of stream Ran1(-12345) with spread 90 (radians, sic), no identity replacement
    axes, frac = _draw(1, 12345)
    theta = float(np.float32(np.float32(90.0) * np.float32(frac[0])))
    np.testing.assert_allclose(U, rodrigues_matrix(axes[0], theta), atol=1e-15)
    assert not np.allclose(U, np.eye(3))
    rx, ry, rz = random_misset_angles(12345)
    np.testing.assert_allclose(xyz_rotation_matrix(rx, ry, rz), U, atol=1e-12)
    assert random_misset_angles(12345) == (rx, ry, rz)
    assert random_misset_angles(54321) != (rx, ry, rz)
