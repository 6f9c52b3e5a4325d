"""nanoBragg command-line flags ↔ ``(Params, Setup)``.

* :mod:`.table` — the flag table: every flag described once (name, aliases, values, unit, default, allowed range,
  the field it sets, how it is written back).
* :mod:`.parse` — tokens → :class:`NanoBraggArgs`, every value validated from the table.
* :mod:`.build` — nanoBragg's defaults and automatic rules, one function per section → ``(Params, Setup, Extras)``.
* :mod:`.export` — the inverse, ``(Params, Setup)`` → flags.
"""
from .build import Extras, Inputs, Outputs, build, from_nanobragg_args
from .export import to_nanobragg_args
from .parse import FLAG_VALUE, NanoBraggArgs, canonical_flag, fmt_num, last_flag, missing_inputs, parse_args
from .table import ALIASES, FLAGS, SECTIONS, SWITCH_DEFAULTS, Flag, Interval, switch_states

__all__ = [
    "FLAGS", "ALIASES", "SECTIONS", "SWITCH_DEFAULTS", "Flag", "Interval", "switch_states",
    "NanoBraggArgs", "parse_args", "canonical_flag", "last_flag", "FLAG_VALUE", "fmt_num", "missing_inputs",
    "Inputs", "Outputs", "Extras", "build", "from_nanobragg_args", "to_nanobragg_args",
]
