"""Beam spectra: wavelength channels with weights, as the sources of a simulation.

An XFEL pulse has a spectrum of its own (tens to ~100 channels over ~0.5 %).  nbtorch renders it as one source per
channel (and per beam direction when the set-up already has several), each with its wavelength factor λ_c/λ0 and
its weight (``Setup.source_weights``): the image is the weighted mean over channels, Σ w_c·I(λ_c) / Σ w_c, so a
spectrum of total weight 1 keeps the fluence's meaning.  λ0 (``Beam.wavelength``) is the spectrum's weighted mean;
scaling it stretches the whole spectrum (λ_c' = lam1·λ_c), and ``Beam.spectrum_shift`` shifts it (λ_c' = lam0 +
λ_c): the two parameters of diffBragg's λ' = lam0 + lam1·λ, both differentiable (shift 0 and λ0 as read: the file's
spectrum).  Files and rebinning: :mod:`nbtorch.io.spectra` (re-exported here).
"""
from __future__ import annotations

from typing import Tuple

import torch

from .io.spectra import checked_spectrum, read_lam, rebin_spectrum, spectrum_mean, write_lam
from .types import Params, Setup

__all__ = ["read_lam", "write_lam", "rebin_spectrum", "spectrum_mean", "with_spectrum"]


def with_spectrum(params: Params, setup: Setup, wavelengths, weights) -> Tuple[Params, Setup]:
    """``(params, setup)`` whose beam carries the spectrum (``wavelengths`` [n] Å, ``weights`` [n]): λ0 =
    ``params.beam.wavelength`` becomes the weighted mean wavelength, and every source of ``setup`` (its direction,
    its weight) becomes one source per channel with factor (its factor)·λ_c/λ0 and weight (its weight)·w_c.  The
    image is then Σ w_c·I(λ_c) / Σ w_c (see the module's text)."""
    lam, w = checked_spectrum(wavelengths, weights, "spectrum")
    lam0 = spectrum_mean(lam, w)
    old_w = setup.normalised_source_weights
    sources, out_w = [], []
    for (direction, factor), wd in zip(setup.sources, old_w):
        for lc, wc in zip(lam.tolist(), w.tolist()):
            sources.append((direction, factor * lc / lam0))
            out_w.append(wd * wc)
    like = params.beam.wavelength
    beam = params.beam._replace(wavelength=torch.as_tensor(lam0, dtype=like.dtype, device=like.device))
    return params._replace(beam=beam), setup.replace(sources=tuple(sources), source_weights=tuple(out_w))

