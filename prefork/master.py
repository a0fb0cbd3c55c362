"""The master: supervises a pool of forked workers; serves nothing itself.

Owns: the listeners, the worker table, generations (reload), the target pool
size, the Manager channels (drained each tick), the log files, the pidfile and
the control socket. Single-threaded loop woken by signals, boot pipes and the
control socket; signal handlers only record (see signals.py).
Must not: import the app (workers do, so that reload re-imports it), or block:
every wait is bounded by the tick.
"""
from __future__ import annotations

import dataclasses
import gc
import heapq
import logging
import os
import selectors
import signal
import sys
import time

from setproctitle import setproctitle

from . import __version__, control, generations, snapshot, sockets, systemd, watchdog, worker
from .ipc import MasterChannels
from .logs import LogFiles, install_master_logging
from .scoreboard import Scoreboard
from .signals import SignalInbox
from .sockets import BindError, close_listener, create_listener, describe
from .stats import Totals

log = logging.getLogger("prefork.master")
MAX_SLOTS = 256
TICK_SECONDS = 0.25
FAST_STOP_GRACE = 1.0
BACKOFF_CAP = 10.0
SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGTTIN,
           signal.SIGTTOU, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2)


@dataclasses.dataclass
class WorkerRecord:
    """The master's own view of one child (never crosses a process boundary)."""
    pid: int
    slot: int
    generation: int
    boot_fd: int | None
    spawned: float
    state: str = "booting"          # booting -> ready -> stopping
    boot_report: bytes = b""
    stop_deadline: float = 0.0
    killed: bool = False
    exit_reason: str = ""           # why we stopped it: retired, scaled, timeout, recycled
    term_at: float = 0.0            # SIGTERM due (after a stack dump)
    dump: bytes = b""               # stack dump text arriving on the boot pipe
    dump_at: float = 0.0
    slow_logged: float = 0.0        # request_start of the slow request already dumped
    max_requests: int = 0           # jittered recycling limit (0: none)
    recycle_reason: str = ""
    replaces: int = 0               # pid of the worker this one is replacing
    replaced_by: int = 0            # pid of this worker's replacement
    rss_sampled: float = 0.0
    rss_over: int = 0


