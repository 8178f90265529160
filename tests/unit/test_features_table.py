"""ksmtrace.kernel.features is the one table of kernel facts: every row says when and by what.

Each row names the mainline release (``since``) and the commit that added the
interface (``commit``: "<12 hex> (\"subject\")", or None where no source
confirmed the hash). The field has a default so old callers can build a
Feature with four arguments; the source check below makes sure that no row of
the table leans on that default by forgetting the column.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from ksmtrace.kernel import features

COMMIT = re.compile(r'^[0-9a-f]{12} \("[^\n]+"\)$')
RELEASE = re.compile(r"^\d+\.\d+(\.\d+)?$")


def test_every_row_has_since_and_commit() -> None:
    assert features.FEATURES
    for name, f in features.FEATURES.items():
        assert name == f.name
        assert RELEASE.match(f.since), (name, f.since)
        assert f.commit is None or COMMIT.match(f.commit), (name, f.commit)
        assert f.what and callable(f.probe), name


def test_every_row_states_its_commit_explicitly() -> None:
    tree = ast.parse(Path(features.__file__).read_text())
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Feature"
    ]
    assert len(calls) == len(features.FEATURES)
    for call in calls:
        assert any(k.arg == "commit" for k in call.keywords), ast.unparse(call.args[0])


def test_names_are_unique() -> None:
    # FEATURES is a dict built from the rows: a repeated name would silently drop a row.
    tree = ast.parse(Path(features.__file__).read_text())
    names = [
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "Feature"
        and isinstance(node.args[0], ast.Constant)
    ]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert set(names) == set(features.FEATURES)


def test_report_carries_the_commit() -> None:
    rep = features.report()
    assert set(rep) == set(features.FEATURES)
    for name, row in rep.items():
        assert row["commit"] == features.FEATURES[name].commit
        assert {"available", "what", "since", "commit"} <= set(row)


def test_unknown_feature_is_an_error() -> None:
    try:
        features.available("no_such_feature")
    except KeyError as exc:
        assert "known:" in str(exc)
    else:
        raise AssertionError("an unknown feature name must raise")
