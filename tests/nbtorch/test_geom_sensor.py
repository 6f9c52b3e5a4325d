"""A CrystFEL ``.geom`` panel's own sensor (nbtorch's extension keys ``thickness_um`` and ``mu_per_um``, issue 22 item
5): read, written back, given to the panel layout, and rendered as the same panel with that sensor built directly."""
from __future__ import annotations

import pathlib

import pytest
import torch

import nbtorch
from nbtorch.detector import with_panels
from nbtorch.io.crystfel import GeometryFileError, format_geom, parse_geom
from nbtorch.panels import PanelSpec, layout_from_crystfel, make_layout

#: Two 16×16 panels of 0.2 mm at 60 mm, above and below the beam ({sensor}: extra lines at the end).
GEOM = """clen = 0.06 m
photon_energy = 12398.42 eV
res = 5000
a/min_fs = 0
a/max_fs = 15
a/min_ss = 0
a/max_ss = 15
a/fs = x
a/ss = y
a/corner_x = -8
a/corner_y = 1
b/min_fs = 0
b/max_fs = 15
b/min_ss = 16
b/max_ss = 31
b/fs = x
b/ss = y
b/corner_x = -8
b/corner_y = -17
{sensor}
"""
#: CrystFEL's lab frame for a panel layout (beam along +z) and a base detector facing it.
LAB = ("-beam_vector 0 0 1 -polar_vector 1 0 0 -fdet_vector 1 0 0 -sdet_vector 0 1 0 -odet_vector 0 0 1 -distance 60 "
       "-pixel 0.2 -detpixels 16")
CRYSTAL = "-default_F 100 -cell 40 50 60 90 90 90 -misset 10 20 30 -N 6 -oversample 1 -detector_thicksteps 3"


def test_sensor_keys_read_written_back_and_given_to_the_layout():
    geometry = parse_geom(GEOM.format(sensor="a/thickness_um = 450\na/mu_per_um = 0.0036").encode(), "det.geom")
    assert geometry.panels[0].sensor == (450.0, 0.0036) and geometry.panels[1].sensor == (None, None)
    again = parse_geom(format_geom(geometry).encode(), "again.geom")
    assert [p.sensor for p in again.panels] == [p.sensor for p in geometry.panels]
    layout = layout_from_crystfel(geometry)
    assert (layout.panels[0].thickness_um, layout.panels[0].mu_per_um) == (450.0, 0.0036)
    assert layout.panels[1].thickness_um is None


SENSORS = "a/thickness_um = 450\na/mu_per_um = 0.0036\nb/thickness_um = 320\nb/mu_per_um = 0.0036"


def test_a_geom_panels_sensor_renders_as_that_panel_with_its_sensor(tmp_path):
    path = tmp_path / "det.geom"
    path.write_text(GEOM.format(sensor=SENSORS))
    params, setup = nbtorch.from_nanobragg_args(f"-geom {path} {CRYSTAL}", dtype=torch.float64)
    image = nbtorch.simulate(params, setup, fused=False)
    # the same two panels built by hand, each with its sensor
    base_p, base_s = nbtorch.from_nanobragg_args(f"{CRYSTAL} {LAB}", dtype=torch.float64)
    plain = layout_from_crystfel(parse_geom(GEOM.format(sensor="").encode(), "plain.geom"))
    own = [PanelSpec(p.name, p.corner, p.fast, p.slow, p.fpixels, p.spixels, t, 0.0036)
           for p, t in zip(plain.panels, (450.0, 320.0))]
    p2, s2 = with_panels(base_p, base_s, make_layout(own, {"all": ["a", "b"]}, "all"))
    torch.testing.assert_close(image, nbtorch.simulate(p2, s2, fused=False), rtol=1e-12, atol=0)
    bare_p, bare_s = with_panels(base_p, base_s, plain)
    bare = nbtorch.simulate(bare_p, bare_s, fused=False)
    for k in range(2):  # absorbed layer by layer: each panel differs from the sensor-less one
        assert float((image[k] - bare[k]).abs().max()) > 1e-3 * float(bare[k].max())
    assert setup.panels.panels[1].thickness_um == 320.0


@pytest.mark.parametrize("lines, key", [("a/thickness_um = 450", "a/mu_per_um"),
                                        ("a/thickness_um = -1\na/mu_per_um = 0.003", "a/thickness_um"),
                                        ("a/thickness_um = 450\na/mu_per_um = 0", "a/mu_per_um")])
def test_bad_sensor_keys_name_the_key(lines, key):
    with pytest.raises(GeometryFileError, match=key):
        parse_geom(GEOM.format(sensor=lines).encode(), "det.geom")


def test_detector_thick_flag_replaces_the_files_sensors(tmp_path):
    """``-detector_thick 0`` after ``-geom``/``-expt`` turns the file's panel sensors off (the image equals the
    sensor-less panels'); ``-detector_thick T`` gives every panel the set-up's sensor instead."""
    import json
    path = tmp_path / "det.geom"
    path.write_text(GEOM.format(sensor=SENSORS))
    plain = tmp_path / "plain.geom"
    plain.write_text(GEOM.format(sensor=""))
    off_p, off_s = nbtorch.from_nanobragg_args(f"-geom {path} {CRYSTAL} -detector_thick 0", dtype=torch.float64)
    bare_p, bare_s = nbtorch.from_nanobragg_args(f"-geom {plain} {CRYSTAL}", dtype=torch.float64)
    assert not off_s.has_sensor and off_s.panels == bare_s.panels
    torch.testing.assert_close(nbtorch.simulate(off_p, off_s, fused=False),
                               nbtorch.simulate(bare_p, bare_s, fused=False), rtol=1e-12, atol=0)
    doc = json.loads((pathlib.Path(__file__).parents[1] / "data" / "cli_panels" / "two_small.expt").read_text())
    for panel in doc["detector"][0]["panels"]:
        panel.update(thickness=0.45, mu=3.9, material="Si")
    expt = tmp_path / "thick.expt"
    expt.write_text(json.dumps(doc))
    _, own = nbtorch.from_nanobragg_args(f"-expt {expt} -default_F 10 -N 2", dtype=torch.float64)
    assert own.has_sensor and own.panels.panels[0].thickness_um == 450.0
    _, off = nbtorch.from_nanobragg_args(f"-expt {expt} -default_F 10 -N 2 -detector_thick 0", dtype=torch.float64)
    assert not off.has_sensor and off.panels.panels[0].thickness_um is None
    _, other = nbtorch.from_nanobragg_args(f"-expt {expt} -default_F 10 -N 2 -detector_thick 300",
                                           dtype=torch.float64)
    assert other.has_sensor and other.thickness_um == 300.0 and other.panels.panels[1].thickness_um is None
