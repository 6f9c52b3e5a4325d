"""nanoBragg command-line flags → (Params, Setup): the parser and the C program's automatic rules (spec §1–§4).

Flags are matched exactly or through the documented aliases (never by substring, unlike the C program, spec Q13).
The parser is shared by :func:`from_nanobragg_args` and the ``nbtorch`` command line.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import shlex
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import lattice as latmod
from .beam import divergence_sources
from .types import Background, Beam, Crystal, Detector, Params, Setup, Structure
from .units import DEFAULT_FLUENCE, HC_EV_ANGSTROM

# name -> (nargs, help, aliases).  nargs: int, or "cell" (1–6 numbers), "misset" (3 numbers or 'random').
FLAGS: Dict[str, Tuple[object, str]] = {
    # crystal
    "-cell": ("cell", "unit cell a b c (Å) alpha beta gamma (deg); missing b, c default to a, angles to 90"),
    "-mat": (1, "MOSFLM orientation matrix file (λ-scaled reciprocal vectors; -lambda must match it)"),
    "-misset": ("misset", "crystal misorientation rx ry rz (deg, applied X then Y then Z) or 'random'"),
    "-misset_seed": (1, "seed of -misset random (integer; default from the clock)"),
    "-N": (1, "unit cells along each axis (default 1; continuous values allowed)"),
    "-Na": (1, "unit cells along a (default 1)"),
    "-Nb": (1, "unit cells along b (default 1)"),
    "-Nc": (1, "unit cells along c (default 1)"),
    "-xtalsize": (1, "crystal edge (mm) along a, b, c: N = ceil(size/|a|) (default 0: use N)"),
    "-xtal_thick": (1, "crystal size along a (mm)"),
    "-xtal_width": (1, "crystal size along b (mm), clipped to -beamsize"),
    "-xtal_height": (1, "crystal size along c (mm), clipped to -beamsize"),
    "-square_xtal": (0, "parallelepiped crystal: sincg lattice factor (default)"),
    "-round_xtal": (0, "ellipsoidal crystal: sinc3 lattice factor"),
    "-gauss_xtal": (0, "Gaussian spots"),
    "-tophat_spots": (0, "flat-top spots"),
    "-fudge": (1, "scale of the spot radius² for round/gauss/tophat (default 1)"),
    "-density": (1, "sample density (no effect; accepted for compatibility)"),
    "-MW": (1, "molecular weight (no effect; accepted for compatibility)"),
    # structure factors
    "-hkl": (1, "text file of h k l F (no symmetry expansion)"),
    "-default_F": (1, "amplitude of every reflection not in -hkl (default 0)"),
    "-dump": (1, "name of nanoBragg's F cache (accepted; nbtorch never reads or writes a cache)"),
    "-interpolate": (0, "tricubic interpolation of F between lattice points (auto: on when any N <= 2)"),
    "-nointerpolate": (0, "nearest-lattice-point F (turn auto interpolation off)"),
    "-stol": (1, "amorphous F(stol) table (read but unused, as in nanoBragg)"),
    "-4stol": (1, "amorphous F(4stol) table (unused)"),
    "-Q": (1, "amorphous F(Q) table (unused)"),
    "-stolout": (1, "output stol file (unused)"),
    "-dmin": (1, "skip scattering beyond this resolution (Å; default 0 = off)"),
    # mosaic and rotation
    "-mosaic": (1, "isotropic mosaic spread (deg; default 0)"),
    "-mosaic_domains": (1, "number of mosaic domains (default 10 when -mosaic > 0)"),
    "-mosaic_seed": (1, "seed of the mosaic domain generator (default 12345678)"),
    "-phi": (1, "spindle start angle (deg; default 0)"),
    "-osc": (1, "oscillation range (deg; default 0; alone: 2 steps of osc/2)"),
    "-phistep": (1, "spindle step (deg; default osc/phisteps)"),
    "-phisteps": (1, "number of spindle samples (default 1; alone it implies -osc 1)"),
    "-spindle_axis": (3, "spindle rotation axis x y z (switches to CUSTOM convention)"),
    # beam
    "-lambda": (1, "wavelength (Å; default 1)"),
    "-energy": (1, "photon energy (eV): lambda = 12398.42/E"),
    "-dispersion": (1, "spectral full width (percent)"),
    "-dispsteps": (1, "number of wavelengths"),
    "-divergence": (1, "horizontal and vertical divergence full range (mrad)"),
    "-hdivrange": (1, "horizontal divergence range (mrad)"),
    "-vdivrange": (1, "vertical divergence range (mrad)"),
    "-hdivstep": (1, "horizontal divergence step (mrad; default range/(steps-1))"),
    "-vdivstep": (1, "vertical divergence step (mrad; default range/(steps-1))"),
    "-hdivsteps": (1, "horizontal divergence points"),
    "-vdivsteps": (1, "vertical divergence points"),
    "-divsteps": (1, "divergence points in both directions"),
    "-round_div": (0, "keep divergence points inside an ellipse (default)"),
    "-square_div": (0, "keep the full divergence grid"),
    "-sourcefile": (1, "file of sources: X Y Z (position, any length) I (ignored) lambda (m)"),
    "-polar": (1, "Kahn polarization factor (default 0 = unpolarized)"),
    "-nopolar": (0, "polarization factor = 1"),
    "-polar_vector": (3, "E-vector direction x y z (switches to CUSTOM convention)"),
    "-beam_vector": (3, "beam direction x y z (switches to CUSTOM convention)"),
    "-fluence": (1, "incident fluence (photons/m²; default 1.25932e29)"),
    "-flux": (1, "incident flux (photons/s); with -exposure and -beamsize sets the fluence"),
    "-exposure": (1, "exposure time (s; default 1)"),
    "-beamsize": (1, "square beam edge (mm; default 0.1); also clips the crystal's y/z size"),
    "-coherent": (0, "no effect (accepted for compatibility)"),
    # detector
    "-distance": (1, "sample to detector distance along the beam (mm; default 100; selects the beam pivot in CUSTOM)"),
    "-close_distance": (1, "perpendicular sample to detector-plane distance (mm; selects the sample pivot in CUSTOM)"),
    "-pixel": (1, "pixel size (mm; default 0.1)"),
    "-detpixels": (1, "pixels along fast and slow (default detsize/pixel = 1024)"),
    "-detpixels_f": (1, "pixels along the fast axis"),
    "-detpixels_s": (1, "pixels along the slow axis"),
    "-detsize": (1, "detector edge (mm; default 102.4)"),
    "-detsize_f": (1, "detector size along fast (mm)"),
    "-detsize_s": (1, "detector size along slow (mm)"),
    "-Xbeam": (1, "direct-beam position X (mm; meaning and default per convention: MOSFLM slow axis, (detsize_s+pixel)/2)"),
    "-Ybeam": (1, "direct-beam position Y (mm; meaning and default per convention: MOSFLM fast axis, (detsize_f+pixel)/2)"),
    "-Xclose": (1, "near-point X (mm; default detector centre; selects the sample pivot in CUSTOM)"),
    "-Yclose": (1, "near-point Y (mm; default detector centre; selects the sample pivot in CUSTOM)"),
    "-ORGX": (1, "XDS/DIALS near point, fast (1-based pixels; default detector centre)"),
    "-ORGY": (1, "XDS/DIALS near point, slow (1-based pixels; default detector centre)"),
    "-pivot": (1, "detector rotation pivot: beam or sample (CUSTOM convention only)"),
    "-mosflm": (0, "MOSFLM convention (default)"),
    "-xds": (0, "XDS convention"),
    "-adxv": (0, "ADXV convention"),
    "-denzo": (0, "DENZO convention"),
    "-dials": (0, "DIALS convention"),
    "-fdet_vector": (3, "fast axis x y z (switches to CUSTOM)"),
    "-sdet_vector": (3, "slow axis x y z (switches to CUSTOM)"),
    "-odet_vector": (3, "detector normal x y z (switches to CUSTOM)"),
    "-twotheta_axis": (3, "two-theta axis x y z (switches to CUSTOM)"),
    "-pix0_vector": (3, "accepted; overwritten by the geometry as in nanoBragg (switches to CUSTOM)"),
    "-detector_rotx": (1, "detector rotation about x (deg; default 0)"),
    "-detector_roty": (1, "detector rotation about y (deg; default 0)"),
    "-detector_rotz": (1, "detector rotation about z (deg; default 0)"),
    "-twotheta": (1, "detector two-theta swing (deg; default 0; selects the sample pivot in CUSTOM)"),
    "-curved_det": (0, "spherical detector: every pixel at -distance"),
    "-point_pixel": (0, "solid angle 1/R² (no pixel area, no obliquity)"),
    "-detector_thick": (1, "sensor thickness (µm; default 0)"),
    "-detector_abs": (1, "sensor attenuation length (µm; default = thickness; inf or 0: no absorption and no thickness, Q22)"),
    "-detector_thicksteps": (1, "sensor layers (default 2 when -detector_thick > 0)"),
    "-oversample": (1, "sub-pixels per pixel edge (default auto: ceil(3·max(N·cell)/(lambda·distance/pixel)))"),
    "-oversample_thick": (0, "capture fraction per sub-pixel (nanoBragg running-sum behaviour)"),
    "-oversample_polar": (0, "polarization per sub-pixel and source (nanoBragg running-sum behaviour)"),
    "-oversample_omega": (0, "solid angle per sub-pixel (nanoBragg running-sum behaviour)"),
    "-roi": (4, "render only fast xmin..xmax, slow ymin..ymax (0-based pixels, inclusive; default whole detector)"),
    "-mask": (1, "SMV mask image: pixels == 0 are skipped; its header initialises the detector"),
    "-img": (1, "SMV image whose header initialises the detector"),
    # background
    "-water": (1, "edge of a cube of water in the beam (µm; default 0)"),
    # output
    "-floatfile": (1, "raw float32 output image (default floatimage.bin)"),
    "-intfile": (1, "SMV noiseless output (default intimage.img)"),
    "-noisefile": (1, "SMV Poisson-noise output (default noiseimage.img; skipped with -nonoise)"),
    "-pgmfile": (1, "8-bit PGM preview (default image.pgm)"),
    "-scale": (1, "intfile scale (default 55000/max)"),
    "-pgmscale": (1, "PGM scale (default 250/(5·rmsd))"),
    "-adc": (1, "ADC offset of int and noise images (counts; default 40)"),
    "-seed": (1, "noise seed (default: from the clock)"),
    "-nonoise": (0, "do not write the noise image"),
    "-nopgm": (0, "do not write the PGM image"),
    "-printout": (0, "print per-pixel diagnostics"),
    "-printout_pixel": (2, "print diagnostics of pixel (fast, slow; 0-based pixels)"),
    "-noprogress": (0, "no progress bar"),
    "-progress": (0, "show a progress bar (default on)"),
}

ALIASES = {
    "-matrix": "-mat", "-xtal_size": "-xtalsize", "-samplesize": "-xtalsize", "-sample_size": "-xtalsize",
    "-xtal_x": "-xtal_thick", "-sample_thick": "-xtal_thick", "-sample_x": "-xtal_thick",
    "-xtal_y": "-xtal_width", "-sample_width": "-xtal_width", "-sample_y": "-xtal_width", "-width": "-xtal_width",
    "-xtal_z": "-xtal_height", "-sample_height": "-xtal_height", "-sample_z": "-xtal_height", "-height": "-xtal_height",
    "-binary_spots": "-tophat_spots", "-sample_density": "-density", "-molecules": "-MW", "-molecular_weight": "-MW",
    "-mosaic_spread": "-mosaic", "-mosaicity": "-mosaic", "-mosaic_dom": "-mosaic_domains",
    "-wavelength": "-lambda", "-wave": "-lambda", "-floatimage": "-floatfile", "-intimage": "-intfile",
    "-noiseimage": "-noisefile", "-pgmimage": "-pgmfile", "-detpixels_x": "-detpixels_f", "-detpixels_y": "-detpixels_s",
    "-detsize_x": "-detsize_f", "-detsize_y": "-detsize_s", "-thicksteps": "-detector_thicksteps",
    "-detector_absorb": "-detector_abs", "-detector_absorption": "-detector_abs", "-xtal_heigh": "-xtal_height",
    "-sample_heigh": "-xtal_height", "-heigh": "-xtal_height",
}


class NanoBraggArgs(dict):
    """Parsed flags: canonical flag name → value(s), with ``order`` (the flags in argv order)."""

    order: List[str]


def _num(flag: str, tok: str) -> float:
    try:
        v = float(tok)
    except ValueError:
        raise ValueError(f"{flag} expects a number, got {tok!r}") from None
    if math.isnan(v) or (math.isinf(v) and flag not in ("-detector_abs",)):
        raise ValueError(f"{flag} expects a finite number, got {tok!r}")
    return v


def _looks_like_flag(tok: str) -> bool:
    if not tok.startswith("-") or len(tok) < 2:
        return False
    try:
        float(tok)
        return False
    except ValueError:
        return True


def canonical_flag(tok: str) -> str:
    """Canonical name of a flag, or ``ValueError`` naming the closest known flag."""
    if tok in FLAGS:
        return tok
    if tok in ALIASES:
        return ALIASES[tok]
    known = list(FLAGS) + list(ALIASES)
    close = difflib.get_close_matches(tok, known, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ValueError(f"unknown flag {tok!r}{hint} (nbtorch --help lists every flag)")


def parse_args(args: Union[str, Sequence[str]]) -> NanoBraggArgs:
    """Parse nanoBragg flags (a string or a list; a leading program name is dropped) → :class:`NanoBraggArgs`."""
    toks = shlex.split(args) if isinstance(args, str) else [str(a) for a in args]
    if toks and not toks[0].startswith("-") and os.path.basename(toks[0]) in ("nanoBragg", "nbtorch"):
        toks = toks[1:]
    out = NanoBraggArgs()
    out.order = []
    i = 0
    while i < len(toks):
        tok = toks[i]
        if not _looks_like_flag(tok):
            raise ValueError(f"unexpected argument {tok!r}: every value must follow its flag (see nbtorch --help)")
        flag = canonical_flag(tok)
        nargs = FLAGS[flag][0]
        vals: list = []
        j = i + 1
        if nargs == "cell":
            while j < len(toks) and not _looks_like_flag(toks[j]) and len(vals) < 6:
                vals.append(_num(tok, toks[j]))
                j += 1
            if not vals:
                raise ValueError("-cell needs 1 to 6 values: a b c (Å) alpha beta gamma (deg)")
        elif nargs == "misset":
            if j < len(toks) and toks[j] == "random":
                vals, j = ["random"], j + 1
            else:
                for _ in range(3):
                    if j >= len(toks) or _looks_like_flag(toks[j]):
                        raise ValueError(f"{tok} needs 3 angles rx ry rz (degrees) or 'random'")
                    vals.append(_num(tok, toks[j]))
                    j += 1
        else:
            for _ in range(nargs):
                if j >= len(toks) or (_looks_like_flag(toks[j]) and flag not in _STRING_FLAGS):
                    raise ValueError(f"{tok} needs {nargs} value{'s' if nargs > 1 else ''}: {FLAGS[flag][1]}")
                vals.append(toks[j] if flag in _STRING_FLAGS else _num(tok, toks[j]))
                j += 1
        out[flag] = vals if nargs not in (0, 1) else (vals[0] if vals else True)
        out.order.append(flag)
        i = j
    return out


_STRING_FLAGS = {
    "-mat", "-hkl", "-dump", "-stol", "-4stol", "-Q", "-stolout", "-sourcefile", "-pivot", "-mask", "-img",
    "-floatfile", "-intfile", "-noisefile", "-pgmfile",
}

_CONV_VECTORS = {
    # f, s, o, beam, twotheta axis, polar (E), spindle
    "MOSFLM": ((0, 0, 1), (0, -1, 0), (1, 0, 0), (1, 0, 0), (0, 0, -1), (0, 0, 1), (0, 0, 1)),
    "DENZO": ((0, 0, 1), (0, -1, 0), (1, 0, 0), (1, 0, 0), (0, 0, -1), (0, 0, 1), (0, 0, 1)),
    "ADXV": ((1, 0, 0), (0, -1, 0), (0, 0, 1), (0, 0, 1), (-1, 0, 0), (1, 0, 0), (1, 0, 0)),
    "XDS": ((1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 1), (1, 0, 0), (1, 0, 0), (1, 0, 0)),
    "DIALS": ((1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 1), (0, 1, 0), (0, 1, 0), (0, 1, 0)),
    "CUSTOM": ((0, 0, 1), (0, -1, 0), (1, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 1)),
}
_VECTOR_FLAGS = ("-fdet_vector", "-sdet_vector", "-odet_vector", "-beam_vector", "-twotheta_axis", "-polar_vector",
                 "-spindle_axis")


def _unit(v) -> Tuple[float, float, float]:
    v = np.asarray(v, float)
    n = np.linalg.norm(v)
    if not np.isfinite(n) or n == 0:
        raise ValueError(f"direction vector {tuple(v)} must be finite and non-zero")
    return tuple(float(x) for x in v / n)


def _grid(rng: Optional[float], step: Optional[float], count: Optional[int]):
    """nanoBragg's range/step/count auto rules for one divergence axis → (offsets, range, step)."""
    if rng is None and count is not None and count > 0:
        rng = 1.0  # spec Q9: a count without a range means a 1-radian range
    rng = 0.0 if rng is None else rng
    if step is not None and step > 0 and rng > 0:
        count = int(math.ceil(rng / step))
    elif count is not None and rng > 0:
        count = max(count, 2)
        step = rng / (count - 1)
    elif rng > 0:
        count, step = 2, rng
    if rng <= 0 or step is None or step <= 0 or count is None or count <= 0:
        return [0.0], 0.0, 0.0
    return [-rng / 2 + j * step for j in range(count)], rng, step


