"""``ksmtrace top`` on the terminal: one urwid widget, its keys, the refresh loop.

The widget draws only the rows that fit (a host of a thousand mergeable
processes costs a sort and twenty lines per frame, not a thousand widgets),
from the pure lines of ksmtrace.views.top. urwid owns the terminal: raw
mode, the alternate screen, resizes, and putting all of it back when the
loop ends, whatever ends it (``q``, or an exception such as the
KeyboardInterrupt that SIGINT, SIGTERM and SIGHUP raise in ksmtrace).
No mouse, 16 colours with monochrome fallbacks: it works over ssh.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from typing import Protocol

import urwid

from ksmtrace.errors import KsmtraceError
from ksmtrace.model.faults import RegionRow
from ksmtrace.model.snapshot import Snapshot
from ksmtrace.views import console
from ksmtrace.views import top as view
from ksmtrace.views.top import Frame, Line, TopModel, TopState

# name, foreground, background, monochrome
PALETTE = [
    ("title", "white,bold", "dark blue", "bold"),
    ("label", "light gray", "default", ""),
    ("value", "white,bold", "default", "bold"),
    ("spark", "light cyan", "default", ""),
    ("thead", "black", "light gray", "standout"),
    ("sorted", "black", "dark cyan", "standout,underline"),
    ("selected", "black", "light cyan", "standout"),
    ("cow", "yellow,bold", "default", "bold"),
    ("flag", "light red,bold", "default", "bold,underline"),
    ("flag_selected", "light red,bold", "light cyan", "standout,underline"),
    ("warn", "light red", "default", "bold"),
    ("prompt", "yellow", "default", "bold"),
    ("key", "white,bold", "dark blue", "standout"),
]

HELP = [
    "ksmtrace top: KSM savings, copy-on-write faults on merged pages and ksmd's cost",
    "",
    "  c  sort by KSM COW faults/s      p  by profit (what KSM saves it)",
    "  g  by merging pages              m  by merges/s     u  by unmerges/s",
    "  r  by rmap items per merged page (flagged ! above 64: the rmap costs more)",
    "  n  by pid                        o  by command      < >  previous/next column",
    "  i  invert the order              b  MERGING in pages / in bytes",
    "  /  filter by command or pid (Enter keeps it, Esc clears it)",
    "  up/down, PgUp/PgDn, Home/End  select       Enter  the process's regions",
    "  Esc or Backspace  back from regions      h or ?  this help      q  quit",
    "",
    "KSM COW: writes that broke a merge (the page was a KSM page), counted exactly",
    "by the fault probe; cow_ksm: the kernel's own machine-wide count.",
    "MADE daemon: a region ksmtrace daemon made mergeable.",
    "",
    "Any key leaves this help.",
]


def _markup(line: Line) -> list[object]:
    return [(a, t) if a else t for a, t in line if t] or [""]


def _clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(v, hi))


class TopScreen(urwid.Widget):
    """The whole screen, rendered from the model and state at whatever size urwid asks for."""

    _sizing = frozenset([urwid.Sizing.BOX])
    _selectable = True
    ignore_focus = True

    def __init__(self, model: TopModel, state: TopState | None = None, ascii_only: bool = False) -> None:
        super().__init__()
        self.model = model
        self.state = state or TopState()
        self.ascii_only = ascii_only
        self._body = 10  # table rows on the screen at the last render (PgUp/PgDn step)
        self.on_drill: Callable[[], None] | None = None  # called when Enter opens a process

    def changed(self) -> None:
        self._invalidate()

    # -- layout ---------------------------------------------------------

    def lines(self, cols: int, rows: int) -> list[Line]:
        """Exactly ``rows`` lines for a screen ``cols`` wide."""
        m, s = self.model, self.state
        top = view.header(m, cols, self.ascii_only)
        foot = [view.footer(s, cols)]
        if m.message:
            foot.insert(0, [("warn", m.message)])
        if s.help:
            body = [[("", h)] for h in HELP]
            mid: list[Line] = []
        elif s.drill is not None:
            summary, head, regions = view.drill(m, s, cols)
            mid = [*summary, head]
            height = max(0, rows - len(top) - len(mid) - len(foot))
            s.region_offset = _clamp(s.region_offset, 0, max(0, len(regions) - height))
            body = regions[s.region_offset : s.region_offset + height]
        else:
            mid = [view.table_header(s, cols)]
            height = max(0, rows - len(top) - len(mid) - len(foot))
            self._body = max(1, height)
            body = self._table(height, cols)
        out = [*top, *mid, *body]
        out = out[: max(0, rows - len(foot))]
        out += [[] for _ in range(rows - len(out) - len(foot))]
        out += foot
        return out[:rows]

    def _table(self, height: int, cols: int) -> list[Line]:
        m, s = self.model, self.state
        rows = view.visible(m, s)
        if not rows:
            s.selected, s.index, s.offset = None, 0, 0
            if m.machine is None:
                return []
            why = (
                f"no process matches '{s.filter}'"
                if s.filter
                else "no mergeable process faulted or merged yet"
            )
            return [[("label", why)]]
        at = next((i for i, r in enumerate(rows) if r.pid == s.selected), None)
        s.index = _clamp(s.index if at is None else at, 0, len(rows) - 1)
        s.selected = rows[s.index].pid
        if s.index < s.offset:
            s.offset = s.index
        elif s.index >= s.offset + height:
            s.offset = s.index - height + 1
        s.offset = _clamp(s.offset, 0, max(0, len(rows) - height))
        shown = rows[s.offset : s.offset + height]
        return [view.proc_line(r, cols, r.pid == s.selected, s.pages, m.page_size) for r in shown]

    def render(self, size: tuple[int, int], focus: bool = False) -> urwid.Canvas:
        cols, rows = size
        canvases = []
        for line in self.lines(cols, rows):
            canvases.append((urwid.Text(_markup(line), wrap="clip").render((cols,)), None, False))
        return urwid.CanvasCombine(canvases)

    # -- keys -----------------------------------------------------------

    def keypress(self, size: tuple[int, int], key: str) -> str | None:
        """Act on a key; ``q`` ends the loop. Returns None when the key was used."""
        if self.handle(key):
            self._invalidate()
            return None
        return key

    def handle(self, key: str) -> bool:
        s = self.state
        if s.editing:
            return self._edit(key)
        if s.help:
            s.help = False
            return True
        if key in ("q", "Q"):
            raise urwid.ExitMainLoop()
        if key in ("h", "?"):
            s.help = True
        elif key == "/":
            s.editing = True
        elif s.drill is not None:
            return self._drill_key(key)
        elif key in view.SORT_HOTKEYS:
            new = view.SORT_HOTKEYS[key]
            s.ascending = (not s.ascending) if new == s.sort else False
            s.sort = new
        elif key in ("<", ">"):
            i = view.SORT_ORDER.index(s.sort) + (1 if key == ">" else -1)
            s.sort = view.SORT_ORDER[i % len(view.SORT_ORDER)]
        elif key in ("i", "I"):
            s.ascending = not s.ascending
        elif key == "b":
            s.pages = not s.pages
        elif key == "enter":
            if s.selected is None:  # a key before the first draw since the filter changed
                rows = view.visible(self.model, s)
                s.selected = rows[min(s.index, len(rows) - 1)].pid if rows else None
            if s.selected is not None:
                s.drill, s.region_offset = s.selected, 0
                if self.on_drill:
                    self.on_drill()
        elif key == "esc":
            s.filter = ""
        else:
            return self._move(key)
        return True

    def _edit(self, key: str) -> bool:
        s = self.state
        if key == "enter":
            s.editing = False
        elif key == "esc":
            s.editing, s.filter = False, ""
        elif key == "backspace":
            s.filter = s.filter[:-1]
        elif len(key) == 1 and key.isprintable():
            s.filter += key
        else:
            return False
        # A new filter selects its first row: what Enter then opens is predictable.
        s.selected, s.index, s.offset = None, 0, 0
        return True

    def _drill_key(self, key: str) -> bool:
        s = self.state
        if key in ("esc", "backspace", "left"):
            s.drill = None
        elif key == "up":
            s.region_offset = max(0, s.region_offset - 1)
        elif key == "down":
            s.region_offset += 1  # clamped at the next render
        else:
            return False
        return True

    def _move(self, key: str) -> bool:
        s = self.state
        step = {"up": -1, "down": 1, "page up": -self._body, "page down": self._body}
        if key in step:
            s.index += step[key]
        elif key == "home":
            s.index = 0
        elif key == "end":
            s.index = 1 << 30
        else:
            return False
        s.index = max(0, s.index)
        s.selected = None  # the row at the new index (clamped when drawn)
        return True


def ascii_only() -> bool:
    """Block characters only where the terminal's encoding has them."""
    return "utf" not in str(urwid.util.detected_encoding).lower()


