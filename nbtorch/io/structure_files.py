"""Structure factors from the files users have: MTZ reflection files and PDB/mmCIF atomic models (via gemmi).

Both readers return exactly what :func:`nbtorch.io.hkl.hkl_to_grid` returns for a text ``-hkl`` file — a dense float64
table ``F[nh, nk, nl]`` of amplitudes (electrons) starting at ``hkl_min`` — plus a :class:`StructureFactorInfo` saying
what was read and how it was converted.  The table is nanoBragg's P1 table: every symmetry mate and Friedel mate is
filled in from the file's space group, so the kernel can look up any (h, k, l) directly.

Conventions shared with the text path (so an MTZ holding the same reflections gives the same table, bit for bit):

* the table spans [min, max] of each index over the (expanded) reflections; cells with no reflection hold
  ``default_F`` — except cells of systematically absent reflections, which are known to be 0 and hold 0;
* a reflection listed in the file always wins over a value generated for it by symmetry, and when a reflection is
  listed twice the later row wins (as for ``-hkl``);
* MTZ columns are float32: each value is widened to float64 through its shortest decimal representation (the value a
  person wrote, e.g. 138.47), not its binary expansion (138.470001220703125), so the table equals the text file's.

gemmi is an optional dependency (``pip install nbtorch[io]``), imported only when a function here is called.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ._parse import display_name
from .hkl import hkl_to_grid

__all__ = [
    "StructureFileError",
    "StructureFactorInfo",
    "is_mtz",
    "read_mtz",
    "model_cell",
    "structure_factors_from_model",
    "expand_to_p1",
    "detector_corner_resolution",
]

#: MTZ column types that can be turned into amplitudes: F amplitude, J intensity, G anomalous amplitude F(+)/F(-),
#: K anomalous intensity I(+)/I(-).
_USABLE_TYPES = {"F": "amplitude", "J": "intensity", "G": "anomalous amplitude", "K": "anomalous intensity"}
_ANOMALOUS_MODES = ("average", "separate")
#: Relative (and absolute, electrons) tolerance for symmetry mates listed in a file to count as equal.
_MATE_RTOL, _MATE_ATOL = 1e-4, 1e-6


class StructureFileError(ValueError):
    """A structure-factor file (MTZ, PDB, mmCIF) that cannot be used; the one-line message names the file."""


class StructureFactorInfo(NamedTuple):
    """What :func:`read_mtz` / :func:`structure_factors_from_model` read and how they converted it.

    Attributes:
        source: the file name.
        column: the MTZ column label(s) used (``"F(+),F(-)"`` for a pair), or ``"model"``.
        spacegroup: Hermann–Mauguin symbol of the space group used for the P1 expansion.
        cell: (a, b, c) Å and (α, β, γ) degrees of the file's (or the given) unit cell.
        n_unique: reflections read from the file (or calculated), before expansion.
        n_p1: distinct (h, k, l) after expansion to P1.
        notes: human-readable lines on every conversion made (intensities → amplitudes, averaging, expansion,
            absences), for a log or a ``--verbose`` report.
    """

    source: str
    column: str
    spacegroup: str
    cell: Tuple[float, float, float, float, float, float]
    n_unique: int
    n_p1: int
    notes: Tuple[str, ...]


def _gemmi():
    try:
        import gemmi  # noqa: PLC0415 - optional dependency, imported lazily
    except ImportError as exc:
        raise ImportError(
            "reading MTZ files and atomic models needs the optional 'gemmi' package: pip install nbtorch[io]"
        ) from exc
    return gemmi


# ---------------------------------------------------------------------------------------------------------------
# space groups and P1 expansion


def _spacegroup(gemmi, name: str, where: str):
    """A gemmi SpaceGroup from a name or number, or a StructureFileError naming ``where``."""
    sg = gemmi.find_spacegroup_by_name(str(name).strip()) if str(name).strip() else None
    if sg is None:
        raise StructureFileError(f"{where}: unknown space group {str(name)!r}")
    return sg


def _check_cell_fits(cell, sg, where: str) -> None:
    if not cell.is_compatible_with_spacegroup(sg, 1e-3):
        raise StructureFileError(
            f"{where}: unit cell {_cell_text(cell)} is not compatible with space group {sg.hm} "
            "(wrong space group or cell?)"
        )


def _cell_text(cell) -> str:
    return "({:g}, {:g}, {:g}, {:g}, {:g}, {:g})".format(*cell.parameters)


def _rotations(sg) -> np.ndarray:
    """The distinct rotation parts of the space group's operators, as integer matrices ``[n_ops, 3, 3]``.

    A row vector h maps to its mate h·R (gemmi's ``Op.apply_to_hkl``); centring translations add no new indices.
    """
    ops = sg.operations()
    mats = {tuple(np.asarray(op.rot, dtype=np.int64).reshape(-1) // op.DEN) for op in ops.sym_ops}
    return np.array(sorted(mats), dtype=np.int64).reshape(-1, 3, 3)


def _keys(hkl: np.ndarray) -> np.ndarray:
    """One int64 key per row of an int64 [n, 3] Miller-index array (indices must lie within ±2**20)."""
    off = hkl + (1 << 20)
    return (off[:, 0] << 42) | (off[:, 1] << 21) | off[:, 2]


def _check_mates_agree(hkl, F, rots, where: str, sg_name: str) -> None:
    """Raise if two listed reflections that are symmetry mates carry different amplitudes (a wrong space group)."""
    n = len(F)
    if n == 0:
        return
    mates = np.einsum("ni,oij->onj", hkl, rots).reshape(-1, 3)
    vals = np.tile(F, len(rots))
    src = np.tile(np.arange(n), len(rots))
    order = np.argsort(_keys(mates), kind="stable")
    k = _keys(mates)[order]
    v, s = vals[order], src[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    hi = np.maximum.reduceat(v, starts)
    lo = np.minimum.reduceat(v, starts)
    bad = np.flatnonzero(hi - lo > _MATE_ATOL + _MATE_RTOL * np.maximum(np.abs(hi), np.abs(lo)))
    if len(bad):
        g = slice(starts[bad[0]], starts[bad[0] + 1] if bad[0] + 1 < len(starts) else len(k))
        i, j = s[g][np.argmax(v[g])], s[g][np.argmin(v[g])]
        raise StructureFileError(
            f"{where}: reflections {tuple(int(x) for x in hkl[i])} and {tuple(int(x) for x in hkl[j])} are "
            f"symmetry mates in {sg_name} but have F {F[i]:g} and {F[j]:g} (wrong space group? use "
            "spacegroup='P 1' to take the reflections as listed)"
        )


def _dedupe_last(hkl: np.ndarray, *values: np.ndarray):
    """Keep the last row of each repeated (h, k, l), in file order."""
    k = _keys(hkl)
    _, first_from_end = np.unique(k[::-1], return_index=True)
    keep = np.sort(len(k) - 1 - first_from_end)
    return (hkl[keep],) + tuple(v[keep] for v in values)


def expand_to_p1(hkl, F, spacegroup, *, F_minus=None, where: str = "expand_to_p1"):
    """Expand reflections to the full P1 list that nanoBragg's table expects.

    Every listed reflection h (amplitude F) gives its symmetry mates h·R for all rotations R of the space group, and
    its Friedel mates −h·R, which get ``F_minus`` when given (anomalous data; where F(−) is missing they fall back to
    F(+), and F(+) mates to F(−)) and F otherwise.  Listed values win over generated ones; a reflection listed twice
    keeps its later value.

    Args:
        hkl: integer array-like [n, 3] of Miller indices.
        F: float array-like [n] of amplitudes (electrons); NaN = not measured (skipped).
        spacegroup: a gemmi ``SpaceGroup`` or a name/number (``"P 21 21 21"``, ``"19"``).
        F_minus: optional float array-like [n]: amplitude of −h for each row (NaN = not measured).
        where: the file or caller named in error messages.

    Returns:
        ``(hkl_p1, F_p1)``: int64 [m, 3] and float64 [m], in an order in which later rows take precedence (pass to
        :func:`~nbtorch.io.hkl.hkl_to_grid`, whose later-row-wins rule then keeps listed values).

    Raises:
        StructureFileError: unknown space group, or listed symmetry mates with different amplitudes (a sign of a wrong
            space group).
    """
    gemmi = _gemmi()
    sg = spacegroup if isinstance(spacegroup, gemmi.SpaceGroup) else _spacegroup(gemmi, spacegroup, where)
    hkl = np.asarray(hkl, dtype=np.int64).reshape(-1, 3)
    F = np.asarray(F, dtype=np.float64).reshape(-1)
    Fm = np.full_like(F, np.nan) if F_minus is None else np.asarray(F_minus, dtype=np.float64).reshape(-1)
    if F.shape != (len(hkl),) or Fm.shape != F.shape:
        raise ValueError(f"{where}: need hkl [n, 3], F [n] and F_minus [n]; got {hkl.shape}, {F.shape}, {Fm.shape}")
    if len(hkl) and np.abs(hkl).max() >= (1 << 20):
        raise StructureFileError(f"{where}: Miller indices beyond ±{1 << 20} are not supported")
    hkl, F, Fm = _dedupe_last(hkl, F, Fm)
    if F_minus is None:
        Fm = F
    rots = _rotations(sg)
    plus, minus = ~np.isnan(F), ~np.isnan(Fm)
    _check_mates_agree(hkl[plus], F[plus], rots, where, sg.hm)
    if F_minus is not None:
        _check_mates_agree(-hkl[minus], Fm[minus], rots, where, sg.hm)
    gen_p = np.einsum("ni,oij->onj", hkl[plus], rots).reshape(-1, 3)
    gen_m = -np.einsum("ni,oij->onj", hkl[minus], rots).reshape(-1, 3)
    vals_p, vals_m = np.tile(F[plus], len(rots)), np.tile(Fm[minus], len(rots))
    if F_minus is None:  # lowest precedence first: Friedel mates, symmetry mates, listed reflections
        parts = [(gen_m, vals_m), (gen_p, vals_p), (hkl[plus], F[plus])]
    else:  # Friedel's law only where the other half of the pair is missing
        parts = [(-gen_p, vals_p), (-gen_m, vals_m), (gen_m, vals_m), (gen_p, vals_p), (-hkl[minus], Fm[minus]),
                 (hkl[plus], F[plus])]
    return np.concatenate([h for h, _ in parts]).astype(np.int64), np.concatenate([v for _, v in parts])


def _grid_with_absences(hkl_p1, F_p1, sg, default_F: float, where: str):
    """hkl_to_grid, then 0 in every cell of a systematically absent reflection that nothing filled."""
    if len(F_p1) == 0:
        raise StructureFileError(f"{where}: no reflections with a value")
    try:
        grid, hkl_min = hkl_to_grid((hkl_p1, F_p1), default_F)
    except ValueError as exc:  # a table too large for memory
        raise StructureFileError(f"{where}: {exc}") from None
    n_zeroed = 0
    ops = sg.operations()
    if float(default_F) != 0.0 and (not sg.is_symmorphic() or sg.centring_type() != "P"):
        filled = np.zeros(grid.shape, dtype=bool)
        filled[tuple((hkl_p1 - np.asarray(hkl_min)).T)] = True
        empty = np.argwhere(~filled)
        for start in range(0, len(empty), 1 << 20):
            idx = empty[start : start + (1 << 20)]
            absent = ops.systematic_absences((idx + np.asarray(hkl_min)).astype(np.int32))
            grid[tuple(idx[absent].T)] = 0.0
            n_zeroed += int(absent.sum())
    n_p1 = len(np.unique(_keys(hkl_p1)))
    return grid, hkl_min, n_p1, n_zeroed


def _expansion_notes(sg, n_unique: int, n_p1: int, n_zeroed: int, anomalous_kept: bool) -> list:
    mates = "symmetry mates" + ("" if anomalous_kept else " and Friedel mates")
    n_rot = len(_rotations(sg))
    notes = [f"expanded from {sg.hm} ({n_rot} rotation{'s' if n_rot != 1 else ''}) to P1 with {mates}: "
             f"{n_unique} -> {n_p1} reflections"]
    if anomalous_kept:
        notes.append("F(+) and F(-) kept apart: -h takes F(-) (F(+) where F(-) is missing)")
    if n_zeroed:
        notes.append(f"{n_zeroed} table cells of systematically absent reflections set to 0 (not default_F)")
    return notes


# ---------------------------------------------------------------------------------------------------------------
# MTZ


def _widen_float32(a: np.ndarray) -> np.ndarray:
    """float32 → float64 through the shortest decimal that round-trips (138.47f → 138.47), NaN kept."""
    return np.asarray(a, dtype=np.float32).astype(str).astype(np.float64)


def is_mtz(path: str | os.PathLike) -> bool:
    """True if the file starts with the MTZ magic ``b"MTZ "`` (how ``-hkl`` tells an MTZ from a text file).

    Raises:
        OSError: the file cannot be read.
    """
    with open(path, "rb") as fh:
        return fh.read(4) == b"MTZ "


def _open_mtz(gemmi, path, name: str):
    if not is_mtz(path):  # a plain OSError naming the file when it cannot be read
        raise StructureFileError(f"{name}: not an MTZ file (it does not start with 'MTZ ')")
    try:
        mtz = gemmi.read_mtz_file(os.fspath(path))
    except (RuntimeError, ValueError) as exc:
        raise StructureFileError(f"{name}: unreadable MTZ file ({exc})") from None
    if len(mtz.batches):
        raise StructureFileError(f"{name}: unmerged MTZ ({len(mtz.batches)} batches); merge it first")
    return mtz


def _column_list(mtz) -> str:
    return ", ".join(f"{c.label}({c.type})" for c in mtz.columns)


def _anomalous_pair(mtz, col, name: str):
    """(plus, minus) columns of an anomalous pair containing ``col`` (adjacent columns of the same type)."""
    cols = list(mtz.columns)
    i = [c.label for c in cols].index(col.label)
    is_minus = "(-)" in col.label or col.label.endswith("-")
    j = i - 1 if is_minus else i + 1
    if 0 <= j < len(cols) and cols[j].type == col.type and cols[j].dataset_id == col.dataset_id:
        return (cols[j], col) if is_minus else (col, cols[j])
    raise StructureFileError(f"{name}: anomalous column {col.label!r} has no {'(+)' if is_minus else '(-)'} partner "
                             f"next to it; columns: {_column_list(mtz)}")


def _choose_columns(mtz, column: Optional[str], name: str):
    """(kind, plus column, minus column or None, label text) for the requested or default column."""
    if column is None:
        for want in ("F", "G"):
            found = [c for c in mtz.columns if c.type == want]
            if found:
                col = found[0]
                break
        else:
            raise StructureFileError(
                f"{name}: no amplitude column (type F or G); columns: {_column_list(mtz)}; "
                "choose an intensity column by label to convert it"
            )
    else:
        col = next((c for c in mtz.columns if c.label == column), None)
        if col is None:
            raise StructureFileError(f"{name}: no column {column!r}; columns: {_column_list(mtz)}")
        if col.type not in _USABLE_TYPES:
            raise StructureFileError(
                f"{name}: column {column!r} has type {col.type!r}, not an amplitude (F, G) or intensity (J, K)"
            )
    if col.type in ("G", "K"):
        plus, minus = _anomalous_pair(mtz, col, name)
        return col.type, plus, minus, f"{plus.label},{minus.label}"
    return col.type, col, None, col.label


def _to_amplitudes(arrays, notes: list, label: str) -> list:
    """Intensities → amplitudes sqrt(max(I, 0)) for each array (None passes), counting negatives in ``notes``."""
    neg = sum(int(np.sum(a < 0)) for a in arrays if a is not None)
    notes.append(f"intensities {label} converted to amplitudes as sqrt(max(I, 0)) (no French-Wilson treatment); "
                 f"{neg} negative intensities set to 0")
    return [None if a is None else np.sqrt(np.maximum(a, 0.0)) for a in arrays]


def _mtz_amplitudes(mtz, kind, plus, minus, label, anomalous: str):
    """(F, F_minus or None, notes) as float64 from the chosen column(s); NaN marks a missing value."""
    notes: list = []
    Fp = _widen_float32(plus.array)
    Fm = None if minus is None else _widen_float32(minus.array)
    if kind in ("J", "K"):
        Fp, Fm = _to_amplitudes([Fp, Fm], notes, label)
    if Fm is not None and anomalous == "average":
        both = ~np.isnan(Fp) & ~np.isnan(Fm)
        Fp = np.where(both, 0.5 * (Fp + Fm), np.where(np.isnan(Fp), Fm, Fp))
        Fm = None
        notes.append(f"anomalous pairs {label} averaged ((F(+) + F(-))/2, or the one measured)")
    return Fp, Fm, notes


def read_mtz(
    path: str | os.PathLike,
    column: Optional[str] = None,
    anomalous: str = "average",
    *,
    default_F: float = 0.0,
    spacegroup: Optional[str] = None,
):
    """Read amplitudes from a merged MTZ file into nanoBragg's dense P1 table (what ``-hkl FILE.mtz`` uses).

    Column choice: ``column=None`` takes the first amplitude column (type F), else the first anomalous amplitude pair
    (type G).  A label picks that column: an amplitude (F); an intensity (J), converted to sqrt(max(I, 0)) with a
    note; or one of an anomalous pair F(+)/F(−) (G) or I(+)/I(−) (K), whose partner is the adjacent column.
    Anomalous pairs are averaged (``anomalous="average"``) or kept apart (``"separate"``: F(+) at h and its
    symmetry mates, F(−) at −h and its mates).  The reflections are expanded to P1 with the file's space group
    (or ``spacegroup``) by :func:`expand_to_p1` and gridded like the text ``-hkl`` path (module docstring).

    Args:
        path: the MTZ file.
        column: column label, or None for the default above.
        anomalous: ``"average"`` or ``"separate"``; ignored for non-anomalous columns.
        default_F: amplitude (electrons) of table cells no reflection fills (``-default_F``), as for ``-hkl``.
        spacegroup: name or number overriding the file's space group (``"P 1"`` takes the reflections as listed).

    Returns:
        ``(F, hkl_min, info)``: float64 numpy array [nh, nk, nl] (electrons), the (h, k, l) of ``F[0, 0, 0]``, and a
        :class:`StructureFactorInfo`.

    Raises:
        StructureFileError (a ValueError): the file is not an MTZ or is unmerged, the column is missing (the message
            lists the columns) or not usable, there is no amplitude column, the space group is missing, unknown or
            incompatible with the cell, listed symmetry mates disagree, or no reflection has a value.
        OSError: the file cannot be read.  ImportError: gemmi is not installed.
    """
    gemmi = _gemmi()
    name = display_name(path)
    if anomalous not in _ANOMALOUS_MODES:
        raise ValueError(f"read_mtz {name}: anomalous must be one of {_ANOMALOUS_MODES}, got {anomalous!r}")
    if not math.isfinite(float(default_F)) or float(default_F) < 0:
        raise ValueError(f"read_mtz {name}: default_F must be finite and >= 0, got {default_F!r}")
    mtz = _open_mtz(gemmi, path, name)
    if spacegroup is not None:
        sg = _spacegroup(gemmi, spacegroup, name)
    elif mtz.spacegroup is None:
        raise StructureFileError(f"{name}: the MTZ has no (known) space group {mtz.spacegroup_name!r}; "
                                 "give spacegroup=")
    else:
        sg = mtz.spacegroup
    _check_cell_fits(mtz.cell, sg, name)
    kind, plus, minus, label = _choose_columns(mtz, column, name)
    Fp, Fm, notes = _mtz_amplitudes(mtz, kind, plus, minus, label, anomalous)
    hkl = np.asarray(mtz.make_miller_array(), dtype=np.int64).reshape(-1, 3)
    has = ~np.isnan(Fp) if Fm is None else ~(np.isnan(Fp) & np.isnan(Fm))
    hkl, Fp = hkl[has], Fp[has]
    Fm = None if Fm is None else Fm[has]
    hkl_p1, F_p1 = expand_to_p1(hkl, Fp, sg, F_minus=Fm, where=name)
    grid, hkl_min, n_p1, n_zeroed = _grid_with_absences(hkl_p1, F_p1, sg, default_F, name)
    notes += _expansion_notes(sg, len(hkl), n_p1, n_zeroed, Fm is not None)
    info = StructureFactorInfo(name, label, sg.hm, tuple(mtz.cell.parameters), len(hkl), n_p1, tuple(notes))
    return grid, hkl_min, info


# ---------------------------------------------------------------------------------------------------------------
# atomic models


def _read_model(gemmi, path, name: str):
    with open(path, "rb"):
        pass  # a plain OSError naming the file when it cannot be read
    try:
        st = gemmi.read_structure(os.fspath(path))
    except (RuntimeError, ValueError) as exc:
        raise StructureFileError(f"{name}: not a PDB or mmCIF model ({exc})") from None
    if len(st) == 0 or st[0].count_atom_sites() == 0:
        raise StructureFileError(f"{name}: no atoms (not a PDB or mmCIF model?)")
    return st


def model_cell(path: str | os.PathLike) -> Optional[Tuple[float, float, float, float, float, float]]:
    """The unit cell of a PDB or mmCIF model (``CRYST1`` / ``_cell``): (a, b, c) in Å, (α, β, γ) in degrees, or None
    when the model has none.

    What ``-pdb FILE`` uses for the crystal when neither ``-cell`` nor ``-mat`` is given.

    Raises:
        StructureFileError: not a PDB or mmCIF model, or no atoms.  OSError: the file cannot be read.
        ImportError: gemmi is not installed.
    """
    gemmi = _gemmi()
    name = display_name(path)
    st = _read_model(gemmi, path, name)
    return tuple(float(x) for x in st.cell.parameters) if st.cell.is_crystal() else None


def _check_float(value, what: str, name: str, low: float = 0.0, strict: bool = True) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {what} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < low or (strict and v == low):
        raise ValueError(f"{name}: {what} must be finite and {'>' if strict else '>='} {low:g}, got {value!r}")
    return v


def _model_cell_and_group(gemmi, st, cell, spacegroup, name: str, notes: list):
    """Set the structure's cell and space group (given or from the file) and return the SpaceGroup."""
    if cell is not None:
        vals = [_check_float(x, "cell", name) for x in cell]
        if len(vals) != 6:
            raise ValueError(f"{name}: cell must be (a, b, c, alpha, beta, gamma), got {cell!r}")
        st.cell = gemmi.UnitCell(*vals)
        notes.append("unit cell {} given, not the file's".format(_cell_text(st.cell)))
    elif not st.cell.is_crystal():
        raise StructureFileError(f"{name}: no unit cell in the model (CRYST1 / _cell); give cell=(a, b, c, al, be, ga)")
    if spacegroup is not None:
        sg = _spacegroup(gemmi, spacegroup, name)
    elif st.spacegroup_hm.strip():
        sg = st.find_spacegroup()
        if sg is None:
            raise StructureFileError(f"{name}: unknown space group {st.spacegroup_hm!r} in the model")
    else:
        sg = gemmi.SpaceGroup("P 1")
        notes.append("no space group in the model: P 1 assumed")
    _check_cell_fits(st.cell, sg, name)
    st.spacegroup_hm = sg.xhm()
    st.setup_cell_images()
    return sg


def _override_b(gemmi, st, bfactor: float) -> None:
    zero = gemmi.SMat33f(0, 0, 0, 0, 0, 0)
    for residue in (r for chain in st[0] for r in chain):
        for atom in residue:
            atom.b_iso = bfactor
            atom.aniso = zero


def _fft_values(gemmi, st, dmin: float, hkl: np.ndarray, rate: float) -> np.ndarray:
    """Complex F of the model at ``hkl`` [n, 3] from a density grid and its FFT (gemmi's sfcalc method)."""
    dc = gemmi.DensityCalculatorX()
    dc.d_min = dmin
    dc.rate = rate
    dc.set_grid_cell_and_spacegroup(st)
    dc.set_refmac_compatible_blur(st[0])
    dc.put_model_density_on_grid(st[0])
    grid = gemmi.transform_map_to_f_phi(dc.grid)
    vals = np.array([grid.get_value(int(h), int(k), int(l)) for h, k, l in hkl], dtype=np.complex128)
    inv_d2 = st.cell.calculate_1_d2_array(hkl.astype(np.int32))
    return vals * np.exp(dc.blur * inv_d2 / 4.0)


def _direct_values(gemmi, st, hkl: np.ndarray) -> np.ndarray:
    """Complex F of the model at ``hkl`` [n, 3] by direct summation over atoms and symmetry operators."""
    calc = gemmi.StructureFactorCalculatorX(st.cell)
    return np.array([calc.calculate_sf_from_model(st[0], [int(x) for x in h]) for h in hkl], dtype=np.complex128)


def _bulk_solvent(gemmi, st, dmin: float, hkl: np.ndarray, k_sol: float, b_sol: float, rate: float) -> np.ndarray:
    """Flat bulk-solvent contribution k_sol·exp(−B_sol/(4d²))·F_mask at ``hkl`` (complex, electrons)."""
    mask = gemmi.FloatGrid()
    mask.setup_from(st, spacing=dmin / (2.0 * rate))
    gemmi.SolventMasker(gemmi.AtomicRadiiSet.Cctbx).put_mask_on_float_grid(mask, st[0])
    fmask = gemmi.transform_map_to_f_phi(mask)
    vals = np.array([fmask.get_value(int(h), int(k), int(l)) for h, k, l in hkl], dtype=np.complex128)
    inv_d2 = st.cell.calculate_1_d2_array(hkl.astype(np.int32))
    return k_sol * np.exp(-b_sol * inv_d2 / 4.0) * vals


def structure_factors_from_model(
    path: str | os.PathLike,
    dmin: float,
    *,
    cell: Optional[Sequence[float]] = None,
    bfactor: Optional[float] = None,
    solvent: bool = False,
    default_F: float = 0.0,
    spacegroup: Optional[str] = None,
    method: str = "fft",
    k_sol: float = 0.35,
    b_sol: float = 46.0,
    rate: float = 1.5,
):
    """|F| of a PDB or mmCIF model to resolution ``dmin``, as nanoBragg's dense P1 table (what ``-pdb FILE`` uses).

    X-ray form factors (no anomalous terms, so Friedel's law holds) of every atom of the first model, with its
    occupancy and B (isotropic or anisotropic); with ``bfactor`` every atom gets that isotropic B instead.  The unique
    reflections with d ≥ ``dmin`` (gemmi's ``make_miller_array``) are calculated in the model's space group and
    expanded to P1 with :func:`expand_to_p1`; the table is gridded like the text ``-hkl`` path (module docstring), so
    reflections beyond ``dmin`` get ``default_F``.

    Args:
        path: PDB or mmCIF (or mmJSON) file.
        dmin: resolution limit (Å), > 0; the CLI passes :func:`detector_corner_resolution`.
        cell: (a, b, c) Å, (α, β, γ) degrees replacing the model's cell (needed when the file has none).
        bfactor: isotropic B (Å², ≥ 0) given to every atom, or None to keep the model's.
        solvent: add a flat bulk-solvent model k_sol·exp(−b_sol·s²/4)·F_mask (s = 1/d; mask from gemmi's
            ``SolventMasker``); off by default.
        default_F: amplitude of table cells outside the calculated set (``-default_F``).
        spacegroup: name or number overriding the model's space group (P 1 is assumed when the file has none).
        method: ``"fft"`` (density on a grid, then FFT, as gemmi's ``sfcalc``; relative error ~1e-4, fast) or
            ``"direct"`` (exact sum over atoms and symmetry operators; slow for large models).
        k_sol: solvent density (e/Å³) of the bulk-solvent model.   b_sol: its B (Å²).
        rate: grid oversampling of the FFT method and of the solvent mask.

    Returns:
        ``(F, hkl_min, info)`` as :func:`read_mtz`: float64 [nh, nk, nl] amplitudes (electrons), the index of
        ``F[0, 0, 0]``, and a :class:`StructureFactorInfo`.

    Raises:
        StructureFileError (a ValueError): not a model, no atoms, no cell, unknown space group or one incompatible with
            the cell.  ValueError: bad ``dmin``, ``cell``, ``bfactor``, ``method``.  OSError: the file cannot be read.
            ImportError: gemmi is not installed.
    """
    gemmi = _gemmi()
    name = display_name(path)
    dmin = _check_float(dmin, "dmin (Å)", name)
    if method not in ("fft", "direct"):
        raise ValueError(f"{name}: method must be 'fft' or 'direct', got {method!r}")
    bfac = None if bfactor is None else _check_float(bfactor, "bfactor (Å²)", name, strict=False)
    default_F = _check_float(default_F, "default_F", name, strict=False)
    notes: list = []
    st = _read_model(gemmi, path, name)
    sg = _model_cell_and_group(gemmi, st, cell, spacegroup, name, notes)
    if bfac is not None:
        _override_b(gemmi, st, bfac)
        notes.append(f"every atom's B set to {bfac:g} Å² (anisotropic B removed)")
    hkl = np.asarray(gemmi.make_miller_array(st.cell, sg, dmin), dtype=np.int64).reshape(-1, 3)
    if len(hkl) == 0:
        raise StructureFileError(f"{name}: no reflection with d >= {dmin:g} Å in cell {_cell_text(st.cell)}")
    Fc = _fft_values(gemmi, st, dmin, hkl, rate) if method == "fft" else _direct_values(gemmi, st, hkl)
    notes.append(f"|F| calculated from {st[0].count_atom_sites()} atoms to {dmin:g} Å ({method})")
    if solvent:
        Fc = Fc + _bulk_solvent(gemmi, st, dmin, hkl, float(k_sol), float(b_sol), rate)
        notes.append(f"flat bulk solvent added (k_sol {float(k_sol):g} e/Å³, B_sol {float(b_sol):g} Å²)")
    hkl_p1, F_p1 = expand_to_p1(hkl, np.abs(Fc), sg, where=name)
    grid, hkl_min, n_p1, n_zeroed = _grid_with_absences(hkl_p1, F_p1, sg, default_F, name)
    notes += _expansion_notes(sg, len(hkl), n_p1, n_zeroed, False)
    info = StructureFactorInfo(name, "model", sg.hm, tuple(st.cell.parameters), len(hkl), n_p1, tuple(notes))
    return grid, hkl_min, info


# ---------------------------------------------------------------------------------------------------------------
# resolution at the detector corners


def detector_corner_resolution(params, setup) -> float:
    """Best resolution d (Å) reached at the four outer corners of the detector.

    d = 1/|q| with q = (s − s0)/λ for every corner direction s and every source (direction s0, wavelength
    λ0·factor) of ``setup.sources``; the smallest d over corners and sources is returned.  For a flat detector whose
    scattering angles stay below 90° the highest angle on the panel is at a corner, so no pixel reaches a finer d.
    Only ``params.detector`` and ``params.beam.wavelength`` are used (a provisional ``Params`` with an empty F table
    is fine); values are taken in float64 and detached.

    Args:
        params: :class:`~nbtorch.types.Params` (unbatched).
        setup: :class:`~nbtorch.types.Setup` (pixel counts, pixel size, convention, ``curved_det``, sources).

    Returns:
        d_min in Å (a Python float, > 0).
    """
    import torch  # noqa: PLC0415 - the io package stays importable without touching torch at import time

    from ..detector import detector_frame
    from ..kernel import curve
    from ..pytree import tree_map

    det = tree_map(lambda t: torch.as_tensor(t).detach().to(torch.float64), params.detector)
    frame = detector_frame(det, setup)
    p = setup.pixel_size
    F = torch.tensor([0.0, setup.fpixels * p, 0.0, setup.fpixels * p], dtype=torch.float64)
    S = torch.tensor([0.0, 0.0, setup.spixels * p, setup.spixels * p], dtype=torch.float64)
    pos = frame.pix0 + F[:, None] * frame.fdet + S[:, None] * frame.sdet  # [4, 3] mm
    if setup.curved_det:
        beam = torch.tensor(setup.beam, dtype=torch.float64)
        pos = torch.stack(curve(pos.unbind(-1), frame.fdet, frame.sdet, beam, frame.distance), -1)
    s = pos / torch.linalg.vector_norm(pos, dim=-1, keepdim=True)
    s0 = torch.tensor([src[0] for src in setup.sources], dtype=torch.float64)  # [K, 3]
    lam = float(params.beam.wavelength) * torch.tensor([src[1] for src in setup.sources], dtype=torch.float64)
    q = (s[:, None, :] - s0[None, :, :]) / lam[None, :, None]
    qmax = float(torch.linalg.vector_norm(q, dim=-1).max())
    if not qmax > 0.0:
        raise ValueError("detector_corner_resolution: the detector corners see no scattering (|q| = 0)")
    return 1.0 / qmax
