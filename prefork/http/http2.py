"""HTTP/2 without I/O (RFC 9113): bytes in, requests out; responses in, bytes out.

Owns: one connection's `h2` state machine (framing, HPACK, flow control and
the stream states are h2's: no framing is written here), our SETTINGS (the
limits of [http2] and the header-section bounds of [http]), what a stream's
head and body become (a Request with its environ fields, by the same rules
as HTTP/1.1: the same meta-variable names, limits and Host checks), a
request's body spooled past spool_threshold, the graceful GOAWAY, and the
flood budget: frames that do no work (PING, SETTINGS, empty DATA, PRIORITY,
unknown frames, and the client's resets: rapid reset, CVE-2023-44487) spend
it, each answered stream earns one back, and a connection that spends it all
gets GOAWAY ENHANCE_YOUR_CALM. Counting frames, not seconds, keeps the
verdict the same on a fast or a loaded machine.
Must not: touch sockets or clocks, or run the app: the worker's connection
(worker/http2.py) feeds bytes, sends what output() gives, and answers the
requests in `ready` and the refusals in `refused`.

What h2 itself bounds: a header block's CONTINUATION frames (64 at most,
then PROTOCOL_ERROR), the decoded header list (our MAX_HEADER_LIST_SIZE:
an HPACK bomb gets ENHANCE_YOUR_CALM), streams open at once (our
MAX_CONCURRENT_STREAMS), frame sizes, and flow control both ways.
"""
from __future__ import annotations

import collections
import io
from typing import Any, Callable, Protocol

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from .errors import (BadRequest, BodyTooLarge, HeadersTooLarge, HttpError, NotImplementedMethod,
                     RequestLineTooLong, SpoolFailed)
from .request import _FIELD_KEYS, Request, field_key, valid_authority

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, CANCEL, REFUSED_STREAM, ENHANCE_YOUR_CALM = (
    ErrorCodes.NO_ERROR, ErrorCodes.PROTOCOL_ERROR, ErrorCodes.INTERNAL_ERROR, ErrorCodes.CANCEL,
    ErrorCodes.REFUSED_STREAM, ErrorCodes.ENHANCE_YOUR_CALM)
# A GOAWAY's error code, as the statistics name it.
REASONS = {NO_ERROR: "no_error", PROTOCOL_ERROR: "protocol_error", INTERNAL_ERROR: "internal_error",
           ErrorCodes.FLOW_CONTROL_ERROR: "flow_control_error",
           ErrorCodes.FRAME_SIZE_ERROR: "frame_size_error", ENHANCE_YOUR_CALM: "flood",
           ErrorCodes.COMPRESSION_ERROR: "compression_error",
           ErrorCodes.STREAM_CLOSED: "stream_closed"}
HPACK_ENTRY_OVERHEAD = 32   # RFC 7541 4.1: what each field costs in the list size


