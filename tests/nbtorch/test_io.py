"""Tests for nbtorch.io: round trips, golden files, strict error reporting and parser fuzzing."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nbtorch.io as nio
from nbtorch.io._atomic import atomic_write
from nbtorch.io.hkl import _parse_hkl_bytes
from nbtorch.io.matrix import _parse_matrix_bytes
from nbtorch.io.smv import _decode_smv
from nbtorch.io.sources import _parse_sources_bytes

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
GOLDEN_IMGS = sorted(GOLDEN.glob("*/*.img"))
GOLDEN_INTIMAGES = sorted(GOLDEN.glob("*/intimage.img"))
GOLDEN_HKLS = sorted(GOLDEN.glob("*/P1.hkl"))

# NBTORCH_FUZZ_EXAMPLES raises the example count for a longer local fuzzing run.
FUZZ = settings(
    max_examples=int(os.environ.get("NBTORCH_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _no_tmp_left(directory: Path) -> bool:
    return not any(p.name.endswith(".tmp") for p in directory.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# atomic writes


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write(p, b"old")
    atomic_write(p, b"new content")
    assert p.read_bytes() == b"new content"
    assert _no_tmp_left(tmp_path)
    umask = os.umask(0o022)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0o600
    p.chmod(0o640)
    atomic_write(p, b"again")
    assert p.stat().st_mode & 0o777 == 0o640  # permissions of the replaced file are kept


def test_atomic_write_failure_keeps_old_file(tmp_path):
    p = tmp_path / "img.img"
    p.write_bytes(b"previous")

    with pytest.raises(TypeError):
        atomic_write(p, object())  # type: ignore[arg-type]  # fails after the temp file is created
    assert p.read_bytes() == b"previous"
    assert _no_tmp_left(tmp_path)


def test_writer_interrupted_leaves_old_file(tmp_path, monkeypatch):
    p = tmp_path / "x.img"
    nio.write_smv(p, np.ones((2, 3), np.uint16))
    before = p.read_bytes()

    def fail_replace(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", fail_replace)
    with pytest.raises(KeyboardInterrupt):
        nio.write_smv(p, np.zeros((4, 5), np.uint16))
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert _no_tmp_left(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# SMV


def _golden_items(header: dict) -> list:
    f = lambda k: float(header[k])  # noqa: E731
    return nio.nanobragg_header_items(
        pixel_size_mm=f("PIXEL_SIZE"),
        distance_mm=f("DISTANCE"),
        wavelength_A=f("WAVELENGTH"),
        beam_center_x_mm=f("BEAM_CENTER_X"),
        beam_center_y_mm=f("BEAM_CENTER_Y"),
        adxv_center_x_mm=f("ADXV_CENTER_X"),
        adxv_center_y_mm=f("ADXV_CENTER_Y"),
        mosflm_center_x_mm=f("MOSFLM_CENTER_X"),
        mosflm_center_y_mm=f("MOSFLM_CENTER_Y"),
        denzo_x_beam_mm=f("DENZO_X_BEAM"),
        denzo_y_beam_mm=f("DENZO_Y_BEAM"),
        dials_origin_mm=tuple(float(v) for v in header["DIALS_ORIGIN"].split(",")),
        xds_orgx_px=f("XDS_ORGX"),
        xds_orgy_px=f("XDS_ORGY"),
        close_distance_mm=f("CLOSE_DISTANCE"),
        phi_deg=f("PHI"),
        osc_start_deg=f("OSC_START"),
        osc_range_deg=f("OSC_RANGE"),
        twotheta_deg=f("TWOTHETA"),
    )


def test_golden_files_present():
    assert len(GOLDEN_INTIMAGES) >= 30
    assert len(GOLDEN_HKLS) >= 3


@pytest.mark.parametrize("path", GOLDEN_IMGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_golden_smv_parses_and_rewrites_byte_exact(path, tmp_path):
    data, header = nio.read_smv(path)
    raw = path.read_bytes()
    assert data.dtype == np.uint16
    assert data.shape == (int(header["SIZE2"]), int(header["SIZE1"]))
    assert header["HEADER_BYTES"] == "512" and len(raw) == 512 + data.size * 2
    np.testing.assert_array_equal(data.reshape(-1), np.frombuffer(raw, "<u2", offset=512))
    # rewriting with the parsed header reproduces the file byte for byte
    out = tmp_path / "copy.img"
    nio.write_smv(out, data, header)
    assert out.read_bytes() == raw
    if path.name == "intimage.img" or path.name == "noiseimage.img":
        # geometry values parsed back to floats and re-formatted give identical bytes
        out2 = tmp_path / "fmt.img"
        nio.write_smv(out2, data, _golden_items(header))
        assert out2.read_bytes() == raw


def test_golden_sizes_match_case_table():
    d, h = nio.read_smv(GOLDEN / "26_mat_hkl" / "intimage.img")
    assert d.shape == (256, 224)  # 224 fast x 256 slow
    assert h["DIALS_ORIGIN"] == "-11.3,12.9,-150"
    d, h = nio.read_smv(GOLDEN / "15_mosflm_rot_twotheta" / "intimage.img")
    assert h["DISTANCE"] == "108.395" and h["TWOTHETA"] == "12"


def test_golden_header_layout_literal():
    raw = (GOLDEN / "00_base_B1" / "intimage.img").read_bytes()[:512]
    assert raw.startswith(b"{\nHEADER_BYTES=512;\nDIM=2;\nBYTE_ORDER=little_endian;\nTYPE=unsigned_short;\n")
    assert b"DIALS_ORIGIN=-9.7,8.1,-100\nXDS_ORGX=97.5;\n" in raw
    assert raw.rstrip(b" ").endswith(b"BEAMLINE=fake;\n}\f")


def test_golden_intimage_matches_float_image():
    # intimage = floor(float*scale + adc + 0.5) clipped: just check the float image shape/orientation agrees
    case = GOLDEN / "00_base_B1"
    ints, _ = nio.read_smv(case / "intimage.img")
    flt = nio.read_raw_float(case / "image.bin", ints.shape)
    assert flt.dtype == np.float32 and flt.shape == ints.shape
    assert np.unravel_index(np.argmax(flt), flt.shape) == np.unravel_index(np.argmax(ints), ints.shape)


@pytest.mark.parametrize("dtype", ["u2", "i2", "u4", "i4", "f4", "f8", "u1", "i1"])
def test_smv_round_trip_dtypes(tmp_path, dtype):
    rng = np.random.default_rng(1)
    data = (rng.random((7, 11)) * 100 - (0 if dtype[0] == "u" else 50)).astype(dtype)
    items = [("PIXEL_SIZE", 0.172), ("DISTANCE", 250), ("DIALS_ORIGIN", (1.5, -2.0, -250.0)), ("NOTE", "hello world")]
    p = tmp_path / "a.img"
    nio.write_smv(p, data, items)
    back, header = nio.read_smv(p)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    np.testing.assert_array_equal(back, data)
    assert header["PIXEL_SIZE"] == "0.172" and header["DISTANCE"] == "250"
    assert header["DIALS_ORIGIN"] == "1.5,-2,-250" and header["NOTE"] == "hello world"
    # header dict round trip: write(read) is identical
    p2 = tmp_path / "b.img"
    nio.write_smv(p2, back, header)
    assert p2.read_bytes() == p.read_bytes()
    assert nio.read_smv(p2)[1] == header


def test_smv_big_endian_read_and_long_header(tmp_path):
    data = np.arange(12, dtype=">u2").reshape(3, 4)
    head = "{\nHEADER_BYTES=512;\nDIM=2;\nBYTE_ORDER=big_endian;\nTYPE=unsigned_short;\nSIZE1=4;\nSIZE2=3;\n}"
    p = tmp_path / "be.img"
    p.write_bytes(head.encode().ljust(512, b" ") + data.tobytes())
    back, h = nio.read_smv(p)
    np.testing.assert_array_equal(back, data)
    assert back.dtype == np.uint16 and back.dtype.isnative
    # a header that does not fit 512 bytes grows to the next multiple of 512
    items = [(f"KEY{i:03d}", "x" * 20) for i in range(40)]
    nio.write_smv(p, back, items)
    d2, h2 = nio.read_smv(p)
    assert int(h2["HEADER_BYTES"]) % 512 == 0 and int(h2["HEADER_BYTES"]) > 512
    assert all(h2[k] == v for k, v in items)
    assert p.stat().st_size == int(h2["HEADER_BYTES"]) + back.nbytes


def test_golden_mask_layout_reproduced(tmp_path):
    src = GOLDEN / "28_roi_mask_dmin" / "mask.img"
    data, _ = nio.read_smv(src)
    p = tmp_path / "m.img"
    nio.write_smv(p, data, [("PIXEL_SIZE", 0.2)])
    assert p.read_bytes() == src.read_bytes()
    mask = nio.read_smv_mask(src)
    assert mask.dtype == bool and mask.shape == (160, 160)
    assert 0 < mask.sum() < mask.size
    np.testing.assert_array_equal(mask, data != 0)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"P5\n1 1\n255\n\x00", "not an SMV file"),
        (b"{\nHEADER_BYTES=512;\nSIZE1=2;\nSIZE2=2;\n", "no closing"),
        (b"{\nDIM=2;\nSIZE1=2;\nSIZE2=2;\n}".ljust(512) + b"\0" * 8, "no HEADER_BYTES"),
        (b"{\nHEADER_BYTES=512;\nSIZE2=2;\n}".ljust(512) + b"\0" * 8, "no SIZE1"),
        (b"{\nHEADER_BYTES=512;\nSIZE1=2;\n}".ljust(512) + b"\0" * 8, "no SIZE2"),
        (b"{\nHEADER_BYTES=512;\nSIZE1=-2;\nSIZE2=2;\n}".ljust(512) + b"\0" * 8, "SIZE1"),
        (b"{\nHEADER_BYTES=512;\nSIZE1=2;\nSIZE2=2;\nTYPE=complex;\n}".ljust(512) + b"\0" * 8, "unknown SMV TYPE"),
        (b"{\nHEADER_BYTES=512;\nSIZE1=2;\nSIZE2=2;\nBYTE_ORDER=middle;\n}".ljust(512) + b"\0" * 8, "BYTE_ORDER"),
        (b"{\nHEADER_BYTES=512;\nSIZE1=2;\nSIZE2=2;\n}".ljust(512) + b"\0" * 7, "only 519 bytes"),
        (b"{\nHEADER_BYTES=4096;\nSIZE1=2;\nSIZE2=2;\n}".ljust(512) + b"\0" * 8, "HEADER_BYTES=4096"),
        (b"{\nHEADER_BYTES=16;\nSIZE1=2;\nSIZE2=2;\n}".ljust(512) + b"\0" * 8, "longer than HEADER_BYTES"),
        (b"{\nHEADER_BYTES=512;\nDIM=3;\nSIZE1=2;\nSIZE2=2;\n}".ljust(512) + b"\0" * 8, "DIM"),
    ],
)
def test_smv_header_errors(tmp_path, content, match):
    p = tmp_path / "bad.img"
    p.write_bytes(content)
    with pytest.raises(ValueError, match=match) as info:
        nio.read_smv(p)
    assert "bad.img" in str(info.value)


def test_write_smv_rejects_bad_input(tmp_path):
    p = tmp_path / "x.img"
    with pytest.raises(ValueError, match="2-D"):
        nio.write_smv(p, np.zeros(5, np.uint16))
    with pytest.raises(ValueError, match="dtype"):
        nio.write_smv(p, np.zeros((2, 2), np.complex64))
    with pytest.raises(ValueError, match="disagrees"):
        nio.write_smv(p, np.zeros((2, 2), np.uint16), {"SIZE1": "3"})
    with pytest.raises(ValueError, match="contains"):
        nio.write_smv(p, np.zeros((2, 2), np.uint16), {"A": "x;y"})
    with pytest.raises(ValueError, match="invalid header key"):
        nio.write_smv(p, np.zeros((2, 2), np.uint16), {"A=B": "1"})
    assert not p.exists()


def test_nanobragg_header_items_format():
    items = dict(
        nio.nanobragg_header_items(
            pixel_size_mm=0.1, distance_mm=108.39512345, wavelength_A=1.0, beam_center_x_mm=9.3,
            beam_center_y_mm=7.1, adxv_center_x_mm=7.256712, adxv_center_y_mm=6.379553, mosflm_center_x_mm=9.57045,
            mosflm_center_y_mm=7.20671, denzo_x_beam_mm=9.62045, denzo_y_beam_mm=7.25671,
            dials_origin_mm=(-6.299243, 9.729281, -112.0512), xds_orgx_px=145.1271, xds_orgy_px=279.3449,
            close_distance_mm=108.18, phi_deg=0, osc_start_deg=0.0, osc_range_deg=1e-5, twotheta_deg=12,
        )
    )
    assert items["DISTANCE"] == "108.395"
    assert items["DIALS_ORIGIN"] == "-6.29924,9.72928,-112.051"
    assert items["OSC_RANGE"] == "1e-05" and items["PHI"] == "0" and items["TWOTHETA"] == "12"
    assert items["DETECTOR_SN"] == "000" and items["BEAMLINE"] == "fake"


# ---------------------------------------------------------------------------------------------------------------
# HKL


@pytest.mark.parametrize("path", GOLDEN_HKLS, ids=lambda p: p.parent.name)
def test_read_golden_hkl(path):
    data = nio.read_hkl(path)
    n = sum(1 for line in path.read_text().splitlines() if line.strip())
    assert data.hkl.shape == (n, 3) and data.hkl.dtype == np.int64
    assert data.F.shape == (n,) and data.F.dtype == np.float64
    first = path.read_text().split()[:4]
    assert tuple(data.hkl[0]) == tuple(int(x) for x in first[:3]) and data.F[0] == float(first[3])
    grid, lo = nio.hkl_to_grid(data, default_F=0.0)
    hi = data.hkl.max(axis=0)
    assert grid.shape == tuple(hi - np.array(lo) + 1)
    i = len(data.F) // 2
    h, k, l_ = data.hkl[i]
    assert grid[h - lo[0], k - lo[1], l_ - lo[2]] == data.F[i]


def test_hkl_round_trip_and_grid(tmp_path):
    rng = np.random.default_rng(3)
    hkl = rng.integers(-5, 6, size=(60, 3))
    F = rng.random(60) * 1000
    F[0] = 1e-300
    F[1] = 0.1 + 0.2
    p = tmp_path / "f.hkl"
    nio.write_hkl(p, hkl, F)
    back = nio.read_hkl(p)
    np.testing.assert_array_equal(back.hkl, hkl)
    np.testing.assert_array_equal(back.F, F)  # exact
    grid, lo = nio.hkl_to_grid(back, default_F=-7.0)
    # later duplicates override earlier ones
    expected = {}
    for (h, k, l_), f in zip(hkl.tolist(), F.tolist()):
        expected[(h, k, l_)] = f
    for (h, k, l_), f in expected.items():
        assert grid[h - lo[0], k - lo[1], l_ - lo[2]] == f
    assert np.sum(grid == -7.0) == grid.size - len(expected)


def test_hkl_duplicates_later_wins():
    data = nio.HKLData(np.array([[0, 0, 0], [1, 0, 0], [0, 0, 0]]), np.array([1.0, 2.0, 3.0]))
    grid, lo = nio.hkl_to_grid(data, 0.0)
    assert lo == (0, 0, 0) and grid.shape == (2, 1, 1)
    assert grid[0, 0, 0] == 3.0 and grid[1, 0, 0] == 2.0


def test_hkl_comments_blank_and_integral_floats(tmp_path):
    p = tmp_path / "c.hkl"
    p.write_text("# header\n\n  1 2 3 4.5\n\t# indented comment\n-1 +2 3.0 1e2\r\n")
    d = nio.read_hkl(p)
    np.testing.assert_array_equal(d.hkl, [[1, 2, 3], [-1, 2, 3]])
    np.testing.assert_array_equal(d.F, [4.5, 100.0])
    p.write_text("")
    d = nio.read_hkl(p)
    assert d.hkl.shape == (0, 3) and d.F.shape == (0,)
    with pytest.raises(ValueError, match="no reflections"):
        nio.hkl_to_grid(d, 0.0)


@pytest.mark.parametrize(
    "line, match",
    [
        ("1 2 3 100 5.0", "exactly 4 columns"),  # sigma column
        ("1 2 3", "exactly 4 columns"),
        ("1 2 x 100", "l is not a number"),
        ("1 2.5 3 100", "k is not an integer"),
        ("1 2 3 nan", "finite"),
        ("1 2 3 inf", "finite"),
        ("1 2 3 1e999", "overflows"),
        ("99999999999 0 0 1", "out of range"),
        ("1 2 3 1,5", "not a number"),
        ("1 2 3 1_000", "not a number"),
    ],
)
def test_hkl_errors_name_file_and_line(tmp_path, line, match):
    p = tmp_path / "bad.hkl"
    p.write_text(f"0 0 0 1\n# c\n{line}\n0 0 1 2\n")
    with pytest.raises(ValueError, match=match) as info:
        nio.read_hkl(p)
    msg = str(info.value)
    assert "bad.hkl" in msg and "line 3" in msg and line.split()[0] in msg


def test_hkl_invalid_utf8(tmp_path):
    p = tmp_path / "u.hkl"
    p.write_bytes(b"0 0 0 1\n1 1 1 \xff\n")
    with pytest.raises(ValueError, match="line 2"):
        nio.read_hkl(p)


def test_hkl_never_touches_fdump(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Fdump.bin").write_bytes(b"garbage")
    nio.write_hkl("a.hkl", [[1, 2, 3]], [4.0])
    nio.hkl_to_grid(nio.read_hkl("a.hkl"), 0.0)
    assert (tmp_path / "Fdump.bin").read_bytes() == b"garbage"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Fdump.bin", "a.hkl"]


def test_write_hkl_rejects(tmp_path):
    with pytest.raises(ValueError):
        nio.write_hkl(tmp_path / "a.hkl", [[1.5, 0, 0]], [1.0])
    with pytest.raises(ValueError):
        nio.write_hkl(tmp_path / "a.hkl", [[1, 0, 0]], [math.nan])
    with pytest.raises(ValueError):
        nio.write_hkl(tmp_path / "a.hkl", [[1, 0]], [1.0])


def test_hkl_to_grid_size_guard():
    data = nio.HKLData(np.array([[-1000, -1000, -1000], [1000, 1000, 1000]]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="max_cells"):
        nio.hkl_to_grid(data, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# MOSFLM matrix


def test_read_golden_matrix_and_cell():
    A = nio.read_mosflm_matrix(GOLDEN / "26_mat_hkl" / "A.mat")
    assert A.shape == (3, 3)
    np.testing.assert_array_equal(A[0], [0.01429579, -0.00552028, -0.00730284])
    cell = nio.mosflm_matrix_cell(A, 1.3)
    np.testing.assert_allclose(cell, [61.2, 73.4, 85.1, 82.0, 97.0, 104.0], atol=1e-4)


def test_write_matrix_reproduces_golden_layout(tmp_path):
    src = GOLDEN / "26_mat_hkl" / "A.mat"
    lines = src.read_text().splitlines()
    A = nio.read_mosflm_matrix(src)
    U = np.array([[float(x) for x in ln.split()] for ln in lines[4:7]])
    p = tmp_path / "A.mat"
    nio.write_mosflm_matrix(p, A, (61.2, 73.4, 85.1, 82.0, 97.0, 104.0), U=U)
    assert p.read_bytes() == src.read_bytes()
    # U derived from A (frame: real a along x, b in xy) agrees with the golden U to the file's precision
    nio.write_mosflm_matrix(p, A, wavelength_A=1.3)
    out = p.read_text().splitlines()
    assert out[:4] == lines[:4] and out[8] == lines[8] and out[7] == lines[7]
    U2 = np.array([[float(x) for x in ln.split()] for ln in out[4:7]])
    np.testing.assert_allclose(U2, U, atol=5e-7)


def test_matrix_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    A = rng.normal(size=(3, 3)) * 0.02
    p = tmp_path / "m.mat"
    nio.write_mosflm_matrix(p, A)
    back = nio.read_mosflm_matrix(p)
    np.testing.assert_allclose(back, A, atol=5.1e-9, rtol=0)
    assert len(p.read_text().splitlines()) == 9
    # huge values still separate
    nio.write_mosflm_matrix(p, np.full((3, 3), -12345.678), cell=[1, 2, 3, 90, 90, 90], U=np.eye(3))
    np.testing.assert_allclose(nio.read_mosflm_matrix(p), -12345.678)


@pytest.mark.parametrize(
    "text, match, line",
    [
        ("1 2 3\n4 5 6\n7 8\n", "found only 8", None),
        ("1 2 3\n4 x 6\n7 8 9\n", "element 5", "line 2"),
        ("1 2 3\n4 5 6\n7 8 nan\n", "finite", "line 3"),
        ("", "found only 0", None),
    ],
)
def test_matrix_errors(tmp_path, text, match, line):
    p = tmp_path / "bad.mat"
    p.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        nio.read_mosflm_matrix(p)
    assert "bad.mat" in str(info.value)
    if line:
        assert line in str(info.value)


def test_matrix_rest_ignored(tmp_path):
    p = tmp_path / "m.mat"
    p.write_text("1 2 3 4 5 6 7 8 9 garbage \xff\n")
    np.testing.assert_array_equal(nio.read_mosflm_matrix(p), np.arange(1, 10).reshape(3, 3))


# ---------------------------------------------------------------------------------------------------------------
# sources


def test_read_golden_sources():
    S = nio.read_sources(GOLDEN / "29_sourcefile" / "sources.txt")
    assert S.shape == (3, 5)
    np.testing.assert_array_equal(S[:, 4], [1.00e-10, 1.02e-10, 0.98e-10])
    np.testing.assert_array_equal(S[:, 3], [1, 2, 3])


def test_sources_missing_columns_and_round_trip(tmp_path):
    p = tmp_path / "s.txt"
    p.write_text("# X Y Z I lambda\n-10 0 0\n\n-10 0.01 0 2 1.1e-10\n-5\nnan nan nan 1 1e-10\n")
    S = nio.read_sources(p)
    assert S.shape == (4, 5)
    assert np.isnan(S[0, 3:]).all() and np.isnan(S[2, 1:]).all() and np.isnan(S[3, :3]).all()
    p2 = tmp_path / "s2.txt"
    nio.write_sources(p2, S)
    np.testing.assert_array_equal(nio.read_sources(p2), S)  # NaN-aware exact equality
    nio.write_sources(p2, S[:, :3])
    back = nio.read_sources(p2)
    np.testing.assert_array_equal(back[:, :3], S[:, :3])
    assert np.isnan(back[:, 3:]).all()


@pytest.mark.parametrize(
    "line, match", [("1 2 3 4 5 6", "at most 5"), ("1 two 3", "Y is not a number"), ("1 2 inf", "finite")]
)
def test_sources_errors(tmp_path, line, match):
    p = tmp_path / "bad.txt"
    p.write_text(f"-10 0 0 1 1e-10\n{line}\n")
    with pytest.raises(ValueError, match=match) as info:
        nio.read_sources(p)
    assert "line 2" in str(info.value) and "bad.txt" in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# raw float / pgm / observed images


def test_raw_float_round_trip_and_golden(tmp_path):
    img = np.random.default_rng(0).random((5, 7)).astype(np.float32)
    p = tmp_path / "f.bin"
    nio.write_raw_float(p, img)
    assert p.stat().st_size == 5 * 7 * 4
    assert p.read_bytes() == img.astype("<f4").tobytes()
    np.testing.assert_array_equal(nio.read_raw_float(p, (5, 7)), img)
    with pytest.raises(ValueError, match="expected 144 bytes.*has 140 bytes"):
        nio.read_raw_float(p, (4, 9))
    g = nio.read_raw_float(GOLDEN / "00_base_B1" / "image.bin", (160, 192))
    assert g.shape == (160, 192) and abs(float(g.max()) - 151.301) < 1e-3


def test_pgm_round_trip(tmp_path):
    img = np.array([[0.0, 1.0, 2.6, -3.0], [100.0, 1e9, -0.1, 50.9]], dtype=np.float32)
    p = tmp_path / "i.pgm"
    nio.write_pgm(p, img, 2.0)
    assert nio.pgm_pixels(np.array([[np.nan]]), 2.0)[0, 0] == 0  # write_pgm refuses NaN (test_hardening.py)
    raw = p.read_bytes()
    assert raw.startswith(b"P5\n4 2\n#") and b"\n255\n" in raw
    back = nio.read_pgm(p)
    np.testing.assert_array_equal(back, [[0, 2, 5, 0], [200, 255, 0, 101]])
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, nio.pgm_pixels(img, 2.0))


def test_read_image_smv_masks_saturation_and_geometry(tmp_path):
    data = np.array([[0, 10, 65535], [65534, 5, 7]], np.uint16)
    p = tmp_path / "obs.img"
    nio.write_smv(p, data, [("PIXEL_SIZE", 0.172), ("DISTANCE", 200), ("WAVELENGTH", 0.98), ("BEAM_CENTER_X", 1.5),
                            ("BEAM_CENTER_Y", 2.5)])
    o = nio.read_image(p)
    assert o.size == (3, 2) and o.data.dtype == np.float64
    assert o.pixel_size_mm == 0.172 and o.distance_mm == 200 and o.wavelength_A == 0.98
    assert o.beam_center_mm == (1.5, 2.5)
    np.testing.assert_array_equal(o.saturated, [[False, False, True], [False, False, False]])
    np.testing.assert_array_equal(o.mask, ~o.saturated)
    o2 = nio.read_image(p, overload=65534)
    assert o2.saturated.sum() == 2 and o2.mask.sum() == 4
    assert o.header["DISTANCE"] == "200"


def test_read_image_missing_values_none_and_negative_masked(tmp_path):
    data = np.array([[-1, 3], [-2, 4]], np.int32)
    p = tmp_path / "s.img"
    nio.write_smv(p, data)
    o = nio.read_image(p)
    assert o.pixel_size_mm is None and o.distance_mm is None and o.wavelength_A is None and o.beam_center_mm is None
    np.testing.assert_array_equal(o.mask, [[False, True], [False, True]])
    assert not o.saturated.any()


def test_read_image_golden_and_raw(tmp_path):
    o = nio.read_image(GOLDEN / "12_polar_kahn" / "intimage.img")
    assert o.size == (256, 224) and o.data.shape == (224, 256)
    assert o.pixel_size_mm == 0.2 and o.distance_mm == 40 and o.beam_center_mm == (22.5, 25.7)
    r = nio.read_image(GOLDEN / "12_polar_kahn" / "image.bin", shape=(224, 256))
    assert r.header == {} and r.pixel_size_mm is None and r.mask.all()
    with pytest.raises(ValueError, match="shape"):
        nio.read_image(GOLDEN / "12_polar_kahn" / "image.bin")
    img = np.array([[1.0, np.nan], [-0.5, 9.0]], np.float32)
    q = tmp_path / "x.dat"
    q.write_bytes(img.astype("<f4").tobytes())  # a NaN pixel from elsewhere (write_raw_float refuses NaN)
    o = nio.read_image(q, shape=(2, 2), overload=9.0)
    np.testing.assert_array_equal(o.mask, [[True, False], [False, False]])
    np.testing.assert_array_equal(o.saturated, [[False, False], [False, True]])


def test_read_image_without_fabio_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "fabio" or name.startswith("fabio."):
            raise ImportError("No module named 'fabio'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    p = tmp_path / "x.cbf"
    p.write_bytes(b"###CBF: VERSION 1.5\n")
    with pytest.raises(ImportError, match=r"pip install nbtorch\[io\]"):
        nio.read_image(p)


def test_read_image_via_fabio(tmp_path):
    fabio = pytest.importorskip("fabio")
    from fabio.cbfimage import CbfImage
    from fabio.edfimage import EdfImage

    data = np.array([[1, -1, 3], [4, 5, -2]], np.int32)
    p = tmp_path / "x.edf"
    EdfImage(data=data, header={"PIXEL_SIZE": "0.1", "DISTANCE": "150"}).write(str(p))
    o = nio.read_image(p)
    np.testing.assert_array_equal(o.data, data)
    np.testing.assert_array_equal(o.mask, data >= 0)
    assert o.pixel_size_mm == 0.1 and o.distance_mm == 150 and o.wavelength_A is None

    contents = (
        "\n# Detector: PILATUS 6M\n# Pixel_size 172e-6 m x 172e-6 m\n# Detector_distance 0.25000 m\n"
        "# Wavelength 0.97950 A\n# Beam_xy (2.00, 1.00) pixels\n# Count_cutoff 5 counts\n"
    )
    c = tmp_path / "x.cbf"
    img = CbfImage(data=data)
    img.header["_array_data.header_convention"] = "PILATUS_1.2"
    img.header["_array_data.header_contents"] = contents
    img.write(str(c))
    o = nio.read_image(c)
    np.testing.assert_array_equal(o.data, data)
    assert o.pixel_size_mm == pytest.approx(0.172) and o.distance_mm == pytest.approx(250.0)
    assert o.wavelength_A == pytest.approx(0.9795)
    assert o.beam_center_mm == pytest.approx((0.344, 0.172))
    np.testing.assert_array_equal(o.saturated, data >= 5)
    np.testing.assert_array_equal(o.mask, (data >= 0) & (data < 5))
    assert fabio is not None


def _cbf(path, contents=None, data=None):
    from fabio.cbfimage import CbfImage

    img = CbfImage(data=np.arange(12, dtype=np.int32).reshape(3, 4) if data is None else data)
    if contents is not None:
        img.header["_array_data.header_convention"] = "PILATUS_1.2"
        img.header["_array_data.header_contents"] = contents
    img.write(str(path))
    return path


def test_damaged_images_are_one_line_value_errors_naming_the_file(tmp_path, capfd):
    """Issue 18: a truncated CBF (fabio's AssertionError) and an HDF5 file that is neither NXmx nor Eiger
    (NotGoodReader) are ValueErrors of one line naming the file; fabio's own log lines are not printed."""
    pytest.importorskip("fabio")
    h5py = pytest.importorskip("h5py")
    whole = _cbf(tmp_path / "whole.cbf", data=np.arange(100 * 120, dtype=np.int32).reshape(100, 120)).read_bytes()
    (tmp_path / "cut.cbf").write_bytes(whole[: len(whole) // 2])
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["data"] = np.zeros((4, 4))
    good_h5 = tmp_path / "good.h5"
    with h5py.File(good_h5, "w") as f:
        f["x"] = np.zeros(1000)
    (tmp_path / "cut.h5").write_bytes(good_h5.read_bytes()[:600])
    cases = [("cut.cbf", r"^cut\.cbf: not a readable image \(truncated or damaged"),
             ("plain.h5", r"^plain\.h5: an HDF5 file that is neither NXmx \(NeXus\) nor an Eiger master file"),
             ("cut.h5", r"^cut\.h5: an (unreadable HDF5 file|HDF5 file that is neither)")]
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        for name, message in cases:
            with pytest.raises(ValueError, match=message) as err:
                nio.read_image(name)
            assert "\n" not in str(err.value)
    finally:
        os.chdir(old)
    assert capfd.readouterr().err == ""


def test_printed_tolerance_reads_c_g_headers_as_six_significant_digits():
    from nbtorch.io.images import printed_tolerance

    assert printed_tolerance("0.1") == printed_tolerance("0.100000") == pytest.approx(5e-7)
    assert printed_tolerance("0.1000000") == pytest.approx(5e-8)  # more digits printed: finer
    assert printed_tolerance("172e-6 m") == pytest.approx(5e-10)
    assert printed_tolerance("100") == pytest.approx(5e-4) and printed_tolerance("1.5E+02") == pytest.approx(5e-4)
    assert printed_tolerance("-3.25") == pytest.approx(5e-6) and printed_tolerance("0") == 0.0
    assert printed_tolerance("x") is None and printed_tolerance("") is None


def test_header_geometry_mismatches_name_both_values(tmp_path):
    """SMV and miniCBF headers keep the precision they were printed with; a flag beyond it gives one line naming
    the header's value and the flag's."""
    pytest.importorskip("fabio")
    from nbtorch.io.images import header_mismatches

    p = tmp_path / "obs.img"
    nio.write_smv(p, np.zeros((2, 3), np.uint16), [("PIXEL_SIZE", "0.172"), ("DISTANCE", "200.00"),
                                                  ("WAVELENGTH", "0.98")])
    o = nio.read_image(p)
    assert o.precision == pytest.approx({"pixel_size_mm": 5e-7, "distance_mm": 5e-4, "wavelength_A": 5e-7})
    same = {"pixel_size_mm": ("-pixel", 0.1720004), "distance_mm": ("-distance", 200.0004),
            "wavelength_A": ("-lambda", 0.98)}
    assert header_mismatches(o, "OBSERVED obs.img", same) == []
    lines = header_mismatches(o, "OBSERVED obs.img", {"pixel_size_mm": ("-pixel", 0.1721),
                                                      "distance_mm": ("-distance", 250.0),
                                                      "wavelength_A": ("-lambda", None)})
    assert lines == [
        "OBSERVED obs.img: the header's pixel size 0.172 mm disagrees with -pixel 0.1721 mm (beyond the header's "
        "precision ±5e-07 mm); the flag's value is used",
        "OBSERVED obs.img: the header's distance 200 mm disagrees with -distance 250 mm (beyond the header's "
        "precision ±0.0005 mm); the flag's value is used"]
    contents = "\n# Pixel_size 172e-6 m x 172e-6 m\n# Detector_distance 0.25000 m\n# Wavelength 0.97950 A\n"
    c = nio.read_image(_cbf(tmp_path / "x.cbf", contents))
    assert c.precision == pytest.approx({"pixel_size_mm": 5e-7, "distance_mm": 5e-4, "wavelength_A": 5e-7})
    assert header_mismatches(c, "x", {"pixel_size_mm": ("-pixel", 0.172), "distance_mm": ("-distance", 250.0004),
                                      "wavelength_A": ("-lambda", 0.97950)}) == []
    assert len(header_mismatches(c, "x", {"distance_mm": ("-distance", 250.0006)})) == 1
    binary = o._replace(precision=None)  # NXmx: values stored in binary, compared to 1e-6
    assert header_mismatches(binary, "x", {"distance_mm": ("-distance", 200.0001)}) == []
    assert len(header_mismatches(binary, "x", {"distance_mm": ("-distance", 200.001)})) == 1


# ---------------------------------------------------------------------------------------------------------------
# fuzzing: every parser either succeeds or raises ValueError


def _only_value_error(fn, *args):
    try:
        return fn(*args)
    except ValueError as exc:
        assert "fuzz" in str(exc)  # the file name is in every message
        return None


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(raw):
    _only_value_error(_parse_hkl_bytes, raw, "fuzz.hkl")
    _only_value_error(_parse_matrix_bytes, raw, "fuzz.mat")
    _only_value_error(_parse_sources_bytes, raw, "fuzz.txt")
    _only_value_error(_decode_smv, raw, "fuzz.img")
    _only_value_error(_decode_smv, b"{" + raw, "fuzz.img")


_INT_TOK = st.integers(-50, 50).map(str)
_NUM_TOK = st.floats(-1e6, 1e6, allow_nan=False).map(repr)
_JUNK_TOK = st.one_of(
    st.text(alphabet=st.characters(blacklist_characters="\n"), max_size=6),
    st.sampled_from(["nan", "inf", "-inf", "1.5", "1e999", "0x10", "1_0", "", "--1", "1,2", "\xa0", "١", "#", "1e"]),
)


@st.composite
def _mutated_lines(draw, ncols, tokens):
    nlines = draw(st.integers(1, 6))
    lines = [[draw(t) for t in tokens] for _ in range(nlines)]
    i = draw(st.integers(0, nlines - 1))
    kind = draw(st.sampled_from(["mutate", "extra", "missing", "none"]))
    if kind == "mutate":
        j = draw(st.integers(0, ncols - 1))
        lines[i][j] = draw(_JUNK_TOK)
    elif kind == "extra":
        extra = st.text(alphabet=st.characters(blacklist_characters=" \t\r\n\f\v"), min_size=1, max_size=6)
        lines[i].append(draw(st.one_of(_NUM_TOK, extra)))
    elif kind == "missing":
        del lines[i][draw(st.integers(0, ncols - 1))]
    sep = draw(st.sampled_from([" ", "\t", "  "]))
    text = "\n".join(sep.join(ln) for ln in lines) + draw(st.sampled_from(["", "\n", "\r\n"]))
    return text.encode("utf-8", "surrogatepass"), kind, i + 1


@FUZZ
@given(_mutated_lines(4, [_INT_TOK, _INT_TOK, _INT_TOK, _NUM_TOK]))
def test_fuzz_hkl_near_valid(case):
    raw, kind, lineno = case
    try:
        data = _parse_hkl_bytes(raw, "fuzz.hkl")
    except ValueError as exc:
        # the only damaged line is `lineno`; the error must point at it
        assert f"line {lineno}" in str(exc) and "fuzz.hkl" in str(exc)
        assert kind in ("mutate", "extra", "missing")
        return
    # an extra (5th) or a missing column is never silently accepted
    assert kind in ("mutate", "none")
    assert data.hkl.shape[1] == 3 and np.all(np.isfinite(data.F))


@FUZZ
@given(_mutated_lines(5, [_NUM_TOK] * 5))
def test_fuzz_sources_near_valid(case):
    raw, kind, lineno = case
    try:
        S = _parse_sources_bytes(raw, "fuzz.txt")
    except ValueError as exc:
        assert f"line {lineno}" in str(exc) and "fuzz.txt" in str(exc)
        assert kind in ("mutate", "extra")
        return
    assert kind != "extra", "a 6th column must be rejected"
    assert S.shape[1] == 5 and not np.isinf(S).any()


@FUZZ
@given(_mutated_lines(3, [_NUM_TOK] * 3))
def test_fuzz_matrix_near_valid(case):
    raw, kind, lineno = case
    try:
        A = _parse_matrix_bytes(raw, "fuzz.mat")
    except ValueError as exc:
        assert "fuzz.mat" in str(exc)
        return
    assert A.shape == (3, 3) and np.isfinite(A).all()


@st.composite
def _mutated_smv(draw):
    slow, fast = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dtype = draw(st.sampled_from(["u2", "i4", "f4"]))
    items = [("PIXEL_SIZE", "0.1"), ("DIALS_ORIGIN", "-1,2,-3")]
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "f.img")
        nio.write_smv(p, np.zeros((slow, fast), dtype), items)
        buf = bytearray(open(p, "rb").read())
    kind = draw(st.sampled_from(["flip", "truncate", "replace", "none"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(0, 511))
            buf[pos] = draw(st.integers(0, 255))
    elif kind == "truncate":
        del buf[draw(st.integers(0, len(buf) - 1)) :]
    elif kind == "replace":
        key = draw(st.sampled_from([b"HEADER_BYTES=512", b"SIZE1=", b"SIZE2=", b"TYPE=", b"BYTE_ORDER=", b"DIM=2"]))
        new = draw(st.binary(max_size=12))
        buf = bytearray(bytes(buf).replace(key, key.split(b"=")[0] + b"=" + new, 1))
    return bytes(buf), kind, (slow, fast)


@FUZZ
@given(_mutated_smv())
def test_fuzz_smv_header_near_valid(case):
    raw, kind, shape = case
    try:
        data, header = _decode_smv(raw, "fuzz.img")
    except ValueError as exc:
        assert "fuzz.img" in str(exc)
        assert kind != "none"
        return
    assert data.ndim == 2 and data.shape == (int(header["SIZE2"]), int(header["SIZE1"]))
    if kind == "none":
        assert data.shape == shape and header["DIALS_ORIGIN"] == "-1,2,-3"
