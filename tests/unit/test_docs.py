"""Every command has a man page and a captured example, and its man page names every option.

Options are read from the real argparse parser (ksmtrace.cli.build_parser), so
an option added to a command without a word in its man page fails here. Man
pages are groff or, for some older ones, markdown: groff escapes are undone
before looking for an option as a whole word.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from ksmtrace.cli import build_parser
from ksmtrace.commands import COMMANDS

ROOT = Path(__file__).resolve().parents[2]
MAN = ROOT / "docs" / "man"
EXAMPLES = ROOT / "docs" / "examples"


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _options(parser: argparse.ArgumentParser) -> list[str]:
    # -h/--help is argparse's own, the same for every command.
    return [
        opt
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction)
        for opt in action.option_strings
    ]


def _plain(man_source: str) -> str:
    """The man page's words: groff's escaped hyphens and font switches removed."""
    text = man_source.replace("\\-", "-").replace("\\(hy", "-")
    return re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", text)


def _mentions(text: str, option: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def test_every_command_is_a_subcommand() -> None:
    assert set(_subparsers()) == set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_command_has_man_page_and_example(name: str) -> None:
    page = MAN / f"ksmtrace-{name}.8"
    example = EXAMPLES / f"{name}_example.txt"
    assert page.is_file(), f"{page.relative_to(ROOT)} is missing"
    assert example.is_file(), f"{example.relative_to(ROOT)} is missing"
    # An example is a captured command line and its output, not an empty stub.
    assert f"ksmtrace {name}" in example.read_text(), f"{example.name} never shows 'ksmtrace {name}'"


@pytest.mark.parametrize("name", COMMANDS)
def test_man_page_names_every_option(name: str) -> None:
    page = MAN / f"ksmtrace-{name}.8"
    if not page.is_file():
        pytest.fail(f"{page.relative_to(ROOT)} is missing")
    text = _plain(page.read_text())
    missing = [opt for opt in _options(_subparsers()[name]) if not _mentions(text, opt)]
    assert not missing, f"{page.name} does not mention {missing}"


def test_top_level_page_lists_every_command() -> None:
    text = _plain((MAN / "ksmtrace.8").read_text())
    missing = [name for name in COMMANDS if not _mentions(text, f"ksmtrace-{name}")]
    assert not missing, f"ksmtrace.8 does not refer to {missing}"


def test_plain_undoes_groff_escapes() -> None:
    # The matcher itself: an escaped option is found, a longer option does not count.
    text = _plain(r".BR \-\-no\-probes \fB\-j\fR")
    assert _mentions(text, "--no-probes") and _mentions(text, "-j")
    assert not _mentions(text, "--no")
