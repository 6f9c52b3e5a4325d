"""Detectors of many panels: every panel rendered in one call equals nanoBragg's one-panel CUSTOM detector with the
same vectors (which the goldens pin to the C program), CrystFEL and DIALS descriptions of one detector give one
image, rigid-body motions of the hierarchy move the panels as stated, and their derivatives match finite
differences."""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import numpy as np
import pytest
import torch

import nbtorch
from nbtorch.detector import panel_frames, with_panels
from nbtorch.io.crystfel import read_geom
from nbtorch.io.dials import crystfel_to_dials_frame, parse_expt
from nbtorch.io.structure_files import detector_corner_resolution
from nbtorch.panels import PanelSpec, layout_from_crystfel, layout_from_dials, make_layout, panel_lab_vectors
from nbtorch.rotation import rot_xyz
from nbtorch.simulate import crystal_rotation, pixel_lab_positions, simulate_pixels
from nbtorch.types import Setup
from nbtorch.units import deg2rad

DATA = pathlib.Path(__file__).parents[1] / "data"
P = 0.2  # mm
CRYSTAL = "-default_F 100 -cell 50 60 70 90 95 90 -N 5 -lambda 1 -misset 10 20 30 -mosaic 0.2 -mosaic_domains 2"
BEAM_Z = "-beam_vector 0 0 1 -polar_vector 1 0 0 -polar 0.7"


def _panels():
    """Three panels around the beam at ~100 mm: one right-handed, one turned in plane, one left-handed (fast × slow
    towards the sample) and tilted."""
    c, s = math.cos(0.3), math.sin(0.3)
    return [PanelSpec("a", (-10.0, -12.0, 100.0), (P, 0.0, 0.0), (0.0, P, 0.0), 12, 10),
            PanelSpec("b", (6.0, -5.0, 101.0), (0.0, P, 0.0), (-P, 0.0, 0.0), 12, 10),
            PanelSpec("c", (-1.0, 6.0, 99.0), (-P, 0.0, 0.0), (0.0, P * c, P * s), 12, 10)]


def _layout():
    return make_layout(_panels(), {"all": ["g1", "c"], "g1": ["a", "b"]}, "all")


def _model(extra: str = "", dtype=torch.float64, layout=None):
    base = f"{CRYSTAL} {BEAM_Z} -fdet_vector 1 0 0 -sdet_vector 0 1 0 -odet_vector 0 0 1 -distance 100 " \
           f"-detpixels 8 -pixel {P} {extra}"
    params, setup = nbtorch.from_nanobragg_args(base, dtype=dtype)
    return with_panels(params, setup, layout or _layout())


def _custom_args(panel: PanelSpec, facing: float) -> str:
    """nanoBragg CUSTOM flags that put one panel where ``panel`` is: unit axes, the outward normal, and the beam
    pivot's distance and (Xbeam, Ybeam) solved from corner = −Xbeam·f − Ybeam·s + distance·beam."""
    f = np.array(panel.fast) / P
    s = np.array(panel.slow) / P
    o = np.cross(f, s) * facing
    xb, yb, dist = np.linalg.solve(np.stack([-f, -s, np.array([0.0, 0.0, 1.0])], 1), np.array(panel.corner))

    def v(x):
        return " ".join(repr(float(c)) for c in x)

    return (f"-fdet_vector {v(f)} -sdet_vector {v(s)} -odet_vector {v(o)} -distance {float(dist)!r} "
            f"-Xbeam {float(xb)!r} -Ybeam {float(yb)!r} -detpixels_f {panel.fpixels} -detpixels_s {panel.spixels} -pixel {P}")


@pytest.mark.parametrize("extra", ["", "-oversample 2 -detector_thick 80 -detector_thicksteps 2 -dmin 3"])
def test_each_panel_equals_a_custom_one_panel_simulation(extra):
    params, setup = _model(extra)
    image = nbtorch.simulate(params, setup, fused=False)
    assert image.shape == (3, 10, 12) and float(image.min()) > 0
    for k, panel in enumerate(setup.panels.panels):
        one_p, one_s = nbtorch.from_nanobragg_args(f"{CRYSTAL} {BEAM_Z} {extra} {_custom_args(panel, panel.facing)}",
                                                   dtype=torch.float64)
        assert one_s.convention == "CUSTOM"
        torch.testing.assert_close(image[k], nbtorch.simulate(one_p, one_s, fused=False), rtol=1e-11, atol=0)


