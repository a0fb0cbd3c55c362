"""One client connection inside a worker: read requests, run the app, write.

Owns: the connection's state (reading / writing / lingering), its deadline, its
output queue, and one WSGI exchange at a time. Pipelined requests are answered
in order. Output never blocks the worker: when the socket is full the response
iterator is paused and resumed on EPOLLOUT (the PEP 3333 write() callable is the
one exception: it must block, so it waits at most send_timeout).
Must not: accept, or touch other connections; stats and logs go to the worker.
"""
from __future__ import annotations

import os
import select
import socket
import stat

from .http.errors import AppError, HttpError, RequestTimeout
from .http.request import RequestReader
from .http.response import CHUNKED_END, CONTINUE, NO_BODY_STATUSES, chunk, error_response
from .wsgi import FileWrapper, StartResponse, base_environ, build_environ

READING, WRITING, LINGERING, CLOSED = "reading", "writing", "lingering", "closed"
EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
RECV_SIZE = 65536
HIGH_WATER = 256 * 1024   # stop pulling from the app's iterator past this
LINGER_SECONDS = 2.0


class ClientGone(Exception):
    """The peer closed or reset the connection while we were writing."""


class Exchange:
    """One request and the response being produced for it."""
    __slots__ = ("request", "environ", "sr", "result", "iterator", "started",
                 "body_ok", "chunked", "remaining", "close", "sent", "sendfile")

    def __init__(self, request, started):
        self.request = request
        self.environ = None
        self.sr = None
        self.result = None
        self.iterator = None
        self.started = started
        self.body_ok = True
        self.chunked = False
        self.remaining = None   # bytes still allowed by the app's Content-Length
        self.close = not request.keep_alive or request.upgrade
        self.sent = 0           # body bytes sent
        self.sendfile = None    # [fd, offset, remaining] when sending a file


