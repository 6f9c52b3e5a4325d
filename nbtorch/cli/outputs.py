"""The command line's output files, written atomically in nanoBragg's order: float, int, PGM, noise; then nbtorch's
NeXus file (``-nexusfile``).  A detector of panels is written in its file's layout (:mod:`.layout`)."""
from __future__ import annotations

from typing import Callable, List, TextIO, Tuple

import numpy as np

from ..args import Extras
from ..io.images import write_pgm, write_raw_float
from ..io.nexus import write_nxmx
from ..io.smv import write_smv
from ..noise import counts_to_uint16, int_image_uint16, poisson_noise
from ..types import Params, Setup
from .header import smv_header_items
from .layout import file_image
from .report import ImageStats

__all__ = ["OutputError", "write_outputs", "counts_items"]


class OutputError(Exception):
    """An output file could not be written: message on stderr, exit status 1."""


def _write(kind: str, name: str, fn: Callable, *args) -> None:
    try:
        fn(name, *args)
    except OSError as exc:
        raise OutputError(f"cannot write the {kind} {name!r}: {exc.strerror or exc}") from None


def counts_items(adc: float, gain: float) -> List[Tuple[str, str]]:
    """nbtorch's extra SMV header items of an int/noise image (after nanoBragg's): ``ADC_OFFSET`` (counts added to
    every pixel, ``-adc``) and ``GAIN`` (counts per photon: ``-scale`` of the int image, 1 for the noise image), in
    the shortest text that reads back exactly.  :func:`nbtorch.io.read_image` returns (value − ADC_OFFSET)/GAIN."""
    return [("ADC_OFFSET", repr(float(adc))), ("GAIN", repr(float(gain)))]


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
        counts = poisson_noise(image, o.seed, roi=fimg.roi, mask=fimg.mask)
        noisy, overloads = counts_to_uint16(counts, adc=o.adc, roi=fimg.roi, mask=fimg.mask)
        src = " (from the clock; pass -seed to reproduce)" if o.seed_from_clock else ""
        out.write(f"noise seed: {o.seed}{src}\n")
        out.write(f"{counts.sum():.0f} photons on noise image ({overloads} overloads)\n")
        _write("noise image", o.noisefile, write_smv, noisy, header + counts_items(o.adc, 1.0))
        out.write(f"wrote {o.noisefile} as {noisy.size} 2-byte integers\n")
        written.append(o.noisefile)

    if o.nexusfile is not None:
        _write("NeXus file", o.nexusfile, write_nxmx, simulated, params, setup)
        modules = f" in {setup.n_panels} modules" if setup.panels is not None else ""
        out.write(f"wrote {o.nexusfile} as an NXmx file of {simulated.size} 4-byte floats{modules} with its "
                  "geometry\n")
        written.append(o.nexusfile)
    return written
