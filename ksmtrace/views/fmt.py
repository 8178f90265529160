"""Text formatting shared by every command: sizes, tables, JSON lines."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

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
    out: TextIO | None = None,
    right: Sequence[bool] | None = None,
) -> None:
    """Columns sized to content; numbers right-aligned unless told otherwise."""
    out = out or sys.stdout
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

    print(line(list(headers)), file=out)
    for row in cells:
        print(line(row), file=out)


def _numeric(s: str) -> bool:
    s = s.rstrip("BKMGTi/s%")
    try:
        float(s)
    except ValueError:
        return s == "-"
    return True


def emit_json(obj: Any, out: TextIO | None = None, lines: bool = False) -> None:
    out = out or sys.stdout
    if lines:
        out.write(json.dumps(obj, sort_keys=False, separators=(",", ":")) + "\n")
    else:
        out.write(json.dumps(obj, indent=2) + "\n")
    out.flush()
