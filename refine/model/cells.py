"""Crystal systems: which cell values (a, b, c in Å; α, β, γ in degrees) are free, which are tied to them and which
angles are fixed; and the system a starting cell satisfies (``crystal_system="auto"``).  Monoclinic cells have the
unique axis b; hexagonal cells (and rhombohedral lattices in the hexagonal setting) have a = b, γ = 120°; a cell on
rhombohedral axes is refined as triclinic.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

#: Per crystal system, highest symmetry first (the order ``crystal_system="auto"`` tries them): each free cell value
#: → the rows of the cell 6-vector it drives (b = a, …).
CELL_ROWS: Dict[str, Dict[str, Tuple[int, ...]]] = {
    "cubic": {"a": (0, 1, 2)},
    "hexagonal": {"a": (0, 1), "c": (2,)},
    "tetragonal": {"a": (0, 1), "c": (2,)},
    "orthorhombic": {"a": (0,), "b": (1,), "c": (2,)},
    "monoclinic": {"a": (0,), "b": (1,), "c": (2,), "beta": (4,)},
    "triclinic": {"a": (0,), "b": (1,), "c": (2,), "alpha": (3,), "beta": (4,), "gamma": (5,)},
}
#: Crystal systems → their free cell values.
CRYSTAL_SYSTEMS = {system: tuple(rows) for system, rows in CELL_ROWS.items()}
_ANGLES = ("alpha", "beta", "gamma")
#: Fixed angles (α, β, γ) per system, None where free: 90°, but the hexagonal γ = 120°.
FIXED_ANGLES: Dict[str, Tuple[Optional[float], ...]] = {
    system: tuple(None if a in free else 120.0 if (system, a) == ("hexagonal", "gamma") else 90.0 for a in _ANGLES)
    for system, free in CRYSTAL_SYSTEMS.items()}
#: Tolerances of ``crystal_system="auto"``: relative length difference and angle difference (degrees).
AUTO_TOL_LENGTH = 1e-3
AUTO_TOL_ANGLE = 0.1


def check_system(system: str) -> None:
    """ValueError unless ``system`` is one of :data:`CRYSTAL_SYSTEMS`."""
    if system not in CRYSTAL_SYSTEMS:
        raise ValueError(f"crystal_system must be 'auto' or one of {', '.join(CRYSTAL_SYSTEMS)}; got {system!r}")


def deviation(cell: Sequence[float], system: str) -> Tuple[Tuple[float, str], Tuple[float, str]]:
    """How far ``cell`` (Å, deg) is from ``system``: ((largest relative spread of tied lengths, phrase),
    (largest error of a fixed angle in degrees, phrase)); each phrase names the worst offender."""
    check_system(system)
    cell = [float(v) for v in cell]
    length, angle = (0.0, ""), (0.0, "")
    for rows in CELL_ROWS[system].values():
        vals = [cell[r] for r in rows if r < 3]
        if len(vals) > 1:
            mean = sum(vals) / len(vals)
            spread = max(abs(v - mean) for v in vals) / mean
            if spread > length[0]:
                length = (spread, f"lengths {'/'.join('abc'[r] for r in rows)} differ by {spread:.2%}")
    for k, fixed in enumerate(FIXED_ANGLES[system]):
        if fixed is not None and abs(cell[3 + k] - fixed) > angle[0]:
            angle = (abs(cell[3 + k] - fixed), f"{_ANGLES[k]} = {cell[3 + k]:g} deg should be {fixed:g}")
    return length, angle


def symmetrize_cell(cell: Sequence[float], system: str, tol_length: float = 0.02, tol_angle: float = 1.0):
    """The cell (a, b, c Å; α, β, γ deg) made exactly ``system``-symmetric (tied lengths averaged, fixed angles set)
    → list of 6 floats.  ``ValueError`` if it deviates from the system by more than ``tol_length`` (relative) or
    ``tol_angle`` (degrees)."""
    length, angle = deviation(cell, system)
    if length[0] > tol_length or angle[0] > tol_angle:
        what = length[1] if length[0] > tol_length else angle[1]
        raise ValueError(f"cell {[float(v) for v in cell]} is not {system}: {what}; choose another crystal_system")
    out = [float(v) for v in cell]
    for rows in CELL_ROWS[system].values():
        mean = sum(out[r] for r in rows) / len(rows)
        for r in rows:
            out[r] = mean
    for k, fixed in enumerate(FIXED_ANGLES[system]):
        if fixed is not None:
            out[3 + k] = fixed
    return out


def detect_crystal_system(cell: Sequence[float], tol_length: float = AUTO_TOL_LENGTH,
                          tol_angle: float = AUTO_TOL_ANGLE) -> str:
    """The highest-symmetry system of :data:`CRYSTAL_SYSTEMS` that ``cell`` (Å, deg) satisfies within ``tol_length``
    (relative, default 0.1 %) and ``tol_angle`` (degrees, default 0.1°): what ``crystal_system="auto"`` picks."""
    for system in CRYSTAL_SYSTEMS:
        length, angle = deviation(cell, system)
        if length[0] <= tol_length and angle[0] <= tol_angle:
            return system
    return "triclinic"  # pragma: no cover - triclinic has no constraint


def resolve_crystal_system(system: str, cell: Sequence[float]) -> Tuple[str, str]:
    """(system, note): ``system`` itself, or for 'auto' the detected one with a note saying why (for summaries)."""
    if system != "auto":
        check_system(system)
        return system, ""
    found = detect_crystal_system(cell)
    return found, (f"crystal system {found} (auto: the highest symmetry the starting cell satisfies within "
                   f"{AUTO_TOL_LENGTH:.1%} and {AUTO_TOL_ANGLE:g}°)")