@dataclasses.dataclass
class Extras:
    """Everything the command line needs beyond (Params, Setup): output names and options, header geometry inputs."""

    opts: NanoBraggArgs
    xbeam_mm: float = 0.0
    ybeam_mm: float = 0.0
    phi0: float = 0.0
    osc: float = 0.0
    interpolate_auto: bool = False
    notes: List[str] = dataclasses.field(default_factory=list)


def _read_header_defaults(path: str, flip_y: bool) -> Dict[str, float]:
    from .io.smv import read_smv

    _, hdr = read_smv(path)
    out: Dict[str, float] = {}

    def g(key):
        v = hdr.get(key)
        try:
            return float(v) if v is not None else None
        except ValueError:
            return None

    for key, name in (("SIZE1", "fpixels"), ("SIZE2", "spixels"), ("PIXEL_SIZE", "pixel"), ("DISTANCE", "distance"),
                      ("CLOSE_DISTANCE", "close_distance"), ("WAVELENGTH", "lambda"), ("BEAM_CENTER_X", "Xbeam"),
                      ("BEAM_CENTER_Y", "Ybeam"), ("XDS_ORGX", "ORGX"), ("XDS_ORGY", "ORGY"), ("PHI", "phi"),
                      ("OSC_START", "phi"), ("OSC_RANGE", "osc")):
        v = g(key)
        if v is not None:
            out[name] = v
    if flip_y and "Ybeam" in out and "spixels" in out and "pixel" in out:
        out["Ybeam"] = out["spixels"] * out["pixel"] - out["Ybeam"]
    return out


