"""DIALS reflection tables (``.refl``) without DIALS: read, build and write.

A ``.refl`` file is one msgpack document ``["dials::af::reflection_table", VERSION, {"identifiers": {id: text},
"nrows": N, "data": {name: [TYPE, [N, BLOB]]}}]``; each BLOB is the column's N rows as little-endian C values, the
components of a row adjacent.  Column types understood here, with their components per row:

============================  =======================  ==============================================
type name                      numpy                    typical columns
============================  =======================  ==============================================
``double``                     float64                  ``intensity.sum.value``, ``d``
``int``                        int32                    ``id``
``std::size_t``                uint64                   ``panel``, ``flags``
``bool``                       bool                     ``entering``
``vec2<double>``               float64 × 2
``vec3<double>``               float64 × 3              ``xyzobs.px.value``, ``xyzcal.mm``, ``s1``
``mat3<double>``               float64 × 9
``int6``                       int32 × 6                ``bbox`` (x0, x1, y0, y1, z0, z1; ends exclusive)
``cctbx::miller::index<>``     int32 × 3                ``miller_index``
``std::string``                object (str)
============================  =======================  ==============================================

Columns of any other type (``Shoebox<>``: pixel data of each spot) are kept as they were read and written back
unchanged (:attr:`ReflectionTable.opaque`).  ``xyzobs.px.value`` counts pixels from the panel's corner (the centre
of the first pixel is 0.5); the third component is the image (frame) coordinate.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from ._atomic import atomic_write
from ._parse import display_name, read_bytes

TAG = "dials::af::reflection_table"
#: The format versions read (DIALS writes 1); :func:`write_reflections` writes the first.
VERSIONS = (1, 2)
#: Column type name → (numpy dtype of one component, components per row).
COLUMN_TYPES: Dict[str, Tuple[str, int]] = {
    "double": ("<f8", 1), "int": ("<i4", 1), "std::size_t": ("<u8", 1), "bool": ("|b1", 1),
    "vec2<double>": ("<f8", 2), "vec3<double>": ("<f8", 3), "mat3<double>": ("<f8", 9), "int6": ("<i4", 6),
    "cctbx::miller::index<>": ("<i4", 3),
}
STRING_TYPE = "std::string"
#: DIALS's types of the columns that nbtorch writes or reads by name (others are inferred from the array).
KNOWN_COLUMNS: Dict[str, str] = {
    "id": "int", "panel": "std::size_t", "flags": "std::size_t", "miller_index": "cctbx::miller::index<>",
    "bbox": "int6", "entering": "bool", "xyzobs.px.value": "vec3<double>", "xyzobs.px.variance": "vec3<double>",
    "xyzobs.mm.value": "vec3<double>", "xyzcal.px": "vec3<double>", "xyzcal.mm": "vec3<double>",
    "s1": "vec3<double>", "d": "double",
}
#: DIALS's reflection flags (bits of the ``flags`` column).
FLAGS: Dict[str, int] = {
    "predicted": 1 << 0, "observed": 1 << 1, "indexed": 1 << 2, "used_in_refinement": 1 << 3, "strong": 1 << 5,
    "reference_spot": 1 << 6, "dont_integrate": 1 << 7, "integrated_sum": 1 << 8, "integrated_prf": 1 << 9,
}


class ReflectionFileError(ValueError):
    """A ``.refl`` file that cannot be read or a table that cannot be written; the message names file and key."""


@dataclasses.dataclass(frozen=True)
class ReflectionTable:
    """A reflection table: ``columns`` name → numpy array ``[N]`` or ``[N, k]`` (types in ``types``),
    ``identifiers`` experiment id → identifier text (may be empty), ``opaque`` columns of types not decoded (kept as
    read), ``source`` the file name for messages."""

    nrows: int
    columns: Mapping[str, np.ndarray]
    types: Mapping[str, str]
    identifiers: Mapping[int, str] = dataclasses.field(default_factory=dict)
    opaque: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    source: str = "reflection table"

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.columns:
            have = ", ".join(sorted(self.columns)) or "none"
            raise ReflectionFileError(f"{self.source}: no column {name!r} (columns: {have})")
        return self.columns[name]

    def __contains__(self, name: str) -> bool:
        return name in self.columns

    def has_flag(self, flag: str) -> np.ndarray:
        """Rows whose ``flags`` column has ``flag`` (a key of :data:`FLAGS`) → bool ``[N]``."""
        if flag not in FLAGS:
            raise ValueError(f"unknown reflection flag {flag!r}; known: {', '.join(FLAGS)}")
        return (self["flags"] & np.uint64(FLAGS[flag])) != 0

    def select(self, rows) -> "ReflectionTable":
        """The table of the rows ``rows`` (bool mask ``[N]`` or indices); opaque columns are left out (their rows
        cannot be told apart without decoding them)."""
        idx = np.arange(self.nrows)[np.asarray(rows)]
        cols = {k: v[idx] for k, v in self.columns.items()}
        return dataclasses.replace(self, nrows=int(idx.size), columns=cols, opaque={})

    def with_columns(self, **columns) -> "ReflectionTable":
        """A copy with ``columns`` (name → array of N rows) added or replaced; types as :func:`table_from_columns`
        infers them.  Names with dots are passed as a dict: ``table.with_columns(**{"xyzcal.px": xyz})``."""
        new = table_from_columns(columns, nrows=self.nrows, source=self.source)
        return dataclasses.replace(self, columns={**self.columns, **new.columns}, types={**self.types, **new.types})


def _infer_type(name: str, a: np.ndarray) -> str:
    if name in KNOWN_COLUMNS:
        return KNOWN_COLUMNS[name]
    width = 1 if a.ndim == 1 else a.shape[1]
    if a.dtype == bool and width == 1:
        return "bool"
    if a.dtype.kind == "f":
        match = {1: "double", 2: "vec2<double>", 3: "vec3<double>", 9: "mat3<double>"}
    elif a.dtype.kind == "u":
        match = {1: "std::size_t"}
    elif a.dtype.kind == "i":
        match = {1: "int", 3: "cctbx::miller::index<>", 6: "int6"}
    elif a.dtype.kind in "OU":
        match = {1: STRING_TYPE}
    else:
        match = {}
    if width not in match:
        raise ReflectionFileError(f"column {name!r}: no DIALS column type holds {a.dtype} rows of {width} values")
    return match[width]


def _as_column(name: str, kind: str, values, nrows: int, source: str) -> np.ndarray:
    if kind == STRING_TYPE:
        out = np.asarray(list(values), dtype=object)
    else:
        dtype, k = COLUMN_TYPES[kind]
        out = np.asarray(values).astype(np.dtype(dtype).newbyteorder("="), copy=False)
        out = out.reshape(nrows, k) if k > 1 else out.reshape(nrows)
    if out.shape[0] != nrows:
        raise ReflectionFileError(f"{source}: column {name!r} has {out.shape[0]} rows, the table {nrows}")
    return out


def table_from_columns(columns: Mapping[str, Any], identifiers: Optional[Mapping[int, str]] = None,
                       nrows: Optional[int] = None, source: str = "reflection table") -> ReflectionTable:
    """A :class:`ReflectionTable` from arrays (name → ``[N]`` or ``[N, k]``); each column's DIALS type is its
    known one (:data:`KNOWN_COLUMNS`) or inferred from dtype and width.  ``nrows`` defaults to the first column's."""
    arrays = {k: np.asarray(v) for k, v in columns.items()}
    n = nrows if nrows is not None else (next(iter(arrays.values())).shape[0] if arrays else 0)
    types = {k: _infer_type(k, a) for k, a in arrays.items()}
    cols = {k: _as_column(k, types[k], a, n, source) for k, a in arrays.items()}
    return ReflectionTable(n, cols, types, dict(identifiers or {}), {}, source)


