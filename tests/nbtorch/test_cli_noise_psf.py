"""``nbtorch``'s detector-response flags (noisify's -psf, -psf_fwhm, -psf_radius, -gain, -readout_noise, -flicker,
-calibration, -calib_seed; issue 22) and ``nbtorch --precompile`` (issue 24): the blurred float image is
``apply_psf`` of the unblurred one, panel by panel in a -geom file's layout; photons are conserved away from the
edges; the noise image is ``detector_adu`` + ADC offset (nanoBragg's without the flags); bad values and usage
errors exit 2 with one line and nothing written.  Small images, eager kernels, no compiler."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import nbtorch.precompile
from nbtorch import cli
from nbtorch.args import build, parse_args
from nbtorch.cli.outputs import blur_image
from nbtorch.io.crystfel import read_geom, slab_to_panels
from nbtorch.io.images import read_raw_float
from nbtorch.io.smv import read_smv
from nbtorch.noise import DetectorNoise, counts_to_uint16, detector_adu, noise_image_uint16
from nbtorch.pixels import panel_extent_mask
from nbtorch.psf import apply_psf, psf_kernel, psf_radius
from tests.nbtorch.cli_run import run_cli

GEOM = Path(__file__).resolve().parents[1] / "data" / "cli_panels" / "two_small.geom"  # two panels in a 14 x 10 slab
BASE = ("-cell 60 60 60 90 90 90 -default_F 100 -N 4 -misset 10 20 30 -lambda 1 -distance 80 -detpixels 40 "
        "-oversample 1 -seed 9 -nopgm -noprogress").split()
PANEL_XTAL = "-cell 50 50 50 90 90 90 -default_F 100 -N 3 -misset 10 20 30 -oversample 1 -seed 9".split()


def _float(name, shape):
    return read_raw_float(f"{name}.bin", (int(np.prod(shape[:-1])), shape[-1])).reshape(shape)


def _blur(image, kind, fwhm, pixel, radius=None, extent=None):
    k = psf_kernel(kind, fwhm, pixel, radius=radius)
    return apply_psf(torch.from_numpy(image).double(), k, extent).numpy()


# ----------------------------------------------------------------------------------------------------------------
# point-spread function


@pytest.mark.parametrize("flags, kind, fwhm, radius", [
    (["-psf", "gauss", "-psf_fwhm", "150"], "gauss", 150.0, None),
    (["-psf", "fiber", "-psf_fwhm", "60", "-psf_radius", "5"], "fiber", 60.0, 5),
])
def test_psf_float_image_is_apply_psf_of_the_unblurred_image(flags, kind, fwhm, radius, tmp_path, monkeypatch,
                                                             capsys):
    monkeypatch.chdir(tmp_path)
    assert run_cli(BASE, capsys, "plain")[0] == 0
    rc, out, err = run_cli([*BASE, *flags], capsys, "psf")
    assert rc == 0, err
    r = psf_radius(kind, fwhm, 0.1) if radius is None else radius
    assert f"point-spread function: {kind}, FWHM {fwhm:g} um, radius {r} px" in out
    plain, blurred = _float("plain", (40, 40)), _float("psf", (40, 40))
    want = _blur(plain, kind, fwhm, 0.1, radius)
    assert np.abs(blurred - plain).max() > 0.05 * plain.max()  # the blur is visible
    np.testing.assert_allclose(blurred, want, rtol=1e-6, atol=1e-6 * plain.max())
    # the int image is made from the blurred photons too
    ints, header = read_smv("psf.img")
    assert float(header["GAIN"]) == pytest.approx(55000.0 / float(blurred.max()), rel=1e-12)
    np.testing.assert_array_equal(ints, np.floor((np.clip(blurred.astype(np.float64) * float(header["GAIN"]) + 40,
                                                          0, 65535) + 0.5).astype(np.float32)).astype(np.uint16))


def test_without_psf_the_files_are_unchanged_and_photons_are_conserved_away_from_edges(tmp_path, monkeypatch,
                                                                                       capsys):
    monkeypatch.chdir(tmp_path)
    assert run_cli(BASE, capsys, "a")[0] == 0
    assert run_cli([*BASE, "-psf_radius", "3", "-psf", "gauss"], capsys, "b")[0] == 0
    a, b = _float("a", (40, 40)), _float("b", (40, 40))
    lost = float(a.astype(np.float64).sum() - b.astype(np.float64).sum())
    edge = a.astype(np.float64).copy()
    edge[3:-3, 3:-3] = 0  # photons within the kernel radius of an edge: only they can leave the detector
    assert 0 <= lost <= edge.sum() and lost > 0
    # one bright pixel far from the edges keeps every photon, and the blur spreads it over the kernel only
    o = build(parse_args([*BASE, "-psf", "fiber", "-psf_radius", "4"]))[2].outputs
    setup = build(parse_args(BASE))[1]
    spot = np.zeros((40, 40), np.float32)
    spot[20, 17] = 1000.0
    blurred = blur_image(spot, setup, o)
    assert blurred.sum() == pytest.approx(1000.0, rel=1e-6)
    assert blurred[16:25, 13:22].sum() == pytest.approx(1000.0, rel=1e-6)
    # nothing given: the same bytes as before (nanoBragg has no PSF)
    assert run_cli(BASE, capsys, "c")[0] == 0
    for ext in (".bin", ".img", "_noise.img"):
        assert Path("a" + ext).read_bytes() == Path("c" + ext).read_bytes()


def test_psf_with_roi_keeps_pixels_outside_it_zero(tmp_path, monkeypatch, capsys):
    """Pixels outside the -roi are not rendered: they add no photons to the blur and stay 0 in every file."""
    monkeypatch.chdir(tmp_path)
    roi = ["-roi", "5", "30", "8", "25"]
    assert run_cli([*BASE, *roi], capsys, "plain")[0] == 0
    assert run_cli([*BASE, *roi, "-psf", "gauss", "-psf_fwhm", "200"], capsys, "psf")[0] == 0
    plain, blurred = _float("plain", (40, 40)), _float("psf", (40, 40))
    inside = np.zeros((40, 40), bool)
    inside[8:26, 5:31] = True
    want = np.where(inside, _blur(plain, "gauss", 200.0, 0.1), 0.0)
    np.testing.assert_allclose(blurred, want, rtol=1e-6, atol=1e-6 * plain.max())
    assert (blurred[~inside] == 0).all() and (read_smv("psf_noise.img")[0][~inside] == 0).all()


def test_psf_blurs_each_panel_of_a_geom_file_on_its_own(tmp_path, monkeypatch, capsys):
    """-geom: the blur acts on [P, S, F] before the slab is written; photons never cross into the other panel."""
    monkeypatch.chdir(tmp_path)
    geometry = read_geom(GEOM)
    assert run_cli(["-geom", GEOM, *PANEL_XTAL, "-nopgm", "-noprogress"], capsys, "plain")[0] == 0
    rc, out, err = run_cli(["-geom", GEOM, *PANEL_XTAL, "-nopgm", "-noprogress", "-psf", "gauss", "-psf_fwhm", "800",
                         "-psf_radius", "2"], capsys, "psf")
    assert rc == 0, err
    plain = slab_to_panels(_float("plain", (14, 10)), geometry)
    blurred_slab = _float("psf", (14, 10))
    assert (blurred_slab[6:8] == 0).all()  # rows in no panel stay 0
    setup = build(parse_args(["-geom", str(GEOM), *PANEL_XTAL]))[1]
    extent = torch.from_numpy(panel_extent_mask(setup))
    want = np.stack([_blur(plain[k], "gauss", 800.0, setup.pixel_size, 2, extent[k]) for k in range(2)])
    np.testing.assert_allclose(slab_to_panels(blurred_slab, geometry), want, rtol=1e-6, atol=1e-6 * plain.max())
    # a spot on the edge of panel 0 loses photons off that panel, and none reach panel 1
    o = build(parse_args(["-geom", str(GEOM), *PANEL_XTAL, "-psf", "gauss", "-psf_fwhm", "800"]))[2].outputs
    spot = np.zeros(setup.image_shape, np.float32)
    spot[0, -1, 4] = 100.0
    b = blur_image(spot, setup, o)
    assert b[1].sum() == 0 and 50.0 < b[0].sum() < 100.0


def test_panels_of_other_pixel_sizes_are_refused_for_psf(tmp_path):
    text = GEOM.read_text()
    assert "res" in text
    odd = tmp_path / "odd.geom"
    lines = text.splitlines()
    # give the second panel its own resolution (pixels per metre): another pixel size
    odd.write_text("\n".join(lines) + "\nb/res = 7000\n")
    with pytest.raises(ValueError, match=r"-psf: panel b has pixels of"):
        build(parse_args(["-geom", str(odd), *PANEL_XTAL, "-psf", "gauss"]))


# ----------------------------------------------------------------------------------------------------------------
# detector noise


def test_noise_flags_give_detector_adu_plus_the_adc_offset(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    flags = ["-gain", "2.5", "-readout_noise", "3", "-flicker", "0.05", "-calibration", "0.02", "-calib_seed", "4",
             "-adc", "100"]
    rc, out, err = run_cli([*BASE, *flags], capsys, "n")
    assert rc == 0, err
    assert "detector: gain 2.5 ADU/photon, read-out noise 3 ADU, flicker 0.05, calibration 0.02 (calib seed 4)" in out
    image = _float("n", (40, 40))
    noise = DetectorNoise(gain=2.5, readout_adu=3.0, flicker=0.05, calibration=0.02, calib_seed=4)
    adu, photons = detector_adu(image, 9, noise)
    want, _ = counts_to_uint16(adu, adc=100.0)
    pixels, header = read_smv("n_noise.img")
    np.testing.assert_array_equal(pixels, want)
    assert float(header["GAIN"]) == 2.5 and float(header["ADC_OFFSET"]) == 100.0
    assert f"{photons:.0f} photons on noise image" in out
    # the same seed: the same file; another calibration seed: another file
    assert run_cli([*BASE, *flags], capsys, "m")[0] == 0
    assert Path("n_noise.img").read_bytes() == Path("m_noise.img").read_bytes()
    assert run_cli([*BASE, *flags[:-4], "-calib_seed", "5", "-adc", "100"], capsys, "o")[0] == 0
    assert not np.array_equal(read_smv("o_noise.img")[0], pixels)


def test_without_noise_flags_the_noise_image_is_nanobraggs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, out, _ = run_cli([*BASE, "-gain", "1", "-calib_seed", "77"], capsys, "n")  # ideal values: nanoBragg's image
    assert rc == 0 and "detector:" not in out
    pixels, header = read_smv("n_noise.img")
    np.testing.assert_array_equal(pixels, noise_image_uint16(_float("n", (40, 40)), 9, adc=40.0)[0])
    assert float(header["GAIN"]) == 1.0


def test_noise_flags_with_nonoise_are_noted(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = cli.main([*BASE, "-noisefile", "n.img", "-readout_noise", "2", "-calib_seed", "3", "-nonoise"])
    out = capsys.readouterr().out
    assert rc == 0 and "note: -readout_noise, -calib_seed ignored: no noise image is written (-nonoise)" in out
    assert not Path("n.img").exists()


@pytest.mark.parametrize("flags, words", [
    (["-psf", "blur"], ["-psf must be 'gauss' or 'fiber'", "'blur'"]),
    (["-psf", "gauss", "-psf_fwhm", "0"], ["-psf_fwhm must be > 0 and <= 1e5 µm", "got 0"]),
    (["-psf", "gauss", "-psf_fwhm", "nan"], ["-psf_fwhm expects a finite number"]),
    (["-psf", "gauss", "-psf_radius", "1.5"], ["-psf_radius must be an integer (between 0 and 1000)"]),
    (["-psf", "gauss", "-psf_radius", "1001"], ["-psf_radius must be between 0 and 1000"]),
    (["-psf_fwhm", "30"], ["-psf_fwhm needs -psf gauss|fiber"]),
    (["-psf_radius", "3"], ["-psf_radius needs -psf gauss|fiber"]),
    (["-psf", "fiber", "-psf_fwhm", "1000"], ["-psf fiber -psf_fwhm 1000", "give -psf_radius (0 to 1000)"]),
    (["-gain", "0"], ["-gain must be > 0 and <= 65535 ADU/photon", "got 0"]),
    (["-readout_noise", "-1"], ["-readout_noise must be >= 0 and <= 65535 ADU"]),
    (["-flicker", "1"], ["-flicker must be >= 0 and < 1", "got 1"]),
    (["-calibration", "-0.1"], ["-calibration must be >= 0 and < 1"]),
    (["-calib_seed", "2.5"], ["-calib_seed must be an integer"]),
    (["-calib_seed"], ["-calib_seed needs 1 value"]),
])
def test_bad_response_values_name_the_flag_and_write_nothing(flags, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli([*BASE, *flags], capsys)
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert os.listdir(tmp_path) == []


def test_response_flags_are_not_written_back_like_adc_and_seed():
    from nbtorch import from_nanobragg_args, to_nanobragg_args

    p, s = from_nanobragg_args([*BASE, "-psf", "gauss", "-gain", "2", "-adc", "10"])
    text = " ".join(to_nanobragg_args(p, s))
    assert "-psf" not in text and "-gain" not in text and "-adc" not in text


# ----------------------------------------------------------------------------------------------------------------
# --precompile


@pytest.fixture
def calls(monkeypatch):
    """nbtorch.precompile.precompile replaced by a recorder (no kernel is ever built here)."""
    seen = []

    def fake(dtypes, specs="common", device="cpu", progress=None):
        seen.append((list(dtypes), specs, device))
        progress("[1/1] forward square float32: ready")
        return len(seen) - 1 if specs == "all" and device == "fail" else 0

    monkeypatch.setattr(nbtorch.precompile, "precompile", fake)
    return seen


@pytest.mark.parametrize("argv, want", [
    (["--precompile"], ([torch.float32, torch.float64], "common", "cpu")),
    (["--precompile", "--dtype", "float64", "--specs", "all"], ([torch.float64], "all", "cpu")),
    (["--specs=common", "--dtype=float32,double,float32", "--precompile"], ([torch.float32, torch.float64],
                                                                           "common", "cpu")),
])
def test_precompile_builds_the_asked_set_and_exits(argv, want, calls, capsys):
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert calls == [want]
    assert "[1/1] forward square float32: ready" in out and "all built" in out
    assert "simulated" not in out


def test_precompile_reports_failures_with_exit_1(calls, monkeypatch, capsys):
    monkeypatch.setattr(nbtorch.precompile, "precompile", lambda *a, **k: 2)
    assert cli.main(["--precompile"]) == 1
    assert "2 failed" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["--precompile", *BASE], ["--precompile fills the kernel cache and simulates nothing", "'-cell'"]),
    (["--precompile", "--dtype", "float16"], ["--dtype with --precompile must be float32 and/or float64"]),
    (["--precompile", "--dtype", ","], ["--dtype with --precompile"]),
    (["--precompile", "--specs", "some"], ["--specs must be common or all", "'some'"]),
    (["--precompile", "--specs"], ["--specs needs a value"]),
    (["--precompile", "--device", "tpu9"], ["--device 'tpu9' is not a torch device"]),
    (["--specs", "all", *BASE], ["--specs is an option of --precompile"]),
])
def test_precompile_usage_errors_exit_2_without_building(argv, words, calls, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert calls == [] and os.listdir(tmp_path) == []


def test_docs_describe_the_response_flags_and_precompile():
    text = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text(encoding="utf-8")
    for word in ("## Detector response", "## Filling the kernel cache: `nbtorch --precompile`", "`--precompile`",
                 "`--specs common\\|all`", "`-psf gauss\\|fiber`", "detector_adu", "byte for byte"):
        assert word in text, word
