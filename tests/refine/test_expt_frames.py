"""``nbtorch-refine --expt FILE --experiment K`` without OBSERVED reads frame ``single_file_indices`` of experiment
K's imageset from a multi-frame HDF5 file (``[N, P, S, F]``, bitshuffle/LZ4-compressed when hdf5plugin is installed),
builds the model from ``-expt FILE -expt_experiment K`` and writes the refined model of K > 0 as flags too; a frame
beyond the file is one line naming the file, the frame and how many it holds (issue 21, items 1 and 6).

tests/data/dials_refine/stills.expt: two stills (their own crystals and detectors of four 32 × 32 panels); here both
imagesets point at one file ``shots.h5``: experiment 0 at frame 0, experiment 1 at frame 2 (frame 1 is blank)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import nbtorch
from refine.cli.fit import main
from refine.targets.observed import read_observed

try:
    import hdf5plugin
except ImportError:  # the file is then written uncompressed
    hdf5plugin = None

EXPT = Path(__file__).resolve().parent.parent / "data" / "dials_refine" / "stills.expt"
FLAGS = ["-default_F", "100", "-N", "6", "-fluence", "1e28", "-oversample", "1"]


def _list(tmp: Path, frames=(0, 2)) -> Path:
    """stills.expt with both imagesets in ``shots.h5`` at ``frames``."""
    doc = json.loads(EXPT.read_text())
    for imageset, frame in zip(doc["imageset"], frames):
        imageset.update(images=["shots.h5"], single_file_indices=[frame])
    path = tmp / "stills.expt"
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """(folder, the list, the frames written [3, P, S, F]): noisy stills of experiment 0 and 1 at frames 0 and 2."""
    tmp = tmp_path_factory.mktemp("frames")
    expt = _list(tmp)
    frames = []
    for k, seed in ((0, 1), (None, 0), (1, 2)):
        if k is None:
            frames.append(np.zeros_like(frames[0]))
            continue
        params, setup = nbtorch.from_nanobragg_args(["-expt", str(expt), "-expt_experiment", str(k)] + FLAGS)
        image = nbtorch.simulate(params, setup, fused=False)
        frames.append(torch.poisson(image, generator=torch.Generator().manual_seed(seed)).numpy().astype(np.float32))
    data = np.stack(frames)
    compression = dict(hdf5plugin.Bitshuffle(cname="lz4")) if hdf5plugin is not None else {}
    with h5py.File(tmp / "shots.h5", "w") as f:
        f.create_dataset("/entry/data/data", data=data, chunks=(1, *data.shape[1:]), **compression)
    return tmp, expt, data


def test_read_observed_takes_the_frame_of_a_panel_stack(shots):
    tmp, expt, data = shots
    _, setup = nbtorch.from_nanobragg_args(["-expt", str(expt)] + FLAGS)
    for k in range(3):
        np.testing.assert_array_equal(read_observed(str(tmp / "shots.h5"), setup, frame=k).data, data[k])
    with pytest.raises(ValueError) as err:
        read_observed(str(tmp / "shots.h5"), setup, frame=3)
    assert str(err.value) == (f"OBSERVED {tmp / 'shots.h5'}: no frame 3 (0-based) in /entry/data/data: it holds 3 "
                              "frames (0 to 2)")


def test_experiment_k_is_fitted_to_its_frame_and_written_as_flags(shots, capsys):
    tmp, expt, _ = shots
    fit_json, mat = tmp / "fit1.json", tmp / "r1.mat"
    rc = main(["--expt", str(expt), "--experiment", "1", "--refine", "orientation,scale", "--json", str(fit_json),
               "--matrix-out", str(mat), "--quiet"] + FLAGS)
    out = capsys.readouterr().out
    assert rc == 0
    fit = json.loads(fit_json.read_text())
    assert fit["expt"]["experiment"] == 1 and 0.5 < fit["chi2_nu"] < 2 and abs(fit["values"]["scale"] - 1) < 0.02
    assert fit["nanobragg_args"][:6] == ["-expt", str(expt), "-expt_experiment", "1", "-mat", str(mat)]
    assert f"refined model: nbtorch -expt {expt} -expt_experiment 1 -mat {mat}" in out
    _, setup = nbtorch.from_nanobragg_args(fit["nanobragg_args"])  # experiment 1's detector
    _, one = nbtorch.from_nanobragg_args(["-expt", str(expt), "-expt_experiment", "1"] + FLAGS)
    assert setup.panels == one.panels
    # experiment 0 at frame 0 fits; pointed at frame 2 (experiment 1's still) it does not
    assert main(["--expt", str(expt), "--refine", "scale", "--quiet"] + FLAGS) == 0
    (tmp / "wrong").mkdir()
    wrong = _list(tmp / "wrong", (2, 2))
    (tmp / "wrong" / "shots.h5").symlink_to(tmp / "shots.h5")
    assert main(["--expt", str(wrong), "--refine", "scale", "--quiet"] + FLAGS) == 4


def test_a_frame_beyond_the_file_is_one_line_exit_2(shots, capsys):
    tmp, _, _ = shots
    (tmp / "beyond").mkdir()
    expt = _list(tmp / "beyond", (0, 7))
    (tmp / "beyond" / "shots.h5").symlink_to(tmp / "shots.h5")
    assert main(["--expt", str(expt), "--experiment", "1", "--refine", "scale", "--json",
                 str(tmp / "beyond" / "fit.json")] + FLAGS) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not (tmp / "beyond" / "fit.json").exists()
    assert re.search(rf"--expt {re.escape(str(expt))}: experiment 1: image 0 \(imageset\[1\]\.images\[0\], frame 7\) "
                     rf"\S+shots\.h5: no frame 7 \(0-based\) in /entry/data/data: it holds 3 frames \(0 to 2\)$",
                     err.strip()), err
