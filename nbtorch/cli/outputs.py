"""The command line's output files, written atomically in nanoBragg's order: float, int, PGM, noise; then nbtorch's
NeXus file (``-nexusfile``).  A detector of panels is written in its file's layout (:mod:`.layout`).

The detector response (noisify's flags, :mod:`nbtorch.args.response`): :func:`blur_image` applies ``-psf`` to the
simulated photons before any file is made from them; the noise image adds ``-gain``, ``-readout_noise``,
``-flicker`` and ``-calibration`` (:func:`nbtorch.noise.detector_adu`), and is nanoBragg's without them."""
from __future__ import annotations

from typing import Callable, List, TextIO, Tuple

import numpy as np
import torch

from ..args import Extras, Outputs
from ..io.images import write_pgm, write_raw_float
from ..io.smv import write_smv
from ..noise import counts_to_uint16, detector_adu, int_image_uint16
from ..pixels import panel_extent_mask, rendered_mask
from ..psf import apply_psf, psf_kernel
from ..types import Params, Setup
from .header import smv_header_items
from .layout import file_image
from .report import ImageStats

__all__ = ["OutputError", "write_outputs", "counts_items", "blur_image", "psf_summary", "noise_summary"]


class OutputError(Exception):
    """An output file could not be written: message on stderr, exit status 1."""


def _write(kind: str, name: str, fn: Callable, *args) -> None:
    try:
        fn(name, *args)
    except OSError as exc:
        raise OutputError(f"cannot write the {kind} {name!r}: {exc.strerror or exc}") from None


def counts_items(adc: float, gain: float) -> List[Tuple[str, str]]:
    """nbtorch's extra SMV header items of an int/noise image (after nanoBragg's): ``ADC_OFFSET`` (counts added to
    every pixel, ``-adc``) and ``GAIN`` (counts per photon: ``-scale`` of the int image, ``-gain`` (default 1) for the noise image), in
    the shortest text that reads back exactly.  :func:`nbtorch.io.read_image` returns (value − ADC_OFFSET)/GAIN."""
    return [("ADC_OFFSET", repr(float(adc))), ("GAIN", repr(float(gain)))]


def blur_image(image: np.ndarray, setup: Setup, o: Outputs) -> np.ndarray:
    """The simulated ``image`` (``setup.image_shape`` float32 photons/pixel) blurred by the ``-psf`` kernel
    (:func:`nbtorch.psf.psf_kernel` of ``o.psf``, ``o.psf_fwhm`` µm, ``o.psf_radius`` px on ``setup.pixel_size``)
    in float64, each panel on its own within its extent (:func:`nbtorch.psf.apply_psf`; photons spread off a panel
    are lost); pixels not rendered (outside the ROI, masked, in no panel) give no photons and stay 0.  ``image``
    itself when ``o.psf`` is None.  Returns float32 of the same shape."""
    if o.psf is None:
        return image
    kernel = psf_kernel(o.psf, float(o.psf_fwhm), float(setup.pixel_size), radius=o.psf_radius)
    rendered = torch.from_numpy(rendered_mask(setup))
    img = torch.from_numpy(np.asarray(image, dtype=np.float32)).to(torch.float64)
    if setup.panels is None:
        out = apply_psf(img, kernel)
    else:
        extent = torch.from_numpy(panel_extent_mask(setup))
        out = torch.stack([apply_psf(img[k], kernel, extent[k]) for k in range(img.shape[0])])
    out = torch.where(rendered, out, torch.zeros((), dtype=out.dtype))
    return out.numpy().astype(np.float32)


def psf_summary(o: Outputs) -> str:
    """One summary line of the ``-psf`` applied ("" without one)."""
    if o.psf is None:
        return ""
    side = 2 * o.psf_radius + 1
    return (f"point-spread function: {o.psf}, FWHM {o.psf_fwhm:g} um, radius {o.psf_radius} px (kernel {side} x "
            f"{side}), applied to the float image before the int and noise images")


