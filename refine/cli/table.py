"""The option table of the refine programs: every ``--`` option of ``nbtorch-refine`` (one image), of its
``--images`` modes (joint, independent) and of ``nbtorch-sweep``, each described once (:class:`Option`; defaults from
the ``FitOptions``/``StudySpec`` fields they set, choice lists from the modules that define them).  From it: each
command's parser, ``--help``, split of the command line and checks (:func:`start`), the arguments of a fit or a study
(:func:`arguments`), library messages with flags for Python names (:func:`flag_message`) and docs/refine.md's option
list (:func:`options_markdown`; ``python -m refine.cli.table --update docs/refine.md``, or ``--check``).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
from typing import List, Optional, Sequence, Tuple

import torch

from nbtorch.interrupt import one_line_warnings
from nbtorch.io._atomic import atomic_write

from ..minimise.optim import SCHEDULES
from ..model.cells import CRYSTAL_SYSTEMS
from ..model.parameters import NCELLS_MODES
from ..model.table import SEARCH_UNITS
from ..pipeline.options import DEFAULT_MAX_ITER, METHODS, FitOptions
from ..pipeline.report import ESD_SCALES
from ..studies import PRUNERS, SAMPLERS, StudySpec
from ..targets import TARGETS
from .checks import OneLineParser, UsageError, free_groups

#: The programs and modes, as the docs name them.
PROGRAMS = {"refine": "nbtorch-refine", "joint": "--images (joint)", "independent": "--images --independent",
            "ensemble": "--images --refine-f", "sweep": "nbtorch-sweep"}
#: A command line's parser → the programs whose options it accepts.
COMMANDS = {"refine": ("refine",), "images": ("joint", "independent", "ensemble"), "sweep": ("sweep",)}
#: Commands whose first bare word, before any nanoBragg flag, is OBSERVED.
OBSERVED_FIRST = ("refine", "sweep")
#: Field defaults of the dataclasses options set: owner ('' FitOptions, 'StudySpec') → {field: default}.
_DEFAULTS = {owner: {f.name: f.default for f in dataclasses.fields(cls)}
             for owner, cls in (("", FitOptions), ("StudySpec", StudySpec))}
_ALL, _FITS, _IMAGES = ("refine", "joint", "independent", "ensemble", "sweep"), \
    ("refine", "joint", "independent", "ensemble"), ("joint", "independent", "ensemble")
_DASK = ("independent", "ensemble")
DOCS_BEGIN = ("<!-- BEGIN OPTION TABLE: generated from refine/cli/table.py by `python -m refine.cli.table --update "
              "docs/refine.md`; do not edit -->")
DOCS_END = "<!-- END OPTION TABLE -->"
#: The figures ``nbtorch-sweep --plots DIR`` writes (surface.png only with two or more searched parameters).
PLOT_NAMES = ("history.png", "importances.png", "surface.png")


@dataclasses.dataclass(frozen=True)
class Option:
    """One ``--`` option.  flag: its spelling.  programs: the :data:`PROGRAMS` that accept it.  help: what it does
    (the default is added).  kind: 'text', 'groups' (comma-separated groups to refine), 'int', 'real', 'choice' or
    'switch' (no value).  nargs: its values.  field: what it sets, a ``FitOptions`` field (``max_iter``) or
    ``StudySpec.<field>``, whose default it takes; name: the Python argument library messages call it when it has
    no field.  choices: of a 'choice'.  const: a switch's field value when given (absent: ``not const``).
    default, default_text: when no field supplies the default, or when it is a rule.  low: the least value of an 'int'
    (>= low) or of a 'real' (finite, > low).  required, metavar: as argparse's."""

    flag: str
    programs: Tuple[str, ...]
    help: str
    kind: str = "text"
    nargs: int = 1
    field: str = ""
    name: str = ""
    choices: Tuple[str, ...] = ()
    const: object = True
    default: object = None
    default_text: str = ""
    low: Optional[float] = None
    required: bool = False
    metavar: object = None

    @property
    def dest(self) -> str:
        """The attribute of the parsed options."""
        return self.flag[2:].replace("-", "_")

    @property
    def default_value(self):
        """The default value: its field's, else ``default``."""
        owner, _, name = self.field.rpartition(".")
        return _DEFAULTS[owner][name] if self.field else self.default

    @property
    def parser_default(self):
        """What the parsed options hold when the option is not given."""
        return False if self.kind == "switch" else None if self.kind == "groups" else self.default_value

    def default_shown(self) -> str:
        """The default as ``--help`` and the docs show it ('' when none)."""
        value = self.default_value
        shown = "" if value is None or value == "" or self.kind == "switch" else ",".join(value) if isinstance(
            value, tuple) else f"{value:g}" if isinstance(value, float) else str(value)
        return self.default_text.format(shown) if self.default_text else shown

    @property
    def meta(self):
        """The value placeholder(s) of help and docs (a choice's words joined by '|', an integer's N)."""
        return self.metavar or "|".join(self.choices) or ("N" if self.kind == "int" else self.dest.upper())

    def usage(self) -> str:
        """The flag and its values, e.g. ``--background C0 CFAST CSLOW``."""
        meta = () if self.kind == "switch" else self.meta if isinstance(self.meta, tuple) else (self.meta,)
        return " ".join((self.flag,) + meta)

    def add_to(self, ap: argparse.ArgumentParser, programs: Sequence[str]) -> None:
        """Add the option to ``ap``, a parser of ``programs`` (the help of one mode's own option says so)."""
        mode = [p for p in self.programs if p in programs]
        text = ((f"{mode[0]}: " if len(programs) > len(mode) == 1 else "") + self.help + (
            f" (default {self.default_shown()})" if self.default_shown() else "")).replace("%", "%%")
        if self.kind == "switch":
            return ap.add_argument(self.flag, action="store_true", help=text)
        ap.add_argument(self.flag, help=text, type={"int": int, "real": float}.get(self.kind, str),
                        default=self.parser_default, required=self.required, choices=self.choices or None,
                        nargs=self.nargs if self.nargs > 1 else None, metavar=None if self.choices else self.meta)


