"""The detector-response flags (noisify's): the point-spread function of the float image and the detector terms of
the noise image, checked against the model before anything is simulated or written (docs/cli.md "Detector
response").

* ``-psf gauss|fiber`` with ``-psf_fwhm`` (µm) and ``-psf_radius`` (pixels, default :func:`nbtorch.psf.psf_radius`):
  one kernel for the detector's one pixel size (a detector of panels must have square pixels of one size).
* ``-gain``, ``-readout_noise``, ``-flicker``, ``-calibration``, ``-calib_seed``: a
  :class:`nbtorch.noise.DetectorNoise`.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

from ..noise import DetectorNoise
from ..psf import psf_radius
from ..types import Setup
from .table import FLAGS

__all__ = ["PSF_FLAGS", "NOISE_FLAGS", "psf_choice", "detector_noise", "square_pixel_mm"]

#: Flags that only mean something with ``-psf``.
PSF_FLAGS = ("-psf_fwhm", "-psf_radius")
#: Flags of the noise image's detector terms.
NOISE_FLAGS = ("-gain", "-readout_noise", "-flicker", "-calibration", "-calib_seed")
#: Relative tolerance on panel pixel sizes that count as one size.
_SAME_SIZE = 1e-6


def _norm(v) -> float:
    return math.sqrt(sum(float(c) * float(c) for c in v))


def square_pixel_mm(setup: Setup) -> float:
    """The detector's one square pixel size (mm): ``setup.pixel_size``, after checking that every panel of a panel
    set-up has square pixels of that size (``ValueError`` naming the panel otherwise)."""
    p = float(setup.pixel_size)
    if setup.panels is None:
        return p
    for panel in setup.panels.panels:
        f, s = _norm(panel.fast), _norm(panel.slow)
        if abs(f - p) > _SAME_SIZE * p or abs(s - p) > _SAME_SIZE * p:
            raise ValueError(f"-psf: panel {panel.name} has pixels of {f:g} x {s:g} mm, not {p:g} mm square like "
                             "the first panel; a point-spread function needs one square pixel size")
    return p


def psf_choice(inp, setup: Setup) -> Tuple[Optional[str], float, Optional[int]]:
    """``(kind, fwhm_um, radius_px)`` of ``-psf``/``-psf_fwhm``/``-psf_radius`` (kind None: no blur; radius then
    None).  ``inp``: :class:`nbtorch.args.build.Inputs`.  ``ValueError`` naming the flag for ``-psf_fwhm``/
    ``-psf_radius`` without ``-psf``, panels of several pixel sizes, or an automatic radius beyond the range of
    ``-psf_radius``."""
    kind = inp.opts.get("-psf")
    fwhm = float(inp.get("-psf_fwhm"))
    if kind is None:
        extra = [f for f in PSF_FLAGS if inp.given(f)]
        if extra:
            raise ValueError(f"{extra[0]} needs -psf gauss|fiber (nbtorch blurs the image only when -psf is given)")
        return None, fwhm, None
    pixel = square_pixel_mm(setup)
    if inp.given("-psf_radius"):
        return str(kind), fwhm, int(inp.opts["-psf_radius"])
    radius = psf_radius(kind, fwhm, pixel)
    hi = int(FLAGS["-psf_radius"].interval.bounds()[1])
    if radius > hi:
        raise ValueError(f"-psf {kind} -psf_fwhm {fwhm:g} on {pixel:g} mm pixels needs a kernel radius of {radius} "
                         f"pixels to keep 99.9 % of the photons (more than {hi}): give -psf_radius (0 to {hi}) or a "
                         "smaller -psf_fwhm")
    return str(kind), fwhm, radius


def detector_noise(inp, write_noise: bool) -> DetectorNoise:
    """The :class:`~nbtorch.noise.DetectorNoise` of the noise flags (checked); a note in ``inp.notes`` when they
    are given but no noise image is written (``write_noise`` False)."""
    noise = DetectorNoise(gain=float(inp.get("-gain")), readout_adu=float(inp.get("-readout_noise")),
                          flicker=float(inp.get("-flicker")), calibration=float(inp.get("-calibration")),
                          calib_seed=int(inp.get("-calib_seed"))).check()
    given = [f for f in NOISE_FLAGS if inp.given(f)]
    if given and not write_noise:
        inp.notes.append(f"{', '.join(given)} ignored: no noise image is written (-nonoise)")
    return noise
