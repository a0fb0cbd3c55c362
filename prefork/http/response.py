"""Response framing rules (RFC 9112): pure functions, no I/O, no clock reads.

Owns: the status line, Date formatting, which responses carry a body, chunk
framing, and the canned error responses. The worker supplies the clock.
"""
from __future__ import annotations

import email.utils
import http

NO_BODY_STATUSES = frozenset([204, 304] + list(range(100, 200)))
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CHUNKED_END = b"0\r\n\r\n"

REASONS = {s.value: s.phrase for s in http.HTTPStatus}


def http_date(timestamp: float) -> str:
    return email.utils.formatdate(timestamp, usegmt=True)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def body_allowed(status_code: int, method: str) -> bool:
    return method != "HEAD" and status_code not in NO_BODY_STATUSES


def error_response(status: int, date: str, server: str, close: bool = True,
                   body: bytes | None = None, head_only: bool = False) -> bytes:
    """A complete small response for an error status (text/html)."""
    reason = REASONS.get(status, "Error")
    if body is None:
        body = (f"<!doctype html><title>{status} {reason}</title>"
                f"<h1>{status} {reason}</h1>\n").encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nServer: {server}\r\nDate: {date}\r\n"
            f"Content-Type: text/html; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"{'Connection: close' if close else 'Connection: keep-alive'}\r\n\r\n")
    return head.encode("latin-1") + (b"" if head_only else body)
