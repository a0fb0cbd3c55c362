"""The Manager: queues from workers to the master, and the published snapshot.

Owns: the Manager server process (a child of the master, supervised by it like
a worker), its address (a unix socket at a fixed path in a private directory,
so a replacement Manager is found where the last one was), the stats-delta
queue, the log-batch queue (messages are (ACCESS or ERROR, text) pairs, lines
in LINE_FORMAT for the error log), the board holding the master's latest
snapshot, what is held back or lost while the Manager is away, and the
shared batches (SharedBatch) where a worker's log lines wait to be shipped,
so that a worker killed by a signal loses none: the master writes what it
left there.

Rules:
- No process waits on the Manager longer than CALL_TIMEOUT: every client socket
  to it has kernel send/receive timeouts (SO_SNDTIMEO/SO_RCVTIMEO), so a stopped
  or hung Manager turns into an OSError, never a stall. After one, the
  connection is dropped (it may be out of step) and made again later.
- The master replaces a Manager that died or timed out (MasterChannels.check);
  workers reconnect by themselves at most every RECONNECT_EVERY seconds.
- While the Manager is away a worker keeps its unshipped stats, and its log
  lines stay in their shared batches (SharedBatch: ACCESS_BATCH_BYTES and
  ERROR_BATCH_BYTES per worker) and are shipped afterwards; lines that find a
  batch full are counted (StatsDelta.lost_lines) and reported, never
  silently dropped.
- Log batches are (kind, text, pid, lines of that kind shipped before it): a
  Manager that dies with batches in its queue leaves a gap the master counts
  (LineLedger), and what of a batch was written already is not written
  again: a batch sent twice (its answer timed out, but it had arrived; or it
  arrived and its worker died before clearing its shared batch), or sent
  again with the lines added since (only those are written).
- The Manager holds no listening socket and no log file (they are closed in it
  at start), ignores the signals meant for the master's process group, and
  dies with the master (PR_SET_PDEATHSIG).
- Workers receive only plain data across the fork and connect their own
  proxies afterwards. One message per worker per interval, never per request.
Must not: be called from a signal handler.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import queue
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
from multiprocessing.managers import BaseManager, BaseProxy

log = logging.getLogger("prefork.ipc")
DRAIN_LIMIT = 1000   # messages per queue per master tick
ACCESS, ERROR = "access", "error"   # which log a batch goes to
LINE_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(message)s"   # every error-log line
CALL_TIMEOUT = 0.5        # seconds any call to the Manager may block
RECONNECT_EVERY = 1.0     # seconds between a worker's reconnection attempts
RESTART_EVERY = 1.0       # seconds between the master's Manager restarts
ACCESS_BATCH_BYTES = 1 << 20   # a worker's access lines not yet shipped, at most
ERROR_BATCH_BYTES = 256 << 10   # ... and its error-log lines
PR_SET_PDEATHSIG = 1


def _bounded_client(address):
    """multiprocessing.connection.SocketClient with kernel timeouts: a Manager
    that stops answering raises BlockingIOError after CALL_TIMEOUT instead of
    blocking its caller forever (multiprocessing reads with plain os.read)."""
    family = multiprocessing.connection.address_type(address)
    with socket.socket(getattr(socket, family)) as sock:
        seconds = int(CALL_TIMEOUT)
        timeval = struct.pack("ll", seconds, int((CALL_TIMEOUT - seconds) * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        sock.setblocking(True)
        sock.connect(address)
        return multiprocessing.connection.Connection(sock.detach())


# Clients of prefork's own Manager (proxies, Hub.connect) go through the
# bounded client, and only they: an app's own multiprocessing Manager in a
# worker keeps multiprocessing's plain client. multiprocessing looks
# SocketClient up at call time, so the choice is made per address.
_plain_client = multiprocessing.connection.SocketClient
_bounded_addresses: set = set()


def _client(address):
    if address in _bounded_addresses:
        return _bounded_client(address)
    return _plain_client(address)


multiprocessing.connection.SocketClient = _client


class _Board:
    """Holds the latest published snapshot (lives in the Manager process)."""

    def __init__(self):
        self._value = {}

    def set(self, value):
        self._value = value

    def get(self):
        return self._value


_stats_queue: queue.Queue = queue.Queue()
_logs_queue: queue.Queue = queue.Queue()
_board = _Board()


class Hub(BaseManager):
    pass


Hub.register("stats_queue", callable=lambda: _stats_queue)
Hub.register("logs_queue", callable=lambda: _logs_queue)
Hub.register("board", callable=lambda: _board, exposed=("get", "set"))


def _manager_init(inherited_fds, name):
    # The master's process group gets Ctrl-C and TERM; the master decides when
    # the Manager stops, so it must outlive the workers' last shipments.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1,
                   signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(signum, signal.SIG_IGN)
    die_with_parent()
    for fd in inherited_fds:   # listeners, log files, the control socket...
        try:
            os.close(fd)
        except OSError:
            pass
    # The socket's own mode lets anyone connect; the private directory
    # (0700, owned by the workers' user) decides who can reach it.
    os.umask(0)
    multiprocessing.current_process().name = "prefork-manager"
    from setproctitle import setproctitle

    from . import title
    setproctitle(title("manager", name))


def die_with_parent(signum=signal.SIGKILL) -> None:
    """Ask the kernel to send signum when the process that forked us dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    except (OSError, AttributeError):   # pragma: no cover - Linux has prctl
        pass


