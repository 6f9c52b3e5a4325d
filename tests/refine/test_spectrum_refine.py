"""The refinable ``spectrum`` group (diffBragg's λ' = lam0 + lam1·λ of a beam's spectrum, issue 22 item 1): names,
units, flags and the JSON keys; the refusal of ``wavelength`` with ``spectrum.lam1``; the degeneracy of a shift on a
beam of one wavelength; lam0/lam1 recovered from a noisy 20-channel SASE-like still; the refined spectrum written
back as a .lam file whose flags re-simulate the model (library and nbtorch-refine --out-spectrum); and spectra given
per shot on the lines of an image LIST."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import nbtorch
import refine
from nbtorch.io.images import write_raw_float
from nbtorch.spectrum import read_lam, with_spectrum, write_lam
from refine.imagelist import load_entries, parse_image_list
from refine.model.degeneracy import degenerate_pairs
from refine.model.parameters import parameterise
from refine.model.table import REPORT_FIELDS, SPECS

from .refine_cases import with_beam

#: A 48×48 still of 0.2 mm pixels at 60 mm, λ ≈ 1 Å: peaks ~35000 photons.
STILL = ("-default_F 100 -cell 40 50 60 90 90 90 -misset 10 20 30 -N 6 -lambda 1 -distance 60 -pixel 0.2 "
         "-detpixels 48 -oversample 1 -fluence 1e30")
#: The true spectrum's shift (Å) and stretch about the file's.
TRUE_LAM0, TRUE_LAM1 = 0.002, 0.999


def _sase(n: int, seed: int = 0):
    """A SASE-like spectrum: spikes under a Gaussian envelope, 0.5 % wide around 1 Å."""
    rng = np.random.default_rng(seed)
    lam = np.linspace(0.9975, 1.0025, n)
    return lam, np.exp(-0.5 * ((lam - 1.0) / 0.001) ** 2) * rng.exponential(1.0, n)


def _spectral_model(flags: str = STILL, n: int = 20, seed: int = 0):
    params, setup = nbtorch.from_nanobragg_args(flags, dtype=torch.float64)
    return with_spectrum(params, setup, *_sase(n, seed))


def test_names_units_flags_and_report_keys():
    lam0, lam1 = SPECS["spectrum.lam0"], SPECS["spectrum.lam1"]
    assert (lam0.group, lam0.leaf, lam0.transform, lam0.unit) == ("spectrum", "beam.spectrum_shift", "linear", "Å")
    assert (lam1.group, lam1.leaf, lam1.transform, lam1.unit, lam1.relative) == (
        "spectrum", "beam.wavelength", "log", "", True)
    assert lam0.flags == lam1.flags == ("-spectrum",)
    fields = dict(REPORT_FIELDS)
    assert fields["spectrum_lam0_A"] == fields["spectrum_lam1"] == fields["spectrum_mean_A"] == 1
    params, setup = _spectral_model(n=5)
    par = parameterise(params, setup, "spectrum")
    assert par.names == ["spectrum.lam0", "spectrum.lam1"]
    assert [s.ref for s in par.scalars] == [0.0, 1.0]  # diffBragg's start (0, 1)
    x = torch.tensor([0.003, math.log(0.998)], dtype=torch.float64)
    q = par.unpack(x)
    assert float(q.beam.spectrum_shift) == pytest.approx(0.003)
    assert float(q.beam.wavelength) == pytest.approx(0.998 * float(params.beam.wavelength), rel=1e-14)
    torch.testing.assert_close(par.pack(q), x, rtol=0, atol=1e-14)
    assert [float(v) for v in par.values(x)] == pytest.approx([0.003, 0.998], rel=1e-14)


def test_wavelength_and_lam1_are_never_free_together():
    params, setup = _spectral_model(n=5)
    for free in (["wavelength", "spectrum"], ["spectrum.lam1", "wavelength"]):
        with pytest.raises(ValueError, match=r"^wavelength and spectrum.lam1 both move beam.wavelength: free one"):
            parameterise(params, setup, free)
    assert parameterise(params, setup, ["wavelength", "spectrum.lam0"]).names == ["wavelength", "spectrum.lam0"]


def test_a_shift_of_one_wavelength_is_a_degeneracy():
    mono, setup = nbtorch.from_nanobragg_args(STILL, dtype=torch.float64)
    for other in ("wavelength", "spectrum.lam1"):
        (d,) = degenerate_pairs(parameterise(mono, setup, ["spectrum.lam0", other]))
        assert d.names == ("spectrum.lam0", other) and "one wavelength" in d.why
        with pytest.raises(ValueError, match="spectrum.lam0 and .* cannot be told apart"):
            refine.fit(nbtorch.simulate(mono, setup, fused=False), mono, setup, ["spectrum.lam0", other], max_iter=1,
                       allow_degenerate=False)
    assert not degenerate_pairs(parameterise(*_spectral_model(n=5), ["spectrum"]))
    assert not degenerate_pairs(parameterise(mono, setup, ["spectrum.lam0"]))


@pytest.fixture(scope="module")
def sase_fit():
    """A noisy 20-channel still whose true spectrum is the file's shifted by TRUE_LAM0 and stretched by TRUE_LAM1,
    refined (spectrum and scale) from lam0 = 0, lam1 = 1 and a fluence 20 % high."""
    params, setup = _spectral_model()
    true = with_beam(params, wavelength=params.beam.wavelength * TRUE_LAM1,
                     spectrum_shift=torch.tensor(TRUE_LAM0, dtype=torch.float64))
    observed = torch.poisson(nbtorch.simulate(true, setup, fused=False), generator=torch.Generator().manual_seed(1))
    start = with_beam(params, fluence=params.beam.fluence * 1.2)
    return params, refine.fit(observed, start, setup, ["spectrum", "scale"], fused=False)


def test_lam0_and_lam1_recovered_within_two_esds(sase_fit):
    params, r = sase_fit
    assert r.converged, r.message
    for name, truth in (("spectrum.lam0", TRUE_LAM0), ("spectrum.lam1", TRUE_LAM1)):
        assert r.esd[name] > 0 and abs(r.values[name] - truth) < 2 * r.esd[name], (name, r.values, r.esd)
    assert abs(r.values["scale"] - 1 / 1.2) < 2 * r.esd["scale"]
    # a 0.5 % band hardly tells a shift from a stretch; their sum, the mean wavelength, is sharp
    assert float(r.correlation[0, 1]) < -0.99
    mean, esd = r.parameters["spectrum_mean_A"], r.parameter_esd["spectrum_mean_A"]
    true_mean = TRUE_LAM0 + TRUE_LAM1 * float(params.beam.wavelength)
    assert 0 < esd < 1e-4 and abs(mean - true_mean) < 2 * esd
    assert mean == pytest.approx(r.values["spectrum.lam0"] + r.values["spectrum.lam1"] * float(params.beam.wavelength),
                                 rel=1e-13)


def test_values_esds_and_json_keys(sase_fit):
    params, r = sase_fit
    d = json.loads(r.to_json())
    assert d["units"]["spectrum.lam0"] == "Å" and d["units"]["spectrum.lam1"] == ""
    assert d["flags"]["spectrum.lam0"] == d["flags"]["spectrum.lam1"] == "-spectrum"
    assert d["parameters"]["spectrum_lam0_A"] == pytest.approx(r.values["spectrum.lam0"], rel=1e-12)
    assert d["parameters"]["spectrum_lam1"] == pytest.approx(r.values["spectrum.lam1"], rel=1e-12)
    assert d["esd"]["spectrum_lam0_A"] == pytest.approx(r.esd["spectrum.lam0"], rel=1e-6)
    assert d["esd"]["spectrum_lam1"] == pytest.approx(r.esd["spectrum.lam1"], rel=1e-6)
    assert d["parameters"]["wavelength_A"] == pytest.approx(r.values["spectrum.lam1"] * float(params.beam.wavelength),
                                                            rel=1e-12)
    assert "spectrum.lam0" in r.summary() and "spectrum.lam1" in r.summary()
    # a moved spectrum needs a .lam file: without one, no flags, and a note says how to write it
    assert d["nanobragg_args"] is None and any("--out-spectrum" in n and "spectrum.lam0" in n for n in d["notes"])


def _resimulated(flags):
    p, s = nbtorch.from_nanobragg_args(flags, dtype=torch.float64)
    return nbtorch.simulate(p, s, fused=False)


def test_refined_spectrum_written_as_a_lam_file_resimulates_the_model(sase_fit, tmp_path):
    """write_spectrum + the flags naming it (-spectrum OUT.lam) give the refined model image to 1e-9; the file's
    channels are lam0 + lam1·λ of the starting ones, with their weights."""
    params, r = sase_fit
    out = tmp_path / "refined.lam"
    r.write_spectrum(str(out))
    flags = r.to_nanobragg_args(spectrum_path=str(out))
    assert flags[flags.index("-spectrum") + 1] == str(out) and "-lambda" not in flags
    model = r.model_image()
    assert float((_resimulated(flags) - model).abs().max()) <= 1e-9 * float(model.max())
    lam, w = read_lam(out)
    start, w0 = _sase(20)
    lam0, lam1 = r.values["spectrum.lam0"], r.values["spectrum.lam1"]
    np.testing.assert_allclose(lam, lam0 + lam1 * start, rtol=1e-13)
    np.testing.assert_allclose(w, w0 / w0.sum(), rtol=1e-13)
    # the JSON of a result that knows where its spectrum goes carries those flags
    d = json.loads(dataclasses.replace(r, spectrum_path=str(out)).to_json())
    assert d["nanobragg_args"] == flags


def test_refined_spectrum_from_flags_with_divergence_keeps_the_directions(tmp_path):
    """A -spectrum beam with divergence (every direction × every channel): λ0 refined (wavelength) moves the
    spectrum; the written file and the starting flags' divergence re-simulate the model; without a file no flags."""
    lam, w = _sase(6)
    write_lam(tmp_path / "start.lam", lam, w)
    flags = (STILL.replace(" -lambda 1", "").replace("-detpixels 48", "-detpixels 24") +
             f" -spectrum {tmp_path / 'start.lam'} -divergence 0.2 -divsteps 2")
    params, setup = nbtorch.from_nanobragg_args(flags, dtype=torch.float64)
    assert setup.n_sources == 6 * 4
    true = with_beam(params, wavelength=params.beam.wavelength * 1.001)
    observed = nbtorch.simulate(true, setup, fused=False)
    r = refine.fit(observed, params, setup, ["wavelength", "scale"], nanobragg_args=flags, coarse_to_fine=False,
                   fused=False, max_iter=3)
    with pytest.raises(ValueError, match="--out-spectrum"):
        r.to_nanobragg_args()
    out = tmp_path / "out.lam"
    r.write_spectrum(str(out))
    again = r.to_nanobragg_args(spectrum_path=str(out))
    assert "-divergence" in again and "-spectrum_bins" not in again
    model = r.model_image()
    assert float((_resimulated(again) - model).abs().max()) <= 1e-9 * float(model.max())