def test_each_panel_with_its_own_sensor_equals_a_custom_one_panel_with_that_sensor():
    sensors = [(80.0, 1 / 150.0), (120.0, 1 / 400.0), (40.0, 1 / 90.0)]
    panels = [dataclasses.replace(p, thickness_um=t, mu_per_um=mu) for p, (t, mu) in zip(_panels(), sensors)]
    layout = make_layout(panels, {"all": ["g1", "c"], "g1": ["a", "b"]}, "all")
    params, setup = _model("-detector_thick 100 -detector_thicksteps 3 -oversample 2", layout=layout)
    bare_p, bare_s = _model(layout=layout)
    assert bare_s.has_sensor and bare_s.thickness_um == 0 and bare_s.thicksteps == 2
    image, bare = (nbtorch.simulate(*m, fused=False) for m in ((params, setup), (bare_p, bare_s)))
    for k, (panel, (t, mu)) in enumerate(zip(panels, sensors)):
        flags = f"{CRYSTAL} {BEAM_Z} -oversample 2 -detector_thick {t} -detector_abs {1 / mu} -detector_thicksteps 3"
        one_p, one_s = nbtorch.from_nanobragg_args(f"{flags} {_custom_args(panel, panel.facing)}", dtype=torch.float64)
        torch.testing.assert_close(image[k], nbtorch.simulate(one_p, one_s, fused=False), rtol=1e-11, atol=0)
        flags = f"{CRYSTAL} {BEAM_Z} -detector_thick {t} -detector_abs {1 / mu}"
        one_p, one_s = nbtorch.from_nanobragg_args(f"{flags} {_custom_args(panel, panel.facing)}", dtype=torch.float64)
        torch.testing.assert_close(bare[k], nbtorch.simulate(one_p, one_s, fused=False), rtol=1e-11, atol=0)
    half = [dataclasses.replace(p, thickness_um=t) for p, t in zip(_panels(), (80.0, None, None))]
    with pytest.raises(ValueError, match=r"panel 'b' has no sensor thickness while others have one"):
        with_panels(bare_p, bare_s, make_layout(half, {"all": ["a", "b", "c"]}, "all"))


def test_left_handed_panel_normal_points_away_from_the_sample():
    params, setup = _model()
    fr = panel_frames(params.detector, setup)
    centres = fr.pix0 + 0.5 * (12 * fr.fdet + 10 * fr.sdet) * P
    assert [p.facing for p in setup.panels.panels] == [1.0, 1.0, -1.0]
    assert bool(((fr.odet * centres).sum(-1) > 0).all()) and bool((fr.close > 0).all())


def test_pixels_and_solid_angle_follow_the_actual_steps():
    """Steps that are neither unit length nor orthogonal: pixel centres at corner + (f + ½)·fast + (s + ½)·slow and
    Ω = |fast × slow|·close/R³ (the image over the same crystal with Ω divided out is unchanged)."""
    skew = PanelSpec("skew", (-3.0, -2.0, 90.0), (0.21, 0.01, 0.0), (0.02, 0.19, 0.005), 6, 5)
    params, setup = nbtorch.from_nanobragg_args(f"{CRYSTAL} {BEAM_Z} -fdet_vector 1 0 0 -sdet_vector 0 1 0 "
                                                "-odet_vector 0 0 1 -distance 100 -detpixels 8 -pixel 0.2 -nopolar "
                                                "-oversample 1",
                                                dtype=torch.float64)
    params, setup = with_panels(params, setup, make_layout([skew], {"all": ["skew"]}, "all"))
    f, s = np.meshgrid(np.arange(6), np.arange(5))
    pos = pixel_lab_positions(params, setup, f.ravel(), s.ravel())[:, 0, 0]
    want = (np.array(skew.corner) + (f.ravel()[:, None] + 0.5) * np.array(skew.fast)
            + (s.ravel()[:, None] + 0.5) * np.array(skew.slow))
    np.testing.assert_allclose(pos.numpy(), want, rtol=1e-13)
    n = np.cross(skew.fast, skew.slow)
    area, unit_n = np.linalg.norm(n), n / np.linalg.norm(n)
    R = np.linalg.norm(want, axis=1)
    omega = area * (want @ unit_n) / R**3
    img = nbtorch.simulate(params, setup, fused=False).reshape(-1).numpy()
    ref_setup = setup.replace(point_pixel=True)  # Ω → 1/R² (R in m): the same sum with the plain distance factor
    ref = nbtorch.simulate(params, ref_setup, fused=False).reshape(-1).numpy() * (R * 1e-3) ** 2
    np.testing.assert_allclose(img, ref * omega, rtol=1e-11)


