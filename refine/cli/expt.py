"""``nbtorch-refine --expt FILE [--experiment K] [--out-expt OUT.expt]``: a DIALS experiment list as the front door of
a refinement (docs/refine.md "Refining a DIALS experiment").

Experiment K of the list (:func:`nbtorch.io.dials.read_experiments`) gives the starting model through nbtorch's own
``-expt`` flag (the nanoBragg flags after the options add what the file does not hold — ``-default_F``/``-hkl``,
``-N``, ``-fluence``, ``-oversample`` … — and override what it does), and its imageset gives the observed image when
no OBSERVED is given.  ``-expt`` builds a list's first experiment; for K > 0 the build reads a one-experiment copy of
the list (experiment K alone, every model kept) in a temporary folder that lives as long as the run.  The refined
model is written back into a copy of the list by :meth:`refine.pipeline.result.Result.write_expt` (experiment K's
crystal, detector and beam; everything else as read).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Iterator, List, NamedTuple, Optional

from nbtorch.args import parse_args
from nbtorch.io.dials import DialsExperiment, read_experiments

from .checks import UsageError

__all__ = ["ExptInput", "expt_input", "observed_image"]


class ExptInput(NamedTuple):
    """The experiment a run refines.  ``path``: the ``.expt`` file as given; ``index``: K (0-based); ``record``:
    its :class:`~nbtorch.io.dials_experiments.DialsExperiment`; ``flags``: the nanoBragg flags of the build (``-expt``
    and the file it reads first, then the user's flags); ``own_flags``: whether those flags name ``path`` itself
    (K = 0: the refined model can be written as flags), not a temporary copy; ``temporary``: the copy's path or
    ''."""

    path: str
    index: int
    record: DialsExperiment
    flags: List[str]
    own_flags: bool
    temporary: str = ""

    def report(self, out_expt: Optional[str]) -> dict:
        """The JSON report's ``expt`` entry: ``{"input", "experiment", "identifier", "out"}`` (out None when no
        ``--out-expt``)."""
        return {"input": self.path, "experiment": self.index, "identifier": self.record.identifier,
                "out": out_expt}

    def message(self, text: str) -> str:
        """A build message with the temporary copy's name replaced by the file and experiment it holds."""
        return text.replace(self.temporary, f"{self.path} (experiment {self.index})") if self.temporary else text


def _given_file(ns, flags: List[str]) -> Optional[str]:
    """The ``.expt`` file of the run: ``--expt``, else a ``-expt`` flag (K must then be 0), else None.
    :class:`UsageError` for both, or ``--experiment``/``--out-expt`` without either."""
    try:
        in_flags = parse_args(list(flags)).get("-expt") if "-expt" in flags else None
    except ValueError:
        in_flags = None  # the build reports a bad flag
    if ns.expt is not None and in_flags is not None:
        raise UsageError(f"--expt {ns.expt} and -expt {in_flags} both give the experiment list: give one")
    if ns.expt is None and in_flags is None:
        for option, value in (("--experiment", ns.experiment), ("--out-expt", ns.out_expt)):
            if value is not None:
                raise UsageError(f"{option} {value}: the model does not come from a DIALS experiment list: give "
                                 "--expt FILE")
    if in_flags is not None and ns.experiment not in (None, 0):
        raise UsageError(f"--experiment {ns.experiment} with -expt {in_flags}: the -expt flag builds the first "
                         "experiment; give --expt FILE instead")
    return ns.expt if ns.expt is not None else (None if in_flags is None else str(in_flags))


def _one_experiment_copy(path: str, index: int, folder: str) -> str:
    """A copy of the list at ``path`` holding experiment ``index`` alone (every model list kept), in ``folder``."""
    with open(path, "rb") as fh:
        doc = json.loads(fh.read().decode("utf-8"))
    doc["experiment"] = [doc["experiment"][index]]
    copy = os.path.join(folder, f"experiment_{index}.expt")
    with open(copy, "w", encoding="utf-8") as fh:
        json.dump(doc, fh)
    return copy


@contextlib.contextmanager
def expt_input(ns, flags: List[str]) -> Iterator[Optional[ExptInput]]:
    """The run's :class:`ExptInput` (None when the model does not come from an ``.expt``), its temporary copy (K >
    0) removed on exit.  :class:`UsageError` naming the option: a file that cannot be read or is malformed, K outside
    the list."""
    path = _given_file(ns, flags)
    if path is None:
        yield None
        return
    index = 0 if ns.experiment is None else ns.experiment
    try:
        records = read_experiments(path)
    except (ValueError, OSError) as exc:
        raise UsageError(f"--expt {path}: {exc}" if ns.expt is not None else f"-expt {path}: {exc}") from None
    if not 0 <= index < len(records):
        raise UsageError(f"--experiment {index}: {path} holds {len(records)} experiment"
                         f"{'s' if len(records) != 1 else ''} (0 to {len(records) - 1})")
    if ns.expt is None:  # the -expt flag: the flags are the build's as given
        yield ExptInput(path, 0, records[0], list(flags), True)
        return
    if index == 0:
        yield ExptInput(path, 0, records[0], ["-expt", path] + list(flags), True)
        return
    with tempfile.TemporaryDirectory(prefix="nbtorch-refine-") as folder:
        copy = _one_experiment_copy(path, index, folder)
        yield ExptInput(path, index, records[index], ["-expt", copy] + list(flags), False, copy)


def observed_image(source: ExptInput) -> str:
    """The observed image file of the experiment (its imageset's image, the path resolved against the ``.expt``'s
    folder).  :class:`UsageError` naming the file and the key: no imageset, a missing file, a frame other than a
    multi-frame file's first (give OBSERVED)."""
    where = f"--expt {source.path}: experiment {source.index}"
    image = source.record.images
    if image is None:
        raise UsageError(f"{where} has no imageset (or one held in memory): give the observed image as OBSERVED")
    if not os.path.isfile(image.path):
        raise UsageError(f"{where}: image {image.path} ({image.key}) not found")
    if image.frame:
        raise UsageError(f"{where}: the image is frame {image.frame} of {image.path} ({image.key}); only a file's "
                         "first frame is read: give the frame as OBSERVED")
    return image.path
