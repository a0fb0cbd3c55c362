"""The HTTP edge as a corpus: raw bytes in, the answer out, through a real
Connection and RequestReader (RFC 9110 / 9112 cases, h11's and other servers'
corpora). Each case names the rule it checks."""
import json

import pytest

from tests.unit.test_connection import Pair

# Each test here runs on both bindings of llhttp (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("llhttp_binding")


def echo_environ(environ, start_response):
    keys = ("REQUEST_METHOD", "PATH_INFO", "SCRIPT_NAME", "SERVER_PROTOCOL", "HTTP_HOST",
            "HTTP_X_TEST", "CONTENT_LENGTH", "CONTENT_TYPE", "REMOTE_ADDR", "wsgi.input_terminated")
    seen = {k: environ.get(k) for k in keys}
    seen["body"] = environ["wsgi.input"].read().decode("latin-1")
    body = json.dumps(seen).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


def exchange(data, **settings):
    """-> (status codes in order, environs the app saw, the pair)"""
    pair = Pair(echo_environ, **settings)
    pair.send(data)
    out = pair.read_all()
    statuses = [int(part[:3]) for part in out.split(b"HTTP/1.1 ")[1:]]
    seen = [json.loads(part.rsplit(b"\r\n\r\n", 1)[1]) for part in out.split(b"HTTP/1.1 200 OK")[1:]
            if part.rsplit(b"\r\n\r\n", 1)[1].startswith(b"{")]
    return statuses, seen, pair


