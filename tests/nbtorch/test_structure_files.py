"""Structure factors from MTZ files and atomic models (nbtorch.io.structure_files, via gemmi)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

gemmi = pytest.importorskip("gemmi")

import nbtorch  # noqa: E402
from nbtorch.io import hkl_to_grid, read_hkl  # noqa: E402
from nbtorch.io.structure_files import (  # noqa: E402
    StructureFileError,
    detector_corner_resolution,
    expand_to_p1,
    is_mtz,
    read_mtz,
    structure_factors_from_model,
)

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
HKL_03 = GOLDEN / "03_hkl_Nabc" / "P1.hkl"
CELL_03 = (60.0, 70.0, 80.0, 88.0, 95.0, 102.0)

TINY_PDB = """\
CRYST1   20.000   25.000   30.000  90.00  90.00  90.00 P 21 21 21    4
ATOM      1  N   GLY A   1       2.000   3.000   4.000  1.00 10.00           N
ATOM      2  CA  GLY A   1       3.200   3.500   4.600  1.00 12.00           C
ATOM      3  C   GLY A   1       4.100   2.400   5.100  1.00 15.00           C
ATOM      4  O   GLY A   1       4.000   1.200   4.800  0.80 20.00           O
HETATM    5 FE   HEM A   2       8.000   9.000  10.000  1.00 18.00          FE
END
"""


def write_mtz(path, spacegroup, cell, columns, rows):
    """An MTZ with H K L plus ``columns`` [(label, type)], data rows [n, 3 + len(columns)]."""
    mtz = gemmi.Mtz(with_base=True)
    mtz.spacegroup = gemmi.SpaceGroup(spacegroup)
    mtz.set_cell_for_all(gemmi.UnitCell(*cell))
    mtz.add_dataset("sim")
    for label, kind in columns:
        mtz.add_column(label, kind)
    mtz.set_data(np.asarray(rows, dtype=np.float32))
    mtz.write_to_file(str(path))
    return path


def at(F, hkl_min, h):
    """Table value at Miller index h."""
    return F[tuple(np.asarray(h) - np.asarray(hkl_min))]


@pytest.fixture(scope="module")
def golden_hkl():
    return read_hkl(HKL_03)


@pytest.fixture
def tiny_pdb(tmp_path):
    p = tmp_path / "tiny.pdb"
    p.write_text(TINY_PDB)
    return p


# ---------------------------------------------------------------------------------------------------------------
# MTZ: identical to the text -hkl path


def test_p1_mtz_from_text_hkl_gives_the_identical_table(tmp_path, golden_hkl):
    d = golden_hkl
    path = write_mtz(tmp_path / "p1.mtz", "P 1", CELL_03, [("FP", "F")], np.c_[d.hkl, d.F])
    for default_F in (0.0, 7.5):
        F, hkl_min, info = read_mtz(path, default_F=default_F)
        ref, ref_min = hkl_to_grid(d, default_F)
        assert hkl_min == ref_min and F.dtype == np.float64
        np.testing.assert_array_equal(F, ref)  # bit-identical, float32 storage notwithstanding
    assert info.column == "FP" and info.spacegroup == "P 1" and info.n_unique == info.n_p1 == len(d.F)
    assert is_mtz(path) and not is_mtz(HKL_03)
    assert info.cell == pytest.approx(CELL_03)


def test_p1_mtz_gives_a_bit_identical_image(tmp_path, golden_hkl):
    path = write_mtz(tmp_path / "p1.mtz", "P 1", CELL_03, [("FP", "F")], np.c_[golden_hkl.hkl, golden_hkl.F])
    args = (f"-hkl {HKL_03} -cell 60 70 80 88 95 102 -misset 5 -12 30 -Na 3 -Nb 6 -Nc 4 -lambda 1.2 "
            "-distance 120 -pixel 0.1 -detpixels_f 96 -detpixels_s 64 -oversample 1")
    params, setup = nbtorch.from_nanobragg_args(args)[:2]
    text_image = nbtorch.simulate(params, setup)
    F, hkl_min, _ = read_mtz(path)
    params_mtz = params._replace(structure=nbtorch.Structure(torch.as_tensor(F), params.structure.default_F))
    mtz_image = nbtorch.simulate(params_mtz, setup.replace(hkl_min=hkl_min))
    assert text_image.abs().max() > 0
    assert torch.equal(mtz_image, text_image)


def test_anomalous_pairs_separate_reproduce_friedel_different_data_and_average_by_default(tmp_path, golden_hkl):
    d = golden_hkl
    table = {tuple(h): f for h, f in zip(d.hkl.tolist(), d.F.tolist())}
    asu = gemmi.ReciprocalAsu(gemmi.SpaceGroup("P 1"))
    rows = [(*h, table[h], table[(-h[0], -h[1], -h[2])]) for h in table if asu.is_in(list(h)) and h != (0, 0, 0)]
    rows.append((0, 0, 0, table[(0, 0, 0)], table[(0, 0, 0)]))
    path = write_mtz(tmp_path / "anom.mtz", "P 1", CELL_03, [("F(+)", "G"), ("F(-)", "G")], rows)
    ref, ref_min = hkl_to_grid(d, 0.0)
    F, hkl_min, info = read_mtz(path, anomalous="separate")
    assert hkl_min == ref_min and info.column == "F(+),F(-)"
    np.testing.assert_array_equal(F, ref)
    Fa, _, info_a = read_mtz(path)  # default: averaged
    h = (3, -2, 5)
    mean = 0.5 * (table[h] + table[(-3, 2, -5)])
    assert at(Fa, hkl_min, h) == pytest.approx(mean) and at(Fa, hkl_min, (-3, 2, -5)) == pytest.approx(mean)
    assert any("averaged" in n for n in info_a.notes)
    # choosing the F(-) label picks the same pair
    assert read_mtz(path, column="F(-)", anomalous="separate")[2].column == "F(+),F(-)"


def test_anomalous_pair_with_one_half_missing_falls_back_to_friedels_law(tmp_path):
    nan = float("nan")
    rows = [(1, 2, 3, 10.0, 12.0), (2, 1, 1, 7.0, nan), (3, 0, 1, nan, 5.0)]
    path = write_mtz(tmp_path / "half.mtz", "P 1", (30, 30, 30, 90, 90, 90), [("I(+)", "K"), ("I(-)", "K")], rows)
    F, lo, info = read_mtz(path, column="I(+)", anomalous="separate")
    assert at(F, lo, (1, 2, 3)) == pytest.approx(math.sqrt(10.0)) and at(F, lo, (-1, -2, -3)) == pytest.approx(
        math.sqrt(12.0))
    assert at(F, lo, (2, 1, 1)) == at(F, lo, (-2, -1, -1)) == pytest.approx(math.sqrt(7.0))
    assert at(F, lo, (3, 0, 1)) == at(F, lo, (-3, 0, -1)) == pytest.approx(math.sqrt(5.0))
    Fa, lo, info = read_mtz(path, column="I(-)")
    assert at(Fa, lo, (1, 2, 3)) == at(Fa, lo, (-1, -2, -3)) == pytest.approx(0.5 * (math.sqrt(10) + math.sqrt(12)))
    assert at(Fa, lo, (2, 1, 1)) == pytest.approx(math.sqrt(7.0)) and info.column == "I(+),I(-)"


# ---------------------------------------------------------------------------------------------------------------
# MTZ: symmetry expansion


def _random_asu_mtz(path, spacegroup, cell, dmin, seed=0):
    sg = gemmi.SpaceGroup(spacegroup)
    hkl = gemmi.make_miller_array(gemmi.UnitCell(*cell), sg, dmin)
    F = np.round(np.random.default_rng(seed).uniform(1, 500, len(hkl)), 2)
    write_mtz(path, spacegroup, cell, [("FP", "F"), ("SIGFP", "Q")], np.c_[hkl, F, np.ones_like(F)])
    return hkl, F


@pytest.mark.parametrize("spacegroup,cell", [("P 21 21 21", (40, 50, 60, 90, 90, 90)),
                                             ("P 43 21 2", (45, 45, 60, 90, 90, 90)),
                                             ("C 1 2 1", (60, 40, 50, 90, 110, 90))])
def test_non_p1_mtz_expands_like_gemmi(tmp_path, spacegroup, cell):
    path = tmp_path / "asu.mtz"
    _random_asu_mtz(path, spacegroup, cell, 4.0)
    F, hkl_min, info = read_mtz(path, default_F=3.0)
    p1 = gemmi.read_mtz_file(str(path))
    p1.expand_to_p1()  # gemmi's own expansion (symmetry mates of every reflection)
    hkl = p1.make_miller_array()
    vals = p1.column_with_label("FP").array
    rng = np.random.default_rng(1)
    picks = rng.choice(len(hkl), size=300, replace=False)
    for i in picks:
        h = hkl[i]
        want = float(np.float32(vals[i]).astype(str))
        assert at(F, hkl_min, h) == want, (h, at(F, hkl_min, h), want)
        assert at(F, hkl_min, -h) == want  # Friedel mate
    ops = gemmi.SpaceGroup(spacegroup).operations()
    expanded = {tuple(h) for h in hkl.tolist()} | {tuple(-h) for h in hkl}
    assert info.n_p1 == len(expanded) and info.n_unique < info.n_p1
    # every other cell: 0 for systematic absences, default_F for reflections not in the file
    idx = np.argwhere(np.ones(F.shape, dtype=bool))
    hkl_all = idx + np.asarray(hkl_min)
    listed = np.array([tuple(h) in expanded for h in hkl_all.tolist()])
    absent = ops.systematic_absences(hkl_all.astype(np.int32))
    flat = F.reshape(-1)
    assert np.all(flat[~listed & absent] == 0.0)
    assert np.all(flat[~listed & ~absent] == 3.0)
    if spacegroup != "P 1":
        assert absent.any()


def test_expand_to_p1_keeps_listed_values_over_generated_mates():
    hkl = np.array([[1, 2, 3], [-1, -2, -3]])
    h_p1, F_p1 = expand_to_p1(hkl, [10.0, 20.0], "P 1")
    grid, lo = hkl_to_grid((h_p1, F_p1))
    assert at(grid, lo, (1, 2, 3)) == 10.0 and at(grid, lo, (-1, -2, -3)) == 20.0
    h_p1, F_p1 = expand_to_p1(hkl[:1], [10.0], "P 2 2 2")
    mates = {tuple(h) for h in h_p1.tolist()}
    assert mates == {(1, 2, 3), (-1, -2, 3), (-1, 2, -3), (1, -2, -3), (-1, -2, -3), (1, 2, -3), (1, -2, 3),
                     (-1, 2, 3)}
    assert np.all(F_p1 == 10.0)


# ---------------------------------------------------------------------------------------------------------------
# MTZ: columns, intensities


def test_default_column_is_the_first_amplitude_and_labels_choose(tmp_path):
    rows = [[1, 2, 3, 400.0, 20.0, 21.0, 1.0, 30.0], [2, 0, 1, -9.0, 3.0, 2.5, 0.5, 4.0]]
    cols = [("IMEAN", "J"), ("SIGIMEAN", "Q"), ("FP", "F"), ("SIGFP", "Q"), ("FC", "F")]
    path = write_mtz(tmp_path / "cols.mtz", "P 1", (30, 30, 30, 90, 90, 90), cols, rows)
    F, lo, info = read_mtz(path)
    assert info.column == "FP" and at(F, lo, (1, 2, 3)) == 21.0 and at(F, lo, (-2, 0, -1)) == 2.5
    F, lo, info = read_mtz(path, column="FC")
    assert at(F, lo, (1, 2, 3)) == 30.0
    F, lo, info = read_mtz(path, column="IMEAN")
    assert at(F, lo, (1, 2, 3)) == 20.0 and at(F, lo, (2, 0, 1)) == 0.0  # sqrt(400); negative I -> 0
    assert any("intensities" in n and "1 negative" in n for n in info.notes)


def test_intensity_only_mtz_needs_a_chosen_column(tmp_path):
    path = write_mtz(tmp_path / "i.mtz", "P 1", (30, 30, 30, 90, 90, 90), [("I", "J"), ("SIGI", "Q")],
                     [[1, 0, 0, 16.0, 1.0]])
    with pytest.raises(StructureFileError, match=r"i\.mtz: no amplitude column .*I\(J\), SIGI\(Q\)"):
        read_mtz(path)
    F, lo, _ = read_mtz(path, column="I")
    assert at(F, lo, (1, 0, 0)) == 4.0 and at(F, lo, (-1, 0, 0)) == 4.0


# ---------------------------------------------------------------------------------------------------------------
# MTZ: errors name the file and the problem


def test_mtz_errors(tmp_path, golden_hkl):
    d = golden_hkl
    good = write_mtz(tmp_path / "good.mtz", "P 1", CELL_03, [("FP", "F"), ("SIGFP", "Q")],
                     np.c_[d.hkl, d.F, np.ones_like(d.F)])
    with pytest.raises(StructureFileError, match=r"good\.mtz: no column 'FOBS'; columns: H\(H\), K\(H\), L\(H\), "
                                                 r"FP\(F\), SIGFP\(Q\)"):
        read_mtz(good, column="FOBS")
    with pytest.raises(StructureFileError, match=r"good\.mtz: column 'SIGFP' has type 'Q', not an amplitude"):
        read_mtz(good, column="SIGFP")
    with pytest.raises(StructureFileError, match=r"good\.mtz: unknown space group 'P 7'"):
        read_mtz(good, spacegroup="P 7")
    with pytest.raises(StructureFileError, match=r"good\.mtz: unit cell .* not compatible with space group P 4"):
        read_mtz(good, spacegroup="P 4")
    with pytest.raises(ValueError, match="anomalous must be one of"):
        read_mtz(good, anomalous="plus")
    # a P1 data set relabelled P 2 2 2: symmetry mates listed with different amplitudes
    wrong = write_mtz(tmp_path / "wrong.mtz", "P 2 2 2", (60, 70, 80, 90, 90, 90), [("FP", "F")], np.c_[d.hkl, d.F])
    with pytest.raises(StructureFileError, match=r"wrong\.mtz: reflections .* are symmetry mates in P 2 2 2 but "
                                                  r"have F .*wrong space group"):
        read_mtz(wrong)
    F, lo, _ = read_mtz(wrong, spacegroup="P 1")  # taken as listed
    np.testing.assert_array_equal(F, hkl_to_grid(d)[0])
    with pytest.raises(StructureFileError, match=r"P1\.hkl: not an MTZ file"):
        read_mtz(HKL_03)
    with pytest.raises(OSError, match="missing.mtz"):
        read_mtz(tmp_path / "missing.mtz")
    cut = tmp_path / "cut.mtz"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(StructureFileError, match=r"cut\.mtz: unreadable MTZ file"):
        read_mtz(cut)


def test_unmerged_mtz_is_refused(tmp_path):
    mtz = gemmi.Mtz(with_base=True)
    mtz.spacegroup = gemmi.SpaceGroup("P 1")
    mtz.set_cell_for_all(gemmi.UnitCell(30, 30, 30, 90, 90, 90))
    mtz.add_dataset("x")
    mtz.add_column("F", "F")
    mtz.set_data(np.array([[1, 0, 0, 5.0]], dtype=np.float32))
    batch = gemmi.Mtz.Batch()
    batch.number = 1
    mtz.batches.append(batch)
    mtz.write_to_file(str(tmp_path / "unmerged.mtz"))
    with pytest.raises(StructureFileError, match=r"unmerged\.mtz: unmerged MTZ"):
        read_mtz(tmp_path / "unmerged.mtz")


def test_missing_gemmi_names_the_extra(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "gemmi":
            raise ImportError("No module named 'gemmi'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install nbtorch\[io\]"):
        read_mtz(tmp_path / "x.mtz")
    with pytest.raises(ImportError, match=r"gemmi"):
        structure_factors_from_model(tmp_path / "x.pdb", 2.0)


# ---------------------------------------------------------------------------------------------------------------
# atomic models


def test_model_amplitudes_match_gemmi_at_sampled_reflections(tiny_pdb):
    st = gemmi.read_structure(str(tiny_pdb))
    calc = gemmi.StructureFactorCalculatorX(st.cell)
    F_direct, lo, info = structure_factors_from_model(tiny_pdb, 2.0, method="direct")
    F_fft, lo_fft, _ = structure_factors_from_model(tiny_pdb, 2.0)
    assert lo == lo_fft and F_direct.shape == F_fft.shape
    assert info.spacegroup == "P 21 21 21" and info.n_p1 > 4 * info.n_unique  # mates and Friedel mates
    cell = st.cell
    rng = np.random.default_rng(3)
    checked = 0
    while checked < 40:
        h = [int(x) for x in rng.integers(-9, 10, 3)]
        if h == [0, 0, 0] or cell.calculate_d(h) < 2.0:
            continue
        ref = abs(calc.calculate_sf_from_model(st[0], h))
        assert at(F_direct, lo, h) == pytest.approx(ref, rel=1e-9, abs=1e-9)
        assert at(F_fft, lo, h) == pytest.approx(ref, rel=2e-3, abs=2e-3 * F_direct.max())
        checked += 1
    assert at(F_direct, lo, (0, 0, 3)) == 0.0  # systematic absence of the 21 screw along c


def test_mmcif_gives_the_same_table_as_pdb(tiny_pdb, tmp_path):
    st = gemmi.read_structure(str(tiny_pdb))
    cif = tmp_path / "tiny.cif"
    st.setup_entities()
    st.make_mmcif_document().write_file(str(cif))
    F_pdb, lo_pdb, _ = structure_factors_from_model(tiny_pdb, 2.5, method="direct")
    F_cif, lo_cif, _ = structure_factors_from_model(cif, 2.5, method="direct")
    assert lo_pdb == lo_cif
    np.testing.assert_allclose(F_cif, F_pdb, rtol=1e-12, atol=1e-12)


def test_bfactor_override_scales_a_single_atom_as_exp_minus_b_s2_over_4(tmp_path):
    pdb = tmp_path / "one.pdb"
    pdb.write_text("CRYST1   15.000   17.000   19.000  90.00  90.00  90.00 P 1           1\n"
                   "HETATM    1 FE   FE  A   1       1.000   2.000   3.000  1.00 33.00          FE\nEND\n")
    F10, lo, info = structure_factors_from_model(pdb, 2.0, bfactor=10.0, method="direct")
    F30, lo30, _ = structure_factors_from_model(pdb, 2.0, bfactor=30.0, method="direct")
    Fmodel, _, _ = structure_factors_from_model(pdb, 2.0, method="direct")
    assert lo == lo30 and any("B set to 10" in n for n in info.notes)
    cell = gemmi.UnitCell(15, 17, 19, 90, 90, 90)
    for h in [(1, 0, 0), (2, 3, 1), (-3, 4, 5), (7, 0, -2)]:
        inv_d2 = 1.0 / cell.calculate_d(list(h)) ** 2
        assert at(F30, lo, h) / at(F10, lo, h) == pytest.approx(math.exp(-20.0 * inv_d2 / 4.0), rel=1e-6)
        assert at(Fmodel, lo, h) / at(F10, lo, h) == pytest.approx(math.exp(-23.0 * inv_d2 / 4.0), rel=1e-6)


def test_bulk_solvent_changes_low_resolution_most(tiny_pdb):
    F0, lo, _ = structure_factors_from_model(tiny_pdb, 2.0)
    F1, lo1, info = structure_factors_from_model(tiny_pdb, 2.0, solvent=True)
    assert lo == lo1 and any("bulk solvent" in n for n in info.notes)
    cell = gemmi.UnitCell(20, 25, 30, 90, 90, 90)
    idx = np.argwhere(F0 > 0)
    hkl = idx + np.asarray(lo)
    d = cell.calculate_d_array(hkl.astype(np.int32))
    change = np.abs(F1[tuple(idx.T)] - F0[tuple(idx.T)]) / F0[tuple(idx.T)]
    assert np.median(change[d > 6]) > 5 * np.median(change[d < 2.5])


def test_model_cell_and_spacegroup_options(tmp_path):
    body = TINY_PDB.split("\n", 1)[1]
    nocell = tmp_path / "nocell.pdb"
    nocell.write_text(body)
    with pytest.raises(StructureFileError, match=r"nocell\.pdb: no unit cell in the model"):
        structure_factors_from_model(nocell, 2.0)
    F, lo, info = structure_factors_from_model(nocell, 3.0, cell=(20, 25, 30, 90, 90, 90), method="direct")
    assert info.spacegroup == "P 1" and any("P 1 assumed" in n for n in info.notes)
    badsg = tmp_path / "badsg.pdb"
    badsg.write_text(TINY_PDB.replace("P 21 21 21 ", "P 7 7 7    "))
    with pytest.raises(StructureFileError, match=r"badsg\.pdb: unknown space group 'P 7 7 7'"):
        structure_factors_from_model(badsg, 2.0)
    with pytest.raises(StructureFileError, match=r"nocell\.pdb: unit cell .* not compatible with space group P 4"):
        structure_factors_from_model(nocell, 3.0, cell=(20, 25, 30, 90, 90, 90), spacegroup="P 4")


def test_model_errors_name_the_file(tmp_path, tiny_pdb):
    with pytest.raises(StructureFileError, match=r"P1\.hkl: not a PDB or mmCIF model"):
        structure_factors_from_model(HKL_03, 2.0)
    junk = tmp_path / "junk.pdb"
    junk.write_text("hello\n")
    with pytest.raises(StructureFileError, match=r"junk\.pdb: no atoms"):
        structure_factors_from_model(junk, 2.0)
    with pytest.raises(OSError, match="absent.pdb"):
        structure_factors_from_model(tmp_path / "absent.pdb", 2.0)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=r"tiny\.pdb: dmin \(Å\) must be finite and > 0"):
            structure_factors_from_model(tiny_pdb, bad)
    with pytest.raises(ValueError, match=r"bfactor \(Å²\) must be finite and >= 0"):
        structure_factors_from_model(tiny_pdb, 2.0, bfactor=-5)
    with pytest.raises(ValueError, match="method must be"):
        structure_factors_from_model(tiny_pdb, 2.0, method="magic")


# ---------------------------------------------------------------------------------------------------------------
# resolution at the detector corners


def test_detector_corner_resolution_matches_braggs_law():
    params, setup = nbtorch.from_nanobragg_args(
        "-cell 50 50 50 90 90 90 -default_F 1 -lambda 1.5 -distance 100 -pixel 0.1 -detpixels_f 300 "
        "-detpixels_s 200 -Xbeam 10 -Ybeam 15")[:2]
    # MOSFLM: the beam hits (Fbeam, Sbeam) = (Ybeam + p/2, Xbeam + p/2) mm from the corner of pixel (0, 0)
    fb, sb = 15.05, 10.05
    far = max(math.hypot(x - fb, y - sb) for x in (0.0, 30.0) for y in (0.0, 20.0))
    two_theta = math.atan2(far, 100.0)
    assert detector_corner_resolution(params, setup) == pytest.approx(1.5 / (2 * math.sin(two_theta / 2)), rel=1e-12)
    shorter = params._replace(beam=params.beam._replace(wavelength=torch.tensor(1.0, dtype=torch.float64)))
    assert detector_corner_resolution(shorter, setup) == pytest.approx(
        detector_corner_resolution(params, setup) / 1.5, rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# issue 18: the CCP4 anomalous layouts, chosen by label


CCP4_ROWS = [(1, 2, 3, 10.0, 0.5, 12.0, 0.6), (2, 1, 1, 7.0, 0.4, 9.0, 0.3), (0, 1, 1, 4.0, 0.2, 4.0, 0.2)]


@pytest.mark.parametrize("amp,sig,kind,sigkind,conv", [
    ("F", "SIGF", "G", "L", lambda x: x),
    ("I", "SIGI", "K", "M", math.sqrt),
])
def test_ccp4_anomalous_layout_is_paired_by_label(tmp_path, amp, sig, kind, sigkind, conv):
    """F(+) SIGF(+) F(-) SIGF(-) (and I(+) SIGI(+) I(-) SIGI(-)): the (-) column is found by its label, not as the
    next column; choosing either half reads the pair."""
    cols = [(f"{amp}(+)", kind), (f"{sig}(+)", sigkind), (f"{amp}(-)", kind), (f"{sig}(-)", sigkind)]
    path = write_mtz(tmp_path / "ccp4.mtz", "P 1", (30, 30, 30, 90, 90, 90), cols, CCP4_ROWS)
    for column in ([f"{amp}(+)", f"{amp}(-)"] if kind == "K" else [None, f"{amp}(+)", f"{amp}(-)"]):
        F, lo, info = read_mtz(path, column=column, anomalous="separate")
        assert info.column == f"{amp}(+),{amp}(-)"
        assert at(F, lo, (1, 2, 3)) == pytest.approx(conv(10.0)) and at(F, lo, (-1, -2, -3)) == pytest.approx(
            conv(12.0))
        assert at(F, lo, (2, 1, 1)) == pytest.approx(conv(7.0)) and at(F, lo, (-2, -1, -1)) == pytest.approx(
            conv(9.0))
    Fa, lo, _ = read_mtz(path, column=f"{amp}(-)")  # averaged by default
    assert at(Fa, lo, (1, 2, 3)) == at(Fa, lo, (-1, -2, -3)) == pytest.approx(0.5 * (conv(10.0) + conv(12.0)))


def test_anomalous_partner_is_found_wherever_it_stands_and_errors_name_it(tmp_path):
    rows = [(1, 2, 3, 12.0, 5.0, 10.0), (2, 1, 1, 9.0, 6.0, 7.0)]
    path = write_mtz(tmp_path / "order.mtz", "P 1", (30, 30, 30, 90, 90, 90),
                     [("F-", "G"), ("FP", "F"), ("F+", "G")], rows)  # minus first, not adjacent
    F, lo, info = read_mtz(path, column="F+", anomalous="separate")
    assert info.column == "F+,F-" and at(F, lo, (1, 2, 3)) == 10.0 and at(F, lo, (-1, -2, -3)) == 12.0
    lone = write_mtz(tmp_path / "lone.mtz", "P 1", (30, 30, 30, 90, 90, 90), [("F(+)", "G"), ("SIGF(+)", "L")],
                     [(1, 2, 3, 10.0, 1.0)])
    with pytest.raises(StructureFileError, match=r"lone\.mtz: anomalous column 'F\(\+\)' has no partner 'F\(-\)'; "
                                                 r"columns: .*F\(\+\)\(G\), SIGF\(\+\)\(L\)"):
        read_mtz(lone)
    odd = write_mtz(tmp_path / "odd.mtz", "P 1", (30, 30, 30, 90, 90, 90), [("FA", "G"), ("FB", "G")],
                    [(1, 2, 3, 10.0, 1.0)])
    with pytest.raises(StructureFileError, match=r"odd\.mtz: anomalous column 'FA' \(type G\) is not labelled as one "
                                                 r"half of a pair"):
        read_mtz(odd)
    mixed = write_mtz(tmp_path / "mixed.mtz", "P 1", (30, 30, 30, 90, 90, 90), [("I(+)", "K"), ("I(-)", "G")],
                      [(1, 2, 3, 10.0, 1.0)])
    with pytest.raises(StructureFileError, match=r"mixed\.mtz: anomalous columns 'I\(\+\)' and 'I\(-\)' have "
                                                 r"different types \(K, G\)"):
        read_mtz(mixed, column="I(+)")


# ---------------------------------------------------------------------------------------------------------------
# issue 18: atoms checked, named


CELL_LINE = "CRYST1   20.000   25.000   30.000  90.00  90.00  90.00 P 1           1\n"
GOOD_ATOM = "ATOM      1  N   GLY A   1       2.000   3.000   4.000  1.00 10.00           N\n"


def _cif_with(tmp_path, name, column, value):
    """tiny.pdb as mmCIF with one _atom_site value of its last atom replaced (column: the loop's column index)."""
    st = gemmi.read_structure(str(tmp_path / "tiny.pdb"))
    st.setup_entities()
    lines = st.make_mmcif_document().as_string().splitlines()
    i = max(j for j, line in enumerate(lines) if line.startswith("HETATM"))
    words = lines[i].split()
    words[column] = value
    lines[i] = " ".join(words)
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_model_atoms_of_unknown_element_or_at_bad_positions_are_named(tmp_path, tiny_pdb):
    from nbtorch.io.structure_files import model_cell

    xx = tmp_path / "xx.pdb"
    xx.write_text(CELL_LINE + GOOD_ATOM +
                  "ATOM      2 XX1  UNK A   2       3.200   3.500   4.600  1.00 12.00          XX\nEND\n")
    nan = tmp_path / "nan.pdb"  # gemmi reads this x as 0 without a word
    nan.write_text(CELL_LINE + GOOD_ATOM + GOOD_ATOM.replace("    1  N ", "    2  CA").replace("   2.000", "     nan")
                   + "END\n")
    empty = tmp_path / "empty.pdb"
    empty.write_text(CELL_LINE + "END\n")
    cases = [
        (xx, r"xx\.pdb: atom 2 'XX1' \(residue UNK 2, chain A\) has an unknown element"),
        (nan, r"nan\.pdb: atom 2 'CA' \(residue GLY 1, chain A\) has coordinates 'nan 3\.000 4\.000', not three "
              r"numbers"),
        (empty, r"empty\.pdb: no atoms \(an empty model"),
        (_cif_with(tmp_path, "nan.cif", 10, "?"), r"nan\.cif: atom 5 'FE' \(residue HEM 2, chain A\) is at \(nan, 9, "
                                                  r"10\) Å: coordinates must be finite and within ±100000 Å"),
        (_cif_with(tmp_path, "far.cif", 11, "1e30"), r"far\.cif: atom 5 'FE' .* is at \(8, 1e\+30, 10\) Å"),
        (_cif_with(tmp_path, "xx.cif", 2, "XX"), r"xx\.cif: atom 5 'FE' \(residue HEM 2, chain A\) has an unknown "
                                                 r"element"),
        (_cif_with(tmp_path, "occ.cif", 13, "nan"), r"occ\.cif: atom 5 'FE' .* has occupancy nan and B 18"),
    ]
    for path, message in cases:
        with pytest.raises(StructureFileError, match=message):
            structure_factors_from_model(path, 2.0)
        with pytest.raises(StructureFileError, match=message):  # what -pdb reads first, for the cell
            model_cell(path)
    far = _cif_with(tmp_path, "near.cif", 11, "99999")  # within the bound: accepted
    assert structure_factors_from_model(far, 3.0)[0].max() > 0


# ---------------------------------------------------------------------------------------------------------------
# issue 18: the model calculation, bounded and interruptible


def _random_model(path, spacegroup, cell, n_atoms, seed=0):
    """A model of ``n_atoms`` random C/N/O/S atoms (B 15–30) in ``cell`` and ``spacegroup``, written as PDB."""
    rng = np.random.default_rng(seed)
    st = gemmi.Structure()
    st.cell = gemmi.UnitCell(*cell)
    st.spacegroup_hm = spacegroup
    model, chain = gemmi.Model(1), gemmi.Chain("A")
    for i in range(n_atoms):
        res = gemmi.Residue()
        res.name, res.seqid = "ALA", gemmi.SeqId(i + 1, " ")
        atom = gemmi.Atom()
        atom.name = atom.element.name if False else "CNOS"[i % 4]
        atom.element = gemmi.Element(atom.name)
        atom.pos = st.cell.orthogonalize(gemmi.Fractional(*rng.uniform(0, 1, 3)))
        atom.b_iso, atom.occ, atom.serial = float(rng.uniform(15, 30)), 1.0, i + 1
        res.add_atom(atom)
        chain.add_residue(res)
    model.add_chain(chain)
    st.add_model(model)
    st.setup_entities()
    st.write_pdb(str(path))
    return path


@pytest.mark.parametrize("spacegroup,cell", [
    ("C 1 2 1", (30, 22, 26, 90, 103, 90)),  # centred, oblique
    ("P 61", (24, 24, 30, 90, 90, 120)),  # screw axis, hexagonal
    ("I 2 2 2", (20, 24, 28, 90, 90, 90)),
])
def test_fft_table_is_the_direct_sum_in_any_space_group(tmp_path, spacegroup, cell):
    """The FFT method (the model's own atoms on a P1 grid, the symmetry summed in reciprocal space) agrees with
    gemmi's direct sum; symmetry and Friedel mates are equal to the bit; absences are 0."""
    path = _random_model(tmp_path / "m.pdb", spacegroup, cell, 12)
    sentinel = 1234.5  # -default_F: in the table beyond dmin only
    F_fft, lo, info = structure_factors_from_model(path, 2.5, default_F=sentinel)
    F_dir, lo_d, _ = structure_factors_from_model(path, 2.5, default_F=sentinel, method="direct")
    assert lo == lo_d and info.spacegroup == gemmi.SpaceGroup(spacegroup).hm
    st = gemmi.read_structure(str(path))
    calc = gemmi.StructureFactorCalculatorX(st.cell)
    sg = gemmi.SpaceGroup(spacegroup)
    inside = F_dir != sentinel
    assert inside.sum() == info.n_p1
    idx = np.argwhere(inside)
    rng = np.random.default_rng(1)
    for i in rng.choice(len(idx), 60, replace=False):
        h = [int(x) for x in idx[i] + np.asarray(lo)]
        ref = 0.0 if sg.operations().is_systematically_absent(h) else abs(calc.calculate_sf_from_model(st[0], h))
        assert F_dir[tuple(idx[i])] == pytest.approx(ref, rel=1e-9, abs=1e-9)
        assert F_fft[tuple(idx[i])] == pytest.approx(ref, abs=2e-3 * F_dir.max())
        for op in sg.operations():
            for mate in (op.apply_to_hkl(h), [-x for x in op.apply_to_hkl(h)]):
                assert at(F_fft, lo, mate) == F_fft[tuple(idx[i])]
    assert np.all(F_fft[~inside] == sentinel)


def test_model_work_beyond_the_memory_limit_is_refused_before_any_work(tmp_path, tiny_pdb, monkeypatch):
    from nbtorch.io import structure_files as sf

    with pytest.raises(sf.ModelWorkError, match=r"tiny\.pdb: \|F\| of 5 atoms to 0\.5 Å: about .* s and .* GB \(a "
                                                 r"\d+×\d+×\d+ density grid, a 81×101×121 table\): more than the "
                                                 r"1e-06 GB of memory available") as err:
        structure_factors_from_model(tiny_pdb, 0.5, max_bytes=1000)
    work = err.value.work
    assert work.atoms == 5 and work.table == (81, 101, 121) and err.value.limit == 1000
    assert work.bytes > 8 * 81 * 101 * 121  # the table alone
    monkeypatch.setattr(sf, "available_memory", lambda: 1000)  # the default limit: the memory available
    with pytest.raises(sf.ModelWorkError):
        structure_factors_from_model(tiny_pdb, 0.5)
    monkeypatch.setattr(sf, "_asu_transform", None)  # nothing is computed before the check
    with pytest.raises(sf.ModelWorkError):
        structure_factors_from_model(tiny_pdb, 0.5, method="fft")


def test_long_model_work_is_warned_with_its_estimate(tiny_pdb):
    from nbtorch.io.structure_files import ModelWorkWarning

    with pytest.warns(ModelWorkWarning, match=r"tiny\.pdb: \|F\| of 5 atoms to 2 Å: about .* s and .* GB .*; a "
                                              r"coarser dmin is faster"):
        structure_factors_from_model(tiny_pdb, 2.0, long_seconds=0.0)


@pytest.fixture(scope="module")
def medium_model(tmp_path_factory):
    """300 atoms in a 60×70×80 Å P 21 21 21 cell: at 1.2 Å a 150×180×200 density grid, whose single-call FFT and
    symmetrisation took ~0.3 s each and whose P1 expansion held ~10⁶ rows at once before issue 18."""
    return _random_model(tmp_path_factory.mktemp("medium") / "medium.pdb", "P 21 21 21", (60, 70, 80, 90, 90, 90), 300)


def test_model_calculation_returns_to_python_often_and_stays_within_its_estimate(medium_model):
    """Each call into C (gemmi, numpy) is short, so a signal's Python handler runs within a second; the numpy
    memory stays within the estimate (which also counts gemmi's density grid)."""
    import sys
    import time
    import tracemalloc

    from nbtorch.io import structure_files as sf

    longest, started = [0.0, ""], [None]

    def profile(frame, event, arg):
        now = time.perf_counter()
        if event == "c_call":
            started[0] = now
        elif event in ("c_return", "c_exception") and started[0] is not None:
            if now - started[0] > longest[0]:
                longest[:] = [now - started[0], getattr(arg, "__qualname__", str(arg))]
            started[0] = None

    tracemalloc.start()
    sys.setprofile(profile)
    try:
        F, lo, info = structure_factors_from_model(medium_model, 1.2, long_seconds=math.inf)
    finally:
        sys.setprofile(None)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert longest[0] < 0.5, longest  # ~0.05 s on an idle core
    g = gemmi.read_structure(str(medium_model))
    work = sf._estimate(gemmi, g, gemmi.SpaceGroup("P 21 21 21"), 1.2, "fft", 1.5, False)
    assert work.table == F.shape and peak <= work.bytes
    assert info.n_p1 > 7 * info.n_unique


def test_sigterm_stops_a_long_pdb_run_within_a_second(tmp_path, medium_model):
    """nbtorch -pdb: the long-work warning is one line on stderr; SIGTERM during the calculation ends the program
    within a second (exit 143, one line, nothing written)."""
    import signal
    import subprocess
    import sys
    import time

    script = ("import sys, nbtorch.io.structure_files as sf; sf.LONG_SECONDS = 0.0; from nbtorch.cli import main; "
              "sys.exit(main(sys.argv[1:]))")
    argv = [sys.executable, "-c", script, "-pdb", str(medium_model), "-lambda", "1", "-distance", "30",
            "-detpixels", "200", "-pixel", "0.3", "-nopgm", "-nonoise", "-floatfile", "out.bin"]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert line.startswith("nbtorch: warning: ") and "medium.pdb: |F| of 300 atoms to" in line, line
        time.sleep(0.2)
        sent = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        rest = [proc.stderr.readline(), proc.stderr.readline()]
        delay = time.perf_counter() - sent  # the calculation stopped, the program says so (then exits)
        rc = proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.stderr.close()
    assert rc == 143 and delay < 1.0, (rc, delay)
    assert rest == ["\n", "nbtorch: interrupted\n"]
    assert not (tmp_path / "out.bin").exists()