def build(opts: NanoBraggArgs, dtype=torch.float64, device=None, base_dir: str = "."):
    """Apply nanoBragg's defaults and automatic rules to parsed flags → ``(params, setup, extras)``."""
    o = opts
    notes: List[str] = []

    def path(p):
        return p if os.path.isabs(p) else os.path.join(base_dir, p)

    def get(name, default=None):
        return o[name] if name in o else default

    # header initialisation (-img, then -mask; flags win)
    hdr: Dict[str, float] = {}
    if "-img" in o:
        hdr.update(_read_header_defaults(path(o["-img"]), flip_y=False))
    mask_bytes = None
    if "-mask" in o:
        hdr.update(_read_header_defaults(path(o["-mask"]), flip_y=True))

    def hget(flag, key, default=None):
        if flag in o:
            return o[flag]
        return hdr.get(key, default)

    # ---- wavelength
    lam = float(hget("-lambda", "lambda", 1.0))
    if "-energy" in o:
        if o["-energy"] <= 0:
            raise ValueError(f"-energy must be > 0 eV, got {o['-energy']:g}")
        lam = HC_EV_ANGSTROM / o["-energy"]
    if not lam > 0:
        raise ValueError(f"-lambda must be > 0 Å, got {lam:g}")

    # ---- crystal
    if "-cell" not in o and "-mat" not in o:
        raise ValueError("no unit cell: give -cell a b c alpha beta gamma (Å, deg) or -mat FILE (MOSFLM matrix)")
    if "-hkl" not in o and not get("-default_F", 0.0):
        raise ValueError("no structure factors: give -hkl FILE (h k l F) or -default_F F (> 0)")
    if "-mat" in o:
        from .io.matrix import read_mosflm_matrix

        A = torch.as_tensor(read_mosflm_matrix(path(o["-mat"])), dtype=torch.float64)
        B = latmod.mosflm_to_reciprocal(A, lam)
        if abs(float(torch.linalg.det(B))) < 1e-30:
            raise ValueError(f"-mat {o['-mat']}: the matrix is singular")
        if float(torch.linalg.det(B)) < 0:
            raise ValueError(f"-mat {o['-mat']}: the matrix is left-handed (negative determinant)")
        cell = latmod.cell_from_reciprocal(B)
        U0 = latmod.orientation_from_reciprocal(B)
        nanobragg_cell = False
        if "-cell" in o:
            notes.append("-cell ignored: -mat given")
    else:
        cv = list(o["-cell"])
        a = cv[0]
        full = [a, cv[1] if len(cv) > 1 else a, cv[2] if len(cv) > 2 else a]
        full += [cv[k] if len(cv) > k else 90.0 for k in (3, 4, 5)]
        cell = torch.tensor(full, dtype=torch.float64)
        U0 = torch.eye(3, dtype=torch.float64)
        nanobragg_cell = True
    from .validate import check_cell

    check_cell(cell)
    misset = [0.0, 0.0, 0.0]
    if "-misset" in o:
        if o["-misset"] == ["random"]:
            from .mosaic import random_misset_angles

            seed = int(get("-misset_seed", int(time.time())))
            misset = [math.degrees(x) for x in random_misset_angles(seed)]
            notes.append(f"random misset (seed {seed}): {misset[0]:.6f} {misset[1]:.6f} {misset[2]:.6f} deg")
        else:
            misset = list(o["-misset"])

    N_cli = [float(get("-N", 1.0))] * 3
    for k, f in enumerate(("-Na", "-Nb", "-Nc")):
        if f in o:
            N_cli[k] = float(o[f])
    for k, v in enumerate(N_cli):
        if not math.isfinite(v):
            raise ValueError(f"-N/-Na/-Nb/-Nc must be finite, got {v}")
    N = [max(1.0, v) for v in N_cli]  # nanoBragg forces N <= 1 to 1 (spec Q19)
    beamsize = float(get("-beamsize", 0.1))
    sizes = [get("-xtalsize")] * 3
    for k, f in enumerate(("-xtal_thick", "-xtal_width", "-xtal_height")):
        if f in o:
            sizes[k] = o[f]
    if any(s is not None and s > 0 for s in sizes):
        M_real, _ = latmod.lattice(cell, torch.eye(3, dtype=torch.float64), nanobragg=nanobragg_cell)
        lengths = torch.linalg.vector_norm(M_real, dim=0).tolist()
        for k in range(3):
            s = sizes[k]
            if s is None or s <= 0:
                continue
            if k > 0 and s > beamsize:
                notes.append(f"crystal size along {'abc'[k]} clipped to the beam size {beamsize:g} mm")
                s = beamsize
            N[k] = float(math.ceil(s * 1e7 / lengths[k]))

    shape = "square"
    for f, name in (("-square_xtal", "square"), ("-round_xtal", "round"), ("-gauss_xtal", "gauss"),
                    ("-tophat_spots", "tophat")):
        if f in o:
            shape = name
    # the last shape flag given wins
    for f in o.order:
        shape = {"-square_xtal": "square", "-round_xtal": "round", "-gauss_xtal": "gauss",
                 "-tophat_spots": "tophat"}.get(f, shape)
    fudge = float(get("-fudge", 1.0))

    # ---- structure factors
    default_F = float(get("-default_F", 0.0))
    if default_F < 0:
        raise ValueError(f"-default_F must be >= 0, got {default_F:g}")
    hkl_min = (0, 0, 0)
    Ftab = np.zeros((0, 0, 0))
    if "-hkl" in o:
        from .io.hkl import hkl_to_grid, read_hkl

        data = read_hkl(path(o["-hkl"]))
        if len(data.F):
            Ftab, hkl_min = hkl_to_grid(data, default_F)
    has_table = Ftab.size > 0
    interp_auto = has_table and min(N_cli) <= 2
    interpolate = interp_auto
    for f in o.order:
        if f == "-interpolate":
            interpolate = True
        elif f == "-nointerpolate":
            interpolate = False
    interpolate = interpolate and has_table

    # ---- mosaic
    spread = float(get("-mosaic", 0.0))
    ndom = get("-mosaic_domains")
    if spread > 0 and ndom is None:
        ndom = 10
    if ndom is None or spread <= 0:
        ndom, spread = 1, 0.0
    ndom = int(ndom)
    if ndom < 1:
        raise ValueError(f"-mosaic_domains must be >= 1, got {ndom}")
    if spread > 0:
        from .mosaic import DEFAULT_MOSAIC_SEED, mosaic_domains

        axes, fracs = mosaic_domains(math.radians(spread), ndom, int(get("-mosaic_seed", DEFAULT_MOSAIC_SEED)))
        mosaic_axes = tuple(tuple(float(x) for x in ax) for ax in axes)
        mosaic_fractions = tuple(float(x) for x in fracs)
    else:
        mosaic_axes, mosaic_fractions = ((1.0, 0.0, 0.0),), (0.0,)

    # ---- phi (spec §1.3 auto rules)
    phi0 = float(hget("-phi", "phi", 0.0))
    osc = o.get("-osc", hdr.get("osc"))
    step = o.get("-phistep")
    nsteps = o.get("-phisteps")
    nsteps = None if nsteps is None else int(nsteps)
    if nsteps is not None and nsteps <= 0:
        nsteps = 1
    if nsteps is None:
        if osc is None and step is None:
            nsteps, osc, step = 1, 0.0, 0.0
        elif step is None:
            nsteps, step = 2, osc / 2.0
        elif osc is None:
            osc, nsteps = step, 2
        else:
            nsteps = int(math.ceil(osc / step)) if step > 0 else 1
    else:
        if osc is None and step is None:
            osc = 1.0
            step = osc / nsteps
        elif step is None:
            step = osc / nsteps
        elif osc is None:
            nsteps, osc = 2, step
    if osc <= 0 or step <= 0 or nsteps <= 0:
        nsteps, step = 1, 0.0
        osc = max(osc, 0.0)

    # ---- convention and vectors
    conv = "MOSFLM"
    for f in o.order:
        conv = {"-mosflm": "MOSFLM", "-xds": "XDS", "-adxv": "ADXV", "-denzo": "DENZO", "-dials": "DIALS"}.get(f, conv)
    if any(f in o for f in _VECTOR_FLAGS + ("-pix0_vector",)):
        conv = "CUSTOM"
    fv, sv, ov, bv, tv, ev, spv = (tuple(float(x) for x in v) for v in _CONV_VECTORS[conv])
    user = {f: o[f] for f in _VECTOR_FLAGS if f in o}
    fv = _unit(user.get("-fdet_vector", fv))
    sv = _unit(user.get("-sdet_vector", sv))
    if "-odet_vector" in user:
        given = np.asarray(user["-odet_vector"], float)
        ov = _unit(np.cross(fv, sv)) if abs(np.linalg.norm(given) - 1.0) > 1e-9 else _unit(given)
    bv = _unit(user.get("-beam_vector", bv))
    tv = _unit(user.get("-twotheta_axis", tv))
    ev = _unit(user.get("-polar_vector", ev))
    spv = _unit(user.get("-spindle_axis", spv))

    if np.linalg.norm(np.cross(bv, ev)) < 1e-6 and "-nopolar" not in o:
        raise ValueError("-polar_vector must not be parallel to the beam direction (-beam_vector / convention): the "
                         "polarization plane is undefined")

    # ---- detector size
    pixel = float(hget("-pixel", "pixel", 0.1))
    if not pixel > 0:
        raise ValueError(f"-pixel must be > 0 mm, got {pixel:g}")
    fpix = hget("-detpixels_f", "fpixels", get("-detpixels"))
    spix = hget("-detpixels_s", "spixels", get("-detpixels"))
    if "-detpixels" in o:
        fpix = o.get("-detpixels_f", o["-detpixels"]) if "-detpixels_f" in o else o["-detpixels"]
        spix = o.get("-detpixels_s", o["-detpixels"]) if "-detpixels_s" in o else o["-detpixels"]
    if fpix is None:
        fpix = math.ceil(float(get("-detsize_f", get("-detsize", 102.4))) / pixel - 0.5)
    if spix is None:
        spix = math.ceil(float(get("-detsize_s", get("-detsize", 102.4))) / pixel - 0.5)
    fpix, spix = int(fpix), int(spix)
    if fpix < 1 or spix < 1:
        raise ValueError(f"detector must have at least 1×1 pixels, got fast {fpix} × slow {spix}")
    Df, Ds = fpix * pixel, spix * pixel

    # ---- beam centre and pivot
    orgx_in, orgy_in = hget("-ORGX", "ORGX"), hget("-ORGY", "ORGY")
    # the near point defaults to ORGX/ORGY when given, else the detector centre
    xclose = float(hget("-Xclose", "Xclose", Df / 2 if orgx_in is None else (orgx_in - 0.5) * pixel))
    yclose = float(hget("-Yclose", "Yclose", Ds / 2 if orgy_in is None else (orgy_in - 0.5) * pixel))
    if conv in ("MOSFLM", "DENZO"):
        xb_def, yb_def = (Ds + pixel) / 2, (Df + pixel) / 2
    elif conv == "ADXV":
        xb_def, yb_def = (Df + pixel) / 2, (Ds - pixel) / 2
    else:
        xb_def, yb_def = xclose, yclose
    xbeam = float(hget("-Xbeam", "Xbeam", xb_def))
    ybeam = float(hget("-Ybeam", "Ybeam", yb_def))
    orgx = Df / 2 / pixel + 0.5 if orgx_in is None else orgx_in
    orgy = Ds / 2 / pixel + 0.5 if orgy_in is None else orgy_in
    if conv in ("MOSFLM", "DENZO", "ADXV"):
        pivot = "beam"
    elif conv in ("XDS", "DIALS"):
        pivot = "sample"
    else:
        pivot = "beam"
        for f in o.order:
            if f in ("-distance", "-Xbeam", "-Ybeam"):
                pivot = "beam"
            elif f in ("-close_distance", "-Xclose", "-Yclose", "-ORGX", "-ORGY", "-twotheta"):
                pivot = "sample"
            elif f == "-pivot":
                pv = str(o["-pivot"]).lower()
                if pv not in ("beam", "sample"):
                    raise ValueError(f"-pivot must be 'beam' or 'sample', got {o['-pivot']!r}")
                pivot = pv
    beam_center = (float(orgx), float(orgy)) if conv in ("XDS", "DIALS") else (xbeam, ybeam)
    distance_is_close = "-close_distance" in o or ("-distance" not in o and "close_distance" in hdr)
    distance = float(hget("-close_distance", "close_distance")) if distance_is_close else float(
        hget("-distance", "distance", 100.0))
    if not distance > 0:
        raise ValueError(f"-distance/-close_distance must be > 0 mm, got {distance:g}")
    rot = [float(get(f, 0.0)) for f in ("-detector_rotx", "-detector_roty", "-detector_rotz")]
    twotheta = float(get("-twotheta", 0.0))

    # ---- sensor
    thick = float(get("-detector_thick", 0.0))
    if thick < 0:
        raise ValueError(f"-detector_thick must be >= 0 µm, got {thick:g}")
    mu = 1.0 / thick if thick > 0 else 0.0
    if "-detector_abs" in o:
        ell = o["-detector_abs"]
        if ell == 0 or math.isinf(ell):
            mu, thick = 0.0, 0.0  # nanoBragg also resets the thickness (spec Q22)
        elif ell < 0:
            raise ValueError(f"-detector_abs must be > 0 µm (or 0/inf for none), got {ell:g}")
        else:
            mu = 1.0 / ell
    tsteps = get("-detector_thicksteps")
    if thick > 0:
        if tsteps is None:
            tsteps, tstep = 2, thick / 2.0
        else:
            tsteps = max(int(tsteps), 2)
            tstep = thick / (tsteps - 1)
    else:
        tsteps, tstep, mu = 1, 0.0, 0.0

    # ---- sources
    if "-sourcefile" in o:
        from .io.sources import read_sources

        rows = read_sources(path(o["-sourcefile"]))
        srcs = []
        default_pos = -10.0 * np.asarray(bv)
        for r in rows:
            P = np.where(np.isnan(r[:3]), default_pos, r[:3])
            lam_k = lam if np.isnan(r[4]) else r[4] * 1e10
            if not lam_k > 0:
                raise ValueError(f"-sourcefile {o['-sourcefile']}: wavelength must be > 0 m, got {r[4]:g}")
            srcs.append((_unit(-P), float(lam_k / lam)))
        if not srcs:
            raise ValueError(f"-sourcefile {o['-sourcefile']} holds no sources")
        sources = tuple(srcs)
    else:
        disp = float(get("-dispersion", 0.0)) / 100.0
        dsteps = get("-dispsteps")
        if disp <= 0:
            factors = [1.0]
        else:
            dsteps = 2 if dsteps is None else int(dsteps)
            if dsteps <= 1:
                factors = [1.0]
            else:
                dstep = disp / (dsteps - 1)
                factors = [1.0 + j * dstep - disp / 2.0 for j in range(dsteps)]
        mr = 1e-3
        hr = get("-hdivrange", get("-divergence"))
        vr = get("-vdivrange", get("-divergence"))
        hc = get("-hdivsteps", get("-divsteps"))
        vc = get("-vdivsteps", get("-divsteps"))
        hgrid, hrng, hstp = _grid(None if hr is None else hr * mr, None if "-hdivstep" not in o else o["-hdivstep"] * mr,
                                  None if hc is None else int(hc))
        vgrid, vrng, vstp = _grid(None if vr is None else vr * mr, None if "-vdivstep" not in o else o["-vdivstep"] * mr,
                                  None if vc is None else int(vc))
        round_div = True
        for f in o.order:
            round_div = {"-round_div": True, "-square_div": False}.get(f, round_div)
        sources = divergence_sources(bv, ev, hgrid, vgrid, hrng, vrng, hstp, vstp, round_div, factors)

    # ---- fluence, polarization, water
    fluence = float(get("-fluence", DEFAULT_FLUENCE))
    flux, exposure = float(get("-flux", 0.0)), float(get("-exposure", 1.0))
    if flux != 0 and exposure > 0:
        fluence = flux * exposure / (beamsize * 1e-3) ** 2
    polar = float(get("-polar", 0.0))
    water = float(get("-water", 0.0))

    # ---- ROI and mask
    roi = None
    if "-roi" in o:
        roi = tuple(int(v) for v in o["-roi"])
    if "-mask" in o:
        from .io.smv import read_smv

        m, _ = read_smv(path(o["-mask"]))
        if m.shape != (spix, fpix):
            raise ValueError(f"-mask {o['-mask']} is {m.shape[1]}×{m.shape[0]} pixels but the detector is {fpix}×{spix}")
        mask_bytes = (m != 0).astype(np.uint8).tobytes()

    # ---- oversample (auto rule needs the lattice and the reported distance)
    M_real, _ = latmod.lattice(cell, torch.eye(3, dtype=torch.float64), nanobragg=nanobragg_cell)
    L_max = max(N[k] * float(torch.linalg.vector_norm(M_real[:, k])) for k in range(3))

    def f64(v):
        return torch.tensor(v, dtype=torch.float64)

    det64 = Detector(f64(distance), f64(beam_center), f64(rot), f64(twotheta))
    base = dict(
        fpixels=fpix, spixels=spix, pixel_size=pixel, convention=conv, pivot=pivot, fdet=fv, sdet=sv, odet=ov,
        beam=bv, polar_axis=ev, spindle=spv, twotheta_axis=tv, distance_is_close=distance_is_close,
    )
    from .detector import detector_frame

    from .validate import check_detector

    check_detector(det64, Setup(**base))
    rep_distance = float(detector_frame(det64, Setup(**base)).distance)
    if "-oversample" in o:
        oversample = int(o["-oversample"])
        if not 1 <= oversample <= 64:
            raise ValueError(f"-oversample must be between 1 and 64, got {oversample}")
    else:
        oversample = max(1, int(math.ceil(3.0 * L_max / (lam * rep_distance / pixel))))
        if oversample > 64:
            raise ValueError(f"the automatic -oversample rule asks for {oversample} sub-pixels per pixel edge (crystal "
                             f"{L_max:.4g} Å across, distance {rep_distance:.4g} mm, pixel {pixel:g} mm); give "
                             "-oversample explicitly (1 to 64)")

    setup = Setup(
        **base,
        oversample=oversample, phi0=phi0, phistep=float(step), phisteps=int(nsteps), mosaic_axes=mosaic_axes,
        mosaic_fractions=mosaic_fractions, sources=sources, thickness_um=thick, mu_per_um=mu, thicksteps=int(tsteps),
        thickstep_um=tstep, point_pixel="-point_pixel" in o, curved_det="-curved_det" in o, nopolar="-nopolar" in o,
        oversample_thick="-oversample_thick" in o, oversample_polar="-oversample_polar" in o,
        oversample_omega="-oversample_omega" in o, shape=shape, fudge=fudge, interpolate=interpolate,
        hkl_min=tuple(int(x) for x in hkl_min), dmin=float(get("-dmin", 0.0)), roi=roi, mask=mask_bytes,
        nanobragg_cell=nanobragg_cell,
    )

    def T(v):
        return torch.as_tensor(v, dtype=dtype, device=device)

    params = Params(
        crystal=Crystal(T(cell), T(misset), T(U0), T(N), T(spread)),
        beam=Beam(T(lam), T(fluence), T(polar)),
        detector=Detector(T(distance), T(beam_center), T(rot), T(twotheta)),
        structure=Structure(T(Ftab), T(default_F)),
        background=Background(T(water)),
    )
    extras = Extras(opts=o, xbeam_mm=xbeam, ybeam_mm=ybeam, phi0=phi0, osc=float(osc), interpolate_auto=interp_auto,
                    notes=notes)
    return params, setup, extras


def from_nanobragg_args(args: Union[str, Sequence[str]], dtype=torch.float64, device=None):
    """nanoBragg flags → ``(params, setup)``.

    ``args``: a command string (``"-cell 100 100 100 90 90 90 -default_F 100 ..."``, a leading ``nanoBragg`` or
    ``nbtorch`` is dropped) or a list of tokens.  Files named by flags are read relative to the current directory.
    Returns a :class:`~nbtorch.types.Params` pytree of ``dtype``/``device`` tensors and a frozen
    :class:`~nbtorch.types.Setup`.  Output flags (``-floatfile`` …) are accepted and ignored here.  Unknown flags,
    missing values, impossible cells and out-of-range values raise ``ValueError`` with the flag named.
    """
    params, setup, _ = build(parse_args(args), dtype=dtype, device=device)
    return params, setup
