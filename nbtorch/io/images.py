"""Raw float images, PGM previews, and reading observed images for refinement.

nanoBragg's ``-floatfile`` is headerless float32, little-endian, slow-major (``fpixels`` values per row, ``spixels``
rows); its ``-pgmfile`` is an 8-bit binary PGM.  :func:`read_image` loads an observed detector image (SMV natively,
raw float with a given shape, NXmx NeXus files with h5py, anything else through ``fabio``) together with a
usable-pixel mask.
"""
from __future__ import annotations

import logging
import math
import os
import re
from typing import Optional

import numpy as np

from ..units import MM_PER_M
from ._atomic import atomic_write, check_finite
from ._parse import display_name, read_bytes
from .nexus import is_nxmx, read_nxmx
from .observed import ObservedImage, observed_image
from .smv import _decode_smv

__all__ = ["read_raw_float", "write_raw_float", "write_pgm", "read_pgm", "pgm_pixels", "read_image", "ObservedImage",
           "to_photons", "printed_tolerance", "header_mismatch", "header_mismatches", "HeaderWarning",
           "HEADER_GEOMETRY"]

#: Extensions treated as headerless raw float images by :func:`read_image`.
RAW_EXTENSIONS = (".bin", ".raw", ".f32", ".flt", ".float")


#: Extensions always read natively as SMV by :func:`read_image`.
SMV_EXTENSIONS = (".img", ".smv")

