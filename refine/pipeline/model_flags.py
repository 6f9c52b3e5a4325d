"""The refined model as nbtorch flags where the flags need more than :func:`nbtorch.args.to_nanobragg_args` gives:
the refined spectrum (a ``.lam`` file the flags name with ``-spectrum``) and the detector's point-spread function
(``-psf KIND -psf_fwhm µm -psf_radius px``).

A spectrum's channels are the set-up's sources of one beam direction (every direction carries the same channels,
as :func:`nbtorch.spectrum.with_spectrum` makes them): channel c has the wavelength λ0·f_c + ``spectrum_shift``
(f_c its wavelength factor; diffBragg's λ' = lam0 + lam1·λ after a fit of ``spectrum.lam0``/``spectrum.lam1``) and
its weight.  Written as a ``.lam`` file and read back by ``-spectrum`` it gives the same sources up to one rounding of
each wavelength factor, so the flags re-simulate the refined model (tests/refine/test_spectrum_refine.py, test_psf_refine.py).
"""
from __future__ import annotations

import os
import tempfile
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from nbtorch.args import to_nanobragg_args
from nbtorch.args.parse import canonical_flag, fmt_num
from nbtorch.args.table import FLAGS
from nbtorch.spectrum import read_lam, with_spectrum, write_lam

from ..model.parameters import Parameterisation

#: Flags a written spectrum replaces in the starting flags (its wavelengths, and the ways of giving them otherwise).
_REPLACED = ("-spectrum", "-spectrum_bins", "-lambda", "-energy", "-dispersion", "-dispsteps")
#: Relative agreement of the channels of different beam directions for them to be one spectrum.
_SAME = 1e-12


def spectrum_channels(setup) -> Tuple[list, np.ndarray, np.ndarray]:
    """(beam directions [D] in source order, wavelength factors [C], weights [C] summing to 1) of ``setup``'s
    sources taken as every direction × the same channels.  ValueError when the directions' channels differ (sources
    that are not one spectrum, e.g. a ``-sourcefile``'s)."""
    weights = setup.normalised_source_weights
    directions = list(dict.fromkeys(tuple(d) for d, _ in setup.sources))
    per = {d: ([], []) for d in directions}
    for (d, f), w in zip(setup.sources, weights):
        per[tuple(d)][0].append(float(f))
        per[tuple(d)][1].append(float(w))
    factors, w0 = (np.asarray(v, dtype=np.float64) for v in per[directions[0]])
    for d in directions[1:]:
        f, w = (np.asarray(v, dtype=np.float64) for v in per[d])
        if f.shape != factors.shape or not (np.allclose(f, factors, rtol=_SAME, atol=0)
                                            and np.allclose(w / w.sum(), w0 / w0.sum(), rtol=_SAME, atol=0)):
            raise ValueError("the model's sources are not one spectrum carried by every beam direction (e.g. a "
                             "-sourcefile's): they cannot be written as a .lam spectrum")
    return directions, factors, w0 / w0.sum()


def refined_spectrum(params, setup) -> Tuple[np.ndarray, np.ndarray]:
    """The model's spectrum: (wavelengths [C] Å, λ0·f_c + ``spectrum_shift``; weights [C] summing to 1), float64."""
    _, factors, weights = spectrum_channels(setup)
    lam0, shift = float(params.beam.wavelength), float(params.beam.spectrum_shift)
    return lam0 * factors + shift, weights


def spectrum_moved(par: Parameterisation, base: Optional[Sequence[str]]) -> bool:
    """Whether the refined spectrum is not the one the starting flags give: ``spectrum.lam0``/``lam1`` free, a
    shift ≠ 0 at the start, or λ0 (``wavelength``) free on a ``-spectrum`` beam."""
    tokens = [str(t) for t in (base or ())]
    with_file = any(t.startswith("-") and _canonical(t) == "-spectrum" for t in tokens)
    return bool(par.index("spectrum")) or float(par.ref.beam.spectrum_shift) != 0 or (
        with_file and bool(par.index("wavelength")))


