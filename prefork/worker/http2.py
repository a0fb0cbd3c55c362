"""One HTTP/2 connection inside a worker: its streams served at once.

Owns: the connection's socket work (reads, the output queue, back-pressure),
its streams being answered (a Stream per request: its exchange and the body
bytes flow control holds back), the connection's one deadline (output
stalled, a stream starved of window, a body arriving too slowly, idle), and
its end (a graceful GOAWAY, then the close once in-flight streams are done).
The protocol is the session's (http/http2.py: nghttp2); this module only moves
its bytes and answers the requests it gives.
Must not: accept, touch other connections, or reach into the worker: what
it needs from it is the Http2Host interface below.

The requests of one read run in turn inline on the loop's thread, claimed
as HTTP/1.1's are; one that runs long is detached to an app thread
(threads.py), and while the worker offloads each goes to one
(AppThreads.offload), so one slow stream never holds back the others on
its connection. A remote stream's events come back through the exchange's
inbox (worker/exchange.py) to Stream.on_mail. A stream whose client stops reading it waits for window;
one past send_timeout is reset. A client that stops reading the whole
connection stops it reading (HIGH_WATER), as in HTTP/1.1, and app threads
pushing past HIGH_WATER wait, at most send_timeout.
"""
from __future__ import annotations

import collections
import os
import select
import socket
import ssl
from typing import Any, Protocol

from ..http.errors import AppError, HttpError, RequestTimeout
from ..http.http2 import (CANCEL, INTERNAL_ERROR, NO_ERROR, REFUSED_STREAM, Http2Session,
                          StreamGone)
from .connection import (HIGH_WATER, LINGER_SECONDS, NEVER, WOULD_BLOCK, ConnectionHost,
                         believe_forwarding, server_options)
from .exchange import (DATA, END, ERROR, FILE, PROBLEM, WHOLE, ClientGone, Exchange,
                       call_claimed, next_claimed)
from .threads import sendable
from .wsgi import FileWrapper, build_environ

EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
RECV_SIZE = 65536
FILE_BLOCK = 65536
OPEN, LINGERING, CLOSED = "h2", "lingering", "closed"


class Http2Host(ConnectionHost, Protocol):
    """What an HTTP/2 connection needs from its worker beyond a connection's."""
    http2: Any                 # [http2] settings: the session's limits, max_worker_streams
    http2_streams: int         # streams being answered in the worker, all connections
    fixed_fields: list         # the server and date fields, refreshed each second

    def http2_opened(self) -> None: ...
    def http2_closed(self) -> None: ...
    def http2_stream(self, began: bool) -> None: ...
    def http2_resets(self, count: int) -> None: ...
    def http2_goaway(self, reason: str) -> None: ...


class StreamExchange(Exchange):
    """A stream's request and response: an Exchange whose request came in
    HEADERS and DATA frames (the session fills it)."""
    stream_id = 0
    version = "2"
    body_size = 0
    chunks = None


class Stream:
    """What answers one stream's exchange: for the app threads it is the
    exchange's connection (exchange, park, on_mail); it holds the body bytes
    the flow-control window holds back."""
    __slots__ = ("conn", "id", "exchange", "pending", "finished", "file", "starved_since")

    def __init__(self, conn, exchange):
        self.conn = conn
        self.id = exchange.stream_id
        self.exchange = exchange
        self.pending = collections.deque()   # body bytes for DATA frames, in order
        self.finished = False                # the body is complete: END_STREAM after pending
        self.file = None                     # [fd, offset, remaining] of a file being sent
        self.starved_since = 0.0             # waiting for window since (0: not waiting)

    def park(self):
        """Its app code went to an app thread: the connection reads on (other
        streams go on meanwhile)."""

    def write(self, data):
        """PEP 3333 write() of an inline call (a remote one pushes)."""
        return self.conn.write(self, data)

    def on_mail(self):
        self.conn.on_mail(self)


