"""nanoBragg's defaults and automatic rules: parsed flags → ``(Params, Setup, Extras)`` (spec §1–§4).

One function per section — crystal, structure factors, mosaic and phi, detector and conventions, beam and sources,
noise and output — each reading the flags through :class:`Inputs` (command line, then an ``-img``/``-mask`` header,
then the flag table's default).  Every value was range-checked by the parser; the checks here are those that need
several flags together (a detector at least one pixel wide, an ROI inside the detector, a fluence from -flux in range).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import time
import warnings
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .. import lattice as latmod
from ..beam import divergence_sources
from ..conventions import CONVENTION_TABLE, VECTOR_FIELDS, Convention
from ..detector import check_detector, detector_frame, orgx_to_mm, with_panels
from ..io.hkl import hkl_to_grid, read_hkl
from ..io.images import HeaderWarning, header_mismatch, printed_tolerance
from ..io.matrix import read_mosflm_matrix
from ..io.smv import read_smv
from ..io.sources import read_sources
from ..mosaic import mosaic_domain_count, mosaic_domains, random_misset_angles
from ..noise import DEFAULT_CALIB_SEED, DetectorNoise
from ..panels import PanelLayout
from ..pytree import tree_map
from ..setup_checks import MAX_ORIENTATIONS, MAX_SOURCES
from ..simulate import plan, rendered_pixels
from ..types import Background, Beam, Crystal, Detector, Params, Setup, Structure
from ..units import deg2rad, m_to_angstrom, mm_to_angstrom, mm_to_m, mrad2rad, percent_to_fraction, rad2deg
from ..units import wavelength_from_energy
from ..validate import check_cell
from .parse import FLAG_VALUE, NanoBraggArgs, fmt_num, last_flag, missing_inputs, parse_args, parse_value
from .panels import PanelSource, check_panel_flags, panel_source
from .response import detector_noise, psf_choice
from .spectrum import SpectrumPart, apply_spectrum, check_spectrum_flags, read_spectrum
from .parse import range_phrase
from .table import FLAGS, SWITCH_DEFAULTS, switch_states

__all__ = ["Inputs", "Extras", "Outputs", "build", "from_nanobragg_args", "sources_for",
           "INPUT_FILE_FLAGS", "input_files", "output_files"]

#: Setup vector field → the flag that sets it (from the table).
VECTOR_FLAGS = {f.field.split(".")[1]: f.name for f in FLAGS.values() if f.kind == "vector" and f.field}
#: Pixel-count limit of a detector (the Setup's own bound).
MAX_PIXELS = 1 << 31
#: How closely a -pdb model's cell must agree with -cell/-mat (and an MTZ's with the crystal before a note is
#: printed): relative on the lengths, degrees on the angles.  A PDB CRYST1 record keeps 3 and 2 decimals.
CELL_RTOL, CELL_ATOL_DEG = 1e-3, 0.02
_NO_DEFAULT = object()


# ----------------------------------------------------------------------------------------------------------------
# inputs: command line, -img/-mask header, table default


def _header_values(path: str, source: str, flip_y: bool, texts: Optional[list] = None) -> Dict[str, object]:
    """Flag values from the SMV header of ``source`` (``-img NAME`` or ``-mask NAME``) read at ``path``.

    Each value is parsed and range-checked like the flag it stands for; a bad one is kept as its ``ValueError``
    (raised only if the value is used).  ``flip_y``: a ``-mask`` header's BEAM_CENTER_Y is read as
    detsize_s − value, as the C program does (spec §1.5).  ``texts``: when given, ``(source, flag, text, value)``
    of every value read is appended (for :func:`_check_header_agreement`)."""
    _, hdr = read_smv(path)
    out: Dict[str, object] = {}
    for flag in FLAGS.values():
        for key in flag.header:  # later keys win (OSC_START over PHI), as in nanoBragg
            if key in hdr:
                try:
                    out[flag.name] = parse_value(flag, [hdr[key]], f"{source}: header {key} (for {flag.name})")
                except ValueError as exc:
                    out[flag.name] = exc
                if texts is not None:
                    texts.append((source, flag.name, hdr[key], out[flag.name]))
    parts = [out.get(f) for f in ("-Ybeam", "-detpixels_s", "-pixel")]
    if flip_y and all(p is not None and not isinstance(p, ValueError) for p in parts):
        out["-Ybeam"] = parts[1] * parts[2] - parts[0]
    return out


class Inputs:
    """The flags a build reads: the command line first, then ``-img``/``-mask`` header values, then the table's
    defaults.  ``notes`` collects the remarks the command line prints (clipped crystal sizes, random misset …)."""

    def __init__(self, opts: NanoBraggArgs, base_dir: str = "."):
        self.opts, self.base_dir = opts, base_dir
        self.notes: List[str] = []
        self.header: Dict[str, object] = {}
        self.header_texts: List[tuple] = []  # (source, flag, text, value) of each header value read
        self.file_crystal: Optional[np.ndarray] = None  # real-space basis [3, 3] (Å) of an -expt crystal
        self.spectrum: Optional[SpectrumPart] = None  # the -spectrum channels (read by build)
        for flag, flip in (("-img", False), ("-mask", True)):  # the -mask header wins over the -img header
            if flag in opts:
                src = f"{flag} {opts[flag]}"
                self.header.update(_read(self, flag, _header_values, src, flip, self.header_texts))

    def given(self, flag: str) -> bool:
        """Whether ``flag`` is on the command line."""
        return flag in self.opts

    def get(self, flag: str, default=_NO_DEFAULT):
        """The command-line value of ``flag``, else ``default`` (by default the table's default)."""
        if flag in self.opts:
            return self.opts[flag]
        return FLAGS[flag].default if default is _NO_DEFAULT else default

    def hget(self, flag: str, default=_NO_DEFAULT):
        """Like :meth:`get`, but an ``-img``/``-mask`` header value comes before the default."""
        if flag not in self.opts and flag in self.header:
            value = self.header[flag]
            if isinstance(value, ValueError):
                raise value
            return value
        return self.get(flag, default)

    def last(self, group: str, default=_NO_DEFAULT):
        """State of the order-dependent switch ``group``: the last of its flags given wins."""
        return last_flag(self.opts, switch_states(group), SWITCH_DEFAULTS[group] if default is _NO_DEFAULT else default)

    def path(self, flag: str) -> str:
        """The file named by ``flag``, relative to ``base_dir``."""
        name = str(self.opts[flag])
        return name if os.path.isabs(name) else os.path.join(self.base_dir, name)


# ----------------------------------------------------------------------------------------------------------------
# crystal


class CrystalPart(NamedTuple):
    """cell [6] float64 (Å, deg); U0 [3,3]; misset (deg); N, N_cli: cells per axis after / before nanoBragg's
    N >= 1 rule; nanobragg_cell: lattice built as -cell does; shape and fudge of the lattice factor; model_cell: the
    -pdb model's own cell (Å, deg), None without -pdb or when the model has none."""

    cell: torch.Tensor
    U0: torch.Tensor
    misset: List[float]
    N: List[float]
    N_cli: List[float]
    nanobragg_cell: bool
    shape: str
    fudge: float
    model_cell: Optional[tuple] = None


def _wavelength(inp: Inputs) -> float:
    """λ0 (Å): a -spectrum's weighted mean wavelength, -lambda (or an image header), or -energy."""
    if inp.spectrum is not None:
        return inp.spectrum.mean
    if not inp.given("-energy"):
        return float(inp.hget("-lambda"))
    energy = inp.opts["-energy"]
    lam = wavelength_from_energy(energy)
    rng = FLAGS["-lambda"].interval
    if lam not in rng:
        raise ValueError(f"-energy {fmt_num(energy)} eV gives lambda = {lam:g} Å, outside {rng.text} Å")
    return float(lam)


def _cell(inp: Inputs, lam: float) -> Tuple[torch.Tensor, torch.Tensor, bool, Optional[tuple]]:
    """(cell [6] (Å, deg), U0 [3,3], nanobragg_cell, the -pdb model's own cell or None) from an -expt crystal or -mat
    (exact cell and orientation), -cell, or a -pdb model's cell (built as -cell builds it).  A -pdb model's cell must
    agree with -cell/-mat when they are given; a model without one is placed in theirs."""
    eye = torch.eye(3, dtype=torch.float64)
    model = _read(inp, "-pdb", _model_cell) if inp.given("-pdb") else None
    if inp.file_crystal is not None:  # real_space_a/b/c as given: the exact lattice, no -cell rebuild
        M = torch.as_tensor(inp.file_crystal, dtype=torch.float64)
        B = torch.linalg.inv(M).transpose(0, 1)
        cell, U0, exact, flag = latmod.cell_from_real(M), latmod.orientation_from_reciprocal(B), False, "-expt"
    elif inp.given("-mat"):
        name = inp.opts["-mat"]
        A = torch.as_tensor(read_mosflm_matrix(inp.path("-mat")), dtype=torch.float64)
        B = latmod.mosflm_to_reciprocal(A, lam)
        det = float(torch.linalg.det(B))
        if abs(det) < 1e-30:
            raise ValueError(f"-mat {name}: the matrix is singular")
        if det < 0:
            raise ValueError(f"-mat {name}: the matrix is left-handed (negative determinant)")
        if inp.given("-cell"):
            inp.notes.append("-cell ignored: -mat given")
        cell, U0, exact, flag = latmod.cell_from_reciprocal(B), latmod.orientation_from_reciprocal(B), False, "-mat"
    elif inp.given("-cell"):
        cv = list(inp.opts["-cell"])
        full = [cv[0], cv[1] if len(cv) > 1 else cv[0], cv[2] if len(cv) > 2 else cv[0]]
        full += [cv[k] if len(cv) > k else 90.0 for k in (3, 4, 5)]
        cell, U0, exact, flag = torch.tensor(full, dtype=torch.float64), eye, True, "-cell"
    elif model is None:
        raise ValueError(f"-pdb {inp.opts['-pdb']}: the model has no unit cell (CRYST1 / _cell): give -cell or -mat")
    else:
        inp.notes.append(f"-pdb {inp.opts['-pdb']}: unit cell {' '.join(fmt_num(v) for v in model)} (Å, deg) "
                         "from the model")
        cell, U0, exact, flag = torch.tensor(model, dtype=torch.float64), eye, True, "-pdb"
    try:
        check_cell(cell)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None
    lengths = cell[:3].tolist()
    if any(v not in FLAGS["-cell"].interval for v in lengths):
        raise ValueError(f"{flag}: cell lengths a, b, c must be {range_phrase(FLAGS['-cell'])}, got "
                         f"{' '.join(fmt_num(v) for v in lengths)}")
    if flag != "-pdb" and model is not None:
        _check_model_cell(inp, flag, cell.tolist(), model)
    elif flag != "-pdb" and inp.given("-pdb"):
        inp.notes.append(f"-pdb {inp.opts['-pdb']}: the model has no unit cell; it is placed in {flag}'s")
    return cell, U0, exact, model


def _cells_agree(a: Sequence[float], b: Sequence[float]) -> bool:
    """Cells (Å, deg) equal within :data:`CELL_RTOL` on lengths and :data:`CELL_ATOL_DEG` on angles."""
    return (all(abs(x - y) <= CELL_RTOL * max(abs(x), abs(y)) for x, y in zip(a[:3], b[:3]))
            and all(abs(x - y) <= CELL_ATOL_DEG for x, y in zip(a[3:], b[3:])))


def _check_model_cell(inp: Inputs, flag: str, cell: Sequence[float], model: Sequence[float]) -> None:
    """ValueError unless the -pdb model's cell agrees with the one from ``flag`` (-cell or -mat)."""
    if not _cells_agree(cell, model):
        text = lambda c: " ".join(fmt_num(round(v, 6)) for v in c)  # noqa: E731
        raise ValueError(f"-pdb {inp.opts['-pdb']}: the model's unit cell ({text(model)}) does not agree with {flag} "
                         f"({text(cell)}): lengths must agree within {CELL_RTOL:.1%} and angles within "
                         f"{CELL_ATOL_DEG:g} deg; leave out {flag} to use the model's cell")


def _misset(inp: Inputs) -> List[float]:
    """-misset angles (deg); 'random' draws them from -misset_seed (default: the clock) and notes the seed."""
    mis = inp.get("-misset", [0.0, 0.0, 0.0])
    if mis != ["random"]:
        return [float(x) for x in mis]
    seed = inp.get("-misset_seed", int(time.time()))
    angles = [float(rad2deg(x)) for x in random_misset_angles(seed)]
    inp.notes.append(f"random misset (seed {seed}): {angles[0]:.6f} {angles[1]:.6f} {angles[2]:.6f} deg")
    return angles


def _ncells(inp: Inputs, cell: torch.Tensor, nanobragg_cell: bool) -> Tuple[List[float], List[float]]:
    """(N, N_cli): cells along a, b, c from -N/-Na/-Nb/-Nc (N < 1 means 1, spec Q19) or the crystal size flags
    (N = ceil(size/|axis|), sizes along b and c clipped to -beamsize).  N_cli: the command-line N (auto rules)."""
    N_cli = [float(inp.get("-N"))] * 3
    for k, f in enumerate(("-Na", "-Nb", "-Nc")):
        N_cli[k] = float(inp.get(f, N_cli[k]))
    N = [max(1.0, v) for v in N_cli]
    sizes = [inp.get("-xtalsize")] * 3
    for k, f in enumerate(("-xtal_thick", "-xtal_width", "-xtal_height")):
        sizes[k] = inp.get(f, sizes[k])
    if any(s > 0 for s in sizes):
        beamsize = inp.get("-beamsize")
        M_real, _ = latmod.lattice(cell, torch.eye(3, dtype=torch.float64), nanobragg=nanobragg_cell)
        lengths = torch.linalg.vector_norm(M_real, dim=0).tolist()
        for k, s in enumerate(sizes):
            if s <= 0:
                continue
            if k > 0 and s > beamsize:
                inp.notes.append(f"crystal size along {'abc'[k]} clipped to the beam size {beamsize:g} mm")
                s = beamsize
            N[k] = float(math.ceil(mm_to_angstrom(s) / lengths[k]))
    return N, N_cli


def _crystal(inp: Inputs, lam: float) -> CrystalPart:
    """The crystal section: cell, orientation, misset, size and lattice-factor shape."""
    cell, U0, nanobragg_cell, model = _cell(inp, lam)
    N, N_cli = _ncells(inp, cell, nanobragg_cell)
    return CrystalPart(cell, U0, _misset(inp), N, N_cli, nanobragg_cell, inp.last("shape"), float(inp.get("-fudge")),
                       model)


# ----------------------------------------------------------------------------------------------------------------
# structure factors, mosaic, phi


def _input_error(flag: str, name: str, path: str, exc: Exception) -> ValueError:
    """A reader's error ``exc`` for the file ``path`` of ``flag`` as one line naming the flag and the file as the user
    gave it (``name``)."""
    if isinstance(exc, OSError):
        return ValueError(f"{flag} {name}: cannot read the file ({exc.strerror or exc})")
    text = " ".join(str(exc).split()).replace(path, name)
    if text.startswith(name):
        rest = text[len(name):]
        return ValueError(f"{flag} {name}{rest}" if rest.startswith(",") else f"{flag} {name}: {rest.lstrip(': ')}")
    return ValueError(f"{flag} {name}: {text}")


def _read(inp: Inputs, flag: str, reader, *args, **kw):
    """``reader(file of flag, *args, **kw)`` with its errors (bad content, unreadable file, missing optional package)
    as one-line ValueErrors naming the flag and the file."""
    path = inp.path(flag)
    try:
        return reader(path, *args, **kw)
    except (ValueError, OSError, ImportError) as exc:
        raise _input_error(flag, str(inp.opts[flag]), path, exc) from None


#: The header values compared with the command line: flag → ObservedImage field (nbtorch.io.images.HEADER_GEOMETRY).
_HEADER_CHECKED = {"-pixel": "pixel_size_mm", "-distance": "distance_mm", "-close_distance": "distance_mm",
                   "-lambda": "wavelength_A"}


def _check_header_agreement(inp: Inputs, lam: float) -> None:
    """A :class:`~nbtorch.io.images.HeaderWarning` (one line) for each ``-img``/``-mask`` header pixel size,
    distance or wavelength that disagrees with the flag given (-pixel, -distance, -close_distance, -lambda or
    -energy) by more than the header's printed precision; the flag's value is used."""
    for source, flag, text, header_value in inp.header_texts:
        field = _HEADER_CHECKED.get(flag)
        if field is None or isinstance(header_value, ValueError):
            continue
        if flag == "-lambda" and inp.given("-energy"):
            given, value = f"-energy {fmt_num(inp.opts['-energy'])} eV, i.e. lambda", lam
        elif inp.given(flag):
            given, value = flag, float(inp.opts[flag])
        else:
            continue
        line = header_mismatch(source, field, float(header_value), printed_tolerance(text), given, value)
        if line:
            warnings.warn(line, HeaderWarning, stacklevel=2)


def _check_structure_flags(inp: Inputs) -> None:
    """Flags that need another one, checked before any work: -pdb not with -hkl, -pdb_bfactor only with -pdb,
    -mtz_column/-mtz_anomalous only with an MTZ file."""
    if inp.given("-pdb") and inp.given("-hkl"):
        raise ValueError(f"-pdb {inp.opts['-pdb']} and -hkl {inp.opts['-hkl']} both give structure factors: use one")
    if inp.given("-pdb_bfactor") and not inp.given("-pdb"):
        raise ValueError("-pdb_bfactor sets the B of a -pdb model's atoms: give -pdb FILE (PDB or mmCIF) too")
    mtz = inp.given("-hkl") and _read(inp, "-hkl", _is_mtz)
    for flag in ("-mtz_column", "-mtz_anomalous"):
        if inp.given(flag) and not mtz:
            what = f"-hkl {inp.opts['-hkl']} is a text file" if inp.given("-hkl") else "no -hkl file is given"
            raise ValueError(f"{flag} {inp.opts[flag]} chooses what to read from an MTZ file, but {what}: give "
                             "-hkl FILE.mtz")


def _text_table(path: str, default_F: float):
    """(F table [nh,nk,nl] float64, hkl_min) of a text h k l F file on a dense grid (absent reflections =
    ``default_F``); an empty table for a file without reflections."""
    data = read_hkl(path)
    return hkl_to_grid(data, default_F) if len(data.F) else (np.zeros((0, 0, 0)), (0, 0, 0))


def _model_cell(path: str):
    """The -pdb model's own cell (:func:`nbtorch.io.structure_files.model_cell`, imported for runs with -pdb)."""
    from ..io.structure_files import model_cell
    return model_cell(path)


def _is_mtz(path: str) -> bool:
    """Whether ``path`` is an MTZ file (:func:`nbtorch.io.structure_files.is_mtz`, imported for runs with -hkl)."""
    from ..io.structure_files import is_mtz
    return is_mtz(path)


def _mtz_table(inp: Inputs, default_F: float, cell: Sequence[float]):
    """(F table, hkl_min) of -hkl FILE.mtz (:func:`nbtorch.io.read_mtz`); its notes, and one when the MTZ's cell
    differs from the crystal's, go to ``inp.notes``."""
    from ..io.structure_files import read_mtz
    name, label = inp.opts["-hkl"], inp.opts.get("-mtz_column")
    try:
        F, hkl_min, info = _read(inp, "-hkl", read_mtz, label, inp.get("-mtz_anomalous"), default_F=default_F)
    except ValueError as exc:
        if label is not None and f"column {label!r}" in str(exc):
            raise ValueError(f"-mtz_column {label}: {exc}") from None
        raise
    inp.notes += [f"-hkl {name}: column {info.column}, space group {info.spacegroup}"]
    inp.notes += [f"-hkl {name}: {note}" for note in info.notes]
    if not _cells_agree(info.cell, cell):
        inp.notes.append(f"-hkl {name}: the MTZ's unit cell ({' '.join(f'{v:g}' for v in info.cell)}) differs from "
                         f"the crystal's ({' '.join(f'{v:g}' for v in cell)}); the reflections are used as indexed")
    return F, hkl_min


def _model_table(inp: Inputs, xtal: CrystalPart, params: Params, setup: Setup, default_F: float):
    """(F table, hkl_min) of -pdb FILE (:func:`nbtorch.io.structure_factors_from_model`) to the resolution the
    detector corners reach (or -dmin when coarser), with room for tricubic interpolation's 4×4×4 neighbourhood:
    1/d_table = 1/d + 2·√3·σ_max(B), B the reciprocal basis (Å⁻¹).  The model's own cell is used, or the crystal's
    when it has none.  ``params``, ``setup``: the model without its table (float64, CPU)."""
    from ..io.structure_files import ModelWorkError, detector_corner_resolution, structure_factors_from_model
    d = max(detector_corner_resolution(params, setup), setup.dmin)
    _, B = latmod.lattice(params.crystal.cell, torch.eye(3, dtype=torch.float64), nanobragg=setup.nanobragg_cell)
    room = 2.0 * math.sqrt(3.0) * float(torch.linalg.matrix_norm(B, ord=2))
    d_table = 1.0 / (1.0 / d + room)
    cell = None if xtal.model_cell is not None else params.crystal.cell.tolist()

    def calculate(path: str):
        try:
            return structure_factors_from_model(path, d_table, cell=cell, bfactor=inp.opts.get("-pdb_bfactor"),
                                                default_F=default_F)
        except ModelWorkError as exc:  # name what sets the resolution
            raise ValueError(f"{path}: {exc.work.describe()}, more than the {exc.limit / 1e9:.2g} GB of memory "
                             f"available: the detector corners reach {d:.3g} Å; raise -distance or -lambda, lower "
                             "-detpixels or -pixel, or give a coarser -dmin") from None

    F, hkl_min, info = _read(inp, "-pdb", calculate)
    name = inp.opts["-pdb"]
    inp.notes.append(f"-pdb {name}: the detector corners reach {d:.4g} Å; |F| calculated to {d_table:.4g} Å "
                     "(room for interpolation)")
    inp.notes += [f"-pdb {name}: {note}" for note in info.notes]
    return F, hkl_min


def _structure(inp: Inputs, xtal: CrystalPart, params: Params, setup: Setup):
    """(F table [nh,nk,nl] float64, hkl_min, interpolate, interpolate_auto): -hkl (text or MTZ) or -pdb on a dense
    grid (absent reflections = -default_F); tricubic interpolation automatic when any command-line N <= 2.
    ``params``, ``setup``: the model so far (its table empty), for -pdb's resolution."""
    default_F = float(inp.get("-default_F"))
    table, hkl_min = np.zeros((0, 0, 0)), (0, 0, 0)
    if inp.given("-pdb"):
        params64 = tree_map(lambda t: t.detach().to("cpu", torch.float64), params)
        table, hkl_min = _model_table(inp, xtal, params64, setup, default_F)
    elif inp.given("-hkl") and _read(inp, "-hkl", _is_mtz):
        table, hkl_min = _mtz_table(inp, default_F, xtal.cell.tolist())
    elif inp.given("-hkl"):
        table, hkl_min = _read(inp, "-hkl", _text_table, default_F)
        if table.size == 0 and not default_F > 0:
            raise ValueError(f"-hkl {inp.opts['-hkl']}: no reflections (empty or only comments) and no -default_F > 0: "
                             "every structure factor would be 0")
    has_table = table.size > 0
    auto = has_table and min(xtal.N_cli) <= 2
    interpolate = bool(inp.last("interpolate", auto)) and has_table
    return table, tuple(int(x) for x in hkl_min), interpolate, auto


def _mosaic(inp: Inputs, phisteps: int) -> Tuple[float, tuple, tuple]:
    """(spread (deg), domain axes, angle fractions) with nanoBragg's domain-count rule
    (:func:`nbtorch.mosaic.mosaic_domain_count`) and generator (-mosaic_seed); refuses more than
    ``MAX_ORIENTATIONS`` orientations (domains × ``phisteps``) before drawing any."""
    spread = float(inp.get("-mosaic"))
    spread_rad, count = mosaic_domain_count(deg2rad(spread), inp.opts.get("-mosaic_domains"))
    if count * phisteps > MAX_ORIENTATIONS:
        raise ValueError(f"-mosaic_domains {count} × -phisteps {phisteps} = {count * phisteps:.3g} crystal "
                         f"orientations, more than {MAX_ORIENTATIONS:.0e}: lower -mosaic_domains or -phisteps")
    if spread_rad <= 0:
        return 0.0, ((1.0, 0.0, 0.0),), (0.0,)
    axes, fracs = mosaic_domains(spread_rad, count, inp.get("-mosaic_seed"))
    return spread, tuple(tuple(float(x) for x in ax) for ax in axes), tuple(float(x) for x in fracs)


def _phi(inp: Inputs) -> Tuple[float, float, int, float]:
    """(phi0, phistep, phisteps, osc) from nanoBragg's spindle auto rules (spec §1.3)."""
    phi0 = float(inp.hget("-phi"))
    osc, step, nsteps = inp.hget("-osc"), inp.opts.get("-phistep"), inp.opts.get("-phisteps")
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
    elif osc is None and step is None:
        osc = 1.0
        step = osc / nsteps
    elif step is None:
        step = osc / nsteps
    elif osc is None:
        nsteps, osc = 2, step
    if osc <= 0 or step <= 0 or nsteps <= 0:
        nsteps, step, osc = 1, 0.0, max(osc, 0.0)
    return phi0, float(step), int(nsteps), float(osc)


# ----------------------------------------------------------------------------------------------------------------
# detector and conventions


def _unit(v, flag: str) -> Tuple[float, float, float]:
    """``v`` [3] as a unit vector, scaled by its largest component first so huge or tiny values do not overflow."""
    v = np.asarray(v, float)
    big = float(np.max(np.abs(v))) if np.isfinite(v).all() else math.nan
    if not big > 0:
        raise ValueError(f"{flag} {' '.join(fmt_num(x) for x in v)}: a direction must be finite and non-zero")
    w = v / big
    return tuple(float(x) for x in w / np.linalg.norm(w))


def _convention(inp: Inputs) -> Tuple[str, Dict[str, Tuple[float, float, float]]]:
    """(convention, Setup vectors): the last convention flag, or CUSTOM when any custom-vector flag is given;
    user vectors normalised (a normal not of length 1 becomes fast × slow)."""
    conv = inp.last("convention")
    if any(f.custom and inp.given(f.name) for f in FLAGS.values()):
        conv = "CUSTOM"
    vec = {}
    for field, default in zip(VECTOR_FIELDS, CONVENTION_TABLE[conv].vectors):
        flag = VECTOR_FLAGS[field]
        given = inp.opts.get(flag)
        if field == "odet" and given is not None and abs(np.linalg.norm(given) - 1.0) > 1e-9:
            given = np.cross(vec["fdet"], vec["sdet"])
        vec[field] = _unit(default if given is None else given, flag)
    if np.linalg.norm(np.cross(vec["beam"], vec["polar_axis"])) < 1e-6 and not inp.given("-nopolar"):
        raise ValueError("-polar_vector must not be parallel to the beam direction (-beam_vector / convention): the "
                         "polarization plane is undefined")
    return conv, vec


def _pixel_counts(inp: Inputs) -> Tuple[int, int, float]:
    """(fpixels, spixels, pixel mm): -detpixels_f/_s, then -detpixels, then the image header, then detsize/pixel."""
    pixel = float(inp.hget("-pixel"))
    counts = []
    for axis, key in (("f", "-detpixels_f"), ("s", "-detpixels_s")):
        n = inp.opts.get(key, inp.opts.get("-detpixels", inp.hget(key)))
        if n is None:
            size = float(inp.get(f"-detsize_{axis}", inp.get("-detsize")))
            n = math.ceil(size / pixel - 0.5)
            if not 1 <= n <= FLAGS[key].interval.bounds()[1]:
                raise ValueError(f"-detsize {size:g} mm / -pixel {pixel:g} mm gives {n} pixels along "
                                 f"{'fast' if axis == 'f' else 'slow'}: give {key} (1 to 1e6)")
        counts.append(int(n))
    if counts[0] * counts[1] > MAX_PIXELS:
        raise ValueError(f"-detpixels: the detector has {counts[0]} × {counts[1]} pixels, more than 2^31")
    return counts[0], counts[1], pixel


def _beam_center(inp: Inputs, conv: Convention, fpix: int, spix: int, pixel: float):
    """(beam_center, xbeam, ybeam): the Detector's beam centre (mm; for XDS/DIALS the near point, from -ORGX/-ORGY
    pixels converted by :func:`nbtorch.detector.orgx_to_mm`) and the Xbeam/Ybeam (mm) the SMV header
    reports.  Defaults per convention (spec §4)."""
    Df, Ds = fpix * pixel, spix * pixel
    orgx, orgy = inp.hget("-ORGX", None), inp.hget("-ORGY", None)
    # the near point: (ORGX − ½)·p, (ORGY − ½)·p when given, else the detector centre
    fclose = Df / 2 if orgx is None else orgx_to_mm(float(orgx), pixel)
    sclose = Ds / 2 if orgy is None else orgx_to_mm(float(orgy), pixel)
    # the convention's default, or the near point Xclose/Yclose, which itself defaults to the one above
    defaults = conv.default_xy(fpix, spix, pixel) or (float(inp.get("-Xclose", fclose)),
                                                      float(inp.get("-Yclose", sclose)))
    xbeam, ybeam = float(inp.hget("-Xbeam", defaults[0])), float(inp.hget("-Ybeam", defaults[1]))
    # -Xbeam/-Ybeam/-Xclose/-Yclose do not move a pixel-origin detector (spec Q3)
    return ((fclose, sclose) if conv.pixel_origin else (xbeam, ybeam)), xbeam, ybeam


def _pivot(inp: Inputs, conv: str) -> str:
    """The detector pivot: forced by the convention, or in CUSTOM the last pivot-selecting flag (table)."""
    if CONVENTION_TABLE[conv].pivot is not None:
        return CONVENTION_TABLE[conv].pivot
    states = {f.name: (FLAG_VALUE if f.pivot == "value" else f.pivot) for f in FLAGS.values() if f.pivot}
    return last_flag(inp.opts, states, "beam")


def _distance(inp: Inputs) -> Tuple[float, bool]:
    """(distance mm, distance_is_close): -close_distance (or a header CLOSE_DISTANCE without -distance) gives the
    perpendicular distance."""
    close = inp.given("-close_distance") or (not inp.given("-distance") and "-close_distance" in inp.header)
    return float(inp.hget("-close_distance" if close else "-distance")), bool(close)


class DetectorPart(NamedTuple):
    """setup: the detector's Setup keyword arguments; distance (mm), beam_center, rotation (deg), twotheta (deg):
    the Detector values; xbeam, ybeam: the header's BEAM_CENTER_X/Y (mm)."""

    setup: dict
    distance: float
    beam_center: Tuple[float, float]
    rotation: List[float]
    twotheta: float
    xbeam: float
    ybeam: float


def _detector(inp: Inputs) -> DetectorPart:
    """The detector section: convention and vectors, pixel counts, beam centre, pivot, distance, rotations."""
    conv, vec = _convention(inp)
    fpix, spix, pixel = _pixel_counts(inp)
    beam_center, xbeam, ybeam = _beam_center(inp, CONVENTION_TABLE[conv], fpix, spix, pixel)
    distance, is_close = _distance(inp)
    setup = dict(fpixels=fpix, spixels=spix, pixel_size=pixel, convention=conv, pivot=_pivot(inp, conv),
                 distance_is_close=is_close, **vec)
    rotation = [float(inp.get(f)) for f in ("-detector_rotx", "-detector_roty", "-detector_rotz")]
    return DetectorPart(setup, distance, beam_center, rotation, float(inp.get("-twotheta")), xbeam, ybeam)


def _sensor(inp: Inputs) -> dict:
    """Setup sensor fields: thickness (µm), μ (1/µm), layers and layer step (spec §1.5, Q8, Q22)."""
    thick = float(inp.get("-detector_thick"))
    mu = 1.0 / thick if thick > 0 else 0.0
    if inp.given("-detector_abs"):
        ell = inp.opts["-detector_abs"]
        if ell == 0 or math.isinf(ell):
            mu, thick = 0.0, 0.0  # nanoBragg also resets the thickness (spec Q22)
        else:
            mu = 1.0 / ell
    if thick <= 0:
        return dict(thickness_um=0.0, mu_per_um=0.0, thicksteps=1, thickstep_um=0.0)
    n = inp.opts.get("-detector_thicksteps")
    steps, step = (2, thick / 2.0) if n is None else (max(n, 2), thick / (max(n, 2) - 1))
    return dict(thickness_um=thick, mu_per_um=mu, thicksteps=int(steps), thickstep_um=step)


def _roi_and_mask(inp: Inputs, fpix: int, spix: int) -> Tuple[Optional[tuple], Optional[bytes]]:
    """(-roi inside the detector or None, -mask as bytes (1 = render) or None)."""
    roi = None
    if inp.given("-roi"):
        roi = tuple(inp.opts["-roi"])
        x0, x1, y0, y1 = roi
        if not (0 <= x0 <= x1 < fpix and 0 <= y0 <= y1 < spix):
            raise ValueError(f"-roi {' '.join(map(str, roi))}: needs 0 <= xmin <= xmax <= {fpix - 1} (fast) and "
                             f"0 <= ymin <= ymax <= {spix - 1} (slow)")
    mask = None
    if inp.given("-mask"):
        m, _ = _read(inp, "-mask", read_smv)
        if m.shape != (spix, fpix):
            raise ValueError(f"-mask {inp.opts['-mask']} is {m.shape[1]}×{m.shape[0]} pixels but the detector is "
                             f"{fpix}×{spix}")
        mask = (m != 0).astype(np.uint8).tobytes()
    return roi, mask


# ----------------------------------------------------------------------------------------------------------------
# beam and sources


def _grid(rng: Optional[float], step: Optional[float], count: Optional[int]):
    """nanoBragg's range/step/count auto rules for one divergence axis (rad) → (offsets, range, step)."""
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
    if count > MAX_SOURCES:
        raise ValueError(f"{count:.3g} divergence steps on one axis, more than {MAX_SOURCES:.0e} sources: lower "
                         "-divsteps (-hdivsteps/-vdivsteps) or raise -divstep")
    return [-rng / 2 + j * step for j in range(count)], rng, step


def _source_file(inp: Inputs, beam, lam: float) -> tuple:
    """Sources of -sourcefile: directions towards the sample from each position (default −10 m·beam), relative
    wavelengths from the λ column (metres; default λ0)."""
    name, out = inp.opts["-sourcefile"], []
    for r in read_sources(inp.path("-sourcefile")):
        P = np.where(np.isnan(r[:3]), -10.0 * np.asarray(beam), r[:3])
        lam_k = lam if np.isnan(r[4]) else m_to_angstrom(r[4])
        if not lam_k > 0:
            raise ValueError(f"-sourcefile {name}: wavelength must be > 0 m, got {r[4]:g}")
        out.append((_unit(-P, f"-sourcefile {name}: source position"), float(lam_k / lam)))
    if not out:
        raise ValueError(f"-sourcefile {name} holds no sources")
    return tuple(out)


def sources_for(inp: Inputs, beam, polar_axis, lam: float) -> tuple:
    """Setup.sources: -sourcefile, or the divergence grid × dispersion wavelengths (spec §1.4).  ``beam``,
    ``polar_axis``: unit vectors; ``lam``: λ0 (Å).  With no source flag: the single source along the beam."""
    if inp.given("-sourcefile"):
        return _source_file(inp, beam, lam)
    disp, dsteps = percent_to_fraction(inp.get("-dispersion")), inp.opts.get("-dispsteps")
    factors = [1.0]
    if disp > 0:
        dsteps = 2 if dsteps is None else dsteps
        if dsteps > 1:
            factors = [1.0 + j * (disp / (dsteps - 1)) - disp / 2.0 for j in range(dsteps)]
    axes = []
    for a in ("h", "v"):
        rng = inp.get(f"-{a}divrange", inp.get("-divergence"))
        count = inp.get(f"-{a}divsteps", inp.get("-divsteps"))
        step = inp.opts.get(f"-{a}divstep")
        axes.append(_grid(None if rng is None else mrad2rad(rng), None if step is None else mrad2rad(step), count))
    (hg, hr, hs), (vg, vr, vs) = axes
    if len(hg) * len(vg) * len(factors) > MAX_SOURCES:
        raise ValueError(f"{len(hg)} × {len(vg)} divergence steps × {len(factors)} wavelengths = "
                         f"{len(hg) * len(vg) * len(factors):.3g} sources, more than {MAX_SOURCES:.0e}: lower "
                         "-divsteps (-hdivsteps/-vdivsteps) or -dispsteps")
    return divergence_sources(beam, polar_axis, hg, vg, hr, vr, hs, vs, bool(inp.last("round_div")), factors)


def _fluence(inp: Inputs) -> float:
    """Fluence (photons/m²): -fluence, or -flux·-exposure/-beamsize² when a flux is given (square beam)."""
    flux, exposure = inp.get("-flux"), inp.get("-exposure")
    if flux == 0 or not exposure > 0:
        return float(inp.get("-fluence"))
    beamsize = inp.get("-beamsize")
    fluence = flux * exposure / mm_to_m(beamsize) ** 2
    rng = FLAGS["-fluence"].interval
    if fluence not in rng:
        raise ValueError(f"-flux {flux:g} × -exposure {exposure:g} / -beamsize {beamsize:g}² gives a fluence of "
                         f"{fluence:g} photons/m², outside {rng.text}")
    return float(fluence)


# ----------------------------------------------------------------------------------------------------------------
# sampling, noise and output


def _sampling_geometry(det: DetectorPart, layout: Optional[PanelLayout]) -> Tuple[float, float]:
    """(distance, pixel size) in mm for the automatic -oversample rule: nanoBragg's reported distance and -pixel,
    after checking the detector geometry (plane in front of the sample); for a panel detector its nominal distance
    and smallest pixel step (its panels are checked once placed)."""
    if layout is not None:
        steps = [math.sqrt(sum(c * c for c in v)) for p in layout.panels for v in (p.fast, p.slow)]
        return layout.distance, min(steps)
    det64 = Detector(*(torch.tensor(v, dtype=torch.float64) for v in
                       (det.distance, det.beam_center, det.rotation, det.twotheta, np.zeros((0, 3)),
                        np.zeros((0, 3)))))
    base = Setup(**det.setup)
    check_detector(det64, base)
    return float(detector_frame(det64, base).distance), base.pixel_size


def _oversample(inp: Inputs, xtal: CrystalPart, lam: float, det: DetectorPart,
                layout: Optional[PanelLayout] = None) -> int:
    """-oversample, or nanoBragg's rule ceil(3·max(N·|axis|)/(λ·distance/pixel)) with the reported distance
    (:func:`_sampling_geometry`, which checks the detector first)."""
    distance, pixel = _sampling_geometry(det, layout)
    if inp.given("-oversample"):
        return int(inp.opts["-oversample"])
    M_real, _ = latmod.lattice(xtal.cell, torch.eye(3, dtype=torch.float64), nanobragg=xtal.nanobragg_cell)
    L_max = max(xtal.N[k] * float(torch.linalg.vector_norm(M_real[:, k])) for k in range(3))
    n = max(1, int(math.ceil(3.0 * L_max / (lam * distance / pixel))))
    hi = int(FLAGS["-oversample"].interval.bounds()[1])
    if n > hi:
        raise ValueError(f"the automatic -oversample rule asks for {n} sub-pixels per pixel edge (crystal "
                         f"{L_max:.4g} Å across, distance {distance:.4g} mm, pixel {pixel:g} mm); give "
                         f"-oversample explicitly (1 to {hi})")
    return n


class Outputs(NamedTuple):
    """The command line's own options (fields ``cli.*`` of the flag table).

    floatfile, intfile, noisefile, pgmfile: output names; nexusfile: the NXmx output or None (not written);
    write_noise, write_pgm, progress: the switches (last flag wins); scale (counts/photon, None = automatic),
    pgmscale (0 = automatic), adc (counts); seed: noise seed (seed_from_clock when not given); printout;
    printout_pixel: (fast, slow) or None.  Detector response (:mod:`.response`): psf ('gauss', 'fiber' or None: no
    blur), psf_fwhm (µm), psf_radius (pixels, resolved; None without -psf); gain (ADU/photon), readout_noise (ADU),
    flicker, calibration (fractions), calib_seed: the noise image's detector terms (:attr:`detector_noise`)."""

    floatfile: str
    intfile: str
    noisefile: str
    pgmfile: str
    nexusfile: Optional[str]
    write_noise: bool
    write_pgm: bool
    progress: bool
    scale: Optional[float]
    pgmscale: float
    adc: float
    seed: int
    seed_from_clock: bool
    printout: bool
    printout_pixel: Optional[Tuple[int, int]]
    psf: Optional[str] = None
    psf_fwhm: float = 46.0
    psf_radius: Optional[int] = None
    gain: float = 1.0
    readout_noise: float = 0.0
    flicker: float = 0.0
    calibration: float = 0.0
    calib_seed: int = DEFAULT_CALIB_SEED

    @property
    def detector_noise(self) -> DetectorNoise:
        """The noise image's detector terms (:class:`nbtorch.noise.DetectorNoise`; ideal by default)."""
        return DetectorNoise(self.gain, self.readout_noise, self.flicker, self.calibration, self.calib_seed)


def _check_nexus(inp: Inputs, params: Params, setup: Setup) -> None:
    """-nexusfile: h5py is importable and NXmx can describe the geometry (:func:`nbtorch.io.nxmx_geometry`: a flat
    detector the beam reaches), checked before any work."""
    from ..io.nexus import nxmx_geometry
    name = inp.opts["-nexusfile"]
    if importlib.util.find_spec("h5py") is None:
        raise ValueError(f"-nexusfile {name}: writing NeXus files needs the optional 'h5py' package: "
                         "pip install nbtorch[io]")
    try:
        nxmx_geometry(tree_map(lambda t: t.detach().to("cpu", torch.float64), params), setup)
    except ValueError as exc:
        raise ValueError(f"-nexusfile {name}: {str(exc).removeprefix('NXmx output: ')}") from None


def _outputs(inp: Inputs, params: Params, setup: Setup) -> Outputs:
    """The noise and output section, checked against the model (``params`` and ``setup`` without their structure
    factors) before anything is simulated or written."""
    fpix, spix = setup.fpixels, setup.spixels
    pix = inp.opts.get("-printout_pixel")
    if pix is not None and not (0 <= pix[0] < fpix and 0 <= pix[1] < spix):
        raise ValueError(f"-printout_pixel {pix[0]} {pix[1]}: needs pixel indices fast in 0..{fpix - 1} and slow in "
                         f"0..{spix - 1}")
    if inp.given("-nexusfile"):
        _check_nexus(inp, params, setup)
    scale = inp.get("-scale")
    psf, psf_fwhm, psf_r = psf_choice(inp, setup)
    noise = detector_noise(inp, write_noise=bool(inp.last("noise")))
    return Outputs(
        floatfile=str(inp.get("-floatfile")), intfile=str(inp.get("-intfile")), noisefile=str(inp.get("-noisefile")),
        pgmfile=str(inp.get("-pgmfile")), nexusfile=inp.opts.get("-nexusfile"), write_noise=bool(inp.last("noise")),
        write_pgm=bool(inp.last("pgm")), progress=bool(inp.last("progress")),
        scale=None if scale is None else float(scale), pgmscale=float(inp.get("-pgmscale", 0.0)),
        adc=float(inp.get("-adc")), seed=int(inp.get("-seed", int(time.time()))),
        seed_from_clock=not inp.given("-seed"), printout=inp.given("-printout"),
        printout_pixel=None if pix is None else (int(pix[0]), int(pix[1])),
        psf=psf, psf_fwhm=psf_fwhm, psf_radius=psf_r, gain=noise.gain, readout_noise=noise.readout_adu,
        flicker=noise.flicker, calibration=noise.calibration, calib_seed=noise.calib_seed,
    )


#: Flags naming a file a build reads (from the table: the file flags outside the output section that have an effect).
INPUT_FILE_FLAGS = tuple(f.name for f in FLAGS.values()
                         if f.kind == "file" and f.section != "output" and f.effect != "none")
#: The command line's output file flags in writing order, each with the switch group that can turn it off.
OUTPUT_FILE_FLAGS = (("-floatfile", None), ("-intfile", None), ("-pgmfile", "pgm"), ("-noisefile", "noise"),
                     ("-nexusfile", None))


def input_files(opts: NanoBraggArgs, base_dir: str = "") -> List[Tuple[str, str]]:
    """``(flag, path)`` of every file the flags make a build read (:data:`INPUT_FILE_FLAGS`), a relative name
    joined to ``base_dir`` as :meth:`Inputs.path` does (default "": as given, relative to the current folder)."""
    return [(flag, os.path.join(base_dir, str(opts[flag]))) for flag in INPUT_FILE_FLAGS if flag in opts]


def output_files(opts: NanoBraggArgs) -> List[Tuple[str, str]]:
    """``(flag, name)`` of every file the ``nbtorch`` command line writes with these flags, in writing order: the
    float and int images, the PGM unless ``-nopgm``, the noise image unless ``-nonoise`` (last flag wins), the NXmx
    file when ``-nexusfile`` is given.  Names absent from the flags are the table's defaults (relative to the
    current folder, as the command line writes them)."""
    out = []
    for flag, switch in OUTPUT_FILE_FLAGS:
        if switch is not None and not last_flag(opts, switch_states(switch), SWITCH_DEFAULTS[switch]):
            continue
        name = opts.get(flag, FLAGS[flag].default)
        if name is not None:
            out.append((flag, str(name)))
    return out


@dataclasses.dataclass
class Extras:
    """What the command line needs beyond (Params, Setup).

    opts: the parsed flags; xbeam_mm, ybeam_mm: the SMV header's BEAM_CENTER_X/Y; phi0, osc: its PHI/OSC_RANGE
    (deg); interpolate_auto: what the automatic interpolation rule chose; notes: remarks to print; outputs:
    :class:`Outputs`; panels: the detector file of -geom/-expt (:class:`~nbtorch.args.panels.PanelSource`, whose
    layout is the outputs') or None."""

    opts: NanoBraggArgs
    xbeam_mm: float = 0.0
    ybeam_mm: float = 0.0
    phi0: float = 0.0
    osc: float = 0.0
    interpolate_auto: bool = False
    notes: List[str] = dataclasses.field(default_factory=list)
    outputs: Optional[Outputs] = None
    panels: Optional[PanelSource] = None


def build(opts: NanoBraggArgs, dtype=torch.float64, device=None, base_dir: str = "."):
    """Apply nanoBragg's defaults and automatic rules to parsed flags → ``(params, setup, extras)``.

    ``params``: :class:`~nbtorch.types.Params` of ``dtype``/``device`` tensors (Å, mm, deg); ``setup``: the frozen
    :class:`~nbtorch.types.Setup`; ``extras``: :class:`Extras`.  Files named by flags are read relative to
    ``base_dir``.  ``ValueError`` (naming the flag) for missing inputs and inconsistent values; nothing is written.
    Every cheap check (output flags included) runs before the structure factors are read or calculated."""
    missing = missing_inputs(opts)
    if missing:
        raise ValueError("missing required input" + ("s" if len(missing) > 1 else "") + ": " + "; and ".join(missing))
    check_panel_flags(opts)
    check_spectrum_flags(opts)
    inp = Inputs(opts, base_dir)
    inp.spectrum = read_spectrum(inp, _read)
    source = panel_source(inp, _read)  # -geom/-expt: the file's values merged into inp.opts
    inp.file_crystal = None if source is None else source.crystal
    _check_structure_flags(inp)
    lam = _wavelength(inp)
    _check_header_agreement(inp, lam)
    xtal = _crystal(inp, lam)
    phi0, phistep, phisteps, osc = _phi(inp)
    spread, mosaic_axes, mosaic_fractions = _mosaic(inp, phisteps)
    det = _detector(inp)
    roi, mask = _roi_and_mask(inp, det.setup["fpixels"], det.setup["spixels"])
    setup = Setup(
        **det.setup, **_sensor(inp), oversample=_oversample(inp, xtal, lam, det, source and source.layout),
        phi0=phi0, phistep=phistep,
        phisteps=phisteps, mosaic_axes=mosaic_axes, mosaic_fractions=mosaic_fractions,
        sources=sources_for(inp, det.setup["beam"], det.setup["polar_axis"], lam),
        point_pixel=inp.given("-point_pixel"), curved_det=inp.given("-curved_det"), nopolar=inp.given("-nopolar"),
        oversample_thick=inp.given("-oversample_thick"), oversample_polar=inp.given("-oversample_polar"),
        oversample_omega=inp.given("-oversample_omega"), shape=xtal.shape, fudge=xtal.fudge,
        dmin=float(inp.get("-dmin")), roi=roi, mask=mask, nanobragg_cell=xtal.nanobragg_cell,
    )

    def T(v):
        return torch.as_tensor(v, dtype=dtype, device=device)

    params = Params(
        crystal=Crystal(T(xtal.cell), T(xtal.misset), T(xtal.U0), T(xtal.N), T(spread)),
        beam=Beam(T(lam), T(_fluence(inp)), T(float(inp.get("-polar"))), T(0.0)),
        detector=Detector(T(det.distance), T(det.beam_center), T(det.rotation), T(det.twotheta),
                          T(torch.zeros(0, 3)), T(torch.zeros(0, 3))),
        structure=Structure(T(np.zeros((0, 0, 0))), T(float(inp.get("-default_F")))),
        background=Background(T(float(inp.get("-water")))),
    )
    if source is not None:
        params, setup = _panel_model(params, setup, source)
    if inp.spectrum is not None:
        params, setup = apply_spectrum(params, setup, inp.spectrum, inp.opts["-spectrum"], inp.notes)
    plan(setup, len(rendered_pixels(setup)))  # refuses absurd work now, naming what to lower
    outputs = _outputs(inp, params, setup)
    table, hkl_min, interpolate, interp_auto = _structure(inp, xtal, params, setup)
    setup = setup.replace(hkl_min=hkl_min, interpolate=interpolate)
    params = params._replace(structure=params.structure._replace(F=T(table)))
    extras = Extras(opts=opts, xbeam_mm=det.xbeam, ybeam_mm=det.ybeam, phi0=phi0, osc=osc,
                    interpolate_auto=interp_auto, notes=inp.notes, outputs=outputs, panels=source)
    return params, setup, extras


def _panel_model(params: Params, setup: Setup, source: PanelSource) -> Tuple[Params, Setup]:
    """The model with the detector of ``source`` (:func:`nbtorch.detector.with_panels`) and its mask; every panel
    checked to lie in front of the sample."""
    params, setup = with_panels(params, setup, source.layout)
    setup = setup.replace(mask=source.mask)
    try:
        check_detector(params.detector, setup)
    except ValueError as exc:
        raise ValueError(f"{source.flag} {source.name}: {exc}") from None
    return params, setup


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
