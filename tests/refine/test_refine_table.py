"""The description table: every refinable scalar described once, and pack/unpack/report derived from it."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import nbtorch
from nbtorch.args.table import FLAGS
from refine.model.parameters import get_leaf, parameterise
from refine.model.table import DEFAULT_FREE, GROUPS, SCALARS, SPECS, SUBGROUPS

from .refine_cases import WATER, model

#: Every group freed on its own, on a model that supports all of them.
GROUP_CASES = [
    (["cell"], "triclinic"), (["orientation"], None), (["distance"], None), (["beam_center"], None),
    (["detector_rotation"], None), (["twotheta"], None), (["wavelength"], None), (["ncells"], None),
    (["ncells.a", "ncells.b", "ncells.c"], None), (["mosaic"], None), (["scale"], None), (["background"], None),
]


def _rich_model(extra=""):
    return model(f"-cell 45 52 58 88 95 102 -Na 5 -Nb 6 -Nc 7 -mosaic 0.3 -mosaic_domains 3 -water {WATER} "
                 f"-detpixels 16 {extra}")


def test_every_scalar_is_described_once_and_groups_come_from_the_table():
    names = [s.name for s in SCALARS]
    assert len(names) == len(set(names)) == len(SPECS)
    assert GROUPS == tuple(dict.fromkeys(s.group for s in SCALARS))
    for s in SCALARS:
        assert s.name == s.group or s.name.startswith(s.group + "."), s.name
    for sub, members in SUBGROUPS.items():
        assert all(m in SPECS for m in members), sub
    assert set(DEFAULT_FREE) <= set(GROUPS)


def test_flags_come_from_the_flag_table():
    """Each scalar's nanoBragg flags are those whose table field is its leaf (none for the refine-owned plane)."""
    for s in SCALARS:
        if s.leaf == "plane":
            assert s.flags == ()
            continue
        assert s.flags, s.name
        for f in s.flags:
            assert f in FLAGS, (s.name, f)
    assert SPECS["beam_center.x"].flags == ("-Xbeam", "-ORGX")
    assert SPECS["detector_rotation.z"].flags == ("-detector_rotz",)
    assert SPECS["ncells"].flags == ("-Na", "-Nb", "-Nc")
    assert SPECS["background.water"].flags == ("-water",)


@pytest.mark.parametrize("free,system", GROUP_CASES, ids=lambda v: ",".join(v) if isinstance(v, list) else str(v))
@pytest.mark.parametrize("conv", ["", "-xds"])
def test_each_group_round_trips(free, system, conv):
    """unpack then pack gives back x for every group alone; x = 0 is the reference model exactly."""
    p, s, _ = _rich_model(conv)
    mode = "anisotropic" if free[0].startswith("ncells.") else "auto"
    par = parameterise(p, s, free, crystal_system=system or "auto", ncells_mode=mode, background=(1.0, 0.5, -0.5))
    assert par.n >= 1 and all(n.split(".")[0] == free[0].split(".")[0] for n in par.names)
    g = torch.Generator().manual_seed(len(par.names))
    x = (torch.rand(par.n, generator=g, dtype=torch.float64) - 0.5) * par.typical() * 4
    torch.testing.assert_close(par.pack(par.unpack(x), par.plane(x)), x, rtol=0, atol=1e-10)
    q0 = par.unpack(par.zeros())
    for leaf in ("crystal.cell", "crystal.ncells", "crystal.mosaic_spread", "beam.wavelength", "beam.fluence",
                 "detector.distance", "detector.beam_center", "detector.rotation", "detector.twotheta",
                 "background.water_size"):
        assert torch.equal(get_leaf(q0, leaf), get_leaf(p, leaf)), leaf


@pytest.mark.parametrize("name,leaf,index,check", [
    ("distance", "detector.distance", None, lambda ref, new, x: new == pytest.approx(ref + x)),
    ("beam_center.y", "detector.beam_center", 1, lambda ref, new, x: new == pytest.approx(ref + x)),
    ("detector_rotation.y", "detector.rotation", 1,
     lambda ref, new, x: new == pytest.approx(ref + math.degrees(x * 1e-3))),
    ("twotheta", "detector.twotheta", None, lambda ref, new, x: new == pytest.approx(ref + math.degrees(x * 1e-3))),
    ("wavelength", "beam.wavelength", None, lambda ref, new, x: new == pytest.approx(ref * math.exp(x))),
    ("scale", "beam.fluence", None, lambda ref, new, x: new == pytest.approx(ref * math.exp(x))),
    ("mosaic", "crystal.mosaic_spread", None, lambda ref, new, x: new == pytest.approx(ref * math.exp(x))),
    ("ncells.b", "crystal.ncells", 1, lambda ref, new, x: new == pytest.approx(ref * math.exp(x))),
    ("background.water", "background.water_size", None,
     lambda ref, new, x: new**3 == pytest.approx(ref**3 * math.exp(x))),  # x = ln of the water intensity
])
def test_increments_mean_what_the_table_says(name, leaf, index, check):
    p, s, _ = _rich_model()
    par = parameterise(p, s, [name], ncells_mode="anisotropic")
    x = par.zeros()
    x[0] = 0.3
    ref, new = get_leaf(p, leaf), get_leaf(par.unpack(x), leaf)
    if index is not None:
        ref, new = ref[index], new[index]
    assert check(float(ref), float(new), 0.3)
    others = [i for i in range(new.numel())] if new.dim() else []
    for k in others:  # the other components of a vector leaf stay put
        if k != index:
            assert float(get_leaf(par.unpack(x), leaf)[k]) == float(get_leaf(p, leaf)[k])


def test_parameterisation_and_scalars_are_frozen():
    p, s, _ = model("-detpixels 16")
    par = parameterise(p, s, ["distance"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        par.scalars = ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        par.scalars[0].ref = 1.0
    with pytest.raises(TypeError):
        par.cell_rows["a"] = (0,)


def test_a_new_table_entry_is_all_it_takes(monkeypatch):
    """Adding a scalar means adding one entry: a polarization factor entry becomes refinable, packs, unpacks and is
    reported with the flag of its leaf, without touching any other code."""
    import refine.model.parameters as parameters
    import refine.model.table as table

    extra = table.ScalarSpec("polarization", "polarization", "beam.polarization", None, "linear", 0.01, "", "%",
                             1.0)
    monkeypatch.setattr(table, "SCALARS", table.SCALARS + (extra,))
    monkeypatch.setattr(parameters, "SCALARS", table.SCALARS)
    monkeypatch.setattr(parameters, "GROUPS", table.GROUPS + ("polarization",))
    p, s, _ = model("-detpixels 16 -polar 0.9")
    par = parameters.parameterise(p, s, ["distance", "polarization"])
    assert par.names == ["distance", "polarization"] and extra.flags == ("-polar",)
    x = torch.tensor([0.0, 5.0], dtype=torch.float64)
    assert float(par.unpack(x).beam.polarization) == pytest.approx(0.95)
    torch.testing.assert_close(par.pack(par.unpack(x)), x)
    assert nbtorch.simulate(par.unpack(x), s).shape == (16, 16)