class Connection:
    __slots__ = ("worker", "sock", "fd", "reader", "base", "out", "out_size",
                 "state", "deadline", "events", "exchange", "close_after")

    def __init__(self, worker, sock, addr, server_addr):
        self.worker = worker
        self.sock = sock
        self.fd = sock.fileno()
        self.reader = RequestReader(worker.limits)
        if isinstance(addr, tuple):
            remote = (addr[0], str(addr[1]))
            server = (server_addr[0], str(server_addr[1]))
        else:  # unix socket
            remote = ("127.0.0.1", "0") if not addr else (addr, "0")
            server = ("localhost", "0")
        self.base = base_environ(server[0], server[1], remote[0], remote[1], worker.wsgi_errors)
        self.out = []
        self.out_size = 0
        self.state = READING
        self.events = EPOLLIN
        self.deadline = worker.now + worker.config.http.header_timeout
        self.exchange = None
        self.close_after = False

    # -- events from the worker loop ------------------------------------------
    def on_readable(self):
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            return self.close()
        if not data:
            return self.close()
        if self.state == LINGERING:
            return  # discarding what the client still sends after our close
        worker = self.worker
        worker.stats.bytes_in += len(data)
        reader = self.reader
        was_in_message = reader.in_message
        try:
            reader.feed(data)
        except HttpError as exc:
            return self.reject(exc)
        if reader.in_message:
            if not was_in_message and reader.in_head:
                self.deadline = worker.now + worker.config.http.header_timeout
            elif not reader.in_head:
                self.deadline = worker.now + worker.config.http.body_timeout
            if reader.continue_pending:
                reader.continue_pending = False
                self.send(CONTINUE)
        if reader.ready:
            self.serve_ready()

    def on_writable(self):
        try:
            if self.flush() and self.exchange is not None:
                self.pump()
            if not self.out and self.exchange is None:
                self.after_response()
        except ClientGone:
            self.abort()

    def on_deadline(self):
        if self.state == READING and self.reader.in_message:
            # Headers (or body) not complete in time: 408. A connection that
            # sent nothing at all is closed silently, as nginx does.
            self.worker.on_rejected(RequestTimeout.status)
            self.send_quietly(self.error_bytes(RequestTimeout.status))
            return self.linger()
        if self.state == WRITING:
            self.worker.on_timeout()
            return self.abort()
        self.close()   # idle keep-alive, or lingering done

    # -- requests -----------------------------------------------------------
    def serve_ready(self):
        ready = self.reader.ready
        while ready and self.state == READING and self.exchange is None:
            self.respond(ready.popleft())

    def respond(self, request):
        worker = self.worker
        ex = self.exchange = Exchange(request, worker.begin_request(request))
        ex.sr = StartResponse(self.write)
        try:
            ex.environ = build_environ(request, self.base)
            result = ex.result = worker.app(ex.environ, ex.sr)
        except HttpError as exc:
            return self.fail(exc)
        except Exception:
            return self.fail(worker.app_failed(ex))
        try:
            if type(result) is list or type(result) is tuple:
                return self.respond_whole(ex, result)
            if isinstance(result, FileWrapper) and self.prepare_sendfile(ex, result):
                self.emit(b"")
            else:
                ex.iterator = iter(result)
            self.pump()
        except ClientGone:
            self.abort()

    def respond_whole(self, ex, parts):
        """Fast path: the whole body is in hand, so one send carries it all."""
        try:
            body = parts[0] if len(parts) == 1 else b"".join(parts)
        except TypeError:
            return self.fail(AppError("app returned a body item that is not bytes"))
        sr = ex.sr
        if sr.status is None:
            return self.fail(AppError("app returned without calling start_response"))
        if sr.content_length is None:
            sr.content_length = len(body)
        try:
            self.emit(body)
        except AppError as exc:
            return self.fail(exc)
        self.finish()

    def prepare_sendfile(self, ex, wrapper):
        try:
            fd = wrapper.fileno()
            st = os.fstat(fd)
        except (AttributeError, OSError, ValueError):
            return False
        if not stat.S_ISREG(st.st_mode) or ex.sr.status is None:
            return False
        offset = os.lseek(fd, 0, os.SEEK_CUR)
        length = st.st_size - offset
        if ex.sr.content_length is not None:
            length = min(length, ex.sr.content_length)
        ex.sr.content_length = length
        ex.result = wrapper
        ex.sendfile = [fd, offset, length]
        return True

    def pump(self):
        """Move the response forward until it is done or the socket is full."""
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
            try:
                data = next(ex.iterator)
            except StopIteration:
                return self.finish()
            except ClientGone:
                raise
            except Exception as exc:
                return self.fail(exc if isinstance(exc, AppError) else self.worker.app_failed(ex))
            if data:
                try:
                    self.emit(data)
                except AppError as exc:
                    return self.fail(exc)
                if not ex.body_ok:
                    return self.finish()
        self.state = WRITING
        self.deadline = self.worker.now + self.worker.config.http.send_timeout
        self.want(EPOLLOUT)

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
        ex.remaining -= sent
        ex.sent += sent
        self.deadline = self.worker.now + self.worker.config.http.send_timeout
        return True

    def write(self, data):
        """PEP 3333 write(): send now; blocks (bounded) if the client is slow."""
        if self.exchange is None or self.exchange.sr.status is None:
            raise AssertionError("write() called before start_response")
        if data:
            self.emit(data)
        if self.out_size >= HIGH_WATER:
            self.flush_blocking()

    def emit(self, data):
        """Frame one body chunk (sending the head first if not sent yet)."""
        if type(data) is not bytes and not isinstance(data, (bytearray, memoryview)):
            raise AppError(f"app gave a body chunk of type {type(data).__name__}, not bytes")
        ex = self.exchange
        head = b""
        if not ex.sr.headers_sent:
            head = self.head(ex)
            ex.sr.headers_sent = True
        if ex.remaining is not None:
            if len(data) > ex.remaining:
                data = data[:ex.remaining]   # never send past the app's Content-Length
            ex.remaining -= len(data)
        if not ex.body_ok:
            data = b""
        elif data:
            ex.sent += len(data)
            if ex.chunked:
                data = chunk(data)
        if head:
            self.send(head + data if data else head)
        elif data:
            self.send(data)

    def head(self, ex):
        sr = ex.sr
        request = ex.request
        code = sr.status_code
        ex.close = ex.close or sr.close or self.worker.stopping
        ex.body_ok = request.method != "HEAD" and code not in NO_BODY_STATUSES
        parts = [f"HTTP/1.1 {sr.status}\r\n", self.worker.fixed_headers]
        for name, value in sr.headers:
            parts.append(f"{name}: {value}\r\n")
        if code not in NO_BODY_STATUSES:
            if sr.content_length is not None:
                parts.append(f"Content-Length: {sr.content_length}\r\n")
                ex.remaining = sr.content_length if ex.body_ok else None
            elif not ex.body_ok:
                pass   # HEAD with unknown length: no framing header needed
            elif request.version == "1.1":
                parts.append("Transfer-Encoding: chunked\r\n")
                ex.chunked = True
            else:
                ex.close = True   # HTTP/1.0: the end of the body is the close
        if ex.close:
            parts.append("Connection: close\r\n\r\n")
        elif request.version == "1.0":
            parts.append("Connection: keep-alive\r\n\r\n")
        else:
            parts.append("\r\n")
        try:
            return "".join(parts).encode("latin-1")
        except UnicodeEncodeError:
            raise AppError("response header is not latin-1") from None

    def finish(self):
        """The app's response is complete (maybe not yet flushed)."""
        ex = self.exchange
        try:
            if not ex.sr.headers_sent:
                if ex.sr.status is None:
                    return self.fail(AppError("app returned without calling start_response"))
                if ex.sr.content_length is None:
                    ex.sr.content_length = 0
                self.emit(b"")
            elif ex.chunked:
                self.send(CHUNKED_END)
        except AppError as exc:
            return self.fail(exc)
        except ClientGone:
            return self.abort()
        if ex.remaining:  # the app sent less than its Content-Length
            ex.close = True
        self.end_exchange(ex.sr.status_code)
        self.close_after = ex.close
        if self.out:
            self.state = WRITING
            self.want(EPOLLOUT)
        else:
            self.after_response()

    def after_response(self):
        if self.close_after:
            return self.linger()
        worker = self.worker
        self.state = READING
        self.want(EPOLLIN)
        if worker.stopping and not self.reader.ready:
            return self.close()
        self.deadline = worker.now + worker.config.http.keepalive_timeout
        if self.reader.ready:
            self.serve_ready()

    def end_exchange(self, status):
        ex = self.exchange
        self.exchange = None
        close = getattr(ex.result, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                self.worker.app_failed(ex)
        self.worker.end_request(ex, status)

    # -- failures -------------------------------------------------------------
    def fail(self, exc):
        """The exchange failed: an error page if nothing was sent yet, else cut."""
        ex = self.exchange
        if isinstance(exc, AppError) and not exc.logged:
            self.worker.app_problem(ex, exc.detail)
        if ex is None or ex.sr is None or not ex.sr.headers_sent:
            self.close_after = True
            self.state = WRITING
            if ex is not None:
                ex.close = True
                self.end_exchange(exc.status)
            self.send_quietly(self.error_bytes(exc.status, ex))
            return self.linger() if not self.out else self.want(EPOLLOUT)
        self.abort()

    def reject(self, exc):
        """The parser refused the request: answer its status and close."""
        self.worker.on_rejected(exc.status)
        self.send_quietly(self.error_bytes(exc.status))
        self.close_after = True
        self.state = WRITING
        if self.out:
            self.want(EPOLLOUT)
        else:
            self.linger()

    def error_bytes(self, status, ex=None):
        head_only = ex is not None and ex.request.method == "HEAD"
        return error_response(status, self.worker.date, self.worker.server_name,
                              close=True, body=self.worker.error_page(status),
                              head_only=head_only)

    def abort(self):
        ex = self.exchange
        if ex is not None:
            self.end_exchange(ex.sr.status_code if ex.sr.headers_sent else 499)
        self.close()

    # -- output -----------------------------------------------------------
    def send(self, data):
        if self.out:
            self.out.append(data)
            self.out_size += len(data)
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise ClientGone() from exc
        if sent < len(data):
            rest = memoryview(data)[sent:]
            self.out.append(rest)
            self.out_size += len(rest)

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
            except BlockingIOError:
                return False
            except OSError as exc:
                raise ClientGone() from exc
            self.out_size -= sent
            self.deadline = self.worker.now + self.worker.config.http.send_timeout
            if sent < len(out[0]):
                out[0] = memoryview(out[0])[sent:]
                return False
            out.pop(0)
        return True

    def flush_blocking(self):
        timeout_ms = int(self.worker.config.http.send_timeout * 1000)
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        while not self.flush():
            if not poller.poll(timeout_ms):
                raise ClientGone("send timeout")

    def want(self, events):
        if events != self.events and self.state != CLOSED:
            self.events = events
            self.worker.modify(self.fd, events)

    def linger(self):
        """Close our side, then read and discard for a moment so that an
        unread request body does not turn our last response into a reset."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return self.close()
        self.state = LINGERING
        self.deadline = self.worker.now + LINGER_SECONDS
        self.want(EPOLLIN)

    def close(self):
        if self.state == CLOSED:
            return
        if self.exchange is not None:
            self.end_exchange(499)
        self.state = CLOSED
        self.worker.forget(self)
        self.sock.close()
