"""HTTP/2 in-process: the session (http/http2.py, on our libnghttp2 binding)
with an h2 client at the other end, bytes in and bytes out; raw frames where a
well-behaved client would not send them; any frames at all (hypothesis); and
the response head an exchange makes for a stream."""
import io
import ssl

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import pytest
from hypothesis import given, settings, strategies as st
from hyperframe.frame import (ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame,
                              PingFrame, PriorityFrame, RstStreamFrame, SettingsFrame,
                              WindowUpdateFrame)

from prefork.config import Http2Config, HttpConfig, TlsConfig
from prefork.http.http2 import PREFACE, Http2Session, StreamGone
from prefork.http.request import Request
from prefork.http.response import ResponseFraming

NO_ERROR, PROTOCOL_ERROR, REFUSED_STREAM, ENHANCE_YOUR_CALM = 0, 1, 7, 11


class Pair:
    """Our session and an h2 client, wired by memory."""

    def __init__(self, http=None, http2=None, spool=io.BytesIO):
        self.session = Http2Session(http or HttpConfig(), http2 or Http2Config(),
                                    {"wsgi.url_scheme": "https", "SERVER_PORT": "443"},
                                    Request, spool)
        self.client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.client.initiate_connection()
        self.events = []
        self.pump()

    def pump(self, split=False):
        data = self.client.data_to_send()
        if split:   # a byte at a time: the session keeps what a read cut
            for i in range(len(data)):
                self.session.receive(data[i:i + 1])
        elif data:
            self.session.receive(data)
        self.events += self.client.receive_data(self.session.output())

    def get(self, path="/", headers=(), body=None, split=False, end=True):
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, [(":method", "GET" if body is None else "POST"),
                                       (":scheme", "https"), (":authority", "example.test"),
                                       (":path", path), *headers],
                                 end_stream=body is None and end)
        if body is not None:
            for at in range(0, len(body), 16384):
                self.client.send_data(sid, body[at:at + 16384])
                self.pump()
            self.client.end_stream(sid)
        self.pump(split)
        return sid

    def answer(self, request, body=b"ok"):
        fields = [(b":status", b"200"), (b"content-length", b"%d" % len(body))]
        self.session.respond(request.stream_id, fields, False)
        self.session.send(request.stream_id, body, True)
        self.session.earn()
        self.pump()

    def of(self, kind):
        return [e for e in self.events if isinstance(e, kind)]


def test_a_stream_becomes_a_request_with_the_environ_of_http11():
    pair = Pair()
    pair.get("/a/b?x=1", [("cookie", "a=1"), ("cookie", "b=2"), ("x-thing", "one"),
                          ("x_sneaky", "dropped"), ("accept", "a"), ("accept", "b")], split=True)
    request = pair.session.ready.popleft()
    assert (request.method, request.target, request.version) == ("GET", b"/a/b?x=1", "2")
    fields = request.fields
    assert fields["HTTP_HOST"] == "example.test"         # :authority stands for Host
    assert fields["HTTP_COOKIE"] == "a=1; b=2"           # cookie crumbs joined (RFC 9113 8.2.3)
    assert fields["HTTP_ACCEPT"] == "a,b"
    assert "HTTP_X_SNEAKY" not in fields and fields["HTTP_X_THING"] == "one"
    assert fields["wsgi.url_scheme"] == "https"          # the template's


def test_a_body_arrives_whole_and_a_large_one_is_spooled():
    spools = []

    def spool():
        spools.append(io.BytesIO())
        return spools[-1]
    pair = Pair(HttpConfig(spool_threshold=1000), spool=spool)
    pair.get("/small", body=b"x" * 10)
    small = pair.session.ready.popleft()
    assert small.body == b"x" * 10 and small.fields["CONTENT_LENGTH"] == "10"
    pair.get("/large", body=b"y" * 50_000)
    large = pair.session.ready.popleft()
    assert large.body_file is spools[0] and large.body_file.read() == b"y" * 50_000
    assert large.fields["CONTENT_LENGTH"] == "50000"


@pytest.mark.parametrize("headers,body,status", [
    ([("content-length", "999999")], None, 413),            # declared past max_body
    ([], b"z" * 2000, 413),                                  # grows past it
    ([(f"x-h{i}", "v") for i in range(12)], None, 431),      # more than max_headers
    ([("x-big", "v" * 2100)], None, 431),                    # past max_header_size
])
def test_what_http11_refuses_a_stream_gets_too(headers, body, status):
    pair = Pair(HttpConfig(max_body=1000, max_headers=10, max_header_size=2048))
    sid = pair.get("/", headers, body, end=not headers or headers[0][0] != "content-length")
    assert [(s, e.status) for s, e in pair.session.refused] == [(sid, status)]
    assert not pair.session.ready and not pair.session.failed


