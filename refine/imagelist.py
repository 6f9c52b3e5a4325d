"""Image lists: the ``LIST`` file of ``nbtorch-refine --images LIST`` or ``--expt-list LIST``.

``--images``: one line per image, ``PATH <nanoBragg flags of its starting model>`` (blank lines and ``#`` comments
skipped, tokens split as a shell would, quotes allowed); a relative ``PATH`` and the files the flags name (``-hkl``,
``-mat``, …) are read from the LIST's folder.  Flags given on the command line come first on every line (the line's
own win), so what all images share is written once; a line's ``-spectrum FILE.lam`` gives that shot its own spectrum
(leave ``-lambda`` out of the shared flags).

``--expt-list`` (diffBragg hopper's input): one line per DIALS experiment list, ``EXPT [REFL] [SPECTRUM]`` (paths
relative to the LIST's folder; a second column ending in ``.lam`` is the spectrum of a line without a reflection
table).  Every experiment of ``EXPT`` is a shot of its own (an :class:`ImageEntry` each, in the file's order): its
starting model is what ``nbtorch-refine --expt EXPT --experiment K`` builds (``-expt EXPT -expt_experiment K``, then
the command line's flags, then ``-spectrum SPECTRUM``), its observed image its imageset's (file and frame), and a
spot-ROI fit's spots the REFL rows of the experiment (:func:`entry_spots`).  Every error is one line naming the LIST
file and the line number.
"""
from __future__ import annotations

import os
import shlex
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch

from nbtorch.args.build import build
from nbtorch.args.parse import missing_inputs, parse_args
from nbtorch.io.dials import read_expt
from nbtorch.io.dials_experiments import experiment_of
from nbtorch.io.refl import read_reflections
from nbtorch.io.spectra import read_lam

from .pipeline.predicted import rows_of_experiment
from .targets.detector import from_dials
from .targets.observed import read_gain_map, read_observed

#: The extension that marks an --expt-list column as the shot's spectrum.
SPECTRUM_EXTENSION = ".lam"


class ImageEntry(NamedTuple):
    """One image of a LIST: ``line`` (1-based line number), ``path`` (absolute), ``flags`` (tokens: the common
    flags, then the line's), ``base_dir`` (the LIST's folder: relative files in the flags are read from it),
    ``source`` (the LIST file as given, for messages).  A shot of an ``--expt-list`` also has ``expt`` (the
    absolute ``.expt`` path; '' on an ``--images`` line), ``experiment`` (K, 0-based), ``identifier`` (the
    experiment's), ``refl`` (the line's reflection table, absolute, or ''), ``n_experiments`` (in ``expt``) and
    ``frame`` (of a multi-frame image file, 0-based)."""

    line: int
    path: str
    flags: List[str]
    base_dir: str
    source: str
    expt: str = ""
    experiment: int = 0
    identifier: str = ""
    refl: str = ""
    n_experiments: int = 1
    frame: int = 0

    def where(self) -> str:
        """``LIST line N`` (``LIST line N experiment K`` for a list of several experiments) for messages."""
        return f"{self.source} line {self.line}" + (f" experiment {self.experiment}" if self.n_experiments > 1
                                                     else "")

    def key(self) -> tuple:
        """What tells the shots of a LIST apart (a results line's :func:`result_key`): (path, .expt or None, K or
        None)."""
        return (self.path, self.expt or None, self.experiment if self.expt else None)

    def out_expt_name(self) -> str:
        """The file name of the shot's refined experiment list: ``<EXPT stem>_line<N>[_exp<K>]_refined.expt`` (the
        LIST line, and K for a list of several experiments: no two shots of a LIST share it)."""
        stem = os.path.splitext(os.path.basename(self.expt))[0]
        return f"{stem}_line{self.line}{f'_exp{self.experiment}' if self.n_experiments > 1 else ''}_refined.expt"

    def expt_report(self, out: Optional[str]) -> dict:
        """A JSON report's ``expt`` entry of the shot: ``{"input", "experiment", "identifier", "refl", "out"}``
        (``refl`` and ``out`` None when absent)."""
        return {"input": self.expt, "experiment": self.experiment, "identifier": self.identifier,
                "refl": self.refl or None, "out": out}