def noise_summary(o: Outputs) -> str:
    """One summary line of the noise image's detector terms ("" for nanoBragg's noise image)."""
    n = o.detector_noise
    if n.is_ideal:
        return ""
    return (f"detector: gain {n.gain:g} ADU/photon, read-out noise {n.readout_adu:g} ADU, flicker {n.flicker:g}, "
            f"calibration {n.calibration:g} (calib seed {n.calib_seed})")


def _write_noise(out: TextIO, image: np.ndarray, fimg, o: Outputs, header: List[Tuple[str, str]]) -> str:
    """The noise image: photon counts (nanoBragg's stream for ``-seed``) through the detector terms
    (:func:`nbtorch.noise.detector_adu`) plus the ADC offset, header GAIN = ``-gain``.  Returns its name."""
    noise = o.detector_noise
    adu, photons = detector_adu(image, o.seed, noise, roi=fimg.roi, mask=fimg.mask)
    noisy, overloads = counts_to_uint16(adu, adc=o.adc, roi=fimg.roi, mask=fimg.mask)
    src = " (from the clock; pass -seed to reproduce)" if o.seed_from_clock else ""
    out.write(f"noise seed: {o.seed}{src}\n")
    if not noise.is_ideal:
        out.write(noise_summary(o) + "\n")
    out.write(f"{photons:.0f} photons on noise image ({overloads} overloads)\n")
    _write("noise image", o.noisefile, write_smv, noisy, header + counts_items(o.adc, noise.gain))
    out.write(f"wrote {o.noisefile} as {noisy.size} 2-byte integers\n")
    return o.noisefile


def write_outputs(out: TextIO, image: np.ndarray, stats: ImageStats, params: Params, setup: Setup, extras: Extras,
                  base_dir: str = ".") -> List[str]:
    """Write the float image, the SMV int image, the PGM preview, the noise image and the NXmx file as
    ``extras.outputs`` asks, reporting each on ``out``.  ``image``: ``setup.image_shape`` float32 photons
    (``[spixels, fpixels]``, or ``[P, spixels, fpixels]`` for a detector of panels, written in its file's layout:
    :func:`.layout.file_image`; pixels in no panel are 0 in every file).  Returns the names written;
    :class:`OutputError` when a file cannot be written (the ones before it stay, complete)."""
    o = extras.outputs
    written: List[str] = []
    fimg = file_image(image, setup, extras)
    if fimg.what:
        out.write(f"image files: {fimg.what}\n")
    simulated, image = image, fimg.image
    _write("float image", o.floatfile, write_raw_float, image)
    out.write(f"wrote {o.floatfile} as {image.size} 4-byte floats\n")
    written.append(o.floatfile)

    header = smv_header_items(params, setup, extras, base_dir=base_dir)
    ints, scale = int_image_uint16(image, scale=o.scale, adc=o.adc, roi=fimg.roi)
    if fimg.on_panel is not None:
        ints[~fimg.on_panel] = 0
    out.write(f"intfile_scale = {scale:g}\n")
    _write("int image", o.intfile, write_smv, ints, header + counts_items(o.adc, scale))
    out.write(f"wrote {o.intfile} as {ints.size} 2-byte integers\n")
    written.append(o.intfile)

    if o.write_pgm:
        pgmscale = o.pgmscale
        if not pgmscale > 0:
            pgmscale = 250.0 / (5.0 * stats.rmsd) if stats.rmsd > 0 else scale
        out.write(f"pgm_scale = {pgmscale:g}\n")
        _write("PGM image", o.pgmfile, write_pgm, image, pgmscale)
        out.write(f"wrote {o.pgmfile} as {image.size} 1-byte integers\n")
        written.append(o.pgmfile)

    if o.write_noise:
        written.append(_write_noise(out, image, fimg, o, header))

    if o.nexusfile is not None:
        from ..io.nexus import write_nxmx  # h5py: only for a run that writes -nexusfile
        _write("NeXus file", o.nexusfile, write_nxmx, simulated, params, setup)
        modules = f" in {setup.n_panels} modules" if setup.panels is not None else ""
        out.write(f"wrote {o.nexusfile} as an NXmx file of {simulated.size} 4-byte floats{modules} with its "
                  "geometry\n")
        written.append(o.nexusfile)
    return written