def _switch(flag: str, programs, help: str, **kw) -> Option:
    return Option(flag, programs, help, kind="switch", nargs=0, **kw)


def _choice(flag: str, programs, help: str, choices, **kw) -> Option:
    return Option(flag, programs, help, kind="choice", choices=tuple(choices), **kw)


#: Every option, in help order.
OPTIONS: Tuple[Option, ...] = (
    Option("--images", _IMAGES, "LIST file: one line per image, its path and the nanoBragg flags of its starting "
           "model (give --images or --expt-list)", metavar="LIST"),
    Option("--expt-list", _IMAGES, "LIST file of DIALS stills: one line per experiment list, EXPT [REFL] [SPECTRUM] "
           "(paths relative to the LIST; every experiment of EXPT is a shot: its model as --expt builds it, then the "
           "nanoBragg flags, then -spectrum SPECTRUM; its observed image its imageset's)", name="expt_list",
           metavar="LIST"),
    Option("--out-dir", _IMAGES, "with --expt-list: write each shot's refined experiment list here as "
           "<EXPT stem>_line<N>[_exp<K>]_refined.expt (made when missing)", name="out_dir", metavar="DIR",
           default_text="--results', --json's or --out-mtz's stem + _refined"),
    _switch("--independent", ("independent",), "refine each image on its own, in parallel on Dask"),
    Option("--shared", ("joint",), "groups with one value for all images (e.g. distance,beam_center,"
           "detector_rotation.y,detector_rotation.z)", default="", metavar="GROUPS"),
    Option("--per-image", ("joint", "ensemble"), "groups with one value per image (e.g. orientation,scale)",
           default="", metavar="GROUPS", default_text="--refine-f: scale"),
    Option("--refine", ("refine", "independent", "sweep"), "groups to refine, comma-separated (also sub-groups such "
           "as background.plane, scalars such as cell.a and, for a -geom/-expt detector, panel_groups, "
           "panel_groups.LEVEL, panel_group:NAME)", kind="groups", field="free", metavar="GROUPS",
           default_text="{} for one image; nbtorch-sweep: the searched groups and scale; --independent: required"),
    _choice("--method", ("refine", "sweep"), "minimiser", METHODS, field="method"),
    Option("--max-iter", _ALL, "iterations of the final stage (nbtorch-sweep: of the best model's refinement)",
           kind="int", field="max_iter", low=0,
           default_text=", ".join(f"{n} {m}" for m, n in DEFAULT_MAX_ITER.items())),
    Option("--json", ("refine", "joint", "sweep"), "write the result as JSON here (nbtorch-sweep: the best refined "
           "model and the study summary)", metavar="OUT"),
    Option("--image", ("refine",), "write the refined model image here (.png/.pdf/.svg: a plot of observed/model/"
           "residual and the loss; .img/.smv: SMV float; else raw float32)", metavar="OUT"),
    _choice("--target", _ALL, "fit target", TARGETS, field="target"),
    Option("--read-noise", _FITS, "read noise σ (photons) of the gaussian target", kind="real", field="read_noise",
           metavar="SIGMA"),
    Option("--readout-noise-adu", _FITS, "read-out noise σ_r (ADU) of the gaussian target (the Gaussian–Poisson "
           "likelihood, variance gain·model + σ_r² in ADU); replaces --read-noise by σ_r/gain photons per pixel",
           kind="real", field="readout_noise_adu", metavar="SIGMA_ADU"),
    _choice("--crystal-system", _FITS, "constrain the cell (auto: the highest symmetry the starting cell satisfies "
            "within 0.1% and 0.1 deg)", ("auto",) + tuple(CRYSTAL_SYSTEMS), field="crystal_system"),
    _switch("--allow-degenerate", _ALL, "refine free parameters the images cannot tell apart (a detector rotation "
            "about the beam with the crystal's; two-theta with the detector rotation about its axis under a beam "
            "pivot); refused otherwise", field="allow_degenerate"),
    _choice("--ncells-mode", _FITS, "unit cells per axis: one value or three", NCELLS_MODES, field="ncells_mode"),
    _switch("--no-coarse", _FITS, "skip the coarse-to-fine stages", field="coarse_to_fine", const=False),
    Option("--coarse-iter", _FITS, "iterations of each broadened stage", kind="int", field="coarse_iter"),
    Option("--max-shift", ("refine",), "beam-centre translation search radius", kind="int", field="max_shift",
           metavar="PIXELS"),
    _switch("--spots-only", ("refine",), "fit only pixels near spots plus a background sample", field="spots_only"),
    Option("--overload", _FITS, "exclude pixels at or above this value (in the file's counts: the detector's "
           "saturation, max ADU)", kind="real", metavar="COUNTS", default_text="65535 for 16-bit SMV, the SMV "
           "SATURATED_VALUE, CBF Count_cutoff; also the -geom max_adu and the -expt trusted_range"),
    Option("--adc", _ALL, "ADC offset (counts) subtracted from the observed images", kind="real", name="adc",
           low=-math.inf, metavar="COUNTS", default_text="the header's ADC_OFFSET, which nbtorch writes, else 0"),
    Option("--gain", _ALL, "counts (ADU) per photon of the observed images", kind="real", field="gain", low=0.0,
           metavar="G", default_text="the header's GAIN, else the -geom/-expt file's, else 1"),
    Option("--gain-map", _FITS, "per-pixel gain (ADU per photon) of the observed image: a file of its shape "
           "(raw float32, SMV, CBF, HDF5); a pixel whose gain is not > 0 is left out (--images/--expt-list: one map "
           "for every image, each of the map's shape)", name="gain_map", metavar="FILE"),
    Option("--background", ("refine",), "starting background plane (photons/pixel)", kind="real", nargs=3,
           field="background", metavar=("C0", "CFAST", "CSLOW")),
    Option("--matrix-out", ("refine",), "where to write the refined MOSFLM matrix of a -mat model", metavar="OUT",
           default_text="next to --json, else refined.mat"),
    Option("--plot", ("refine",), "also save the observed/model/residual/loss figure here", metavar="OUT"),
    Option("--expt", ("refine",), "DIALS experiment list (.expt): experiment --experiment K is the starting model "
           "(as -expt FILE builds it; the nanoBragg flags add -default_F/-hkl, -N, -fluence … and override the file) "
           "and, without OBSERVED, its imageset's image is the observed one", metavar="FILE"),
    Option("--experiment", ("refine",), "the experiment of --expt to refine (0-based)", kind="int", low=0,
           metavar="K", default_text="0, the first"),
    Option("--out-expt", ("refine",), "write the refined experiment list here: the --expt file with experiment K's "
           "crystal (real_space_a/b/c), detector (panel and group frames) and wavelength refined, everything else as "
           "read", metavar="OUT.expt"),
    Option("--refl", ("refine",), "DIALS reflection table (.refl) of the --expt experiment: only pixels in square "
           "boxes around its observed spots (xyzobs.px.value, panel) enter the fit, each box with its own refinable "
           "background plane (spot-ROI refinement)", metavar="FILE"),
    Option("--roi-size", _FITS, "side of each spot's box with --refl or an --expt-list line's REFL (pixels; clipped "
           "at panel edges, overlapping boxes merged)", kind="int", field="roi_size", low=1, metavar="PIXELS"),
    Option("--max-spots", _FITS, "with --refl or a REFL, only the N strongest spots (intensity.sum.value)", kind="int",
           field="max_spots", low=1, default_text="every spot"),
    Option("--out-refl", ("refine",), "write a reflection table here: the --refl rows of the experiment with the "
           "refined model's predicted centroids (xyzcal.px, xyzcal.mm), miller_index, panel and id; the input's "
           "columns kept", metavar="OUT.refl"),
    Option("--out-spectrum", ("refine",), "write the refined beam spectrum here as a diffBragg .lam file (one "
           "channel per wavelength, lambda0·f + lam0 Å with its weight); the printed and JSON flags then name it "
           "with -spectrum (without it, a refined spectrum has no flags)", metavar="OUT.lam"),
    Option("--out-geom", ("refine",), "write the refined detector of a -geom model here as a CrystFEL geometry file "
           "(the file's panels, layout, groups and keys; refined corners, vectors and coffsets)", metavar="OUT.geom"),
    _choice("--esd-scale", _FITS, "scale the ESDs by χ²/ν: for least squares only (auto), always (chi2), never "
            "(none)", ESD_SCALES, field="esd_scale"),
    Option("--lr", ("refine",), "Adam learning rate (typical errors per step)", kind="real", field="lr",
           metavar="RATE"),
    _choice("--schedule", ("refine",), "learning-rate schedule of lbfgs/adam", SCHEDULES, field="schedule"),
    Option("--workers", _DASK, "local Dask worker processes", kind="int", name="workers", low=1,
           default_text="one per core"),
    Option("--scheduler", _DASK, "address of a running Dask scheduler (tls://host:8786; an unprotected "
           "tcp:// address is warned about) instead of a local cluster", name="scheduler", metavar="ADDRESS"),
    Option("--tls-ca-file", _DASK, "tls:// scheduler: the CA certificate (PEM) that signed the "
           "scheduler's and workers' certificates", name="ca_file", metavar="CA", default_text="dask's configuration"),
    Option("--tls-cert", _DASK, "tls:// scheduler: this client's certificate (PEM)", name="cert",
           metavar="CERT"),
    Option("--tls-key", _DASK, "tls:// scheduler: this client's private key (PEM; not needed when it is "
           "in --tls-cert)", name="key", metavar="KEY"),
    Option("--results", ("independent",), "JSON-lines file, one line per image (a rerun skips the images already "
           "in it)", metavar="OUT.jsonl"),
    Option("--limit", ("independent",), "stop after this many new images", kind="int"),
    _switch("--refine-f", ("ensemble",), "refine the structure factors of the asymmetric unit jointly with every "
            "shot's --per-image groups (docs/refine.md, Structure factors from many stills)", name="refine_f"),
    Option("--space-group", ("ensemble",), "space group of the |F| (symmetry equivalents share one value)",
           name="space_group", default="P 1", metavar="SG"),
    _switch("--anomalous", ("ensemble",), "F(+) and F(-) apart (else Friedel mates share one |F|)",
            name="anomalous"),
    Option("--f-start", ("ensemble",), "starting |F|: an MTZ or h k l F file (as -hkl FILE), or a PDB/mmCIF model "
           "(as -pdb FILE), for every line", metavar="FILE", default_text="every line's -hkl/-pdb/-default_F"),
    Option("--cycles", ("ensemble",), "outer cycles (per-shot fits, then an F step)", kind="int", name="cycles",
           low=1, default=3),
    Option("--f-iter", ("ensemble",), "L-BFGS iterations of each F step", kind="int", name="f_iter", low=1,
           default=50),
    Option("--restrain-start", ("ensemble",), "weight w of the restraint of each ln|F| towards its start (a prior "
           "of σ = 1/√w; 0: none)", kind="real", name="restrain_start", default=1.0, metavar="W"),
    Option("--restrain-bins", ("ensemble",), "weight of the restraint of each ln|F| towards its resolution bin's "
           "mean starting ln|F|", kind="real", name="restrain_bins", default=0.0, metavar="W"),
    Option("--restrain-friedel", ("ensemble",), "with --anomalous, weight of the restraint of ln|F(+)| − ln|F(−)| "
           "towards 0", kind="real", name="restrain_friedel", default=0.0, metavar="W"),
    Option("--out-mtz", ("ensemble",), "write the refined |F| here (MTZ: H K L F SIGF, F(+)/F(-) with --anomalous)",
           metavar="F.mtz"),
    Option("--out-shots", ("ensemble",), "write each shot's refined model here (JSON lines)", metavar="OUT.jsonl",
           default_text="--out-mtz's stem + _shots.jsonl"),
    Option("--checkpoint", ("ensemble",), "save the state here after every cycle; a rerun resumes from it",
           metavar="DIR"),
    Option("--search", ("sweep",), "half-widths of the box searched about the start (" + ", ".join(
           f"{group} {unit}" for group, unit in SEARCH_UNITS.items()) + ")", name="search", required=True,
           metavar="GROUP:RANGE[,...]"),
    Option("--n-trials", ("sweep",), "trials this command runs (shared by its workers)", kind="int",
           name="n_trials", low=1, required=True),
    Option("--workers", ("sweep",), "processes sharing the storage", kind="int", name="workers", low=1, default=1),
    Option("--storage", ("sweep",), "study storage URL", field="StudySpec.storage", metavar="URL",
           default_text="sqlite:///JSON_STEM.db, else sqlite:///nbtorch-sweep.db"),
    Option("--storage-timeout", ("sweep",), "seconds a PostgreSQL server may take to connect", kind="real",
           field="StudySpec.connect_timeout", metavar="SECONDS"),
    Option("--study-name", ("sweep",), "study name", field="StudySpec.study_name", metavar="NAME"),
    _choice("--sampler", ("sweep",), "sampler (seeded)", SAMPLERS, field="StudySpec.sampler"),
    _choice("--pruner", ("sweep",), "pruner", PRUNERS, field="StudySpec.pruner"),
    Option("--seed", ("sweep",), "sampler seed in [0, 2**32 - workers] (worker k of a new study uses seed + k; "
           "workers joining a study also mix in the host name and trial count)", kind="int", field="StudySpec.seed",
           metavar="SEED"),
    Option("--plots", ("sweep",), f"write {', '.join(PLOT_NAMES)} here", metavar="DIR"),
    Option("--trial-iter", ("sweep",), "minimiser iterations per stage of a trial", kind="int", name="iterations",
           low=1, default=4),
    Option("--prelim-pixels", ("sweep",), "pixels of a trial's preliminary stages", kind="int",
           field="prelim_pixels", low=1),
    Option("--threads", _ALL, "torch CPU threads (per worker with --independent, per process of nbtorch-sweep)",
           kind="int", name="threads"),
    _choice("--dtype", _ALL, "floating-point type of the model and the fit", ("float64", "float32"), default="float64"),
    _switch("--quiet", _ALL, "no progress output"),
)


