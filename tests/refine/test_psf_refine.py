"""The detector's point-spread function in refine (issue 22, item 2): the model at chosen pixels equals the whole
blurred image (nbtorch.psf.apply_psf) read there, for both profiles, both forms of the blur and a panel detector;
gradients with respect to the FWHM match finite differences (reverse mode, forward-mode normal equations, vmapped
batches); the FWHM is recovered from a blurred noisy still; without a PSF nothing changes; the refined -psf flags
re-simulate the model; psf_fwhm_um is reported; its near degeneracy with ncells/mosaic is noted."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import nbtorch
import refine
import refine.model.degeneracy as degeneracy
import refine.model.psf as psfmod
from nbtorch.args import build, parse_args
from nbtorch.detector import with_panels
from nbtorch.panels import PanelSpec, make_layout
from nbtorch.psf import apply_psf, psf_kernel
from nbtorch.simulate import simulate_pixels
from refine.model.degeneracy import near_degenerate_notes
from refine.model.parameters import parameterise
from refine.model.predict import make_predict, predict_image
from refine.model.psf import point_spread
from refine.pipeline.options import psf_options
from refine.pipeline.problem import start_point
from refine.targets import Objective, make_target

#: 64×64 pixels of 0.1 mm at 60 mm: sharp spots (peaks ~9000 photons) a PSF of 1–2 pixels visibly widens.
FLAGS = ("-default_F 100 -cell 40 50 60 90 90 90 -misset 10 20 30 -N 6 -lambda 1 -distance 60 -pixel 0.1 "
         "-detpixels 64 -oversample 1 -fluence 1e30")
PIXEL_MM = 0.1
#: The truth: a Gaussian of 1.5 pixels FWHM.
FWHM, RADIUS = 150.0, 3


@pytest.fixture(scope="module")
def still():
    """(params, setup, noiseless unblurred image [64, 64])."""
    params, setup = nbtorch.from_nanobragg_args(FLAGS, dtype=torch.float64)
    return params, setup, nbtorch.simulate(params, setup, fused=False)


@pytest.fixture(scope="module")
def blurred_fit(still):
    """(truth image, observed, result) of a fit of psf, scale and a constant background from a start FWHM 30 % high
    to a Gaussian-blurred Poisson still on 2 photons of background."""
    params, setup, image = still
    truth = apply_psf(image, psf_kernel("gauss", FWHM, PIXEL_MM, RADIUS)) + 2.0
    observed = torch.poisson(truth, generator=torch.Generator().manual_seed(3))
    result = refine.fit(observed, params, setup, free=["psf", "scale", "background.constant"], psf="gauss",
                        psf_fwhm=1.3 * FWHM, psf_radius=RADIUS, coarse_to_fine=False, fused=False)
    return truth, observed, result


def _random_pixels(setup, n, seed=0):
    return np.sort(np.random.default_rng(seed).choice(setup.n_pixels, n, replace=False))


@pytest.mark.parametrize("kind, fwhm, radius", [("gauss", 150.0, 3), ("fiber", 60.0, 20)])
@pytest.mark.parametrize("dense", [False, True])
def test_model_at_chosen_pixels_is_the_blurred_image_read_there(still, kind, fwhm, radius, dense):
    params, setup, image = still
    par = parameterise(params, setup, ["psf"], psf=point_spread(kind, fwhm, setup, radius))
    idx = _random_pixels(setup, 300)
    model = make_predict(par, setup, idx, fused=False)
    model.blur = psfmod.PixelBlur(par.psf, setup, idx, dense=dense)
    want = apply_psf(image, psf_kernel(kind, fwhm, PIXEL_MM, radius)).reshape(-1)[idx]
    got = model(par.zeros())
    assert float((got - want).abs().max()) <= 1e-10 * float(want.max())
    # the blur moves photons: the unblurred pixels differ by far more than that
    assert float((image.reshape(-1)[idx] - want).abs().max()) > 0.05 * float(want.max())


def test_panel_detector_blurs_each_panel_on_its_own(still):
    """Two panels of different sizes side by side: the model on every pixel the panels have equals apply_psf per
    panel within its extent (photons do not cross from one panel to the other, nor into the smaller one's
    padding), in both forms of the blur."""
    del still
    flags = ("-default_F 100 -cell 40 50 60 90 90 90 -misset 10 20 30 -N 6 -lambda 1 -oversample 1 -fluence 1e30 "
             "-beam_vector 0 0 1 -polar_vector 1 0 0 -fdet_vector 1 0 0 -sdet_vector 0 1 0 -odet_vector 0 0 1 "
             "-distance 60 -detpixels 8 -pixel 0.1")
    step_f, step_s = (PIXEL_MM, 0.0, 0.0), (0.0, PIXEL_MM, 0.0)
    panels = [PanelSpec("a", (-3.3, -2.0, 60.0), step_f, step_s, 32, 40),
              PanelSpec("b", (0.0, -2.0, 60.0), step_f, step_s, 24, 28)]
    p2, s2 = with_panels(*nbtorch.from_nanobragg_args(flags, dtype=torch.float64),
                         make_layout(panels, {"all": ["a", "b"]}, "all"))
    image = nbtorch.simulate(p2, s2, fused=False)
    extent = torch.as_tensor(np.asarray(nbtorch.pixels.panel_extent_mask(s2)))
    kernel = psf_kernel("gauss", 250.0, PIXEL_MM, 4)
    want = torch.stack([apply_psf(image[k], kernel, extent[k]) for k in range(2)]).reshape(-1)
    par = parameterise(p2, s2, ["psf"], psf=point_spread("gauss", 250.0, s2, 4))
    idx = np.flatnonzero(extent.reshape(-1).numpy())
    for dense in (False, True):
        model = make_predict(par, s2, idx, fused=False)
        model.blur = psfmod.PixelBlur(par.psf, s2, idx, dense=dense)
        got = model(par.zeros())
        assert float((got - want[idx]).abs().max()) <= 1e-10 * float(want.max())
    edge = image[0, :, -1].sum() - apply_psf(image[0], kernel, extent[0])[:, -1].sum()
    assert float(edge) > 0  # photons spread off panel a's edge are lost, not moved onto panel b


@pytest.mark.parametrize("kind, fwhm, radius", [("gauss", FWHM, RADIUS), ("fiber", 60.0, 12)])
def test_loss_gradient_and_normal_equations_wrt_fwhm_match_finite_differences(still, kind, fwhm, radius):
    params, setup, image = still
    observed = torch.poisson(apply_psf(image, psf_kernel(kind, fwhm, PIXEL_MM, radius)) + 1.0,
                             generator=torch.Generator().manual_seed(1))
    idx = _random_pixels(setup, 1000)
    par = parameterise(params, setup, ["psf", "scale"], psf=point_spread(kind, 1.2 * fwhm, setup, radius))
    obj = Objective(par, observed, idx, make_target("poisson"), chunk_pixels=600, fused=False)
    j = par.index("psf")[0]
    x = par.zeros() + 0.01
    h = 1e-5
    e = torch.zeros_like(x)
    e[j] = h
    fd = (obj.loss(x + e) - obj.loss(x - e)) / (2 * h)
    L, g = obj.loss_and_grad(x)
    assert abs(float(g[j]) - fd) <= 1e-6 * abs(fd) + 1e-6
    assert abs(fd) > 1.0  # the FWHM matters to the loss
    L2, g2, H, _ = obj.normal_equations(x)  # forward mode (jacfwd through the kernel)
    assert L2 == pytest.approx(L, rel=1e-10)
    assert torch.allclose(g2, g, rtol=1e-9, atol=1e-9)
    assert float(H[j, j]) > 0
    # the model's derivative itself, by forward mode against central differences
    model = make_predict(par, setup, idx, fused=False)
    jac = torch.func.jacfwd(model)(x)[:, j]
    fd_m = (model(x + e) - model(x - e)) / (2 * h)
    assert torch.allclose(jac, fd_m, rtol=1e-6, atol=1e-6 * float(fd_m.abs().max()))


def test_batched_images_with_a_psf_equal_one_at_a_time(still, monkeypatch):
    """Two images vmapped in one group give the loss and gradient of one image at a time, in the gather form and
    the dense (FFT) form of the blur."""
    params, setup, image = still
    truth = apply_psf(image, psf_kernel("gauss", FWHM, PIXEL_MM, RADIUS))
    obs = [torch.poisson(truth + 1.0, generator=torch.Generator().manual_seed(s)) for s in (4, 5)]
    idx = _random_pixels(setup, 400, seed=2)
    pars = [parameterise(params, setup, ["psf", "scale"], psf=point_spread("gauss", 1.2 * FWHM, setup, RADIUS))
            for _ in obs]
    X = torch.tensor([0.02, -0.01, -0.03, 0.015], dtype=torch.float64)
    out = {}
    for dense_limit in (psfmod.GATHER_LIMIT, 0):
        monkeypatch.setattr(psfmod, "GATHER_LIMIT", dense_limit)
        for batch in (True, False):
            obj = Objective(pars, obs, [idx, idx], make_target("poisson"), chunk_pixels=400, fused=False,
                            batch=batch)
            assert len(obj.groups) == (1 if batch else 2)
            L, g = obj.loss_and_grad(X)
            out[dense_limit, batch] = (L, g, obj.normal_equations(X)[1])
    L0, g0, n0 = out[psfmod.GATHER_LIMIT, False]
    for L, g, gn in out.values():
        assert L == pytest.approx(L0, rel=1e-10)
        assert torch.allclose(g, g0, rtol=1e-9, atol=1e-9)
        assert torch.allclose(gn, g0, rtol=1e-9, atol=1e-9)


def test_fwhm_is_recovered_from_a_blurred_noisy_still(blurred_fit):
    _, _, result = blurred_fit
    fwhm, esd = result.values["psf"], result.esd["psf"]
    assert result.converged
    assert 0 < esd < 0.02 * FWHM
    assert abs(fwhm - FWHM) <= 2 * esd, (fwhm, esd)
    assert abs(fwhm - FWHM) <= 0.01 * FWHM  # and close: it started 30 % off
    assert result.chi2_nu == pytest.approx(1.0, abs=0.05)


def test_refined_psf_in_the_model_image_and_a_resumed_start(blurred_fit, still):
    truth, _, result = blurred_fit
    params, setup, _ = still
    image = predict_image(result.par, result.x, fused=False)  # the refined model image is blurred too
    assert float((image - truth).abs().max()) <= 0.02 * float(truth.max())
    x = start_point(result.par, result)
    assert torch.allclose(x, result.x, rtol=0, atol=1e-10)


def test_without_a_psf_nothing_changes(still):
    """No PSF: no blur object and the model is simulate_pixels' bit for bit; a kernel of radius 0 (one pixel, all the
    photons) fits exactly as no PSF."""
    params, setup, image = still
    par = parameterise(params, setup, ["scale"])
    assert par.psf is None and par.psf_fwhm(par.zeros()) is None
    idx = _random_pixels(setup, 400)
    model = make_predict(par, setup, idx, fused=False)
    assert model.blur is None
    assert torch.equal(model(par.zeros()), simulate_pixels(params, setup, idx, fused=False))
    observed = torch.poisson(image * 0.8 + 1.0, generator=torch.Generator().manual_seed(2))
    kw = dict(free=["scale", "background.constant"], coarse_to_fine=False, fused=False)
    plain = refine.fit(observed, params, setup, **kw)
    one = refine.fit(observed, params, setup, psf="gauss", psf_fwhm=10.0, psf_radius=0, **kw)
    assert torch.allclose(one.x, plain.x, rtol=0, atol=1e-10)
    assert one.loss == pytest.approx(plain.loss, rel=1e-10)


@pytest.mark.parametrize("kw, message", [
    (dict(free=["psf"]), "psf can only be refined with a point-spread function"),
    (dict(psf_fwhm=100.0), "psf_fwhm needs psf="),
    (dict(psf="box", psf_fwhm=100.0), "psf must be one of"),
    (dict(psf="gauss"), "psf_fwhm must be"),
    (dict(psf="gauss", psf_fwhm=-1.0), "psf_fwhm must be"),
    (dict(psf="gauss", psf_fwhm=100.0, psf_radius=1.5), "psf_radius must be"),
    (dict(psf="fiber", psf_fwhm=200.0), "give psf_radius"),
])
def test_bad_psf_options_are_one_line_errors(still, kw, message):
    params, setup, image = still
    with pytest.raises(ValueError, match=message) as err:
        refine.fit(image, params, setup, coarse_to_fine=False, max_iter=0, fused=False, **kw)
    assert "\n" not in str(err.value)


def test_psf_flags_give_the_fit_options(still):
    """nbtorch's -psf flags (build's Extras.outputs, radius resolved) become the fit's options; none without -psf."""
    params, setup, _ = still
    _, _, extras = build(parse_args(FLAGS + " -psf fiber -psf_fwhm 40"), dtype=torch.float64)
    kw = psf_options(extras.outputs)
    assert kw == dict(psf="fiber", psf_fwhm=40.0, psf_radius=extras.outputs.psf_radius)
    assert kw["psf_radius"] > 0
    assert refine.FitOptions(**kw).psf == "fiber"
    assert psf_options(build(parse_args(FLAGS), dtype=torch.float64)[2].outputs) == {}


