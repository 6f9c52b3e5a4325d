"""Beam spectra as files and numbers (numpy only): diffBragg's ``.lam`` files, rebinning, the weighted mean.

A spectrum is wavelength channels (Å) with weights.  :func:`read_lam`/:func:`write_lam`: diffBragg's ``.lam``
(comma-separated, a header row, columns wavelength in Å and weight).  :func:`rebin_spectrum` reduces many channels to
fewer, conserving the total weight and each bin's weighted mean wavelength: the image changes by the spread of the
wavelengths within a bin.  Measured on SASE-like spectra (spikes under a 0.1 % Gaussian envelope, 0.5 % wide) and
stills of 6 to 25 cells per axis: 100 channels rebinned to 50, 20 and 10 change the image by ≈ 1e-6, 1.2e-5 and 6e-5
of its total (summed |change| / summed photons; the largest pixel by the same fraction of the largest);
tests/nbtorch/test_spectrum.py holds 100 → 20 below 1e-4.  :func:`spectrum_mean`: the weighted mean wavelength, the
λ0 of a simulation with that spectrum (:func:`nbtorch.spectrum.with_spectrum`).
"""
from __future__ import annotations

import math
import os
from typing import List, Tuple

import numpy as np

from ._atomic import atomic_write
from ._parse import display_name, read_bytes

__all__ = ["read_lam", "write_lam", "rebin_spectrum", "spectrum_mean", "checked_spectrum"]


def checked_spectrum(wavelengths, weights, what: str) -> Tuple[np.ndarray, np.ndarray]:
    """(wavelengths [n] Å, weights [n]) as float64 arrays, or ValueError (starting with ``what``) unless there are as
    many weights as wavelengths, the wavelengths finite and > 0 and the weights finite, >= 0 and not all 0."""
    lam = np.asarray(wavelengths, dtype=np.float64).reshape(-1)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if lam.size == 0 or lam.size != w.size:
        raise ValueError(f"{what}: need as many weights as wavelengths (at least one), got {lam.size} and {w.size}")
    if not (np.isfinite(lam).all() and (lam > 0).all()):
        raise ValueError(f"{what}: wavelengths must be finite and > 0 Å")
    if not (np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
        raise ValueError(f"{what}: weights must be finite, >= 0 and not all 0")
    return lam, w


def read_lam(path: str | os.PathLike) -> Tuple[np.ndarray, np.ndarray]:
    """A diffBragg ``.lam`` spectrum → (wavelengths [n] Å, weights [n]).  A first row that is not two numbers is the
    header; blank lines are skipped; a row of other than two numbers is a one-line error naming file and line."""
    name = display_name(path)
    rows: List[Tuple[float, float]] = []
    seen = False
    for n, line in enumerate(read_bytes(path).decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        first, seen = not seen, True
        parts = [p.strip() for p in line.split(",")]
        try:
            if len(parts) != 2:
                raise ValueError
            rows.append((float(parts[0]), float(parts[1])))
        except ValueError:
            if first:
                continue  # the header row
            raise ValueError(f"{name}, line {n}: expected 'wavelength,weight' (Å, weight), got {line.strip()!r}")
    if not rows:
        raise ValueError(f"{name}: no spectrum rows (expected 'wavelength,weight' lines after a header)")
    lam, w = checked_spectrum([r[0] for r in rows], [r[1] for r in rows], name)
    return lam, w


def write_lam(path: str | os.PathLike, wavelengths, weights) -> None:
    """Write a diffBragg ``.lam`` file (header ``wavelength,weight``; full precision), atomically."""
    lam, w = checked_spectrum(wavelengths, weights, display_name(path))
    text = "wavelength,weight\n" + "".join(f"{a!r},{b!r}\n" for a, b in zip(lam.tolist(), w.tolist()))
    atomic_write(path, text.encode())


def rebin_spectrum(wavelengths, weights, n_bins: int) -> Tuple[np.ndarray, np.ndarray]:
    """The spectrum in at most ``n_bins`` channels: equal-width bins over [min λ, max λ], each non-empty bin one
    channel at its weighted mean wavelength with its total weight (the total weight and the weighted mean wavelength
    of the whole spectrum are kept exactly).  A spectrum of ``n_bins`` channels or fewer is returned as it is."""
    lam, w = checked_spectrum(wavelengths, weights, "spectrum")
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"-spectrum_bins must be a whole number >= 1, got {n_bins!r}")
    if lam.size <= n_bins:
        return lam, w
    edges = np.linspace(lam.min(), lam.max(), int(n_bins) + 1)
    which = np.clip(np.searchsorted(edges, lam, side="right") - 1, 0, int(n_bins) - 1)
    total = np.bincount(which, weights=w, minlength=int(n_bins))
    moment = np.bincount(which, weights=w * lam, minlength=int(n_bins))
    keep = total > 0
    return moment[keep] / total[keep], total[keep]


def spectrum_mean(wavelengths, weights) -> float:
    """The weighted mean wavelength (Å) of a spectrum: λ0 of a simulation with it."""
    lam, w = checked_spectrum(wavelengths, weights, "spectrum")
    return math.fsum((lam * w).tolist()) / math.fsum(w.tolist())
