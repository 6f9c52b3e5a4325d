"""Structure factors from the files users have: MTZ reflection files and PDB/mmCIF atomic models (via gemmi).

Both readers return exactly what :func:`nbtorch.io.hkl.hkl_to_grid` returns for a text ``-hkl`` file — a dense float64
table ``F[nh, nk, nl]`` of amplitudes (electrons) starting at ``hkl_min`` — plus a :class:`StructureFactorInfo` saying
what was read and how it was converted.  The table is nanoBragg's P1 table: every symmetry mate and Friedel mate is
filled in from the file's space group, so the kernel can look up any (h, k, l) directly.

Conventions of the MTZ path, shared with the text path (so an MTZ holding the same reflections gives the same table,
bit for bit):

* the table spans [min, max] of each index over the (expanded) reflections; cells with no reflection hold
  ``default_F`` — except cells of systematically absent reflections, which are known to be 0 and hold 0;
* a reflection listed in the file always wins over a value generated for it by symmetry, and when a reflection is
  listed twice the later row wins (as for ``-hkl``);
* MTZ columns are float32: each value is widened to float64 through its shortest decimal representation (the value a
  person wrote, e.g. 138.47), not its binary expansion (138.470001220703125), so the table equals the text file's.

A model's table spans |h| ≤ a/dmin (likewise k, l): every cell within ``dmin`` but F(000) calculated, the others
``default_F``.
Its atoms are checked first; its work is estimated, bounded and done in chunks (:func:`structure_factors_from_model`).

gemmi is an optional dependency (``pip install nbtorch[io]``), imported only when a function here is called.
"""
from __future__ import annotations

import itertools
import math
import os
import warnings
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
    "ModelWork",
    "ModelWorkError",
    "ModelWorkWarning",
    "available_memory",
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


#: How the two halves of an anomalous pair are labelled (CCP4: F(+)/F(-), I(+)/I(-); also FPLUS/FMINUS and a
#: trailing +/-): the (+) mark, the (-) mark.
_PAIR_MARKS = (("(+)", "(-)"), ("PLUS", "MINUS"), ("plus", "minus"), ("Plus", "Minus"))


def _partner_label(label: str) -> Optional[Tuple[str, bool]]:
    """(the label of the other half of an anomalous pair, whether ``label`` is the (-) half), or None when the label
    carries no mark (:data:`_PAIR_MARKS`, or a trailing + or -)."""
    for plus, minus in _PAIR_MARKS:
        for mine, other, is_minus in ((plus, minus, False), (minus, plus, True)):
            at = label.rfind(mine)
            if at >= 0:
                return label[:at] + other + label[at + len(mine):], is_minus
    if label[-1:] in ("+", "-"):
        return label[:-1] + ("-" if label[-1] == "+" else "+"), label[-1] == "-"
    return None


def _anomalous_pair(mtz, col, name: str):
    """(plus, minus) columns of the anomalous pair containing ``col``; the partner is found by its label (F(+) ↔
    F(-), I(+) ↔ I(-), FPLUS ↔ FMINUS, F+ ↔ F-), wherever it stands among the columns, and must have the same type."""
    found = _partner_label(col.label)
    if found is None:
        raise StructureFileError(f"{name}: anomalous column {col.label!r} (type {col.type}) is not labelled as one "
                                 "half of a pair (F(+)/F(-), I(+)/I(-), ...PLUS/...MINUS or a trailing +/-); "
                                 f"columns: {_column_list(mtz)}")
    label, is_minus = found
    other = next((c for c in mtz.columns if c.label == label), None)
    if other is None:
        raise StructureFileError(f"{name}: anomalous column {col.label!r} has no partner {label!r}; columns: "
                                 f"{_column_list(mtz)}")
    if other.type != col.type:
        raise StructureFileError(f"{name}: anomalous columns {col.label!r} and {label!r} have different types "
                                 f"({col.type}, {other.type}); columns: {_column_list(mtz)}")
    return (other, col) if is_minus else (col, other)


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
    note; or one of an anomalous pair F(+)/F(−) (G) or I(+)/I(−) (K), whose partner is found by its label (the
    CCP4 layout ``F(+) SIGF(+) F(-) SIGF(-)``, or ``FPLUS``/``FMINUS``, ``F+``/``F-``).
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
# atomic models: reading and checking

