"""Structure factors from MTZ files and PDB/mmCIF models, and NXmx output, through the command line and
``nbtorch.from_nanobragg_args``: ``-hkl FILE.mtz`` (``-mtz_column``, ``-mtz_anomalous``), ``-pdb`` (``-pdb_bfactor``),
``-nexusfile``; what ``to_nanobragg_args`` carries back; and bad input: one line naming the flag and the file, exit 2,
nothing written."""
from __future__ import annotations

import importlib.util
import math
import shutil
import sys

import numpy as np
import pytest
import torch

gemmi = pytest.importorskip("gemmi")
pytest.importorskip("h5py")

import nbtorch  # noqa: E402
from nbtorch import cli  # noqa: E402
from nbtorch.args import build, parse_args  # noqa: E402
from nbtorch.io import read_hkl, read_image, read_raw_float  # noqa: E402
from nbtorch.io.nexus import nxmx_geometry  # noqa: E402
from nbtorch.io.structure_files import detector_corner_resolution, structure_factors_from_model  # noqa: E402
from tests.golden import GOLDEN  # noqa: E402

HKL_03 = GOLDEN / "03_hkl_Nabc" / "P1.hkl"
CELL_03 = (60.0, 70.0, 80.0, 88.0, 95.0, 102.0)
XTAL_03 = ["-cell", *map(str, CELL_03), "-misset", "5", "-12", "30", "-Na", "3", "-Nb", "6", "-Nc", "4"]
DETECTOR = ["-lambda", "1.2", "-distance", "120", "-pixel", "0.4", "-detpixels_f", "40", "-detpixels_s", "32",
            "-oversample", "1"]
QUIET = ["-nopgm", "-nonoise", "-noprogress"]

TINY_PDB = """\
CRYST1   20.000   25.000   30.000  90.00  90.00  90.00 P 21 21 21    4
ATOM      1  N   GLY A   1       2.000   3.000   4.000  1.00 10.00           N
ATOM      2  CA  GLY A   1       3.200   3.500   4.600  1.00 12.00           C
ATOM      3  C   GLY A   1       4.100   2.400   5.100  1.00 15.00           C
ATOM      4  O   GLY A   1       4.000   1.200   4.800  0.80 20.00           O
HETATM    5 FE   HEM A   2       8.000   9.000  10.000  1.00 18.00          FE
END
"""
PDB_RUN = ["-N", "5", "-lambda", "1", "-distance", "60", "-pixel", "0.5", "-detpixels", "48", "-oversample", "1"]


