"""Process lifecycle from the netlink process connector (CONFIG_PROC_EVENTS).

Exec renames a process (new comm), exit prunes its state (pids are reused).
pyroute2's ProcEventSocket never delivers exit events on the 6.18 kernel
these tools are developed on, so ksmtrace opens the NETLINK_CONNECTOR socket
itself and only borrows pyroute2's message classes to decode each event.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.connector.cn_proc import (
    CN_IDX_PROC,
    CN_VAL_PROC,
    PROC_CN_MCAST_IGNORE,
    PROC_CN_MCAST_LISTEN,
    PROC_EVENT_EXEC,
    PROC_EVENT_EXIT,
    PROC_EVENT_FORK,
    ProcEventMarshal,
)

from ksmtrace.errors import NeedsPrivilege

NETLINK_CONNECTOR = 11
NLMSG_DONE = 3
_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
_WHAT_OFFSET = _NLMSG.size + _CN_MSG.size


@dataclass(frozen=True)
class ProcEvent:
    kind: str  # "fork", "exec", "exit"
    pid: int  # the thread
    tgid: int  # its process
    parent_tgid: int = 0  # fork: the parent
    exit_code: int = 0


class ProcEvents:
    """Non-blocking reader of fork/exec/exit events; ``fileno()`` for select."""

    def __init__(self) -> None:
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
            # Port id 0: the kernel picks a free one, so that two readers can
            # live in one process (the daemon's and its dashboards' sampler);
            # binding to our pid works only once.
            self.sock.bind((0, CN_IDX_PROC))
        except PermissionError as exc:
            raise NeedsPrivilege("process events need root (CAP_NET_ADMIN)") from exc
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._control(PROC_CN_MCAST_LISTEN)
        self.lost = 0  # events dropped by the kernel (receive buffer overrun)

    def _control(self, action: int) -> None:
        payload = struct.pack("=I", action)
        cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(payload), 0)
        body = cn + payload
        hdr = _NLMSG.pack(_NLMSG.size + len(body), NLMSG_DONE, 0, 0, self.sock.getsockname()[0])
        self.sock.send(hdr + body)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list[ProcEvent]:
        out: list[ProcEvent] = []
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return out
            except OSError as exc:  # ENOBUFS: the kernel dropped events
                if exc.errno == 105:
                    self.lost += 1
                    continue
                raise
            ev = decode(data)
            if ev is not None:
                out.append(ev)

    def close(self) -> None:
        try:
            self._control(PROC_CN_MCAST_IGNORE)
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> ProcEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def decode(data: bytes) -> ProcEvent | None:
    """One connector datagram into a ProcEvent (None for events we ignore)."""
    if len(data) < _WHAT_OFFSET + 4:
        return None
    (what,) = struct.unpack_from("=I", data, _WHAT_OFFSET)
    cls = ProcEventMarshal.msg_map.get(what)
    if what not in (PROC_EVENT_FORK, PROC_EVENT_EXEC, PROC_EVENT_EXIT) or cls is None:
        return None
    msg: Any = cls(data)
    msg.decode()
    if what == PROC_EVENT_FORK:
        return ProcEvent("fork", msg["child_pid"], msg["child_tgid"], parent_tgid=msg["parent_tgid"])
    if what == PROC_EVENT_EXEC:
        return ProcEvent("exec", msg["process_pid"], msg["process_tgid"])
    return ProcEvent("exit", msg["process_pid"], msg["process_tgid"], exit_code=msg["exit_code"])
