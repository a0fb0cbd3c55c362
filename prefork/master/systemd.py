"""Service-manager glue: sd_notify and socket activation (LISTEN_FDS).

Owns: the NOTIFY_SOCKET datagram protocol (READY=1, RELOADING=1, STOPPING=1,
STATUS=..., MAINPID=...) and adopting sockets passed as fds 3.. by systemd.
Must not: fail the server when no service manager is there (no-ops then).
"""
from __future__ import annotations

import os
import socket

LISTEN_FDS_START = 3


def notify(*fields: str) -> bool:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]   # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto("\n".join(fields).encode(), path)
    except OSError:
        return False
    return True


def activated_sockets() -> list:
    """Sockets systemd passed to this process, if LISTEN_PID names it."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0"))
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)   # not for our children
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + count):
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        sockets.append(sock)
    return sockets
