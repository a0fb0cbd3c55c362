"""The connection in-process: a real Connection over a socketpair, its worker
replaced by a FakeHost with a fake clock. Bytes in, bytes out, no processes."""
import os
import select
import socket
import ssl
import tempfile
import time

import pytest

from prefork.config import HttpConfig
from prefork.http.proxy import Networks
from prefork.worker.connection import HIGH_WATER, PIPELINE_TURN, Connection
from prefork.worker.wsgi import FileWrapper

# The reader is the same for both bindings of llhttp (http/request.py's core;
# test_http_request.py and the corpus run on both): these run on the one built.


class FakeHost:
    """The ConnectionHost interface, recording what the connection tells it."""

    def __init__(self, app, **http):
        self.now = 1000.0
        self.stopping = False
        self.date = "Sun, 22 Nov 2026 00:00:00 GMT"
        self.server_name = "prefork"
        self.fixed_headers = f"Server: prefork\r\nDate: {self.date}\r\n".encode()
        self.script_name = http.pop("script_name", "")
        self.trusted = Networks(http.pop("trusted", ()))
        self.proxy_protocol = http.pop("proxy_protocol", False)
        self.h2c = False
        self.http = HttpConfig(**http)
        self.spooled = []
        self.templates = None
        self.claims = []
        self.offloading = False
        self.threads = None
        self.app = app
        self.wsgi_errors = None
        self.ended, self.rejected, self.problems = [], [], []
        self.received = 0
        self.timeouts = 0
        self.events = {}
        self.forgotten = False

    def open_spool(self):
        spool = tempfile.TemporaryFile()
        self.spooled.append(spool)
        return spool

    def begin_request(self, request):
        return self.now

    def end_request(self, exchange, status, received):
        self.ended.append((exchange.target, status, exchange.sent))
        self.received += received

    def on_rejected(self, status, received, environ):
        self.rejected.append(status)
        self.rejected_environ = environ
        self.received += received

    def on_timeout(self):
        self.timeouts += 1

    def leave_app(self, exchange, kind, value):
        self.claims.remove(exchange)

    def detached(self, exchange, kind, value):
        raise AssertionError("no threads here: nothing detaches")

    def park(self, fd):
        self.events[fd] = 0

    def app_problem(self, exchange, text):
        self.problems.append(text)

    def error_page(self, status):
        return f"error {status}".encode()

    def modify(self, fd, events):
        self.events[fd] = events

    register = modify

    def closed(self, conn, received):
        self.forgotten = True
        self.received += received

    def tls_failed(self, exc):
        raise AssertionError(f"the handshake failed: {exc}")

    def tls_ready(self, template, sock):
        return dict(template, HTTPS="on")


def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [environ["PATH_INFO"].encode()]


class Pair:
    """A connection on one end of a socketpair, the client on the other; run()
    plays the worker loop: deliver readable/writable events until quiet."""

    def __init__(self, app=hello, family=socket.AF_UNIX, host_type=None, tls=None, **http):
        """tls: an SSLContext: the server end speaks TLS (TlsClient drives the other)."""
        self.host = (host_type or FakeHost)(app, **http)
        if family == socket.AF_UNIX:
            server, self.client = socket.socketpair()
        else:   # a TCP pair on loopback, for what depends on the peer's address
            with socket.create_server(("127.0.0.1", 0)) as listener:
                self.client = socket.create_connection(listener.getsockname())
                server, _ = listener.accept()
        server.setblocking(False)
        self.client.settimeout(5)
        # (a unix listener's accept() gives the peer's address as a str, "")
        peer = "" if family == socket.AF_UNIX else server.getpeername()
        if tls is not None:
            server = tls.wrap_socket(server, server_side=True, do_handshake_on_connect=False)
        self.conn = Connection(self.host, server, peer, ("10.0.0.2", 80))

    def run(self, turns=10_000):
        for _ in range(turns):
            if self.conn.state == "closed":
                return
            wanted = self.host.events.get(self.conn.fd, select.EPOLLIN)
            if wanted == select.EPOLLOUT:
                if not select.select([], [self.conn.fd], [], 0)[1]:
                    return
                self.conn.on_writable()
            else:
                if not select.select([self.conn.fd], [], [], 0)[0]:
                    return
                self.conn.on_readable()

    def send(self, data):
        self.client.sendall(data)
        self.run()

    def read_all(self):
        """What the server sent, until the connection is done with it: closed
        (end of file), or with nothing left to answer and nothing queued,
        waiting for the client (no silence is waited for)."""
        chunks = []
        self.client.setblocking(False)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            self.run()
            try:
                data = self.client.recv(1 << 20)
            except BlockingIOError:
                conn = self.conn
                done = conn.state == "closed" or (conn.exchange is None and not conn.out
                                                  and not conn.reader.ready)
                if done and not select.select([self.client], [], [], 0)[0]:
                    break
                ours = [] if conn.state == "closed" else [conn.sock]
                select.select([self.client] + ours, ours, [], 0.01)   # for either side to move
                continue
            if not data:
                break
            chunks.append(data)
        self.client.settimeout(5)
        return b"".join(chunks)


