"""CrystFEL geometry files as real detectors come (tests/data/crystfel/README.md): a Jungfrau 16M of 32 left-handed
modules, a CSPAD in Cheetah's CXI layout (camera length and photon energy from the data file, quadrants → 2×1
sensors → ASICs, a mask in the data file), an Eiger 16M read with 2 × 2 binning (bad strips between modules); masks
in their own files; bad files as one line naming the file, line and key.  CrystFEL's own example files are read too
where NBTORCH_CRYSTFEL_EXAMPLES names a folder holding them."""
from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import nbtorch
from nbtorch.detector import panel_frames, with_panels
from nbtorch.io.crystfel import (
    GeometryFileError,
    Group,
    data_file_masks,
    geometry_mask,
    moved_geometry,
    panel_normal,
    panels_to_slab,
    read_geom,
    slab_shape,
    slab_to_panels,
    write_geom,
)
from nbtorch.panels import layout_from_crystfel
from nbtorch.units import HC_EV_ANGSTROM

DATA = Path(__file__).resolve().parents[1] / "data" / "crystfel"
JF, CSPAD, EIGER = DATA / "jf16m.geom", DATA / "cspad_cxi.geom", DATA / "eiger16m_bin2.geom"
ENCODER_MM, ENERGY_EV = -432.0, 9500.0  # the CSPAD file's data-file values, as a run would record them
CSPAD_VALUES = {"clen": ENCODER_MM, "photon_energy_eV": ENERGY_EV}
BEAM_Z = "-default_F 100 -cell 50 60 70 90 95 90 -N 5 -lambda 1 -misset 10 20 30 -beam_vector 0 0 1 " \
         "-polar_vector 1 0 0 -polar 0.7"


