"""The asymmetric unit of a dense P1 structure-factor table: which table entries share one refinable |F|.

nbtorch's table ``Structure.F`` is a dense ``[nh, nk, nl]`` grid starting at ``Setup.hkl_min`` (P1: every symmetry
and Friedel mate has its own entry).  :func:`asu_map` gives every entry the id of its reflection class: symmetry
equivalents (h·R for the space group's rotations R, gemmi) share one id, and so do Friedel mates (−h·R) unless
``anomalous`` — then F(+) and F(−) are two classes, except for centric reflections, whose two halves are one class.
Systematically absent entries get id −1 (held at 0).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from nbtorch.io.structure_files import _keys, _rotations  # the one copy of the symmetry expansion's helpers


class AsuMap(NamedTuple):
    """Reflection classes of a table.

    ``ids``: int64 [nh, nk, nl], the class of every entry (−1: systematically absent); ``hkl``: int64 [n, 3], each
    class's reflection in gemmi's reciprocal asymmetric unit; ``plus``: bool [n], the class is that reflection's
    F(+) (always True without ``anomalous``; for a centric reflection its one class); ``centric``: bool [n];
    ``space_group``: gemmi's Hermann–Mauguin symbol; ``anomalous``: whether Friedel mates are apart."""

    ids: np.ndarray
    hkl: np.ndarray
    plus: np.ndarray
    centric: np.ndarray
    space_group: str
    anomalous: bool

    @property
    def n(self) -> int:
        """Number of classes (refinable |F| values)."""
        return int(self.hkl.shape[0])


def space_group(name: str):
    """gemmi's SpaceGroup of a name or number (``'P 43 21 2'``, ``'P43212'``, ``'96'``); ValueError naming
    ``space_group`` for an unknown one."""
    import gemmi

    sg = gemmi.find_spacegroup_by_name(str(name).strip()) if str(name).strip() else None
    if sg is None:
        raise ValueError(f"space_group: unknown space group {str(name)!r} (a Hermann–Mauguin symbol such as "
                         "'P 43 21 2' or a number 1–230)")
    return sg


def table_indices(hkl_min, shape) -> np.ndarray:
    """Miller indices int64 [nh·nk·nl, 3] of every entry of a table of ``shape`` starting at ``hkl_min``, in the
    table's flat (C) order."""
    axes = [np.arange(int(lo), int(lo) + int(n), dtype=np.int64) for lo, n in zip(hkl_min, shape)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def asu_map(hkl_min, shape, space_group_name: str, anomalous: bool = False) -> AsuMap:
    """The :class:`AsuMap` of a table of ``shape`` [3] starting at ``hkl_min`` [3] in ``space_group_name``.

    A class is keyed by the largest packed index over its members' mates (h·R; with −h·R too unless
    ``anomalous``), so the mapping is vectorised; gemmi names each class's asymmetric-unit reflection."""
    import gemmi

    sg = space_group(space_group_name)
    ops = sg.operations()
    hkl = table_indices(hkl_min, shape)
    rots = _rotations(sg)
    mates = np.einsum("ni,oij->onj", hkl, rots)  # [O, n, 3]
    key_plus = _keys(mates.reshape(-1, 3)).reshape(len(rots), -1).max(0)
    key = key_plus if anomalous else np.maximum(key_plus, _keys((-mates).reshape(-1, 3)).reshape(len(rots), -1).max(0))
    absent = np.asarray(ops.systematic_absences(hkl.astype(np.int32)), dtype=bool) | (np.abs(hkl).sum(1) == 0)
    uniq, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    ids = inverse.astype(np.int64)
    ids[absent] = -1
    keep = np.unique(ids[ids >= 0])
    renumber = np.full(len(uniq), -1, dtype=np.int64)
    renumber[keep] = np.arange(len(keep))
    ids = np.where(ids >= 0, renumber[np.maximum(ids, 0)], -1)
    asu = gemmi.ReciprocalAsu(sg)
    reps = hkl[first[keep]]
    mapped = [asu.to_asu([int(v) for v in h], ops) for h in reps]
    out_hkl = np.array([m[0] for m in mapped], dtype=np.int64).reshape(-1, 3)
    plus = np.array([m[1] % 2 == 1 for m in mapped], dtype=bool) if anomalous else np.ones(len(keep), bool)
    centric = np.asarray(ops.centric_flag_array(out_hkl.astype(np.int32)), dtype=bool) if len(keep) else \
        np.zeros(0, bool)
    plus = plus | centric
    return AsuMap(ids.reshape(tuple(int(n) for n in shape)), out_hkl, plus, centric, sg.hm, bool(anomalous))


def friedel_partner(amap: AsuMap) -> np.ndarray:
    """For an anomalous map, each class's Friedel partner class (int64 [n]; itself for a centric reflection, −1
    when the partner is not in the table); ``arange(n)`` without ``anomalous``."""
    n = amap.n
    if not amap.anomalous:
        return np.arange(n, dtype=np.int64)
    index = {(tuple(h), bool(p)): k for k, (h, p) in enumerate(zip(amap.hkl.tolist(), amap.plus))}
    return np.array([k if c else index.get((tuple(h), not p), -1)
                     for k, (h, p, c) in enumerate(zip(amap.hkl.tolist(), amap.plus, amap.centric))],
                    dtype=np.int64)