def _forget_connections(address):
    """Proxies share one cached connection per Manager address (a class
    attribute, inherited through fork): drop it, so the next call connects
    afresh (after a fork, or to a replacement Manager at the same address)."""
    BaseProxy._address_to_local.pop(address, None)


def _abandon(*proxies):
    """Drop proxies of a Manager that failed without telling any Manager.
    A proxy decrements its object's count when collected; every Manager is
    forked from the master, so its objects have the same ids as the last
    one's, and a stale decrement would free them under the live proxies."""
    for proxy in proxies:
        close = getattr(proxy, "_close", None)
        if close is not None:
            close.cancel()


class SharedBatch:
    """Log text of one kind that a worker has not shipped yet, in memory its
    master mapped before the fork. The worker appends lines and, once the
    Manager took them, clears it; a worker killed by a signal leaves its
    lines here, and the master writes them (its leftover()). Header: the
    bytes used, and the lines of this kind shipped before this text (the
    LineLedger's numbering: text that did reach the Manager is not written
    twice). _combined.c writes access lines straight into it
    (combined_into); the header's layout is shared with it."""
    HEADER = struct.Struct("=QQ")

    def __init__(self, size: int, encoding: str):
        self.encoding = encoding        # latin-1 for access lines (as environ values are)
        self.mem = mmap.mmap(-1, self.HEADER.size + size)   # MAP_SHARED: survives fork
        self.capacity = size

    # -- the worker's side ---------------------------------------------------
    def append(self, text: str) -> bool:
        """False when it does not fit (nothing is written then)."""
        data = text.encode(self.encoding, "backslashreplace")
        used, before = self.HEADER.unpack_from(self.mem, 0)
        if used + len(data) > self.capacity:
            return False
        start = self.HEADER.size + used
        self.mem[start:start + len(data)] = data
        self.HEADER.pack_into(self.mem, 0, used + len(data), before)
        return True

    def text(self) -> str:
        used = self.HEADER.unpack_from(self.mem, 0)[0]
        return self.mem[self.HEADER.size:self.HEADER.size + used].decode(self.encoding)

    def shipped(self, before: int) -> None:
        """The text went to the Manager; `before` lines of this kind in all now."""
        self.HEADER.pack_into(self.mem, 0, 0, before)

    # -- the master's side, after the worker is gone -----------------------------
    def leftover(self) -> tuple:
        """(lines shipped before it, text the worker did not ship)."""
        before = self.HEADER.unpack_from(self.mem, 0)[1]
        return before, self.text()

    def close(self) -> None:
        self.mem.close()


class LogBatches:
    """A worker's two shared batches, made by the master before the fork."""

    def __init__(self):
        self.access = SharedBatch(ACCESS_BATCH_BYTES, "latin-1")
        self.error = SharedBatch(ERROR_BATCH_BYTES, "utf-8")

    def items(self):
        return ((ACCESS, self.access), (ERROR, self.error))

    def close(self):
        self.access.close()
        self.error.close()