def test_connect_is_not_implemented():
    pair = Pair()
    pair.client.send_headers(1, [(":method", "CONNECT"), (":authority", "x:443")], end_stream=True)
    pair.pump()
    assert [(s, e.status) for s, e in pair.session.refused] == [(1, 501)]


def frames(data):
    """The frames in bytes the session put out (hyperframe parses them)."""
    found = []
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9:9 + length]))
        found.append(frame)
        data = data[9 + length:]
    return found


def test_graceful_goaway_lets_streams_in_flight_finish_and_refuses_new_ones():
    pair = Pair()
    pair.get("/in-flight")
    request = pair.session.ready.popleft()
    pair.session.go_away()
    (goaway,) = frames(pair.session.output())
    assert isinstance(goaway, GoAwayFrame)
    assert goaway.error_code == 0 and goaway.last_stream_id == request.stream_id
    # h2's state machine still takes the in-flight stream's frames: it is answered.
    pair.session.respond(request.stream_id, [(b":status", b"200")], False)
    pair.session.send(request.stream_id, b"finished", True)
    sent = frames(pair.session.output())
    assert sent[-1].data == b"finished" and "END_STREAM" in sent[-1].flags
    # A stream the client opens after it is refused, safe to retry elsewhere.
    raw = HeadersFrame(5, hpack.Encoder().encode([(":method", "GET"), (":scheme", "https"),
                                                   (":authority", "x"), (":path", "/")]),
                       flags=["END_HEADERS", "END_STREAM"])
    pair.session.receive(raw.serialize())
    assert not pair.session.ready
    (reset,) = frames(pair.session.output())
    assert isinstance(reset, RstStreamFrame) and reset.stream_id == 5
    assert reset.error_code == REFUSED_STREAM


def test_rapid_reset_spends_the_budget_and_ends_in_enhance_your_calm():
    pair = Pair(http2=Http2Config(flood_budget=50))
    for _ in range(51):
        sid = pair.get("/")
        pair.client.reset_stream(sid)
        pair.pump()
    assert pair.session.failed == "flood"
    assert pair.of(h2.events.ConnectionTerminated)[0].error_code == ENHANCE_YOUR_CALM
    assert not pair.session.ready   # none of the reset streams reached the app


def test_answered_streams_earn_the_budget_back():
    """A browser's pings beside real requests never add up to a flood."""
    pair = Pair(http2=Http2Config(flood_budget=5))
    for _ in range(40):
        pair.session.receive(PingFrame(0, opaque_data=b"12345678").serialize())
        pair.get("/")
        pair.answer(pair.session.ready.popleft())
    assert pair.session.failed is None


def test_an_hpack_bomb_is_cut_before_it_is_decoded_whole():
    pair = Pair(HttpConfig(max_header_size=4096))
    encoder = hpack.Encoder()
    block = encoder.encode([(":method", "GET"), (":scheme", "https"), (":authority", "x"),
                            (":path", "/"), ("x-bomb", "a" * 3000)])
    block += bytes([0x80 | 62]) * 100   # the 3000-byte field again, a byte each
    pair.session.receive(HeadersFrame(1, block, flags=["END_HEADERS", "END_STREAM"]).serialize())
    assert pair.session.failed == "flood" and not pair.session.ready
    pair.events += pair.client.receive_data(pair.session.output())
    assert pair.of(h2.events.ConnectionTerminated)[0].error_code == ENHANCE_YOUR_CALM


def test_a_reset_before_the_app_took_the_stream_drops_it():
    pair = Pair()
    sid = pair.get("/", body=b"x" * 10)
    pair.session.receive(RstStreamFrame(sid, error_code=8).serialize())
    assert not pair.session.ready and pair.session.resets == 1


def test_the_preface_is_what_cleartext_clients_send_first():
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    assert client.data_to_send().startswith(PREFACE)


@pytest.mark.parametrize("method,status,length,expect_body", [
    ("GET", "200 OK", 5, True), ("HEAD", "200 OK", 5, False), ("GET", "304 Not Modified", None, False),
])
def test_a_response_head_as_http2_fields(method, status, length, expect_body):
    framing = ResponseFraming()
    framing.method = method
    framing.status_code = int(status[:3])
    framing.status_line = f"HTTP/1.1 {status}\r\n".encode()
    framing.lines = b"Content-Type: text/plain\r\nX-Two: a b\r\nProxy-Connection: x\r\n"
    framing.content_length = length
    fields = framing.h2_fields([(b"server", b"prefork")])
    assert fields[0] == (b":status", status[:3].encode())
    assert (b"content-type", b"text/plain") in fields and (b"x-two", b"a b") in fields
    assert not any(name == b"proxy-connection" for name, _ in fields)   # RFC 9113 8.2.2
    assert ((b"content-length", b"5") in fields) == (length is not None)
    assert framing.body_ok is expect_body and framing.headers_sent


