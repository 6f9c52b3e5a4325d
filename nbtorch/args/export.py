"""The inverse of the parser: ``(Params, Setup)`` → nanoBragg flags, derived from the flag table.

Every flag of :data:`nbtorch.args.table.FLAGS` says how it is written back (its ``write`` attribute): from the field
it sets (``""``), never (``"no"``: derived flags such as ``-N`` or ``-energy``, and the command line's own output
options), copied from the flags the model came from (``"carry"``: structure-factor files, source lists and divergence,
masks — what a Params/Setup pair cannot express by itself), or by one of the rules below, each written once at its
first flag's place in the table (so ``-pivot``, last in the detector section, follows every pivot-selecting flag).

Numbers are written as the shortest text that reads back as the same float, so that
``from_nanobragg_args(to_nanobragg_args(params, setup))`` rebuilds the same Params and Setup and the same image.

A detector of panels is written as the base flags' ``-geom``/``-expt`` file (first, so that the flags after it
override the values the file supplies, which are written explicitly), without the flags that file replaces; a panel
detector moved from the file's place has no flags (write it as a geometry file, e.g.
:func:`nbtorch.io.crystfel.moved_geometry`, and give that file).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..conventions import CONVENTION_TABLE
from ..detector import mm_to_orgx, orgx_to_mm
from ..io.matrix import write_mosflm_matrix
from ..lattice import reciprocal_matrix
from ..mosaic import DEFAULT_MOSAIC_SEED, mosaic_domains
from ..rotation import xyz_angles
from ..simulate import crystal_rotation
from ..spectrum import with_spectrum
from ..types import Params, Setup
from ..units import deg2rad, rad2deg
from .build import Inputs, sources_for
from .parse import NanoBraggArgs, fmt_num, last_flag, parse_args
from .spectrum import SPECTRUM_SETS, read_spectrum
from .table import FLAGS, Flag, switch_states

__all__ = ["to_nanobragg_args"]


class _Context:
    """What the writers read: the model, the base flags (parsed, may be empty) and the matrix options."""

    def __init__(self, params: Params, setup: Setup, base: NanoBraggArgs, matrix_path, write_matrix, base_dir):
        self.params, self.setup, self.base = params, setup, base
        self.matrix_path, self.write_matrix, self.base_dir = matrix_path, write_matrix, base_dir
        # a carried -mask header would supply defaults: then every header-backed value is written explicitly
        self.explicit = "-mask" in base
        # a detector file supplies values of these flags: they are written explicitly
        self.file_values = _FILE_VALUES if setup.panels is not None else ()

    def field(self, path: str):
        """Value of a table field path (``params.beam.wavelength``, ``params.crystal.ncells[0]``, ``setup.roi``) as
        Python numbers."""
        name, _, index = path.partition("[")
        root, *attrs = name.split(".")
        obj = self.params if root == "params" else self.setup
        for a in attrs:
            obj = getattr(obj, a)
        if isinstance(obj, torch.Tensor):
            obj = obj.detach().cpu().to(torch.float64)
            obj = float(obj[int(index[:-1])]) if index else (float(obj) if obj.dim() == 0 else obj.tolist())
        return obj


def _tokens(flag: Flag, value) -> List[str]:
    """A flag and its value(s) as command-line tokens."""
    if flag.kind == "switch":
        return [flag.name]
    if flag.kind in ("file", "text", "choice"):
        return [flag.name, str(value)]
    if flag.kind in ("count", "int", "pixels"):
        vals = value if isinstance(value, (list, tuple)) else [value]
        return [flag.name, *(str(int(v)) for v in vals)]
    vals = value if isinstance(value, (list, tuple)) else [value]
    return [flag.name, *(fmt_num(v) for v in vals)]


def _from_field(flag: Flag, ctx: _Context) -> List[str]:
    """Generic writer: the field's value; a switch when its state is the field's; omitted when it equals the
    table default (unless a carried -mask header could supply another value)."""
    if not flag.field or flag.field.startswith("cli."):
        return []
    v = ctx.field(flag.field)
    if flag.kind == "switch":
        on = v == flag.switch[1] if flag.switch is not None else v is True
        return [flag.name] if on else []
    if v is None or (flag.default is not None and v == flag.default and not (ctx.explicit and flag.header)
                     and flag.name not in ctx.file_values):
        return []
    return _tokens(flag, v)


def _carry(flag: Flag, ctx: _Context) -> List[str]:
    """A flag the model cannot express, copied from the base flags (switch groups: the state that won there)."""
    if flag.name not in ctx.base:
        return []
    if flag.switch is not None:
        won = last_flag(ctx.base, switch_states(flag.switch[0]), None)
        return [flag.name] if won == flag.switch[1] else []
    return _tokens(flag, ctx.base[flag.name])


# ----------------------------------------------------------------------------------------------------------------
# rules


def _crystal(ctx: _Context) -> List[str]:
    """-cell and -misset (the lattice built as nanoBragg's -cell does), or -mat with a MOSFLM matrix written to
    ``matrix_path`` (exact lattice of a -mat model)."""
    p = ctx.params.crystal
    if ctx.setup.nanobragg_cell:
        U0 = p.orientation.detach().cpu().to(torch.float64)
        if torch.equal(U0, torch.eye(3, dtype=torch.float64)):
            mis = p.misset.detach().cpu().tolist()
        else:  # the whole rotation as XYZ angles (exact up to rounding)
            mis = rad2deg(xyz_angles(crystal_rotation(p).detach().cpu().to(torch.float64))).tolist()
        return _tokens(FLAGS["-cell"], ctx.field("params.crystal.cell")) + _tokens(FLAGS["-misset"], mis)
    if ctx.matrix_path is None:
        raise ValueError("the model came from a MOSFLM matrix (-mat): give matrix_path to write the refined matrix")
    if ctx.write_matrix:
        R = crystal_rotation(p).detach().cpu().to(torch.float64)
        cell = p.cell.detach().cpu().to(torch.float64)
        A = float(ctx.params.beam.wavelength) * (R @ reciprocal_matrix(cell))
        write_mosflm_matrix(ctx.matrix_path, A.numpy(), cell=cell.numpy(), U=R.numpy())
    return ["-mat", str(ctx.matrix_path)]


def _mosaic(ctx: _Context) -> List[str]:
    """-mosaic, -mosaic_domains and, when not the default, -mosaic_seed (the seed the domains were drawn from: the
    base flags' or the default; ValueError when neither reproduces them)."""
    st, spread = ctx.setup, ctx.field("params.crystal.mosaic_spread")
    if st.n_domains == 1 and st.mosaic_axes == ((1.0, 0.0, 0.0),) and spread == 0:
        return []
    seeds = ([ctx.base["-mosaic_seed"]] if "-mosaic_seed" in ctx.base else []) + [DEFAULT_MOSAIC_SEED]
    for seed in seeds:
        axes, fr = mosaic_domains(deg2rad(spread), st.n_domains, seed)
        if tuple(tuple(float(x) for x in a) for a in axes) == st.mosaic_axes and tuple(map(float, fr)) == \
                st.mosaic_fractions:
            out = ["-mosaic", fmt_num(spread), "-mosaic_domains", str(st.n_domains)]
            return out + (["-mosaic_seed", str(seed)] if seed != DEFAULT_MOSAIC_SEED else [])
    if st.n_domains == 1:  # one domain is the identity whatever its axis
        return ["-mosaic", fmt_num(spread), "-mosaic_domains", "1"]
    raise ValueError("the mosaic domains of the set-up were not drawn with the default -mosaic_seed: pass the flags "
                     "the model came from (with -mosaic_seed) as base")


def _phi(ctx: _Context) -> List[str]:
    """-phi, and -osc/-phistep/-phisteps all three (so no automatic rule applies) when the spindle moves; always
    with a carried -mask header or an -expt file (whose scan may give other values)."""
    st, out = ctx.setup, []
    explicit = ctx.explicit or "-expt" in ctx.base
    if st.phi0 != 0 or explicit:
        out += ["-phi", fmt_num(st.phi0)]
    if st.phisteps > 1 or st.phistep != 0 or explicit:
        out += ["-osc", fmt_num(st.phistep * st.phisteps), "-phistep", fmt_num(st.phistep), "-phisteps",
                str(st.phisteps)]
    return out


def _convention(ctx: _Context) -> List[str]:
    """The convention flag, or every vector of a CUSTOM set-up (the convention whose pivot and vectors are flags;
    with a detector file, those it does not replace)."""
    st = ctx.setup
    if st.panels is None and CONVENTION_TABLE[st.convention].pivot is not None:
        return [f.name for f in FLAGS.values() if f.switch == ("convention", st.convention)]
    vec = [f for f in FLAGS.values() if f.kind == "vector" and f.field and not (st.panels and f.replaced)]
    return [t for f in vec for t in _tokens(f, getattr(st, f.field.split(".")[1]))]


def _distance(ctx: _Context) -> List[str]:
    """-close_distance when the set-up's distance is the perpendicular one, else -distance."""
    flag = FLAGS["-close_distance" if ctx.setup.distance_is_close else "-distance"]
    return _tokens(flag, ctx.field("params.detector.distance"))


def _beam_center(ctx: _Context) -> List[str]:
    """-ORGX/-ORGY (XDS, DIALS: the near point in pixels, chosen so that the parser's (ORGX − ½)·p gives the model's
    mm exactly, or to the last place where no float does) or -Xbeam/-Ybeam (mm)."""
    if not CONVENTION_TABLE[ctx.setup.convention].pixel_origin:
        return [t for n in ("-Xbeam", "-Ybeam") for t in _tokens(FLAGS[n], ctx.field(FLAGS[n].field))]
    p, out = ctx.setup.pixel_size, []
    for n in ("-ORGX", "-ORGY"):
        mm = ctx.field(FLAGS[n].field)
        out += _tokens(FLAGS[n], _preimage(lambda org: orgx_to_mm(org, p), mm, mm_to_orgx(mm, p), nearest=True))
    return out


def _pivot(ctx: _Context) -> List[str]:
    """-pivot in the CUSTOM convention (the others force theirs)."""
    return ["-pivot", ctx.setup.pivot] if CONVENTION_TABLE[ctx.setup.convention].pivot is None else []


def _preimage(f: Callable[[float], float], y: float, x0: float, nearest: bool = False) -> float:
    """A float x within 16 units in the last place of ``x0`` with ``f(x) == y`` exactly, the one with the shortest
    text; when there is none, the x whose ``f(x)`` is nearest ``y`` if ``nearest``, else ValueError."""
    lo = hi = float(x0)
    xs = [lo]
    for _ in range(16):
        lo, hi = float(np.nextafter(lo, -math.inf)), float(np.nextafter(hi, math.inf))
        xs += [lo, hi]
    hits = [x for x in xs if f(x) == y]
    if hits:
        return min(hits, key=lambda x: len(fmt_num(x)))
    if nearest:
        return min(xs, key=lambda x: abs(f(x) - y))
    raise ValueError(f"no number near {x0!r} gives {y!r}")


def _sensor(ctx: _Context) -> List[str]:
    """-detector_thick with -detector_abs (when μ is not 1/thickness) and -detector_thicksteps (when not the
    automatic 2 layers of thickness/2)."""
    st = ctx.setup
    T = st.thickness_um
    if T <= 0:
        return []
    out = ["-detector_thick", fmt_num(T)]
    if st.mu_per_um == 0:
        raise ValueError("a sensor with thickness but no absorption (mu_per_um = 0) has no nanoBragg flags "
                         "(-detector_abs 0 also removes the thickness, Q22)")
    if st.mu_per_um != 1.0 / T:
        out += ["-detector_abs", fmt_num(_preimage(lambda x: 1.0 / x, st.mu_per_um, 1.0 / st.mu_per_um))]
    if (st.thicksteps, st.thickstep_um) != (2, T / 2.0):
        if st.thicksteps < 2 or st.thickstep_um != T / (st.thicksteps - 1):
            raise ValueError(f"sensor layers ({st.thicksteps} of {st.thickstep_um:g} µm in {T:g} µm) have no "
                             "nanoBragg flags (layers of thickness/(n-1), n >= 2)")
        out += ["-detector_thicksteps", str(st.thicksteps)]
    return out


def _interpolate(ctx: _Context) -> List[str]:
    """-interpolate/-nointerpolate explicitly when a structure-factor table is used (the automatic rule depends on
    the command-line N)."""
    if ctx.params.structure.F.numel() == 0:
        return []
    return ["-interpolate" if ctx.setup.interpolate else "-nointerpolate"]


#: Flags whose values a detector file supplies (written explicitly with one, even at their defaults).
_FILE_VALUES = ("-lambda", "-polar", "-polar_vector", "-spindle_axis")

_RULES: Dict[str, Callable[[_Context], List[str]]] = {
    "crystal": _crystal, "mosaic": _mosaic, "phi": _phi, "convention": _convention, "distance": _distance,
    "beam_center": _beam_center, "pivot": _pivot, "sensor": _sensor, "interpolate": _interpolate,
}


# ----------------------------------------------------------------------------------------------------------------
# what only the base flags can give


def _check_expressible(ctx: _Context) -> None:
    """ValueError when the model holds something flags can only give through a carried file or source flags that
    the base flags lack (or that no longer reproduce the set-up's sources)."""
    if ctx.params.structure.F.numel() > 0 and "-hkl" not in ctx.base and "-pdb" not in ctx.base:
        raise ValueError("the model uses a structure-factor table: pass the flags it came from (with -hkl or -pdb) "
                         "as base")
    if bool(ctx.params.beam.spectrum_shift != 0):
        raise ValueError("the model's spectrum is shifted (beam.spectrum_shift ≠ 0): nanoBragg's flags have no "
                         "wavelength shift; write the shifted wavelengths as a spectrum file instead")
    if len(set(ctx.setup.normalised_source_weights)) > 1 and "-spectrum" not in ctx.base:
        raise ValueError("the model's sources have unequal weights (a spectrum): nanoBragg's flags weigh every source "
                         "alike (its -sourcefile intensity column is ignored, Q11); write the spectrum as a .lam file "
                         "(nbtorch.spectrum.write_lam) and give nbtorch -spectrum FILE")
    if ctx.setup.panels is not None:
        _check_panel_file(ctx)
    elif ctx.setup.mask is not None and "-mask" not in ctx.base:
        raise ValueError("the model has a pixel mask: pass the flags it came from (with -mask) as base")
    carried = NanoBraggArgs({f: v for f, v in ctx.base.items() if FLAGS[f].sets.startswith("setup.sources")})
    carried.order = [f for f in ctx.base.order if f in carried]
    try:
        inp = Inputs(carried, ctx.base_dir)
        expected = sources_for(inp, ctx.setup.beam, ctx.setup.polar_axis, ctx.field("params.beam.wavelength"))
        weights = _base_spectrum(ctx, inp, expected)
    except OSError as exc:
        raise ValueError(f"cannot read the base flags' -sourcefile or -spectrum: {exc}") from None
    if weights is not None:
        expected, weights = weights
    if expected != ctx.setup.sources or (weights is not None and weights != ctx.setup.normalised_source_weights):
        what = "do not give" if carried else "(none given) cannot give"
        raise ValueError(f"the base flags' source flags {what} the set-up's {ctx.setup.n_sources} sources "
                         "(divergence, dispersion or -sourcefile; a -sourcefile λ is absolute, so a refined "
                         "-lambda changes them): pass the flags the model came from as base")


def _base_spectrum(ctx: _Context, inp: Inputs, directions: tuple) -> Optional[tuple]:
    """The base flags' ``-spectrum`` (rebinned by their ``-spectrum_bins``) given to the base's source
    ``directions`` as the command line gives it: ``(sources, normalised weights)``, or None without one.
    ValueError when the model's λ0 is not the spectrum's weighted mean (a refined wavelength)."""
    if "-spectrum" not in ctx.base:
        return None
    spectrum = read_spectrum(inp, lambda i, flag, reader: reader(i.path(flag)))
    base = ctx.setup.replace(sources=directions, source_weights=None)
    params, setup = with_spectrum(ctx.params, base, spectrum.wavelengths, spectrum.weights)
    lam0 = ctx.field("params.beam.wavelength")
    if float(params.beam.wavelength) != lam0:
        raise ValueError(f"the model's lambda0 {fmt_num(lam0)} Å is not the weighted mean "
                         f"{fmt_num(float(params.beam.wavelength))} Å of the base flags' -spectrum "
                         f"{ctx.base['-spectrum']} (a refined wavelength): write the model's spectrum with "
                         "nbtorch.spectrum.write_lam and give that file")
    return setup.sources, setup.normalised_source_weights


def _check_panel_file(ctx: _Context) -> None:
    """A detector of panels: the base flags name its file, and it is where the file put it (ValueError otherwise)."""
    if not any(f in ctx.base for f in ("-geom", "-expt")):
        raise ValueError("the model has a detector of panels: pass the flags it came from (with -geom or -expt) as "
                         "base")
    det, layout = ctx.params.detector, ctx.setup.panels
    moved = [name for name, t in zip(det._fields, det) if name != "distance" and bool(torch.any(t != 0))]
    if float(det.distance) != layout.distance:
        moved.insert(0, "distance")
    if moved:
        raise ValueError(f"the detector of panels has moved from its file's place ({', '.join(moved)}): flags cannot "
                         "say so; write the moved detector as a geometry file (nbtorch.io.crystfel.moved_geometry, "
                         "nbtorch-refine --out-geom) and give that file")


def to_nanobragg_args(params: Params, setup: Setup, base: Union[None, str, Sequence[str]] = None,
                      matrix_path: Optional[str] = None, write_matrix: bool = True, base_dir: str = ".") -> List[str]:
    """nanoBragg flags (a list of tokens) that rebuild ``params`` and ``setup``: the inverse of
    :func:`nbtorch.from_nanobragg_args`, derived from the flag table.

    ``params``: an unbatched :class:`~nbtorch.types.Params` (Å, mm, deg); ``setup``: its
    :class:`~nbtorch.types.Setup`.  ``base``: the flags the model came from (string or tokens), needed only for what
    a model cannot express by itself and copied from there: ``-hkl`` (a structure-factor table, text or MTZ, with
    ``-mtz_column``/``-mtz_anomalous``) or ``-pdb`` (with ``-pdb_bfactor``; its table is recalculated to the
    resolution of the detector corners of the written geometry), ``-mask``, source
    flags (``-divergence``…, ``-dispersion``…, ``-sourcefile``, ``-spectrum`` with ``-spectrum_bins``: then λ0
    must be the spectrum's weighted mean and ``-lambda`` is not written) and a non-default ``-mosaic_seed``.  Output-only and
    derived flags (``-N``, ``-energy``, ``-flux``, ``-xtalsize``…) are never written: their effect is.
    A model from ``-mat`` (``setup.nanobragg_cell`` False) is written as ``-mat matrix_path``, with the MOSFLM
    matrix written there unless ``write_matrix`` is False.  ``base_dir``: where relative files of ``base`` are.

    ``from_nanobragg_args(to_nanobragg_args(params, setup))`` gives identical images (the -mat route is limited by
    the matrix file's 8 decimals, CUSTOM vectors by one rounding of their normalisation, an XDS/DIALS beam centre in mm
by the last place of (ORGX − ½)·pixel, which not every float is).  ``ValueError`` when the
    model cannot be written as flags (and why).
    """
    opts = parse_args(base) if base is not None else parse_args([])
    ctx = _Context(params, setup, opts, matrix_path, write_matrix, base_dir)
    _check_expressible(ctx)
    out: List[str] = []
    done = set()
    for flag in FLAGS.values():
        if flag.write == "no" or (setup.panels is not None and flag.replaced) or \
                (flag.name in SPECTRUM_SETS and "-spectrum" in opts):
            continue
        if flag.write == "carry":
            out += _carry(flag, ctx)
        elif flag.write == "":
            out += _from_field(flag, ctx)
        elif flag.write not in done:
            done.add(flag.write)
            out += _RULES[flag.write](ctx)
    return out
