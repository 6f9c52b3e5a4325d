"""nbtorch-refine: command-line runs writing JSON, images and progress."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import nbtorch
from nbtorch.io.images import read_raw_float, write_raw_float
from nbtorch.io.smv import write_smv
from refine.cli.fit import main
from refine.cli.table import split_argv

from .refine_cases import model, observe

REQUIRED = ("converged", "parameters", "esd", "loss", "iterations", "seconds", "nanobragg_args")


@pytest.fixture(scope="module")
def observed_bin(tmp_path_factory):
    p, s, flags = model("-detpixels 48")
    obs = observe(p, s)
    path = tmp_path_factory.mktemp("cli") / "observed.bin"
    write_raw_float(str(path), obs.numpy().astype(np.float32))
    return str(path), flags


def _start_flags(flags):
    # the starting model: distance 0.6 mm and beam centre one pixel off
    return flags.split() + ["-distance", "60.6", "-Xbeam", "5.0"]


def test_cli_writes_json_and_image(observed_bin, tmp_path, capsys):
    obs, flags = observed_bin
    out_json, out_img = tmp_path / "fit.json", tmp_path / "model.bin"
    rc = main([obs, "--refine", "distance,beam_center,scale", "--max-iter", "20", "--json", str(out_json),
               "--image", str(out_img)] + _start_flags(flags))
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    d = json.loads(out_json.read_text())
    for key in REQUIRED:
        assert key in d, key
    assert d["converged"] is True
    assert d["parameters"]["distance_mm"] == pytest.approx(60.0, abs=0.05)
    assert d["free"] == ["distance", "beam_center.x", "beam_center.y", "scale"]
    # progress: a header and one line per iteration on stderr, the summary on stdout
    assert "damping" in cap.err and len([ln for ln in cap.err.splitlines() if ln.startswith("fine")]) >= 2
    assert "distance" in cap.out and "refined model: nbtorch" in cap.out
    img = read_raw_float(str(out_img), (48, 48))
    p2, s2 = nbtorch.from_nanobragg_args(d["nanobragg_args"])
    np.testing.assert_allclose(img, nbtorch.simulate(p2, s2).numpy(), rtol=1e-5, atol=1e-3)


def test_cli_reads_smv_and_other_methods(observed_bin, tmp_path, capsys):
    obs_path, flags = observed_bin
    data = read_raw_float(obs_path, (48, 48))
    smv = tmp_path / "observed.img"
    write_smv(str(smv), data.astype(np.float32))
    out_json = tmp_path / "fit.json"
    rc = main([str(smv), "--refine", "distance", "--method", "lbfgs", "--no-coarse", "--quiet", "--json",
               str(out_json)] + flags.split() + ["-distance", "60.3"])
    capsys.readouterr()
    assert rc == 0
    d = json.loads(out_json.read_text())
    assert d["method"] == "lbfgs"
    assert d["parameters"]["distance_mm"] == pytest.approx(60.0, abs=0.05)


def test_cli_usage_errors(observed_bin, capsys):
    obs, flags = observed_bin
    assert main([obs, "--refine", "distance"]) == 2  # no model flags
    assert main([obs, "--method", "newton"] + flags.split()) == 2
    assert main([obs, "--refine", "bogus"] + flags.split()) == 2  # user errors exit 2 (issue 10)
    assert main([obs] + flags.split() + ["-detpixels", "40"]) == 2  # shape mismatch for a raw image
    err = capsys.readouterr().err
    assert "unknown parameter group" in err
    assert main(["--help"]) == 0
    assert "nbtorch-refine" in capsys.readouterr().out


def test_split_argv_separates_our_options_from_nanobragg_flags():
    ours, flags = split_argv(["obs.img", "--refine", "cell,distance", "-cell", "40", "50", "60", "90", "90", "90",
                              "--json=out.json", "-misset", "-1", "2", "-3", "--no-coarse", "-N", "5"])
    assert ours == ["obs.img", "--refine", "cell,distance", "--json=out.json", "--no-coarse"]
    assert flags == ["-cell", "40", "50", "60", "90", "90", "90", "-misset", "-1", "2", "-3", "-N", "5"]


def test_entry_point_is_declared():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    text = open(os.path.join(root, "pyproject.toml")).read()
    assert 'nbtorch-refine = "refine.cli:main"' in text


# ------------------------------------------------------------------------------------------------ the option table


def test_docs_option_list_is_generated_from_the_table():
    from refine.cli.table import update_docs

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert update_docs(os.path.join(root, "docs", "refine.md"), check=True), \
        "docs/refine.md is out of date: run python -m refine.cli.table --update docs/refine.md"


def test_option_table_is_consistent():
    """Each command accepts a flag once; every program is known; every field is a FitOptions/StudySpec field."""
    from refine.cli.table import _DEFAULTS, COMMANDS, OPTIONS, PROGRAMS, options

    for programs in COMMANDS.values():
        assert len({o.flag for o in options(*programs)}) == len(options(*programs))
    for o in OPTIONS:
        owner, _, name = o.field.rpartition(".")
        assert set(o.programs) <= set(PROGRAMS) and (not o.field or name in _DEFAULTS[owner]), o.flag


@pytest.mark.parametrize("command, program, argv", [
    ("refine", "refine", ["obs.img"]), ("images", "joint", ["--images", "LIST"]),
    ("images", "independent", ["--images", "LIST", "--independent"]),
    ("sweep", "sweep", ["obs.img", "--search", "distance:1", "--n-trials", "1"])])
def test_parsers_take_their_defaults_and_choices_from_the_library(command, program, argv):
    """Each command's parser accepts its table's options; left out, every FitOptions/StudySpec argument is the
    dataclass's default (but the two switches: the programs refuse degenerate pairs and run the coarse stages)."""
    from refine import FitOptions, TARGETS
    from refine.cli.table import COMMANDS, arguments, options, parser
    from refine.studies import SAMPLERS, StudySpec

    ap = parser(command)
    flags = {s for a in ap._actions for s in a.option_strings} - {"-h", "--help"}
    assert flags == {o.flag for o in options(*COMMANDS[command])}
    ns = ap.parse_args(argv)
    fit = arguments(ns, program)
    assert fit.pop("allow_degenerate", False) is False and fit.pop("coarse_to_fine", True) is True
    assert fit == {k: v for k, v in vars(FitOptions()).items() if k in fit} and "free" not in fit
    if command == "sweep":
        assert arguments(ns, program, "StudySpec") == {k: v for k, v in vars(StudySpec()).items()
                                                      if k in ("storage", "study_name", "sampler", "pruner", "seed",
                                                               "connect_timeout")}
        assert all(ap.parse_args(argv + ["--sampler", s]).sampler == s for s in SAMPLERS)
    assert all(ap.parse_args(argv + ["--target", t]).target == t for t in TARGETS)


