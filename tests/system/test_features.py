"""ksmtrace says which KSM features the running kernel lacks, and is right about it.

Runs on every kernel: on 6.18 everything is there; on Debian 12's 6.1 (the VM
of tests/system/test_vm.py) the 6.4+ features must be reported unavailable.
Each report is checked against the kernel doing (or refusing) the thing.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ksmtrace.errors import KsmUnavailable
from ksmtrace.kernel import bcc_env, checks, ksm_sysfs

pytestmark = pytest.mark.system
KSMTRACE = [sys.executable, "-m", "ksmtrace"]


def _status() -> dict:
    out = subprocess.run([*KSMTRACE, "status", "-j"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["features"]


@pytest.mark.ksm
def test_status_reports_features_as_the_kernel_behaves(ksm, workload, wait_for) -> None:
    feats = _status()
    assert feats["ksm"]["available"]
    # PR_SET_MEMORY_MERGE: the launcher works exactly when status says it is there.
    run = subprocess.run([*KSMTRACE, "run", "--", "true"], capture_output=True, text=True, timeout=60)
    if feats["prctl_memory_merge"]["available"]:
        assert run.returncode == 0, run.stderr
    else:
        assert run.returncode != 0 and "needs Linux 6.4+" in run.stderr
        assert "Traceback" not in run.stderr
    _ksm_tracepoints_fire(ksm, workload, wait_for, feats["ksm_tracepoints"]["available"])
    # The knobs: where status says a feature is there, the kernel takes a new
    # value and reads it back; where not, it has no such setting to write.
    # (ksm fixture: the knobs come back as they were.)
    for name, knob, values in (
        ("smart_scan", "smart_scan", (0, 1)),
        ("ksm_advisor", "advisor_mode", ("scan-time", "none")),
    ):
        if feats[name]["available"]:
            for value in values:
                ksm.set(**{knob: value})
                assert ksm_sysfs.read().knobs[knob] == value, (knob, value)
        else:
            with pytest.raises(KsmUnavailable):
                ksm.set(**{knob: values[0]})


def _ksm_tracepoints_fire(ksm, workload, wait_for, available: bool) -> None:  # type: ignore[no-untyped-def]
    """ksm:ksm_stop_scan, where status says the ksm:* tracepoints exist, fires once
    per full scan: exactly as many events as full_scans advanced. Where status
    says they do not, a program for it does not load."""
    checks.ensure_tracefs()
    bcc, headers = bcc_env.prepare()
    text = (
        b"BPF_ARRAY(n, u64, 1);"
        b"TRACEPOINT_PROBE(ksm, ksm_stop_scan) {"
        b" int k = 0; u64 *v = n.lookup(&k); if (v) __sync_fetch_and_add(v, 1); return 0; }"
    )
    if not available:
        with pytest.raises(Exception):  # noqa: B017 (BCC raises plain Exception)
            bcc.BPF(text=text, cflags=list(headers.cflags))
        return
    w = workload()
    w.call("alloc", name="r", pages=64, kind="dup", seed=8)
    assert w.call("madvise", name="r")["ret"] == 0
    prog = bcc.BPF(text=text, cflags=list(headers.cflags))
    try:
        # ksmd is stopped (ksm fixture): full_scans holds still until it starts.
        scans0 = int(ksm_sysfs.read().get("full_scans") or 0)
        ksm.start()
        wait_for(lambda: prog[b"n"][0].value >= 3, 20, "three ksm:ksm_stop_scan events")
        # Writing run waits for ksmd's current batch (ksm_thread_mutex): no scan ends after.
        ksm.set(run=0)
        scans1 = int(ksm_sysfs.read().get("full_scans") or 0)
        assert prog[b"n"][0].value == scans1 - scans0 >= 3
    finally:
        prog.cleanup()


@pytest.mark.host_only("the table's text; the VM's other features test checks what 6.1 has")
def test_status_table_names_what_is_missing() -> None:
    feats = _status()
    out = subprocess.run([*KSMTRACE, "status"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    missing = [f for f in feats.values() if not f["available"]]
    if missing:
        assert "Unavailable on this kernel:" in out.stdout
        for f in missing:
            assert f"{f['what']} ({f['since']}+)" in out.stdout
    else:
        assert "Unavailable" not in out.stdout
