"""Response framing (RFC 9112 §6-7): the bytes of a response, without I/O.

Owns: the status line and the framing headers (Content-Length, chunked, or
close-delimited for HTTP/1.0), which responses carry no body (HEAD, 1xx, 204,
304), truncation at the length the app declared, the Connection header and the
close decision, chunk framing, Date formatting, and the canned error response.
Must not: touch sockets or read clocks: the caller supplies the Date line and
sends the bytes (as h11 separates its writers from the transport).

One ResponseFraming per response. Its head() turns (request method and version,
status, the app's header lines, its Content-Length, whether to close) into the
head bytes; chunk() frames each body chunk; end() gives the closing bytes;
whole() does all three for a body in hand. The worker's exchange object
inherits it, so the hot path allocates nothing extra.
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
    """How one response's head reads, how its body is delimited, and how much
    of the body went out.

    The defaults live on the class, so a response stores only the fields
    that differ from them (a request allocates one object and writes few
    fields). Whoever starts the response sets status_code, status_line
    (e.g. b"HTTP/1.1 200 OK\r\n"), lines (the other header lines, encoded),
    content_length (None: unknown) and close, then asks for head() or whole()."""
    status_code = 0
    status_line = b""
    lines = b""
    content_length: int | None = None
    close = False            # the connection ends after this response
    body_ok = True           # False for HEAD and bodiless statuses
    chunked = False
    remaining: int | None = None   # bytes the declared length still allows
    sent = 0                 # body bytes framed so far

    def head(self, method: str, version: str, fixed: bytes, close: bool) -> bytes:
        """The head bytes. fixed: the Server and Date lines. close: the app or
        the server asks to end the connection."""
        close = self.close or close
        code = self.status_code
        length = self.content_length
        if code in NO_BODY_STATUSES:
            self.body_ok = False
            framing = b""
        elif length is not None:
            framing = (_LENGTH_LINES.get(length) or length_line(length))[:-2]
            if method == "HEAD":
                self.body_ok = False
            else:
                self.remaining = length
        elif method == "HEAD":
            self.body_ok = False   # unknown length: no framing header needed
            framing = b""
        elif version == "1.1":
            self.chunked = True
            framing = b"Transfer-Encoding: chunked\r\n"
        else:
            close = True   # HTTP/1.0: the end of the body is the close
            framing = b""
        if close:
            self.close = True
            end = b"Connection: close\r\n\r\n"
        elif version == "1.0":
            end = b"Connection: keep-alive\r\n\r\n"
        else:
            end = b"\r\n"
        return b"".join((self.status_line, fixed, self.lines, framing, end))

    def whole(self, method: str, version: str, fixed: bytes, close: bool, body: bytes) -> bytes:
        """Head and body at once, for a body that is all in hand: its length is
        the Content-Length unless the app declared one (then it is cut to
        that; a shorter body means a close, as end() says)."""
        length = self.content_length
        if length is None:
            length = self.content_length = len(body)
        if (length == len(body) and not close and not self.close and version == "1.1"
                and method != "HEAD" and self.status_code not in NO_BODY_STATUSES):
            # The common case: a kept-alive HTTP/1.1 response of the declared length.
            self.sent = length
            self.remaining = 0
            return b"".join((self.status_line, fixed, self.lines,
                             _LENGTH_LINES.get(length) or length_line(length), body))
        head = self.head(method, version, fixed, close)
        if not self.body_ok:
            return head
        if len(body) > length:
            body = body[:length]
        self.sent = size = len(body)
        self.remaining = length - size
        if size < length:
            self.close = True
        return head + body

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
            self.close = True
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
