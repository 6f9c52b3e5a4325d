"""DIALS experiment lists (nbtorch.io.dials): detector and beam models, hierarchy composition, frames, errors."""
from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch

from nbtorch.io import crystfel
from nbtorch.io.dials import (
    Detector,
    ExptFileError,
    Group,
    Panel,
    crystfel_to_dials_frame,
    dials_to_crystfel_frame,
    panel_normal,
    parse_expt,
    pixel_centers,
    read_expt,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "dials"
FLAT = DATA / "flat.expt"
HIERARCHY = DATA / "hierarchy.expt"


def _vec(v):
    return torch.tensor(v, dtype=torch.float64)


def _close(a, b):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), _vec(b), rtol=1e-12, atol=1e-12)


def _write(tmp_path, obj, name="bad.expt"):
    path = tmp_path / name
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return path


# ----------------------------------------------------------------------------------------------------------------
# where pixels land


def test_flat_panel_puts_a_known_pixel_where_dxtbx_says():
    el = read_expt(FLAT)
    det = el.detector_of(0)
    (panel,) = det.panels
    assert (panel.name, panel.type, panel.image_size, panel.pixel_size) == ("Panel", "SENSOR_PAD", (2463, 2527),
                                                                            (0.172, 0.172))
    assert (panel.thickness, panel.mu, panel.material, panel.gain, panel.pedestal) == (0.32, 3.9636, "Si", 1.0, 0.0)
    assert panel.trusted_range == (-1.0, 1e6) and panel.px_mm_strategy == "ParallaxCorrectedPxMmStrategy"
    assert panel.mask == ((487, 0, 494, 2527), (981, 0, 988, 2527))
    (lab,) = det.lab_panels
    centres = pixel_centers(lab)
    assert centres.shape == (2527, 2463, 3) and centres.dtype == torch.float64
    # dxtbx: mm (x, y) at origin + x·fast + y·slow; pixel i spans [i, i + 1)·pixel size, so its centre is i + ½
    _close(centres[50, 100], [-211.3 + 100.5 * 0.172, 219.5 - 50.5 * 0.172, -190.0])
    # the direct beam (travelling along −direction) meets the panel at mm (211.3, 219.5) from the origin
    _close([o + 211.3 * f + 219.5 * s for o, f, s in zip(lab.corner, lab.fast_axis, lab.slow_axis)], [0, 0, -190.0])
    _close(panel_normal(lab), [0.0, 0.0, -1.0])  # away from the sample, downstream (the beam travels along −z)
    beam = el.beam_of(0)
    assert beam.direction == (0.0, 0.0, 1.0)  # the file's (0, 0, 2), normalised as dxtbx does
    assert beam.wavelength == 0.9793 and beam.polarization_fraction == 0.99
    assert beam.kahn_factor == pytest.approx(0.98, rel=1e-14)
    assert el.experiments[0].identifier == "flat-0" and el.crystals[0]["real_space_c"] == [0.0, 0.0, 37.0]


def test_two_level_hierarchy_composes_the_lab_frame_down_the_tree():
    det = read_expt(HIERARCHY).detectors[0]
    root = det.hierarchy
    assert isinstance(root, Group) and root.name == "root"
    quad, tilted_index = root.children
    assert (quad.name, quad.children, tilted_index) == ("quad0", (0,), 1)
    assert quad.fast_axis == (0.0, 1.0, 0.0) and quad.origin == (10.0, 20.0, 0.5)  # stored: local to the root
    assert det.panels[0].fast_axis == (1.0, 0.0, 0.0)  # the file's (2, 0, 0), normalised as dxtbx does
    a, tilted = det.lab_panels
    # root: f0 = (1, 0, 0), s0 = (0, −1, 0), n0 = f0 × s0 = (0, 0, −1), o0 = (−50, 50, −200).
    # quad0 (90° about the beam, shifted): f = s0, s = −f0, o = o0 + 10·f0 + 20·s0 + 0.5·n0 = (−40, 30, −200.5);
    # panel 0 inside it: local f (1, 0, 0), s (0, 1, 0), origin (1, 2, 0) → o = (−40, 30, −200.5) + f + 2·s.
    _close(a.fast_axis, [0.0, -1.0, 0.0])
    _close(a.slow_axis, [-1.0, 0.0, 0.0])
    _close(a.corner, [-42.0, 29.0, -200.5])
    _close(pixel_centers(a)[4, 3], [-42.0 - 4.5 * 0.2, 29.0 - 3.5 * 0.1, -200.5])
    _close(a.fs_step, [0.0, -0.1, 0.0])
    _close(a.ss_step, [-0.2, 0.0, 0.0])
    # panel 1 directly under the root: local fast (0.6, 0, 0.8) → 0.6·f0 + 0.8·n0
    _close(tilted.fast_axis, [0.6, 0.0, -0.8])
    _close(tilted.corner, [-50.0, 50.0, -200.0])
    _close(panel_normal(tilted), [-0.8, 0.0, -0.6])
    assert (det.panels[1].thickness, det.panels[1].mu, det.panels[1].gain) == (0.45, 1.5, 2.5)


