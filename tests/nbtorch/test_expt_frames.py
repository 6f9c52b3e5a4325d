"""Frames of multi-frame files and the ``-expt`` build's experiment and image (issue 21, items 1, 5, 6): NXmx frames
(plain and bitshuffle/LZ4-compressed, Eiger ``data_NNNNNN`` blocks), fabio's multi-frame formats, one-frame formats
refusing a frame > 0; ``-expt_experiment K`` builds what a one-experiment copy of the list builds; ``-expt_image K``
gives a rotation's spindle (the goniometer composed as dxtbx does) and φ range; one-line errors naming the file and
key, or the flag and the range."""
from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import nbtorch
from nbtorch import crystal_orientations
from nbtorch.io.images import read_image
from nbtorch.io.nexus import write_nxmx
from nbtorch.io.smv import write_smv

try:
    import hdf5plugin
except ImportError:  # the compressed case is skipped
    hdf5plugin = None

TWO = Path(__file__).resolve().parents[1] / "data" / "dials" / "two_level.expt"  # 2 lattices, 20-image scan
SMALL = "-cell 50 50 50 90 90 90 -default_F 10 -N 2 -distance 80 -detpixels_f 6 -detpixels_s 5 -pixel 0.2"


def _frames(k: int) -> np.ndarray:
    """Frame ``k`` of the test files: 5 × 6 values that differ from every other frame's."""
    return (np.arange(30, dtype=np.float32).reshape(5, 6) + 100.0 * k)


def _nxmx(tmp_path: Path, compression) -> Path:
    """An NXmx file (nbtorch's writer) whose data is rewritten as 3 frames ``[3, 5, 6]``."""
    params, setup = nbtorch.from_nanobragg_args(SMALL)
    path = tmp_path / "three.nxs"
    write_nxmx(path, np.zeros((5, 6), np.float32), params, setup)
    with h5py.File(path, "r+") as f:
        det = f["/entry/instrument/detector"]
        del det["data"], f["/entry/data"]["data"]
        det.create_dataset("data", data=np.stack([_frames(k) for k in range(3)]), chunks=(1, 5, 6),
                           **({} if compression is None else compression))
        f["/entry/data"]["data"] = det["data"]
    return path


@pytest.mark.parametrize("filt", ["none", "bitshuffle-lz4"])
def test_nxmx_frame_k_is_read_and_a_frame_beyond_the_file_is_one_line(filt, tmp_path):
    if filt != "none" and hdf5plugin is None:
        pytest.skip("hdf5plugin is not installed")
    path = _nxmx(tmp_path, None if filt == "none" else dict(hdf5plugin.Bitshuffle(cname="lz4")))
    if filt != "none":
        with h5py.File(path, "r") as f:
            assert f["/entry/data/data"]._filters  # really compressed
    for k in range(3):
        np.testing.assert_array_equal(read_image(path, frame=k).data, _frames(k))
    with pytest.raises(ValueError) as err:
        read_image(path, frame=3)
    assert str(err.value) == f"{path}: no frame 3 (0-based): the file holds 3 frames (0 to 2)"


def test_eiger_master_data_blocks_are_counted_in_order_and_a_missing_block_is_named(tmp_path):
    path = _nxmx(tmp_path, None)
    blocks = {"data_000001": [0, 1], "data_000002": [2]}
    with h5py.File(path, "r+") as f:
        del f["/entry/instrument/detector/data"], f["/entry/data/data"]
        for name, frames in blocks.items():
            with h5py.File(tmp_path / f"{name}.h5", "w") as g:
                g["data"] = np.stack([_frames(k) for k in frames])
            f["/entry/data"][name] = h5py.ExternalLink(f"{name}.h5", "/data")
    for k in range(3):
        np.testing.assert_array_equal(read_image(path, frame=k).data, _frames(k))
    with pytest.raises(ValueError, match=r"no frame 3 \(0-based\): the file holds 3 frames"):
        read_image(path, frame=3)
    (tmp_path / "data_000002.h5").unlink()
    with pytest.raises(ValueError, match=r"three\.nxs: /entry/data/data_000002 cannot be opened \(a missing"):
        read_image(path, frame=0)


