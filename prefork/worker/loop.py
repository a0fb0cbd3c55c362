"""One worker process: boots the app, then serves connections with epoll.

Owns: its connections (which to close to make room, at max_connections or out
of descriptors; an https:// listener's are wrapped in its generation's TLS
context at accept), its scoreboard slot, its local counters and access-log
batch. Runs after fork and never returns into the master's stack (os._exit).
Must not: write files other than through its log batch, or touch other slots.

Report pipe: the worker writes b"OK\n" to it once the app is imported and it
is ready to accept, or b"FAIL\n" + the traceback, then exits with BOOT_FAILED.
Afterwards the same pipe carries stack dumps (faulthandler, on DUMP_SIGNAL) and
a last traceback if the worker crashes: it reaches the master even when the
log channel does not. Connections see the worker only as a ConnectionHost.

Signals: TERM = graceful (stop accepting, finish in-flight requests, answer
keep-alive clients with Connection: close); INT, QUIT = exit now; USR1 = the
server drains (the health path answers 503); USR2 = write every thread's stack.

With [workers] threads > 1 the loop may move between threads (threads.py): it
runs on whichever thread leads, and everything this module owns is touched by
that thread alone (or by the thread committing a detach while the loop's
thread is stuck in an app call). App threads reach the loop through the mail.
"""
from __future__ import annotations

import collections
import errno
import faulthandler
import grp
import logging
import os
import pwd
import select
import signal
import socket
import time
import traceback

from setproctitle import setproctitle

from .. import scoreboard as sb
from .. import title
from ..templates import Templates
from ..http.proxy import Networks
from ..http.response import http_date
from ..ipc import die_with_parent
from ..signals import DRAIN_SIGNAL, DUMP_SIGNAL, SignalInbox
from ..sockets import queue_depth
from ..stats import WorkerStats
from .connection import Connection
from .http2 import Http2Connection
from .dispatch import Health, compose, load_app
from .readycheck import run_ready_check
from ..tls import environ_facts, failure_reason
from .logship import AccessLog, install_worker_logging
from .static import StaticFiles
from .status import StatusApp
from .threads import LEAD, AppThreads
from .wsgi import ErrorStream, spool_opener

BOOT_FAILED = 3
ACCEPT_BATCH = 64
TICK_SECONDS = 0.5
FRESH_SECONDS = 0.002   # a ready list older than this is refreshed mid-round
IDLE_GRACE = 1.0   # seconds an idle keep-alive connection survives a graceful stop
ACCEPT_PAUSE = 0.5   # seconds without accepting after running out of descriptors (as nginx)
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
log = logging.getLogger("prefork.worker")
monotonic = time.monotonic
EPOLLIN = select.EPOLLIN


def worker_uid(user: str):
    """The uid workers switch to ([server] user, when started as root), else None."""
    if not user or os.geteuid() != 0:
        return None
    return pwd.getpwnam(user).pw_uid


def drop_privileges(user: str, group: str) -> None:
    """Become [server] user/group (only when started as root, after binding)."""
    if not user and not group:
        return
    if os.geteuid() != 0:
        log.warning("user/group set but not running as root: keeping uid %d", os.geteuid())
        return
    uid = pwd.getpwnam(user).pw_uid if user else os.getuid()
    gid = grp.getgrnam(group).gr_gid if group else (pwd.getpwnam(user).pw_gid if user else os.getgid())
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