def test_flat_detector_without_hierarchy_uses_the_lab_frame():
    obj = json.loads(HIERARCHY.read_text())
    del obj["detector"][0]["hierarchy"]
    det = parse_expt(json.dumps(obj).encode(), "flat.expt").detectors[0]
    assert det.hierarchy is None
    a, tilted = det.lab_panels
    assert (a.corner, a.fast_axis, a.slow_axis) == ((1.0, 2.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
    _close(tilted.fast_axis, [0.6, 0.0, 0.8])


def test_normal_points_away_from_the_sample_for_left_handed_panels():
    def lab(fast, slow, origin):
        det = Detector((Panel("p", "", fast, slow, origin, (10, 10), (0.1, 0.1)),))
        return det.lab_panels[0]

    right = lab((1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (-0.5, 0.5, -100.0))
    left = lab((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (-0.5, -0.5, -100.0))  # fast × slow = +z, towards the sample
    _close(panel_normal(right), [0.0, 0.0, -1.0])
    _close(panel_normal(left), [0.0, 0.0, -1.0])
    assert torch.linalg.cross(_vec(left.fast_axis), _vec(left.slow_axis))[2] > 0
    upstream = lab((1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (-0.5, 0.5, 50.0))  # behind the sample: normal along +z
    _close(panel_normal(upstream), [0.0, 0.0, 1.0])
    in_plane = lab((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (-0.5, -0.5, 0.0))  # the sample in its plane: along the beam
    _close(panel_normal(in_plane), [0.0, 0.0, -1.0])


def test_models_shared_between_experiments_stay_shared():
    el = read_expt(HIERARCHY)
    first, second = el.experiments
    assert (first.identifier, second.identifier) == ("shot-a", "shot-b")
    assert (first.detector, first.beam, second.detector, second.beam) == (0, 0, 0, 0)
    assert (first.crystal, second.crystal, first.imageset, second.imageset) == (0, 1, 0, 1)
    assert len(el.detectors) == len(el.beams) == 1 and len(el.crystals) == len(el.imagesets) == 2
    assert el.detector_of(0) is el.detector_of(1) and el.beam_of(0) is el.beam_of(1)
    assert first.goniometer is None and first.scan is None
    beam = el.beams[0]
    assert (beam.divergence, beam.sigma_divergence, beam.kahn_factor) == (0.01, 0.002, 0.0)
    with pytest.raises(TypeError):
        el.crystals[0]["real_space_a"] = [1.0, 0.0, 0.0]  # the file's objects are read-only


# ----------------------------------------------------------------------------------------------------------------
# CrystFEL ↔ DIALS


def test_frame_change_is_a_half_turn_about_y():
    assert dials_to_crystfel_frame((1.0, 2.0, 3.0)) == (-1.0, 2.0, -3.0)
    assert crystfel_to_dials_frame(dials_to_crystfel_frame((1.0, 2.0, 3.0))) == (1.0, 2.0, 3.0)
    t = _vec([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    _close(dials_to_crystfel_frame(t), [[-1.0, 2.0, -3.0], [0.0, 0.0, -1.0]])
    # DIALS's beam direction (sample → source) is CrystFEL's −z: CrystFEL's +z runs along the beam, away from it
    assert dials_to_crystfel_frame((0.0, 0.0, 1.0)) == (-0.0, 0.0, -1.0)
    c, s = math.cos(math.pi), math.sin(math.pi)  # a rotation by 180° about y, as a matrix, gives the same map
    rot_y = _vec([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    _close(rot_y @ _vec([1.0, 2.0, 3.0]), list(dials_to_crystfel_frame((1.0, 2.0, 3.0))))


GEOM = """clen = 0.1 m
res = 10000
a/min_fs = 0
a/max_fs = 99
a/min_ss = 0
a/max_ss = 49
a/fs = x
a/ss = y
a/corner_x = -50
a/corner_y = 10
b/min_fs = 0
b/max_fs = 99
b/min_ss = 50
b/max_ss = 99
b/fs = -y
b/ss = -0.8x +0.6z
b/corner_x = 20
b/corner_y = -5
b/coffset = -0.002
"""


def _same_detector_as_expt():
    """GEOM's detector written by hand as a DIALS detector, (x, y, z) → (−x, y, −z), with the panels in a group
    turned 90° about z (group fast (0, 1, 0), slow (−1, 0, 0), normal (0, 0, 1)), so their vectors are local:
    a: lab fast (−1, 0, 0), slow (0, 1, 0), origin (5, 1, −100) → local (0, 1, 0), (1, 0, 0), (1, −5, −100);
    b: lab fast (0, −1, 0), slow (0.8, 0, −0.6), origin (−2, −0.5, −98) → local (−1, 0, 0), (0, −0.8, −0.6),
    (−0.5, 2, −98)."""
    def panel(name, fast, slow, origin):
        return {"name": name, "type": "SENSOR_PAD", "fast_axis": fast, "slow_axis": slow, "origin": origin,
                "image_size": [100, 50], "pixel_size": [0.1, 0.1]}

    group = {"name": "g", "fast_axis": [0.0, 1.0, 0.0], "slow_axis": [-1.0, 0.0, 0.0], "origin": [0.0, 0.0, 0.0],
             "children": [{"panel": 0}, {"panel": 1}]}
    detector = {"panels": [panel("a", [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, -5.0, -100.0]),
                           panel("b", [-1.0, 0.0, 0.0], [0.0, -0.8, -0.6], [-0.5, 2.0, -98.0])],
                "hierarchy": {"name": "", "children": [group]}}
    return {"__id__": "ExperimentList", "experiment": [{"detector": 0}], "detector": [detector]}


def test_one_detector_in_crystfel_and_dials_files_gives_the_same_pixels():
    geometry = crystfel.parse_geom(GEOM.encode(), "det.geom")
    expt = parse_expt(json.dumps(_same_detector_as_expt()).encode(), "det.expt")
    for cf_panel, lab in zip(geometry.panels, expt.detectors[0].lab_panels):
        assert (lab.name, lab.n_fast, lab.n_slow) == (cf_panel.name, cf_panel.n_fast, cf_panel.n_slow)
        torch.testing.assert_close(dials_to_crystfel_frame(pixel_centers(lab)), crystfel.pixel_centers(cf_panel),
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(crystfel_to_dials_frame(crystfel.panel_normal(cf_panel)), panel_normal(lab),
                                   rtol=1e-12, atol=1e-12)
    b = expt.detectors[0].lab_panels[1]  # left-handed in both frames: fast × slow points back at the sample
    assert torch.dot(torch.linalg.cross(_vec(b.fast_axis), _vec(b.slow_axis)), panel_normal(b)) < 0


# ----------------------------------------------------------------------------------------------------------------
# bad files


def _set(path, value):
    def edit(obj):
        *head, last = path
        for k in head:
            obj = obj[k]
        if value is _DELETE:
            del obj[last]
        else:
            obj[last] = value
    return edit


_DELETE = object()
_P = ("detector", 0, "panels", 0)
_H = ("detector", 0, "hierarchy")

BAD = [
    (_set(_P + ("fast_axis",), _DELETE), r"detector\[0\]\.panels\[0\]\.fast_axis: missing"),
    (_set(_P + ("fast_axis",), [1.0, 0.0]), r"detector\[0\]\.panels\[0\]\.fast_axis: expected 3 values, got 2"),
    (_set(_P + ("fast_axis",), ["1", 0, 0]), r"detector\[0\]\.panels\[0\]\.fast_axis\[0\]: expected a number"),
    (_set(_P + ("fast_axis",), [0, 0, 0]), r"detector\[0\]\.panels\[0\]\.fast_axis: a zero-length vector"),
    (_set(_P + ("slow_axis",), [0.1, -1.0, 0.0]), r"detector\[0\]\.panels\[0\]\.slow_axis: fast_axis and slow_axis "
                                                  r"are not orthogonal"),
    (_set(_P + ("origin",), {"x": 1}), r"detector\[0\]\.panels\[0\]\.origin: expected a JSON list, got an object"),
    (_set(_P + ("image_size",), [0, 10]), r"detector\[0\]\.panels\[0\]\.image_size\[0\]: must be >= 1, got 0"),
    (_set(_P + ("image_size",), [2463.5, 10]), r"image_size\[0\]: expected an integer, got 2463\.5"),
    (_set(_P + ("pixel_size",), [0.172, 0]), r"detector\[0\]\.panels\[0\]\.pixel_size\[1\]: must be > 0"),
    (_set(_P + ("thickness",), True), r"detector\[0\]\.panels\[0\]\.thickness: expected a number, got true"),
    (_set(_P + ("mask",), [[5, 0, 5, 10]]), r"detector\[0\]\.panels\[0\]\.mask\[0\]: an untrusted rectangle"),
    (_set(_P + ("name",), 3), r"detector\[0\]\.panels\[0\]\.name: expected a string"),
    (_set(_H + ("children",), [{"panel": 1}]), r"detector\[0\]\.hierarchy\.children\[0\]\.panel: no panel 1"),
    (_set(_H + ("children",), [{"panel": 0}, {"panel": 0}]),
     r"detector\[0\]\.hierarchy\.children\[1\]\.panel: panel 0 is already in the hierarchy at "
     r"detector\[0\]\.hierarchy\.children\[0\]\.panel"),
    (_set(_H + ("children",), []), r"detector\[0\]\.hierarchy: panel 0 is in no group"),
    (_set(_H + ("children",), [{"name": "g", "children": [{"panel": 0}], "origin": [0, 0, 0]}]),
     r"detector\[0\]\.hierarchy\.children\[0\]\.fast_axis: missing"),
    (_set(_H + ("slow_axis",), [0.5, 1.0, 0.0]), r"detector\[0\]\.hierarchy\.slow_axis: fast_axis and slow_axis are "
                                                 r"not orthogonal"),
    (_set(_H, {"panel": 0}), r"detector\[0\]\.hierarchy: the root of the hierarchy must be a group"),
    (_set(("__id__",), "ExperimentLst"), r": __id__: unknown __id__ 'ExperimentLst'"),
    (_set(("__id__",), _DELETE), r": __id__: missing"),
    (_set(("beam", 0, "__id__"), "polychromatic"), r"beam\[0\]\.__id__: unknown __id__ 'polychromatic'"),
    (_set(("crystal", 0, "__id__"), _DELETE), r"crystal\[0\]\.__id__: missing"),
    (_set(("imageset", 0, "__id__"), "ImageStack"), r"imageset\[0\]\.__id__: unknown __id__ 'ImageStack'"),
    (_set(("experiment", 0, "__id__"), "Expt"), r"experiment\[0\]\.__id__: unknown __id__ 'Expt'"),
    (_set(("experiment", 0, "detector"), 3), r"experiment\[0\]\.detector: no detector 3 \(the file has 1\)"),
    (_set(("experiment", 0, "beam"), "beam.json"), r"experiment\[0\]\.beam: refers to another file"),
    (_set(("experiment",), _DELETE), r": experiment: missing"),
    (_set(("beam", 0, "wavelength"), -1.0), r"beam\[0\]\.wavelength: must be > 0"),
    (_set(("beam", 0, "direction"), [0, 0, 0]), r"beam\[0\]\.direction: a zero-length vector"),
    (_set(("beam", 0, "polarization_fraction"), 1.5), r"beam\[0\]\.polarization_fraction: must be between 0 and 1"),
]


@pytest.mark.parametrize("edit,expected", BAD)
def test_bad_files_name_the_file_and_the_json_path(tmp_path, edit, expected):
    obj = copy.deepcopy(json.loads(FLAT.read_text()))
    edit(obj)
    path = _write(tmp_path, obj)
    with pytest.raises(ExptFileError) as err:
        read_expt(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert re.search(expected, message), message


@pytest.mark.parametrize("text,expected", [
    ('{"__id__": "ExperimentList",\n "experiment": [}', r": line 2, column 17: not valid JSON"),
    ('{"__id__": "ExperimentList", "experiment": [], "beam": [{"direction": [0, 0, NaN]}]}',
     r"not valid JSON: NaN is not a finite number"),
    ('[1, 2]', r": \(top level\): expected a JSON object, got a list"),
    (b'{"a": "\xff"}', r": not valid UTF-8 text"),
])
def test_files_that_are_not_experiment_lists_get_one_line(tmp_path, text, expected):
    path = tmp_path / "bad.expt"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ExptFileError, match=expected) as err:
        read_expt(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)
