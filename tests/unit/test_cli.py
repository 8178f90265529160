"""CLI surface: help, usage errors, formatting helpers."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ksmtrace.cli import build_parser, main
from ksmtrace.views.fmt import human_bytes


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for cmd in ("status", "demo", "run", "estimate", "merge", "unmerge"):
        assert cmd in out


def test_run_without_command_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run"]) == 2
    assert "usage: ksmtrace run -- CMD" in capsys.readouterr().err


def test_human_bytes() -> None:
    assert human_bytes(0) == "0B"
    assert human_bytes(1536) == "1.5KiB"
    assert human_bytes(64 << 20) == "64.0MiB"
    assert human_bytes(12345, exact=True) == "12345"


def test_a_signal_wrapped_by_set_name_still_ends_as_the_signal(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Python 3.11 wraps what a class body's __set_name__ raises in RuntimeError: a Ctrl-C that lands
    while a dataclass is being built during an import must still exit 130, without a traceback."""
    import signal

    from ksmtrace import cli
    from ksmtrace.kernel.signals import Interrupted

    def building(*_: object) -> None:
        try:
            raise Interrupted(signal.SIGINT)
        except Interrupted as exc:
            raise RuntimeError("Error calling __set_name__ on 'Field' instance") from exc

    monkeypatch.setattr(cli, "build_parser", building)
    assert cli.main(["status"]) == 130


def test_a_command_imports_only_its_own_module() -> None:
    """Every command module pulls in what it runs on (BCC, pyroute2, urwid):
    a command's start pays only for its own (issue #14)."""
    code = (
        "import sys; from ksmtrace import cli; p = cli.build_parser('status'); "
        "print(sorted(m for m in sys.modules if m.startswith('ksmtrace.commands.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['ksmtrace.commands.status']"
