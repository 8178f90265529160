"""``ksmtrace top``: the machine row and process rows as lines of a live screen.

Pure: rows (ksmtrace.views.dash) in, lines of (attribute, text) markup out,
for a given width. The urwid widget and key handling (views/top_ui.py) put
these lines on the terminal; ``top -b`` prints their plain text. Nothing
here reads files or the clock: the snapshot carries the time.

Widths are fixed per column so that a row never wraps: at 80 columns the
table is exactly 80 wide, COMM takes whatever a wider terminal adds.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ksmtrace.model.faults import RegionRow
from ksmtrace.model.snapshot import Snapshot
from ksmtrace.views import dash

# One piece of a line: (urwid palette name, text); a line is a list of them.
Piece = tuple[str, str]
Line = list[Piece]

HISTORY = 120  # points kept for the sparklines (two minutes at 1 s)
BLOCKS = "▁▂▃▄▅▆▇█"
ASCII_BLOCKS = "_.,:-=+#"  # for terminals whose encoding has no block characters


@dataclass(frozen=True)
class Column:
    title: str
    width: int
    sort: str | None  # key of dash.SORT_KEYS, None: not sortable
    right: bool = True


# The process table; COMM's width is the minimum, it takes a wider screen's slack.
COLUMNS = (
    Column("PID", 7, "pid"),
    Column("COMM", 13, "comm", right=False),
    Column("HOW", 10, None, right=False),
    Column("MERGING", 7, "merging"),
    Column("PROFIT", 7, "profit"),
    Column("KSMCOW/s", 8, "ksm_cow"),
    Column("MERGE/s", 7, "merges"),
    Column("UNMRG/s", 7, "unmerges"),
    Column("RMAP", 6, "rmap"),
)
SORT_ORDER = [c.sort for c in COLUMNS if c.sort]
SORT_HOTKEYS = {"c": "ksm_cow", "p": "profit", "g": "merging", "m": "merges", "u": "unmerges"}
SORT_HOTKEYS.update({"r": "rmap", "n": "pid", "o": "comm"})

REGION_COLUMNS = (
    Column("RANGE", 25, None, right=False),
    Column("SIZE", 6, None),
    Column("NAME", 12, None, right=False),
    Column("KSMCOW/s", 8, None),
    Column("MERGE/s", 7, None),
    Column("KSM", 6, None),
    Column("MADE", 6, None, right=False),
)


def size(n: float | None) -> str:
    """Bytes in at most 6 characters: 1023B, 9.5K, 29M, 1.2G."""
    if n is None:
        return "-"
    sign, v = ("-" if n < 0 else ""), abs(float(n))
    for unit in "BKMGTP":
        if v < 1024 or unit == "P":
            if unit == "B":
                return f"{sign}{v:.0f}B"
            return f"{sign}{v:.1f}{unit}" if v < 10 else f"{sign}{v:.0f}{unit}"
        v /= 1024
    raise AssertionError("unreachable")


def rate(v: float | None, width: int = 7) -> str:
    """A per-second rate in ``width`` characters: one decimal below 10, then
    whole numbers, then k, M, G (999999 is 1.0M, not 1000k)."""
    if v is None:
        return "-"
    s = "0" if v == 0 else f"{v:.1f}" if v < 9.95 else f"{v:.0f}"
    if len(s) <= width:
        return s
    for div, unit in ((1e3, "k"), (1e6, "M"), (1e9, "G"), (1e12, "T")):
        x = v / div
        s = f"{x:.1f}{unit}" if x < 9.95 else f"{x:.0f}{unit}"
        if len(s) <= width and x < 999.5:
            break
    return s


def count(v: int | None) -> str:
    return "-" if v is None else str(v)


def sparkline(values: Sequence[float], width: int, ascii_only: bool = False) -> str:
    """The last ``width`` values as block characters, scaled from 0 to their
    maximum: a zero is the lowest block, anything above it at least the next."""
    blocks = ASCII_BLOCKS if ascii_only else BLOCKS
    vals = list(values)[-width:] if width > 0 else []
    top = max(vals, default=0.0)
    out = []
    for v in vals:
        if v <= 0 or top <= 0:
            out.append(blocks[0])
        else:
            out.append(blocks[max(1, min(7, math.ceil(v / top * 7)))])
    return "".join(out).rjust(width, " ")


def comm_width(width: int) -> int:
    fixed = sum(c.width for c in COLUMNS if c.title != "COMM") + len(COLUMNS) - 1
    return max(COLUMNS[1].width, width - fixed)


def _cells(cols: Sequence[Column], values: Sequence[str], widths: Sequence[int]) -> list[str]:
    out = []
    for c, v, w in zip(cols, values, widths):
        v = v if len(v) <= w else v[: w - 1] + "~"
        out.append(v.rjust(w) if c.right else v.ljust(w))
    return out


def _widths(width: int) -> list[int]:
    return [comm_width(width) if c.title == "COMM" else c.width for c in COLUMNS]


@dataclass
class TopState:
    """What the person at the keyboard chose: the view's own state, no data."""

    sort: str = "ksm_cow"
    ascending: bool = False
    filter: str = ""
    editing: bool = False  # typing a filter after '/'
    selected: int | None = None  # pid of the selected row
    index: int = 0  # its position, kept when the pid leaves the table
    offset: int = 0  # first table row on the screen
    drill: int | None = None  # pid whose regions are shown
    region_offset: int = 0
    help: bool = False
    pages: bool = False  # MERGING in pages instead of bytes