#: Atoms farther than this from the origin along any axis (Å) are refused as absurd: a PDB file cannot even write
#: 10⁴ Å, and no crystal's cell comes near 10⁵ Å.
MAX_COORDINATE = 1e5


def _atom_text(serial, name, resname, resnum, chain) -> str:
    return f"atom {serial} {name!r} (residue {resname} {resnum}, chain {chain})"


def _check_pdb_coordinates(path, name: str) -> None:
    """StructureFileError naming the first ATOM/HETATM record of a PDB file whose x, y or z (columns 31–54) is not a
    finite number (gemmi reads ``nan`` or garbage there as 0)."""
    with open(path, "rb") as fh:
        for raw in fh:
            if not raw.startswith((b"ATOM  ", b"HETATM")):
                continue
            line = raw.decode("latin-1").rstrip("\r\n")
            fields = [line[i:i + 8].strip() for i in (30, 38, 46)]
            try:
                ok = all(math.isfinite(float(f)) for f in fields)
            except ValueError:
                ok = False
            if not ok:
                atom = _atom_text(line[6:11].strip(), line[12:16].strip(), line[17:20].strip(), line[22:26].strip(),
                                  line[21:22].strip())
                raise StructureFileError(f"{name}: {atom} has coordinates {' '.join(fields)!r}, not three numbers")


def _check_atoms(model, name: str) -> None:
    """StructureFileError naming the first atom of ``model`` with an unknown element, a coordinate that is not finite
    or beyond ±:data:`MAX_COORDINATE` Å, or an occupancy or B that is not finite."""
    for chain in model:
        for res in chain:
            for atom in res:
                p = atom.pos
                problem = None
                if atom.element.atomic_number == 0:
                    problem = "has an unknown element (give a chemical symbol: PDB columns 77-78, mmCIF type_symbol)"
                elif not all(math.isfinite(v) and abs(v) <= MAX_COORDINATE for v in (p.x, p.y, p.z)):
                    problem = (f"is at ({p.x:g}, {p.y:g}, {p.z:g}) Å: coordinates must be finite and within "
                               f"±{MAX_COORDINATE:g} Å")
                elif not (math.isfinite(atom.occ) and math.isfinite(atom.b_iso)):
                    problem = f"has occupancy {atom.occ:g} and B {atom.b_iso:g}: both must be finite"
                if problem:
                    icode = res.seqid.icode.strip()
                    atom_id = _atom_text(atom.serial, atom.name, res.name, f"{res.seqid.num}{icode}", chain.name)
                    raise StructureFileError(f"{name}: {atom_id} {problem}")


def _read_model(gemmi, path, name: str):
    """The structure of a PDB/mmCIF file with its first model checked (:func:`_check_atoms`)."""
    with open(path, "rb"):
        pass  # a plain OSError naming the file when it cannot be read
    try:
        st = gemmi.read_structure(os.fspath(path))
    except (RuntimeError, ValueError) as exc:
        raise StructureFileError(f"{name}: not a PDB or mmCIF model ({exc})") from None
    if len(st) == 0 or st[0].count_atom_sites() == 0:
        raise StructureFileError(f"{name}: no atoms (an empty model, or not a PDB or mmCIF file)")
    if st.input_format == gemmi.CoorFormat.Pdb:
        _check_pdb_coordinates(path, name)
    _check_atoms(st[0], name)
    return st


