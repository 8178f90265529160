"""The rooms keep to their jobs (docs/architecture.md), checked on the source tree.

* Only ksmtrace/views/ writes to the terminal: commands and every other room
  hand rows and records to a view (print, sys.stdout/sys.stderr writes).
* Only ksmtrace/kernel/ names files under /proc or /sys: every other room
  reads the kernel through its readers (which take their root as a
  parameter, so fixtures can stand in).
* ksmtrace/model/ and ksmtrace/views/ read no files at all (views/console.py
  writes to the terminal and is the one exception).
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "ksmtrace"
# The workload is a separate program (python -m ksmtrace.workload) whose
# stdout is a JSON reply pipe to its parent, not output for people.
PRINT_EXEMPT = {"workload.py"}
FILE_CALLS = {
    "open",
    "read_text",
    "read_bytes",
    "write_text",
    "write_bytes",
    "iterdir",
    "listdir",
    "readlink",
}


def _sources() -> list[tuple[str, ast.AST]]:
    return [(str(p.relative_to(PKG)), ast.parse(p.read_text())) for p in sorted(PKG.rglob("*.py"))]


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                ids.add(id(body[0].value))
    return ids


def _call_name(node: ast.Call) -> str:
    f = node.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def test_only_views_print() -> None:
    bad = []
    for rel, tree in _sources():
        if rel.startswith("views/") or rel in PRINT_EXEMPT:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                bad.append(f"{rel}:{node.lineno}: print()")
            if isinstance(node, ast.Attribute) and node.attr in ("stdout", "stderr"):
                if isinstance(node.value, ast.Name) and node.value.id == "sys":
                    bad.append(f"{rel}:{node.lineno}: sys.{node.attr}")
    assert not bad, "output outside ksmtrace/views:\n" + "\n".join(bad)


def test_only_kernel_names_proc_and_sys() -> None:
    bad = []
    for rel, tree in _sources():
        if rel.startswith("kernel/"):
            continue
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                if node.value.startswith(("/proc", "/sys")):
                    bad.append(f"{rel}:{node.lineno}: {node.value!r}")
    assert not bad, "/proc or /sys named outside ksmtrace/kernel:\n" + "\n".join(bad)


def test_model_and_views_read_no_files() -> None:
    bad = []
    for rel, tree in _sources():
        # console.py is the terminal writer itself (it redirects stdout when the reader leaves).
        if not rel.startswith(("model/", "views/")) or rel == "views/console.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _call_name(node) in FILE_CALLS:
                bad.append(f"{rel}:{node.lineno}: {_call_name(node)}()")
    assert not bad, "file access in a pure room:\n" + "\n".join(bad)


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """The walkers see what they look for (a check that finds nothing proves nothing)."""
    tree = ast.parse('import sys\nprint("x")\nsys.stdout.write("y")\nopen("/proc/1/stat")\n')
    names = [_call_name(n) for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert {"print", "write", "open"} <= set(names)
    consts = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)]
    assert "/proc/1/stat" in consts


def test_test_files_have_unique_basenames() -> None:
    """pytest imports test files without packages by basename: two test_x.py in
    tests/unit and tests/system break the whole collection (the README's command)."""
    tests = Path(__file__).resolve().parents[1]
    names = [p.name for p in tests.rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
