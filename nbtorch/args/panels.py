"""``-geom FILE`` / ``-expt FILE``: a detector of panels from a CrystFEL geometry file or a DIALS experiment list
(docs/cli.md "Detectors of panels").

:func:`check_panel_flags` refuses, before any file is read, a command line that gives both files, a flag the file
replaces (the table's ``replaced`` flags: ``-distance``, ``-Xbeam``, ``-detpixels`` …) or a feature a panel detector
lacks.  :func:`panel_source` reads the file into a :class:`PanelSource` (layout, mask, output layout, crystal) and
merges the values the file supplies into the build's flags:

* ``-geom``: CrystFEL's lab frame, the beam along +z (``-beam_vector 0 0 1``, so the crystal, ``-polar_vector`` and
  ``-spindle_axis`` read as nanoBragg's CUSTOM convention reads them; both vectors default to +x, horizontal in
  CrystFEL's frame); the file's wavelength or photon energy unless ``-lambda``/``-energy``/``-spectrum`` is given.
  A ``clen`` or ``photon_energy`` the file reads from a data file takes ``-clen`` or ``-energy``/``-lambda`` (or the
  ``-spectrum``'s weighted mean).  Masks
  (``no_index``, ``bad…`` regions, masks in their own files) apply; a mask kept in the data file is left out with a
  note (only simulating).
* ``-expt``: experiment ``-expt_experiment`` K (0-based, default the first) of the list
  (:func:`nbtorch.io.dials_experiments.experiment_of`) — its panels and untrusted rectangles, beam (``-beam_vector``
  = −direction, ``-lambda``, ``-polar`` = the Kahn factor 2·polarization_fraction − 1, ``-polar_vector`` ⟂
  polarization_normal and the beam) and crystal (real_space_a/b/c, Å, with a goniometer's S·F applied), in DIALS's
  lab frame.  A rotation (an experiment with a goniometer): ``-spindle_axis`` = S·(scan axis) (the goniometer
  composed as dxtbx does: :mod:`nbtorch.io.dials_experiments`), ``-phi`` and ``-osc`` the scan's oscillation of
  image ``-expt_image`` K (start + K·width and width, degrees; ``-phisteps`` from the flags); a still's
  ``-spindle_axis`` defaults to +x.  A flag given *after* ``-expt`` overrides the file's value; one given before is
  overridden by it (with a note).
"""
from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ..panels import PanelLayout, layout_from_crystfel, without_panel_sensors
from ..units import HC_EV_ANGSTROM
from .parse import NanoBraggArgs, fmt_num
from .table import FLAGS

if TYPE_CHECKING:  # the readers are imported where a -geom or -expt run uses them: a plain run never loads them
    from ..io.crystfel import Geometry
    from ..io.dials import DialsExperiment

__all__ = ["PANEL_FILE_FLAGS", "PanelSource", "panel_file_flag", "check_panel_flags", "panel_source", "clen_mm"]

