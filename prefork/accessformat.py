"""The grammar of a custom access-log format: gunicorn-style %(atom)s atoms.

Owns: what each atom means and the check that a format string uses only
known ones. Below the settings table (config.py checks [logging]
access_format with it) and the worker (logship.py formats lines with it).
Must not: import from config or the worker.
"""
from __future__ import annotations

import os


class Atoms:
    """gunicorn-style access-log atoms, computed on demand:
    h remote address, l '-', u remote user, t time [..], r request line,
    m method, U path, q query, H protocol, s status, b body bytes ('-' if 0),
    B body bytes, f referer, a user agent, T seconds, D microseconds,
    M milliseconds, p pid, {header}i request header, {key}e environ key."""

    __slots__ = ("environ", "status", "sent", "duration", "stamp")

    def __init__(self, environ, status, sent, duration, stamp):
        self.environ, self.status, self.sent = environ, status, sent
        self.duration, self.stamp = duration, stamp

    def __getitem__(self, key):
        simple = _ATOMS.get(key)
        if simple is not None:
            return simple(self, self.environ)
        if key.startswith("{") and len(key) > 3:
            name, kind = key[1:-2], key[-1]
            if kind == "i":
                return self.environ.get("HTTP_" + name.upper().replace("-", "_"), "-")
            if kind == "e":
                return str(self.environ.get(name, "-"))
        raise KeyError(key)


# Atom -> value, from (Atoms, environ); built once, looked up per atom.
_ATOMS = {
    "h": lambda a, env: env.get("REMOTE_ADDR", "-"),
    "l": lambda a, env: "-",
    "u": lambda a, env: env.get("REMOTE_USER", "-"),
    "t": lambda a, env: a.stamp,
    "r": lambda a, env: f'{env.get("REQUEST_METHOD")} {env.get("RAW_URI")} '
                        f'{env.get("SERVER_PROTOCOL")}',
    "m": lambda a, env: env.get("REQUEST_METHOD", "-"),
    "U": lambda a, env: env.get("PATH_INFO", "-"),
    "q": lambda a, env: env.get("QUERY_STRING", ""),
    "H": lambda a, env: env.get("SERVER_PROTOCOL", "-"),
    "s": lambda a, env: a.status,
    "b": lambda a, env: a.sent or "-",
    "B": lambda a, env: a.sent,
    "f": lambda a, env: env.get("HTTP_REFERER", "-"),
    "a": lambda a, env: env.get("HTTP_USER_AGENT", "-"),
    "T": lambda a, env: int(a.duration),
    "D": lambda a, env: int(a.duration * 1e6),
    "M": lambda a, env: int(a.duration * 1e3),
    "p": lambda a, env: f"<{os.getpid()}>",
}


def check_format(fmt: str):
    """None if fmt formats a sample request, else what is wrong."""
    sample = {"REQUEST_METHOD": "GET", "RAW_URI": "/", "SERVER_PROTOCOL": "HTTP/1.1",
              "PATH_INFO": "/", "QUERY_STRING": "", "REMOTE_ADDR": "127.0.0.1"}
    try:
        fmt % Atoms(sample, 200, 0, 0.0, "[01/Jan/2026:00:00:00 +0000]")
    except KeyError as exc:
        return f"unknown atom {exc.args[0]!r}"
    except (ValueError, TypeError) as exc:
        return f"bad format string: {exc}"
    return None