def result_key(record: dict) -> tuple:
    """The :meth:`ImageEntry.key` of a results line (its ``path`` and, for a shot of an --expt-list, its ``expt``'s
    input and experiment)."""
    expt = record.get("expt") if isinstance(record.get("expt"), dict) else {}
    return (record.get("path"), expt.get("input"), expt.get("experiment") if expt.get("input") else None)


def _list_lines(path: str) -> Iterator[Tuple[int, str, List[str]]]:
    """(line number, ``LIST line N`` for messages, the line's tokens) of every line of a LIST that is not blank or a
    comment; ValueError naming the line when it cannot be split."""
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    for k, text in enumerate(lines, start=1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        where = f"{path} line {k}"
        try:
            yield k, where, shlex.split(text, comments=False)
        except ValueError as exc:
            raise ValueError(f"{where}: cannot split the line ({exc})") from None


def _listed_once(seen: dict, key, line: int, token: str, where: str, what: str) -> None:
    """Record the file ``key`` (:func:`_file_key`) of LIST line ``line`` (written ``token``) in ``seen``; ValueError
    naming both lines when an earlier line listed it (``what``: how the message names the column)."""
    if key in seen:
        first, first_tok = seen[key]
        same = "" if first_tok == token else f" as {first_tok} (the same file)"
        raise ValueError(f"{where}: {what}{token} is already listed on line {first}{same}")
    seen[key] = (line, token)


def _file_key(path: str):
    """What identifies a file: (device, inode) — a symbolic or hard link is the same file —, else its real path."""
    try:
        st = os.stat(path)
        return st.st_dev, st.st_ino
    except OSError:
        return os.path.realpath(path)


def _checked_flags(flags: List[str], where: str, after: str) -> List[str]:
    """``flags`` when they parse and name every input a model needs; ValueError naming the LIST line otherwise
    (``after``: what the flags follow on the line, for an empty list)."""
    if not flags:
        raise ValueError(f"{where}: no nanoBragg flags after the {after}")
    try:
        missing = missing_inputs(parse_args(flags))
    except ValueError as exc:
        raise ValueError(f"{where}: bad flags: {exc}") from None
    if missing:
        raise ValueError(f"{where}: bad flags: missing {missing[0]}")
    return flags


def parse_image_list(path: str, common_flags: Sequence[str] = (), check_files: bool = True) -> List[ImageEntry]:
    """Read a LIST file: one :class:`ImageEntry` per image line.

    Each line's flags (after ``common_flags``) are parsed and checked for completeness (cell, structure factors)
    without building the model, which is cheap for thousands of lines.  ValueError (one line, naming the LIST line)
    for a missing image file (``check_files``), a line without flags, bad flags, or an image listed twice (the same
    file, also through a symbolic or hard link: both lines named); OSError when the LIST itself cannot be read."""
    base = os.path.dirname(os.path.abspath(path))
    out, seen = [], {}
    for k, where, toks in _list_lines(path):
        image = os.path.normpath(os.path.join(base, toks[0]))
        if check_files and not os.path.isfile(image):
            raise ValueError(f"{where}: no such image file: {toks[0]}")
        _listed_once(seen, _file_key(image), k, toks[0], where, "")
        flags = _checked_flags([str(t) for t in common_flags] + toks[1:], where, "image path")
        out.append(ImageEntry(k, image, flags, base, path))
    if not out:
        raise ValueError(f"{path}: no images listed (one line per image: PATH <nanoBragg flags>)")
    return out


def _expt_columns(toks: List[str], where: str, base: str) -> Tuple[str, str, str]:
    """(EXPT, REFL or '', SPECTRUM or '') of an --expt-list line's columns, absolute (a second column ending in
    :data:`SPECTRUM_EXTENSION` is the spectrum); ValueError naming the line and the column for more than three
    columns, a missing file or a spectrum that does not parse (:func:`nbtorch.io.spectra.read_lam`)."""
    if len(toks) > 3:
        raise ValueError(f"{where}: {len(toks)} columns; a line is EXPT [REFL] [SPECTRUM] (quote a path with "
                         "spaces; nanoBragg flags for every shot go on the command line)")
    names = ("EXPT", "SPECTRUM") if len(toks) == 2 and toks[1].lower().endswith(SPECTRUM_EXTENSION) else \
        ("EXPT", "REFL", "SPECTRUM")
    paths = {}
    for name, tok in zip(names, toks):
        paths[name] = os.path.normpath(os.path.join(base, tok))
        if not os.path.isfile(paths[name]):
            raise ValueError(f"{where}: {name} {tok}: no such file")
    if "SPECTRUM" in paths:
        try:
            read_lam(paths["SPECTRUM"])
        except (ValueError, OSError) as exc:
            raise ValueError(f"{where}: SPECTRUM {exc}") from None
    return paths["EXPT"], paths.get("REFL", ""), paths.get("SPECTRUM", "")


def _shot_image(rec, where: str, check_files: bool) -> Tuple[str, int]:
    """(file, frame) of an experiment record's observed image (its imageset's, resolved against the ``.expt``'s
    folder; frame 0 for a file per image); ValueError naming the LIST line and the file's key: no imageset, a missing
    file (``check_files``).  A frame beyond the file is reported when it is read."""
    image, what = rec.images, f"{where}: experiment {rec.index}"
    if image is None:
        raise ValueError(f"{what} has no imageset (or one held in memory): list its image with --images instead")
    if check_files and not os.path.isfile(image.path):
        raise ValueError(f"{what}: image {image.path} ({image.key}) not found")
    return image.path, image.frame or 0


def parse_expt_list(path: str, common_flags: Sequence[str] = (), check_files: bool = True) -> List[ImageEntry]:
    """Read an ``--expt-list`` LIST (module docstring): one :class:`ImageEntry` per experiment of every line, in
    order, with the flags ``-expt EXPT -expt_experiment K``, ``common_flags``, then ``-spectrum SPECTRUM`` when the
    line gives one.

    ValueError (one line naming the LIST line) for more than three columns, a missing file, a spectrum or
    experiment list that does not parse, a list without experiments, an experiment without its image
    (``check_files``: a missing image file), an experiment list listed twice (the same file, also through a link:
    both lines named) or flags that do not describe a model; OSError when the LIST itself cannot be read.  The
    REFL is read when the shot is (:func:`entry_spots`)."""
    base = os.path.dirname(os.path.abspath(path))
    out, seen = [], {}
    for k, where, toks in _list_lines(path):
        expt, refl, spectrum = _expt_columns(toks, where, base)
        _listed_once(seen, _file_key(expt), k, toks[0], where, "EXPT ")
        try:
            expts = read_expt(expt)
            records = [experiment_of(expts, expt, i) for i in range(len(expts.experiments))]
        except (ValueError, OSError) as exc:
            raise ValueError(f"{where}: EXPT {exc}") from None
        if not records:
            raise ValueError(f"{where}: EXPT {toks[0]} holds no experiment")
        for rec in records:
            flags = _checked_flags(["-expt", expt, "-expt_experiment", str(rec.index)] + [str(t) for t in common_flags]
                                   + (["-spectrum", spectrum] if spectrum else []), where, "EXPT")
            image, frame = _shot_image(rec, where, check_files)
            out.append(ImageEntry(k, image, flags, base, path, expt, rec.index, rec.identifier, refl, len(records),
                                  frame))
    if not out:
        raise ValueError(f"{path}: no experiment lists listed (one line per shot: EXPT [REFL] [SPECTRUM])")
    return out


def entry_start(entry: ImageEntry, dtype=torch.float64):
    """(params, setup, geometry) of an entry's starting model (files in the flags read from the LIST's folder;
    geometry: the CrystFEL Geometry of a ``-geom`` detector, else None); ValueError naming the LIST line when the
    flags do not describe a model."""
    try:
        params, setup, extras = build(parse_args(entry.flags), dtype=dtype, base_dir=entry.base_dir)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{entry.where()}: bad flags: {exc}") from None
    return params, setup, extras.panels.geometry if extras.panels is not None else None


def entry_model(entry: ImageEntry, dtype=torch.float64):
    """(params, setup) of an entry's starting model (:func:`entry_start`)."""
    return entry_start(entry, dtype)[:2]


def entry_detector(entry: ImageEntry, setup):
    """What an --expt-list shot's ``.expt`` says of its detector (gain, trusted range, read-out noise:
    :func:`refine.targets.detector.from_dials`), or None for a LIST line of flags."""
    if not entry.expt:
        return None
    return from_dials(read_expt(entry.expt).detector_of(entry.experiment), setup, f"-expt {entry.expt}")


def entry_image(entry: ImageEntry, setup, overload=None, adc=None, gain=None, params=None, geometry=None,
                gain_map: Optional[str] = None):
    """The entry's observed image in photons, read by :func:`refine.targets.observed.read_observed` (its arguments;
    a ``-geom`` detector's ``geometry`` cuts a data slab into panels; an --expt-list shot's frame is read, and its
    detector gives its gain and trusted range, as ``nbtorch-refine --expt`` reads them; ``gain_map``: a per-pixel
    gain file, :func:`~refine.targets.observed.read_gain_map`, instead of ``gain``; errors and header warnings start
    with the LIST line)."""
    detector = entry_detector(entry, setup)
    if gain_map is not None:
        try:
            gain = read_gain_map(gain_map, setup, geometry)
        except ValueError as exc:
            raise ValueError(f"{entry.where()}: {exc}") from None
    return read_observed(entry.path, setup, params, label=f"{entry.where()}:", overload=overload, adc=adc, gain=gain,
                         geometry=geometry, detector=detector, frame=entry.frame)


def refined_expt_dir(next_to: str) -> str:
    """The default folder of an --expt-list run's refined experiment lists: ``next_to`` (the results or JSON file)
    without its extension, + ``_refined``."""
    return os.path.splitext(os.path.abspath(next_to))[0] + "_refined"


def write_refined_expt(entry: ImageEntry, result, folder: str) -> str:
    """Write an --expt-list shot's refined experiment list into ``folder`` as :meth:`ImageEntry.out_expt_name`:
    ``entry.expt`` with experiment K's crystal, detector and wavelength from ``result`` (a
    :class:`refine.pipeline.result.Result` of its model; :meth:`~refine.pipeline.result.Result.write_expt`), every
    other experiment and model as read; ``folder`` made when missing (also on a worker of another host).  Its path;
    ValueError or OSError as ``write_expt``'s (nothing written)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, entry.out_expt_name())
    result.write_expt(path, entry.expt, experiment_of(read_expt(entry.expt), entry.expt, entry.experiment))
    return path


def entry_spots(entry: ImageEntry):
    """The spots of a shot's spot-ROI fit (``FitOptions.spots``): the rows of its line's REFL that belong to its
    experiment (:func:`refine.pipeline.predicted.rows_of_experiment`: its ``id``, or its identifier in the table's
    map), or None without a REFL.  ValueError naming the LIST line: a table that cannot be read, none of its rows
    the experiment's."""
    if not entry.refl:
        return None
    try:
        rows = rows_of_experiment(read_reflections(entry.refl), entry.experiment, entry.identifier)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{entry.where()}: REFL {exc}") from None
    if rows.nrows == 0:
        raise ValueError(f"{entry.where()}: REFL {entry.refl}: no reflection of experiment {entry.experiment}"
                         + (f" ({entry.identifier!r})" if entry.identifier else "") + " (column 'id')")
    return rows


def load_entries(entries: Sequence[ImageEntry], dtype=torch.float64, overload=None, adc=None, gain=None,
                 progress=None, gain_map: Optional[str] = None) -> Tuple[list, list, list]:
    """(observed images, params, setups) of every entry, in order (ValueError naming the first bad line); ``adc``,
    ``gain``, ``gain_map`` as :func:`entry_image`; ``progress('reading images', k, N)`` after each entry (when
    given)."""
    obs, params, setups = [], [], []
    for k, e in enumerate(entries, start=1):
        p, s, geometry = entry_start(e, dtype)
        obs.append(entry_image(e, s, overload, adc, gain, params=p, geometry=geometry, gain_map=gain_map))
        params.append(p)
        setups.append(s)
        if progress is not None:
            progress("reading images", k, len(entries))
    return obs, params, setups
