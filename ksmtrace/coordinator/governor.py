"""ksmd to a CPU budget: pages_to_scan, sleep_millisecs and run, decided from samples.

:class:`KsmdGovernor` is the decision alone (no I/O): fed one
:class:`GovernorSample` per interval, it answers a :class:`KsmdSetting` whose
``reason`` carries the numbers. :class:`GovernorDriver` is the thin part that
reads the samples (sysfs, ksmd's CPU time) and writes settings through a
:class:`~ksmtrace.coordinator.actuator.KnobChange`, the only writer.

The model: ksmd wakes every ``sleep`` seconds and visits ``pages_to_scan``
pages at a cost of ``c`` CPU seconds each, so it scans
``r = p / (s + p*c)`` pages a second and is busy ``r*c`` of one core. From
one window of samples the governor measures its share ``f`` and its rate
``r`` (``pages_scanned`` where the kernel counts it, 6.6+; else the model's
``p*(1-f)/s``), hence ``c = f/r``; it then wants the smaller of the rate the
budget allows and the rate that scans the mergeable set once per
``full_scan_s``, at most x2 and at least x0.5 the rate now, so that a wrong
``c`` (the cost differs between first visits, rescans of unique pages and
merged pages) is corrected over steps instead of overshooting.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ksmtrace.coordinator.actuator import KnobChange
from ksmtrace.coordinator.policy import Ksmd
from ksmtrace.errors import AccessDenied, ProcessGone
from ksmtrace.kernel import features, ksm_sysfs
from ksmtrace.kernel.ksm_sysfs import KSM_SYSFS
from ksmtrace.kernel.procfs import ProcFS

DEADBAND = (0.8, 1.0)  # of the budget: a share in here is left alone (no flapping)
TARGET = 0.9  # of the budget: where a change aims, the deadband's middle
STEP = (0.5, 2.0)  # bounds on the scan rate's change per step
MIN_CHANGE = 0.1  # a smaller change of pages_to_scan is not made (flapping on noise)
NEED_SLACK = (0.9, 1.5)  # of the needed rate: scanning within this is "as often as needed"
MAX_SLEEP_MS = 10_000  # a longer sleep would make ksmd slow to notice a wake-up
# Of the budget: a last second this far over is decided on alone, not the window's mean
# (a cost per page that rose, e.g. as merging starts, shows there seconds earlier;
# 25% over is past what CPU-time noise on a busy host does to one second).
TAIL_OVER = 1.25
Knobs = list[tuple[str, "int | str"]]


@dataclass(frozen=True)
class GovernorSample:
    """One look at ksmd: its knobs, counters and CPU time, and the caller's mergeable count."""

    t: float  # monotonic seconds
    ksmd_cpu_s: float | None  # ksmd's CPU time so far; None if unreadable
    run: int
    pages_to_scan: int
    sleep_millisecs: int
    full_scans: int
    pages_shared: int
    pages_sharing: int
    pages_unshared: int
    pages_volatile: int
    pages_scanned: int | None = None  # 6.6+ (features "pages_scanned")
    advisor_mode: str | None = None  # 6.8+ (features "ksm_advisor")
    mergeable_pages: int | None = None  # pages in VM_MERGEABLE areas (caller's count); None: unknown


@dataclass(frozen=True)
class KsmdSetting:
    run: int
    pages_to_scan: int
    sleep_millisecs: int
    reason: str


def _pct(x: float) -> str:
    return f"{x:.1f}%" if x < 10 else f"{x:.0f}%"


def _secs(x: float) -> str:
    return f"{x:.1f} s" if x < 10 else f"{x:.0f} s"


