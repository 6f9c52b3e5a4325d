"""NXmx NeXus output (nbtorch.io.nexus) and reading it back through nbtorch.io.read_image."""
from __future__ import annotations

import numpy as np
import pytest
import torch

h5py = pytest.importorskip("h5py")

import nbtorch  # noqa: E402
from nbtorch.detector import detector_frame  # noqa: E402
from nbtorch.io import read_image  # noqa: E402
from nbtorch.io.nexus import lab_to_nexus, nxmx_geometry, read_nxmx, write_nxmx  # noqa: E402
from nbtorch.simulate import pixel_lab_positions  # noqa: E402

#: Everything the NXmx application definition (NeXus definitions 2024) requires, at the paths write_nxmx uses:
#: groups with their NX_class, fields, and the attributes the definition lists for them.
REQUIRED = {
    "/entry": "NXentry",
    "/entry/data": "NXdata",
    "/entry/sample": "NXsample",
    "/entry/instrument": "NXinstrument",
    "/entry/instrument/detector": "NXdetector",
    "/entry/instrument/detector/module": "NXdetector_module",
    "/entry/instrument/beam": "NXbeam",
    "/entry/source": "NXsource",
}
REQUIRED_FIELDS = [
    "/entry/definition", "/entry/start_time", "/entry/end_time_estimated", "/entry/data/data",
    "/entry/sample/name", "/entry/sample/depends_on", "/entry/instrument/name",
    "/entry/instrument/detector/sensor_material", "/entry/instrument/detector/sensor_thickness",
    "/entry/instrument/detector/module/data_origin", "/entry/instrument/detector/module/data_size",
    "/entry/instrument/detector/module/fast_pixel_direction", "/entry/instrument/detector/module/slow_pixel_direction",
    "/entry/instrument/beam/incident_wavelength", "/entry/source/name",
]
AXIS_ATTRS = ["transformation_type", "vector", "offset", "depends_on", "units"]

BASE = "-cell 50 60 70 90 95 90 -default_F 100 -N 3 -lambda 1.1 -distance 90 -pixel 0.2 -detpixels_f 40 -detpixels_s 30"


def setup_of(extra: str):
    params, setup = nbtorch.from_nanobragg_args(f"{BASE} {extra}")[:2]
    return params, setup


def text(ds) -> str:
    v = ds[()]
    return v.decode() if isinstance(v, bytes) else str(v)


def beam_hit(frame, setup):
    """(Fbeam, Sbeam, distance) where the direct beam meets the detector plane, from the kernel's frame."""
    pix0, f, s, o = (x.detach().numpy() for x in (frame.pix0, frame.fdet, frame.sdet, frame.odet))
    beam = np.asarray(setup.beam, dtype=np.float64)
    t = (pix0 @ o) / (beam @ o)
    hit = t * beam - pix0
    return hit @ f, hit @ s, t


@pytest.mark.parametrize("extra", [
    "-detector_rotx 3 -detector_roty -2 -detector_rotz 1 -twotheta 5 -Xbeam 2.5 -Ybeam 3.5 -phi 10 -osc 0.5",
    "-dials -ORGX 15.5 -ORGY 12.25 -detector_rotx 2 -twotheta 4",
    "-xds -ORGX 20 -ORGY 10 -detector_thick 320 -detector_abs 500",
])
def test_write_read_round_trip_of_image_and_geometry(tmp_path, extra):
    params, setup = setup_of(extra)
    image = nbtorch.simulate(params, setup)
    path = tmp_path / "sim.h5"
    write_nxmx(path, image, params, setup, saturation_value=1e9)
    obs = read_image(path)
    np.testing.assert_array_equal(obs.data, image.numpy())
    assert obs.data.shape == (30, 40) and obs.size == (40, 30) and obs.header["definition"] == "NXmx"
    frame = detector_frame(params.detector, setup)
    fb, sb, t = beam_hit(frame, setup)
    assert obs.pixel_size_mm == 0.2 and obs.wavelength_A == pytest.approx(1.1, rel=1e-15)
    assert obs.distance_mm == pytest.approx(t, rel=1e-12)
    assert obs.beam_center_mm == pytest.approx((fb, sb), rel=1e-12, abs=1e-12)
    g = obs.geometry
    R = g.lab_to_nexus
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-15)
    np.testing.assert_allclose(R.T @ g.fast_axis, frame.fdet.numpy(), atol=1e-12)
    np.testing.assert_allclose(R.T @ g.slow_axis, frame.sdet.numpy(), atol=1e-12)
    np.testing.assert_allclose(R.T @ g.origin_mm, frame.pix0.numpy(), atol=1e-9)
    np.testing.assert_allclose(R.T @ g.beam, setup.beam, atol=1e-15)
    np.testing.assert_allclose(R.T @ g.spindle, setup.spindle, atol=1e-15)
    assert g.pixel_size_mm == (0.2, 0.2) and g.image_size == (40, 30)
    assert g.phi_deg == pytest.approx(setup.phi0) and g.osc_deg == pytest.approx(setup.phistep * setup.phisteps)
    assert g.sensor_material == "Si" and g.sensor_thickness_mm == pytest.approx(setup.thickness_um * 1e-3)
    assert g.saturation_value == 1e9
    assert obs.mask.all()


