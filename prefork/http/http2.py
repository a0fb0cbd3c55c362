"""HTTP/2 without I/O (RFC 9113): bytes in, requests out; responses in, bytes out.

Owns: one connection's protocol session (framing, HPACK, flow control, the
stream states and RFC 9113's checks of a request's fields are libnghttp2's,
through our binding, http/_nghttp2.c: no framing is written here), our
SETTINGS (the limits of [http2] and the header-section bounds of [http]),
what a stream's head and body become (a Request with its environ fields, by
the same rules as HTTP/1.1: the same meta-variable names, limits and Host
checks), a request's body spooled past spool_threshold, the graceful GOAWAY,
and the flood budget: frames that do no work (PING, SETTINGS, empty DATA,
PRIORITY, unknown frames, and the client's resets: rapid reset,
CVE-2023-44487) spend it, each answered stream earns one back, and a
connection that spends it all gets GOAWAY ENHANCE_YOUR_CALM. Counting
frames, not seconds, keeps the verdict the same on a fast or a loaded machine.
Must not: touch sockets or clocks, or run the app: the worker's connection
(worker/http2.py) feeds bytes, sends what output() gives, and answers the
requests in `ready` and the refusals in `refused`.

What the binding bounds: a header block's CONTINUATION frames (8 at most:
ENHANCE_YOUR_CALM), the decoded header list (our MAX_HEADER_LIST_SIZE, while
it is decoded: an HPACK bomb gets ENHANCE_YOUR_CALM), streams open at once
(our MAX_CONCURRENT_STREAMS), frame sizes, flow control both ways, and acks
the client makes us queue without reading them (PING and SETTINGS floods).
"""
from __future__ import annotations

import collections
import io
from typing import Any, Callable, Protocol

from .errors import (BadRequest, BodyTooLarge, HeadersTooLarge, HttpError, NotImplementedMethod,
                     RequestLineTooLong, SpoolFailed)
from .request import _FIELD_KEYS, Request, field_key, valid_authority

try:
    from . import _nghttp2
except ImportError:   # not built (no C compiler): HTTP/2 is not offered (config.speaks_h2)
    _nghttp2 = None   # type: ignore[assignment]

