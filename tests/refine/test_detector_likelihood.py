"""A likelihood that knows the detector (issue 22 item 4): the Gaussian–Poisson target in the detector's units
(read-out noise σ_r in ADU, gain in ADU per photon, a number or a per-pixel map), the gain and trusted range from
the CrystFEL and DIALS files, and pixels outside the trusted range or saturated left out of every fit."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import nbtorch
import refine
from nbtorch.io.crystfel import read_geom
from nbtorch.io.dials import parse_expt
from nbtorch.io.images import write_raw_float
from nbtorch.io.smv import write_smv
from nbtorch.noise import DetectorNoise, detector_adu
from nbtorch.args import build, parse_args
from refine.cli.fit import _detector_file, main
from refine.pipeline.problem import fit_target
from refine.targets import make_target, usable_mask
from refine.targets.detector import from_crystfel, from_dials, read_noise_photons
from refine.targets.observed import read_observed

DATA = Path(__file__).resolve().parents[1] / "data" / "cli_panels"
#: 320×320 = 102 400 pixels of 0.2 mm at 60 mm: spots up to ~36 000 photons on ~1–3 photons of water.
BIG = ("-default_F 100 -cell 40 50 60 90 90 90 -misset 10 20 30 -N 6 -lambda 1 -distance 60 -pixel 0.2 "
       "-detpixels 320 -oversample 1 -fluence 1e30 -water 0.0025")
#: The same crystal on 48×48 pixels (fits).
SMALL = BIG.replace("-detpixels 320", "-detpixels 48 -pixel 0.5")
#: 160×160 pixels of 0.4 mm (a fit whose χ²/ν is known to ~1 %).
MEDIUM = BIG.replace("-detpixels 320", "-detpixels 160 -pixel 0.4")
GAIN, SIGMA_R, ADC = 2.0, 3.0, 40.0


@pytest.fixture(scope="module")
def big():
    """(params, setup, noiseless image [320, 320] photons)."""
    params, setup = nbtorch.from_nanobragg_args(BIG, dtype=torch.float64)
    return params, setup, nbtorch.simulate(params, setup, fused=False)


def _chi2_nu(target, model, observed, usable):
    w = target.pixel_weights(np.flatnonzero(usable), tuple(usable.shape))
    m, o = model.reshape(-1)[usable.reshape(-1)], observed.reshape(-1)[usable.reshape(-1)]
    return float(target.chi2_terms(m, o, w).sum()) / int(usable.sum())


def test_gaussian_poisson_chi2_is_one_on_1e5_pixels_with_3_adu_read_noise(big, tmp_path):
    """Gaussian–Poisson χ²/ν within 3 % of 1 on 10⁵ simulated pixels with σ_r = 3 ADU (gain 2 ADU/photon, ADC offset
    40 in the file): the file read in photons, the target's σ = σ_r/gain, every pixel usable (negative photons are
    read-out noise, not gaps); the Poisson statistic on the same photons is far from 1 (the test can fail)."""
    params, setup, image = big
    assert image.numel() >= 10**5
    adu, _ = detector_adu(image.numpy(), 11, DetectorNoise(gain=GAIN, readout_adu=SIGMA_R))
    path = tmp_path / "adu.bin"
    write_raw_float(str(path), (adu + ADC).astype(np.float32))
    obs = read_observed(str(path), setup, params, adc=ADC, gain=GAIN)
    assert obs.gain == GAIN and (obs.data < 0).mean() > 0.05  # background photons below zero
    options = refine.FitOptions(target="gaussian", readout_noise_adu=SIGMA_R)
    target = fit_target(options, obs.gain, obs.data.shape)
    assert target.read_noise == pytest.approx(SIGMA_R / GAIN)
    usable = usable_mask(obs.data, setup, lowest=target.lowest_observed(obs.data.shape)) & obs.mask
    assert usable.all()
    o = torch.as_tensor(obs.data)
    chi2 = _chi2_nu(target, image, o, usable)
    assert abs(chi2 - 1.0) < 0.03, chi2
    wrong = _chi2_nu(make_target("gaussian", read_noise=0.0), image, o, usable)  # read-out noise ignored
    assert wrong > 1.3, wrong


def test_gaussian_poisson_chi2_with_a_per_pixel_gain_map(big):
    """A per-pixel gain (noisify's static calibration error: gain·(1 + 0.2 g_pixel)): photons = ADU/gain_i and
    σ_i = σ_r/gain_i per pixel give χ²/ν within 3 % of 1 on 10⁵ pixels; one scalar gain for all does not."""
    params, setup, image = big
    noise = DetectorNoise(gain=GAIN, readout_adu=SIGMA_R, calibration=0.2, calib_seed=5)
    adu, _ = detector_adu(image.numpy(), 12, noise)
    gains = GAIN * np.maximum(0.0, 1.0 + 0.2 * np.random.default_rng(5).standard_normal(adu.shape))
    options = refine.FitOptions(target="gaussian", readout_noise_adu=SIGMA_R, gain=gains)
    target = fit_target(options, None, adu.shape)
    np.testing.assert_allclose(target.read_noise_map, SIGMA_R / gains)
    photons = torch.as_tensor(adu / gains)
    usable = usable_mask(photons.numpy(), setup, lowest=target.lowest_observed(adu.shape))
    assert usable.mean() > 0.999
    assert abs(_chi2_nu(target, image, photons, usable) - 1.0) < 0.03
    flat = fit_target(options.replace(gain=GAIN), None, adu.shape)
    assert abs(_chi2_nu(flat, image, torch.as_tensor(adu / GAIN), usable) - 1.0) > 0.3


def test_gaussian_poisson_fit_of_scale_reports_chi2_near_one(tmp_path):
    """A short fit of the scale from 5 % off: the truth within 3 ESDs, the reported χ²/ν within 3 % of 1, the
    summary saying the read-out noise in photons."""
    params, setup = nbtorch.from_nanobragg_args(MEDIUM, dtype=torch.float64)
    image = nbtorch.simulate(params, setup, fused=False)
    adu, _ = detector_adu(image.numpy(), 3, DetectorNoise(gain=GAIN, readout_adu=SIGMA_R))
    path = tmp_path / "adu.bin"
    write_raw_float(str(path), (adu + ADC).astype(np.float32))
    obs = read_observed(str(path), setup, params, adc=ADC, gain=GAIN)
    start, _ = nbtorch.from_nanobragg_args(MEDIUM.replace("1e30", "1.05e30"), dtype=torch.float64)
    res = refine.fit(obs, start, setup, free=("scale",), target="gaussian", readout_noise_adu=SIGMA_R,
                     coarse_to_fine=False, max_iter=5, fused=False)
    scale, esd = res.parameters["scale"], res.esd["scale"]
    assert abs(scale - 1 / 1.05) < 3 * esd
    assert abs(res.chi2_reduced - 1.0) < 0.03, res.chi2_reduced
    assert "read-out noise 3 ADU = 1.5 photons" in res.summary()


def test_gaussian_map_derivatives_and_backward_compatible_scalar():
    """With a map, dloss is ∂L/∂m and the per-pixel σ² enters every term; a map of one value equals the scalar
    target (which is today's gaussian with read_noise in photons)."""
    g = torch.Generator().manual_seed(0)
    m = torch.rand(50, generator=g, dtype=torch.float64) * 20 + 0.1
    o = m + torch.randn(50, generator=g, dtype=torch.float64) * 2
    sig = np.linspace(0.5, 3.0, 50).reshape(5, 10)
    t = make_target("gaussian", read_noise_map=sig)
    w = t.pixel_weights(np.arange(50), (5, 10))
    mm = m.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(t.loss(mm, o, w), mm)
    torch.testing.assert_close(t.dloss(m, o, w), auto)
    one = make_target("gaussian", read_noise_map=np.full((5, 10), 1.5))
    scalar = make_target("gaussian", read_noise=1.5)
    w1 = one.pixel_weights(np.arange(50), (5, 10))
    for f in ("loss_terms", "dloss", "fisher", "chi2_terms"):
        torch.testing.assert_close(getattr(one, f)(m, o, w1), getattr(scalar, f)(m, o))
    assert read_noise_photons(3.0, None) == 3.0 and read_noise_photons(3.0, 2.0) == 1.5
    assert math.isinf(read_noise_photons(3.0, np.array([[0.0, 2.0]]))[0, 0])  # a dead pixel is left out
    assert make_target("poisson").lowest_observed((2, 2)) == 0.0 and t.lowest_observed((5, 10)).shape == (5, 10)


@pytest.mark.parametrize("kw, message", [
    (dict(readout_noise_adu=3.0), "give target='gaussian'"),
    (dict(target="gaussian", readout_noise_adu=-1.0), "readout_noise_adu must be a number >= 0"),
    (dict(gain=0.0), "gain must be a number > 0"),
    (dict(gain=np.ones(4)), "per-pixel map of the image's shape"),
])
def test_detector_options_are_checked(kw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        refine.FitOptions(**kw)


def test_a_gain_map_of_another_shape_is_a_one_line_error():
    params, setup = nbtorch.from_nanobragg_args(SMALL, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"gain must be a number or a per-pixel map of the image's shape \[48, 48\]"):
        refine.fit(np.ones((48, 48)), params, setup, free=("scale",), target="gaussian", readout_noise_adu=3.0,
                   gain=np.ones((4, 4)), fused=False, max_iter=0)


def _smv_still(tmp_path, name, hot, header=()):
    """(path, params, setup, counts): a Poisson still of SMALL as 16-bit SMV with pixel (5, 7) set to ``hot``."""
    params, setup = nbtorch.from_nanobragg_args(SMALL, dtype=torch.float64)
    counts = torch.poisson(nbtorch.simulate(params, setup, fused=False), generator=torch.Generator().manual_seed(1))
    img = np.clip(counts.numpy(), 0, 65535).astype(np.uint16)
    img[5, 7] = hot
    path = tmp_path / name
    write_smv(path, img, list(header))
    return str(path), params, setup


def test_a_saturated_pixel_never_enters_a_fit(tmp_path):
    """SMV ``SATURATED_VALUE``: the pixel at or above it is marked saturated and left out, so a huge value there
    gives the very same fit as a plain one; read with the level lifted (--overload), the same pixel changes it."""
    header = [("SATURATED_VALUE", "60000")]
    plain, params, setup = _smv_still(tmp_path, "plain.img", 3, header)
    hot, _, _ = _smv_still(tmp_path, "hot.img", 65000, header)
    obs = read_observed(hot, setup, params)
    assert obs.saturated[5, 7] and not obs.mask[5, 7]
    np.testing.assert_array_equal(obs.saturated, obs.data >= 60000)  # bright spot peaks too
    keep = np.ones(obs.data.shape, dtype=bool)
    keep[5, 7] = False
    kw = dict(free=("scale",), coarse_to_fine=False, max_iter=4, fused=False)
    fits = [refine.fit(read_observed(p, setup, params, overload=over), params, setup, mask=m, **kw)
            for p, over, m in ((plain, None, keep), (hot, None, None), (hot, 70000.0, None))]
    r_plain, r_hot, r_used = (f.parameters["scale"] for f in fits)
    assert r_hot == pytest.approx(r_plain, rel=1e-12, abs=0)
    assert abs(r_used / r_plain - 1) > 1e-3


def _geometry(tmp_path, default: str, panels: str):
    """two_small.geom with its ``adu_per_photon = 1`` replaced by ``default`` and ``panels`` lines at its end."""
    text = (DATA / "two_small.geom").read_text().replace("adu_per_photon = 1\n", default) + panels
    path = tmp_path / "det.geom"
    path.write_text(text)
    geometry = read_geom(path)
    params, setup = nbtorch.from_nanobragg_args(f"-geom {path} -default_F 10 -N 2 -cell 40 50 60 90 90 90",
                                                dtype=torch.float64)
    return geometry, params, setup


def test_crystfel_gain_and_max_adu_per_panel(tmp_path):
    """``a/adu_per_photon = 2``, ``b/adu_per_eV`` (× 12398.42 eV = 4 ADU/photon), ``max_adu = 100``: photons are
    ADU/gain per panel, values above 100 ADU saturated; ``gain`` (the option) wins over the file."""
    per_eV = 4.0 / 12398.42
    geometry, params, setup = _geometry(tmp_path, "max_adu = 100\n",
                                        f"a/adu_per_photon = 2\nb/adu_per_eV = {per_eV!r}\n")
    resp = from_crystfel(geometry, setup, 12398.42)
    assert resp.gain.shape == (2, 6, 10) and resp.gain[0].max() == 2.0 and resp.gain[1].min() == pytest.approx(4.0)
    assert resp.trusted == (None, 100.0)
    slab = np.full((14, 10), 40.0, dtype=np.float32)
    slab[2, 3] = 101.0  # panel a, above max_adu
    slab[9, 4] = 100.0  # panel b, at max_adu: trusted
    path = tmp_path / "slab.bin"
    write_raw_float(str(path), slab)
    obs = read_observed(str(path), setup, params, geometry=geometry)
    assert obs.data[0, 0, 0] == 20.0 and obs.data[1, 0, 0] == pytest.approx(10.0)
    assert obs.saturated.sum() == 1 and obs.saturated[0, 2, 3] and not obs.mask[0, 2, 3]
    assert obs.mask[1].all()
    given = read_observed(str(path), setup, params, geometry=geometry, gain=5.0)
    assert given.gain == 5.0 and given.data[1, 0, 0] == 8.0


def test_dials_gain_and_trusted_range(tmp_path):
    """A ``.expt`` panel's ``gain`` and inclusive ``trusted_range``: values outside it leave the mask (above it
    saturated); the image header's GAIN wins over the file's gain."""
    raw = json.loads((DATA / "two_small.expt").read_text())
    for k, panel in enumerate(raw["detector"][0]["panels"]):
        panel["gain"], panel["trusted_range"] = 2.0 + k, [0.0, 500.0]
    detector = parse_expt(json.dumps(raw).encode(), "two_small.expt").detector_of(0)
    params, setup = nbtorch.from_nanobragg_args(f"-expt {DATA / 'two_small.expt'} -default_F 10 -N 2",
                                                dtype=torch.float64)
    resp = from_dials(detector, setup)
    assert resp.gain[0].max() == 2.0 and resp.gain[1].min() == 3.0 and resp.trusted == (0.0, 500.0)
    img = np.full((12, 10), 30.0, dtype=np.float32)
    img[1, 1], img[7, 2], img[8, 3] = 501.0, 500.0, -1.0
    path = tmp_path / "stack.img"
    write_smv(path, img, [])
    obs = read_observed(str(path), setup, params, detector=resp)
    assert obs.data[0, 0, 0] == 15.0 and obs.data[1, 0, 0] == 10.0
    assert obs.saturated[0, 1, 1] and not obs.mask[0, 1, 1] and obs.mask[1, 1, 2] and not obs.mask[1, 2, 3]
    headed = tmp_path / "gain.img"
    write_smv(headed, img, [("GAIN", "5")])
    assert read_observed(str(headed), setup, params, detector=resp).gain == 5.0


def test_cli_takes_the_response_of_its_detector_file(tmp_path):
    """``nbtorch-refine … -expt FILE`` / ``-geom FILE``: the file's gain and trusted range reach ``read_observed``."""
    raw = json.loads((DATA / "two_small.expt").read_text())
    raw["detector"][0]["panels"][1]["gain"] = 3.0
    expt = tmp_path / "g.expt"
    expt.write_text(json.dumps(raw))
    for flags in (["-expt", str(expt), "-default_F", "10", "-N", "2"],
                  ["-geom", str(DATA / "two_small.geom"), "-default_F", "10", "-N", "2", "-cell", "40", "50", "60",
                   "90", "90", "90"]):
        params, setup, extras = build(parse_args(flags), dtype=torch.float64)
        resp = _detector_file(extras.panels, setup, params)
        if flags[0] == "-expt":
            assert resp.gain[0].max() == 1.0 and resp.gain[1].min() == 3.0 and resp.trusted == (-1.0, 65535.0)
        else:
            assert resp.gain == 1.0 and resp.trusted == (None, None)
    assert _detector_file(None, setup, params) is None


def test_cli_gain_map_and_readout_noise(tmp_path, capsys):
    """``nbtorch-refine OBS --target gaussian --readout-noise-adu 3 --gain-map MAP``: the map divides the ADU and
    sets σ per pixel; ``--gain`` with ``--gain-map``, or ``--readout-noise-adu`` without the gaussian target, is a
    one-line usage error (exit 2)."""
    params, setup = nbtorch.from_nanobragg_args(SMALL, dtype=torch.float64)
    image = nbtorch.simulate(params, setup, fused=False).numpy()
    gains = np.linspace(1.5, 2.5, image.size).reshape(image.shape)
    rng = np.random.default_rng(4)
    adu = gains * rng.poisson(image) + SIGMA_R * rng.standard_normal(image.shape) + ADC
    obs, gmap = tmp_path / "obs.bin", tmp_path / "gain.bin"
    write_raw_float(str(obs), adu.astype(np.float32))
    write_raw_float(str(gmap), gains.astype(np.float32))
    base = [str(obs), "--refine", "scale", "--no-coarse", "--max-iter", "3", "--quiet", "--adc", str(ADC)]
    flags = SMALL.split()
    rc = main(base + ["--target", "gaussian", "--readout-noise-adu", "3", "--gain-map", str(gmap),
                      "--json", str(tmp_path / "fit.json")] + flags)
    out = capsys.readouterr().out
    assert rc == 0 and "gain per pixel (1.5–2.5 ADU/photon)" in out and "over a per-pixel gain map" in out
    assert abs(json.loads((tmp_path / "fit.json").read_text())["chi2_nu"] - 1.0) < 0.1
    for extra, message in ((["--gain", "2", "--gain-map", str(gmap)], "both give the gain"),
                           (["--readout-noise-adu", "3"], "--target gaussian")):
        assert main(base + extra + flags) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