def test_unequal_panels_are_padded_and_a_mask_zeroes_pixels():
    panels = _panels()[:2] + [PanelSpec("small", (-1.0, 6.0, 99.0), (-P, 0.0, 0.0), (0.0, P, 0.0), 5, 4)]
    params, setup = _model()
    params, setup = with_panels(params, setup, make_layout(panels, {"all": ["a", "b", "small"]}, "all"))
    image = nbtorch.simulate(params, setup, fused=False)
    assert image.shape == (3, 10, 12)
    assert float(image[2, 4:].abs().max()) == 0 and float(image[2, :, 5:].abs().max()) == 0
    assert float(image[2, :4, :5].min()) > 0
    mask = np.ones(setup.image_shape, np.uint8)
    mask[1, 3, 4] = 0
    masked = nbtorch.simulate(params, setup.replace(mask=mask.tobytes()), fused=False)
    assert float(masked[1, 3, 4]) == 0
    keep = torch.from_numpy(mask.astype(bool))
    torch.testing.assert_close(masked[keep], image[keep], rtol=1e-13, atol=0)


def test_tiles_run_across_panel_boundaries():
    """One stream of tiles over every panel: a small tile budget (tiles that straddle panels) gives the same image;
    so does the compiled kernel."""
    params, setup = _model()
    whole = nbtorch.simulate(params, setup, fused=False)
    per = simulate_pixels(params, setup, [setup.n_pixels - 1], fused=False)  # the last panel's last pixel
    small = setup.replace(sample_budget=7 * 2 * setup.steps)
    torch.testing.assert_close(nbtorch.simulate(params, small, fused=False), whole, rtol=1e-12, atol=0)
    torch.testing.assert_close(nbtorch.simulate(params, setup, fused=True), whole, rtol=1e-10, atol=0)
    assert float(per[0]) == pytest.approx(float(whole[-1, -1, -1]), rel=1e-12)


def _rigid(v, centre, R, t):
    return centre + (R @ (v - centre)[..., None])[..., 0] + t


def test_group_motions_move_their_panels_about_the_group_centre():
    params, setup = _model()
    layout = setup.panels
    det = params.detector
    g1, a = layout.node_index("g1"), layout.node_index("a")
    shift = torch.zeros_like(det.group_shift)
    rot = torch.zeros_like(det.group_rotation)
    shift[g1] = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    rot[g1] = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    rot[a] = torch.tensor([0.0, 0.0, 3.0], dtype=torch.float64)
    moved = det._replace(group_shift=shift, group_rotation=rot)
    c0, f0, s0 = panel_lab_vectors(layout, det, setup.beam, setup.twotheta_axis)
    c1, f1, s1 = panel_lab_vectors(layout, moved, setup.beam, setup.twotheta_axis)
    Rg, Ra = rot_xyz(deg2rad(rot[g1])), rot_xyz(deg2rad(rot[a]))
    cg, ca = (torch.tensor(layout.nodes[i].centre, dtype=torch.float64) for i in (g1, a))
    want_a = _rigid(_rigid(c0[0], ca, Ra, 0.0), cg, Rg, shift[g1])  # inner group first, then its parent
    torch.testing.assert_close(c1[0], want_a, rtol=1e-14, atol=1e-12)
    torch.testing.assert_close(f1[0], Rg @ Ra @ f0[0], rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(c1[1], _rigid(c0[1], cg, Rg, shift[g1]), rtol=1e-14, atol=1e-12)
    torch.testing.assert_close((c1[2], f1[2], s1[2]), (c0[2], f0[2], s0[2]), rtol=0, atol=0)  # not in g1


def test_whole_detector_moves_like_the_beam_pivot():
    params, setup = _model()
    det = params.detector
    c0 = panel_lab_vectors(setup.panels, det, setup.beam, setup.twotheta_axis)[0]
    moved = det._replace(distance=det.distance + 2.0, beam_center=torch.tensor([1.0, -0.5], dtype=torch.float64))
    c1 = panel_lab_vectors(setup.panels, moved, setup.beam, setup.twotheta_axis)[0]
    torch.testing.assert_close(c1 - c0, torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64).expand(3, 3))
    turned = det._replace(rotation=torch.tensor([0.0, 0.0, 90.0], dtype=torch.float64))
    c2 = panel_lab_vectors(setup.panels, turned, setup.beam, setup.twotheta_axis)[0]
    spot = torch.tensor([0.0, 0.0, setup.panels.distance], dtype=torch.float64)
    torch.testing.assert_close(c2 - spot, (rot_xyz(deg2rad(turned.rotation)) @ (c0 - spot)[..., None])[..., 0])


