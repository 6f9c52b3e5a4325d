"""``nbtorch``: the nanoBragg command line, writing the same files as the C program.

Replace ``nanoBragg`` by ``nbtorch`` in a script and the same flags produce the same outputs::

    nbtorch -hkl P1.hkl -cell 100 100 100 90 90 90 -N 5 -distance 100 -floatfile image.bin -intfile image.img

Flags are nanoBragg's single-dash flags (see ``nbtorch --help`` and docs/cli.md), matched exactly or through their
documented aliases (never by substring).  Outputs: ``-floatfile`` (raw float32, photons/pixel, default
``floatimage.bin``), ``-intfile`` (SMV uint16, default ``intimage.img``), ``-noisefile`` (SMV uint16 with Poisson noise,
default ``noiseimage.img``, skipped with ``-nonoise``), ``-pgmfile`` (8-bit PGM, default ``image.pgm``, skipped with
``-nopgm``).  Every file is written atomically.  nbtorch extras (long options): ``--dtype float32|float64`` (default
float64) and ``--device cpu|cuda``.

Exit status: 0 on success, 2 for command-line or input errors (message on stderr, no traceback), 1 when an output
cannot be written, 130 when interrupted.
"""
from __future__ import annotations

import math
import os
import sys
import textwrap
import time
from typing import Dict, List, NamedTuple, Optional, Sequence, TextIO, Tuple

import numpy as np
import torch

from . import __version__
from . import detector as detmod
from .args import ALIASES, FLAGS, build, parse_args
from .beam import polarization_factor
from .header import smv_header_items
from .io.images import write_pgm, write_raw_float
from .io.smv import write_smv
from .noise import counts_to_uint16, int_image_uint16, poisson_noise, roi_mask
from .shape import lattice_factor, round_half_down
from .simulate import crystal_orientations, simulate
from .structure import lookup_nearest, lookup_tricubic
from .types import Params, Setup

__all__ = ["main", "format_help", "FLAG_GROUPS", "ImageStats", "image_statistics", "pixel_diagnostics",
           "render", "missing_inputs"]

PROG = "nbtorch"

#: Help groups: the first flag of each area in :data:`nbtorch.args.FLAGS` order → the group title.
FLAG_GROUPS: Dict[str, str] = {
    "-cell": "Crystal: cell, orientation, size, shape",
    "-hkl": "Structure factors",
    "-mosaic": "Mosaicity and spindle rotation",
    "-lambda": "Beam: wavelength, dispersion, divergence, sources, polarization, fluence",
    "-distance": "Detector geometry, sensor, sampling",
    "-water": "Background",
    "-floatfile": "Noise and output",
}

_COUNT_FLAGS = {"-N", "-Na", "-Nb", "-Nc", "-mosaic_domains", "-phisteps", "-dispsteps", "-hdivsteps", "-vdivsteps",
                "-divsteps", "-detpixels", "-detpixels_f", "-detpixels_s", "-detector_thicksteps", "-oversample",
                "-seed", "-mosaic_seed", "-misset_seed"}
_FILE_FLAGS = {"-mat", "-hkl", "-dump", "-stol", "-4stol", "-Q", "-stolout", "-sourcefile", "-mask", "-img",
               "-floatfile", "-intfile", "-noisefile", "-pgmfile"}
_INPUT_FILE_FLAGS = ("-mat", "-hkl", "-sourcefile", "-mask", "-img")
_DTYPES = {"float64": torch.float64, "double": torch.float64, "float32": torch.float32, "float": torch.float32}
_EXTRA_OPTIONS = (
    ("--dtype float32|float64", "nbtorch extra: floating-point precision of the simulation (default float64)"),
    ("--device cpu|cuda[:N]", "nbtorch extra: torch device to simulate on (default cpu)"),
    ("-h, --help", "show this help and exit"),
    ("--version", "print the nbtorch version and exit"),
)
#: Work (samples) above which the progress bar renders the image in horizontal bands.
_BANDED_SAMPLES = 1 << 22
_BANDS = 20


class _UsageError(Exception):
    """A command-line or input problem: message on stderr, exit status 2."""


class _OutputError(Exception):
    """An output file could not be written: message on stderr, exit status 1."""


