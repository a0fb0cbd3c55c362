"""One client connection inside a worker: read requests, run the app, write.

Owns: the connection's state (handshake / reading / app / writing /
lingering), its deadline (the timeouts, and min_rate while a request arrives
or its answer waits for the client), its output queue, and one WSGI
exchange at a time. A TLS connection steps its handshake on its own events
first (its socket is an SSLSocket; "would block" is WOULD_BLOCK). Pipelined
requests are answered in order, in a loop (never by recursion), at most
PIPELINE_TURN per turn so the worker's other connections get theirs; while
the output is above HIGH_WATER the connection neither reads nor pulls from
the app. Output never blocks the worker: when the socket is full the response
iterator is paused and resumed on EPOLLOUT (the PEP 3333 write() callable
must block: with app threads its call is detached first, worker/threads.py;
with threads = 1 it waits at most send_timeout in all for one response).
An exchange's app code runs inline, claimed in the host's `claims` (a claim
found gone means the call was detached: the host raises threads.Detached),
or on an app thread (remote): the connection is then parked (APP: out of the
poller, no deadline) and answers from the exchange's inbox.
Must not: accept, touch other connections, or reach into the worker: what it
needs from it is the ConnectionHost interface below. The bytes of a response
come from the exchange (wsgi.Response, http.response.ResponseFraming); this
module only sends them.
"""
from __future__ import annotations

import fcntl
import os
import select
import socket
import ssl
import struct
import termios
import time
from typing import Any, Callable, Protocol

from ..http.errors import AppError, HttpError, RequestTimeout
from ..http.proxy import BadProxyHeader, Networks, forwarded_client, parse_proxy_header
from ..http.request import RequestReader
from ..http.response import CONTINUE, error_response
from .exchange import (DATA, END, ERROR, FILE, PROBLEM, RESULT, WHOLE, ClientGone, Exchange,
                       app_error, next_claimed)
from .wsgi import FileWrapper, build_environ, environ_template

READING, APP, WRITING, LINGERING, CLOSED = "reading", "app", "writing", "lingering", "closed"
HANDSHAKE = "handshake"   # a TLS connection before its first byte of HTTP
# What a plain HTTP request on an https:// listener gets, in plain HTTP (as nginx).
PLAIN_ON_TLS = (b"<!doctype html><title>400 Bad Request</title><h1>400 Bad Request</h1>"
                b"<p>The plain HTTP request was sent to an HTTPS port.</p>\n")
WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
RECV_SIZE = 65536
HIGH_WATER = 256 * 1024   # stop pulling from the app (and reading) past this
PIPELINE_TURN = 32        # pipelined requests answered before yielding to others
LINGER_SECONDS = 2.0
NEVER = float("inf")


def queued(fd, request) -> int:
    """Bytes in a socket's kernel queue (FIONREAD: to read, TIOCOUTQ: sent
    but not yet taken by the peer); -1 when the socket cannot tell."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, request, b"\0\0\0\0"))[0]
    except OSError:
        return -1


class ConnectionHost(Protocol):
    """What a connection needs from its worker, and nothing more."""
    now: float                 # the loop's clock, read once per round
    stopping: bool             # a graceful stop is under way: close after this response
    fixed_headers: bytes       # the Server and Date lines, refreshed each second
    date: str
    server_name: str
    http: Any                  # [http] settings: the reader's Limits and the four timeouts
    app: Callable
    wsgi_errors: Any
    script_name: str           # the mount prefix ([server] script_name)
    trusted: Networks           # [proxy] trusted
    proxy_protocol: bool       # [proxy] proxy_protocol
    open_spool: Callable       # opens the file a large request body is spooled to
    claims: list               # the inline app call in progress (threads.AppThreads)
    offloading: bool           # complete requests go to app threads
    threads: Any               # threads.AppThreads, or None (threads = 1)

    def begin_request(self, request) -> float: ...
    def end_request(self, exchange: "Exchange", status: int, received: int) -> None: ...
    def on_rejected(self, status: int, received: int, environ: dict) -> None: ...
    def on_timeout(self) -> None: ...
    def app_problem(self, exchange: "Exchange | None", text: str) -> None: ...
    def leave_app(self, exchange: "Exchange", kind: str, value) -> None: ...
    def detached(self, exchange: "Exchange", kind: str, value) -> None: ...
    def error_page(self, status: int) -> bytes: ...
    def modify(self, fd: int, events: int) -> None: ...
    def register(self, fd: int, events: int) -> None: ...
    def park(self, fd: int) -> None: ...
    def closed(self, conn: "Connection", received: int) -> None: ...
    def tls_failed(self, exc: Exception | None) -> str: ...
    def tls_ready(self, template: dict, sock) -> dict: ...
    h2c: bool                  # [http2] cleartext (and HTTP/2 offered at all)
    def speak_h2(self, conn: "Connection", template: dict, first: bytes) -> None: ...


def believe_forwarding(environ, trusted):
    """A trusted proxy's forwarding headers name the client and the scheme."""
    client, scheme = forwarded_client(environ, trusted)
    if client is not None:
        environ["REMOTE_ADDR"] = client
    if scheme in ("http", "https"):
        environ["wsgi.url_scheme"] = scheme


