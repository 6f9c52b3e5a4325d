"""Panel groups as rigid bodies in refine: a noisy 4-panel still gives back two groups' shifts and rotations, a
CrystFEL file goes through a fit and comes back moved to the truth, the names resolve on the detector's hierarchy
(one-line errors otherwise), and the JSON reports every refined group by name with its ESDs."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.func import jacfwd

import nbtorch
import refine
from nbtorch.detector import with_panels
from nbtorch.io.crystfel import panels_to_slab, read_geom
from nbtorch.io.images import read_raw_float, write_raw_float
from nbtorch.panels import layout_from_crystfel, panel_lab_vectors
from refine.cli.fit import main
from refine.imagelist import entry_start, load_entries, parse_image_list
from refine.model.degeneracy import degenerate_pairs
from refine.model.parameters import parameterise

PIXEL = 0.2  # mm (res = 5000 pixels/m)
#: The crystal and beam of tests/refine/refine_cases.BASE, in CrystFEL's frame (beam along +z).
FLAGS = ("-default_F 100 -cell 40 50 60 90 90 90 -misset 10 20 30 -N 6 -lambda 1 -oversample 1 -fluence 1e31 "
         "-beam_vector 0 0 1 -polar_vector 1 0 0 -fdet_vector 1 0 0 -sdet_vector 0 1 0 -odet_vector 0 0 1 "
         "-distance 60 -detpixels 8 -pixel 0.2")
#: The truth: each group moved by ~0.5 px and ~0.1° about every axis.
MOTION = {"top": ((0.1, -0.08, 0.05), (0.1, -0.08, 0.1)), "bottom": ((-0.09, 0.1, -0.06), (-0.07, 0.1, -0.1))}


def _panel(name, fs0, ss0, cx, cy):
    return (f"{name}/min_fs = {fs0}\n{name}/max_fs = {fs0 + 47}\n{name}/min_ss = {ss0}\n{name}/max_ss = {ss0 + 47}\n"
            f"{name}/fs = x\n{name}/ss = y\n{name}/corner_x = {cx}\n{name}/corner_y = {cy}\n\n")


#: Four 48×48 panels around the beam at 60 mm in two groups (one data slab of 96×96), with keys a fit leaves alone.
GEOM = ("clen = 60 mm\nres = 5000\nphoton_energy = 12398.4\nadu_per_photon = 2.5\ndata = /entry/data/data\n\n"
        + _panel("p0", 0, 0, -49, -49) + _panel("p1", 48, 0, 1, -49) + _panel("p2", 0, 48, -49, 1)
        + _panel("p3", 48, 48, 1, 1)
        + "bad_edge/min_fs = 0\nbad_edge/max_fs = 1\nbad_edge/min_ss = 0\nbad_edge/max_ss = 47\nbad_edge/panel = p0\n\n"
        + "group_top = p0,p1\ngroup_bottom = p2,p3\ngroup_all = top,bottom\n")


def _geometry(tmp_path):
    path = tmp_path / "det.geom"
    path.write_text(GEOM)
    return read_geom(path)


def _start(geometry):
    """(params, setup) of the file's detector at its nominal place."""
    params, setup = nbtorch.from_nanobragg_args(FLAGS, dtype=torch.float64)
    return with_panels(params, setup, layout_from_crystfel(geometry))


def _moved(params, setup, motion=MOTION):
    shift, rot = params.detector.group_shift.clone(), params.detector.group_rotation.clone()
    for name, (t, r) in motion.items():
        g = setup.panels.node_index(name)
        shift[g], rot[g] = torch.tensor(t), torch.tensor(r)
    return params._replace(detector=params.detector._replace(group_shift=shift, group_rotation=rot))


