"""The daemon's HTTP side: Prometheus metrics, the web page and its JSON API.

Read-only by construction: only GET and HEAD are answered, and nothing
behind them can change the machine (the handlers only read a BoardState).
It binds to loopback unless told otherwise (``--listen``), and every page
carries a Content-Security-Policy of ``'self'``, so that the page cannot
load anything from elsewhere even if an asset asked it to.
"""

from __future__ import annotations

import ipaddress
import json
import mimetypes
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ksmtrace.errors import UsageError
from ksmtrace.live.board import Board, BoardState
from ksmtrace.views import api

DEFAULT_LISTEN = "127.0.0.1:9477"
CSP = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"


def parse_listen(text: str) -> tuple[str, int] | None:
    """``HOST:PORT``, ``[V6]:PORT`` or ``PORT`` (loopback); ``off`` for none."""
    if text.strip().lower() in ("off", "none", ""):
        return None
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        num = int(port)
    except ValueError:
        raise UsageError(f"--listen {text}: the port must be a number (HOST:PORT, PORT or off)") from None
    if not 0 <= num <= 65535:
        raise UsageError(f"--listen {text}: port {num} is out of range")
    return host, num


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def web_root() -> Any:
    """The page's assets, inside the package (a Traversable)."""
    return resources.files("ksmtrace") / "web"


def _metrics(state: BoardState) -> tuple[bytes, str]:
    from ksmtrace.views import metrics  # prometheus_client is loaded only when scraped

    return metrics.exposition(state)


def _json(obj: Any) -> tuple[bytes, str]:
    return json.dumps(obj, separators=(",", ":")).encode(), "application/json"


def _pid(query: dict[str, list[str]]) -> int:
    try:
        return int(query.get("pid", [""])[0])
    except ValueError:
        raise LookupError("pid must be a number") from None


def _since(query: dict[str, list[str]]) -> float | None:
    if "since" not in query:
        return None
    try:
        return float(query["since"][0])
    except ValueError:
        raise LookupError("since must be a number (a wall time)") from None


ROUTES: dict[str, Callable[[BoardState, dict[str, list[str]]], tuple[bytes, str] | None]] = {
    "/metrics": lambda s, q: _metrics(s),
    "/api/state": lambda s, q: _json(api.state(s)),
    "/api/history": lambda s, q: _json(api.history(s, _since(q))),
    "/api/decisions": lambda s, q: _json(api.decisions(s)),
    "/api/snapshot": lambda s, q: _json(api.snapshot(s)),
    "/api/process": lambda s, q: _json(api.process(s, _pid(q))),
}


class _Handler(BaseHTTPRequestHandler):
    server_version = "ksmtrace"
    board: Board  # set on the subclass the Server makes

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        return  # a scrape a second must not fill the daemon's output

    def _send(self, status: int, body: bytes, ctype: str, head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _static(self, name: str) -> tuple[bytes, str] | None:
        parts = [p for p in name.split("/") if p]
        if not parts or any(p in (".", "..") or p.startswith(".") for p in parts):
            return None
        node = web_root()
        for p in parts:
            node = node / p
        if not node.is_file():
            return None
        ctype = mimetypes.guess_type(parts[-1])[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/javascript", "text/javascript"):
            ctype += "; charset=utf-8"
        return node.read_bytes(), ctype

    def _answer(self, head: bool) -> None:
        url = urlsplit(self.path)
        path = url.path
        try:
            if path in ROUTES:
                out = ROUTES[path](self.board.read(), parse_qs(url.query))
            elif path in ("/", "/index.html"):
                out = self._static("index.html")
            elif path.startswith("/static/"):
                out = self._static(path[len("/static/") :])
            else:
                out = None
        except LookupError as exc:
            self._send(HTTPStatus.BAD_REQUEST, f"{exc}\n".encode(), "text/plain; charset=utf-8", head)
            return
        except Exception as exc:  # noqa: BLE001 (one bad view must not take the daemon's thread down)
            body = f"ksmtrace could not render {path}: {type(exc).__name__}: {exc}\n".encode()
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, body, "text/plain; charset=utf-8", head)
            return
        if out is None:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8", head)
            return
        self._send(HTTPStatus.OK, out[0], out[1], head)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._answer(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(head=True)

    def _refuse(self) -> None:
        self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
        self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse  # noqa: N815 (read-only: no control over HTTP)


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class Server:
    """Serves ``board`` on ``(host, port)`` from a thread until :meth:`close`."""

    def __init__(self, board: Board, host: str, port: int) -> None:
        handler = type("Handler", (_Handler,), {"board": board})
        cls = _V6Server if ":" in host else ThreadingHTTPServer
        try:
            self.httpd = cls((host, port), handler)
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        self.httpd.daemon_threads = True
        self.host, self.port = host, self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="ksmtrace-http", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)