def test_command_line_writes_the_refined_spectrum(tmp_path, monkeypatch):
    """nbtorch-refine --out-spectrum OUT.lam writes the refined channels and the JSON flags name the file."""
    from refine.cli import main as refine_main
    monkeypatch.chdir(tmp_path)
    lam, w = _sase(5)
    write_lam(tmp_path / "start.lam", lam, w)
    small = STILL.replace(" -lambda 1", "").replace("-detpixels 48", "-detpixels 32").replace("-pixel 0.2",
                                                                                               "-pixel 0.3")
    flags = (small + " -spectrum start.lam").split()
    params, setup = nbtorch.from_nanobragg_args(flags, dtype=torch.float64)
    true = with_beam(params, spectrum_shift=torch.tensor(0.001, dtype=torch.float64))
    noisy = torch.poisson(nbtorch.simulate(true, setup, fused=False), generator=torch.Generator().manual_seed(2))
    write_raw_float("obs.bin", noisy.numpy().astype(np.float32))
    assert refine_main(["obs.bin", *flags, "--refine", "spectrum.lam0,scale", "--quiet", "--json", "fit.json",
                        "--out-spectrum", "out.lam"]) == 0
    d = json.loads((tmp_path / "fit.json").read_text())
    args = d["nanobragg_args"]
    assert args[args.index("-spectrum") + 1] == "out.lam"
    got, _ = read_lam(tmp_path / "out.lam")
    np.testing.assert_allclose(got, lam + d["values"]["spectrum.lam0"], rtol=1e-12)
    assert abs(d["values"]["spectrum.lam0"] - 0.001) < 3 * d["value_esd"]["spectrum.lam0"]


