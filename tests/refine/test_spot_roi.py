"""Spot-ROI refinement (issue 21 item 3): boxes about observed spots (clipped at panel edges, merged where they
overlap, the strongest N), one background plane per region whose Jacobian columns are in closed form, and a fit on
the boxes that agrees with the whole-image fit within its ESDs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from torch.func import jacfwd

import nbtorch
from nbtorch.io.refl import table_from_columns
from nbtorch.panels import PanelSpec, make_layout
from nbtorch.detector import with_panels
import refine
from refine.model.parameters import parameterise
from refine.model.predict import make_predict
from refine.targets import make_target
from refine.targets.boxes import spot_boxes
from refine.targets.objective import Objective

from .refine_cases import indexing_start

#: Sparse spots: a small cell far from a fine-pixelled detector (about 11 spots on 128² pixels, boxes ~14 % of them).
FLAGS = ("-default_F 100 -cell 30 35 40 90 90 90 -misset 10 20 30 -N 8 -lambda 1 -distance 100 -pixel 0.1 "
         "-detpixels 128 -oversample 1 -fluence 1e30 -mosaic 0.05 -mosaic_domains 1")
FREE = ("cell", "orientation", "distance", "beam_center", "scale", "background")


def _setup(flags=FLAGS):
    return nbtorch.from_nanobragg_args(flags, dtype=torch.float64)


def _peaks(image: np.ndarray, fraction: float = 0.02) -> np.ndarray:
    """(fast, slow) pixel coordinates (centres, DIALS convention) [n, 2] of the local maxima above ``fraction`` of
    the image's maximum."""
    win = sliding_window_view(np.pad(image, 1), (3, 3))
    s, f = np.nonzero((image == win.max((-1, -2))) & (image > fraction * image.max()))
    return np.stack([f + 0.5, s + 0.5], 1)


# ------------------------------------------------------------------------------------------------ boxes

def test_box_is_centred_on_the_spot_pixel_and_clipped_at_the_edge():
    _, setup = _setup()
    b = spot_boxes(setup, np.array([[10.3, 20.7], [1.2, 126.9]]), roi_size=5)
    assert b.n == 2 and b.n_spots == 2
    s, f = np.nonzero(b.region == 0)
    assert (f.min(), f.max(), s.min(), s.max()) == (8, 12, 18, 22)
    s, f = np.nonzero(b.region == 1)  # at the corner: clipped to the detector
    assert (f.min(), f.max(), s.min(), s.max()) == (0, 3, 124, 127)
    assert np.allclose(b.centres[0], (10.5, 20.5)) and b.extent[0] == 5
    even = spot_boxes(setup, np.array([[10.3, 20.7]]), roi_size=4)  # the extra row and column after the spot
    s, f = np.nonzero(even.region == 0)
    assert (f.min(), f.max(), s.min(), s.max()) == (8, 11, 18, 21)


def test_overlapping_boxes_merge_into_one_region_and_touching_ones_do_not():
    _, setup = _setup()
    b = spot_boxes(setup, np.array([[10.5, 10.5], [14.5, 12.5], [30.5, 10.5], [35.5, 10.5]]), roi_size=5)
    assert b.n == 3  # the first two share pixels; the last two touch without overlapping
    assert b.region[10, 10] == b.region[12, 14] != b.region[10, 30]
    assert b.region[10, 30] != b.region[10, 35]
    assert int(b.mask.sum()) == 5 * 5 * 4 - 3 * 1  # the overlap (3 × 1 pixels) counted once


def test_boxes_on_panels_stay_on_their_panel():
    params, base = _setup("-default_F 1 -cell 30 30 30 90 90 90 -lambda 1 -distance 100 -pixel 0.1 -detpixels 32 "
                          "-beam_vector 0 0 1 -polar_vector 1 0 0 -fdet_vector 1 0 0 -sdet_vector 0 1 0 "
                          "-odet_vector 0 0 1")
    panels = [PanelSpec(f"p{k}", (-1.6 + 3.3 * k, -1.6, 100.0), (0.1, 0, 0), (0, 0.1, 0), 32, 32) for k in range(2)]
    params, setup = with_panels(params, base, make_layout(panels, {"all": ["p0", "p1"]}, "all"))
    table = table_from_columns({"xyzobs.px.value": np.array([[31.5, 5.5, 0.0], [0.5, 5.5, 0.0], [40.0, 5.0, 0.0]]),
                                "panel": np.array([0, 1, 1], dtype=np.uint64)})
    b = spot_boxes(setup, table, roi_size=5)
    assert b.n == 2 and b.n_given == 3 and b.n_spots == 2  # the third lies beyond panel 1's 32 pixels
    assert b.region.shape == (2, 32, 32)
    p, s, f = np.nonzero(b.region == 0)
    assert set(p) == {0} and f.max() == 31  # clipped at panel 0's edge, never spilling onto panel 1
    assert list(b.panels) == [0, 1]


