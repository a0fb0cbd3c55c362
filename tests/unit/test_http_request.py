"""The HTTP reader fed bytes whole, line by line and byte by byte."""
import gc
import weakref

import pytest
from hypothesis import given, settings, strategies as st

from prefork.http.errors import (BadRequest, BodyTooLarge, HeadersTooLarge, HttpError,
                                 UnsupportedTransferCoding, RequestLineTooLong)
from prefork.config import HttpConfig
from prefork.http.request import RequestReader

# Every reader test runs against both bindings of llhttp (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("llhttp_binding")

PIPELINED = (b"POST /upload?x=1 HTTP/1.1\r\nHost: example\r\nContent-Length: 5\r\n"
             b"X-Two: a\r\n\r\nhello"
             b"GET /next HTTP/1.1\r\nHost: example\r\n\r\n"
             b"GET /old HTTP/1.0\r\n\r\n")


def splits(data):
    yield "whole", [data]
    yield "lines", [line + b"\n" for line in data.split(b"\n")[:-1]] + [data.split(b"\n")[-1]]
    yield "bytes", [data[i:i + 1] for i in range(len(data))]


def feed_all(pieces, limits=HttpConfig()):
    reader = RequestReader(limits)
    for piece in pieces:
        if piece:
            reader.feed(piece)
    return reader


@pytest.mark.parametrize("how,pieces", list(splits(PIPELINED)))
def test_pipelined_requests_parse_the_same_however_split(how, pieces):
    reader = feed_all(pieces)
    first, second, third = reader.ready
    assert (first.method, first.target, first.version) == ("POST", b"/upload?x=1", "1.1")
    assert first.body == b"hello"
    assert first.fields["HTTP_X_TWO"] == "a"
    assert first.keep_alive
    assert (second.method, second.target, second.body) == ("GET", b"/next", b"")
    assert (third.target, third.version, third.keep_alive) == (b"/old", "1.0", False)
    assert not reader.in_message


@pytest.mark.parametrize("how,pieces", list(splits(
    b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"4;name=value\r\nWiki\r\n5\r\npedia\r\n0\r\nX-Trailer: yes\r\n\r\n")))
def test_chunked_body_with_extensions_and_trailers(how, pieces):
    (request,) = feed_all(pieces).ready
    assert request.body == b"Wikipedia"
    assert "HTTP_X_TRAILER" not in request.fields
    assert request.fields["CONTENT_LENGTH"] == "9"


