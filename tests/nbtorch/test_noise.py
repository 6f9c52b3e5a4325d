"""Tests for nbtorch.noise: Poisson noise image (golden 27, bit-exact) and -intfile images (all goldens)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from nbtorch.noise import (
    counts_to_uint16,
    int_image_scale,
    int_image_uint16,
    noise_image_uint16,
    poisson_noise,
    roi_mask,
)
from nbtorch.pixels import rendered_mask, rendered_pixels
from nbtorch.rng import Ran1
from nbtorch.types import Setup

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "intimage.img").is_file()) if GOLDEN.is_dir() else []


def _read_smv(path: Path) -> tuple[dict[str, str], np.ndarray]:
    raw = path.read_bytes()
    head = raw[:512].decode("ascii", errors="replace")
    nbytes = int(re.search(r"HEADER_BYTES=\s*(\d+)", head).group(1))
    hdr = dict(re.findall(r"(\w+)=([^;\n]*);", raw[:nbytes].decode("ascii", errors="replace")))
    s1, s2 = int(hdr["SIZE1"]), int(hdr["SIZE2"])
    assert hdr["BYTE_ORDER"] == "little_endian" and hdr["TYPE"] == "unsigned_short"
    return hdr, np.frombuffer(raw[nbytes:nbytes + 2 * s1 * s2], dtype="<u2").reshape(s2, s1)


def _case(case: str) -> tuple[np.ndarray, list[str], str]:
    d = GOLDEN / case
    hdr, _ = _read_smv(d / "intimage.img")
    img = np.fromfile(d / "image.bin", dtype="<f4").reshape(int(hdr["SIZE2"]), int(hdr["SIZE1"]))
    cmd = [ln for ln in (d / "cmd.txt").read_text().splitlines() if ln.strip() and not ln.startswith("#")][-1]
    return img, shlex.split(cmd), (d / "log.txt").read_text()


def _flag(argv: list[str], name: str, n: int = 1):
    if name not in argv:
        return None
    i = argv.index(name)
    return argv[i + 1:i + 1 + n]


# ----------------------------------------------------------------------------------------------------- noise image --
def test_golden_27_noise_image_bit_exact():
    img, argv, log = _case("27_noise_seed")
    assert img.shape == (160, 192)
    seed, adc = int(_flag(argv, "-seed")[0]), float(_flag(argv, "-adc")[0])
    assert (seed, adc) == (12345, 10.0)
    _, ref = _read_smv(GOLDEN / "27_noise_seed" / "noiseimage.img")
    pix, n_over = noise_image_uint16(img, seed, adc=adc)
    assert pix.dtype == np.uint16 and pix.shape == ref.shape
    np.testing.assert_array_equal(pix, ref)
    photons, over_ref = map(int, re.search(r"(\d+) photons on noise image \((\d+) overloads\)", log).groups())
    assert n_over == over_ref == 0
    counts = poisson_noise(img, seed)
    assert counts.dtype == np.float64 and counts.sum() == photons == 883879
    # any other seed gives a different image
    assert not np.array_equal(noise_image_uint16(img, seed + 1, adc=adc)[0], ref)


def test_noise_roi_and_mask_skip_pixels_without_drawing():
    rs = np.random.default_rng(0)
    img = rs.uniform(0, 30, (40, 50)).astype(np.float32)
    roi = (5, 30, 10, 25)  # fast 5..30, slow 10..25 inclusive
    mask = np.ones_like(img, dtype=np.uint16)
    mask[12, 7] = mask[20, 30] = mask[0, 0] = 0
    sel = roi_mask(img.shape, roi, mask)
    assert sel.sum() == 26 * 16 - 2
    assert sel[10, 5] and sel[25, 30] and not sel[9, 5] and not sel[10, 31] and not sel[12, 7]
    counts = poisson_noise(img, 99, roi=roi, mask=mask)
    assert np.all(counts[~sel] == 0)
    expect = Ran1(-99).poidev_many(img[sel])  # visited pixels only, raster (slow-major) order
    np.testing.assert_array_equal(counts[sel], expect.astype(np.float64))
    pix, n_over = noise_image_uint16(img, 99, adc=40.0, roi=roi, mask=mask)
    assert np.all(pix[~sel] == 0) and n_over == 0
    np.testing.assert_array_equal(pix[sel], (expect + 40).astype(np.uint16))
    # the full-image stream differs inside the ROI (no draws are made for skipped pixels)
    assert not np.array_equal(poisson_noise(img, 99)[sel], counts[sel])


def test_rendered_mask_and_pixels_of_a_setup_are_its_roi_and_mask():
    mask = np.ones((40, 50), dtype=np.uint8)
    mask[12, 7] = mask[20, 30] = mask[0, 0] = 0
    setup = Setup(fpixels=50, spixels=40, roi=(5, 30, 10, 25), mask=mask.tobytes())
    sel = rendered_mask(setup)
    assert sel.shape == (40, 50) and sel.dtype == bool
    np.testing.assert_array_equal(sel, roi_mask((40, 50), (5, 30, 10, 25), mask))
    assert sel.sum() == 26 * 16 - 2 and not sel[12, 7] and sel[10, 5] and not sel[9, 5]
    idx = rendered_pixels(setup)
    np.testing.assert_array_equal(idx, np.flatnonzero(sel))  # raster order
    assert idx[0] == 10 * 50 + 5 and idx[-1] == 25 * 50 + 30
    assert rendered_mask(Setup(fpixels=3, spixels=2)).all() and len(rendered_pixels(Setup(fpixels=3, spixels=2))) == 6


def test_counts_to_uint16_truncation_and_overloads():
    counts = np.array([[0.0, 3.0, 65495.0, 65496.0], [70000.0, 12.0, 1.0, 2e6 + 0.7]])
    pix, n_over = counts_to_uint16(counts, adc=40.0)
    np.testing.assert_array_equal(pix, [[40, 43, 65535, 65535], [65535, 52, 41, 65535]])
    assert n_over == 3  # 65536, 70040, 2000040.7 > 65535; 65535 itself is not an overload
    pix, _ = counts_to_uint16(np.array([[3.0, 0.0]]), adc=10.7)  # (unsigned short) truncates
    np.testing.assert_array_equal(pix, [[13, 10]])
    pix, n_over = counts_to_uint16(counts, adc=40.0, roi=(0, 1, 0, 0))
    np.testing.assert_array_equal(pix, [[40, 43, 0, 0], [0, 0, 0, 0]])
    assert n_over == 0


# ------------------------------------------------------------------------------------------------------- int image --
@pytest.mark.parametrize("case", CASES)
def test_golden_int_images(case):
    img, argv, log = _case(case)
    _, ref = _read_smv(GOLDEN / case / "intimage.img")
    adc = float(_flag(argv, "-adc")[0]) if "-adc" in argv else 40.0
    roi = tuple(int(v) for v in _flag(argv, "-roi", 4)) if "-roi" in argv else None
    pix, scale = int_image_uint16(img, adc=adc, roi=roi)
    assert pix.dtype == np.uint16
    printed = float(re.search(r"intfile_scale = (\S+)", log).group(1))
    assert abs(scale / printed - 1) < 5e-6  # log prints 6 significant digits
    assert scale == int_image_scale(img)
    np.testing.assert_array_equal(pix, ref)


def test_golden_int_image_00_and_27_scales():
    img27, _, _ = _case("27_noise_seed")
    pix, scale = int_image_uint16(img27, adc=10.0)
    assert round(scale, 3) == 308.103
    img00, _, _ = _case("00_base_B1")
    _, ref00 = _read_smv(GOLDEN / "00_base_B1" / "intimage.img")
    np.testing.assert_array_equal(int_image_uint16(img00)[0], ref00)
    # a plain double-precision floor(x + 0.5) is NOT bit-exact for every golden (the C uses floorf)
    img, argv, _ = _case("23_water")
    _, ref = _read_smv(GOLDEN / "23_water" / "intimage.img")
    s = int_image_scale(img)
    naive = np.floor(np.clip(img.astype(np.float64) * s + 40.0, 0, 65535) + 0.5).astype(np.uint16)
    assert (naive != ref).any()
    np.testing.assert_array_equal(int_image_uint16(img)[0], ref)


def test_int_image_explicit_scale_clipping_and_zero_image():
    img = np.array([[0.0, 1.0, 2.5, 1e6], [-5.0, 0.49, 0.5, 3.0]], dtype=np.float32)
    pix, scale = int_image_uint16(img, scale=2.0, adc=0.0)
    assert scale == 2.0
    np.testing.assert_array_equal(pix, [[0, 2, 5, 65535], [0, 1, 1, 6]])
    pix, scale = int_image_uint16(np.zeros((3, 4), np.float32), adc=40.0)
    assert scale == 1.0 and np.all(pix == 40)
    pix, scale = int_image_uint16(np.full((2, 2), -1.0, np.float32), scale=0.0, adc=40.0)  # scale <= 0 -> auto
    assert scale == 1.0 and np.all(pix == 39)
    pix, _ = int_image_uint16(np.ones((3, 4), np.float32), scale=1.0, adc=40.0, roi=(1, 2, 0, 1))
    np.testing.assert_array_equal(pix, [[0, 41, 41, 0], [0, 41, 41, 0], [0, 0, 0, 0]])