def _line(path: Path, start: str) -> int:
    """The 1-based number of the first line of ``path`` that starts with ``start``."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if line.startswith(start))


def _error(path, **kwargs) -> str:
    with pytest.raises(GeometryFileError) as info:
        mask = kwargs.pop("mask", None)
        geometry_mask(read_geom(path, **kwargs), **mask) if mask is not None else read_geom(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def _panel_setup(geometry, extra: str = ""):
    params, setup = nbtorch.from_nanobragg_args(f"{BEAM_Z} {extra} -fdet_vector 1 0 0 -sdet_vector 0 1 0 "
                                                "-odet_vector 0 0 1 -distance 100 -detpixels 8 -pixel 0.1",
                                                dtype=torch.float64)
    return with_panels(params, setup, layout_from_crystfel(geometry))


# ----------------------------------------------------------------------------------------------------------------
# Jungfrau 16M: 32 left-handed modules


def test_jungfrau_16m_is_32_modules_stacked_along_slow():
    g = read_geom(JF)
    assert [p.name for p in g.panels] == [f"m{k}" for k in range(32)]
    assert {(p.n_fast, p.n_slow) for p in g.panels} == {(1030, 514)}
    assert [p.min_ss for p in g.panels] == [514 * k for k in range(32)]
    assert slab_shape(g) == (16448, 1030)
    assert g.photon_energy_eV == 6000.0
    assert g.panels[0].pixel_size == pytest.approx(1000 / 13333.3, rel=1e-15)
    assert [p.corner[2] for p in g.panels] == pytest.approx([97.5 - 0.085] * 32, rel=1e-14)
    layout = layout_from_crystfel(g)
    assert layout.depth == 1 and [layout.nodes[i].name for i in layout.nodes_at_level(1)] == [p.name for p in g.panels]


def test_jungfrau_left_handed_modules_face_away_from_the_sample():
    g = read_geom(JF)
    fs_x_ss_z = [p.fs[0] * p.ss[1] - p.fs[1] * p.ss[0] for p in g.panels]
    assert max(fs_x_ss_z) < -0.99  # the premise: every module's fs × ss points back to the sample
    assert all(float(panel_normal(p)[2]) > 0.999 for p in g.panels)
    params, setup = _panel_setup(g)
    assert {p.facing for p in setup.panels.panels} == {-1.0}
    fr = panel_frames(params.detector, setup)
    assert bool((fr.odet[:, 2] > 0.999).all())
    assert fr.close.numpy() == pytest.approx(np.full(32, 97.415), abs=0.05)  # modules tilt by < 0.1°


def test_a_left_handed_module_simulates_as_its_right_handed_description():
    """Two cropped Jungfrau modules either side of the beam, as the file gives them and described right-handed
    (fs reversed, corner at the far end of the first row): the images are mirror images along fast.  (One sample per
    pixel: with more, Ω and polarization are nanoBragg's, at the sub-pixel nearest the corner of pixel (0, 0).)"""
    g = read_geom(JF)
    crop = tuple(replace(g.panel(n), max_fs=g.panel(n).min_fs + 11, max_ss=g.panel(n).min_ss + 9)
                 for n in ("m13", "m14"))
    flip = tuple(replace(p, fs=tuple(-c for c in p.fs), corner_x=p.corner_x + 12 * p.fs[0],
                         corner_y=p.corner_y + 12 * p.fs[1]) for p in crop)
    images, facing = [], []
    for panels in (crop, flip):
        geometry = replace(g, panels=panels, groups=(replace(g.groups[-1], members=("m13", "m14")),),
                           bad_regions=())
        params, setup = _panel_setup(geometry, "-oversample 1")
        images.append(nbtorch.simulate(params, setup, fused=False))
        facing.append([p.facing for p in setup.panels.panels])
    assert facing == [[-1.0, -1.0], [1.0, 1.0]]
    assert images[0].shape == (2, 10, 12) and float(images[0].min()) > 0
    torch.testing.assert_close(images[1], images[0].flip(-1), rtol=1e-9, atol=1e-12 * float(images[0].max()))


def _write_jf_mask(path: Path, bad_slab: np.ndarray) -> None:
    with h5py.File(path, "w") as h5:  # mask_good = 1, mask_bad = 0: 1 is a good pixel
        h5.create_dataset("mask", data=(~bad_slab).astype(np.uint8), compression="gzip")


def _jf_bad_slab(g) -> np.ndarray:
    """The Jungfrau file's own bad regions (bad_bs_…) in its data layout."""
    bad = np.zeros(slab_shape(g), dtype=bool)
    for r in g.bad_regions:
        bad[r.ss[0]:r.ss[1] + 1, r.fs[0]:r.fs[1] + 1] = True
    return bad


def test_jungfrau_mask_file_and_beamstop_regions_mask_pixels(tmp_path, monkeypatch):
    g = read_geom(JF)
    assert [r.panel for r in g.bad_regions] == ["m13", "m14", "m17", "m18"]
    hot = np.zeros(slab_shape(g), dtype=bool)
    hot[[5, 600, 16447], [7, 1029, 0]] = True  # three pixels the mask file marks
    _write_jf_mask(tmp_path / "jf16m.mask.h5", hot)
    copy = tmp_path / "jf16m.geom"
    shutil.copy(JF, copy)
    mask = geometry_mask(read_geom(copy))  # found next to the geometry file
    want = slab_to_panels(~(hot | _jf_bad_slab(g)), g).astype(np.uint8)
    assert mask.shape == (32, 514, 1030) and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, want)
    assert int((mask == 0).sum()) == 3 + sum((r.fs[1] - r.fs[0] + 1) * (r.ss[1] - r.ss[0] + 1) for r in g.bad_regions)
    monkeypatch.chdir(tmp_path)  # or in the working directory, as CrystFEL looks for it
    np.testing.assert_array_equal(geometry_mask(read_geom(JF)), want)


def test_jungfrau_missing_mask_file_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = _error(JF, mask={})
    assert message.startswith(f"{JF}, line {_line(JF, 'mask_file')}: mask_file: mask file 'jf16m.mask.h5' not "
                              "found"), message
    read_geom(JF)  # reading the geometry alone does not need the mask