def test_a_new_template_holds_from_the_next_request_on():
    """A TLS connection's reader gets the handshake's facts after it was made."""
    reader = RequestReader(HttpConfig(), {"wsgi.url_scheme": "http"})
    reader.feed(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
    reader.retemplate({"wsgi.url_scheme": "https", "HTTPS": "on"})
    reader.feed(b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n")
    first, second = reader.ready
    assert first.fields["wsgi.url_scheme"] == "http" and "HTTPS" not in first.fields
    assert second.fields["wsgi.url_scheme"] == "https" and second.fields["HTTPS"] == "on"
    assert second.fields["HTTP_HOST"] == "h"


def test_http10_keep_alive_on_request():
    (request,) = feed_all([b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"]).ready
    assert request.keep_alive


def test_connection_close_honoured():
    (request,) = feed_all([b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"]).ready
    assert not request.keep_alive


def test_expect_continue_is_flagged_until_the_body_arrives():
    reader = RequestReader(HttpConfig())
    reader.feed(b"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
    assert reader.continue_pending and not reader.ready
    reader.continue_pending = False
    reader.feed(b"abc")
    assert reader.ready[0].body == b"abc"


def test_expect_continue_without_body_needs_no_interim_response():
    reader = feed_all([b"GET /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n\r\n"])
    assert not reader.continue_pending and len(reader.ready) == 1


def test_body_above_spool_threshold_goes_to_a_file():
    limits = HttpConfig(spool_threshold=10)
    body = b"0123456789" * 10
    reader = feed_all([b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n", body[:50],
                       body[50:]], limits)
    request = reader.ready[0]
    assert request.body == b"" and request.body_file.read() == body


@pytest.mark.parametrize("data,error", [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: h\r\n\r\n", RequestLineTooLong),
    (b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n",
     HeadersTooLarge),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"v" * 40000 + b"\r\n\r\n", HeadersTooLarge),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999\r\n\r\n", BodyTooLarge),
    (b"GET / HTTP/1.1\r\n\r\n", BadRequest),                       # no Host
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", BadRequest),  # two Hosts
    (b"GARBAGE\r\n\r\n", BadRequest),
    (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", BadRequest),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
     BadRequest),
    (b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", BadRequest),
])
@pytest.mark.parametrize("bytewise", [False, True])
def test_limits_and_malformed_requests(data, error, bytewise):
    reader = RequestReader(HttpConfig())
    with pytest.raises(error):
        for piece in ([data[i:i + 1] for i in range(len(data))] if bytewise else [data]):
            reader.feed(piece)


def test_chunked_body_over_the_limit():
    reader = RequestReader(HttpConfig(max_body=10))
    reader.feed(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    with pytest.raises(BodyTooLarge):
        reader.feed(b"20\r\n" + b"x" * 32 + b"\r\n0\r\n\r\n")


def test_unknown_transfer_coding_is_refused():
    with pytest.raises(UnsupportedTransferCoding):
        feed_all([b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n"])


def test_head_bytes_are_bounded_even_inside_one_header_line():
    reader = RequestReader(HttpConfig(max_header_size=1000, max_request_line=100))
    reader.feed(b"GET / HTTP/1.1\r\nHost: h\r\nX-Slow: ")
    with pytest.raises(HeadersTooLarge):
        for _ in range(20):
            reader.feed(b"v" * 100)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_give_an_http_error(data):
    reader = RequestReader(HttpConfig(max_request_line=64, max_header_size=256, max_body=64))
    try:
        reader.feed(data)
    except HttpError as exc:
        assert 400 <= exc.status < 600


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b"GET", b" ", b"/", b"a", b"%", b"HTTP/1.1", b"\r\n", b":",
                                 b"Host", b"Content-Length", b"1", b"Transfer-Encoding",
                                 b"chunked", b"\x00", b"0"]), max_size=40))
def test_http_shaped_bytes_parse_or_give_an_http_error(tokens):
    reader = RequestReader(HttpConfig())
    try:
        reader.feed(b"".join(tokens))
    except HttpError as exc:
        assert 400 <= exc.status < 600


def test_a_pipelined_burst_longer_than_the_head_limit_is_not_a_large_head():
    reader = RequestReader(HttpConfig(max_request_line=100, max_header_size=256))
    burst = b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n" * 50    # 1,400 bytes of whole requests
    reader.feed(burst + b"GET /y HTTP/1.1\r\nHo")          # ...then one unfinished head
    reader.feed(b"st: x\r\n\r\n")
    assert len(reader.ready) == 51


def test_repeated_fields_are_joined_in_the_order_received():
    # Our binding files fields whose names it knows in C and leaves the rest
    # to Python; a known spelling after an unknown one must not jump ahead
    # (X-Forwarded-For's rightmost entry is the one a trusted proxy added).
    feed_all([b"GET / HTTP/1.1\r\nHost: h\r\nX-Order-Test: known\r\n\r\n"])   # now a known name
    (request,) = feed_all([b"GET / HTTP/1.1\r\nHost: h\r\nx-order-test: client\r\n"
                           b"X-Order-Test: proxy\r\nX-Order-After: 1\r\n\r\n"]).ready
    assert request.fields["HTTP_X_ORDER_TEST"] == "client,proxy"
    assert request.fields["HTTP_X_ORDER_AFTER"] == "1"


def test_a_reader_and_its_parser_are_freed_with_the_connection():
    # The parser holds the reader's callbacks and the reader holds the
    # parser: a cycle, which the garbage collector must be able to break.
    reader = feed_all([b"GET / HTTP/1.1\r\nHost: h\r\nX-Half: "])
    gone = weakref.ref(reader)
    del reader
    gc.collect()
    assert gone() is None


def outcome(chunks, binding, monkeypatch):
    """What a reader made of these feeds with one binding: its requests, then
    the status it refused the rest with (or None)."""
    from prefork.http import request as reader_module
    with monkeypatch.context() as patch:
        if binding == "httptools":
            patch.setattr(reader_module, "_llhttp", None)
        reader = RequestReader(HttpConfig())
    status = None
    try:
        for chunk in chunks:
            reader.feed(chunk)
    except HttpError as exc:
        status = exc.status
    made = [(r.method, r.target, r.version, r.keep_alive, r.body, r.fields)
            for r in reader.ready]
    return made, status, reader.in_message, reader.in_head


# Requests built from parts that each bend a rule somewhere (names, values,
# versions, targets, line ends, bodies), pipelined, then cut anywhere.
MESSAGE = st.tuples(
    st.sampled_from([b"GET", b"POST", b"PURGE", b"get", b"OPTIONS"]),
    st.sampled_from([b"/", b"/a?b=%20", b"*", b"http://h:1/p", b"x", b"/\xe9"]),
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0"]),
    st.lists(st.tuples(
        st.sampled_from([b"Host", b"host", b"X-A", b"x-a", b"X_B", b"Content-Length",
                         b"Transfer-Encoding", b"Connection", b"Expect", b"Cookie", b"Bad Name",
                         b"X-Forwarded-For", b"User-Agent", b""]),
        st.sampled_from([b"h", b"5", b"0", b"chunked", b"close", b"100-continue", b" a \t", b"\t",
                         b"x\x00", b"\xe9", b"", b"a, b", b"gzip, chunked", b"[::1]:80"])),
        max_size=6),
    st.sampled_from([b"", b"hello", b"3\r\nabc\r\n0\r\n\r\n", b"3\r\nabc\r\n0\r\nX-T: 1 \r\n\r\n"]),
    st.sampled_from([b"\r\n", b"\n"]))


def serialized(message):
    method, target, version, fields, body, eol = message
    return (method + b" " + target + b" " + version + eol
            + b"".join(name + b": " + value + eol for name, value in fields) + eol + body)


@settings(max_examples=400, deadline=None)
@given(st.lists(MESSAGE, min_size=1, max_size=3),
       st.lists(st.integers(min_value=0, max_value=300), max_size=4))
def test_both_bindings_make_the_same_of_any_bytes(messages, cuts):
    # Ours and httptools' drive the same llhttp: the same requests, fields,
    # bodies and refusals, however the bytes are split.
    from prefork.http import request as reader_module
    if reader_module._llhttp is None:
        pytest.skip("the httptools leg: this test runs both bindings itself")
    data = b"".join(map(serialized, messages))
    points = sorted({min(c, len(data)) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0] + points, points + [len(data)], strict=True) if data[a:b]]
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert outcome(chunks, "ours", monkeypatch) == outcome(chunks, "httptools", monkeypatch)


def test_empty_field_values_are_kept_or_counted_like_any_other():
    (request,) = feed_all([b"GET / HTTP/1.1\r\nHost: h\r\nX_Refused:\r\nX-New-Empty:\r\n"
                           b"X-Spaces:  \t \r\n\r\n"]).ready
    assert request.fields["HTTP_X_NEW_EMPTY"] == "" and request.fields["HTTP_X_SPACES"] == ""
    assert "HTTP_X_REFUSED" not in request.fields


def test_readers_fed_in_turn_keep_their_own_unfinished_heads():
    # Our binding lends one set of buffers to whichever reader is fed between
    # messages; a reader left inside a message keeps its own until it ends.
    first = RequestReader(HttpConfig())
    first.feed(b"GET /first HTTP/1.1\r\nHost: h\r\nX-Split: abc")
    second = RequestReader(HttpConfig())
    second.feed(b"POST /b HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nxyz\r\n")
    (third,) = feed_all([b"GET /third-is-longer HTTP/1.1\r\nHost: h\r\nX-Split: zzzzzzzzz\r\n\r\n"]
                        ).ready
    assert first.partial() == ("GET", "/first", "-")
    first.feed(b"def\r\n\r\n")
    second.feed(b"0\r\n\r\n")
    assert (first.ready[0].target, first.ready[0].fields["HTTP_X_SPLIT"]) == (b"/first", "abcdef")
    assert second.ready[0].body == b"xyz"
    assert (third.target, third.fields["HTTP_X_SPLIT"]) == (b"/third-is-longer", "zzzzzzzzz")


def test_trailer_fields_count_against_the_header_size_limit():
    reader = RequestReader(HttpConfig(max_header_size=200))
    reader.feed(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n")
    with pytest.raises(HeadersTooLarge):
        reader.feed(b"X-Trailer: " + b"v" * 300 + b"\r\n\r\n")
