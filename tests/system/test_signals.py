"""Signals at random moments of every command that loads or changes something.

Each trial starts a real ``ksmtrace`` command, waits a random time, sends
SIGINT, SIGTERM or SIGHUP (or SIGKILL, below), and checks after it ended:
KSM settings exactly as found, no journal left by a clean exit, the target
process (where there is one) running and untraced, no traceback or
"Exception ignored" on stderr, and the exit status a shell expects (0 when
the command had finished, 128 + signal when a signal ended it, or death by
the signal when it came before ksmtrace had started any work).

KSMTRACE_SIGNAL_TRIALS sets the trials per command (default 27: 216 in
all); KSMTRACE_SIGNAL_SEED replays a run.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ksmtrace.coordinator.journal import RUN_DIR
from ksmtrace.kernel import features, ksm_sysfs
from ksmtrace.kernel.procfs import ProcFS

pytestmark = [
    pytest.mark.system,
    pytest.mark.host_only("signal handling is ksmtrace's; ~30 s of BPF compile per trial under emulation"),
]

TRIALS = int(os.environ.get("KSMTRACE_SIGNAL_TRIALS", "27"))
SEED = int(os.environ.get("KSMTRACE_SIGNAL_SEED", str(random.randrange(1 << 30))))
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# command -> (argv template, latest moment to signal it, seconds). The moments
# cover start-up, BPF compile and load, and the work itself.
COMMANDS = {
    "demo": (["demo", "--size", "8", "--timeout", "10"], 6.0),
    "faults": (["faults", "0.3"], 4.5),
    "ksmd": (["ksmd", "0.3"], 3.0),
    "snoop": (["snoop"], 3.0),
    "estimate": (["estimate", "-p", "{pid}"], 1.2),
    "merge": (["merge", "-p", "{pid}", "--range", "{range}"], 1.0),
    "unmerge": (["unmerge", "-p", "{pid}"], 1.0),
    "run": (["run", "--", "sleep", "2"], 1.0),  # after exec, sleep takes the signal itself
}


def _target_ok(pid: int) -> None:
    """Alive, running, not traced: the command left nothing behind in it."""
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    assert status["TracerPid"].strip() == "0", f"target {pid} left traced by {status['TracerPid']}"
    state = ProcFS().stat(pid).state
    assert state not in ("T", "t"), f"target {pid} left stopped (state {state})"


STOP_TIMEOUT_S = 150
RESEND_AFTER_S = 3.0

# CPython's report of a KeyboardInterrupt raised inside one of its import
# system's weakref callbacks: it is printed and dropped, so the signal is lost.
# Python's own SIGINT handler is in place from the interpreter's start, and
# ksmtrace's first line (which puts the default back, ksmtrace/__main__.py)
# runs only after site and runpy have imported ~25 ms of modules: a Ctrl-C
# landing in such a callback then is lost for any Python program, and a user
# presses it again. ksmtrace cannot see it; the test sends it again.
_LOST_IN_IMPORT = re.compile(r"Exception ignored in: <function _get_module_lock\.<locals>\.cb")


def _lost_before_start(err: str) -> bool:
    return bool(_LOST_IN_IMPORT.search(err)) and "KeyboardInterrupt" in err and "/ksmtrace/" not in err


def _trial(name: str, argv: list[str], sig: int, delay: float, knobs: dict, target: int | None) -> str:
    # stderr to a file, not a pipe: it can be read while the command still runs.
    with tempfile.TemporaryFile("w+") as errf:
        p = subprocess.Popen(
            [sys.executable, "-m", "ksmtrace", *argv], stdout=subprocess.DEVNULL, stderr=errf, text=True
        )
        time.sleep(delay)
        p.send_signal(sig)
        lost = False
        # Generous: a signal that lands during BCC's compile is handled when the
        # compile returns, which takes many seconds on a host that also runs the
        # emulated test VM; a command that ignored the signal still fails here.
        start = time.monotonic()
        while p.poll() is None and time.monotonic() - start < STOP_TIMEOUT_S:
            time.sleep(0.05)
            if sig == signal.SIGINT and not lost and time.monotonic() - start > RESEND_AFTER_S:
                errf.seek(0)
                if _lost_before_start(errf.read()):
                    lost = True
                    p.send_signal(sig)  # the second Ctrl-C
        if p.poll() is None:
            where = ""
            with contextlib.suppress(OSError):
                where = "state " + Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                where += ", wchan " + Path(f"/proc/{p.pid}/wchan").read_text()
            p.kill()
            p.wait()
            errf.seek(0)
            raise AssertionError(
                f"{name}: still running {STOP_TIMEOUT_S} s after {signal.Signals(sig).name} at {delay:.2f}s "
                f"(seed {SEED}; {where}); its stderr: {errf.read()[-2000:]}"
            )
        errf.seek(0)
        err = errf.read()
    where = f"{name} {signal.Signals(sig).name} at {delay:.2f}s (seed {SEED})"
    startup = False
    if lost:
        # Only CPython's report of the first signal, and the second one ended it as any other.
        err = _LOST_IN_IMPORT.sub("", err, count=1)
        head, _, err = err.partition("KeyboardInterrupt")
        assert "/ksmtrace/" not in head, f"{where}: {head}"
    if sig == signal.SIGINT and "Traceback" in err and not re.search(r'File ".*/ksmtrace/', err):
        # A Ctrl-C in the interpreter's first milliseconds, while it imports
        # site before any line of ksmtrace runs, gets CPython's own
        # KeyboardInterrupt report: nothing was loaded or changed yet (checked below).
        assert "<frozen" in err, f"{where}: {err}"
        startup = True
    else:
        assert "Traceback" not in err and "Exception ignored" not in err, f"{where}: {err}"
    assert startup or p.returncode in (0, 128 + sig, -sig), f"{where}: exit {p.returncode}: {err}"
    assert ksm_sysfs.read().knobs == knobs, f"{where}: KSM settings changed"
    assert not (RUN_DIR / f"{p.pid}.json").exists(), f"{where}: journal left after a clean exit"
    if target is not None:
        _target_ok(target)
    if lost:
        return "lost before start, sent again"
    if startup:
        return "before start"
    return "done" if p.returncode == 0 else "interrupted"


def test_signals_at_random_moments(ksm, workload) -> None:
    rng = random.Random(SEED)
    commands = dict(COMMANDS)
    if not features.available("prctl_memory_merge"):
        del commands["run"]  # 'run' refuses at once there (a sentence, exit 1): nothing to interrupt
    wl = workload(comm="sigtarget")
    reg = wl.call("alloc", name="r", pages=256, kind="dup", seed=3)
    wl.call("madvise", name="r")  # something for unmerge to unmerge
    rng_text = f"{reg['addr']:x}-{reg['addr'] + reg['len']:x}"
    knobs = ksm_sysfs.read().knobs
    outcomes: dict[str, dict[str, int]] = {}
    plan = [(name, sig) for name in commands for _ in range(TRIALS // len(SIGNALS) + 1) for sig in SIGNALS]
    plan = [t for i, t in enumerate(plan) if i % (len(plan) // len(commands)) < TRIALS]
    rng.shuffle(plan)
    for name, sig in plan:
        template, latest = commands[name]
        argv = [a.format(pid=wl.pid, range=rng_text) for a in template]
        got = _trial(name, argv, sig, rng.uniform(0, latest), knobs, wl.pid)
        outcomes.setdefault(name, {}).setdefault(got, 0)
        outcomes[name][got] += 1
        if name == "unmerge" and got == "done":
            wl.call("madvise", name="r")  # mergeable again for the next unmerge
    print(f"signal trials (seed {SEED}): {json.dumps(outcomes)}")
    assert sum(sum(v.values()) for v in outcomes.values()) == TRIALS * len(commands)
    # The long-running commands must have been caught mid-work, not only before or after.
    for name in ("demo", "faults", "snoop"):
        assert outcomes[name].get("interrupted"), f"{name} was never interrupted: {outcomes[name]}"


@pytest.mark.host_only("must kill the demo within seconds of start, after it changed KSM settings")
def test_sigkill_leaves_a_journal_the_next_command_repairs(ksm) -> None:
    """demo killed at random moments: whatever it changed, the next command restores and says so."""
    rng = random.Random(SEED)
    knobs = ksm_sysfs.read().knobs
    repaired = 0
    for i in range(max(4, TRIALS // 3)):
        argv = ["demo", "--size", "16", "--timeout", "10"] + (["--no-probes"] if i % 2 else [])
        p = subprocess.Popen(
            [sys.executable, "-m", "ksmtrace", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if i % 3 == 2:
            # Every third trial kills after the journal is written, whatever the
            # machine's speed (a busy CI host once let no random moment land there).
            deadline = time.monotonic() + 60
            while not (RUN_DIR / f"{p.pid}.json").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 1.0))
        else:
            time.sleep(rng.uniform(0.2, 4.0 if i % 2 else 7.0))
        p.kill()
        p.wait()
        journal = RUN_DIR / f"{p.pid}.json"
        left = journal.exists()
        changed = ksm_sysfs.read().knobs != knobs
        assert left or not changed, "KSM settings changed without a journal"
        st = subprocess.run(
            [sys.executable, "-m", "ksmtrace", "status", "-j"], capture_output=True, text=True, timeout=60
        )
        assert st.returncode == 0, st.stderr
        assert ksm_sysfs.read().knobs == knobs, f"trial {i}: not restored after SIGKILL: {st.stderr}"
        assert not journal.exists()
        if left:
            repaired += 1
            lines = [ln for ln in st.stderr.splitlines() if f"(pid {p.pid})" in ln]
            assert len(lines) == 1 and "ended without restoring KSM settings" in lines[0], st.stderr
            if changed:
                assert "->" in lines[0], lines[0]
    assert repaired, "no trial killed the demo while it had settings changed"
