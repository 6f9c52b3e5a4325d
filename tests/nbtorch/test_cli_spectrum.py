"""``nbtorch -spectrum FILE.lam [-spectrum_bins N]`` (issue 22, item 1: the command line and files): the image is
``nbtorch.simulate`` of :func:`nbtorch.spectrum.with_spectrum` applied to the same flags' model (divergence
combines, -geom/-expt detectors too); ``-spectrum_bins`` is :func:`~nbtorch.spectrum.rebin_spectrum`'s spectrum; one
channel is the monochromatic image; conflicting flags and bad .lam files exit 2 with one line and nothing written;
``-nexusfile`` stores the spectrum in NXbeam and ``read_image`` gives it back.  Small images, eager kernels."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

import nbtorch
from nbtorch.io.images import read_image, read_raw_float
from nbtorch.io.nexus import read_nxmx, write_nxmx
from nbtorch.io.smv import read_smv
from nbtorch.spectrum import read_lam, rebin_spectrum, with_spectrum, write_lam
from tests.nbtorch.cli_run import run_cli

DATA = Path(__file__).resolve().parents[1] / "data"
SASE = DATA / "spectra" / "sase40.lam"  # 40 channels over 0.5 % around 1 Å, spiky weights
ONE = DATA / "spectra" / "one.lam"  # one channel: 1.0 Å, weight 3.5
GEOM = DATA / "cli_panels" / "two_small.geom"  # two panels, photon_energy 12398.42 eV
EXPT = DATA / "cli_panels" / "two_small.expt"
BASE = ("-cell 60 60 60 90 90 90 -default_F 100 -N 10 -misset 10 20 30 -distance 40 -pixel 0.5 -detpixels 24 "
        "-oversample 1 -seed 9 -nopgm -noprogress").split()
PANEL = "-cell 50 50 50 90 90 90 -default_F 100 -N 3 -misset 10 20 30 -oversample 1 -seed 9 -nopgm -noprogress".split()


def _image(flags, lam=None, w=None):
    """float64 image of the flags' model, with the spectrum (``lam``, ``w``) applied when given."""
    p, s = nbtorch.from_nanobragg_args([str(f) for f in flags])
    if lam is not None:
        p, s = with_spectrum(p, s, lam, w)
    return nbtorch.simulate(p, s).detach().numpy()


# ----------------------------------------------------------------------------------------------------------------
# the image


def test_spectrum_image_equals_with_spectrum_of_the_same_flags(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    div = ["-divergence", "0.4", "-divsteps", "2"]
    rc, out, err = run_cli([*BASE, *div, "-spectrum", SASE], capsys)
    assert rc == 0, err
    lam, w = read_lam(SASE)
    mean = math.fsum(lam * w) / math.fsum(w)
    assert f"-spectrum {SASE}: 40 channels × 4 divergence directions = 160 sources, weighted mean lambda " \
           f"{mean:.8g} Å" in out
    got = read_raw_float("run.bin", (24, 24))
    want = _image([*BASE, *div], lam, w)
    mono = _image([*BASE, *div, "-lambda", f"{mean!r}"])
    assert np.abs(want - mono).max() > 0.02 * want.max()  # the spectrum changes the image
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-6, atol=1e-7 * want.max())
    _, header = read_smv("run.img")
    assert header["WAVELENGTH"] == "%g" % mean  # lambda0, in nanoBragg's %g


def test_spectrum_bins_is_the_rebinned_spectrum():
    lam, w = read_lam(SASE)
    p, s = nbtorch.from_nanobragg_args([*BASE, "-spectrum", str(SASE), "-spectrum_bins", "8"])
    lb, wb = rebin_spectrum(lam, w, 8)
    assert lb.size == 8
    p_want, s_want = with_spectrum(*nbtorch.from_nanobragg_args(BASE), lb, wb)
    assert s == s_want
    assert float(p.beam.wavelength) == float(p_want.beam.wavelength)
    np.testing.assert_array_equal(nbtorch.simulate(p, s).numpy(), nbtorch.simulate(p_want, s_want).numpy())
    # more bins than channels: the file's spectrum as it is
    _, s_all = nbtorch.from_nanobragg_args([*BASE, "-spectrum", str(SASE), "-spectrum_bins", "100"])
    assert s_all == with_spectrum(*nbtorch.from_nanobragg_args(BASE), lam, w)[1]


