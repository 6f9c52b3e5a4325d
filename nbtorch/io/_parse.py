"""Shared helpers for the strict text parsers in :mod:`nbtorch.io` (private).

All parsers read the file as bytes, split on ``\\n`` only, decode each line as UTF-8 and split it on ASCII
whitespace only, so that every malformed input ends in a :class:`ValueError` that names the file, the 1-based line
number and the offending text.
"""
from __future__ import annotations

import math
import os
import re
from typing import Iterator

#: A decimal number as C's strtod would read it (no nan/inf, no hex, no underscores).
_FLOAT_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\Z", re.ASCII)
_INT_RE = re.compile(r"[+-]?\d+\Z", re.ASCII)
_NONFINITE_RE = re.compile(r"[+-]?(?:nan|inf|infinity)\Z", re.ASCII | re.IGNORECASE)
_WS = " \t\r\f\v"
_WS_SPLIT = re.compile(r"[ \t\r\f\v]+")
#: Miller indices and other integers must fit a C int.
INT_LIMIT = 2**31 - 1


def display_name(path) -> str:
    """The file name used in error messages."""
    try:
        return os.fspath(path) if not isinstance(path, bytes) else path.decode("utf-8", "replace")
    except TypeError:
        return str(path)


def shorten(text: str, limit: int = 120) -> str:
    """``repr`` of ``text``, cut to ``limit`` characters."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return repr(text)


def line_error(name: str, lineno: int, problem: str, text: str) -> ValueError:
    """A ValueError ``"<file>, line <n>: <problem>: '<text>'"``."""
    return ValueError(f"{name}, line {lineno}: {problem}: {shorten(text)}")


def iter_token_lines(raw: bytes, name: str, comments: bool = True) -> Iterator[tuple[int, str, list[str]]]:
    """Yield ``(lineno, text, tokens)`` for each non-blank line (and, if ``comments``, not starting with ``#``)."""
    for lineno, bline in enumerate(raw.split(b"\n"), 1):
        try:
            text = bline.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{name}, line {lineno}: not valid UTF-8 text: {bline[:120]!r}") from None
        stripped = text.strip(_WS)
        if not stripped:
            continue
        if comments and stripped.startswith("#"):
            continue
        yield lineno, text, _WS_SPLIT.split(stripped)


def parse_float(tok: str, name: str, lineno: int, text: str, what: str, allow_nan: bool = False) -> float:
    """Parse one decimal token as a finite float (or NaN for ``nan`` if ``allow_nan``); else ValueError."""
    if _FLOAT_RE.match(tok):
        value = float(tok)
        if not math.isfinite(value):
            raise line_error(name, lineno, f"{what} {tok!r} overflows a double", text)
        return value
    if _NONFINITE_RE.match(tok):
        if allow_nan and tok.lstrip("+-").lower() == "nan":
            return math.nan
        raise line_error(name, lineno, f"{what} must be finite, got {tok!r}", text)
    raise line_error(name, lineno, f"{what} is not a number: {tok!r}", text)


def parse_index(tok: str, name: str, lineno: int, text: str, what: str) -> int:
    """Parse an integer token (an integral decimal such as ``2.0`` is accepted); else ValueError."""
    if _INT_RE.match(tok) and len(tok) <= 12:
        value = int(tok)
    else:
        f = parse_float(tok, name, lineno, text, what)
        if f != math.floor(f):
            raise line_error(name, lineno, f"{what} is not an integer: {tok!r}", text)
        if abs(f) > INT_LIMIT:
            raise line_error(name, lineno, f"{what} {tok!r} is out of range", text)
        value = int(f)
    if abs(value) > INT_LIMIT:
        raise line_error(name, lineno, f"{what} {tok!r} is out of range", text)
    return value


def read_bytes(path) -> bytes:
    """The whole file as bytes (OSError propagates)."""
    with open(path, "rb") as fh:
        return fh.read()
