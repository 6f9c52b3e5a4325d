"""``nbtorch-refine --expt FILE [--experiment K] [--out-expt OUT.expt]``: a DIALS experiment list as the front door of
a refinement (docs/refine.md "Refining a DIALS experiment").

Experiment K of the list (:func:`nbtorch.io.dials_experiments.experiment_of`) gives the starting model through
nbtorch's own flags ``-expt FILE -expt_experiment K`` (the nanoBragg flags after the options add what the file does
not hold — ``-default_F``/``-hkl``, ``-N``, ``-fluence``, ``-oversample`` … — and override what it does; an
``-expt_image I`` among them picks a rotation's image), and its imageset gives the observed image (its file, and
the frame of a multi-frame file) when no OBSERVED is given.  The refined model is written back into a copy of the
list by :meth:`refine.pipeline.result.Result.write_expt` (experiment K's crystal, detector and beam; everything else
as read), and as flags (which name the list and K).
"""
from __future__ import annotations

import os
from typing import List, NamedTuple, Optional

from nbtorch.args import parse_args
from nbtorch.io.dials import DialsExperiment, read_expt
from nbtorch.io.dials_experiments import experiment_of

from .checks import UsageError

__all__ = ["ExptInput", "ObservedFile", "expt_input", "observed_image"]


class ExptInput(NamedTuple):
    """The experiment a run refines.  ``path``: the ``.expt`` file as given; ``index``: K (0-based); ``record``:
    its :class:`~nbtorch.io.dials_experiments.DialsExperiment` (for image ``-expt_image`` of the flags, default the
    first); ``flags``: the nanoBragg flags of the build (``-expt path -expt_experiment K``, then the user's)."""

    path: str
    index: int
    record: DialsExperiment
    flags: List[str]

    def report(self, out_expt: Optional[str]) -> dict:
        """The JSON report's ``expt`` entry: ``{"input", "experiment", "identifier", "out"}`` (out None when no
        ``--out-expt``)."""
        return {"input": self.path, "experiment": self.index, "identifier": self.record.identifier,
                "out": out_expt}


class ObservedFile(NamedTuple):
    """The observed image of a run: ``path``, ``frame`` (0-based, of a multi-frame file) and ``label``, how
    messages about it start (``OBSERVED``, or the ``.expt`` experiment and imageset key it came from)."""

    path: str
    frame: int = 0
    label: str = "OBSERVED"


def _flag_values(flags: List[str]) -> dict:
    """The parsed flags (only what this module reads), {} when they do not parse (the build reports that)."""
    try:
        return dict(parse_args(list(flags)))
    except ValueError:
        return {}


def _given_file(ns, given: dict) -> Optional[str]:
    """The ``.expt`` file of the run: ``--expt``, else a ``-expt`` flag, else None.  :class:`UsageError` for both,
    ``--experiment``/``--out-expt`` without either, or the experiment given both ways."""
    in_flags = given.get("-expt")
    if ns.expt is not None and in_flags is not None:
        raise UsageError(f"--expt {ns.expt} and -expt {in_flags} both give the experiment list: give one")
    if ns.expt is None and in_flags is None:
        for option, value in (("--experiment", ns.experiment), ("--out-expt", ns.out_expt)):
            if value is not None:
                raise UsageError(f"{option} {value}: the model does not come from a DIALS experiment list: give "
                                 "--expt FILE")
    if in_flags is not None and ns.experiment is not None:
        raise UsageError(f"--experiment {ns.experiment} with -expt {in_flags}: give the experiment as "
                         f"-expt_experiment {ns.experiment} after the flag, or --expt FILE")
    if ns.expt is not None and "-expt_experiment" in given:
        raise UsageError(f"-expt_experiment {given['-expt_experiment']} with --expt {ns.expt}: give the experiment "
                         f"as --experiment {given['-expt_experiment']}")
    return ns.expt if ns.expt is not None else (None if in_flags is None else str(in_flags))


def expt_input(ns, flags: List[str]) -> Optional[ExptInput]:
    """The run's :class:`ExptInput` (None when the model does not come from an ``.expt``).  :class:`UsageError`
    naming the option: a file that cannot be read or is malformed, K outside the list, an image the experiment does
    not have."""
    given = _flag_values(flags)
    path = _given_file(ns, given)
    if path is None:
        return None
    option = "--expt" if ns.expt is not None else "-expt"
    index = int(given.get("-expt_experiment", 0) if ns.expt is None else (ns.experiment or 0))
    try:
        expts = read_expt(path)
        count = len(expts.experiments)
        if not 0 <= index < count:
            which = "--experiment" if ns.expt is not None else "-expt_experiment"
            raise UsageError(f"{which} {index}: {path} holds {count} experiment{'s' if count != 1 else ''} "
                             f"(0 to {count - 1})")
        record = experiment_of(expts, path, index, int(given.get("-expt_image", 0)))
    except (ValueError, OSError) as exc:
        text = " ".join(str(exc).split())
        raise UsageError(f"{option} {path}: {text[len(path) + 2:] if text.startswith(path + ': ') else text}") \
            from None
    if ns.expt is None:  # the -expt flag: the flags are the build's as given
        return ExptInput(path, index, record, list(flags))
    return ExptInput(path, index, record, ["-expt", path, "-expt_experiment", str(index)] + list(flags))


def observed_image(source: ExptInput) -> ObservedFile:
    """The observed image of the experiment: its imageset's file (the path resolved against the ``.expt``'s
    folder) and frame (``single_file_indices``, or an HDF5 sequence's image number − 1; 0 for a file per image).
    :class:`UsageError` naming the file and the key: no imageset, a missing file.  A frame beyond the file is
    reported when it is read, after the label."""
    where = f"--expt {source.path}: experiment {source.index}"
    image = source.record.images
    if image is None:
        raise UsageError(f"{where} has no imageset (or one held in memory): give the observed image as OBSERVED")
    if not os.path.isfile(image.path):
        raise UsageError(f"{where}: image {image.path} ({image.key}) not found")
    frame = image.frame or 0
    return ObservedFile(image.path, frame, f"{where}: image {image.index} ({image.key}"
                        + (f", frame {frame})" if image.frame is not None else ")"))
