"""The nanoBragg flag table: every command-line flag described once.

Each :class:`Flag` says what the flag is called (name and aliases), what it takes (kind, number of values, unit,
allowed range), what it defaults to, and what it sets (the ``Params``/``Setup`` field, or the command line's own
output options ``cli.*``).  The parser (:mod:`nbtorch.args.parse`), the automatic rules (:mod:`nbtorch.args.build`),
``nbtorch --help`` and docs/cli.md (:mod:`nbtorch.cli.help`) and the inverse ``(Params, Setup) → flags``
(:mod:`nbtorch.args.export`) all read this table.

Adding a flag means adding one entry below (and, when it needs a rule rather than a plain field, the few lines of that
rule in ``build``/``export``).  Field paths name the leaf they set: ``params.beam.wavelength``,
``params.crystal.ncells[0]`` (one component), ``setup.pixel_size``, ``cli.floatfile``.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Dict, Optional, Tuple

from ..mosaic import DEFAULT_MOSAIC_SEED
from ..noise import DEFAULT_CALIB_SEED
from ..psf import PSF_KINDS
from ..units import DEFAULT_FLUENCE

__all__ = ["Flag", "Interval", "FLAGS", "ALIASES", "SECTIONS", "KINDS", "SWITCH_DEFAULTS", "switch_states",
           "flags_in_section"]

#: Sections in help order: key → title.
SECTIONS: Dict[str, str] = {
    "panels": "Detector of panels from a file: CrystFEL .geom, DIALS .expt",
    "crystal": "Crystal: cell, orientation, size, shape",
    "structure": "Structure factors",
    "mosaic": "Mosaicity and spindle rotation",
    "beam": "Beam: wavelength, spectrum, dispersion, divergence, sources, polarization, fluence",
    "detector": "Detector geometry, sensor, sampling",
    "background": "Background",
    "response": "Detector response (noisify's): point-spread function, gain, read-out and calibration noise",
    "output": "Noise and output",
}

#: Value kinds: how the parser reads a flag's values.
KINDS = {
    "real": "a number",
    "count": "an integer",
    "int": "an integer",
    "file": "a file name",
    "text": "a word (e.g. a column label)",
    "choice": "one of the listed words",
    "switch": "no value",
    "vector": "3 numbers (a direction)",
    "cell": "1 to 6 numbers",
    "misset": "3 angles or 'random'",
    "pixels": "integer pixel indices",
}

#: The state of each order-dependent switch group when none of its flags is given (``interpolate``: automatic).
SWITCH_DEFAULTS = {"shape": "square", "convention": "MOSFLM", "interpolate": None, "round_div": True, "noise": True,
                   "pgm": True, "progress": True}

_INTERVAL_RE = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])$")


@dataclasses.dataclass(frozen=True)
class Interval:
    """An allowed range of values, written as in mathematics: ``[0, 90]``, ``(0, 1e4]``, ``[0, inf]``."""

    text: str

    def bounds(self) -> Tuple[float, float, bool, bool]:
        """``(lo, hi, lo_closed, hi_closed)``."""
        lo, hi = self.bound_texts()
        return float(lo), float(hi), self.text.startswith("["), self.text.endswith("]")

    def bound_texts(self) -> Tuple[str, str]:
        """The two bounds as written in the table (``'0'``, ``'1e7'``)."""
        m = _INTERVAL_RE.match(self.text)
        if m is None:
            raise ValueError(f"bad interval {self.text!r}")
        return m[2], m[3]

    def __contains__(self, v: float) -> bool:
        lo, hi, lc, hc = self.bounds()
        return (lo <= v if lc else lo < v) and (v <= hi if hc else v < hi)

    @property
    def allows_inf(self) -> bool:
        """True when the range includes +inf (``[0, inf]``)."""
        lo, hi, lc, hc = self.bounds()
        return math.isinf(hi) and hc


@dataclasses.dataclass(frozen=True)
class Flag:
    """One nanoBragg flag.

    name, aliases: the canonical spelling and the other accepted ones (matched exactly, never by substring).
    section: a key of :data:`SECTIONS`.  help: what the flag means (units, defaults and ranges are added from the
    fields below).  kind: a key of :data:`KINDS`; nargs: number of values (``-cell`` takes 1–6, ``-misset`` 3 or
    'random').  unit: of every value ("" when none).  default: the value used when the flag is absent (``None``: no
    fixed value); default_text: the default when it is a rule.  within: the allowed range as an interval ("" = any
    finite number; a count without a range must be >= 0).  choices: allowed words of a ``choice`` flag.
    field: the ``params.*``/``setup.*``/``cli.*`` field the flag sets directly; sets: what it changes through a rule.
    switch: ``(group, state)`` for order-dependent flags: the last flag given of a group sets the group's state.
    pivot: the detector pivot ('beam'/'sample') the flag selects in the CUSTOM convention ('value': ``-pivot``).
    custom: giving the flag switches to the CUSTOM convention.  header: SMV header keys of an ``-img``/``-mask`` file
    that supply the flag's value when it is not given.  write: how :func:`nbtorch.to_nanobragg_args` writes the flag
    back — "" (from ``field``), "no" (never: derived or without effect), "carry" (copied from the base flags: the
    model cannot express it), or the name of a rule there.  effect: "none" for flags accepted only for compatibility.
    metavar: the value placeholder shown in help (derived from the kind when empty).
    replaced: the detector file of ``-geom``/``-expt`` gives what the flag sets (giving both is an error).
    """

    name: str
    section: str
    help: str
    kind: str = "real"
    nargs: int = 1
    unit: str = ""
    default: object = None
    default_text: str = ""
    within: str = ""
    choices: Tuple[str, ...] = ()
    aliases: Tuple[str, ...] = ()
    field: str = ""
    sets: str = ""
    switch: Optional[Tuple[str, object]] = None
    pivot: str = ""
    custom: bool = False
    header: Tuple[str, ...] = ()
    write: str = ""
    effect: str = ""
    metavar: str = ""
    replaced: bool = False

    @property
    def interval(self) -> Optional[Interval]:
        """The allowed range (``None``: any finite value)."""
        if self.within:
            return Interval(self.within)
        return Interval("[0, inf)") if self.kind in ("count", "pixels") else None


def _real(name, section, help, unit="", **kw) -> Flag:
    return Flag(name, section, help, kind="real", unit=unit, **kw)


def _count(name, section, help, **kw) -> Flag:
    return Flag(name, section, help, kind="count", **kw)


def _file(name, section, help, **kw) -> Flag:
    return Flag(name, section, help, kind="file", **kw)


def _switch(name, section, help, **kw) -> Flag:
    return Flag(name, section, help, kind="switch", nargs=0, **kw)


def _vector(name, section, help, field, write="convention", **kw) -> Flag:
    return Flag(name, section, help, kind="vector", nargs=3, field=field, custom=True, write=write, **kw)


_SEED = dict(kind="int", within="[-2147483648, 2147483647]")
_NONE = dict(effect="none", write="no")
_SIZE = "params.crystal.ncells (N = ceil(size/|axis|))"
_SOURCES = dict(sets="setup.sources (directions, wavelength factors)", write="carry")
_CELLS = "(-inf, 1e6]"  # below 1 means 1 (spec Q19)

_TABLE = (
    # ---- detector of panels from a file
    _file("-geom", "panels", "CrystFEL geometry file: the detector's panels, hierarchy and bad pixels (and the photon "
          "energy when the file gives one), in CrystFEL's lab frame: the beam along +z, the crystal, -polar_vector "
          "and -spindle_axis read as CUSTOM with -beam_vector 0 0 1; outputs are the file's data layout (one 2-D "
          "slab); flags the file replaces are refused", default_text="not used",
          sets="setup.panels, setup.mask, setup.beam, params.detector", write="carry"),
    _file("-expt", "panels", "DIALS experiment list: an experiment's (-expt_experiment) detector, beam (wavelength, "
          "direction, polarization) and crystal (real_space_a/b/c, with a goniometer's fixed and setting rotations) "
          "in DIALS's lab frame, and a rotation's goniometer and scan (-spindle_axis, -phi, -osc of image "
          "-expt_image); flags after -expt override the file's values; outputs are the panels stacked [P, slow, "
          "fast]", default_text="not used",
          sets="setup.panels, setup.mask, setup.beam, params.detector, params.beam, params.crystal", write="carry"),
    _count("-expt_experiment", "panels", "the experiment of the -expt list to build (0-based; only with -expt)",
           default_text="0 (the first)", sets="which experiment -expt reads", write="carry", metavar="K"),
    _count("-expt_image", "panels", "the image of the -expt experiment (0-based within its scan or imageset; only "
           "with -expt): a rotation's spindle start and range are the scan's oscillation of that image (-phi = "
           "start + K·width, -osc = width; -phisteps from the flags)", default_text="0 (the first)",
           sets="setup.phi0, setup.phistep (a rotation's)", write="carry", metavar="K"),
    Flag("-clen", "panels", "camera length where the -geom file reads it from a data file (clen = /path): a length "
         "with unit mm (the default) or m, e.g. 125, 125mm, 0.125m; the file's coffset is added", kind="text",
         unit="mm", sets="setup.panels (panel z)", write="carry", metavar="VALUE[mm|m]"),
    # ---- crystal
    Flag("-cell", "crystal", "unit cell a b c (Å) alpha beta gamma (deg); missing b, c default to a, angles to 90",
         kind="cell", unit="Å, deg", within="(0, 1e6]", field="params.crystal.cell", write="crystal",
         metavar="A [B C AL BE GA]"),
    _file("-mat", "crystal", "MOSFLM orientation matrix file (λ-scaled reciprocal vectors; -lambda must match it)",
          aliases=("-matrix",), sets="params.crystal.cell, params.crystal.orientation, setup.nanobragg_cell=False",
          write="crystal"),
    Flag("-misset", "crystal", "crystal misorientation rx ry rz (applied X then Y then Z) or 'random'", kind="misset",
         nargs=3, unit="deg", default_text="0 0 0", field="params.crystal.misset", write="crystal",
         metavar="RX RY RZ|random"),
    Flag("-misset_seed", "crystal", "seed of -misset random", default_text="from the clock",
         sets="params.crystal.misset", write="no", **_SEED),
    _real("-N", "crystal", "unit cells along each axis (continuous values allowed; below 1 means 1)", "cells",
          default=1.0, within=_CELLS, sets="params.crystal.ncells (all three)", write="no"),
    _real("-Na", "crystal", "unit cells along a", "cells", default=1.0, within=_CELLS,
          field="params.crystal.ncells[0]"),
    _real("-Nb", "crystal", "unit cells along b", "cells", default=1.0, within=_CELLS,
          field="params.crystal.ncells[1]"),
    _real("-Nc", "crystal", "unit cells along c", "cells", default=1.0, within=_CELLS,
          field="params.crystal.ncells[2]"),
    _real("-xtalsize", "crystal", "crystal edge along a, b, c (0: use N)", "mm", default=0.0, within="[0, 1e3]",
          aliases=("-xtal_size", "-samplesize", "-sample_size"), sets=_SIZE, write="no"),
    _real("-xtal_thick", "crystal", "crystal size along a", "mm", within="[0, 1e3]",
          aliases=("-xtal_x", "-sample_thick", "-sample_x"), sets=_SIZE, write="no"),
    _real("-xtal_width", "crystal", "crystal size along b, clipped to -beamsize", "mm", within="[0, 1e3]",
          aliases=("-xtal_y", "-sample_width", "-sample_y", "-width"), sets=_SIZE, write="no"),
    _real("-xtal_height", "crystal", "crystal size along c, clipped to -beamsize", "mm", within="[0, 1e3]",
          aliases=("-xtal_z", "-sample_height", "-sample_z", "-height", "-xtal_heigh", "-sample_heigh", "-heigh"),
          sets=_SIZE, write="no"),
    _switch("-square_xtal", "crystal", "parallelepiped crystal: sincg lattice factor",
            switch=("shape", "square"), field="setup.shape"),
    _switch("-round_xtal", "crystal", "ellipsoidal crystal: sinc3 lattice factor", switch=("shape", "round"),
            field="setup.shape"),
    _switch("-gauss_xtal", "crystal", "Gaussian spots", switch=("shape", "gauss"), field="setup.shape"),
    _switch("-tophat_spots", "crystal", "flat-top spots", aliases=("-binary_spots",), switch=("shape", "tophat"),
            field="setup.shape"),
    _real("-fudge", "crystal", "scale of the spot radius² for round/gauss/tophat", default=1.0, within="(0, 1e6]",
          field="setup.fudge"),
    _real("-density", "crystal", "sample density", "g/cm³", aliases=("-sample_density",), **_NONE),
    _real("-MW", "crystal", "molecular weight", "Da", aliases=("-molecules", "-molecular_weight"), **_NONE),
    # ---- structure factors
    _file("-hkl", "structure", "structure factors: a text file of h k l F (no symmetry expansion), or a merged MTZ "
          "file (told apart by its first bytes; expanded to P1 from its space group; needs gemmi, nbtorch[io])",
          field="params.structure.F", sets="setup.hkl_min", write="carry"),
    Flag("-mtz_column", "structure", "MTZ column label: an amplitude (F), an intensity (J, converted to "
         "sqrt(max(I, 0))) or one of an anomalous pair (G, K); only with -hkl FILE.mtz", kind="text",
         default_text="the first amplitude column (type F), else the first anomalous pair (G)",
         sets="params.structure.F (which MTZ column)", write="carry", metavar="LABEL"),
    Flag("-mtz_anomalous", "structure", "anomalous pairs of an MTZ: averaged, or kept apart (F(+) at h, F(-) at -h); "
         "only with -hkl FILE.mtz", kind="choice", choices=("average", "separate"), default="average",
         sets="params.structure.F (Friedel mates)", write="carry", metavar="average|separate"),
    _file("-pdb", "structure", "PDB or mmCIF model: |F| to the resolution of the detector corners (X-ray form "
          "factors, first model, no bulk solvent), expanded to P1; gives the cell when neither -cell nor -mat is "
          "given, else must agree with it; not with -hkl (needs gemmi, nbtorch[io])",
          field="params.structure.F", sets="setup.hkl_min, params.crystal.cell", write="carry"),
    _real("-pdb_bfactor", "structure", "isotropic B given to every atom of the -pdb model (anisotropic B removed)",
          "Å²", default_text="the model's own B", within="[0, 1e4]", sets="params.structure.F", write="carry"),
    _real("-default_F", "structure", "amplitude of every reflection not in -hkl or -pdb", default=0.0,
          within="[0, 1e10]",
          field="params.structure.default_F"),
    _file("-dump", "structure", "name of nanoBragg's F cache (nbtorch never reads or writes a cache)", **_NONE),
    _switch("-interpolate", "structure", "tricubic interpolation of F between lattice points",
            default_text="on when any N <= 2 and -hkl is given", switch=("interpolate", True),
            field="setup.interpolate", write="interpolate"),
    _switch("-nointerpolate", "structure", "nearest-lattice-point F (turns automatic interpolation off)",
            switch=("interpolate", False), field="setup.interpolate", write="interpolate"),
    _file("-stol", "structure", "amorphous F(stol) table (read but unused, as in nanoBragg)", **_NONE),
    _file("-4stol", "structure", "amorphous F(4stol) table", **_NONE),
    _file("-Q", "structure", "amorphous F(Q) table", **_NONE),
    _file("-stolout", "structure", "output stol file", **_NONE),
    _real("-dmin", "structure", "skip scattering beyond this resolution (0 = off)", "Å", default=0.0,
          within="[0, 1e6]", field="setup.dmin"),
    # ---- mosaic and spindle
    _real("-mosaic", "mosaic", "isotropic mosaic spread (cap radius of the domain rotation angles)", "deg",
          default=0.0, within="[0, 90]", aliases=("-mosaic_spread", "-mosaicity"),
          field="params.crystal.mosaic_spread", write="mosaic"),
    _count("-mosaic_domains", "mosaic", "number of mosaic domains", default_text="10 when -mosaic > 0, else 1",
           within="[1, inf)", aliases=("-mosaic_dom",), sets="setup.mosaic_axes, setup.mosaic_fractions",
           write="mosaic"),
    Flag("-mosaic_seed", "mosaic", "seed of the mosaic domain generator", default=DEFAULT_MOSAIC_SEED,
         sets="setup.mosaic_axes, setup.mosaic_fractions", write="mosaic", **_SEED),
    _real("-phi", "mosaic", "spindle start angle", "deg", default=0.0, field="setup.phi0", header=("PHI", "OSC_START"),
          write="phi"),
    _real("-osc", "mosaic", "oscillation range (alone: 2 steps of osc/2)", "deg", default_text="0",
          header=("OSC_RANGE",), sets="setup.phistep, setup.phisteps", write="phi"),
    _real("-phistep", "mosaic", "spindle step", "deg", default_text="osc/phisteps", field="setup.phistep",
          write="phi"),
    _count("-phisteps", "mosaic", "number of spindle samples (alone it implies -osc 1)", default_text="1",
           within="[0, 1e6]", field="setup.phisteps", write="phi"),
    _vector("-spindle_axis", "mosaic", "spindle rotation axis x y z", "setup.spindle"),
    # ---- beam
    _real("-lambda", "beam", "wavelength", "Å", default=1.0, within="(0, 1e4]", aliases=("-wavelength", "-wave"),
          field="params.beam.wavelength", header=("WAVELENGTH",)),
    _real("-energy", "beam", "photon energy: lambda = 12398.42/E", "eV", within="(0, 1e9]",
          sets="params.beam.wavelength", write="no"),
    _real("-dispersion", "beam", "spectral full width: wavelength factors 1 ± dispersion/2", "%", default=0.0,
          within="[0, 200)", **_SOURCES),
    _count("-dispsteps", "beam", "number of wavelengths", default_text="2 with -dispersion", within="[0, 1e6]",
           **_SOURCES),
    _real("-divergence", "beam", "horizontal and vertical divergence full range", "mrad", default_text="0",
          within="[0, 1e4]",
          **_SOURCES),
    _real("-hdivrange", "beam", "horizontal divergence range", "mrad", default_text="-divergence; 1 rad with "
          "only a count (Q9)", within="[0, 1e4]", **_SOURCES),
    _real("-vdivrange", "beam", "vertical divergence range", "mrad", default_text="-divergence; 1 rad with "
          "only a count (Q9)", within="[0, 1e4]", **_SOURCES),
    _real("-hdivstep", "beam", "horizontal divergence step", "mrad", default_text="range/(steps-1)",
          within="[0, 1e4]", **_SOURCES),
    _real("-vdivstep", "beam", "vertical divergence step", "mrad", default_text="range/(steps-1)",
          within="[0, 1e4]", **_SOURCES),
    _count("-hdivsteps", "beam", "horizontal divergence points", within="[0, 1e6]", **_SOURCES),
    _count("-vdivsteps", "beam", "vertical divergence points", within="[0, 1e6]", **_SOURCES),
    _count("-divsteps", "beam", "divergence points in both directions", within="[0, 1e6]", **_SOURCES),
    _switch("-round_div", "beam", "keep divergence points inside an ellipse", switch=("round_div", True),
            **_SOURCES),
    _switch("-square_div", "beam", "keep the full divergence grid", switch=("round_div", False), **_SOURCES),
    _file("-sourcefile", "beam", "file of sources: X Y Z (position, any length) I (ignored) lambda (m)",
          **_SOURCES),
    _file("-spectrum", "beam", "beam spectrum: a diffBragg .lam file (a header row, then 'wavelength,weight' "
          "lines, Å); one source per channel (× each divergence direction), the image the weighted mean over the "
          "channels, lambda0 the weighted mean wavelength; not with -lambda/-energy, -dispersion/-dispsteps or "
          "-sourcefile", default_text="one wavelength (-lambda)",
          sets="setup.sources, setup.source_weights, params.beam.wavelength", write="carry"),
    _count("-spectrum_bins", "beam", "rebin the -spectrum to at most this many channels (equal-width wavelength "
           "bins; total weight and weighted mean wavelength kept); needs -spectrum", default_text="every channel",
           within="[1, 1e6]", sets="setup.sources, setup.source_weights", write="carry"),
    _real("-polar", "beam", "Kahn polarization factor (0 = unpolarized)", default=0.0, within="[-1, 1]",
          field="params.beam.polarization"),
    _switch("-nopolar", "beam", "polarization factor = 1", field="setup.nopolar"),
    _vector("-polar_vector", "beam", "E-vector direction x y z", "setup.polar_axis"),
    _vector("-beam_vector", "beam", "beam direction x y z", "setup.beam"),
    _real("-fluence", "beam", "incident fluence", "photons/m²", default=DEFAULT_FLUENCE, within="[0, 1e40]",
          field="params.beam.fluence"),
    _real("-flux", "beam", "incident flux; with -exposure and -beamsize sets the fluence", "photons/s", default=0.0,
          within="[0, 1e30]", sets="params.beam.fluence (flux·exposure/beamsize²)", write="no"),
    _real("-exposure", "beam", "exposure time", "s", default=1.0, within="[0, 1e9]", sets="params.beam.fluence",
          write="no"),
    _real("-beamsize", "beam", "square beam edge; also clips the crystal's b and c sizes", "mm", default=0.1,
          within="(0, 1e3]", sets="params.beam.fluence, params.crystal.ncells", write="no"),
    _switch("-coherent", "beam", "coherent sum", **_NONE),
    # ---- detector
    _real("-distance", "detector", "sample to detector distance along the beam", "mm", default=100.0,
          within="(0, 1e7]", field="params.detector.distance", header=("DISTANCE",), pivot="beam", write="distance"),
    _real("-close_distance", "detector", "perpendicular sample to detector-plane distance", "mm", within="(0, 1e7]",
          field="params.detector.distance", sets="setup.distance_is_close", header=("CLOSE_DISTANCE",),
          pivot="sample", write="distance"),
    _real("-pixel", "detector", "pixel size", "mm", default=0.1, within="(0, 1e3]", field="setup.pixel_size",
          header=("PIXEL_SIZE",)),
    _count("-detpixels", "detector", "pixels along fast and slow", default_text="detsize/pixel", within="[1, 1e6]",
           sets="setup.fpixels, setup.spixels", write="no"),
    _count("-detpixels_f", "detector", "pixels along the fast axis", default_text="-detpixels", within="[1, 1e6]",
           aliases=("-detpixels_x",), field="setup.fpixels", header=("SIZE1",)),
    _count("-detpixels_s", "detector", "pixels along the slow axis", default_text="-detpixels", within="[1, 1e6]",
           aliases=("-detpixels_y",), field="setup.spixels", header=("SIZE2",)),
    _real("-detsize", "detector", "detector edge", "mm", default=102.4, within="(0, 1e5]",
          sets="setup.fpixels, setup.spixels (size/pixel)", write="no"),
    _real("-detsize_f", "detector", "detector size along fast", "mm", default_text="-detsize", within="(0, 1e5]",
          aliases=("-detsize_x",), sets="setup.fpixels", write="no"),
    _real("-detsize_s", "detector", "detector size along slow", "mm", default_text="-detsize", within="(0, 1e5]",
          aliases=("-detsize_y",), sets="setup.spixels", write="no"),
    _real("-Xbeam", "detector", "direct-beam position X (MOSFLM/DENZO: along slow; ADXV, CUSTOM: along fast; "
          "XDS/DIALS: header only)", "mm", default_text="per convention (MOSFLM: (detsize_s+pixel)/2)",
          field="params.detector.beam_center[0]", header=("BEAM_CENTER_X",), pivot="beam", write="beam_center"),
    _real("-Ybeam", "detector", "direct-beam position Y (the other axis)", "mm",
          default_text="per convention (MOSFLM: (detsize_f+pixel)/2)", field="params.detector.beam_center[1]",
          header=("BEAM_CENTER_Y",), pivot="beam", write="beam_center"),
    _real("-Xclose", "detector", "near-point X: the default of -Xbeam in XDS, DIALS and CUSTOM", "mm",
          default_text="detector centre", sets="params.detector.beam_center", pivot="sample", write="no"),
    _real("-Yclose", "detector", "near-point Y: the default of -Ybeam in XDS, DIALS and CUSTOM", "mm",
          default_text="detector centre", sets="params.detector.beam_center", pivot="sample", write="no"),
    _real("-ORGX", "detector", "XDS/DIALS near point along fast (1-based pixels; held as (ORGX−½)·pixel mm)",
          "px",
          default_text="detector centre", field="params.detector.beam_center[0]", header=("XDS_ORGX",),
          pivot="sample", write="beam_center"),
    _real("-ORGY", "detector", "XDS/DIALS near point along slow (1-based pixels; held as (ORGY−½)·pixel mm)",
          "px",
          default_text="detector centre", field="params.detector.beam_center[1]", header=("XDS_ORGY",),
          pivot="sample", write="beam_center"),
    _switch("-mosflm", "detector", "MOSFLM convention", switch=("convention", "MOSFLM"),
            field="setup.convention", write="convention"),
    _switch("-xds", "detector", "XDS convention", switch=("convention", "XDS"), field="setup.convention",
            write="convention"),
    _switch("-adxv", "detector", "ADXV convention", switch=("convention", "ADXV"), field="setup.convention",
            write="convention"),
    _switch("-denzo", "detector", "DENZO convention", switch=("convention", "DENZO"), field="setup.convention",
            write="convention"),
    _switch("-dials", "detector", "DIALS convention", switch=("convention", "DIALS"), field="setup.convention",
            write="convention"),
    _vector("-fdet_vector", "detector", "fast axis x y z", "setup.fdet"),
    _vector("-sdet_vector", "detector", "slow axis x y z", "setup.sdet"),
    _vector("-odet_vector", "detector", "detector normal x y z (not of length 1: fast × slow)", "setup.odet"),
    _vector("-twotheta_axis", "detector", "two-theta axis x y z", "setup.twotheta_axis"),
    _vector("-pix0_vector", "detector", "accepted; recomputed from the geometry as in nanoBragg", "", write="no"),
    _real("-detector_rotx", "detector", "detector rotation about x", "deg", default=0.0,
          field="params.detector.rotation[0]"),
    _real("-detector_roty", "detector", "detector rotation about y", "deg", default=0.0,
          field="params.detector.rotation[1]"),
    _real("-detector_rotz", "detector", "detector rotation about z", "deg", default=0.0,
          field="params.detector.rotation[2]"),
    _real("-twotheta", "detector", "detector two-theta swing about the two-theta axis", "deg", default=0.0,
          field="params.detector.twotheta", pivot="sample"),
    Flag("-pivot", "detector", "detector rotation pivot (CUSTOM convention only)", kind="choice",
         choices=("beam", "sample"), default_text="the last pivot-selecting flag, else beam", field="setup.pivot",
         pivot="value", write="pivot", metavar="beam|sample"),
    _switch("-curved_det", "detector", "spherical detector: every pixel at -distance", field="setup.curved_det"),
    _switch("-point_pixel", "detector", "solid angle 1/R² (no pixel area, no obliquity)", field="setup.point_pixel"),
    _real("-detector_thick", "detector", "sensor thickness", "µm", default=0.0, within="[0, 1e6]",
          field="setup.thickness_um", write="sensor"),
    _real("-detector_abs", "detector", "sensor attenuation length (0 or inf: no absorption and no thickness, Q22)",
          "µm", default_text="-detector_thick", within="[0, inf]", aliases=("-detector_absorb",
          "-detector_absorption"), field="setup.mu_per_um", sets="setup.mu_per_um = 1/length", write="sensor"),
    _count("-detector_thicksteps", "detector", "sensor layers", default_text="2 when -detector_thick > 0",
           within="[0, 1e4]", aliases=("-thicksteps",), field="setup.thicksteps", write="sensor"),
    _count("-oversample", "detector", "sub-pixels per pixel edge",
           default_text="ceil(3·max(N·cell)/(lambda·distance/pixel))", within="[1, 64]", field="setup.oversample"),
    _switch("-oversample_thick", "detector", "capture fraction per sub-pixel (nanoBragg running-sum behaviour)",
            field="setup.oversample_thick"),
    _switch("-oversample_polar", "detector", "polarization per sub-pixel and source (running-sum behaviour)",
            field="setup.oversample_polar"),
    _switch("-oversample_omega", "detector", "solid angle per sub-pixel (running-sum behaviour)",
            field="setup.oversample_omega"),
    Flag("-roi", "detector", "render only fast xmin..xmax, slow ymin..ymax (0-based, inclusive)", kind="pixels",
         nargs=4, unit="px", default_text="whole detector", field="setup.roi", metavar="XMIN XMAX YMIN YMAX"),
    _file("-mask", "detector", "SMV mask image: pixels == 0 are skipped; its header initialises the detector",
          field="setup.mask", write="carry"),
    _file("-img", "detector", "SMV image whose header initialises the detector", write="no"),
    # ---- background
    _real("-water", "background", "edge of a cube of water in the beam", "µm", default=0.0, within="[0, 1e6]",
          field="params.background.water_size"),
    # ---- detector response (noisify's flags and meanings; nanoBragg has none of them)
    Flag("-psf", "response", "point-spread function of the detector: every output image (float, int, PGM, noise, "
         "NeXus) is made from the blurred photons, each panel blurred on its own (photons spread off a panel or "
         "outside the -roi are lost): a 2-D Gaussian, or the fibre-optic taper's g/(2π(g² + r²)^(3/2)) with "
         "g = 0.652383·FWHM, integrated over each pixel", kind="choice", choices=PSF_KINDS,
         default_text="no blur (as nanoBragg)", field="cli.psf", write="no",
         metavar="gauss|fiber"),
    _real("-psf_fwhm", "response", "full width at half maximum of the -psf profile (needs -psf)", "µm", default=46.0,
          within="(0, 1e5]", field="cli.psf_fwhm", write="no"),
    _count("-psf_radius", "response", "half-width of the -psf kernel (2·radius + 1 pixels a side; needs -psf)",
           unit="px", default_text="automatic: < 0.1 % of a pixel's photons beyond the kernel", within="[0, 1000]",
           field="cli.psf_radius", write="no"),
    _real("-gain", "response", "detector gain of the noise image (the noise image's GAIN header item)",
          "ADU/photon", default=1.0, within="(0, 65535]", field="cli.gain", write="no"),
    _real("-readout_noise", "response", "σ of the Gaussian read-out noise added to each noise-image pixel", "ADU",
          default=0.0, within="[0, 65535]", field="cli.readout_noise", write="no"),
    _real("-flicker", "response", "fractional σ of the source intensity, one draw per noise image (from -seed)",
          default=0.0, within="[0, 1)", field="cli.flicker", write="no"),
    _real("-calibration", "response", "fractional σ of each pixel's static gain error in the noise image "
          "(the same for every image of one -calib_seed)", default=0.0, within="[0, 1)", field="cli.calibration",
          write="no"),
    Flag("-calib_seed", "response", "seed of the -calibration error map", default=DEFAULT_CALIB_SEED,
         field="cli.calib_seed", write="no", **_SEED),
    # ---- noise and output
    _file("-floatfile", "output", "raw float32 output image", default="floatimage.bin", aliases=("-floatimage",),
          field="cli.floatfile", write="no"),
    _file("-intfile", "output", "SMV noiseless output", default="intimage.img", aliases=("-intimage",),
          field="cli.intfile", write="no"),
    _file("-noisefile", "output", "SMV Poisson-noise output (turns -nonoise off)", default="noiseimage.img",
          aliases=("-noiseimage",), field="cli.noisefile", switch=("noise", True), write="no"),
    _file("-pgmfile", "output", "8-bit PGM preview (turns -nopgm off)", default="image.pgm", aliases=("-pgmimage",),
          field="cli.pgmfile", switch=("pgm", True), write="no"),
    _file("-nexusfile", "output", "NeXus/HDF5 NXmx file: the float image (photons/pixel, as -floatfile) with its "
          "geometry, readable by DIALS (flat detectors only; -geom/-expt: one module per panel; needs h5py, "
          "nbtorch[io])", default_text="not written",
          field="cli.nexusfile", write="no"),
    _real("-scale", "output", "intfile counts per photon (0: automatic)", default_text="55000/max",
          within="[0, 1e30]", field="cli.scale", write="no"),
    _real("-pgmscale", "output", "PGM grey levels per photon (0: automatic)", default_text="250/(5·rmsd)",
          within="[0, 1e30]", field="cli.pgmscale", write="no"),
    _real("-adc", "output", "ADC offset of int and noise images", "counts", default=40.0, within="[0, 65535]",
          field="cli.adc", write="no"),
    Flag("-seed", "output", "noise seed", default_text="from the clock", field="cli.seed", write="no", **_SEED),
    _switch("-nonoise", "output", "do not write the noise image", switch=("noise", False), write="no"),
    _switch("-nopgm", "output", "do not write the PGM image", switch=("pgm", False), write="no"),
    _switch("-printout", "output", "print per-pixel diagnostics", field="cli.printout", write="no"),
    Flag("-printout_pixel", "output", "print diagnostics of one pixel (fast, slow; 0-based)", kind="pixels", nargs=2,
         unit="px", field="cli.printout_pixel", write="no", metavar="F S"),
    _switch("-noprogress", "output", "no progress bar", switch=("progress", False), write="no"),
    _switch("-progress", "output", "show a progress bar", switch=("progress", True), write="no"),
)

#: The flags whose values the detector file of ``-geom``/``-expt`` gives (its panels' size, place, orientation, mask
#: and the beam's direction): refused with either file (``-beam_vector`` only when not along the file's beam).
_REPLACED_BY_FILE = (
    "-distance", "-close_distance", "-pixel", "-detpixels", "-detpixels_f", "-detpixels_s", "-detsize", "-detsize_f",
    "-detsize_s", "-Xbeam", "-Ybeam", "-Xclose", "-Yclose", "-ORGX", "-ORGY", "-mosflm", "-xds", "-adxv", "-denzo",
    "-dials", "-fdet_vector", "-sdet_vector", "-odet_vector", "-twotheta_axis", "-pix0_vector", "-detector_rotx",
    "-detector_roty", "-detector_rotz", "-twotheta", "-pivot", "-curved_det", "-roi", "-mask", "-img", "-beam_vector",
)
_TABLE = tuple(dataclasses.replace(f, replaced=True) if f.name in _REPLACED_BY_FILE else f for f in _TABLE)

#: Canonical flag name → :class:`Flag`, in table (help) order.
FLAGS: Dict[str, Flag] = {f.name: f for f in _TABLE}
#: Alias → canonical flag name.
ALIASES: Dict[str, str] = {a: f.name for f in _TABLE for a in f.aliases}


def switch_states(group: str) -> Dict[str, object]:
    """``{flag name: state}`` of the order-dependent switch ``group`` (e.g. 'shape', 'convention')."""
    return {f.name: f.switch[1] for f in _TABLE if f.switch is not None and f.switch[0] == group}


def flags_in_section(section: str) -> Tuple[Flag, ...]:
    """The flags of one :data:`SECTIONS` key, in table order."""
    return tuple(f for f in _TABLE if f.section == section)


def _check_table() -> None:
    """Internal consistency of the table (run at import: a malformed entry fails loudly, not at parse time)."""
    names = [f.name for f in _TABLE] + list(ALIASES)
    if len(names) != len(set(names)):
        raise AssertionError("a flag name or alias appears twice in the flag table")
    if set(_REPLACED_BY_FILE) - set(FLAGS):
        raise AssertionError(f"_REPLACED_BY_FILE names unknown flags {sorted(set(_REPLACED_BY_FILE) - set(FLAGS))}")
    for f in _TABLE:
        if f.section not in SECTIONS or f.kind not in KINDS:
            raise AssertionError(f"{f.name}: unknown section {f.section!r} or kind {f.kind!r}")
        if f.within:
            Interval(f.within).bounds()
        if f.replaced and f.section not in ("detector", "beam"):
            raise AssertionError(f"{f.name}: only detector and beam flags can be replaced by a detector file")
        if f.switch is not None and f.switch[0] not in SWITCH_DEFAULTS:
            raise AssertionError(f"{f.name}: switch group {f.switch[0]!r} has no entry in SWITCH_DEFAULTS")


_check_table()