def write_mtz(path, spacegroup, cell, columns, rows):
    """An MTZ with H K L plus ``columns`` [(label, type)] and data rows [n, 3 + len(columns)]."""
    mtz = gemmi.Mtz(with_base=True)
    mtz.spacegroup = gemmi.SpaceGroup(spacegroup)
    mtz.set_cell_for_all(gemmi.UnitCell(*cell))
    mtz.add_dataset("sim")
    for label, kind in columns:
        mtz.add_column(label, kind)
    mtz.set_data(np.asarray(rows, dtype=np.float32))
    mtz.write_to_file(str(path))
    return path


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    """A working directory holding P1.hkl (golden 03), the same reflections as p1.mtz, and tiny.pdb."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(HKL_03, tmp_path / "P1.hkl")
    d = read_hkl(HKL_03)
    write_mtz(tmp_path / "p1.mtz", "P 1", CELL_03, [("FP", "F"), ("SIGFP", "Q")], np.c_[d.hkl, d.F, np.ones_like(d.F)])
    (tmp_path / "tiny.pdb").write_text(TINY_PDB)
    return tmp_path


def _files(path) -> set:
    return {p.name for p in path.iterdir()}


def _one_line_error(capsys, *words) -> str:
    out, err = capsys.readouterr()
    assert err.startswith("nbtorch: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    return err


# ----------------------------------------------------------------------------------------------------------------
# -hkl FILE.mtz


def test_mtz_gives_the_bit_identical_image_of_the_text_file(inputs, capsys):
    assert cli.main(XTAL_03 + DETECTOR + QUIET + ["-hkl", "P1.hkl", "-floatfile", "text.bin"]) == 0
    capsys.readouterr()
    assert cli.main(XTAL_03 + DETECTOR + QUIET + ["-hkl", "p1.mtz", "-floatfile", "mtz.bin"]) == 0
    out = capsys.readouterr().out
    text, mtz = (inputs / "text.bin").read_bytes(), (inputs / "mtz.bin").read_bytes()
    assert text == mtz
    image = np.frombuffer(mtz, dtype="<f4")
    assert image.max() > 0 and (image > 0).mean() > 0.5
    assert "note: -hkl p1.mtz: column FP, space group P 1" in out
    assert "note: -hkl p1.mtz: expanded from P 1" in out


def test_mtz_through_the_api_and_back_to_flags(inputs):
    flags = XTAL_03 + DETECTOR + ["-hkl", "p1.mtz", "-mtz_column", "FP"]
    params, setup = nbtorch.from_nanobragg_args(flags)
    text_params, text_setup = nbtorch.from_nanobragg_args(XTAL_03 + DETECTOR + ["-hkl", "P1.hkl"])
    assert setup == text_setup and torch.equal(params.structure.F, text_params.structure.F)
    back = nbtorch.to_nanobragg_args(params, setup, base=flags)
    assert back[back.index("-hkl"):back.index("-hkl") + 4] == ["-hkl", "p1.mtz", "-mtz_column", "FP"]
    params2, setup2 = nbtorch.from_nanobragg_args(back)
    assert setup2 == setup and torch.equal(nbtorch.simulate(params2, setup2), nbtorch.simulate(params, setup))


def test_mtz_column_and_anomalous_flags_choose_what_is_read(inputs):
    hkl = np.array([[1, 2, 3], [2, 0, 1], [0, 1, 1]])
    rows = np.c_[hkl, [10.0, 20.0, 30.0], [11.0, 21.0, 31.0], [7.0, 8.0, 9.0], [100.0, 400.0, 900.0]]
    write_mtz(inputs / "anom.mtz", "P 1", (40, 40, 40, 90, 90, 90),
              [("F(+)", "G"), ("F(-)", "G"), ("FP", "F"), ("IMEAN", "J")], rows)
    base = ["-cell", "40", "40", "40", "90", "90", "90", "-N", "5"] + DETECTOR + ["-hkl", "anom.mtz"]

    def at(extra, h):
        params, setup = nbtorch.from_nanobragg_args(base + extra)
        return float(params.structure.F[tuple(np.subtract(h, setup.hkl_min))])

    assert at([], (1, 2, 3)) == 7.0  # the first amplitude column (type F) by default
    assert at(["-mtz_column", "F(+)"], (1, 2, 3)) == at(["-mtz_column", "F(+)"], (-1, -2, -3)) == 10.5  # averaged
    sep = ["-mtz_column", "F(-)", "-mtz_anomalous", "separate"]
    assert (at(sep, (2, 0, 1)), at(sep, (-2, 0, -1))) == (20.0, 21.0)
    assert at(["-mtz_column", "IMEAN"], (0, 1, 1)) == 30.0  # sqrt(900), with a note
    _, _, extras = build(parse_args(base + ["-mtz_column", "IMEAN"]))
    assert any("intensities IMEAN converted to amplitudes" in n for n in extras.notes)


# ----------------------------------------------------------------------------------------------------------------
# -pdb


def test_pdb_runs_from_the_command_line_with_the_models_cell(inputs, capsys):
    assert cli.main(["-pdb", "tiny.pdb"] + PDB_RUN + QUIET) == 0
    out = capsys.readouterr().out
    assert "note: -pdb tiny.pdb: unit cell 20 25 30 90 90 90 (Å, deg) from the model" in out
    assert "note: -pdb tiny.pdb: |F| calculated from 5 atoms" in out
    image = read_raw_float(inputs / "floatimage.bin", (48, 48))
    assert image.max() > 0 and (image > 0).mean() > 0.5
    flat = nbtorch.simulate(*nbtorch.from_nanobragg_args(["-cell", "20", "25", "30", "90", "90", "90", "-default_F",
                                                          "1"] + PDB_RUN)).numpy()
    assert np.abs(image / image.max() - flat / flat.max()).max() > 0.1  # spots of model strengths, not one flat F


def test_pdb_table_is_the_models_amplitudes_out_past_the_detector_corners(inputs):
    """The table holds gemmi's |F| for every reflection a pixel can reach, with tricubic interpolation's 4×4×4
    neighbourhood: a sentinel -default_F appears nowhere near the corners' Miller indices."""
    sentinel = 1234.5
    params, setup = nbtorch.from_nanobragg_args(["-pdb", "tiny.pdb", "-default_F", str(sentinel)] + PDB_RUN)
    F, lo = params.structure.F.numpy(), np.asarray(setup.hkl_min)
    d_corner = detector_corner_resolution(params, setup)
    B = np.diag([1 / 20, 1 / 25, 1 / 30])  # reciprocal basis of the orthogonal cell (Å⁻¹)
    room = 2 * math.sqrt(3) * (1 / 20)
    ref, ref_lo, _ = structure_factors_from_model(inputs / "tiny.pdb", 1 / (1 / d_corner + room), default_F=sentinel)
    assert tuple(ref_lo) == tuple(lo) and np.array_equal(ref, F)
    # every q on the detector (|q| <= 1/d_corner, any orientation): its interpolation stencil holds model values
    rng = np.random.default_rng(0)
    q = rng.normal(size=(500, 3))
    q *= (1 / d_corner) / np.linalg.norm(q, axis=1, keepdims=True)
    h = q @ np.linalg.inv(B).T
    for off in np.stack(np.meshgrid(*[np.arange(-1, 3)] * 3, indexing="ij"), -1).reshape(-1, 3):
        idx = np.floor(h).astype(int) + off - lo
        assert (idx >= 0).all() and (idx < F.shape).all()
        assert not np.any(F[tuple(idx.T)] == sentinel)
    assert np.any(F == sentinel)  # the table does stop


