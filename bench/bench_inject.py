#!/usr/bin/env python3
"""Remote madvise under stress: many injections into self-checking targets, signals flying.

    sudo .venv/bin/python bench/bench_inject.py [--injections N] [--json]

Targets (tests/targets/injtarget.c, built here) check themselves while they run:

    busy     checksum of the advised buffer, a register-heavy chain, getpid and
             clock_gettime whose answers are known
    sleep    nanosleep of random lengths: one that ends early is an error
    pipe     reads sequence-numbered records from a child: a wrong, short or
             EINTR read is an error (its handlers are SA_RESTART)
    threads  two busy threads, a sleeper and a pipe reader; the main thread in join

A separate process sends them SIGRTMIN (queued: every one must arrive; half of
them by sigqueue() with a payload the target checks), SIGUSR1 and SIGCHLD
(standard: they coalesce, so only counted) every ~100 us. Each
injection is madvise(MADV_MERGEABLE) then, next time on the same target,
MADV_UNMERGEABLE, into a random thread of a random target.

Reported: injections done; errors of three kinds (target self-checks, injections
that failed or returned anything but 0, RT signals lost); threads left stopped
or traced (checked every 500 injections and at the end: must be 0); latency
percentiles of one injection (attach to detach, measured in the native worker)
and of the part the target spent stopped (the stop to the detach).
Exit status 0 only with no error and nothing left stopped or traced.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from ksmtrace import native, remote

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "tests" / "targets" / "injtarget.c"
MODES = ("busy", "sleep", "pipe", "threads")

# The signal sender, a process of its own (as a real signal source would be): SIGTERM
# ends it and it prints what it sent, per pid and signal.
SENDER = r"""
import ctypes, json, os, random, signal, sys, time
libc = ctypes.CDLL(None, use_errno=True)
pids = [int(p) for p in sys.argv[1:]]
# SIGRTMIN by kill() and by sigqueue() with a payload the target checks (0x5a5a0000 | n).
kinds = ["rt", "rtq", "usr1", "chld"]
sent = {p: {k: 0 for k in kinds} for p in pids}
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
r = random.Random(7)
print("sending", flush=True)
n = 0
while not stop:
    p, k = r.choice(pids), r.choice(kinds)
    if k == "rtq":
        n = (n + 1) & 0xffff
        # sigqueue(pid, sig, union sigval): the int member, passed as a pointer-sized value
        if libc.sigqueue(p, signal.SIGRTMIN, ctypes.c_void_p(0x5A5A0000 | n)) != 0:
            sys.exit(f"sigqueue: errno {ctypes.get_errno()}")
    else:
        os.kill(p, {"rt": signal.SIGRTMIN, "usr1": signal.SIGUSR1, "chld": signal.SIGCHLD}[k])
    sent[p][k] += 1
    time.sleep(0.0001)