@dataclass(frozen=True)
class Frame:
    """One refresh's rows, whatever their source: a Snapshot of top's own
    probes (:func:`frame`), or a daemon's already computed rows."""

    machine: dash.MachineRow
    rows: list[dash.ProcRow]
    page_size: int


def frame(snap: Snapshot, rows: dash.Rows | None = None) -> Frame:
    """``rows``: reused rows of the earlier frames (top's model keeps one)."""
    return Frame(dash.machine(snap), rows(snap) if rows else dash.processes(snap), snap.page_size)


@dataclass
class TopModel:
    """The latest rows and a short history for the sparklines."""

    source: str = ""  # where the rows come from, when not top's own probes
    machine: dash.MachineRow | None = None
    rows: list[dash.ProcRow] = field(default_factory=list)
    page_size: int = 4096
    history: deque[tuple[float, float, int]] = field(default_factory=lambda: deque(maxlen=HISTORY))
    message: str = ""  # the data source's last trouble, in words ("" when fine)
    keep: Callable[[dash.ProcRow], bool] | None = None  # -p/-n applied to a daemon's rows
    regions: dict[int, list[RegionRow]] = field(default_factory=dict)  # fetched apart (--connect)
    reuse: dash.Rows = field(default_factory=dash.Rows, repr=False)  # rows of records still the same

    def update(self, new: Snapshot | Frame) -> bool:
        """Take the next rows; False when they are the ones already shown (a
        daemon polled faster than it samples)."""
        f = frame(new, self.reuse) if isinstance(new, Snapshot) else new
        if self.machine is not None and f.machine.wall == self.machine.wall:
            return False
        self.machine = m = f.machine
        self.rows = [r for r in f.rows if self.keep(r)] if self.keep else f.rows
        self.page_size = f.page_size
        live = {r.pid for r in self.rows}
        self.regions = {pid: regs for pid, regs in self.regions.items() if pid in live}
        self.history.append((m.wall, m.ksm_cow_per_s, m.saved_bytes))
        return True


def visible(model: TopModel, state: TopState) -> list[dash.ProcRow]:
    """The table's rows: filtered, then sorted as chosen."""
    rows = dash.matching(model.rows, state.filter)
    if state.sort == "comm":
        rows = dash.sort(rows, "comm")
        return rows[::-1] if state.ascending else rows
    return dash.sort(rows, state.sort, reverse=not state.ascending)


def _run_state(run: int) -> str:
    return {0: "stopped", 1: "running", 2: "unmerging"}.get(run, f"run={run}")


