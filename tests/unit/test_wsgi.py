"""environ construction and the start_response state machine."""
import io
import sys

import pytest

from prefork.http.errors import AppError, BadRequest
from prefork.config import HttpConfig
from prefork.http.request import RequestReader
from prefork.worker.wsgi import Response, base_environ, build_environ, split_target

# The reader is the same for both bindings of llhttp (http/request.py's core;
# test_http_request.py and the corpus run on both): these run on the one built.


def environ_for(raw: bytes) -> dict:
    base = base_environ("127.0.0.1", "8000", sys.stderr)
    reader = RequestReader(HttpConfig(), base)
    reader.feed(raw)
    return build_environ(reader.ready[0], ("10.1.2.3", "5555"))


def test_full_environ():
    env = environ_for(b"POST /a%20b/%C3%A9?x=1&y=%20 HTTP/1.1\r\nHost: example.com\r\n"
                      b"Content-Type: text/plain\r\nContent-Length: 3\r\nX-Multi: 1\r\n"
                      b"X-Multi: 2\r\nCookie: a=1\r\nCookie: b=2\r\n\r\nabc")
    assert env["REQUEST_METHOD"] == "POST"
    assert env["PATH_INFO"] == "/a b/\xc3\xa9"          # percent-decoded, latin-1
    assert env["QUERY_STRING"] == "x=1&y=%20"            # left encoded
    assert env["RAW_URI"] == "/a%20b/%C3%A9?x=1&y=%20"
    assert env["SCRIPT_NAME"] == ""
    assert env["CONTENT_TYPE"] == "text/plain" and env["CONTENT_LENGTH"] == "3"
    assert "HTTP_CONTENT_TYPE" not in env
    assert env["HTTP_HOST"] == "example.com"
    assert env["HTTP_X_MULTI"] == "1,2"
    assert env["HTTP_COOKIE"] == "a=1; b=2"
    assert env["SERVER_NAME"] == "127.0.0.1" and env["SERVER_PORT"] == "8000"
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["REMOTE_ADDR"] == "10.1.2.3" and env["REMOTE_PORT"] == "5555"
    assert env["wsgi.version"] == (1, 0) and env["wsgi.url_scheme"] == "http"
    assert env["wsgi.multiprocess"] is True and env["wsgi.multithread"] is False
    assert env["wsgi.run_once"] is False
    assert env["wsgi.input"].read() == b"abc"
    assert callable(env["wsgi.file_wrapper"])


def test_the_base_environ_is_shared_per_listener_and_has_room_for_a_request():
    from prefork.worker.wsgi import environ_template
    template = environ_template("127.0.0.1", "8000", sys.stderr)
    assert environ_template("127.0.0.1", "8000", sys.stderr) is template
    assert environ_template("127.0.0.1", "8001", sys.stderr) is not template
    assert environ_template("127.0.0.1", "8000", sys.stderr, "/mount")["SCRIPT_NAME"] == "/mount"
    # A request's copy takes twenty header fields without growing its table.
    environ = template.copy()
    size = sys.getsizeof(environ)
    environ.update((f"HTTP_X_{i}", "value") for i in range(20))
    assert sys.getsizeof(environ) == size
    assert all(type(key) is str for key in template)   # no key left from making room


