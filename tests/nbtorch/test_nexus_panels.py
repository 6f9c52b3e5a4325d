"""NXmx files of panel detectors (nbtorch.io.nexus: one NXdetector_module per panel) read back as [P, S, F] with
their layout, and observed images of panel detectors in every file layout (refine.targets.observed.read_observed)."""
from __future__ import annotations

import dataclasses
import math
import pathlib

import numpy as np
import pytest
import torch

h5py = pytest.importorskip("h5py")

import nbtorch  # noqa: E402
import nbtorch.io as nio  # noqa: E402
from nbtorch.detector import with_panels  # noqa: E402
from nbtorch.io.crystfel import read_geom, slab_to_panels  # noqa: E402
from nbtorch.io.dials import parse_expt  # noqa: E402
from nbtorch.io.nexus import nxmx_geometry, nxmx_layout, write_nxmx  # noqa: E402
from nbtorch.panels import (  # noqa: E402
    PanelSpec,
    layout_from_crystfel,
    layout_from_dials,
    make_layout,
    panel_lab_vectors,
)
from nbtorch.pixels import panel_extent_mask  # noqa: E402
from nbtorch.simulate import pixel_lab_positions  # noqa: E402
from refine.targets.observed import read_observed  # noqa: E402

DATA = pathlib.Path(__file__).parents[1] / "data"
P = 0.2  # mm
CRYSTAL = "-default_F 100 -cell 50 60 70 90 95 90 -N 5 -lambda 1 -misset 10 20 30"


def _layout(beam_z: float = 1.0):
    """Three panels of unequal sizes at ~100 mm along the beam (+z or −z): one turned in plane, one left-handed and
    tilted; two of them in a group."""
    c, s = math.cos(0.3), math.sin(0.3)
    z = 100.0 * beam_z
    panels = [PanelSpec("a", (-10.0, -12.0, z), (P, 0.0, 0.0), (0.0, P, 0.0), 12, 10),
              PanelSpec("b", (6.0, -5.0, z + beam_z), (0.0, P, 0.0), (-P, 0.0, 0.0), 9, 10),
              PanelSpec("c", (-1.0, 6.0, z - beam_z), (-P, 0.0, 0.0), (0.0, P * c, P * s), 12, 7)]
    return make_layout(panels, {"all": ["g1", "c"], "g1": ["a", "b"]}, "all", (0.0, 0.0, beam_z))


def _model(beam_z: float = 1.0, polar: str = "1 0 0", moved: bool = False):
    """(params, setup) of :func:`_layout`, the detector moved as a whole and its groups moved when ``moved``."""
    sign = "" if beam_z > 0 else "-"
    params, setup = nbtorch.from_nanobragg_args(
        f"{CRYSTAL} -beam_vector 0 0 {sign}1 -polar_vector {polar} -polar 0.7 -fdet_vector 1 0 0 -sdet_vector 0 1 0 "
        f"-odet_vector 0 0 {sign}1 -distance 100 -detpixels 8 -pixel {P}", dtype=torch.float64)
    params, setup = with_panels(params, setup, _layout(beam_z))
    if moved:
        g = torch.arange(len(setup.panels.nodes) * 3, dtype=torch.float64).reshape(-1, 3)
        det = params.detector._replace(distance=params.detector.distance + 1.5,
                                       beam_center=torch.tensor([0.3, -0.2], dtype=torch.float64),
                                       rotation=torch.tensor([0.5, -0.3, 1.0], dtype=torch.float64),
                                       group_shift=0.05 * torch.sin(g), group_rotation=0.4 * torch.cos(g))
        params = params._replace(detector=det)
    return params, setup


def _nodes(layout):
    return [(n.name, n.level, n.parent, n.panels) for n in layout.nodes]


