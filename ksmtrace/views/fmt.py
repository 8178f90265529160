"""Text formatting shared by every view: sizes, tables, JSON text. Returns strings, prints nothing."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(n: float, exact: bool = False) -> str:
    if exact:
        return str(int(n))
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in _UNITS:
        if n < 1024 or unit == _UNITS[-1]:
            return f"{sign}{n:.0f}{unit}" if unit == "B" else f"{sign}{n:.1f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    right: Sequence[bool] | None = None,
) -> list[str]:
    """Lines of a table, columns sized to content; numbers right-aligned unless told otherwise."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    if right is None:
        right = [
            bool(rows) and all(isinstance(r[i], (int, float)) or _numeric(str(r[i])) for r in rows)
            for i in range(len(headers))
        ]

    def line(vals: Sequence[str]) -> str:
        parts = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(vals, widths, right)]
        return "  ".join(parts).rstrip()

    return [line(list(headers)), *(line(row) for row in cells)]


def _numeric(s: str) -> bool:
    s = s.rstrip("BKMGTi/s%")
    try:
        float(s)
    except ValueError:
        return s == "-"
    return True


def json_text(obj: Any, lines: bool = False) -> str:
    """One JSON document (indented), or one compact JSON line for streams."""
    if lines:
        return json.dumps(obj, sort_keys=False, separators=(",", ":"))
    return json.dumps(obj, indent=2)
