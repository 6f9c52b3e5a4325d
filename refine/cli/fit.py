"""``nbtorch-refine``: refine a nanoBragg model against an observed image from the command line (:data:`USAGE`;
options: :mod:`refine.cli.table`; many images: :mod:`refine.cli.many`).

Options start with ``--``; everything else after OBSERVED is the starting model as nanoBragg flags (single dash, as
``nbtorch``/``nanoBragg`` take them).  The observed image is read with :func:`nbtorch.io.images.read_image` (SMV,
raw float — its shape comes from the flags — or anything fabio reads).  Progress (one line per iteration: stage,
iteration, loss, change, step in standard errors, damping) goes to stderr; the summary to stdout.

The observed image is converted to photons, (value − ADC offset)/gain: the header's ``ADC_OFFSET``/``GAIN`` (nbtorch
writes them), or ``--adc``/``--gain`` for images from elsewhere.  Every option, flag, input file and output path is
checked before any work.

Exit status (:mod:`refine.cli.checks`): 0 converged with χ²/ν near 1, 1 an output could not be written, 2 a user
error (one line on stderr, nothing done), 3 finished without meeting a convergence rule, 4 converged but a poor fit
(χ²/ν of a likelihood target outside [1/3, 3]), 130 Ctrl-C, 143 SIGTERM.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional, Sequence

import numpy as np
import torch

import nbtorch
from nbtorch.interrupt import exit_status, interrupts, one_line_warnings
from nbtorch.io.images import write_raw_float
from nbtorch.io.smv import write_smv

from .. import fit, fit_options
from ..model.table import GROUPS
from ..targets.observed import read_observed
from .checks import (EXIT_OK, EXIT_OUTPUT, EXIT_USAGE, PLOT_EXTENSIONS, Progress, UsageError, check_outputs,
                     fit_status, flag_inputs)
from .many import main as main_many
from .table import arguments, check_values, flag_message, parser, split_argv

USAGE = ("nbtorch-refine OBSERVED [--refine GROUPS] [--method lm|lbfgs|adam] [--max-iter N] [--json OUT] [--image OUT] "
         "[more --options] <nanoBragg flags of the starting model>")


def _parser() -> argparse.ArgumentParser:
    return parser("refine", prog="nbtorch-refine", usage=USAGE, description="Refine a nanoBragg model (given as "
                  "nanoBragg flags) against an observed diffraction image.", epilog=(
                      "Groups: " + ", ".join(GROUPS) + " (sub-groups background.plane, background.constant, "
                      "background.water; single scalars such as cell.a, orientation.z, detector_rotation.y).  Many "
                      "images: nbtorch-refine --images LIST --help.  Example:\n"
                      "  nbtorch-refine obs.img --refine cell,orientation,distance,beam_center,scale --json fit.json "
                      "-cell 40 50 60 90 90 90 -misset 10 20 30 -N 6 -default_F 100 -distance 60 -detpixels 96 "
                      "-pixel 0.2"))


def _write_image(path: str, result) -> None:
    """The refined model image at ``path``: a figure (:data:`~refine.cli.checks.PLOT_EXTENSIONS`), SMV float
    (.img/.smv) or raw float32 (photons/pixel, [slow, fast])."""
    ext = os.path.splitext(path)[1].lower()
    if ext in PLOT_EXTENSIONS:
        return result.plot(path)
    img = result.model_image().detach().cpu().numpy().astype(np.float32)
    if ext not in (".img", ".smv"):
        return write_raw_float(path, img)
    write_smv(path, img, {"PIXEL_SIZE": result.setup.pixel_size, "DISTANCE": float(result.params.detector.distance),
                          "WAVELENGTH": float(result.params.beam.wavelength)})


def _parse(argv: List[str]):
    """(parsed options, nanoBragg flags, :class:`~refine.pipeline.options.FitOptions`), every option, OBSERVED and
    output path checked; :class:`UsageError`."""
    ours, flags = split_argv(argv)
    ns = _parser().parse_args(ours)
    check_values(ns, "refine")
    if not flags:
        raise UsageError("give the starting model as nanoBragg flags after OBSERVED (see --help)")
    if not os.path.isfile(ns.observed):
        raise UsageError(f"OBSERVED {ns.observed}: no such file")
    _check_outputs(ns, flags, ns.matrix_out)
    try:
        options = fit_options(nanobragg_args=flags, **arguments(ns, "refine"))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return ns, flags, options


def _check_outputs(ns, flags: List[str], matrix_out: Optional[str]) -> None:
    """The safe-output rule (:func:`~refine.cli.checks.check_outputs`) for ``--json``, ``--image``, ``--plot`` and the
    refined matrix against OBSERVED and the flags' input files."""
    check_outputs([("--json", ns.json), ("--image", ns.image), ("--plot", ns.plot), ("--matrix-out", matrix_out)],
                  inputs=[("OBSERVED", ns.observed)] + flag_inputs(flags))