def _canonical(token: str) -> Optional[str]:
    """The canonical flag of ``token``, or None when it is no flag (a value)."""
    try:
        return canonical_flag(token)
    except ValueError:
        return None


def _without(tokens: Sequence[str], names: Sequence[str]) -> List[str]:
    """``tokens`` without the flags ``names`` (each with its value tokens)."""
    out, i = [], 0
    while i < len(tokens):
        name = _canonical(tokens[i]) if tokens[i].startswith("-") else None
        if name in names:
            i += 1 + FLAGS[name].nargs
            continue
        out.append(tokens[i])
        i += 1
    return out


def spectrum_file_model(params, setup, path: str):
    """(params, setup) as ``-spectrum path`` rebuilds them once the model's spectrum (:func:`refined_spectrum`) is
    written there and read back: shift 0, λ0 the spectrum's weighted mean, every beam direction × the channels."""
    directions, _, _ = spectrum_channels(setup)
    lam, w = read_lam(path)
    flat = params._replace(beam=params.beam._replace(spectrum_shift=torch.zeros_like(params.beam.spectrum_shift)))
    return with_spectrum(flat, setup.replace(sources=tuple((d, 1.0) for d in directions), source_weights=None),
                         lam, w)


def psf_flags(par: Parameterisation, x: torch.Tensor) -> List[str]:
    """``-psf KIND -psf_fwhm µm -psf_radius px`` of the fit's point-spread function at ``x`` (the refined FWHM when
    ``psf`` was free); [] without one."""
    if par.psf is None:
        return []
    fwhm = float(par.psf_fwhm(x))
    return ["-psf", par.psf.kind, "-psf_fwhm", fmt_num(fwhm), "-psf_radius", str(par.psf.radius)]


def model_flags(result, base: Optional[Sequence[str]], matrix_path: Optional[str], write_matrix: bool,
                spectrum_path: Optional[str]) -> List[str]:
    """The flags of a :class:`~refine.pipeline.result.Result`'s refined model (see
    :meth:`~refine.pipeline.result.Result.to_nanobragg_args`): with ``spectrum_path`` the model's spectrum as
    ``-spectrum spectrum_path`` (checked against a copy written to a temporary folder; ``spectrum_path`` itself is
    written by :meth:`~refine.pipeline.result.Result.write_spectrum`), then the point-spread function's flags.
    ValueError when a moved spectrum has no ``spectrum_path``, or what the flags cannot express."""
    params, setup = result.params, result.setup
    if spectrum_path is None:
        if spectrum_moved(result.par, base):
            raise ValueError("the refined spectrum (spectrum.lam0/lam1, or λ0 of a -spectrum beam) is not the "
                             "starting flags': write it as a .lam file (nbtorch-refine --out-spectrum OUT.lam, "
                             "Result.write_spectrum) and the flags name it")
        flags = to_nanobragg_args(params, setup, base=base, matrix_path=matrix_path, write_matrix=write_matrix)
        return flags + psf_flags(result.par, result.x)
    tokens = [str(t) for t in (base or ())]
    if any(_canonical(t) == "-sourcefile" for t in tokens if t.startswith("-")):
        raise ValueError("the model's sources come from a -sourcefile: they cannot be written as a .lam spectrum")
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "spectrum.lam")
        write_lam(copy, *refined_spectrum(params, setup))
        p2, s2 = spectrum_file_model(params, setup, copy)
        flags = to_nanobragg_args(p2, s2, base=_without(tokens, _REPLACED) + ["-spectrum", copy],
                                  matrix_path=matrix_path, write_matrix=write_matrix)
    flags[flags.index("-spectrum") + 1] = str(spectrum_path)
    return flags + psf_flags(result.par, result.x)

