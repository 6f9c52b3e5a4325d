"""DIALS experiment lists as nbtorch models (nbtorch.io.dials.read_experiments / write_experiments): round trips,
moved panels and groups in local frames, pixel positions against dxtbx's formula, crystal systems, goniometers and
scans, imagesets, shared models, one-line errors."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from nbtorch import crystal_orientations
from nbtorch.io.dials import ExptFileError, read_experiments, write_experiments
from nbtorch.panels import panel_lab_vectors
from nbtorch.simulate import pixel_lab_positions

DATA = Path(__file__).resolve().parents[1] / "data" / "dials"
ONE = DATA / "one_panel.expt"      # a still: one panel (sensor, untrusted rectangle), C 2 crystal, ML mosaicity, HDF5
TWO = DATA / "two_level.expt"      # root → two groups → two panels each; two lattices sharing every other model;
#                                    a goniometer with fixed and setting rotations, a 20-image scan, an ImageSequence


def _numbers_equal(a, b, where="", tol=1e-9):
    """Every key, string and list length equal; every number within ``tol`` (absolute)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), where
        for k in a:
            _numbers_equal(a[k], b[k], f"{where}.{k}", tol)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _numbers_equal(x, y, f"{where}[{i}]", tol)
    elif isinstance(a, (int, float)) and not isinstance(a, bool):
        assert isinstance(b, (int, float)) and abs(a - b) <= tol, (where, a, b)
    else:
        assert a == b, (where, a, b)


def _write(tmp_path, doc, name="x.expt"):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


# ----------------------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("source", [ONE, TWO], ids=["one-panel", "two-level"])
def test_expt_to_model_to_expt_is_equal_to_1e9_in_every_value(source, tmp_path):
    records = read_experiments(source)
    out = tmp_path / "out.expt"
    write_experiments(out, source, records)
    _numbers_equal(json.loads(source.read_text()), json.loads(out.read_text()))
    # the model read back is the same model
    again = read_experiments(out)
    for r, a in zip(records, again):
        for x, y in zip(torch.utils._pytree.tree_leaves(r.params), torch.utils._pytree.tree_leaves(a.params)):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_write_accepts_the_document_or_bytes_and_keeps_unrefined_experiments(tmp_path):
    doc = json.loads(TWO.read_text())
    records = read_experiments(TWO)
    p = records[1].params
    moved = records[1]._replace(params=p._replace(beam=p.beam._replace(wavelength=p.beam.wavelength * 1.001)))
    for i, source in enumerate((doc, TWO.read_bytes())):
        out = tmp_path / f"o{i}.expt"
        write_experiments(out, source, [moved])
        got = json.loads(out.read_text())
        assert got["beam"][0]["wavelength"] == pytest.approx(0.9795 * 1.001, rel=1e-15)
        _numbers_equal(doc["crystal"][0], got["crystal"][0])  # experiment 0 not given: its crystal kept
        assert [e["identifier"] for e in got["experiment"]] == ["lattice-0", "lattice-1"]
        assert got["imageset"] == doc["imageset"] and got["scan"] == doc["scan"]


# ----------------------------------------------------------------------------------------------------------------
# moved detectors