def test_max_spots_keeps_the_strongest():
    _, setup = _setup()
    table = table_from_columns({"xyzobs.px.value": np.array([[10.5, 10.5, 0], [50.5, 50.5, 0], [90.5, 90.5, 0]],
                                                            dtype=float),
                                "intensity.sum.value": np.array([5.0, 500.0, 50.0])})
    b = spot_boxes(setup, table, roi_size=3, max_spots=2)
    assert b.n == 2 and b.region[10, 10] == -1 and b.region[50, 50] >= 0 and b.region[90, 90] >= 0


@pytest.mark.parametrize("kw, match", [(dict(roi_size=0), "roi_size"), (dict(roi_size=2.5), "roi_size"),
                                       (dict(max_spots=0), "max_spots")])
def test_bad_box_options_name_themselves(kw, match):
    _, setup = _setup()
    with pytest.raises(ValueError, match=match):
        spot_boxes(setup, np.array([[10.5, 10.5]]), **kw)


def test_no_spot_on_the_detector_is_one_line():
    _, setup = _setup()
    with pytest.raises(ValueError, match="none of the 2 spots lies on the detector"):
        spot_boxes(setup, np.array([[-3.0, 10.0], [500.0, 1.0]]))
    with pytest.raises(ValueError, match="xyzobs.px.value"):
        spot_boxes(setup, table_from_columns({"panel": np.zeros(2, dtype=np.uint64)}))


# ------------------------------------------------------------------------------------------------ Jacobian

def test_closed_form_plane_columns_equal_forward_mode():
    """H = JᵀWJ and g over every scalar (model and per-region planes) equal those of a J taken whole by jacfwd."""
    params, setup = _setup(FLAGS.replace("-detpixels 128", "-detpixels 48"))
    spots = np.array([[10.5, 12.5], [30.5, 30.5], [40.5, 8.5]])
    boxes = spot_boxes(setup, spots, roi_size=7)
    rng = np.random.default_rng(3)
    par = parameterise(params, setup, ("orientation", "scale", "background"), boxes=boxes,
                       background=rng.uniform(2, 6, size=(boxes.n, 3)))
    observed = torch.poisson(nbtorch.simulate(params, setup) + 4.0, generator=torch.Generator().manual_seed(1))
    target = make_target("poisson")
    obj = Objective(par, observed, boxes.mask, target, chunk_pixels=97)  # several chunks
    x = 0.01 * torch.as_tensor(rng.normal(size=par.n))
    _, blk, _ = obj.normal(x)
    H, g = blk.dense()
    model = make_predict(par, setup, boxes.mask)
    J = jacfwd(model)(x)
    m = model(x)
    o = observed.reshape(-1)[model.index]
    torch.testing.assert_close(H, J.T @ (target.fisher(m, o, None)[:, None] * J), rtol=1e-11, atol=1e-9)
    torch.testing.assert_close(g, J.T @ target.dloss(m, o, None), rtol=1e-11, atol=1e-9)
    assert sum(n.startswith("background.") for n in par.names) == 3 * boxes.n


# ------------------------------------------------------------------------------------------------ the fit

@pytest.fixture(scope="module")
def fits():
    """Whole-image and spot-ROI fits of one noisy still from an indexing-grade start."""
    truth, setup = _setup()
    image = nbtorch.simulate(truth, setup)
    observed = torch.poisson(image + 5.0, generator=torch.Generator().manual_seed(0))
    spots = _peaks(image.numpy())
    start = indexing_start(truth, setup, bc_px=(1.0, -0.8), distance_mm=0.5, angle_deg=0.2)
    whole = refine.fit(observed, start, setup, free=FREE, coarse_to_fine=False)
    roi = refine.fit(observed, start, setup, free=FREE, coarse_to_fine=False, spots=spots, roi_size=11)
    return whole, roi, spot_boxes(setup, spots, 11)


def test_roi_fit_agrees_with_the_whole_image_within_its_esds(fits):
    whole, roi, boxes = fits
    assert whole.converged and roi.converged
    assert roi.n_pixels == int(boxes.mask.sum()) < 0.2 * whole.n_pixels
    model = [n for n in whole.values if not n.startswith("background")]
    assert len(model) == 10  # 3 cell lengths (orthorhombic), 3 rotations, distance, 2 beam centre, scale
    for name in model:
        # the ROI's pixels are a subset of the whole image's: the difference is within the ROI fit's own ESD
        assert abs(roi.values[name] - whole.values[name]) <= 2 * roi.esd[name], name


