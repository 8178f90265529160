"""Per-task copy-on-write counts from taskstats (CONFIG_TASKSTATS), an
independent check of the BPF counts.

``wpcopy_count`` counts pages a task copied on write (any COW: fork, zero
page, KSM), and only while ``kernel.task_delayacct=1``; :class:`DelayAcct`
turns that on for a block and puts the old value back. The kernel gives a
task its delay-accounting record at fork only while accounting is on, so only
processes started inside the block are counted.

pyroute2 decodes the stats attribute with a version-15 layout, but newer
kernels answer version 16+ (fields were inserted), so wpcopy_* come back
wrong. ksmtrace asks through pyroute2's generic-netlink socket but has the
attribute handed over raw, and reads it with offsets of the running kernel's
``struct taskstats`` from BTF.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2.netlink import NLM_F_REQUEST, nla
from pyroute2.netlink.generic import GenericNetlinkSocket
from pyroute2.netlink.taskstats import TASKSTATS_CMD_GET, taskstatsmsg, tcmd

from ksmtrace.errors import NeedsPrivilege, ProcessGone, TracingUnavailable
from ksmtrace.kernel import btf

DELAYACCT = Path("/proc/sys/kernel/task_delayacct")


class _RawStats(taskstatsmsg):
    """taskstatsmsg with TASKSTATS_TYPE_STATS left as bytes."""

    nla_map = (
        ("TASKSTATS_TYPE_UNSPEC", "none"),
        ("TASKSTATS_TYPE_PID", "uint32"),
        ("TASKSTATS_TYPE_TGID", "uint32"),
        ("TASKSTATS_TYPE_STATS", "cdata"),
        ("TASKSTATS_TYPE_AGGR_PID", "aggr_pid"),
        ("TASKSTATS_TYPE_AGGR_TGID", "aggr_tgid"),
    )

    class aggr_id(nla):
        nla_map = (
            ("TASKSTATS_TYPE_UNSPEC", "none"),
            ("TASKSTATS_TYPE_PID", "uint32"),
            ("TASKSTATS_TYPE_TGID", "uint32"),
            ("TASKSTATS_TYPE_STATS", "cdata"),
        )

    class aggr_pid(aggr_id):
        pass

    class aggr_tgid(aggr_id):
        pass


@dataclass(frozen=True)
class TaskstatsLayout:
    """Offsets of the fields ksmtrace reads, declared once, from BTF."""

    version: int
    wpcopy_count: int
    wpcopy_delay_total: int
    ac_minflt: int

    @classmethod
    def from_btf(cls) -> TaskstatsLayout:
        b = btf.load()
        try:
            return cls(
                version=b.offset("taskstats", "version"),
                wpcopy_count=b.offset("taskstats", "wpcopy_count"),
                wpcopy_delay_total=b.offset("taskstats", "wpcopy_delay_total"),
                ac_minflt=b.offset("taskstats", "ac_minflt"),
            )
        except KeyError as exc:  # wpcopy_* appeared in Linux 6.3 (taskstats v13)
            raise TracingUnavailable(f"this kernel's taskstats has no COW counts: {exc}") from exc


@dataclass(frozen=True)
class TaskCow:
    tgid: int
    version: int
    wpcopy_count: int  # pages copied on write, all threads
    wpcopy_delay_ns: int
    minflt: int


def decode_stats(raw: bytes, layout: TaskstatsLayout, tgid: int) -> TaskCow:
    def u64(off: int) -> int:
        return int(struct.unpack_from("=Q", raw, off)[0])

    (version,) = struct.unpack_from("=H", raw, layout.version)
    return TaskCow(
        tgid=tgid,
        version=int(version),
        wpcopy_count=u64(layout.wpcopy_count),
        wpcopy_delay_ns=u64(layout.wpcopy_delay_total),
        minflt=u64(layout.ac_minflt),
    )


class TaskStats:
    def __init__(self) -> None:
        self.layout = TaskstatsLayout.from_btf()
        self.sock = GenericNetlinkSocket()
        try:
            self.sock.bind("TASKSTATS", _RawStats)
        except Exception as exc:
            self.sock.close()
            raise TracingUnavailable(f"taskstats netlink family unavailable: {exc}") from exc

    def tgid(self, tgid: int) -> TaskCow:
        """Counts of the whole process (live threads plus exited ones)."""
        msg = tcmd()
        msg["cmd"] = TASKSTATS_CMD_GET
        msg["version"] = 1
        msg["attrs"].append(["TASKSTATS_CMD_ATTR_TGID", tgid])
        try:
            replies: Any = self.sock.nlm_request(msg, self.sock.prid, msg_flags=NLM_F_REQUEST)
        except PermissionError as exc:
            raise NeedsPrivilege("taskstats needs root (CAP_NET_ADMIN)") from exc
        except Exception as exc:  # ESRCH comes back as a NetlinkError
            if getattr(exc, "code", None) == 3:
                raise ProcessGone(tgid) from exc
            raise
        for reply in replies:
            aggr = reply.get_attr("TASKSTATS_TYPE_AGGR_TGID")
            if aggr is None:
                continue
            raw = aggr.get_attr("TASKSTATS_TYPE_STATS")
            if raw:
                return decode_stats(bytes(raw), self.layout, tgid)
        raise ProcessGone(tgid, "no taskstats reply")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> TaskStats:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DelayAcct:
    """``with DelayAcct():`` sets kernel.task_delayacct=1, restores it after."""

    def __init__(self, path: Path = DELAYACCT) -> None:
        self.path = path
        self.saved: str | None = None

    def __enter__(self) -> DelayAcct:
        try:
            self.saved = self.path.read_text().strip()
            if self.saved != "1":
                self.path.write_text("1")
        except PermissionError as exc:
            raise NeedsPrivilege("setting kernel.task_delayacct needs root") from exc
        return self

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None and self.saved != "1":
            self.path.write_text(self.saved)