def get(path, extra=b"", version=b"1.1"):
    return b"GET " + path + b" HTTP/" + version + b"\r\nHost: x\r\n" + extra + b"\r\n"


def test_two_thousand_pipelined_requests_in_one_write_are_all_answered_in_order():
    pair = Pair()
    pair.client.setblocking(False)
    data = b"".join(get(b"/%d" % i) for i in range(2000))
    out = bytearray()
    view = memoryview(data)
    while view or len(pair.host.ended) < 2000:
        if view:
            try:
                view = view[pair.client.send(view):]
            except BlockingIOError:
                pass
        pair.run()
        try:
            out += pair.client.recv(1 << 20)
        except BlockingIOError:
            pass
    assert [t for t, _, _ in pair.host.ended] == [b"/%d" % i for i in range(2000)]
    bodies = [part.split(b"\r\n\r\n", 1)[1] for part in bytes(out).split(b"HTTP/1.1 200 OK")[1:]]
    assert [b[:len(b"/%d" % i)] for i, b in enumerate(bodies)] == [b"/%d" % i for i in range(2000)]


def test_pipelined_requests_yield_to_other_connections_after_a_turn():
    pair = Pair()
    pair.client.sendall(b"".join(get(b"/%d" % i) for i in range(PIPELINE_TURN + 5)))
    pair.conn.on_readable()
    assert len(pair.host.ended) == PIPELINE_TURN           # one turn's worth...
    assert pair.host.events[pair.conn.fd] == select.EPOLLOUT   # ...and it asks to come back
    pair.run()
    assert len(pair.host.ended) == PIPELINE_TURN + 5