def test_each_line_of_an_image_list_carries_its_own_spectrum(tmp_path):
    """``-spectrum FILE.lam`` on a LIST line (read from the LIST's folder) gives that image's model its channels, and
    a joint fit refines each shot's shift on its own spectrum."""
    (tmp_path / "spectra").mkdir()
    small = STILL.replace("-detpixels 48", "-detpixels 32").replace("-pixel 0.2", "-pixel 0.3")
    small = small.replace(" -lambda 1", "")  # each line's spectrum gives lambda0
    shots, lines = [], []
    for k, n in enumerate((4, 7)):
        lam, w = _sase(n, seed=k)
        write_lam(tmp_path / "spectra" / f"shot{k}.lam", lam, w)
        p, s = with_spectrum(*nbtorch.from_nanobragg_args(f"{small} -lambda 1", dtype=torch.float64), lam, w)
        true = with_beam(p, spectrum_shift=torch.tensor(0.001 * (k + 1), dtype=torch.float64))
        noisy = torch.poisson(nbtorch.simulate(true, s, fused=False), generator=torch.Generator().manual_seed(k))
        write_raw_float(str(tmp_path / f"shot{k}.bin"), noisy.numpy().astype(np.float32))
        lines.append(f"shot{k}.bin -spectrum spectra/shot{k}.lam")
        shots.append((p, s))
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    entries = parse_image_list(str(tmp_path / "list.txt"), small.split())
    observed, params, setups = load_entries(entries)
    for k, (p, s) in enumerate(shots):
        assert setups[k].n_sources == (4, 7)[k]
        assert [f for _, f in setups[k].sources] == pytest.approx([f for _, f in s.sources], rel=1e-14)
        assert setups[k].normalised_source_weights == pytest.approx(s.normalised_source_weights, rel=1e-14)
        assert float(params[k].beam.wavelength) == pytest.approx(float(p.beam.wavelength), rel=1e-14)
        torch.testing.assert_close(nbtorch.simulate(params[k], setups[k], fused=False),
                                   nbtorch.simulate(p, s, fused=False), rtol=1e-12, atol=0)
    r = refine.fit_many([np.asarray(o.data) for o in observed], params, setups,
                        per_image=["spectrum.lam0", "scale"], fused=False)
    for k, im in enumerate(r.images):
        assert abs(im.values["spectrum.lam0"] - 0.001 * (k + 1)) < 2 * im.esd["spectrum.lam0"] < 2e-3, im.values
