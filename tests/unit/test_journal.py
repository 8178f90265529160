"""The journal and its repair, on a KSM sysfs tree in a temporary directory."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ksmtrace.coordinator import actuator
from ksmtrace.coordinator.journal import Journal, entries
from ksmtrace.kernel import ksm_sysfs
from ksmtrace.kernel.procfs import ProcFS

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "host1" / "sys_kernel_mm_ksm"


def _sysfs(tmp: Path) -> Path:
    d = tmp / "ksm"
    shutil.copytree(FIXTURE, d)
    return d


def _dead_journal(run: Path, knobs_before: dict, knobs_set: dict, pid: int = 4_000_001) -> Path:
    run.mkdir(exist_ok=True)
    path = run / f"{pid}.json"
    owner = {"pid": pid, "starttime": 1, "command": "demo"}
    path.write_text(json.dumps({"owner": owner, "knobs_before": knobs_before, "knobs_set": knobs_set}))
    return path


def test_knob_change_journals_first_and_restores(tmp_path: Path) -> None:
    sysfs, run = _sysfs(tmp_path), tmp_path / "run"
    before = ksm_sysfs.read(sysfs).knobs
    with actuator.KnobChange("demo", sysfs, run) as k:
        k.set([("pages_to_scan", 5000), ("run", 1)])
        (path, entry), *_ = entries(run)
        assert path.name == f"{os.getpid()}.json"
        assert entry is not None and entry.knobs_set == {"pages_to_scan": 5000, "run": 1}
        assert entry.knobs_before == {"pages_to_scan": before["pages_to_scan"], "run": before["run"]}
        assert ksm_sysfs.read(sysfs).knobs["pages_to_scan"] == 5000
    assert ksm_sysfs.read(sysfs).knobs == before
    assert entries(run) == []


def test_repair_restores_what_a_dead_owner_set(tmp_path: Path) -> None:
    sysfs, run = _sysfs(tmp_path), tmp_path / "run"
    ksm_sysfs.write("pages_to_scan", 5000, sysfs)
    ksm_sysfs.write("sleep_millisecs", 10, sysfs)
    path = _dead_journal(
        run, {"pages_to_scan": 100, "sleep_millisecs": 20}, {"pages_to_scan": 5000, "sleep_millisecs": 10}
    )
    said = actuator.repair(run, sysfs)
    assert len(said) == 1 and "pid 4000001" in said[0] and "pages_to_scan 5000 -> 100" in said[0]
    knobs = ksm_sysfs.read(sysfs).knobs
    assert (knobs["pages_to_scan"], knobs["sleep_millisecs"]) == (100, 20)
    assert not path.exists()


def test_repair_leaves_a_knob_someone_changed_since(tmp_path: Path) -> None:
    sysfs, run = _sysfs(tmp_path), tmp_path / "run"
    ksm_sysfs.write("pages_to_scan", 777, sysfs)  # not what the dead owner set
    _dead_journal(run, {"pages_to_scan": 100}, {"pages_to_scan": 5000})
    (said,) = actuator.repair(run, sysfs)
    assert "pages_to_scan left at 777 (changed since)" in said
    assert ksm_sysfs.read(sysfs).knobs["pages_to_scan"] == 777


def test_repair_leaves_a_live_owner_alone(tmp_path: Path) -> None:
    sysfs, run = _sysfs(tmp_path), tmp_path / "run"
    j = Journal("daemon", run)
    j.entry.knobs_before["pages_to_scan"] = 100
    j.entry.knobs_set["pages_to_scan"] = 5000
    ksm_sysfs.write("pages_to_scan", 5000, sysfs)
    j.write()
    assert actuator.repair(run, sysfs) == []
    assert ksm_sysfs.read(sysfs).knobs["pages_to_scan"] == 5000
    assert j.path.exists()


def test_a_reused_pid_is_not_the_owner(tmp_path: Path) -> None:
    """Our own pid with another start time: the journal's owner is dead, the pid reused."""
    sysfs, run = _sysfs(tmp_path), tmp_path / "run"
    ksm_sysfs.write("pages_to_scan", 5000, sysfs)
    assert ProcFS().stat(os.getpid()).starttime != 1
    _dead_journal(run, {"pages_to_scan": 100}, {"pages_to_scan": 5000}, pid=os.getpid())
    assert len(actuator.repair(run, sysfs)) == 1
    assert ksm_sysfs.read(sysfs).knobs["pages_to_scan"] == 100


def test_unreadable_journal_is_removed_and_said(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "9.json").write_text("{half a journ")
    (said,) = actuator.repair(run, _sysfs(tmp_path))
    assert "unreadable" in said and not (run / "9.json").exists()
