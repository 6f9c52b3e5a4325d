"""Issue 18, inputs: damaged images and foreign HDF5 files, image headers that disagree with the flags, the CCP4
anomalous MTZ layout, model atoms and the bounded -pdb calculation — through ``nbtorch`` and ``nbtorch-refine``:
one line naming the flag (or OBSERVED) and the file, exit 2, nothing written; warnings of one line."""
from __future__ import annotations

import numpy as np
import pytest

gemmi = pytest.importorskip("gemmi")
fabio = pytest.importorskip("fabio")
h5py = pytest.importorskip("h5py")

import nbtorch  # noqa: E402
import nbtorch.io as nio  # noqa: E402
from nbtorch import cli  # noqa: E402
from nbtorch.io.images import HeaderWarning  # noqa: E402
from refine.cli.fit import main as refine_main  # noqa: E402

XTAL = ["-cell", "50", "50", "50", "90", "90", "90", "-default_F", "1", "-N", "3"]
QUIET = ["-nopgm", "-nonoise", "-noprogress"]
TINY_PDB = """\
CRYST1   20.000   25.000   30.000  90.00  90.00  90.00 P 21 21 21    4
ATOM      1  N   GLY A   1       2.000   3.000   4.000  1.00 10.00           N
ATOM      2  CA  GLY A   1       3.200   3.500   4.600  1.00 12.00           C
HETATM    3 FE   HEM A   2       8.000   9.000  10.000  1.00 18.00          FE
END
"""
PDB_RUN = ["-N", "5", "-lambda", "1", "-distance", "60", "-pixel", "0.5", "-detpixels", "48", "-oversample", "1"]


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A working folder with a truncated CBF, an HDF5 file that is neither NXmx nor Eiger, an SMV image with a
    header (64×64, pixel 0.1 mm, distance 90 mm, λ 1.2 Å) and tiny.pdb."""
    from fabio.cbfimage import CbfImage

    monkeypatch.chdir(tmp_path)
    CbfImage(data=np.arange(100 * 120, dtype=np.int32).reshape(100, 120)).write("whole.cbf")
    whole = (tmp_path / "whole.cbf").read_bytes()
    (tmp_path / "cut.cbf").write_bytes(whole[: len(whole) // 2])
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["data"] = np.zeros((64, 64))
    nio.write_smv(tmp_path / "hdr.img", np.full((64, 64), 10, np.uint16),
                  [("PIXEL_SIZE", "0.1"), ("DISTANCE", "90"), ("WAVELENGTH", "1.2")])
    (tmp_path / "tiny.pdb").write_text(TINY_PDB)
    return tmp_path


def _names(path) -> set:
    return {p.name for p in path.iterdir()}


def _one_line(capsys, prog, *words) -> str:
    out, err = capsys.readouterr()
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


@pytest.mark.parametrize("flag", ["-img", "-mask"])
@pytest.mark.parametrize("name,words", [("cut.cbf", ["not an SMV file"]), ("plain.h5", ["not an SMV file"])])
def test_img_and_mask_that_are_not_smv_are_one_line_errors(files, capsys, flag, name, words):
    before = _names(files)
    assert cli.main(XTAL + QUIET + [flag, name]) == 2
    _one_line(capsys, "nbtorch", f"{flag} {name}: ", *words)
    assert _names(files) == before


@pytest.mark.parametrize("name,words", [
    ("cut.cbf", ["OBSERVED cut.cbf: not a readable image (truncated or damaged"]),
    ("plain.h5", ["OBSERVED plain.h5: an HDF5 file that is neither NXmx (NeXus) nor an Eiger master file"]),
])
def test_refine_observed_damaged_or_foreign_is_one_line(files, capsys, name, words):
    before = _names(files)
    assert refine_main([name] + XTAL + ["-detpixels", "64"]) == 2
    _one_line(capsys, "nbtorch-refine", *words)
    assert _names(files) == before


def test_img_header_disagreeing_with_the_flags_is_a_warning_naming_both(files):
    with pytest.warns(HeaderWarning) as record:
        nbtorch.from_nanobragg_args(XTAL + ["-img", "hdr.img", "-pixel", "0.12", "-distance", "95", "-energy",
                                            "12000"])
    lines = sorted(str(w.message) for w in record)
    assert lines == [
        "-img hdr.img: the header's distance 90 mm disagrees with -distance 95 mm (beyond the header's precision "
        "±5e-05 mm); the flag's value is used",
        "-img hdr.img: the header's pixel size 0.1 mm disagrees with -pixel 0.12 mm (beyond the header's precision "
        "±5e-07 mm); the flag's value is used",
        "-img hdr.img: the header's wavelength 1.2 Å disagrees with -energy 12000 eV, i.e. lambda 1.033201667 Å "
        "(beyond the header's precision ±5e-06 Å); the flag's value is used"]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # agreement within the printed precision, or no flag: silence
        params, setup = nbtorch.from_nanobragg_args(XTAL + ["-img", "hdr.img", "-pixel", "0.1000004"])
        nbtorch.from_nanobragg_args(XTAL + ["-mask", "hdr.img", "-distance", "90.00004", "-lambda", "1.2"])
    assert float(params.detector.distance) == 90.0 and float(params.beam.wavelength) == 1.2  # from the header


def test_refine_observed_header_disagreeing_with_the_flags_is_a_warning(files, capsys):
    with pytest.warns(HeaderWarning, match=r"^OBSERVED hdr\.img: the header's distance 90 mm disagrees with -distance "
                                           r"100 mm \(beyond the header's precision ±5e-05 mm\)"):
        assert refine_main(["hdr.img"] + XTAL + ["-detpixels", "32", "-pixel", "0.1", "-lambda", "1.2"]) == 2
    _one_line(capsys, "nbtorch-refine", "hdr.img is 64×64 pixels")  # (stopped here, after the warning)


def test_ccp4_anomalous_mtz_through_the_command_line(files):
    mtz = gemmi.Mtz(with_base=True)
    mtz.spacegroup = gemmi.SpaceGroup("P 1")
    mtz.set_cell_for_all(gemmi.UnitCell(50, 50, 50, 90, 90, 90))
    mtz.add_dataset("x")
    for label, kind in (("F(+)", "G"), ("SIGF(+)", "L"), ("F(-)", "G"), ("SIGF(-)", "L")):
        mtz.add_column(label, kind)
    mtz.set_data(np.array([[1, 2, 3, 10.0, 1.0, 12.0, 1.0], [2, 0, 1, 20.0, 1.0, 21.0, 1.0]], np.float32))
    mtz.write_to_file("ccp4.mtz")
    flags = XTAL[:6] + ["-N", "3", "-hkl", "ccp4.mtz", "-mtz_anomalous", "separate"]
    params, setup = nbtorch.from_nanobragg_args(flags)
    F, lo = params.structure.F.numpy(), np.asarray(setup.hkl_min)
    assert F[tuple(np.subtract((1, 2, 3), lo))] == 10.0 and F[tuple(np.subtract((-1, -2, -3), lo))] == 12.0
    params, setup = nbtorch.from_nanobragg_args(flags + ["-mtz_column", "F(-)"])
    assert params.structure.F[tuple(np.subtract((-2, 0, -1), setup.hkl_min))] == 21.0


def test_pdb_atoms_are_checked_before_any_work(files, capsys):
    (files / "xx.pdb").write_text(TINY_PDB.replace("HETATM    3 FE   HEM A   2", "HETATM    3 XX1  UNK A   2")
                                  .replace("          FE\n", "          XX\n"))
    before = _names(files)
    assert cli.main(["-pdb", "xx.pdb"] + PDB_RUN + QUIET) == 2
    _one_line(capsys, "nbtorch", "-pdb xx.pdb: atom 3 'XX1' (residue UNK 2, chain A) has an unknown element")
    assert _names(files) == before


def test_pdb_beyond_the_memory_available_is_refused_naming_the_flags(files, capsys, monkeypatch):
    from nbtorch.io import structure_files as sf

    monkeypatch.setattr(sf, "available_memory", lambda: 10**6)
    before = _names(files)
    assert cli.main(["-pdb", "tiny.pdb"] + PDB_RUN + QUIET) == 2
    _one_line(capsys, "nbtorch", "-pdb tiny.pdb: |F| of 3 atoms to", "more than the 0.001 GB of memory available",
              "the detector corners reach", "raise -distance or -lambda", "-detpixels or -pixel", "-dmin")
    assert _names(files) == before
    monkeypatch.setattr(sf, "available_memory", lambda: None)  # unknown: no limit
    assert cli.main(["-pdb", "tiny.pdb"] + PDB_RUN + QUIET) == 0