def header(model: TopModel, width: int, ascii_only: bool = False) -> list[Line]:
    """Four lines of the machine's KSM state (what KSM saves, what it costs)."""
    m = model.machine
    when = time.strftime("%H:%M:%S", time.localtime(m.wall)) if m else "--:--:--"
    title = f"ksmtrace top {when}"
    if m is None:
        first = f"{title}  {model.source}"[:width]
        return [[("title", first)], [("", "waiting for the first sample...")], [], []]
    # What does not fit is left out: the source first, then ksmd's knobs, then from the end.
    state = f"ksmd {_run_state(m.run)}"
    knobs = ""
    if m.pages_to_scan is not None and m.sleep_millisecs is not None:
        knobs = f" {m.pages_to_scan} pages/{m.sleep_millisecs}ms"
    rest = [f"advisor {m.advisor or '-'}", f"{m.processes} procs"]
    source = [model.source] if model.source else []
    for parts in ([state + knobs, *rest, *source], [state + knobs, *rest], [state, *rest]):
        if len("  ".join([title, *parts])) <= width:
            break
    while parts and len("  ".join([title, *parts])) > width:
        parts.pop()
    line1 = "  ".join([title, *parts])
    cpu = "-" if m.ksmd_cpu_pct is None else f"{m.ksmd_cpu_pct:.1f}%"
    line2 = [
        ("label", "saved "),
        ("value", size(m.saved_bytes)),
        ("label", "  general_profit "),
        ("value", size(m.general_profit_bytes)),
        ("label", "  ksmd CPU "),
        ("value", cpu),
        ("label", "  scan "),
        ("value", rate(m.pages_scanned_per_s)),
        ("label", " pages/s"),
    ]
    line3 = [
        ("label", "KSM COW "),
        ("cow" if m.ksm_cow_per_s > 0 else "value", rate(m.ksm_cow_per_s, 5)),
        ("label", "/s  cow_ksm "),
        ("value", f"{count(m.cow_ksm_total)} ({rate(m.cow_ksm_per_s, 5)}/s)"),
        ("label", "  merges "),
        ("value", rate(m.merges_per_s, 5)),
        ("label", "/s  unmerges "),
        ("value", rate(m.unmerges_per_s, 5)),
        ("label", "/s"),
    ]
    cows = [c for _, c, _ in model.history]
    saved = [s for _, _, s in model.history]
    scans = f"full scans {rate(m.full_scans_per_min, 5)}/min  COW/s "
    now_cow = f" {rate(cows[-1] if cows else 0, 5)}  saved "
    now_saved = f" {size(saved[-1] if saved else 0)}"
    spark = max(4, (width - len(scans) - len(now_cow) - len(now_saved)) // 2)
    line4 = [
        ("label", scans),
        ("spark", sparkline(cows, spark, ascii_only)),
        ("label", now_cow),
        ("spark", sparkline(saved, spark, ascii_only)),
        ("label", now_saved),
    ]
    return [[("title", line1)], line2, line3, line4]


def table_header(state: TopState, width: int) -> Line:
    cells = _cells(COLUMNS, [c.title for c in COLUMNS], _widths(width))
    out: Line = []
    for i, (c, cell) in enumerate(zip(COLUMNS, cells)):
        out.append(("sorted" if c.sort == state.sort else "thead", cell))
        if i < len(COLUMNS) - 1:
            out.append(("thead", " "))
    return out


def proc_cells(row: dash.ProcRow, width: int, pages: bool = False, page_size: int = 4096) -> list[str]:
    merging = row.merging_pages
    if pages:
        merging_s = count(merging)
    else:
        merging_s = size(None if merging is None else merging * page_size)
    ratio = row.rmap_ratio
    rmap = "-" if ratio is None else f"{ratio:.0f}" if ratio >= 10 else f"{ratio:.1f}"
    values = [
        str(row.pid),
        row.comm,
        row.how,
        merging_s,
        size(row.profit_bytes),
        rate(row.ksm_cow_per_s, 8),
        rate(row.merges_per_s),
        rate(row.unmerges_per_s),
        rmap + ("!" if row.rmap_flag else ""),
    ]
    return _cells(COLUMNS, values, _widths(width))


def proc_line(row: dash.ProcRow, width: int, selected: bool, pages: bool, page_size: int) -> Line:
    cells = proc_cells(row, width, pages, page_size)
    base = "selected" if selected else ""
    out: Line = [(base, " ".join(cells[:5]) + " ")]
    out.append(("selected" if selected else "cow" if row.ksm_cow_per_s > 0 else "", cells[5]))
    out.append((base, " " + " ".join(cells[6:8]) + " "))
    out.append(
        ("flag_selected" if selected and row.rmap_flag else "flag" if row.rmap_flag else base, cells[8])
    )
    return out


def region_cells(r: RegionRow) -> list[str]:
    widths = [c.width for c in REGION_COLUMNS]
    rng = f"{r.start:x}-{r.end:x}" if r.start else ""
    values = [
        rng,
        size(r.end - r.start) if r.start else "",
        r.name,
        rate(r.rates["ksm_cow"].per_s, 8) if "ksm_cow" in r.rates else "-",
        rate(r.rates["merges"].per_s) if "merges" in r.rates else "-",
        size(r.ksm_bytes),
        "daemon" if r.made_by_daemon else "",
    ]
    return _cells(REGION_COLUMNS, values, widths)


def drill(model: TopModel, state: TopState, width: int) -> tuple[list[Line], Line, list[Line]]:
    """The selected process: summary lines, the region table's header, its rows."""
    row = next((r for r in model.rows if r.pid == state.drill), None)
    if row is None:
        gone = f"pid {state.drill}: no longer traced (exited, or nothing counted since)"
        return [[("warn", gone)], []], [], []
    ratio = row.rmap_ratio
    line1 = (
        f"pid {row.pid} {row.comm}  {row.how or 'how: -'}  "
        f"merging {size(None if row.merging_pages is None else row.merging_pages * model.page_size)}  "
        f"profit {size(row.profit_bytes)}  rmap {'-' if ratio is None else f'{ratio:.1f}'}"
    )
    line2 = (
        f"KSM COW {rate(row.ksm_cow_per_s)}/s ({row.ksm_cow_total} total)  "
        f"merges {rate(row.merges_per_s)}/s ({row.merges_total})  "
        f"unmerges {rate(row.unmerges_per_s)}/s ({row.unmerges_total})"
    )
    summary: list[Line] = [[("title", line1[:width])], [("", line2[:width])]]
    if row.rmap_flag:
        summary[0].append(("flag", " !"))
    head = " ".join(
        _cells(REGION_COLUMNS, [c.title for c in REGION_COLUMNS], [c.width for c in REGION_COLUMNS])
    )
    rows: list[Line] = []
    for r in row.regions or model.regions.get(row.pid, []):
        cells = region_cells(r)
        cow = r.rates["ksm_cow"].per_s if "ksm_cow" in r.rates else 0
        rows.append(
            [
                ("", " ".join(cells[:3]) + " "),
                ("cow" if cow > 0 else "", cells[3]),
                ("", " " + " ".join(cells[4:])),
            ]
        )
    if not rows:
        rows.append([("", "no regions read for it (mergeable regions appear once they fault or merge)")])
    return summary, [("thead", head.ljust(width))], rows


def footer(state: TopState, width: int) -> Line:
    if state.editing:
        return [("prompt", f"filter: {state.filter}_"), ("label", "   Enter keep  Esc clear")]
    if state.drill is not None:
        return [("key", "Esc"), ("label", " back  "), ("key", "q"), ("label", " quit  up/down scroll")]
    order = "asc" if state.ascending else "desc"
    title = next(c.title for c in COLUMNS if c.sort == state.sort)
    out: Line = [("key", "q"), ("label", " quit "), ("key", "h"), ("label", " help ")]
    if state.filter:
        out.append(("prompt", f"filter '{state.filter}'"))
    else:
        out += [("key", "/"), ("label", " filter")]
    out += [("label", " "), ("key", "Enter"), ("label", f" regions  sort {title} {order}")]
    return out


def text(line: Line) -> str:
    return "".join(t for _, t in line)


def batch(model: TopModel, state: TopState, width: int = 80) -> list[str]:
    """``top -b``: the header and every row of the table as plain lines."""
    lines = [text(ln).rstrip() for ln in header(model, width, ascii_only=True)]
    lines.append("")
    lines.append(text(table_header(state, width)).rstrip())
    rows = visible(model, state)
    for r in rows:
        lines.append(" ".join(proc_cells(r, width, state.pages, model.page_size)).rstrip())
    if not rows:
        lines.append("no mergeable process faulted or merged since tracing started")
    return lines
