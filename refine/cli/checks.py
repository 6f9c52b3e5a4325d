"""What the refine programs share: their exit statuses, the runner of a program's ``main`` (one-line errors) and the
checks of the command line made before any work (outputs that can be written, the groups to refine).

Exit statuses (one place): :data:`EXIT_OK` … :data:`EXIT_POOR_FIT`; an interrupted run exits 128 + the signal number
(130 Ctrl-C, 143 SIGTERM, :mod:`nbtorch.interrupt`).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

from nbtorch.allocator import set_up_program
from nbtorch.args.build import input_files
from nbtorch.args.parse import parse_args
from nbtorch.interrupt import exit_status, interrupts
from nbtorch.io.safe_output import check_output_folder, check_output_paths

from ..model.parameters import expand_free

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


def run(prog: str, body: Callable[[], int], said: Callable[[Exception], str], signals: bool = True) -> int:
    """Program ``prog``'s exit status from ``body()``: a :class:`UsageError` or ValueError (the library's word on a
    user's input) is the line ``said(error)`` on stderr and :data:`EXIT_USAGE`, an OSError (an output that cannot be
    written: inputs are checked first) that line and :data:`EXIT_OUTPUT`; ``--help`` exits 0; an interrupt (with
    ``signals``, SIGTERM too) one line and 128 + the signal number (files being written are removed).  The process
    keeps its freed memory for reuse and freezes the objects of its imports (:func:`nbtorch.allocator.set_up_program`)."""
    set_up_program()
    try:
        with interrupts() if signals else contextlib.nullcontext():
            return body()
    except (UsageError, ValueError, OSError) as exc:
        print(said(exc), file=sys.stderr)
        return EXIT_OUTPUT if isinstance(exc, OSError) else EXIT_USAGE
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except KeyboardInterrupt as exc:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return exit_status(exc)


def check_outputs(outputs: Iterable[Tuple[str, Optional[str]]], inputs: Iterable[Tuple[str, str]] = (),
                  folder: Tuple[str, Optional[str], Sequence[str]] = ("", None, ())) -> None:
    """Before any work: the safe-output rule (:func:`nbtorch.io.check_output_paths`: no output is the same file as an
    input or another output; its folder exists and is writable; it is not a directory) for every (option, path) with
    a path; ``folder`` (option, directory, file names) one the run writes into (``--plots``, ``--out``; when it
    exists, its files are outputs too); figures (``--plot``, a figure extension) need matplotlib.
    :class:`UsageError` naming the option."""
    option, directory, names = folder
    try:
        if directory is not None and check_output_folder(option, directory):
            outputs = list(outputs) + [(option, os.path.join(directory, name)) for name in names]
        outputs = [(option, path) for option, path in outputs if path is not None]
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
    try:
        return input_files(parse_args(list(flags)), base_dir)
    except ValueError:
        return []


def matrix_output(json: Optional[str], suffix: str = "") -> str:
    """Where the refined MOSFLM matrix of a ``-mat`` model goes: next to ``json`` (its stem + ``suffix`` + .mat),
    else refined``suffix``.mat."""
    return (os.path.splitext(json)[0] if json else "refined") + suffix + ".mat"


def free_groups(text: str) -> List[str]:
    """The groups of ``--refine`` (comma or space separated), checked; :class:`UsageError` naming ``--refine``."""
    groups = [g for g in text.replace(",", " ").split() if g]
    if not groups:
        raise UsageError(f"--refine {text!r}: no group given (e.g. --refine distance,beam_center,scale)")
    try:
        expand_free(groups)
    except ValueError as exc:
        raise UsageError(f"--refine {text!r}: {exc}") from None
    return groups
