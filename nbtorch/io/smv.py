"""SMV (ADSC) images, the format of nanoBragg's ``-intfile``/``-noisefile`` output and ``-mask``/``-img`` input.

Layout: an ASCII header ``{\\nKEY=VALUE;\\n...}\\f`` padded with spaces to ``HEADER_BYTES`` bytes, then
``SIZE2`` rows (slow) of ``SIZE1`` pixels (fast) of ``TYPE``, in ``BYTE_ORDER``.  nanoBragg writes 512-byte headers
and ``DIALS_ORIGIN=x,y,z`` without the trailing ``;``; both readers and writers here handle that.
"""
from __future__ import annotations

import math
import os
import re
from typing import Iterable, Mapping

import numpy as np

from ._atomic import atomic_write, check_finite
from ._parse import display_name, read_bytes

__all__ = ["read_smv", "write_smv", "nanobragg_header_items", "read_smv_mask", "SMV_TYPES"]

#: SMV ``TYPE`` values understood by :func:`read_smv` → numpy kind/size (byte order from ``BYTE_ORDER``).
SMV_TYPES: dict[str, str] = {
    "unsigned_short": "u2",
    "signed_short": "i2",
    "short": "i2",
    "unsigned_long": "u4",
    "signed_long": "i4",
    "long": "i4",
    "unsigned_int": "u4",
    "signed_int": "i4",
    "int": "i4",
    "unsigned_char": "u1",
    "unsigned_byte": "u1",
    "signed_char": "i1",
    "float": "f4",
    "double": "f8",
}
#: numpy kind/size → the TYPE written by :func:`write_smv`.
_DTYPE_TO_TYPE: dict[str, str] = {
    "u2": "unsigned_short",
    "i2": "signed_short",
    "u4": "unsigned_long",
    "i4": "signed_long",
    "u1": "unsigned_char",
    "i1": "signed_char",
    "f4": "float",
    "f8": "double",
}
_BYTE_ORDERS = {"little_endian": "<", "big_endian": ">"}
#: Keys nanoBragg writes without the trailing ';'.
_NO_SEMICOLON_KEYS = frozenset({"DIALS_ORIGIN"})
#: Keys write_smv derives from the data itself.
_RESERVED = ("HEADER_BYTES", "DIM", "BYTE_ORDER", "TYPE", "SIZE1", "SIZE2")
_POS_INT_RE = re.compile(r"\+?0*[1-9]\d{0,11}\Z", re.ASCII)
_HEADER_SEARCH_LIMIT = 1 << 20


def _parse_header_text(text: str) -> dict[str, str]:
    header: dict[str, str] = {}
    for entry in re.split(r"[;\n]", text):
        entry = entry.strip(" \t\r\f\v\n")
        if "=" not in entry:
            continue  # stray text in a header is ignored, as ADSC readers do
        key, _, value = entry.partition("=")
        key = key.strip(" \t\r\f\v")
        if key:
            header[key] = value.strip(" \t\r\f\v")
    return header


def _positive_int(header: Mapping[str, str], key: str, name: str, required: bool = True, default: int | None = None):
    if key not in header:
        if required:
            raise ValueError(f"{name}: SMV header has no {key}")
        return default
    value = header[key]
    if not _POS_INT_RE.match(value):
        raise ValueError(f"{name}: SMV header {key}={value!r} is not a positive integer")
    return int(value)


def _decode_smv(buf: bytes, name: str) -> tuple[np.ndarray, dict[str, str]]:
    """Parse SMV bytes (whole file) → (data [slow, fast], header); ValueError on any problem."""
    if not buf.startswith(b"{"):
        raise ValueError(f"{name}: not an SMV file (does not start with '{{')")
    end = buf.find(b"}", 0, _HEADER_SEARCH_LIMIT)
    if end < 0:
        raise ValueError(f"{name}: not an SMV file (no closing '}}' in the header)")
    header = _parse_header_text(buf[1:end].decode("latin-1"))
    hbytes = _positive_int(header, "HEADER_BYTES", name)
    if hbytes > len(buf):
        raise ValueError(f"{name}: SMV header claims HEADER_BYTES={hbytes} but the file has only {len(buf)} bytes")
    if end >= hbytes:
        raise ValueError(f"{name}: SMV header text ({end + 1} bytes) is longer than HEADER_BYTES={hbytes}")
    dim = header.get("DIM")
    if dim is not None and dim != "2":
        raise ValueError(f"{name}: SMV header DIM={dim!r} is not supported (need 2)")
    size1 = _positive_int(header, "SIZE1", name)
    size2 = _positive_int(header, "SIZE2", name)
    type_name = header.get("TYPE", "unsigned_short")
    if type_name not in SMV_TYPES:
        raise ValueError(f"{name}: unknown SMV TYPE={type_name!r} (known: {', '.join(sorted(SMV_TYPES))})")
    order = header.get("BYTE_ORDER", "little_endian")
    if order not in _BYTE_ORDERS:
        raise ValueError(f"{name}: unknown SMV BYTE_ORDER={order!r} (need little_endian or big_endian)")
    dtype = np.dtype(_BYTE_ORDERS[order] + SMV_TYPES[type_name])
    npix = size1 * size2
    need = npix * dtype.itemsize
    if hbytes + need > len(buf):
        raise ValueError(
            f"{name}: SMV header claims {size1}x{size2} {type_name} pixels = {need} data bytes after "
            f"HEADER_BYTES={hbytes} (total {hbytes + need}) but the file has only {len(buf)} bytes"
        )
    data = np.frombuffer(buf, dtype=dtype, count=npix, offset=hbytes).reshape(size2, size1)
    return data.astype(dtype.newbyteorder("="), copy=True), header


