"""App threads in-process (worker/threads.py): a real Connection over a
socketpair, its host a FakeHost with real AppThreads. The loop is played by
the test (Driver); app threads are real threads. Every wait is bounded."""
import collections
import select
import socket
import threading
import time

import pytest

from prefork.worker.connection import Connection
from prefork.worker.exchange import ClientGone, Exchange
from prefork.worker.loop import Worker
from prefork.worker.threads import HIGH_WATER, AppThreads, Detached
from tests.unit.test_connection import FakeHost, Pair, get

# The reader is the same for both bindings of llhttp (http/request.py's core;
# test_http_request.py and the corpus run on both): these run on the one built.


class ThreadsFakeHost(FakeHost):
    """FakeHost with the ThreadsHost side, recording what AppThreads says."""

    def __init__(self, app, limit=2, **http):
        super().__init__(app, **http)
        self.threads = AppThreads(self, limit)
        self.claims = self.threads.claims
        self.offloading = True
        self.requests = 0
        self.send_timeout = self.http.send_timeout
        self.room = []
        self.seats = []
        self.led = threading.Event()

    def lead(self):
        self.led.set()

    def crashed(self):
        raise AssertionError("crashed")

    def accepting(self, room):
        self.room.append(room)

    def seat_taken(self, seat, exchange):
        self.seats.append(("taken", seat))

    def seat_freed(self, seat):
        self.seats.append(("freed", seat))

    def threads_changed(self):
        pass

    # The worker's own: they use only claims and threads.
    leave_app = Worker.leave_app
    detached = Worker.detached


def threaded(app, limit=2, **http):
    return Pair(app, host_type=lambda app, **kw: ThreadsFakeHost(app, limit, **kw), **http)


def connect(host):
    """Another connection of the same host: (connection, client)."""
    server, client = socket.socketpair()
    server.setblocking(False)
    client.settimeout(5)
    return Connection(host, server, "", ("10.0.0.2", 80)), client


def on_readable(host, conn):
    """The loop's dispatch: an offloaded request leaves the loop's thread by
    Detached, to run its call there (as AppThreads.work does at its top);
    the test's thread stays the loop, so the call goes to a thread of its own."""
    try:
        conn.on_readable()
    except Detached as step:
        threading.Thread(target=host.threads.carry_on, args=(step,), name="app").start()


def drive(host, conns, until, timeout=5.0):
    """Play the loop: socket events and the threads' mail, until until()."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "timed out"
        readers = [c.fd for c in conns if c.state != "closed"
                   and host.events.get(c.fd, select.EPOLLIN) == select.EPOLLIN]
        writers = [c.fd for c in conns if c.state != "closed"
                   and host.events.get(c.fd) == select.EPOLLOUT]
        ready_r, ready_w, _ = select.select(readers + [host.threads.wakeup_fd], writers, [], 0.05)
        if host.threads.wakeup_fd in ready_r:
            host.threads.deliver()
        for conn in conns:
            if conn.fd in ready_r:
                on_readable(host, conn)
            if conn.fd in ready_w:
                conn.on_writable()


def reply(client, size=65536):
    client.settimeout(5)
    return client.recv(size)


def test_an_offloaded_request_runs_on_an_app_thread_and_gives_its_seat_back():
    names = []

    def app(environ, start_response):
        names.append(threading.current_thread().name)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"from a thread"]
    pair = threaded(app)
    pair.client.sendall(get(b"/"))
    # The seat comes back once the thread's app code is over: maybe after the
    # loop answered from what it pushed.
    drive(pair.host, [pair.conn], lambda: pair.host.ended and len(pair.host.seats) == 2)
    assert reply(pair.client).endswith(b"\r\n\r\nfrom a thread")
    assert names == ["app"] and pair.host.seats == [("taken", 0), ("freed", 0)]
    assert pair.host.ended == [(b"/", 200, 13)] and pair.conn.idle()
    assert pair.host.events.get(pair.conn.fd, select.EPOLLIN) == select.EPOLLIN   # never out


def test_a_stream_pushes_no_further_than_the_high_water_mark_ahead_of_the_client():
    pulled = []

    def app(environ, start_response):
        start_response("200 OK", [])
        for i in range(200):
            pulled.append(i)
            yield b"z" * 65536
    pair = threaded(app)
    pair.client.sendall(get(b"/"))

    def thread_waits():
        return pair.conn.exchange is not None and pair.conn.exchange.drained is not None
    drive(pair.host, [pair.conn], thread_waits)
    # The thread waits: what it pushed and the loop has not taken stays bounded.
    exchange = pair.conn.exchange
    assert exchange.pushed - exchange.taken <= HIGH_WATER + 65536 and len(pulled) < 200
    total = 0

    def read_some():
        nonlocal total
        try:
            pair.client.settimeout(0)
            total += len(pair.client.recv(1 << 20))
        except BlockingIOError:
            pass
        return pair.host.ended and total > 200 * 65536
    drive(pair.host, [pair.conn], read_some, timeout=30)
    assert len(pulled) == 200 and pair.host.ended[0][2] == 200 * 65536


def test_with_every_seat_taken_a_request_waits_and_the_worker_stops_accepting():
    release = threading.Event()

    def app(environ, start_response):
        release.wait(5)
        start_response("200 OK", [])
        return [environ["PATH_INFO"].encode()]
    pair = threaded(app, limit=1)
    other, other_client = connect(pair.host)
    pair.client.sendall(get(b"/first"))
    other_client.sendall(get(b"/second"))
    conns = [pair.conn, other]
    drive(pair.host, conns, lambda: pair.host.threads.waits == 1)
    assert pair.host.room == [False] and pair.host.threads.busy() == 1
    release.set()
    drive(pair.host, conns, lambda: len(pair.host.ended) == 2)
    assert [t for t, _, _ in pair.host.ended] == [b"/first", b"/second"]
    assert pair.host.room == [False, True, False, True]
    assert reply(other_client).endswith(b"/second")


def test_an_inline_call_detached_by_the_sentinel_goes_on_on_its_thread():
    """The sentinel's move, made by the app itself at a known point: its
    claim taken and the detach committed; the call's return finds it out."""
    def app(environ, start_response):
        threads = pair.host.threads
        with threads.deciding:
            threads.claims.remove(start_response)   # the exchange is start_response
            threads.commit(start_response)
        start_response("200 OK", [])
        return [b"finished remote"]
    pair = threaded(app)
    pair.host.offloading = False   # inline
    pair.client.sendall(get(b"/"))
    with pytest.raises(Detached) as caught:
        pair.conn.on_readable()
    assert pair.host.offloading and pair.host.led.wait(5)   # another thread leads
    assert pair.conn.state == "app"   # parked: it reads nothing until answered
    pair.host.threads.carry_on(caught.value)   # what this thread does at its top
    drive(pair.host, [pair.conn], lambda: pair.host.ended)
    assert reply(pair.client).endswith(b"finished remote")
    assert pair.host.threads.detaches == 1 and pair.host.claims == []


