"""Issue 10: hypothesis fuzzes of ``nbtorch-refine``'s options and of ``refine.fit``'s arguments on an 8×8 image.
Every run ends in ≤ 10 s: the CLI with exit 0, 3 (not converged) or 4 (poor fit) and complete, finite outputs, or
exit 2 with one line on stderr, no traceback and no output file; ``fit`` with a Result of finite values or a
one-line ValueError/TypeError.  The CLI runs sometimes carry one random nanoBragg flag in the starting model (the
values of the nbtorch fuzz, tests/nbtorch/test_fuzz_cli.py)."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nbtorch
import refine
from nbtorch.io.smv import write_smv
from refine.cli.fit import main
from tests.nbtorch.test_fuzz_cli import FLAGS as FLAG_TABLE
from tests.nbtorch.test_fuzz_cli import SKIP, flag_values

FLAGS = ("-cell 40 50 60 90 90 90 -misset 10 20 30 -N 3 -default_F 100 -distance 60 -pixel 0.4 -detpixels 8 "
         "-lambda 1 -oversample 1").split()
EXAMPLES = int(os.environ.get("NBTORCH_FUZZ_EXAMPLES", 20))
NUMBERS = ["nan", "inf", "-inf", "1e308", "-1", "0", "0.5", "3", "", "abc", "1e-300"]
INTS = ["-1", "0", "1", "2", "1.5", "nan", "", "abc"]
#: Our options and the values tried (argparse choices get their own names plus a bad word).
OPTIONS = {
    "--refine": ["distance", "scale", "cell", "orientation,scale", "beam_center", ",,,", "", "bogus", "cell.a",
                 "background", "mosaic", "ncells", "wavelength", "detector_rotation,orientation"],
    "--method": ["lm", "lbfgs", "adam", "newton"], "--target": ["poisson", "gaussian", "lsq", "anscombe", "x"],
    "--max-iter": INTS, "--coarse-iter": INTS, "--max-shift": INTS, "--threads": INTS + ["-2"],
    "--read-noise": NUMBERS, "--overload": NUMBERS, "--lr": NUMBERS, "--adc": NUMBERS, "--gain": NUMBERS,
    "--crystal-system": ["auto", "cubic", "triclinic", "orthorhombic", "hexagonal", "bad"],
    "--ncells-mode": ["auto", "isotropic", "anisotropic", "x"], "--esd-scale": ["auto", "chi2", "none", "x"],
    "--schedule": ["constant", "cosine", "exponential", "plateau", "x"], "--dtype": ["float64", "float32", "int8"],
    "--background": [("1", "0", "0"), ("nan", "0", "0"), ("1", "2"), ("abc", "1", "1")],
    "--no-coarse": [None], "--spots-only": [None], "--quiet": [None], "--allow-degenerate": [None],
}
#: nanoBragg flags a fuzzed starting model may carry (not the outputs or the detector size).
MODEL_FLAGS = sorted(set(FLAG_TABLE) - SKIP - {"-noprogress", "-printout", "-printout_pixel"})
OUTPUT_OPTIONS = ("--json", "--image", "--plot", "--matrix-out")
OUTPUT_NAMES = ["fit.json", "model.bin", "model.img", "fig.png"] * 3 + ["nodir/x.json", "", "."]


def _observed(folder: str) -> str:
    p, s = nbtorch.from_nanobragg_args(FLAGS)
    counts = torch.poisson(nbtorch.simulate(p, s) + 2.0, generator=torch.Generator().manual_seed(0))
    path = os.path.join(folder, "obs.img")
    write_smv(path, (counts.numpy() + 40).astype(np.uint16), [("ADC_OFFSET", "40"), ("GAIN", "1")])
    return path


@st.composite
def observed_file(draw, folder: str) -> str:
    good = _observed(folder)
    kind = draw(st.sampled_from(["good"] * 12 + ["truncated", "garbage", "missing", "raw"]))
    if kind == "good":
        return good
    if kind == "missing":
        return os.path.join(folder, "missing.img")
    data = open(good, "rb").read()
    path = os.path.join(folder, "bad.bin" if kind == "raw" else "bad.img")
    with open(path, "wb") as fh:
        fh.write(data[: draw(st.integers(0, len(data) - 1))] if kind == "truncated" else draw(st.binary(max_size=99)))
    return path


@st.composite
def refine_command(draw, folder: str):
    # a short fit unless the options drawn say otherwise (argparse keeps the last value): the options are on trial
    argv = [draw(observed_file(folder)), "--no-coarse", "--max-iter", "3", "--refine", "distance,scale"]
    for name in draw(st.lists(st.sampled_from(sorted(OPTIONS)), max_size=3, unique=True)):
        value = draw(st.sampled_from(OPTIONS[name]))
        argv += [name] + ([] if value is None else list(value) if isinstance(value, tuple) else [value])
    outputs = {}
    for name in draw(st.lists(st.sampled_from(OUTPUT_OPTIONS), max_size=2, unique=True)):
        outputs[name] = os.path.join(folder, draw(st.sampled_from(OUTPUT_NAMES)))
        argv += [name, outputs[name]]
    if "--quiet" not in argv:
        argv.append("--quiet")
    extra = []  # sometimes a starting model changed by one random nanoBragg flag (the nbtorch fuzz's values)
    for name in draw(st.lists(st.sampled_from(MODEL_FLAGS), max_size=1)):
        extra += [name] + draw(flag_values(name, folder))
    return argv + FLAGS + extra, outputs


def _listing(folder):
    return sorted(os.listdir(folder))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_refine_command_line(data):
    with tempfile.TemporaryDirectory() as folder:
        argv, outputs = data.draw(refine_command(folder))
        before = _listing(folder)
        out, err = io.StringIO(), io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
        assert time.perf_counter() - t0 <= 10, argv
        made = sorted(set(_listing(folder)) - set(before))
        assert not [n for n in made if n.endswith(".tmp")], (argv, made)
        if rc == 2:
            lines = err.getvalue().splitlines()
            assert len(lines) == 1 and lines[0].startswith("nbtorch-refine: error: "), (argv, err.getvalue())
            assert made == [], (argv, made)
            return
        assert rc in (0, 3, 4), (argv, rc, err.getvalue())
        for name, path in outputs.items():
            assert os.path.isfile(path), (argv, name)
            if name == "--json":
                d = json.load(open(path))
                assert all(math.isfinite(v) for v in d["values"].values()), argv


FIT_VALUES = [None, math.nan, math.inf, -1, 0, 0.5, 3, 10 ** 9, "abc", "", True, (), (1.0, 2.0, 3.0), [1, 2]]
#: Iteration counts: small ones only (a billion legal iterations are slow, not wrong).
ITERATIONS = [v for v in FIT_VALUES if v != 10 ** 9]
FIT_OPTIONS = {
    "free": FIT_VALUES + ["distance", ["scale"], ("cell", "orientation"), ["bogus"], "beam_center,scale", ",,,"],
    "method": FIT_VALUES + ["lm", "lbfgs", "adam"], "target": FIT_VALUES + ["poisson", "gaussian", "lsq", "anscombe"],
    "max_iter": ITERATIONS, "coarse_iter": ITERATIONS, "robust_iter": ITERATIONS, "chunk_pixels": FIT_VALUES,
    "prelim_pixels": FIT_VALUES, "max_shift": FIT_VALUES, "read_noise": FIT_VALUES, "overload": FIT_VALUES,
    "ftol": FIT_VALUES, "lr": FIT_VALUES, "search_distance": FIT_VALUES, "background_fraction": FIT_VALUES,
    "spot_dilate": FIT_VALUES, "background": FIT_VALUES, "crystal_system": FIT_VALUES + ["cubic", "auto"],
    "coarse_to_fine": FIT_VALUES + ["auto", False], "esd_scale": FIT_VALUES + ["chi2"], "spots_only": FIT_VALUES,
    "bounds": FIT_VALUES + [{"distance": (59.0, 61.0)}, {"bogus": (0, 1)}, {"distance": (61.0, 59.0)}],
    "priors": FIT_VALUES + [{"distance": (60.0, 0.1)}, {"distance": (60.0, 0.0)}],
    "mask": FIT_VALUES + [np.ones((8, 8), bool), np.zeros((8, 8), bool), np.ones((3, 3), bool)],
    "weights": FIT_VALUES + [np.ones((8, 8))], "fused": FIT_VALUES, "allow_degenerate": FIT_VALUES,
    "start": FIT_VALUES + [[0.0, 0.0]], "bogus_option": [1],
}


@pytest.fixture(scope="module")
def problem():
    p, s = nbtorch.from_nanobragg_args(FLAGS, dtype=torch.float64)
    obs = torch.poisson(nbtorch.simulate(p, s) + 2.0, generator=torch.Generator().manual_seed(1))
    return obs, p, s


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_fit_arguments(problem, data):
    obs, p, s = problem
    names = data.draw(st.lists(st.sampled_from(sorted(FIT_OPTIONS)), min_size=1, max_size=4, unique=True))
    kwargs = {n: data.draw(st.sampled_from(FIT_OPTIONS[n])) for n in names}
    for name, value in (("max_iter", 3), ("coarse_iter", 1), ("robust_iter", 1), ("free", "distance,scale")):
        kwargs.setdefault(name, value)
    t0 = time.perf_counter()
    try:
        r = refine.fit(obs, p, s, **kwargs)
    except (ValueError, TypeError) as exc:
        assert "\n" not in str(exc) and str(exc), (kwargs, exc)
        return
    finally:
        assert time.perf_counter() - t0 <= 10, kwargs
    assert bool(torch.isfinite(r.x).all()) and math.isfinite(r.loss), kwargs