#: The flags naming a detector file.
PANEL_FILE_FLAGS = ("-geom", "-expt")
#: Features of nanoBragg's one-panel detector that a panel detector lacks (flag → why), refused with a detector file.
_NOT_WITH_PANELS = {
    "-printout": "per-pixel diagnostics are for nanoBragg's one-panel detector",
    "-printout_pixel": "per-pixel diagnostics are for nanoBragg's one-panel detector",
}
#: A -geom file's default E vector and spindle, and an -expt file's default spindle: +x (horizontal in both frames;
#: CUSTOM's default +z runs along the beam there).
_DEFAULT_AXIS = (1.0, 0.0, 0.0)
#: Flags that choose what an -expt file gives (valid only with -expt).
EXPT_CHOICE_FLAGS = ("-expt_experiment", "-expt_image")
#: Flags that give the same value as a file's key (a later one wins over the file, an earlier one loses to it).
_SAME_VALUE = {"-lambda": ("-lambda", "-energy"), "crystal": ("-cell", "-mat")}
_CLEN_RE = re.compile(r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(mm|m)?\s*\Z")


class PanelSource(NamedTuple):
    """A detector file read for a build.

    flag: ``-geom`` or ``-expt``; name: the file as given; layout: the panels (:class:`~nbtorch.panels.PanelLayout`);
    mask: ``Setup.mask`` bytes ([P, S, F], 1 = render) or None when no pixel is masked; geometry: the CrystFEL
    :class:`~nbtorch.io.crystfel.Geometry` (its data layout is the output's) or None for ``-expt``; crystal: the
    ``.expt`` crystal's real-space basis (Å, [3, 3], columns a, b, c) when it is used, else None; experiment: the
    ``.expt`` experiment read (``-expt_experiment``; 0 for ``-geom``)."""

    flag: str
    name: str
    layout: PanelLayout
    mask: Optional[bytes]
    geometry: Optional[Geometry] = None
    crystal: Optional[np.ndarray] = None
    experiment: int = 0


def panel_file_flag(opts) -> Optional[str]:
    """``-geom`` or ``-expt`` when the flags name a detector file, else None (ValueError when they name both)."""
    given = [f for f in PANEL_FILE_FLAGS if f in opts]
    if len(given) == 2:
        raise ValueError(f"-geom {opts['-geom']} and -expt {opts['-expt']} both describe the detector: give one")
    return given[0] if given else None


def check_panel_flags(opts: NanoBraggArgs) -> None:
    """Refuse, before any file is read: ``-clen`` without ``-geom``; with a detector file, a flag the file replaces
    (``-beam_vector`` is checked against the file's beam later) or a feature panels lack.  ValueError naming both."""
    flag = panel_file_flag(opts)
    if "-clen" in opts and flag != "-geom":
        raise ValueError(f"-clen {opts['-clen']} gives the camera length a -geom file reads from a data file: give "
                         "-geom FILE" + (" (an .expt file gives its own)" if flag == "-expt" else ""))
    for f in EXPT_CHOICE_FLAGS:
        if f in opts and flag != "-expt":
            raise ValueError(f"{f} {opts[f]} chooses what a DIALS experiment list gives: give -expt FILE")
    if flag is None:
        return
    for f in opts.order:
        if FLAGS[f].replaced and f != "-beam_vector":
            raise ValueError(f"{f} conflicts with {flag} {opts[flag]}: the detector (its panels, their size, place "
                             f"and orientation) comes from the file; leave out {f}")
        if f in _NOT_WITH_PANELS:
            raise ValueError(f"{f} cannot be used with {flag} {opts[flag]}: {_NOT_WITH_PANELS[f]}")


def clen_mm(text: str) -> float:
    """``-clen`` text → mm: a number with an optional unit ``mm`` (the default) or ``m`` (``125``, ``125mm``,
    ``0.125 m``).  ValueError naming the flag and the allowed range."""
    m = _CLEN_RE.match(str(text))
    if m is None:
        raise ValueError(f"-clen expects a length with unit mm (the default) or m, e.g. 125, 125mm or 0.125m; got "
                         f"{text!r}")
    value = float(m[1]) * (1000.0 if m[2] == "m" else 1.0)
    if not (math.isfinite(value) and 0 < value <= 1e7):
        raise ValueError(f"-clen must be > 0 and <= 1e7 mm, got {text}")
    return value


def _from_data_file(text: Optional[str]) -> bool:
    """Whether a ``clen``/``photon_energy`` text of a .geom file is a data-file location rather than a number."""
    if not text or not text.split():
        return False
    try:
        float(text.split()[0])
    except ValueError:
        return True
    return False


def _energy_eV(inp) -> Optional[float]:
    """The photon energy (eV) the flags give (``-energy``, hc/``-lambda`` or hc/λ0 of a ``-spectrum``), or None."""
    if getattr(inp, "spectrum", None) is not None:
        return HC_EV_ANGSTROM / inp.spectrum.mean
    if "-energy" in inp.opts:
        return float(inp.opts["-energy"])
    return HC_EV_ANGSTROM / float(inp.opts["-lambda"]) if "-lambda" in inp.opts else None


def _missing_value(inp, clen: Optional[float], energy: Optional[float]) -> None:
    """ValueError naming the key (and what to give) when the .geom file reads a value from a data file that the
    flags do not give; returns when the file fails for another reason."""
    from ..io.crystfel import read_geom
    try:
        probe = read_geom(inp.path("-geom"), clen=clen or 1.0, photon_energy_eV=energy or 1.0)
    except (ValueError, OSError):
        return
    name = inp.opts["-geom"]
    where = [p.clen.split()[0] for p in probe.panels if _from_data_file(p.clen)]
    if clen is None and where:
        raise ValueError(f"-geom {name}: clen is read from a data file ({where[0]}): give -clen VALUE[mm|m] (mm by "
                         "default; the file's coffset is added)")
    if energy is None and probe.beam is not None and _from_data_file(probe.beam[1]):
        raise ValueError(f"-geom {name}: {probe.beam[0]} is read from a data file ({probe.beam[1].split()[0]}): give "
                         "-energy eV or -lambda Å")


def _read_geometry(inp, read: Callable) -> Geometry:
    """The .geom file of ``-geom`` with ``-clen`` and the flags' photon energy for values kept in a data file."""
    from ..io.crystfel import data_file_masks, read_geom
    clen = clen_mm(inp.opts["-clen"]) if "-clen" in inp.opts else None
    energy = _energy_eV(inp)
    try:
        geometry = read(inp, "-geom", read_geom, clen=clen, photon_energy_eV=energy)
    except ValueError:
        _missing_value(inp, clen, energy)
        raise
    name = inp.opts["-geom"]
    if clen is not None and not any(_from_data_file(p.clen) for p in geometry.panels):
        inp.notes.append(f"-clen ignored: -geom {name} gives clen as a number ({geometry.panels[0].clen})")
    if geometry.beam is not None and energy is not None and not _from_data_file(geometry.beam[1]):
        inp.notes.append(f"-geom {name}: {geometry.beam[0]} = {geometry.beam[1]} overridden by {_wavelength_flag(inp)}")
    kept = data_file_masks(geometry)
    if kept:
        inp.notes.append(f"-geom {name}: the mask{'s' if len(kept) > 1 else ''} kept in the data file "
                         f"({', '.join(kept)}) left out: only simulating")
    return geometry


def _wavelength_flag(inp) -> str:
    """The flag that gives the wavelength instead of a detector file: -spectrum, -energy or -lambda."""
    return next(f for f in ("-spectrum", "-energy", "-lambda") if f in inp.opts)


def _geom_values(inp, geometry: Geometry, layout: PanelLayout) -> Dict[str, object]:
    """The flag values a .geom file supplies: the beam along +z, +x E vector and spindle unless given, the file's
    wavelength unless -lambda/-energy/-spectrum is given."""
    values: Dict[str, object] = {"-beam_vector": list(layout.beam)}
    for f in ("-polar_vector", "-spindle_axis"):
        if f not in inp.opts:
            values[f] = list(_DEFAULT_AXIS)
    if any(f in inp.opts for f in ("-lambda", "-energy", "-spectrum")):
        return values
    if geometry.wavelength is None:
        default = fmt_num(FLAGS["-lambda"].default)
        inp.notes.append(f"-geom {inp.opts['-geom']} gives no photon energy: lambda = {default} Å (the default; give "
                         "-lambda or -energy)")
    else:
        values["-lambda"] = _checked_wavelength(inp, geometry.wavelength, f"{geometry.beam[0]} = {geometry.beam[1]}")
    return values


def _checked_wavelength(inp, lam: float, what: str) -> float:
    rng = FLAGS["-lambda"].interval
    if lam not in rng:
        flag = PANEL_FILE_FLAGS[0] if "-geom" in inp.opts else PANEL_FILE_FLAGS[1]
        raise ValueError(f"{flag} {inp.opts[flag]}: {what} gives lambda = {lam:g} Å, outside {rng.text} Å")
    return float(lam)


def _expt_values(inp, rec: DialsExperiment) -> Dict[str, object]:
    """The flag values an .expt file's experiment supplies (:func:`~nbtorch.io.dials_experiments.experiment_of`):
    -beam_vector, -lambda (not with -spectrum: a note says it is replaced), -polar (Kahn factor) and -polar_vector
    from its model; a rotation's -spindle_axis, -phi and -osc (:class:`~nbtorch.io.dials_experiments.RotationModel`
    of the image read), a still's -spindle_axis +x (DIALS's usual axis) unless given."""
    if rec.beam.divergence > 0 or rec.beam.sigma_divergence > 0:
        inp.notes.append(f"-expt {inp.opts['-expt']}: the beam's divergence is not simulated (give -divergence)")
    values = {"-beam_vector": list(rec.setup.beam), "-polar": float(rec.beam.kahn_factor),
              "-lambda": _checked_wavelength(inp, rec.beam.wavelength, f"beam[{rec.models.beam}].wavelength"),
              "-polar_vector": list(rec.setup.polar_axis)}
    if rec.rotation is not None:
        values.update({"-spindle_axis": list(rec.rotation.spindle), "-phi": rec.rotation.phi_start,
                       "-osc": rec.rotation.phi_width})
    elif "-spindle_axis" not in inp.opts:
        values["-spindle_axis"] = list(_DEFAULT_AXIS)
    if "-spectrum" in inp.opts:
        inp.notes.append(f"-expt {inp.opts['-expt']}: the beam's wavelength {fmt_num(values.pop('-lambda'))} Å is "
                         f"replaced by -spectrum {inp.opts['-spectrum']}")
    return values


def _last_index(order: Sequence[str], flag: str) -> int:
    return max((i for i, f in enumerate(order) if f == flag), default=-1)


def _merge(inp, flag: str, values: Dict[str, object], crystal_in_file: bool) -> Tuple[NanoBraggArgs, bool]:
    """The build's flags with the file's ``values`` merged in: a value the flags give after ``flag`` (or, same
    value, a flag of :data:`_SAME_VALUE`) is kept, an earlier one is replaced (with a note).  Returns the flags and
    whether the file's crystal is used (no -cell/-mat after it)."""
    opts, at = inp.opts, _last_index(inp.opts.order, flag)
    merged = NanoBraggArgs(opts)
    merged.order = list(opts.order)
    keys = list(values) + (["crystal"] if crystal_in_file else [])
    use_crystal = crystal_in_file
    for key in keys:
        group = _SAME_VALUE.get(key, (key,))
        if any(_last_index(opts.order, g) > at for g in group):
            use_crystal = use_crystal and key != "crystal"
            continue
        for g in group:
            if g in merged:
                inp.notes.append(f"{g} before {flag} {opts[flag]}: the file's value is used (give {g} after "
                                 f"{flag} to override it)")
                del merged[g]
                merged.order = [f for f in merged.order if f != g]
        if key != "crystal":
            merged[key] = values[key]
            merged.order.insert(merged.order.index(flag), key)
    return merged, use_crystal


def _check_beam_vector(inp, flag: str, beam: Sequence[float]) -> None:
    """-beam_vector given with a detector file must run along the file's beam."""
    given = inp.opts.get("-beam_vector")
    if given is None:
        return
    g = np.asarray(given, dtype=float)
    if not (np.linalg.norm(g) > 0 and float(np.dot(g / np.linalg.norm(g), beam)) > 1 - 1e-9):
        raise ValueError(f"-beam_vector {' '.join(fmt_num(x) for x in given)} conflicts with {flag} "
                         f"{inp.opts[flag]}: the beam runs along {' '.join(fmt_num(x) for x in beam)} in the "
                         "file's lab frame; leave out -beam_vector")


def _expt_record(inp, read: Callable) -> DialsExperiment:
    """Experiment ``-expt_experiment`` K of the ``-expt`` file for its image ``-expt_image`` (both 0 by default),
    notes for a list of several and an unused scan.  ValueError naming the flag and the range for K outside the
    list, naming the file and key for the rest (a scan or imageset without the image asked for …)."""
    from ..io.dials import read_expt
    from ..io.dials_experiments import experiment_of
    name = inp.opts["-expt"]
    expts = read(inp, "-expt", read_expt)
    count, k = len(expts.experiments), int(inp.opts.get("-expt_experiment", 0))
    if count == 0:
        raise ValueError(f"-expt {name}: the file holds no experiment")
    if k >= count:
        raise ValueError(f"-expt_experiment {k}: -expt {name} holds {count} experiment{'s' if count != 1 else ''} "
                         f"(0 to {count - 1})")
    if count > 1 and "-expt_experiment" not in inp.opts:
        inp.notes.append(f"-expt {name}: {count} experiments; the first is simulated (give -expt_experiment K)")
    image = int(inp.opts.get("-expt_image", 0))
    rec = read(inp, "-expt", lambda path: experiment_of(expts, path, k, image))
    if rec.rotation is None and rec.models.scan is not None:
        inp.notes.append(f"-expt {name}: experiment {k}'s scan is not used (a still: it has no goniometer)")
    return rec


def panel_source(inp, read: Callable) -> Optional[PanelSource]:
    """Read the detector file of ``-geom``/``-expt`` (None without one) and merge the values it supplies into
    ``inp.opts`` (a copy; see the module docstring), notes into ``inp.notes``.

    ``inp``: the build's :class:`~nbtorch.args.build.Inputs`; ``read(inp, flag, reader, *args, **kw)``: the build's
    reader (errors as one line naming the flag and the file).  ValueError naming the flag, file and key."""
    flag = panel_file_flag(inp.opts)
    if flag is None:
        return None
    name = inp.opts[flag]
    if flag == "-geom":
        from ..io.crystfel import geometry_mask
        geometry = _read_geometry(inp, read)
        layout = layout_from_crystfel(geometry)
        mask = read(inp, "-geom", lambda _: geometry_mask(geometry))  # bad regions, no_index, mask files
        source = PanelSource(flag, name, layout, None if mask.all() else mask.tobytes(), geometry)
        values, crystal = _geom_values(inp, geometry, layout), None
    else:
        rec = _expt_record(inp, read)
        layout = rec.setup.panels
        source = PanelSource(flag, name, layout, rec.setup.mask, experiment=rec.index)
        values = _expt_values(inp, rec)
        crystal = None if rec.crystal is None else np.array(rec.crystal.lab_real_space).T
    _check_beam_vector(inp, flag, layout.beam)
    if "-detector_thick" in inp.opts and any(p.thickness_um is not None for p in layout.panels):
        # the flag replaces the file's sensors: -detector_thick 0 turns them off, T > 0 gives every panel the
        # set-up's sensor of T µm (-detector_abs)
        inp.notes.append(f"{flag} {name}: -detector_thick {fmt_num(inp.opts['-detector_thick'])} replaces the "
                         "file's sensor thickness and attenuation")
        source = source._replace(layout=without_panel_sensors(layout))
    inp.opts, use_crystal = _merge(inp, flag, values, crystal is not None)
    if flag == "-expt" and crystal is None and not any(f in inp.opts for f in ("-cell", "-mat")):
        raise ValueError(f"-expt {name}: experiment {rec.index} has no crystal: give -cell or -mat")
    return source._replace(crystal=crystal if use_crystal else None)
