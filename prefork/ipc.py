"""The Manager: queues from workers to the master, and the published snapshot.

Owns: the Manager server process (a child of the master, supervised by it like
a worker), its address (a unix socket at a fixed path in a private directory,
so a replacement Manager is found where the last one was), the stats-delta
queue, the log-batch queue (messages are (ACCESS or ERROR, text) pairs, lines
in LINE_FORMAT for the error log), the board holding the master's latest
snapshot, and what is held back or lost while the Manager is away.

Rules:
- No process waits on the Manager longer than CALL_TIMEOUT: every client socket
  to it has kernel send/receive timeouts (SO_SNDTIMEO/SO_RCVTIMEO), so a stopped
  or hung Manager turns into an OSError, never a stall. After one, the
  connection is dropped (it may be out of step) and made again later.
- The master replaces a Manager that died or timed out (MasterChannels.check);
  workers reconnect by themselves at most every RECONNECT_EVERY seconds.
- While the Manager is away a worker keeps its unshipped stats and up to
  HOLD_BYTES of log lines and ships them afterwards; lines beyond that are
  counted (StatsDelta.lost_lines) and reported, never silently dropped.
- Log batches are (kind, text, pid, lines shipped before it): a Manager that
  dies with batches in its queue leaves a gap the master counts (LineLedger),
  and a batch sent twice (its answer timed out, but it had arrived) is dropped.
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
HOLD_BYTES = 4 << 20      # log text a worker holds back during an outage
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


class LineLedger:
    """Master side: every log line lost to a Manager outage, counted once:
    those a worker had to drop (its hold was full) and those a Manager died
    with (a gap in a worker's numbering); repeats are dropped."""

    def __init__(self):
        self.expected: dict[int, int] = {}
        self.lost = 0

    def admit(self, pid: int, before: int, lines: int) -> bool:
        """True when the batch is new (write it); counts a gap before it."""
        expected = self.expected.get(pid, 0)   # every worker's first batch starts at 0
        if before < expected:
            return False              # already written
        if before > expected:
            self.lost += before - expected
            log.error("%d log line(s) from worker pid %d were lost with a manager",
                      before - expected, pid)
        self.expected[pid] = before + lines
        return True

    def dropped(self, pid: int, lines: int) -> None:
        """A worker's own count of lines it could not hold."""
        self.lost += lines
        log.error("worker pid %d lost %d log line(s) while the manager was unreachable", pid, lines)

    def prune(self, alive) -> None:
        """Forget workers long gone (a late batch of theirs may still come
        after the reap, so not at once: when the table grows)."""
        if len(self.expected) > 1024:
            self.expected = {pid: n for pid, n in self.expected.items() if pid in alive}


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
    never blocks serving for more than CALL_TIMEOUT; what cannot be shipped
    is held (stats always, log text up to HOLD_BYTES) or counted as lost.
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
        self._held_logs: list = []
        self._held_bytes = 0
        self.lost_lines = 0          # not yet reported in a delta
        self.shipped_lines = 0       # log lines the Manager took from this worker
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
        """Ship what was held, oldest first; False when the channel broke."""
        try:
            while self._held_stats:
                self._stats.put_nowait(self._held_stats[0])
                self._held_stats.pop(0)
            while self._held_logs:
                kind, text = self._held_logs[0]
                # Numbered by the lines shipped before it: the master sees a
                # gap (lines lost in a Manager that died with them) or a repeat
                # (a put whose answer timed out but which had arrived).
                self._logs.put_nowait((kind, text, self.pid, self.shipped_lines))
                self.shipped_lines += text.count("\n")
                self._held_bytes -= len(self._held_logs.pop(0)[1])
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

    def ship_logs(self, batch):
        with self._lock:
            if self._held_bytes + len(batch[1]) > HOLD_BYTES:
                self.lost_lines += batch[1].count("\n")
            else:
                self._held_logs.append(batch)
                self._held_bytes += len(batch[1])
            if self._usable():
                self._flush_held()

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
