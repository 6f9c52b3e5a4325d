"""Differentiability of ``nbtorch.simulate`` (issue #2 item 5).

Every check compares autograd with something independent of it: central finite differences (``gradcheck``),
forward mode against reverse mode, ``vmap`` against a Python loop, or an exact identity.  All in float64 on tiny
detectors (6 × 5 pixels) so the whole file runs in well under a minute on two cores.

Parameter points are chosen away from the lattice factor's kinks: Miller indices at exact half-integers (where
nanoBragg's nearest-integer rounding switches spot) and, for interpolated F, exact integers.  The tophat shape is
piecewise constant by design and is not checked.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nbtorch
from nbtorch.simulate import pixel_lab_positions
from nbtorch.lattice import (
    cell_from_real,
    cell_from_reciprocal,
    cell_volume,
    lattice,
    orientation_from_reciprocal,
    real_from_reciprocal,
    reciprocal_matrix,
)
from nbtorch.rotation import rot_axis, rot_xyz
from nbtorch.types import Structure, get_leaf, tree_leaves
from nbtorch.types import replace_leaf as set_leaf
from nbtorch.units import deg2rad

# torch's forward-mode AD loads its decompositions with torch.jit.script (a torch-internal deprecation notice)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

DT = torch.float64
GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"

# A triclinic crystal on a 6 × 5 detector of 1 mm pixels at 50 mm, the direct beam off the panel, so that the
# pixels sample several reflections (Δh ≈ 0.5 per pixel) and every parameter moves the image.
_GENERIC = (
    "-cell 30 32 35 88 92 95 -misset 10 20 30 -N 3 -default_F 100 -lambda 1 -distance 50 -pixel 1 "
    "-detpixels_f 6 -detpixels_s 5 -polar 0.9 -water 0.02 "
)
#: name -> (flags, non-integer N so the ncells gradient is generic)
CASES = {
    # mosaic domains, 2 phi steps, divergence × dispersion sources, oversample 2, Kahn polarization, water,
    # detector rotations and two-theta
    "mosflm_full": _GENERIC.replace("-water 0.02", "-water 0.05")
    + "-Xbeam -4 -Ybeam -3 -mosaic 0.5 -mosaic_domains 3 -phi 0 -osc 1 -phisteps 2 -divergence 1 -divsteps 2 "
    "-dispersion 1 -dispsteps 2 -oversample 2 -detector_rotx 3 -detector_roty 2 -detector_rotz 1 -twotheta 5",
    "round": _GENERIC + "-Xbeam -4 -Ybeam -3 -round_xtal -oversample 1 -detector_rotx 3",
    "gauss": _GENERIC + "-Xbeam -4 -Ybeam -3 -gauss_xtal -fudge 0.7 -oversample 1 -detector_rotx 3",
    "sensor": _GENERIC + "-Xbeam -4 -Ybeam -3 -detector_thick 100 -detector_abs 50 -detector_thicksteps 3 "
    "-oversample 1 -detector_roty 4 -twotheta 3",
    "oversample_quirks": _GENERIC + "-Xbeam -4 -Ybeam -3 -detector_thick 100 -detector_thicksteps 2 -oversample 2 "
    "-oversample_thick -oversample_polar -oversample_omega -divergence 1 -divsteps 2",
    "curved_point_pixel": _GENERIC + "-Xbeam -4 -Ybeam -3 -curved_det -point_pixel -oversample 2 -detector_rotz 2",
    "xds": _GENERIC + "-xds -ORGX -3 -ORGY -2 -oversample 1 -detector_rotx 2 -detector_roty 1 -twotheta 4",
    "dials_close": _GENERIC + "-dials -ORGX -3 -ORGY -2 -close_distance 48 -oversample 1 -detector_rotz 2 -twotheta 4",
    "custom_pivot_sample": _GENERIC + "-fdet_vector 0 0 1 -sdet_vector 0 -1 0 -odet_vector 1 0 0 -beam_vector 1 0 0 "
    "-Xbeam -3 -Ybeam -4 -pivot sample -twotheta 5 -twotheta_axis 0 1 0 -spindle_axis 0 1 0 -phi 3 -oversample 1 "
    "-detector_rotx 2",
    "denzo": _GENERIC + "-denzo -Xbeam -4 -Ybeam -3 -oversample 1 -detector_roty 2",
    "adxv": _GENERIC + "-adxv -Xbeam -3 -Ybeam 9 -oversample 1 -detector_rotz 2",
    # F table built below (Structure(F=random), interpolate on / off)
    "hkl_tricubic": _GENERIC + "-Xbeam -4 -Ybeam -3 -oversample 1 -mosaic 0.3 -mosaic_domains 2 -detector_rotx 3",
    "hkl_nearest": _GENERIC + "-Xbeam -4 -Ybeam -3 -oversample 1 -detector_rotx 3",
}
HKL_MIN = (-12, -12, -12)

#: perturbation scale per leaf (gradcheck runs on x with leaf = leaf0 + scale·x, eps = 1e-6)
SCALE = {"beam.fluence": 1e29, "background.water_size": 0.01}
ALL_LEAVES = [
    "crystal.cell", "crystal.misset", "crystal.orientation", "crystal.ncells", "crystal.mosaic_spread",
    "beam.wavelength", "beam.fluence", "beam.polarization",
    "detector.distance", "detector.beam_center", "detector.rotation", "detector.twotheta",
    "structure.F", "structure.default_F", "background.water_size",
]
SMALL_LEAVES = [n for n in ALL_LEAVES if n != "structure.F"]


# ---------------------------------------------------------------------------------------------------------------
# helpers




def central_jacobian(f, x, eps=1e-6):
    """Central finite-difference Jacobian of ``f`` at the flat vector ``x``: ``[*f(x).shape, x.numel()]``."""
    cols = []
    for k in range(x.numel()):
        e = torch.zeros_like(x)
        e[k] = eps
        cols.append((f(x + e) - f(x - e)) / (2 * eps))
    return torch.stack(cols, -1)


def _stack(trees):
    """Stack a list of Params pytrees leaf by leaf (new leading batch dimension)."""
    first = trees[0]
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(_stack([t[i] for t in trees]) for i in range(len(first))))
    return torch.stack(trees)


def _in_dims(params, batched):
    """in_dims pytree for vmap: 0 for the leaves named in ``batched``, None for the others."""
    out = params
    for name, _ in tree_leaves(params):
        out = set_leaf(out, name, 0 if name in batched else None)
    return out


def _scales(params, names):
    return torch.cat([torch.full((get_leaf(params, n).numel(),), SCALE.get(n, 1.0), dtype=DT) for n in names])


def pack(params, names):
    return torch.cat([get_leaf(params, n).reshape(-1) for n in names])


def unpack(params, names, x):
    i = 0
    for n in names:
        t = get_leaf(params, n)
        params = set_leaf(params, n, x[i : i + t.numel()].reshape(t.shape))
        i += t.numel()
    return params


def flat_fn(params, setup, names, check=False):
    """x ↦ image/max (flattened) with the named leaves = leaf0 + scale·x; x = 0 is the reference point."""
    x0, sc = pack(params, names), _scales(params, names)
    norm = float(nbtorch.simulate(params, setup).abs().max())

    def f(x):
        return nbtorch.simulate(unpack(params, names, x0 + sc * x), setup, check=check).reshape(-1) / norm

    return f, torch.zeros_like(x0)


def miller_indices(params, setup):
    """h = a·q for every (pixel, layer, sub-pixel, source, orientation) sample → [S·F, T, n², K, O, 3]."""
    idx = torch.arange(setup.spixels * setup.fpixels)
    pos = pixel_lab_positions(params, setup, idx % setup.fpixels, idx // setup.fpixels)
    d = pos / torch.linalg.vector_norm(pos, dim=-1, keepdim=True)
    inc = torch.tensor([s[0] for s in setup.sources], dtype=DT)
    lam = params.beam.wavelength * torch.tensor([s[1] for s in setup.sources], dtype=DT)
    q = (d[..., None, :] - inc) / lam[:, None]
    A = nbtorch.crystal_orientations(params, setup).A
    return torch.einsum("oij,ptnkj->ptnkoi", A, q)


@lru_cache(maxsize=None)
def case(name):
    """(params, setup) of a named case (float64)."""
    params, setup = nbtorch.from_nanobragg_args(CASES[name], dtype=DT)
    params = set_leaf(params, "crystal.ncells", torch.tensor([3.3, 2.7, 4.2], dtype=DT))
    if name.startswith("hkl_"):
        g = torch.Generator().manual_seed(5)
        F = 50.0 + 100.0 * torch.rand((25, 25, 25), generator=g, dtype=DT)
        params = params._replace(structure=Structure(F, torch.tensor(77.0, dtype=DT)))
        setup = setup.replace(interpolate=name == "hkl_tricubic", hkl_min=HKL_MIN)
    return params, setup


# ---------------------------------------------------------------------------------------------------------------
# 1. gradcheck of every leaf in every case


def _grad_cases():
    for c in CASES:
        params, setup = case(c)
        for n in ALL_LEAVES:
            if n == "structure.F" and not c.startswith("hkl_"):
                continue  # no table: F is [0,0,0]
            if n == "crystal.mosaic_spread" and setup.n_domains == 1:
                continue  # no domains: the spread has no effect
            yield c, n


@pytest.mark.parametrize("case_name,leaf", list(_grad_cases()))
def test_gradcheck_every_leaf(case_name, leaf):
    params, setup = case(case_name)
    f, x = flat_fn(params, setup, [leaf])
    x.requires_grad_(True)
    # fast mode compares vᵀ·J·u with a central difference along u for random u, v: every Jacobian entry takes part
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7, rtol=1e-4, fast_mode=True)


def test_hkl_cases_use_the_table_interior():
    """The tricubic case must stay inside [min+2, max-2] (else it silently falls back to nearest lookup)."""
    params, setup = case("hkl_tricubic")
    h = miller_indices(params, setup)
    assert float(h.abs().max()) < 9.5
    assert setup.interpolate and case("hkl_nearest")[1].interpolate is False
    # and F really matters: the gradient w.r.t. the table is non-zero in both cases
    for name in ("hkl_tricubic", "hkl_nearest"):
        p, s = case(name)
        F = p.structure.F.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(nbtorch.simulate(set_leaf(p, "structure.F", F), s).sum(), F)
        assert int((g != 0).sum()) > 10


@pytest.mark.parametrize("case_name", ["mosflm_full", "xds", "hkl_tricubic"])
def test_full_jacobian_matches_finite_differences(case_name):
    """Complete Jacobian (every pixel × every small leaf entry) against central differences (not a projection)."""
    params, setup = case(case_name)
    f, x = flat_fn(params, setup, SMALL_LEAVES)
    J = torch.func.jacrev(f)(x)
    Jn = central_jacobian(f, x)
    assert torch.isfinite(J).all()
    err = (J - Jn).abs()
    assert float(err.max()) <= 1e-7 + 1e-5 * float(J.abs().max()), f"max |J - J_fd| = {float(err.max()):.3g}"
    assert float(J.abs().max()) > 1e-2  # the image does depend on the parameters


# ---------------------------------------------------------------------------------------------------------------
# 2. forward mode equals reverse mode


@pytest.mark.parametrize(
    "names",
    [["crystal.cell"], ["crystal.misset"], ["detector.beam_center"], ["beam.wavelength"], SMALL_LEAVES],
    ids=["cell", "misset", "beam_center", "wavelength", "all_small_leaves"],
)
def test_jacfwd_equals_jacrev(names):
    params, setup = case("mosflm_full")
    f, x = flat_fn(params, setup, names, check=True)
    Jr = torch.func.jacrev(f)(x)
    Jf = torch.func.jacfwd(f)(x)
    assert Jr.shape == Jf.shape == (30, x.numel())
    assert torch.isfinite(Jr).all() and torch.isfinite(Jf).all()
    torch.testing.assert_close(Jf, Jr, rtol=1e-9, atol=1e-12 * float(Jr.abs().max()))


def test_jacfwd_equals_jacrev_with_table_and_interpolation():
    params, setup = case("hkl_tricubic")
    names = ["crystal.cell", "crystal.misset", "beam.wavelength", "structure.default_F"]
    f, x = flat_fn(params, setup, names, check=True)
    torch.testing.assert_close(torch.func.jacfwd(f)(x), torch.func.jacrev(f)(x), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# 3. vmap over parameter sets equals a loop


def _perturbed_batch(params, n=3):
    g = torch.Generator().manual_seed(11)

    def r(shape, scale):
        return scale * (2 * torch.rand(shape, generator=g, dtype=DT) - 1)

    out = []
    for _ in range(n):
        p = params
        p = set_leaf(p, "crystal.cell", p.crystal.cell + r((6,), 0.3))
        p = set_leaf(p, "crystal.misset", p.crystal.misset + r((3,), 0.5))
        p = set_leaf(p, "crystal.ncells", p.crystal.ncells + r((3,), 0.4))
        p = set_leaf(p, "crystal.mosaic_spread", p.crystal.mosaic_spread + r((), 0.2))
        p = set_leaf(p, "beam.wavelength", p.beam.wavelength + r((), 0.01))
        p = set_leaf(p, "beam.polarization", p.beam.polarization + r((), 0.05))
        p = set_leaf(p, "detector.distance", p.detector.distance + r((), 1.0))
        p = set_leaf(p, "detector.beam_center", p.detector.beam_center + r((2,), 0.5))
        p = set_leaf(p, "detector.rotation", p.detector.rotation + r((3,), 0.5))
        out.append(p)
    return out


BATCHED = {
    "crystal.cell", "crystal.misset", "crystal.ncells", "crystal.mosaic_spread", "beam.wavelength",
    "beam.polarization", "detector.distance", "detector.beam_center", "detector.rotation",
}


@pytest.mark.parametrize("in_dims", ["all_leaves", "pytree"])
def test_vmap_equals_loop(in_dims):
    params, setup = case("mosflm_full")
    plist = _perturbed_batch(params)
    loop = torch.stack([nbtorch.simulate(p, setup) for p in plist])
    if in_dims == "all_leaves":
        batched = _stack(plist)
        out = torch.func.vmap(lambda p: nbtorch.simulate(p, setup))(batched)
    else:
        batched = _stack(plist)
        for name, _ in tree_leaves(params):
            if name not in BATCHED:
                batched = set_leaf(batched, name, get_leaf(params, name))  # unbatched leaves stay shared
        out = torch.func.vmap(lambda p: nbtorch.simulate(p, setup), in_dims=(_in_dims(params, BATCHED),))(batched)
    assert out.shape == (3, setup.spixels, setup.fpixels)
    assert not torch.equal(loop[0], loop[1])  # the batch really differs
    torch.testing.assert_close(out, loop, rtol=1e-12, atol=1e-12 * float(loop.abs().max()))


def test_vmap_of_jacrev_equals_loop():
    """Per-parameter-set Jacobians in one call (what a batched refinement does)."""
    params, setup = case("round")
    plist = _perturbed_batch(params)

    def jac(p):
        return torch.func.jacrev(lambda c: nbtorch.simulate(set_leaf(p, "crystal.cell", c), setup))(p.crystal.cell)

    out = torch.func.vmap(jac)(_stack(plist))
    loop = torch.stack([jac(p) for p in plist])
    torch.testing.assert_close(out, loop, rtol=1e-10, atol=1e-10 * float(loop.abs().max()))


# ---------------------------------------------------------------------------------------------------------------
# 4. finite gradients at singular points

# 0.125 mm pixels: the beam centre and the pixel centres are exact binary fractions, so the direct beam hits the
# centre of pixel (fast 3, slow 2) exactly: q = 0 and h = k = l = 0 there.
_DIRECT = (
    "-cell 30 30 30 90 90 90 -misset 10 20 30 -N 3 -default_F 100 -lambda 1 -distance 50 -pixel 0.125 "
    "-detpixels_f 6 -detpixels_s 5 -Xbeam 0.25 -Ybeam 0.375 -oversample 1 -polar 0.9 -twotheta 0 "
    "-mosaic 0.5 -mosaic_domains 3 "
)


def _spot_100_case():
    """Pixel (fast 3, slow 2) at the exact centre of reflection (1, 0, 0): a cubic 30 Å crystal turned about z so
    that a* lies on the Ewald sphere, the beam centre placed so the scattered ray hits that pixel centre."""
    a, lam, D, p = 30.0, 1.0, 50.0, 0.125
    phi = math.acos(-lam / (2 * a))
    d = np.array([1 - lam**2 / (2 * a * a), lam * math.sin(phi) / a, 0.0])
    xbeam = float(2 * p + D * d[1] / d[0])
    args = (f"-cell {a} {a} {a} 90 90 90 -N 3 -default_F 100 -lambda {lam} -distance {D} -pixel {p} -detpixels_f 6 "
            f"-detpixels_s 5 -Xbeam {xbeam!r} -Ybeam {3 * p} -oversample 1 -polar 0.9")
    params, setup = nbtorch.from_nanobragg_args(args, dtype=DT)
    U0 = rot_axis(torch.tensor([0.0, 0.0, 1.0], dtype=DT), torch.tensor(phi, dtype=DT))
    return set_leaf(params, "crystal.orientation", U0), setup


def _singular(kind):
    if kind == "spot_100":
        return _spot_100_case()
    params, setup = nbtorch.from_nanobragg_args(_DIRECT, dtype=DT)
    if kind == "direct_beam_N1":
        params = set_leaf(params, "crystal.ncells", torch.ones(3, dtype=DT))
    elif kind == "direct_beam_spread0":
        params = set_leaf(params, "crystal.mosaic_spread", torch.tensor(0.0, dtype=DT))
    elif kind == "round_r0":
        setup = setup.replace(shape="round")
    elif kind == "gauss_r0":
        setup = setup.replace(shape="gauss")
    elif kind == "round_r0_N1_spread0":
        setup = setup.replace(shape="round")
        params = set_leaf(params, "crystal.ncells", torch.ones(3, dtype=DT))
        params = set_leaf(params, "crystal.mosaic_spread", torch.tensor(0.0, dtype=DT))
    return params, setup


SINGULAR = ["direct_beam", "direct_beam_N1", "direct_beam_spread0", "round_r0", "gauss_r0", "round_r0_N1_spread0",
            "spot_100"]


@pytest.mark.parametrize("kind", SINGULAR)
def test_singular_point_is_really_hit(kind):
    params, setup = _singular(kind)
    h = miller_indices(params, setup)[2 * setup.fpixels + 3]  # pixel (slow 2, fast 3)
    if kind == "spot_100":
        target = torch.tensor([1.0, 0.0, 0.0], dtype=DT)
        assert float((h - target).abs().max()) < 1e-9
    else:
        assert torch.all(h == 0), h  # exactly on the beam: q = 0 for every mosaic domain
        pos = pixel_lab_positions(params, setup, [3], [2])
        assert pos[0, 0, 0, 1] == 0 and pos[0, 0, 0, 2] == 0  # on the beam axis (1, 0, 0)


@pytest.mark.parametrize("kind", SINGULAR)
def test_gradients_finite_and_correct_at_singular_points(kind):
    params, setup = _singular(kind)
    img = nbtorch.simulate(params, setup)
    assert torch.isfinite(img).all()
    f, x = flat_fn(params, setup, SMALL_LEAVES)  # check=False: FD steps may cross spread = 0
    Jr = torch.func.jacrev(f)(x)
    Jf = torch.func.jacfwd(f)(x)
    assert torch.isfinite(Jr).all() and torch.isfinite(Jf).all()
    torch.testing.assert_close(Jf, Jr, rtol=1e-9, atol=1e-12 * float(Jr.abs().max()))
    # reverse mode through the ordinary autograd API (requires_grad leaves, .backward())
    leaves = {n: get_leaf(params, n).clone().requires_grad_(True) for n in SMALL_LEAVES}
    p = params
    for n, t in leaves.items():
        p = set_leaf(p, n, t)
    out = nbtorch.simulate(p, setup)
    (out[2, 3] + out.sum()).backward()
    for n, t in leaves.items():
        assert t.grad is not None and torch.isfinite(t.grad).all(), n
    # and the derivative is the right one: central differences through the singular pixel
    Jn = central_jacobian(f, x)
    assert float((Jr - Jn).abs().max()) <= 1e-7 + 1e-5 * float(Jr.abs().max())
    # the singular pixel itself responds to the crystal size (d I / d N ≠ 0 at a spot centre)
    ncells = slice(18, 21)  # SMALL_LEAVES order: cell 6, misset 3, orientation 9, ncells 3
    assert float(Jr[2 * setup.fpixels + 3, ncells].abs().min()) > 0


def test_kernels_at_exact_zero():
    """The gradient-safe kernels themselves at their removable singularities (value and derivative)."""
    from nbtorch.kernel import polarization
    from nbtorch.shape import gauss, round_, sincg, square

    x = torch.zeros((), dtype=DT, requires_grad=True)
    N = torch.tensor(4.0, dtype=DT, requires_grad=True)
    v = sincg(x, N)
    gx, gN = torch.autograd.grad(v, (x, N))
    assert float(v.detach()) == 4.0 and float(gx) == 0.0 and float(gN) == 1.0  # d/dN sin(Nx)/sin x → 1 at x = 0
    dh = torch.zeros(3, dtype=DT, requires_grad=True)
    Nv = torch.tensor([2.0, 3.0, 4.0], dtype=DT, requires_grad=True)
    B = torch.eye(3, dtype=DT) / 30.0
    for fn in (lambda d, n: square(d, n), lambda d, n: round_(d, n), lambda d, n: gauss(d, n, B)):
        val = fn(dh, Nv)
        g = torch.autograd.grad(val, (dh, Nv))
        assert torch.isfinite(val) and all(torch.isfinite(t).all() for t in g)
        assert torch.all(g[0] == 0)  # a maximum in Δh
        gf = torch.func.jacfwd(fn, argnums=(0, 1))(dh.detach(), Nv.detach())
        torch.testing.assert_close(gf[0], g[0])
        torch.testing.assert_close(gf[1], g[1])
    # polarization along the beam: finite value and gradient w.r.t. the direction and K
    inc = torch.tensor([1.0, 0.0, 0.0], dtype=DT)
    d = inc.clone().requires_grad_(True)
    K = torch.tensor(0.9, dtype=DT, requires_grad=True)
    P = polarization(inc, d, torch.tensor([0.0, 0.0, 1.0], dtype=DT), K)
    g = torch.autograd.grad(P, (d, K))
    assert float(P.detach()) == pytest.approx(1.0) and all(torch.isfinite(t).all() for t in g)


# ---------------------------------------------------------------------------------------------------------------
# 5. property tests: random triclinic cells and orientations

_PROP_ARGS = ("-cell 40 40 40 90 90 90 -N 3 -default_F 100 -lambda 1 -distance 50 -pixel 1 -detpixels_f 6 "
              "-detpixels_s 5 -Xbeam -4 -Ybeam -3 -oversample 1 -polar 0.5")

lengths = st.floats(20.0, 60.0)
angles = st.floats(65.0, 115.0)  # any three angles in this range close (each < sum of the others, sum < 360)
euler = st.floats(-180.0, 180.0)


@lru_cache(maxsize=None)
def _prop_base():
    return nbtorch.from_nanobragg_args(_PROP_ARGS, dtype=DT)


def _with_crystal(cell, misset):
    params, setup = _prop_base()
    params = set_leaf(params, "crystal.cell", torch.tensor(cell, dtype=DT))
    return set_leaf(params, "crystal.misset", torch.tensor(misset, dtype=DT)), setup


PROP = settings(max_examples=15, deadline=None, derandomize=True)


@PROP
@given(st.tuples(lengths, lengths, lengths, angles, angles, angles), st.tuples(euler, euler, euler),
       st.integers(0, 2**31 - 1))
def test_property_image_and_gradient(cell, misset, seed):
    params, setup = _with_crystal(cell, misset)
    img = nbtorch.simulate(params, setup)
    assert torch.isfinite(img).all() and bool((img >= 0).all())
    norm = float(img.max())
    assert norm > 0
    w = torch.rand(img.shape, generator=torch.Generator().manual_seed(seed), dtype=DT)

    def loss(x):
        p = set_leaf(set_leaf(params, "crystal.cell", x[:6]), "crystal.misset", x[6:])
        return (nbtorch.simulate(p, setup, check=False) * w).sum() / norm

    x0 = torch.cat([params.crystal.cell, params.crystal.misset])
    g = torch.func.grad(loss)(x0)
    assert torch.isfinite(g).all()
    u = torch.randn(9, generator=torch.Generator().manual_seed(seed + 1), dtype=DT)
    u = u / torch.linalg.vector_norm(u)
    eps = 1e-4
    fd = (loss(x0 + eps * u) - loss(x0 - eps * u)) / (2 * eps)
    an = (g * u).sum()
    assert abs(float(fd - an)) <= 1e-4 * float(torch.linalg.vector_norm(g)) + 1e-12, (float(fd), float(an))


unit_vec = st.tuples(st.floats(-1, 1), st.floats(-1, 1), st.floats(-1, 1)).filter(
    lambda v: 0.3 < math.sqrt(sum(x * x for x in v)) <= 1.0)


@PROP
@given(st.tuples(lengths, lengths, lengths, angles, angles, angles), st.tuples(euler, euler, euler),
       st.floats(-180.0, 180.0), unit_vec)
def test_property_spindle_and_misset_equal_base_orientation(cell, misset, phi, axis):
    """φ about the spindle after misset m  ≡  misset 0, no spindle rotation, U0 = R_axis(φ)·XYZ(m)."""
    params, setup = _with_crystal(cell, misset)
    n = math.sqrt(sum(a * a for a in axis))
    axis = tuple(a / n for a in axis)
    rotated = nbtorch.simulate(params, setup.replace(phi0=phi, spindle=axis))
    U0 = rot_axis(torch.tensor(axis, dtype=DT), deg2rad(torch.tensor(phi, dtype=DT))) @ rot_xyz(
        deg2rad(params.crystal.misset))
    p2 = set_leaf(set_leaf(params, "crystal.misset", torch.zeros(3, dtype=DT)), "crystal.orientation", U0)
    base = nbtorch.simulate(p2, setup)
    torch.testing.assert_close(base, rotated, rtol=1e-9, atol=1e-9 * float(rotated.abs().max()))


@settings(max_examples=50, deadline=None, derandomize=True)
@given(st.tuples(lengths, lengths, lengths, angles, angles, angles), st.tuples(euler, euler, euler))
def test_property_lattice_identities(cell, misset):
    c = torch.tensor(cell, dtype=DT)
    eye = torch.eye(3, dtype=DT)
    for nb in (False, True):
        B = reciprocal_matrix(c, nanobragg=nb)
        torch.testing.assert_close(B.T @ real_from_reciprocal(B), eye, rtol=0, atol=1e-12)
    B = reciprocal_matrix(c)
    torch.testing.assert_close(cell_from_reciprocal(B), c, rtol=1e-10, atol=1e-9)
    # oriented: the cell is rotation invariant and the orientation comes back
    R = rot_xyz(deg2rad(torch.tensor(misset, dtype=DT)))
    M, Bq = lattice(c, R)
    torch.testing.assert_close(cell_from_reciprocal(Bq), c, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(orientation_from_reciprocal(Bq), R, rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.linalg.det(M), cell_volume(c), rtol=1e-10, atol=0)
    # nanoBragg's construction keeps the edge lengths exactly and is a rotation-equivariant function of R
    Mn, Bn = lattice(c, R, nanobragg=True)
    torch.testing.assert_close(cell_from_real(Mn)[:3], c[:3], rtol=1e-12, atol=0)
    Mn0, _ = lattice(c, eye, nanobragg=True)
    torch.testing.assert_close(Mn, R @ Mn0, rtol=0, atol=1e-11)


# ---------------------------------------------------------------------------------------------------------------
# 6. float32 parity on representative goldens


def _command(case_dir: Path) -> str:
    lines = (case_dir / "cmd.txt").read_text().splitlines()
    return next(l for l in lines if l.strip() and not l.lstrip().startswith("#"))


@pytest.mark.parametrize("golden", ["00_base_B1", "02_triclinic_misset", "09_mosaic", "11_div_disp",
                                    "22_detector_thick"])
def test_float32_matches_float64(golden, monkeypatch):
    d = GOLDEN / golden
    monkeypatch.chdir(d)
    imgs = {}
    for dtype in (torch.float32, torch.float64):
        params, setup = nbtorch.from_nanobragg_args(_command(d), dtype=dtype)
        assert params.crystal.cell.dtype == dtype
        imgs[dtype] = nbtorch.simulate(params, setup)
    assert imgs[torch.float32].dtype == torch.float32
    a, b = imgs[torch.float32].double(), imgs[torch.float64]
    rel = float((a - b).abs().max() / b.abs().max())
    assert rel <= 1e-3, f"{golden}: float32 vs float64 max|Δ|/max = {rel:.3g}"


# ---------------------------------------------------------------------------------------------------------------
# 7. Hessian


def test_hessian_two_parameters_symmetric_and_matches_fd():
    params, setup = case("mosflm_full")
    w = torch.rand(setup.spixels, setup.fpixels, generator=torch.Generator().manual_seed(3), dtype=DT)
    norm = float(nbtorch.simulate(params, setup).sum())

    def f(x):  # distance (mm) and wavelength (Å) about the reference
        p = set_leaf(params, "detector.distance", params.detector.distance + x[0])
        p = set_leaf(p, "beam.wavelength", p.beam.wavelength + 0.01 * x[1])
        return (nbtorch.simulate(p, setup) * w).sum() / norm

    x0 = torch.zeros(2, dtype=DT)
    H = torch.func.hessian(f)(x0)
    assert H.shape == (2, 2) and torch.isfinite(H).all()
    assert float(H.abs().max()) > 0
    torch.testing.assert_close(H, H.T, rtol=1e-10, atol=1e-12 * float(H.abs().max()))
    eps = 1e-5
    g = torch.func.grad(f)
    Hn = torch.stack([(g(x0 + eps * e) - g(x0 - eps * e)) / (2 * eps) for e in torch.eye(2, dtype=DT)], 1)
    torch.testing.assert_close(H, Hn, rtol=1e-5, atol=1e-7 * float(H.abs().max()))
