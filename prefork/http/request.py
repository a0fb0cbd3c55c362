"""Request reading on top of httptools (llhttp): bytes in, Request objects out.

Owns: request limits (line, header count and size, body), Host and framing
rules, the 100-continue decision, body spooling. Must not: touch sockets or read
clocks; the worker feeds bytes and applies deadlines.

Usage: reader.feed(data) parses what it can; completed requests accumulate in
reader.ready (pipelining keeps their order). An HttpError raised from feed()
means: answer with its status and close; the reader is unusable afterwards.
"""
from __future__ import annotations

import collections
import tempfile
from typing import Protocol

import httptools

from .errors import (BadRequest, BodyTooLarge, HeadersTooLarge, HttpError, SpoolFailed,
                     UnsupportedTransferCoding, RequestLineTooLong)


class Limits(Protocol):
    """What the reader enforces; config.HttpConfig is one (the defaults live
    there, once)."""
    max_request_line: int
    max_headers: int
    max_header_size: int
    max_body: int
    spool_threshold: int
    spool_dir: str


class Request:
    """One complete request: head, and the body (bytes, or a file past the
    spool threshold). Plain slots object: built once per request, hot path."""
    __slots__ = ("method", "target", "version", "headers", "keep_alive",
                 "body", "body_file", "upgrade")

    def __init__(self, method, target, version, headers, keep_alive):
        self.method = method          # str, e.g. "GET"
        self.target = target          # bytes, raw request-target
        self.version = version        # "1.1" or "1.0"
        self.headers = headers        # list of (name bytes, value bytes)
        self.keep_alive = keep_alive
        self.body = b""
        self.body_file = None         # set instead of body when spooled
        self.upgrade = False


class RequestReader:
    """httptools protocol object for one connection."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.ready: collections.deque[Request] = collections.deque()   # complete, in order
        self.continue_pending = False      # worker should send 100 Continue
        self.in_message = False            # bytes of an unfinished request seen
        self.in_head = False               # ... and its head is not complete yet
        self._parser = httptools.HttpRequestParser(self)
        self._head_limit = limits.max_request_line + limits.max_header_size + 64
        self._reset_message()

    def _reset_message(self):
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._head_fed = 0
        self._head_began_in_feed = False
        self._body_chunks = None   # made by the first body fragment
        self._body_size = 0
        self._body_file = None
        self._request = None

    # -- input ----------------------------------------------------------
    def feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, HttpError):
                raise cause from None
            raise
        except httptools.HttpParserUpgrade:
            # We do not speak any upgraded protocol: answer the request that
            # asked for it, then close (the bytes after it are not HTTP/1.1).
            if self.ready:
                self.ready[-1].upgrade = True
            return
        except httptools.HttpParserInvalidMethodError as exc:
            raise BadRequest(f"invalid method: {exc}") from None
        except httptools.HttpParserError as exc:
            text = str(exc)
            if "invalid `Transfer-Encoding`" in text:
                # A transfer coding we cannot decode (RFC 9112 6.1: 501).
                raise UnsupportedTransferCoding(text) from None
            raise BadRequest(text) from None
        if self.in_head:
            # httptools buffers a header line internally until it is complete,
            # so bound the bytes of an unfinished head here as well.
            # Only whole feeds inside one head count: in the feed where the
            # head began, the bytes before it were other requests' (a
            # pipelined burst is not a large head). That feed's share of the
            # head is at most one read, which the caller bounds.
            if self._head_began_in_feed:
                self._head_began_in_feed = False
            else:
                self._head_fed += len(data)
            if self._head_fed > self._head_limit:
                raise HeadersTooLarge()

    # -- httptools callbacks ----------------------------------------------
    def on_message_begin(self):
        self.in_message = True
        self.in_head = True
        self._head_began_in_feed = True

    def on_url(self, fragment):
        url = self._url + fragment
        if len(url) > self.limits.max_request_line:
            raise RequestLineTooLong()
        self._url = url

    def on_header(self, name, value):
        # Called once per header: only what must be bounded while parsing is
        # checked here; the rest waits for on_headers_complete's one pass.
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self.limits.max_header_size:
            raise HeadersTooLarge()
        if self._request is None:   # else a chunked trailer: counted, not kept
            headers = self._headers
            if len(headers) >= self.limits.max_headers:
                raise HeadersTooLarge(f"more than {self.limits.max_headers} headers")
            headers.append((name, value))

    def on_headers_complete(self):
        parser = self._parser
        version = parser.get_http_version()
        hosts = 0
        expects_body = False
        expect_continue = False
        for name, value in self._headers:
            # Lower-case only names as long as the few that matter here.
            size = len(name)
            if size == 4:
                hosts += name.lower() == b"host"
            elif size == 14 and name.lower() == b"content-length":
                if int(value) > self.limits.max_body:
                    raise BodyTooLarge()
                expects_body = int(value) > 0
            elif size == 17 and name.lower() == b"transfer-encoding":
                expects_body = True
            elif size == 6 and name.lower() == b"expect":
                expect_continue = value.lower() == b"100-continue"
        if hosts > 1 or (hosts == 0 and version == "1.1"):
            raise BadRequest("HTTP/1.1 needs exactly one Host header")
        if not self._url:
            raise BadRequest("empty request target")
        self.in_head = False
        self._request = Request(parser.get_method().decode("ascii"), self._url,
                                version, self._headers, parser.should_keep_alive())
        self.continue_pending = expect_continue and expects_body and version == "1.1"

    def on_body(self, data):
        self._body_size += len(data)
        if self._body_size > self.limits.max_body:
            raise BodyTooLarge()
        if self._body_file is not None:
            try:
                self._body_file.write(data)
            except OSError as exc:
                raise SpoolFailed(f"cannot spool the body: {exc.strerror}") from None
            return
        if self._body_chunks is None:
            self._body_chunks = []
        self._body_chunks.append(data)
        if self._body_size > self.limits.spool_threshold:
            try:
                self._body_file = tempfile.TemporaryFile(dir=self.limits.spool_dir or None)
                self._body_file.write(b"".join(self._body_chunks))
            except OSError as exc:
                raise SpoolFailed(f"cannot spool the body: {exc.strerror}") from None
            self._body_chunks = []

    def on_message_complete(self):
        request = self._request
        request.keep_alive = self._parser.should_keep_alive()
        if self._body_file is not None:
            self._body_file.seek(0)
            request.body_file = self._body_file
        elif self._body_chunks:
            request.body = b"".join(self._body_chunks)
        self.ready.append(request)
        self.in_message = False
        self.continue_pending = False
        self._reset_message()