print(json.dumps(sent), flush=True)
"""


def build(tmp: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        sys.exit("bench_inject: a C compiler is needed to build the targets")
    out = tmp / "injtarget"
    subprocess.run([cc, "-O2", "-Wall", "-pthread", str(SRC), "-o", str(out)], check=True)
    return out


class Target:
    def __init__(self, binary: Path, mode: str) -> None:
        self.mode = mode
        self.proc = subprocess.Popen([str(binary), mode, "3600"], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout
        _, addr, length = self.proc.stdout.readline().split()
        self.pid = self.proc.pid
        self.addr, self.len = int(addr), int(length)
        self.image = native.image_id(self.pid)
        self.advice = remote.MADV_MERGEABLE

    def tids(self) -> list[int]:
        return remote.live_threads(self.pid)

    def finish(self) -> dict[str, object]:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=60)
        report = json.loads(out.strip().splitlines()[-1])
        report["rc"] = self.proc.returncode
        return report


def stopped_or_traced(pids: list[int]) -> list[str]:
    """Threads of these processes (and of their children: the pipe writers) that are
    stopped ('t'/'T') or have a tracer."""
    bad = []
    for pid in pids + [int(c) for p in pids for c in _children(p)]:
        for tid in remote.live_threads(pid):
            try:
                state = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            tracer = remote.tracer_of(pid, tid)
            if state in ("t", "T") or tracer:
                bad.append(f"{pid}/{tid} state {state} tracer {tracer}")
    return bad


def _children(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []


def percentile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return 0.0
    return sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))]


def run(n: int, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        binary = build(Path(tmp))
        targets = [Target(binary, m) for m in MODES]
        sender = subprocess.Popen(
            [sys.executable, "-c", SENDER, *[str(t.pid) for t in targets]], stdout=subprocess.PIPE, text=True
        )
        assert sender.stdout and sender.stdout.readline().strip() == "sending"
        latencies: list[float] = []
        slowest: list[tuple[float, str, dict[str, int]]] = []
        held_times: list[float] = []  # the target's pause: stop to detach
        inj_errors: Counter[str] = Counter()
        left: list[str] = []
        per_mode: Counter[str] = Counter()
        in_syscall = restarts = held = held_max = 0
        t0 = time.monotonic()
        try:
            for i in range(n):
                t = rng.choice(targets)
                tid = rng.choice(t.tids())  # any thread, not only the main one
                try:
                    res = native.inject_madvise(tid, t.addr, t.len, t.advice, 2000, t.image)
                except OSError as e:
                    inj_errors[f"{t.mode}: {e.strerror}"] += 1
                    continue
                if res["ret"] != 0:
                    inj_errors[f"{t.mode}: madvise returned {res['ret']}"] += 1
                t.advice = (
                    remote.MADV_UNMERGEABLE if t.advice == remote.MADV_MERGEABLE else remote.MADV_MERGEABLE
                )
                per_mode[t.mode] += 1
                latencies.append(res["elapsed_ns"] / 1000)
                held_times.append(res["held_ns"] / 1000)
                slowest = sorted([*slowest, (latencies[-1], t.mode, res)], key=lambda x: -x[0])[:3]
                in_syscall += bool(res["stop_kind"])
                restarts += res["restarts"]
                held += res["signals_kept"]
                held_max = max(held_max, res["signals_kept"])
                if i % 500 == 499:
                    left += stopped_or_traced([x.pid for x in targets])
        finally:
            elapsed = time.monotonic() - t0
            left += stopped_or_traced([x.pid for x in targets])
            sender.send_signal(signal.SIGTERM)
            sent_out, _ = sender.communicate(timeout=60)
            sent = {int(k): v for k, v in json.loads(sent_out.strip().splitlines()[-1]).items()}
            reports = {t.mode: (t.finish(), sent[t.pid]) for t in targets}
    lat = sorted(latencies)
    held_lat = sorted(held_times)
    target_errors = {m: r["errors"] for m, (r, _) in reports.items() if r["errors"] or r["rc"]}
    lost = {m: s["rt"] + s["rtq"] - r["signals"] for m, (r, s) in reports.items()}
    lost = {m: n for m, n in lost.items() if n}
    # A sigqueue()d signal that arrives without its payload (re-sent as a plain one).
    stripped = {m: s["rtq"] - r["payloads"] for m, (r, s) in reports.items() if s["rtq"] != r["payloads"]}
    return {
        "injections": len(latencies),
        "per_target": dict(per_mode),
        "seconds": round(elapsed, 2),
        "in_syscall": in_syscall,
        "restarts": restarts,
        "signals_held_and_redelivered": held,
        "signals_held_max_one_injection": held_max,
        "errors": {
            "target_self_check": target_errors,
            "target_first_error": {m: r["first_error"] for m, (r, _) in reports.items() if r["first_error"]},
            "injection": dict(inj_errors),
            "rt_signals_lost": lost,
            "rt_payloads_lost": stripped,
        },
        "error_count": sum(target_errors.values())
        + sum(inj_errors.values())
        + sum(lost.values())
        + sum(stripped.values()),
        "slowest": [
            {
                "us": round(us, 1),
                "target": m,
                "stop_wait_us": round(res["stop_wait_ns"] / 1000, 1),
                "held_us": round(res["held_ns"] / 1000, 1),
                "madvise_us": round(res["syscall_ns"] / 1000, 1),
                **{k: res[k] for k in ("stop_kind", "restarts", "signals_kept")},
            }
            for us, m, res in slowest
        ],
        "left_stopped_or_traced": len(left),
        "left_detail": left[:10],
        "held_us": {
            "p50": round(percentile(held_lat, 0.50), 1),
            "p99": round(percentile(held_lat, 0.99), 1),
            "max": round(held_lat[-1] if held_lat else 0.0, 1),
        },
        "latency_us": {
            "p50": round(percentile(lat, 0.50), 1),
            "p90": round(percentile(lat, 0.90), 1),
            "p99": round(percentile(lat, 0.99), 1),
            "max": round(lat[-1] if lat else 0.0, 1),
        },
        "signals": {
            m: {
                "rt_sent": s["rt"] + s["rtq"],
                "rt_received": r["signals"],
                "rt_with_payload_sent": s["rtq"],
                "rt_with_payload_received": r["payloads"],
                "usr1_sent": s["usr1"],
                "usr1_received": r["usr1"],
                "chld_sent": s["chld"],
                "chld_received": r["chld"],
            }
            for m, (r, s) in reports.items()
        },
        "target_work": {
            m: {k: r[k] for k in ("checks", "sleeps", "records") if r[k]} for m, (r, _) in reports.items()
        },
    }


def show(r: dict[str, object]) -> None:
    lat = r["latency_us"]
    errs = r["errors"]
    assert isinstance(lat, dict) and isinstance(errs, dict)
    print(f"injections:      {r['injections']} in {r['seconds']} s  {r['per_target']}")
    print(
        f"  into a thread blocked in a syscall: {r['in_syscall']}; injected call restarted: {r['restarts']}"
    )
    print(
        f"  signals held back and re-delivered: {r['signals_held_and_redelivered']} "
        f"(at most {r['signals_held_max_one_injection']} in one injection)"
    )
    print(f"errors:          {r['error_count']}")
    print(f"  target self-checks failed: {errs['target_self_check'] or 0} {errs['target_first_error'] or ''}")
    print(f"  injections failed or wrong return: {errs['injection'] or 0}")
    print(f"  queued signals lost: {errs['rt_signals_lost'] or 0}")
    print(f"  queued signals that lost their payload: {errs['rt_payloads_lost'] or 0}")
    print(f"left stopped or traced: {r['left_stopped_or_traced']} {r['left_detail'] or ''}")
    print(f"latency (us):    p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  max {lat['max']}")
    held = r["held_us"]
    assert isinstance(held, dict)
    print(f"  of which the target was stopped: p50 {held['p50']}  p99 {held['p99']}  max {held['max']}")
    print(f"  slowest: {r['slowest']}")
    print("signals (sent/received):")
    sigs = r["signals"]
    work = r["target_work"]
    assert isinstance(sigs, dict) and isinstance(work, dict)
    for m, s in sigs.items():
        print(
            f"  {m:8} SIGRTMIN {s['rt_sent']}/{s['rt_received']}"
            f" (with payload {s['rt_with_payload_sent']}/{s['rt_with_payload_received']})"
            f"  SIGUSR1 {s['usr1_sent']}/{s['usr1_received']}"
            f"  SIGCHLD {s['chld_sent']}/{s['chld_received']}   work {work[m]}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--injections", type=int, default=10_000, metavar="N", help="default 10000")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of text")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_inject: needs root (ptrace of other processes)")
    r = run(args.injections, args.seed)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        show(r)
    return 0 if r["error_count"] == 0 and r["left_stopped_or_traced"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
