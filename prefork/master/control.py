"""The master's control channel: a unix socket (mode 0600) beside the pidfile.

Owns: the wire format (one JSON object per line each way), both ends, and
the server end's clients while their command arrives. The master answers
`status` itself, so it works while every worker is busy or hung; `reload` is
answered once the new generation serves (or failed).
Must not: block the master: clients are read without blocking, as they send,
MAX_CLIENTS at a time (the oldest goes for a new one), each given
CLIENT_TIMEOUT to send its line; an answer waits at most CLIENT_TIMEOUT for
a client that does not read it.
"""
from __future__ import annotations

import json
import os
import selectors
import socket
import time

from ..sockets import bind_unix

CLIENT_TIMEOUT = 1.0
MAX_LINE = 4096   # the longest command is a few dozen bytes
MAX_CLIENTS = 16


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
        self.sock.setblocking(False)
        self.inode = os.stat(self.bound_at).st_ino
        self.clients: dict = {}   # connection -> [bytes so far, deadline], oldest first
        self.selector = None
        self.handle = None

    def promote(self):
        if self.bound_at != self.path:
            os.replace(self.bound_at, self.path)
            self.bound_at = self.path

    def attach(self, selector, handle):
        """Watch the socket in the master's selector; handle(connection,
        request dict) is called for each whole command (it replies)."""
        self.selector = selector
        self.handle = handle
        selector.register(self.sock, selectors.EVENT_READ, self.on_connect)

    def on_connect(self, key=None):
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:   # out of descriptors: the next tick tries again
                return
            if len(self.clients) >= MAX_CLIENTS:
                self.drop(next(iter(self.clients)), "too many control clients at once")
            conn.setblocking(False)
            self.clients[conn] = [b"", time.monotonic() + CLIENT_TIMEOUT]
            self.selector.register(conn, selectors.EVENT_READ, self.on_data)

    def on_data(self, key):
        conn = key.fileobj
        try:
            data = conn.recv(MAX_LINE + 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        state = self.clients[conn]
        state[0] += data
        line, newline, _ = state[0].partition(b"\n")
        if not newline and data and len(state[0]) <= MAX_LINE:
            return   # more to come
        self.forget(conn)
        try:
            if len(line) > MAX_LINE:
                raise ValueError(f"longer than {MAX_LINE} bytes")
            if not newline:
                raise ValueError("the connection ended before its line")
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError) as exc:
            return reply(conn, {"ok": False, "error": f"bad control request: {exc}"})
        self.handle(conn, request)

    def expire(self, now):
        """Each tick: clients that did not send their line in time go."""
        for conn, (_, deadline) in list(self.clients.items()):
            if now >= deadline:
                self.drop(conn, f"no command within {CLIENT_TIMEOUT:g}s")

    def forget(self, conn):
        del self.clients[conn]
        self.selector.unregister(conn)
        conn.setblocking(True)
        conn.settimeout(CLIENT_TIMEOUT)   # for the answer, which may come later (reload)

    def drop(self, conn, why):
        self.forget(conn)
        reply(conn, {"ok": False, "error": f"bad control request: {why}"})

    def descriptors(self) -> list:
        """What a freshly forked child must close."""
        return [self.sock.fileno()] + [conn.fileno() for conn in self.clients]

    def close(self, unlink=True):
        for conn in self.clients:   # (in a worker, the selector is already closed)
            conn.close()
        self.clients.clear()
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