@pytest.mark.parametrize("moved", [False, True])
def test_panel_image_and_layout_round_trip(tmp_path, moved):
    params, setup = _model(moved=moved)
    image = nbtorch.simulate(params, setup, fused=False)
    assert image.shape == (3, 10, 12)
    path = tmp_path / "panels.h5"
    write_nxmx(path, image, params, setup, saturation_value=1e9)
    obs = nio.read_image(path)
    np.testing.assert_array_equal(obs.data, image.numpy())
    assert obs.size == (12, 10) and obs.header["definition"] == "NXmx"
    np.testing.assert_array_equal(obs.mask, panel_extent_mask(setup))  # the padding of b and c is not usable
    assert obs.pixel_size_mm == pytest.approx(P, rel=1e-15) and obs.wavelength_A == pytest.approx(1.0, rel=1e-15)
    assert obs.distance_mm == pytest.approx(float(params.detector.distance), rel=1e-15)
    assert obs.beam_center_mm is None
    lay = nxmx_layout(obs.geometry)
    want = panel_lab_vectors(setup.panels, params.detector, setup.beam, setup.twotheta_axis)
    got = [torch.tensor([getattr(p, k) for p in lay.panels], dtype=torch.float64) for k in ("corner", "fast", "slow")]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-9)
    assert [(p.name, p.fpixels, p.spixels) for p in lay.panels] == [(p.name, p.fpixels, p.spixels)
                                                                    for p in setup.panels.panels]
    assert lay.root == "all" and _nodes(lay) == _nodes(setup.panels) and lay.beam == (0.0, 0.0, 1.0)
    if not moved:
        assert lay == setup.panels  # the file's layout is the set-up's


def test_masked_pixels_come_back_unusable(tmp_path):
    params, setup = _model()
    mask = np.ones(setup.image_shape, np.uint8)
    mask[1, 2, 3] = mask[2, 6, 0] = 0
    masked = setup.replace(mask=mask.tobytes())
    write_nxmx(tmp_path / "m.h5", np.ones(setup.image_shape, np.float32), params, masked, saturation_value=5)
    with h5py.File(tmp_path / "m.h5", "r") as f:
        pm = f["/entry/instrument/detector/pixel_mask"][()].reshape(setup.image_shape)
    assert pm[1, 2, 3] == pm[2, 6, 0] == 256 and pm[0].max() == 0  # user mask; padding is a gap (bit 0)
    obs = nio.read_image(tmp_path / "m.h5")
    np.testing.assert_array_equal(obs.mask, panel_extent_mask(setup) & (mask != 0))
    assert nio.read_image(tmp_path / "m.h5", overload=1.0).mask.sum() == 0  # every pixel at the overload


def test_dials_hierarchy_round_trip(tmp_path):
    """A DIALS detector (lab frame with the beam along −z, non-square pixels, a nested hierarchy) comes back from
    its NXmx file as the same layout."""
    expts = parse_expt((DATA / "dials" / "hierarchy.expt").read_bytes(), "hierarchy.expt")
    layout = layout_from_dials(expts.detector_of(0), expts.beam_of(0).direction)
    layout = dataclasses.replace(layout, panels=tuple(dataclasses.replace(p, thickness_um=None, mu_per_um=None)
                                                      for p in layout.panels))  # NXmx: one sensor per detector
    flags = f"{CRYSTAL} -beam_vector 0 0 -1 -polar_vector 1 0 0 -odet_vector 0 0 -1 -distance 100 -detpixels 8"
    params, setup = nbtorch.from_nanobragg_args(flags, dtype=torch.float64)
    params, setup = with_panels(params, setup, layout)
    image = np.random.default_rng(2).uniform(0, 1, setup.image_shape) * panel_extent_mask(setup)
    write_nxmx(tmp_path / "d.h5", image, params, setup)
    obs = nio.read_image(tmp_path / "d.h5")
    np.testing.assert_array_equal(obs.data, image)
    lay = nxmx_layout(obs.geometry)
    assert _nodes(lay) == _nodes(layout) and lay.root == layout.root and lay.beam == (0.0, 0.0, -1.0)
    for a, b in zip(lay.panels, layout.panels):
        np.testing.assert_allclose(np.array([a.corner, a.fast, a.slow]), np.array([b.corner, b.fast, b.slow]),
                                   rtol=0, atol=1e-9)
        assert (a.fpixels, a.spixels) == (b.fpixels, b.spixels)
    assert obs.geometry.modules[0].pixel_size_mm == pytest.approx((0.1, 0.2), rel=1e-14)