def test_mosflm_frame_maps_to_nanobraggs_dials_origin():
    params, setup = setup_of("-detector_rotz 7 -Xbeam 4 -Ybeam 5")
    R = lab_to_nexus(setup)
    np.testing.assert_allclose(R, [[0, 0, -1], [0, 1, 0], [1, 0, 0]], atol=1e-15)
    g = nxmx_geometry(params, setup)
    pix0 = detector_frame(params.detector, setup).pix0.numpy()
    dials_origin = np.array([pix0 @ [0, 0, 1], pix0 @ [0, 1, 0], pix0 @ [-1, 0, 0]])  # nanoBragg's DIALS_ORIGIN
    imgcif_from_mcstas = np.diag([-1.0, 1.0, -1.0])
    np.testing.assert_allclose(imgcif_from_mcstas @ g.origin_mm, dials_origin, atol=1e-12)
    np.testing.assert_allclose(g.beam, [0, 0, 1], atol=1e-15)  # NXmx readers assume the beam along +z
    np.testing.assert_allclose(imgcif_from_mcstas @ g.spindle, [1, 0, 0], atol=1e-15)  # DIALS's rotation axis


def test_every_required_nxmx_field_is_written(tmp_path):
    params, setup = setup_of("")
    write_nxmx(tmp_path / "r.nxs", np.zeros((30, 40), np.float32), params, setup)
    with h5py.File(tmp_path / "r.nxs", "r") as f:
        for path, nx_class in REQUIRED.items():
            assert path in f, path
            assert f[path].attrs["NX_class"] == nx_class, path
        for path in REQUIRED_FIELDS:
            assert path in f, path
        assert text(f["/entry/definition"]) == "NXmx"
        for path in ("/entry/start_time", "/entry/end_time_estimated"):
            assert text(f[path]).endswith("Z")
        assert f["/entry/data/data"].shape == (1, 30, 40)
        assert f["/entry/instrument/detector/sensor_thickness"].attrs["units"] == "mm"
        assert f["/entry/instrument/beam/incident_wavelength"].attrs["units"] == "angstrom"
        assert f["/entry/instrument/beam/incident_wavelength"][()] == pytest.approx(1.1)
        for axis in ("fast_pixel_direction", "slow_pixel_direction"):
            ds = f[f"/entry/instrument/detector/module/{axis}"]
            for attr in AXIS_ATTRS:
                assert attr in ds.attrs, (axis, attr)
            assert ds.attrs["transformation_type"] == "translation" and ds[()] == pytest.approx(0.2)
        # every depends_on resolves, ending at "."
        for start in ("/entry/instrument/detector/module/fast_pixel_direction", "/entry/sample/transformations/phi"):
            ds, hops = f[start], 0
            while ds.attrs["depends_on"] != ".":
                ds, hops = f[ds.attrs["depends_on"]], hops + 1
            assert hops < 5
        assert text(f["/entry/sample/depends_on"]) in f
        assert text(f["/entry/instrument/detector/depends_on"]) in f
        np.testing.assert_array_equal(f["/entry/instrument/detector/module/data_size"][()], [30, 40])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.nxs"]  # no temporary file left behind


