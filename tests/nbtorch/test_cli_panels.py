"""``nbtorch -geom FILE`` / ``-expt FILE``: a detector of panels from a CrystFEL or DIALS file on the command line
(issue 20, item 6) — the file's data layout, conflicts, data-file values, masks, the .expt beam and crystal, flags
that override the file, and the Python path (``from_nanobragg_args``) that nbtorch-refine shares."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import nbtorch
from nbtorch import cli
from nbtorch.cli.layout import file_image
from nbtorch.detector import with_panels
from nbtorch.io.crystfel import panels_to_slab, read_geom, slab_shape
from nbtorch.io.smv import read_smv
from nbtorch.io.structure_files import detector_corner_resolution
from nbtorch.lattice import lattice
from nbtorch.panels import layout_from_crystfel
from nbtorch.simulate import crystal_rotation, pixel_lab_positions

DATA = Path(__file__).resolve().parents[1] / "data" / "cli_panels"
GEOM = DATA / "two_small.geom"  # panels a (rows 0-5) and b (rows 8-13) of a 14 x 10 slab, rows 6-7 in no panel
EXPT = DATA / "two_small.expt"  # panels p0 (10 x 6) and p1 (8 x 6, two pixels masked), crystal, polarized beam
XTAL = "-cell 50 50 50 90 90 90 -default_F 100 -N 3 -misset 10 20 30 -oversample 1"
QUIET = ["-nopgm", "-noprogress", "-seed", "7"]
OUTS = ["-floatfile", "f.bin", "-intfile", "i.img", "-noisefile", "n.img"]


def _main(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _refused(argv, capsys, words, folder):
    """exit 2, one line on stderr holding ``words``, and nothing written in ``folder``."""
    before = sorted(os.listdir(folder))
    rc, _, err = _main(argv, capsys)
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert sorted(os.listdir(folder)) == before
    return err


def _geom_variant(tmp_path, replace=(), extra="", name="det.geom"):
    text = GEOM.read_text()
    for old, new in replace:
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / name
    path.write_text(text + extra)
    return path


def _custom_model(geom_path, extra=""):
    """The same model built without -geom: nanoBragg's CUSTOM convention with the beam along +z, then the file's
    panels put in by nbtorch.detector.with_panels."""
    p, s = nbtorch.from_nanobragg_args(f"{XTAL} -beam_vector 0 0 1 -polar_vector 1 0 0 -spindle_axis 1 0 0 -lambda 1 "
                                       f"-fdet_vector 1 0 0 -sdet_vector 0 1 0 -odet_vector 0 0 1 {extra}")
    return with_panels(p, s, layout_from_crystfel(read_geom(geom_path)))


# ----------------------------------------------------------------------------------------------------------------
# -geom: the file's data layout


@pytest.mark.parametrize("extra", ["", "-polar 0.9 -polar_vector 0 1 0", "-spindle_axis 0 1 0 -osc 4 -phisteps 2"])
def test_geom_run_writes_the_files_slab_of_the_panels_simulate_gives(extra, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = _main(["-geom", GEOM, *XTAL.split(), *extra.split(), *QUIET, *OUTS], capsys)
    assert rc == 0, err
    assert "the data layout of -geom" in out and "14 x 10 pixels" in out
    p, s = _custom_model(GEOM, extra)
    want = panels_to_slab(nbtorch.simulate(p, s, fused=False).numpy().astype(np.float32), read_geom(GEOM))
    got = np.fromfile("f.bin", dtype="<f4").reshape(14, 10)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    assert got[:6].min() > 0 and got[8:].min() > 0 and not got[6:8].any()  # rows in no panel are 0
    for name in ("i.img", "n.img"):
        data, header = read_smv(name)
        assert data.shape == (14, 10) and not data[6:8].any() and data[:6].min() >= 40, name
        assert header["PANELS"] == "2" and header["PANEL_LAYOUT"] == "crystfel_slab"


def test_python_path_gives_the_panel_setup_from_the_file():
    p, s = nbtorch.from_nanobragg_args(f"-geom {GEOM} {XTAL}")
    assert s.panels is not None and s.image_shape == (2, 6, 10) and [q.name for q in s.panels.panels] == ["a", "b"]
    assert s.beam == (0.0, 0.0, 1.0) and s.polar_axis == (1.0, 0.0, 0.0) and s.spindle == (1.0, 0.0, 0.0)
    assert float(p.beam.wavelength) == pytest.approx(1.0, rel=1e-15)  # photon_energy = 12398.42 eV
    assert float(p.detector.distance) == s.panels.distance == pytest.approx(80.5, rel=1e-14)
    assert s.panels.panels[1].corner == pytest.approx((2.5, -0.25, 81.0), rel=1e-14)  # corner_x/y·0.5 mm, coffset
    assert p.detector.group_shift.shape == (s.n_groups, 3) and s.mask is None
    p2, _ = nbtorch.from_nanobragg_args(f"-geom {GEOM} {XTAL} -lambda 1.25")
    assert float(p2.beam.wavelength) == 1.25


@pytest.mark.parametrize("flag", ["-distance 100", "-Xbeam 5", "-detpixels 10", "-pixel 0.1", "-twotheta 5",
                                  "-fdet_vector 1 0 0", "-roi 0 1 0 1", "-detector_rotx 1", "-xds", "-pivot sample",
                                  "-beam_vector 1 0 0", "-curved_det"])
@pytest.mark.parametrize("source", ["-geom", "-expt"])
def test_flags_the_file_replaces_are_refused_naming_both(flag, source, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = GEOM if source == "-geom" else EXPT
    err = _refused([source, path, *XTAL.split(), *flag.split(), *QUIET, *OUTS], capsys,
                   [flag.split()[0], f"{source} {path}"], tmp_path)
    assert "conflicts with" in err


def test_a_beam_vector_along_the_files_beam_is_accepted():
    _, s = nbtorch.from_nanobragg_args(f"-geom {GEOM} {XTAL} -beam_vector 0 0 2")
    assert s.beam == (0.0, 0.0, 1.0)


@pytest.mark.parametrize("args,words", [
    (f"-geom {GEOM} -expt {EXPT} -default_F 1", ["-geom", "-expt", "give one"]),
    (f"-clen 80 {XTAL}", ["-clen 80", "give -geom FILE"]),
    (f"-expt {EXPT} -clen 80 -default_F 1", ["-clen", "-geom"]),
    (f"-geom {GEOM} {XTAL} -printout_pixel 1 1", ["-printout_pixel", "-geom"]),
])
def test_combinations_that_cannot_work_are_refused(args, words):
    with pytest.raises(ValueError) as info:
        nbtorch.from_nanobragg_args(args)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


# ----------------------------------------------------------------------------------------------------------------
# values the .geom file takes from a data file


DATA_FILE = (("clen = 0.08 m", "clen = /LCLS/detector_1/EncoderValue"),
             ("photon_energy = 12398.42 eV", "photon_energy = /LCLS/photon_energy_eV"))


def test_missing_data_file_values_name_the_key_and_the_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    geom = _geom_variant(tmp_path, DATA_FILE)
    _refused(["-geom", geom, *XTAL.split(), *QUIET, *OUTS], capsys,
             ["clen", "/LCLS/detector_1/EncoderValue", "-clen VALUE[mm|m]"], tmp_path)
    _refused(["-geom", geom, "-clen", "80", *XTAL.split(), *QUIET, *OUTS], capsys,
             ["photon_energy", "/LCLS/photon_energy_eV", "-energy"], tmp_path)
    p, s = nbtorch.from_nanobragg_args(f"-geom {geom} -clen 80 -energy 9000 {XTAL}")
    assert float(p.beam.wavelength) == pytest.approx(12398.42 / 9000, rel=1e-15)
    _, s2 = nbtorch.from_nanobragg_args(f"-geom {geom} -clen 80 -lambda 1 {XTAL}")  # -lambda supplies it too
    assert s2.panels == s.panels


@pytest.mark.parametrize("clen,z", [("80", 80.0), ("80mm", 80.0), ("0.09m", 90.0), ("0.09 m", 90.0),
                                    ("1.2e2", 120.0)])
def test_clen_takes_mm_by_default_and_m_and_adds_coffset(clen, z, tmp_path):
    geom = _geom_variant(tmp_path, DATA_FILE)
    _, s = nbtorch.from_nanobragg_args(["-geom", str(geom), "-clen", clen, "-lambda", "1", *XTAL.split()])
    a, b = s.panels.panels
    assert a.corner[2] == pytest.approx(z, rel=1e-14) and b.corner[2] == pytest.approx(z + 1.0, rel=1e-14)


@pytest.mark.parametrize("clen", ["0", "-5", "8 cm", "abc", "nan", "inf"])
def test_bad_clen_values_are_refused(clen, tmp_path):
    geom = _geom_variant(tmp_path, DATA_FILE)
    with pytest.raises(ValueError, match="-clen"):
        nbtorch.from_nanobragg_args(["-geom", str(geom), "-clen", clen, "-lambda", "1", *XTAL.split()])


def test_clen_given_for_a_file_with_a_number_is_noted(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, _ = _main(["-geom", GEOM, "-clen", "90", *XTAL.split(), *QUIET, *OUTS], capsys)
    assert rc == 0 and "note: -clen ignored" in out


# ----------------------------------------------------------------------------------------------------------------
# masks


def test_bad_regions_no_index_and_mask_files_simulate_to_zero_data_file_masks_are_noted(tmp_path, capsys,
                                                                                          monkeypatch):
    h5py = pytest.importorskip("h5py")
    monkeypatch.chdir(tmp_path)
    with h5py.File(tmp_path / "masks.h5", "w") as f:
        bits = np.zeros((14, 10), np.int32)
        bits[3, 5] = 1
        f["/data/mask"] = bits
    extra = ("\nbad_corner/min_fs = 0\nbad_corner/max_fs = 2\nbad_corner/min_ss = 0\nbad_corner/max_ss = 1\n"
             "bad_corner/panel = a\nb/no_index = 1\na/mask = /data/mask\na/mask_file = masks.h5\na/mask_bad = 1\n"
             "b/mask1_data = /entry/pixel_mask\nb/mask1_badbits = 1\n")
    geom = _geom_variant(tmp_path, extra=extra)
    rc, out, err = _main(["-geom", geom, *XTAL.split(), *QUIET, *OUTS], capsys)
    assert rc == 0, err
    assert "note: -geom" in out and "/entry/pixel_mask) left out: only simulating" in out
    got = np.fromfile("f.bin", dtype="<f4").reshape(14, 10)
    p, s = _custom_model(GEOM)
    full = panels_to_slab(nbtorch.simulate(p, s, fused=False).numpy().astype(np.float32), read_geom(GEOM))
    keep = np.ones((14, 10), bool)
    keep[0:2, 0:3] = False  # the bad region
    keep[3, 5] = False  # the mask file's bad bit
    keep[6:] = False  # the gap and panel b (no_index)
    masked = ~keep
    masked[6:8] = False  # rows in no panel
    assert not got[~keep].any() and full[masked].min() > 0
    np.testing.assert_allclose(got[keep], full[keep], rtol=1e-6, atol=0)
    noise, _ = read_smv("n.img")
    assert not noise[~keep].any()
    os.remove(tmp_path / "masks.h5")  # a missing mask file is an error naming it
    _refused(["-geom", geom, *XTAL.split(), *QUIET, *OUTS], capsys, ["-geom", "masks.h5", "a/mask_file"], tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# -expt: beam, crystal, overrides, stacked outputs


def test_expt_crystal_is_used_as_given():
    p, s = nbtorch.from_nanobragg_args(f"-expt {EXPT} -default_F 100 -N 3 -oversample 1")
    assert not s.nanobragg_cell
    c = json.loads(EXPT.read_text())["crystal"][0]
    want = torch.tensor([c["real_space_a"], c["real_space_b"], c["real_space_c"]], dtype=torch.float64).T
    M, _ = lattice(p.crystal.cell, crystal_rotation(p.crystal), nanobragg=False)
    torch.testing.assert_close(M, want, rtol=1e-12, atol=1e-10)
    assert p.crystal.cell.tolist()[3] == pytest.approx(90.0, abs=1e-9) and p.crystal.cell[4] > 96  # β = 97°
    # -cell after -expt replaces the crystal; before it loses to the file (with a note)
    p2, s2 = nbtorch.from_nanobragg_args(f"-expt {EXPT} -cell 50 50 50 90 90 90 -default_F 100 -N 3")
    assert p2.crystal.cell.tolist() == [50, 50, 50, 90, 90, 90] and s2.nanobragg_cell
    _, _, extras = nbtorch.args.build(nbtorch.parse_args(f"-cell 50 50 50 90 90 90 -expt {EXPT} -default_F 100"))
    assert any("-cell before -expt" in n for n in extras.notes)


def test_expt_beam_gives_wavelength_direction_and_kahn_factor_with_e_perpendicular_to_the_normal():
    p, s = nbtorch.from_nanobragg_args(f"-expt {EXPT} -default_F 100 -N 3 -oversample 1")
    assert float(p.beam.wavelength) == 1.1 and s.beam == (0.0, 0.0, -1.0)  # direction points to the source
    assert float(p.beam.polarization) == pytest.approx(2 * 0.9 - 1, abs=1e-15) and s.polar_axis == (1.0, 0.0, 0.0)
    # every pixel's ratio to the unpolarized image is the Kahn factor's, with E along x (⟂ normal y and the beam)
    p0 = p._replace(beam=p.beam._replace(polarization=torch.zeros_like(p.beam.polarization)))
    ratio = nbtorch.simulate(p, s, fused=False) / nbtorch.simulate(p0, s, fused=False)
    f, sl = torch.meshgrid(torch.arange(10), torch.arange(6), indexing="xy")
    pos = pixel_lab_positions(p, s, f.reshape(-1), sl.reshape(-1), panel=0)[:, 0, 0]
    d = pos / pos.norm(dim=-1, keepdim=True)
    c, x, y = -d[:, 2], d[:, 0], d[:, 1]  # cos 2θ along i = −z; E = x; i × E = −y
    want = (1 + c * c - 0.8 * (x * x - y * y)) / (1 + c * c)
    torch.testing.assert_close(ratio[0].reshape(-1), want, rtol=1e-10, atol=0)


def test_flags_after_expt_override_the_file_and_flags_before_it_do_not():
    def beam(args):
        p, s, extras = nbtorch.args.build(nbtorch.parse_args(f"{args} -default_F 100 -N 3"))
        return float(p.beam.wavelength), float(p.beam.polarization), s.polar_axis, extras.notes

    assert beam(f"-expt {EXPT} -lambda 1.3")[0] == 1.3
    assert beam(f"-expt {EXPT} -energy 10000")[0] == pytest.approx(12398.42 / 10000, rel=1e-15)
    lam, _, _, notes = beam(f"-lambda 1.3 -expt {EXPT}")
    assert lam == 1.1 and any("-lambda before -expt" in n for n in notes)
    assert beam(f"-energy 10000 -expt {EXPT}")[0] == 1.1
    assert beam(f"-expt {EXPT} -polar 0 -polar_vector 0 1 0")[1:3] == (0.0, (0.0, 1.0, 0.0))


def test_expt_outputs_are_panels_stacked_with_padding_and_masked_pixels_zero(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = _main(["-expt", EXPT, "-default_F", "100", "-N", "3", "-oversample", "1", *QUIET, *OUTS], capsys)
    assert rc == 0, err
    assert "2 panels stacked [panel, slow, fast]: 2 x 6 x 10 pixels" in out
    p, s = nbtorch.from_nanobragg_args(f"-expt {EXPT} -default_F 100 -N 3 -oversample 1")
    want = nbtorch.simulate(p, s, fused=False).numpy().astype(np.float32)
    got = np.fromfile("f.bin", dtype="<f4").reshape(2, 6, 10)
    np.testing.assert_array_equal(got, want)
    assert not got[1, :, 8:].any() and not got[1, 0, 0:2].any()  # padding of the 8-wide panel; its mask
    assert got[0].min() > 0 and got[1, 1:, :8].min() > 0
    for name in ("i.img", "n.img"):
        data, header = read_smv(name)
        assert data.shape == (12, 10) and not data[6:, 8:].any() and header["PANEL_LAYOUT"] == "stacked", name
    noise, _ = read_smv("n.img")
    assert not noise[6, 0:2].any()


def test_expt_without_crystal_needs_a_cell_and_a_goniometer_gives_the_spindle(tmp_path):
    doc = json.loads(EXPT.read_text())
    del doc["experiment"][0]["crystal"]
    doc["experiment"][0]["goniometer"] = 0
    doc["goniometer"] = [{"rotation_axis": [0.0, 2.0, 0.0]}]  # no scan: φ 0, no oscillation
    path = tmp_path / "nocrystal.expt"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"-expt .*experiment 0 has no crystal: give -cell or -mat"):
        nbtorch.from_nanobragg_args(f"-expt {path} -default_F 100")
    _, s, extras = nbtorch.args.build(nbtorch.parse_args(f"-expt {path} -cell 50 50 50 90 90 90 -default_F 100"))
    assert s.n_panels == 2 and s.spindle == (0.0, 1.0, 0.0) and (s.phi0, s.phistep, s.phisteps) == (0.0, 0.0, 1)
    assert not extras.notes


# ----------------------------------------------------------------------------------------------------------------
# nothing half-written; flags back from a model


@pytest.mark.parametrize("extra,words", [
    (["-lambda", "1e9"], ["-lambda", "1e9"]),
    (["-polar_vector", "0", "0", "1"], ["-polar_vector", "parallel"]),
])
def test_errors_write_nothing(extra, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _refused(["-geom", GEOM, *XTAL.split(), *QUIET, *OUTS, *extra], capsys, words, tmp_path)


def test_flags_written_back_rebuild_the_panel_model():
    base = f"-geom {GEOM} {XTAL} -polar 0.5"
    p, s = nbtorch.from_nanobragg_args(base)
    flags = nbtorch.to_nanobragg_args(p, s, base=base)
    assert flags[:2] == ["-geom", str(GEOM)] and not set(flags) & {"-distance", "-beam_vector", "-fdet_vector"}
    p2, s2 = nbtorch.from_nanobragg_args(flags)
    assert s2 == s
    torch.testing.assert_close(nbtorch.simulate(p2, s2, fused=False), nbtorch.simulate(p, s, fused=False),
                               rtol=0, atol=0)
    moved = p._replace(detector=p.detector._replace(group_shift=p.detector.group_shift + 0.1))
    with pytest.raises(ValueError, match=re.escape("moved from its file's place (group_shift)")):
        nbtorch.to_nanobragg_args(moved, s, base=base)
    with pytest.raises(ValueError, match="-geom or -expt"):
        nbtorch.to_nanobragg_args(p, s)


def test_help_lists_the_panel_flags(capsys):
    assert cli.main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for words in ("-geom FILE", "-expt FILE", "-clen VALUE[mm|m]", "flags after -expt override"):
        assert words in text, words


def test_crystfel_example_detectors_build_from_the_command_line_flags():
    """The CrystFEL-style example files of tests/data/crystfel (helper files of test_crystfel_real.py) as they come:
    CSPAD with clen and photon energy in the data file, Eiger 16M binned as one panel with bad strips."""
    folder = DATA.parent / "crystfel"
    cspad = f"-geom {folder / 'cspad_cxi.geom'} -cell 78 78 37 90 90 90 -default_F 10 -N 5"
    with pytest.raises(ValueError, match="clen is read from a data file"):
        nbtorch.from_nanobragg_args(cspad)
    p, s, extras = nbtorch.args.build(nbtorch.parse_args(f"{cspad} -clen 0.12m -energy 9000"))
    assert s.image_shape == (64, 185, 194) and s.n_groups > 64 and s.mask is None
    assert float(p.beam.wavelength) == pytest.approx(12398.42 / 9000, rel=1e-15)
    assert any("left out: only simulating" in n for n in extras.notes)
    shape = file_image(np.zeros(s.image_shape, np.float32), s, extras).shape
    assert shape == slab_shape(read_geom(folder / "cspad_cxi.geom", clen=120, photon_energy_eV=9000))
    p, s = nbtorch.from_nanobragg_args(f"-geom {folder / 'eiger16m_bin2.geom'} -cell 78 78 37 90 90 90 -default_F 1")
    assert s.n_panels == 1 and s.mask is not None and 0 < np.frombuffer(s.mask, np.uint8).mean() < 1


def test_a_geom_file_without_photon_energy_takes_lambda_or_notes_the_default(tmp_path):
    geom = _geom_variant(tmp_path, [("photon_energy = 12398.42 eV", "")])
    p, _, extras = nbtorch.args.build(nbtorch.parse_args(f"-geom {geom} {XTAL}"))
    assert float(p.beam.wavelength) == 1.0 and any("gives no photon energy" in n for n in extras.notes)
    p, _ = nbtorch.from_nanobragg_args(f"-geom {geom} {XTAL} -energy 10000")
    assert float(p.beam.wavelength) == pytest.approx(1.239842, rel=1e-15)


def test_nexusfile_of_panels_holds_one_module_per_panel(tmp_path, capsys, monkeypatch):
    pytest.importorskip("h5py")
    from nbtorch.io import read_nxmx

    monkeypatch.chdir(tmp_path)
    rc, out, err = _main(["-expt", EXPT, "-default_F", "100", "-N", "3", "-oversample", "1", *QUIET, *OUTS,
                          "-nexusfile", "x.h5"], capsys)
    assert rc == 0, err
    assert "in 2 modules" in out
    obs = read_nxmx("x.h5")
    floats = np.fromfile("f.bin", dtype="<f4").reshape(2, 6, 10)
    np.testing.assert_array_equal(np.asarray(obs.data, dtype=np.float32)[0, :, :10], floats[0])
    np.testing.assert_array_equal(np.asarray(obs.data, dtype=np.float32)[1, :, :8], floats[1, :, :8])


def test_structure_factors_from_a_model_reach_every_panels_corners(tmp_path):
    pdb = tmp_path / "tiny.pdb"
    pdb.write_text("CRYST1   20.000   25.000   30.000  90.00  90.00  90.00 P 1           1\n"
                   "ATOM      1  CA  GLY A   1       3.200   3.500   4.600  1.00 12.00           C\n"
                   "ATOM      2  O   GLY A   1       4.000   1.200   4.800  1.00 20.00           O\nEND\n")
    params, setup = nbtorch.from_nanobragg_args(f"-geom {GEOM} -pdb {pdb} -N 3 -misset 10 20 30 -oversample 1")
    d = detector_corner_resolution(params, setup)
    F = params.structure.F
    assert F.numel() > 0 and setup.panels is not None
    for axis, a in enumerate((20.0, 25.0, 30.0)):
        assert -setup.hkl_min[axis] >= math.floor(a / d) and F.shape[axis] + setup.hkl_min[axis] - 1 >= a / d - 1
