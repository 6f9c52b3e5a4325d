"""Structure-factor (``-hkl``) text files: ``h k l F`` per line.

nanoBragg reads the file as a whitespace stream of 4-number records, so an extra column (sigma, phase) silently shifts
the parse.  This reader is strict instead: every non-blank, non-comment line must hold exactly four numbers.  There is
no symmetry expansion and no Friedel mates (as in nanoBragg), and no ``Fdump.bin`` cache is ever read or written
(spec Q21).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from ._atomic import atomic_write
from ._parse import display_name, iter_token_lines, line_error, parse_float, parse_index, read_bytes

__all__ = ["HKLData", "read_hkl", "write_hkl", "hkl_to_grid"]


class HKLData(NamedTuple):
    """Reflections read from an hkl file.

    Attributes:
        hkl: int64 array [n, 3] of Miller indices (h, k, l), in file order.
        F: float64 array [n] of structure-factor amplitudes (electrons), finite.
    """

    hkl: np.ndarray
    F: np.ndarray


def _parse_hkl_bytes(raw: bytes, name: str) -> HKLData:
    rows: list[tuple[int, int, int]] = []
    amps: list[float] = []
    for lineno, text, toks in iter_token_lines(raw, name):
        if len(toks) != 4:
            raise line_error(name, lineno, f"expected exactly 4 columns 'h k l F', found {len(toks)}", text)
        h = parse_index(toks[0], name, lineno, text, "h")
        k = parse_index(toks[1], name, lineno, text, "k")
        l_ = parse_index(toks[2], name, lineno, text, "l")
        F = parse_float(toks[3], name, lineno, text, "F")
        rows.append((h, k, l_))
        amps.append(F)
    hkl = np.array(rows, dtype=np.int64).reshape(-1, 3)
    return HKLData(hkl=hkl, F=np.array(amps, dtype=np.float64))


def read_hkl(path: str | os.PathLike) -> HKLData:
    """Read a structure-factor file of ``h k l F`` lines.

    Format: one reflection per line, exactly 4 whitespace-separated numbers; ``h k l`` integers (an integral decimal
    such as ``3.0`` is accepted), ``F`` a finite decimal amplitude.  Blank lines and lines whose first non-blank
    character is ``#`` are skipped.  Duplicates are kept (see :func:`hkl_to_grid` for how they resolve).

    Args:
        path: the text file.

    Returns:
        :class:`HKLData` with ``hkl`` int64 [n, 3] and ``F`` float64 [n] (n may be 0 for a file with no records).

    Raises:
        ValueError: naming the file, the 1-based line number and the offending text for any other line: wrong column
            count (a 5th column such as sigma or phase is an error), non-numeric tokens, non-integer or out-of-range
            (> 2**31-1) indices, NaN/inf F, or invalid UTF-8.
        OSError: if the file cannot be read.
    """
    return _parse_hkl_bytes(read_bytes(path), display_name(path))


def write_hkl(path: str | os.PathLike, hkl, F) -> None:
    """Write reflections as ``h k l F`` lines (atomically).

    Lines look like nanoBragg's example files (``%4d %4d %4d`` then F right-aligned in 10 columns), but F is written
    with the shortest repr that round-trips exactly, so ``read_hkl(write_hkl(...))`` returns identical values.

    Args:
        path: destination file.
        hkl: integer-valued array-like [n, 3] of Miller indices.
        F: array-like [n] of finite amplitudes.

    Raises:
        ValueError: on shape mismatch, non-integer indices or non-finite F.
    """
    hkl_a = np.asarray(hkl)
    F_a = np.asarray(F, dtype=np.float64)
    if hkl_a.ndim != 2 or hkl_a.shape[1] != 3:
        raise ValueError(f"write_hkl {display_name(path)}: hkl must have shape [n, 3], got {hkl_a.shape}")
    if F_a.shape != (hkl_a.shape[0],):
        raise ValueError(f"write_hkl {display_name(path)}: F must have shape [{hkl_a.shape[0]}], got {F_a.shape}")
    hkl_f = hkl_a.astype(np.float64)
    if not np.all(np.isfinite(hkl_f)) or np.any(hkl_f != np.round(hkl_f)) or np.any(np.abs(hkl_f) > 2**31 - 1):
        raise ValueError(f"write_hkl {display_name(path)}: Miller indices must be integers within the C int range")
    if not np.all(np.isfinite(F_a)):
        raise ValueError(f"write_hkl {display_name(path)}: F must be finite")
    hkl_i = hkl_a.astype(np.int64)
    lines = [f"{h:4d} {k:4d} {l_:4d} {float(f)!r:>10}\n" for (h, k, l_), f in zip(hkl_i.tolist(), F_a.tolist())]
    atomic_write(path, "".join(lines).encode("ascii"))


def hkl_to_grid(data, default_F: float = 0.0, *, max_cells: int = 1 << 28) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Scatter reflections into a dense grid, as nanoBragg does for ``-hkl``.

    The grid spans [min, max] of each index over the listed reflections; cells with no reflection hold ``default_F``.
    When an (h, k, l) is listed more than once, the **later** entry (higher row) wins, matching nanoBragg's second
    pass which simply overwrites.

    Args:
        data: :class:`HKLData` or a ``(hkl [n,3], F [n])`` pair.
        default_F: amplitude for absent reflections.
        max_cells: refuse grids larger than this many cells (default 2**28, 2 GiB of float64).

    Returns:
        ``(grid, hkl_min)``: ``grid`` float64 [nh, nk, nl] with ``grid[h-hmin, k-kmin, l-lmin] = F``, and
        ``hkl_min = (hmin, kmin, lmin)`` as Python ints.

    Raises:
        ValueError: if there are no reflections, shapes disagree, or the grid would exceed ``max_cells``.
    """
    hkl, F = data
    hkl = np.asarray(hkl)
    F = np.asarray(F, dtype=np.float64)
    if hkl.ndim != 2 or hkl.shape[1] != 3 or F.shape != (hkl.shape[0],):
        raise ValueError(f"hkl_to_grid: need hkl [n,3] and F [n], got {hkl.shape} and {F.shape}")
    if hkl.shape[0] == 0:
        raise ValueError("hkl_to_grid: no reflections")
    hkl = hkl.astype(np.int64)
    lo = hkl.min(axis=0)
    hi = hkl.max(axis=0)
    shape = tuple(int(x) for x in (hi - lo + 1))
    ncell = shape[0] * shape[1] * shape[2]
    if ncell > max_cells:
        raise ValueError(
            f"hkl_to_grid: index ranges {tuple(lo)}..{tuple(hi)} need {ncell} cells > max_cells={max_cells}"
        )
    grid = np.full(shape, float(default_F), dtype=np.float64)
    flat = np.ravel_multi_index(tuple((hkl - lo).T), shape)
    # last occurrence of each cell wins: unique over the reversed order gives the first index from the end
    rev = flat[::-1]
    uniq, first_from_end = np.unique(rev, return_index=True)
    src = len(flat) - 1 - first_from_end
    grid.reshape(-1)[uniq] = F[src]
    return grid, (int(lo[0]), int(lo[1]), int(lo[2]))