class KsmdGovernor:
    """Decides ksmd's knobs, one window of samples at a time. Pure: no I/O."""

    def __init__(
        self,
        policy: Ksmd,
        has_advisor: bool,
        min_window_s: float = 1.0,
        max_window_s: float = 10.0,
        quiet_scans: int = 2,
    ) -> None:
        self.policy = policy
        # The advisor owns pages_to_scan only where the kernel has one; we never write it then.
        self.advisor_owns = policy.advisor == "kernel" and has_advisor
        self.has_advisor = has_advisor
        self.min_window_s = min_window_s
        # The window: samples since the last change, at most this long (the cost per page
        # changes as merging goes on, and an old window hides it).
        self.max_window_s = max_window_s
        self.quiet_scans = quiet_scans  # full scans in a row that merged nothing before ksmd goes off
        self.sleep_ms = max(1, policy.sleep_millisecs)  # sleep 0 would leave no way to bound the share
        self.notes: list[str] = []  # said once: the daemon logs them
        if policy.advisor == "kernel" and not has_advisor:
            self.notes.append(
                f"policy asks for the kernel's advisor, but {features.lacks('ksm_advisor')}: "
                "ksmtrace governs pages_to_scan itself"
            )
        self.setting: KsmdSetting | None = None
        self._window: list[GovernorSample] = []
        self._window_knobs: tuple[int, int, int] | None = None
        self._quiet: GovernorSample | None = None
        self._off_mergeable = 0
        self._wake: str | None = None
        self._left = (policy.min_pages_to_scan, self.sleep_ms)  # knobs when last turned off

    def setup(self, sample: GovernorSample) -> Knobs:
        """Advisor knobs to write once, before the first step: the policy's advisor, never fought."""
        if not self.has_advisor:
            return []
        p = self.policy
        if not self.advisor_owns:
            # Switching the mode resets pages_to_scan in the kernel: only if it is not off already.
            return [] if sample.advisor_mode == "none" else [("advisor_mode", "none")]
        return [
            ("advisor_max_cpu", max(1, round(p.budget_pct))),  # integer percent of one core
            ("advisor_target_scan_time", max(1, round(p.full_scan_s))),
            ("advisor_max_pages_to_scan", p.max_pages_to_scan),
            ("advisor_min_pages_to_scan", p.min_pages_to_scan),
            ("sleep_millisecs", self.sleep_ms),
            ("advisor_mode", "scan-time"),
        ]

    def wake(self, reason: str) -> None:
        """New mergeable ranges (the caller made or saw them): ksmd on at the next step."""
        self._wake = reason

    def writes(self, setting: KsmdSetting, sample: GovernorSample) -> Knobs:
        """The knob writes that take ksmd from ``sample`` to ``setting``; run last."""
        out: Knobs = []
        if not self.advisor_owns:
            if setting.pages_to_scan != sample.pages_to_scan:
                out.append(("pages_to_scan", setting.pages_to_scan))
            if setting.sleep_millisecs != sample.sleep_millisecs:
                out.append(("sleep_millisecs", setting.sleep_millisecs))
        if setting.run != sample.run:
            out.append(("run", setting.run))
        return out

    # -- the decision --------------------------------------------------------

    def step(self, s: GovernorSample) -> KsmdSetting:
        self.setting = self._decide(s)
        return self.setting

    def _restart(self, s: GovernorSample, knobs: tuple[int, int, int]) -> None:
        self._window, self._window_knobs = [s], knobs

    def _set(self, s: GovernorSample, run: int, pts: int, sleep: int, reason: str) -> KsmdSetting:
        if self.advisor_owns:
            pts, sleep = s.pages_to_scan, s.sleep_millisecs
        self._restart(s, (run, pts, sleep))
        if run and self._quiet is None:
            self._quiet = s
        return KsmdSetting(run, pts, sleep, reason)

    def _off(self, s: GovernorSample, why: str) -> KsmdSetting:
        self._quiet, self._off_mergeable = None, s.mergeable_pages or 0
        if self.setting is None:  # off from the start: a wake-up starts from the policy's knobs
            pts = min(max(s.pages_to_scan, self.policy.min_pages_to_scan), self.policy.max_pages_to_scan)
            self._left = (pts, self.sleep_ms)
        elif self.setting.run:
            self._left = (self.setting.pages_to_scan, self.setting.sleep_millisecs)
        else:  # off already: the knobs are not ours to hold; a wake-up puts back the ones we left
            self._restart(s, (0, s.pages_to_scan, s.sleep_millisecs))
            return KsmdSetting(0, s.pages_to_scan, s.sleep_millisecs, why)
        return self._set(s, 0, *self._left, why)

    def _decide(self, s: GovernorSample) -> KsmdSetting:
        p, prev, mergeable = self.policy, self.setting, s.mergeable_pages
        pts_now = min(max(s.pages_to_scan, p.min_pages_to_scan), p.max_pages_to_scan)
        if mergeable == 0:
            self._wake = None
            return self._off(s, "ksmd off: no memory is mergeable (0 pages in VM_MERGEABLE areas)")
        woke = self._wake
        self._wake = None
        if prev is not None and prev.run == 0 and woke is None:
            if (mergeable or 0) > self._off_mergeable:
                woke = f"the mergeable set grew from {self._off_mergeable} to {mergeable} pages"
            else:
                return self._off(s, prev.reason)
        if prev is None or woke is not None:
            # Back on where it was left; at the start, the policy's sleep.
            pts_now, sleep = self._left if prev else (pts_now, self.sleep_ms)
            self._quiet = None
            what = (
                f"ksmd on: {woke}"
                if woke
                else f"governor starts: budget {_pct(p.budget_pct)} of a core, a full scan every "
                f"{_secs(p.full_scan_s)} wished, advisor {'kernel' if self.advisor_owns else 'off'}"
            )
            return self._set(s, 1, pts_now, sleep, f"{what}: pages_to_scan {pts_now}, sleep {sleep} ms")
        if (s.run, s.pages_to_scan, s.sleep_millisecs) != self._window_knobs and not self.advisor_owns:
            # Someone else (or the advisor) changed a knob: measure what is there now.
            self._restart(s, (s.run, s.pages_to_scan, s.sleep_millisecs))
            self._quiet = s
            why = f"knobs changed outside the governor: measuring from pages_to_scan {s.pages_to_scan}"
            return KsmdSetting(prev.run, s.pages_to_scan, s.sleep_millisecs, why)
        quiet = self._nothing_left(s)
        if quiet:
            return self._off(s, quiet)
        self._window.append(s)
        while len(self._window) > 2 and s.t - self._window[1].t >= self.max_window_s:
            self._window.pop(0)
        w0 = self._window[0]
        dt = s.t - w0.t
        if dt < self.min_window_s or s.ksmd_cpu_s is None or w0.ksmd_cpu_s is None:
            why = "ksmd's CPU time is unreadable" if s.ksmd_cpu_s is None else f"measuring ({_secs(dt)})"
            return replace(prev, reason=f"{why}: pages_to_scan {prev.pages_to_scan} unchanged")
        share = 100.0 * max(0.0, s.ksmd_cpu_s - w0.ksmd_cpu_s) / dt
        tail = self._tail(s)
        if tail is not None and tail is not w0 and tail.ksmd_cpu_s is not None:
            # The long window measures a steady cost precisely but averages a rise away:
            # a 10 s window whose last second runs at 5x the budget is still under it
            # for three more seconds. Over the budget now is acted on now.
            tdt = s.t - tail.t
            tshare = 100.0 * max(0.0, s.ksmd_cpu_s - tail.ksmd_cpu_s) / tdt
            if tshare > self.policy.budget_pct * TAIL_OVER and tshare > share:
                w0, dt, share = tail, tdt, tshare
        return self._govern(s, w0, dt, share, prev)

    def _tail(self, s: GovernorSample) -> GovernorSample | None:
        """The latest sample of the window at least ``min_window_s`` before ``s``."""
        for x in reversed(self._window[:-1]):
            if s.t - x.t >= self.min_window_s:
                return x
        return None

    def _nothing_left(self, s: GovernorSample) -> str:
        """A sentence when whole full scans merged nothing new and KSM's page counts stood still."""
        q = self._quiet
        if q is None:
            self._quiet = s
            return ""
        loose = q.pages_unshared + q.pages_volatile
        now = s.pages_unshared + s.pages_volatile
        tol = max(64, loose // 50)  # 2%: a few pages going volatile and back is not work
        moved = (
            s.pages_sharing > q.pages_sharing
            or s.pages_shared > q.pages_shared
            or abs(now - loose) > tol
            or (s.mergeable_pages or 0) > (q.mergeable_pages or 0)
        )
        if moved:
            self._quiet = s
            return ""
        scans = s.full_scans - q.full_scans
        if scans < self.quiet_scans:
            return ""
        return (
            f"ksmd off: {scans} full scans merged nothing new (pages_sharing {s.pages_sharing}, "
            f"unshared+volatile {loose} -> {now})"
        )

    def _govern(
        self, s: GovernorSample, w0: GovernorSample, dt: float, share: float, prev: KsmdSetting
    ) -> KsmdSetting:
        p = self.policy
        pts, sleep_s = s.pages_to_scan, s.sleep_millisecs / 1000.0
        frac = share / 100.0
        rate: float | None = None
        if (
            s.pages_scanned is not None
            and w0.pages_scanned is not None
            and s.pages_scanned > w0.pages_scanned
        ):
            rate = (s.pages_scanned - w0.pages_scanned) / dt
        elif sleep_s > 0 and frac < 1:
            rate = pts * (1 - frac) / sleep_s  # busy share f of each (sleep + work) cycle
        elif s.full_scans > w0.full_scans and s.mergeable_pages:
            rate = (s.full_scans - w0.full_scans) * s.mergeable_pages / dt
        cost = frac / rate if rate else None  # CPU seconds per page visited
        need = s.mergeable_pages / p.full_scan_s if s.mergeable_pages else None
        head = f"ksmd used {_pct(share)} of a core over {_secs(dt)}, budget {_pct(p.budget_pct)}"
        if rate is not None:
            head += f", {rate:.0f} pages/s"
            if s.mergeable_pages:
                head += f" (a full scan every {_secs(s.mergeable_pages / rate)}, wish {_secs(p.full_scan_s)})"
        budget_rate = (TARGET * p.budget_pct / 100.0) / cost if cost else math.inf
        if self.advisor_owns:
            why = f"{head}: the kernel's advisor owns pages_to_scan (now {pts})"
            return replace(prev, pages_to_scan=pts, sleep_millisecs=s.sleep_millisecs, reason=why)
        over = share > p.budget_pct * DEADBAND[1]
        excess = rate is not None and need is not None and rate > need * NEED_SLACK[1]
        short = rate is None or need is None or rate < need * NEED_SLACK[0]
        if not over and not excess and (share >= p.budget_pct * DEADBAND[0] or not short):
            why = (
                "within 80-100% of the budget"
                if share >= p.budget_pct * DEADBAND[0]
                else "as often as needed"
            )
            return replace(prev, reason=f"{head}: {why}, pages_to_scan {pts} unchanged")
        if rate is None or cost is None:
            # No rate to model (sleep 0, no pages_scanned): scale on the share alone.
            factor = min(max(TARGET * p.budget_pct / share, STEP[0]), STEP[1]) if share > 0 else STEP[1]
            new_pts, new_sleep = self._bound(round(pts * factor), self.sleep_ms)
        else:
            want = min(budget_rate, need if need is not None else math.inf)
            want = min(max(want, rate * STEP[0]), rate * STEP[1])
            new_pts, new_sleep = self._for_rate(want, cost)
        if new_sleep == s.sleep_millisecs and abs(new_pts - pts) <= MIN_CHANGE * pts:
            # Also the noise floor: the cost per page differs between parts of the
            # mergeable set, so one window's estimate wanders by a few percent.
            # (Never blocks a cut past the budget: that aims at 90% of it, a >= 10% cut.)
            limit = " (at max_pages_to_scan)" if pts >= p.max_pages_to_scan else f" (wants {new_pts})"
            return replace(prev, reason=f"{head}: pages_to_scan {pts} unchanged{limit}")
        change = f"pages_to_scan {pts} -> {new_pts}"
        if new_sleep != s.sleep_millisecs:
            change += f", sleep_millisecs {s.sleep_millisecs} -> {new_sleep}"
        return self._set(s, 1, new_pts, new_sleep, f"{head}: {change}")

    def _bound(self, pts: int, sleep_ms: int) -> tuple[int, int]:
        p = self.policy
        return min(max(pts, p.min_pages_to_scan), p.max_pages_to_scan), min(max(sleep_ms, 1), MAX_SLEEP_MS)

    def _for_rate(self, rate: float, cost: float) -> tuple[int, int]:
        """pages_to_scan (at the policy's sleep) that scans ``rate`` pages/s; below the
        minimum, the minimum and a longer sleep."""
        s0 = self.sleep_ms / 1000.0
        busy = rate * cost  # the share that rate costs, < 1 under any budget below a core
        if busy >= 0.95:
            return self._bound(self.policy.max_pages_to_scan, self.sleep_ms)
        pts = rate * s0 / (1 - busy)
        if pts >= self.policy.min_pages_to_scan:
            return self._bound(round(pts), self.sleep_ms)
        mn = self.policy.min_pages_to_scan
        return self._bound(mn, round(1000.0 * mn * (1 / rate - cost)) if rate > 0 else MAX_SLEEP_MS)


# -- the driver: samples in, knob writes out --------------------------------


class KsmdReader:
    """Samples sysfs and ksmd's CPU time (schedstat's exact runtime, else stat's ticks)."""

    def __init__(self, sysfs: Path = KSM_SYSFS, proc: ProcFS | None = None) -> None:
        self.sysfs = sysfs
        self.proc = proc or ProcFS()
        self.pid = self.proc.find_kthread("ksmd")
        self.hz = float(os.sysconf("SC_CLK_TCK"))

    def cpu_s(self) -> float | None:
        if self.pid is None:
            return None
        try:
            ns = self.proc.runtime_ns(self.pid)
            return ns / 1e9 if ns is not None else self.proc.stat(self.pid).cpu_ticks / self.hz
        except (ProcessGone, AccessDenied):
            return None

    def sample(self, mergeable_pages: int | None, t: float | None = None) -> GovernorSample:
        v, cpu = ksm_sysfs.read(self.sysfs).as_dict(), self.cpu_s()
        ints = {k: x for k, x in v.items() if isinstance(x, int)}
        num = ints.get
        mode = v.get("advisor_mode")
        return GovernorSample(
            t=time.monotonic() if t is None else t,
            ksmd_cpu_s=cpu,
            run=num("run") or 0,
            pages_to_scan=num("pages_to_scan") or 0,
            sleep_millisecs=num("sleep_millisecs") or 0,
            full_scans=num("full_scans") or 0,
            pages_shared=num("pages_shared") or 0,
            pages_sharing=num("pages_sharing") or 0,
            pages_unshared=num("pages_unshared") or 0,
            pages_volatile=num("pages_volatile") or 0,
            pages_scanned=num("pages_scanned"),
            advisor_mode=mode if isinstance(mode, str) else None,
            mergeable_pages=mergeable_pages,
        )


class GovernorDriver:
    """Each interval: read a sample, let the governor decide, write the difference.

    The caller owns ``knobs`` (one KnobChange for the daemon's life, closed at
    exit, which restores every knob as found).
    """

    def __init__(self, governor: KsmdGovernor, knobs: KnobChange, reader: KsmdReader | None = None) -> None:
        self.governor = governor
        self.knobs = knobs
        self.reader = reader or KsmdReader(knobs.sysfs)
        self.started = False

    @classmethod
    def for_policy(cls, policy: Ksmd, knobs: KnobChange, **kw: float) -> GovernorDriver:
        return cls(KsmdGovernor(policy, features.available("ksm_advisor"), **kw), knobs)  # type: ignore[arg-type]

    def wake(self, reason: str) -> None:
        self.governor.wake(reason)

    def step(self, mergeable_pages: int | None) -> KsmdSetting:
        sample = self.reader.sample(mergeable_pages)
        if not self.started:
            self.started = True
            setup = self.governor.setup(sample)
            if setup:
                self.knobs.set(setup)
                sample = self.reader.sample(mergeable_pages)  # the mode switch resets pages_to_scan
        setting = self.governor.step(sample)
        writes = self.governor.writes(setting, sample)
        if writes:
            self.knobs.set(writes)
        return setting