class Master:
    def __init__(self, config, overrides, reporter, foreground=False):
        self.config = config
        self.overrides = overrides
        self.reporter = reporter
        self.foreground = foreground
        self.pid = os.getpid()
        self.generation = 1
        self.target = config.server.workers
        self.workers = {}               # pid -> WorkerRecord
        self.free_slots = list(range(MAX_SLOTS))
        self.listeners = {}             # bind text -> socket
        self.pending = None             # a Reload in progress
        self.starting = True            # until the first generation is ready
        self.stopping = False
        self.finished = False
        self.exit_code = 0
        self.boot_failures = 0
        self.next_spawn_at = 0.0
        self.last_boot_error = ""
        self.started_wall = time.time()
        self.started = self.now = time.monotonic()
        self.totals = Totals()
        self.exits = {"normal": 0, "crashed": 0, "killed": 0, "recycled": 0}
        self.spawned = 0
        self.reloads = {"ok": 0, "failed": 0, "last_error": ""}
        self.rates = snapshot.RateWindow()
        self.open_connections = {}      # pid -> latest gauge from its delta
        self.listen_queue_max = 0
        self.last_publish = 0.0
        self.files = self.channels = self.inbox = self.control = self.selector = None
        self.upgrade = None             # the new master's Popen during a USR2 upgrade
        self.scoreboard = None

    # -- start ------------------------------------------------------------------
    def run(self) -> int:
        setproctitle("prefork: master")
        self.files = LogFiles(self.config.logging, mirror_stderr=self.foreground and sys.stderr.isatty())
        install_master_logging(self.files, self.config.logging.level)
        try:
            self.open_listeners()
        except BindError as exc:
            log.error("%s", exc)
            self.reporter.failed(str(exc))
            return 1
        self.scoreboard = Scoreboard(MAX_SLOTS)
        self.channels = MasterChannels()
        self.inbox = SignalInbox(SIGNALS)
        self.control = control.ControlServer(self.config.control_socket)
        self.write_pidfile()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.inbox.wakeup_fd, selectors.EVENT_READ, self.on_wakeup)
        self.selector.register(self.control.sock, selectors.EVENT_READ, self.on_control)
        log.info("prefork %s starting: master pid %d, %d workers, app %s, listening on %s",
                 __version__, self.pid, self.target, self.config.server.app, " ".join(self.urls()))
        try:
            self.loop()
        except Exception:
            log.exception("master crashed; stopping every worker")
            self.reporter.failed("master crashed (see the error log)")
            self.exit_code = 1
            for rec in self.workers.values():
                self.signal_worker(rec, signal.SIGKILL)
        finally:
            self.cleanup()
        return self.exit_code

    def open_listeners(self):
        """Adopt sockets from systemd (LISTEN_FDS) or from the master we
        replace (USR2); bind the rest."""
        activated = systemd.activated_sockets()
        if activated:
            self.listeners = {describe(sock): sock for sock in activated}
            log.info("using %d socket(s) from the service manager", len(activated))
            return
        adopted = sockets.inherited()
        for bind in self.config.server.bind:
            self.listeners[bind] = adopted.pop(bind, None) or create_listener(
                bind, self.config.server.backlog)
        for sock in adopted.values():
            sock.close()   # a bind the new config dropped

    def urls(self, listeners=None):
        return [describe(sock) for sock in (listeners or self.listeners).values()]

    def write_pidfile(self):
        path = self.config.server.pidfile
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.{self.pid}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{self.pid}\n")
        os.replace(tmp, path)

    # -- the loop --------------------------------------------------------------
    def loop(self):
        while not self.finished:
            for key, _ in self.selector.select(TICK_SECONDS):
                key.data(key)
            self.now = time.monotonic()
            self.reap()
            self.drain_channels()
            self.supervise()

    def on_wakeup(self, key):
        for signum in self.inbox.drain():
            action = SIGNAL_ACTIONS.get(signum)
            if action is not None:
                action(self)

    # -- workers ------------------------------------------------------------------
    def spawn(self, config, generation, listeners):
        slot = heapq.heappop(self.free_slots)
        read_fd, write_fd = os.pipe()
        sink = self.channels.worker_sink()
        # Objects the child inherits stay out of its collector's reach, so
        # collections there do not write to (and copy) the shared pages.
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            self.forget_in_child()
            worker.run(config, list(listeners.values()), self.scoreboard, slot, generation,
                       self.pid, write_fd, sink)   # never returns
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        rec = WorkerRecord(pid, slot, generation, read_fd, self.now,
                           max_requests=watchdog.recycle_limit(config.workers))
        self.workers[pid] = rec
        self.spawned += 1
        self.selector.register(read_fd, selectors.EVENT_READ, lambda key, rec=rec: self.read_boot(rec))
        log.info("spawned worker %d (pid %d, generation %d)", slot, pid, generation)
        return rec

    def forget_in_child(self):
        """In a fresh worker: drop what belongs to the master alone."""
        self.inbox.close()
        self.selector.close()
        self.control.close(unlink=False)
        self.files.close()
        self.reporter.forget()
        for rec in self.workers.values():
            if rec.boot_fd is not None:
                os.close(rec.boot_fd)

    def read_boot(self, rec):
        """The boot pipe carries the boot report, then (faulthandler) stack dumps."""
        try:
            data = os.read(rec.boot_fd, 65536)
        except BlockingIOError:
            return
        if rec.state == "booting" or not rec.boot_report.startswith(b"OK\n"):
            rec.boot_report += data
            if rec.state == "booting" and rec.boot_report.startswith(b"OK\n"):
                rec.state = "ready"
                self.boot_failures = 0
                rec.dump, rec.boot_report = rec.boot_report[3:], b"OK\n"
        else:
            rec.dump += data
        rec.dump_at = self.now
        if not data:
            self.close_boot_pipe(rec)

    def log_dump(self, rec):
        if rec.dump.strip():
            log.error("worker %d (pid %d) reports:\n%s", rec.slot, rec.pid,
                      rec.dump.decode("utf-8", "replace").rstrip())
        rec.dump = b""

    def close_boot_pipe(self, rec):
        if rec.boot_fd is not None:
            self.selector.unregister(rec.boot_fd)
            os.close(rec.boot_fd)
            rec.boot_fd = None

    def reap(self):
        for rec in list(self.workers.values()):
            try:
                pid, status = os.waitpid(rec.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = rec.pid, 0
            if pid:
                self.on_exit(rec, os.waitstatus_to_exitcode(status))

    def on_exit(self, rec, code):
        while rec.boot_fd is not None:   # take the rest of a boot failure report
            self.read_boot(rec)
        self.log_dump(rec)
        del self.workers[rec.pid]
        watchdog.forget(self, rec)
        self.open_connections.pop(rec.pid, None)
        self.scoreboard.release(rec.slot)
        heapq.heappush(self.free_slots, rec.slot)
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"
        if rec.boot_report.startswith(b"FAIL\n") or (rec.state == "booting" and not rec.killed):
            return self.on_boot_failure(rec, how)
        if rec.exit_reason:
            self.exits[EXIT_CATEGORIES.get(rec.exit_reason, "normal")] += 1
            log.info("worker %d (pid %d) stopped (%s, %s)", rec.slot, rec.pid, rec.exit_reason, how)
        elif code == -signal.SIGKILL:
            self.exits["killed"] += 1
            log.error("worker %d (pid %d) was killed by SIGKILL (possibly out of memory)",
                      rec.slot, rec.pid)
        elif rec.state == "stopping" and code == 0:
            self.exits["normal"] += 1
            log.info("worker %d (pid %d) exited", rec.slot, rec.pid)
        else:
            self.exits["crashed"] += 1
            log.error("worker %d (pid %d) died unexpectedly (%s)", rec.slot, rec.pid, how)

    def on_boot_failure(self, rec, how):
        report = rec.boot_report[5:].decode("utf-8", "replace").strip() if \
            rec.boot_report.startswith(b"FAIL\n") else f"exited while booting ({how})"
        self.exits["crashed"] += 1
        self.boot_failures += 1
        repeated = report == self.last_boot_error
        self.last_boot_error = report
        delay = min(BACKOFF_CAP, 0.1 * 2 ** self.boot_failures)
        self.next_spawn_at = self.now + delay
        if self.pending is not None and rec.generation == self.pending.generation:
            return generations.abort_reload(self, f"worker failed to boot ({how}):\n{report}")
        if self.starting and not self.stopping:
            log.error("worker %d failed to boot (%s):\n%s", rec.slot, how, report)
            self.reporter.failed(f"worker failed to boot ({how}):\n{report}")
            self.exit_code = 1
            return self.begin_stop(graceful=False)
        if not self.stopping:
            # A crash loop is reported once with its traceback, then briefly.
            log.error("worker %d (pid %d) failed to boot (%s), %d time(s) in a row; next "
                      "attempt in %.1fs%s", rec.slot, rec.pid, how, self.boot_failures, delay,
                      " (same error as before)" if repeated else ":\n" + report)

    def stop_worker(self, rec, reason, graceful=True):
        if rec.state == "stopping":
            return
        rec.state = "stopping"
        rec.exit_reason = reason
        # A graceful worker cuts what is left at graceful_timeout itself (and
        # logs it); the master's kill is the backstop for one stuck in the app.
        timeout = (self.config.workers.graceful_timeout + self.config.workers.kill_grace
                   if graceful else FAST_STOP_GRACE)
        rec.stop_deadline = self.now + timeout
        self.signal_worker(rec, signal.SIGTERM if graceful else signal.SIGQUIT)

    def signal_worker(self, rec, signum):
        try:
            os.kill(rec.pid, signum)
        except ProcessLookupError:
            pass   # already gone; reap() will see it

    # -- supervision ----------------------------------------------------------------
    def supervise(self):
        now = self.now
        for rec in list(self.workers.values()):
            if rec.dump and now - rec.dump_at > 0.1:
                self.log_dump(rec)
            if rec.state == "stopping":
                if rec.term_at and now >= rec.term_at:
                    rec.term_at = 0.0
                    self.signal_worker(rec, signal.SIGTERM)
                if now >= rec.stop_deadline and not rec.killed:
                    log.warning("worker %d (pid %d) still running after its stop deadline: "
                                "killing it", rec.slot, rec.pid)
                    rec.killed = True
                    self.signal_worker(rec, signal.SIGKILL)
            elif rec.state == "booting":
                if now - rec.spawned > self.config.workers.boot_timeout and not rec.killed:
                    log.error("worker %d (pid %d) did not boot within %gs: killing it",
                              rec.slot, rec.pid, self.config.workers.boot_timeout)
                    rec.killed = True
                    rec.boot_report = b"FAIL\nboot timeout"
                    self.signal_worker(rec, signal.SIGKILL)
            else:
                watchdog.check(self, rec, now)
        if self.stopping:
            if not self.workers:
                self.finished = True
            return
        if self.pending is not None:
            generations.advance_reload(self)
        else:
            watchdog.run_recycling(self)
        self.keep_pool_size()
        if self.starting and self.ready_count(self.generation) >= self.target:
            self.starting = False
            log.info("ready: %d workers serving on %s", self.target, " ".join(self.urls()))
            self.reporter.ready(self.pid, self.urls(), self.target)
            systemd.notify("READY=1", f"MAINPID={self.pid}", self.status_line())
            generations.retire_predecessor(self)
        generations.watch_upgrade(self)
        if now - self.last_publish >= self.config.status.interval:
            self.last_publish = now
            self.channels.publish(self.snapshot())

    def generation_workers(self, generation):
        return [r for r in self.workers.values()
                if r.generation == generation and r.state != "stopping"]

    def ready_count(self, generation):
        return sum(1 for r in self.generation_workers(generation) if r.state == "ready")

    def keep_pool_size(self):
        # A replacement booting for a recycled worker is not a member yet.
        current = [r for r in self.generation_workers(self.generation) if not r.replaces]
        missing = self.target - len(current)
        if missing > 0 and self.now >= self.next_spawn_at:
            for _ in range(missing if self.boot_failures == 0 else 1):
                self.spawn(self.config, self.generation, self.listeners)
        elif missing < 0:
            for rec in sorted(current, key=lambda r: r.spawned)[:-missing]:
                self.stop_worker(rec, "scaled down")

    # -- stop ------------------------------------------------------------------------
    def begin_stop(self, graceful=True):
        if self.stopping and graceful:
            return
        if not self.stopping:
            log.info("%s stop requested", "graceful" if graceful else "fast")
            systemd.notify("STOPPING=1", "STATUS=stopping")
        self.stopping = True
        if self.pending is not None:
            generations.abort_reload(self, "stopping")
        # Workers keep their own copies until they have drained the queue.
        for sock in self.listeners.values():
            close_listener(sock, unlink=not generations.handed_over(self))
        self.listeners = {}
        for rec in self.workers.values():
            if not graceful and rec.state == "stopping":
                rec.state = "ready"   # escalate a graceful stop already under way
            self.stop_worker(rec, rec.exit_reason or "stop", graceful=graceful)

    def status_line(self):
        return (f"STATUS=generation {self.generation}, {self.target} workers, "
                f"serving on {' '.join(self.urls())}")

    def scale(self, delta):
        self.target = max(1, min(MAX_SLOTS // 2, self.target + delta))
        log.info("pool size now %d", self.target)

    def reopen_logs(self):
        self.files.reopen()
        log.info("log files reopened")

    # -- channels, control, snapshot -----------------------------------------------------
    def drain_channels(self) -> int:
        """Fold stats deltas and write log batches (bounded per call);
        returns how many messages were taken."""
        deltas = self.channels.drain_stats()
        for delta in deltas:
            self.totals.fold(delta)
            if delta.pid in self.workers:
                self.open_connections[delta.pid] = delta.open_connections
        batches = self.channels.drain_logs()
        for kind, text in batches:
            self.files.write(kind, text)
        self.rates.observe(self.now, self.totals.requests)
        return len(deltas) + len(batches)

    def on_control(self, key):
        accepted = self.control.accept()
        if accepted is None:
            return
        conn, command = accepted
        name = command.get("cmd")
        if name == "status":
            control.reply(conn, {"ok": True, "status": self.snapshot()})
        elif name == "reload":
            generations.begin_reload(self, waiter=conn)
        elif name == "reopen":
            self.reopen_logs()
            control.reply(conn, {"ok": True})
        elif name == "scale" and isinstance(command.get("workers"), int) and command["workers"] > 0:
            self.scale(command["workers"] - self.target)
            control.reply(conn, {"ok": True, "workers": self.target})
        else:
            control.reply(conn, {"ok": False, "error": f"unknown command {name!r}"})

    def snapshot(self) -> dict:
        return snapshot.build(self)

    def cleanup(self):
        while self.drain_channels():   # every worker has exited: take all they sent
            pass
        self.channels.shutdown()
        for sock in self.listeners.values():
            close_listener(sock, unlink=not generations.handed_over(self))
        self.control.close()
        try:
            with open(self.config.server.pidfile) as fh:
                if fh.read().strip() == str(self.pid):
                    os.unlink(self.config.server.pidfile)
        except OSError:
            pass
        log.info("stopped")
        self.files.close()


EXIT_CATEGORIES = {"recycled": "recycled", "timeout": "killed"}

SIGNAL_ACTIONS = {
    signal.SIGTERM: lambda m: m.begin_stop(graceful=True),
    signal.SIGINT: lambda m: m.begin_stop(graceful=False),
    signal.SIGQUIT: lambda m: m.begin_stop(graceful=False),
    signal.SIGHUP: lambda m: generations.begin_reload(m),
    signal.SIGTTIN: lambda m: m.scale(+1),
    signal.SIGTTOU: lambda m: m.scale(-1),
    signal.SIGUSR1: lambda m: m.reopen_logs(),
    signal.SIGUSR2: lambda m: generations.begin_upgrade(m),
    signal.SIGCHLD: lambda m: None,   # reap() runs on every loop turn
}
