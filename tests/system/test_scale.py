"""A thousand mergeable processes through the whole tracer (issue #14).

tests/targets/forkwriters.c maps pages of one content, ksmd merges them, and
the parent forks 1,000 children that share the KSM pages; each child then
writes one page: one KSM COW fault in each of 1,000 processes. The Sampler
(what ``faults``, ``top`` and the daemon run on) must count exactly one for
each child, and the sum over every process must equal the kernel's own
cow_ksm over the same interval, with nothing dropped.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ksmtrace.kernel import bootcache
from ksmtrace.kernel.procfs import ProcFS
from ksmtrace.live.sampler import Sampler
from ksmtrace.probes import kaddr

pytestmark = pytest.mark.system

SRC = Path(__file__).resolve().parent.parent / "targets" / "forkwriters.c"
CHILDREN = 1000
PAGES = 64


@pytest.fixture(scope="module")
def forkwriters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed to build the test targets"
    out = tmp_path_factory.mktemp("targets") / "forkwriters"
    subprocess.run([cc, "-O2", "-Wall", str(SRC), "-o", str(out)], check=True)
    return out


class Writers:
    def __init__(self, binary: Path) -> None:
        self.proc = subprocess.Popen(
            [str(binary), str(CHILDREN), str(PAGES)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.pid = self.proc.pid
        _, addr, length = self.say(None, "mapped").split()
        self.addr, self.len = int(addr), int(length)

    def say(self, line: str | None, want: str) -> str:
        assert self.proc.stdin and self.proc.stdout
        if line is not None:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        got = self.proc.stdout.readline()
        assert got.startswith(want), f"forkwriters said {got!r}, not {want!r}"
        return got

    def children(self) -> list[int]:
        return [int(p) for p in Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


@pytest.fixture()
def writers(forkwriters: Path) -> Iterator[Writers]:
    w = Writers(forkwriters)
    try:
        yield w
    finally:
        w.close()


def test_thousand_processes_ksm_cow_each_and_sum_equal_cow_ksm(ksm, writers) -> None:  # type: ignore[no-untyped-def]
    ksm.merge_then_stop((writers.pid, {"addr": writers.addr, "len": writers.len}, PAGES))
    writers.say("fork", "forked")
    kids = set(writers.children())
    assert len(kids) == CHILDREN
    with Sampler() as s:
        time.sleep(0.2)
        s.sample(0.2)  # the interval before: no writes yet
        writers.say("write", "written")
        snap = s.sample(0.2)
    report = snap.faults
    assert report is not None and report.cow_ksm is not None
    cow = {p.pid: p.rates["ksm_cow"].delta for p in report.processes}
    # Exactly one KSM COW fault in each child, none in the parent.
    assert {pid for pid in kids if cow.get(pid) != 1} == set()
    assert cow.get(writers.pid, 0) == 0
    # The sum over every process is the kernel's machine-wide count.
    assert report.ksm_cow_sum == report.cow_ksm.delta >= CHILDREN
    # Nothing lost (no_table: a fault of a process whose region table was not
    # written yet counts in its "(other)" row; the process count is whole).
    lost = ("proc_drops", "walk_failures", "merged_drops", "untracked_ksm_cow")
    assert {k: report.drops[k] for k in lost if report.drops[k]} == {}
    assert ProcFS().exists(writers.pid)


def test_kernel_facts_from_the_boot_cache_equal_fresh_ones(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The layout a later command reads from the boot cache is the one an
    uncached search finds and checks now (BTF answers included)."""
    monkeypatch.setenv("KSMTRACE_RUN_DIR", str(tmp_path))
    kaddr.layout.cache_clear()
    try:
        monkeypatch.setenv("KSMTRACE_NO_BOOT_CACHE", "1")
        fresh = kaddr.layout()
        assert not (tmp_path / "cache").exists()
        kaddr.layout.cache_clear()
        monkeypatch.delenv("KSMTRACE_NO_BOOT_CACHE")
        first = kaddr.layout()  # searched again, then remembered
        assert bootcache.load(kaddr.CACHE_SECTION)["vmemmap_base"] == fresh.vmemmap_base
        kaddr.layout.cache_clear()

        def no_search(*_a: object) -> None:
            raise AssertionError("the BPF search ran again instead of the boot cache")

        monkeypatch.setattr(kaddr, "_search", no_search)
        cached = kaddr.layout()
    finally:
        kaddr.layout.cache_clear()
    assert fresh == first == cached
