"""docs/cli.md's flag reference, generated from the flag table.

``python -m nbtorch.cli.docs`` prints the table; ``--update docs/cli.md`` rewrites it between the markers in that
file; ``--check docs/cli.md`` exits 1 when the committed table is out of date.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from ..io._atomic import atomic_write
from .help import flag_table_markdown

__all__ = ["DOCS_BEGIN", "DOCS_END", "update_docs", "main"]

DOCS_BEGIN = ("<!-- BEGIN FLAG TABLE: generated from nbtorch/args/table.py by `python -m nbtorch.cli.docs --update "
              "docs/cli.md`; do not edit -->")
DOCS_END = "<!-- END FLAG TABLE -->"


def generated_section(text: str, path: str = "docs") -> str:
    """The text between :data:`DOCS_BEGIN` and :data:`DOCS_END` in ``text`` (ValueError without the markers)."""
    _, sep1, rest = text.partition(DOCS_BEGIN)
    inner, sep2, _ = rest.partition(DOCS_END)
    if not (sep1 and sep2):
        raise ValueError(f"{path}: no generated flag table markers ({DOCS_BEGIN!r} … {DOCS_END!r})")
    return inner


def update_docs(path: str, check: bool = False) -> bool:
    """Replace the generated flag table between the markers in ``path`` by :func:`flag_table_markdown`.

    Returns True when the file already held the current table; with ``check`` the file is left unchanged."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    old = generated_section(text, path)
    new_inner = "\n\n" + flag_table_markdown() + "\n"
    if old != new_inner and not check:
        atomic_write(path, text.replace(DOCS_BEGIN + old + DOCS_END, DOCS_BEGIN + new_inner + DOCS_END).encode())
    return old == new_inner


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m nbtorch.cli.docs [--update FILE | --check FILE]`` (no argument: print the table)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 2 and args[0] in ("--update", "--check"):
        current = update_docs(args[1], check=args[0] == "--check")
        return 0 if current or args[0] == "--update" else 1
    if args:
        sys.stderr.write("usage: python -m nbtorch.cli.docs [--update FILE | --check FILE]\n")
        return 2
    sys.stdout.write(flag_table_markdown())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
