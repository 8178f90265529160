"""Tracers a test started (snoop, faults...), killed after each test by the
autouse fixture in conftest.py, so that a failed test leaves no BPF programs
behind. A module of its own: conftest.py is imported by pytest under another
name than ``tests.conftest``, so a list there would not be the tests' list."""

from __future__ import annotations

import subprocess

STRAY: list[subprocess.Popen[str]] = []
