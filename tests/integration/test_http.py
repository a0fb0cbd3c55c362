"""HTTP/1.1 and WSGI behaviour of the real server, over real sockets."""
import os
import time

import pytest
import requests

from tests.conftest import read_until_close, shared_server, wait_for


@pytest.fixture(scope="module")
def server():
    """One server for the tests here that send requests and read answers
    (they change nothing in it); tests that need a fresh one use make_server."""
    with shared_server() as shared:
        yield shared


def parse_responses(data: bytes):
    """Split raw bytes into (status, headers dict, body) for Content-Length framed responses."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode()] = value.strip().decode()
        length = int(headers.get("content-length", "0"))
        out.append((status, headers, rest[:length]))
        data = rest[length:]
    return out


def test_requests_are_answered_by_more_than_one_worker(server):
    pids = set()

    def two_pids():
        # A fresh connection each time, so that either worker may take it.
        pids.add(requests.get(server.url + "/pid", timeout=5,
                              headers={"Connection": "close"}).text)
        return len(pids) >= 2
    wait_for(two_pids, timeout=20, interval=0, message="a second worker pid")


def test_keep_alive_reuses_one_connection(server):
    with server.connect() as sock:
        for _ in range(3):
            sock.sendall(b"GET /pid HTTP/1.1\r\nHost: t\r\n\r\n")
            status, headers, body = parse_responses(sock.recv(65536))[0]
            assert status == 200 and "connection" not in headers
        assert len(set([body])) == 1


def test_pipelined_requests_are_answered_in_order(server):
    data = b"".join(b"GET /echo?n=%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(10))
    data += b"GET /echo?n=last HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    responses = parse_responses(server.raw(data))
    assert [h["x-query"] for _, h, _ in responses] == [f"n={i}" for i in range(10)] + ["n=last"]
    assert responses[-1][1]["connection"] == "close"


def test_date_and_server_on_every_response(server):
    for path in ("/", "/missing", "/crash"):
        response = server.get(path)
        assert response.headers["Server"] == "prefork"
        assert response.headers["Date"].endswith("GMT")


def test_post_body_and_chunked_request_body(server):
    assert server.get("/echo", data=b"x" * 100000).content == b"x" * 100000

    def gen():
        yield b"chunked "
        yield b"body"
    response = requests.post(server.url + "/echo", data=gen(), timeout=10)
    assert response.content == b"chunked body"


def test_chunked_request_with_extensions_and_trailers(server):
    reply = server.raw(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
                       b"Connection: close\r\n\r\n3;ext=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"abc")


def test_expect_100_continue(server):
    with server.connect() as sock:
        sock.sendall(b"PUT /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"data")
        status, _, body = parse_responses(sock.recv(65536))[0]
        assert (status, body) == (200, b"data")


def test_response_framing_smoke(server):
    """HEAD, bodiless statuses, chunked on HTTP/1.1, close-delimited on
    HTTP/1.0, through the real server once each (the cases are the
    connection's, tests/unit/test_connection.py)."""
    reply = server.raw(b"HEAD / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert b"Content-Length: 5\r\n" in reply and reply.endswith(b"\r\n\r\n")
    for path, status in (("/204", 204), ("/304", 304)):
        reply = server.raw(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
                           .encode())
        assert reply.startswith(f"HTTP/1.1 {status}".encode())
        assert reply.endswith(b"\r\n\r\n") and b"must not be sent" not in reply
        assert b"Transfer-Encoding" not in reply
    reply = server.raw(b"GET /stream HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in reply
    assert reply.endswith(b"7\r\nchunk4\n\r\n0\r\n\r\n")
    assert server.get("/stream").text == "".join(f"chunk{i}\n" for i in range(5))
    reply = server.raw(b"GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert b"Transfer-Encoding" not in reply and b"Connection: close" in reply
    assert reply.endswith(b"chunk4\n")


def test_http10_keep_alive_on_request(server):
    with server.connect() as sock:
        sock.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, _ = parse_responses(sock.recv(65536))[0]
        assert headers["connection"] == "keep-alive"
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        reply = read_until_close(sock)
        assert reply.startswith(b"HTTP/1.1 200") and b"Connection: close" in reply


def test_app_connection_close_is_honoured(server):
    reply = server.raw(b"GET /app-close HTTP/1.1\r\nHost: t\r\n\r\n", timeout=5)
    assert b"Connection: close" in reply and reply.endswith(b"bye")


def test_legacy_write_callable(server):
    assert server.get("/write").text == "written directly and returned"


def test_exc_info_replaces_the_status(server):
    response = server.get("/exc-info")
    assert response.status_code == 503 and response.text == "retry later"


def test_large_streamed_response_arrives_whole(server):
    response = server.get("/big?3000000")
    assert len(response.content) == 3000000


def test_file_wrapper_uses_sendfile_and_sends_the_whole_file(server, tmp_path):
    path = tmp_path / "blob.bin"
    data = os.urandom(2 * 1024 * 1024 + 17)
    path.write_bytes(data)
    response = server.get(f"/file?{path}")
    assert response.headers["Content-Length"] == str(len(data))
    assert response.content == data


# -- errors -----------------------------------------------------------------------

def test_app_exception_gives_500_and_a_traceback_in_the_error_log(server):
    response = server.get("/crash")
    assert response.status_code == 500
    wait_for(lambda: "boom from the app" in server.log("error"), message="traceback in error log")
    log = server.log("error")
    assert "Traceback (most recent call last)" in log and "RuntimeError" in log
    assert server.get("/").status_code == 200   # the worker goes on


def test_exception_after_headers_cuts_the_connection(server):
    reply = server.raw(b"GET /crash-midway HTTP/1.1\r\nHost: t\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200") and not reply.endswith(b"0\r\n\r\n")
    wait_for(lambda: "boom after the headers" in server.log("error"), message="traceback")


@pytest.mark.parametrize("path", ["/returns-str", "/yields-str"])
def test_a_str_body_gives_500_and_the_worker_survives(make_server, path):
    server = make_server(workers=1)
    before = server.worker_pids()
    response = server.get(path)
    assert response.status_code == 500
    assert server.get("/").text == "hello" and server.worker_pids() == before
    wait_for(lambda: "not bytes" in server.log("error"), message="the reason in the error log")


def test_header_with_crlf_from_the_app_is_never_sent(server):
    reply = server.raw(b"GET /bad-header HTTP/1.1\r\nHost: t\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 500") and b"injected" not in reply


def test_close_is_called_even_when_iteration_fails(server, tmp_path):
    marker = tmp_path / "closed"
    server.raw(f"GET /close-called?{marker} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    wait_for(marker.exists, message="close() called")


def test_wsgi_errors_reach_the_error_log(server):
    server.get("/errors")
    wait_for(lambda: "a line written to wsgi.errors" in server.log("error"), message="wsgi.errors")


@pytest.mark.parametrize("data,status", [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: t\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(150))
     + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"v" * 40000 + b"\r\n\r\n", 431),
    (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999999\r\n\r\n", 413),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"NOT HTTP AT ALL\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
])
def test_bad_requests_get_the_right_status_and_the_worker_goes_on(server, data, status):
    reply = server.raw(data)
    assert reply.startswith(f"HTTP/1.1 {status}".encode()), reply[:100]
    assert b"Connection: close" in reply
    assert server.get("/").status_code == 200


def test_body_over_max_body_while_the_client_still_sends(make_server):
    server = make_server(extra="[http]\nmax_body = 1000\n")
    with server.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(50):
                sock.sendall(b"100\r\n" + b"x" * 256 + b"\r\n")
        except OSError:
            pass   # the server may close its side while we send; the reply still arrives
        assert read_until_close(sock).startswith(b"HTTP/1.1 413")


def test_an_incomplete_head_gets_408_and_an_idle_connection_is_closed_silently(make_server):
    server = make_server(extra="[http]\nheader_timeout = 0.5\nkeepalive_timeout = 0.5\n")
    with server.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")   # no blank line: never complete
        started = time.monotonic()
        reply = read_until_close(sock, timeout=10)
        assert reply.startswith(b"HTTP/1.1 408")
        assert time.monotonic() - started >= 0.4   # not before its time (however slow the machine)
    with server.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        assert read_until_close(sock, timeout=10) == b""   # closed after keepalive_timeout
    assert server.get("/").status_code == 200


def test_slow_client_does_not_pin_the_worker(make_server):
    """One worker; a client trickling its head must not block another client."""
    server = make_server(workers=1)
    with server.connect() as slow:
        slow.sendall(b"GET / HTTP/1.1\r\n")
        assert server.get("/").text == "hello"   # answered while the slow head is unfinished
        slow.sendall(b"Host: t\r\n\r\n")
        assert slow.recv(65536).startswith(b"HTTP/1.1 200")


def test_slow_reader_does_not_pin_the_worker(make_server):
    """One worker; a client that never reads a big response must not block others."""
    server = make_server(workers=1)
    with server.connect() as lazy:
        lazy.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_RCVBUF, 4096)
        lazy.sendall(b"GET /big?50000000 HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_for(lambda: server.status()["totals"]["connections_open"] >= 1,
                 message="the lazy connection counted")
        assert server.get("/").text == "hello"   # answered while 50 MB wait for the lazy one


def test_many_idle_connections_do_not_block_service(make_server):
    server = make_server(workers=1)
    idle = [server.connect() for _ in range(200)]
    try:
        assert server.get("/").text == "hello"
    finally:
        for sock in idle:
            sock.close()