def test_pdb_bfactor_and_the_cell_check(inputs, capsys):
    b20, setup = nbtorch.from_nanobragg_args(["-pdb", "tiny.pdb", "-pdb_bfactor", "20"] + PDB_RUN)
    b60, setup_b = nbtorch.from_nanobragg_args(["-pdb", "tiny.pdb", "-pdb_bfactor", "60"] + PDB_RUN)
    own, _ = nbtorch.from_nanobragg_args(["-pdb", "tiny.pdb"] + PDB_RUN)
    assert setup_b.hkl_min == setup.hkl_min
    h = tuple(np.subtract((4, 5, 6), setup.hkl_min))  # 1/d² = 0.12 Å⁻²: every atom's F scales by exp(-ΔB/(4d²))
    assert float(b60.structure.F[h]) / float(b20.structure.F[h]) == pytest.approx(math.exp(-40 * 0.12 / 4), rel=1e-2)
    assert abs(float(own.structure.F[h]) - float(b20.structure.F[h])) > 1e-3 * float(b20.structure.F[h])
    agree = ["-cell", "20.005", "25", "30", "90", "90", "90.01"]
    params, _ = nbtorch.from_nanobragg_args(["-pdb", "tiny.pdb"] + agree + PDB_RUN)
    assert params.crystal.cell.tolist() == [20.005, 25, 30, 90, 90, 90.01]  # -cell wins when it agrees
    assert cli.main(["-pdb", "tiny.pdb", "-cell", "20", "25", "31", "90", "90", "90"] + PDB_RUN) == 2
    _one_line_error(capsys, "-pdb tiny.pdb", "does not agree with -cell", "20 25 31 90 90 90")


