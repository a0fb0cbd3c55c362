"""One request and its response, as the WSGI side sees them.

Owns: what an exchange carries between the reader that makes it and the
connection that answers it: the request (http.request.Request), the response
(wsgi.Response: start_response, and the framing it inherits), the environ,
the app's result and its iterator, and when the request began. Must not: do
socket I/O. The connection (or, later, an HTTP/2 stream) moves the bytes the
response's framing gives; the PEP 3333 write() callable is handed to it.
"""
from __future__ import annotations

from ..http.request import Request
from .wsgi import Response


class Exchange(Request, Response):
    """One request and the response being produced for it, as one object: the
    reader makes each request as an Exchange, and the start_response callable
    and the framing are inherited. Defaults on the class: a request writes
    only what differs."""
    conn = None              # what answers it (worker/connection.py), once it does
    started = 0.0
    environ = None
    result = None
    iterator = None
    sendfile = None          # [fd, offset, remaining] when sending a file
    write_deadline = 0.0     # set by the first blocking write()

    def write(self, data):
        self.conn.write(data)
