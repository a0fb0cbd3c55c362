"""Listening sockets: created by the master before any fork, shared by workers.

Owns: turning `bind` entries into bound, listening, non-blocking sockets, and
describing them as URLs. Must not: accept connections (workers do).
"""
from __future__ import annotations

import grp
import json
import os
import pwd
import socket
import stat
import struct

from .config import parse_bind


class BindError(Exception):
    pass


def create_listener(text: str, backlog: int, mode: int = 0o660, owner: str = "",
                    group: str = "") -> socket.socket:
    """A bound, listening, non-blocking socket. A unix socket gets mode,
    owner and group ([server] socket_*), so that the front proxy may connect."""
    family, address = parse_bind(text)
    try:
        if family == "unix":
            sock = bind_unix(address, mode, backlog)
            if owner or group:
                os.chown(address, pwd.getpwnam(owner).pw_uid if owner else -1,
                         grp.getgrnam(group).gr_gid if group else -1)
            return sock
        sock = socket.socket(socket.AF_INET6 if family == "inet6" else socket.AF_INET,
                             socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == "inet6":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except KeyError as exc:
        raise BindError(f"cannot listen on {text}: no such user or group {exc}") from None
    except OSError as exc:
        raise BindError(f"cannot listen on {text}: {exc.strerror or exc}") from None
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def bind_unix(path: str, mode: int, backlog: int) -> socket.socket:
    """A listening unix socket at path with the given mode (a stale socket
    left there by an earlier run is replaced; any other file is not)."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)   # no moment with a wider mode
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


_TCP_INFO_HEAD = struct.Struct("=8B6I")   # ... tcpi_unacked, tcpi_sacked


def queue_depth(sock) -> tuple:
    """(waiting, limit) of a listening TCP socket's accept queue: on Linux,
    TCP_INFO reports them as tcpi_unacked and tcpi_sacked. (0, 0) otherwise:
    the kernel refuses TCP_INFO on a unix socket, and on a closed one (so no
    test of sock.family, a costly property, at every accept)."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_HEAD.size)
    except OSError:
        return 0, 0
    fields = _TCP_INFO_HEAD.unpack(raw)
    return fields[8 + 4], fields[8 + 5]


INHERIT_ENV = "PREFORK_LISTENERS"   # {"bind text": fd} from the master we replace


def inherited() -> dict:
    """Listeners handed over by an upgrading master (USR2), by bind text."""
    raw = os.environ.pop(INHERIT_ENV, "")
    if not raw:
        return {}
    result = {}
    for bind, fd in json.loads(raw).items():
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        result[bind] = sock
    return result


def hand_over(listeners: dict) -> tuple:
    """(environment value, fds) that let an exec'd master adopt our listeners."""
    fds = {}
    for bind, sock in listeners.items():
        os.set_inheritable(sock.fileno(), True)
        fds[bind] = sock.fileno()
    return json.dumps(fds), tuple(fds.values())


def describe(sock: socket.socket, tls: bool = False) -> str:
    if sock.family == socket.AF_UNIX:
        return "unix:" + sock.getsockname()
    host, port = sock.getsockname()[:2]
    if sock.family == socket.AF_INET6:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}"


def close_listener(sock: socket.socket, unlink: bool) -> None:
    path = sock.getsockname() if sock.family == socket.AF_UNIX else None
    sock.close()
    if unlink and path:
        try:
            os.unlink(path)
        except OSError:
            pass


def listener_for(bind: str, server) -> socket.socket:
    """create_listener with the [server] settings that shape a listener."""
    return create_listener(bind, server.backlog, int(server.socket_mode, 8),
                           server.socket_owner, server.socket_group)