def test_two_images_share_one_fwhm(still):
    """fit_many with a shared psf (each image its own scale): one FWHM for both, within 2 ESDs of the truth."""
    params, setup, image = still
    truth = apply_psf(image, psf_kernel("gauss", FWHM, PIXEL_MM, RADIUS))
    obs = [torch.poisson(truth * f, generator=torch.Generator().manual_seed(k)) for k, f in enumerate((1.0, 0.7))]
    joint = refine.fit_many(obs, [params, params], setup, shared=["psf"], per_image=["scale"], psf="gauss",
                            psf_fwhm=1.25 * FWHM, psf_radius=RADIUS, coarse_to_fine=False, fused=False)
    assert joint.converged
    assert abs(joint.shared["psf"] - FWHM) <= 2 * joint.shared_esd["psf"]
    assert [im.values["psf"] for im in joint.images] == [joint.shared["psf"]] * 2
    assert joint.images[1].values["scale"] == pytest.approx(0.7, rel=0.02)


def test_an_roi_keeps_a_margin_of_the_kernel_radius(still):
    """With an ROI the pixels just outside it are rendered too: the model on the ROI equals the whole detector's
    blurred image there (photons from outside the ROI blur into it), not the blur of the ROI alone."""
    params, setup, image = still
    p_roi, s_roi = nbtorch.from_nanobragg_args(FLAGS + " -roi 20 40 10 30", dtype=torch.float64)
    par = parameterise(p_roi, s_roi, ["psf"], psf=point_spread("gauss", 200.0, s_roi, 4))
    model = make_predict(par, s_roi, None, fused=False)
    idx = model.index.numpy()
    assert len(idx) == 21 * 21 and len(model.blur.source) == 29 * 29
    kernel = psf_kernel("gauss", 200.0, PIXEL_MM, 4)
    want = apply_psf(image, kernel).reshape(-1)[idx]
    got = model(par.zeros())
    assert float((got - want).abs().max()) <= 1e-10 * float(want.max())
    roi_only = apply_psf(nbtorch.simulate(p_roi, s_roi, fused=False), kernel).reshape(-1)[idx]
    assert float((roi_only - want).abs().max()) > 1e-3 * float(want.max())