def read_smv(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, str]]:
    """Read an SMV/ADSC image.

    Args:
        path: the ``.img`` file.

    Returns:
        ``(data, header)``: ``data`` [SIZE2 = slow, SIZE1 = fast] in the file's pixel type (native byte order; e.g.
        uint16 for ``TYPE=unsigned_short``), and ``header`` a dict of every ``KEY=VALUE`` entry as strings, in file
        order (including HEADER_BYTES, DIM, BYTE_ORDER, TYPE, SIZE1, SIZE2).  Entries may end with ``;`` or a newline
        (nanoBragg's ``DIALS_ORIGIN``).  Missing TYPE means unsigned_short, missing BYTE_ORDER little_endian.
        Bytes after the pixel data are ignored.

    Raises:
        ValueError: naming the file and the problem for a non-SMV file, a missing or invalid HEADER_BYTES/SIZE1/
            SIZE2, DIM ≠ 2, an unknown TYPE or BYTE_ORDER, or a header that claims more bytes than the file has.
    """
    return _decode_smv(read_bytes(path), display_name(path))


def read_smv_mask(path: str | os.PathLike) -> np.ndarray:
    """Read an SMV ``-mask`` image: bool [slow, fast], True where the pixel is nonzero (active, rendered).

    Only the pixels are returned; use :func:`read_smv` for the header (nanoBragg also takes geometry from it).
    """
    data, _ = read_smv(path)
    return data != 0


def _format_value(key: str, value) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, (bool, np.bool_)):
        raise ValueError(f"SMV header {key}: bool values are not supported")
    elif isinstance(value, (int, np.integer)):
        text = str(int(value))
    elif isinstance(value, (float, np.floating)):
        text = "%g" % float(value)
    elif isinstance(value, (tuple, list, np.ndarray)):
        text = ",".join(_format_value(key, v) for v in np.asarray(value).reshape(-1).tolist())
    else:
        raise ValueError(f"SMV header {key}: unsupported value type {type(value).__name__}")
    if any(c in text for c in ";\n}") or text != text.strip(" \t\r\f\v"):
        raise ValueError(f"SMV header {key}: value {text!r} contains ';', newline, '}}' or edge whitespace")
    return text


def write_smv(
    path: str | os.PathLike,
    data,
    header_items: Mapping[str, object] | Iterable[tuple[str, object]] | None = None,
) -> None:
    """Write an SMV image in nanoBragg's exact byte layout (atomically).

    The header is ``{\\nHEADER_BYTES=512;\\nDIM=2;\\nBYTE_ORDER=little_endian;\\nTYPE=<type>;\\nSIZE1=<fast>;\\n
    SIZE2=<slow>;\\n`` then one ``KEY=VALUE;\\n`` line per item (``DIALS_ORIGIN`` without the ``;``, as nanoBragg
    writes it), then ``}\\f``, padded with spaces to 512 bytes (or the next multiple of 512 if the items do not fit).
    Pixels follow little-endian, slow-major.

    Args:
        path: destination file.
        data: 2-D array [slow, fast]; dtype uint16 (→ unsigned_short), int16, uint32 (→ unsigned_long),
            int32 (→ signed_long), uint8, int8, float32 (→ float) or float64 (→ double).  Cast before calling
            (nanoBragg's images are uint16).
        header_items: dict or list of (key, value) pairs, in order.  ``str`` values are written verbatim, ints with
            ``str``, floats with C's ``%g`` (6 significant digits, as nanoBragg), sequences comma-joined.  Items with
            the reserved keys HEADER_BYTES/DIM/BYTE_ORDER/TYPE/SIZE1/SIZE2 (e.g. a header dict from
            :func:`read_smv`) are checked against the data and not repeated (HEADER_BYTES and BYTE_ORDER are simply
            replaced: the pixels are always re-encoded little-endian).

    Raises:
        ValueError: on a non-2-D array, an unsupported dtype, a reserved item that disagrees with the data, or a
            key/value containing characters that would break the header.
    """
    name = display_name(path)
    arr = np.asarray(data)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"write_smv {name}: data must be a non-empty 2-D array [slow, fast], got shape {arr.shape}")
    check_finite(arr, f"write_smv {name}")
    code = arr.dtype.kind + str(arr.dtype.itemsize)
    if code not in _DTYPE_TO_TYPE:
        raise ValueError(f"write_smv {name}: unsupported dtype {arr.dtype} (supported: {sorted(_DTYPE_TO_TYPE)})")
    slow, fast = arr.shape
    fixed = {"DIM": "2", "BYTE_ORDER": "little_endian", "TYPE": _DTYPE_TO_TYPE[code], "SIZE1": str(fast),
             "SIZE2": str(slow)}
    items = list(header_items.items()) if isinstance(header_items, Mapping) else list(header_items or [])
    body = []
    for item in items:
        key, value = item
        key = str(key)
        if not key or any(c in key for c in "=;\n{}") or key != key.strip(" \t\r\f\v"):
            raise ValueError(f"write_smv {name}: invalid header key {key!r}")
        text = _format_value(key, value)
        if key in _RESERVED:
            if key not in ("HEADER_BYTES", "BYTE_ORDER") and text != fixed[key]:
                raise ValueError(f"write_smv {name}: header item {key}={text!r} disagrees with the data ({fixed[key]})")
            continue
        body.append(f"{key}={text}\n" if key in _NO_SEMICOLON_KEYS else f"{key}={text};\n")
    hbytes = 512
    while True:
        head = (
            f"{{\nHEADER_BYTES={hbytes};\nDIM=2;\nBYTE_ORDER=little_endian;\nTYPE={fixed['TYPE']};\n"
            f"SIZE1={fast};\nSIZE2={slow};\n" + "".join(body) + "}\f"
        )
        if len(head) <= hbytes:
            break
        hbytes = 512 * math.ceil(len(head) / 512)
    try:
        head_bytes = head.ljust(hbytes, " ").encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"write_smv {name}: header text must be Latin-1") from None
    pixels = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
    atomic_write(path, head_bytes + pixels)


