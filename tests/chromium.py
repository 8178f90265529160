"""Headless Chromium driven over the DevTools protocol, with the standard library only.

Used by tests/system/test_web.py and bench/bench_web.py. Chromium is started
with ``--remote-debugging-pipe``: it reads protocol messages (JSON, each
ended by a NUL byte) on its fd 3 and writes on its fd 4, so no port is
opened and no WebSocket client is needed. A reader thread sorts what comes
back into command results (by id) and events (kept in order, for the test
to read: every request the page made, console messages, exceptions).

Every network request the browser makes is also written to a net log
(``--log-net-log``): :class:`NetLog` sorts out the page's own requests,
the browser's, the TCP connections and the DNS queries in it, so that a
test can check that the page asked nothing of another host and that
nothing left this one.
"""

from __future__ import annotations

import base64
import ipaddress
import itertools
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# Debian's chromium package. The flags keep the browser's own background
# traffic (updates, sync, network time, autofill, QUIC) from starting; what
# no flag stops (the sign-in component lists Google accounts at start-up,
# the extension updater) fails at name resolution: the resolver rules
# answer "not found" for every host but loopback (names and addresses), so no
# DNS query or connection leaves this host.
FLAGS = [
    "--headless",
    "--no-sandbox",  # as root: Chromium refuses to sandbox itself
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--metrics-recording-only",
    "--mute-audio",
    "--hide-scrollbars",
    "--disable-dev-shm-usage",
    "--disable-client-side-phishing-detection",
    "--disable-features=NetworkTimeServiceQuerying,AutofillServerCommunication,OptimizationHints,Translate,MediaRouter",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1, EXCLUDE [::1]",
]
# The browser itself, not Debian's /usr/bin/chromium wrapper script, which adds
# Google API keys, --enable-remote-extensions and extensions of its own.
BINARIES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser")
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}


class ChromiumError(Exception):
    """The browser failed a command or died."""


def executable() -> str | None:
    for name in BINARIES:
        found = shutil.which(name)
        if found:
            return found
    return None