class Http2Connection:
    def __init__(self, host: Http2Host, sock, remote, template, believed):
        self.host = host
        self.sock = sock
        self.fd = sock.fileno()
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.remote = remote
        self.believed = believed
        self.session = Http2Session(host.http, host.http2, template, StreamExchange,
                                    host.open_spool)
        self.streams: dict = {}
        self.starved: dict = {}        # streams waiting for flow-control window
        self.backlogged: dict = {}     # streams with more to send once the output drains
        self.out: list = []
        self.out_size = 0
        self.events = EPOLLIN          # as the worker registered it
        self.state = OPEN
        self.closing = False           # GOAWAY sent or received: close once streams are done
        self.received = 0
        self.last_input = self.progress_at = host.now
        self.deadline = host.now + host.http.keepalive_timeout
        host.http2_opened()

    def start(self, data: bytes) -> None:
        """The first bytes (the preface, in cleartext), or none yet (TLS)."""
        if data:
            self.received += len(data)
            self.session.receive(data)
        self.after_input()

    # -- events from the worker loop ---------------------------------------------
    def on_readable(self):
        if self.state != OPEN:
            if self.state == LINGERING:
                self.drop_input()
            return
        if self.read():
            self.after_input()

    def drop_input(self):
        try:
            if not self.sock.recv(RECV_SIZE):
                self.close()
        except WOULD_BLOCK:
            pass
        except OSError:
            self.close()

    def read(self) -> bool:
        """One recv into the session: -> False when the connection ended."""
        try:
            data = self.sock.recv(RECV_SIZE)
        except WOULD_BLOCK:
            return True
        except OSError:
            self.close()
            return False
        if not data:
            self.close()
            return False
        self.received += len(data)
        self.last_input = self.host.now
        self.session.receive(data)
        return self.state == OPEN

    def on_writable(self):
        """Output may go on; so may starved streams, requests not yet served,
        and (level-triggered: a read that finds nothing costs one call) input."""
        if self.state != OPEN:
            return
        try:
            self.flush()
        except ClientGone:
            return self.close()
        if self.state != OPEN:
            return
        if self.events & EPOLLIN and not self.read():
            return
        self.after_input()

    def after_input(self):
        """What the session made of the bytes: resets, refusals, the end, then
        the new requests (last: serving one may hand the loop over)."""
        session = self.session
        if session.resets:
            self.host.http2_resets(session.resets)
            session.resets = 0
        for stream_id in session.cancelled:
            stream = self.streams.get(stream_id)
            if stream is not None:
                self.end_exchange(stream, 499)
        session.cancelled.clear()
        for stream_id, exc in session.refused:
            self.refuse(stream_id, exc)
        session.refused.clear()
        if session.failed:
            self.host.http2_goaway(session.failed)
            self.closing = True
            self.push_output()
            return self.close_when_done(now=True)
        if session.peer_closed:
            # The client's GOAWAY: it is done with the connection (clients send
            # it as they leave), so there is nothing to finish or linger for (a
            # lingering connection would also count against this worker's fair
            # share of the client's next connections).
            return self.close()
        if (session.widened and self.starved or self.backlogged) \
                and self.out_size < HIGH_WATER:
            session.widened = False
            for stream in list(self.starved.values()) + list(self.backlogged.values()):
                self.pump(stream)
        self.settle()        # (a request served below may hand the loop over)
        self.serve_ready()
        self.push_output()
        self.settle()
        self.settle_events()

    def serve_ready(self):
        session = self.session
        host = self.host
        while session.ready and self.state == OPEN:
            ex = session.ready.popleft()
            if host.http2_streams >= host.http2.max_worker_streams:
                session.reset(ex.stream_id, REFUSED_STREAM)   # the client may retry it
                session.close_body(ex)
                continue
            stream = self.streams[ex.stream_id] = Stream(self, ex)
            host.http2_stream(True)
            self.begin(stream)

    def begin(self, stream):
        host = self.host
        ex = stream.exchange
        ex.conn = stream
        ex.started = host.begin_request(ex)
        try:
            environ = ex.environ = build_environ(ex, self.remote)
            if self.believed:
                believe_forwarding(environ, host.trusted)
        except HttpError as exc:
            return self.fail(stream, exc)
        app = host.app if ex.target != b"*" else server_options
        self.before_app()
        if host.offloading:
            # A seat free: this thread runs the call and hands the loop over
            # (threads.Detached unwinds these frames); else the stream waits.
            return host.threads.offload(stream, ex, app)
        # Inline, claimed as an HTTP/1.1 request's call is: one that runs long
        # is detached by the sentinel (threads.py) and goes on as a remote one.
        try:
            result = call_claimed(host, ex, app)
        except HttpError as exc:
            return self.fail(stream, exc)
        try:
            if type(result) is list or type(result) is tuple:
                self.whole(stream, result)
            elif isinstance(result, FileWrapper) and sendable(result):
                self.open_file(stream, result)
            else:
                ex.take_iterable(result)
        except AppError as exc:
            return self.fail(stream, exc)
        except StreamGone:
            return self.end_exchange(stream, 499)
        self.pump(stream)
        self.queue_output()

    def before_app(self):
        """App code is about to run on the loop's thread, which a detach (or
        an offload) may take away: what is framed goes out now, and work
        left for later (requests not yet served, streams waiting for window)
        is marked for the next leader (EPOLLOUT fires at its first poll)."""
        self.queue_output()
        if self.out or self.session.ready or self.starved:
            self.want(self.events | EPOLLOUT)

    # -- a stream's answer ---------------------------------------------------------
    def on_mail(self, stream):
        """Its exchange pushed events (the loop, from threads.deliver)."""
        if stream.exchange.gave_up:   # its thread waited send_timeout for window or socket
            self.host.on_timeout()
            return self.reset(stream, CANCEL, 499)
        self.pump(stream)
        self.push_output()
        self.settle()

    def pump(self, stream):
        """Move the stream's response on: pending bytes as the window allows,
        then its app thread's events, while the output has room."""
        if stream.exchange is None:
            return
        try:
            self.move(stream)
        except StreamGone:   # the client reset it meanwhile
            self.end_exchange(stream, 499)

    def move(self, stream):
        ex = stream.exchange
        self.backlogged.pop(stream.id, None)
        while True:
            if self.out_size >= HIGH_WATER:
                self.backlogged[stream.id] = stream   # on when flush makes room
                return
            if stream.pending or stream.finished:
                if not self.send_pending(stream):
                    return   # starved of window, or done
                continue
            if stream.file is not None:
                if not self.read_file(stream):
                    return
                continue
            inbox = ex.inbox
            if inbox is None:   # inline: the loop pulls the app's iterator itself
                if ex.iterator is None:
                    return
                self.before_app()
                try:
                    data = next_claimed(self.host, ex)
                except StopIteration:
                    self.head(stream)
                    if stream.exchange is None:
                        return   # a response without a body: ended with its head
                    stream.finished = True
                    continue
                except AppError as exc:
                    return self.fail(stream, exc)
                try:
                    self.body(stream, data)
                except AppError as exc:
                    return self.fail(stream, exc)
                if stream.exchange is None:
                    return
                continue
            if not inbox:
                return   # the app thread has not said more yet
            kind, value = inbox.popleft()
            try:
                if kind is DATA:
                    ex.took(len(value))
                    self.body(stream, value)
                elif kind is WHOLE:
                    self.whole(stream, value)
                elif kind is FILE:
                    self.open_file(stream, value)
                elif kind is END:
                    self.head(stream)
                    stream.finished = True
                elif kind is ERROR:
                    return self.fail(stream, value)
                elif kind is PROBLEM:
                    self.host.app_problem(ex, value)
            except AppError as exc:
                return self.fail(stream, exc)
            if stream.exchange is None:
                return

    def write(self, stream, data):
        """PEP 3333 write() of an inline call: framed now; past HIGH_WATER of
        bytes the client has not taken, the call detaches (it goes on as an
        app thread's, whose pushes wait) and another thread leads."""
        ex = stream.exchange
        if ex is None or ex.status is None:
            raise AssertionError("write() called before start_response")
        host = self.host
        try:
            host.claims.remove(ex)   # out of app code while the connection works
        except ValueError:           # detached meanwhile: remote from here
            host.threads.settle()
            return ex.write(data)
        try:
            self.body(stream, data)
            self.move(stream)
        except StreamGone:
            raise ClientGone() from None
        self.push_output()
        if stream.exchange is None:
            raise ClientGone()
        if self.out_size + sum(map(len, stream.pending)) >= HIGH_WATER:
            return host.threads.detach_self(ex)
        host.claims.append(ex)

    def head(self, stream):
        """HEADERS, once: end_stream when no body may follow."""
        ex = stream.exchange
        if ex.headers_sent:
            return
        fields = ex.h2_fields(self.host.fixed_fields)
        if not ex.body_ok:
            self.session.respond(stream.id, fields, True)
            self.finish(stream)
        else:
            self.session.respond(stream.id, fields, False)

    def body(self, stream, data):
        ex = stream.exchange
        if not ex.headers_sent:   # the head first; a bad chunk still gets an error page
            if type(data) is not bytes and not isinstance(data, (bytearray, memoryview)):
                raise AppError(f"app gave a body chunk of type {type(data).__name__}, not bytes")
            self.head(stream)
            if stream.exchange is None:
                return
        data = ex.chunk(data)
        if data:
            stream.pending.append(data)
        if ex.remaining == 0:
            stream.finished = True   # the declared length is reached: the rest is dropped

    def whole(self, stream, parts):
        ex = stream.exchange
        try:
            body = parts[0] if len(parts) == 1 else b"".join(parts)
        except TypeError:
            raise AppError("app returned a body item that is not bytes") from None
        if type(body) is not bytes:
            body = bytes(body)
        if not ex.headers_sent and ex.content_length is None:
            ex.content_length = len(body)
        self.body(stream, body)
        if stream.exchange is not None:
            stream.finished = True

    def open_file(self, stream, wrapper):
        """A wsgi.file_wrapper of a regular file: read here as the window
        allows (sendfile cannot frame DATA)."""
        ex = stream.exchange
        ex.result = wrapper   # closed when the stream ends
        extent = ex.file_extent(wrapper)
        if extent is None:
            raise AppError("the file to send could not be read")
        self.head(stream)
        if stream.exchange is not None:
            stream.file = extent

    def read_file(self, stream) -> bool:
        fd, offset, remaining = stream.file
        if remaining <= 0:
            stream.file = None
            stream.finished = True
            return True
        try:
            data = os.pread(fd, min(remaining, FILE_BLOCK, max(self.session.room(stream.id), 1)),
                            offset)
        except OSError:
            data = b""
        if not data:   # the file shrank under us: the length is broken
            self.reset(stream, INTERNAL_ERROR, stream.exchange.status_code)
            return False
        stream.file[1] += len(data)
        stream.file[2] -= len(data)
        stream.exchange.count_sent(len(data))
        stream.pending.append(data)
        return True

    def send_pending(self, stream) -> bool:
        """Pending bytes into DATA frames as far as the window allows, with
        END_STREAM on the last; -> True if the stream may go on."""
        session = self.session
        pending = stream.pending
        room = session.room(stream.id)
        while pending and room > 0:
            data = pending[0]
            last = stream.finished and len(pending) == 1
            if len(data) <= room:
                pending.popleft()
                session.send(stream.id, data, last)
                room -= len(data)
                if last:
                    return self.finish(stream)
            else:
                session.send(stream.id, memoryview(data)[:room])
                pending[0] = memoryview(data)[room:]
                room = 0
        if pending:
            if not stream.starved_since:
                stream.starved_since = self.host.now
                self.starved[stream.id] = stream
            return False
        if stream.finished:
            session.end(stream.id)
            return self.finish(stream)
        self.unstarve(stream)
        return True

    def unstarve(self, stream):
        if stream.starved_since:
            stream.starved_since = 0.0
            self.starved.pop(stream.id, None)

    def finish(self, stream) -> bool:
        """The whole response is with the session; a body shorter than its declared
        length cannot end well: reset."""
        ex = stream.exchange
        if ex.remaining:
            self.session.reset(stream.id, INTERNAL_ERROR)
        else:
            self.session.earn()   # a stream answered in full
        self.end_exchange(stream, ex.status_code)
        return False

    def fail(self, stream, exc):
        """The exchange failed: its error page if nothing was sent, else reset."""
        ex = stream.exchange
        if isinstance(exc, AppError) and not exc.logged:
            self.host.app_problem(ex, exc.detail)
        if ex.headers_sent:
            return self.reset(stream, INTERNAL_ERROR, ex.status_code)
        page = self.host.error_page(exc.status)
        ex.sent = 0 if ex.method == "HEAD" else len(page)
        self.error_answer(stream.id, exc.status, page, ex.method == "HEAD")
        self.end_exchange(stream, exc.status)

    def refuse(self, stream_id, exc):
        """A request the session refused (too large, malformed...): its status."""
        host = self.host
        page = host.error_page(exc.status)
        host.on_rejected(exc.status, 0, dict(
            self.session.template, REMOTE_ADDR=self.remote[0], REMOTE_PORT=self.remote[1],
            REQUEST_METHOD="-", RAW_URI="-", SERVER_PROTOCOL="HTTP/2"))
        self.error_answer(stream_id, exc.status, page, False)
        self.session.reset(stream_id, NO_ERROR)   # a body still coming: stop it

    def error_answer(self, stream_id, status, page, head_only):
        """An error status with its page, whole or not at all: a page the
        stream's window cannot take at once is left out (its length says 0)."""
        session = self.session
        if not head_only and len(page) > session.room(stream_id):
            page = b""
        fields = [(b":status", b"%d" % status)] + self.host.fixed_fields + [
            (b"content-type", b"text/html; charset=utf-8"),
            (b"content-length", b"%d" % len(page))]
        try:
            if head_only or not page:
                session.respond(stream_id, fields, True)
            else:
                session.respond(stream_id, fields, False)
                session.send(stream_id, page, True)
        except StreamGone:   # the client reset it: nothing to answer
            pass

    def reset(self, stream, code, status):
        self.session.reset(stream.id, code)
        self.end_exchange(stream, status)

    def end_exchange(self, stream, status):
        ex = stream.exchange
        if ex is None:
            return
        stream.exchange = None
        stream.pending.clear()
        self.unstarve(stream)
        self.backlogged.pop(stream.id, None)
        self.streams.pop(stream.id, None)
        host = self.host
        host.http2_stream(False)
        if stream.file is not None or ex.outlet is None:
            close = getattr(ex.result, "close", None)   # a file this connection read
            if close is not None:
                try:
                    close()
                except Exception:
                    pass
        if ex.outlet is not None:
            ex.cancel()   # its app thread, if still at work, stops at its next push
        self.session.close_body(ex)
        host.end_request(ex, status, 0)

    # -- output ---------------------------------------------------------------------
    def queue_output(self):
        """What the session framed, into the output queue (sent by flush: the
        responses of one read's streams go out in one write)."""
        data = self.session.output()
        if data and self.state == OPEN:
            self.out.append(data)
            self.out_size += len(data)

    def push_output(self):
        self.queue_output()
        if self.out:
            try:
                self.flush()
            except ClientGone:
                self.close()

    def flush(self):
        out = self.out
        if len(out) > 1:
            out[:] = [b"".join(out)]   # one write (with TLS: one record) for all of it
        while out:
            try:
                sent = self.sock.send(out[0])
            except WOULD_BLOCK:
                break
            except OSError as exc:
                raise ClientGone() from exc
            self.out_size -= sent
            self.progress_at = self.host.now
            if sent < len(out[0]):
                out[0] = memoryview(out[0])[sent:]
                break
            out.pop(0)
        self.settle_events()
        if not out and self.closing:
            self.close_when_done()

    def settle_events(self):
        """Read unless the output is past HIGH_WATER (a client that does not
        read cannot make us queue PING and SETTINGS answers without end);
        write while output waits."""
        if self.state != OPEN:
            return
        events = 0 if self.out_size >= HIGH_WATER or self.closing and not self.streams \
            else EPOLLIN
        if self.out or self.session.ready or self.backlogged:
            events |= EPOLLOUT   # (requests or bytes waiting: on at the next poll)
        if not events:
            events = EPOLLOUT   # (never out of the poller: the deadline still rules)
        self.want(events)

    def want(self, events):
        if events != self.events and self.state != CLOSED:
            if self.events:
                self.host.modify(self.fd, events)
            else:
                self.host.register(self.fd, events)
            self.events = events

    # -- deadlines --------------------------------------------------------------------
    def settle(self):
        """The one deadline: output stalled, a stream starved of window, a
        body arriving too slowly, or the connection idle. Closing (GOAWAY
        sent or received), the end comes once no stream is left."""
        if self.state != OPEN:
            return
        if self.closing and not self.streams and not self.session.receiving:
            return self.close_when_done()
        http = self.host.http
        if self.out:
            self.deadline = self.progress_at + http.send_timeout
        elif self.starved:
            self.deadline = min(s.starved_since for s in self.starved.values()) + http.send_timeout
        elif self.session.receiving:
            self.deadline = self.last_input + http.body_timeout
        elif self.streams:
            self.deadline = NEVER   # in the app: request_timeout is the watchdog's
        else:
            self.deadline = self.last_input + http.keepalive_timeout

    def on_deadline(self):
        if self.state == LINGERING:
            return self.close()
        host = self.host
        now = host.now
        http = host.http
        if self.out and now >= self.progress_at + http.send_timeout:
            host.on_timeout()
            return self.close()
        for stream in [s for s in self.starved.values()
                       if now >= s.starved_since + http.send_timeout]:
            host.on_timeout()
            self.reset(stream, CANCEL, stream.exchange.status_code or 499)
        if self.session.receiving and not self.out and not self.starved \
                and now >= self.last_input + http.body_timeout:
            for stream_id, request in list(self.session.receiving.items()):
                del self.session.receiving[stream_id]
                self.session.close_body(request)
                self.refuse(stream_id, RequestTimeout())
        if self.idle() and (self.closing or now >= self.last_input + http.keepalive_timeout):
            self.go_away()
            return self.close_when_done(now=True)
        self.push_output()
        self.settle()

    # -- what the worker may ask ---------------------------------------------------
    def idle(self) -> bool:
        return not self.streams and not self.session.receiving and not self.out

    def in_flight(self) -> bool:
        return bool(self.streams or self.session.receiving or self.out)

    def evictable(self, now):
        return (1, self.deadline) if self.idle() else None

    def wind_down(self, at: float) -> None:
        """A graceful stop: GOAWAY with the last stream taken; the streams in
        flight finish (new ones are refused), then the close; an idle
        connection is closed at `at` (streams the client sent before our
        GOAWAY reached it are refused meanwhile, and retried elsewhere)."""
        self.go_away()
        if self.idle():
            self.deadline = min(self.deadline, at)

    def go_away(self):
        if not self.session.goaway_sent:
            self.host.http2_goaway("no_error")
        self.session.go_away(NO_ERROR)
        self.closing = True
        self.push_output()

    def close_when_done(self, now=False):
        """Once no stream is in flight (now: whatever is), and the output is
        out: close our side, then linger."""
        if self.state != OPEN or (self.streams or self.session.receiving) and not now:
            return
        for stream in list(self.streams.values()):
            self.end_exchange(stream, 499)
        self.push_output()
        if self.out and not now:
            return self.settle_events()   # flush() comes back here
        self.linger()

    def linger(self):
        """Our side closed, the client's read and dropped for a moment: what it
        still sends would otherwise turn our last frames (the GOAWAY) into a
        reset before it reads them."""
        self.session.close()
        self.state = LINGERING
        if self.out:
            try:
                self.flush()
            except ClientGone:
                pass
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return self.close()
        self.out.clear()
        self.out_size = 0
        self.deadline = self.host.now + LINGER_SECONDS
        self.want(EPOLLIN)

    def close(self):
        if self.state == CLOSED:
            return
        for stream in list(self.streams.values()):
            self.end_exchange(stream, 499)
        self.state = CLOSED
        self.session.close()
        received, self.received = self.received, 0
        self.host.closed(self, received)
        self.host.http2_closed()
        self.sock.close()

