"""Parameterisation: pack/unpack round trips, crystal-system constraints, increments' meaning, differentiability."""
from __future__ import annotations

import math

import pytest
import torch
from torch.func import jacfwd

import nbtorch
import refine
from nbtorch.detector import beam_center_to_pixels
from nbtorch.rotation import rot_xyz
from refine.model.parameters import CRYSTAL_SYSTEMS, parameterise, symmetrize_cell, total_rotation, xyz_angles

from .refine_cases import WATER, model

ALL = ["cell", "orientation", "distance", "beam_center", "detector_rotation", "twotheta", "wavelength", "ncells",
       "mosaic", "scale", "background"]


def _all_groups_model(extra=""):
    return model(f"-cell 45 52 58 88 95 102 -Na 5 -Nb 6 -Nc 7 -mosaic 0.3 -mosaic_domains 3 -water {WATER} "
                 f"-detpixels 24 {extra}")


@pytest.mark.parametrize("conv", ["", "-xds"])
def test_pack_unpack_round_trip(conv):
    p, s, _ = _all_groups_model(conv)
    par = parameterise(p, s, ALL, ncells_mode="anisotropic", background=(1.0, 0.5, -0.5))
    assert par.n == 6 + 3 + 1 + 2 + 3 + 1 + 1 + 3 + 1 + 1 + 4
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(par.n, generator=g, dtype=torch.float64) - 0.5) * par.typical() * 4
    q = par.unpack(x)
    back = par.pack(q, par.plane(x))
    torch.testing.assert_close(back, x, rtol=0, atol=1e-10)
    # x = 0 reproduces the reference model exactly (same image)
    q0 = par.unpack(par.zeros())
    torch.testing.assert_close(nbtorch.simulate(q0, s), nbtorch.simulate(p, s), rtol=1e-12, atol=0)
    assert float(torch.linalg.det(total_rotation(q))) == pytest.approx(1.0)


def test_pack_of_reference_is_zero_and_values_are_user_units():
    p, s, _ = model("-xds -ORGX 50.5 -ORGY 47.25")
    par = parameterise(p, s, ["distance", "beam_center", "detector_rotation", "scale"])
    torch.testing.assert_close(par.pack(p), par.zeros())
    x = par.zeros()
    x[par.index("beam_center.x")[0]] = 0.2  # mm -> one 0.2 mm pixel
    x[par.index("detector_rotation.y")[0]] = 1.0  # mrad
    x[par.index("scale")[0]] = math.log(2.0)
    v = dict(zip(par.names, par.values(x).tolist()))
    assert v["beam_center.x"] == pytest.approx((50.5 - 0.5) * 0.2 + 0.2)  # mm in every convention: ORGX 51.5
    assert v["detector_rotation.y"] == pytest.approx(math.degrees(1e-3))
    assert v["scale"] == pytest.approx(2.0)
    q = par.unpack(x)
    assert float(q.detector.beam_center[0]) == pytest.approx(10.2)
    assert beam_center_to_pixels(q.detector.beam_center, "XDS", 0.2).tolist() == pytest.approx([51.5, 47.25])
    assert float(q.beam.fluence / p.beam.fluence) == pytest.approx(2.0)


def test_orientation_increments_are_lab_rotations_in_mrad():
    p, s, _ = model()
    par = parameterise(p, s, ["orientation"])
    x = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)  # mrad about lab x, y, z
    q = par.unpack(x)
    expect = rot_xyz(x * 1e-3) @ total_rotation(p)
    torch.testing.assert_close(total_rotation(q), expect)
    assert q.crystal.misset.tolist() == [0.0, 0.0, 0.0]
    # a single z increment is a rotation about z by that angle
    qz = par.unpack(torch.tensor([0.0, 0.0, 5.0], dtype=torch.float64))
    R = total_rotation(qz) @ total_rotation(p).T
    assert math.degrees(math.acos((float(torch.trace(R)) - 1) / 2)) == pytest.approx(math.degrees(5e-3))
    assert float(R[0, 1]) == pytest.approx(-math.sin(5e-3))


def test_xyz_angles_inverts_rot_xyz():
    g = torch.Generator().manual_seed(1)
    ang = (torch.rand(50, 3, generator=g, dtype=torch.float64) - 0.5) * torch.tensor([6.0, 3.0, 6.0],
                                                                                   dtype=torch.float64)
    torch.testing.assert_close(xyz_angles(rot_xyz(ang)), ang)