@pytest.mark.parametrize("http2,offered,chosen", [
    (True, ["http/1.1", "h2"], "h2"), (True, ["http/1.1"], "http/1.1"),
    (False, ["h2", "http/1.1"], "http/1.1"),
])
def test_alpn_offers_h2_first_when_enabled(tmp_path, http2, offered, chosen):
    trustme = pytest.importorskip("trustme")
    from prefork.tls import server_context
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "both.pem"))
    server = server_context(TlsConfig(certfile=str(tmp_path / "both.pem")), http2)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    client_ctx.set_alpn_protocols(offered)
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server_side = server.wrap_bio(s_in, s_out, server_side=True)
    client_side = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    for _ in range(10):
        for side in (client_side, server_side):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    assert client_side.selected_alpn_protocol() == chosen


def test_the_settings_we_announce():
    pair = Pair(HttpConfig(max_header_size=8192, max_headers=50),
                Http2Config(max_concurrent_streams=7, initial_window=1 << 20))
    changed = pair.of(h2.events.RemoteSettingsChanged)[0].changed_settings
    codes = h2.settings.SettingCodes
    assert changed[codes.MAX_CONCURRENT_STREAMS].new_value == 7
    assert changed[codes.INITIAL_WINDOW_SIZE].new_value == 1 << 20
    assert changed[codes.ENABLE_PUSH].new_value == 0
    assert changed[codes.MAX_HEADER_LIST_SIZE].new_value == 8192 + 32 * 58


def raw_session(http=None):
    """Our session after a client's preface and empty SETTINGS, its own
    first frames taken."""
    session = Http2Session(http or HttpConfig(), Http2Config(), {}, Request)
    session.receive(PREFACE + SettingsFrame(0).serialize())
    session.output()
    return session


def block(*extra, method="GET"):
    return hpack.Encoder().encode([(":method", method), (":scheme", "https"),
                                   (":authority", "x"), (":path", "/"), *extra])


@pytest.mark.parametrize("field", [("connection", "keep-alive"), ("transfer-encoding", "chunked"),
                                   ("te", "gzip"), ("Upper", "case")])
def test_a_request_with_a_connection_specific_or_upper_case_field_is_reset(field):
    """RFC 9113 8.2.2 and 8.2.1: nghttp2 resets the stream (PROTOCOL_ERROR);
    no request reaches the app, and the connection goes on."""
    session = raw_session()
    session.receive(HeadersFrame(1, block(field), flags=["END_HEADERS", "END_STREAM"]).serialize())
    assert not session.ready and not session.failed
    (reset,) = frames(session.output())
    assert isinstance(reset, RstStreamFrame) and reset.error_code == PROTOCOL_ERROR
    session.receive(HeadersFrame(3, block(), flags=["END_HEADERS", "END_STREAM"]).serialize())
    assert [r.stream_id for r in session.ready] == [3]


def test_a_refusal_while_the_body_arrives_is_answered_before_its_reset():
    """RFC 9113 8.1: the whole answer first, then RST_STREAM NO_ERROR to stop
    the body (a reset before it would drop the answer)."""
    session = raw_session()
    session.receive(HeadersFrame(1, block(("content-length", "5"), method="POST"),
                                 flags=["END_HEADERS"]).serialize())
    session.respond(1, [(b":status", b"413"), (b"content-length", b"4")], False)
    session.send(1, b"page", True)
    session.reset(1, NO_ERROR)
    sent = frames(session.output())
    assert [type(f).__name__ for f in sent] == ["HeadersFrame", "DataFrame", "RstStreamFrame"]
    assert sent[1].data == b"page" and "END_STREAM" in sent[1].flags
    assert sent[2].error_code == NO_ERROR


