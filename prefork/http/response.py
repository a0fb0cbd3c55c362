"""Response framing (RFC 9112 §6-7): the bytes of a response, without I/O.

Owns: the status line and the framing headers (Content-Length, chunked, or
close-delimited for HTTP/1.0), which responses carry no body (HEAD, 1xx, 204,
304), truncation at the length the app declared, the Connection header and the
close decision, chunk framing, Date formatting, and the canned error response.
Must not: touch sockets or read clocks: the caller supplies the Date line and
sends the bytes (as h11 separates its writers from the transport).

One ResponseFraming per response, and it owns that response's state from the
status to the last byte: whole() makes a response whose body is in hand,
framed() each chunk of one that streams (its head first), ending() its last
bytes, file_length() the length of a file sent by sendfile. The worker's
exchange object inherits it, so the hot path allocates nothing extra; an
HTTP/2 stream will frame the same response state its own way.
"""
from __future__ import annotations

import email.utils
import http

from .errors import AppError

NO_BODY_STATUSES = frozenset([204, 304] + list(range(100, 200)))
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CHUNKED_END = b"0\r\n\r\n"

REASONS = {s.value: s.phrase for s in http.HTTPStatus}


# b"Content-Length: N\r\n\r\n" for lengths seen before (formatting an int
# costs more than the lookup); bounded, the first lengths seen are kept.
_LENGTH_LINES: dict = {}
_LENGTH_LINES_MAX = 4096


def length_line(length: int) -> bytes:
    line = b"Content-Length: %d\r\n\r\n" % length
    if len(_LENGTH_LINES) < _LENGTH_LINES_MAX:
        _LENGTH_LINES[length] = line
    return line


def http_date(timestamp: float) -> str:
    return email.utils.formatdate(timestamp, usegmt=True)