def _weighted(params, setup, name):
    w = torch.linspace(0.5, 1.5, setup.n_pixels, dtype=torch.float64).reshape(setup.image_shape)

    def f(v):
        det = params.detector._replace(**{name: v})
        return (nbtorch.simulate(params._replace(detector=det), setup, check=False, fused=False) * w).sum()

    return f


@pytest.mark.parametrize("name", ["group_shift", "group_rotation"])
def test_group_gradients_match_finite_differences(name):
    params, setup = _model("-N 3")
    f = _weighted(params, setup, name)
    x0 = torch.zeros(len(setup.panels.nodes), 3, dtype=torch.float64) + 0.01
    g = torch.func.grad(f)(x0)
    h = 1e-5
    for i in range(x0.shape[0]):
        for j in range(3):
            e = torch.zeros_like(x0)
            e[i, j] = h
            fd = (f(x0 + e) - f(x0 - e)) / (2 * h)
            assert float(abs(g[i, j] - fd)) <= 1e-6 * float(abs(fd)) + 1e-9 * float(f(x0)), (i, j, g[i, j], fd)
    jf = torch.func.jacfwd(f)(x0)
    torch.testing.assert_close(jf, g, rtol=1e-9, atol=1e-12 * float(g.abs().max()))


def test_vmap_over_group_shifts():
    params, setup = _model()
    shifts = torch.zeros(2, len(setup.panels.nodes), 3, dtype=torch.float64)
    shifts[1, 0, 0] = 0.4

    def f(v):
        return nbtorch.simulate(params._replace(detector=params.detector._replace(group_shift=v)), setup, fused=False)

    batch = torch.func.vmap(f)(shifts)
    torch.testing.assert_close(batch[1], f(shifts[1]), rtol=1e-12, atol=0)
    assert not torch.equal(batch[0], batch[1])


def test_float32_panels_match_float64():
    p64, s = _model()
    p32, _ = _model(dtype=torch.float32)
    a, b = nbtorch.simulate(p64, s, fused=False), nbtorch.simulate(p32, s, fused=False)
    torch.testing.assert_close(b.double(), a, rtol=2e-4, atol=2e-4 * float(a.max()))


# ----------------------------------------------------------------------------------------------------------------
# the same detector from CrystFEL and DIALS files


def _dials_json_of(geometry) -> str:
    """A flat DIALS detector (and beam) with the panels of a CrystFEL geometry, turned into DIALS's lab frame."""
    panels = []
    for p in geometry.panels:
        fs, ss = np.array(p.fs_step), np.array(p.ss_step)
        panels.append({"name": p.name, "type": "SENSOR_PAD", "origin": list(crystfel_to_dials_frame(p.corner)),
                       "fast_axis": list(crystfel_to_dials_frame(tuple(fs / np.linalg.norm(fs)))),
                       "slow_axis": list(crystfel_to_dials_frame(tuple(ss / np.linalg.norm(ss)))),
                       "image_size": [p.n_fast, p.n_slow],
                       "pixel_size": [float(np.linalg.norm(fs)), float(np.linalg.norm(ss))]})
    return json.dumps({"__id__": "ExperimentList", "experiment": [{"__id__": "Experiment", "beam": 0, "detector": 0}],
                       "beam": [{"direction": [0.0, 0.0, 1.0], "wavelength": 1.0}], "detector": [{"panels": panels}]})