def test_fabio_multi_frame_file_and_one_frame_formats(tmp_path):
    fabio = pytest.importorskip("fabio")
    from fabio.edfimage import EdfImage

    edf = EdfImage(data=_frames(0))
    for k in (1, 2):
        edf.append_frame(data=_frames(k))
    edf.write(str(tmp_path / "three.edf"))
    assert fabio.open(str(tmp_path / "three.edf")).nframes == 3
    for k in range(3):
        np.testing.assert_array_equal(read_image(tmp_path / "three.edf", frame=k).data, _frames(k))
    with pytest.raises(ValueError, match=r"three\.edf: no frame 5 \(0-based\): the file holds 3 frames \(0 to 2\)"):
        read_image(tmp_path / "three.edf", frame=5)
    write_smv(tmp_path / "one.img", _frames(0), {})
    _frames(0).tofile(tmp_path / "one.bin")
    with pytest.raises(ValueError, match=r"one\.img: no frame 1 \(0-based\): a SMV file holds 1 frame \(0 to 0\)"):
        read_image(tmp_path / "one.img", frame=1)
    with pytest.raises(ValueError, match=r"one\.bin: no frame 2 \(0-based\): a raw file holds 1 frame"):
        read_image(tmp_path / "one.bin", shape=(5, 6), frame=2)
    np.testing.assert_array_equal(read_image(tmp_path / "one.img", frame=0).data, _frames(0))
    with pytest.raises(ValueError, match=r"frame must be an integer >= 0"):
        read_image(tmp_path / "one.img", frame=-1)


# ----------------------------------------------------------------------------------------------------------------
# -expt_experiment, -expt_image


def _write(tmp_path: Path, doc: dict, name: str = "x.expt") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def _rot(axis, deg) -> np.ndarray:
    u = np.asarray(axis, float) / np.linalg.norm(axis)
    t = math.radians(deg)
    K = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return np.eye(3) + math.sin(t) * K + (1 - math.cos(t)) * K @ K


FLAGS = "-default_F 10 -N 2 -oversample 1"


def test_expt_experiment_builds_what_a_one_experiment_copy_builds(tmp_path):
    doc = json.loads(TWO.read_text())
    one = dict(doc, experiment=[doc["experiment"][1]])
    p1, s1 = nbtorch.from_nanobragg_args(f"-expt {TWO} -expt_experiment 1 {FLAGS}")
    p0, s0 = nbtorch.from_nanobragg_args(f"-expt {TWO} {FLAGS}")
    pc, sc = nbtorch.from_nanobragg_args(f"-expt {_write(tmp_path, one)} {FLAGS}")
    assert s1 == sc
    for (name, a), (_, b) in zip(nbtorch.pytree.tree_leaves(p1), nbtorch.pytree.tree_leaves(pc)):
        assert torch.equal(a, b), name
    assert not torch.equal(p1.crystal.orientation, p0.crystal.orientation)  # experiment 1's own crystal
    _, _, extras = nbtorch.args.build(nbtorch.parse_args(f"-expt {TWO} {FLAGS}"))
    assert any("2 experiments; the first is simulated (give -expt_experiment K)" in n for n in extras.notes)


@pytest.mark.parametrize("flags,message", [
    (f"-expt {TWO} -expt_experiment 2 {FLAGS}", rf"^-expt_experiment 2: -expt {TWO} holds 2 experiments \(0 to 1\)$"),
    (f"-cell 50 -expt_experiment 1 {FLAGS}", r"^-expt_experiment 1 chooses what a DIALS experiment list gives: give "
                                             r"-expt FILE$"),
    (f"-cell 50 -expt_image 1 {FLAGS}", r"^-expt_image 1 chooses what a DIALS experiment list gives"),
    (f"-expt {TWO} -expt_image 20 {FLAGS}", rf"^-expt {TWO}: scan\[0\]\.image_range: no image 20 \(0-based\): the "
                                            r"scan has 20 images$"),
    (f"-expt {TWO} -expt_experiment -1 {FLAGS}", r"^-expt_experiment must be >= 0"),
])
def test_expt_choice_errors_are_one_line(flags, message):
    with pytest.raises(ValueError) as err:
        nbtorch.from_nanobragg_args(flags)
    assert "\n" not in str(err.value) and __import__("re").search(message, str(err.value)), str(err.value)


