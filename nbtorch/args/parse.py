"""nanoBragg command-line tokens → :class:`NanoBraggArgs`, validated from the flag table.

Flags are matched exactly or through their aliases (never by substring, unlike the C program, spec Q13).  Every value
is checked here, before any work: its kind (a count must be an integer), that it is finite, and that it lies in the
flag's allowed range; messages name the flag (or the SMV header field a value came from) and the range.
"""
from __future__ import annotations

import difflib
import math
import os
import shlex
from typing import List, Mapping, Sequence, Union

from ..setup_checks import plain
from .table import ALIASES, FLAGS, Flag

__all__ = ["NanoBraggArgs", "parse_args", "canonical_flag", "parse_value", "last_flag", "FLAG_VALUE", "fmt_num",
           "missing_inputs", "range_phrase"]

#: In a :func:`last_flag` mapping: the state is the flag's own value (``-pivot beam``).
FLAG_VALUE = object()


class NanoBraggArgs(dict):
    """Parsed flags: canonical flag name → value, plus ``order`` (the canonical flags in argv order).

    Values: a float (``real``), an int (``count``, ``int``), a str (``file``, ``choice``), ``True`` (``switch``), a
    list of floats (``vector``, ``cell``), a list of ints (``pixels``), or a list of 3 floats or ``['random']``
    (``misset``).  A flag given twice keeps its last value."""

    order: List[str]


def fmt_num(v: float) -> str:
    """A number as plain text for messages and flags: integers without a decimal point, others the shortest text
    that reads back as the same float (never a numpy repr)."""
    return plain(float(v))


def _looks_like_flag(tok: str) -> bool:
    if not tok.startswith("-") or len(tok) < 2:
        return False
    try:
        float(tok)
        return False
    except ValueError:
        return True