class Chromium:
    """One headless browser with one page (``self.session``), until :meth:`close`."""

    def __init__(
        self, profile: Path, width: int = 1400, height: int = 1000, net_log: Path | None = None
    ) -> None:
        exe = executable()
        if exe is None:
            raise ChromiumError("chromium is not installed (Debian: apt-get install chromium)")
        profile.mkdir(parents=True, exist_ok=True)
        argv = [
            exe,
            *FLAGS,
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
            f"--window-size={width},{height}",
        ]
        if net_log is not None:
            argv.append(f"--log-net-log={net_log}")
        argv.append("about:blank")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def fds() -> None:  # in the child, before exec: the protocol's fds are 3 and 4
            a, b = os.dup(to_child_r), os.dup(from_child_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.stderr_path = profile / "chromium.stderr"
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                preexec_fn=fds,  # noqa: PLW1509 (only dup/dup2 run in the child before exec)
                pass_fds=(3, 4),
            )
        os.close(to_child_r)
        os.close(from_child_w)
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._results: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="cdp-reader", daemon=True)
        self._reader.start()
        self.session = ""
        target = self.call("Target.createTarget", url="about:blank", session=None)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True, session=None)[
            "sessionId"
        ]
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_child, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._closed = True
                    self._cond.notify_all()
                return
            buf += chunk
            *msgs, buf = buf.split(b"\0")
            with self._cond:
                for raw in msgs:
                    msg = json.loads(raw)
                    if "id" in msg:
                        self._results[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                self._cond.notify_all()

    def call(
        self, method: str, session: str | None = "", timeout: float = 30.0, **params: Any
    ) -> dict[str, Any]:
        """Send one command (to the page's session unless ``session=None``) and wait for its result."""
        mid = next(self._ids)
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params}
        sid = self.session if session == "" else session
        if sid:
            msg["sessionId"] = sid
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in self._results:
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    raise ChromiumError(
                        f"{method}: no answer ({'browser gone' if self._closed else 'timeout'})"
                    )
                self._cond.wait(left)
            res = self._results.pop(mid)
        if "error" in res:
            raise ChromiumError(f"{method}: {res['error']}")
        return res.get("result", {})

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-able values only)."""
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise ChromiumError(f"{expression}: {res['exceptionDetails'].get('text')}")
        return res["result"].get("value")

    def wait(self, expression: str, timeout: float, what: str, interval: float = 0.2) -> Any:
        """Poll an expression until it is truthy (its value) or the deadline passes."""
        deadline = time.monotonic() + timeout
        got: Any = None
        while True:
            got = self.evaluate(expression)
            if got:
                return got
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {got!r})")
            time.sleep(interval)

    def screenshot(self, path: Path, full_page: bool = True) -> None:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.call("Page.getLayoutMetrics")["cssContentSize"]
            params["clip"] = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
            params["captureBeyondViewport"] = True
        data = self.call("Page.captureScreenshot", **params)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def events_named(self, method: str) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e.get("method") == method]

    def requested_urls(self) -> list[str]:
        """Every URL the page asked for (Network.requestWillBeSent), in order."""
        return [e["params"]["request"]["url"] for e in self.events_named("Network.requestWillBeSent")]

    def problems(self) -> list[str]:
        """JavaScript exceptions and console errors of the page."""
        out = []
        for e in self.events_named("Runtime.exceptionThrown"):
            d = e["params"]["exceptionDetails"]
            out.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
        for e in self.events_named("Log.entryAdded"):
            entry = e["params"]["entry"]
            if entry.get("level") == "error":
                out.append(f"console: {entry.get('text')} {entry.get('url', '')}")
        return out

    def close(self) -> None:
        """Ask the browser to quit (it writes out its net log), kill it if it does not."""
        if self.proc.poll() is None:
            try:
                self.call("Browser.close", session=None, timeout=10)
            except ChromiumError:
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        os.close(self._to_child)
        self._reader.join(timeout=5)
        os.close(self._from_child)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_net_log(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The events of a net log as (event type name, params)."""
    text = path.read_text(errors="replace")
    try:
        log = json.loads(text)
    except json.JSONDecodeError:
        # A browser that was killed leaves the events list open.
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    names = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    return [(names.get(e["type"], str(e["type"])), e.get("params", {})) for e in log.get("events", [])]


class NetLog:
    """What a net log says left the browser, sorted out.

    ``page``: URLs the page asked for (URL requests whose network isolation
    key's top-frame site is ``site``: the page's document, its scripts,
    styles and fetches). ``browser``: every other URL request, the browser's
    own (sign-in, updater). ``connects``: every TCP connection attempted.
    ``lookups``: every DNS query sent (host resolution that reached the
    network: with FLAGS' resolver rules, none should)."""

    def __init__(self, path: Path, site: str) -> None:
        self.page: list[str] = []
        self.browser: list[str] = []
        self.connects: list[str] = []
        self.lookups: list[str] = []
        for name, p in read_net_log(path):
            if name == "URL_REQUEST_START_JOB" and "url" in p:
                nik = str(p.get("network_isolation_key", "")).split(" ")[0]
                (self.page if nik == site else self.browser).append(p["url"])
            elif name == "TCP_CONNECT_ATTEMPT" and "address" in p:
                self.connects.append(p["address"])
            elif name == "DNS_TRANSACTION_QUERY" and "qname" in p:
                self.lookups.append(p["qname"])

    def off_host(self) -> dict[str, list[str]]:
        """Page URLs and connections that were not to loopback, and DNS queries."""
        return {
            "page": [u for u in self.page if not is_loopback(urlsplit(u).hostname or "")],
            "connects": [a for a in self.connects if not is_loopback(host_of(a))],
            "lookups": list(self.lookups),
        }


def host_of(value: str) -> str:
    """The host of ``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address."""
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value[1:]
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
