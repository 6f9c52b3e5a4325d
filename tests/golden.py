"""Helpers to load the golden reference cases made with the C program (tests/data/golden)."""
from __future__ import annotations

import os
import pathlib

import numpy as np

GOLDEN = pathlib.Path(__file__).resolve().parent / "data" / "golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if p.is_dir())


def command(case: str) -> str:
    """The nanoBragg command line of a case (the non-comment line of cmd.txt)."""
    lines = (GOLDEN / case / "cmd.txt").read_text().splitlines()
    return next(l for l in lines if l.strip() and not l.lstrip().startswith("#"))


def reference_image(case: str, shape) -> np.ndarray:
    """The C program's float image of a case, ``[slow, fast]`` float32."""
    return np.fromfile(GOLDEN / case / "image.bin", dtype="<f4").reshape(shape)


def geometry(case: str) -> dict:
    """geom.txt as a dict: key → list of numbers (``umat`` and ``source`` rows keyed by index)."""
    out: dict = {"umat": {}, "source": {}}
    for line in (GOLDEN / case / "geom.txt").read_text().splitlines():
        tok = line.split()
        if not tok:
            continue
        if tok[0] == "umat":
            out["umat"][int(tok[1])] = np.array([float(x) for x in tok[2:]]).reshape(3, 3)
        elif tok[0] == "source":
            out["source"][int(tok[1])] = (np.array([float(x) for x in tok[3:6]]), float(tok[7]))
        else:
            # lines hold one or more "key v v v" groups
            key, vals = None, []
            for t in tok:
                try:
                    vals.append(float(t))
                except ValueError:
                    if key is not None:
                        out[key] = vals
                    key, vals = t, []
            if key is not None:
                out[key] = vals
    return out


def in_case_dir(case: str):
    """Context manager: run with the case directory as the working directory (inputs are named relative to it)."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        old = os.getcwd()
        os.chdir(GOLDEN / case)
        try:
            yield
        finally:
            os.chdir(old)

    return cm()