def test_command_line_psf_flags_refine_the_fwhm(tmp_path, monkeypatch):
    from nbtorch import cli as sim_cli
    from refine.cli import main as refine_main
    monkeypatch.chdir(tmp_path)
    base = ("-default_F 100 -cell 40 50 60 90 90 90 -N 8 -misset 10 20 30 -lambda 1 -distance 60 -detpixels 64 "
            "-pixel 0.1 -psf gauss -fluence 5e29").split()
    assert sim_cli.main(base + ["-psf_fwhm", "150", "-noisefile", "obs.img", "-seed", "3", "-nopgm", "-noprogress",
                                "-floatfile", "f.bin", "-intfile", "i.img"]) == 0
    assert refine_main(["obs.img", *base, "-psf_fwhm", "110", "-psf_radius", "5", "--refine", "psf,scale",
                        "--quiet", "--json", "fit.json"]) == 0
    res = json.loads((tmp_path / "fit.json").read_text())
    fwhm, esd = res["values"]["psf"], res["value_esd"]["psf"]
    assert abs(fwhm - 150.0) < max(3 * esd, 1.5)


def test_refined_psf_flags_resimulate_the_model_image(blurred_fit, still):
    """The result's flags carry -psf KIND -psf_fwhm (refined) -psf_radius; nbtorch's blur of the flags' image (as
    build reads them) plus the refined background plane is the refined model image to 1e-9."""
    _, _, result = blurred_fit
    flags = result.to_nanobragg_args()
    k = flags.index("-psf")
    assert flags[k: k + 6] == ["-psf", "gauss", "-psf_fwhm", flags[k + 3], "-psf_radius", str(RADIUS)]
    assert float(flags[k + 3]) == result.values["psf"] and float(flags[k + 3]) != 1.3 * FWHM
    assert json.loads(result.to_json())["nanobragg_args"] == flags
    params, setup, extras = build(parse_args(flags), dtype=torch.float64)
    o = extras.outputs
    assert (o.psf, o.psf_fwhm, o.psf_radius) == ("gauss", result.values["psf"], RADIUS)
    again = apply_psf(nbtorch.simulate(params, setup, fused=False),
                      psf_kernel(o.psf, o.psf_fwhm, setup.pixel_size, radius=o.psf_radius))
    model = predict_image(result.par, result.x, fused=False)
    again = again + result.parameters["background"][0]
    assert float((again - model).abs().max()) <= 1e-9 * float(model.max())