def test_head_has_the_length_but_no_body():
    pair = Pair()
    pair.send(b"HEAD /abc HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    out = pair.read_all()
    assert out.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: 4\r\n" in out
    assert out.endswith(b"\r\n\r\n")


@pytest.mark.parametrize("status", ["204 No Content", "304 Not Modified"])
def test_no_body_statuses_send_no_body_and_no_length(status):
    def app(environ, start_response):
        start_response(status, [])
        return [b"ignored"]
    pair = Pair(app)
    pair.send(get(b"/", b"Connection: close\r\n"))
    out = pair.read_all()
    assert out.startswith(b"HTTP/1.1 " + status.encode()) and out.endswith(b"\r\n\r\n")
    assert b"Content-Length" not in out and b"ignored" not in out


def streaming(environ, start_response):
    start_response("200 OK", [])
    return iter([b"ab", b"", b"cde"])


def test_unknown_length_is_chunked_on_1_1_and_close_delimited_on_1_0():
    pair = Pair(streaming)
    pair.send(get(b"/"))
    out = pair.read_all()
    assert b"Transfer-Encoding: chunked" in out and out.endswith(b"2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n")
    assert pair.conn.state == "reading"   # kept alive
    pair = Pair(streaming)
    pair.send(get(b"/", version=b"1.0"))
    out = pair.read_all()
    assert b"Connection: close" in out and out.endswith(b"\r\n\r\nabcde")
    assert pair.conn.state in ("lingering", "closed")


def test_a_body_shorter_than_its_content_length_closes_the_connection():
    def short(environ, start_response):
        start_response("200 OK", [("Content-Length", "10")])
        return iter([b"12345"])
    pair = Pair(short)
    pair.send(get(b"/"))
    assert pair.read_all().endswith(b"12345")
    assert pair.conn.state in ("lingering", "closed")


def test_a_client_that_said_close_and_sent_nothing_more_is_closed_without_lingering():
    pair = Pair()
    pair.send(get(b"/a", b"Connection: close\r\n"))
    assert pair.conn.state == "closed" and pair.host.forgotten
    assert pair.read_all().endswith(b"/a")


class TlsClient:
    """A TLS client on the client end of a Pair whose server end speaks TLS:
    an SSLObject over memory, so that what it sends, and when, is ours to
    say (a close_notify right after a request, as wrk sends it)."""

    def __init__(self, pair, ca):
        context = ssl.create_default_context()
        ca.configure_trust(context)
        self.pair, self.incoming, self.outgoing = pair, ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.pair.client.setblocking(False)
        for _ in range(20):
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.flush()
        self.flush()   # its Finished

    def flush(self):
        """Send what the client wrote; let the server act; take its answer."""
        self.pair.send(self.outgoing.read())
        self.pair.run()
        try:
            self.incoming.write(self.pair.client.recv(1 << 20))
        except BlockingIOError:
            pass

    def read(self):
        data = b""
        while True:
            try:
                data += self.tls.read()
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                return data


@pytest.mark.parametrize("after,state", [("close_notify", "closed"), ("bytes", "lingering")])
def test_a_tls_client_that_said_close_and_sent_its_close_notify_is_closed_at_once(
        tmp_path, after, state):
    """The close_notify waits in the kernel, unread, when the response is
    out: it is read, and as the client's last word it is no reason to
    linger. Application bytes after the request still are."""
    trustme = pytest.importorskip("trustme")
    from prefork.config import TlsConfig
    from prefork.tls import server_context
    ca = trustme.CA()
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "both.pem"))
    pair = Pair(tls=server_context(TlsConfig(certfile=str(tmp_path / "both.pem"))))
    tls = TlsClient(pair, ca)
    assert pair.conn.state == "reading"
    tls.tls.write(get(b"/a", b"Connection: close\r\n"))
    if after == "close_notify":
        with pytest.raises(ssl.SSLWantReadError):
            tls.tls.unwrap()   # sends close_notify, then would wait for ours
    else:
        tls.tls.write(b"GET /b HTTP/1.1\r\n")
    tls.flush()
    assert pair.conn.state == state
    assert tls.read().endswith(b"/a")


class PeekingHost(FakeHost):
    """Records, at each request's end, what its client could read by then."""
    client = None

    def end_request(self, exchange, status, received):
        readable = select.select([self.client], [], [], 0)[0]
        self.seen.append(self.client.recv(65536, socket.MSG_PEEK) if readable else b"")
        super().end_request(exchange, status, received)


def chunked_abcd(environ, start_response):
    start_response("200 OK", [])
    return iter([b"ab", b"cd"])


@pytest.mark.parametrize("app,last", [(hello, b"/a"), (chunked_abcd, b"0\r\n\r\n")])
def test_a_response_is_counted_and_logged_before_the_bytes_that_complete_it(app, last):
    """A worker killed (the OOM killer, the watchdog) just after its client
    got the whole answer must not take that answer's log line and count
    with it: the exchange ends before the bytes that complete the response
    are sent (a whole body; a chunked one's last chunk)."""
    pair = Pair(app, host_type=PeekingHost)
    pair.host.client, pair.host.seen = pair.client, []
    pair.send(get(b"/a"))
    out = pair.read_all()
    assert out.endswith(last)
    [seen] = pair.host.seen
    assert out.startswith(seen) and len(seen) < len(out)


def test_a_close_with_anything_unread_lingers():
    """Bytes after a Connection: close request (a client that pipelined
    anyway), and a close the app decided (the client may be sending):
    the socket is shut for writing and read until the client closes, so
    that what it sends does not turn our response into a reset."""
    pair = Pair()
    pair.send(get(b"/a", b"Connection: close\r\n") + b"GET /b HTTP/1.1\r\nHost: x\r\n")
    assert pair.conn.state == "lingering"
    def closing(environ, start_response):
        start_response("200 OK", [("Connection", "close")])
        return [b"/a"]
    pair = Pair(closing)
    pair.send(get(b"/a"))
    assert pair.conn.state == "lingering"
    pair.client.shutdown(socket.SHUT_WR)
    assert pair.read_all().endswith(b"/a")
    assert pair.conn.state == "closed"


