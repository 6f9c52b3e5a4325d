"""Image lists: the ``LIST`` file of ``nbtorch-refine --images LIST``.

One line per image, ``PATH <nanoBragg flags of its starting model>`` (blank lines and ``#`` comments skipped, tokens
split as a shell would, quotes allowed); a relative ``PATH`` and the files the flags name (``-hkl``, ``-mat``, …) are
read from the LIST's folder.  Flags given on the command line come first on every line (the line's own win), so what
all images share is written once; a line's ``-spectrum FILE.lam`` gives that shot its own spectrum (leave ``-lambda``
out of the shared flags).  Every error is one line naming the LIST file and the line number.
"""
from __future__ import annotations

import os
import shlex
from typing import List, NamedTuple, Sequence, Tuple

import torch

from nbtorch.args.build import build
from nbtorch.args.parse import missing_inputs, parse_args

from .targets.observed import read_observed


class ImageEntry(NamedTuple):
    """One image of a LIST: ``line`` (1-based line number), ``path`` (absolute), ``flags`` (tokens: the common
    flags, then the line's), ``base_dir`` (the LIST's folder: relative files in the flags are read from it),
    ``source`` (the LIST file as given, for messages)."""

    line: int
    path: str
    flags: List[str]
    base_dir: str
    source: str

    def where(self) -> str:
        """``LIST line N`` for messages."""
        return f"{self.source} line {self.line}"


def parse_image_list(path: str, common_flags: Sequence[str] = (), check_files: bool = True) -> List[ImageEntry]:
    """Read a LIST file: one :class:`ImageEntry` per image line.

    Each line's flags (after ``common_flags``) are parsed and checked for completeness (cell, structure factors)
    without building the model, which is cheap for thousands of lines.  ValueError (one line, naming the LIST line)
    for a missing image file (``check_files``), a line without flags, bad flags, or an image listed twice (the same
    file, also through a symbolic or hard link: both lines named); OSError when the LIST itself cannot be read."""
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    out, seen = [], {}
    for k, text in enumerate(lines, start=1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        where = f"{path} line {k}"
        try:
            toks = shlex.split(text, comments=False)
        except ValueError as exc:
            raise ValueError(f"{where}: cannot split the line ({exc})") from None
        image = os.path.normpath(os.path.join(base, toks[0]))
        if check_files and not os.path.isfile(image):
            raise ValueError(f"{where}: no such image file: {toks[0]}")
        try:  # a symbolic or hard link to a listed image is the same image
            st = os.stat(image)
            key = (st.st_dev, st.st_ino)
        except OSError:
            key = os.path.realpath(image)
        if key in seen:
            first, first_tok = seen[key]
            same = "" if first_tok == toks[0] else f" as {first_tok} (the same file)"
            raise ValueError(f"{where}: {toks[0]} is already listed on line {first}{same}")
        seen[key] = (k, toks[0])
        flags = [str(t) for t in common_flags] + toks[1:]
        if not flags:
            raise ValueError(f"{where}: no nanoBragg flags after the image path")
        try:
            missing = missing_inputs(parse_args(flags))
        except ValueError as exc:
            raise ValueError(f"{where}: bad flags: {exc}") from None
        if missing:
            raise ValueError(f"{where}: bad flags: missing {missing[0]}")
        out.append(ImageEntry(k, image, flags, base, path))
    if not out:
        raise ValueError(f"{path}: no images listed (one line per image: PATH <nanoBragg flags>)")
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


def entry_image(entry: ImageEntry, setup, overload=None, adc=None, gain=None, params=None, geometry=None):
    """The entry's observed image in photons, read by :func:`refine.targets.observed.read_observed` (its arguments;
    a ``-geom`` detector's ``geometry`` cuts a data slab into panels; errors and header warnings start with the LIST
    line)."""
    return read_observed(entry.path, setup, params, label=f"{entry.where()}:", overload=overload, adc=adc, gain=gain,
                         geometry=geometry)


def load_entries(entries: Sequence[ImageEntry], dtype=torch.float64, overload=None, adc=None, gain=None,
                 progress=None) -> Tuple[list, list, list]:
    """(observed images, params, setups) of every entry, in order (ValueError naming the first bad line); ``adc``,
    ``gain`` as :func:`entry_image`; ``progress('reading images', k, N)`` after each entry (when given)."""
    obs, params, setups = [], [], []
    for k, e in enumerate(entries, start=1):
        p, s, geometry = entry_start(e, dtype)
        obs.append(entry_image(e, s, overload, adc, gain, params=p, geometry=geometry))
        params.append(p)
        setups.append(s)
        if progress is not None:
            progress("reading images", k, len(entries))
    return obs, params, setups