class ResponseFraming:
    """One response from its status to its last byte: how its head reads, how
    its body is delimited, how much of it went out, and whether the
    connection ends after it. The caller only moves the bytes this gives.

    The defaults live on the class, so a response stores only the fields
    that differ from them (a request allocates one object and writes few
    fields). The request it answers supplies method, version and keep_alive
    (the worker's exchange is that request too). Whoever starts the response
    (wsgi.Response, the start_response callable) sets status_line (e.g.
    b"HTTP/1.1 200 OK\r\n"), status_code, lines (the other header lines,
    encoded), content_length (None: unknown) and ends_connection (the app
    asked for Connection: close). Each method that makes bytes takes fixed (the Server
    and Date lines) and closing (the server ends the connection after this
    response, e.g. during a graceful stop)."""
    method = "GET"           # the request's
    version = "1.1"
    keep_alive = True
    status_code = 0
    status_line = b""        # b"": not started (start_response not called)
    lines = b""
    content_length: int | None = None
    ends_connection = False   # the connection ends after this response
    headers_sent = False
    body_ok = True           # False for HEAD and bodiless statuses
    chunked = False
    remaining: int | None = None   # bytes the declared length still allows
    sent = 0                 # body bytes framed so far

    def head(self, fixed: bytes, closing: bool) -> bytes:
        """The head bytes (the caller counts them sent once they are framed
        with what follows them)."""
        if not self.status_line:
            raise AppError("app returned without calling start_response")
        close = self.ends_connection or closing or not self.keep_alive
        code = self.status_code
        length = self.content_length
        version = self.version
        if code in NO_BODY_STATUSES:
            self.body_ok = False
            framing = b""
        elif length is not None:
            framing = (_LENGTH_LINES.get(length) or length_line(length))[:-2]
            if self.method == "HEAD":
                self.body_ok = False
            else:
                self.remaining = length
        elif self.method == "HEAD":
            self.body_ok = False   # unknown length: no framing header needed
            framing = b""
        elif version == "1.1":
            self.chunked = True
            framing = b"Transfer-Encoding: chunked\r\n"
        else:
            close = True   # HTTP/1.0: the end of the body is the close
            framing = b""
        if close:
            self.ends_connection = True
            end = b"Connection: close\r\n\r\n"
        elif version == "1.0":
            end = b"Connection: keep-alive\r\n\r\n"
        else:
            end = b"\r\n"
        return b"".join((self.status_line, fixed, self.lines, framing, end))

    def whole(self, fixed: bytes, closing: bool, body) -> bytes:
        """The whole response, for a body that is all in hand: its length is
        the Content-Length unless the app declared one (then it is cut to
        that; a shorter body means a close, as end() says). After write()
        calls, or for a body that is not bytes, it is framed as a chunk."""
        if self.headers_sent or type(body) is not bytes:
            if not self.headers_sent and self.content_length is None \
                    and hasattr(body, "__len__"):
                self.content_length = len(body)
            return self.framed(body, fixed, closing) + self.ending(fixed, closing)
        if not self.status_line:
            raise AppError("app returned without calling start_response")
        length = self.content_length
        if length is None:
            length = self.content_length = len(body)
        if (length == len(body) and not closing and not self.ends_connection and self.keep_alive
                and self.version == "1.1" and self.method != "HEAD"
                and self.status_code not in NO_BODY_STATUSES):
            # The common case: a kept-alive HTTP/1.1 response of the declared length.
            self.sent = length
            self.remaining = 0
            self.headers_sent = True
            return b"".join((self.status_line, fixed, self.lines,
                             _LENGTH_LINES.get(length) or length_line(length), body))
        head = self.head(fixed, closing)
        self.headers_sent = True
        if not self.body_ok:
            return head
        if len(body) > length:
            body = body[:length]
        self.sent = size = len(body)
        self.remaining = length - size
        if size < length:
            self.ends_connection = True
        return head + body

    def framed(self, data, fixed: bytes, closing: bool) -> bytes:
        """One body chunk as it goes on the wire, the head first when it is not
        sent yet (b"" when nothing may go). A bad first chunk raises before
        the head counts as sent, so an error page can still answer."""
        if self.headers_sent:
            return self.chunk(data)
        head = self.head(fixed, closing)
        body = self.chunk(data) if data else b""
        self.headers_sent = True   # only now: a bad first chunk still gets an error page
        return head + body if body else head

    def ending(self, fixed: bytes, closing: bool) -> bytes:
        """The last bytes of a response whose body is complete: the head too
        when nothing was sent (then its length is 0 unless the app said)."""
        if self.headers_sent:
            return self.end()
        if self.content_length is None:
            self.content_length = 0
        head = self.head(fixed, closing)
        self.headers_sent = True
        return head + self.end()

    def h2_fields(self, fixed: list) -> list:
        """The head as HTTP/2 fields (RFC 9113 8.3.2: :status first, names in
        lower case), for a stream whose body goes in DATA frames: decides
        body_ok and the length the body may take, as head() does. fixed:
        the server and date fields."""
        if not self.status_line:
            raise AppError("app returned without calling start_response")
        code = self.status_code
        fields = [(b":status", b"%d" % code)]
        fields += fixed
        if self.lines:
            for line in self.lines.split(b"\r\n"):
                if line:
                    name, _, value = line.partition(b":")
                    name = name.lower()
                    if name != b"proxy-connection":   # connection-specific (RFC 9113 8.2.2)
                        fields.append((name, value.strip()))
        length = self.content_length
        if code in NO_BODY_STATUSES:
            self.body_ok = False
        else:
            if length is not None:
                fields.append((b"content-length", b"%d" % length))
                self.remaining = length
            if self.method == "HEAD":
                self.body_ok = False
        self.headers_sent = True
        return fields

    def file_length(self, available: int) -> int:
        """A file of `available` bytes is the body (sent by sendfile): its
        length is the Content-Length, cut to the one the app declared."""
        if self.content_length is not None:
            available = min(available, self.content_length)
        self.content_length = available
        return available

    def chunk(self, data) -> bytes:
        """One body chunk as it goes on the wire (b"" when nothing may go)."""
        if type(data) is not bytes:
            if not isinstance(data, (bytearray, memoryview)):
                raise AppError(f"app gave a body chunk of type {type(data).__name__}, not bytes")
            data = bytes(data)
        if not self.body_ok or not data:
            return b""
        remaining = self.remaining
        if remaining is not None:
            if len(data) > remaining:
                data = data[:remaining]   # never send past the app's Content-Length
            self.remaining = remaining - len(data)
        self.sent += len(data)
        if self.chunked:
            return b"%x\r\n%b\r\n" % (len(data), data)
        return data

    def end(self) -> bytes:
        """The closing bytes. A body shorter than its declared length cannot be
        delimited any other way: the connection must close."""
        if self.remaining:
            self.ends_connection = True
        return CHUNKED_END if self.chunked else b""

    def count_sent(self, size: int) -> None:
        """Body bytes that went out without chunk() (sendfile)."""
        self.sent += size
        if self.remaining is not None:
            self.remaining -= size


def error_response(status: int, date: str, server: str, body: bytes,
                   head_only: bool = False) -> bytes:
    """A complete error response (text/html) that ends the connection."""
    head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nServer: {server}\r\n"
            f"Date: {date}\r\nContent-Type: text/html; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode("latin-1") + (b"" if head_only else body)
