"""The per-boot cache of kernel facts: used only when it is this boot's,
root's alone and whole; otherwise ignored (it only ever saves time)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ksmtrace.kernel import bootcache

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the cache is root's: written only by root")


@pytest.fixture()
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KSMTRACE_RUN_DIR", str(tmp_path))
    monkeypatch.delenv("KSMTRACE_NO_BOOT_CACHE", raising=False)
    return tmp_path / "cache"


def test_saved_facts_come_back_and_sections_merge(run_dir: Path) -> None:
    assert bootcache.load("btf") == {}
    bootcache.save("btf", {"a": {"value": 1}})
    bootcache.save("btf", {"b": {"value": 2}})
    bootcache.save("kaddr", {"vmemmap_base": 7})
    assert bootcache.load("btf") == {"a": {"value": 1}, "b": {"value": 2}}
    assert bootcache.load("kaddr") == {"vmemmap_base": 7}
    path = run_dir / bootcache.FILE_NAME
    assert path.stat().st_mode & 0o777 == 0o600  # kernel addresses: root's alone
    assert run_dir.stat().st_mode & 0o777 == 0o700
    assert [p.name for p in run_dir.iterdir()] == [bootcache.FILE_NAME]  # no temporary left


def test_another_boot_release_or_version_is_ignored(run_dir: Path) -> None:
    bootcache.save("kaddr", {"vmemmap_base": 7})
    path = run_dir / bootcache.FILE_NAME
    for field, value in (("boot_id", "00000000-0000"), ("release", "5.4.0"), ("ksmtrace", "0.0.1")):
        data = json.loads(path.read_text())
        data["stamp"][field] = value
        path.write_text(json.dumps(data))
        assert bootcache.load("kaddr") == {}, field
        bootcache.save("kaddr", {"vmemmap_base": 7})  # rewritten for this boot
        assert bootcache.load("kaddr") == {"vmemmap_base": 7}


def test_corrupt_or_untrusted_files_are_ignored(run_dir: Path) -> None:
    bootcache.save("kaddr", {"vmemmap_base": 7})
    path = run_dir / bootcache.FILE_NAME
    path.chmod(0o644)  # others could not write it, but could read addresses KASLR hides
    assert bootcache.load("kaddr") == {}
    path.chmod(0o600)
    run_dir.chmod(0o777)  # anyone could have replaced the file
    assert bootcache.load("kaddr") == {}
    bootcache.save("kaddr", {"vmemmap_base": 8})  # and nothing is written there either
    run_dir.chmod(0o700)
    assert bootcache.load("kaddr") == {"vmemmap_base": 7}
    path.write_text("{not json")
    assert bootcache.load("kaddr") == {}
    bootcache.save("kaddr", {"vmemmap_base": 9})  # a corrupt file is replaced
    assert bootcache.load("kaddr") == {"vmemmap_base": 9}


def test_turned_off_by_the_environment(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KSMTRACE_NO_BOOT_CACHE", "1")
    bootcache.save("kaddr", {"vmemmap_base": 7})
    assert not run_dir.exists()
    assert bootcache.load("kaddr") == {}


def test_entries_of_their_own_come_back_and_the_oldest_go(run_dir: Path) -> None:
    assert bootcache.load_entry("prog-a.json") is None
    for i, name in enumerate(("prog-a.json", "prog-b.json", "prog-c.json")):
        bootcache.save_entry(name, {"n": i}, keep=2)
        os.utime(run_dir / name, (1000 + i, 1000 + i))  # a strict order of age
    assert bootcache.load_entry("prog-a.json") is None  # the oldest went
    assert bootcache.load_entry("prog-c.json") == {"n": 2}
    assert (run_dir / "prog-b.json").stat().st_mode & 0o777 == 0o600
    bootcache.save("kaddr", {"x": 1})  # another kind: not counted with them
    bootcache.save_entry("prog-d.json", {"n": 3}, keep=2)
    assert sorted(p.name for p in run_dir.iterdir()) == [bootcache.FILE_NAME, "prog-c.json", "prog-d.json"]
    bootcache.drop_entry("prog-d.json")
    assert bootcache.load_entry("prog-d.json") is None


def test_entry_of_another_boot_or_writable_by_others_is_ignored(run_dir: Path) -> None:
    bootcache.save_entry("prog-a.json", {"n": 1}, keep=4)
    path = run_dir / "prog-a.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "stamp": {**data["stamp"], "boot_id": "0000"}}))
    assert bootcache.load_entry("prog-a.json") is None
    bootcache.save_entry("prog-a.json", {"n": 1}, keep=4)
    path.chmod(0o620)
    assert bootcache.load_entry("prog-a.json") is None
    path.chmod(0o600)
    assert bootcache.load_entry("prog-a.json") == {"n": 1}
    path.write_text("{")
    assert bootcache.load_entry("prog-a.json") is None
