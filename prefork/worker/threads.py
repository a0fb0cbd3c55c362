"""App threads inside a worker: the loop never waits on an app that waits.

Owns: the worker's app threads (the loop starts one when the seats taken
outnumber them, and retires one at a time once some stayed unused for
IDLE_SECONDS; the main thread, told to retire, parks for good), which thread
leads the loop, the sentinel that detaches an inline app call that runs too
long, whether app calls run inline or are offloaded, the seats (app calls
running on threads: at most [workers] threads), the requests waiting for a
seat, and the mail from app threads to the loop (events of their exchanges,
seats freed) with its wakeup fd.

How a request runs:
- Inline, the starting state: the loop's thread runs the app itself, exactly
  as with threads = 1, its call claimed in `claims` while it runs (one
  list.append and one list.remove, each atomic under the GIL).
- The sentinel looks every CHECK seconds (NAP seconds when the worker is
  quiet or offloads: then there is no inline call to watch). A claim it sees
  at two looks in a row, an app call running for CHECK to 2 x CHECK, it takes
  out of `claims` (its list.remove races the loop's own, and exactly one of
  them wins): that call is detached. Under `deciding`, its exchange gets a
  seat and goes remote (its connection parked), the worker offloads, and a
  new thread leads the loop. The detached thread, when its app code returns,
  finds its claim gone, unwinds the loop's frames (Detached) and goes on with
  the exchange as an app thread. A PEP 3333 write() that would block detaches
  its call the same way.
- Offloaded: each complete request takes a seat; the loop's thread hands the
  loop to an idle thread (or a new one), unwinds (Detached) and runs the call
  itself, so no hand-off delays the call; the loop's other events wait for
  the next leader, a wakeup away. Without a seat a request waits (counted)
  and goes to a thread as one frees, and the worker stops accepting, so new
  connections go to workers with room. After HOLD seconds with no slow call
  (SLOW seconds or more) and no seat taken, the worker runs inline again.

An app thread runs app code only (the call, iterating its result, close(),
write()) and pushes what it yields into the exchange's inbox (the kinds in
worker/exchange.py); the loop frames it, sends it and counts it. A thread
whose exchange holds more than HIGH_WATER bytes the loop has not taken waits,
at most send_timeout in all per response (as a blocking write() does), so a
response that fits in the buffers never holds a thread for a slow reader.

Must not: touch a connection, the poller, statistics, the scoreboard or the
access log from an app thread (only the leader does, and a thread that
commits a detach or a hand-over before it lets go of the loop); run more
than `threads` app calls at once.
"""
from __future__ import annotations

import collections
import logging
import os
import queue
import stat
import threading
import time
import traceback
from typing import Protocol

from ..http.errors import AppError, HttpError
from .exchange import (CHUNK, DATA, END, ERROR, FILE, HIGH_WATER, PROBLEM, RESULT, STOP, WHOLE,
                       ClientGone, app_error)
from .wsgi import FileWrapper

CHECK = 0.005           # seconds between the sentinel's looks while requests flow
NAP = 0.1               # ... and while the worker is quiet
QUIET_LOOKS = 200       # looks without a request before the sentinel naps (a second)
SLOW = 0.005            # an app call this long makes the worker offload
HOLD = 2.0              # seconds offloaded after the last slow call
IDLE_SECONDS = 10.0     # app threads unused this long retire, one per RETIRE_EVERY
RETIRE_EVERY = 1.0
LEAD, RETIRE = "lead", "retire"   # jobs: lead the loop; end this thread
RUN = "run"             # Detached: the loop's thread runs an offloaded call
log = logging.getLogger("prefork.worker")


class Detached(BaseException):
    """Raised on the thread whose inline app call was detached, once that app
    code returns, or that hands the loop over to run an offloaded call: it
    unwinds the loop's frames (it is no Exception, so no handler there takes
    it) to the thread's top, where AppThreads.carry_on goes on with the
    exchange. kind: what the app code did (RESULT, CHUNK, STOP or ERROR) or
    RUN (the call is still to make); value: its result, chunk or error, or
    the app to call."""

    def __init__(self, exchange, kind, value):
        super().__init__(kind)
        self.exchange, self.kind, self.value = exchange, kind, value


