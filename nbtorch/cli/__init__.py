"""``nbtorch``: the nanoBragg command line, writing the same files as the C program.

Replace ``nanoBragg`` by ``nbtorch`` in a script and the same flags produce the same outputs::

    nbtorch -hkl P1.hkl -cell 100 100 100 90 90 90 -N 5 -distance 100 -floatfile image.bin -intfile image.img

Flags are nanoBragg's single-dash flags (see ``nbtorch --help`` and docs/cli.md), matched exactly or through their
documented aliases (never by substring), and every value is checked before anything is computed or written.
Outputs: ``-floatfile`` (raw float32, photons/pixel, default ``floatimage.bin``), ``-intfile`` (SMV uint16, default
``intimage.img``), ``-noisefile`` (SMV uint16 with Poisson noise, default ``noiseimage.img``, skipped with
``-nonoise``), ``-pgmfile`` (8-bit PGM, default ``image.pgm``, skipped with ``-nopgm``), and nbtorch's ``-nexusfile``
(NXmx NeXus/HDF5: the float image with its geometry; only when given). Every file is written atomically, after every
check has passed; an output that is an input file or another output is refused first (docs/io.md, "Output files").
Structure factors come from ``-hkl`` (text or MTZ) or ``-pdb`` (a model). nbtorch extras (long options): ``--dtype
float32|float64`` (default float64) and ``--device cpu|cuda``.

Modules: :mod:`.help` (``--help`` and the docs table), :mod:`.report` (statistics, diagnostics), :mod:`.header`
(SMV header), :mod:`.progress` (banded rendering with a progress bar), :mod:`.outputs` (the files).

Exit status: 0 on success, 2 for command-line or input errors (one line on stderr, no traceback), 1 when an output
cannot be written, 130 when interrupted (143 for SIGTERM).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Dict, List, Optional, Sequence, TextIO, Tuple

import numpy as np
import torch

from .. import __version__
from ..allocator import set_up_program
from ..args import build, missing_inputs, parse_args
from ..args.build import INPUT_FILE_FLAGS, input_files, output_files
from ..interrupt import exit_status, interrupts, one_line_warnings
from .. import precompile as kernel_sets
from ..cachedir import cache_root
from ..io.safe_output import check_output_paths
from ..pixels import rendered_mask, rendered_pixels
from ..rng import prepare_native_poidev
from ..simulate import simulate
from .help import FLAG_GROUPS, PROG, format_help
from .outputs import OutputError, blur_image, psf_summary, write_outputs
from .progress import render
from .report import ImageStats, image_statistics, pixel_diagnostics, print_all_pixels, print_pixel_block
from .report import print_setup, print_statistics

__all__ = ["main", "format_help", "FLAG_GROUPS", "ImageStats", "image_statistics", "pixel_diagnostics", "render",
           "missing_inputs", "PROG", "UsageError", "OutputError"]

_DTYPES = {"float64": torch.float64, "double": torch.float64, "float32": torch.float32, "float": torch.float32}


class UsageError(Exception):
    """A command-line or input problem: message on stderr, exit status 2."""


def _split_extras(argv: Sequence[str]) -> Tuple[List[str], Dict[str, str]]:
    """Separate nbtorch's long options (and help/version) from the nanoBragg flags."""
    rest: List[str] = []
    extra: Dict[str, str] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        name = tok.split("=", 1)[0]
        if tok in ("-h", "--help", "-help"):
            extra["help"] = "1"
        elif tok == "--version":
            extra["version"] = "1"
        elif tok == "--precompile":
            extra["precompile"] = "1"
        elif name in ("--dtype", "--device", "--specs"):
            if "=" in tok:
                extra[name[2:]] = tok.split("=", 1)[1]
            elif i + 1 < len(argv):
                extra[name[2:]] = argv[i + 1]
                i += 1
            else:
                raise UsageError(f"{name} needs a value")
        else:
            rest.append(tok)
        i += 1
    return rest, extra


def _precision(extra: Dict[str, str]):
    """(dtype, device) from ``--dtype``/``--device``."""
    name = extra.get("dtype", "float64")
    if name not in _DTYPES:
        raise UsageError(f"--dtype must be float32 or float64, got {name!r}")
    return _DTYPES[name], _device(extra)