def test_each_request_carries_its_own_client_address_over_the_shared_template():
    base = base_environ("127.0.0.1", "8000", sys.stderr)
    reader = RequestReader(HttpConfig(), base)
    reader.feed(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    first = build_environ(reader.ready.popleft(), ("10.0.0.1", "1111"))
    second = build_environ(reader.ready.popleft(), ("10.0.0.2", "2222"))
    assert (first["REMOTE_ADDR"], first["REMOTE_PORT"]) == ("10.0.0.1", "1111")
    assert (second["REMOTE_ADDR"], second["REMOTE_PORT"]) == ("10.0.0.2", "2222")
    assert base["REMOTE_ADDR"] == "" and base["PATH_INFO"] == ""   # the template is untouched


def test_the_shared_empty_input_survives_an_app_that_closes_it_or_writes_to_it():
    stream = environ_for(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")["wsgi.input"]
    stream.read()
    stream.close()
    with pytest.raises(io.UnsupportedOperation):
        stream.write(b"left for the next request")
    following = environ_for(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")["wsgi.input"]
    assert following is stream and following.read() == b"" and following.readline() == b""
    with_body = environ_for(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nok")
    assert with_body["wsgi.input"].read() == b"ok"


def test_underscore_headers_are_dropped_so_they_cannot_spoof_dashed_ones():
    env = environ_for(b"GET / HTTP/1.1\r\nHost: h\r\nX-User: real\r\nX_User: spoof\r\n\r\n")
    assert env["HTTP_X_USER"] == "real"


@pytest.mark.parametrize("target,expected", [
    (b"/p?q#frag", (b"/p", b"q")),
    (b"http://example.com/abs?x=1", (b"/abs", b"x=1")),
    (b"*", (b"*", b"")),
])
def test_split_target(target, expected):
    assert split_target(target) == expected


def test_authority_form_is_refused():
    with pytest.raises(BadRequest):
        split_target(b"example.com:443")


class StartResponse(Response):
    """The start_response half of an exchange, with a write() to check."""

    def __init__(self, close):
        self.close = close

    def write(self, data):
        raise AssertionError("not used")


def test_start_response_records_and_strips_hop_by_hop():
    sr = StartResponse(False)
    write = sr("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5"),
                          ("Connection", "close"), ("Transfer-Encoding", "chunked")])
    assert write == sr.write
    assert sr.status_code == 200 and sr.content_length == 5 and sr.ends_connection
    assert sr.status_line == b"HTTP/1.1 200 OK\r\n"
    assert sr.lines == b"Content-Type: text/plain\r\n"


def test_start_response_gives_the_same_answer_from_its_cache():
    headers = [("Content-Type", "text/plain"), ("Content-Length", "5")]
    first, second = StartResponse(False), StartResponse(False)
    first("200 OK", list(headers))
    second("200 OK", list(headers))
    assert (first.status_code, first.lines, first.content_length) == \
        (second.status_code, second.lines, second.content_length) == \
        (200, b"Content-Type: text/plain\r\n", 5)
    for status, headers, lines in [("404 Not Found", [("X-A", "1")], b"X-A: 1\r\n"),
                                   ("200 OK", [("X-A", "1")], b"X-A: 1\r\n"),
                                   ("200 OK", [("X-A", "2")], b"X-A: 2\r\n"),
                                   ("200 OK", [("X-A", "2")], b"X-A: 2\r\n")]:
        sr = StartResponse(False)
        sr(status, headers)   # alternating sets: the last-answer memo must not mix them up
        assert (sr.status_line[9:12], sr.lines) == (status[:3].encode(), lines)
    unhashable = StartResponse(False)
    unhashable("200 OK", [["Content-Type", "text/plain"]])
    assert unhashable.lines == b"Content-Type: text/plain\r\n"


def test_start_response_twice_without_exc_info_is_an_error():
    sr = StartResponse(False)
    sr("200 OK", [])
    with pytest.raises(AssertionError):
        sr("500 Oops", [])


def test_exc_info_replaces_status_before_headers_are_sent():
    sr = StartResponse(False)
    sr("200 OK", [])
    try:
        raise ValueError("x")
    except ValueError:
        sr("500 Internal Server Error", [], sys.exc_info())
    assert sr.status_code == 500


def test_exc_info_after_headers_sent_reraises():
    sr = StartResponse(False)
    sr("200 OK", [])
    sr.headers_sent = True
    with pytest.raises(ValueError):
        try:
            raise ValueError("x")
        except ValueError:
            sr("500 Internal Server Error", [], sys.exc_info())


@pytest.mark.parametrize("status,headers", [
    ("200 OK", [("X-Evil", "a\r\nSet-Cookie: x")]),
    ("200 OK", [("X-Evil\n", "a")]),
    ("200 OK", [("X-Nul", "a\0b")]),
    ("200 OK", [("X-Bytes", b"v")]),
    ("200 OK", [("Content-Length", "ten")]),
    ("OK", []),
    (b"200 OK", []),
    ("200 OK\r\nSet-Cookie: x", []),
    ("200 OK\n", []),
    ("200 OK", [("X-Euro", "€")]),
    ("200 OK", None),
])
def test_bad_status_or_headers_are_refused(status, headers):
    with pytest.raises(AppError):
        StartResponse(False)(status, headers)
