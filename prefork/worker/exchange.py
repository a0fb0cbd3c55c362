"""One request and its response, as the WSGI side sees them.

Owns: what an exchange carries between the reader that makes it and what
answers it: the request (http.request.Request), the response (wsgi.Response:
start_response, and the framing it inherits, which owns the response's state
to its last byte), the environ, the app's result and its iterator, when the
request began, and, when its app code runs on an app thread, what that
thread pushed for the loop. Must not: do socket I/O. The connection moves
the bytes the framing gives (an HTTP/2 stream will frame the same response
its own way); the PEP 3333 write() callable goes to whatever sends.

A remote exchange (its app code on an app thread, worker/threads.py) is
answered from its inbox: (kind, value) events in order, pushed by the thread
and taken by the loop:
  DATA bytes   a body chunk (write() or the iterable); counted in pushed/taken
  WHOLE list   the app returned a list or tuple: the whole body
  FILE wrapper a wsgi.file_wrapper of a regular file: the loop sends it
  END          the body is complete (close() was called)
  ERROR exc    an HttpError (an AppError with its traceback text): answer it
  PROBLEM text close() failed after the body was made: log it, go on
An app thread that waited send_timeout for the client to read sets gave_up:
the loop cuts the connection at once, whatever is still in the inbox.
"""
from __future__ import annotations

import os
import stat
import traceback

from ..http.errors import AppError, HttpError
from ..http.request import Request
from .wsgi import Response

DATA, WHOLE, FILE, END, ERROR, PROBLEM = "data", "whole", "file", "end", "error", "problem"
HIGH_WATER = 256 * 1024   # DATA bytes an app thread pushed and the loop has not taken, at most
# What an inline app call did when it was found detached (threads.Detached).
RESULT, CHUNK, STOP = "result", "chunk", "stop"


class ClientGone(Exception):
    """The peer closed or reset the connection while we were writing (or,
    for an app thread, the connection was ended under its exchange)."""


def app_error() -> AppError:
    """The exception being handled in app code, as the AppError that answers
    it; its traceback is the detail the loop logs."""
    return AppError(traceback.format_exc().rstrip())


def call_claimed(host, ex, app):
    """The app's call for ex on the loop's thread, claimed in host.claims
    while it runs (threads.py: the sentinel may take the claim, and then
    host.detached raises threads.Detached here, once the call returns).
    -> its result; an HttpError (an AppError for any other exception) once
    the claim is given up."""
    claims = host.claims
    claims.append(ex)
    try:
        result = app(ex.environ, ex)
    except HttpError as exc:
        host.leave_app(ex, ERROR, exc)
        raise
    except Exception:
        error = app_error()
        host.leave_app(ex, ERROR, error)
        raise error from None
    try:
        claims.remove(ex)
    except ValueError:   # the sentinel took the claim: this thread is an app thread now
        host.detached(ex, RESULT, result)
    return result


def next_claimed(host, ex):
    """The next chunk of ex's iterator, claimed as the call is (StopIteration
    at its end, ClientGone passed on, anything else as an AppError)."""
    claims = host.claims
    claims.append(ex)
    try:
        data = next(ex.iterator)
    except (StopIteration, ClientGone):
        host.leave_app(ex, STOP, None)
        raise
    except AppError as exc:
        host.leave_app(ex, ERROR, exc)
        raise
    except Exception:
        error = app_error()
        host.leave_app(ex, ERROR, error)
        raise error from None
    try:
        claims.remove(ex)
    except ValueError:
        host.detached(ex, CHUNK, data)
    return data


class Exchange(Request, Response):
    """One request and the response being produced for it, as one object: the
    reader makes each request as an Exchange, and the start_response callable
    and the framing are inherited. Defaults on the class: a request writes
    only what differs."""
    conn = None              # what answers it (worker/connection.py), once it does
    started = 0.0
    environ = None
    result = None
    iterator = None
    sendfile = None          # [fd, offset, remaining] when sending a file
    write_deadline = 0.0     # set by the first write() that has to wait
    # Remote (see above): set when its app code goes to an app thread.
    outlet = None            # the AppThreads its app code runs on
    app = None               # the callable it runs
    inbox = None             # deque of (kind, value)
    pushed = 0               # DATA bytes pushed (the app thread writes it)
    taken = 0                # ... and taken (the loop writes it)
    drained = None           # threading.Event the app thread waits on past HIGH_WATER
    cancelled = False        # the connection ended: the app thread stops at its next push
    gave_up = False          # the app thread waited send_timeout for the client: cut it
    posted = False           # in the loop's mail, not yet read
    seat = -1

    def write(self, data):
        outlet = self.outlet
        if outlet is None:
            return self.conn.write(data)   # inline: the connection sends (or detaches)
        if self.status is None:
            raise AssertionError("write() called before start_response")
        outlet.push_data(self, data)

    def take_iterable(self, result):
        """The app's result as the body to iterate (PEP 3333: any iterable
        of bytes; its close() is called as the exchange ends); AppError if
        it is not iterable."""
        self.result = result
        try:
            self.iterator = iter(result)
        except TypeError:
            raise AppError(f"app returned {type(result).__name__}, "
                           "not an iterable of bytes") from None

    def file_extent(self, wrapper):
        """[fd, offset, length] of the body a wsgi.file_wrapper gives, when it
        wraps a regular file: from its position to its end, cut to the
        length the app declared (file_length); None if it wraps no such file."""
        try:
            fd = wrapper.fileno()
            st = os.fstat(fd)
        except (AttributeError, OSError, ValueError):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        offset = os.lseek(fd, 0, os.SEEK_CUR)
        return [fd, offset, self.file_length(st.st_size - offset)]

    def took(self, size):
        """The loop took size bytes of DATA: an app thread waiting past
        HIGH_WATER may push on."""
        self.taken += size
        if self.drained is not None and self.pushed - self.taken <= HIGH_WATER:
            self.drained.set()

    def cancel(self):
        """The loop ended this remote exchange: its app thread stops pushing."""
        self.cancelled = True
        if self.drained is not None:
            self.drained.set()