def _load(ns, flags: List[str]):
    """(params, setup, observed image in photons, matrix path) from the flags and OBSERVED; :class:`UsageError`."""
    if ns.threads:
        torch.set_num_threads(int(ns.threads))
    try:
        params, setup = nbtorch.from_nanobragg_args(flags, dtype=getattr(torch, ns.dtype))
        if ns.matrix_out is not None and setup.nanobragg_cell:
            raise UsageError(f"--matrix-out {ns.matrix_out}: the starting model has a -cell, not a -mat matrix; its "
                             "refined cell is written as -cell (drop --matrix-out)")
        obs = read_observed(ns.observed, setup, params, overload=ns.overload, adc=ns.adc, gain=ns.gain)
    except (ValueError, OSError, ImportError) as exc:
        raise UsageError(str(exc)) from None
    matrix_out = ns.matrix_out
    if matrix_out is None and not setup.nanobragg_cell:
        matrix_out = (os.path.splitext(ns.json)[0] + ".mat") if ns.json else "refined.mat"
        _check_outputs(ns, flags, matrix_out)
    return params, setup, obs, matrix_out


def _write_outputs(ns, result, matrix_out: Optional[str]) -> int:
    """The matrix, JSON, image and plot a run asked for: :data:`EXIT_OK`, or :data:`EXIT_OUTPUT` when one could not
    be written (one line each; the others are still written)."""
    status = EXIT_OK
    try:
        if matrix_out is not None:
            result.to_nanobragg_args(matrix_path=matrix_out, write_matrix=True)
        print("refined model: nbtorch " + result.nanobragg_command(write_matrix=False))
    except OSError as exc:
        print(f"nbtorch-refine: error: cannot write --matrix-out {matrix_out}: {exc}", file=sys.stderr)
        status = EXIT_OUTPUT
    except ValueError as exc:
        print(f"nbtorch-refine: cannot write the model as flags: {exc}", file=sys.stderr)
    for option, path, write in (("--json", ns.json, result.to_json), ("--image", ns.image,
                                lambda p: _write_image(p, result)), ("--plot", ns.plot, result.plot)):
        if path:
            try:
                write(path)
            except (ValueError, OSError) as exc:
                print(f"nbtorch-refine: error: cannot write {option} {path}: {exc}", file=sys.stderr)
                status = EXIT_OUTPUT
    return status


def _single(argv: List[str]) -> int:
    """One observed image: parse and check, fit, report, write (the exit status)."""
    ns, flags, options = _parse(argv)
    one_line_warnings("nbtorch-refine")
    params, setup, obs, matrix_out = _load(ns, flags)
    t0 = time.perf_counter()
    try:
        result = fit(obs, params, setup, options=options, callback=None if ns.quiet else Progress(),
                     matrix_path=matrix_out)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if obs.adc_offset or obs.gain != 1.0:
        print(f"note: {ns.observed}: photons = (value - {obs.adc_offset:g}) / {obs.gain:g} (ADC offset, gain)")
    print(result.summary())
    status = _write_outputs(ns, result, matrix_out)
    if not ns.quiet:
        print(f"total {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    return status if status != EXIT_OK else fit_status(result.converged, result.ok)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``nbtorch-refine`` (returns the exit status, see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    images = any(t == "--images" or t.startswith("--images=") for t in argv)  # many images: .many
    try:
        with interrupts():
            return main_many(argv) if images else _single(argv)
    except UsageError as exc:
        print(f"nbtorch-refine: error: {flag_message(str(exc), 'images' if images else 'refine')}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: files being written are removed (atomic writes)
        print("\nnbtorch-refine: interrupted", file=sys.stderr)
        return exit_status(exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