def test_a_body_longer_than_its_content_length_is_truncated():
    def long(environ, start_response):
        start_response("200 OK", [("Content-Length", "3")])
        return iter([b"12", b"345"])
    pair = Pair(long)
    pair.send(get(b"/a") + get(b"/b"))
    out = pair.read_all()
    assert out.count(b"\r\n\r\n123") == 2 and b"45" not in out


@pytest.mark.parametrize("result", [None, 42, object()])
def test_an_app_returning_a_non_iterable_gets_500_and_the_connection_is_answered(result):
    def bad(environ, start_response):
        start_response("200 OK", [])
        return result
    pair = Pair(bad)
    pair.send(get(b"/"))
    assert pair.read_all().startswith(b"HTTP/1.1 500 ")
    assert pair.host.ended[0][1] == 500 and "not an iterable" in pair.host.problems[0]
    assert pair.host.ended[0][2] == len(b"error 500")   # the error page's body, as sent


def test_a_str_chunk_after_nothing_was_sent_still_gets_an_error_page():
    def bad(environ, start_response):
        start_response("200 OK", [])
        return iter(["text"])
    pair = Pair(bad)
    pair.send(get(b"/"))
    assert pair.read_all().startswith(b"HTTP/1.1 500 ")


def test_a_slow_reader_pauses_the_iterator_at_the_high_water_mark():
    pulled = []

    def big(environ, start_response):
        start_response("200 OK", [])
        for i in range(200):
            pulled.append(i)
            yield b"x" * 65536
    pair = Pair(big)
    pair.client.sendall(get(b"/"))
    pair.run()
    # The client reads nothing: what was pulled is bounded by the kernel's
    # buffers plus HIGH_WATER, nowhere near the 200 chunks.
    assert len(pulled) < 200 and pair.conn.out_size <= HIGH_WATER + 65536 + 100
    assert pair.host.events[pair.conn.fd] == select.EPOLLOUT
    total = len(pair.read_all())
    assert len(pulled) == 200 and total > 200 * 65536


def test_write_callable_output_comes_before_the_iterable():
    def writer(environ, start_response):
        write = start_response("200 OK", [("Content-Length", "6")])
        write(b"abc")
        return [b"def"]
    pair = Pair(writer)
    pair.send(get(b"/", b"Connection: close\r\n"))
    assert pair.read_all().endswith(b"\r\n\r\nabcdef")


def test_write_blocks_at_most_send_timeout_in_all_for_a_client_that_never_reads():
    def writer(environ, start_response):
        write = start_response("200 OK", [])
        while True:
            write(b"x" * 65536)
    pair = Pair(writer, send_timeout=0.3)
    pair.client.sendall(get(b"/"))
    pair.run()   # returns: the write() gave up, the connection is cut
    assert pair.conn.state == "closed"


def test_a_file_wrapper_is_sent_with_sendfile(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"0123456789" * 1000)

    def files(environ, start_response):
        start_response("200 OK", [])
        return environ["wsgi.file_wrapper"](open(path, "rb"))
    pair = Pair(files)
    pair.send(get(b"/", b"Connection: close\r\n"))
    out = pair.read_all()
    assert b"Content-Length: 10000\r\n" in out and out.endswith(b"0123456789" * 1000)
    assert pair.host.ended[0][2] == 10000
    assert isinstance(FileWrapper(open(path, "rb")).fileno(), int)


def test_an_incomplete_head_gets_408_at_its_deadline_and_silence_gets_nothing():
    pair = Pair(header_timeout=5.0)
    pair.send(b"GET / HTTP/1.1\r\nHost")
    pair.host.now += 5.0
    assert pair.conn.deadline <= pair.host.now
    pair.conn.on_deadline()
    assert pair.read_all().startswith(b"HTTP/1.1 408 ") and pair.host.rejected == [408]
    quiet = Pair()
    quiet.conn.on_deadline()
    assert quiet.read_all() == b"" and quiet.host.rejected == []