def test_mask_file_without_its_location_or_too_small_is_an_error(tmp_path):
    g = read_geom(JF)
    with h5py.File(tmp_path / "jf16m.mask.h5", "w") as h5:
        h5["other"] = np.ones((4, 4), np.uint8)
        h5["small"] = np.ones((100, 1030), np.uint8)
    copy = tmp_path / "jf16m.geom"
    copy.write_text(JF.read_text())
    assert re.search(r", line 13: mask_file: mask file .*jf16m\.mask\.h5 has no dataset /mask$", _error(copy, mask={}))
    copy.write_text(JF.read_text().replace("mask = /mask", "mask = /small"))
    assert re.search(r"line 13: mask_file: /small in mask file .* is uint8 \[100, 1030\]; panel 'm0' needs integers "
                     r"of at least \[514, 1030\]$", _error(copy, mask={}))
    assert read_geom(copy).panels[0].masks[0].data == "/small" and len(g.panels) == 32


# ----------------------------------------------------------------------------------------------------------------
# CSPAD in CXI format: clen from the data file, three levels of groups, a mask in the data file


def _cspad_data_file(path: Path, mask_frames=None) -> Path:
    with h5py.File(path, "w") as h5:
        h5["LCLS/detector_1/EncoderValue"] = np.array([ENCODER_MM - 1.0, ENCODER_MM])  # one value per frame
        h5["LCLS/photon_energy_eV"] = ENERGY_EV
        if mask_frames is not None:
            h5["entry_1/data_1/mask"] = mask_frames
    return path


def test_cspad_camera_length_comes_from_the_data_file(tmp_path):
    message = _error(CSPAD, photon_energy_eV=ENERGY_EV)
    assert message.startswith(f"{CSPAD}, line {_line(CSPAD, 'clen')}: clen: the camera length is read from the data "
                              "file (/LCLS/detector_1/EncoderValue)"), message
    message = _error(CSPAD, clen=ENCODER_MM)
    assert message.startswith(f"{CSPAD}, line {_line(CSPAD, 'photon_energy')}: photon_energy: "), message
    g = read_geom(CSPAD, **CSPAD_VALUES)
    assert [p.corner[2] for p in g.panels] == pytest.approx([ENCODER_MM + 581.2] * 64, rel=1e-14)
    assert g.photon_energy_eV == ENERGY_EV
    h5 = _cspad_data_file(tmp_path / "run.cxi")
    assert read_geom(CSPAD, data_file=h5, frame=1) == g
    assert read_geom(CSPAD, data_file=h5, frame=0).panels[0].corner[2] == pytest.approx(ENCODER_MM - 1 + 581.2)
    assert read_geom(CSPAD, data_file=h5, clen=-400.0).panels[0].corner[2] == pytest.approx(181.2)  # given wins
    message = _error(CSPAD, data_file=h5, frame=2)
    assert "clen: /LCLS/detector_1/EncoderValue in " in message and "has 2 values; there is no frame 2" in message
    in_metres = _edited(tmp_path, CSPAD, "EncoderValue   ;", "EncoderValue m ;")  # a location's unit: m
    with h5py.File(tmp_path / "run_m.cxi", "w") as f:
        f["LCLS/detector_1/EncoderValue"] = ENCODER_MM / 1000
    in_m = read_geom(in_metres, data_file=tmp_path / "run_m.cxi", photon_energy_eV=ENERGY_EV)
    assert [p.corner for p in in_m.panels] == [p.corner for p in g.panels]
    message = _error(CSPAD, data_file=tmp_path / "none.h5")
    assert message == f"{CSPAD}, line {_line(CSPAD, 'clen')}: clen: the data file {tmp_path / 'none.h5'} not found"
    (tmp_path / "text.h5").write_text("not HDF5")
    message = _error(CSPAD, data_file=tmp_path / "text.h5")
    assert message.startswith(f"{CSPAD}, line {_line(CSPAD, 'clen')}: clen: cannot read the data file "), message
    assert "text.h5 as HDF5" in message


