"""Explicit X-ray source lists (``-sourcefile``).

One source per line, columns ``X Y Z I λ``: X, Y, Z the source **position** relative to the sample (m; any length,
only the direction matters), I an intensity weight (ignored by nanoBragg's image calculation, spec Q11), λ the
wavelength in **metres**.  Missing trailing columns are NaN and the caller substitutes nanoBragg's defaults
(position −10 m along the beam, λ0).  A literal ``nan`` token is also accepted as an explicit "use the default".
"""
from __future__ import annotations

import math
import os

import numpy as np

from ._atomic import atomic_write
from ._parse import display_name, iter_token_lines, line_error, parse_float, read_bytes

__all__ = ["read_sources", "write_sources", "SOURCE_COLUMNS"]

#: Column names of the array returned by :func:`read_sources`.
SOURCE_COLUMNS = ("X", "Y", "Z", "I", "lambda_m")


def _parse_sources_bytes(raw: bytes, name: str) -> np.ndarray:
    rows: list[list[float]] = []
    for lineno, text, toks in iter_token_lines(raw, name):
        if len(toks) > 5:
            raise line_error(name, lineno, f"expected at most 5 columns 'X Y Z I lambda', found {len(toks)}", text)
        row = [parse_float(t, name, lineno, text, SOURCE_COLUMNS[i], allow_nan=True) for i, t in enumerate(toks)]
        row += [math.nan] * (5 - len(row))
        rows.append(row)
    return np.array(rows, dtype=np.float64).reshape(-1, 5)


def read_sources(path: str | os.PathLike) -> np.ndarray:
    """Read a ``-sourcefile``.

    Blank lines and lines starting with ``#`` are skipped; every other line holds 1 to 5 numbers.

    Args:
        path: the text file.

    Returns:
        float64 array [n, 5], columns (X m, Y m, Z m, I, λ m) — see :data:`SOURCE_COLUMNS`; missing trailing columns
        and ``nan`` tokens are NaN.

    Raises:
        ValueError: naming the file, the 1-based line number and the text for a line with more than 5 columns, a
            non-numeric token, ``inf``, or invalid UTF-8.
    """
    return _parse_sources_bytes(read_bytes(path), display_name(path))


def write_sources(path: str | os.PathLike, sources) -> None:
    """Write a source list [n, k≤5] (columns X Y Z I λ, metres) atomically; NaN is written as ``nan``.

    Values use the shortest exact repr, so :func:`read_sources` gives back identical numbers (padded with NaN to 5
    columns).

    Raises:
        ValueError: on a wrong shape or infinite values.
    """
    S = np.asarray(sources, dtype=np.float64)
    if S.ndim != 2 or not 1 <= S.shape[1] <= 5:
        raise ValueError(f"write_sources {display_name(path)}: sources must have shape [n, 1..5], got {S.shape}")
    if np.any(np.isinf(S)):
        raise ValueError(f"write_sources {display_name(path)}: values must be finite or NaN")
    lines = [" ".join("nan" if math.isnan(x) else repr(x) for x in row) + "\n" for row in S.tolist()]
    atomic_write(path, "".join(lines).encode("ascii"))
