"""The coordinator's loop: candidates -> duplicate runs -> merge, churn -> unmerge, ksmd -> budget.

One :class:`Daemon` per host (a lock under the run directory). Each cycle:

1. process events (fork, exec, exit) and the policy give the candidates,
   each with its trust domain; ``never`` wins, and processes of a second
   domain are refused while another domain's are mergeable;
2. due candidates are scanned together with the mergeable memory of their
   domain (one scan a cycle); the runs of duplicate pages that were seen in
   ``stable_looks`` looks in a row and are worth it
   (:mod:`ksmtrace.coordinator.worth`, the same judgement as ``merge --auto``)
   are made mergeable by remote madvise, written down first
   (:mod:`ksmtrace.coordinator.ranges`);
3. ranges it made are judged for churn (:mod:`ksmtrace.coordinator.churn`)
   with the fault probe's exact KSM COW counts, and made unmergeable again
   when they cost more than they save;
4. ksmd's knobs are governed to the CPU budget
   (:mod:`ksmtrace.coordinator.governor`).

In observe mode every decision is made and reported, none carried out.
Decisions go to ``emit`` (the command hands them to the view and the log).

(A little over 400 lines: the loop is where the rooms meet; each step's
judgement lives in its own module, what is left here is their order.)
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ksmtrace import remote
from ksmtrace.coordinator import candidates, worth
from ksmtrace.coordinator.candidates import Verdict
from ksmtrace.coordinator.churn import ChurnJudge
from ksmtrace.coordinator.decisions import Decision
from ksmtrace.coordinator.journal import RUN_DIR
from ksmtrace.coordinator.policy import Policy
from ksmtrace.coordinator.ranges import MadeRange, RangeBook
from ksmtrace.coordinator.relook import RelookGate
from ksmtrace.coordinator.unmerge import Judged, Unmerger
from ksmtrace.errors import AccessDenied, KsmtraceError, ProcessGone
from ksmtrace.kernel.procfs import ProcFS

PAGE = 4096
# After a new candidate's first look, the next comes this soon (or at the
# interval, if shorter): exec to first merge in seconds, not a full interval.
QUICK_RELOOK_S = 2.0
# A quiet candidate's looks come at most this many intervals apart.
MAX_BACKOFF = 8


class AlreadyRunning(KsmtraceError):
    exit_code = 1


@dataclass
class _Candidate:
    verdict: Verdict
    due: float = 0.0
    looks: list[list[tuple[int, int]]] = field(default_factory=list)  # chosen ranges, newest last
    said: str = ""  # the last refusal said, not repeated every cycle
    idle: int = 0  # looks in a row that found nothing new worth merging


class Daemon:
    def __init__(
        self,
        policy: Policy,
        emit: Callable[[Decision], None],
        proc: ProcFS | None = None,
        run_dir: Path = RUN_DIR,
        faults: object | None = None,
        governor: object | None = None,
    ) -> None:
        self.policy = policy
        self.emit = emit
        self.proc = proc or ProcFS()
        self.run_dir = run_dir
        self.enforce = policy.mode == "enforce"
        self.book = RangeBook(run_dir)
        self.churn = ChurnJudge(policy.churn)
        self.unmerger = Unmerger(self.churn, self.book, emit, self.forget, self.enforce, self.proc)
        self.faults = faults  # a FaultProbe, or None (churn then judges rmap cost only)
        self.governor = governor
        self.cands: dict[int, _Candidate] = {}
        self.observed: set[tuple[int, int, int]] = set()  # observe mode: merges already said
        self.warned: set[frozenset[str]] = set()
        self.said_never: set[int] = set()
        self.verdicts: dict[int, Verdict] = {}
        self._next_survey = 0.0
        self._knobs: tuple[int, int, int] | None = None  # ksmd's knobs as last set (or proposed)
        self.relook = RelookGate(policy.runs.relook, self.proc)
        self._lock_fd: int | None = None
        self._woken = False  # a range was made mergeable this cycle: ksmd is governed at once

    # --- life --------------------------------------------------------------

    def lock(self) -> None:
        """One daemon per host: an exclusive lock on run_dir/daemon.lock, held until exit."""
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.run_dir / "daemon.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AlreadyRunning(
                f"another ksmtrace daemon (pid {holder}) is running on this host; one at a time"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def adopt(self) -> None:
        kept, dropped = self.book.adopt(self.proc)
        if kept or dropped:
            pages = sum(r.pages for r in kept)
            self.emit(
                Decision(
                    "adopt",
                    f"{len(kept)} ranges ({pages} pages) in {len({r.pid for r in kept})} processes that a "
                    f"previous daemon made mergeable are still so: taken over; {dropped} records of "
                    "processes gone or ranges never made dropped",
                    applied=True,
                    numbers={"ranges": len(kept), "pages": pages, "dropped": dropped},
                )
            )
        for r in kept:
            if self.faults is not None:
                self.faults.set_regions(r.pid, [(r.start, r.end)])

    def stop(self) -> list[str]:
        """Undo what the policy says to undo at stop; what was done, in words."""
        done = []
        if self.policy.on_stop == "unmerge" and self.enforce:
            for r in list(self.book.ranges.values()):
                j = Judged(r.pid, "", r.start, r.end, True)
                if self.unmerger.unmerge(j, 'the daemon stops and the policy says on_stop = "unmerge"'):
                    done.append(f"pid {r.pid} {r.start:#x}-{r.end:#x}")
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        return done

    # --- one cycle ---------------------------------------------------------

    def events(self, kinds: list[tuple[str, int, int]]) -> None:
        """(kind, pid, parent) of fork/exec/exit from the proc connector: exits
        forget; a process that executes is judged again at once, and looked at
        soon if it is a candidate now (exec to first merge in seconds, not a
        survey interval). A fork's child has its parent's comm, executable,
        cgroup and uid: it is judged only if its parent is a candidate (a host
        forks all the time; reading every child's facts cost the idle daemon
        more than everything else)."""
        gone = {pid for kind, pid, _ in kinds if kind == "exit"}
        if gone:
            self.forget(gone)
        for kind, pid, parent in kinds:
            if pid in gone or kind == "exit" or (kind == "fork" and parent not in self.cands):
                continue
            try:
                v = candidates.classify(
                    self.policy, candidates.read_facts(self.proc, pid, ours=pid in self.book.pids())
                )
            except (ProcessGone, AccessDenied):
                continue
            self.verdicts[pid] = v
            if pid in self.cands:
                self.cands[pid].due, self.cands[pid].idle = 0.0, 0

    def forget(self, gone: set[int]) -> None:
        for pid in gone:
            self.cands.pop(pid, None)
            self.verdicts.pop(pid, None)
            self.said_never.discard(pid)
        self.book.forget(gone)
        self.churn.forget(gone)
        self.unmerger.forget_pids(gone)
        self.relook.forget(gone)

    def survey(self) -> None:
        """Every process judged again (at each interval: memory and cgroups change)."""
        verdicts = candidates.survey(self.policy, self.proc, self.book.pids())
        self.verdicts = {v.facts.pid: v for v in verdicts}
        self.forget(
            {p for p in self.cands if p not in self.verdicts} | (self.book.pids() - set(self.verdicts))
        )

    def cycle(self, now: float | None = None) -> None:
        """Called often (about once a second): surveys and churn at the interval, looks when due."""
        now = time.monotonic() if now is None else now
        if now >= self._next_survey:
            self.survey()
        verdicts = list(self.verdicts.values())
        domain = self._domains(verdicts)
        due = []
        for v in verdicts:
            pid = v.facts.pid
            if v.role != "candidate":
                self.cands.pop(pid, None)
                if v.overruled and pid not in self.said_never:
                    self.said_never.add(pid)
                    self.emit(Decision("refuse", v.reason, pid, v.facts.comm))
                continue
            c = self.cands.setdefault(pid, _Candidate(v))
            c.verdict = v
            if domain is not None and v.domain != domain:
                self._refuse(
                    c,
                    f"its {candidates.domain_label(v.domain)} differs from that of the processes "
                    f"mergeable now ({candidates.domain_label(domain)}): KSM would merge across them",
                )
                continue
            if c.due <= now:
                due.append(c)
        if due:
            self._look(due, verdicts, domain if domain is not None else due[0].verdict.domain, now)
        if now >= self._next_survey:
            self._judge_churn(now)
            self._govern()
            self._next_survey = now + self.policy.interval_s
        elif self._woken:
            # ksmd is off while nothing is mergeable: waiting for the next interval to
            # turn it on would add up to a whole interval to exec-to-first-merge.
            self._govern()
        self._woken = False

    def _govern(self) -> None:
        """One governor step; a decision when ksmd's knobs change (or would, observing)."""
        if self.governor is None:
            return
        setting = self.governor.step(self.mergeable_pages())
        if setting is None:
            return
        knobs = (setting.run, setting.pages_to_scan, setting.sleep_millisecs)
        if knobs != self._knobs:
            self._knobs = knobs
            numbers = dict(zip(("run", "pages_to_scan", "sleep_millisecs"), knobs, strict=True))
            self.emit(Decision("ksmd", setting.reason, applied=self.enforce, numbers=numbers))

    def mergeable_pages(self) -> int:
        """Pages in VM_MERGEABLE areas: the daemon's ranges and self-opted processes' mappings."""
        total = sum(r.pages for r in self.book.ranges.values())
        for v in self.verdicts.values():
            if v.facts.self_opted:
                try:
                    total += sum(m.length for m in self.proc.smaps(v.facts.pid) if m.mergeable) // PAGE
                except (ProcessGone, AccessDenied):
                    continue
        return total

    def _domains(self, verdicts: list[Verdict]) -> str | None:
        """The domain whose processes are mergeable now (None: none is); warns on several."""
        ours = self.book.pids()
        mergeable = {v.domain for v in verdicts if v.facts.self_opted or v.facts.pid in ours}
        self_opted = {v.domain for v in verdicts if v.facts.self_opted}
        if len(self_opted) > 1 and frozenset(self_opted) not in self.warned:
            self.warned.add(frozenset(self_opted))
            self.emit(
                Decision(
                    "warn",
                    "processes of different trust domains opted in themselves and share KSM now ("
                    + ", ".join(candidates.domain_label(d) for d in sorted(self_opted))
                    + "): KSM is a side channel across everything it merges; the daemon adds none",
                    numbers={"domains": sorted(self_opted)},
                )
            )
        if not mergeable:
            return None
        if len(mergeable) == 1:
            return next(iter(mergeable))
        return "\0several"  # nothing more may join any of them

    def _refuse(self, c: _Candidate, why: str) -> None:
        if c.said != why:
            c.said = why
            f = c.verdict.facts
            self.emit(Decision("refuse", why, pid=f.pid, comm=f.comm))

    # --- looking and merging -------------------------------------------------

    def _look(self, due: list[_Candidate], verdicts: list[Verdict], domain: str, now: float) -> None:
        targets = {c.verdict.facts.pid for c in due if c.verdict.domain == domain}
        ours = self.book.pids()
        peers = [
            v.facts.pid
            for v in verdicts
            if v.domain == domain
            and (v.facts.self_opted or v.facts.pid in ours)
            and v.facts.pid not in targets
        ]
        # Candidates whose memory did not change since their last look are not
        # read again (relook.py): their last choice stands; no scan if none changed.
        rules = self.policy.runs
        fresh = self.relook.unchanged_of(targets)
        est = (
            self.relook.scan(targets, fresh, peers, rules.max_gap_pages)
            if len(fresh) < len(targets)
            else None
        )
        for c in due:
            pid = c.verdict.facts.pid
            if pid not in targets:
                continue
            chosen = None
            if pid in fresh:
                ranges: tuple = fresh[pid]
            else:
                assert est is not None
                if pid in est.gone or pid in est.denied:
                    self.forget({pid})
                    continue
                chosen = worth.choose(est, pid, rules)
                self.relook.after_scan(pid, est, chosen.ranges)
                ranges = chosen.ranges
            picked = [
                ch
                for ch in ranges
                if not any(r.start < ch.end and ch.start < r.end for r in self.book.of(pid))
                and not self.churn.cooling(pid, ch.start, ch.end, now)
            ]
            c.looks = [*c.looks, [(ch.start, ch.end) for ch in picked]][-rules.stable_looks :]
            stable = _stable(c.looks, rules.stable_looks, rules.min_run_pages * PAGE)
            waiting = bool(picked) and not stable
            # A candidate whose looks find nothing new is looked at less and less
            # often (up to MAX_BACKOFF intervals): a full rescan of a quiet
            # process every interval was most of the daemon's steady CPU
            # (bench_coordinator). An exec or fork brings it back at once.
            c.idle = 0 if picked else c.idle + 1
            every = self.policy.interval_s * min(MAX_BACKOFF, 2 ** max(0, c.idle - 1))
            c.due = now + (min(QUICK_RELOOK_S, self.policy.interval_s) if waiting else every)
            if chosen is not None and chosen.over_vma_headroom:
                self._refuse(
                    c,
                    f"{chosen.over_vma_headroom} worthwhile ranges left out: the VMA bound "
                    f"({chosen.vma_headroom} more mappings allowed) would be passed",
                )
            by_start = {(ch.start, ch.end): ch for ch in picked}
            todo = []
            for start, end in stable:
                ch = by_start.get((start, end))
                dup = ch.dup_pages if ch else (end - start) // PAGE
                why = ch.reason if ch else f"{dup} pages seen duplicate in {rules.stable_looks} looks"
                todo.append((start, end, dup, why))
            if todo:
                self._merge(c.verdict, todo, now)

    def _merge(self, v: Verdict, todo: list[tuple[int, int, int, str]], now: float) -> None:
        """Make one process's ranges (start, end, dup pages, why) mergeable.

        The book is written twice per process and look, not twice per range: each
        write is the whole book (fsynced), and hundreds of ranges written one by one
        cost the daemon tens of CPU seconds (bench/bench_coordinator.py)."""
        f = v.facts
        if not self.enforce:
            for start, end, dup, why in todo:
                if (f.pid, start, end) not in self.observed:
                    self.observed.add((f.pid, start, end))
                    numbers = {"dup_pages": dup, "pages": (end - start) // PAGE}
                    self.emit(Decision("merge", why, f.pid, f.comm, start, end, False, numbers))
            return
        t = time.time()
        # Written down before the kernel is asked.
        self.book.add_many([MadeRange(f.pid, f.starttime, s, e, dup, t, "pending") for s, e, dup, _ in todo])
        done, failed = [], []
        for start, end, dup, why in todo:
            try:
                remote.madvise(f.pid, start, end, remote.MADV_MERGEABLE)
            except KsmtraceError as exc:
                failed.append((f.pid, start))
                self.emit(Decision("error", f"could not make it mergeable: {exc}", f.pid, f.comm, start, end))
                continue
            done.append(MadeRange(f.pid, f.starttime, start, end, dup, time.time(), "done"))
            self.unmerger.made(f.pid, start, now)
            numbers = {"dup_pages": dup, "pages": (end - start) // PAGE}
            self.emit(Decision("merge", why, f.pid, f.comm, start, end, True, numbers))
        self.book.add_many(done, drop=failed)
        if done and self.faults is not None:
            self.faults.set_regions(f.pid, [(r.start, r.end) for r in done])
        if done and self.governor is not None:
            self.governor.wake(f"pid {f.pid} gained {len(done)} mergeable ranges")
            self._woken = True

    # --- churn ---------------------------------------------------------------

    def _judge_churn(self, now: float) -> None:
        comm = {pid: c.verdict.facts.comm for pid, c in self.cands.items()}
        ranges = [Judged(r.pid, comm.get(r.pid, ""), r.start, r.end, True) for r in self.book.ranges.values()]
        if self.policy.narrow_self_opted:
            selfs = [(v.facts.pid, v.facts.comm) for v in self.verdicts.values() if v.role == "self"]
            ranges += self.unmerger.self_opted(selfs)
        self.unmerger.faults = self.faults
        self.unmerger.judge(now, ranges)


def _stable(looks: list[list[tuple[int, int]]], needed: int, min_len: int) -> list[tuple[int, int]]:
    """Ranges chosen in each of the last ``needed`` looks: their intersections, long enough."""
    if len(looks) < needed:
        return []
    recent = looks[len(looks) - needed :]
    common = recent[0]
    for look in recent[1:]:
        common = [(max(s, s2), min(e, e2)) for s, e in common for s2, e2 in look if max(s, s2) < min(e, e2)]
    return [(s, e) for s, e in common if e - s >= min_len]