class LineLedger:
    """Master side: every log line lost to a Manager outage, counted once:
    those a worker had to drop (its batch was full) and those a Manager died
    with (a gap in a worker's numbering of a kind); repeats are dropped."""

    def __init__(self):
        self.expected: dict[tuple, int] = {}   # (pid, kind) -> the next line's number
        self.lost = 0

    def fresh(self, pid: int, kind: str, before: int, text: str) -> str:
        """What of a batch is to be written: all of it; nothing when it was
        written already (a put whose answer timed out but which had arrived);
        or its tail, when such a batch comes again with lines the worker
        added since (it kept them all in its shared batch). Counts a gap
        before it."""
        lines = text.count("\n")
        expected = self.expected.get((pid, kind), 0)   # every worker's first batch starts at 0
        if before < expected:
            seen = expected - before
            if seen >= lines:
                return ""
            text = text.split("\n", seen)[seen]
        elif before > expected:
            self.lost += before - expected
            log.error("%d log line(s) from worker pid %d were lost with a manager",
                      before - expected, pid)
        self.expected[pid, kind] = before + lines
        return text

    def dropped(self, pid: int, lines: int) -> None:
        """A worker's own count of lines it could not hold."""
        self.lost += lines
        log.error("worker pid %d lost %d log line(s) while the manager was unreachable", pid, lines)

    def prune(self, alive) -> None:
        """Forget workers long gone (a late batch of theirs may still come
        after the reap, so not at once: when the table grows)."""
        if len(self.expected) > 1024:
            self.expected = {key: n for key, n in self.expected.items() if key[0] in alive}


class MasterChannels:
    """Master side: starts the Manager, checks it each tick, replaces it when
    it died or stopped answering, drains the queues, publishes snapshots."""

    def __init__(self, inherited_fds, worker_uid=None, name=""):
        """inherited_fds(): descriptors the Manager must close (it is forked
        from the master). worker_uid: a user the workers will run as."""
        self.inherited_fds = inherited_fds
        self.name = name
        self.directory = tempfile.mkdtemp(prefix="prefork-")   # 0700
        if worker_uid is not None and os.geteuid() == 0:
            os.chown(self.directory, worker_uid, -1)   # workers running as it must connect
        self.address = os.path.join(self.directory, "manager.sock")
        _bounded_addresses.add(self.address)
        self.authkey = os.urandom(32)
        self.restarts = 0
        self.last_error = ""
        self._last_start = 0.0
        self._broken = False
        self._hub = self._stats = self._logs = self._board = None
        self.start()

    @property
    def pid(self):
        return self._hub._process.pid if self._hub is not None else None

    def start(self):
        try:
            os.unlink(self.address)
        except FileNotFoundError:
            pass
        _abandon(self._stats, self._logs, self._board)
        _forget_connections(self.address)
        self._hub = Hub(address=self.address, authkey=self.authkey,
                        ctx=multiprocessing.get_context("fork"))
        self._hub.start(initializer=_manager_init, initargs=(self.inherited_fds(), self.name))
        self._last_start = time.monotonic()
        try:
            self._stats = self._hub.stats_queue()
            self._logs = self._hub.logs_queue()
            self._board = self._hub.board()
            self._broken = False
        except (OSError, EOFError) as exc:
            self._fail(exc)

    def _fail(self, exc):
        if not self._broken:
            self.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            log.error("manager (pid %s) did not answer: %s", self.pid, self.last_error)
        self._broken = True

    def check(self, now) -> None:
        """Each tick: replace a Manager that died or stopped answering."""
        process = self._hub._process
        dead = not process.is_alive()
        if not (dead or self._broken) or now - self._last_start < RESTART_EVERY:
            return
        old = process.pid
        process.join(0.05)   # a killed one may still be on its way out
        dead = not process.is_alive()
        if not dead:
            os.kill(old, signal.SIGKILL)   # stopped or hung: it cannot be asked
        process.join(CALL_TIMEOUT)
        self.restarts += 1
        self.start()
        log.error("manager (pid %s) %s; replaced by pid %s (restart %d)", old,
                  "died" if dead else f"did not answer within {CALL_TIMEOUT:g}s",
                  self.pid, self.restarts)

    def worker_sink(self) -> "WorkerSink":
        return WorkerSink(self.address, self.authkey)

    def _drain(self, proxy, limit):
        items: list = []
        if self._broken:
            return items
        try:
            while len(items) < limit:
                items.append(proxy.get_nowait())
        except queue.Empty:
            pass
        except (OSError, EOFError) as exc:
            self._fail(exc)
        return items

    def drain_stats(self, limit=DRAIN_LIMIT):
        return self._drain(self._stats, limit)

    def drain_logs(self, limit=DRAIN_LIMIT):
        return self._drain(self._logs, limit)

    def publish(self, snapshot: dict) -> None:
        if self._broken:
            return
        try:
            self._board.set(snapshot)
        except (OSError, EOFError) as exc:
            self._fail(exc)

    def describe(self) -> dict:
        return {"pid": self.pid, "restarts": self.restarts,
                "state": "unreachable" if self._broken else "ok", "last_error": self.last_error}

    def shutdown(self):
        process = self._hub._process
        if process.is_alive():
            os.kill(process.pid, signal.SIGKILL)   # its queues are drained: nothing to keep
        process.join(CALL_TIMEOUT * 2)
        shutil.rmtree(self.directory, ignore_errors=True)


