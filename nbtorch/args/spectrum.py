"""``-spectrum FILE.lam [-spectrum_bins N]``: a beam that carries a spectrum (docs/cli.md "Spectra").

:func:`check_spectrum_flags` refuses, before any file is read, ``-spectrum_bins`` without ``-spectrum`` and the flags
that give the beam's wavelengths another way: ``-lambda``/``-energy`` (the spectrum's weighted mean wavelength is
λ0), ``-dispersion``/``-dispsteps`` (a grid of wavelengths) and ``-sourcefile`` (sources with their own
wavelengths).  Divergence combines: every divergence direction gets every channel.  :func:`read_spectrum` reads the
file (:func:`nbtorch.spectrum.read_lam`) and rebins it (:func:`nbtorch.spectrum.rebin_spectrum`);
:func:`apply_spectrum` gives the model its channels (:func:`nbtorch.spectrum.with_spectrum`) once the sources are
made.  A ``-geom``/``-expt`` file's wavelength is replaced by the spectrum's (with a note).
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Tuple

import numpy as np

from ..setup_checks import MAX_SOURCES
from ..spectrum import read_lam, rebin_spectrum, spectrum_mean, with_spectrum
from ..types import Params, Setup
from .parse import NanoBraggArgs, fmt_num
from .table import FLAGS

__all__ = ["SpectrumPart", "SPECTRUM_SETS", "check_spectrum_flags", "read_spectrum", "apply_spectrum"]

#: Flags that give the beam's wavelengths another way (flag → why it conflicts with -spectrum).
_NOT_WITH_SPECTRUM = {
    "-lambda": "the spectrum sets lambda0 (its weighted mean wavelength)",
    "-energy": "the spectrum sets lambda0 (its weighted mean wavelength)",
    "-dispersion": "both give the beam's wavelengths (-dispersion a grid of equal weights)",
    "-dispsteps": "both give the beam's wavelengths (-dispsteps a grid of equal weights)",
    "-sourcefile": "both give the beam's wavelengths (a -sourcefile's intensity column is ignored, Q11: a spectrum "
                   "is the way to weight sources)",
}

#: The flags whose value a -spectrum sets (not written back beside a carried -spectrum).
SPECTRUM_SETS = ("-lambda",)


class SpectrumPart(NamedTuple):
    """The ``-spectrum`` a build uses.  wavelengths [n] (Å), weights [n]: the channels (after ``-spectrum_bins``);
    mean: their weighted mean wavelength, λ0 (Å); n_file: the file's channel count."""

    wavelengths: np.ndarray
    weights: np.ndarray
    mean: float
    n_file: int


def check_spectrum_flags(opts: NanoBraggArgs) -> None:
    """Refuse ``-spectrum_bins`` without ``-spectrum``, and ``-spectrum`` with a flag of :data:`_NOT_WITH_SPECTRUM`
    (ValueError naming both flags)."""
    if "-spectrum_bins" in opts and "-spectrum" not in opts:
        raise ValueError(f"-spectrum_bins {opts['-spectrum_bins']} rebins a beam spectrum: give -spectrum FILE.lam")
    if "-spectrum" not in opts:
        return
    for flag in opts.order:
        if flag in _NOT_WITH_SPECTRUM:
            raise ValueError(f"{flag} conflicts with -spectrum {opts['-spectrum']}: {_NOT_WITH_SPECTRUM[flag]}; leave "
                             f"out {flag}")


def read_spectrum(inp, read: Callable) -> Optional[SpectrumPart]:
    """The spectrum of ``-spectrum`` (None without the flag), rebinned to at most ``-spectrum_bins`` channels; its
    weighted mean must be a -lambda the table allows.  ``inp``: the build's
    :class:`~nbtorch.args.build.Inputs`; ``read(inp, flag, reader)``: the build's reader (errors as one line
    naming the flag, the file and the line)."""
    if not inp.given("-spectrum"):
        return None
    lam, w = read(inp, "-spectrum", read_lam)
    n_file = int(lam.size)
    if inp.given("-spectrum_bins"):
        lam, w = rebin_spectrum(lam, w, inp.opts["-spectrum_bins"])
    rng = FLAGS["-lambda"].interval
    outside = [x for x in lam.tolist() if x not in rng]
    if outside:
        raise ValueError(f"-spectrum {inp.opts['-spectrum']}: wavelength {fmt_num(outside[0])} Å is outside "
                         f"{rng.text} Å")
    return SpectrumPart(lam, w, spectrum_mean(lam, w), n_file)


def apply_spectrum(params: Params, setup: Setup, spectrum: SpectrumPart, name: str,
                   notes: List[str]) -> Tuple[Params, Setup]:
    """``(params, setup)`` whose every source (divergence direction) carries every channel of ``spectrum``
    (:func:`nbtorch.spectrum.with_spectrum`); a note with the channel count and λ0 goes to ``notes``.  ``name``:
    the file as given.  ValueError when channels × directions exceed the source limit."""
    n, dirs = int(spectrum.wavelengths.size), setup.n_sources
    if n * dirs > MAX_SOURCES:
        raise ValueError(f"-spectrum {name}: {n} channels × {dirs} divergence directions = {n * dirs:.3g} sources, "
                         f"more than {MAX_SOURCES:.0e}: give -spectrum_bins or lower -divsteps")
    params, setup = with_spectrum(params, setup, spectrum.wavelengths, spectrum.weights)
    rebinned = f" (rebinned from {spectrum.n_file})" if n != spectrum.n_file else ""
    per = f" × {dirs} divergence directions = {n * dirs} sources" if dirs > 1 else ""
    notes.append(f"-spectrum {name}: {n} channel{'s' if n != 1 else ''}{rebinned}{per}, weighted mean lambda "
                 f"{float(params.beam.wavelength):.8g} Å")
    return params, setup
