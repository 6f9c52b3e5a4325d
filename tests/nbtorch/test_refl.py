"""DIALS reflection tables: a file packed by hand the way DIALS lays it out is decoded column by column, tables
round-trip through the writer (undecoded columns such as shoeboxes unchanged), and damaged files get one-line
errors naming the file and the key."""
from __future__ import annotations

import msgpack
import numpy as np
import pytest

from nbtorch.io.refl import (FLAGS, ReflectionFileError, format_reflections, parse_reflections, read_reflections,
                             table_from_columns, write_reflections)

N = 3
HKL = np.array([[1, -2, 3], [0, 0, 7], [-4, 5, -6]], dtype="<i4")
XYZ = np.array([[10.5, 20.25, 0.5], [100.0, 3.5, 0.5], [7.75, 8.0, 0.5]])
BBOX = np.array([[8, 13, 18, 23, 0, 1], [98, 103, 1, 6, 0, 1], [5, 11, 6, 10, 0, 1]], dtype="<i4")
FLAG_VALUES = np.array([FLAGS["indexed"] | FLAGS["strong"], FLAGS["strong"], FLAGS["predicted"]], dtype="<u8")


def _col(kind, array):
    return [kind, [N, np.ascontiguousarray(array).tobytes()]]


def _dials_bytes(**change):
    """A table packed as DIALS packs one: text as msgpack str, blobs as bin, little-endian rows."""
    data = {
        "id": _col("int", np.array([0, 0, 1], dtype="<i4")),
        "panel": _col("std::size_t", np.array([0, 2, 1], dtype="<u8")),
        "flags": _col("std::size_t", FLAG_VALUES),
        "miller_index": _col("cctbx::miller::index<>", HKL),
        "xyzobs.px.value": _col("vec3<double>", XYZ.astype("<f8")),
        "bbox": _col("int6", BBOX),
        "entering": _col("bool", np.array([True, False, True])),
        "intensity.sum.value": _col("double", np.array([1e3, 2.5, -1.0], dtype="<f8")),
        "shoebox": ["Shoebox<>", [N, [[0, [1, 2, 3, 4, 0, 1], b"\x00" * 8, b"", b""]] * N]],
    }
    body = {"identifiers": {0: "exp-a", 1: "exp-b"}, "nrows": N, "data": data}
    body.update(change)
    return msgpack.packb(["dials::af::reflection_table", 1, body], use_bin_type=True)


def test_a_dials_layout_file_decodes_column_by_column(tmp_path):
    path = tmp_path / "strong.refl"
    path.write_bytes(_dials_bytes())
    t = read_reflections(path)
    assert t.nrows == N and dict(t.identifiers) == {0: "exp-a", 1: "exp-b"}
    np.testing.assert_array_equal(t["miller_index"], HKL)
    np.testing.assert_array_equal(t["xyzobs.px.value"], XYZ)
    np.testing.assert_array_equal(t["bbox"], BBOX)
    np.testing.assert_array_equal(t["panel"], [0, 2, 1])
    np.testing.assert_array_equal(t["id"], [0, 0, 1])
    assert t["entering"].dtype == bool and list(t["entering"]) == [True, False, True]
    assert list(t.has_flag("strong")) == [True, True, False] and list(t.has_flag("indexed")) == [True, False, False]
    assert "shoebox" not in t and t.types["shoebox"] == "Shoebox<>"
    with pytest.raises(ReflectionFileError, match=r"strong\.refl: no column 'zeta' \(columns: bbox, "):
        t["zeta"]


def test_tables_round_trip_with_undecoded_columns_unchanged(tmp_path):
    raw = _dials_bytes()
    t = parse_reflections(raw, "in.refl")
    assert msgpack.unpackb(format_reflections(t), strict_map_key=False) == msgpack.unpackb(raw, strict_map_key=False)
    out = tmp_path / "out.refl"
    xyzcal = XYZ + 0.25
    write_reflections(out, t.with_columns(**{"xyzcal.px": xyzcal}))
    back = read_reflections(out)
    assert back.types["xyzcal.px"] == "vec3<double>" and back.opaque["shoebox"] == t.opaque["shoebox"]
    np.testing.assert_array_equal(back["xyzcal.px"], xyzcal)
    sub = back.select(back.has_flag("strong"))
    assert sub.nrows == 2 and not sub.opaque
    np.testing.assert_array_equal(sub["miller_index"], HKL[:2])


def test_tables_built_from_arrays_get_dials_types_and_empty_identifiers():
    t = table_from_columns({"miller_index": HKL.astype(np.int64), "panel": [0, 1, 2], "id": [0, 0, 0],
                            "xyzcal.mm": XYZ, "d": [3.0, 2.0, 1.5], "label": np.array(["a", "b", "c"])})
    assert t.types == {"miller_index": "cctbx::miller::index<>", "panel": "std::size_t", "id": "int",
                       "xyzcal.mm": "vec3<double>", "d": "double", "label": "std::string"}
    back = parse_reflections(format_reflections(t))
    assert dict(back.identifiers) == {} and list(back["label"]) == ["a", "b", "c"]
    np.testing.assert_array_equal(back["miller_index"], HKL)
    with pytest.raises(ReflectionFileError, match=r"column 'odd': no DIALS column type holds float64 rows of 4"):
        table_from_columns({"odd": np.zeros((2, 4))})


@pytest.mark.parametrize("raw, message", [
    (b"\xc1 not msgpack", r"bad\.refl: not a msgpack document"),
    (msgpack.packb(["something_else", 1, {}]), r"bad\.refl: not a DIALS reflection table"),
    (msgpack.packb(["dials::af::reflection_table", 7, {}]), r"bad\.refl: reflection table version 7"),
    (_dials_bytes(nrows=4), r"bad\.refl: data\['id'\] \(int\) must hold \[4, values\]"),
    (msgpack.packb(["dials::af::reflection_table", 1, {"nrows": 1}]), r"bad\.refl: missing key 'data'"),
    (msgpack.packb(["dials::af::reflection_table", 1, {"nrows": 1, "data": {
        "xyzobs.px.value": ["vec3<double>", [1, b"\x00" * 20]]}}], use_bin_type=True),
     r"bad\.refl: data\['xyzobs\.px\.value'\] \(vec3<double>\) has 20 bytes, expected 24"),
])
def test_damaged_files_get_one_line_errors_naming_file_and_key(tmp_path, raw, message):
    path = tmp_path / "bad.refl"
    path.write_bytes(raw)
    with pytest.raises(ReflectionFileError, match=message) as err:
        read_reflections(path)
    assert "\n" not in str(err.value)
