"""The one place ksmtrace writes to the terminal.

Commands hand this module the lines and documents the views made; nothing
else in the package prints (tests/unit/test_layout.py enforces it). Results
go to stdout; notes, progress and errors to stderr, so that ``-j`` output
stays pure JSON on stdout.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from ksmtrace.views.fmt import json_text


def lines(text: Iterable[str] | str, out: TextIO | None = None) -> None:
    """Write lines (or one string) to stdout and flush: streams are read live."""
    out = out or sys.stdout
    if isinstance(text, str):
        text = [text]
    for line in text:
        out.write(line + "\n")
    out.flush()


def json(obj: Any, stream: bool = False, out: TextIO | None = None) -> None:
    """A JSON document, or with ``stream`` one JSON line of a stream."""
    lines([json_text(obj, lines=stream)], out)


def note(text: str) -> None:
    """A remark for the person at the terminal (stderr): never part of the output proper."""
    lines([text], sys.stderr)


def error(text: str) -> None:
    lines([f"ksmtrace: {text}"], sys.stderr)


def reader_left() -> None:
    """stdout's reader went away (``| head``): drop what is still buffered
    instead of failing again when Python flushes stdout at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
