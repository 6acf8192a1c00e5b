"""The one table formatter of every tokred command: aligned plain text for terminals, or Markdown for files."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from tokred.core.errors import InvalidInputError

__all__ = ["format_table"]

_NUMBER = re.compile(r"^[-+]?(\d[\d,]*\.?\d*|\.\d+)(e[-+]?\d+)?\s*(%|ms|s|x|GFLOPs|MiB)?$")


def _numeric(cells: Sequence[str]) -> bool:
    filled = [c for c in cells if c not in ("", "-", "—")]
    return bool(filled) and all(_NUMBER.match(c) for c in filled)


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], *, style: Literal["plain", "markdown"] = "plain"
) -> str:
    """Format rows under headers; columns of numbers are right-aligned.

    Args:
        headers: Column titles.
        rows: One sequence of cells per row, as many as there are headers; cells are formatted with ``str``.
        style: ``"plain"`` (aligned columns and a rule under the headers, for a terminal) or ``"markdown"``.

    Returns:
        The table, ending with a newline.

    Examples:
        >>> from tokred.core.cli.tables import format_table
        >>> print(format_table(["method", "accuracy"], [["dense", "93.0%"], ["apet", "63.9%"]]), end="")
        method  accuracy
        ------  --------
        dense      93.0%
        apet       63.9%
    """
    if style not in ("plain", "markdown"):
        raise InvalidInputError(f"style must be 'plain' or 'markdown'; got {style!r}")
    table = [[str(cell) for cell in row] for row in rows]
    for row in table:
        if len(row) != len(headers):
            raise InvalidInputError(f"every row needs {len(headers)} cells ({', '.join(headers)}); got {row}")
    columns = list(zip(*table, strict=True)) if table else [()] * len(headers)
    right = [_numeric(column) for column in columns]
    widths = [max([len(h), *(len(c) for c in column)]) for h, column in zip(headers, columns, strict=True)]

    def line(cells: Sequence[str]) -> list[str]:
        return [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)]

    if style == "markdown":
        rule = ["-" * (w - 1) + ":" if r else "-" * w for w, r in zip(widths, right, strict=True)]
        out = ["| " + " | ".join(line(list(headers))) + " |", "| " + " | ".join(rule) + " |"]
        out += ["| " + " | ".join(line(row)) + " |" for row in table]
    else:
        out = ["  ".join(line(list(headers))).rstrip(), "  ".join("-" * w for w in widths)]
        out += ["  ".join(line(row)).rstrip() for row in table]
    return "\n".join(out) + "\n"
