"""ksmtrace demo: see an opt-in, ksmd merging and copy-on-write within seconds.

Starts the built-in workload (identical private anonymous pages) and ksmtrace's
probes filtered to it, opts it in with madvise(MADV_MERGEABLE), lets ksmd merge
it with brisk settings, then writes to some merged pages so that each write
breaks a merge. Every step is shown as the kernel reports it: the opt-in from
the syscall tracepoints, merges from the ksm tracepoints, copy-on-write faults
from the fault path, beside /proc's live page state and vmstat's cow_ksm. The
KSM settings are restored on exit, whatever happens.

Without BCC (or on a kernel lacking a tracepoint) the demo still runs on /proc
alone and says which probe it went without.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any

from ksmtrace.coordinator.actuator import KnobChange
from ksmtrace.errors import KsmtraceError, TracingUnavailable, UsageError
from ksmtrace.kernel import checks, features, ksm_sysfs, pagemap, vmstat
from ksmtrace.kernel.signals import critical
from ksmtrace.views import console
from ksmtrace.views import demo as view
from ksmtrace.workload import PAGE, Workload, WorkloadError

# Largest workload the demo offers: it is a demonstration, not a load test.
MAX_SIZE_MIB = 4096
EPILOG = """\
examples:
  ksmtrace demo                 # 64 MiB, a quarter of the merged pages written
  ksmtrace demo --size 16 -j    # smaller, one JSON summary at the end
  ksmtrace demo --no-probes     # /proc and sysfs only, no BPF