def _observe(params, setup, seed=0):
    image = nbtorch.simulate(params, setup, fused=False)
    return torch.poisson(image, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One fit of the groups and the scale to a noisy still of the moved detector (shared by the tests below)."""
    geometry = _geometry(tmp_path_factory.mktemp("geom"))
    params, setup = _start(geometry)
    truth = _moved(params, setup)
    res = refine.fit(_observe(truth, setup), params, setup, free=["panel_groups", "scale"], fused=False,
                     geometry=geometry)
    return res, truth, geometry


def test_two_panel_groups_are_recovered_from_a_noisy_four_panel_still(fitted):
    res, truth, _ = fitted
    assert res.converged and not res.poor_fit, res.message
    assert res.observed.shape == (4, 48, 48) and res.model_image().shape == (4, 48, 48)
    layout = res.setup.panels
    for name in MOTION:
        g = layout.node_index(name)
        d_shift = res.params.detector.group_shift[g] - truth.detector.group_shift[g]
        d_rot = res.params.detector.group_rotation[g] - truth.detector.group_rotation[g]
        assert float(d_shift.abs().max()) <= 0.1 * PIXEL, (name, d_shift)
        assert float(d_rot.abs().max()) <= 0.02, (name, d_rot)
        for k, axis in enumerate(("shift_x", "shift_y", "shift_z", "rotation_x", "rotation_y", "rotation_z")):
            key = f"panel_group:{name}.{axis}"
            err = float((d_shift if k < 3 else d_rot)[k % 3])
            esd = res.esd[key]
            assert math.isfinite(esd) and 0 < esd < (0.05 * PIXEL if k < 3 else 0.01), (key, esd)
            assert abs(err) < 5 * esd, (key, err, esd)  # the ESDs describe the errors
    others = [g for g, n in enumerate(layout.nodes) if n.name not in MOTION]
    assert float(res.params.detector.group_shift[others].abs().max()) == 0.0  # panels within the groups: fixed


def test_geom_refine_geom_round_trip_moves_the_panels_to_the_truth(fitted, tmp_path):
    res, truth, geometry = fitted
    out = tmp_path / "refined.geom"
    res.write_geom(out)
    back = read_geom(out)
    st = res.setup
    want = panel_lab_vectors(st.panels, truth.detector, st.beam, st.twotheta_axis)
    start = panel_lab_vectors(st.panels, _start(geometry)[0].detector, st.beam, st.twotheta_axis)
    for k, panel in enumerate(back.panels):
        got = [torch.tensor(v, dtype=torch.float64) for v in (panel.corner, panel.fs_step, panel.ss_step)]
        assert float((got[0] - want[0][k]).abs().max()) < 0.1 * PIXEL
        assert float((got[0] - start[0][k]).abs().max()) > 0.3 * PIXEL  # it did move
        for g, w in zip(got[1:], want[1:]):
            assert float((g - w[k]).abs().max()) < PIXEL * math.radians(0.02)  # turned within 0.02°
    assert [(p.name, p.min_fs, p.max_fs, p.min_ss, p.max_ss, p.res, p.adu_per_photon, p.data) for p in back.panels] \
        == [(p.name, p.min_fs, p.max_fs, p.min_ss, p.max_ss, p.res, p.adu_per_photon, p.data) for p in geometry.panels]
    assert (back.groups, back.bad_regions, back.photon_energy_eV) == (geometry.groups, geometry.bad_regions,
                                                                      geometry.photon_energy_eV)


def test_json_reports_every_refined_group_by_name_with_esds(fitted, tmp_path):
    res, _, _ = fitted
    d = json.loads(res.to_json(str(tmp_path / "fit.json")))
    assert d == json.loads((tmp_path / "fit.json").read_text())
    groups, esds = d["parameters"]["panel_groups"], d["esd"]["panel_groups"]
    assert sorted(groups) == sorted(esds) == ["bottom", "top"]
    for name in groups:
        for key in ("shift_mm", "rotation_deg"):
            assert len(groups[name][key]) == len(esds[name][key]) == 3
            assert all(math.isfinite(v) and v > 0 for v in esds[name][key])
        assert groups[name]["shift_mm"][0] == pytest.approx(d["values"][f"panel_group:{name}.shift_x"], abs=1e-12)
        assert esds[name]["rotation_deg"][2] == pytest.approx(d["value_esd"][f"panel_group:{name}.rotation_z"],
                                                              rel=1e-9)
    assert d["units"]["panel_group:top.shift_x"] == "mm" and d["units"]["panel_group:top.rotation_z"] == "deg"
    assert d["flags"]["panel_group:top.shift_x"] == "-geom"
    # the one-panel contract is unchanged: the same keys, no panel_groups
    p1, s1 = nbtorch.from_nanobragg_args("-default_F 100 -cell 40 50 60 90 90 90 -N 6 -detpixels 16 -distance 60",
                                         dtype=torch.float64)
    one = refine.fit(_observe(p1, s1), p1, s1, free=["distance"], max_iter=0).to_dict()
    assert set(one) == set(d) and "panel_groups" not in one["parameters"]
    assert set(d["parameters"]) - set(one["parameters"]) == {"panel_groups"}


def test_names_resolve_on_the_hierarchy(tmp_path):
    params, setup = _start(_geometry(tmp_path))
    names = parameterise(params, setup, ["panel_groups"]).names
    assert names == [f"panel_group:{g}.{a}" for g in ("top", "bottom") for a in
                     ("shift_x", "shift_y", "shift_z", "rotation_x", "rotation_y", "rotation_z")]
    assert parameterise(params, setup, "panel_groups.1").names == names
    level2 = parameterise(params, setup, ["panel_groups.2"]).names
    assert len(level2) == 24 and level2[0] == "panel_group:p0.shift_x"
    assert parameterise(params, setup, ["panel_group:p1", "scale"]).names[:1] == ["panel_group:p1.shift_x"]
    par = parameterise(params, setup, ["distance", "panel_group:top.rotation_z", "panel_group:bottom.shift_y"])
    assert par.names == ["distance", "panel_group:top.rotation_z", "panel_group:bottom.shift_y"]
    x = torch.tensor([0.5, 2.0, -0.03], dtype=torch.float64)  # mm, mrad, mm
    moved = par.unpack(x).detector
    top, bottom = setup.panels.node_index("top"), setup.panels.node_index("bottom")
    assert float(moved.group_rotation[top, 2]) == pytest.approx(math.degrees(2e-3), rel=1e-12)
    assert float(moved.group_shift[bottom, 1]) == pytest.approx(-0.03, rel=1e-12)
    torch.testing.assert_close(par.pack(par.unpack(x)), x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("free,message", [
    (["panel_groups.3"], r"^panel_groups\.3: the panel hierarchy has levels 1 to 2 "),
    (["panel_groups.x"], r"^panel_groups\.x: the panel hierarchy has levels 1 to 2 "),
    (["panel_group:left"], r"^panel_group:left: no panel group or panel 'left'; this detector has top, p0, p1, "),
    (["panel_group:top.spin"], r"no panel group or panel 'top\.spin'"),
    (["panel_group"], r"^unknown parameter group 'panel_group'; .*panel_groups, panel_groups\.LEVEL, panel_group:NAME"),
    (["panel_group.shift_x"], r"^unknown parameter group 'panel_group\.shift_x'"),
])
def test_unknown_groups_and_levels_are_one_line_errors(tmp_path, free, message):
    params, setup = _start(_geometry(tmp_path))
    with pytest.raises(ValueError, match=message) as err:
        parameterise(params, setup, free)
    assert "\n" not in str(err.value)


def test_one_panel_detector_and_geometry_errors(tmp_path):
    p1, s1 = nbtorch.from_nanobragg_args("-default_F 100 -cell 40 50 60 90 90 90 -N 6 -detpixels 16",
                                         dtype=torch.float64)
    obs = _observe(p1, s1)
    with pytest.raises(ValueError, match=r"^panel_groups: panel groups need a detector of several panels"):
        refine.fit(obs, p1, s1, free=["panel_groups"])
    geometry = _geometry(tmp_path)
    with pytest.raises(ValueError, match=r"^geometry: the CrystFEL file's 4 panels \(p0, p1, p2, p3\) are not the "
                                         r"detector's one nanoBragg panel"):
        refine.fit(obs, p1, s1, free=["distance"], geometry=geometry)
    with pytest.raises(ValueError, match=r"^geometry must be a CrystFEL Geometry"):
        refine.FitOptions(geometry="det.geom")
    res = refine.fit(obs, p1, s1, free=["distance"], max_iter=0)
    with pytest.raises(ValueError, match=r"written as a CrystFEL geometry only for a detector read from one"):
        res.write_geom(str(tmp_path / "x.geom"))
    assert not (tmp_path / "x.geom").exists()
    params, setup = _start(geometry)
    with pytest.raises(ValueError, match=r"observed image has shape \(48, 48\) but the model detector is "
                                         r"\[panel, slow, fast\] = \(4, 48, 48\)"):
        refine.fit(torch.ones(48, 48, dtype=torch.float64), params, setup, free=["panel_groups"])


def test_groups_holding_every_panel_are_degenerate_with_the_whole_detector(tmp_path):
    """Shifting every group along the beam is moving the detector: the derivatives of the image with respect to
    ``distance`` and to the sum of the groups' z shifts are the same; both are reported before a fit."""
    params, setup = _start(_geometry(tmp_path))
    par = parameterise(params, setup, ["distance", "panel_groups"])
    found = [d.names for d in degenerate_pairs(par)]
    assert ("distance", "panel_group:top.shift_z, panel_group:bottom.shift_z") in found
    assert not degenerate_pairs(parameterise(params, setup, ["distance", "panel_group:top"]))
    pixels = torch.arange(0, setup.n_pixels, 7)
    J = jacfwd(lambda x: nbtorch.simulate(par.unpack(x), setup, fused=False).reshape(-1)[pixels])(par.zeros())
    i = [par.names.index(n) for n in ("distance", "panel_group:top.shift_z", "panel_group:bottom.shift_z")]
    torch.testing.assert_close(J[:, i[0]], J[:, i[1]] + J[:, i[2]], rtol=1e-9, atol=1e-9 * float(J.abs().max()))


# ------------------------------------------------------------------------------------------------ command line


def test_cli_out_geom_needs_a_geom_detector_and_one_panel_has_no_groups(tmp_path, capsys):
    p1, s1 = nbtorch.from_nanobragg_args("-default_F 100 -cell 40 50 60 90 90 90 -N 6 -detpixels 16",
                                         dtype=torch.float64)
    obs = tmp_path / "obs.bin"
    write_raw_float(str(obs), _observe(p1, s1).numpy().astype(np.float32))
    flags = ["-default_F", "100", "-cell", "40", "50", "60", "90", "90", "90", "-N", "6", "-detpixels", "16"]
    out = tmp_path / "refined.geom"
    assert main([str(obs), "--refine", "distance", "--out-geom", str(out)] + flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out-geom" in err and "give -geom FILE" in err and not out.exists()
    assert main([str(obs), "--refine", "panel_groups,scale", "--quiet"] + flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "panel_groups: panel groups need a detector of several panels" in err
    assert main([str(obs), "--refine", "panel_group"] + flags) == 2
    assert "panel_groups.LEVEL" in capsys.readouterr().err


def test_cli_geom_refine_out_geom(fitted, tmp_path, capsys):
    """``nbtorch-refine OBSERVED -geom det.geom --refine panel_groups,scale --out-geom refined.geom``: the observed
    image as the file's data slab, the refined file's panels where the Python fit put them."""
    res, truth, geometry = fitted
    geom = tmp_path / "det.geom"
    geom.write_text(GEOM)
    obs = tmp_path / "obs.bin"
    slab = panels_to_slab(res.observed.numpy(), geometry)
    assert slab.shape == (96, 96)  # the file's data layout, not the panels stacked
    write_raw_float(str(obs), slab.astype(np.float32))
    out, out_json, model, figure = (tmp_path / n for n in ("refined.geom", "fit.json", "model.bin", "fit.png"))
    flags = ["-geom", str(geom)] + [t for t in FLAGS.split("-beam_vector")[0].split()]
    rc = main([str(obs), "--refine", "panel_groups,scale", "--quiet", "--out-geom", str(out), "--json",
               str(out_json), "--image", str(model), "--plot", str(figure)] + flags)
    assert rc == 0, capsys.readouterr().err
    fitted_slab = read_raw_float(str(model), (96, 96))  # the model in the file's data layout, like the observed
    assert np.corrcoef(fitted_slab[:, 2:].ravel(), slab[:, 2:].ravel())[0, 1] > 0.99 and figure.stat().st_size > 0
    back, d = read_geom(out), json.loads(out_json.read_text())
    st = res.setup
    want = panel_lab_vectors(st.panels, truth.detector, st.beam, st.twotheta_axis)[0]
    for k, panel in enumerate(back.panels):
        assert float((torch.tensor(panel.corner, dtype=torch.float64) - want[k]).abs().max()) < 0.1 * PIXEL
    assert sorted(d["parameters"]["panel_groups"]) == ["bottom", "top"]


def test_image_lists_read_a_geom_slab_as_panels(fitted, tmp_path):
    """``nbtorch-refine --images LIST`` lines with ``-geom``: the observed data slab is cut into the file's panels."""
    res, _, geometry = fitted
    (tmp_path / "det.geom").write_text(GEOM)
    write_raw_float(str(tmp_path / "obs.bin"), panels_to_slab(res.observed.numpy(), geometry).astype(np.float32))
    crystal = FLAGS.split("-beam_vector")[0]
    (tmp_path / "list.txt").write_text(f"obs.bin -geom det.geom {crystal}\n")
    entries = parse_image_list(str(tmp_path / "list.txt"))
    assert entry_start(entries[0])[2] == geometry
    (obs,), _, (setup,) = load_entries(entries)
    assert setup.image_shape == (4, 48, 48)
    # in photons: the file's adu_per_photon = 2.5 divides the values (refine.targets.detector)
    torch.testing.assert_close(torch.as_tensor(obs.data, dtype=torch.float64), res.observed / 2.5, rtol=0, atol=0)
    assert not obs.mask[0, :, :2].any() and obs.mask[0, :, 2:].all()  # the file's bad_edge region