def test_idle_keep_alive_deadline_follows_the_response():
    pair = Pair(keepalive_timeout=7.0)
    pair.send(get(b"/"))
    pair.read_all()
    assert pair.conn.idle() and pair.conn.deadline == pair.host.now + 7.0


def test_a_graceful_stop_answers_with_connection_close():
    pair = Pair()
    pair.host.stopping = True
    pair.send(get(b"/"))
    assert b"Connection: close" in pair.read_all()


def test_a_malformed_request_gets_400_and_counts_its_bytes():
    pair = Pair()
    pair.send(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
    assert pair.read_all().startswith(b"HTTP/1.1 400 ")
    assert pair.host.rejected == [400] and pair.host.received > 0


def test_100_continue_is_sent_before_the_body_is_read():
    def echo(environ, start_response):
        start_response("200 OK", [])
        return [environ["wsgi.input"].read()]
    pair = Pair(echo)
    pair.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    assert pair.read_all() == b"HTTP/1.1 100 Continue\r\n\r\n"
    pair.send(b"hello")
    assert pair.read_all().endswith(b"\r\n\r\nhello")


def test_the_spool_of_an_aborted_upload_is_closed_with_its_connection():
    pair = Pair(spool_threshold=100)
    pair.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 5000)
    assert len(pair.host.spooled) == 1 and not pair.host.spooled[0].closed
    pair.client.close()   # the client gives up mid-body
    pair.run()
    assert pair.conn.state == "closed" and pair.host.spooled[0].closed


def test_spools_of_pipelined_requests_left_unanswered_are_closed_too():
    def never(environ, start_response):
        raise AssertionError("not reached")
    pair = Pair(never, spool_threshold=10)
    body = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n" + b"y" * 50
    pair.conn.reader.feed(body + body)
    assert len(pair.host.spooled) == 2
    pair.conn.close()
    assert all(spool.closed for spool in pair.host.spooled)
    assert os.fstat(pair.client.fileno())   # the client's end is untouched


def test_a_body_sent_below_min_rate_is_cut_with_408_before_body_timeout():
    pair = Pair(min_rate=100, rate_grace=1.0, body_timeout=30.0)
    began = pair.host.now
    pair.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n\r\n0123456789")
    assert pair.conn.deadline < began + 2.0   # grace + what it sent / min_rate, not 30 s
    pair.host.now = pair.conn.deadline
    pair.conn.on_deadline()
    assert pair.read_all().startswith(b"HTTP/1.1 408 ") and pair.host.rejected == [408]


def test_a_reader_below_min_rate_is_cut_though_it_reads_a_little():
    def big(environ, start_response):
        start_response("200 OK", [])
        return [b"x" * (4 << 20)]
    pair = Pair(big, min_rate=1000, rate_grace=2.0, send_timeout=30.0)
    pair.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    pair.send(get(b"/"))
    assert pair.conn.state == "writing" and pair.conn.deadline < pair.host.now + 30
    pair.client.recv(100)   # a little progress, far below the rate
    pair.host.now += 1.0
    pair.conn.on_writable()
    pair.host.now = pair.conn.deadline
    pair.conn.on_deadline()
    assert pair.conn.state == "closed" and pair.host.timeouts == 1


def test_min_rate_0_leaves_only_the_timeouts():
    pair = Pair(min_rate=0, body_timeout=30.0)
    pair.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n\r\n0123456789")
    assert pair.conn.deadline == pair.host.now + 30.0


def test_how_gladly_a_connection_makes_room():
    idle = Pair()
    idle.send(get(b"/"))
    idle.read_all()
    arriving = Pair()
    arriving.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
    arriving.host.now += 2
    assert idle.conn.evictable(idle.host.now)[0] == 1
    assert arriving.conn.evictable(arriving.host.now)[0] == 2
    seen = []

    def held(environ, start_response):   # its request in the app: never chosen
        seen.append(pair.conn.evictable(pair.host.now))
        start_response("200 OK", [])
        return [b""]
    pair = Pair(held)
    pair.send(get(b"/"))
    assert seen == [None] and pair.host.ended