def server_options(environ, start_response):
    """OPTIONS * asks about the server, not a resource: the server answers
    (the app never sees a PATH_INFO that does not start with /)."""
    start_response("200 OK", [("Allow", "OPTIONS, GET, HEAD, POST, PUT, PATCH, DELETE"),
                              ("Content-Length", "0")])
    return []


class Connection:
    __slots__ = ("host", "sock", "fd", "reader", "remote", "out", "out_size", "state", "deadline",
                 "events", "exchange", "close_after", "client_closes", "received", "refused",
                 "believed", "preamble", "began", "progress", "send_began", "flushed",
                 "stall_deadline", "tls", "h2c")

    def __init__(self, host: ConnectionHost, sock, addr, server_addr):
        """addr: the peer's address as accept() gave it: a tuple for an IP
        peer, a str for a unix-socket one (told apart by it, not by
        sock.family, whose enum conversion costs some 8,000 instructions)."""
        self.host = host
        self.sock = sock
        self.fd = sock.fileno()
        if type(addr) is not tuple:
            server = (server_addr or "localhost", "0")
            remote = ("", "")   # a unix-socket peer has no address (none is made up)
        else:
            server = (server_addr[0], str(server_addr[1]))
            remote = (addr[0], str(addr[1]))
        self.remote = remote   # as the environ has it; a PROXY header may replace it
        # Each request's fields are read straight into a copy of the listener's
        # base environ (shared by the worker's connections).
        self.reader = RequestReader(host.http, environ_template(
            server[0], server[1], host.wsgi_errors, host.script_name, host.threads is not None),
            Exchange, host.open_spool)
        self.out = []
        self.out_size = 0
        self.state = READING
        self.events = EPOLLIN
        self.deadline = host.now + host.http.header_timeout
        self.exchange = None
        self.close_after = False
        self.client_closes = False   # the last request said Connection: close (or was 1.0)
        self.received = 0       # bytes read since the last report to the host
        self.refused = None     # an HttpError to answer once the requests before it are
        # A trusted proxy's word about the client is believed (http/proxy.py);
        # with the PROXY protocol its header comes first, and nothing else does.
        self.believed = host.trusted.peer(remote[0]) if host.trusted else False
        self.preamble = b"" if host.proxy_protocol else None
        # A request arriving over several reads, and output that waits for the
        # client: when each began and how many bytes moved since (min_rate).
        self.began = self.send_began = self.stall_deadline = host.now
        self.progress = self.flushed = 0
        # TLS: the handshake first (driven by the same events, under the
        # header_timeout deadline); its facts go into the reader's template.
        self.tls = isinstance(sock, ssl.SSLSocket)
        if self.tls:
            self.state = HANDSHAKE
        # HTTP/2 with prior knowledge: from trusted peers, on plain listeners.
        self.h2c = host.h2c and self.believed and not self.tls

    # -- events from the worker loop ------------------------------------------
    def on_readable(self):
        if self.state == APP:   # the client speaks while its app call runs
            self.events = 0
            return self.host.park(self.fd)   # read nothing more until it is answered
        if self.state == HANDSHAKE:
            return self.handshake()
        try:
            # (TLS: OpenSSL returns one record per read, at most 16 KiB, so none
            # is left half-read in its buffer where no event would tell of it;
            # the next record waits in the kernel and the poll reports it.)
            data = self.sock.recv(RECV_SIZE)
        except WOULD_BLOCK:
            return
        except OSError:
            return self.close()
        if not data:
            return self.close()
        if self.state == LINGERING:
            return  # discarding what the client still sends after our close
        self.received += len(data)
        if self.preamble is not None:
            data = self.take_preamble(data)
            if not data:
                return
        if self.h2c:   # the first bytes of a trusted peer's connection: HTTP/2's preface?
            self.h2c = False
            if data[:3] == b"PRI":
                return self.host.speak_h2(self, self.reader.template, data)
        reader = self.reader
        was_in_message = reader.in_message
        try:
            reader.feed(data)
        except HttpError as exc:
            if not reader.ready:
                return self.reject(exc)
            # Valid requests came before the bad bytes: answer them first,
            # in order; the error follows (after_response), then the close.
            self.refused = exc
        if reader.in_message:
            host = self.host
            if not was_in_message:
                self.began = host.now
                self.progress = 0
            self.progress += len(data)
            if not was_in_message and reader.in_head:
                self.deadline = host.now + host.http.header_timeout
            elif not reader.in_head:
                self.deadline = self.rated(host.now + host.http.body_timeout, self.began,
                                           self.progress)
            if reader.continue_pending:
                reader.continue_pending = False
                self.send_quietly(CONTINUE)
        if reader.ready:
            self.serve_ready()

    def on_writable(self):
        if self.state == HANDSHAKE:
            return self.handshake()
        try:
            if self.flush() and self.exchange is not None:
                self.pump()
            if self.state == WRITING and not self.out and self.exchange is None:
                self.after_response()
            if self.state == READING and self.reader.ready and self.exchange is None:
                self.serve_ready()
        except ClientGone:
            self.abort()

    def on_accepted(self):
        """Just accepted: a TLS client's ClientHello has often come with its
        connection, so the handshake's first step goes now rather than a
        poll round later."""
        if self.state == HANDSHAKE:
            self.handshake(first=True)

    def handshake(self, first=False):
        """One step of the TLS handshake, as far as the socket lets it go.
        first: in the accept loop, where no request is served: a handshake
        that ends at once (a quick client) goes on at the next event."""
        host = self.host
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            return self.want(EPOLLIN)
        except ssl.SSLWantWriteError:
            return self.want(EPOLLOUT)
        except (ssl.SSLError, OSError) as exc:
            if host.tls_failed(exc) == "plain_http":
                try:   # answered in plain HTTP, on the socket under the TLS layer
                    os.write(self.fd, error_response(400, host.date, host.server_name,
                                                     PLAIN_ON_TLS))
                except OSError:
                    pass
            return self.close()
        if first:
            return self.want(EPOLLIN | EPOLLOUT)   # (writable at once: handshake() again, done)
        template = host.tls_ready(self.reader.template, self.sock)
        if self.sock.selected_alpn_protocol() == "h2":
            return host.speak_h2(self, template, b"")
        self.state = READING
        self.reader.retemplate(template)
        self.want(EPOLLIN)
        self.on_readable()   # the request may have come with the handshake's last flight

    def on_deadline(self):
        if self.state == READING and self.reader.in_message:
            # Headers (or body) not complete in time: 408. A connection that
            # sent nothing at all is closed silently, as nginx does.
            return self.reject(RequestTimeout())
        if self.state == WRITING:
            if self.host.now < self.stall_deadline:   # cut by min_rate: look again
                later = self.rated_send()             # at what the client has taken
                if later > self.host.now:
                    self.deadline = later
                    return
            self.host.on_timeout()
            return self.abort()
        if self.state == HANDSHAKE:
            self.host.tls_failed(None)   # it never finished in header_timeout
        self.close()   # idle keep-alive, or lingering done

    def take_preamble(self, data):
        """The PROXY header, from a trusted peer only: -> the bytes after it
        (b"" while it is incomplete). Anything else closes without a word:
        what follows is not HTTP from a client we know."""
        if not self.believed:
            self.close()
            return b""
        buffered = self.preamble + data
        try:
            parsed = parse_proxy_header(buffered)
        except BadProxyHeader:
            self.close()
            return b""
        if parsed is None:
            self.preamble = buffered
            return b""
        consumed, client = parsed
        self.preamble = None
        if client is not None:
            self.remote = (client[0], client[1])
        return buffered[consumed:]

    def rated(self, deadline, began, moved):
        """deadline, or sooner when the client moves fewer than min_rate
        bytes a second since began (after rate_grace)."""
        http = self.host.http
        if http.min_rate:
            return min(deadline, began + http.rate_grace + moved / http.min_rate)
        return deadline

    def send_deadline(self):
        """send_timeout from now, or sooner for a reader below min_rate."""
        self.stall_deadline = self.host.now + self.host.http.send_timeout
        return self.rated_send()

    def rated_send(self):
        """The stall deadline, or sooner by min_rate. What the client took is
        what left the kernel's send buffer, not what we put in it: a send
        buffer of hundreds of KiB would otherwise vouch for a reader taking
        a byte a second for many minutes."""
        if not self.host.http.min_rate:
            return self.stall_deadline
        return self.rated(self.stall_deadline, self.send_began, self.flushed - self.unsent())

    def pace_from_here(self):
        """Output waits for the client from now: its pace counts (min_rate).
        flushed starts at what the kernel still holds, so that it reads as
        what the client has taken since."""
        self.send_began = self.host.now
        self.flushed = self.unsent() if self.host.http.min_rate else 0

    def unsent(self):
        """Bytes in the kernel's send buffer the client has not taken."""
        return max(0, queued(self.fd, termios.TIOCOUTQ))

    def nothing_unread(self) -> bool:
        """Nothing the client sent waits to be read: not in the reader, not
        in OpenSSL's buffer, not in the kernel's. Over TLS, what waits in
        the kernel is read here: a client that said it closes usually sends
        its close_notify at once (wrk: 4 connections in 10), and after that
        alert it sends nothing more, so it counts as nothing unread."""
        reader = self.reader
        if reader.in_message or reader.ready or self.refused is not None:
            return False
        if self.tls and self.sock.pending():
            return False
        if queued(self.fd, termios.FIONREAD) == 0:
            return True
        if not self.tls:
            return False
        try:
            return self.sock.recv(RECV_SIZE) == b""   # the close_notify (or the end)
        except OSError:   # half a record (SSLWantReadError), or a reset
            return False

    def evictable(self, now):
        """When the worker must make room: None if this connection is being
        served (its request in the app or waiting for a thread, its answer
        being written, requests ready); else how gladly it goes, lower first:
        lingering, then idle (the longest idle first), then a request
        arriving (the slowest first)."""
        if self.exchange is not None or self.out or self.reader.ready:
            return None
        if self.state == LINGERING:
            return (0, 0.0)
        if self.state == HANDSHAKE:
            return (1, self.deadline)   # nothing said in HTTP yet: as an idle one
        if self.state != READING:
            return None
        if not self.reader.in_message:
            return (1, self.deadline)
        return (2, self.progress / max(now - self.began, 1e-3))

    # -- what the worker may ask ---------------------------------------------
    def idle(self) -> bool:
        """Between requests on a kept-alive connection: nothing half-read,
        nothing being answered."""
        return self.state == READING and not self.reader.in_message and self.exchange is None

    def in_flight(self) -> bool:
        """A request is half-read, being answered, or its answer unsent."""
        return self.exchange is not None or self.reader.in_message or bool(self.out)

    def wind_down(self, at: float) -> None:
        """The worker stops gracefully: an idle keep-alive connection is closed
        at `at`, not at once (under load its client is about to send the next
        request, which would meet a reset; one that comes is answered with
        Connection: close). Others close after their response."""
        if self.idle():
            self.deadline = min(self.deadline, at)

    # -- requests -----------------------------------------------------------
    def serve_ready(self):
        """Answer the complete requests in order. A response that must wait
        for the socket ends the loop (EPOLLOUT resumes it); so does the turn's
        bound, through EPOLLOUT too: it fires at once on the next poll, after
        the worker's other ready connections."""
        ready = self.reader.ready
        turn = 0
        while ready and self.state == READING and self.exchange is None:
            if turn == PIPELINE_TURN:
                self.state = WRITING
                self.want(EPOLLOUT)
                return
            turn += 1
            self.respond(ready.popleft())

    def respond(self, ex):
        host = self.host
        self.exchange = ex
        ex.conn = self
        ex.started = host.begin_request(ex)
        app = host.app if ex.target != b"*" else server_options   # OPTIONS *
        try:
            environ = ex.environ = build_environ(ex, self.remote)
            if self.believed:
                believe_forwarding(environ, host.trusted)
        except HttpError as exc:
            return self.fail(exc)
        if host.offloading:
            return host.threads.offload(self, ex, app)
        # exchange.call_claimed, inlined: calling it costs about 600
        # instructions per request (1% of hello's).
        claims = host.claims
        claims.append(ex)
        try:
            result = app(environ, ex)
        except HttpError as exc:
            host.leave_app(ex, ERROR, exc)
            return self.fail(exc)
        except Exception:
            error = app_error()
            host.leave_app(ex, ERROR, error)
            return self.fail(error)
        try:
            claims.remove(ex)
        except ValueError:   # the sentinel took the claim: this thread is an app thread now
            host.detached(ex, RESULT, result)
        try:
            if type(result) is list or type(result) is tuple:
                return self.respond_whole(ex, result)
            if isinstance(result, FileWrapper) and self.prepare_sendfile(ex, result):
                self.emit(b"")
            else:
                ex.take_iterable(result)
            self.pump()
        except ClientGone:
            self.abort()
        except AppError as exc:
            self.fail(exc)

    def respond_whole(self, ex, parts):
        """The whole body is in hand (a list or tuple has no close() to call,
        PEP 3333): one send carries the response, and the exchange ends here."""
        try:
            body = parts[0] if len(parts) == 1 else b"".join(parts)
        except TypeError:
            return self.fail(AppError("app returned a body item that is not bytes"))
        host = self.host
        try:
            data = ex.whole(host.fixed_headers, host.stopping, body)
        except AppError as exc:
            return self.fail(exc)
        # Counted and logged before it is sent: a worker killed (the OOM
        # killer, the watchdog) just after its client got the whole answer
        # would otherwise take the line and the count with it. A send that
        # fails (ClientGone) finds the exchange over: the caller only closes.
        self.exchange = None
        received, self.received = self.received, 0
        host.end_request(ex, ex.status_code, received)
        self.send(data)
        self.ended(ex)

    def prepare_sendfile(self, ex, wrapper):
        if self.tls or ex.status is None:   # (TLS: the kernel would send it unencrypted)
            return False
        extent = ex.file_extent(wrapper)
        if extent is None:
            return False
        ex.result = wrapper
        ex.sendfile = extent
        self.pace_from_here()   # a file waits for the client's pace
        return True

    def pump(self):
        """Move the response forward until it is done or the output is full."""
        ex = self.exchange
        while self.out_size < HIGH_WATER:
            if ex.sendfile is not None:
                if self.out:
                    break
                progress = self.sendfile_step(ex)
                if progress is None:
                    return self.finish()
                if not progress:
                    break
                continue
            if ex.inbox is not None:   # remote: what its app thread pushed
                if not ex.inbox:
                    return self.await_app()
                try:
                    if self.take(ex):
                        return
                except AppError as exc:
                    return self.fail(exc)
                continue
            try:
                data = next_claimed(self.host, ex)
            except StopIteration:
                return self.finish()
            except AppError as exc:
                return self.fail(exc)
            if data:
                try:
                    self.emit(data)
                except AppError as exc:
                    return self.fail(exc)
                if not ex.body_ok:
                    return self.finish()
        self.state = WRITING
        self.deadline = self.send_deadline()
        self.want(EPOLLOUT)

    def take(self, ex) -> bool:
        """One event of a remote exchange; True when it ended the exchange."""
        kind, value = ex.inbox.popleft()
        if kind is DATA:
            ex.took(len(value))
            self.emit(value)
            if not ex.body_ok:
                self.finish()
                return True
            return False
        if kind is WHOLE:
            self.respond_whole(ex, value)
        elif kind is FILE:
            if self.prepare_sendfile(ex, value):
                self.emit(b"")
                return False
            raise AppError("the file to send could not be read")
        elif kind is END:
            self.finish()
        elif kind is ERROR:
            self.fail(value)
        elif kind is PROBLEM:
            self.host.app_problem(ex, value)
            return False
        return True

    def await_app(self):
        """A remote exchange's inbox is empty: send what is queued, then wait
        for its app thread parked."""
        if self.out:
            self.state = WRITING
            self.deadline = self.send_deadline()
            self.want(EPOLLOUT)
        else:
            self.park()

    def park(self):
        """The exchange's app code runs on an app thread: the connection reads
        nothing meanwhile (as while the loop runs an app) and keeps no
        deadline (request_timeout is the watchdog's); output already queued
        is still sent. It stays in the poller, for the client is silent while
        it waits: it leaves the poller only if the client speaks (on_readable)."""
        if self.out:
            self.state = WRITING
            self.deadline = self.send_deadline()
            self.want(EPOLLOUT)
            return
        self.state = APP
        self.deadline = NEVER
        if self.events == EPOLLOUT:   # flushed: nothing to wait for but the app
            self.events = 0
            self.host.park(self.fd)

    def on_mail(self):
        """Its remote exchange pushed events (the loop, from threads.deliver)."""
        if self.exchange.gave_up:   # its thread waited send_timeout for this client
            self.host.on_timeout()
            return self.abort()
        try:
            if self.state == APP:
                self.pump()
            if self.state == READING and self.reader.ready and self.exchange is None:
                self.serve_ready()
        except ClientGone:
            self.abort()

    def sendfile_step(self, ex):
        """One os.sendfile call: True on progress, False when the socket is
        full, None when the file is sent."""
        fd, offset, remaining = ex.sendfile
        if remaining <= 0 or not ex.body_ok:
            return None
        try:
            sent = os.sendfile(self.fd, fd, offset, min(remaining, 1 << 20))
        except BlockingIOError:
            return False
        except OSError as exc:
            raise ClientGone() from exc
        if sent == 0:   # the file shrank under us: the framing is broken
            raise ClientGone()
        ex.sendfile[1] += sent
        ex.sendfile[2] -= sent
        ex.count_sent(sent)
        self.flushed += sent
        self.deadline = self.send_deadline()
        return True

    def write(self, data):
        """PEP 3333 write() of an inline call: send now. It must block while
        the client is slow: with app threads, a write() that would block
        detaches its call (the loop goes on on another thread; this one waits
        as an app thread). With threads = 1, one response's write() calls may
        block send_timeout in all (not per call: a client trickling bytes
        cannot pin the worker longer)."""
        ex = self.exchange
        if ex is None or ex.status is None:
            raise AssertionError("write() called before start_response")
        host = self.host
        threads = host.threads
        if threads is not None:
            try:
                host.claims.remove(ex)   # out of app code while the connection works
            except ValueError:           # detached meanwhile: remote from here
                threads.settle()
                return ex.write(data)
        if data:
            self.emit(data)
        if self.out_size >= HIGH_WATER:
            if threads is not None:
                return threads.detach_self(ex)
            if not ex.write_deadline:
                ex.write_deadline = time.monotonic() + self.host.http.send_timeout
            self.flush_blocking(ex.write_deadline)
        if threads is not None:
            host.claims.append(ex)

    def emit(self, data):
        """Send one body chunk, as the response frames it."""
        data = self.exchange.framed(data, self.host.fixed_headers, self.host.stopping)
        if data:
            self.send(data)

    def finish(self):
        """The app's response is complete (maybe not yet flushed)."""
        ex = self.exchange
        try:
            end = ex.ending(self.host.fixed_headers, self.host.stopping)
        except AppError as exc:
            return self.fail(exc)
        # Over before its last bytes go, as in respond_whole. (A body of a
        # declared length is complete with its last chunk, sent before the
        # app's iterator says it is done: that window stays.)
        self.end_exchange(ex.status_code)
        if end:
            try:
                self.send(end)
            except ClientGone:
                return self.close()
        self.ended(ex)

    def ended(self, ex):
        """The exchange is over: its response waits for the socket, or is out."""
        self.close_after = ex.ends_connection
        self.client_closes = not ex.keep_alive
        if self.out:
            self.state = WRITING
            self.want(EPOLLOUT)
        else:
            self.after_response()

    def after_response(self):
        """The response is on the wire: close, or wait for the next request
        (the caller's loop answers one already here)."""
        if self.close_after:
            # A client that said it closes, and sent nothing after its request,
            # has nothing that could meet our close and turn it into a reset:
            # no linger (nginx's rule). Anything unread, and we linger.
            if self.client_closes and self.nothing_unread():
                return self.close()
            return self.linger()
        host = self.host
        self.state = READING
        if not self.reader.ready:
            if self.refused is not None:
                return self.reject(self.refused)
            if host.stopping:
                return self.close()
            if self.events != EPOLLIN:
                self.want(EPOLLIN)
        self.deadline = host.now + host.http.keepalive_timeout

    def end_exchange(self, status):
        ex = self.exchange
        self.exchange = None
        # The app's result is closed where its app code ran: here when inline
        # (or a file this connection sent), else by its app thread.
        if ex.outlet is None or ex.sendfile is not None:
            close = getattr(ex.result, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    self.host.app_problem(ex, app_error().detail)
        if ex.outlet is not None:
            ex.cancel()   # its app thread, if still at work, stops at its next push
        received, self.received = self.received, 0
        self.host.end_request(ex, status, received)

    # -- failures -------------------------------------------------------------
    def fail(self, exc):
        """The exchange failed: an error page if nothing was sent yet, else cut."""
        ex = self.exchange
        if isinstance(exc, AppError) and not exc.logged:
            self.host.app_problem(ex, exc.detail)
        if ex is None or not ex.headers_sent:
            data = self.error_bytes(exc.status, ex)
            if ex is not None:
                # The error page is this response's body: counted and logged as sent.
                ex.sent = 0 if ex.method == "HEAD" else len(self.host.error_page(exc.status))
                self.end_exchange(exc.status)
            return self.close_with(data)
        self.abort()

    def reject(self, exc):
        """The parser refused the request (or it came too slowly): answer its
        status and close."""
        received, self.received = self.received, 0
        method, target, version = self.reader.partial()
        self.host.on_rejected(exc.status, received, dict(
            self.reader.template, REMOTE_ADDR=self.remote[0], REMOTE_PORT=self.remote[1],
            REQUEST_METHOD=method, RAW_URI=target, SERVER_PROTOCOL=version))
        self.close_with(self.error_bytes(exc.status))

    def close_with(self, data):
        """Send a last response, then close once it is out."""
        self.close_after = True
        self.state = WRITING
        self.send_quietly(data)
        if self.out:
            self.want(EPOLLOUT)
        else:
            self.linger()

    def error_bytes(self, status, ex=None):
        host = self.host
        return error_response(status, host.date, host.server_name, host.error_page(status),
                              head_only=ex is not None and ex.method == "HEAD")

    def abort(self):
        ex = self.exchange
        if ex is not None:
            self.end_exchange(ex.status_code if ex.headers_sent else 499)
        self.close()

    # -- output -----------------------------------------------------------
    def send(self, data):
        if self.out:
            self.out.append(data)
            self.out_size += len(data)
            return
        try:
            sent = self.sock.send(data)
        except WOULD_BLOCK:   # (TLS: the same bytes are offered again by flush)
            sent = 0
        except OSError as exc:
            raise ClientGone() from exc
        if sent < len(data):
            rest = memoryview(data)[sent:]
            self.out.append(rest)
            self.out_size += len(rest)
            self.pace_from_here()

    def send_quietly(self, data):
        try:
            self.send(data)
        except ClientGone:
            self.out.clear()
            self.out_size = 0

    def flush(self):
        """Send queued output; True when the queue is empty."""
        out = self.out
        while out:
            try:
                sent = self.sock.send(out[0])
            except WOULD_BLOCK:
                return False
            except OSError as exc:
                raise ClientGone() from exc
            self.out_size -= sent
            self.flushed += sent
            self.deadline = self.send_deadline()
            if sent < len(out[0]):
                out[0] = memoryview(out[0])[sent:]
                return False
            out.pop(0)
        return True

    def flush_blocking(self, deadline):
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        while not self.flush():
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(int(left * 1000) + 1):
                raise ClientGone("send timeout")

    def want(self, events):
        if events != self.events and self.state != CLOSED:
            if self.events:
                self.host.modify(self.fd, events)
            else:   # out of the poller: back in
                self.host.register(self.fd, events)
            self.events = events

    def linger(self):
        """Close our side, then read and discard for a moment so that an
        unread request body does not turn our last response into a reset."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return self.close()
        self.state = LINGERING
        self.deadline = self.host.now + LINGER_SECONDS
        self.want(EPOLLIN)

    def close(self):
        if self.state == CLOSED:
            return
        if self.exchange is not None:
            self.end_exchange(499)
        self.state = CLOSED
        received, self.received = self.received, 0
        self.host.closed(self, received)
        self.sock.close()
        self.reader.close()   # a body being spooled: its file goes now, not at collection