@pytest.mark.parametrize("system,cell,names", [
    ("cubic", "50 50 50 90 90 90", ["cell.a"]),
    ("tetragonal", "50 50 60 90 90 90", ["cell.a", "cell.c"]),
    ("orthorhombic", "40 50 60 90 90 90", ["cell.a", "cell.b", "cell.c"]),
    ("hexagonal", "50 50 70 90 90 120", ["cell.a", "cell.c"]),
    ("monoclinic", "40 50 60 90 100 90", ["cell.a", "cell.b", "cell.c", "cell.beta"]),
    ("triclinic", "40 50 60 80 95 105", ["cell.a", "cell.b", "cell.c", "cell.alpha", "cell.beta", "cell.gamma"]),
])
def test_crystal_system_constraints(system, cell, names):
    p, s, _ = model(f"-cell {cell} -detpixels 16")
    par = parameterise(p, s, ["cell"], crystal_system=system)
    assert par.names == names
    x = torch.linspace(0.3, 0.9, par.n, dtype=torch.float64)
    c = par.unpack(x).crystal.cell.tolist()
    ref = [float(v) for v in cell.split()]
    if system == "cubic":
        assert c[0] == c[1] == c[2] == pytest.approx(ref[0] + 0.3) and c[3:] == [90.0] * 3
    elif system in ("tetragonal", "hexagonal"):
        assert c[0] == c[1] == pytest.approx(ref[0] + x[0]) and c[2] == pytest.approx(ref[2] + x[1])
        assert c[3:] == ([90.0, 90.0, 90.0] if system == "tetragonal" else [90.0, 90.0, 120.0])
    elif system == "monoclinic":
        assert c[3] == 90.0 and c[5] == 90.0 and c[4] == pytest.approx(100 + float(x[3]))
    else:
        assert c == pytest.approx([r + float(v) for r, v in zip(ref, x.tolist() + [0.0] * 6)][: 6 if system ==
                                  "triclinic" else 3] + ([90.0] * 3 if system == "orthorhombic" else []))
    # the constrained cell drives the lattice: the image changes with every free value
    J = jacfwd(lambda xx: nbtorch.simulate(par.unpack(xx), s))(par.zeros())
    assert bool((J.abs().sum((0, 1)) > 0).all())


def test_symmetrize_rejects_the_wrong_system():
    with pytest.raises(ValueError, match="not tetragonal"):
        symmetrize_cell([40, 50, 60, 90, 90, 90], "tetragonal")
    with pytest.raises(ValueError, match="not hexagonal"):
        symmetrize_cell([50, 50, 60, 90, 90, 90], "hexagonal")
    assert symmetrize_cell([50.1, 49.9, 60, 90.1, 89.9, 90], "tetragonal") == [50.0, 50.0, 60.0, 90.0, 90.0, 90.0]
    with pytest.raises(ValueError, match="crystal_system"):
        symmetrize_cell([50, 50, 50, 90, 90, 90], "rhombohedral")
    assert set(CRYSTAL_SYSTEMS) == {"cubic", "tetragonal", "orthorhombic", "hexagonal", "monoclinic", "triclinic"}


def test_unpack_is_differentiable_through_simulate():
    """jacfwd of simulate(unpack(x)) exists for every group and matches central differences."""
    p, s, _ = _all_groups_model("-detpixels 12")
    par = parameterise(p, s, ALL, ncells_mode="isotropic")
    x0 = par.zeros()

    def f(x):
        return nbtorch.simulate(par.unpack(x), s) + (par.plane(x) @ refine.targets.plane_basis(s)).reshape(12, 12)

    J = jacfwd(f)(x0)
    assert J.shape == (12, 12, par.n)
    h = par.typical() * 1e-4
    for i in range(par.n):
        e = torch.zeros_like(x0)
        e[i] = h[i]
        fd = (f(x0 + e) - f(x0 - e)) / (2 * h[i])
        scale = float(fd.abs().max()) + 1e-12
        assert float((J[..., i] - fd).abs().max()) / scale < 1e-4, par.names[i]


def test_bounds_and_priors_map_user_units():
    p, s, _ = model()
    par = parameterise(p, s, ["distance", "ncells", "scale"], bounds={"distance": (59.0, 62.0), "ncells": (2, 20)},
                       priors={"distance": (60.5, 0.1)})
    lo, hi = par.bounds()
    i_d, i_n = par.index("distance")[0], par.index("ncells")[0]
    assert (float(lo[i_d]), float(hi[i_d])) == pytest.approx((-1.0, 2.0))
    assert (float(lo[i_n]), float(hi[i_n])) == pytest.approx((math.log(2 / 6), math.log(20 / 6)))
    assert par.scalars[i_d].prior == (60.5, 0.1)
    # default: N >= 1 (nanoBragg's smallest crystal)
    par2 = parameterise(p, s, ["ncells"])
    assert float(par2.bounds()[0][0]) == pytest.approx(math.log(1 / 6))


@pytest.mark.parametrize("free,kw,match", [
    (["cel"], {}, "unknown parameter group"),
    (["mosaic"], {}, "mosaic"),
    (["background.water"], {}, "water_size"),
    (["cell.beta"], {"crystal_system": "orthorhombic"}, "not a free cell value"),
    (["distance"], {"bounds": {"distance": (61, 62)}}, "exclude the starting value"),
    (["distance"], {"bounds": {"cell": (1, 2)}}, "not a free scalar"),
    (["distance"], {"priors": {"distance": (60, 0)}}, "sigma"),
    (["ncells.a"], {"ncells_mode": "isotropic"}, "anisotropic"),
])
def test_bad_parameterisations_raise(free, kw, match):
    p, s, _ = model()
    with pytest.raises(ValueError, match=match):
        parameterise(p, s, free, **kw)


def test_free_accepts_strings_and_subgroups():
    p, s, _ = model(f"-water {WATER}")
    par = parameterise(p, s, "distance, beam_center background.constant background.water")
    assert par.names == ["distance", "beam_center.x", "beam_center.y", "background.constant", "background.water"]
    assert par.groups() == ["distance", "beam_center", "background"]
    assert "distance" in par.describe()
