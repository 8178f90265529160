"""Compile and load one of bpf/*.c with BCC, the way every probe module does.

Start-up checks run here, once: privileges, tracefs, headers. Kernel-side
filters and BTF offsets are passed as -D defines so the BPF program decides
in the kernel and never trusts a mismatched header's struct layout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ksmtrace.errors import TracingUnavailable
from ksmtrace.kernel import bcc_env, checks


def bpf_dir() -> Path:
    """bpf/ of a source checkout (editable install), or the copy in a wheel."""
    here = Path(__file__).resolve().parent.parent
    for cand in (here.parent / "bpf", here / "_bpf"):
        if cand.is_dir():
            return cand
    raise TracingUnavailable("ksmtrace's BPF sources are missing: reinstall ksmtrace")


def load(source: str, defines: dict[str, int | str] | None = None) -> Any:
    """BPF object for bpf/<source>, compiled with ``-DNAME=value`` for each define."""
    checks.require_root("tracing")
    checks.ensure_tracefs()
    bcc, headers = bcc_env.prepare()
    path = bpf_dir() / source
    cflags = [*headers.cflags, f"-I{path.parent}"]
    for name, value in (defines or {}).items():
        cflags.append(f"-D{name}={value}")
    # BCC prints compiler warnings from the generic headers to stderr; they are
    # noise to users, so keep them unless KSMTRACE_DEBUG is set.
    if not os.environ.get("KSMTRACE_DEBUG"):
        cflags.append("-w")
    try:
        return bcc.BPF(src_file=str(path).encode(), cflags=cflags)
    except Exception as exc:  # BCC raises bare Exception on compile/load failure
        raise TracingUnavailable(f"could not load {source}: {exc}") from exc


def detach_all(bpf: Any) -> list[tuple[str, bytes]]:
    """Detach every tracepoint and raw tracepoint of ``bpf`` (programs stay
    loaded, maps keep their counts); returns what :func:`reattach` needs.
    Benchmarks toggle probes this way instead of recompiling."""
    done: list[tuple[str, bytes]] = []
    for tp in list(bpf.raw_tracepoint_fds):
        bpf.detach_raw_tracepoint(tp=tp)
        done.append(("raw", tp))
    for tp in list(bpf.tracepoint_fds):
        bpf.detach_tracepoint(tp=tp)
        done.append(("tp", tp))
    return done


def reattach(bpf: Any, detached: list[tuple[str, bytes]]) -> None:
    """Undo :func:`detach_all` (BCC's auto-attach names: raw_tracepoint__TP,
    tracepoint__CAT__EVENT)."""
    for kind, tp in detached:
        if kind == "raw":
            bpf.attach_raw_tracepoint(tp=tp, fn_name=b"raw_tracepoint__" + tp)
        else:
            bpf.attach_tracepoint(tp=tp, fn_name=b"tracepoint__" + tp.replace(b":", b"__"))