#: The 8-byte signature at the start of an HDF5 file (without a user block).
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _is_hdf5(path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(8) == _HDF5_MAGIC


def _looks_like_smv(path) -> bool:
    """True for a '{' header declaring HEADER_BYTES before its '}' (EDF also starts with '{' but lacks the key)."""
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if not head.startswith(b"{"):
        return False
    end = head.find(b"}")
    return b"HEADER_BYTES" in (head[:end] if end >= 0 else head)


def _check_shape(shape, name: str) -> tuple[int, int]:
    try:
        slow, fast = (int(x) for x in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: shape must be (slow, fast), got {shape!r}") from None
    if slow < 1 or fast < 1:
        raise ValueError(f"{name}: shape must be positive, got {(slow, fast)}")
    return slow, fast


def read_raw_float(path: str | os.PathLike, shape: tuple[int, int], dtype="<f4") -> np.ndarray:
    """Read a headerless raw image such as nanoBragg's ``-floatfile``.

    Args:
        path: the file.
        shape: (slow, fast) pixel counts; the file must hold exactly slow·fast values.
        dtype: on-disk numpy dtype, default little-endian float32.

    Returns:
        array [slow, fast] of ``dtype`` in native byte order (photons/pixel for nanoBragg float images).

    Raises:
        ValueError: if the file size differs from slow·fast·itemsize (the message gives expected and actual bytes).
    """
    name = display_name(path)
    slow, fast = _check_shape(shape, name)
    dt = np.dtype(dtype)
    buf = read_bytes(path)
    expected = slow * fast * dt.itemsize
    if len(buf) != expected:
        raise ValueError(
            f"{name}: expected {expected} bytes for a {slow}x{fast} (slow x fast) {dt} image, file has {len(buf)} bytes"
        )
    return np.frombuffer(buf, dtype=dt).reshape(slow, fast).astype(dt.newbyteorder("="), copy=True)


def write_raw_float(path: str | os.PathLike, image) -> None:
    """Write a 2-D image [slow, fast] as headerless little-endian float32, slow-major (atomically)."""
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise ValueError(f"write_raw_float {display_name(path)}: image must be 2-D [slow, fast], got {arr.shape}")
    with np.errstate(over="ignore"):
        data = np.ascontiguousarray(arr, dtype="<f4")
    check_finite(data, f"write_raw_float {display_name(path)}")
    atomic_write(path, data.tobytes())


def pgm_pixels(image, scale: float) -> np.ndarray:
    """The 8-bit PGM values nanoBragg writes: min(value·scale, 255) truncated; negatives and NaN → 0.

    Args:
        image: [slow, fast] float image.
        scale: multiplier (nanoBragg's ``-pgmscale``).

    Returns:
        uint8 array [slow, fast].
    """
    v = np.asarray(image, dtype=np.float64) * float(scale)
    v = np.nan_to_num(v, nan=0.0, posinf=255.0, neginf=0.0)
    return np.floor(np.clip(v, 0.0, 255.0)).astype(np.uint8)


def write_pgm(path: str | os.PathLike, image, scale: float) -> None:
    """Write an 8-bit binary (P5) PGM preview of a [slow, fast] image (atomically).

    Header: ``P5\\n<fast> <slow>\\n# pixels scaled by <scale>\\n255\\n`` then slow·fast bytes, value =
    min(float·scale, 255) truncated (negative/NaN → 0), as nanoBragg's ``-pgmfile``.
    """
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise ValueError(f"write_pgm {display_name(path)}: image must be 2-D [slow, fast], got {arr.shape}")
    check_finite(arr, f"write_pgm {display_name(path)}")
    slow, fast = arr.shape
    head = f"P5\n{fast} {slow}\n# pixels scaled by {float(scale):f}\n255\n".encode("ascii")
    atomic_write(path, head + pgm_pixels(arr, scale).tobytes())


def read_pgm(path: str | os.PathLike) -> np.ndarray:
    """Read a binary (P5) PGM; returns uint8 [slow=height, fast=width] (uint16 big-endian data if maxval > 255).

    Raises:
        ValueError: if the file is not a complete P5 PGM.
    """
    name = display_name(path)
    buf = read_bytes(path)
    fields: list[int] = []
    pos = 0
    if not buf.startswith(b"P5"):
        raise ValueError(f"{name}: not a binary PGM (no P5 magic)")
    pos = 2
    token = re.compile(rb"(?:\s+|#[^\n]*\n)*(\d+)")
    while len(fields) < 3:
        m = token.match(buf, pos)
        if not m:
            raise ValueError(f"{name}: malformed PGM header")
        fields.append(int(m.group(1)))
        pos = m.end()
    if pos >= len(buf) or buf[pos : pos + 1] not in (b" ", b"\n", b"\r", b"\t"):
        raise ValueError(f"{name}: malformed PGM header (no whitespace after maxval)")
    pos += 1
    width, height, maxval = fields
    if not 0 < maxval < 65536 or width < 1 or height < 1:
        raise ValueError(f"{name}: invalid PGM header values {width} {height} {maxval}")
    dt = np.dtype("u1") if maxval < 256 else np.dtype(">u2")
    need = width * height * dt.itemsize
    if len(buf) - pos < need:
        raise ValueError(f"{name}: PGM needs {need} data bytes, file has {len(buf) - pos}")
    pixels = np.frombuffer(buf, dtype=dt, count=width * height, offset=pos).reshape(height, width)
    return pixels.astype(dt.newbyteorder("="))


# ---------------------------------------------------------------------------------------------------------------
# observed images


def _header_float(header: dict, key: str, name: str) -> float | None:
    for k in (key, key.lower()):
        if k in header:
            text = str(header[k]).strip()
            try:
                value = float(text.split()[0]) if text else math.nan
            except ValueError:
                raise ValueError(f"{name}: header {k}={text!r} is not a number") from None
            if not math.isfinite(value):
                raise ValueError(f"{name}: header {k}={text!r} is not a finite number")
            return value
    return None


#: Header values compared with the flags: ObservedImage field → (what, unit, SMV header key).
HEADER_GEOMETRY = {"pixel_size_mm": ("pixel size", "mm", "PIXEL_SIZE"), "distance_mm": ("distance", "mm", "DISTANCE"),
                   "wavelength_A": ("wavelength", "Å", "WAVELENGTH")}
#: Relative agreement expected of a header value stored in binary (NXmx), whose printed precision is unknown.
_BINARY_RTOL = 1e-6


_NUMBER_TEXT = re.compile(r"[-+]?(\d*)(?:\.(\d*))?(?:[eE]([-+]?\d+))?")
#: Significant digits of C's ``%g``, which nanoBragg, nbtorch and many detectors use for header numbers.
_G_DIGITS = 6


def printed_tolerance(text: str) -> Optional[float]:
    """Half a unit in the last digit of a number as printed (the first word of ``text``), counting at least
    :data:`_G_DIGITS` significant digits: C's ``%g`` drops trailing zeros, so ``"0.1"`` is read as 0.100000.
    ``"0.1"`` → 5e-7, ``"0.1000000"`` → 5e-8, ``"172e-6"`` → 5e-10, ``"100"`` → 5e-4; None when the word is not a
    decimal number (0 for a zero)."""
    words = str(text).split()
    m = _NUMBER_TEXT.fullmatch(words[0]) if words else None
    if m is None or not (m.group(1) or m.group(2)):
        return None
    ints, decs = m.group(1) or "", m.group(2) or ""
    digits = (ints + decs).lstrip("0")
    if not digits:
        return 0.0
    last = int(m.group(3) or 0) - len(decs)  # exponent of the last printed digit
    first = last + len(digits) - 1  # exponent of the first significant digit
    return 0.5 * 10.0 ** min(last, first - (_G_DIGITS - 1))


def _header_precision(header: dict) -> dict:
    """:attr:`ObservedImage.precision` of the SMV-style keys PIXEL_SIZE, DISTANCE, WAVELENGTH of ``header``."""
    out = {}
    for field, (_, _, key) in HEADER_GEOMETRY.items():
        for k in (key, key.lower()):
            if k in header and printed_tolerance(header[k]) is not None:
                out[field] = printed_tolerance(header[k])
                break
    return out


class HeaderWarning(UserWarning):
    """An image header's pixel size, distance or wavelength disagrees with the value the flags give."""


def header_mismatch(source: str, field: str, header_value: float, tolerance: Optional[float], flag: str,
                    value: float) -> Optional[str]:
    """One line when the header value of ``field`` (a key of :data:`HEADER_GEOMETRY`) and the ``value`` given by
    ``flag`` differ by more than ``tolerance`` (the header's printed precision; None: relative 1e-6), else None.
    ``source`` names the image (``"-img a.img"``)."""
    what, unit, _ = HEADER_GEOMETRY[field]
    tol = _BINARY_RTOL * abs(header_value) if tolerance is None else tolerance
    if abs(header_value - value) <= tol + 1e-12 * max(abs(header_value), abs(value)):
        return None
    return (f"{source}: the header's {what} {header_value:.10g} {unit} disagrees with {flag} {value:.10g} {unit} "
            f"(beyond the header's precision ±{tol:.2g} {unit}); the flag's value is used")


def header_mismatches(obs: "ObservedImage", source: str, given: dict) -> list:
    """:func:`header_mismatch` lines for an observed image: ``given`` maps fields of :data:`HEADER_GEOMETRY` to
    ``(flag, value)``; fields the header lacks are skipped."""
    out = []
    for field, (flag, value) in given.items():
        hv = getattr(obs, field)
        if hv is not None and value is not None:
            line = header_mismatch(source, field, float(hv), (obs.precision or {}).get(field), flag, float(value))
            if line:
                out.append(line)
    return out


_CBF_NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"


def _minicbf_metadata(text: str) -> dict[str, float]:
    """Geometry from a Dectris miniCBF header block (``# Pixel_size 172e-6 m x 172e-6 m`` etc.), SI → mm/Å; the
    printed precision of pixel size, distance and wavelength as ``precision_<field>``."""
    out: dict[str, float] = {}
    scale = {"m": MM_PER_M, "mm": 1.0}
    for field, pattern in (("pixel_size_mm", r"Pixel_size\s+" + _CBF_NUM + r"\s*(m|mm)\b"),
                           ("distance_mm", r"Detector_distance\s+" + _CBF_NUM + r"\s*(m|mm)\b"),
                           ("wavelength_A", r"Wavelength\s+" + _CBF_NUM + r"\s*(A)\b")):
        m = re.search(pattern, text)
        if m:
            factor = scale.get(m.group(2), 1.0)
            out[field] = float(m.group(1)) * factor
            out["precision_" + field] = printed_tolerance(m.group(1)) * factor
    m = re.search(r"Beam_xy\s*\(\s*" + _CBF_NUM + r"\s*,\s*" + _CBF_NUM + r"\s*\)\s*pixels", text)
    if m:
        out["beam_x_px"] = float(m.group(1))
        out["beam_y_px"] = float(m.group(2))
    m = re.search(r"Count_cutoff\s+" + _CBF_NUM, text)
    if m:
        out["overload"] = float(m.group(1))
    return out


def _read_observed_smv(buf: bytes, name: str, overload) -> ObservedImage:
    raw, header = _decode_smv(buf, name)
    if overload is None and raw.dtype == np.uint16:
        overload = 65535
    bx = _header_float(header, "BEAM_CENTER_X", name)
    by = _header_float(header, "BEAM_CENTER_Y", name)
    return observed_image(
        raw, header, overload,
        _header_float(header, "PIXEL_SIZE", name),
        _header_float(header, "DISTANCE", name),
        _header_float(header, "WAVELENGTH", name),
        (bx, by) if bx is not None and by is not None else None,
        _header_precision(header),
    )


def _fabio_open(fabio, path: str, frame: int):
    """(frame ``frame`` of the file as an array, its header as a dict of strings) through fabio's ``getframe`` (the
    image itself for frame 0); :class:`_FrameError` when the file holds fewer frames."""
    img = fabio.open(path)
    count = int(getattr(img, "nframes", 1) or 1)
    if frame >= count:
        raise _FrameError(frame, count)
    if frame > 0:
        img = img.getframe(frame)
    return np.asarray(img.data), {str(k): str(v) for k, v in dict(img.header).items()}


class _FrameError(Exception):
    """A frame beyond a multi-frame file's (``frame``, ``count``)."""

    def __init__(self, frame: int, count: int):
        super().__init__(frame, count)
        self.frame, self.count = frame, count


def _frames_text(name: str, frame: int, count: int) -> str:
    """The one line for a frame beyond a file: the file, the frame asked and how many it holds."""
    return f"{name}: no frame {frame} (0-based): the file holds {count} frame{'s' if count != 1 else ''} " \
           f"(0 to {count - 1})"


def _fabio_frame(path: str, name: str, hdf5: bool, frame: int = 0):
    """(frame ``frame`` (0-based) as an array, header dict of strings) through fabio; a frame beyond the file's, or
    any failure of fabio to read the file (a truncated CBF raises AssertionError, an HDF5 file it does not know
    NotGoodReader), is a one-line ValueError."""
    try:
        import fabio  # noqa: PLC0415 - optional dependency, imported lazily
    except ImportError as exc:
        raise ImportError(
            f"reading {name} (not SMV or raw float) needs the optional 'fabio' package: pip install nbtorch[io]"
        ) from exc
    log = logging.getLogger("fabio")
    level = log.level
    log.setLevel(logging.CRITICAL)  # fabio logs what it then raises (a checksum mismatch ...): one line is ours
    try:
        data, header = _fabio_open(fabio, path, frame)
    except _FrameError as exc:
        raise ValueError(_frames_text(name, exc.frame, exc.count)) from None
    except OSError as exc:
        if exc.errno is not None:  # the file itself cannot be read
            raise
        failure = exc
    except Exception as exc:  # noqa: BLE001 - fabio's readers raise anything on a damaged file
        failure = exc
    else:
        return data, header
    finally:
        log.setLevel(level)
    if hdf5:
        raise ValueError(f"{name}: an HDF5 file that is neither NXmx (NeXus) nor an Eiger master file: no image "
                         "found in it") from None
    why = " ".join(str(failure).split()) or type(failure).__name__
    raise ValueError(f"{name}: not a readable image (truncated or damaged, or a format fabio does not read: "
                     f"{why[:200]})") from None


def _read_observed_fabio(path: str, name: str, overload, hdf5: bool = False, frame: int = 0) -> ObservedImage:
    data, header = _fabio_frame(path, name, hdf5, frame)
    if data.ndim == 3 and data.shape[0] >= 1:  # a frame that is itself a stack (HDF5/Eiger): its first
        data = data[0]
    if data.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D image, fabio returned shape {data.shape}")
    meta = {}
    for k, v in header.items():
        if "header_contents" in k or "Pixel_size" in v:
            meta.update(_minicbf_metadata(v))
    pixel = _header_float(header, "PIXEL_SIZE", name)
    dist = _header_float(header, "DISTANCE", name)
    wl = _header_float(header, "WAVELENGTH", name)
    bx = _header_float(header, "BEAM_CENTER_X", name)
    by = _header_float(header, "BEAM_CENTER_Y", name)
    beam = (bx, by) if bx is not None and by is not None else None
    pixel = meta.get("pixel_size_mm", pixel)
    dist = meta.get("distance_mm", dist)
    wl = meta.get("wavelength_A", wl)
    precision = _header_precision(header)
    precision.update({k[len("precision_"):]: v for k, v in meta.items() if k.startswith("precision_")})
    if beam is None and pixel is not None and "beam_x_px" in meta:
        beam = (meta["beam_x_px"] * pixel, meta["beam_y_px"] * pixel)
    if overload is None:
        overload = meta.get("overload")
    return observed_image(data, header, overload, pixel, dist, wl, beam, precision)


def _number(value, what: str, positive: bool) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not math.isfinite(v) or (positive and v <= 0):
        raise ValueError(f"{what} must be a finite number{' > 0' if positive else ''}, got {value!r}")
    return v


def to_photons(obs: ObservedImage, name: str, adc: float | None = None, gain: float | None = None) -> ObservedImage:
    """``obs`` with its values in photons: (value − offset)/gain, the offset and gain from the arguments, else from
    the header (``ADC_OFFSET`` counts, ``GAIN`` counts per photon, as nbtorch writes them), else 0 and 1.  The mask
    and the saturation test stay those of the file's values."""
    head = {str(k).upper(): v for k, v in obs.header.items()}
    if adc is not None:
        adc = _number(adc, "adc (ADC offset, counts)", False)
    elif "ADC_OFFSET" in head:
        adc = _number(str(head["ADC_OFFSET"]).strip(), f"{name}: header ADC_OFFSET", False)
    if gain is not None:
        gain = _number(gain, "gain (counts per photon)", True)
    elif "GAIN" in head:
        gain = _number(str(head["GAIN"]).strip(), f"{name}: header GAIN", True)
    adc, gain = (adc or 0.0), (1.0 if gain is None else gain)
    if adc == 0.0 and gain == 1.0:
        return obs._replace(adc_offset=0.0, gain=1.0)
    return obs._replace(data=(obs.data - adc) / gain, adc_offset=adc, gain=gain)


def read_image(
    path: str | os.PathLike,
    shape: tuple[int, int] | None = None,
    *,
    overload: float | None = None,
    dtype="<f4",
    adc: float | None = None,
    gain: float | None = None,
    frame: int = 0,
) -> ObservedImage:
    """Read an observed detector image (one frame of it) with a usable-pixel mask.

    Format selection: a raw extension (``.bin``, ``.raw``, ``.f32``, ``.flt``, ``.float``) → headerless raw image of
    ``shape`` (required) and ``dtype``; ``.img``/``.smv``, or a ``{`` header declaring ``HEADER_BYTES`` → SMV, read
    natively; an HDF5 file with an NXmx entry → :func:`~nbtorch.io.nexus.read_nxmx` (h5py; first frame, geometry in
    ``ObservedImage.geometry``); otherwise if ``shape`` is given → raw; otherwise CBF/HDF5/EDF/... through ``fabio``
    (imported lazily; its ``getframe`` for a frame of a multi-frame file).

    Masking: a pixel is usable when finite, ≥ 0 (detector gaps are often −1/−2 in CBF) and not saturated.
    Saturated means ≥ ``overload``; the default overload is 65535 for ``unsigned_short`` SMV, miniCBF's
    ``Count_cutoff`` for CBF, and none otherwise.

    Geometry (None where the header lacks it): SMV ``PIXEL_SIZE`` (mm), ``DISTANCE`` (mm), ``WAVELENGTH`` (Å),
    ``BEAM_CENTER_X/Y`` (mm); the same keys from fabio headers, or miniCBF ``Pixel_size``/``Detector_distance`` (m →
    mm), ``Wavelength`` (Å) and ``Beam_xy`` (pixels × pixel size → mm, (x, y)); for NXmx the values derived from the
    detector's ``depends_on`` chain (beam centre (fast, slow) mm from the outer corner of pixel (0, 0)) and an
    NXbeam spectrum (``geometry.spectrum``: wavelengths Å and weights; the wavelength is their weighted mean).

    Photons: the values are returned as (value − ADC offset)/gain (:func:`to_photons`): the offset and gain given
    here, else the header's ``ADC_OFFSET`` and ``GAIN`` (nbtorch writes them into its ``-intfile``/``-noisefile``
    images), else 0 and 1; ``ObservedImage.adc_offset``/``gain`` say what was applied.  Masking and saturation
    apply to the file's values.

    Args:
        path: image file.
        shape: (slow, fast), needed for raw images.
        overload: saturation level overriding the default (in the file's values).
        dtype: on-disk dtype of raw images.
        adc: ADC offset (counts) to subtract, overriding the header's.
        gain: counts per photon to divide by (> 0), overriding the header's.
        frame: the frame of a multi-frame file (0-based; NXmx and other HDF5 files, fabio's multi-frame formats);
            a raw or SMV file holds one.

    Returns:
        :class:`ObservedImage` (data float64 [slow, fast], photons).

    Raises:
        ValueError: malformed SMV/raw files, missing ``shape`` for a raw file, unparseable geometry header values, a
            file fabio cannot read (truncated CBF, damaged file), an HDF5 file that is neither NXmx nor Eiger (one
            line naming the file); a frame beyond the file's (naming the frame and how many the file holds).
        ImportError: if fabio (or h5py for HDF5) is needed but not installed (``pip install nbtorch[io]``).
    """
    return to_photons(_read_values(path, shape, overload, dtype, frame), display_name(path), adc, gain)


def _single_frame(name: str, frame: int, what: str) -> None:
    """ValueError naming the file when ``frame`` > 0: a ``what`` file (raw, SMV) holds one frame."""
    if frame:
        raise ValueError(_frames_text(name, frame, 1).replace("the file holds", f"a {what} file holds"))


def _read_values(path, shape, overload, dtype, frame: int = 0) -> ObservedImage:
    """:func:`read_image` before the conversion to photons."""
    name = display_name(path)
    if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)) or frame < 0:
        raise ValueError(f"frame must be an integer >= 0 (0 = the first), got {frame!r}")
    frame = int(frame)
    ext = os.path.splitext(name)[1].lower()
    if ext in RAW_EXTENSIONS:
        if shape is None:
            raise ValueError(f"{name}: raw image needs shape=(slow, fast)")
        _single_frame(name, frame, "raw")
        return observed_image(read_raw_float(path, shape, dtype), {}, overload, None, None, None, None)
    if ext in SMV_EXTENSIONS or _looks_like_smv(path):
        _single_frame(name, frame, "SMV")
        return _read_observed_smv(read_bytes(path), name, overload)
    hdf5 = _is_hdf5(path)
    if hdf5:
        try:
            nxmx = is_nxmx(path)
        except OSError as exc:  # h5py cannot open it (truncated)
            raise ValueError(f"{name}: an unreadable HDF5 file ({' '.join(str(exc).split())})") from None
        if nxmx:
            return read_nxmx(path, overload, frame)
    if shape is not None:
        _single_frame(name, frame, "raw")
        return observed_image(read_raw_float(path, shape, dtype), {}, overload, None, None, None, None)
    return _read_observed_fabio(os.fspath(path), name, overload, hdf5, frame)