def _device(extra: Dict[str, str]) -> Optional[torch.device]:
    """The ``--device`` (None when not given); :class:`UsageError` for a name torch does not know or CUDA absent."""
    device = extra.get("device")
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a torch device (use cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    return dev


def _precompile(rest: List[str], extra: Dict[str, str], out: TextIO) -> int:
    """``nbtorch --precompile [--dtype float32,float64] [--specs common|all] [--device D]``: build the kernel set
    into the cache (:func:`nbtorch.precompile.precompile`) and simulate nothing.  Exit 0 when every kernel was built,
    1 when some failed (each reported); :class:`UsageError` for nanoBragg flags or bad option values."""
    if rest:
        raise UsageError(f"--precompile fills the kernel cache and simulates nothing: it takes only --dtype, --specs "
                         f"and --device, not {rest[0]!r}")
    text = extra.get("dtype", "float32,float64")
    names = [d.strip() for d in text.split(",") if d.strip()]
    if not names or any(d not in _DTYPES for d in names):
        raise UsageError(f"--dtype with --precompile must be float32 and/or float64, comma-separated, got {text!r}")
    specs = extra.get("specs", "common")
    if specs not in kernel_sets.SETS:
        raise UsageError(f"--specs must be {' or '.join(kernel_sets.SETS)}, got {specs!r}")
    device = _device(extra) or torch.device("cpu")
    dtypes = list(dict.fromkeys(_DTYPES[d] for d in names))
    out.write(f"{PROG} --precompile: building the {specs} kernels for {', '.join(str(d)[6:] for d in dtypes)} on "
              f"{device} into {cache_root()}\n")
    out.flush()

    def progress(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    failed = kernel_sets.precompile(dtypes, specs, str(device), progress=progress)
    out.write(f"kernel cache {cache_root()}: {'all built' if not failed else f'{failed} failed'}\n")
    return 1 if failed else 0


def _model(flags: List[str], dtype, device, base_dir: str, out: TextIO):
    """Parse, check and build: every value and input file is checked here, before any work.  → (params, setup,
    extras); :class:`UsageError` naming the flag."""
    try:
        opts = parse_args(flags)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    missing = missing_inputs(opts)
    if missing:
        raise UsageError("missing required input" + ("s" if len(missing) > 1 else "") + ": " + "; and ".join(missing))
    for flag in INPUT_FILE_FLAGS:
        if flag in opts:
            name = str(opts[flag])
            if not os.path.isfile(name if os.path.isabs(name) else os.path.join(base_dir, name)):
                raise UsageError(f"{flag} {name}: no such file")
    if "-dump" in opts:
        out.write(f"note: -dump {opts['-dump']} ignored: nbtorch never reads or writes an Fdump cache\n")
    try:  # the safe-output rule (nbtorch.io.safe_output) before any work: no output is an input or another output
        check_output_paths(output_files(opts), input_files(opts))  # base_dir is the current folder
        return build(opts, dtype=dtype, device=device, base_dir=base_dir)
    except (ValueError, OSError) as exc:
        raise UsageError(str(exc)) from None


def _simulate(params, setup, extras, err: TextIO) -> np.ndarray:
    """The float image ``[S, F]`` float32 (photons/pixel); :class:`UsageError` when it is not finite, before any
    file is written."""
    try:
        image_t = render(params, setup, progress=err if extras.outputs.progress else None, label=PROG)
    except ValueError as exc:  # parameter values the kernels reject (build() checks most of them first)
        raise UsageError(str(exc)) from None
    with np.errstate(over="ignore"):
        image = image_t.detach().to("cpu").numpy().astype(np.float32)
    nan = int(np.isnan(image).sum())
    if nan:
        raise UsageError(f"the simulated image is NaN in {nan} pixels: a singular geometry or NaN inputs (check the "
                         "-sourcefile, -polar_vector, detector and beam vectors); nothing written")
    bad = int((~np.isfinite(image)).sum())
    if bad:
        raise UsageError(f"the simulated image is not finite in {bad} pixels (beyond float32's 3.4e38 photons): "
                         "lower -fluence (or -flux), -default_F or the -hkl amplitudes, -N or -water; nothing written")
    return image


def _diagnostics(out: TextIO, params, setup, extras, image: np.ndarray) -> None:
    """``-printout_pixel F S`` (the full pixel value and its first sample's terms) or ``-printout`` (every pixel)."""
    pix = extras.outputs.printout_pixel
    if pix is None:
        if extras.outputs.printout:
            print_all_pixels(out, params, setup, image)
        return
    f, s = pix
    value = 0.0
    if rendered_mask(setup)[s, f]:
        value = float(simulate(params, setup.replace(roi=(f, f, s, s)))[s, f].detach().cpu().to(torch.float32))
    else:
        out.write(f"note: pixel fast {f} slow {s} is outside the -roi or masked: not rendered (0)\n")
    print_pixel_block(out, pixel_diagnostics(params, setup, [f], [s]), 0, f, s, value, setup)
    if value != float(image[s, f]):
        out.write(f"  (image value {float(image[s, f]):.10g} differs from the single-pixel value)\n")


def _run(argv: List[str], out: TextIO, err: TextIO) -> int:
    rest, extra = _split_extras(argv)
    if "help" in extra:
        out.write(format_help())
        return 0
    if "version" in extra:
        out.write(f"{PROG} {__version__}\n")
        return 0
    if "precompile" in extra:
        return _precompile(rest, extra, out)
    if "specs" in extra:
        raise UsageError("--specs is an option of --precompile (nbtorch --precompile --specs common|all)")
    dtype, device = _precision(extra)
    base_dir = os.getcwd()
    params, setup, extras = _model(rest, dtype, device, base_dir, out)
    if extras.outputs.write_noise:
        prepare_native_poidev()  # a first run compiles it while the image is simulated
    dt_name = str(dtype).replace("torch.", "")
    out.write(f"{PROG} {__version__}: nanoBragg physics in PyTorch ({dt_name} on {params.crystal.cell.device})\n")
    for note in extras.notes:
        out.write(f"note: {note}\n")
    print_setup(out, params, setup)
    out.flush()
    t0 = time.perf_counter()
    image = _simulate(params, setup, extras, err)
    out.write(f"simulated {len(rendered_pixels(setup))} pixels in {time.perf_counter() - t0:.2f} s\n")
    _diagnostics(out, params, setup, extras, image)
    if extras.outputs.psf is not None:  # the files hold the detector's blurred photons (the diagnostics: unblurred)
        image = blur_image(image, setup, extras.outputs)
        out.write(psf_summary(extras.outputs) + "\n")
    stats = image_statistics(image, setup)
    print_statistics(out, stats, setup)
    written = write_outputs(out, image, stats, params, setup, extras, base_dir)
    out.write(f"files written: {', '.join(written)}\n")
    out.flush()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``nbtorch`` command line.

    ``argv``: the arguments without the program name (default ``sys.argv[1:]``); a leading ``nanoBragg`` or
    ``nbtorch`` token is dropped.  Writes the summary to stdout, errors and the progress bar to stderr, and returns
    the exit status (0 ok, 2 command-line/input error, 1 output error, 130 interrupted by Ctrl-C, 143 by SIGTERM).
    The process keeps its freed memory for reuse and freezes the objects of its imports
    (:func:`nbtorch.allocator.set_up_program`: eager tiles 2× faster, ≈ 0.2 s less at exit).
    """
    set_up_program()
    args = list(sys.argv[1:] if argv is None else argv)
    if args and os.path.basename(args[0]) in ("nanoBragg", "nbtorch"):
        args = args[1:]
    out, err = sys.stdout, sys.stderr
    one_line_warnings(PROG)
    try:
        with interrupts():
            if not args:
                raise UsageError("no flags given; missing " + "; and ".join(missing_inputs({}))
                                 + f" ({PROG} --help lists every flag)")
            return _run(args, out, err)
    except UsageError as exc:
        err.write(f"{PROG}: error: {exc}\n")
        return 2
    except OutputError as exc:
        err.write(f"{PROG}: error: {exc}\n")
        return 1
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: files being written are removed (atomic writes)
        err.write(f"\n{PROG}: interrupted\n")
        return exit_status(exc)