def test_the_sentinel_detaches_an_inline_call_that_waits():
    def app(environ, start_response):
        deadline = time.monotonic() + 5
        while start_response.outlet is None and time.monotonic() < deadline:
            time.sleep(0.005)   # waiting, as on a database: the GIL is free
        start_response("200 OK", [])
        return [b"detached" if start_response.outlet is not None else b"not detached"]
    pair = threaded(app)
    pair.host.offloading = False
    pair.host.threads.begin()
    pair.client.sendall(get(b"/"))
    with pytest.raises(Detached) as caught:
        pair.conn.on_readable()
    pair.host.threads.carry_on(caught.value)
    drive(pair.host, [pair.conn], lambda: pair.host.ended)
    assert reply(pair.client).endswith(b"detached")


def test_an_app_thread_error_is_answered_and_logged_by_the_loop():
    def app(environ, start_response):
        raise ValueError("boom on a thread")
    pair = threaded(app)
    pair.client.sendall(get(b"/"))
    drive(pair.host, [pair.conn], lambda: pair.host.ended)
    assert reply(pair.client).startswith(b"HTTP/1.1 500 ")
    assert "boom on a thread" in pair.host.problems[0] and pair.host.ended[0][1] == 500


def test_a_closed_connection_stops_its_app_thread_and_closes_the_result():
    closed = threading.Event()
    started = threading.Event()

    class Endless:
        def __iter__(self):
            started.set()
            while True:
                yield b"w" * 65536

        def close(self):
            closed.set()

    def app(environ, start_response):
        start_response("200 OK", [])
        return Endless()
    pair = threaded(app)
    pair.client.sendall(get(b"/"))
    drive(pair.host, [pair.conn], started.is_set)
    pair.client.close()
    drive(pair.host, [pair.conn], lambda: pair.conn.state == "closed", timeout=10)
    assert closed.wait(5)
    drive(pair.host, [pair.conn], lambda: ("freed", 0) in pair.host.seats)
    assert pair.host.ended[0][1] in (200, 499)


def test_a_push_after_the_connection_ended_raises_client_gone():
    pair = threaded(hello_app)
    ex = Exchange()
    ex.inbox, ex.outlet, ex.conn = collections.deque(), pair.host.threads, pair.conn
    ex.cancel()
    with pytest.raises(ClientGone):
        pair.host.threads.push_data(ex, b"late")
    assert not ex.inbox


def hello_app(environ, start_response):
    start_response("200 OK", [])
    return [b"hello"]


def test_a_client_that_speaks_while_its_call_runs_is_left_unread_until_answered():
    release = threading.Event()

    def app(environ, start_response):
        release.wait(5)
        start_response("200 OK", [])
        return [environ["PATH_INFO"].encode()]
    pair = threaded(app)
    pair.client.sendall(get(b"/one"))
    drive(pair.host, [pair.conn], lambda: pair.conn.state == "app")
    assert pair.host.events.get(pair.conn.fd, select.EPOLLIN) == select.EPOLLIN   # no syscall
    pair.client.sendall(get(b"/two"))   # pipelined while /one runs
    drive(pair.host, [pair.conn], lambda: pair.host.events.get(pair.conn.fd) == 0)
    assert not pair.conn.reader.ready   # not read: out of the poller instead
    release.set()
    drive(pair.host, [pair.conn], lambda: len(pair.host.ended) == 2)
    assert [t for t, _, _ in pair.host.ended] == [b"/one", b"/two"]