def test_single_axis_rotation_gives_spindle_phi_and_osc_of_image_k():
    doc = json.loads(TWO.read_text())
    g = doc["goniometer"][0]
    F, S = (np.array(g[k]).reshape(3, 3) for k in ("fixed_rotation", "setting_rotation"))
    params, setup = nbtorch.from_nanobragg_args(f"-expt {TWO} -expt_image 3 -phisteps 4 {FLAGS}")
    np.testing.assert_allclose(setup.spindle, S @ np.array(g["rotation_axis"]), rtol=0, atol=1e-15)
    start, width = doc["scan"][0]["properties"]["oscillation"][:2]
    width -= start
    assert setup.phi0 == start + 3 * width == 30.75  # image 3: start + 3·width
    assert (setup.phisteps, setup.phistep) == (4, width / 4)
    c = doc["crystal"][0]
    A = np.array([c["real_space_a"], c["real_space_b"], c["real_space_c"]]).T
    got = crystal_orientations(params, setup).A.numpy()  # rows a, b, c at each φ step
    for i in range(4):  # the lab crystal at φ is S·R(axis, φ)·F·A, as dxtbx
        phi = setup.phi0 + i * setup.phistep
        np.testing.assert_allclose(got[i], (S @ _rot(g["rotation_axis"], phi) @ F @ A).T, rtol=0, atol=1e-10)
    _, s0 = nbtorch.from_nanobragg_args(f"-expt {TWO} {FLAGS}")
    assert (s0.phi0, s0.phisteps, s0.phistep) == (30.0, 2, 0.125)  # default: the first image, -osc alone: 2 steps
    _, s1 = nbtorch.from_nanobragg_args(f"-expt {TWO} -expt_image 3 {FLAGS} -phi 5 -osc 1 -phisteps 1")
    assert (s1.phi0, s1.phistep) == (5.0, 1.0)  # flags after -expt override the scan


@pytest.mark.parametrize("scan_axis", [0, 1, 2])
def test_kappa_goniometer_spindle_is_the_dxtbx_composition(scan_axis, tmp_path):
    doc = json.loads(TWO.read_text())
    kappa = [0.914, 0.279, -0.296]
    axes, angles = [[1.0, 0.0, 0.0], kappa, [1.0, 0.0, 0.0]], [20.0, -35.0, 12.0]  # phi, kappa, omega
    doc["goniometer"] = [{"axes": axes, "angles": angles, "names": ["PHI", "KAPPA", "OMEGA"],
                          "scan_axis": scan_axis}]
    params, setup = nbtorch.from_nanobragg_args(f"-expt {_write(tmp_path, doc)} -expt_image 2 -phisteps 1 {FLAGS}")
    R = [_rot(a, t) for a, t in zip(axes, angles)]
    S = {0: R[2] @ R[1], 1: R[2], 2: np.eye(3)}[scan_axis]  # the axes above the scan axis, innermost first
    F = {0: np.eye(3), 1: R[0], 2: R[1] @ R[0]}[scan_axis]  # the axes below it
    np.testing.assert_allclose(setup.spindle, S @ (np.array(axes[scan_axis]) / np.linalg.norm(axes[scan_axis])),
                               rtol=0, atol=1e-12)
    assert setup.phi0 == 30.5 and setup.phistep == 0.25
    c = doc["crystal"][0]
    A = np.array([c["real_space_a"], c["real_space_b"], c["real_space_c"]]).T
    axis = np.array(axes[scan_axis]) / np.linalg.norm(axes[scan_axis])
    np.testing.assert_allclose(crystal_orientations(params, setup).A[0].numpy(),
                               (S @ _rot(axis, 30.5) @ F @ A).T, rtol=0, atol=1e-10)


def test_flags_written_back_name_the_experiment_and_image_and_rebuild_the_set_up(tmp_path):
    base = f"-expt {TWO} -expt_experiment 1 -expt_image 3 -phisteps 5 {FLAGS}"
    params, setup = nbtorch.from_nanobragg_args(base)
    flags = nbtorch.to_nanobragg_args(params, setup, base=base, matrix_path=str(tmp_path / "x.mat"))
    assert flags[:6] == ["-expt", str(TWO), "-expt_experiment", "1", "-expt_image", "3"]
    _, again = nbtorch.from_nanobragg_args(flags)
    assert again == setup