class Source(Protocol):
    """Where the rows come from (ksmtrace.commands.top): one Snapshot or Frame
    per ``fetch``; ``regions(pid)``: a process's regions when its rows come
    without them (None: they come with them)."""

    def fetch(self) -> Snapshot | Frame: ...

    def regions(self, pid: int) -> list[RegionRow] | None: ...


def run(model: TopModel, source: Source, interval: float, first: float) -> None:
    """Show the screen until ``q`` (or an exception, after which the terminal
    is restored too). ``source`` gives the next rows every ``interval``
    seconds, the first after ``first`` seconds; a KsmtraceError from it (a
    daemon gone away) is shown as a line and the next refresh tries again."""
    widget = TopScreen(model, ascii_only=ascii_only())
    screen = urwid.raw_display.Screen()
    loop = urwid.MainLoop(widget, PALETTE, screen=screen, handle_mouse=False)
    due = [time.monotonic() + first]

    def regions() -> None:
        pid = widget.state.drill
        if pid is None:
            return
        try:
            regs = source.regions(pid)
        except KsmtraceError as exc:
            model.message = str(exc)
            return
        if regs is not None:
            model.regions[pid] = regs

    def tick(loop: urwid.MainLoop, _data: object = None) -> None:
        try:
            model.update(source.fetch())
            model.message = ""
            regions()
        except KsmtraceError as exc:
            model.message = str(exc)
        # The next refresh on a fixed grid: rendering time does not drift it.
        now = time.monotonic()
        due[0] += interval
        if due[0] < now:
            due[0] = now + interval
        loop.set_alarm_in(due[0] - now, tick)
        widget.changed()

    widget.on_drill = regions  # a daemon's regions at once, not at the next refresh
    loop.set_alarm_in(first, tick)
    try:
        loop.run()
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        if not _hung_up(exc):
            raise
        # Nothing can be shown any more: what is left in stdout's buffer must
        # not fail again (and turn the exit status into 120) when Python exits.
        console.reader_left()
        raise TerminalGone() from None


class TerminalGone(Exception):
    """The terminal went away under the screen: ssh dropped, the tmux pane killed."""


def _hung_up(exc: BaseException) -> bool:
    """EOF on the terminal's input, or an I/O error writing to it (also while
    the screen was being restored after a signal: then the signal wins)."""
    if isinstance(exc, getattr(urwid, "InputClosedError", ())):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.EIO, errno.ENXIO, errno.EBADF):
        if isinstance(exc.__context__, KeyboardInterrupt):
            raise exc.__context__ from None
        return True
    return False