def test_a_model_without_a_cell_needs_one_and_is_placed_in_it(inputs, capsys):
    (inputs / "nocell.pdb").write_text(TINY_PDB.split("\n", 1)[1])
    assert cli.main(["-pdb", "nocell.pdb"] + PDB_RUN) == 2
    _one_line_error(capsys, "-pdb nocell.pdb", "no unit cell", "give -cell or -mat")
    cell = ["-cell", "20", "25", "30", "90", "90", "90"]
    params, setup, extras = build(parse_args(["-pdb", "nocell.pdb"] + cell + PDB_RUN))
    assert any("the model has no unit cell; it is placed in -cell's" in n for n in extras.notes)
    with_cell, with_setup = nbtorch.from_nanobragg_args(["-pdb", "tiny.pdb"] + PDB_RUN)
    assert setup.hkl_min == with_setup.hkl_min
    # the same atoms in the same cell, space group P 1 instead of P 21 21 21: the mates' contributions are missing
    assert not torch.allclose(params.structure.F, with_cell.structure.F)


def test_pdb_through_the_api_and_back_to_flags(inputs):
    flags = ["-pdb", "tiny.pdb", "-pdb_bfactor", "15"] + PDB_RUN
    params, setup = nbtorch.from_nanobragg_args(flags)
    back = nbtorch.to_nanobragg_args(params, setup, base=flags)
    assert "-pdb" in back and back[back.index("-pdb_bfactor") + 1] == "15" and "-cell" in back
    params2, setup2 = nbtorch.from_nanobragg_args(back)
    assert setup2 == setup and torch.equal(nbtorch.simulate(params2, setup2), nbtorch.simulate(params, setup))
    with pytest.raises(ValueError, match=r"structure-factor table.*-hkl or -pdb"):
        nbtorch.to_nanobragg_args(params, setup)


# ----------------------------------------------------------------------------------------------------------------
# -nexusfile


def test_nexusfile_holds_the_float_image_and_geometry(inputs, capsys):
    flags = XTAL_03 + DETECTOR + ["-hkl", "p1.mtz", "-twotheta", "5", "-phi", "10", "-osc", "0.5"]
    assert cli.main(flags + QUIET + ["-nexusfile", "sim.h5"]) == 0
    assert "wrote sim.h5 as an NXmx file" in capsys.readouterr().out
    assert _files(inputs) >= {"sim.h5", "floatimage.bin", "intimage.img"}
    obs = read_image(inputs / "sim.h5")
    floats = read_raw_float(inputs / "floatimage.bin", (32, 40))
    assert obs.data.shape == (32, 40) and np.array_equal(obs.data, floats.astype(np.float64)) and floats.max() > 0
    params, setup = nbtorch.from_nanobragg_args(flags)
    geo = nxmx_geometry(params, setup)
    assert obs.pixel_size_mm == pytest.approx(0.4) and obs.wavelength_A == pytest.approx(1.2)
    assert obs.distance_mm == pytest.approx(geo.distance_mm, rel=1e-12)
    assert obs.beam_center_mm == pytest.approx(geo.beam_center_mm, rel=1e-12)
    np.testing.assert_allclose(obs.geometry.origin_mm, geo.origin_mm, atol=1e-9)
    np.testing.assert_allclose(obs.geometry.fast_axis, geo.fast_axis, atol=1e-12)
    assert obs.geometry.phi_deg == pytest.approx(10) and obs.geometry.osc_deg == pytest.approx(0.5)


def test_nexusfile_is_checked_before_any_work(inputs, capsys, monkeypatch):
    base = XTAL_03 + DETECTOR + ["-hkl", "p1.mtz"] + QUIET
    before = _files(inputs)
    assert cli.main(base + ["-curved_det", "-nexusfile", "sim.h5"]) == 2
    _one_line_error(capsys, "-nexusfile sim.h5", "curved detector")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "h5py" else real(name, *a, **k))
    assert cli.main(base + ["-nexusfile", "sim.h5"]) == 2
    _one_line_error(capsys, "-nexusfile sim.h5", "h5py", "nbtorch[io]")
    assert _files(inputs) == before


# ----------------------------------------------------------------------------------------------------------------
# bad input: one line naming the flag and the file, exit 2, nothing written


