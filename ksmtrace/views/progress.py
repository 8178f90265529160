"""A progress bar on stderr for long scans: only on a terminal, or when asked."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from ksmtrace.views.fmt import human_bytes


class ProgressBar:
    """Call with (done, total, pid); redraws at most 10 times a second."""

    def __init__(self, enabled: bool | None = None, out: TextIO | None = None, width: int = 30) -> None:
        self.out = out or sys.stderr
        self.enabled = self.out.isatty() if enabled is None else enabled
        self.width = width
        self.t0 = time.monotonic()
        self.last = 0.0
        self.drawn = False

    def __call__(self, done: int, total: int, pid: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < 0.1 and done < total:
            return
        self.last = now
        frac = min(1.0, done / total) if total else 1.0
        fill = int(frac * self.width)
        rate = done / max(now - self.t0, 1e-6)
        self.out.write(
            f"\rscanning [{'#' * fill}{'.' * (self.width - fill)}] {frac * 100:3.0f}% "
            f"{human_bytes(done)}/{human_bytes(total)} {human_bytes(rate)}/s pid {pid:<8}"
        )
        self.out.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.out.write("\r" + " " * 100 + "\r")
            self.out.flush()
