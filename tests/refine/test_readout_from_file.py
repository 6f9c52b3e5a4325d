"""The read-out noise σ_r (ADU) from the detector files (issue 22 item 4): nbtorch's extension key ``readout_noise`` in
a CrystFEL ``.geom`` (global, or ``panel/readout_noise``) and in a DIALS ``.expt`` panel; one value per panel gives a
per-pixel σ_r map; nbtorch-refine's gaussian target takes it when no ``--readout-noise-adu`` is given (χ²/ν ≈ 1 on a
two-panel still with a different σ_r per panel), and the flag overrides the file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import nbtorch
import refine
from nbtorch.args import build, parse_args
from nbtorch.io.crystfel import GeometryFileError, format_geom, parse_geom, read_geom
from nbtorch.io.dials import parse_expt
from nbtorch.io.images import write_raw_float
from refine.cli.checks import EXIT_POOR_FIT
from refine.cli.fit import _detector_file, main
from refine.pipeline.problem import fit_target
from refine.targets.detector import from_crystfel, from_dials, read_noise_photons, readout_option

DATA = Path(__file__).resolve().parents[1] / "data" / "cli_panels"
#: Two 64×64 panels of 0.2 mm at 60 mm, above and below the beam, 2 ADU per photon; {glob}: global lines, {panels}:
#: panel lines at the end.
GEOM = """clen = 0.06 m
photon_energy = 12398.42 eV
res = 5000
adu_per_photon = 2
{glob}
data = /data/data
dim0 = ss
dim1 = fs

a/min_fs = 0
a/max_fs = 63
a/min_ss = 0
a/max_ss = 63
a/fs = x
a/ss = y
a/corner_x = -32
a/corner_y = 1