CORPUS = [
    # (rule, request bytes, expected statuses)
    ("versions: 1.0 served", b"GET / HTTP/1.0\r\n\r\n", [200]),
    ("versions: 1.1 served", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", [200]),
    ("versions: a higher 1.x minor is served as 1.1", b"GET / HTTP/1.2\r\nHost: x\r\n\r\n", [200]),
    ("versions: major 2 gets 505", b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", [505]),
    ("versions: major 3 gets 505", b"GET / HTTP/3.0\r\nHost: x\r\n\r\n", [505]),
    ("Host: a space is not an authority", b"GET / HTTP/1.1\r\nHost: exa mple.com\r\n\r\n", [400]),
    ("Host: a path is not an authority", b"GET / HTTP/1.1\r\nHost: a/b@c\r\n\r\n", [400]),
    ("Host: an IP literal with a port", b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n", [200]),
    ("methods: an unknown token is 501", b"BREW / HTTP/1.1\r\nHost: x\r\n\r\n", [501]),
    ("methods: a token may start with -", b"-BLARGH / HTTP/1.1\r\nHost: x\r\n\r\n", [501]),
    ("methods: WebDAV reaches the app", b"PROPFIND / HTTP/1.1\r\nHost: x\r\n\r\n", [200]),
    ("targets: * is for OPTIONS only", b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", [400]),
    ("targets: an absolute target with an IPv6 literal (RFC 9112 3.2.2)",
     b"GET http://[::1]:8080/foo HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n", [200]),
    ("targets: userinfo is not allowed in http URIs (RFC 9110 4.2.4)",
     b"GET http://user:pass@example.com:8080/foo HTTP/1.1\r\nHost: example.com\r\n\r\n",
     [400]),
    ("framing: Transfer-Encoding in HTTP/1.0 is faulty",
     b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", [400]),
    ("framing: a coding before chunked is not implemented",
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", [501]),
    ("framing: an unknown coding before chunked too",
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: foo, chunked\r\n\r\n0\r\n\r\n", [501]),
    ("fields: two Content-Type", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: a/b\r\n"
                                 b"Content-Type: c/d\r\nContent-Length: 0\r\n\r\n", [400]),
    ("pipelining: valid requests are answered before the bad one",
     b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nBad\r\n\r\n",
     [200, 200, 400]),
    ("pipelining: after Connection: close, answer and close",
     b"GET /1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n",
     [200]),
    ("pipelining: HTTP/1.0 without keep-alive closes after its answer",
     b"GET /1 HTTP/1.0\r\n\r\nGET /2 HTTP/1.0\r\n\r\n", [200]),
]


@pytest.mark.parametrize("rule,data,expected", CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus(rule, data, expected):
    statuses, _, _ = exchange(data)
    assert statuses == expected, rule


def test_whitespace_around_a_field_value_is_not_part_of_it():
    _, seen, _ = exchange(b"GET / HTTP/1.1\r\nHost: x\r\nX-Test: \t abc \t \r\n\r\n")
    assert seen[0]["HTTP_X_TEST"] == "abc"


def test_a_higher_minor_version_is_served_as_1_1():
    _, seen, _ = exchange(b"GET / HTTP/1.2\r\nHost: x\r\n\r\n")
    assert seen[0]["SERVER_PROTOCOL"] == "HTTP/1.1"


def test_an_absolute_target_names_the_host_with_its_port():
    _, seen, _ = exchange(b"GET http://real.example:81/p?q HTTP/1.1\r\nHost: other\r\n\r\n")
    assert seen[0]["HTTP_HOST"] == "real.example:81" and seen[0]["PATH_INFO"] == "/p"
    _, seen, _ = exchange(b"GET http://[::1]:8080/foo HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n")
    assert seen[0]["HTTP_HOST"] == "[::1]:8080" and seen[0]["PATH_INFO"] == "/foo"


def test_options_star_is_answered_by_the_server():
    pair = Pair(echo_environ)
    pair.send(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n")
    out = pair.read_all()
    assert out.startswith(b"HTTP/1.1 200 OK") and b"Allow: " in out and b"PATH_INFO" not in out


def test_a_chunked_body_gets_its_real_length_and_input_is_terminated():
    _, seen, _ = exchange(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    assert seen[0]["CONTENT_LENGTH"] == "11" and seen[0]["body"] == "hello world"
    assert seen[0]["wsgi.input_terminated"] is True


def test_a_spooled_chunked_body_gets_its_real_length_too():
    chunks = b"".join(b"%x\r\n%s\r\n" % (1000, b"x" * 1000) for _ in range(5))
    _, seen, _ = exchange(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                          + chunks + b"0\r\n\r\n", spool_threshold=100)
    assert seen[0]["CONTENT_LENGTH"] == "5000" and len(seen[0]["body"]) == 5000


def test_a_mount_prefix_becomes_script_name():
    _, seen, _ = exchange(b"GET /app/users/1 HTTP/1.1\r\nHost: x\r\n\r\n", script_name="/app")
    assert (seen[0]["SCRIPT_NAME"], seen[0]["PATH_INFO"]) == ("/app", "/users/1")


def test_a_rejected_request_reaches_the_access_log_with_what_was_read():
    _, _, pair = exchange(b"GET /where HTTP/1.1\r\nBad Header\r\n\r\n")
    environ = pair.host.rejected_environ
    assert pair.host.rejected == [400]
    assert (environ["REQUEST_METHOD"], environ["RAW_URI"]) == ("GET", "/where")
    assert environ["REMOTE_ADDR"] == ""   # a socketpair is a unix socket: no address is made up


def test_an_upgrade_we_do_not_make_leaves_the_request_an_http_one(llhttp_binding):
    """RFC 9110 7.8: a server may ignore Upgrade; then the body is read as
    usual and what follows is HTTP again. httptools' binding skips such a
    body, so there the request is refused rather than answered without it."""
    statuses, seen, _ = exchange(b"POST / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                                 b"Upgrade: websocket\r\nContent-Length: 5\r\n\r\nhello"
                                 b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    if llhttp_binding == "ours":
        assert statuses == [200, 200] and seen[0]["body"] == "hello"
        assert seen[1]["PATH_INFO"] == "/next"
    else:
        assert statuses == [501]
    statuses, seen, _ = exchange(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                                 b"Upgrade: websocket\r\n\r\n")
    assert statuses == [200]   # without a body, both answer it