def _nexus_pixel_centres(path):
    """Every module's pixel centres [P][S_k, F_k, 3] in the NeXus frame, found as DIALS's NXmx reader (the ``nxmx``
    package) walks the depends_on chains, the data array's shape, and the stored lab → NeXus rotation."""
    nxmx = pytest.importorskip("nxmx")
    with h5py.File(path, "r") as f:
        det = nxmx.NXmx(f).entries[0].instruments[0].detectors[0]
        out = []
        for module in det.modules:
            A = nxmx.get_cumulative_transformation(nxmx.get_dependency_chain(module.fast_pixel_direction.depends_on))[0]
            fast = A[:3, :3] @ module.fast_pixel_direction.vector
            slow = A[:3, :3] @ module.slow_pixel_direction.vector
            pf = module.fast_pixel_direction[()].to("mm").magnitude.item()
            ps = module.slow_pixel_direction[()].to("mm").magnitude.item()
            (o0, o1), (n0, n1) = module.data_origin, module.data_size
            jj, ii = np.meshgrid(np.arange(n0) + 0.5, np.arange(n1) + 0.5, indexing="ij")
            out.append(((int(o0), int(o1)), A[:3, 3] + ii[..., None] * pf * fast + jj[..., None] * ps * slow))
        shape = f["/entry/data/data"].shape
        R = f["/entry/nbtorch/lab_to_nexus"][()]
    return [c for _, c in sorted(out, key=lambda t: t[0])], shape, R


