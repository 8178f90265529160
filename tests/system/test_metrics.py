"""The daemon's /metrics scraped by a real Prometheus, queried as the Grafana dashboard queries it.

Real components only: ``ksmtrace daemon --listen 127.0.0.1:0`` (observe
mode, no policy) samples the host; Debian's ``prometheus`` binary, started
here on a free loopback port with its own config and storage, scrapes it
every second; a workload keeps breaking merges (it writes to its merged
pages, ksmd merges them again, it writes again: KSM copy-on-write faults).
Then every target expression of every panel in
packaging/grafana/ksmtrace.json, with Grafana's variables substituted, must
return a non-empty series through Prometheus' HTTP API, and the workload's
own series must show a non-zero KSM COW rate. Every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.stray import STRAY

pytestmark = [
    pytest.mark.system,
    pytest.mark.host_only(
        "Debian's prometheus is not installed in the offline VM (install.sh leaves test tools out)"
    ),
    pytest.mark.requires_kernel_feature("ksm_tracepoints"),
]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "packaging" / "grafana" / "ksmtrace.json"
PAGES = 1024
# Grafana's own values at a 1 s scrape interval: $__rate_interval is at least 4 scrapes.
GRAFANA_VARS = {"$__rate_interval": "5s", "$__interval": "1s", "$__range": "1m", "$instance": ".*"}
START_S = 180.0  # upper bounds, reached only on failure: the daemon compiles its probes first
SERIES_S = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel."""
    doc = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in doc["panels"] for t in p["targets"]]


def substitute(expr: str) -> str:
    for name, value in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace("${" + name[1:] + "}", value).replace(name, value)
    assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
    return expr


class Daemon:
    """``ksmtrace daemon -j --listen 127.0.0.1:0`` and the URL it says it serves."""

    def __init__(self, tmp: Path) -> None:
        env = {**os.environ, "KSMTRACE_RUN_DIR": str(tmp / "run"), "PYTHONPATH": str(ROOT)}
        args = [sys.executable, "-m", "ksmtrace", "daemon", "-j", "--listen", "127.0.0.1:0"]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )
        STRAY.append(self.proc)
        self.base = ""  # http://HOST:PORT/ once the daemon said it
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def url(self) -> str:
        deadline = time.monotonic() + START_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise AssertionError(f"daemon exited (rc {self.proc.wait()}): {err}")
            m = re.search(r"dashboards at (http://\S+/)", line)
            if m:
                self.base = m.group(1)
                return self.base
        raise AssertionError(f"the daemon did not say where it serves within {START_S}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Prometheus:
    """Debian's prometheus on a free loopback port, scraping ``target`` every second."""

    def __init__(self, tmp: Path, target: str) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is not installed (scripts/install.sh installs Debian's package)"
        config = tmp / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: ksmtrace\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "prometheus.log"
        self._log = self.log.open("w")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        STRAY.append(self.proc)  # type: ignore[arg-type]

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited: {self.log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        q = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=10) as r:
            doc = json.load(r)
        assert doc["status"] == "success", doc
        return list(doc["data"]["result"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def running(tmp_path: Path, ksm: Any, workload: Any) -> Iterator[tuple[Daemon, Prometheus, Any]]:
    w = workload(comm="metrics-wl")
    w.call("alloc", name="dup", pages=PAGES, kind="dup", seed=3)
    w.call("madvise", name="dup")
    ksm.start()
    daemon = Daemon(tmp_path)
    prom = None
    try:
        url = daemon.url()
        prom = Prometheus(tmp_path, urllib.parse.urlsplit(url).netloc)
        yield daemon, prom, w
    finally:
        if prom is not None:
            prom.stop()
        daemon.stop()


def test_every_dashboard_query_has_the_workloads_series(running: Any, wait_for: Any) -> None:
    daemon, prom, w = running
    value = [0]

    def churn() -> None:
        """Break the merges again: ksmd merges the identical pages back between calls."""
        value[0] = (value[0] + 2) % 256
        w.call("write", name="dup", value=value[0] | 1)

    # /metrics itself, as the daemon's HTTP server answers it.
    def body() -> str:
        churn()
        with urllib.request.urlopen(f"{daemon.base}metrics", timeout=10) as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = r.read().decode()
        return text if "ksmtrace_ksm_saved_bytes" in text else ""

    text = str(wait_for(body, SERIES_S, "a first sample in /metrics", interval=0.3))
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"ksmtrace_ksm_saved_bytes", "ksmtrace_cow_ksm", "ksmtrace_decisions"} <= names
    assert all(n.startswith("ksmtrace_") for n in names)

    # Prometheus scrapes it.
    wait_for(prom.ready, 60, "prometheus ready")

    def scraped() -> object:
        churn()
        return prom.query('up{job="ksmtrace"} == 1')

    wait_for(scraped, SERIES_S, "prometheus scraping the daemon", interval=0.3)

    # Every panel's every query, as Grafana would send it.
    missing = dict.fromkeys(dashboard_targets(), "never queried")

    def every_target_has_a_series() -> bool:
        churn()
        for key in list(missing):
            if prom.query(substitute(key[1])):
                del missing[key]
            else:
                missing[key] = "empty"
        return not missing

    wait_for(every_target_has_a_series, SERIES_S, f"every panel's query answered: {missing}", interval=0.3)

    # The workload's own series: a non-zero KSM COW rate, in the panel's query too.
    pid = str(w.pid)
    panel = next(e for t, e in dashboard_targets() if t == "KSM COW faults/s per process")

    def workload_cow() -> bool:
        churn()
        rows = [r for r in prom.query(substitute(panel)) if r["metric"].get("pid") == pid]
        gauge = prom.query(
            f'max_over_time(ksmtrace_process_ksm_cow_faults_per_second{{pid="{pid}"}}[10s]) > 0'
        )
        return bool(
            rows and rows[0]["metric"]["comm"] == "metrics-wl" and float(rows[0]["value"][1]) > 0 and gauge
        )

    wait_for(workload_cow, SERIES_S, "the workload's non-zero KSM COW rate in Prometheus", interval=0.3)