class ThreadsHost(Protocol):
    """What the app threads need from their worker, and nothing more."""
    offloading: bool          # written here: complete requests go to app threads
    requests: int             # requests ended so far (the sentinel naps when it stands still)
    send_timeout: float

    def lead(self) -> None: ...                      # run the loop on this thread
    def crashed(self) -> None: ...                   # report the exception being handled, exit
    def accepting(self, room: bool) -> None: ...     # seats free or not: accept or not
    def seat_taken(self, seat: int, exchange) -> None: ...
    def seat_freed(self, seat: int) -> None: ...
    def threads_changed(self) -> None: ...           # the figures below changed


def sendable(wrapper) -> bool:
    """Is this wsgi.file_wrapper a regular file the loop can sendfile?"""
    try:
        return stat.S_ISREG(os.fstat(wrapper.fileno()).st_mode)
    except (AttributeError, OSError, ValueError):
        return False


class AppThreads:
    def __init__(self, host: ThreadsHost, limit: int):
        self.host = host
        self.limit = limit
        self.claims: list = []            # the inline app call in progress (one at most)
        self.deciding = threading.Lock()  # a detach being committed
        self.free_seats = list(range(limit - 1, -1, -1))   # the loop's (and a committer's)
        self.waiting: collections.deque = collections.deque()   # (exchange, app) without a seat
        self.waits = 0                    # requests that waited for a seat
        self.offload_until = 0.0
        # Mail, from app threads to the loop: freed seats and exchanges with news.
        self.freed: collections.deque = collections.deque()
        self.mail: collections.deque = collections.deque()
        self.wakeup_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # The threads. Counted by the loop (or a committer) alone: it starts
        # them and tells them to retire.
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.alive = 1                    # threads that lead or take jobs, the main one included
        self.retire_at = 0.0              # when an unused app thread may retire
        self.detaches = 0                 # inline calls detached (status)
        self.parked = threading.Event()   # never set: the main thread's rest

    # -- threads ---------------------------------------------------------------
    def begin(self):
        """After boot: the sentinel starts watching."""
        threading.Thread(target=self.watch, name="sentinel", daemon=True).start()

    def start(self, job=None):
        self.alive += 1
        self.retire_at = time.monotonic() + IDLE_SECONDS
        threading.Thread(target=self.work, args=(job,), name="app", daemon=True).start()

    def submit(self, job):
        """An app call for the threads; one more of them if every one has a
        seat's work (one thread leads)."""
        self.jobs.put(job)
        if self.alive - 1 < self.busy():
            self.start()

    def work(self, job=None):
        """A thread's life: lead the loop or run app calls, as jobs come."""
        while True:
            if job is None:
                job = self.jobs.get()
            if job is RETIRE:
                if threading.current_thread() is threading.main_thread():
                    self.parked.wait()   # the main thread never returns (run() would exit)
                return
            if job is LEAD:
                try:
                    self.host.lead()
                except Detached as step:
                    self.carry_on(step)
                except BaseException:
                    self.host.crashed()
            else:
                self.run(*job)
            job = None

    # -- the sentinel, and detaching -----------------------------------------------
    def watch(self):
        last = None
        requests = self.host.requests
        quiet = 0
        while True:
            time.sleep(NAP if quiet >= QUIET_LOOKS else CHECK)
            claims = tuple(self.claims)   # one snapshot, under the GIL
            claim = claims[0] if claims else None
            if claim is not None and claim is last:
                with self.deciding:
                    try:
                        self.claims.remove(claim)   # by identity: exchanges have no __eq__
                    except ValueError:
                        pass   # it returned meanwhile
                    else:
                        self.commit(claim)
                claim = None
            last = claim
            seen, requests = requests, self.host.requests
            if self.host.offloading:   # no inline call to watch
                quiet = QUIET_LOOKS
            else:
                quiet = 0 if claim is not None or seen != requests else quiet + 1

    def commit(self, ex):
        """Under `deciding`, with the loop's thread in ex's app code (stuck,
        or this very thread in write()): ex goes remote on its own thread,
        the worker offloads, and another thread leads the loop."""
        self.detaches += 1
        self.take_seat(ex)
        self.slow_call(time.monotonic())
        self.start(LEAD)
        self.host.threads_changed()

    def settle(self):
        """This thread's claim was taken: wait until its detach is committed."""
        with self.deciding:
            pass

    def detached(self, ex, kind, value):
        self.settle()
        raise Detached(ex, kind, value)

    def detach_self(self, ex):
        """The loop's thread, in ex's write(), would block: this call goes
        remote now (its claim is already released) and another thread leads."""
        with self.deciding:
            self.commit(ex)

    # -- the loop's side ----------------------------------------------------------
    def offload(self, conn, ex, app):
        """A complete request, while offloading: on this thread, which hands
        the loop over, when a seat is free; else it waits for one."""
        ex.app = app
        if self.free_seats:
            # The loop's thread runs it: it hands the loop to another thread
            # and leaves the loop's frames first (no hand-off before the call).
            self.take_seat(ex)
            if self.alive - 1 < self.busy():
                self.start(LEAD)
            else:
                self.jobs.put(LEAD)
            raise Detached(ex, RUN, app)
        else:
            ex.outlet = self
            ex.inbox = collections.deque()
            conn.park()
            self.waits += 1
            self.waiting.append(ex)
            self.host.threads_changed()

    def take_seat(self, ex):
        seat = ex.seat = self.free_seats.pop()
        if ex.inbox is None:
            ex.outlet = self
            ex.inbox = collections.deque()
            ex.conn.park()
        self.host.seat_taken(seat, ex)
        if not self.free_seats:
            self.host.accepting(False)

    def deliver(self):
        """The loop, woken by its mail: seats freed first (a request the news
        lets go on may need one), then each exchange's events, then waiting
        requests, as seats allow."""
        try:
            os.eventfd_read(self.wakeup_fd)
        except BlockingIOError:
            pass
        self.take_freed()
        mail = self.mail
        while mail:
            ex = mail.popleft()
            ex.posted = False
            conn = ex.conn
            if conn is not None and conn.exchange is ex:
                conn.on_mail()
        self.take_freed()   # seats freed as their last events were read
        waiting = self.waiting
        while waiting and self.free_seats:
            ex = waiting.popleft()
            if ex.conn.exchange is ex and not ex.cancelled:   # else it was closed meanwhile
                self.take_seat(ex)
                self.submit((ex, ex.app))

    def take_freed(self):
        freed = self.freed
        if not freed:
            return
        now = time.monotonic()
        had_room = bool(self.free_seats)
        while freed:
            seat, took = freed.popleft()
            self.free_seats.append(seat)
            self.host.seat_freed(seat)
            if took >= SLOW:
                self.slow_call(now)
        if not had_room:
            self.host.accepting(True)

    def slow_call(self, now):
        self.offload_until = now + HOLD
        self.host.offloading = True

    def tick(self, now):
        """Back to inline once nothing slow ran for HOLD and no seat is taken;
        an app thread unused for IDLE_SECONDS retires (one per RETIRE_EVERY)."""
        busy = self.busy()
        if self.host.offloading and now >= self.offload_until and not busy \
                and not self.waiting:
            self.host.offloading = False
        if self.alive - 1 <= busy:
            self.retire_at = now + IDLE_SECONDS   # every app thread has work
        elif now >= self.retire_at:
            self.alive -= 1
            self.jobs.put(RETIRE)
            self.retire_at = now + RETIRE_EVERY

    def busy(self) -> int:
        """App calls running on threads."""
        return self.limit - len(self.free_seats)

    # -- an app thread's side -----------------------------------------------------
    def post(self, ex):
        """Tell the loop that ex has news (once until it reads them)."""
        if not ex.posted:
            ex.posted = True
            self.mail.append(ex)
            os.eventfd_write(self.wakeup_fd, 1)

    def push(self, ex, kind, value=None, size=0):
        """One event for the loop; past HIGH_WATER, wait for it to take them.
        The last one (WHOLE, FILE, END, ERROR) comes after free(): it wakes
        the loop for both."""
        if ex.cancelled:
            raise ClientGone()
        ex.inbox.append((kind, value))
        if size:
            ex.pushed += size
        self.post(ex)
        if size and ex.pushed - ex.taken > HIGH_WATER:
            self.wait_drained(ex)

    def wait_drained(self, ex):
        if not ex.write_deadline:
            ex.write_deadline = time.monotonic() + self.host.send_timeout
        event = ex.drained
        if event is None:
            event = ex.drained = threading.Event()
        while ex.pushed - ex.taken > HIGH_WATER:
            if ex.cancelled:
                raise ClientGone()
            left = ex.write_deadline - time.monotonic()
            if left <= 0:
                ex.gave_up = True
                self.post(ex)
                raise ClientGone("send timeout")
            event.wait(left)
            event.clear()

    def push_data(self, ex, data):
        """PEP 3333 write(), from an app thread."""
        if type(data) is not bytes and not isinstance(data, (bytearray, memoryview)):
            raise AppError(f"write() takes bytes, not {type(data).__name__}")
        if data:
            self.push(ex, DATA, bytes(data), len(data))

    def run(self, ex, app):
        """An offloaded request: the app's call and all its app code."""
        try:
            result = app(ex.environ, ex)
        except ClientGone:
            return self.last(ex, None)
        except HttpError as exc:
            return self.last(ex, ERROR, exc)
        except Exception:
            return self.last(ex, ERROR, app_error())
        self.carry(ex, result)

    def carry_on(self, step):
        """The detached thread goes on with its exchange, then with jobs."""
        ex, kind, value = step.exchange, step.kind, step.value
        if kind is RUN:
            self.run(ex, value)
        elif kind is RESULT:
            self.carry(ex, value)
        elif kind is CHUNK:
            self.iterate(ex, value)
        elif kind is STOP:
            self.end(ex)
        else:
            self.close_result(ex)
            self.last(ex, ERROR, value)

    def carry(self, ex, result):
        """What the app returned: a body in hand, a file, or an iterable."""
        if type(result) is list or type(result) is tuple:
            return self.last(ex, WHOLE, result)
        if isinstance(result, FileWrapper) and sendable(result):
            return self.last(ex, FILE, result)   # the loop sends it, then closes it
        try:
            ex.take_iterable(result)
        except AppError as exc:
            return self.last(ex, ERROR, exc)
        self.iterate(ex, None)

    def iterate(self, ex, first):
        try:
            if first:
                self.push(ex, DATA, first, len(first))
            for data in ex.iterator:
                if data:
                    self.push(ex, DATA, data, len(data))
        except ClientGone:
            self.close_result(ex)
            return self.last(ex, None)
        except HttpError as exc:
            self.close_result(ex)
            return self.last(ex, ERROR, exc)
        except Exception:
            error = app_error()
            self.close_result(ex)
            return self.last(ex, ERROR, error)
        self.end(ex)

    def end(self, ex):
        self.close_result(ex)
        self.last(ex, END)

    def close_result(self, ex):
        close = getattr(ex.result, "close", None)
        ex.result = None   # the loop closes only a file it sends
        if close is not None:
            try:
                close()
            except Exception:
                ex.inbox.append((PROBLEM, traceback.format_exc().rstrip()))

    def last(self, ex, kind, value=None):
        """This thread's app code for ex is over: its seat goes back, with
        the exchange's last event (kind None: none, the loop ended it). One
        wake for both: a post still pending is read after this seat (deliver
        looks at the freed seats again after the mail)."""
        self.freed.append((ex.seat, time.monotonic() - ex.started))
        if kind is None or ex.cancelled:
            os.eventfd_write(self.wakeup_fd, 1)
            return
        ex.inbox.append((kind, value))
        self.post(ex)