def _wrong_group_mtz(path):
    d = read_hkl(HKL_03)  # a P1 data set labelled P 2 2 2: listed symmetry mates disagree
    return write_mtz(path, "P 2 2 2", (60, 70, 80, 90, 90, 90), [("FP", "F")], np.c_[d.hkl, d.F])


@pytest.mark.parametrize("extra,words", [
    (["-hkl", "p1.mtz", "-mtz_column", "FOBS"], ["-mtz_column FOBS", "p1.mtz", "no column 'FOBS'", "FP(F)"]),
    (["-hkl", "p1.mtz", "-mtz_column", "SIGFP"], ["p1.mtz", "'SIGFP' has type 'Q'"]),
    (["-hkl", "cut.mtz"], ["-hkl cut.mtz", "unreadable MTZ file"]),
    (["-hkl", "wrong.mtz"], ["-hkl wrong.mtz", "symmetry mates in P 2 2 2", "wrong space group"]),
    (["-pdb", "P1.hkl"], ["-pdb P1.hkl", "not a PDB or mmCIF model"]),
    (["-pdb", "tiny.pdb", "-hkl", "P1.hkl"], ["-pdb tiny.pdb", "-hkl P1.hkl", "use one"]),
    (["-hkl", "P1.hkl", "-mtz_column", "FP"], ["-mtz_column FP", "-hkl P1.hkl is a text file"]),
    (["-default_F", "1", "-mtz_anomalous", "separate"], ["-mtz_anomalous separate", "no -hkl file"]),
    (["-default_F", "1", "-pdb_bfactor", "20"], ["-pdb_bfactor", "-pdb FILE"]),
    (["-pdb", "tiny.pdb", "-pdb_bfactor", "-3"], ["-pdb_bfactor", ">= 0", "got -3"]),
    (["-hkl", "bad.hkl"], ["-hkl bad.hkl, line 2: l is not a number: 'x'"]),
    (["-hkl", "absent.mtz"], ["-hkl absent.mtz", "no such file"]),
    (["-pdb", "absent.cif"], ["-pdb absent.cif", "no such file"]),
])
def test_bad_structure_inputs_name_the_flag_and_file(inputs, capsys, extra, words):
    (inputs / "cut.mtz").write_bytes((inputs / "p1.mtz").read_bytes()[:200])
    (inputs / "bad.hkl").write_text("1 2 3 40\n1 2 x 50\n")
    _wrong_group_mtz(inputs / "wrong.mtz")
    before = _files(inputs)
    cell = [] if "-pdb" in extra else XTAL_03
    assert cli.main(cell + DETECTOR + ["-nexusfile", "sim.h5"] + extra) == 2
    _one_line_error(capsys, *words)
    assert _files(inputs) == before


def test_unreadable_and_missing_packages_are_named(inputs, capsys, monkeypatch):
    (inputs / "dir.mtz").mkdir()
    with pytest.raises(ValueError, match=r"^-hkl dir\.mtz: cannot read the file \(Is a directory\)$"):
        nbtorch.from_nanobragg_args(XTAL_03 + DETECTOR + ["-hkl", "dir.mtz"])
    monkeypatch.setitem(sys.modules, "gemmi", None)  # import gemmi now raises ImportError
    before = _files(inputs)
    assert cli.main(XTAL_03 + DETECTOR + ["-hkl", "p1.mtz"]) == 2
    _one_line_error(capsys, "-hkl p1.mtz", "gemmi", "nbtorch[io]")
    assert cli.main(DETECTOR + ["-pdb", "tiny.pdb"]) == 2
    _one_line_error(capsys, "-pdb tiny.pdb", "gemmi", "nbtorch[io]")
    assert _files(inputs) == before
    text = XTAL_03 + DETECTOR + ["-hkl", "P1.hkl"]  # the text path needs no gemmi
    assert nbtorch.from_nanobragg_args(text)[0].structure.F.numel() > 0


def test_a_model_alone_is_a_complete_command_line():
    from nbtorch.args import missing_inputs

    assert missing_inputs(parse_args(["-pdb", "x.pdb"])) == []
    assert len(missing_inputs(parse_args(["-hkl", "x.mtz"]))) == 1  # an MTZ gives no cell