def _decode_column(name: str, entry, nrows: int, where: str) -> Tuple[str, Optional[np.ndarray]]:
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)):
        raise ReflectionFileError(f"{where}: data[{name!r}] must be [type, [rows, values]]")
    kind, payload = entry
    if kind not in COLUMN_TYPES and kind != STRING_TYPE:
        return kind, None
    if not (isinstance(payload, (list, tuple)) and len(payload) == 2 and payload[0] == nrows):
        raise ReflectionFileError(f"{where}: data[{name!r}] ({kind}) must hold [{nrows}, values] (nrows = {nrows})")
    if kind == STRING_TYPE:
        return kind, _as_column(name, kind, payload[1], nrows, where)
    dtype, k = COLUMN_TYPES[kind]
    blob = payload[1]
    want = nrows * k * np.dtype(dtype).itemsize
    if not isinstance(blob, (bytes, bytearray)) or len(blob) != want:
        got = len(blob) if isinstance(blob, (bytes, bytearray)) else type(blob).__name__
        raise ReflectionFileError(f"{where}: data[{name!r}] ({kind}) has {got} bytes, expected {want} "
                                  f"({nrows} rows × {k} × {np.dtype(dtype).itemsize})")
    return kind, _as_column(name, kind, np.frombuffer(blob, dtype=dtype), nrows, where)


