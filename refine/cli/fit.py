"""``nbtorch-refine``: refine a nanoBragg model against an observed image from the command line.

    nbtorch-refine OBSERVED [--refine GROUPS] [--method lm|lbfgs|adam] [--max-iter N] [--json OUT] [--image OUT]
                   [more --options] <nanoBragg flags of the starting model>

Options start with ``--``; everything else after OBSERVED is the starting model as nanoBragg flags (single dash, as
``nbtorch``/``nanoBragg`` take them).  The observed image is read with :func:`nbtorch.io.images.read_image` (SMV,
raw float — its shape comes from the flags — or anything fabio reads).  Progress (one line per iteration: stage,
iteration, loss, change, step in standard errors, damping) goes to stderr; the summary to stdout.

The observed image is converted to photons, (value − ADC offset)/gain: the header's ``ADC_OFFSET``/``GAIN`` (nbtorch
writes them), or ``--adc``/``--gain`` for images from elsewhere.  Every option, flag, input file and output path is
checked before any work.

Exit status (:mod:`refine.cli_checks`): 0 converged with χ²/ν near 1, 1 an output could not be written, 2 a user
error (one line on stderr, nothing done), 3 finished without meeting a convergence rule, 4 converged but a poor fit
(χ²/ν of a likelihood target outside [1/3, 3]), 130 Ctrl-C, 143 SIGTERM.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional, Sequence

from .checks import (EXIT_OK, EXIT_OUTPUT, EXIT_USAGE, PLOT_EXTENSIONS, OneLineParser, UsageError,
                         check_adc_gain, check_outputs, check_threads, fit_status, flag_inputs, free_groups)

# our options and how many values each takes (everything else after OBSERVED goes to the nanoBragg parser)
_OPTIONS = {
    "--refine": 1, "--method": 1, "--max-iter": 1, "--json": 1, "--image": 1, "--target": 1, "--read-noise": 1,
    "--crystal-system": 1, "--ncells-mode": 1, "--no-coarse": 0, "--spots-only": 0, "--overload": 1,
    "--background": 3, "--matrix-out": 1, "--plot": 1, "--esd-scale": 1, "--threads": 1, "--quiet": 0,
    "--coarse-iter": 1, "--max-shift": 1, "--lr": 1, "--schedule": 1, "--dtype": 1, "--help": 0,
    "--allow-degenerate": 0, "--adc": 1, "--gain": 1,
}


def _parser() -> argparse.ArgumentParser:
    from ..model.parameters import CRYSTAL_SYSTEMS, DEFAULT_FREE, GROUPS

    ap = OneLineParser(
        prog="nbtorch-refine",
        usage=("nbtorch-refine OBSERVED [--refine GROUPS] [--method lm|lbfgs|adam] [--max-iter N] [--json OUT] "
               "[--image OUT] [more --options] <nanoBragg flags of the starting model>"),
        description="Refine a nanoBragg model (given as nanoBragg flags) against an observed diffraction image.",
        epilog=(
            "Groups: " + ", ".join(GROUPS) + " (sub-groups background.plane, background.constant, background.water; "
            "single scalars such as cell.a, orientation.z, detector_rotation.y).  Many images: nbtorch-refine "
            "--images LIST --help.  Example:\n"
            "  nbtorch-refine obs.img --refine cell,orientation,distance,beam_center,scale --json fit.json "
            "-cell 40 50 60 90 90 90 -misset 10 20 30 -N 6 -default_F 100 -distance 60 -detpixels 96 -pixel 0.2"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("observed", help="observed image (SMV .img, raw float .bin with the shape of the flags, CBF, ...)")
    ap.add_argument("--refine", default=",".join(DEFAULT_FREE), help="comma-separated groups to refine "
                    f"(default {','.join(DEFAULT_FREE)})")
    ap.add_argument("--method", default="lm", choices=["lm", "lbfgs", "adam"], help="minimiser (default lm)")
    ap.add_argument("--max-iter", type=int, default=None, help="iterations of the final stage")
    ap.add_argument("--json", default=None, help="write the result as JSON here")
    ap.add_argument("--image", default=None, help="write the refined model image here (.png/.pdf/.svg: a plot of "
                    "observed/model/residual and the loss; .img/.smv: SMV float; else raw float32)")
    ap.add_argument("--target", default="poisson", choices=["poisson", "gaussian", "lsq", "anscombe"])
    ap.add_argument("--read-noise", type=float, default=1.0, help="read noise σ (photons) of the gaussian target")
    ap.add_argument("--crystal-system", default="auto", choices=["auto"] + list(CRYSTAL_SYSTEMS),
                    help="constrain the cell (default auto: the highest symmetry the starting cell satisfies within "
                    "0.1%% and 0.1 deg)")
    ap.add_argument("--allow-degenerate", action="store_true", help="refine free parameters the image cannot tell "
                    "apart (a detector rotation about the beam with the crystal's; two-theta with the detector "
                    "rotation about its axis under a beam pivot); refused otherwise")
    ap.add_argument("--ncells-mode", default="auto", choices=["auto", "isotropic", "anisotropic"])
    ap.add_argument("--no-coarse", action="store_true", help="skip the coarse-to-fine stages")
    ap.add_argument("--coarse-iter", type=int, default=8, help="iterations of each broadened stage (default 8)")
    ap.add_argument("--max-shift", type=int, default=8, help="beam-centre translation search radius (pixels)")
    ap.add_argument("--spots-only", action="store_true", help="fit only pixels near spots plus a background sample")
    ap.add_argument("--overload", type=float, default=None, help="exclude pixels at or above this value (in the "
                    "file's counts)")
    ap.add_argument("--adc", type=float, default=None, help="ADC offset (counts) to subtract from the observed image "
                    "(default: the header's ADC_OFFSET, which nbtorch writes, else 0)")
    ap.add_argument("--gain", type=float, default=None, help="counts per photon of the observed image (default: "
                    "the header's GAIN, else 1)")
    ap.add_argument("--background", type=float, nargs=3, default=None, metavar=("C0", "CFAST", "CSLOW"),
                    help="starting background plane (photons/pixel)")
    ap.add_argument("--matrix-out", default=None, help="where to write the refined MOSFLM matrix of a -mat model "
                    "(default: next to --json, else refined.mat)")
    ap.add_argument("--plot", default=None, help="also save the observed/model/residual/loss figure here")
    ap.add_argument("--esd-scale", default="auto", choices=["auto", "chi2", "none"])
    ap.add_argument("--lr", type=float, default=0.05, help="Adam learning rate (typical errors per step)")
    ap.add_argument("--schedule", default="cosine", choices=["constant", "cosine", "exponential", "plateau"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--quiet", action="store_true", help="no per-iteration progress")
    return ap


def split_argv(argv: Sequence[str]):
    """Split the command line into (our tokens incl. OBSERVED, nanoBragg flags)."""
    ours: List[str] = []
    flags: List[str] = []
    observed_seen = False  # OBSERVED comes before the first nanoBragg flag (never a flag's value)
    i = 0
    argv = list(argv)
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--"):
            name = tok.split("=", 1)[0]
            n = _OPTIONS.get(name)
            if n is None:
                ours.append(tok)  # argparse reports it
                i += 1
                continue
            take = 0 if "=" in tok else n
            ours.extend(argv[i: i + 1 + take])
            i += 1 + take
        elif tok in ("-h",):
            ours.append(tok)
            i += 1
        elif not observed_seen and not flags and not tok.startswith("-"):
            ours.append(tok)
            observed_seen = True
            i += 1
        else:
            flags.append(tok)
            i += 1
    return ours, flags


class Progress:
    """Per-iteration progress lines on a stream."""

    def __init__(self, stream=None):
        self.stream = sys.stderr if stream is None else stream
        self.prev = None
        self.stage = None
        self.started = False

    def __call__(self, h: dict):
        if not self.started:  # the header with the first iteration (a run refused before it prints one line only)
            self.started = True
            print(f"{'stage':9s} {'iter':>4s} {'loss':>17s} {'change':>12s} {'step/σ':>9s} {'damping':>10s}",
                  file=self.stream)
        if h.get("stage") != self.stage:
            self.stage, self.prev = h.get("stage"), None
        change = "" if self.prev is None else f"{h['loss'] - self.prev:12.5g}"
        self.prev = h["loss"]
        print(f"{str(h.get('stage', '')):9s} {h['iteration']:4d} {h['loss']:17.10g} {change:>12s} "
              f"{h['step']:9.3g} {h['damping']:10.3g}", file=self.stream, flush=True)


def _write_image(path: str, result) -> None:
    """The refined model image at ``path``: a figure (:data:`~refine.cli_checks.PLOT_EXTENSIONS`), SMV float
    (.img/.smv) or raw float32 (photons/pixel, [slow, fast])."""
    ext = os.path.splitext(path)[1].lower()
    if ext in PLOT_EXTENSIONS:
        result.plot(path)
        return
    import numpy as np

    img = result.model_image().detach().cpu().numpy().astype(np.float32)
    if ext in (".img", ".smv"):
        from nbtorch.io.smv import write_smv

        write_smv(path, img, {"PIXEL_SIZE": result.setup.pixel_size,
                              "DISTANCE": float(result.params.detector.distance),
                              "WAVELENGTH": float(result.params.beam.wavelength)})
    else:
        from nbtorch.io.images import write_raw_float

        write_raw_float(path, img)


def _parse(argv: List[str]):
    """(parsed options, nanoBragg flags, :class:`~refine.options.FitOptions`), every option, OBSERVED and output path
    checked; :class:`UsageError`."""
    ours, flags = split_argv(argv)
    ns = _parser().parse_args(ours)
    check_threads(ns.threads)
    check_adc_gain(ns.adc, ns.gain)
    if not flags:
        raise UsageError("give the starting model as nanoBragg flags after OBSERVED (see --help)")
    if not os.path.isfile(ns.observed):
        raise UsageError(f"OBSERVED {ns.observed}: no such file")
    check_outputs([("--json", ns.json), ("--image", ns.image), ("--plot", ns.plot), ("--matrix-out", ns.matrix_out)],
                  inputs=[("OBSERVED", ns.observed)] + flag_inputs(flags))
    from ..pipeline.fit import fit_options

    try:
        options = fit_options(
            free=free_groups(ns.refine), method=ns.method, target=ns.target, read_noise=ns.read_noise,
            crystal_system=ns.crystal_system, ncells_mode=ns.ncells_mode, background=ns.background,
            max_iter=ns.max_iter, coarse_to_fine=not ns.no_coarse, coarse_iter=ns.coarse_iter,
            max_shift=ns.max_shift, spots_only=ns.spots_only, lr=ns.lr, schedule=ns.schedule,
            esd_scale=ns.esd_scale, nanobragg_args=flags, allow_degenerate=ns.allow_degenerate)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return ns, flags, options


def _load(ns, flags: List[str]):
    """(params, setup, observed image in photons, matrix path) from the flags and OBSERVED; :class:`UsageError`."""
    import torch

    import nbtorch

    from ..targets.observed import read_observed

    if ns.threads:
        torch.set_num_threads(int(ns.threads))
    dtype = torch.float64 if ns.dtype == "float64" else torch.float32
    try:
        params, setup = nbtorch.from_nanobragg_args(flags, dtype=dtype)
        if ns.matrix_out is not None and setup.nanobragg_cell:
            raise UsageError(f"--matrix-out {ns.matrix_out}: the starting model has a -cell, not a -mat matrix; its "
                             "refined cell is written as -cell (drop --matrix-out)")
    except (ValueError, OSError, ImportError) as exc:
        raise UsageError(str(exc)) from None
    try:
        obs = read_observed(ns.observed, setup, params, overload=ns.overload, adc=ns.adc, gain=ns.gain)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    matrix_out = ns.matrix_out
    if matrix_out is None and not setup.nanobragg_cell:
        matrix_out = (os.path.splitext(ns.json)[0] + ".mat") if ns.json else "refined.mat"
        check_outputs([("--json", ns.json), ("--image", ns.image), ("--plot", ns.plot), ("--matrix-out", matrix_out)],
                      inputs=[("OBSERVED", ns.observed)] + flag_inputs(flags))
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
    from nbtorch.interrupt import one_line_warnings

    ns, flags, options = _parse(argv)
    one_line_warnings("nbtorch-refine")
    params, setup, obs, matrix_out = _load(ns, flags)
    from ..pipeline.fit import fit

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
    if status != EXIT_OK:
        return status
    return fit_status(result.converged, result.ok)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``nbtorch-refine`` (returns the exit status, see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from nbtorch.interrupt import exit_status, interrupts

    try:
        with interrupts():
            if any(t == "--images" or t.startswith("--images=") for t in argv):  # many images: refine/cli_many.py
                from .many import main as main_many

                return main_many(argv)
            return _single(argv)
    except UsageError as exc:
        print(f"nbtorch-refine: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: files being written are removed (atomic writes)
        print("\nnbtorch-refine: interrupted", file=sys.stderr)
        return exit_status(exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
