"""ksmtrace daemon: the coordinator, a long-running loop driven by a policy.

Processes the policy names (and those that opt in themselves) are looked
at as their memory changes; the runs of duplicate pages that stay the same
are made mergeable by remote madvise, ranges whose copy-on-write churn
eats their saving are made unmergeable again, and ksmd's knobs are kept to
a CPU budget. Without --policy it only observes: every decision is made and
reported, none carried out. Machine-wide KSM settings are restored at stop
(SIGTERM included); ranges it made are written down under /run/ksmtrace, so
a daemon started after a SIGKILL takes them over.
"""

from __future__ import annotations

import argparse
import contextlib
import select
import time
from typing import Any

from ksmtrace.coordinator import policy as policy_mod
from ksmtrace.coordinator.actuator import KnobChange
from ksmtrace.coordinator.daemon import Daemon
from ksmtrace.coordinator.decisions import Decision, DecisionLog
from ksmtrace.coordinator.governor import GovernorDriver, KsmdGovernor, KsmdReader, KsmdSetting
from ksmtrace.errors import TracingUnavailable, UsageError
from ksmtrace.kernel import checks, features
from ksmtrace.kernel.proc_events import ProcEvents
from ksmtrace.kernel.signals import critical
from ksmtrace.live import server as server_mod
from ksmtrace.live.board import Board
from ksmtrace.live.sampler import Sampler
from ksmtrace.model import snapshot
from ksmtrace.probes import faults as faults_probe
from ksmtrace.views import console
from ksmtrace.views import daemon as view

EPILOG = """\
examples:
  ksmtrace daemon                                  # observe only: what it would merge, and why
  ksmtrace daemon --policy /etc/ksmtrace/policy.toml
  ksmtrace daemon --check-policy policy.toml       # validate a policy file, change nothing
  ksmtrace daemon -j --policy p.toml | jq .        # decisions as JSON lines
  ksmtrace daemon --listen 127.0.0.1:9477          # dashboards: /metrics, the web page (the default)
  ksmtrace daemon --listen off                     # no HTTP at all
  (a commented sample policy: docs/examples/policy.toml)
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "daemon",
        help="the coordinator: merge hot duplicate runs, unmerge churn, keep ksmd in a CPU budget",
        description=__doc__.split("\n", 1)[1].strip(),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--policy", metavar="FILE", help="policy (TOML); without it: observe only")
    p.add_argument("--check-policy", metavar="FILE", help="validate FILE and exit (0: valid)")
    p.add_argument("-j", "--json", action="store_true", help="decisions as JSON lines on stdout")
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="serve /metrics, the web page and its JSON API here (read-only; default: the policy's "
        f"[dashboard] listen, else {server_mod.DEFAULT_LISTEN}; off: serve nothing). Not loopback: "
        "anyone who can reach it sees every mergeable process's name and counts",
    )
    p.set_defaults(run=run)


def _load(path: str) -> policy_mod.Policy:
    try:
        return policy_mod.load(path)
    except FileNotFoundError:
        raise UsageError(f"policy file {path} does not exist") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise UsageError(f"cannot read policy file {path}: {exc.strerror}") from None


def run(args: argparse.Namespace) -> int:
    if args.check_policy:
        pol = _load(args.check_policy)
        console.lines(f"{view.policy_summary(pol)}: valid")
        return 0
    pol = _load(args.policy) if args.policy else policy_mod.DEFAULT
    for purpose in ("ptrace", "pagemap", "sysfs"):
        checks.require_root(purpose)
    log = DecisionLog(pol.log or None)
    listen = server_mod.parse_listen(args.listen if args.listen is not None else pol.dashboard.listen)
    board = Board(top_n=pol.dashboard.top_n, mode=pol.mode, ksmd_budget_pct=pol.ksmd.budget_pct)

    def emit(d: Decision) -> None:
        log.write(d)
        board.decided(d)
        if args.json:
            console.json(view.as_json(d), stream=True)
        else:
            console.lines(view.line(d))

    with contextlib.ExitStack() as stack:
        stack.callback(log.close)
        events = stack.enter_context(ProcEvents())
        daemon = Daemon(pol, emit)
        daemon.lock()
        lacks = [
            features.lacks(n) for n in ("ksm_tracepoints", "prctl_memory_merge") if not features.available(n)
        ]
        daemon.faults = _fault_probe(stack, lacks)
        daemon.governor = _governor(stack, pol)
        lacks += daemon.governor.governor.notes + daemon.relook.notes
        # The dashboards' sampler shares the churn judge's fault probe (one set of BPF programs).
        sampler = stack.enter_context(Sampler(fault_probe=daemon.faults, how=True)) if daemon.faults else None
        board.notes = list(lacks)
        if listen is not None:
            srv = server_mod.Server(board, *listen)
            stack.callback(srv.close)
            if not server_mod.is_loopback(listen[0]):
                console.note(
                    f"warning: serving on {srv.url}, not loopback: anyone who reaches it reads every "
                    "mergeable process's name and counts (read-only: nothing can be changed over HTTP)"
                )
            lacks.append(f"dashboards at {srv.url} (metrics at {srv.url}metrics)")
        emit(
            Decision(
                "start",
                view.policy_summary(pol) + ("; " + "; ".join(lacks) if lacks else ""),
                applied=True,
                numbers={"mode": pol.mode},
            )
        )
        stopped: list[str] = []

        def stop() -> None:
            with critical():
                stopped.extend(daemon.stop())
            emit(
                Decision(
                    "stop", "stopped" + (": unmerged " + ", ".join(stopped) if stopped else ""), applied=True
                )
            )

        stack.callback(stop)
        daemon.adopt()
        last = time.monotonic()
        while True:
            daemon.cycle()
            now = time.monotonic()
            board.record(sampler.sample(now - last) if sampler else snapshot.take(processes=True))
            last = now
            deadline = time.monotonic() + min(1.0, pol.interval_s)
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([events], [], [], left)
                if ready:
                    daemon.events([(e.kind, e.tgid, e.parent_tgid) for e in events.read() if e.pid == e.tgid])


def _fault_probe(stack: contextlib.ExitStack, lacks: list[str]) -> faults_probe.FaultProbe | None:
    """The fault probe for exact KSM COW counts per range, or None (and why, in ``lacks``)."""
    try:
        checks.ensure_tracefs()
        if not faults_probe.available():
            raise TracingUnavailable("the exceptions:page_fault_user tracepoint is missing (x86 only)")
        return stack.enter_context(faults_probe.FaultProbe())
    except TracingUnavailable as exc:
        lacks.append(f"{exc}: churn is judged by rmap cost alone")
        return None


class _Proposal:
    """Observe mode's governor: decides as it would, writes nothing."""

    def __init__(self, pol: policy_mod.Policy) -> None:
        self.governor = KsmdGovernor(pol.ksmd, features.available("ksm_advisor"))
        self.reader = KsmdReader()

    def wake(self, reason: str) -> None:
        self.governor.wake(reason)

    def step(self, mergeable_pages: int | None) -> KsmdSetting:
        return self.governor.step(self.reader.sample(mergeable_pages))


def _governor(stack: contextlib.ExitStack, pol: policy_mod.Policy) -> GovernorDriver | _Proposal:
    if pol.mode != "enforce":
        return _Proposal(pol)
    # Entered last of the machine changes: closed (knobs restored as found) first.
    knobs = stack.enter_context(KnobChange("daemon"))
    return GovernorDriver.for_policy(pol.ksmd, knobs)
