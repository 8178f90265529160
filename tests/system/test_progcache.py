"""Programs loaded from the boot's cache (ksmtrace/probes/progcache.py) count
what BCC's fresh build counts, event for event.

Each test runs a compiled build and a cached one side by side, attached to
the same kernel at the same time: with separate maps, both must see the
same faults and merges. A kept build the kernel refuses is compiled again.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from ksmtrace.kernel import vmstat
from ksmtrace.probes.faults import FaultProbe
from ksmtrace.probes.ksmd import KsmdProbe

pytestmark = pytest.mark.system


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty cache of our own: the first load of each build compiles."""
    monkeypatch.setenv("KSMTRACE_RUN_DIR", str(tmp_path))
    monkeypatch.delenv("KSMTRACE_NO_BOOT_CACHE", raising=False)
    tmp_path.chmod(0o700)
    yield tmp_path / "cache"


def _entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("prog-*.json"))


def _from_cache(probe: object) -> bool:
    bpf = getattr(probe, "bpf", None) or getattr(probe, "_bpf", None)  # OptinProbe keeps it private
    return bool(getattr(bpf, "from_cache", False))


def _ksm_cow(snap, pid: int) -> int:  # type: ignore[no-untyped-def]
    return snap.procs[pid].total.ksm_cow if pid in snap.procs else 0


def test_cached_fault_probe_counts_like_a_compiled_one(ksm, workload, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    w = workload()
    r = w.call("alloc", name="r", pages=128, kind="dup", seed=5)
    w.call("madvise", name="r")
    with FaultProbe() as compiled:
        assert not _from_cache(compiled)
        (entry,) = _entries(run_dir)
        assert stat.S_IMODE(entry.stat().st_mode) == 0o600
        with FaultProbe() as cached:
            assert _from_cache(cached)
            assert sorted(cached.bpf.raw_tracepoint_fds) == sorted(compiled.bpf.raw_tracepoint_fds)
            assert sorted(cached.bpf.tracepoint_fds) == sorted(compiled.bpf.tracepoint_fds)
            ksm.merge_then_stop((w.pid, r, 128))
            a0, b0, cow0 = compiled.snapshot(), cached.snapshot(), vmstat.ksm_vmstat()["cow_ksm"]
            w.call("write", name="r", first=0, count=128, step=3)
            a1, b1, cow1 = compiled.snapshot(), cached.snapshot(), vmstat.ksm_vmstat()["cow_ksm"]
    want = len(range(0, 128, 3))
    assert _ksm_cow(a1, w.pid) - _ksm_cow(a0, w.pid) == want
    assert _ksm_cow(b1, w.pid) - _ksm_cow(b0, w.pid) == want
    assert cow1 - cow0 >= want
    for key in ("ksm_cow_fast", "ksm_cow_walked"):
        assert a1.stats[key] - a0.stats[key] == b1.stats[key] - b0.stats[key], key


@pytest.mark.requires_kernel_feature("ksm_tracepoints")
def test_cached_ksmd_probe_counts_like_a_compiled_one(ksm, workload, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    w = workload()
    r = w.call("alloc", name="r", pages=96, kind="dup", seed=9)
    w.call("madvise", name="r")
    with KsmdProbe(pid=w.pid) as compiled, KsmdProbe(pid=w.pid) as cached:
        assert not _from_cache(compiled) and _from_cache(cached)
        ksm.merge_then_stop((w.pid, r, 96))
        a, b = compiled.snapshot(), cached.snapshot()
    assert a.procs[w.pid].merges > 0
    assert a.procs == b.procs
    assert a.pages == b.pages and len(a.pages) >= 96


def test_refused_entry_is_compiled_again(run_dir: Path) -> None:
    """An entry whose instructions the verifier refuses (here: a program that
    returns an unset register) is dropped; the probe compiles and keeps a
    good one."""
    with FaultProbe():
        pass
    (entry,) = _entries(run_dir)
    data = json.loads(entry.read_text())
    data["payload"]["progs"][0]["code"] = base64.b64encode(bytes.fromhex("9500000000000000")).decode()
    entry.write_text(json.dumps(data))
    with FaultProbe() as fp:
        assert not _from_cache(fp)
        assert fp.snapshot().stats is not None
    assert json.loads(entry.read_text())["payload"]["progs"][0]["code"] != "lQAAAAAAAAA="
    with FaultProbe() as fp:
        assert _from_cache(fp)


def test_entry_others_could_write_is_not_loaded(run_dir: Path) -> None:
    with FaultProbe():
        pass
    (entry,) = _entries(run_dir)
    os.chmod(entry, 0o666)
    with FaultProbe() as fp:
        assert not _from_cache(fp)


def test_cached_optin_probe_reads_its_ring_buffer(workload, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    from ksmtrace.probes.optins import OptinProbe

    wl = workload()
    reg = wl.call("alloc", name="a", pages=8)
    with OptinProbe(pids=[wl.pid]) as compiled, OptinProbe(pids=[wl.pid]) as cached:
        assert not _from_cache(compiled) and _from_cache(cached)
        assert wl.call("madvise", name="a")["ret"] == 0
        a, b = list(compiled.events(duration=0.5)), list(cached.events(duration=0.1))
        sa, sb = compiled.stats(), cached.stats()
    assert [(e.syscall, e.pid, e.start, e.length, e.ret) for e in a] == [
        ("madvise", wl.pid, reg["addr"], reg["len"], 0)
    ]
    assert [(e.syscall, e.pid, e.start, e.length, e.ret) for e in b] == [
        (e.syscall, e.pid, e.start, e.length, e.ret) for e in a
    ]
    assert (sa.emitted, sa.lost) == (sb.emitted, sb.lost) == (1, 0)