def test_write_is_atomic_and_checks_before_writing(tmp_path):
    params, setup = setup_of("")
    path = tmp_path / "keep.h5"
    path.write_bytes(b"old content")
    with pytest.raises(ValueError, match=r"keep\.h5: image shape \(40, 30\) is not \(spixels, fpixels\)"):
        write_nxmx(path, np.zeros((40, 30)), params, setup)
    curved = setup.replace(curved_det=True)
    with pytest.raises(ValueError, match="curved detector"):
        write_nxmx(path, np.zeros((30, 40)), params, curved)
    with pytest.raises(ValueError, match="saturation_value must be finite"):
        write_nxmx(path, np.zeros((30, 40)), params, setup, saturation_value=float("inf"))
    assert path.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.h5"]


def test_roi_pixels_are_masked_and_saturation_read_back(tmp_path):
    params, setup = setup_of("-roi 5 20 3 12")
    image = nbtorch.simulate(params, setup).numpy()
    image[4, 6] = 1e9
    write_nxmx(tmp_path / "roi.h5", image, params, setup, saturation_value=1e8)
    obs = read_image(tmp_path / "roi.h5")
    inside = np.zeros((30, 40), dtype=bool)
    inside[3:13, 5:21] = True
    np.testing.assert_array_equal(obs.saturated, image >= 1e8)
    np.testing.assert_array_equal(obs.mask, inside & (image < 1e8))
    assert read_image(tmp_path / "roi.h5", overload=1e10).mask[4, 6]


def test_tensor_images_keep_dtype_and_torch_params(tmp_path):
    params, setup = setup_of("")
    image = torch.arange(1200, dtype=torch.float32).reshape(30, 40)
    write_nxmx(tmp_path / "t.h5", image, params, setup, compression="gzip", count_time_s=0.1,
               metadata={"command": "nbtorch -cell 50 60 70 90 95 90"})
    with h5py.File(tmp_path / "t.h5", "r") as f:
        assert f["/entry/data/data"].dtype == np.float32
        assert f["/entry/instrument/detector/count_time"][()] == pytest.approx(0.1)
        assert text(f["/entry/nbtorch/command"]).startswith("nbtorch -cell")
    np.testing.assert_array_equal(read_image(tmp_path / "t.h5").data, image.numpy())


def test_reader_follows_units_and_rejects_missing_ones(tmp_path):
    params, setup = setup_of("-detector_roty 4 -Xbeam 3 -Ybeam 4")
    path = tmp_path / "u.h5"
    write_nxmx(path, np.ones((30, 40)), params, setup)
    ref = read_nxmx(path).geometry
    with h5py.File(path, "r+") as f:  # the same geometry in metres and radians, as another writer might put it
        mo = f["/entry/instrument/detector/module/module_offset"]
        value = mo[()]
        mo[()] = value * 1e-3
        mo.attrs["units"] = "m"
        wl = f["/entry/instrument/beam/incident_wavelength"]
        wl[()] = wl[()] * 0.1
        wl.attrs["units"] = "nm"
        phi = f["/entry/sample/transformations/phi"]
        phi[...] = np.radians(phi[()])
        phi.attrs["units"] = "rad"
    g = read_nxmx(path).geometry
    np.testing.assert_allclose(g.origin_mm, ref.origin_mm, rtol=1e-12)
    assert g.wavelength_A == pytest.approx(ref.wavelength_A) and g.distance_mm == pytest.approx(ref.distance_mm)
    assert g.phi_deg == pytest.approx(ref.phi_deg, abs=1e-12)
    with h5py.File(path, "r+") as f:
        del f["/entry/instrument/beam/incident_wavelength"].attrs["units"]
    with pytest.raises(ValueError, match=r"u\.h5: /entry/instrument/beam/incident_wavelength has units None"):
        read_image(path)