def options(*programs: str) -> List[Option]:
    """The options accepted by any of ``programs`` (keys of :data:`PROGRAMS`), in table order."""
    return [o for o in OPTIONS if set(o.programs) & set(programs)]


def usage(command: str, *flags: str) -> str:
    """Part of a usage line: each of ``flags`` of a :data:`COMMANDS` key and its values, bracketed when optional."""
    table = {o.flag: o for o in options(*COMMANDS[command])}
    return " ".join(table[f].usage() if table[f].required else f"[{table[f].usage()}]" for f in flags)


def parser(command: str, **kw) -> argparse.ArgumentParser:
    """The parser (and ``--help``) of a :data:`COMMANDS` key; ``kw``: prog, usage, description, epilog.  Errors are
    :class:`~refine.cli.checks.UsageError` (one line)."""
    ap = OneLineParser(formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
    if command in OBSERVED_FIRST:  # nbtorch-refine: optional with --expt (the imageset's image)
        ap.add_argument("observed", nargs="?" if command == "refine" else None, help="observed image (SMV .img, raw "
                        "float .bin with the shape of the flags, CBF, ...)" + ("; default: the --expt experiment's "
                                                                              "image" if command == "refine" else ""))
    for o in options(*COMMANDS[command]):
        o.add_to(ap, COMMANDS[command])
    return ap


def split_argv(argv: Sequence[str], command: str = "refine") -> Tuple[List[str], List[str]]:
    """(our tokens, nanoBragg flags): a ``--`` option or ``-h`` with its values is ours (an unknown one alone, for
    the parser to report); for a command of one image the first bare word before any nanoBragg flag is OBSERVED
    (a flag's value is never taken for it); everything else is a nanoBragg flag."""
    takes = {o.flag: o.nargs for o in options(*COMMANDS[command])}
    ours, flags, observed, i, argv = [], [], command not in OBSERVED_FIRST, 0, list(argv)
    while i < len(argv):
        tok = argv[i]
        n = 0 if "=" in tok else takes.get(tok, 0)
        if tok.startswith("--") or tok == "-h":
            ours.extend(argv[i: i + 1 + n])
            i += n
        elif not observed and not flags and not tok.startswith("-"):
            ours.append(tok)
            observed = True
        else:
            flags.append(tok)
        i += 1
    return ours, flags


def start(argv: Sequence[str], command: str, **kw):
    """(parsed options, nanoBragg flags) of a :data:`COMMANDS` key's command line (``kw``: :func:`parser`'s), checked:
    ``--threads`` >= 1, every option at least its ``low`` and, for a command of one image, the flags given and
    OBSERVED a file (:class:`UsageError` naming the option); then torch's threads set and warnings made one line."""
    ours, flags = split_argv(argv, command)
    ns = parser(command, **kw).parse_args(ours)
    if ns.threads is not None and ns.threads < 1:
        raise UsageError(f"--threads must be an integer >= 1, got {ns.threads}")
    for o in (o for o in options(*COMMANDS[command]) if o.low is not None and getattr(ns, o.dest) is not None):
        value = getattr(ns, o.dest)
        if o.kind == "int" and value < o.low:
            raise UsageError(f"{o.flag} must be an integer >= {o.low}; got {value}")
        if o.kind == "real" and not (math.isfinite(value) and value > o.low):
            raise UsageError(f"{o.flag} must be a finite number{'' if o.low == -math.inf else f' > {o.low:g}'}; "
                             f"got {value}")
    expt = getattr(ns, "expt", None)
    if command in OBSERVED_FIRST and ns.observed is None and expt is None:
        raise UsageError(f"OBSERVED is missing: give the observed image first, before the nanoBragg flags, or --expt "
                         f"FILE ({kw['prog']} OBSERVED [--options] <flags>)")
    if command in OBSERVED_FIRST and not flags and expt is None:
        raise UsageError("give the starting model as nanoBragg flags after OBSERVED (see --help)")
    if command in OBSERVED_FIRST and ns.observed is not None and not os.path.isfile(ns.observed):
        raise UsageError(f"OBSERVED {ns.observed}: no such file")
    if ns.threads:
        torch.set_num_threads(int(ns.threads))
    one_line_warnings(kw["prog"].split()[0])  # e.g. OBSERVED's header against the flags
    return ns, flags


def arguments(ns, program: str, owner: str = "") -> dict:
    """The keyword arguments of ``owner`` ('' :class:`FitOptions`, 'StudySpec') set by ``program``'s options in the
    parsed ``ns``: a switch gives its ``const`` when given, else ``not const``; ``--refine`` its groups when given."""
    out = {}
    for o in options(program):
        own, _, name = o.field.rpartition(".")
        value = getattr(ns, o.dest)
        if o.field and own == owner and not (o.kind == "groups" and value is None):
            out[name] = (o.const if value else not o.const) if o.kind == "switch" else \
                free_groups(value) if o.kind == "groups" else value
    return out


def flag_message(text: str, command: str) -> str:
    """A library message for a command-line user: the Python names of the command's options written as flags —
    ``NAME=VALUE`` anywhere (``allow_degenerate=True`` → ``--allow-degenerate``, ``method='adam'`` → ``--method
    adam``), a name at the start or before ``must`` (``max_iter must be …``, ``search group …``), a name with an
    underscore anywhere; never inside a path or a flag, nor as a flag's value.  A flag then written twice in a row is
    written once."""
    names = {o.field.rpartition(".")[2] or o.name: o for o in options(*COMMANDS[command])}  # as the library says
    names.pop("", None)
    words = "|".join(sorted(map(re.escape, names), key=len, reverse=True))

    def flag(m: re.Match) -> str:
        o, value = names[m[1]], m[2]
        if re.search(r"(^|\s)(-[\w-]+|OBSERVED) $", text[: m.start()]):  # a file name after a flag
            return m[0]
        if value is not None and o.kind == "switch":
            return o.flag if value == repr(o.const) else f"without {o.flag}"
        if value is not None:
            return f"{o.flag} {value.strip(chr(34) + chr(39))}"
        return o.flag if "_" in m[1] or m.start() == 0 or text.startswith(" must ", m.end()) else m[0]

    text_flags = re.sub(rf"(?<![\w./-])({words})(?:=('[^']*'|\"[^\"]*\"|[^\s,;)]+))?(?![\w/-]|\.\w)", flag, text)
    return re.sub(r"(--[\w-]+), \1(?![\w-])", r"\1", text_flags)


def options_markdown() -> str:
    """docs/refine.md's option list: one row per option — flag and values, meaning, default, the ``FitOptions`` or
    ``StudySpec`` field it sets, and a mark per program that accepts it."""
    out = ["| option | meaning | default | sets | " + " | ".join(f"`{p}`" for p in PROGRAMS.values()) + " |",
           "|---" * (4 + len(PROGRAMS)) + "|"]
    for o in OPTIONS:
        sets = f"`{o.field}={o.const!r}`" if o.kind == "switch" else f"`{o.field}`"
        cells = [f"`{o.usage()}`", o.help, o.default_shown(), sets if o.field else "",
                 *("✓" if p in o.programs else "" for p in PROGRAMS)]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out)


def update_docs(path: str, check: bool = False) -> bool:
    """Put :func:`options_markdown` between :data:`DOCS_BEGIN` and :data:`DOCS_END` in ``path`` (ValueError without
    them); True when it was there already (``check``: leave the file as it is)."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    head, sep1, rest = text.partition(DOCS_BEGIN)
    old, sep2, tail = rest.partition(DOCS_END)
    if not (sep1 and sep2):
        raise ValueError(f"{path}: no option table markers {DOCS_BEGIN!r} … {DOCS_END!r}")
    new = "\n\n" + options_markdown() + "\n\n"
    if old != new and not check:
        atomic_write(path, (head + DOCS_BEGIN + new + DOCS_END + tail).encode())
    return old == new


if __name__ == "__main__":  # python -m refine.cli.table [--update FILE | --check FILE]; no argument: print the list
    if len(sys.argv) == 3 and sys.argv[1] in ("--update", "--check"):
        sys.exit(0 if update_docs(sys.argv[2], check=sys.argv[1] == "--check") or sys.argv[1] == "--update" else 1)
    sys.exit(print(options_markdown()) if len(sys.argv) == 1 else "usage: python -m refine.cli.table [--update FILE "
             "| --check FILE]")