def test_psf_fwhm_is_reported_with_its_esd(blurred_fit, still):
    _, _, result = blurred_fit
    assert result.parameters["psf_fwhm_um"] == pytest.approx(result.values["psf"], rel=1e-12)
    assert result.parameter_esd["psf_fwhm_um"] == pytest.approx(result.esd["psf"], rel=1e-6)
    d = json.loads(result.to_json())
    assert d["parameters"]["psf_fwhm_um"] == pytest.approx(result.values["psf"], rel=1e-12)
    params, setup, image = still
    plain = refine.fit(image, params, setup, free=["scale"], coarse_to_fine=False, max_iter=1, fused=False)
    assert plain.parameters["psf_fwhm_um"] == 0.0 and plain.parameter_esd["psf_fwhm_um"] == 0.0


def test_near_degenerate_notes_from_the_correlation():
    names = ["ncells.a", "ncells.b", "mosaic", "scale", "psf"]
    corr = np.eye(5)
    corr[0, 4] = corr[4, 0] = -0.95
    corr[2, 4] = corr[4, 2] = 0.85
    corr[0, 3] = corr[3, 0] = 0.99  # not a pair of NEAR_PAIRS
    (note,) = near_degenerate_notes(names, corr)
    assert note.startswith("psf and ncells.a are nearly degenerate (correlation -0.950: both widen every spot)")
    assert len(near_degenerate_notes(names, corr, threshold=0.8)) == 2  # psf with mosaic at 0.85 too
    assert near_degenerate_notes(["psf", "scale"], np.eye(2)) == []