def test_one_channel_spectrum_is_the_monochromatic_image(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli([*BASE, "-spectrum", ONE], capsys, "one")
    assert rc == 0, err
    assert "1 channel, weighted mean lambda 1 Å" in out
    assert run_cli([*BASE, "-lambda", "1"], capsys, "mono")[0] == 0
    assert Path("one.bin").read_bytes() == Path("mono.bin").read_bytes()
    assert read_raw_float("one.bin", (24, 24)).max() > 0


@pytest.mark.parametrize("source", ["-geom", "-expt"])
def test_spectrum_with_a_detector_file_replaces_its_wavelength(source, capsys):
    path = GEOM if source == "-geom" else EXPT
    flags = [source, str(path), *PANEL]
    lam, w = rebin_spectrum(*read_lam(SASE), 6)
    p, s, extras = nbtorch.args.build(nbtorch.args.parse_args([*flags, "-spectrum", str(SASE),
                                                               "-spectrum_bins", "6"]))
    assert any(("photon_energy" in n or "wavelength" in n) and ("-spectrum" in n) for n in extras.notes), extras.notes
    p_want, s_want = with_spectrum(*nbtorch.from_nanobragg_args(flags), lam, w)
    assert s == s_want and s.n_panels == 2
    assert float(p.beam.wavelength) == float(p_want.beam.wavelength)
    np.testing.assert_array_equal(nbtorch.simulate(p, s).numpy(), nbtorch.simulate(p_want, s_want).numpy())


def test_to_nanobragg_args_names_the_spectrum_flag():
    p, s = nbtorch.from_nanobragg_args([*BASE, "-spectrum", str(SASE), "-spectrum_bins", "5"])
    with pytest.raises(ValueError, match="-spectrum FILE"):
        nbtorch.to_nanobragg_args(p, s)
    # one channel: an ordinary wavelength, and the flags give the same image
    p1, s1 = nbtorch.from_nanobragg_args([*BASE, "-spectrum", str(ONE)])
    p2, s2 = nbtorch.from_nanobragg_args(nbtorch.to_nanobragg_args(p1, s1))
    assert s2.sources == s1.sources and float(p2.beam.wavelength) == float(p1.beam.wavelength)
    np.testing.assert_array_equal(nbtorch.simulate(p1, s1).numpy(), nbtorch.simulate(p2, s2).numpy())


@pytest.mark.parametrize("extra", [
    ["-spectrum_bins", "6", "-divergence", "0.4", "-divsteps", "2"],
    ["-geom", str(GEOM), "-cell", "50", "50", "50", "90", "90", "90"],
])
def test_to_nanobragg_args_carries_the_base_spectrum(extra):
    flags = [*(f for f in BASE if f not in ("-distance", "40", "-pixel", "0.5", "-detpixels", "24")), *extra,
             "-spectrum", str(SASE)] if "-geom" in extra else [*BASE, *extra, "-spectrum", str(SASE)]
    p, s = nbtorch.from_nanobragg_args(flags)
    out = nbtorch.to_nanobragg_args(p, s, base=flags)
    assert out[out.index("-spectrum") + 1] == str(SASE) and "-lambda" not in out
    assert ("-spectrum_bins" in out) == ("-spectrum_bins" in flags)
    p2, s2 = nbtorch.from_nanobragg_args(out)
    assert s2 == s and float(p2.beam.wavelength) == float(p.beam.wavelength)
    np.testing.assert_array_equal(nbtorch.simulate(p2, s2).numpy(), nbtorch.simulate(p, s).numpy())
    # a refined wavelength (the spectrum stretched) is no longer the file's
    moved = p._replace(beam=p.beam._replace(wavelength=p.beam.wavelength * 1.001))
    with pytest.raises(ValueError, match="not the weighted mean .* refined wavelength.*write_lam"):
        nbtorch.to_nanobragg_args(moved, s, base=flags)


# ----------------------------------------------------------------------------------------------------------------
# errors: one line, exit 2, nothing written


@pytest.mark.parametrize("extra, names", [
    (["-lambda", "1.2"], ["-lambda", "-spectrum"]),
    (["-energy", "12000"], ["-energy", "-spectrum"]),
    (["-dispersion", "0.2"], ["-dispersion", "-spectrum"]),
    (["-dispsteps", "3"], ["-dispsteps", "-spectrum"]),
    (["-sourcefile", "src.txt"], ["-sourcefile", "-spectrum"]),
])
def test_conflicting_wavelength_flags_are_refused(extra, names, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("src.txt").write_text("0 0 -10 1 1e-10\n")
    rc, out, err = run_cli([*BASE, "-spectrum", SASE, *extra], capsys)
    assert rc == 2
    line = err.strip()
    assert "\n" not in line and all(n in line for n in names), err
    assert sorted(os.listdir(".")) == ["src.txt"]


def test_spectrum_bins_needs_a_spectrum(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli([*BASE, "-spectrum_bins", "5"], capsys)
    assert rc == 2 and "-spectrum_bins" in err and "-spectrum FILE" in err
    rc, _, err = run_cli([*BASE, "-spectrum", SASE, "-spectrum_bins", "0"], capsys)
    assert rc == 2 and "-spectrum_bins" in err
    assert os.listdir(".") == []


@pytest.mark.parametrize("text, what", [
    ("wavelength,weight\n1.0,1.0\n1.001,abc\n", "line 3"),
    ("wavelength,weight\n1.0,1.0\n1.001,2,3\n", "line 3"),
    ("wavelength,weight\n1.0,1.0\n1.001,-2\n", "weights must be"),
    ("wavelength,weight\n0,1.0\n", "wavelengths must be"),
    ("wavelength,weight\n", "no spectrum rows"),
    ("wavelength,weight\n1e5,1\n", "outside"),
])
def test_bad_lam_files_name_the_file(text, what, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("bad.lam").write_text(text)
    rc, out, err = run_cli([*BASE, "-spectrum", "bad.lam"], capsys)
    assert rc == 2
    line = err.strip()
    assert "\n" not in line and "-spectrum bad.lam" in line and what in line, err
    assert os.listdir(".") == ["bad.lam"]


# ----------------------------------------------------------------------------------------------------------------
# NXmx: NXbeam incident_wavelength [m] with incident_wavelength_weights [m]


def test_nexusfile_stores_the_spectrum_and_read_image_returns_it(tmp_path, monkeypatch, capsys):
    pytest.importorskip("h5py")
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli([*BASE, "-spectrum", SASE, "-spectrum_bins", "7", "-divergence", "0.4", "-divsteps", "2",
                         "-nexusfile", "run.h5"], capsys)
    assert rc == 0, err
    lam, w = rebin_spectrum(*read_lam(SASE), 7)
    obs = read_image("run.h5")
    got_lam, got_w = obs.geometry.spectrum
    np.testing.assert_allclose(got_lam, lam, rtol=1e-13)
    np.testing.assert_allclose(got_w, w / w.sum(), rtol=1e-12)
    assert got_w.sum() == pytest.approx(1.0, rel=1e-14)
    mean = math.fsum(lam * w) / math.fsum(w)
    assert obs.geometry.wavelength_A == pytest.approx(mean, rel=1e-13)
    assert obs.wavelength_A == pytest.approx(mean, rel=1e-13)
    np.testing.assert_array_equal(obs.data, read_raw_float("run.bin", (24, 24)))


def test_write_read_nxmx_round_trip_of_a_spectrum_and_of_one_wavelength(tmp_path):
    h5py = pytest.importorskip("h5py")
    lam = np.array([0.99, 1.0, 1.02])
    w = np.array([1.0, 3.0, 0.5])
    p, s = with_spectrum(*nbtorch.from_nanobragg_args([*BASE, "-divergence", "0.4", "-divsteps", "3"]), lam, w)
    image = np.arange(24 * 24, dtype=np.float32).reshape(24, 24)
    write_nxmx(tmp_path / "a.h5", image, p, s)
    geo = read_nxmx(tmp_path / "a.h5").geometry
    np.testing.assert_allclose(geo.spectrum[0], lam, rtol=1e-13)
    np.testing.assert_allclose(geo.spectrum[1], w / w.sum(), rtol=1e-13)  # summed over the 9 directions
    assert geo.wavelength_A == pytest.approx(float(p.beam.wavelength), rel=1e-13)
    with h5py.File(tmp_path / "a.h5", "r") as f:
        beam = f["/entry/instrument/beam"]
        assert beam["incident_wavelength"].shape == (3,) and beam["incident_wavelength_weights"].shape == (3,)
        assert beam["incident_wavelength"].attrs["units"] == "angstrom"
    # one wavelength: a scalar, no weights, no spectrum read back
    p1, s1 = nbtorch.from_nanobragg_args([*BASE, "-lambda", "1.3"])
    write_nxmx(tmp_path / "b.h5", image, p1, s1)
    with h5py.File(tmp_path / "b.h5", "r") as f:
        assert f["/entry/instrument/beam/incident_wavelength"].shape == ()
        assert "incident_wavelength_weights" not in f["/entry/instrument/beam"]
    geo1 = read_nxmx(tmp_path / "b.h5").geometry
    assert geo1.spectrum is None and geo1.wavelength_A == pytest.approx(1.3, rel=1e-14)


def test_nxmx_spectrum_per_frame_and_bad_weights(tmp_path):
    h5py = pytest.importorskip("h5py")
    lam = np.array([0.99, 1.01])
    p, s = with_spectrum(*nbtorch.from_nanobragg_args(BASE), lam, np.array([1.0, 1.0]))
    path = tmp_path / "a.h5"
    write_nxmx(path, np.ones((24, 24), np.float32), p, s)
    with h5py.File(path, "r+") as f:  # a spectrum per frame [frames, m]: the first frame's is read
        beam = f["/entry/instrument/beam"]
        del beam["incident_wavelength"], beam["incident_wavelength_weights"]
        beam.create_dataset("incident_wavelength", data=[[0.1, 0.2, 0.3], [0.5, 0.6, 0.7]]).attrs["units"] = "nm"
        beam.create_dataset("incident_wavelength_weights", data=[[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    geo = read_nxmx(path).geometry
    np.testing.assert_allclose(geo.spectrum[0], [1.0, 2.0, 3.0], rtol=1e-13)
    assert geo.wavelength_A == pytest.approx(2.0, rel=1e-13)
    with h5py.File(path, "r+") as f:
        beam = f["/entry/instrument/beam"]
        del beam["incident_wavelength_weights"]
        beam.create_dataset("incident_wavelength_weights", data=[1.0, 2.0])
    with pytest.raises(ValueError, match="a.h5: NXbeam incident_wavelength has shape"):
        read_nxmx(path)
    with h5py.File(path, "r+") as f:
        beam = f["/entry/instrument/beam"]
        del beam["incident_wavelength_weights"]
        beam.create_dataset("incident_wavelength_weights", data=[[0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="a.h5: NXbeam spectrum"):
        read_nxmx(path)


def test_write_lam_read_by_the_command_line(tmp_path):
    lam, w = rebin_spectrum(*read_lam(SASE), 5)
    write_lam(tmp_path / "five.lam", lam, w)
    _, s = nbtorch.from_nanobragg_args([*BASE, "-spectrum", str(tmp_path / "five.lam")])
    assert s.n_sources == 5 and s == with_spectrum(*nbtorch.from_nanobragg_args(BASE), lam, w)[1]