def test_cspad_quadrants_hold_two_by_ones_that_hold_asics():
    g = read_geom(CSPAD, **CSPAD_VALUES)
    assert len(g.panels) == 64 and {(p.n_fast, p.n_slow) for p in g.panels} == {(194, 185)}
    assert slab_shape(g) == (1480, 1552)
    assert g.groups_at_level(1) == ("q0", "q1", "q2", "q3")
    layout = layout_from_crystfel(g)
    assert layout.depth == 3 and len(layout.nodes) == 4 + 32 + 64
    names = [p.name for p in layout.panels]
    for i in layout.nodes_at_level(1):
        node = layout.nodes[i]
        assert node.parent == -1 and [names[p] for p in node.panels] == [f"{node.name}a{a}" for a in range(16)]
    for i in layout.nodes_at_level(2):
        node, j = layout.nodes[i], int(layout.nodes[i].name[1:])
        assert layout.nodes[node.parent].name == f"q{j // 8}"
        assert [names[p] for p in node.panels] == [f"q{j // 8}a{2 * (j % 8) + h}" for h in (0, 1)]
    leaves = [layout.nodes[i] for i in layout.nodes_at_level(3)]
    assert sorted(n.name for n in leaves) == sorted(names)
    assert all(layout.nodes[n.parent].name == f"a{8 * int(n.name[1]) + int(n.name[3:]) // 2}" for n in leaves)
    assert {p.facing for p in layout.panels} == {1.0}


def test_cspad_mask_in_the_data_file_applies_when_that_file_is_given(tmp_path):
    g = read_geom(CSPAD, **CSPAD_VALUES)
    assert data_file_masks(g) == ("/entry_1/data_1/mask",)
    np.testing.assert_array_equal(geometry_mask(g), 1)  # simulating only: left out
    frames = np.zeros((2, 1480, 1552), dtype=np.uint16)
    frames[1, [0, 184, 185, 1479], [0, 193, 1551, 800]] = [1, 0x8000, 0x0100, 2]  # mask_bad = 0xffff
    h5 = _cspad_data_file(tmp_path / "run.cxi", frames)
    np.testing.assert_array_equal(geometry_mask(g, h5, frame=0), 1)
    mask = geometry_mask(g, h5, frame=1)
    np.testing.assert_array_equal(panels_to_slab(mask, g), (frames[1] == 0).astype(np.uint8))
    assert int((mask == 0).sum()) == 4


# ----------------------------------------------------------------------------------------------------------------
# Eiger 16M, binned: one panel, strips between modules


