"""The coordinator against whole-process KSM on one host-like workload (issue #11).

Workload (bench/coordwork.c, compiled here): ``--procs`` processes of ``--mib``
MiB private memory each, ~``--dup-pct``% of it duplicate (within and across
processes) in runs of 2-32 pages among unique pages, and a writer thread per
process rewriting a ``--hot-kib`` hot region every ``--hot-period-ms``, half of
it with duplicate contents (merging that half only buys COW faults). Each arm
starts from nothing merged (``run=2``) with the kernel's knobs as shipped
(pages_to_scan 100, sleep_millisecs 20, advisor none, use_zero_pages 0) and a
fresh workload, runs ``--duration`` s, and the knobs are restored after it:

 (a) every process opts in whole (PR_SET_MEMORY_MERGE), kernel defaults as
     shipped: on 6.7+ that includes smart_scan=1. (a) is the baseline because
     it is what a user gets today by opting in; the plain pre-6.7 scan is (c);
 (b) as (a) with advisor_mode=scan-time (6.8+; skipped with a note if absent);
 (c) as (a) with smart_scan flipped from its shipped value: smart_scan=0 where
     the kernel ships 1 (the brief's "smart_scan=1" arm is (a) on such kernels);
     skipped if the kernel has no smart_scan;
 (d) ``ksmtrace daemon`` with an enforce policy naming the workload's comm and
     ``--budget``; the processes do not opt in. The daemon is started (and has
     compiled its probes) before the workload, as a service would be; its CPU
     counts from the workload's spawn, its start-up is reported apart.

Sampled every ``--every`` s: saved pages (pages_sharing, + ksm_zero_pages under
use_zero_pages), ksmd's CPU (schedstat), the daemon's CPU (/proc/PID/stat) and
RSS, cow_ksm (/proc/vmstat). Per arm: final saving (mean of the last 20% of the
run: the hot regions make it move), time to 95% of (a)'s final saving, CPU of
ksmd + daemon until then, ksmd's steady share of a core and COW faults/s (last
20%). Goals of (d) against (a): saving >= 0.95, time <= 0.25, CPU <= 1/3,
steady ksmd CPU <= 0.1; and against (b), (c): better on all four. Also: the
daemon's CPU on a host where its policy names nothing (goal < 1% of a core) and
its RSS; exec of a matching process to its first KSM page (goal < 10 s).

Run as root: ``.venv/bin/python bench/bench_coordinator.py [--quick] [-j]``.
Holds /run/lock/ksmtrace-tests.lock (the tests' ``ksm`` fixture lock) throughout.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from coordlib import (
    Daemon,
    Sample,
    Sampler,
    Workload,
    compile_helper,
    cpu_s,
    others_mergeable,
    policy,
    rss_kib,
)

from ksmtrace.kernel import features, ksm_sysfs, pagemap

SHIPPED = {"advisor_mode": "none", "pages_to_scan": 100, "sleep_millisecs": 20, "smart_scan": 1}
# Not part of any arm's difference, but a previous user's values must not leak in.
SHIPPED_ALSO = {
    "use_zero_pages": 0,
    "advisor_max_cpu": 70,
    "advisor_min_pages_to_scan": 500,
    "advisor_max_pages_to_scan": 30000,
    "advisor_target_scan_time": 200,
}
LOCK = "/run/lock/ksmtrace-tests.lock"
INF = float("inf")


def arms(args: argparse.Namespace) -> list[tuple[str, dict[str, Any] | None, str]]:
    """(name, knobs over SHIPPED or None for the daemon, why skipped or "")."""
    adv = "" if features.available("ksm_advisor") else features.lacks("ksm_advisor")
    smart = "" if features.available("smart_scan") else features.lacks("smart_scan")
    out = [("a", {}, ""), ("b", {"advisor_mode": "scan-time"}, adv), ("c", {"smart_scan": 0}, smart)]
    out.append(("d", None, ""))
    return [a for a in out if a[0] in args.arms]


def set_knobs(extra: dict[str, Any]) -> None:
    """Unmerge everything, then the shipped knobs with ``extra`` over them; run last."""
    ksm_sysfs.write("run", 2)
    have = ksm_sysfs.read().knobs
    want = {**SHIPPED_ALSO, **SHIPPED, **extra}
    if want.get("advisor_mode") == "scan-time":
        want.pop("pages_to_scan")  # the advisor owns it (setting the mode resets it)
    for k, v in want.items():  # advisor_mode first: switching it resets pages_to_scan
        if k in have:
            ksm_sysfs.write(k, v)
    ksm_sysfs.write("run", 1)


def run_arm(name: str, knobs: dict[str, Any] | None, args: argparse.Namespace, exe: Path, tmp: Path) -> dict:
    set_knobs(knobs or {})
    daemon, startup = None, {}
    if knobs is None:
        t = time.monotonic()
        daemon = Daemon(tmp, policy(exe.name, args.budget), f"arm-{name}")
        daemon.wait("start", 300)
        startup = {"s": time.monotonic() - t, "cpu_s": cpu_s(daemon.proc.pid)}
    note = others_mergeable(set())
    t0 = time.monotonic()
    wl = Workload(
        exe, args.procs, args.mib, args.dup_pct, args.hot_kib, args.hot_period_ms, knobs is not None
    )
    try:
        sampler = Sampler(t0, daemon.proc.pid if daemon else None)
        while (now := time.monotonic() - t0) < args.duration:
            sampler.sample()
            time.sleep(max(0.0, args.every - (time.monotonic() - t0 - now)))
        sampler.sample()
        end_knobs = {k: v for k, v in ksm_sysfs.read().knobs.items() if k in (*SHIPPED, "run")}
    finally:
        wl.close()
        if daemon is not None:
            daemon.stop()
    out: dict[str, Any] = {"arm": name, "knobs_end": end_knobs, "others_mergeable": note}
    out["samples"] = sampler.samples
    if daemon is not None:
        out["startup"] = startup
        out["merged_ranges"] = daemon.count("merge")
        out["unmerged_ranges"] = daemon.count("unmerge")
        made = [d["_t"] - t0 for d in daemon.decisions if d["action"] == "merge" and d.get("applied")]
        out["merges_s"] = (min(made), max(made)) if made else None
        out["ksmd_decisions"] = [
            (round(d["_t"] - t0, 1), d.get("numbers")) for d in daemon.decisions if d["action"] == "ksmd"
        ]
    return out


def summarize(arm: dict, target: float) -> dict[str, Any]:
    s: list[Sample] = arm["samples"]
    first, last = s[0], s[-1]
    steady = [x for x in s if x.t >= 0.8 * last.t]
    st0 = steady[0]
    dt = max(1e-9, last.t - st0.t)
    hit = next((x for x in s if x.saved >= 0.95 * target), None)
    cpu = lambda x: (x.ksmd_s - first.ksmd_s) + (x.daemon_s - first.daemon_s)  # noqa: E731
    return {
        "final_saved_mib": sum(x.saved for x in steady) / len(steady) * 4096 / 2**20,
        "t95_s": hit.t if hit else None,
        "cpu95_s": cpu(hit) if hit else None,
        "steady_ksmd_pct": 100 * (last.ksmd_s - st0.ksmd_s) / dt,
        "steady_daemon_pct": 100 * (last.daemon_s - st0.daemon_s) / dt,
        "steady_cow_per_s": (last.cow - st0.cow) / dt,
        "cpu_total_s": cpu(last),
        "daemon_rss_max_mib": max(x.daemon_rss_kib for x in s) / 1024,
    }


def idle(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    """The daemon where its policy names nothing that exists: what it costs to keep it."""
    set_knobs({})
    d = Daemon(tmp, policy(f"none{secrets.token_hex(4)}", args.budget), "idle")
    try:
        d.wait("start", 300)
        time.sleep(5)  # the first survey and governor step are done by then
        c0, t0 = cpu_s(d.proc.pid), time.monotonic()
        time.sleep(args.idle)
        c1, t1 = cpu_s(d.proc.pid), time.monotonic()
        return {"cpu_pct": 100 * (c1 - c0) / (t1 - t0), "rss_mib": rss_kib(d.proc.pid) / 1024, "s": t1 - t0}
    finally:
        d.stop()


def exec_to_merge(args: argparse.Namespace, exe: Path, tmp: Path) -> dict[str, float | None]:
    """A matching process exec'd while the daemon runs: seconds to its first KSM page (pagemap)."""
    set_knobs({})
    d = Daemon(tmp, policy(exe.name, args.budget), "exec")
    try:
        d.wait("start", 300)
        time.sleep(2)
        t0 = time.monotonic()
        wl = Workload(exe, 1, args.exec_mib, args.dup_pct, args.hot_kib, args.hot_period_ms, False)
        first = None
        try:
            pid, start, end = wl.ranges[0]
            while first is None and time.monotonic() - t0 < 60:
                if pagemap.range_pages(pid, start, end).ksm > 0:
                    first = time.monotonic() - t0
                time.sleep(0.1)
        finally:
            wl.close()
        made = next((x["_t"] - t0 for x in d.decisions if x["action"] == "merge" and x.get("applied")), None)
        return {"first_ksm_page_s": first, "first_madvise_s": made}
    finally:
        d.stop()


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "never" if x is None else format(x, spec)


