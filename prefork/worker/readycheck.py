"""The ready check ([workers] ready_check): before a new worker reports
ready, it GETs one path through the app it will serve, from inside itself.
A Django app imports its views at the first request: an import error there
would otherwise reach clients after a reload had already retired the old
generation.

Owns: the request it makes up (the bytes a client would send, read by the
same RequestReader into the same environ template, so the app sees the real
shape: Host and SERVER_NAME/PORT of the first listener) and the verdict on
the answer (a status below 500, and no exception).
Must not: count in statistics or the access log (it is no client's
request), or wait on its own: the master kills a worker that has not
reported within boot_timeout, and that is a failed boot like any other."""
from __future__ import annotations

import socket

from ..http.request import RequestReader
from .exchange import Exchange
from .wsgi import build_environ, environ_template


class ReadyCheckFailed(Exception):
    """The check's answer, when it is a failure: the reason in its words."""


def server_address(listener) -> tuple:
    """(name, port) as a client's request to this listener shows them."""
    if listener.family == socket.AF_UNIX:
        return "localhost", "0"
    host, port = listener.getsockname()[:2]
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, str(port)


def run_ready_check(app, path, http, listener, errors, script_name="", multithread=False):
    """GET path through app; raises ReadyCheckFailed unless it answers
    below 500 (the app's own exceptions propagate, with their traceback)."""
    name, port = server_address(listener)
    authority = f"[{name}]" if ":" in name else name
    if port not in ("80", "0"):
        authority += f":{port}"
    reader = RequestReader(http, environ_template(name, port, errors, script_name, multithread),
                           Exchange, None)
    reader.feed(f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: prefork-ready-check\r\n"
                f"Connection: close\r\n\r\n".encode("latin-1"))
    if len(reader.ready) != 1:
        raise ReadyCheckFailed(f"ready_check {path}: not a request path this server can read")
    environ = build_environ(reader.ready.popleft(), ("127.0.0.1", "0"))
    answer = []

    def start_response(status, headers, exc_info=None):
        answer[:] = [status]
        return lambda data: None
    result = app(environ, start_response)
    try:
        for _ in result:
            pass
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    if not answer:
        raise ReadyCheckFailed(f"ready_check GET {path}: the app never called start_response")
    if int(answer[0].split()[0]) >= 500:
        raise ReadyCheckFailed(f"ready_check GET {path} answered {answer[0]}")
