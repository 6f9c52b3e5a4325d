"""Crystal systems: crystal_system='auto' picks the highest symmetry the starting cell satisfies (0.1 %, 0.1°)."""
from __future__ import annotations

import pytest
import torch

from refine.model.cells import CRYSTAL_SYSTEMS, detect_crystal_system, resolve_crystal_system
from refine.model.parameters import parameterise

from .refine_cases import model, observe

#: One cell per Bravais lattice (centring does not constrain the cell), and what auto must call it.
BRAVAIS = [
    ("aP", (41.2, 52.7, 63.1, 81.0, 95.5, 104.2), "triclinic"),
    ("mP", (41.2, 52.7, 63.1, 90.0, 103.4, 90.0), "monoclinic"),
    ("mC", (120.3, 40.1, 70.2, 90.0, 118.9, 90.0), "monoclinic"),
    ("oP", (41.2, 52.7, 63.1, 90.0, 90.0, 90.0), "orthorhombic"),
    ("oC", (60.0, 80.0, 45.0, 90.0, 90.0, 90.0), "orthorhombic"),
    ("oI", (60.0, 80.0, 45.0, 90.0, 90.0, 90.0), "orthorhombic"),
    ("oF", (60.0, 80.0, 45.0, 90.0, 90.0, 90.0), "orthorhombic"),
    ("tP", (78.5, 78.5, 37.2, 90.0, 90.0, 90.0), "tetragonal"),
    ("tI", (78.5, 78.5, 37.2, 90.0, 90.0, 90.0), "tetragonal"),
    ("hP", (65.0, 65.0, 98.0, 90.0, 90.0, 120.0), "hexagonal"),
    ("hR (hexagonal axes)", (80.0, 80.0, 56.0, 90.0, 90.0, 120.0), "hexagonal"),
    ("hR (rhombohedral axes)", (45.0, 45.0, 45.0, 75.0, 75.0, 75.0), "triclinic"),
    ("cP", (50.0, 50.0, 50.0, 90.0, 90.0, 90.0), "cubic"),
    ("cI", (50.0, 50.0, 50.0, 90.0, 90.0, 90.0), "cubic"),
    ("cF", (50.0, 50.0, 50.0, 90.0, 90.0, 90.0), "cubic"),
]


@pytest.mark.parametrize("lattice,cell,system", BRAVAIS, ids=[b[0] for b in BRAVAIS])
def test_auto_on_each_bravais_lattice(lattice, cell, system):
    assert detect_crystal_system(cell) == system
    free = CRYSTAL_SYSTEMS[system]
    p, s, _ = model("-cell " + " ".join(map(str, cell)) + " -detpixels 8")
    par = parameterise(p, s, ["cell"])
    assert par.crystal_system == system and par.names == [f"cell.{n}" for n in free]
    assert "auto" in par.crystal_system_note and system in par.crystal_system_note


@pytest.mark.parametrize("cell,system", [
    ((50.0, 50.04, 60.0, 90, 90, 90), "tetragonal"),     # a/b differ by 0.08 %: within 0.1 %
    ((50.0, 50.12, 60.0, 90, 90, 90), "orthorhombic"),   # 0.24 %: not tetragonal
    ((50.0, 50.0, 50.0, 90.08, 90, 90), "cubic"),        # 0.08°
    ((50.0, 50.0, 50.0, 90.15, 90, 90), "triclinic"),    # 0.15° on alpha: not even monoclinic (unique axis b)
    ((50.0, 50.0, 50.0, 90, 90.15, 90), "monoclinic"),
    ((60.0, 60.0, 90.0, 90, 90, 119.95), "hexagonal"),
])
def test_auto_tolerances(cell, system):
    assert detect_crystal_system(cell) == system


def test_explicit_system_wins_and_auto_is_the_default():
    assert resolve_crystal_system("orthorhombic", (50, 50, 50, 90, 90, 90)) == ("orthorhombic", "")
    with pytest.raises(ValueError, match="crystal_system must be 'auto' or one of"):
        resolve_crystal_system("rhombohedral", (50, 50, 50, 90, 90, 90))
    p, s, _ = model("-cell 50 50 60 90 90 90 -detpixels 8")
    assert parameterise(p, s, ["cell"]).names == ["cell.a", "cell.c"]
    assert parameterise(p, s, ["cell"], crystal_system="triclinic").n == 6
    assert parameterise(p, s, ["distance"]).crystal_system_note == ""  # nothing to say when the cell is fixed


def test_fit_reports_the_automatic_system():
    p, s, _ = model("-cell 50 50 60 90 90 90 -detpixels 32")
    obs = observe(p, s)
    start = p._replace(crystal=p.crystal._replace(cell=p.crystal.cell * torch.tensor(
        [1.002, 1.002, 0.998, 1, 1, 1], dtype=torch.float64)))
    import refine

    res = refine.fit(obs, start, s, free=["cell", "scale"], coarse_to_fine=False, max_iter=5)
    assert res.crystal_system == "tetragonal" and res.names[:2] == ["cell.a", "cell.c"]
    assert "crystal system tetragonal (auto" in res.summary()
    assert res.to_dict()["crystal_system"] == "tetragonal"
    c = res.params.crystal.cell
    assert float(c[0]) == float(c[1]) and abs(float(c[2]) - 60.0) < 0.05