# ----------------------------------------------------------------------------------------------------------------
# help


def _metavar(flag: str, nargs) -> str:
    if nargs == 0:
        return ""
    if nargs == "cell":
        return "A [B C AL BE GA]"
    if nargs == "misset":
        return "RX RY RZ|random"
    if flag == "-pivot":
        return "beam|sample"
    if flag in _FILE_FLAGS:
        return "FILE"
    if nargs == 1:
        return "N" if flag in _COUNT_FLAGS else "X"
    if nargs == 2:
        return "F S"
    if nargs == 3:
        return "X Y Z"
    if nargs == 4:
        return "XMIN XMAX YMIN YMAX"
    return " ".join(["X"] * int(nargs))


def format_help(width: int = 100) -> str:
    """The ``nbtorch --help`` text: usage, every flag of :data:`nbtorch.args.FLAGS` grouped by area with its
    arguments, units, defaults (from the flag's help string) and aliases, then the nbtorch-only long options."""
    aliases: Dict[str, List[str]] = {}
    for alias, canon in ALIASES.items():
        aliases.setdefault(canon, []).append(alias)
    lines = [
        f"usage: {PROG} [nanoBragg flags] [--dtype float32|float64] [--device cpu|cuda]",
        "",
        "Simulate a diffraction image with nanoBragg's physics (PyTorch).  Accepts nanoBragg's single-dash flags:",
        "replace 'nanoBragg' with 'nbtorch' in a script to get the same files.  Flags are matched exactly or by the",
        "aliases shown (not by substring).  Required: -cell or -mat, and -hkl or -default_F > 0.",
        "Units: Å (cell, lambda, dmin), mm (lengths), µm (sensor, water), degrees (angles), mrad (divergence).",
    ]
    col = 34
    for flag, (nargs, text) in FLAGS.items():
        if flag in FLAG_GROUPS:
            lines += ["", FLAG_GROUPS[flag] + ":"]
        head = f"  {flag} {_metavar(flag, nargs)}".rstrip()
        body = text
        if flag in aliases:
            body += f" [also: {', '.join(sorted(aliases[flag]))}]"
        wrapped = textwrap.wrap(body, width=max(width - col, 30))
        if len(head) + 2 > col:
            lines.append(head)
            lines += [" " * col + w for w in wrapped]
        else:
            lines.append(head.ljust(col) + wrapped[0])
            lines += [" " * col + w for w in wrapped[1:]]
    lines += ["", "nbtorch options:"]
    for head, text in _EXTRA_OPTIONS:
        lines.append(f"  {head}".ljust(col) + text)
    lines += [
        "",
        "Outputs are written atomically (a temporary file renamed into place).  No Fdump.bin cache is read or",
        "written.  Exit status: 0 ok, 2 command-line/input error, 1 output error.  See docs/cli.md.",
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# command line


def _split_extras(argv: Sequence[str]) -> Tuple[List[str], Dict[str, str]]:
    """Separate nbtorch's long options (and help/version) from the nanoBragg flags."""
    rest: List[str] = []
    extra: Dict[str, str] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in ("-h", "--help", "-help"):
            extra["help"] = "1"
        elif tok == "--version":
            extra["version"] = "1"
        elif tok.split("=", 1)[0] in ("--dtype", "--device"):
            name = tok.split("=", 1)[0][2:]
            if "=" in tok:
                extra[name] = tok.split("=", 1)[1]
            elif i + 1 < len(argv):
                extra[name] = argv[i + 1]
                i += 1
            else:
                raise _UsageError(f"--{name} needs a value")
        else:
            rest.append(tok)
        i += 1
    return rest, extra


def missing_inputs(opts) -> List[str]:
    """What the parsed flags lack to define a simulation (empty list when complete).

    nanoBragg needs a unit cell (``-cell`` or ``-mat``) and structure factors (``-hkl`` or ``-default_F`` > 0).
    """
    out = []
    if "-cell" not in opts and "-mat" not in opts:
        out.append("a unit cell: give -cell a b c alpha beta gamma (Å, deg) or -mat FILE (MOSFLM A matrix)")
    if "-hkl" not in opts and not opts.get("-default_F", 0.0):
        out.append("structure factors: give -hkl FILE (lines h k l F) or -default_F F (> 0)")
    return out


def _last_switch(opts, on: str, off: str, default: bool) -> bool:
    """Order-dependent on/off pair (the last one given wins, as in nanoBragg)."""
    state = default
    for f in opts.order:
        if f == on:
            state = True
        elif f == off:
            state = False
    return state


def _resolve_device(name: Optional[str]):
    if name is None:
        return None
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise _UsageError(f"--device {name!r} is not a torch device (use cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise _UsageError(f"--device {name}: CUDA is not available on this machine")
    return dev


# ----------------------------------------------------------------------------------------------------------------
# simulation with a progress bar


class _Progress:
    """A one-line text progress bar on ``stream`` (carriage returns on a terminal, one line per update otherwise)."""

    def __init__(self, stream: TextIO, total: int, label: str):
        self.stream, self.total, self.label = stream, max(total, 1), label
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self.last_pct = -1

    def update(self, done: int) -> None:
        pct = int(100 * done / self.total)
        if pct == self.last_pct:
            return
        self.last_pct = pct
        n = 30 * done // self.total
        bar = "#" * n + "-" * (30 - n)
        msg = f"{self.label} [{bar}] {pct:3d}% {time.perf_counter() - self.t0:6.1f} s"
        if self.tty:
            self.stream.write("\r" + msg)
        else:
            self.stream.write(msg + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def render(params: Params, setup: Setup, progress: Optional[TextIO] = None) -> torch.Tensor:
    """``simulate(params, setup)`` with an optional text progress bar written to ``progress`` (a text stream).

    Large jobs (more than ~4 M pixel samples) are rendered in horizontal bands of rows (each a ``Setup.roi``), so the
    bar advances; small ones report start and end only.  Returns photons/pixel ``[spixels, fpixels]`` (pixels outside
    the ROI or masked are 0), identical to :func:`nbtorch.simulate` up to floating-point summation order.
    """
    if progress is None:
        return simulate(params, setup)
    x0, x1, y0, y1 = setup.roi if setup.roi is not None else (0, setup.fpixels - 1, 0, setup.spixels - 1)
    per_pixel = setup.thicksteps * setup.oversample**2 * setup.n_sources * setup.n_domains * setup.phisteps
    n_pix = (x1 - x0 + 1) * (y1 - y0 + 1)
    work = n_pix * per_pixel
    label = f"{PROG}: {n_pix} pixels x {per_pixel} samples"
    bar = _Progress(progress, y1 - y0 + 1, label)
    bar.update(0)
    if work <= _BANDED_SAMPLES or y1 == y0:
        image = simulate(params, setup)
        bar.update(y1 - y0 + 1)
        bar.close()
        return image
    rows = y1 - y0 + 1
    nb = min(_BANDS, rows)
    edges = [y0 + (rows * k) // nb for k in range(nb + 1)]
    image = None
    for k in range(nb):
        b0, b1 = edges[k], edges[k + 1] - 1
        band = simulate(params, setup.replace(roi=(x0, x1, b0, b1)), check=(k == 0))
        if image is None:
            image = band  # zero outside this band: later bands fill their rows in
        else:
            image[b0 : b1 + 1] = band[b0 : b1 + 1]
        bar.update(edges[k + 1] - y0)
    bar.close()
    return image


# ----------------------------------------------------------------------------------------------------------------
# statistics and diagnostics


class ImageStats(NamedTuple):
    """Summary of a float image as nanoBragg prints it.

    max_I: largest visited pixel (photons; 0 if none is positive); max_fast, max_slow: its pixel indices (first in
    raster order); mean, rms: over visited pixels (ROI and mask), rms = sqrt(Σv²/(n−1)); rmsd: sqrt(Σ(v−mean)²/(m−1))
    over the m ROI pixels (masked ones included, as nanoBragg); total: Σv (photons); n: visited pixels.
    """

    max_I: float
    max_fast: int
    max_slow: int
    mean: float
    rms: float
    rmsd: float
    total: float
    n: int


def _mask_array(setup: Setup) -> Optional[np.ndarray]:
    if setup.mask is None:
        return None
    return np.frombuffer(setup.mask, dtype=np.uint8).reshape(setup.spixels, setup.fpixels)


def image_statistics(image: np.ndarray, setup: Setup) -> ImageStats:
    """nanoBragg's image statistics of ``image`` (``[spixels, fpixels]`` float32 photons) for ``setup``'s ROI/mask.

    Reproduces the C program's printed max_I, mean, rms and rmsd (its rms and rmsd divide by n − 1; its rmsd loop
    covers the whole ROI, including masked pixels, around the mean of the visited pixels).
    """
    img = np.asarray(image, dtype=np.float32).astype(np.float64)
    roi = roi_mask(img.shape, setup.roi)
    visited = roi_mask(img.shape, setup.roi, _mask_array(setup))
    v = img[visited]
    n = int(v.size)
    total = float(v.sum())
    mean = total / max(n, 1)
    rms = math.sqrt(float((v * v).sum()) / (max(n, 2) - 1))
    m = int(roi.sum())
    rmsd = math.sqrt(float(((img[roi] - mean) ** 2).sum()) / (max(m, 2) - 1))
    max_I, mf, ms = 0.0, 0, 0
    if n:
        flat = np.where(visited, img, -np.inf).reshape(-1)
        k = int(np.argmax(flat))
        if flat[k] > 0:
            max_I, ms, mf = float(flat[k]), k // img.shape[1], k % img.shape[1]
    return ImageStats(max_I, mf, ms, mean, rms, rmsd, total, n)


def pixel_diagnostics(params: Params, setup: Setup, fast, slow) -> Dict[str, torch.Tensor]:
    """Per-pixel diagnostics of the **first** sample (sensor layer 0, sub-pixel 0, source 0, orientation 0 = first phi
    step and mosaic domain), the sample at which nbtorch (like nanoBragg) evaluates polarization and solid angle.

    ``fast``, ``slow``: pixel indices (ints or ``[P]`` integer tensors).  Returns a dict of tensors with a leading
    ``[P]`` dimension: ``position`` [P,3] (mm, lab frame), ``R`` (mm), ``twotheta`` (deg), ``stol`` (sin θ/λ, Å⁻¹),
    ``d`` (Å), ``hkl`` [P,3] (fractional Miller indices), ``hkl0`` [P,3] (nearest, nanoBragg rounding), ``F_cell``,
    ``F_latt``, ``I_sample`` (= F_cell²·F_latt²), ``polar`` (Kahn factor, 1 with -nopolar), ``omega`` (sr, or 1/R² in
    m⁻² with -point_pixel), ``capture`` (capture fraction of the last sensor layer, as used in the final scaling).
    Not differentiable-API material: a helper for ``-printout``/``-printout_pixel``.
    """
    like = params.crystal.cell
    dev, dt = like.device, like.dtype
    fast = torch.as_tensor(fast, device=dev).reshape(-1).long()
    slow = torch.as_tensor(slow, device=dev).reshape(-1).long()
    frame = detmod.detector_frame(params.detector, setup)
    xtal = crystal_orientations(params, setup)
    pos = detmod.pixel_positions(frame, fast, slow, setup)  # [P,T,n²,3]
    R = torch.linalg.vector_norm(pos, dim=-1, keepdim=True)
    dvec = pos / R
    layers = torch.arange(setup.thicksteps, dtype=dt, device=dev)
    capture = detmod.capture_fraction(dvec, frame, layers[None, :, None], setup)[:, -1, 0]
    omega = detmod.solid_angle(pos, frame, setup)[:, 0, 0]
    d0 = dvec[:, 0, 0]  # [P,3]
    inc = torch.tensor(setup.sources[0][0], dtype=dt, device=dev)
    lam = params.beam.wavelength * setup.sources[0][1]
    q = (d0 - inc) / lam  # Å⁻¹
    stol = 0.5 * torch.linalg.vector_norm(q, dim=-1)
    if setup.nopolar:
        polar = torch.ones_like(stol)
    else:
        E = torch.tensor(setup.polar_axis, dtype=dt, device=dev)
        polar = polarization_factor(inc, d0, E, params.beam.polarization)
    h = q @ xtal.A[0].transpose(0, 1)  # rows of A are a, b, c (Å)
    h0 = round_half_down(h)
    c = params.crystal
    F_latt = lattice_factor(setup.shape, h - h0, c.ncells, xtal.B0, setup.fudge)
    st = params.structure
    if setup.interpolate:
        F_cell = lookup_tricubic(h, st.F, st.default_F, setup.hkl_min)
    else:
        F_cell = lookup_nearest(h0, st.F, st.default_F, setup.hkl_min)
    cos2t = (d0 * inc).sum(-1).clamp(-1.0, 1.0)
    return {
        "position": pos[:, 0, 0], "R": R[:, 0, 0, 0], "twotheta": torch.rad2deg(torch.acos(cos2t)), "stol": stol,
        "d": 0.5 / stol, "hkl": h, "hkl0": h0, "F_cell": F_cell, "F_latt": F_latt, "I_sample": (F_cell * F_latt) ** 2,
        "polar": polar, "omega": omega, "capture": capture,
    }


def _print_pixel_block(out: TextIO, diag: Dict[str, torch.Tensor], i: int, f: int, s: int, value: float,
                       setup: Setup) -> None:
    g = {k: v[i].detach().cpu().tolist() for k, v in diag.items()}
    x, y, z = g["position"]
    h, k, l = g["hkl"]
    h0, k0, l0 = (int(v) for v in g["hkl0"])
    out.write(
        f"### pixel fast {f} slow {s}: {value:.9g} photons\n"
        f"  first sample: sensor layer 0, sub-pixel 0, source 0, phi {setup.phi0:g} deg, mosaic domain 0\n"
        f"  position   {x:.9g} {y:.9g} {z:.9g} mm  (R = {g['R']:.9g} mm, 2theta = {g['twotheta']:.6f} deg)\n"
        f"  stol       {g['stol']:.9g} 1/Å  (d = {g['d']:.6g} Å)\n"
        f"  hkl        {h:.6f} {k:.6f} {l:.6f}  hkl0= {h0} {k0} {l0}\n"
        f"  F_cell     {g['F_cell']:.9g}\n"
        f"  F_latt     {g['F_latt']:.9g}\n"
        f"  I_sample   {g['I_sample']:.9g}  (F_cell^2 F_latt^2)\n"
        f"  steps      {setup.steps}\n"
        f"  polar      {g['polar']:.10g}\n"
        f"  omega      {g['omega']:.10g}\n"
        f"  capture    {g['capture']:.10g}\n"
        f"  pixel      {value:.10g}\n"
    )


def _printout_all(out: TextIO, params: Params, setup: Setup, image: np.ndarray, chunk: int = 4096) -> None:
    """``-printout`` without a pixel: one line per visited pixel."""
    sel = roi_mask(image.shape, setup.roi, _mask_array(setup))
    idx = np.flatnonzero(sel.reshape(-1))
    F = setup.fpixels
    out.write("# fast slow  stol(1/Å)  h k l  F_cell F_latt polar omega capture pixel  (first sample)\n")
    for start in range(0, len(idx), chunk):
        part = idx[start : start + chunk]
        diag = pixel_diagnostics(params, setup, torch.as_tensor(part % F), torch.as_tensor(part // F))
        d = {k: v.detach().cpu().numpy() for k, v in diag.items()}
        for j, flat in enumerate(part):
            f, s = int(flat % F), int(flat // F)
            h = d["hkl"][j]
            out.write(f"{f:4d} {s:4d} {d['stol'][j]:.6g} {h[0]:.6f} {h[1]:.6f} {h[2]:.6f} {d['F_cell'][j]:.6g} "
                      f"{d['F_latt'][j]:.6g} {d['polar'][j]:.6g} {d['omega'][j]:.6g} {d['capture'][j]:.6g} "
                      f"{image[s, f]:.9g}\n")


# ----------------------------------------------------------------------------------------------------------------
# main


def _check_inputs(opts, base_dir: str) -> None:
    missing = missing_inputs(opts)
    if missing:
        raise _UsageError("missing required input" + ("s" if len(missing) > 1 else "") + ": "
                          + "; and ".join(missing))
    for flag in _INPUT_FILE_FLAGS:
        if flag in opts:
            name = str(opts[flag])
            path = name if os.path.isabs(name) else os.path.join(base_dir, name)
            if not os.path.isfile(path):
                raise _UsageError(f"{flag} {name}: no such file")


def _write(kind: str, name: str, fn, *args) -> None:
    try:
        fn(name, *args)
    except OSError as exc:
        raise _OutputError(f"cannot write the {kind} {name!r}: {exc.strerror or exc}") from None


def _run(argv: List[str], out: TextIO, err: TextIO) -> int:
    rest, extra = _split_extras(argv)
    if "help" in extra:
        out.write(format_help())
        return 0
    if "version" in extra:
        out.write(f"{PROG} {__version__}\n")
        return 0
    dtype_name = extra.get("dtype", "float64")
    if dtype_name not in _DTYPES:
        raise _UsageError(f"--dtype must be float32 or float64, got {dtype_name!r}")
    dtype = _DTYPES[dtype_name]
    device = _resolve_device(extra.get("device"))
    try:
        opts = parse_args(rest)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    base_dir = os.getcwd()
    _check_inputs(opts, base_dir)
    if "-dump" in opts:
        out.write(f"note: -dump {opts['-dump']} ignored: nbtorch never reads or writes an Fdump cache\n")
    try:
        params, setup, extras = build(opts, dtype=dtype, device=device, base_dir=base_dir)
    except (ValueError, OSError) as exc:
        raise _UsageError(str(exc)) from None
    o = extras.opts

    printout_pixel = None
    if "-printout_pixel" in o:
        fx, sx = o["-printout_pixel"]
        if fx != int(fx) or sx != int(sx) or not (0 <= fx < setup.fpixels and 0 <= sx < setup.spixels):
            raise _UsageError(f"-printout_pixel {fx:g} {sx:g}: needs integer pixel indices fast in "
                              f"0..{setup.fpixels - 1} and slow in 0..{setup.spixels - 1}")
        printout_pixel = (int(fx), int(sx))
    show_progress = _last_switch(o, "-progress", "-noprogress", True)
    write_noise = _last_switch(o, "-noisefile", "-nonoise", True)
    write_pgm_file = _last_switch(o, "-pgmfile", "-nopgm", True)
    floatfile = str(o.get("-floatfile", "floatimage.bin"))
    intfile = str(o.get("-intfile", "intimage.img"))
    noisefile = str(o.get("-noisefile", "noiseimage.img"))
    pgmfile = str(o.get("-pgmfile", "image.pgm"))
    adc = float(o.get("-adc", 40.0))
    if write_noise:
        seed = int(o["-seed"]) if "-seed" in o else int(time.time())

    # ---- what will be simulated
    dev_name = str(params.crystal.cell.device)
    dt_name = str(dtype).replace("torch.", "")
    out.write(f"{PROG} {__version__}: nanoBragg physics in PyTorch ({dt_name} on {dev_name})\n")
    for note in extras.notes:
        out.write(f"note: {note}\n")
    out.write(
        f"  {setup.fpixels}x{setup.spixels} pixels of {setup.pixel_size:g} mm, {setup.convention} convention, "
        f"{setup.pivot} pivot\n"
        f"  {setup.n_sources} sources x {setup.n_domains} mosaic domains x {setup.phisteps} phi steps x "
        f"{setup.oversample}x{setup.oversample} sub-pixels = {setup.steps} steps; {setup.thicksteps} sensor layer(s)\n"
        f"  {setup.shape} crystal {'x'.join(f'{v:g}' for v in params.crystal.ncells.tolist())} cells, "
        f"{'tricubic' if setup.interpolate else 'nearest'} structure factors\n"
    )
    out.flush()

    # ---- simulate
    t0 = time.perf_counter()
    try:
        image_t = render(params, setup, progress=err if show_progress else None)
    except ValueError as exc:  # parameter values the kernels reject (build() checks most of them first)
        raise _UsageError(str(exc)) from None
    image = image_t.detach().to("cpu").numpy().astype(np.float32)
    elapsed = time.perf_counter() - t0
    stats = image_statistics(image, setup)
    out.write(f"simulated {stats.n} pixels in {elapsed:.2f} s\n")

    # ---- diagnostics
    if printout_pixel is not None:
        f, s = printout_pixel
        if roi_mask(image.shape, setup.roi, _mask_array(setup))[s, f]:
            single = simulate(params, setup.replace(roi=(f, f, s, s)))[s, f]
            value = float(single.detach().cpu().to(torch.float32))
        else:
            value = 0.0
            out.write(f"note: pixel fast {f} slow {s} is outside the -roi or masked: not rendered (0)\n")
        diag = pixel_diagnostics(params, setup, [f], [s])
        _print_pixel_block(out, diag, 0, f, s, value, setup)
        if value != float(image[s, f]):
            out.write(f"  (image value {float(image[s, f]):.10g} differs from the single-pixel value)\n")
    elif "-printout" in o:
        _printout_all(out, params, setup, image)

    # ---- statistics, as the C program prints them
    p = setup.pixel_size
    n = setup.oversample
    last_sub = p - p / n / 2.0  # nanoBragg reports the position of the pixel's last sub-pixel (spec Q20)
    out.write(f"max_I = {stats.max_I:g}  at {(stats.max_fast * p + last_sub) * 1e-3:g} "
              f"{(stats.max_slow * p + last_sub) * 1e-3:g}  (pixel fast {stats.max_fast}, slow {stats.max_slow})\n")
    out.write(f"mean= {stats.mean:g} rms= {stats.rms:g} rmsd= {stats.rmsd:g}\n")
    out.write(f"total= {stats.total:g} photons in {stats.n} pixels\n")

    written: List[str] = []
    _write("float image", floatfile, write_raw_float, image)
    out.write(f"wrote {floatfile} as {image.size} 4-byte floats\n")
    written.append(floatfile)

    header = smv_header_items(params, setup, extras, base_dir=base_dir)
    scale = o.get("-scale")
    ints, scale = int_image_uint16(image, scale=scale, adc=adc, roi=setup.roi)
    out.write(f"intfile_scale = {scale:g}\n")
    _write("int image", intfile, write_smv, ints, header)
    out.write(f"wrote {intfile} as {ints.size} 2-byte integers\n")
    written.append(intfile)

    if write_pgm_file:
        pgmscale = float(o.get("-pgmscale", 0.0))
        if not pgmscale > 0:
            pgmscale = 250.0 / (5.0 * stats.rmsd) if stats.rmsd > 0 else scale
        out.write(f"pgm_scale = {pgmscale:g}\n")
        _write("PGM image", pgmfile, write_pgm, image, pgmscale)
        out.write(f"wrote {pgmfile} as {image.size} 1-byte integers\n")
        written.append(pgmfile)

    if write_noise:
        mask = _mask_array(setup)
        counts = poisson_noise(image, seed, roi=setup.roi, mask=mask)
        noisy, overloads = counts_to_uint16(counts, adc=adc, roi=setup.roi, mask=mask)
        src = "" if "-seed" in o else " (from the clock; pass -seed to reproduce)"
        out.write(f"noise seed: {seed}{src}\n")
        out.write(f"{counts.sum():.0f} photons on noise image ({overloads} overloads)\n")
        _write("noise image", noisefile, write_smv, noisy, header)
        out.write(f"wrote {noisefile} as {noisy.size} 2-byte integers\n")
        written.append(noisefile)
    out.write(f"files written: {', '.join(written)}\n")
    out.flush()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``nbtorch`` command line.

    ``argv``: the arguments without the program name (default ``sys.argv[1:]``); a leading ``nanoBragg`` or
    ``nbtorch`` token is dropped.  Writes the summary to stdout, errors and the progress bar to stderr, and returns
    the exit status (0 ok, 2 command-line/input error, 1 output error, 130 interrupted).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args and os.path.basename(args[0]) in ("nanoBragg", "nbtorch"):
        args = args[1:]
    out, err = sys.stdout, sys.stderr
    try:
        if not args:
            raise _UsageError("no flags given; missing " + "; and ".join(missing_inputs({}))
                              + f" ({PROG} --help lists every flag)")
        return _run(args, out, err)
    except _UsageError as exc:
        err.write(f"{PROG}: error: {exc}\n")
        return 2
    except _OutputError as exc:
        err.write(f"{PROG}: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        err.write(f"\n{PROG}: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