@pytest.mark.parametrize("text, command, expected", [
    ("max_iter must be an integer >= 0 or None; got -1", "refine",
     "--max-iter must be an integer >= 0 or None; got -1"),
    ("cell.a and distance cannot be told apart (or allow it: --allow-degenerate, allow_degenerate=True)", "refine",
     "cell.a and distance cannot be told apart (or allow it: --allow-degenerate)"),
    ("x and y cannot be told apart (or allow it: allow_degenerate=True)", "images",
     "x and y cannot be told apart (or allow it: --allow-degenerate)"),
    ("method must be one of lm, lbfgs, adam; got 'x'", "refine", "--method must be one of lm, lbfgs, adam; got 'x'"),
    ("a fit with coarse_to_fine=False and method='adam'", "refine", "a fit with --no-coarse and --method adam"),
    ("search group 'mosaic' is unknown", "sweep", "--search group 'mosaic' is unknown"),
    ("connect_timeout must be a number of seconds > 0; got 0", "sweep", "--storage-timeout must be a number of "
     "seconds > 0; got 0"),
    ("study_name 'x' already holds trials of another problem", "sweep", "--study-name 'x' already holds trials of "
     "another problem"),
    ("OBSERVED /data/max_iter.img: no such file", "refine", "OBSERVED /data/max_iter.img: no such file"),
    ("--json coarse_iter: is a directory", "refine", "--json coarse_iter: is a directory"),
    ("fit_many does not support spots_only=True", "images", "fit_many does not support spots_only=True"),
    ("the target needs photons; see --target", "refine", "the target needs photons; see --target"),
])
def test_library_messages_are_shown_with_flags(text, command, expected):
    from refine.cli.table import flag_message

    assert flag_message(text, command) == expected


def test_split_argv_of_the_images_and_sweep_commands():
    from refine.cli.table import split_argv

    assert split_argv(["--images", "L", "--independent", "-N", "5", "--results=r.jsonl"], "images") == \
        (["--images", "L", "--independent", "--results=r.jsonl"], ["-N", "5"])
    assert split_argv(["-cell", "40", "obs.img", "--search", "distance:1"], "sweep") == \
        (["--search", "distance:1"], ["-cell", "40", "obs.img"])  # OBSERVED comes before the flags or not at all