def test_roi_report_has_every_region_plane(fits):
    _, roi, boxes = fits
    planes = roi.parameters["background_boxes"]
    assert len(planes) == boxes.n and all(len(p) == 3 for p in planes)
    assert len(roi.parameter_esd["background_boxes"]) == boxes.n
    c0 = np.array([p[0] for p in planes])
    assert np.all(np.abs(c0 - 5.0) < 1.0)  # the flat 5-photon background, region by region
    assert np.isclose(roi.parameters["background"][0], c0.mean())


def test_region_planes_stay_fixed_in_the_preliminary_stages():
    from refine.pipeline.options import FitOptions
    from refine.pipeline.problem import prepare
    from refine.pipeline.strategy import _active, _stage_pars, default_stages
    params, setup = _setup(FLAGS.replace("-detpixels 128", "-detpixels 48"))
    observed = torch.poisson(nbtorch.simulate(params, setup) + 4.0, generator=torch.Generator().manual_seed(1))
    state = prepare(observed, params, setup, FitOptions(free=FREE, spots=np.array([[10.5, 12.5], [30.5, 30.5]])))
    pb = state.problem
    plane = {j for j, n in enumerate(pb.par.names) if n.startswith("background.")}
    assert len(plane) == 6
    for stage in default_stages():
        active = set(_active(pb, _stage_pars(pb, stage), stage))
        assert (active & plane == set()) == stage.preliminary, stage.name
        if not stage.preliminary:
            assert plane <= active


def test_scale_prefit_keeps_the_background_when_the_joint_fit_wants_it_negative():
    """o = 2·m − 1 exactly: the linear fit of scale and constant asks for c = −1 photons; the pre-fit then fits the
    scale alone (a non-negative background) instead of making the model negative."""
    from refine.pipeline.search import prefit_scale
    params, setup = _setup(FLAGS.replace("-detpixels 128", "-detpixels 16"))
    par = parameterise(params, setup, ("scale", "background"))
    x = par.zeros()
    bragg = torch.linspace(0.5, 20.0, 50, dtype=torch.float64)
    background = torch.zeros(50, dtype=torch.float64)
    new = prefit_scale(par, x, 2.0 * bragg - 1.0, bragg, background)
    (i_s,), (i_c,) = par.index("scale"), par.index("background.constant")
    assert float(new[i_c]) == 0.0
    assert np.isclose(float(torch.exp(new[i_s])), float((2.0 * bragg - 1.0).sum() / bragg.sum()))
    good = prefit_scale(par, x, 2.0 * bragg + 1.0, bragg, background)  # c = +1: both fitted
    assert np.isclose(float(torch.exp(good[i_s])), 2.0) and np.isclose(float(good[i_c]), 1.0)


def test_a_preliminary_stage_whose_model_the_fit_finds_infinite_is_discarded(monkeypatch):
    """A robust stage may reach a model ≤ 0 where photons were seen (its target allows it; Poisson does not): the
    stage's result is discarded and the fit goes on from where the stage started."""
    from refine.minimise.lm import MinimizeResult
    from refine.pipeline import strategy
    from refine.pipeline.options import FitOptions
    from refine.pipeline.problem import prepare
    from refine.pipeline.stages import Stage
    params, setup = _setup(FLAGS.replace("-detpixels 128", "-detpixels 24"))
    observed = torch.poisson(nbtorch.simulate(params, setup) + 4.0, generator=torch.Generator().manual_seed(1))
    state = prepare(observed, params, setup, FitOptions(free=("scale", "background"), background=(4.0, 0.0, 0.0)))
    (i_c,) = state.problem.par.index("background.constant")
    bad = state.x.clone()
    bad[i_c] = -50.0  # a constant background of −46 photons: the model is negative where photons were seen
    monkeypatch.setattr(strategy, "_minimise", lambda *a, **k: MinimizeResult(bad, 0.0, True, "converged", 1, 1, []))
    after = strategy.run_stage(state, Stage("robust", target="anscombe", max_iter=3, preliminary=True))
    assert torch.equal(after.x, state.x) and "discarded" in after.stages[-1]["message"]
    assert np.isfinite(after.stages[-1]["loss_all"])


def test_region_planes_cannot_be_shared_between_images():
    params, setup = _setup(FLAGS.replace("-detpixels 128", "-detpixels 24"))
    observed = torch.poisson(nbtorch.simulate(params, setup) + 4.0, generator=torch.Generator().manual_seed(1))
    spots = np.array([[10.5, 12.5]])
    with pytest.raises(ValueError, match="shared background.*own background planes"):
        refine.fit_many([observed, observed], [params, params], setup, shared=("background",), per_image=("scale",),
                        spots=[spots, spots])
    with pytest.raises(ValueError, match="one spot list per image"):
        refine.fit_many([observed, observed], [params, params], setup, per_image=("scale",), spots=spots)
