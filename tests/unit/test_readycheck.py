"""The ready check in-process: the request it makes up and its verdict."""
import socket

import pytest

from prefork.config import HttpConfig
from prefork.worker.readycheck import ReadyCheckFailed, run_ready_check


@pytest.fixture
def listener():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()


def answering(status, seen=None):
    def app(environ, start_response):
        if seen is not None:
            seen.append(environ)
        start_response(status, [("Content-Type", "text/plain")])
        return [b"body"]
    return app


def test_the_app_sees_a_real_get_to_the_first_listener(listener):
    seen = []
    run_ready_check(answering("200 OK", seen), "/ready?deep=1", HttpConfig(), listener, None)
    port = str(listener.getsockname()[1])
    environ = seen[0]
    assert environ["REQUEST_METHOD"] == "GET" and environ["PATH_INFO"] == "/ready"
    assert environ["QUERY_STRING"] == "deep=1" and environ["HTTP_HOST"] == f"127.0.0.1:{port}"
    assert environ["SERVER_PORT"] == port and environ["wsgi.input"].read() == b""


@pytest.mark.parametrize("status", ["200 OK", "302 Found", "404 Not Found"])
def test_below_500_passes(listener, status):
    run_ready_check(answering(status), "/", HttpConfig(), listener, None)


def test_a_5xx_fails_with_what_it_answered(listener):
    with pytest.raises(ReadyCheckFailed, match="ready_check GET /ready answered 503"):
        run_ready_check(answering("503 Service Unavailable"), "/ready", HttpConfig(), listener,
                        None)


def test_an_exception_of_the_app_propagates_and_the_result_is_closed(listener):
    closed = []

    class Result:
        def __iter__(self):
            raise ImportError("lazy view")

        def close(self):
            closed.append(True)

    def app(environ, start_response):
        start_response("200 OK", [])
        return Result()
    with pytest.raises(ImportError, match="lazy view"):
        run_ready_check(app, "/", HttpConfig(), listener, None)
    assert closed == [True]