def test_a_fit_notes_psf_near_degeneracy(monkeypatch):
    """A fit of psf with ncells notes the pair exactly when |corr| exceeds NEAR_CORRELATION (in notes, the summary
    and the JSON)."""
    flags = FLAGS.replace("-N 6", "-N 20").replace("-detpixels 64", "-detpixels 48").replace("1e30", "1e29")
    params, setup = nbtorch.from_nanobragg_args(flags, dtype=torch.float64)
    truth = apply_psf(nbtorch.simulate(params, setup, fused=False), psf_kernel("gauss", FWHM, PIXEL_MM, RADIUS))
    observed = torch.poisson(truth + 2.0, generator=torch.Generator().manual_seed(3))
    kw = dict(free=["psf", "ncells", "scale", "background.constant"], psf="gauss", psf_fwhm=1.2 * FWHM,
              psf_radius=RADIUS, coarse_to_fine=False, fused=False)
    r = refine.fit(observed, params, setup, **kw)
    c = abs(float(r.correlation[r.names.index("psf"), r.names.index("ncells")]))
    assert (c > degeneracy.NEAR_CORRELATION) == any("nearly degenerate" in n for n in r.notes)
    monkeypatch.setattr(degeneracy, "NEAR_CORRELATION", c / 2)
    r = refine.fit(observed, params, setup, **kw)
    (note,) = [n for n in r.notes if "nearly degenerate" in n]
    assert note.startswith("psf and ncells are nearly degenerate (correlation ") and f"{c:.3f}: both widen" in note
    assert note in r.summary() and note in json.loads(r.to_json())["notes"]