def test_crystfel_and_dials_files_of_one_detector_give_one_image():
    geom = read_geom(DATA / "crystfel" / "two_panels.geom")
    cf_layout = layout_from_crystfel(geom)
    expts = parse_expt(_dials_json_of(geom).encode(), "same.expt")
    dials_layout = layout_from_dials(expts.detector_of(0), expts.beam_of(0).direction)
    assert dials_layout.beam == (0.0, 0.0, -1.0) and cf_layout.beam == (0.0, 0.0, 1.0)
    crystal = CRYSTAL.split(" -mosaic ")[0]  # mosaic axes are lab vectors: the same seed differs between frames
    base = f"{crystal} -fdet_vector 1 0 0 -sdet_vector 0 1 0 -odet_vector 0 0 1 -distance 100 -detpixels 8 -polar 0.7"
    p_cf, s_cf = nbtorch.from_nanobragg_args(f"{base} -beam_vector 0 0 1 -polar_vector 1 0 0", dtype=torch.float64)
    p_cf, s_cf = with_panels(p_cf, s_cf, cf_layout)
    p_di, s_di = nbtorch.from_nanobragg_args(f"{base} -beam_vector 0 0 -1 -polar_vector -1 0 0 -odet_vector 0 0 -1",
                                             dtype=torch.float64)
    flip = torch.diag(torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64))  # 180° about y: CrystFEL → DIALS
    crystal = p_di.crystal._replace(orientation=flip @ crystal_rotation(p_cf.crystal),
                                    misset=torch.zeros(3, dtype=torch.float64))
    p_di, s_di = with_panels(p_di._replace(crystal=crystal), s_di, dials_layout)
    a, b = nbtorch.simulate(p_cf, s_cf, fused=False), nbtorch.simulate(p_di, s_di, fused=False)
    assert a.shape == (2, 50, 100) and float(a.max()) > 0
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12 * float(a.max()))


def test_layouts_from_files_keep_the_hierarchy():
    quad = layout_from_crystfel(read_geom(DATA / "crystfel" / "quad_rigid.geom", clen=100.0,
                                             photon_energy_eV=9000.0))
    assert [n.name for n in quad.nodes if n.level == 1] == ["halves"] or quad.depth >= 2
    left = quad.nodes[quad.node_index("left")]
    assert [quad.panels[i].name for i in left.panels] == ["a0", "a1"]
    expts = parse_expt((DATA / "dials" / "hierarchy.expt").read_bytes(), "hierarchy.expt")
    lay = layout_from_dials(expts.detector_of(0), expts.beam_of(0).direction)
    names = {n.name: n for n in lay.nodes}
    assert names["quad0"].level == 1 and names["q0-a0"].level == 2 and names["tilted"].level == 1
    assert names["q0-a0"].parent == lay.node_index("quad0")


def test_bad_panel_setups_are_refused():
    params, setup = _model()
    with pytest.raises(ValueError, match=r"Setup\.roi is for nanoBragg's one-panel detector"):
        setup.replace(roi=(0, 1, 0, 1))
    with pytest.raises(ValueError, match=r"largest panel's counts"):
        setup.replace(fpixels=13)
    flat = PanelSpec("flat", (0.0, 0.0, 100.0), (P, 0.0, 0.0), (2 * P, 0.0, 0.0), 4, 4)
    with pytest.raises(ValueError, match=r"panel 'flat': the fast and slow steps must not be parallel"):
        Setup.for_panels(make_layout([flat], {"all": ["flat"]}, "all"), polar_axis=(1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match=r"member 'zz' is neither a panel nor a group"):
        make_layout(_panels(), {"all": ["a", "b", "c", "zz"]}, "all")
    with pytest.raises(ValueError, match=r"params\.detector\.group_shift must have shape \[4, 3\]"):
        nbtorch.simulate(params._replace(detector=params.detector._replace(group_shift=torch.zeros(2, 3,
                                                                                                 dtype=torch.float64))),
                         setup)
    push = torch.zeros(4, 3, dtype=torch.float64)
    push[setup.panels.node_index("a"), 2] = -250.0
    behind = params.detector._replace(group_shift=push)
    with pytest.raises(ValueError, match=r"puts panel 'a' behind or through the sample"):
        nbtorch.simulate(params._replace(detector=behind), setup)
    with pytest.raises(ValueError, match=r"give -beam_vector 0 0 1"):
        p2, s2 = nbtorch.from_nanobragg_args(CRYSTAL + " -detpixels 8", dtype=torch.float64)
        with_panels(p2, s2, _layout())


def test_corner_resolution_covers_every_panel():
    params, setup = _model()
    each = []
    for panel in setup.panels.panels:
        one_p, one_s = nbtorch.from_nanobragg_args(f"{CRYSTAL} {BEAM_Z} {_custom_args(panel, panel.facing)}",
                                                   dtype=torch.float64)
        each.append(detector_corner_resolution(one_p, one_s))
    assert detector_corner_resolution(params, setup) == pytest.approx(min(each), rel=1e-12)
    assert len(set(round(d, 9) for d in each)) == 3  # the panels differ: the minimum is a real choice