def model_cell(path: str | os.PathLike) -> Optional[Tuple[float, float, float, float, float, float]]:
    """The unit cell of a PDB or mmCIF model (``CRYST1`` / ``_cell``): (a, b, c) in Å, (α, β, γ) in degrees, or None
    when the model has none.

    What ``-pdb FILE`` uses for the crystal when neither ``-cell`` nor ``-mat`` is given.  The model's atoms are
    checked as :func:`structure_factors_from_model` checks them.

    Raises:
        StructureFileError: not a PDB or mmCIF model, no atoms, or an atom of unknown element or at a non-finite or
            absurd position.  OSError: the file cannot be read.  ImportError: gemmi is not installed.
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


# ---------------------------------------------------------------------------------------------------------------
# atomic models: the work, estimated before it starts

#: A model whose structure factors are estimated to take longer than this (s) gets a :class:`ModelWorkWarning`.
LONG_SECONDS = 10.0
#: Work items (grid points, table cells × operators) per chunk of the calculation: each chunk takes well under
#: 0.2 s, so a Ctrl-C or SIGTERM acts within a second, and the temporary arrays stay near 100 MB.
_CHUNK = 1 << 20
#: Rough costs on one core (s): per density-grid point an atom covers, per density-grid point of the FFT, per table
#: cell and operator, per reflection, atom and operator of the direct sum.  Only for the estimate.
_SEC_DENSITY, _SEC_FFT, _SEC_TABLE, _SEC_DIRECT = 2.5e-8, 6e-8, 5e-8, 6e-8


class ModelWorkError(StructureFileError):
    """The structure factors of a model would need more memory than is available; ``work`` is the
    :class:`ModelWork` estimate and ``limit`` the bytes available."""

    def __init__(self, message: str, work: "ModelWork", limit: int):
        super().__init__(message)
        self.work, self.limit = work, limit


class ModelWorkWarning(UserWarning):
    """The structure factors of a model are estimated to take more than :data:`LONG_SECONDS`."""


class ModelWork(NamedTuple):
    """What :func:`structure_factors_from_model` will do, estimated before it starts.

    Attributes:
        atoms: atoms in the model's first model.
        dmin: resolution (Å).
        table: (nh, nk, nl) cells of the P1 table (float64).
        grid: (nu, nv, nw) points of the density grid (float32; ``(0, 0, 0)`` for the direct method).
        bytes: peak memory of the calculation (table included).
        seconds: rough time on one core.
    """

    atoms: int
    dmin: float
    table: Tuple[int, int, int]
    grid: Tuple[int, int, int]
    bytes: int
    seconds: float

    def describe(self) -> str:
        """One phrase: ``|F| of N atoms to d Å: about T s and M GB (a … density grid, a … table)``."""
        grid = f"a {'×'.join(map(str, self.grid))} density grid, " if any(self.grid) else ""
        return (f"|F| of {self.atoms} atoms to {self.dmin:.3g} Å: about {self.seconds:.2g} s and "
                f"{self.bytes / 1e9:.2g} GB ({grid}a {'×'.join(map(str, self.table))} table)")


def available_memory() -> Optional[int]:
    """Bytes of memory available to a new allocation (``MemAvailable`` of /proc/meminfo, else the physical memory),
    or None when the system does not say."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def _fft_size(n: int) -> int:
    """The smallest integer >= n whose only prime factors are 2, 3 and 5 (a fast FFT length)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


class _Layout(NamedTuple):
    """Sizes of a model calculation: half-extents of the table (``half``) and of the F_asu box (``half_asu``, a
    little larger: symmetry mates of a cell of a cell only nearly compatible with the group may reach beyond the
    table), and the density grid (``grid``)."""

    half: Tuple[int, int, int]
    half_asu: Tuple[int, int, int]
    grid: Tuple[int, int, int]


def _layout(cell, dmin: float, rate: float) -> _Layout:
    lengths = cell.parameters[:3]
    half = tuple(int(math.floor(x / dmin + 1e-9)) for x in lengths)
    half_asu = tuple(int(math.floor(x / dmin * 1.003)) + 1 for x in lengths)
    grid = tuple(_fft_size(max(int(math.ceil(2.0 * rate * x / dmin)), 2 * h + 2)) for x, h in zip(lengths, half_asu))
    return _Layout(half, half_asu, grid)


def _estimate(gemmi, st, sg, dmin: float, method: str, rate: float, solvent: bool) -> ModelWork:
    """:class:`ModelWork` of a calculation (cell, space group and B already set on ``st``)."""
    lay = _layout(st.cell, dmin, rate)
    table = tuple(2 * h + 1 for h in lay.half)
    n_table = table[0] * table[1] * table[2]
    n_ops = len(sg.operations().sym_ops)
    n_rot = len(_rotations(sg))
    atoms = st[0].count_atom_sites()
    n_grid = lay.grid[0] * lay.grid[1] * lay.grid[2] if method == "fft" else 0
    chunk = 128 * min(_CHUNK, max(n_table, n_grid))  # temporaries of one chunk, and room for the allocator
    n_in = 4.0 / 3.0 * math.pi * st.cell.volume / dmin**3  # cells within dmin
    n_unique = n_in / (2 * n_rot)
    if method == "direct":
        grid = (0, 0, 0)
        peak = 8 * n_table + chunk
        seconds = n_unique * max(atoms, 1) * n_ops * _SEC_DIRECT
    else:
        grid = lay.grid
        hu, hv, hw = lay.half_asu
        A = 8 * grid[2] * (2 * hv + 1) * (hu + 1)
        B = 8 * (2 * hw + 1) * (2 * hv + 1) * (hu + 1)
        peak = max(4 * n_grid + A, A + B, B + 8 * n_table) + chunk
        dc = gemmi.DensityCalculatorX()
        dc.d_min, dc.rate = dmin, rate
        dc.set_refmac_compatible_blur(st[0])
        sample = list(itertools.islice((a for ch in st[0] for r in ch for a in r), 200))  # atom radii vary with B
        r3 = sum(dc.estimate_radius(a) ** 3 for a in sample) / max(len(sample), 1)
        per_atom = 4.0 / 3.0 * math.pi * r3 * n_grid / st.cell.volume
        seconds = (atoms * per_atom * _SEC_DENSITY + n_grid * _SEC_FFT + n_table * (n_rot + n_ops / 4)
                   * _SEC_TABLE)
        if solvent:
            peak += 12 * n_grid
    return ModelWork(int(atoms), float(dmin), table, grid, int(peak), float(seconds))


def _check_work(work: ModelWork, max_bytes: Optional[int], long_seconds: float, name: str) -> None:
    """Refuse (:class:`ModelWorkError`) work beyond ``max_bytes`` (None: :func:`available_memory`); warn
    (:class:`ModelWorkWarning`) when it is estimated to take longer than ``long_seconds``."""
    limit = available_memory() if max_bytes is None else int(max_bytes)
    if limit is not None and work.bytes > limit:
        raise ModelWorkError(f"{name}: {work.describe()}: more than the {limit / 1e9:.2g} GB of memory available",
                             work, limit)
    if work.seconds > long_seconds:
        warnings.warn(f"{name}: {work.describe()}; a coarser dmin is faster", ModelWorkWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------------------------
# atomic models: the calculation, in chunks


def _asu_transform(gemmi, st, dmin: float, rate: float, lay: _Layout):
    """Fourier transform of the density of the model's own atoms (no symmetry mates) on a P1 grid, pruned to the
    box |h|, |k|, |l| <= ``lay.half_asu``: (complex64 array [2·lw+1, 2·lv+1, hu+1] indexed [l, k, h] for h >= 0
    (l, k modulo their lengths), holding numpy's e^(−2πi h·x) sum; blur B (Å²) put on the atoms; scale V/N).

    Atoms are put on the grid one at a time and the transform is done a slab at a time (:data:`_CHUNK`), so the
    program returns to Python every few milliseconds."""
    dc = gemmi.DensityCalculatorX()
    dc.d_min, dc.rate = dmin, rate
    dc.set_refmac_compatible_blur(st[0])
    dc.grid.set_unit_cell(st.cell)
    dc.grid.spacegroup = gemmi.SpaceGroup("P 1")
    dc.grid.set_size(*lay.grid)
    for chain in st[0]:
        for res in chain:
            for atom in res:
                dc.add_atom_density_to_grid(atom)
    nu, nv, nw = lay.grid
    hu, hv, hw = lay.half_asu
    rho = np.array(dc.grid, copy=False).T  # [w, v, u], C order
    rows_k = np.r_[0:hv + 1, nv - hv:nv]
    A = np.empty((nw, 2 * hv + 1, hu + 1), dtype=np.complex64)
    step = max(1, _CHUNK // (nu * nv))
    for w0 in range(0, nw, step):
        X = np.fft.rfft(rho[w0:w0 + step], axis=-1)[..., :hu + 1]
        A[w0:w0 + step] = np.fft.fft(X, axis=1)[:, rows_k]
    del rho, X
    blur = float(dc.blur)
    dc.grid.set_size(1, 1, 1)  # free the density
    rows_l = np.r_[0:hw + 1, nw - hw:nw]
    B = np.empty((2 * hw + 1, 2 * hv + 1, hu + 1), dtype=np.complex64)
    step = max(1, _CHUNK // (nw * (hu + 1)))
    for k0 in range(0, 2 * hv + 1, step):
        B[:, k0:k0 + step] = np.fft.fft(A[:, k0:k0 + step], axis=0)[rows_l]
    return B, blur, st.cell.volume / (nu * nv * nw)


def _asu_values(B: np.ndarray, hkl: np.ndarray, half_asu, scale: float) -> np.ndarray:
    """F_asu(h) = Σ_atoms f·e^(+2πi h·x) at ``hkl`` [n, 3] from :func:`_asu_transform`'s array (complex128 [n])."""
    if len(hkl) and np.any(np.abs(hkl).max(axis=0) > np.asarray(half_asu)):
        raise StructureFileError("a symmetry mate lies beyond the calculated box (cell not compatible with the "
                                 "space group?)")
    neg = hkl[:, 0] < 0
    h = np.where(neg[:, None], -hkl, hkl)
    v = B[h[:, 2] % B.shape[0], h[:, 1] % B.shape[1], h[:, 0]].astype(np.complex128)
    return np.where(neg, v, np.conj(v)) * scale


def _fft_amplitudes(gemmi, st, sg, dmin: float, rate: float, lay: _Layout, solvent_F):
    """A function hkl [n, 3] → |F| [n] of the whole crystal (all symmetry operators) by the FFT method."""
    B, blur, scale = _asu_transform(gemmi, st, dmin, rate, lay)
    ops = sg.operations()
    sym = [(np.asarray(op.rot, dtype=np.int64) // op.DEN, np.asarray(op.tran, dtype=np.int64), op.DEN)
           for op in ops.sym_ops]
    n_cen = len(ops.cen_ops)
    M = np.asarray(st.cell.frac.mat)

    def amplitudes(hkl: np.ndarray) -> np.ndarray:
        F = np.zeros(len(hkl), dtype=np.complex128)
        for R, t, den in sym:
            F += np.exp(2j * np.pi * ((hkl @ t) % den) / den) * _asu_values(B, hkl @ R, lay.half_asu, scale)
        q = np.einsum("ni,ij->nj", hkl, M)  # Å⁻¹ (float matmul of thin arrays is slow)
        F *= n_cen * np.exp(blur * np.einsum("ni,ni->n", q, q) / 4.0)
        if solvent_F is not None:
            F += solvent_F(hkl)
        return np.abs(F)

    return amplitudes


def _direct_amplitudes(gemmi, st, solvent_F):
    """A function hkl [n, 3] → |F| [n] by direct summation over atoms and symmetry operators (gemmi), one reflection
    per call."""
    calc = gemmi.StructureFactorCalculatorX(st.cell)

    def amplitudes(hkl: np.ndarray) -> np.ndarray:
        F = np.array([calc.calculate_sf_from_model(st[0], [int(x) for x in h]) for h in hkl], dtype=np.complex128)
        return np.abs(F if solvent_F is None else F + solvent_F(hkl))

    return amplitudes


def _bulk_solvent(gemmi, st, dmin: float, k_sol: float, b_sol: float, rate: float):
    """A function hkl [n, 3] → the flat bulk-solvent contribution k_sol·exp(−B_sol/(4d²))·F_mask (complex,
    electrons).  The mask and its transform are single gemmi calls (not chunked)."""
    mask = gemmi.FloatGrid()
    mask.setup_from(st, spacing=dmin / (2.0 * rate))
    gemmi.SolventMasker(gemmi.AtomicRadiiSet.Cctbx).put_mask_on_float_grid(mask, st[0])
    fmask = np.array(gemmi.transform_map_to_f_phi(mask), copy=True)
    M = np.asarray(st.cell.frac.mat)

    def contribution(hkl: np.ndarray) -> np.ndarray:
        q = np.einsum("ni,ij->nj", hkl, M)  # Å⁻¹ (float matmul of thin arrays is slow)
        vals = fmask[hkl[:, 0] % fmask.shape[0], hkl[:, 1] % fmask.shape[1], hkl[:, 2] % fmask.shape[2]]
        return k_sol * np.exp(-b_sol * np.einsum("ni,ni->n", q, q) / 4.0) * vals

    return contribution


def _fill_table(table: np.ndarray, lo: np.ndarray, st, sg, dmin: float, amplitudes) -> Tuple[int, int, int]:
    """Put |F| of every cell of ``table`` within ``dmin`` but (0, 0, 0) into it, a chunk of cells at a time; the
    others keep their value (as for an MTZ, which has no F(000)).  For each symmetry-unique reflection (the one of
    its orbit ±h·R with the largest key) ``amplitudes`` is called once and the value written to the whole orbit, so
    mates are equal to the bit; systematically absent reflections get 0.  → (cells within dmin, unique reflections,
    absent cells within dmin)."""
    rots = _rotations(sg)
    mats = np.concatenate([rots, -rots])
    ops = sg.operations()
    check_absent = not sg.is_symmorphic() or sg.centring_type() != "P"
    M = np.asarray(st.cell.frac.mat)
    s2max = (1.0 + 1e-9) / dmin**2
    hi = lo + np.asarray(table.shape) - 1
    weights = np.array([1 << 42, 1 << 21, 1], dtype=np.int64)  # _keys(h) = h·weights + const (fields apart)
    mate_weights = np.einsum("oij,j->io", mats, weights)  # [3, 2·rotations]: h·R·weights for each R
    step = max(1, _CHUNK // len(mats))
    n_in = n_unique = n_absent = 0
    for start in range(0, table.size, step):
        idx = np.arange(start, min(start + step, table.size))
        hkl = np.stack(np.unravel_index(idx, table.shape), axis=1) + lo
        q = np.einsum("ni,ij->nj", hkl, M)  # Å⁻¹ (float matmul of thin arrays is slow)
        hkl = hkl[(np.einsum("ni,ni->n", q, q) <= s2max) & hkl.any(axis=1)]  # F(000), the direct beam: default_F
        absent = ops.systematic_absences(hkl.astype(np.int32)) if check_absent else np.zeros(len(hkl), dtype=bool)
        canon = hkl @ weights >= (hkl @ mate_weights).max(axis=1)  # the largest _keys of its orbit
        c = hkl[canon]
        vals = np.zeros(len(c))
        present = ~absent[canon]
        vals[present] = amplitudes(c[present])
        m = np.matmul(c[None], mats).reshape(-1, 3)  # [2·rotations · unique, 3]
        v = np.tile(vals, len(mats))
        keep = np.all((m >= lo) & (m <= hi), axis=1)
        table[tuple((m[keep] - lo).T)] = v[keep]
        n_in, n_unique, n_absent = n_in + len(hkl), n_unique + len(c), n_absent + int(absent.sum())
    return n_in, n_unique, n_absent


def _model_to_calculate(gemmi, path, name: str, cell, spacegroup, bfactor, notes: list):
    """(gemmi structure, space group) of the model at ``path`` with its atoms checked, ``cell``/``spacegroup``
    applied and every atom's B set to ``bfactor`` (Å², when not None); what was changed is appended to ``notes``."""
    bfac = None if bfactor is None else _check_float(bfactor, "bfactor (Å²)", name, strict=False)
    st = _read_model(gemmi, path, name)
    sg = _model_cell_and_group(gemmi, st, cell, spacegroup, name, notes)
    if bfac is not None:
        _override_b(gemmi, st, bfac)
        notes.append(f"every atom's B set to {bfac:g} Å² (anisotropic B removed)")
    return st, sg


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
    max_bytes: Optional[int] = None,
    long_seconds: Optional[float] = None,
):
    """|F| of a PDB or mmCIF model to resolution ``dmin``, as nanoBragg's dense P1 table (what ``-pdb FILE`` uses).

    X-ray form factors (no anomalous terms) of every atom of the first model, with its occupancy and B (isotropic or
    anisotropic; ``bfactor`` replaces them).  Every table cell with d ≥ ``dmin`` gets the whole crystal's amplitude
    (symmetry and Friedel mates equal to the bit, absences 0); the table spans |h| ≤ a/dmin (likewise k, l), its
    cells beyond ``dmin`` and (0, 0, 0) hold ``default_F``.  Memory and time are estimated first
    (:class:`ModelWork`): more memory than ``max_bytes`` is refused before any work, a long estimate is a
    :class:`ModelWorkWarning`; the work runs in chunks that return to Python within milliseconds, so Ctrl-C and
    SIGTERM act at once.

    Args:
        path: PDB or mmCIF (or mmJSON) file.
        dmin: resolution limit (Å), > 0; the CLI passes :func:`detector_corner_resolution`.
        cell: (a, b, c) Å, (α, β, γ) degrees replacing the model's cell (needed when the file has none).
        bfactor: isotropic B (Å², ≥ 0) given to every atom, or None to keep the model's.
        solvent: add a flat bulk-solvent model k_sol·exp(−b_sol·s²/4)·F_mask (s = 1/d; mask from gemmi's
            ``SolventMasker``); off by default.
        default_F: amplitude of table cells outside the calculated set (``-default_F``).
        spacegroup: name or number overriding the model's space group (P 1 is assumed when the file has none).
        method: ``"fft"`` (the model's own atoms as density on a P1 grid, its Fourier transform, the symmetry
            operators summed in reciprocal space; relative error ~1e-4) or ``"direct"`` (exact, slow).
        k_sol: solvent density (e/Å³) of the bulk-solvent model.   b_sol: its B (Å²).
        rate: grid oversampling of the FFT method and of the solvent mask.
        max_bytes: memory the calculation may use (bytes); None: :func:`available_memory`.
        long_seconds: warn when the estimated time exceeds this (s); None: :data:`LONG_SECONDS`.

    Returns:
        ``(F, hkl_min, info)`` as :func:`read_mtz`: float64 [nh, nk, nl] amplitudes (electrons), the index of
        ``F[0, 0, 0]``, and a :class:`StructureFactorInfo` (``n_unique``: symmetry-unique reflections calculated,
        ``n_p1``: table cells within ``dmin``).

    Raises:
        StructureFileError (a ValueError): not a model, no atoms, a bad atom (named: :func:`model_cell`), no cell, an
            unknown space group or one incompatible with the cell; :class:`ModelWorkError`: beyond ``max_bytes``.
        ValueError: bad ``dmin``, ``cell``, ``bfactor``, ``method``, ``rate``.  OSError, ImportError (no gemmi).
    """
    gemmi = _gemmi()
    name = display_name(path)
    dmin = _check_float(dmin, "dmin (Å)", name)
    if method not in ("fft", "direct"):
        raise ValueError(f"{name}: method must be 'fft' or 'direct', got {method!r}")
    default_F = _check_float(default_F, "default_F", name, strict=False)
    rate = _check_float(rate, "rate", name)
    notes: list = []
    st, sg = _model_to_calculate(gemmi, path, name, cell, spacegroup, bfactor, notes)
    lay = _layout(st.cell, dmin, rate)
    if lay.half == (0, 0, 0):
        raise StructureFileError(f"{name}: no reflection with d >= {dmin:g} Å in cell {_cell_text(st.cell)}")
    work = _estimate(gemmi, st, sg, dmin, method, rate, solvent)
    _check_work(work, max_bytes, LONG_SECONDS if long_seconds is None else float(long_seconds), name)
    solvent_F = _bulk_solvent(gemmi, st, dmin, float(k_sol), float(b_sol), rate) if solvent else None
    if method == "fft":
        amplitudes = _fft_amplitudes(gemmi, st, sg, dmin, rate, lay, solvent_F)
    else:
        amplitudes = _direct_amplitudes(gemmi, st, solvent_F)
    table = np.full(work.table, default_F, dtype=np.float64)
    lo = -np.asarray(lay.half, dtype=np.int64)
    n_in, n_unique, n_absent = _fill_table(table, lo, st, sg, dmin, amplitudes)
    notes.append(f"|F| calculated from {work.atoms} atoms to {dmin:g} Å ({method})")
    if solvent:
        notes.append(f"flat bulk solvent added (k_sol {float(k_sol):g} e/Å³, B_sol {float(b_sol):g} Å²)")
    notes += _expansion_notes(sg, n_unique, n_in, n_absent if default_F != 0.0 else 0, False)
    info = StructureFactorInfo(name, "model", sg.hm, tuple(st.cell.parameters), n_unique, n_in, tuple(notes))
    return table, tuple(int(x) for x in lo), info


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

    from ..detector import detector_frame, panel_frames
    from ..kernel import curve
    from ..pytree import tree_map

    det = tree_map(lambda t: torch.as_tensor(t).detach().to(torch.float64), params.detector)
    p = setup.pixel_size
    if setup.panels is not None:  # the four corners of every panel, from its own counts and steps
        fr = panel_frames(det, setup)
        counts = torch.tensor([(q.fpixels, q.spixels) for q in setup.panels.panels], dtype=torch.float64)
        cf = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
        cs = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
        pos = (fr.pix0[:, None, :] + (cf[None, :, None] * counts[:, None, 0:1]) * p * fr.fdet[:, None, :]
               + (cs[None, :, None] * counts[:, None, 1:2]) * p * fr.sdet[:, None, :]).reshape(-1, 3)
        return _corner_d(pos, params, setup)
    frame = detector_frame(det, setup)
    F = torch.tensor([0.0, setup.fpixels * p, 0.0, setup.fpixels * p], dtype=torch.float64)
    S = torch.tensor([0.0, 0.0, setup.spixels * p, setup.spixels * p], dtype=torch.float64)
    pos = frame.pix0 + F[:, None] * frame.fdet + S[:, None] * frame.sdet  # [4, 3] mm
    if setup.curved_det:
        beam = torch.tensor(setup.beam, dtype=torch.float64)
        pos = torch.stack(curve(pos.unbind(-1), frame.fdet, frame.sdet, beam, frame.distance), -1)
    return _corner_d(pos, params, setup)


def _corner_d(pos, params, setup) -> float:
    """The smallest d (Å) over the corner positions ``pos`` [n, 3] (mm, float64) and every source."""
    import torch  # noqa: PLC0415 - the io package stays importable without touching torch at import time

    s = pos / torch.linalg.vector_norm(pos, dim=-1, keepdim=True)
    s0 = torch.tensor([src[0] for src in setup.sources], dtype=torch.float64)  # [K, 3]
    lam = float(params.beam.wavelength) * torch.tensor([src[1] for src in setup.sources], dtype=torch.float64)
    q = (s[:, None, :] - s0[None, :, :]) / lam[None, :, None]
    qmax = float(torch.linalg.vector_norm(q, dim=-1).max())
    if not qmax > 0.0:
        raise ValueError("detector_corner_resolution: the detector corners see no scattering (|q| = 0)")
    return 1.0 / qmax
