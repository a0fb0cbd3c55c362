"""The master's control channel: a unix socket (mode 0600) beside the pidfile.

Owns: the wire format (one JSON object per line each way) and both ends. The
master answers `status` itself, so it works while every worker is busy or hung;
`reload` is answered once the new generation serves (or failed).
Must not: block the master for long: a client gets CLIENT_TIMEOUT to send its line.
"""
from __future__ import annotations

import json
import os
import socket

from ..sockets import bind_unix

CLIENT_TIMEOUT = 1.0
MAX_LINE = 4096   # the longest command is a few dozen bytes


class ControlError(Exception):
    pass


class ControlServer:
    def __init__(self, path: str, provisional: bool = False):
        """provisional: a master started by `upgrade` binds beside the path and
        takes the path over only once it is ready (promote), so that one that
        fails leaves its predecessor reachable."""
        self.path = path
        self.bound_at = f"{path}.{os.getpid()}" if provisional else path
        self.sock = bind_unix(self.bound_at, 0o600, 16)   # only the owner may steer the master
        self.inode = os.stat(self.bound_at).st_ino

    def promote(self):
        if self.bound_at != self.path:
            os.replace(self.bound_at, self.path)
            self.bound_at = self.path

    def accept(self):
        """-> (connection, request dict), or None when the client misbehaved."""
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return None
        conn.settimeout(CLIENT_TIMEOUT)
        try:
            line = conn.makefile("rb").readline(MAX_LINE + 1)
            if len(line) > MAX_LINE:
                raise ValueError(f"longer than {MAX_LINE} bytes")
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("not an object")
        except (OSError, ValueError, RecursionError) as exc:
            reply(conn, {"ok": False, "error": f"bad control request: {exc}"})
            return None
        return conn, request

    def close(self, unlink=True):
        self.sock.close()
        try:
            # After an upgrade the path is the new master's socket: leave it.
            if unlink and os.stat(self.bound_at).st_ino == self.inode:
                os.unlink(self.bound_at)
        except OSError:
            pass


def reply(conn, answer: dict) -> None:
    try:
        conn.sendall(json.dumps(answer).encode() + b"\n")
    except OSError:
        pass  # the client went away; nothing to tell
    finally:
        conn.close()


def request(path: str, command: dict, timeout: float) -> dict:
    """Client side: send one command, wait (bounded) for the answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.sendall(json.dumps(command).encode() + b"\n")
        line = sock.makefile("rb").readline()
    except FileNotFoundError:
        raise ControlError(f"no control socket at {path} (is prefork running?)") from None
    except ConnectionRefusedError:
        raise ControlError(f"nothing listens on {path} (stale socket?)") from None
    except socket.timeout:
        raise ControlError(f"the master did not answer within {timeout:g}s") from None
    finally:
        sock.close()
    if not line:
        raise ControlError("the master closed the control connection without answering")
    return json.loads(line)