def test_a_body_is_framed_as_the_window_opens_and_room_counts_what_is_queued():
    session = Http2Session(HttpConfig(), Http2Config(), {}, Request)
    small = SettingsFrame(0)
    small.settings = {SettingsFrame.INITIAL_WINDOW_SIZE: 10}
    session.receive(PREFACE + small.serialize())
    session.receive(HeadersFrame(1, block(), flags=["END_HEADERS", "END_STREAM"]).serialize())
    session.output()
    session.respond(1, [(b":status", b"200")], False)
    assert session.room(1) == 10
    session.send(1, b"0123456")
    assert session.room(1) == 3          # what is queued counts before it is framed
    session.send(1, b"789")
    assert session.room(1) == 0
    data = [f for f in frames(session.output()) if isinstance(f, DataFrame)]
    assert b"".join(f.data for f in data) == b"0123456789"
    session.receive(WindowUpdateFrame(1, window_increment=5).serialize())
    assert session.widened and session.room(1) == 5
    session.send(1, b"end", True)
    assert session.room(1) == 0          # ended: nothing more may go
    (last,) = frames(session.output())
    assert last.data == b"end" and "END_STREAM" in last.flags


def test_a_continuation_flood_ends_in_enhance_your_calm():
    session = raw_session()
    data = HeadersFrame(1, block()).serialize()   # no END_HEADERS
    data += b"".join(ContinuationFrame(1, b"").serialize() for _ in range(20))
    session.receive(data)
    assert session.failed == "flood"
    (goaway,) = [f for f in frames(session.output()) if isinstance(f, GoAwayFrame)]
    assert goaway.error_code == ENHANCE_YOUR_CALM


@pytest.mark.parametrize("frame", [
    b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x",                  # DATA on stream 0
    b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00",  # WINDOW_UPDATE of 0
])
def test_a_protocol_error_fails_the_session_at_once_with_its_goaway(frame):
    """The session's own verdict on a connection error is known as soon as
    receive() returns (the worker counts and closes on it), its GOAWAY in
    the output."""
    session = raw_session()
    session.receive(frame)
    assert session.failed == "protocol_error"
    (goaway,) = [f for f in frames(session.output()) if isinstance(f, GoAwayFrame)]
    assert goaway.error_code == PROTOCOL_ERROR


def test_a_stream_is_gone_once_the_client_resets_it():
    session = raw_session()
    session.receive(HeadersFrame(1, block(), flags=["END_HEADERS", "END_STREAM"]).serialize())
    session.respond(1, [(b":status", b"200")], False)
    session.receive(RstStreamFrame(1, error_code=8).serialize())
    with pytest.raises(StreamGone):
        session.send(1, b"late")
    assert session.room(1) == 0


FRAME = st.one_of(
    st.builds(lambda sid, end: HeadersFrame(sid, block(), flags=["END_HEADERS"] + end),
              st.sampled_from([1, 2, 3, 5, 2**31 - 1]), st.sampled_from([[], ["END_STREAM"]])),
    st.builds(lambda sid, data: HeadersFrame(sid, data), st.integers(1, 7), st.binary(max_size=40)),
    st.builds(lambda sid, data: ContinuationFrame(sid, data, flags=["END_HEADERS"]),
              st.integers(1, 7), st.binary(max_size=20)),
    st.builds(lambda sid, data, end: DataFrame(sid, data, flags=end), st.integers(1, 7),
              st.binary(max_size=40), st.sampled_from([[], ["END_STREAM"]])),
    st.builds(lambda sid: RstStreamFrame(sid, error_code=8), st.integers(1, 7)),
    st.builds(lambda sid, n: WindowUpdateFrame(sid, window_increment=n), st.integers(0, 7),
              st.integers(0, 2**31 - 1)),
    st.builds(lambda sid: PriorityFrame(sid, depends_on=1), st.integers(1, 7)),
    st.builds(lambda: PingFrame(0, opaque_data=b"12345678")),
    st.builds(lambda: SettingsFrame(0)),
    st.builds(lambda data: data, st.binary(min_size=1, max_size=30)),   # not a frame at all
)


@settings(max_examples=300, deadline=None)
@given(st.lists(FRAME, max_size=12), st.integers(1, 64))
def test_any_frames_in_any_cuts_make_requests_or_a_clean_end(sequence, cut):
    """Whatever a client sends, however the reads cut it, the session never
    raises: it makes requests (each answerable), refusals, or a failure whose
    GOAWAY is in its output (and no GOAWAY with an error without a failure)."""
    session = raw_session(HttpConfig(max_body=64))
    data = b"".join(f if isinstance(f, bytes) else f.serialize() for f in sequence)
    out = b""
    for at in range(0, len(data), cut):
        session.receive(data[at:at + cut])
        while session.ready:
            request = session.ready.popleft()
            try:
                session.respond(request.stream_id, [(b":status", b"204")], True)
            except StreamGone:
                pass
        out += session.output()
        if session.failed:
            break
    ended = any(isinstance(f, GoAwayFrame) and f.error_code for f in frames(out))
    assert ended == bool(session.failed), (session.failed, frames(out))
