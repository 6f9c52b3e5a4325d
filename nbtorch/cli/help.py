"""``nbtorch --help`` and the flag table of docs/cli.md, both generated from :data:`nbtorch.args.FLAGS`
(``python -m nbtorch.cli.docs`` writes the docs table, see :mod:`nbtorch.cli.docs`)."""
from __future__ import annotations

import re
import textwrap
from typing import Dict, List

from ..args.parse import fmt_num
from ..args.table import FLAGS, SECTIONS, SWITCH_DEFAULTS, Flag, flags_in_section

__all__ = ["PROG", "FLAG_GROUPS", "EXTRA_OPTIONS", "metavar", "describe", "format_help", "flag_table_markdown"]

PROG = "nbtorch"
#: Help groups: the first flag of each section → the section title (in help order).
FLAG_GROUPS: Dict[str, str] = {flags_in_section(key)[0].name: title for key, title in SECTIONS.items()}
#: nbtorch's own options (not nanoBragg flags): (usage, meaning).
EXTRA_OPTIONS = (
    ("--dtype float32|float64", "nbtorch extra: floating-point precision of the simulation (default float64)"),
    ("--device cpu|cuda[:N]", "nbtorch extra: torch device to simulate on (default cpu)"),
    ("--precompile", "nbtorch extra: build the compiled kernels into the cache and exit (nothing simulated)"),
    ("--specs common|all", "with --precompile: which kernels (default common); --dtype float32,float64 (default)"),
    ("-h, --help", "show this help and exit"),
    ("--version", "print the nbtorch version and exit"),
)
_NBSP = "\u00a0"
_INTERVAL_SPACE = re.compile(r"(?:allowed )?[\[(][-+\w.]+, [-+\w.]+[\])]")
_METAVARS = {"real": "X", "count": "N", "int": "N", "file": "FILE", "text": "WORD", "vector": "X Y Z", "switch": ""}


def metavar(flag: Flag) -> str:
    """The value placeholder of ``flag`` (``FILE``, ``N``, ``X``, ``X Y Z``, or the table's own)."""
    return flag.metavar or _METAVARS.get(flag.kind, "X")


def _default(flag: Flag) -> str:
    if flag.switch is not None and SWITCH_DEFAULTS[flag.switch[0]] == flag.switch[1] and flag.kind == "switch":
        return "on"
    if flag.default_text:
        return flag.default_text
    if flag.default is None:
        return ""
    return flag.default if isinstance(flag.default, str) else fmt_num(flag.default)


def _notes(flag: Flag) -> List[str]:
    """Facts of the table that help states in words."""
    out = []
    if flag.effect == "none":
        out.append("no effect; accepted for compatibility")
    if flag.custom:
        out.append("switches to the CUSTOM convention")
    if flag.pivot in ("beam", "sample"):
        out.append(f"selects the {flag.pivot} pivot in CUSTOM")
    if flag.header:
        out.append(f"-img/-mask header {'/'.join(flag.header)}")
    return out


def describe(flag: Flag) -> str:
    """One-paragraph description of ``flag``: meaning (unit; default; allowed range; notes)."""
    parts = [flag.unit] if flag.unit else []
    d = _default(flag)
    if d:
        parts.append(f"default {d}")
    if flag.within:
        parts.append(f"{'lengths ' if flag.kind == 'cell' else ''}allowed {flag.within}")
    parts += _notes(flag)
    return flag.help + (f" ({'; '.join(parts)})" if parts else "")


def _aliases() -> Dict[str, List[str]]:
    return {f.name: sorted(f.aliases) for f in FLAGS.values() if f.aliases}


def format_help(width: int = 100) -> str:
    """The ``nbtorch --help`` text: usage, every flag of the table grouped by section with its values, unit,
    default, allowed range and aliases, then nbtorch's own long options."""
    lines = [
        f"usage: {PROG} [nanoBragg flags] [--dtype float32|float64] [--device cpu|cuda]",
        "",
        "Simulate a diffraction image with nanoBragg's physics (PyTorch).  Accepts nanoBragg's single-dash flags:",
        "replace 'nanoBragg' with 'nbtorch' in a script to get the same files.  Flags are matched exactly or by the",
        "aliases shown (not by substring).  Required: -cell or -mat, and -hkl or -default_F > 0.",
        "Units: Å (cell, lambda, dmin), mm (lengths), µm (sensor, water), degrees (angles), mrad (divergence).",
    ]
    col, aliases = 34, _aliases()
    for flag in FLAGS.values():
        if flag.name in FLAG_GROUPS:
            lines += ["", FLAG_GROUPS[flag.name] + ":"]
        head = f"  {flag.name} {metavar(flag)}".rstrip()
        body = describe(flag) + (f" [also: {', '.join(aliases[flag.name])}]" if flag.name in aliases else "")
        body = _INTERVAL_SPACE.sub(lambda m: m[0].replace(" ", _NBSP), body)  # keep "allowed [0, 90]" together
        wrapped = textwrap.wrap(body, width=max(width - col, 30), break_on_hyphens=False)
        wrapped = [w.replace(_NBSP, " ") for w in wrapped]
        if len(head) + 2 > col:
            lines += [head] + [" " * col + w for w in wrapped]
        else:
            lines += [head.ljust(col) + wrapped[0]] + [" " * col + w for w in wrapped[1:]]
    lines += ["", "nbtorch options:"]
    lines += [f"  {head}".ljust(col) + text for head, text in EXTRA_OPTIONS]
    lines += [
        "",
        "Outputs are written atomically (a temporary file renamed into place).  No Fdump.bin cache is read or",
        "written.  Exit status: 0 ok, 2 command-line/input error, 1 output error.  See docs/cli.md.",
    ]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def flag_table_markdown() -> str:
    """The flag reference of docs/cli.md: one markdown table per section (flag and values, meaning, unit, default,
    allowed range, what it sets, aliases), generated from the flag table."""
    out = []
    for key, title in SECTIONS.items():
        out += [f"### {title}", "", "| flag | meaning | unit | default | allowed | sets | also |",
                "|---|---|---|---|---|---|---|"]
        for f in flags_in_section(key):
            meaning = "; ".join([f.help] + _notes(f))
            sets = "; ".join(f"`{s}`" for s in (f.field, f.sets) if s)
            cells = [f"`{(f.name + ' ' + metavar(f)).strip()}`", meaning, f.unit, _default(f), f.within, sets,
                     ", ".join(f"`{a}`" for a in sorted(f.aliases))]
            out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        out.append("")
    return "\n".join(out)