b/min_fs = 0
b/max_fs = 63
b/min_ss = 64
b/max_ss = 127
b/fs = x
b/ss = y
b/corner_x = -32
b/corner_y = -65
{panels}"""
#: The crystal (spots up to ~10⁴ photons on ~1–3 photons of water).
CRYSTAL = "-default_F 100 -cell 40 50 60 90 90 90 -misset 10 20 30 -N 6 -oversample 1 -fluence 1e30 -water 0.0025"
GAIN, SIGMA_A, SIGMA_B, ADC = 2.0, 3.0, 5.0, 40.0


def _geom(tmp_path, readout: str) -> Path:
    """det.geom with ``readout`` as a global line, or at the end when it holds panel keys."""
    path = tmp_path / "det.geom"
    panel = "/" in readout
    path.write_text(GEOM.format(glob="" if panel else readout, panels=readout + "\n" if panel else ""))
    return path


def test_geom_readout_noise_global_per_panel_and_written_back(tmp_path):
    geom = read_geom(_geom(tmp_path, "readout_noise = 3"))
    params, setup = nbtorch.from_nanobragg_args(f"-geom {tmp_path / 'det.geom'} {CRYSTAL}", dtype=torch.float64)
    resp = from_crystfel(geom, setup, 12398.42)
    assert resp.readout == 3.0 and any("readout_noise" in s for s in resp.sources)
    geom = read_geom(_geom(tmp_path, "a/readout_noise = 3\nb/readout_noise = 5"))
    resp = from_crystfel(geom, setup, 12398.42)
    assert resp.readout.shape == (2, 64, 64) and resp.readout[0].max() == 3.0 and resp.readout[1].min() == 5.0
    again = parse_geom(format_geom(geom).encode(), "again.geom")  # kept and written back
    assert [dict(p.extra)["readout_noise"] for p in again.panels] == ["3", "5"]
    assert from_crystfel(read_geom(_geom(tmp_path, "")), setup, 12398.42).readout is None
    with pytest.raises(ValueError, match="readout_noise is given for some panels but not for panel b"):
        from_crystfel(read_geom(_geom(tmp_path, "a/readout_noise = 3")), setup, 12398.42)
    with pytest.raises(GeometryFileError, match="a/readout_noise.*read-out noise must be a number of ADU >= 0"):
        read_geom(_geom(tmp_path, "a/readout_noise = -1\nb/readout_noise = 1"))


def test_expt_panel_readout_noise(tmp_path):
    raw = json.loads((DATA / "two_small.expt").read_text())
    params, setup = nbtorch.from_nanobragg_args(f"-expt {DATA / 'two_small.expt'} -default_F 10 -N 2",
                                                dtype=torch.float64)
    assert from_dials(parse_expt(json.dumps(raw).encode(), "x.expt").detector_of(0), setup).readout is None
    for k, panel in enumerate(raw["detector"][0]["panels"]):
        panel["readout_noise"] = 2.0 + k
    detector = parse_expt(json.dumps(raw).encode(), "x.expt").detector_of(0)
    assert [p.readout_noise for p in detector.panels] == [2.0, 3.0]
    resp = from_dials(detector, setup, "-expt x.expt")
    assert resp.readout[0].max() == 2.0 and resp.readout[1].min() == 3.0
    assert "readout_noise from -expt x.expt" in resp.sources
    expt = tmp_path / "r.expt"  # the command line's -expt route: its detector response gives the option
    expt.write_text(json.dumps(raw))
    params, setup, extras = build(parse_args(["-expt", str(expt), "-default_F", "10", "-N", "2"]), dtype=torch.float64)
    option = readout_option(_detector_file(extras.panels, setup, params), "gaussian", None)["readout_noise_adu"]
    assert option.shape == (2, 6, 10) and option[0].max() == 2.0 and option[1].min() == 3.0
    raw["detector"][0]["panels"][1]["readout_noise"] = -1.0
    with pytest.raises(ValueError, match="readout_noise.*must be >= 0.0"):
        parse_expt(json.dumps(raw).encode(), "x.expt")


def test_the_option_wins_and_a_map_becomes_sigma_per_pixel():
    sigma = np.stack([np.full((4, 5), SIGMA_A), np.full((4, 5), SIGMA_B)])
    resp = refine.targets.detector.DetectorResponse(gain=GAIN, readout=sigma)
    assert readout_option(resp, "gaussian", None)["readout_noise_adu"] is sigma
    assert readout_option(resp, "gaussian", 7.0) == {} and readout_option(resp, "poisson", None) == {}
    assert readout_option(None, "gaussian", None) == {}
    target = fit_target(refine.FitOptions(target="gaussian", readout_noise_adu=sigma), GAIN, sigma.shape)
    np.testing.assert_array_equal(target.read_noise_map, sigma / GAIN)
    np.testing.assert_array_equal(read_noise_photons(sigma, sigma * 0 + 2.0), sigma / 2.0)
    with pytest.raises(ValueError, match="readout_noise_adu must be a number >= 0"):
        refine.FitOptions(target="gaussian", readout_noise_adu=-sigma)


@pytest.fixture(scope="module")
def two_panel_still(tmp_path_factory):
    """(folder, flags, noiseless photons [2, 64, 64]) with obs.bin: the data slab in ADU, gain 2, σ_r 3 and 5 ADU
    on panels a and b, ADC offset 40."""
    tmp = tmp_path_factory.mktemp("readout")
    path = _geom(tmp, "a/readout_noise = 3\nb/readout_noise = 5")
    flags = f"-geom {path} {CRYSTAL}".split()
    params, setup = nbtorch.from_nanobragg_args(flags, dtype=torch.float64)
    image = nbtorch.simulate(params, setup, fused=False).numpy()
    rng = np.random.default_rng(7)
    sigma = np.array([SIGMA_A, SIGMA_B])[:, None, None]
    adu = GAIN * rng.poisson(image) + sigma * rng.standard_normal(image.shape) + ADC  # offset: no value < 0
    write_raw_float(str(tmp / "obs.bin"), adu.reshape(128, 64).astype(np.float32))
    return tmp, flags, image


def test_cli_takes_the_read_out_noise_of_its_geom_and_the_flag_overrides_it(two_panel_still, capsys):
    """χ²/ν within 5 % of 1 on 8192 pixels with σ_r from the file (3 and 5 ADU per panel); with the file's key but
    --readout-noise-adu 20 the flag is used (χ²/ν far below 1)."""
    tmp, flags, image = two_panel_still
    assert image.max() > 1000 and (image < 5).mean() > 0.5
    base = [str(tmp / "obs.bin"), "--target", "gaussian", "--refine", "scale", "--no-coarse", "--max-iter", "3",
            "--adc", str(ADC), "--quiet", "--json", str(tmp / "fit.json")]
    assert main(base + flags) == 0
    out = capsys.readouterr().out
    d = json.loads((tmp / "fit.json").read_text())
    assert abs(d["chi2_nu"] - 1.0) < 0.05, d["chi2_nu"]
    assert "read-out noise 3–5 ADU per pixel = 1.5–2.5 photons" in out
    assert main(base + ["--readout-noise-adu", "20"] + flags) == EXIT_POOR_FIT
    out = capsys.readouterr().out
    assert "read-out noise 20 ADU = 10 photons" in out
    d = json.loads((tmp / "fit.json").read_text())
    assert d["chi2_nu"] < 0.5 and "a read noise too large" in d["poor_fit"]