def nanobragg_header_items(
    *,
    pixel_size_mm: float,
    distance_mm: float,
    wavelength_A: float,
    beam_center_x_mm: float,
    beam_center_y_mm: float,
    adxv_center_x_mm: float,
    adxv_center_y_mm: float,
    mosflm_center_x_mm: float,
    mosflm_center_y_mm: float,
    denzo_x_beam_mm: float,
    denzo_y_beam_mm: float,
    dials_origin_mm: tuple[float, float, float],
    xds_orgx_px: float,
    xds_orgy_px: float,
    close_distance_mm: float,
    phi_deg: float,
    osc_start_deg: float,
    osc_range_deg: float,
    twotheta_deg: float,
    detector_sn: str = "000",
    beamline: str = "fake",
) -> list[tuple[str, str]]:
    """The header items nanoBragg writes after SIZE2, formatted as nanoBragg does (C ``%g``).

    The values are what the spec's SMV-header paragraph lists (all lengths in mm, angles in degrees, λ in Å, ORGX/ORGY
    in pixels): ``ADXV_CENTER = (Fbeam, detsize_s − Sbeam)``, ``MOSFLM_CENTER = (Sbeam − p/2, Fbeam − p/2)``,
    ``DENZO_X/Y_BEAM = (Sbeam, Fbeam)``, ``DIALS_ORIGIN`` a 3-vector (written comma-separated, without ``;``).
    Pass the result to :func:`write_smv`; ``write_smv(p, img_u16, nanobragg_header_items(...))`` reproduces
    nanoBragg's intimage.img byte for byte.

    Returns:
        list of (KEY, value-string) pairs in nanoBragg's order, ending with DETECTOR_SN and BEAMLINE.
    """
    g = lambda x: "%g" % float(x)  # noqa: E731
    origin = tuple(dials_origin_mm)
    if len(origin) != 3:
        raise ValueError(f"dials_origin_mm must have 3 components, got {len(origin)}")
    return [
        ("PIXEL_SIZE", g(pixel_size_mm)),
        ("DISTANCE", g(distance_mm)),
        ("WAVELENGTH", g(wavelength_A)),
        ("BEAM_CENTER_X", g(beam_center_x_mm)),
        ("BEAM_CENTER_Y", g(beam_center_y_mm)),
        ("ADXV_CENTER_X", g(adxv_center_x_mm)),
        ("ADXV_CENTER_Y", g(adxv_center_y_mm)),
        ("MOSFLM_CENTER_X", g(mosflm_center_x_mm)),
        ("MOSFLM_CENTER_Y", g(mosflm_center_y_mm)),
        ("DENZO_X_BEAM", g(denzo_x_beam_mm)),
        ("DENZO_Y_BEAM", g(denzo_y_beam_mm)),
        ("DIALS_ORIGIN", ",".join(g(v) for v in origin)),
        ("XDS_ORGX", g(xds_orgx_px)),
        ("XDS_ORGY", g(xds_orgy_px)),
        ("CLOSE_DISTANCE", g(close_distance_mm)),
        ("PHI", g(phi_deg)),
        ("OSC_START", g(osc_start_deg)),
        ("OSC_RANGE", g(osc_range_deg)),
        ("TWOTHETA", g(twotheta_deg)),
        ("DETECTOR_SN", str(detector_sn)),
        ("BEAMLINE", str(beamline)),
    ]