@pytest.mark.parametrize("beam_z, polar, frame, stokes", [
    (1.0, "1 0 0", np.eye(3), [1.0, 0.7, 0.0, 0.0]),  # CrystFEL's frame is McStas's: E along x
    (1.0, "0 1 0", np.eye(3), [1.0, -0.7, 0.0, 0.0]),  # E vertical
    (-1.0, "1 0 0", np.diag([-1.0, 1.0, -1.0]), [1.0, 0.7, 0.0, 0.0]),  # DIALS: 180° about y, +y stays up
])
def test_module_vectors_put_every_pixel_where_the_kernel_does(tmp_path, beam_z, polar, frame, stokes):
    params, setup = _model(beam_z, polar, moved=True)
    path = tmp_path / "m.nxs"
    write_nxmx(path, np.ones(setup.image_shape, np.float32), params, setup)
    centres, shape, R = _nexus_pixel_centres(path)
    np.testing.assert_allclose(R, frame, atol=1e-15)  # lab (y up) → McStas (z along the beam, y up)
    assert shape == (1, 3 * 10, 12)  # panels stacked along slow
    one = setup.replace(oversample=1, thicksteps=1)  # one sample per pixel: its centre
    for k, (c, panel) in enumerate(zip(centres, setup.panels.panels)):
        assert c.shape == (panel.spixels, panel.fpixels, 3)
        i = torch.arange(panel.spixels * panel.fpixels)
        lab = pixel_lab_positions(params, one, i % panel.fpixels, i // panel.fpixels, k)[:, 0, 0].numpy()
        np.testing.assert_allclose(c.reshape(-1, 3) @ R, lab, rtol=0, atol=1e-9)  # R.T @ v for every row
    with h5py.File(path, "r") as f:
        np.testing.assert_allclose(f["/entry/instrument/beam/incident_polarization_stokes"][0], stokes, atol=1e-15)
        mods = [f[f"/entry/instrument/detector/module_00{k}"] for k in range(3)]
        assert [list(m["data_origin"][()]) for m in mods] == [[0, 0], [10, 0], [20, 0]]
        assert [list(m["data_size"][()]) for m in mods] == [[10, 12], [10, 9], [7, 12]]
        pm = f["/entry/instrument/detector/pixel_mask"][()]
        assert pm.shape == (30, 12) and pm[10, 9] == 1 and pm[27, 0] == 1 and pm[:10].max() == 0  # padding: gap


def test_one_panel_files_keep_one_module(tmp_path):
    params, setup = nbtorch.from_nanobragg_args("-cell 50 60 70 90 95 90 -default_F 100 -N 3 -lambda 1.1 -distance 90 "
                                                "-pixel 0.2 -detpixels_f 40 -detpixels_s 30 -detector_rotx 3 -Xbeam 2",
                                                dtype=torch.float64)
    path = tmp_path / "one.h5"
    write_nxmx(path, np.zeros((30, 40), np.float32), params, setup)
    with h5py.File(path, "r") as f:
        det = f["/entry/instrument/detector"]
        assert sorted(det) == sorted(["data", "depends_on", "description", "distance", "distance_derived",
                                      "beam_center_x", "beam_center_y", "beam_center_derived", "sensor_material",
                                      "sensor_thickness", "type", "pixel_mask", "pixel_mask_applied",
                                      "transformations", "module"])
        chain = det["module/fast_pixel_direction"].attrs["depends_on"]
        assert chain == "/entry/instrument/detector/module/module_offset"
        assert "panel_names" not in f["/entry/nbtorch"] and det["data"].shape == (1, 30, 40)
    obs = nio.read_image(path)
    assert obs.data.shape == (30, 40) and len(obs.geometry.modules) == 1 and obs.geometry.panel_tree is None
    assert obs.geometry.modules[0].data_origin == (0, 0) and obs.geometry.modules[0].image_size == (40, 30)
    # nanoBragg's detector as a one-panel layout: the pixel centres the kernel uses
    lay = nxmx_layout(obs.geometry)
    assert lay.beam == pytest.approx(setup.beam, abs=1e-15) and [n.name for n in lay.nodes] == ["module"]
    p = lay.panels[0]
    i = torch.tensor([0, 41, 1199])
    centre = np.array(p.corner) + (i % 40 + 0.5).numpy()[:, None] * p.fast + (i // 40 + 0.5).numpy()[:, None] * p.slow
    lab = pixel_lab_positions(params, setup.replace(oversample=1), i % 40, i // 40)[:, 0, 0].numpy()
    np.testing.assert_allclose(centre, lab, rtol=0, atol=1e-9)


def _edit(path, change):
    with h5py.File(path, "r+") as f:
        change(f)


def _set(key, value):
    def change(f):
        del f[key]
        f[key] = value
    return change


def _attr(key, attr, value):
    def change(f):
        f[key].attrs[attr] = value
    return change


MOD = "/entry/instrument/detector/module_00"


@pytest.mark.parametrize("change, message", [
    (lambda f: f.__delitem__(MOD + "1/fast_pixel_direction"), r"module_001 has no fast_pixel_direction"),
    (lambda f: f.__delitem__(MOD + "2/data_size"), r"module_002 has no data_size"),
    (_set(MOD + "1/data_origin", np.array([0, 0])), r"module_00[01] and .*module_00[01] cover the same pixels"),
    (_set(MOD + "2/data_origin", np.array([25, 5])), r"data_origin \[25, 5\] \+ data_size \[7, 12\] lies outside the "
                                                     r"image frames of shape \[30, 12\]"),
    (_set(MOD + "0/data_origin", np.array([0, 0, 0])), r"modules' data_origin have different lengths \[2, 3\]"),
    (lambda f: [_set(MOD + f"{k}/data_origin", np.array([0, 10 * k, 0]))(f) for k in range(3)],
     r"module_000: data_origin \[0, 0, 0\] and data_size \[10, 12\] must have 3 values for image frames of shape "
     r"\[1, 30, 12\]"),
    (_attr(MOD + "1/module_offset", "depends_on", "/entry/nowhere"), r"depends_on '/entry/nowhere', which is not in"),
    (_attr(MOD + "0/slow_pixel_direction", "vector", np.zeros(3)), r"slow_pixel_direction needs a non-zero "
                                                                    r"3-component vector"),
    (_set("/entry/instrument/detector/pixel_mask", np.zeros((3, 10, 12))), r"pixel_mask has shape \[3, 10, 12\] "
                                                                            r"but the image frames \[30, 12\]"),
    (lambda f: [f["/entry/instrument/detector"].__delitem__(f"module_00{k}") for k in range(3)],
     r"has no NXdetector_module"),
])
def test_bad_multi_module_files_are_one_line_errors(tmp_path, change, message):
    params, setup = _model()
    path = tmp_path / "bad.h5"
    write_nxmx(path, np.ones(setup.image_shape), params, setup)
    _edit(path, change)
    with pytest.raises(ValueError, match=message) as err:
        nio.read_image(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_writer_refuses_what_it_cannot_write_before_writing(tmp_path):
    params, setup = _model()
    path = tmp_path / "w.h5"
    with pytest.raises(ValueError, match=r"image shape \(10, 12\) is not \(panels, spixels, fpixels\) = \(3, 10, 12\)"):
        write_nxmx(path, np.ones((10, 12)), params, setup)
    own = [PanelSpec(*[getattr(p, k) for k in ("name", "corner", "fast", "slow", "fpixels", "spixels")],
                     thickness_um=t, mu_per_um=0.001) for p, t in zip(setup.panels.panels, (300.0, 300.0, 450.0))]
    mixed = setup.replace(panels=make_layout(own, {"all": ["g1", "c"], "g1": ["a", "b"]}, "all"), thicksteps=2)
    with pytest.raises(ValueError, match=r"different sensor thicknesses .* give sensor_thickness_mm"):
        nxmx_geometry(params, mixed)
    with pytest.raises(ValueError, match="different sensor thicknesses"):
        write_nxmx(path, np.ones(mixed.image_shape), params, mixed)
    assert not path.exists()
    write_nxmx(path, np.ones(mixed.image_shape), params, mixed, sensor_thickness_mm=0.3)
    assert nio.read_image(path).geometry.sensor_thickness_mm == 0.3


def test_modules_along_a_module_axis_and_in_any_group_order(tmp_path):
    """A file laid out as other writers do it — frames [1, P, S, F] with 3-value data_origin, module groups named
    out of data order — reads as the same [P, S, F] image and geometry."""
    params, setup = _model(moved=True)
    image = np.random.default_rng(3).uniform(1, 2, setup.image_shape) * panel_extent_mask(setup)
    path = tmp_path / "axis.h5"
    write_nxmx(path, image, params, setup)
    before = nio.read_image(path)

    def to_module_axis(f):
        det = f["/entry/instrument/detector"]
        del f["/entry/data/data"], det["data"], f["/entry/nbtorch/panel_names"], f["/entry/nbtorch/panel_tree"]
        det["data"] = image[None]
        f["/entry/data/data"] = det["data"]
        del det["pixel_mask"]
        det["pixel_mask"] = np.zeros(image.shape, np.uint32)
        for k, new in enumerate(["z_first", "m_second", "a_third"]):
            det.move(f"module_00{k}", new)
            size = det[f"{new}/data_size"][()]
            del det[f"{new}/data_origin"], det[f"{new}/data_size"]
            det[f"{new}/data_origin"] = np.array([k, 0, 0])
            det[f"{new}/data_size"] = np.array([1, *size])
            for axis in ("fast_pixel_direction", "slow_pixel_direction"):
                det[f"{new}/{axis}"].attrs["depends_on"] = f"/entry/instrument/detector/{new}/module_offset"

    _edit(path, to_module_axis)
    obs = nio.read_image(path)
    np.testing.assert_array_equal(obs.data, image)
    assert [m.name for m in obs.geometry.modules] == ["z_first", "m_second", "a_third"]
    for m, b in zip(obs.geometry.modules, before.geometry.modules):
        np.testing.assert_allclose(np.concatenate([m.origin_mm, m.fast_axis, m.slow_axis]),
                                   np.concatenate([b.origin_mm, b.fast_axis, b.slow_axis]), rtol=0, atol=1e-12)
    assert [n.name for n in nxmx_layout(obs.geometry).nodes] == ["z_first", "m_second", "a_third"]


# ----------------------------------------------------------------------------------------------------------------
# observed images of panel detectors

GEOM = """clen = 0.1 m
photon_energy = 12398.4 eV
res = 5000
data = /data/data
dim0 = %
dim1 = ss
dim2 = fs
mask = /data/mask
mask_good = 0x1
mask_bad = 0x0
top/min_fs = 0
top/max_fs = 5
top/min_ss = 0
top/max_ss = 3
top/corner_x = -3
top/corner_y = 1
top/fs = x
top/ss = y
bottom/min_fs = 0
bottom/max_fs = 5
bottom/min_ss = 5
bottom/max_ss = 8
bottom/corner_x = 3
bottom/corner_y = -1
bottom/fs = -x
bottom/ss = -y
bad_corner/min_fs = 0
bad_corner/max_fs = 1
bad_corner/min_ss = 5
bad_corner/max_ss = 5
bad_corner/panel = bottom
"""


@pytest.fixture
def crystfel_model(tmp_path):
    """(params, setup, geometry, slab [9, 6]) of a two-panel CrystFEL detector whose slab has an unused row 4."""
    (tmp_path / "det.geom").write_text(GEOM)
    geom = read_geom(tmp_path / "det.geom")
    params, setup = nbtorch.from_nanobragg_args(f"{CRYSTAL} -beam_vector 0 0 1 -polar_vector 1 0 0 -fdet_vector 1 0 0 "
                                                "-sdet_vector 0 1 0 -odet_vector 0 0 1 -distance 100 -detpixels 8",
                                                dtype=torch.float64)
    params, setup = with_panels(params, setup, layout_from_crystfel(geom))
    slab = np.arange(1.0, 55.0).reshape(9, 6)
    return params, setup, geom, slab


def test_read_observed_cuts_slabs_into_panels(tmp_path, crystfel_model):
    params, setup, geom, slab = crystfel_model
    want = slab_to_panels(slab, geom)
    assert setup.image_shape == (2, 4, 6)
    nio.write_raw_float(tmp_path / "slab.bin", slab)
    nio.write_smv(tmp_path / "slab.img", slab.astype(np.uint16))
    with h5py.File(tmp_path / "slab.h5", "w") as f:
        f["/data/data"] = slab[None]
        mask = np.ones((9, 6), np.int32)
        mask[2, 3] = 0  # top (fs 3, ss 2) lacks the good bit
        f["/data/mask"] = mask
    for name in ("slab.bin", "slab.img", "slab.h5"):
        obs = read_observed(str(tmp_path / name), setup, params, geometry=geom)
        np.testing.assert_array_equal(obs.data, want)
        assert obs.data.shape == (2, 4, 6) and obs.size == (6, 4)
        assert not obs.mask[1, 0, :2].any() and obs.mask[1, 0, 2:].all()  # bad_corner, from the geometry
        assert obs.mask[0, 2, 3] == (name != "slab.h5")  # the data file's mask, read with an HDF5 image
        assert obs.mask.sum() == 48 - 2 - (name == "slab.h5")


def test_read_observed_takes_stacks_and_nxmx(tmp_path):
    params, setup = _model()
    image = np.random.default_rng(1).uniform(1, 9, setup.image_shape) * panel_extent_mask(setup)
    stacked = image.reshape(30, 12)
    with h5py.File(tmp_path / "stack.h5", "w") as f:
        f["/data/data"] = image
    with h5py.File(tmp_path / "frames.h5", "w") as f:
        f["/data/data"] = np.stack([image, 2 * image])
    nio.write_smv(tmp_path / "stack.img", np.rint(stacked).astype(np.uint16))
    nio.write_raw_float(tmp_path / "stack.bin", stacked)
    write_nxmx(tmp_path / "nx.h5", image, params, setup)
    for name, want in (("stack.h5", image), ("frames.h5", image), ("nx.h5", image),
                       ("stack.img", np.rint(image)), ("stack.bin", image.astype(np.float32))):
        obs = read_observed(str(tmp_path / name), setup)
        np.testing.assert_array_equal(obs.data, want)
        np.testing.assert_array_equal(obs.mask, panel_extent_mask(setup))  # padding is never usable


def test_read_observed_panel_errors_name_file_and_shapes(tmp_path, crystfel_model):
    params, setup, geom, slab = crystfel_model
    nio.write_smv(tmp_path / "small.img", slab[:7].astype(np.uint16))
    with pytest.raises(ValueError) as err:
        read_observed(str(tmp_path / "small.img"), setup, geometry=geom, label="OBSERVED")
    assert str(err.value) == (f"OBSERVED {tmp_path / 'small.img'} is [7, 6] but the model's panel detector needs "
                              "[P, S, F] = [2, 4, 6], panels stacked along slow [8, 6] or the geometry's data slab "
                              "[9, 6]")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["/entry/image"] = slab
    with pytest.raises(ValueError, match=r"^LIST line 2: .*other\.h5: an HDF5 file without the image dataset "
                                         r"/data/data") as err:
        read_observed(str(tmp_path / "other.h5"), setup, geometry=geom, label="LIST line 2:")
    params2, setup2 = _model()
    nio.write_smv(tmp_path / "wrong.img", np.ones((9, 6), np.uint16))
    with pytest.raises(ValueError) as err:
        read_observed(str(tmp_path / "wrong.img"), setup2, label="OBSERVED")
    assert str(err.value) == (f"OBSERVED {tmp_path / 'wrong.img'} is [9, 6] but the model's panel detector needs "
                              "[P, S, F] = [3, 10, 12], panels stacked along slow [30, 12]")
