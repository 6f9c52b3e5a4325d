"""Issue 10: a hypothesis fuzz of the ``nbtorch`` command line.  Random subsets of flags with random values (NaN,
±inf, huge, negative, fractional, empty, text) and random small input files (-hkl, -mat, -sourcefile, -img, -mask,
-pdb: empty, comments only, truncated, garbage) on an 8×8 detector.  Every run ends in ≤ 10 s either with exit 0 and
finite, complete output files, or with exit 2, one line on stderr, no traceback and no output file under its final
name; never a temporary file left behind."""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
import time
import warnings

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbtorch.args.table import FLAGS
from nbtorch.cli import main
from nbtorch.io.smv import write_smv

BASE = ("-cell 40 50 60 90 90 90 -default_F 100 -N 2 -distance 60 -pixel 0.2 -detpixels 8 -lambda 1 -oversample 1 "
        "-noprogress").split()
OUTPUTS = {"-floatfile": "f.bin", "-intfile": "i.img", "-noisefile": "n.img", "-pgmfile": "p.pgm"}
#: Flags left out: the outputs (fixed above), the progress bar, NeXus output (its own tests), and the detector size
#: (a legal 10⁶-pixel-wide detector is slow, not wrong).
SKIP = set(OUTPUTS) | {"-progress", "-nexusfile", "-detpixels", "-detpixels_f", "-detpixels_s", "-detsize",
                       "-detsize_f", "-detsize_s"}
#: Counts that multiply the work: only small values (large legal ones are slow, not wrong).
MULTIPLYING = {"-mosaic_domains", "-phisteps", "-dispsteps", "-hdivsteps", "-vdivsteps", "-divsteps",
               "-detector_thicksteps", "-oversample"}

REALS = ["nan", "inf", "-inf", "1e308", "-1e308", "-1", "0", "-0", "0.5", "3", "90", "1e-300", "", "abc", "1e5"]
SMALL_INTS = ["nan", "-1", "0", "1", "2", "1.5", "", "abc", "2147483648", "-2147483649", "inf"]
INTS = SMALL_INTS + ["7", "100000"]
FILE_TEXT = {
    "-hkl": "0 0 1 100\n1 2 3 50\n-1 0 2 70.5\n",
    "-mat": "0.01 0.002 0\n0 0.02 0.001\n0.003 0 0.015\n40 50 60\n",
    "-sourcefile": "0 0 -10 1 1e-10\n0.1 0 -10 1 1.1e-10\n",
    "-pdb": "CRYST1   40.000   50.000   60.000  90.00  90.00  90.00 P 1\n"
            "ATOM      1  C   ALA A   1       1.000   2.000   3.000  1.00 10.00           C\nEND\n",
}
TOKENS = ["0", "1", "-1", "2.5", "nan", "inf", "1e308", "abc", "1e10", "40", "-3"]


def _smv_bytes(shape) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        write_smv(os.path.join(d, "x.img"), np.ones(shape, np.uint16), {"PIXEL_SIZE": 0.2})
        return open(os.path.join(d, "x.img"), "rb").read()


SMV_OK, SMV_WRONG = _smv_bytes((8, 8)), _smv_bytes((3, 5))


@st.composite
def file_content(draw, flag: str) -> bytes:
    kind = draw(st.sampled_from(["empty", "comment", "garbage", "tokens", "valid", "truncated"]))
    valid = SMV_OK if flag in ("-img", "-mask") else FILE_TEXT.get(flag, "1 2 3\n").encode()
    if kind == "empty":
        return b""
    if kind == "comment":
        return b"# only a comment\n"
    if kind == "garbage":
        return draw(st.binary(max_size=48))
    if kind == "tokens":
        lines = draw(st.lists(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=6), min_size=1, max_size=4))
        return "".join(" ".join(ln) + "\n" for ln in lines).encode()
    if kind == "valid":
        return SMV_WRONG if flag in ("-img", "-mask") and draw(st.booleans()) else valid
    return valid[: draw(st.integers(0, max(0, len(valid) - 1)))]


@st.composite
def flag_values(draw, name: str, folder: str):
    f = FLAGS[name]
    if f.kind == "switch":
        return []
    if f.kind == "file":
        if draw(st.integers(0, 9)) == 0:
            return [os.path.join(folder, "missing")]
        path = os.path.join(folder, name.strip("-") + draw(st.sampled_from(["", ".txt", ".img"])))
        with open(path, "wb") as fh:
            fh.write(draw(file_content(name)))
        return [path]
    if f.kind == "choice":
        return [draw(st.sampled_from(list(f.choices) + ["middle", ""]))]
    if f.kind == "text":
        return [draw(st.sampled_from(["F", "", "abc"]))]
    pool = SMALL_INTS if name in MULTIPLYING else INTS if f.kind in ("count", "int", "pixels") else REALS
    n = {"vector": 3, "misset": 3, "pixels": f.nargs}.get(f.kind, 1)
    if f.kind == "cell":
        n = draw(st.integers(1, 6))
    if f.kind == "misset" and draw(st.booleans()):
        return ["random"]
    return [draw(st.sampled_from(pool)) for _ in range(n)]


@st.composite
def command_lines(draw, folder: str):
    names = draw(st.lists(st.sampled_from(sorted(set(FLAGS) - SKIP)), min_size=1, max_size=4, unique=True))
    argv = list(BASE)
    for name in names:
        argv += [name] + draw(flag_values(name, folder))
    for flag, out in OUTPUTS.items():
        argv += [flag, os.path.join(folder, out)]
    return argv


def _files(folder):
    return sorted(os.listdir(folder))


EXAMPLES = int(os.environ.get("NBTORCH_FUZZ_EXAMPLES", 40))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_command_line(data):
    with tempfile.TemporaryDirectory() as folder:
        argv = data.draw(command_lines(folder))
        inputs = _files(folder)
        out, err = io.StringIO(), io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")  # a warning would be more lines on stderr
            rc = main(argv)
        seconds = time.perf_counter() - t0
        assert seconds <= 10, (argv, seconds)
        made = sorted(set(_files(folder)) - set(inputs))
        assert not [n for n in made if n.endswith(".tmp")], (argv, made)
        if rc == 2:
            lines = err.getvalue().splitlines()
            assert len(lines) == 1 and lines[0].startswith("nbtorch: error: "), (argv, err.getvalue())
            assert not w, (argv, [str(x.message) for x in w])
            assert not set(made) & set(OUTPUTS.values()), (argv, made)
            return
        assert rc == 0, (argv, rc, err.getvalue())
        image = np.fromfile(os.path.join(folder, "f.bin"), "<f4")
        assert image.size == 64 and np.isfinite(image).all(), argv
        assert os.path.getsize(os.path.join(folder, "i.img")) >= 512 + 2 * 64