class StreamGone(Exception):
    """h2 refuses to send on the stream: the client reset it, or the
    connection is closed (h2 sends nothing after a GOAWAY it received)."""


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
    must end (h2 has queued its GOAWAY; send output() and close).
    """

    def __init__(self, limits: Limits, settings: Settings, template: dict,
                 request_type: Any = Request, spool: Callable[[], Any] = io.BytesIO):
        self.limits = limits
        self.template = template   # read-only: each stream's fields start from a copy
        self.request_type = request_type
        self.open_spool = spool
        conn = self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None))
        conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: settings.initial_window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: settings.max_frame_size,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.header_list_size(),
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        # Until the client acknowledges our SETTINGS, h2 decodes with its own
        # default bound: ours holds from the first block.
        conn.decoder.max_header_list_size = self.header_list_size()
        conn.initiate_connection()
        # The connection's window: the whole of max_body per stream would be
        # too much to promise, a stream's window is enough to start with.
        conn.increment_flow_control_window(settings.initial_window * 4)
        self.receiving: dict = {}          # stream_id -> request whose head or body is arriving
        self.ready: collections.deque = collections.deque()
        self.refused: list = []
        self.cancelled: list = []
        self.widened = False
        self.failed: str | None = None
        self.peer_closed = False           # the client sent GOAWAY: h2 sends nothing more
        self.last_stream = 0               # the highest stream id we took (GOAWAY names it)
        self.goaway_sent = False
        self.after = b""                   # our own frame (the graceful GOAWAY), sent after h2's
        self.budget = settings.flood_budget
        self.settings_seen = 0
        self.streams = 0                   # requests read
        self.resets = 0                    # streams the client reset (since the owner took the count)

    def header_list_size(self) -> int:
        limits = self.limits
        return limits.max_header_size + HPACK_ENTRY_OVERHEAD * (limits.max_headers + 8)

    # -- input ----------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:   # h2 queued its GOAWAY
            # (an HPACK bomb is h2's DenialOfServiceError: ENHANCE_YOUR_CALM)
            self.failed = REASONS.get(getattr(exc, "error_code", PROTOCOL_ERROR), "protocol_error")
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self.on_head(event.stream_id, event.headers, event.stream_ended)
            elif isinstance(event, h2.events.DataReceived):
                self.on_data(event)
            elif isinstance(event, h2.events.StreamEnded):
                self.on_end(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.on_reset(event.stream_id)
            elif isinstance(event, h2.events.WindowUpdated):
                self.widened = True
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                self.widened = True   # an initial window may have grown
                self.settings_seen += 1
                if self.settings_seen > 1:
                    self.spend()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.peer_closed = True
            elif isinstance(event, (h2.events.PingReceived, h2.events.PriorityUpdated,
                                    h2.events.UnknownFrameReceived)):
                self.spend()
            # (TrailersReceived: accepted, bounded by the header list size, not kept)
            if self.failed:
                return

    def spend(self) -> None:
        """A frame that did no work: from the flood budget."""
        self.budget -= 1
        if self.budget < 0 and not self.failed:
            self.h2.close_connection(ENHANCE_YOUR_CALM, last_stream_id=self.last_stream)
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
                continue   # :scheme is h2's to check; the listener's scheme is the environ's
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

    def on_data(self, event):
        stream_id = event.stream_id
        if event.flow_controlled_length:
            # Taken at once (a body is read whole before the app runs, and
            # bounded by max_body): the client may send on.
            self.h2.acknowledge_received_data(event.flow_controlled_length, stream_id)
        elif not event.stream_ended:
            self.spend()   # an empty DATA frame does no work
        request = self.receiving.get(stream_id)
        if request is None or not event.data:
            return   # refused already (or reset): its data is dropped
        try:
            self.take_body(request, event.data)
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
        data = self.h2.data_to_send()
        if self.after:
            data, self.after = data + self.after, b""
        return data

    def room(self, stream_id: int) -> int:
        """Bytes the flow-control windows let this stream send now."""
        try:
            return self.h2.local_flow_control_window(stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError):
            return 0

    # (respond, send and end raise StreamGone where h2 refuses to send.)
    def respond(self, stream_id: int, fields: list, end: bool) -> None:
        try:
            self.h2.send_headers(stream_id, fields, end_stream=end)
        except h2.exceptions.ProtocolError as exc:   # StreamClosedError is one
            raise StreamGone(stream_id) from exc

    def send(self, stream_id: int, data, end: bool = False) -> None:
        """data: at most room(stream_id) bytes; sent in frames of the size
        the client accepts."""
        conn = self.h2
        size = conn.max_outbound_frame_size
        view = memoryview(data)
        try:
            while len(view) > size:
                conn.send_data(stream_id, view[:size].tobytes())
                view = view[size:]
            conn.send_data(stream_id, view.tobytes(), end_stream=end)
        except h2.exceptions.ProtocolError as exc:
            raise StreamGone(stream_id) from exc

    def end(self, stream_id: int) -> None:
        try:
            self.h2.end_stream(stream_id)
        except h2.exceptions.ProtocolError as exc:
            raise StreamGone(stream_id) from exc

    def reset(self, stream_id: int, code=CANCEL) -> None:
        try:
            self.h2.reset_stream(stream_id, code)
        except h2.exceptions.ProtocolError:
            pass   # closed already: nothing to reset

    def go_away(self, code=NO_ERROR) -> None:
        """GOAWAY naming the last stream taken. A graceful one (NO_ERROR) is
        written here, not through h2, whose state machine would refuse the
        in-flight streams' frames once it sent one; streams the client opens
        after it are refused (REFUSED_STREAM: safe to retry elsewhere)."""
        if code != NO_ERROR:
            self.h2.close_connection(code, last_stream_id=self.last_stream)
            return
        if self.goaway_sent:
            return
        self.goaway_sent = True
        frame = GoAwayFrame(0)
        frame.last_stream_id = self.last_stream
        frame.error_code = code
        self.after = frame.serialize()   # after what h2 queued before it
