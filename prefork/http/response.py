"""Response framing (RFC 9112 §6-7): the bytes of a response, without I/O.

Owns: the status line and the framing headers (Content-Length, chunked, or
close-delimited for HTTP/1.0), which responses carry no body (HEAD, 1xx, 204,
304), truncation at the length the app declared, the Connection header and the
close decision, chunk framing, Date formatting, and the canned error response.
Must not: touch sockets or read clocks: the caller supplies the Date line and
sends the bytes (as h11 separates its writers from the transport).

One ResponseFraming per response. Its head() turns (request method and version,
status, the app's header lines, its Content-Length, whether to close) into the
head bytes; body() frames each chunk; end() gives the closing bytes. The worker's
exchange object inherits it, so the hot path allocates nothing extra.
"""
from __future__ import annotations

import email.utils
import http

from .errors import AppError

NO_BODY_STATUSES = frozenset([204, 304] + list(range(100, 200)))
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CHUNKED_END = b"0\r\n\r\n"

REASONS = {s.value: s.phrase for s in http.HTTPStatus}


def http_date(timestamp: float) -> str:
    return email.utils.formatdate(timestamp, usegmt=True)


class ResponseFraming:
    """How one response's body is delimited, and how much of it went out."""
    __slots__ = ("body_ok", "chunked", "remaining", "close", "sent")

    def __init__(self, close: bool):
        self.body_ok = True      # False for HEAD and bodiless statuses
        self.chunked = False
        self.remaining: int | None = None   # bytes the declared length still allows
        self.close = close       # the connection ends after this response
        self.sent = 0            # body bytes framed so far

    def head(self, method: str, version: str, code: int, status_line: bytes, fixed: bytes,
             lines: bytes, content_length: int | None, close: bool) -> bytes:
        """The head bytes. status_line and lines: the app's status line and
        header lines, encoded; fixed: the Server and Date lines. close: the
        app or the server asks to end the connection."""
        close = self.close or close
        if code in NO_BODY_STATUSES:
            self.body_ok = False
            framing = b""
        elif content_length is not None:
            framing = b"Content-Length: %d\r\n" % content_length
            if method == "HEAD":
                self.body_ok = False
            else:
                self.remaining = content_length
        elif method == "HEAD":
            self.body_ok = False   # unknown length: no framing header needed
            framing = b""
        elif version == "1.1":
            self.chunked = True
            framing = b"Transfer-Encoding: chunked\r\n"
        else:
            close = True   # HTTP/1.0: the end of the body is the close
            framing = b""
        self.close = close
        if close:
            end = b"Connection: close\r\n\r\n"
        elif version == "1.0":
            end = b"Connection: keep-alive\r\n\r\n"
        else:
            end = b"\r\n"
        return b"".join((status_line, fixed, lines, framing, end))

    def body(self, data) -> bytes:
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
        """Body bytes that went out without body() (sendfile)."""
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