class WorkerSink:
    """Worker side: plain data until connect() runs in the child. Shipping
    never blocks serving for more than CALL_TIMEOUT; stats that cannot be
    shipped are held (every delta), log text stays in its shared batch (the
    caller clears that once ship_logs says the Manager took it).
    Its calls may come from several threads (the loop's, app threads logging
    or rendering the status page): one at a time. The proxies themselves
    keep one connection per thread."""

    def __init__(self, address, authkey: bytes):
        self.address = address
        _bounded_addresses.add(address)
        self.authkey = authkey
        self._stats = self._logs = self._board = None
        self._next_attempt = 0.0
        self._held_stats: list = []
        self.lost_lines = 0          # not yet reported in a delta
        self.shipped = {ACCESS: 0, ERROR: 0}   # lines of each kind the Manager took
        self.pid = 0                 # set by connect(), in the worker
        self._announced = False
        self._lock = threading.RLock()

    def connect(self) -> bool:
        self.pid = os.getpid()
        # Not multiprocessing's own after-fork hooks: they would re-register
        # the master's proxies from here (three handshakes per worker, for
        # nothing); dropping the cached connection is what this process needs.
        _forget_connections(self.address)
        self._next_attempt = time.monotonic() + RECONNECT_EVERY
        try:
            hub = Hub(address=self.address, authkey=self.authkey)
            hub.connect()
            self._stats = hub.stats_queue()
            self._logs = hub.logs_queue()
            self._board = hub.board()
        except (OSError, EOFError, multiprocessing.AuthenticationError):
            self._stats = self._logs = self._board = None
            return False
        return True

    def _usable(self) -> bool:
        if self._stats is not None:
            return True
        if time.monotonic() < self._next_attempt:
            return False
        return self.connect()

    def _broken(self, exc):
        if not self._announced:
            self._announced = True
            # Through logging: the line is held with the others and shipped later.
            log.error("cannot ship to the master (%s: %s); holding lines until it is back",
                      type(exc).__name__, exc)
        _abandon(self._stats, self._logs, self._board)
        self._stats = self._logs = self._board = None
        _forget_connections(self.address)

    def _flush_held(self) -> bool:
        """Ship the stats held, oldest first; False when the channel broke."""
        try:
            while self._held_stats:
                self._stats.put_nowait(self._held_stats[0])
                self._held_stats.pop(0)
        except (OSError, EOFError) as exc:
            self._broken(exc)
            return False
        self._announced = False
        return True

    def ship_stats(self, delta):
        with self._lock:
            self._held_stats.append(delta)   # deltas are small: every one is kept
            if self._usable():
                self._flush_held()

    def ship_logs(self, batch) -> bool:
        """(kind, text): True when the Manager took it (clear its shared
        batch then; else it stays there and is shipped again later)."""
        kind, text = batch
        with self._lock:
            if not self._usable():
                return False
            try:
                # Numbered by the lines of its kind shipped before it: the
                # master sees a gap (lines lost in a Manager that died with
                # them) or a repeat (a put whose answer timed out but which
                # had arrived).
                self._logs.put_nowait((kind, text, self.pid, self.shipped[kind]))
            except (OSError, EOFError) as exc:
                self._broken(exc)
                return False
            self.shipped[kind] += text.count("\n")
            self._announced = False
            return True

    def count_lost(self, lines: int) -> None:
        """Lines that found their shared batch full (reported in the next delta)."""
        with self._lock:
            self.lost_lines += lines

    def take_lost_lines(self) -> int:
        with self._lock:
            lost, self.lost_lines = self.lost_lines, 0
        return lost

    def snapshot(self) -> dict:
        with self._lock:
            if not self._usable():
                return {}
            try:
                return self._board.get()
            except (OSError, EOFError) as exc:
                self._broken(exc)
                return {}

    def close(self):
        self._stats = self._logs = self._board = None