def _msgpack():
    try:
        import msgpack  # noqa: PLC0415 - optional dependency, imported lazily
    except ImportError as exc:
        raise ImportError("reading and writing DIALS .refl files needs the optional 'msgpack' package: "
                          "pip install nbtorch[io]") from exc
    return msgpack


def _unpack(raw: bytes, where: str):
    try:
        doc = _msgpack().unpackb(raw, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for damaged input
        raise ReflectionFileError(f"{where}: not a msgpack document ({type(exc).__name__}: {exc})") from None
    if not (isinstance(doc, list) and len(doc) == 3 and doc[0] == TAG):
        raise ReflectionFileError(f"{where}: not a DIALS reflection table (expected [{TAG!r}, version, {{…}}])")
    if doc[1] not in VERSIONS or not isinstance(doc[2], dict):
        raise ReflectionFileError(f"{where}: reflection table version {doc[1]!r} is not one of {VERSIONS}")
    return doc[2]


def parse_reflections(raw: bytes, name: str = "reflection table") -> ReflectionTable:
    """A :class:`ReflectionTable` from the bytes of a ``.refl`` file (``name`` for messages)."""
    body = _unpack(raw, name)
    for key in ("nrows", "data"):
        if key not in body:
            raise ReflectionFileError(f"{name}: missing key {key!r}")
    nrows, data = body["nrows"], body["data"]
    if not (isinstance(nrows, int) and nrows >= 0 and isinstance(data, dict)):
        raise ReflectionFileError(f"{name}: 'nrows' must be a count and 'data' a map of columns")
    ids = body.get("identifiers", body.get("experiment_identifiers")) or {}
    if not isinstance(ids, dict):
        raise ReflectionFileError(f"{name}: 'identifiers' must map experiment ids to text")
    cols, types, opaque = {}, {}, {}
    for col, entry in data.items():
        kind, values = _decode_column(col, entry, nrows, name)
        types[col] = kind
        if values is None:
            opaque[col] = entry
        else:
            cols[col] = values
    return ReflectionTable(nrows, cols, types, {int(k): str(v) for k, v in ids.items()}, opaque, name)


def read_reflections(path: str | os.PathLike) -> ReflectionTable:
    """Read a DIALS ``.refl`` file → :class:`ReflectionTable`; :class:`ReflectionFileError` (one line naming the
    file and key) for a file that is not one or is damaged."""
    return parse_reflections(read_bytes(path), display_name(path))


def format_reflections(table: ReflectionTable) -> bytes:
    """The bytes of ``table`` as a ``.refl`` file (version 1, DIALS's layout)."""
    data: Dict[str, Any] = {}
    for col, values in table.columns.items():
        kind = table.types[col]
        values = _as_column(col, kind, values, table.nrows, table.source)
        if kind == STRING_TYPE:
            data[col] = [kind, [table.nrows, [str(v) for v in values]]]
        else:
            blob = np.ascontiguousarray(values, dtype=COLUMN_TYPES[kind][0]).tobytes()
            data[col] = [kind, [table.nrows, blob]]
    data.update(table.opaque)
    body = {"identifiers": {int(k): str(v) for k, v in table.identifiers.items()}, "nrows": int(table.nrows),
            "data": data}
    return _msgpack().packb([TAG, VERSIONS[0], body], use_bin_type=True)


def write_reflections(path: str | os.PathLike, table: ReflectionTable) -> None:
    """Write ``table`` as a DIALS ``.refl`` file (atomically: a failed write leaves no partial file)."""
    atomic_write(path, format_reflections(table))
