"""The Manager: queues from workers to the master, and the published snapshot.

Owns: the Manager server process (a child of the master, started before any
worker; the master shuts it down), the stats-delta queue, the log-batch queue
(messages are (ACCESS or ERROR, text) pairs, lines in LINE_FORMAT for the error
log), and the board holding the master's latest snapshot.

Rules: workers receive only the address and authkey (plain data) across the
fork and connect their own proxies afterwards: a proxy made before fork must
never be used after it. One message per worker per interval, never per
request. Must not: be called from a signal handler.
"""
from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.util
import queue
import signal
from multiprocessing.managers import BaseManager

log = logging.getLogger("prefork.ipc")
DRAIN_LIMIT = 1000   # messages per queue per master tick
ACCESS, ERROR = "access", "error"   # which log a batch goes to
LINE_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(message)s"   # every error-log line


class _Board:
    """Holds the latest published snapshot (lives in the Manager process)."""

    def __init__(self):
        self._value = {}

    def set(self, value):
        self._value = value

    def get(self):
        return self._value


_stats_queue = queue.Queue()
_logs_queue = queue.Queue()
_board = _Board()


class Hub(BaseManager):
    pass


Hub.register("stats_queue", callable=lambda: _stats_queue)
Hub.register("logs_queue", callable=lambda: _logs_queue)
Hub.register("board", callable=lambda: _board, exposed=("get", "set"))


def _manager_init():
    # Ctrl-C reaches the whole process group; the master decides when the
    # Manager stops, so it must outlive the workers' last shipments.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    multiprocessing.current_process().name = "prefork-manager"
    try:
        from setproctitle import setproctitle
        setproctitle("prefork: manager")
    except ImportError:  # pragma: no cover - setproctitle is a dependency
        pass


class MasterChannels:
    """Master side: starts the Manager, drains queues, publishes snapshots."""

    def __init__(self):
        # A unix socket in a private temp directory (multiprocessing's default
        # on Linux): TCP loopback here costs ~40 ms per call, because
        # multiprocessing writes length and payload separately (Nagle + delayed ACK).
        self._hub = Hub(authkey=multiprocessing.current_process().authkey,
                        ctx=multiprocessing.get_context("fork"))
        self._hub.start(initializer=_manager_init)
        self.address = self._hub.address
        self._stats = self._hub.stats_queue()
        self._logs = self._hub.logs_queue()
        self._board = self._hub.board()

    def worker_sink(self) -> "WorkerSink":
        return WorkerSink(self.address, bytes(multiprocessing.current_process().authkey))

    @staticmethod
    def _drain(proxy, limit):
        items = []
        try:
            while len(items) < limit:
                items.append(proxy.get_nowait())
        except queue.Empty:
            pass
        except (OSError, EOFError) as exc:
            log.error("manager queue unreachable: %s", exc)
        return items

    def drain_stats(self, limit=DRAIN_LIMIT):
        return self._drain(self._stats, limit)

    def drain_logs(self, limit=DRAIN_LIMIT):
        return self._drain(self._logs, limit)

    def publish(self, snapshot: dict) -> None:
        try:
            self._board.set(snapshot)
        except (OSError, EOFError) as exc:
            log.error("cannot publish snapshot: %s", exc)

    def shutdown(self):
        try:
            self._hub.shutdown()
        except (OSError, EOFError):
            pass


class WorkerSink:
    """Worker side: plain data until connect() runs in the child."""

    def __init__(self, address, authkey: bytes):
        self.address = address
        self.authkey = authkey
        self._stats = self._logs = self._board = None
        self._broken = False

    def connect(self):
        # Proxies share one cached connection per manager address (a class
        # attribute inherited through os.fork): without this, the worker's new
        # proxies would talk over the master's socket and replies would cross.
        # multiprocessing runs these hooks in its own children; we fork by hand.
        multiprocessing.util._run_after_forkers()
        hub = Hub(address=self.address, authkey=self.authkey)
        hub.connect()
        self._stats = hub.stats_queue()
        self._logs = hub.logs_queue()
        self._board = hub.board()

    def _put(self, proxy, item):
        if proxy is None or self._broken:
            return
        try:
            proxy.put_nowait(item)
        except (OSError, EOFError) as exc:
            # The Manager is gone (master stopping or crashed): keep serving.
            self._broken = True
            log.error("cannot ship to the master: %s", exc)

    def ship_stats(self, delta):
        self._put(self._stats, delta)

    def ship_logs(self, batch):
        self._put(self._logs, batch)

    def snapshot(self) -> dict:
        if self._board is None or self._broken:
            return {}
        try:
            return self._board.get()
        except (OSError, EOFError):
            return {}

    def close(self):
        self._stats = self._logs = self._board = None
