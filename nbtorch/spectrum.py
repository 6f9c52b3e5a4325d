"""Beam spectra: wavelength channels with weights, as the sources of a simulation.

An XFEL pulse has a spectrum of its own (tens to ~100 channels over ~0.5 %).  nbtorch renders it as one source per
channel (and per beam direction when the set-up already has several), each with its wavelength factor λ_c/λ0 and
its weight (``Setup.source_weights``): the image is the weighted mean over channels, Σ w_c·I(λ_c) / Σ w_c, so a
spectrum of total weight 1 keeps the fluence's meaning.  λ0 (``Beam.wavelength``) is the spectrum's weighted mean;
scaling it stretches the whole spectrum (λ_c' = lam1·λ_c), and ``Beam.spectrum_shift`` shifts it (λ_c' = lam0 +
λ_c): the two parameters of diffBragg's λ' = lam0 + lam1·λ, both differentiable (shift 0 and λ0 as read: the file's
spectrum).

Files: diffBragg's ``.lam`` (comma-separated, a header row, columns wavelength in Å and weight).
:func:`rebin_spectrum` reduces many channels to fewer, conserving the total weight and each bin's weighted mean
wavelength: the image changes by the spread of the wavelengths within a bin.  Measured on SASE-like spectra (spikes
under a 0.1 % Gaussian envelope, 0.5 % wide) and stills of 6 to 25 cells per axis: 100 channels rebinned to 50, 20
and 10 change the image by ≈ 1e-6, 1.2e-5 and 6e-5 of its total (summed |change| / summed photons; the largest
pixel by the same fraction of the largest); tests/nbtorch/test_spectrum.py holds 100 → 20 below 1e-4.
"""
from __future__ import annotations

import math
import os
from typing import List, Tuple

import numpy as np
import torch

from .io._atomic import atomic_write
from .io._parse import display_name, read_bytes
from .types import Params, Setup

__all__ = ["read_lam", "write_lam", "rebin_spectrum", "with_spectrum"]


def _checked(wavelengths, weights, what: str) -> Tuple[np.ndarray, np.ndarray]:
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
    lam, w = _checked([r[0] for r in rows], [r[1] for r in rows], name)
    return lam, w


def write_lam(path: str | os.PathLike, wavelengths, weights) -> None:
    """Write a diffBragg ``.lam`` file (header ``wavelength,weight``; full precision), atomically."""
    lam, w = _checked(wavelengths, weights, display_name(path))
    text = "wavelength,weight\n" + "".join(f"{a!r},{b!r}\n" for a, b in zip(lam.tolist(), w.tolist()))
    atomic_write(path, text.encode())


def rebin_spectrum(wavelengths, weights, n_bins: int) -> Tuple[np.ndarray, np.ndarray]:
    """The spectrum in at most ``n_bins`` channels: equal-width bins over [min λ, max λ], each non-empty bin one
    channel at its weighted mean wavelength with its total weight (the total weight and the weighted mean wavelength
    of the whole spectrum are kept exactly).  A spectrum of ``n_bins`` channels or fewer is returned as it is."""
    lam, w = _checked(wavelengths, weights, "spectrum")
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


def with_spectrum(params: Params, setup: Setup, wavelengths, weights) -> Tuple[Params, Setup]:
    """``(params, setup)`` whose beam carries the spectrum (``wavelengths`` [n] Å, ``weights`` [n]): λ0 =
    ``params.beam.wavelength`` becomes the weighted mean wavelength, and every source of ``setup`` (its direction,
    its weight) becomes one source per channel with factor (its factor)·λ_c/λ0 and weight (its weight)·w_c.  The
    image is then Σ w_c·I(λ_c) / Σ w_c (see the module's text)."""
    lam, w = _checked(wavelengths, weights, "spectrum")
    lam0 = math.fsum(lam * w) / math.fsum(w)
    old_w = setup.normalised_source_weights
    sources, out_w = [], []
    for (direction, factor), wd in zip(setup.sources, old_w):
        for lc, wc in zip(lam.tolist(), w.tolist()):
            sources.append((direction, factor * lc / lam0))
            out_w.append(wd * wc)
    like = params.beam.wavelength
    beam = params.beam._replace(wavelength=torch.as_tensor(lam0, dtype=like.dtype, device=like.device))
    return params._replace(beam=beam), setup.replace(sources=tuple(sources), source_weights=tuple(out_w))