def test_eiger_16m_binned_strips_between_modules_are_masked():
    g = read_geom(EIGER)
    (p,) = g.panels
    assert (p.n_fast, p.n_slow, p.fs, p.ss) == (2075, 2182, (1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
    assert p.corner[2] == 100.0 and g.photon_energy_eV == 22000.0 and p.pixel_size == pytest.approx(0.15, rel=1e-6)
    want = np.ones((2182, 2075), dtype=np.uint8)  # 4 × 8 modules of 515 × 257, gaps of 5 (fast) and 18 (slow)
    for j in range(1, 4):
        want[:, 520 * j - 5:520 * j] = 0
    for j in range(1, 8):
        want[275 * j - 18:275 * j, :] = 0
    mask = geometry_mask(g)
    np.testing.assert_array_equal(mask[0], want)
    assert int(mask.sum()) == 4 * 8 * 515 * 257


# ----------------------------------------------------------------------------------------------------------------
# every file: write → read gives the same panels, groups and masks


@pytest.mark.parametrize("path, kwargs", [(JF, {}), (CSPAD, CSPAD_VALUES), (EIGER, {})], ids=["jf", "cspad", "eiger"])
def test_write_read_round_trip_keeps_every_panel(tmp_path, path, kwargs):
    g = read_geom(path, **kwargs)
    out = tmp_path / "out.geom"
    write_geom(out, g)
    back = read_geom(out, **kwargs)
    assert back == g
    assert [dict(vars(p)) for p in back.panels] == [dict(vars(p)) for p in g.panels]
    assert layout_from_crystfel(back) == layout_from_crystfel(g)
    if path != JF:  # the Jungfrau's mask file is not next to the written copy
        np.testing.assert_array_equal(geometry_mask(back), geometry_mask(g))


# ----------------------------------------------------------------------------------------------------------------
# bad files: one line naming the file, line and key


def _edited(tmp_path, path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert old in text
    out = tmp_path / path.name
    out.write_text(text.replace(old, new, 1))
    return out


@pytest.mark.parametrize("path, old, new, line_of, key, problem", [
    (JF, "m7/corner_y = ", ";", "m7/min_fs", "m7/corner_y", "panel 'm7' has no corner_y"),
    (JF, "m7/fs = ", "m7/fs = +0.0x +0.0y ;", "m7/ss", "m7/fs", "a zero-length vector"),
    (JF, "m7/ss = ", "m7/ss = 0.0x -1.0y ;", "m7/ss", "m7/ss", "not orthogonal (angle 0.0"),
    (JF, "m7/ss = ", "m7/ss = 0.0x +1.0y ;", "m7/ss", "m7/ss", "not orthogonal (angle 179.9"),
    (JF, "m7/ss = ", "m7/ss = -1.0x -0.3y ;", "m7/ss", "m7/ss", "not orthogonal"),
    (JF, "m7/min_ss = 3598.0", "m7/min_ss = 3597", "m7/max_ss", "m7/min_fs", "overlaps panel 'm6'"),
    (CSPAD, "q1a0/min_fs = 388", "q1a0/min_fs = 387", "q1a0/max_ss", "q1a0/min_fs", "overlaps panel 'q0a1'"),
    (CSPAD, "group_q3 = a24,", "group_q3 = a32,a24,", "group_q3", "group_q3", "unknown member 'a32'"),
    (CSPAD, "group_a5 = q0a10,q0a11", "group_a5 = q0a10,q0a11,q0a12", "group_a6", "group_a6",
     "'q0a12' is already in group 'a5'"),
    (EIGER, "bad_h6/max_fs = 2074", "bad_h6/max_fs = 2075", "bad_h6/max_ss", "bad_h6/max_fs", "is not inside panel"),
    (EIGER, "panel0/fs = x", "panel0/fs = x\npanel0/mask_edge_pixels = -1", "panel0/mask_edge",
     "panel0/mask_edge_pixels", "must be >= 0"),
])
def test_bad_real_files_get_one_line_naming_file_line_and_key(tmp_path, path, old, new, line_of, key, problem):
    bad = _edited(tmp_path, path, old, new)
    message = _error(bad, **(CSPAD_VALUES if path == CSPAD else {}))
    assert message.startswith(f"{bad}, line {_line(bad, line_of)}: {key}: "), message
    assert problem in message, message


def test_slightly_skewed_steps_of_real_files_are_kept(tmp_path):
    """The Jungfrau's steps are neither unit length nor exactly orthogonal; a skew of 0.3° reads and stays."""
    g = read_geom(JF)
    cos = [abs(sum(a * b for a, b in zip(p.fs, p.ss))) / math.dist(p.fs, (0, 0, 0)) / math.dist(p.ss, (0, 0, 0))
           for p in g.panels]
    assert 1e-4 < max(cos) < 0.01 and {round(math.dist(p.fs, (0, 0, 0)), 2) for p in g.panels} == {1.0}
    skewed = _edited(tmp_path, JF, "m7/ss = ", "m7/ss = -1.0x +0.005y ;")
    assert read_geom(skewed).panel("m7").ss == (-1.0, 0.005, 0.0)


def test_mask_edge_pixels_marks_a_border(tmp_path):
    g = read_geom(_edited(tmp_path, EIGER, "panel0/fs = x", "panel0/fs = x\npanel0/mask_edge_pixels = 2"))
    mask = geometry_mask(g)[0]
    assert mask[:2].max() == 0 and mask[-2:].max() == 0 and mask[:, :2].max() == 0 and mask[:, -2:].max() == 0
    assert mask[2, 2] == 1 and mask[-3, -3] == 1
    assert int(mask.sum()) == int(geometry_mask(read_geom(EIGER))[0, 2:-2, 2:-2].sum())


def test_wavelength_from_the_data_file_in_metres(tmp_path):
    geom = _edited(tmp_path, EIGER, "photon_energy = 22000", "wavelength = /beam/wavelength m")
    with h5py.File(tmp_path / "image.h5", "w") as h5:
        h5["beam/wavelength"] = 0.9e-10
    g = read_geom(geom, data_file=tmp_path / "image.h5")
    assert g.photon_energy_eV == pytest.approx(HC_EV_ANGSTROM / 0.9, rel=1e-14)
    assert _error(geom).endswith("give its value (photon_energy_eV=…) or the data file")
    with h5py.File(tmp_path / "image.h5", "w") as h5:
        h5["beam/other"] = 1.0
    message = _error(geom, data_file=tmp_path / "image.h5")
    assert message.startswith(f"{geom}, line {_line(geom, 'wavelength')}: wavelength: the data file "), message
    assert message.endswith("image.h5 has no dataset /beam/wavelength")


def test_older_rigid_group_files_from_geoptimiser_days(tmp_path):
    """Habits of files written for geoptimiser (CrystFEL < 0.10): a collection naming rigid groups the file no longer
    defines (CrystFEL now ignores these lines; they are kept as written), two rigid groups with the same panels
    (nested, the later inside), a panel called ``0`` and an x/y beam-stop region."""
    text = ("clen = 0.120\nphoton_energy = 12000\nres = 5000\n\n"
            "rigid_group_q0 = p0a0,p0a1\nrigid_group_p0 = p0a0,p0a1\n"
            "rigid_group_collection_quadrants = q0,q1,q2,q3\nrigid_group_collection_asics = p0,p1,p2,p3\n\n")
    for a in range(2):
        text += (f"p0a{a}/min_fs = 0\np0a{a}/min_ss = {64 * a}\np0a{a}/max_fs = 127\np0a{a}/max_ss = {64 * a + 63}\n"
                 f"p0a{a}/fs = +0.001590x -0.999999y\np0a{a}/ss = +0.999999x +0.001590y\n"
                 f"p0a{a}/corner_x = {-110.0 + 65 * a}\np0a{a}/corner_y = 175.6\n\n")
    path = tmp_path / "agipd.geom"
    path.write_text(text)
    g = read_geom(path)
    assert g.rigid_group_collections == (("quadrants", ("q0", "q1", "q2", "q3")), ("asics", ("p0", "p1", "p2", "p3")))
    layout = layout_from_crystfel(g)
    assert [(n.name, n.level) for n in layout.nodes] == [("q0", 1), ("p0", 2), ("p0a0", 3), ("p0a1", 3)]
    write_geom(tmp_path / "out.geom", g)
    assert read_geom(tmp_path / "out.geom") == g
    pilatus = tmp_path / "pilatus.geom"
    pilatus.write_text("photon_energy = 12688\nclen = 0.125 \ncoffset=0 \nres = 5814.0  ; 172 um\nrigid_group_q0 = 0\n"
                       "rigid_group_a0 = 0\nrigid_group_collection_quadrants = q0\n0/min_fs = 0\n0/max_fs = 99\n"
                       "0/min_ss = 0\n0/max_ss = 79\n0/corner_x = -50\n0/corner_y = -40\n0/fs = x\n0/ss = y\n"
                       "bad_beamstop/min_x = -50\nbad_beamstop/max_x = 2\nbad_beamstop/min_y = -6\n"
                       "bad_beamstop/max_y = 4\n")
    g = read_geom(pilatus)
    assert [n.name for n in layout_from_crystfel(g).nodes] == ["q0", "a0", "0"]
    mask = geometry_mask(g)[0]  # pixel corners strictly inside -50 < x < 2, -6 < y < 4: fs 1..51, ss 35..43
    assert int((mask == 0).sum()) == 51 * 9 and mask[35:44, 1:52].max() == 0


def test_older_keys_and_a_rigid_group_named_like_its_panel(tmp_path):
    """Keys of CrystFEL before 0.10 (photon_energy_bandwidth, photon_energy_scale, per-panel rail_direction and
    clen_for_centering) are kept, the scale applied; a rigid group named like its one panel is that panel."""
    path = tmp_path / "jf4m.geom"
    path.write_text("photon_energy = 11500 ;11560 eV   ; a comment\nphoton_energy_bandwidth = 0.01\n"
                    "photon_energy_scale = 1.002\nadu_per_photon = 1\nclen = 0.1766 ;0.1756 ;0.1771\n"
                    "res = 13333.3   ; 75 um\nflag_morethan = 2100000000\nrail_direction = z\n"
                    "clen_for_centering = 0.1\n\nrigid_group_detector = detector\n"
                    "rigid_group_collection_detector = detector\n\n"
                    "detector/min_fs = 0\ndetector/max_fs = 99\ndetector/min_ss = 0\ndetector/max_ss = 79\n"
                    "detector/fs = +1.000000x +0.000063y\ndetector/ss = -0.000063x +1.000000y\n"
                    "detector/corner_x = -50.3\ndetector/corner_y = -40.1\n\nbad_v_0/min_fs = 25\n"
                    "bad_v_0/min_ss = 0\nbad_v_0/max_fs = 26\nbad_v_0/max_ss = 79\n\ndetector/coffset = -0.000118\n")
    g = read_geom(path)
    assert g.photon_energy_eV == pytest.approx(11500 * 1.002, rel=1e-15)
    assert g.groups == (Group("all", ("detector",)),) and g.rigid_groups == (("detector", ("detector",)),)
    assert dict(g.panels[0].extra)["rail_direction"] == "z" and g.panels[0].corner[2] == pytest.approx(176.482)
    assert int((geometry_mask(g) == 0).sum()) == 2 * 80
    write_geom(tmp_path / "out.geom", g)
    assert read_geom(tmp_path / "out.geom") == g


def test_detector_shift_moves_every_panel(tmp_path):
    path = _edited(tmp_path, EIGER, "clen = 0.1", "clen = 0.1\ndetector_shift_x = 1.5 mm\ndetector_shift_y = -0.002")
    g, plain = read_geom(path), read_geom(EIGER)
    assert np.subtract(g.panels[0].corner, plain.panels[0].corner) == pytest.approx([1.5, -2.0, 0.0], abs=1e-12)
    assert g.panels[0].corner_x == plain.panels[0].corner_x
    write_geom(tmp_path / "out.geom", g)
    assert read_geom(tmp_path / "out.geom") == g
    p = g.panels[0]
    assert moved_geometry(g, [p.corner], [p.fs_step], [p.ss_step]).panels[0].corner_x == pytest.approx(p.corner_x,
                                                                                                      rel=1e-14)
    located = _edited(tmp_path, EIGER, "clen = 0.1", "clen = 0.1\ndetector_shift_x = /shift/x")
    message = _error(located)
    assert message.startswith(f"{located}, line {_line(located, 'detector_shift_x')}: detector_shift_x: the detector "
                              "shift is read from the data file (/shift/x)"), message


# ----------------------------------------------------------------------------------------------------------------
# CrystFEL's own example files, where a folder of them is given


EXAMPLES = os.environ.get("NBTORCH_CRYSTFEL_EXAMPLES")


@pytest.mark.skipif(not EXAMPLES, reason="NBTORCH_CRYSTFEL_EXAMPLES (a folder of CrystFEL's doc/examples) not set")
@pytest.mark.parametrize("name, n_panels, slab, depth, facing", [
    ("jf-swissfel-16M.geom", 32, (16448, 1030), 1, -1.0),
    ("cspad-cxiformat.geom", 64, (1480, 1552), 3, 1.0),
    ("Eiger16M-binning2-nativefiles.geom", 1, (2167, 2070), 1, 1.0),
])
def test_crystfel_example_files_as_they_come(tmp_path, name, n_panels, slab, depth, facing):
    path = Path(EXAMPLES) / name
    g = read_geom(path, clen=ENCODER_MM, photon_energy_eV=ENERGY_EV)
    layout = layout_from_crystfel(g)
    assert (len(g.panels), slab_shape(g), layout.depth) == (n_panels, slab, depth)
    assert {p.facing for p in layout.panels} == {facing}
    assert all(float(panel_normal(p)[2]) > 0.999 for p in g.panels)
    write_geom(tmp_path / name, g)
    assert read_geom(tmp_path / name, clen=ENCODER_MM, photon_energy_eV=ENERGY_EV) == g
    if g.bad_regions and not any(m.file for p in g.panels for m in p.masks):
        assert int((geometry_mask(g) == 0).sum()) > 0