def _moved(record, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = record.params.detector
    G = d.group_shift.shape[0]
    det = d._replace(distance=d.distance + 1.7, beam_center=torch.tensor([0.4, -0.3], dtype=torch.float64),
                     rotation=torch.tensor([0.3, -0.5, 1.2], dtype=torch.float64), twotheta=d.twotheta + 2.0,
                     group_shift=torch.randn(G, 3, generator=g, dtype=torch.float64) * 0.2,
                     group_rotation=torch.randn(G, 3, generator=g, dtype=torch.float64) * 0.5)
    return record._replace(params=record.params._replace(detector=det))


@pytest.mark.parametrize("source", [ONE, TWO], ids=["one-panel", "two-level"])
def test_moved_panels_and_groups_written_in_local_frames_read_back_to_the_same_lab_vectors(source, tmp_path):
    rec = _moved(read_experiments(source)[0])
    want = panel_lab_vectors(rec.setup.panels, rec.params.detector, rec.setup.beam, rec.setup.twotheta_axis)
    out = tmp_path / "moved.expt"
    write_experiments(out, source, [rec])
    layout = read_experiments(out)[0].setup.panels
    for k, name in enumerate(("corner", "fast", "slow")):
        got = torch.tensor([getattr(p, name) for p in layout.panels], dtype=torch.float64)
        torch.testing.assert_close(got, want[k], rtol=0, atol=1e-9)


def test_a_moved_group_carries_its_panels_their_local_frames_unchanged(tmp_path):
    rec = read_experiments(TWO)[0]
    layout = rec.setup.panels
    q1 = layout.node_index("quad1")
    shift = torch.zeros_like(rec.params.detector.group_shift)
    rot = torch.zeros_like(shift)
    shift[q1], rot[q1] = torch.tensor([0.3, -0.2, 0.1]), torch.tensor([0.0, 0.0, 4.0])
    det = rec.params.detector._replace(group_shift=shift, group_rotation=rot)
    out = tmp_path / "q1.expt"
    write_experiments(out, TWO, [rec._replace(params=rec.params._replace(detector=det))])
    before, after = json.loads(TWO.read_text())["detector"][0], json.loads(out.read_text())["detector"][0]
    _numbers_equal(before["panels"], after["panels"])                       # panels keep their place in the group
    _numbers_equal(before["hierarchy"]["children"][0], after["hierarchy"]["children"][0])   # quad0 unmoved
    f = after["hierarchy"]["children"][1]["fast_axis"]  # local; the root's frame flips y and z: lab = (x, −y, −z)
    assert math.degrees(math.atan2(-f[1], f[0])) == pytest.approx(-2.0 + 4.0, abs=1e-9)  # lab −2° turned by +4°


# ----------------------------------------------------------------------------------------------------------------
# pixel positions: dxtbx's formula, composed by hand


def _dxtbx_pixel(doc, panel, x_px, y_px):
    """Lab position of pixel (x, y)'s centre: origin + x·fast + y·slow (mm), each node's frame d = [f s n | o]
    applied to its children (dxtbx's hierarchy), written out here independently of the reader."""
    det = doc["detector"][0]

    def frame(node):
        f, s = np.array(node["fast_axis"], float), np.array(node["slow_axis"], float)
        f, s = f / np.linalg.norm(f), s / np.linalg.norm(s)
        D = np.eye(4)
        D[:3, 0], D[:3, 1], D[:3, 2], D[:3, 3] = f, s, np.cross(f, s), node["origin"]
        return D

    def path(node, chain):
        for c in node["children"]:
            if c.get("panel") == panel:
                return chain + [node]
            if "children" in c:
                found = path(c, chain + [node])
                if found:
                    return found
        return None

    D = np.eye(4)
    for node in (path(det["hierarchy"], []) if "hierarchy" in det else []):
        D = D @ frame(node)
    p = det["panels"][panel]
    D = D @ frame(p)
    px, py = p["pixel_size"]
    return (D @ np.array([(x_px + 0.5) * px, (y_px + 0.5) * py, 0.0, 1.0]))[:3]


@pytest.mark.parametrize("source", [ONE, TWO], ids=["one-panel", "two-level"])
def test_pixel_lab_positions_equal_dxtbx_formula(source):
    doc = json.loads(source.read_text())
    rec = read_experiments(source)[0]
    setup = rec.setup.replace(thickness_um=0.0) if not rec.setup.has_sensor else rec.setup
    for panel in range(setup.n_panels):
        f = torch.tensor([0, 5, 15, 3])
        s = torch.tensor([0, 2, 11, 9])
        pos = pixel_lab_positions(rec.params, setup, f, s, panel=panel)
        if setup.has_sensor:  # the front layer of a thick sensor is the panel's plane
            pos = pos[:, :1]
        got = pos[:, 0, 0].numpy()
        want = np.stack([_dxtbx_pixel(doc, panel, int(x), int(y)) for x, y in zip(f, s)])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# beam, crystal, mosaicity, images


def test_beam_sensor_mask_and_mosaicity_of_a_still():
    (rec,) = read_experiments(ONE)
    direction = np.array([0.0012, -0.0007, 0.99999903])
    np.testing.assert_allclose(rec.setup.beam, -direction / np.linalg.norm(direction), rtol=0, atol=1e-15)
    assert float(rec.params.beam.wavelength) == 1.2781 and rec.setup.sources[0][0] == rec.setup.beam
    assert float(rec.params.beam.polarization) == pytest.approx(2 * 0.999 - 1, abs=1e-15)
    assert abs(np.dot(rec.setup.polar_axis, rec.setup.beam)) < 1e-15 and abs(rec.setup.polar_axis[1]) < 1e-15
    panel = rec.setup.panels.panels[0]
    assert panel.thickness_um == pytest.approx(450.0) and panel.mu_per_um == pytest.approx(3.9e-3)
    mask = np.frombuffer(rec.setup.mask, dtype=np.uint8).reshape(1, 40, 48)
    assert not mask[0, :, 10:12].any() and mask[0, :, :10].all() and mask[0, :, 12:].all()
    assert float(rec.params.crystal.mosaic_spread) == 0.031
    lengths = np.linalg.norm(np.array(rec.crystal.real_space), axis=1)
    np.testing.assert_allclose(rec.params.crystal.ncells.numpy(), 1450.5 / lengths, rtol=1e-14)
    assert rec.rotation is None and rec.setup.phistep == 0 and rec.identifier == "still-0"


def test_crystal_is_used_as_given():
    rec = read_experiments(ONE)[0]
    M = crystal_orientations(rec.params, rec.setup).A[0]  # rows a, b, c (Å)
    torch.testing.assert_close(M, torch.tensor(rec.crystal.real_space, dtype=torch.float64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("hall,system,cell", [
    (" P 1", "triclinic", "triclinic"), (" P 2y", "monoclinic", "monoclinic"), (" C 2y", "monoclinic", "monoclinic"),
    (" P 2", "monoclinic", "triclinic"),  # unique axis c: β is not the free angle
    (" P 2 2ab", "orthorhombic", "orthorhombic"), (" P 4 2", "tetragonal", "tetragonal"),
    (" R 3", "trigonal", "hexagonal"), (" P 3*", "trigonal", "triclinic"),  # R3 on rhombohedral axes
    (" P 6 2", "hexagonal", "hexagonal"), (" F 4 2 3", "cubic", "cubic"),
])
def test_crystal_system_from_the_space_group(hall, system, cell, tmp_path):
    doc = json.loads(ONE.read_text())
    doc["crystal"][0]["space_group_hall_symbol"] = hall
    rec = read_experiments(_write(tmp_path, doc))[0]
    assert (rec.crystal.crystal_system, rec.crystal.cell_system) == (system, cell)
    doc["crystal"][0].pop("space_group_hall_symbol")
    rec = read_experiments(_write(tmp_path, doc))[0]
    assert (rec.crystal.space_group, rec.crystal.crystal_system, rec.crystal.cell_system) == ("", "", "triclinic")


def test_image_sources_sets_sequences_and_hdf5_frames(tmp_path):
    assert read_experiments(ONE, image=1)[0].images.frame == 9
    one = read_experiments(ONE)[0].images
    assert (one.path, one.frame, one.index, one.count) == (str(DATA / "run7.h5"), 4, 0, 2)
    seq = read_experiments(TWO, image=3)[0].images
    assert (seq.path, seq.frame, seq.count) == (str(DATA / "data" / "rot_0008.cbf"), None, 20)  # image 5 + 3
    doc = json.loads(TWO.read_text())
    doc["imageset"][0]["template"] = "/abs/master.h5"
    assert read_experiments(_write(tmp_path, doc), image=3)[0].images.frame == 7  # image number 8 → frame 7
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rot_0005.cbf").write_bytes(b"")
    doc = json.loads(TWO.read_text())
    assert read_experiments(_write(tmp_path, doc), check_images=True)[0].images.path.endswith("rot_0005.cbf")


# ----------------------------------------------------------------------------------------------------------------
# rotation experiments


def _rot(axis, deg):
    u = np.asarray(axis, float) / np.linalg.norm(axis)
    t = math.radians(deg)
    K = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return np.eye(3) + math.sin(t) * K + (1 - math.cos(t)) * K @ K


def _dxtbx_orientation(doc, k, phi, F=None, S=None, axis=None):
    """Rows a, b, c of the lab crystal at φ: (S·R(axis, φ)·F·A) applied to the file's real-space vectors."""
    g = doc["goniometer"][0]
    F = np.array(g["fixed_rotation"]).reshape(3, 3) if F is None else F
    S = np.array(g["setting_rotation"]).reshape(3, 3) if S is None else S
    axis = g["rotation_axis"] if axis is None else axis
    c = doc["crystal"][doc["experiment"][k]["crystal"]]
    A = np.array([c["real_space_a"], c["real_space_b"], c["real_space_c"]]).T
    return (S @ _rot(axis, phi) @ F @ A).T


def test_rotation_experiment_spindle_and_phi_range_reproduce_dxtbx_orientation():
    doc = json.loads(TWO.read_text())
    for k, rec in enumerate(read_experiments(TWO, image=7)):
        S = np.array(doc["goniometer"][0]["setting_rotation"]).reshape(3, 3)
        np.testing.assert_allclose(rec.setup.spindle, S @ [1.0, 0.0, 0.0], rtol=0, atol=1e-15)
        assert (rec.setup.phi0, rec.setup.phistep, rec.setup.phisteps) == (31.75, 0.25, 1)
        assert (rec.rotation.phi_start, rec.rotation.phi_width, rec.rotation.image_range) == (31.75, 0.25, (5, 24))
        setup = rec.setup.replace(phisteps=2, phistep=0.125)  # the image's oscillation in two steps
        A = crystal_orientations(rec.params, setup).A
        for i, phi in enumerate((31.75, 31.875)):
            np.testing.assert_allclose(A[i].numpy(), _dxtbx_orientation(doc, k, phi), rtol=0, atol=1e-10)


def test_multi_axis_goniometer_composes_fixed_and_setting_rotations(tmp_path):
    doc = json.loads(TWO.read_text())
    kappa = [0.914, 0.0, 0.406]
    axes, angles = [[1.0, 0.0, 0.0], kappa, [1.0, 0.0, 0.0]], [20.0, -35.0, 12.0]  # phi, kappa, omega
    for scan_axis in (0, 2):
        doc["goniometer"] = [{"axes": axes, "angles": angles, "names": ["PHI", "KAPPA", "OMEGA"],
                              "scan_axis": scan_axis}]
        rec = read_experiments(_write(tmp_path, doc))[0]
        R = [_rot(a, t) for a, t in zip(axes, angles)]
        F = np.eye(3) if scan_axis == 0 else R[1] @ R[0]
        S = R[2] @ R[1] if scan_axis == 0 else np.eye(3)
        np.testing.assert_allclose(rec.setup.spindle, S @ axes[scan_axis], rtol=0, atol=1e-15)
        A = crystal_orientations(rec.params, rec.setup).A[0].numpy()
        np.testing.assert_allclose(A, _dxtbx_orientation(doc, 0, 30.0, F, S, axes[scan_axis]), rtol=0, atol=1e-10)


def test_legacy_scan_oscillation_and_a_still_with_a_goniometer(tmp_path):
    doc = json.loads(TWO.read_text())
    doc["scan"][0] = {"image_range": [5, 24], "oscillation": [-10.0, 0.5], "exposure_time": [0.1], "epochs": [0.0]}
    rec = read_experiments(_write(tmp_path, doc), image=4)[0]
    assert (rec.setup.phi0, rec.setup.phistep) == (-8.0, 0.5)
    doc = json.loads(TWO.read_text())
    for e in doc["experiment"]:
        e.pop("scan")
    doc["imageset"][0] = {"__id__": "ImageSet", "images": ["a.cbf"]}
    rec = read_experiments(_write(tmp_path, doc))[0]
    assert (rec.setup.phi0, rec.setup.phistep) == (0.0, 0.0) and rec.rotation.image_range is None


# ----------------------------------------------------------------------------------------------------------------
# shared models


def test_shared_models_stay_shared_and_must_agree_when_written(tmp_path):
    a, b = read_experiments(TWO)
    assert a.setup.panels is b.setup.panels and a.models.detector == b.models.detector == 0
    assert a.beam is b.beam and a.images == b.images and a.crystal != b.crystal
    out = tmp_path / "both.expt"
    write_experiments(out, TWO, [_moved(a), _moved(b)])  # the same refined detector: written once
    with pytest.raises(ValueError, match="experiments 0 and 1 share detector 0"):
        write_experiments(out, TWO, [_moved(a, seed=1), _moved(b, seed=2)])
    again = read_experiments(out)[0].setup.panels  # the refused write left the earlier file as it was
    want = panel_lab_vectors(a.setup.panels, _moved(a).params.detector, a.setup.beam, a.setup.twotheta_axis)[0]
    got = torch.tensor([p.corner for p in again.panels], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


def test_a_record_of_another_list_is_refused(tmp_path):
    rec = read_experiments(ONE)[0]
    with pytest.raises(ValueError, match="experiment 0 does not match the experiment list written"):
        write_experiments(tmp_path / "x.expt", TWO, [rec])
    doc = json.loads(ONE.read_text())
    doc["detector"][0]["panels"].append(doc["detector"][0]["panels"][0])
    with pytest.raises(ValueError, match="panels are not detector 0's"):
        write_experiments(tmp_path / "x.expt", doc, [rec])
    assert not (tmp_path / "x.expt").exists()


# ----------------------------------------------------------------------------------------------------------------
# one-line errors naming the file and the key


def _del(*keys):
    def edit(doc):
        node = doc
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]
    return edit


def _set(value, *keys):
    def edit(doc):
        node = doc
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return edit


BAD = [
    (_del("crystal", 0, "real_space_b"), {}, r"crystal\[0\]\.real_space_b: missing"),
    (_del("experiment", 0, "detector"), {}, r"experiment\[0\]\.detector: missing"),
    (_set("Imagefile", "imageset", 0, "__id__"), {}, r"imageset\[0\]\.__id__: unknown __id__ 'Imagefile'"),
    (_set("TOFBeam", "beam", 0, "__id__"), {}, r"beam\[0\]\.__id__: unknown __id__ 'TOFBeam'"),
    (_del("goniometer", 0, "rotation_axis"), {}, r"goniometer\[0\]\.rotation_axis: missing"),
    (_set([1.0] * 9, "goniometer", 0, "fixed_rotation"), {}, r"goniometer\[0\]\.fixed_rotation: expected a rotation"),
    (_set([24, 5], "scan", 0, "image_range"), {}, r"scan\[0\]\.image_range: the last image"),
    (_del("imageset", 0, "template"), {}, r"imageset\[0\]\.template: missing"),
    (_set("X 9", "crystal", 1, "space_group_hall_symbol"), {}, r"crystal\[1\]\.space_group_hall_symbol: not a Hall"),
    (_set([0.0, 0.0, 5.0], "beam", 0, "polarization_normal"), {}, r"beam\[0\]\.polarization_normal: along the beam"),
    (_set([-12.1, 35.7, -8.3], "crystal", 0, "real_space_a"), {}, r"crystal\[0\]: .*left-handed"),
    (lambda doc: None, {"image": 20}, r"scan\[0\]\.image_range: no image 20 \(0-based\): the scan has 20 images"),
    (lambda doc: None, {"check_images": True}, r"imageset\[0\]\.template: image file .*rot_0005.cbf' not found"),
]


@pytest.mark.parametrize("edit,kw,message", BAD, ids=[m.split(":")[0].replace("\\", "") for _, _, m in BAD])
def test_bad_files_give_one_line_errors_naming_file_and_key(edit, kw, message, tmp_path):
    doc = json.loads(TWO.read_text())
    edit(doc)
    path = _write(tmp_path, doc, "bad.expt")
    with pytest.raises(ExptFileError) as info:
        read_experiments(path, **kw)
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"{path}: "), text
    assert __import__("re").search(message, text), text


def test_missing_image_of_an_imageset_and_a_bad_image_index(tmp_path):
    with pytest.raises(ExptFileError, match=r"one_panel.expt: imageset\[0\]\.images\[0\]: image file .* not found"):
        read_experiments(ONE, check_images=True)
    with pytest.raises(ExptFileError, match=r"imageset\[0\]\.images: no image 2 \(0-based\): the imageset has 2"):
        read_experiments(ONE, image=2)
    with pytest.raises(ValueError, match="image must be an integer >= 0"):
        read_experiments(ONE, image=-1)
    doc = copy.deepcopy(json.loads(ONE.read_text()))
    doc["imageset"][0]["single_file_indices"] = [4]
    with pytest.raises(ExptFileError, match=r"imageset\[0\]\.single_file_indices: expected 2 values, got 1"):
        read_experiments(_write(tmp_path, doc))
