"""What the refine programs share: checks of the command line made before any work (one-line errors, exit 2; output
paths that can be written; the groups to refine) and the per-iteration progress lines.

Exit statuses of the refine programs (one place): :data:`EXIT_OK` … :data:`EXIT_POOR_FIT`; an interrupted run exits
128 + the signal number (130 Ctrl-C, 143 SIGTERM, :mod:`nbtorch.interrupt`).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Iterable, List, Optional, Sequence, Tuple

__all__ = ["fit_status", "UsageError", "OneLineParser", "check_outputs", "flag_inputs", "free_groups", "Progress",
           "PLOT_EXTENSIONS", "EXIT_OK", "EXIT_OUTPUT", "EXIT_USAGE", "EXIT_NOT_CONVERGED", "EXIT_POOR_FIT"]

EXIT_OK = 0             #: converged, and χ²/ν of a likelihood target near 1
EXIT_OUTPUT = 1         #: an output file could not be written (after the fit)
EXIT_USAGE = 2          #: a user error: bad option, flag, value or input file (one line on stderr, nothing done)
EXIT_NOT_CONVERGED = 3  #: finished without meeting a convergence rule
EXIT_POOR_FIT = 4       #: converged, but a poor fit (χ²/ν far from 1: refine.result.POOR_FIT_CHI2)

#: ``--image`` extensions written as a figure (need matplotlib), as ``--plot`` always is.
PLOT_EXTENSIONS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def fit_status(converged: bool, ok: bool) -> int:
    """The exit status of a finished fit (one image or all of them): :data:`EXIT_OK` when ``ok`` (converged and not a
    poor fit), else :data:`EXIT_NOT_CONVERGED` when not ``converged``, else :data:`EXIT_POOR_FIT`."""
    return EXIT_OK if ok else (EXIT_NOT_CONVERGED if not converged else EXIT_POOR_FIT)


class UsageError(Exception):
    """A user's mistake on the command line: the message goes to stderr on one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is a :class:`UsageError` (one line naming the option) instead of usage + exit."""

    def error(self, message):  # noqa: D102 - argparse API
        if "required" in message and "observed" in message:
            message = ("OBSERVED is missing: give the observed image first, before the nanoBragg flags "
                       f"({self.prog} OBSERVED [--options] <flags>)")
        raise UsageError(f"{message} (see {self.prog} --help)")


def check_outputs(outputs: Iterable[Tuple[str, Optional[str]]], inputs: Iterable[Tuple[str, str]] = ()) -> None:
    """Before any work: the safe-output rule (:func:`nbtorch.io.check_output_paths`: no output is the same file as an
    input or another output; its folder exists and is writable; it is not a directory) for every (option, path) with
    a path, and figures (``--plot``, ``--image`` with a figure extension) need matplotlib.  :class:`UsageError`
    naming the option."""
    from nbtorch.io.safe_output import check_output_paths

    outputs = [(option, path) for option, path in outputs if path is not None]
    try:
        check_output_paths(outputs, inputs)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for option, path in outputs:
        ext = os.path.splitext(path)[1].lower()
        if option == "--plot" and ext not in PLOT_EXTENSIONS:
            raise UsageError(f"--plot {path}: a figure is written as {', '.join(PLOT_EXTENSIONS)}; got {ext or 'no'} "
                             "extension")
        figure = option == "--plot" or ext in PLOT_EXTENSIONS
        if figure and importlib.util.find_spec("matplotlib") is None:
            raise UsageError(f"{option} {path}: writing a figure needs matplotlib (pip install matplotlib)")


def flag_inputs(flags: Sequence[str], base_dir: str = "") -> List[Tuple[str, str]]:
    """``(flag, path)`` of the files nanoBragg ``flags`` read (``-hkl``, ``-mat``, ``-mask`` …: inputs that no output
    may overwrite), relative names joined to ``base_dir``; none when the flags do not parse (that error is reported
    where the model is built)."""
    from nbtorch.args.build import input_files
    from nbtorch.args.parse import parse_args

    try:
        return input_files(parse_args(list(flags)), base_dir)
    except ValueError:
        return []


def free_groups(text: str) -> List[str]:
    """The groups of ``--refine`` (comma or space separated); :class:`UsageError` when none is given."""
    groups = [g for g in text.replace(",", " ").split() if g]
    if not groups:
        raise UsageError(f"--refine {text!r}: no group given (e.g. --refine distance,beam_center,scale)")
    return groups


class Progress:
    """Per-iteration progress lines on a stream (default stderr): stage, iteration, loss, change, step/σ, damping."""

    def __init__(self, stream=None):
        self.stream = sys.stderr if stream is None else stream
        self.prev = None
        self.stage = None
        self.started = False

    def __call__(self, h: dict):
        if not self.started:  # the header with the first iteration (a run refused before it prints one line only)
            self.started = True
            print(f"{'stage':9s} {'iter':>4s} {'loss':>17s} {'change':>12s} {'step/σ':>9s} {'damping':>10s}",
                  file=self.stream)
        if h.get("stage") != self.stage:
            self.stage, self.prev = h.get("stage"), None
        change = "" if self.prev is None else f"{h['loss'] - self.prev:12.5g}"
        self.prev = h["loss"]
        print(f"{str(h.get('stage', '')):9s} {h['iteration']:4d} {h['loss']:17.10g} {change:>12s} "
              f"{h['step']:9.3g} {h['damping']:10.3g}", file=self.stream, flush=True)