def test_hdf5_without_nxmx_entry_is_not_read_as_nxmx(tmp_path):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f["data"] = np.zeros((2, 2))
    with pytest.raises(ValueError, match=r"plain\.h5: not an NXmx file \(no NXentry"):
        read_nxmx(path)
    text_file = tmp_path / "x.txt"
    text_file.write_text("not hdf5")
    with pytest.raises(ValueError, match=r"x\.txt: not an NXmx file \(not HDF5\)"):
        read_nxmx(text_file)


def test_missing_h5py_names_the_extra(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "h5py":
            raise ImportError("No module named 'h5py'")
        return real_import(name, *args, **kwargs)

    params, setup = setup_of("")
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"h5py.*pip install nbtorch\[io\]"):
        write_nxmx(tmp_path / "x.h5", np.zeros((30, 40)), params, setup)
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("extra", ["-detector_rotx 3 -detector_roty -2 -twotheta 5 -Xbeam 2.5 -Ybeam 3.5 -phi 10",
                                   "-dials -ORGX 15.5 -ORGY 12.25 -detector_rotz 2"])
def test_dials_nxmx_reader_sees_the_simulated_geometry(tmp_path, extra):
    """DIALS's own NXmx reader (the ``nxmx`` package behind dxtbx) reads the file, and the detector it builds the way
    dxtbx does gives every pixel the scattering vector length the kernel used."""
    nxmx = pytest.importorskip("nxmx")
    params, setup = setup_of(extra)
    write_nxmx(tmp_path / "d.h5", np.zeros((30, 40), np.float32), params, setup, saturation_value=65535)
    with h5py.File(tmp_path / "d.h5", "r") as f:
        entry = nxmx.NXmx(f).entries[0]
        assert entry.definition == "NXmx" and entry.source.name and entry.samples[0].name
        det = entry.instruments[0].detectors[0]
        module = det.modules[0]
        assert det.sensor_material == "Si" and det.saturation_value == 65535
        assert tuple(int(x) for x in module.data_size[::-1]) == (40, 30)  # dxtbx's (fast, slow) image size
        wavelength = entry.instruments[0].beams[0].incident_wavelength.to("angstrom").magnitude
        chain = nxmx.get_dependency_chain(module.fast_pixel_direction.depends_on)
        A = nxmx.get_cumulative_transformation(chain)[0]
        origin, R = A[:3, 3], A[:3, :3]
        fast = R @ module.fast_pixel_direction.vector
        slow = R @ module.slow_pixel_direction.vector
        pixel = module.fast_pixel_direction[()].to("mm").magnitude.item()
        axes = nxmx.get_rotation_axes(nxmx.get_dependency_chain(entry.samples[0].depends_on))
    assert wavelength == pytest.approx(1.1) and pixel == pytest.approx(0.2)
    assert axes.angles[0] == pytest.approx(setup.phi0)
    ii, jj = np.meshgrid(np.arange(40) + 0.5, np.arange(30) + 0.5)
    pos = origin + ii[..., None] * pixel * fast + jj[..., None] * pixel * slow  # pixel centres, NeXus frame
    s1 = pos / np.linalg.norm(pos, axis=-1, keepdims=True)
    q_nexus = np.linalg.norm(s1 - np.array([0.0, 0.0, 1.0]), axis=-1) / wavelength
    k = torch.arange(30 * 40)
    centres = setup.replace(oversample=1, thicksteps=1)  # one sample per pixel: its centre
    kpos = pixel_lab_positions(params, centres, k % 40, k // 40)[:, 0, 0].numpy().reshape(30, 40, 3)
    d = kpos / np.linalg.norm(kpos, axis=-1, keepdims=True)
    q_kernel = np.linalg.norm(d - np.asarray(setup.beam), axis=-1) / 1.1
    np.testing.assert_allclose(q_nexus, q_kernel, rtol=1e-12)
    # and the rotation axis keeps its angle to every scattering vector
    cos_nexus = ((s1 - [0, 0, 1]) @ axes.axes[0]) / np.linalg.norm(s1 - [0, 0, 1], axis=-1)
    cos_kernel = ((d - np.asarray(setup.beam)) @ np.asarray(setup.spindle)) / np.linalg.norm(
        d - np.asarray(setup.beam), axis=-1)
    np.testing.assert_allclose(cos_nexus, cos_kernel, atol=1e-12)