"""
BRISK = (("pages_to_scan", 5000), ("sleep_millisecs", 10))


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="run a built-in workload that opts in, gets merged, and breaks merges",
        description="Start a small workload, opt it into KSM, let ksmd merge it, write to "
        "some merged pages, and show each step as the kernel reports it. KSM settings "
        "are changed for the demo and restored afterwards.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size", type=int, default=64, metavar="MIB", help="workload size (default 64)")
    p.add_argument(
        "--writes",
        type=float,
        default=0.25,
        metavar="FRACTION",
        help="fraction of merged pages to write to (default 0.25)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SEC",
        help="give up waiting for ksmd after this long (default 30)",
    )
    p.add_argument("--no-probes", action="store_true", help="use /proc only, no BPF")
    p.add_argument("-j", "--json", action="store_true", help="print one JSON summary at the end")
    p.set_defaults(run=run)


class _Probes:
    """The three probes, each optional: a missing one is reported, not fatal."""

    def __init__(self, pid: int, say: Any) -> None:
        from ksmtrace.probes import faults, ksmd, optins  # noqa: PLC0415 (BCC is slow to import)

        self.optins = self.faults = self.ksmd = None
        self.missing: list[str] = []
        self.why: dict[str, str] = {}
        try:
            self._load(pid, say, optins, faults, ksmd)
        except BaseException:
            # Interrupted while loading: detach what was attached already.
            self.close()
            raise

    def _load(self, pid: int, say: Any, optins: Any, faults: Any, ksmd: Any) -> None:
        for name, make, lacking in (
            ("optins", lambda: optins.OptinProbe(pids=[pid]), None),
            (
                "faults",
                lambda: faults.FaultProbe(pid=pid) if faults.available() else None,
                "the exceptions:page_fault_user tracepoint",
            ),
            ("ksmd", lambda: ksmd.KsmdProbe(pid=pid) if ksmd.available() else None, "ksm_tracepoints"),
        ):
            try:
                probe = make()
            except TracingUnavailable as exc:
                probe = None
                self.why[name] = str(exc)
            else:
                if probe is None:
                    lacks = features.lacks(lacking) if lacking in features.FEATURES else f"no {lacking}"
                    self.why[name] = f"{lacks}; that step is shown from /proc"
            if probe is None:
                self.missing.append(name)
                say(view.probe_missing(name, self.why[name]))
            setattr(self, name, probe)

    def close(self) -> None:
        with critical():
            for p in (self.optins, self.faults, self.ksmd):
                if p is not None:
                    with contextlib.suppress(Exception):
                        p.close()


def check_args(args: argparse.Namespace) -> None:
    if not 1 <= args.size <= MAX_SIZE_MIB:
        raise UsageError(f"--size takes 1 to {MAX_SIZE_MIB} MiB, not {args.size}")
    if not 0 <= args.writes <= 1:
        raise UsageError(f"--writes is a fraction from 0 to 1, not {args.writes:g}")
    if not args.timeout > 0:
        raise UsageError("--timeout must be a positive number of seconds")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    checks.require_root("pagemap")
    ksm_sysfs.require_ksm()
    pages = args.size * 1024 * 1024 // PAGE

    def say(msg: str) -> None:
        if not args.json:
            console.lines(msg)

    # Journaled before any knob changes: a SIGKILL leaves a journal the next
    # ksmtrace command repairs (ksmtrace.coordinator.actuator).
    knobs = KnobChange("demo")
    summary: dict[str, Any] = {}
    probes: _Probes | None = None
    wl: Workload | None = None
    try:
        wl = Workload(comm="ksmtrace-demo")
        reg = wl.call("alloc", name="demo", pages=pages, kind="dup", seed=7)
        addr, length = reg["addr"], reg["len"]
        say(view.workload(wl.pid, addr, length))
        if not args.no_probes:
            say(view.loading())
            probes = _Probes(wl.pid, say)
        summary.update(pid=wl.pid, pages=pages, probes_missing=probes.missing if probes else None)
        if probes and probes.why:
            summary["probes_unavailable"] = probes.why

        res = wl.call("madvise", name="demo", advice="mergeable")
        summary["madvise_ret"] = res["ret"]
        events = probes.optins.poll(200) if probes and probes.optins else []
        if probes and probes.optins:
            summary["optin_events"] = [e.as_dict() for e in events]
            for e in events:
                say(view.optin_seen(e))
        else:
            say(view.optin_unseen(wl.pid, addr, length, res["ret"]))
        if probes and probes.faults:
            probes.faults.set_regions(wl.pid, [(addr, addr + length)])

        knobs.set((*BRISK, ("run", 1)))
        say(view.knobs((("run", 1), *BRISK)))
        merged = _wait_merged(args, say, wl.pid, addr, length, pages, probes)
        summary.update(merged_pages=merged)
        if probes and probes.ksmd:
            counts = probes.ksmd.snapshot(pages=False).procs.get(wl.pid)
            summary["ksmd_merges"] = counts.merges if counts else 0
        if merged == 0:
            raise KsmtraceError(
                "ksmd merged nothing within the timeout: is another tool holding /sys/kernel/mm/ksm/run at 0?"
            )

        # Stop scanning (run=0 keeps merged pages merged): the written pages
        # are identical to each other and a running ksmd would re-merge them.
        knobs.set([("run", 0)])
        cow0 = vmstat.ksm_vmstat().get("cow_ksm")
        step = max(1, int(round(1 / args.writes))) if args.writes > 0 else 0
        written = wl.call("write", name="demo", step=step)["written"] if step else 0
        cow1 = vmstat.ksm_vmstat().get("cow_ksm")
        after = pagemap.range_pages(wl.pid, addr, addr + length).ksm
        cow = None if cow0 is None or cow1 is None else cow1 - cow0
        summary.update(written=written, cow_ksm_delta=cow, merged_after_writes=after)
        ksm_cow = None
        if probes and probes.faults:
            snap = probes.faults.snapshot().procs.get(wl.pid)
            ksm_cow = snap.total.ksm_cow if snap else 0
            summary["ksm_cow_faults"] = ksm_cow
        say(view.writes(wl.pid, written, ksm_cow, cow, after))
    except WorkloadError as exc:
        raise KsmtraceError(f"demo workload failed: {exc}") from exc
    finally:
        # Nothing here may be cut short by a second signal (kernel.signals.critical).
        with critical():
            if probes is not None:
                probes.close()
            if wl is not None:
                wl.close()
            knobs.restore()
    if args.json:
        console.json(summary)
    else:
        console.lines(view.done())
    return 0


def _wait_merged(
    args: argparse.Namespace,
    say: Any,
    pid: int,
    addr: int,
    length: int,
    pages: int,
    probes: _Probes | None,
) -> int:
    t0 = time.monotonic()
    merged = 0
    while time.monotonic() - t0 < args.timeout:
        merged = pagemap.range_pages(pid, addr, addr + length).ksm
        traced = None
        if probes and probes.ksmd:
            c = probes.ksmd.snapshot(pages=False).procs.get(pid)
            traced = c.merges if c else 0
        sharing = ksm_sysfs.read().get("pages_sharing")
        say(view.merging(time.monotonic() - t0, merged, pages, traced, sharing))
        if merged >= pages:
            break
        time.sleep(0.5)
    return merged