class Worker:
    def __init__(self, config, listeners, scoreboard, slot, generation, master_pid, sink,
                 batches=None, tls=None):
        self.config = config
        self.listeners = {sock.fileno(): sock for sock in listeners}
        # Each listener's own address, for its connections' environ: asked
        # once here rather than by a getsockname() per connection.
        self.local_addresses = {sock: sock.getsockname() for sock in self.listeners.values()}
        self.tls = tls or {}             # listener fd -> its generation's SSLContext
        self.scoreboard = scoreboard
        self.slot = slot
        (self._slot_mem, self._begin_at, self._pack_begin,
         self._end_at, self._pack_end) = scoreboard.request_writers(slot)
        self.generation = generation
        self.master_pid = master_pid
        self.sink = sink                 # where stats deltas and log batches go
        self.http = config.http          # limits for the reader, timeouts for connections
        self.send_timeout = config.http.send_timeout
        self.open_spool = spool_opener(config.http.spool_dir)
        self.threads = None              # AppThreads, once booted with threads > 1
        self.claims = []                 # the inline app call in progress (AppThreads')
        self.offloading = False          # AppThreads says: complete requests go to app threads
        self.full = False                # every seat taken: no accepting
        self.report_fd = -1
        self.exited_children = set()     # children found exited at the last tick
        self.script_name = config.server.script_name
        self.trusted = Networks(config.proxy.trusted)
        self.proxy_protocol = config.proxy.proxy_protocol
        self.http2 = config.http2        # [http2]: the streams' limits
        self.h2c = config.http2.cleartext and config.speaks_h2
        self.http2_streams = 0           # streams being answered, all connections together
        self.http2_open = 0              # HTTP/2 connections
        self.draining = False            # health answers 503 ([workers] drain_time)
        self.server_name = config.http.server_header
        self.conns = {}
        self.stopping = False
        self.stop_deadline = 0.0
        self.declined = False
        self.listening = True            # listeners registered with the poller
        self.accept_paused_until = 0.0   # out of descriptors: no accepts until then
        self.accept_failures = 0         # since the last report
        self.now = time.monotonic()
        self.tick_seconds = min(TICK_SECONDS, config.status.interval)
        self._next_tick = 0.0
        self.stats = WorkerStats(os.getpid())
        self.batches = batches           # ipc.LogBatches the master mapped (None: our own)
        self.access_log = AccessLog(config.logging, sink,
                                    batches.access if batches is not None else None)
        self.log_handler = None
        self.wsgi_errors = ErrorStream(logging.getLogger("prefork.app"))
        self.requests = 0
        self.app = None
        self.collect = config.status.statistics
        self.templates = Templates(config.site.templates)
        self._error_pages = {}
        self.poller = None
        self.inbox = None
        self._date_until = 0.0   # monotonic time of the wall clock's next second
        self.date = ""
        self.fixed_headers = b""
        self._refresh_date(time.time())

    # -- boot -----------------------------------------------------------------
    def boot(self, report_fd):
        self.report_fd = report_fd
        setproctitle(title(f"worker {self.slot}", self.config.server.name))
        die_with_parent()   # a master killed with -9 leaves no worker holding the port
        self.inbox = SignalInbox([signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, DRAIN_SIGNAL])
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.scoreboard.claim(self.slot, os.getpid(), self.generation, time.monotonic())
        faulthandler.register(DUMP_SIGNAL, file=report_fd, all_threads=True, chain=False)
        try:
            self.sink.connect()
            self.log_handler = install_worker_logging(
                self.sink, self.config.logging.level,
                self.batches.error if self.batches is not None else None)
            drop_privileges(self.config.server.user, self.config.server.group)
            os.environ.update(self.config.env)   # [env]: before the app reads them
            if self.config.server.chdir:
                os.chdir(self.config.server.chdir)
            app = load_app(self.config.server.app,
                           self.config.server.pythonpath + (self.config.server.base,))
            use_templates = getattr(app, "use_templates", None)   # the built-in apps' hook
            if callable(use_templates):
                use_templates(self.templates)
            status = (StatusApp(self.config.status, self.sink, self.scoreboard, self.templates)
                      if self.config.serves("status") else None)
            static = (StaticFiles(self.config.static, self.templates)
                      if self.config.serves("static") else None)
            health = (Health(self.config.status.health, lambda: self.draining)
                      if self.config.status.health else None)
            self.app = compose(app, status, static, health)
            if self.config.workers.ready_check:   # what a first client would meet
                run_ready_check(self.app, self.config.workers.ready_check, self.config.http,
                                next(iter(self.listeners.values())), self.wsgi_errors,
                                self.script_name, self.config.workers.threads > 1)
        except BaseException:
            os.write(report_fd, b"FAIL\n" + traceback.format_exc().encode("utf-8", "replace"))
            os._exit(BOOT_FAILED)
        self.poller = select.epoll()
        self.poller.register(self.inbox.wakeup_fd, select.EPOLLIN)
        for fd in self.listeners:
            self.poller.register(fd, select.EPOLLIN)
        if self.config.workers.threads > 1:
            self.threads = AppThreads(self, self.config.workers.threads)
            self.claims = self.threads.claims
            self.poller.register(self.threads.wakeup_fd, select.EPOLLIN)
            self.threads.begin()
            self.threads_changed()
        self.scoreboard.set_state(self.slot, sb.IDLE)
        os.write(report_fd, b"OK\n")

    def run(self):
        """Serve until the worker exits (never returns)."""
        if self.threads is None:
            self.lead()
        self.threads.work(LEAD)   # the main thread leads first, then whatever comes

    def lead(self):
        """The loop, on whichever thread leads it; a thread whose inline app
        call is detached leaves it by threads.Detached."""
        self.serve()
        self.exit(0)

    def crashed(self):
        """The exception being handled ends the worker: the report pipe reaches
        the master even when our log batch cannot."""
        report = f"worker crashed:\n{traceback.format_exc()}".encode("utf-8", "replace")
        try:
            os.write(self.report_fd, report)
        except OSError:
            pass
        os._exit(1)

    # -- the loop -------------------------------------------------------------
    def serve(self):
        """Each poll's ready events form a queue served in order (serve_round)."""
        poll = self.poller.poll
        while True:
            self.serve_round(poll(self.tick_seconds))
            if self.stopping and not self.conns:
                return

    def serve_round(self, events):
        """Serve one poll's ready events. While the queue is being served,
        events older than FRESH_SECONDS are refreshed: a connection that
        became ready just after the poll (typically the one answered last,
        whose client sent its next request a moment later) joins this round
        instead of waiting a whole round of slow requests."""
        listeners = self.listeners
        conns = self.conns
        polled_at = self.clock()
        # Accept first: a connection waiting in the listen queue should not
        # also wait behind every request of this round (its own request
        # joins the round at the next refresh, or comes next round).
        queue = collections.deque()
        for fd, _ in events:
            if fd in listeners:
                self.accept(listeners[fd])
            else:
                queue.append(fd)
        while queue:
            fd = queue.popleft()
            # The dispatch, inline: it runs once per request.
            conn = conns.get(fd)
            if conn is not None:
                if conn.events == EPOLLIN:
                    conn.on_readable()
                else:
                    conn.on_writable()
            elif self.threads is not None and fd == self.threads.wakeup_fd:
                self.threads.deliver()
            elif fd == self.inbox.wakeup_fd:
                self.on_signals(self.inbox.drain())
            if queue and monotonic() - polled_at > FRESH_SECONDS:
                polled_at = self.clock()
                queued = set(queue)   # made only here: a refresh is rare, a request is not
                for fd, _ in self.poller.poll(0):
                    if fd in listeners:
                        self.accept(listeners[fd])
                    elif fd not in queued:
                        queue.append(fd)
                        queued.add(fd)
                self.tick_if_due(spare=queued)   # a busy round still beats
        if self.now >= self._next_tick:   # checked here first: most rounds are not due
            self.tick_if_due()

    def clock(self) -> float:
        """Read once per round. The Date line changes with the wall clock's
        second, which the monotonic clock tells without a second clock call
        per round (they are aligned again at each change)."""
        self.now = now = time.monotonic()
        if now >= self._date_until:
            self._refresh_date(time.time())
        return now

    def tick_if_due(self, spare=frozenset()):
        if self.now >= self._next_tick:
            self._next_tick = self.now + self.tick_seconds
            self.tick(self.now, spare)

    def _refresh_date(self, wall):
        self._date_until = time.monotonic() + (int(wall) + 1 - wall)
        self.date = http_date(wall)
        self.fixed_headers = f"Server: {self.server_name}\r\nDate: {self.date}\r\n".encode("latin-1")
        self.fixed_fields = [(b"server", self.server_name.encode("latin-1")),
                             (b"date", self.date.encode("latin-1"))]   # HTTP/2's
        self.access_log.set_time(wall)

    def accept(self, listener, everything=False):
        """Take this worker's fair share of waiting connections: a connection
        stays with the worker that accepts it, so a worker that grabbed a
        whole burst would make its clients wait while its peers idle. The
        share is (open connections everywhere + the listen queue) / workers.
        Declining is allowed once in a row, so a busy peer never strands one.
        everything: take the whole queue (up to ACCEPT_BATCH; a stopping worker's)."""
        share = self.fair_share(listener) if not everything else float("inf")
        fresh = 0
        room = self.config.workers.max_connections - len(self.conns)
        relieved = False
        while fresh < min(ACCEPT_BATCH, room) and (len(self.conns) < share
                                                   or (self.declined and not fresh)):
            try:
                sock, addr = listener.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno not in OUT_OF_DESCRIPTORS:
                    break
                waiting = queue_depth(listener)[0]
                if not relieved and self.make_room(min(max(waiting, ACCEPT_BATCH // 4),
                                                       ACCEPT_BATCH)):
                    relieved = True   # descriptors freed: try again, once
                    continue
                self.pause_accepting(exc)
                break
            sock.setblocking(False)
            if type(addr) is tuple:   # TCP (see Connection: not sock.family)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls:
                context = self.tls.get(listener.fileno())
                if context is not None:   # its handshake runs in the loop, as its reads will
                    sock = context.wrap_socket(sock, server_side=True,
                                               do_handshake_on_connect=False)
            conn = Connection(self, sock, addr, self.local_addresses[listener])
            self.conns[conn.fd] = conn
            self.poller.register(conn.fd, select.EPOLLIN)   # its request: next turn
            conn.on_accepted()
            fresh += 1
        self.declined = not fresh
        if fresh:
            self.stats.connections_accepted += fresh
            self.scoreboard.set_connections(self.slot, len(self.conns))
        if len(self.conns) >= self.config.workers.max_connections:
            self.listen(False)   # the listen queue holds the rest, or a peer takes them

    def make_room(self, wanted) -> int:
        """Close up to `wanted` connections nobody is being served on (see
        Connection.evictable: lingering, then idle, the longest idle first,
        then requests arriving, the slowest first), for new ones: -> how many.
        Never one whose request the app runs or whose answer is going out."""
        now = self.now
        ranked = sorted((key, fd) for fd, key in
                        ((fd, conn.evictable(now)) for fd, conn in self.conns.items())
                        if key is not None)
        victims = [self.conns[fd] for _, fd in ranked[:wanted]]
        for conn in victims:
            conn.close()
        self.stats.evicted += len(victims)
        return len(victims)

    def relieve(self):
        """At max_connections with clients waiting in the listen queue and
        every peer as full: room for them (the tick looks, as the listeners
        are not watched meanwhile)."""
        for listener in self.listeners.values():
            waiting = queue_depth(listener)[0]
            if waiting and self.fair_share(listener) > len(self.conns):
                self.make_room(min(waiting, ACCEPT_BATCH))   # closed() listens again

    def accepting(self, room):
        """The app threads' seats: all taken (no room) or some free again. A
        worker that cannot run a request now leaves new connections in the
        listen queue for a peer that can."""
        self.full = not room
        if not room:
            self.listen(False)
        elif not self.accept_paused_until \
                and len(self.conns) < self.config.workers.max_connections:
            self.listen(True)

    def listen(self, on):
        """Watch the listeners or not: a worker that cannot accept must not be
        woken by them (level-triggered epoll would spin on a waiting queue).
        Every idle worker wakes for a new connection and all but one find
        nothing to accept. EPOLLEXCLUSIVE would wake one, but always the
        same one while it is idle, and a worker over its fair share (accept)
        could no longer leave a connection to a peer that was never woken."""
        if on == self.listening:
            return
        self.listening = on
        for fd in self.listeners:
            if on:
                self.poller.register(fd, select.EPOLLIN)
            else:
                self.poller.unregister(fd)

    def pause_accepting(self, exc):
        """Out of descriptors: stop accepting for ACCEPT_PAUSE; the tick
        resumes and reports how often it happened (not once per failure)."""
        self.accept_failures += 1
        if not self.accept_paused_until:
            self.accept_paused_until = self.now + ACCEPT_PAUSE
            self.listen(False)
            if self.accept_failures == 1:
                log.error("accept failed: %s; pausing accepts for %gs", exc.strerror, ACCEPT_PAUSE)

    def resume_accepting(self, now):
        if self.accept_paused_until and now >= self.accept_paused_until:
            self.accept_paused_until = 0.0
            if len(self.conns) < self.config.workers.max_connections and not self.full:
                self.listen(True)

    def fair_share(self, listener) -> int:
        # Read fresh on every call: during a burst, a count even a few
        # milliseconds old lets the first worker to wake take too many.
        total, workers = self.scoreboard.serving_connections()
        waiting = queue_depth(listener)[0] or 1
        return -(-(total + waiting) // max(1, workers))   # ceiling division

    def tick(self, now, spare=frozenset()):
        """spare: connections queued to be served this round; their deadline
        is judged after they are served."""
        self.scoreboard.heartbeat(self.slot, now)
        if self.stopping and now >= self.stop_deadline:
            self.cut_at_deadline()
        for conn in [c for c in self.conns.values() if c.deadline <= now and c.fd not in spare]:
            conn.on_deadline()
        self.resume_accepting(now)
        if not self.listening and not self.accept_paused_until and not self.stopping \
                and len(self.conns) >= self.config.workers.max_connections:
            self.relieve()
        if self.threads is not None:
            self.threads.tick(now)
            self.threads_changed()   # threads started and retired meanwhile
        self.exited_children = reap_children(self.exited_children)
        if self.stats.due(now, self.config.status.interval):
            if self.accept_failures > 1:
                log.error("accept failed %d more time(s) for want of file descriptors",
                          self.accept_failures - 1)
            self.accept_failures = 0
            # One line per interval for what the interval's counters hold.
            failed = self.stats.tls_failures
            if failed:
                log.warning("%d TLS handshake(s) failed (%s)", sum(failed.values()),
                            ", ".join(f"{k} {v}" for k, v in sorted(failed.items())))
            if self.stats.evicted:
                log.warning("closed %d connection(s) to make room for new ones (idle ones "
                            "first, then the slowest requests)", self.stats.evicted)
            self.flush_logs()
            self.sink.ship_stats(self.stats.take_delta(
                now, len(self.conns), self.sink.take_lost_lines(),
                sum(1 for conn in self.conns.values() if conn.tls) if self.tls else 0,
                self.http2_open))
        if os.getppid() != self.master_pid:
            log.error("master %d is gone; worker %d exits", self.master_pid, os.getpid())
            self.exit(1)

    def on_signals(self, signums):
        for signum in signums:
            if signum == DRAIN_SIGNAL:
                self.draining = True   # health says 503; serving goes on
            elif signum == signal.SIGTERM:
                self.begin_graceful_stop()
            else:
                self.exit(0)

    def begin_graceful_stop(self):
        if self.stopping:
            return
        self.stopping = True
        self.stop_deadline = self.now + self.config.workers.graceful_timeout
        self.scoreboard.set_state(self.slot, sb.STOPPING)
        # Connections already in the listen queue were accepted by the kernel
        # on our behalf: serve them all (not a fair share: the peers may be
        # stopping too) rather than let them be reset when the listener closes.
        for sock in self.listeners.values():
            before = -1
            while before != len(self.conns) < self.config.workers.max_connections:
                before = len(self.conns)
                self.accept(sock, everything=True)
        self.listen(False)
        for sock in self.listeners.values():
            sock.close()
        self.listeners.clear()
        # Idle connections get IDLE_GRACE (see wind_down); HTTP/2 ones a GOAWAY.
        for conn in list(self.conns.values()):
            conn.wind_down(self.now + IDLE_GRACE)

    def cut_at_deadline(self):
        in_flight = sum(1 for c in self.conns.values() if c.in_flight())
        log.warning("graceful stop: graceful_timeout (%gs) reached; cutting %d connection(s), "
                    "%d with a request in flight", self.config.workers.graceful_timeout,
                    len(self.conns), in_flight)
        for conn in list(self.conns.values()):
            conn.close()

    def flush_logs(self):
        self.access_log.flush()
        if self.log_handler is not None:
            self.log_handler.flush()

    def exit(self, code):
        self.flush_logs()
        self.sink.ship_stats(self.stats.take_delta(time.monotonic(), 0, self.sink.take_lost_lines()))
        self.sink.close()
        os._exit(code)

    # -- the ConnectionHost interface (connection.py) ------------------------------
    def modify(self, fd, events):
        self.poller.modify(fd, events)

    def register(self, fd, events):
        self.poller.register(fd, events)

    def park(self, fd):
        self.poller.unregister(fd)

    def tls_failed(self, exc) -> str:
        """A handshake failed (exc None: it did not finish in time): counted
        by reason, logged once per interval. -> the reason."""
        reason = failure_reason(exc) if exc is not None else "timeout"
        failures = self.stats.tls_failures
        failures[reason] = failures.get(reason, 0) + 1
        return reason

    def tls_ready(self, template, sock) -> dict:
        """A handshake finished: counted; -> the environ template for the
        connection's requests (the listener's, with what TLS tells)."""
        self.stats.tls_handshakes += 1
        environ = dict(template)
        environ.update(environ_facts(sock))
        return environ

    def speak_h2(self, conn, template, first):
        """conn's client speaks HTTP/2 (ALPN h2, or the preface from a trusted
        peer): an Http2Connection takes its socket, in its place."""
        h2conn = Http2Connection(self, conn.sock, conn.remote, template, conn.believed)
        self.conns[conn.fd] = h2conn
        h2conn.events = conn.events
        h2conn.start(first)

    def http2_opened(self):
        self.stats.http2_connections += 1
        self.http2_open += 1

    def http2_closed(self):
        self.http2_open -= 1

    def http2_stream(self, began):
        """A stream begins to be answered (began) or ends: the worker's cap
        ([http2] max_worker_streams) counts the ones open."""
        if began:
            self.http2_streams += 1
            self.stats.http2_streams += 1
        else:
            self.http2_streams -= 1

    def http2_resets(self, count):
        self.stats.http2_resets += count

    def http2_goaway(self, reason):
        goaways = self.stats.http2_goaways
        goaways[reason] = goaways.get(reason, 0) + 1

    def closed(self, conn, received):
        self.stats.bytes_in += received
        if self.conns.pop(conn.fd, None) is not None:
            try:
                self.poller.unregister(conn.fd)
            except FileNotFoundError:   # parked
                pass
            self.scoreboard.set_connections(self.slot, len(self.conns))
            if not self.listening and not self.accept_paused_until and not self.full:
                self.listen(True)

    def begin_request(self, request):
        # struct's "s" fields truncate: a long target costs nothing extra.
        self._slot_mem[self._begin_at] = self._pack_begin(sb.BUSY, self.now,
                                                          request.method.encode(), request.target)
        return self.now

    def end_request(self, exchange, status, received):
        duration = monotonic() - exchange.started
        self.requests += 1
        self._slot_mem[self._end_at] = self._pack_end(self.requests, status, duration, sb.IDLE)
        stats = self.stats
        stats.bytes_in += received
        if self.collect:
            stats.record(status, exchange.sent, duration)
        if exchange.environ is not None:
            self.access_log.record(exchange.environ, status, exchange.sent, duration)

    def leave_app(self, exchange, kind, value):
        """The inline app code of exchange returned (kind: how): give up its
        claim, or find that it was detached (threads.Detached is raised)."""
        try:
            self.claims.remove(exchange)
        except ValueError:
            self.threads.detached(exchange, kind, value)

    def detached(self, exchange, kind, value):
        self.threads.detached(exchange, kind, value)

    def seat_taken(self, seat, exchange):
        """An app thread takes exchange: the scoreboard shows it there, and
        the loop, which began it, as free again."""
        self.scoreboard.seat_busy(self.slot, seat, exchange.started, exchange.method.encode(),
                                  exchange.target, exchange.environ["REMOTE_ADDR"].encode())
        self.scoreboard.set_state(self.slot, sb.STOPPING if self.stopping else sb.IDLE)

    def seat_freed(self, seat):
        self.scoreboard.seat_idle(self.slot, seat)

    def threads_changed(self):
        """The app threads' figures, as the scoreboard shows them."""
        threads = self.threads
        self.scoreboard.set_threads(self.slot, threads.limit, threads.alive - 1, threads.busy(),
                                    len(threads.waiting), threads.waits, threads.detaches)

    def app_problem(self, exchange, text):
        self.stats.app_exceptions += 1
        environ = (exchange.environ if exchange is not None else None) or {}
        log.error("app error on %s %s:\n%s", environ.get("REQUEST_METHOD", "?"),
                  environ.get("RAW_URI", "?"), text)

    def on_rejected(self, status, received, environ):
        self.stats.bytes_in += received
        self.stats.record_rejected(status)
        self.access_log.record(environ, status, len(self.error_page(status)), 0.0)

    def on_timeout(self):
        self.stats.timeouts += 1

    def error_page(self, status):
        """templates/error.html rendered once per status (bytes). Rendering
        needs files and imports (jinja2 is imported on first use, to keep it
        out of idle workers), which a worker out of descriptors cannot have:
        then a plain page is sent, and rendering is tried again next time."""
        page = self._error_pages.get(status)
        if page is None:
            try:
                page = self._error_pages[status] = self.templates.render_error(status).encode()
            except Exception:   # out of descriptors, memory...: never a crash
                page = f"<!doctype html><title>{status}</title><h1>{status}</h1>\n".encode()
        return page


def reap_children(seen: set) -> set:
    """Children the app forked and left behind would pile up as zombies: the
    worker reaps a child found exited at two ticks in a row, so that an app
    thread waiting for its own child (subprocess.run) gets it first. seen:
    what the last tick found; -> what this one found. (An app that polls a
    subprocess.Popen across ticks may then see returncode 0, as Python
    reports a child it cannot wait for.)"""
    found = set()
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return found
        if info is None:
            return found
        if info.si_pid not in seen:
            found.add(info.si_pid)   # the next tick reaps it, if nobody did
            return found
        try:
            os.waitpid(info.si_pid, os.WNOHANG)
        except ChildProcessError:
            pass


def run(config, listeners, scoreboard, slot, generation, master_pid, report_fd, sink,
        batches=None, tls=None):
    """Entry point in the forked child. Never returns."""
    code = 0
    try:
        worker = Worker(config, listeners, scoreboard, slot, generation, master_pid, sink,
                        batches, tls)
        worker.boot(report_fd)
        worker.run()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        # The report pipe reaches the master even when our log batch cannot.
        report = f"worker crashed:\n{traceback.format_exc()}".encode("utf-8", "replace")
        try:
            os.write(report_fd, report)
        except OSError:
            pass
        code = 1
    finally:
        os._exit(code)