def canonical_flag(tok: str) -> str:
    """Canonical name of a flag or alias, or ``ValueError`` naming the closest known flags."""
    if tok in FLAGS:
        return tok
    if tok in ALIASES:
        return ALIASES[tok]
    close = difflib.get_close_matches(tok, list(FLAGS) + list(ALIASES), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ValueError(f"unknown flag {tok!r}{hint} (nbtorch --help lists every flag)")


def range_phrase(flag: Flag) -> str:
    """The flag's allowed range in words (``> 0 and <= 1000 mm``, ``between 1 and 64``, ``>= 0``), with its unit;
    "" for any finite value."""
    iv = flag.interval
    if iv is None:
        return ""
    lo, hi, lc, hc = iv.bounds()
    lo_t, hi_t = iv.bound_texts()
    if math.isfinite(lo) and math.isfinite(hi) and lc and hc and flag.kind in ("count", "int", "pixels"):
        text = f"between {lo_t} and {hi_t}"
    else:
        parts = [f"{'>=' if lc else '>'} {lo_t}"] if math.isfinite(lo) else []
        if math.isfinite(hi):
            parts.append(f"{'<=' if hc else '<'} {hi_t}")
        text = " and ".join(parts) + (" (or inf)" if iv.allows_inf else "")
    unit = flag.unit.split(",")[0] if flag.kind not in ("count", "int", "pixels") else ""
    return text + (f" {unit}" if unit else "")


def _number(flag: Flag, tok: str, who: str, ranged: bool = True) -> float:
    """One numeric token of ``flag`` → float, checked against the flag's kind and (if ``ranged``) its range."""
    try:
        v = float(tok)
    except ValueError:
        raise ValueError(f"{who} expects a number, got {tok!r}") from None
    iv = flag.interval if ranged else None
    if math.isnan(v) or (math.isinf(v) and not (iv is not None and iv.allows_inf and v > 0)):
        raise ValueError(f"{who} expects a finite number, got {tok!r}")
    integral = flag.kind in ("count", "int", "pixels")
    what = f" ({flag.field or flag.sets})" if (flag.field or flag.sets) and not flag.field.startswith("cli.") else ""
    if integral and not v.is_integer():
        phrase = range_phrase(flag)
        raise ValueError(f"{who} must be an integer{f' ({phrase})' if phrase else ''}, got {tok}")
    if iv is not None and v not in iv:
        raise ValueError(f"{who} must be {range_phrase(flag)}{what}, got {tok}")
    return float(int(v)) if integral else v


def parse_value(flag: Flag, toks: Sequence[str], who: str = ""):
    """The value of ``flag`` from its tokens (already split off the command line), validated from the table.

    ``who``: how messages name the value (default: the flag name; e.g. an SMV header field).  Returns the value in
    :class:`NanoBraggArgs` form; ``ValueError`` names ``who``, the allowed range and the offending text."""
    who = who or flag.name
    if flag.kind == "switch":
        return True
    if flag.kind in ("file", "text"):
        return str(toks[0])
    if flag.kind == "choice":
        if toks[0].lower() not in flag.choices:
            raise ValueError(f"{who} must be {' or '.join(repr(c) for c in flag.choices)}, got {toks[0]!r}")
        return toks[0].lower()
    if flag.kind == "misset" and list(toks) == ["random"]:
        return ["random"]
    # -cell: finite here; the lengths' range and the angles (they must close) are checked with the whole cell
    vals = [_number(flag, t, who, ranged=flag.kind != "cell") for t in toks]
    if flag.kind in ("count", "int"):
        return int(vals[0])
    if flag.kind == "pixels":
        return [int(v) for v in vals]
    if flag.kind == "real":
        return vals[0]
    return vals


def _take(flag: Flag, tok: str, toks: Sequence[str], j: int):
    """The value tokens of ``flag`` starting at ``toks[j]`` → (tokens, next index); ``ValueError`` when short."""
    words = flag.kind in ("file", "text", "choice")  # may start with '-'
    free = lambda k: k < len(toks) and (words or not _looks_like_flag(toks[k]))  # noqa: E731
    if flag.kind == "cell":
        k = j
        while free(k) and k - j < 6:
            k += 1
        if k == j:
            raise ValueError(f"{tok} needs 1 to 6 values: a b c (Å) alpha beta gamma (deg)")
        return list(toks[j:k]), k
    if flag.kind == "misset" and j < len(toks) and toks[j] == "random":
        return ["random"], j + 1
    if not all(free(k) for k in range(j, j + flag.nargs)):
        if flag.kind == "misset":
            raise ValueError(f"{tok} needs 3 angles rx ry rz (degrees) or 'random'")
        n = flag.nargs
        raise ValueError(f"{tok} needs {n} value{'s' if n > 1 else ''}: {flag.help}")
    return list(toks[j:j + flag.nargs]), j + flag.nargs


def parse_args(args: Union[str, Sequence[str]]) -> NanoBraggArgs:
    """Parse nanoBragg flags (a command string or a token list; a leading ``nanoBragg``/``nbtorch`` is dropped).

    Returns :class:`NanoBraggArgs`.  ``ValueError`` for an unknown flag (naming the closest known ones), a value
    not following its flag, a missing or malformed value, a non-integer count, a non-finite or out-of-range value."""
    toks = shlex.split(args) if isinstance(args, str) else [str(a) for a in args]
    if toks and not toks[0].startswith("-") and os.path.basename(toks[0]) in ("nanoBragg", "nbtorch"):
        toks = toks[1:]
    out = NanoBraggArgs()
    out.order = []
    i = 0
    while i < len(toks):
        tok = toks[i]
        if not _looks_like_flag(tok):
            raise ValueError(f"unexpected argument {tok!r}: every value must follow its flag (see nbtorch --help)")
        flag = FLAGS[canonical_flag(tok)]
        vals, i = _take(flag, tok, toks, i + 1)
        out[flag.name] = parse_value(flag, vals, tok)
        out.order.append(flag.name)
    return out


def last_flag(opts: NanoBraggArgs, states: Mapping[str, object], default):
    """nanoBragg's "last flag wins" rule: the state of the last flag in ``opts.order`` that ``states`` names
    (``states[flag]`` is the state it selects, or :data:`FLAG_VALUE` for the flag's own value); ``default`` when
    none was given."""
    state = default
    for f in opts.order:
        if f in states:
            state = opts[f] if states[f] is FLAG_VALUE else states[f]
    return state


def missing_inputs(opts) -> List[str]:
    """What the parsed flags lack to define a simulation (empty list when complete).

    nanoBragg needs a unit cell (``-cell`` or ``-mat``; nbtorch also takes a ``-pdb`` model's, or an ``-expt``
    file's crystal) and structure factors (``-hkl``, ``-pdb`` or ``-default_F`` > 0)."""
    out = []
    if not any(f in opts for f in ("-cell", "-mat", "-pdb", "-expt")):
        out.append("a unit cell: give -cell a b c alpha beta gamma (Å, deg), -mat FILE (MOSFLM A matrix) or -pdb FILE "
                   "(the model's cell)")
    if "-hkl" not in opts and "-pdb" not in opts and not opts.get("-default_F", 0.0):
        out.append("structure factors: give -hkl FILE (lines h k l F, or an MTZ), -pdb FILE (a PDB/mmCIF model) or "
                   "-default_F F (> 0)")
    return out
