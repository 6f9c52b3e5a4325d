"""nbtorch-refine: command-line runs writing JSON, images and progress."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import nbtorch
from nbtorch.io.images import read_raw_float, write_raw_float
from nbtorch.io.smv import write_smv
from refine.cli.fit import main, split_argv

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