def verdict(value: float | None, goal: float, lower: bool = True) -> str:
    if value is None:
        return "MISS"
    return "PASS" if (value <= goal if lower else value >= goal) else "MISS"


def report(args: argparse.Namespace, res: dict[str, Any], skipped: dict[str, str], load: tuple) -> dict:
    sums = res["summary"]
    print(
        f"\n{'ARM':<4} {'SAVED(MiB)':>10} {'T95(s)':>7} {'CPU95(s)':>8} {'KSMD%':>6} {'DAEMON%':>7} "
        f"{'COW/s':>7} {'CPU(s)':>7}  KNOBS AT END"
    )
    for name, s in sums.items():
        k = res["arms"][name]["knobs_end"]
        print(
            f"({name}) {s['final_saved_mib']:10.1f} {fmt(s['t95_s']):>7} {fmt(s['cpu95_s'], '.2f'):>8} "
            f"{s['steady_ksmd_pct']:6.2f} {s['steady_daemon_pct']:7.2f} {s['steady_cow_per_s']:7.1f} "
            f"{s['cpu_total_s']:7.2f}  " + " ".join(f"{x}={v}" for x, v in k.items())
        )
    for name, why in skipped.items():
        print(f"({name}) skipped: {why}")
    ratios: dict[str, Any] = {}
    if "a" in sums and "d" in sums:
        a, d = sums["a"], sums["d"]
        div = lambda x, y: None if x is None or y in (None, 0) else x / y  # noqa: E731
        goals = [
            ("saving d/a", div(d["final_saved_mib"], a["final_saved_mib"]), 0.95, False),
            ("time to 95% d/a", div(d["t95_s"], a["t95_s"]), 0.25, True),
            ("CPU (ksmd+daemon) to 95% d/a", div(d["cpu95_s"], a["cpu95_s"]), 1 / 3, True),
            ("steady ksmd CPU d/a", div(d["steady_ksmd_pct"], a["steady_ksmd_pct"]), 0.1, True),
        ]
        print()
        for what, v, goal, lower in goals:
            print(
                f"{what:<30} {fmt(v, '.3f'):>7}  goal {'<=' if lower else '>='} {goal:.3f}  "
                f"{verdict(v, goal, lower)}"
            )
            ratios[what] = {"value": v, "goal": goal, "verdict": verdict(v, goal, lower)}
        both = div(d["steady_ksmd_pct"] + d["steady_daemon_pct"], a["steady_ksmd_pct"])
        print(f"{'steady ksmd+daemon CPU d/a':<30} {fmt(both, '.3f'):>7}  (no goal; with the daemon's own)")
        ratios["steady ksmd+daemon CPU d/a"] = both
        for o in ("b", "c"):
            if o not in sums:
                continue
            x = sums[o]
            better = {
                "saving": d["final_saved_mib"] >= x["final_saved_mib"],
                "time": (d["t95_s"] or INF) <= (x["t95_s"] or INF) and d["t95_s"] is not None,
                "cpu": (d["cpu95_s"] or INF) <= (x["cpu95_s"] or INF) and d["cpu95_s"] is not None,
                "steady ksmd": d["steady_ksmd_pct"] <= x["steady_ksmd_pct"],
            }
            print(
                f"(d) better than ({o}) on all four: {'PASS' if all(better.values()) else 'MISS'} ("
                + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in better.items())
                + ")"
            )
            ratios[f"d better than {o}"] = better
    i, e = res.get("idle"), res.get("exec")
    if i:
        print(
            f"daemon idle (policy names nothing; {i['s']:.0f} s): {i['cpu_pct']:.2f}% of a core "
            f"(goal < 1%) {verdict(i['cpu_pct'], 1.0)}, RSS {i['rss_mib']:.0f} MiB"
        )
    if e:
        print(
            f"exec to first merged page: {fmt(e['first_ksm_page_s'])} s (goal < 10 s) "
            f"{verdict(e['first_ksm_page_s'], 10.0)}; "
            f"the daemon's first madvise at {fmt(e['first_madvise_s'])} s"
        )
    if "d" in res["arms"]:
        arm = res["arms"]["d"]
        print(
            f"daemon (d): started in {arm['startup']['s']:.1f} s ({arm['startup']['cpu_s']:.1f} s CPU, "
            f"not counted above), {arm['merged_ranges']} ranges made mergeable, {arm['unmerged_ranges']} "
            f"unmerged for churn (made from {fmt(arm['merges_s'] and arm['merges_s'][0])} s to "
            f"{fmt(arm['merges_s'] and arm['merges_s'][1])} s), "
            f"peak RSS {sums['d']['daemon_rss_max_mib']:.0f} MiB; ksmd settings "
            f"(s after spawn: run/pages_to_scan/sleep): "
            + ", ".join(
                f"{t}: {n['run']}/{n['pages_to_scan']}/{n['sleep_millisecs']}"
                for t, n in arm["ksmd_decisions"]
            )
        )
    print(
        f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, at end "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--mib", type=int, help="private memory per process (128; --quick 32)")
    ap.add_argument("--dup-pct", type=int, default=10)
    ap.add_argument("--hot-kib", type=int, default=1024)
    ap.add_argument("--hot-period-ms", type=int, default=20)
    ap.add_argument("--duration", type=float, help="seconds per arm (150; --quick 60)")
    ap.add_argument("--every", type=float, default=0.5, help="sampling period (s)")
    ap.add_argument("--budget", default="5%", help="the daemon's [ksmd] budget")
    ap.add_argument("--idle", type=float, help="seconds of the idle-daemon measurement (30; --quick 10)")
    ap.add_argument("--exec-mib", type=int, help="the exec test's process (64; --quick 32)")
    ap.add_argument("--arms", default="abcd")
    ap.add_argument("--quick", action="store_true", help="a smaller, shorter run")
    ap.add_argument("-j", "--json", action="store_true", help="also print the results as JSON")
    ap.add_argument("--dump", metavar="FILE", help="the results with every sample, as JSON")
    args = ap.parse_args()
    sizes = {"mib": (128, 32), "duration": (150, 60), "idle": (30, 10), "exec_mib": (64, 32)}
    for k, (full, quick) in sizes.items():  # given explicitly wins over either size
        if getattr(args, k) is None:
            setattr(args, k, quick if args.quick else full)
    load = os.getloadavg()
    print(
        f"bench_coordinator: {args.procs} processes x {args.mib} MiB, {args.dup_pct}% duplicate in runs of "
        f"2-32 pages, {args.hot_kib} KiB hot every {args.hot_period_ms} ms; {args.duration:.0f} s per arm, "
        f"daemon budget {args.budget}; {os.cpu_count()} CPUs, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        flush=True,
    )
    res: dict[str, Any] = {"arms": {}, "summary": {}}
    skipped: dict[str, str] = {}
    with open(LOCK, "a") as lock, tempfile.TemporaryDirectory() as tmpdir:
        fcntl.flock(lock, fcntl.LOCK_EX)  # no test or bench moves ksmd meanwhile
        saved = ksm_sysfs.SavedSettings()
        tmp = Path(tmpdir)
        exe = compile_helper(tmp / f"ksmb{secrets.token_hex(3)}")
        try:
            for name, knobs, why in arms(args):
                if why:
                    skipped[name] = why
                    continue
                print(f"arm ({name}) ...", flush=True)
                try:
                    res["arms"][name] = run_arm(name, knobs, args, exe, tmp)
                finally:
                    saved.restore()
                if res["arms"][name]["others_mergeable"]:
                    print(
                        "  note: also mergeable on the host: "
                        + ", ".join(res["arms"][name]["others_mergeable"])
                    )
            if "d" in args.arms:
                print("daemon idle ...", flush=True)
                with contextlib.ExitStack() as st:
                    st.callback(saved.restore)
                    res["idle"] = idle(args, tmp)
                print("exec to first merge ...", flush=True)
                with contextlib.ExitStack() as st:
                    st.callback(saved.restore)
                    res["exec"] = exec_to_merge(args, exe, tmp)
        finally:
            ksm_sysfs.write("run", 2)
            saved.restore()
    base = res["arms"].get("a") or next(iter(res["arms"].values()))
    target = summarize(base, 0)["final_saved_mib"] * 2**20 / 4096
    res["summary"] = {n: summarize(a, target) for n, a in res["arms"].items()}
    ratios = report(args, res, skipped, load)
    doc = {"args": vars(args), "skipped": skipped, "ratios": ratios, **res}
    samples = {n: [list(s.__dict__.values()) for s in a.pop("samples")] for n, a in res["arms"].items()}
    if args.json:  # without the samples: a few KiB a reader can take in
        print(json.dumps(doc, default=str))
    if args.dump:
        Path(args.dump).write_text(
            json.dumps({**doc, "samples": samples, "fields": list(Sample.__annotations__)})
        )


if __name__ == "__main__":
    main()