AVAILABLE = _nghttp2 is not None
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Error codes (RFC 9113 7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 0x5, 0x6, 0x7, 0x8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x9, 0xb
# A GOAWAY's error code, as the statistics name it.
REASONS = {NO_ERROR: "no_error", PROTOCOL_ERROR: "protocol_error", INTERNAL_ERROR: "internal_error",
           FLOW_CONTROL_ERROR: "flow_control_error", FRAME_SIZE_ERROR: "frame_size_error",
           ENHANCE_YOUR_CALM: "flood", COMPRESSION_ERROR: "compression_error",
           STREAM_CLOSED: "stream_closed"}
HPACK_ENTRY_OVERHEAD = 32   # RFC 7541 4.1: what each field costs in the list size
if _nghttp2 is not None:
    (HEAD, DATA, EMPTY, END, RESET, CLOSED, WINDOW, SETTINGS, IDLE, GOAWAY) = (
        _nghttp2.HEAD, _nghttp2.DATA, _nghttp2.EMPTY, _nghttp2.END, _nghttp2.RESET,
        _nghttp2.CLOSED, _nghttp2.WINDOW, _nghttp2.SETTINGS, _nghttp2.IDLE, _nghttp2.GOAWAY)


class StreamGone(Exception):
    """The stream is gone: the client reset it, or the session closed it."""


class Limits(Protocol):
    """[http]'s bounds (config.HttpConfig) that a stream's request obeys too."""
    max_request_line: int
    max_headers: int
    max_header_size: int
    max_body: int
    spool_threshold: int


class Settings(Protocol):
    """[http2] (config.Http2Config)."""
    max_concurrent_streams: int
    initial_window: int
    max_frame_size: int
    flood_budget: int


class Http2Session:
    """One HTTP/2 connection's protocol state, server side.

    receive(data) parses; afterwards `ready` holds complete requests (made
    as request_type, each with its stream_id), `refused` holds (stream_id,
    HttpError) for streams to answer with an error status, `cancelled` the
    streams the client reset, `windened` says flow-control room grew (a
    stream waiting for it may go on), and `failed` names why the connection
    must end (its GOAWAY is queued: send output() and close).
    """

    def __init__(self, limits: Limits, settings: Settings, template: dict,
                 request_type: Any = Request, spool: Callable[[], Any] = io.BytesIO):
        self.limits = limits
        self.template = template   # read-only: each stream's fields start from a copy
        self.request_type = request_type
        self.open_spool = spool
        # The connection's window: the whole of max_body per stream would be
        # too much to promise, a stream's window is enough to start with.
        self.engine = _nghttp2.Engine(
            settings.max_concurrent_streams, settings.initial_window, settings.max_frame_size,
            self.header_list_size(), settings.initial_window * 4)
        self.receiving: dict = {}          # stream_id -> request whose head or body is arriving
        self.ready: collections.deque = collections.deque()
        self.refused: list = []
        self.cancelled: list = []
        self.widened = False
        self.failed: str | None = None
        self.peer_closed = False           # the client sent GOAWAY
        self.last_stream = 0               # the highest stream id we took (GOAWAY names it)
        self.goaway_sent = False
        self.budget = settings.flood_budget
        self.settings_seen = 0
        self.streams = 0                   # requests read
        self.resets = 0                    # streams the client reset (since the owner took the count)

    def header_list_size(self) -> int:
        limits = self.limits
        return limits.max_header_size + HPACK_ENTRY_OVERHEAD * (limits.max_headers + 8)

    # -- input ----------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        engine = self.engine
        for event in engine.receive(data):
            kind = event[0]
            if kind == HEAD:
                self.on_head(event[1], event[2], event[3])
            elif kind == DATA:
                self.on_data(event[1], event[2])
            elif kind == END:
                self.on_end(event[1])
            elif kind == RESET:
                self.on_reset(event[1])
            elif kind == CLOSED:   # the session's own verdict on a malformed stream
                self.drop(event[1])
            elif kind == EMPTY or kind == IDLE:
                self.spend()       # PING, PRIORITY, unknown frames, empty DATA: no work
            elif kind == WINDOW:
                self.widened = True
            elif kind == SETTINGS:
                self.widened = True   # an initial window may have grown
                self.settings_seen += 1
                if self.settings_seen > 1:
                    self.spend()
            elif kind == GOAWAY:
                self.peer_closed = True
            if self.failed:
                return
        if engine.failed >= 0:
            self.failed = REASONS.get(engine.failed, "protocol_error")

    def spend(self) -> None:
        """A frame that did no work: from the flood budget."""
        self.budget -= 1
        if self.budget < 0 and not self.failed:
            self.engine.terminate(self.last_stream, ENHANCE_YOUR_CALM)
            self.failed = "flood"

    def earn(self) -> None:
        """A stream answered: the budget grows back by one."""
        self.budget += 1

    def on_head(self, stream_id, headers, ended):
        if self.goaway_sent and stream_id > self.last_stream:
            self.reset(stream_id, REFUSED_STREAM)   # after our GOAWAY: retry elsewhere
            return
        self.streams += 1
        self.last_stream = stream_id
        request = self.request_type.__new__(self.request_type)
        request.stream_id = stream_id
        request.version = "2"
        try:
            self.fill(request, headers)
        except HttpError as exc:
            self.refused.append((stream_id, exc))
            return
        if ended:
            self.ready.append(request)
        else:
            request.body_size = 0
            request.chunks = []
            self.receiving[stream_id] = request

    def fill(self, request, headers):
        """The head's fields into a copy of the template, as the HTTP/1.1
        reader files them (RFC 9113 8.3.1 for the pseudo-header fields)."""
        limits = self.limits
        fields = request.fields = dict(self.template)
        method = path = authority = None
        count = size = 0
        keys = _FIELD_KEYS
        for name, value in headers:
            size += len(name) + len(value) + 4
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    authority = value
                continue   # :scheme is nghttp2's to check; the listener's scheme is the environ's
            count += 1
            key = keys.get(name)
            if key is None:
                key = field_key(name)
                if key is None:
                    continue   # a name with "_": not kept, as in HTTP/1.1
            text = value.decode("latin-1")
            if key in fields:
                if key == "CONTENT_TYPE" or key == "CONTENT_LENGTH" or key == "HTTP_HOST":
                    raise BadRequest(f"more than one {name.decode('latin-1')}")
                fields[key] += ("; " if key == "HTTP_COOKIE" else ",") + text
            else:
                fields[key] = text
        if count > limits.max_headers:
            raise HeadersTooLarge(f"more than {limits.max_headers} headers")
        if size > limits.max_header_size:
            raise HeadersTooLarge()
        request.method = method.decode("latin-1")
        if request.method == "CONNECT":
            raise NotImplementedMethod("CONNECT (this server is no proxy)")
        if len(path) > limits.max_request_line:
            raise RequestLineTooLong()
        if path[:1] != b"/" and not (path == b"*" and request.method == "OPTIONS"):
            raise BadRequest(":path must be a path, or * for OPTIONS")
        request.target = path
        if authority is not None:
            fields["HTTP_HOST"] = authority.decode("latin-1")   # it stands for Host
        host = fields.get("HTTP_HOST")
        if host is None:
            raise BadRequest("neither :authority nor Host")
        if not valid_authority(host):
            raise BadRequest("the authority is not valid (RFC 9113 8.3.1)")
        length = fields.get("CONTENT_LENGTH")
        if length is not None and length.isdigit() and int(length) > limits.max_body:
            raise BodyTooLarge()

    def on_data(self, stream_id, data):
        """Body bytes (the session gives the client its window back at once:
        a body is read whole before the app runs, and bounded by max_body)."""
        request = self.receiving.get(stream_id)
        if request is None:
            return   # refused already (or reset): its data is dropped
        try:
            self.take_body(request, data)
        except HttpError as exc:
            del self.receiving[stream_id]
            self.close_body(request)
            self.refused.append((stream_id, exc))

    def take_body(self, request, data):
        limits = self.limits
        request.body_size += len(data)
        if request.body_size > limits.max_body:
            raise BodyTooLarge()
        spool = request.body_file
        if spool is None and request.body_size > limits.spool_threshold:
            try:
                spool = request.body_file = self.open_spool()
                for chunk in request.chunks:
                    spool.write(chunk)
            except OSError as exc:
                raise SpoolFailed(f"cannot spool the body: {exc.strerror}") from None
            request.chunks = None
        if spool is not None:
            try:
                spool.write(data)
            except OSError as exc:
                raise SpoolFailed(f"cannot spool the body: {exc.strerror}") from None
        else:
            request.chunks.append(data)

    def on_end(self, stream_id):
        request = self.receiving.pop(stream_id, None)
        if request is None:
            return
        if request.body_file is not None:
            request.body_file.seek(0)
        elif request.chunks:
            request.body = b"".join(request.chunks)
        request.chunks = None
        if request.body_size:
            request.fields["CONTENT_LENGTH"] = str(request.body_size)
        self.ready.append(request)

    def on_reset(self, stream_id):
        self.resets += 1
        self.spend()   # rapid reset: a stream opened and dropped did no work
        self.drop(stream_id)

    def drop(self, stream_id):
        """The stream ended before its answer: a request not yet begun is
        forgotten, one being answered is cancelled."""
        request = self.receiving.pop(stream_id, None)
        if request is not None:
            self.close_body(request)
            return
        for request in self.ready:   # complete but not yet taken: never begun
            if request.stream_id == stream_id:
                self.ready.remove(request)
                self.close_body(request)
                return
        self.cancelled.append(stream_id)

    @staticmethod
    def close_body(request):
        if request.body_file is not None:
            request.body_file.close()

    def close(self):
        """The connection ends: spools of unanswered requests are closed."""
        for request in list(self.receiving.values()) + list(self.ready):
            self.close_body(request)
        self.receiving.clear()
        self.ready.clear()

    # -- output -----------------------------------------------------------------
    def output(self) -> bytes:
        return self.engine.output()

    def room(self, stream_id: int) -> int:
        """Bytes the flow-control windows let this stream send now."""
        return self.engine.room(stream_id)

    # (respond, send and end raise StreamGone where the stream is gone.)
    def respond(self, stream_id: int, fields: list, end: bool) -> None:
        if not self.engine.respond(stream_id, fields, end):
            raise StreamGone(stream_id)

    def send(self, stream_id: int, data, end: bool = False) -> None:
        """data: at most room(stream_id) bytes (the session frames it in
        the sizes the client accepts)."""
        if not self.engine.send(stream_id, data, end):
            raise StreamGone(stream_id)

    def end(self, stream_id: int) -> None:
        if not self.engine.end(stream_id):
            raise StreamGone(stream_id)

    def reset(self, stream_id: int, code=CANCEL) -> None:
        self.engine.reset(stream_id, code)   # (closed already: nothing to reset)

    def go_away(self, code=NO_ERROR) -> None:
        """GOAWAY naming the last stream taken. A graceful one (NO_ERROR)
        lets the streams in flight finish; streams the client opens after it
        are refused (REFUSED_STREAM: safe to retry elsewhere)."""
        if code != NO_ERROR:
            self.engine.terminate(self.last_stream, code)
            return
        if self.goaway_sent:
            return
        self.goaway_sent = True
        self.engine.graceful(self.last_stream)
