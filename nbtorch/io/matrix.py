"""MOSFLM orientation-matrix files (``-mat``).

A MOSFLM matrix file starts with the λ-scaled orientation matrix A = λ·UB, three rows ``a*_i b*_i c*_i`` (so the
columns are the reciprocal basis vectors a*, b*, c* times λ, in Å⁻¹·Å = dimensionless).  nanoBragg reads only the
first 9 numbers and divides by ``-lambda``; the rest of the file (misset line, U, cell, misset) is ignored.
"""
from __future__ import annotations

import math
import os

import numpy as np

from ..units import rad2deg
from ._atomic import atomic_write
from ._parse import display_name, iter_token_lines, parse_float, read_bytes

__all__ = ["read_mosflm_matrix", "write_mosflm_matrix", "mosflm_matrix_cell"]


def _parse_matrix_bytes(raw: bytes, name: str) -> np.ndarray:
    values: list[float] = []
    for lineno, text, toks in iter_token_lines(raw, name, comments=False):
        for tok in toks:
            values.append(parse_float(tok, name, lineno, text, f"matrix element {len(values) + 1}"))
            if len(values) == 9:
                return np.array(values, dtype=np.float64).reshape(3, 3)
    raise ValueError(f"{name}: a MOSFLM matrix needs 9 numbers, found only {len(values)}")


def read_mosflm_matrix(path: str | os.PathLike) -> np.ndarray:
    """Read the λ-scaled orientation matrix from a MOSFLM matrix file.

    The first 9 whitespace-separated numbers (across lines) are returned as 3 rows, row i = (a*_i, b*_i, c*_i): the
    **columns** are a*, b*, c* multiplied by the wavelength the matrix was made for.  Divide by λ (Å) to get the
    reciprocal vectors in Å⁻¹.  Everything after the 9th number is ignored, as in nanoBragg.

    Args:
        path: the matrix file.

    Returns:
        float64 array [3, 3] (dimensionless, λ-scaled).

    Raises:
        ValueError: naming the file and line if a token among the first 9 is not a finite decimal number, or if the
            file holds fewer than 9 numbers.
    """
    return _parse_matrix_bytes(read_bytes(path), display_name(path))


def _check_matrix(A, what: str) -> np.ndarray:
    M = np.asarray(A, dtype=np.float64)
    if M.shape != (3, 3):
        raise ValueError(f"{what} must have shape [3, 3], got {M.shape}")
    if not np.all(np.isfinite(M)):
        raise ValueError(f"{what} must be finite")
    return M


def mosflm_matrix_cell(A_lambda_scaled, wavelength_A: float) -> tuple[float, float, float, float, float, float]:
    """Unit cell (a, b, c in Å; α, β, γ in deg) of a λ-scaled MOSFLM matrix [3, 3] made at ``wavelength_A`` (Å).

    The reciprocal vectors are the columns of ``A / λ``; the real-space vectors are a = (b*×c*)/V* etc.
    """
    M = _check_matrix(A_lambda_scaled, "A") / float(wavelength_A)
    ast, bst, cst = M[:, 0], M[:, 1], M[:, 2]
    vstar = float(np.dot(ast, np.cross(bst, cst)))
    if vstar == 0.0 or not math.isfinite(vstar):
        raise ValueError("A is singular")
    a = np.cross(bst, cst) / vstar
    b = np.cross(cst, ast) / vstar
    c = np.cross(ast, bst) / vstar

    def angle(u, v):
        cosang = float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))
        return rad2deg(math.acos(max(-1.0, min(1.0, cosang))))

    return (
        float(np.linalg.norm(a)), float(np.linalg.norm(b)), float(np.linalg.norm(c)),
        angle(b, c), angle(c, a), angle(a, b),
    )


def _u_from_matrix(M: np.ndarray) -> np.ndarray:
    """Rotation U with A = U·B, B the reciprocal basis in the frame 'real a along x, real b in the xy plane'.

    The real-space basis (columns of A⁻ᵀ) is U times an upper-triangular matrix, so U is the Q factor of a QR
    decomposition of A⁻ᵀ with the signs fixed so R has a positive diagonal.
    """
    try:
        real = np.linalg.inv(M).T
    except np.linalg.LinAlgError:
        raise ValueError("A is singular; cannot derive U") from None
    q, r = np.linalg.qr(real)
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1.0
    return q * signs


def write_mosflm_matrix(
    path: str | os.PathLike,
    A_lambda_scaled,
    cell=None,
    *,
    U=None,
    wavelength_A: float | None = None,
) -> None:
    """Write a MOSFLM matrix file (atomically), in the layout of the golden ``26_mat_hkl/A.mat``.

    Layout (9 lines)::

        3 rows of A             ' %12.8f' x 3
        misset angles (zeros)   ' %11.3f' x 3
        3 rows of U             ' %12.8f' x 3
        cell a b c α β γ        ' %10.4f' x 6
        misset angles (zeros)   ' %11.3f' x 3

    (each field has a leading space, so huge values never run into their neighbour).

    Args:
        path: destination file.
        A_lambda_scaled: [3, 3] λ-scaled matrix, row i = (a*_i, b*_i, c*_i) (columns a*, b*, c* times λ).
        cell: optional (a, b, c, α, β, γ) in Å and degrees.  If None it is computed from A when ``wavelength_A`` is
            given, else the cell line is written as zeros (no reader here uses it).
        U: optional [3, 3] orientation matrix to write.  If None it is derived from A as the rotation taking the
            frame "real a along x, real b in the xy plane" to the lab frame (the convention of the golden file).
        wavelength_A: the wavelength (Å) A was scaled with; only used to compute ``cell``.

    Raises:
        ValueError: on wrong shapes or non-finite values, or a singular A when U must be derived.
    """
    M = _check_matrix(A_lambda_scaled, "A")
    Um = _u_from_matrix(M) if U is None else _check_matrix(U, "U")
    if cell is None:
        cell_v = mosflm_matrix_cell(M, wavelength_A) if wavelength_A is not None else (0.0,) * 6
    else:
        cell_v = tuple(float(x) for x in np.asarray(cell, dtype=np.float64).reshape(-1))
        if len(cell_v) != 6 or not all(math.isfinite(x) for x in cell_v):
            raise ValueError("cell must be 6 finite numbers (a b c alpha beta gamma)")
    zero_line = "".join(f" {0.0:11.3f}" for _ in range(3)) + "\n"
    lines = ["".join(f" {x:12.8f}" for x in row) + "\n" for row in M.tolist()]
    lines.append(zero_line)
    lines += ["".join(f" {x:12.8f}" for x in row) + "\n" for row in Um.tolist()]
    lines.append("".join(f" {x:10.4f}" for x in cell_v) + "\n")
    lines.append(zero_line)
    atomic_write(path, "".join(lines).encode("ascii"))
