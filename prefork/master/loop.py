"""The master: supervises a pool of forked workers; serves nothing itself.

Owns: the running config and generation, the listeners, the target pool size,
the start/stop state, the folded statistics, and the loop that drives its
parts: the pool (worker processes), the reloader, the upgrader, the watchdog,
the snapshot builder, the Manager channels (drained each tick), the log files,
the pidfile and the control socket. Single-threaded, woken by signals (see
signals.py), report pipes and the control socket; every wait is bounded by
the tick. An exception in one action is logged and contained: it is never a
reason to stop every worker.
Must not: import the app (workers do, so that reload re-imports it), or block.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import resource
import selectors
import signal
import socket
import time

from setproctitle import setproctitle

from .. import __version__, missing_c_modules, missing_c_note, sockets, title
from ..config import MAX_THREADS, check_workers, is_tls, parse_bind
from ..ipc import LineLedger, MasterChannels
from ..worker.loop import worker_uid
from ..scoreboard import Scoreboard
from ..signals import DRAIN_SIGNAL, SignalInbox
from ..sockets import BindError, close_listener, describe, listener_for
from ..stats import RateWindow, Totals
from ..worker import loop as worker_loop
from . import control, systemd, upgrade
from .autoreload import CodeWatcher
from .logfiles import LogFiles, install_master_logging
from .lifecycle import Lifecycle, Phase
from .pool import MAX_SLOTS, Generation, Pool
from .reload import Reloader
from .snapshot import SnapshotBuilder, View
from .watchdog import Watchdog

log = logging.getLogger("prefork.master")
TICK_SECONDS = 0.25
SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGTTIN,
           signal.SIGTTOU, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2)


class Master:
    def __init__(self, config, overrides, reporter, foreground=False):
        self.current = Generation.made(1, config, {})   # the running generation
        self.overrides = overrides
        self.reporter = reporter
        self.foreground = foreground
        self.pid = os.getpid()
        self.target = config.server.workers
        self.life = Lifecycle()         # starting, running, draining, stopping, finished
        self.upgrading = False          # started by `upgrade`: pidfile and control path wait
        self.exit_code = 0
        self.started_wall = time.time()
        self.started = self.now = time.monotonic()
        self.totals = Totals()
        self.rates = RateWindow()
        self.open_connections = {}      # pid -> latest gauge from its delta
        self.tls_open = {}              # pid -> its TLS connections, the same way
        self.http2_open = {}            # pid -> its HTTP/2 connections, the same way
        self.reported = {}              # pid -> app requests its deltas reported
        self.ledger = LineLedger()      # log lines lost in an outage, wherever they were
        self.last_publish = 0.0
        self.files = self.channels = self.inbox = self.control = self.watcher = None
        self.selector = selectors.DefaultSelector()
        self.scoreboard = Scoreboard(MAX_SLOTS, MAX_THREADS)
        self.pool = self.make_pool()
        self.watchdog = Watchdog(self.pool, self.scoreboard)
        self.reloader = Reloader(self.pool)
        self.upgrader = upgrade.Upgrader()
        self.snapshots = SnapshotBuilder(self.scoreboard)

    # The running generation's parts, read often.
    @property
    def config(self):
        return self.current.config

    @property
    def generation(self) -> int:
        return self.current.number

    @property
    def listeners(self) -> dict:
        return self.current.listeners

    def make_pool(self) -> Pool:
        return Pool(self.scoreboard, self.selector, self.run_worker)

    # -- start ------------------------------------------------------------------
    def run(self) -> int:
        setproctitle(title("master", self.config.server.name))
        raise_fd_limit()
        # In the foreground the error log goes to the terminal too (make run, containers).
        self.files = LogFiles(self.config.logging, mirror_stderr=self.foreground)
        install_master_logging(self.files, self.config.logging.level)
        try:
            self.open_listeners()
        except BindError as exc:
            log.error("%s", exc)
            self.reporter.failed(str(exc))
            return 1
        self.channels = MasterChannels(self.manager_must_close, worker_uid(self.config.server.user),
                                       self.config.server.name)
        self.watcher = CodeWatcher(self.config) if self.config.server.reload_on_change else None
        self.inbox = SignalInbox(SIGNALS)
        # A master started by `upgrade` takes the pidfile and the control
        # socket's path only once it is ready: one that fails leaves its
        # predecessor findable.
        self.upgrading = bool(os.environ.get(upgrade.UPGRADE_ENV))
        self.control = control.ControlServer(self.config.control_socket, self.upgrading)
        if not self.upgrading:
            self.write_pidfile()
        self.selector.register(self.inbox.wakeup_fd, selectors.EVENT_READ, self.on_wakeup)
        self.control.attach(self.selector, self.on_control)
        log.info("prefork %s starting: master pid %d, %d workers, app %s, listening on %s",
                 __version__, self.pid, self.target, self.config.server.app, " ".join(self.urls()))
        missing = missing_c_modules()
        if missing:
            log.warning("%s", missing_c_note(missing))
        try:
            self.loop()
        finally:
            self.cleanup()
        return self.exit_code

    def open_listeners(self):
        """Adopt sockets from systemd (LISTEN_FDS) or from the master we
        replace (USR2); bind the rest."""
        activated = systemd.activated_sockets()
        if activated:
            self.current = dataclasses.replace(
                self.current, listeners={self.bind_for(sock): sock for sock in activated})
            log.info("using %d socket(s) from the service manager", len(activated))
            return
        adopted = sockets.inherited()
        listeners = {}
        for bind in self.config.server.bind:
            listeners[bind] = adopted.pop(bind, None) or listener_for(bind, self.config.server)
        self.current = dataclasses.replace(self.current, listeners=listeners)
        for sock in adopted.values():
            sock.close()   # a bind the new config dropped

    def bind_for(self, sock) -> str:
        """The [server] bind entry naming a socket the service manager handed
        us (so that one written https:// speaks TLS), else its description."""
        address = sock.getsockname() if sock.family == socket.AF_UNIX else sock.getsockname()[:2]
        for bind in self.config.server.bind:
            family, wanted = parse_bind(bind)
            if wanted == address or (family != "unix" and wanted[1] == address[1]
                                     and wanted[0] in ("0.0.0.0", "::", address[0])):
                return bind
        return describe(sock)

    def urls(self, listeners=None):
        return [describe(sock, is_tls(bind)) for bind, sock in (listeners or self.listeners).items()]

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
        while self.life.phase is not Phase.FINISHED:
            for key, _ in self.selector.select(TICK_SECONDS):
                self.contained(key.data, key)
            self.now = time.monotonic()
            self.contained(self.reap)
            self.contained(self.drain_channels)
            self.contained(self.supervise)

    def contained(self, action, *args):
        """Run one action; a bug in it is logged, and the loop goes on."""
        try:
            action(*args)
        except Exception:
            log.exception("master: %s failed; carrying on",
                          getattr(action, "__name__", "an action"))

    def on_wakeup(self, key):
        for signum in self.inbox.drain():
            action = SIGNAL_ACTIONS.get(signum)
            if action is not None:
                self.contained(action, self)

    def supervise(self):
        now = self.now
        self.channels.check(now)
        if self.control is not None:
            self.control.expire(now)
        self.upgrader.watch()   # also while stopping: the new master's READY is why we stop
        self.pool.enforce(now, self.config.workers.boot_timeout)
        if self.life.stopping:
            if not len(self.pool):
                self.life = self.life.workers_gone()
            return
        if not self.life.serving:   # draining: serving as is, no spawning, reloading or recycling
            if self.life.drained(now):
                self.stop(graceful=True)
            self.publish_if_due(now)
            return
        if self.watcher is not None and self.reloader.pending is None:
            changed = self.watcher.changed(now)
            if changed:
                log.info("%s changed: reloading", changed)
                self.begin_reload()
        committed = self.reloader.advance(self.current, now)
        if committed is not None:
            self.adopt(committed)
        if self.reloader.pending is None:
            self.watchdog.check(self.current, now)
        self.pool.keep_size(self.target, self.current, now)
        if self.life.phase is Phase.STARTING and \
                self.pool.ready_count(self.generation) >= self.target:
            self.on_ready()
        self.publish_if_due(now)

    def publish_if_due(self, now):
        """Each [status] interval: a point for the charts, and the snapshot
        the workers' status endpoint renders."""
        if now - self.last_publish >= self.config.status.interval:
            self.last_publish = now
            self.snapshots.sample(self.totals, now, time.time())
            self.channels.publish(self.snapshot())

    def on_ready(self):
        self.life = self.life.ready()
        if self.upgrading:
            self.write_pidfile()
            self.control.promote()
        log.info("ready: %d workers serving on %s", self.target, " ".join(self.urls()))
        self.reporter.ready(self.pid, self.urls(), self.target, self.config.serving())
        systemd.notify("READY=1", f"MAINPID={self.pid}", self.status_line())
        upgrade.retire_predecessor()

    # -- workers ------------------------------------------------------------------
    def manager_must_close(self) -> list:
        """What a freshly forked Manager closes: it must hold no listener, log
        file, control socket or report pipe of ours."""
        fds = [sock.fileno() for sock in self.listeners.values()] + self.files.descriptors()
        if self.control is not None:
            fds += self.control.descriptors()
        return fds + [rec.report.fd for rec in self.pool if rec.report.fd is not None]

    def run_worker(self, config, listeners, slot, generation, report_fd, batches, tls):
        """In the forked child: drop what is the master's alone, then serve."""
        self.inbox.close()
        self.selector.close()
        self.control.close(unlink=False)
        self.files.close()
        self.reporter.close_in_child()
        worker_loop.run(config, listeners, self.scoreboard, slot, generation, self.pid,
                        report_fd, self.channels.worker_sink(), batches, tls)   # never returns

    def reap(self):
        exits = self.pool.reap(self.now)
        if exits:
            # What the dead shipped comes first: then what they left is new.
            while self.drain_channels():
                pass
        for gone in exits:
            self.recover(gone.rec)
            self.watchdog.forget(gone.rec.pid)
            self.ledger.prune(self.pool.workers)
            self.open_connections.pop(gone.rec.pid, None)
            self.tls_open.pop(gone.rec.pid, None)
            self.http2_open.pop(gone.rec.pid, None)
            if gone.boot_failure is not None:
                self.on_boot_failure(gone)

    def recover(self, rec):
        """A worker that died before shipping all it had (a signal, SIGKILL by
        the kernel's OOM killer or our watchdog): the lines left in its
        shared batches are written here (those that did reach the Manager
        are not written twice), and the requests its slot counted but no
        delta reported go into the totals, counted as recovered: their
        status, bytes and latency died with it."""
        written = 0
        for kind, batch in rec.batches.items() if rec.batches is not None else ():
            before, text = batch.leftover()
            text = self.ledger.fresh(rec.pid, kind, before, text)
            if text:
                self.files.write(kind, text)
                written += text.count("\n")
            batch.close()
        rec.batches = None
        missing = rec.served - self.reported.pop(rec.pid, 0)
        if self.config.status.statistics and missing > 0:
            self.totals.recover(missing)
        if written or missing > 0:
            log.warning("worker %d (pid %d) died with %d log line(s) and %d request(s) not "
                        "shipped: the lines are written from its shared batch, the requests "
                        "counted from its slot", rec.slot, rec.pid, written, max(0, missing))

    def on_boot_failure(self, gone):
        rec, report = gone.rec, gone.boot_failure
        repeated = self.pool.note_boot_error(report)
        pending = self.reloader.pending
        if pending is not None and rec.generation == pending.gen.number:
            return self.reloader.abort(f"worker failed to boot ({gone.how}):\n{report}",
                                       self.current, self.now)
        if self.life.stopping:
            return
        if self.life.phase is Phase.STARTING:
            log.error("worker %d failed to boot (%s):\n%s", rec.slot, gone.how, report)
            where = self.config.logging.error_log or "stderr"
            self.reporter.failed(f"worker failed to boot: {summarize_traceback(report)} "
                                 f"(the traceback is in {where})")
            self.exit_code = 1
            return self.stop(graceful=False)
        # A crash loop is reported once with its traceback, then briefly.
        log.error("worker %d (pid %d) failed to boot (%s), %d time(s) in a row; next "
                  "attempt in %.1fs%s", rec.slot, rec.pid, gone.how, self.pool.boot_failures,
                  self.pool.next_spawn_at - self.now,
                  " (same error as before)" if repeated else ":\n" + report)

    # -- actions ----------------------------------------------------------------------
    def begin_stop(self, graceful=True):
        """TERM (graceful) or INT/QUIT: with drain_time, a graceful stop of a
        running master drains first; a second TERM while draining changes nothing."""
        drain = self.config.workers.drain_time
        if graceful and drain and self.life.phase in (Phase.RUNNING, Phase.DRAINING):
            if self.life.phase is Phase.RUNNING:
                self.begin_drain(drain)
            return
        self.stop(graceful)

    def stop(self, graceful=True):
        if self.life.stopping and graceful:
            return
        if not self.life.stopping:
            log.info("%s stop requested", "graceful" if graceful else "fast")
            systemd.notify("STOPPING=1", "STATUS=stopping")
        self.life = self.life.stop()
        if self.reloader.pending is not None:
            self.reloader.abort("stopping", self.current, self.now)
        # Workers keep their own copies until they have drained the queue.
        self.close_listeners()
        self.pool.stop_all("stop", self.now, self.config.workers.stop_grace, fast=not graceful)

    def begin_drain(self, seconds):
        """TERM with drain_time: keep serving while the health path says 503,
        so a load balancer stops sending before the listeners close."""
        self.life = self.life.drain(self.now, seconds)
        log.info("draining for %gs (health answers 503), then stopping gracefully", seconds)
        systemd.notify("STATUS=draining")
        for rec in self.pool:
            self.pool.signal(rec, DRAIN_SIGNAL)

    def begin_reload(self, waiter=None):
        if self.life.stopping:
            if waiter:
                control.reply(waiter, {"ok": False, "error": "stopping"})
            return
        self.reloader.begin(self.current, self.overrides, self.now, waiter)

    def adopt(self, committed):
        """A reload's new generation is ready: it becomes the running one."""
        old = self.current
        new = committed.gen
        for rec in self.pool:
            if rec.generation < new.number:
                self.pool.stop(rec, "retired", self.now, old.config.workers.stop_grace)
        for bind, sock in old.listeners.items():
            if bind not in new.listeners:
                close_listener(sock, unlink=True)
        self.current = new
        old_logging = old.config.logging
        self.target = new.config.server.workers
        if self.config.logging != old_logging:
            self.files.close()
            self.files = LogFiles(self.config.logging, self.files.mirror_stderr)
            install_master_logging(self.files, self.config.logging.level)
        log.info("reloaded: generation %d replaced generation %d; serving on %s",
                 self.generation, old.number, " ".join(self.urls()))
        systemd.notify("READY=1", self.status_line())
        for waiter in committed.waiters:
            control.reply(waiter, {"ok": True, "generation": self.generation,
                                   "urls": self.urls()})

    def begin_upgrade(self, waiter=None):
        if self.upgrader.under_way or self.reloader.pending is not None or self.life.stopping:
            why = ("one is under way" if self.upgrader.under_way
                   else "a reload or stop is under way")
            log.warning("upgrade refused: %s", why)
            if waiter:
                control.reply(waiter, {"ok": False, "error": f"refused: {why}"})
            return
        self.upgrader.begin(self.pid, self.config, self.overrides, self.listeners, waiter)

    def scale(self, workers) -> str | None:
        """Set the pool size; the reason when refused."""
        problem = check_workers(workers)   # the same rule as the config file's
        if problem:
            return f"the pool size {problem} (asked: {workers})"
        self.target = workers
        log.info("pool size now %d", self.target)
        return None

    def reopen_logs(self) -> str | None:
        """Reopen the log files; what is wrong with them afterwards, if anything."""
        self.files.reopen()
        problems = [f"{kind}: {state['error']}" for kind, state in self.files.describe().items()
                    if state["error"]]
        if problems:
            log.error("log files reopened with problems: %s", "; ".join(problems))
            return "; ".join(problems)
        log.info("log files reopened")
        return None

    def status_line(self):
        return (f"STATUS=generation {self.generation}, {self.target} workers, "
                f"serving on {' '.join(self.urls())}")

    # -- channels, control, snapshot -----------------------------------------------------
    def drain_channels(self) -> int:
        """Fold stats deltas and write log batches (bounded per call);
        returns how many messages were taken."""
        deltas = self.channels.drain_stats()
        for delta in deltas:
            self.totals.fold(delta)
            self.reported[delta.pid] = (self.reported.get(delta.pid, 0)
                                        + delta.requests - delta.rejected)
            if delta.lost_lines:
                self.ledger.dropped(delta.pid, delta.lost_lines)
            if self.pool.get(delta.pid) is not None:
                self.open_connections[delta.pid] = delta.open_connections
                self.tls_open[delta.pid] = delta.tls[2]
                self.http2_open[delta.pid] = delta.http2[4]
        batches = self.channels.drain_logs()
        for kind, text, pid, before in batches:
            text = self.ledger.fresh(pid, kind, before, text)
            if text:
                self.files.write(kind, text)
        self.rates.observe(self.now, self.totals.requests)
        return len(deltas) + len(batches)

    def on_control(self, conn, command):
        """A whole command from the control socket (control.py reads it)."""
        name = command.get("cmd")
        if name == "status":
            control.reply(conn, {"ok": True, "status": self.snapshot()})
        elif name == "reload":
            self.begin_reload(waiter=conn)
        elif name == "upgrade":
            self.begin_upgrade(waiter=conn)
        elif name == "overrides":   # the start flags, for restart to keep
            control.reply(conn, {"ok": True, "overrides": self.overrides})
        elif name == "reopen":
            problem = self.reopen_logs()
            control.reply(conn, {"ok": False, "error": problem} if problem else {"ok": True})
        elif name == "scale" and type(command.get("workers")) is int:
            refused = self.scale(command["workers"])
            control.reply(conn, {"ok": False, "error": refused} if refused else
                          {"ok": True, "workers": self.target})
        else:
            control.reply(conn, {"ok": False, "error": f"unknown command {name!r}"})

    def state(self) -> str:
        """The lifecycle's phase, or what a running master is busy with."""
        if not self.life.serving:
            return "stopping" if self.life.stopping else self.life.phase.value
        if self.reloader.pending is not None:
            return "reloading"
        return "degraded" if self.pool.boot_failures else "running"

    def view(self) -> View:
        return View(pid=self.pid, started_wall=self.started_wall,
                    uptime=self.now - self.started, generation=self.generation,
                    config_source=self.config.source, listeners=list(self.listeners.values()),
                    urls=self.urls(), state=self.state(), target=self.target, pool=self.pool,
                    reloads=self.reloader.describe(), totals=self.totals,
                    timeouts=self.watchdog.timeouts, lost_lines=self.ledger.lost,
                    open_connections=self.open_connections, rates=self.rates.rates(),
                    logs=self.files.describe() if self.files else {},
                    manager=self.channels.describe() if self.channels else {},
                    reported=self.reported, tls_open=sum(self.tls_open.values()),
                    http2_open=sum(self.http2_open.values()))

    def snapshot(self) -> dict:
        self.now = time.monotonic()
        return self.snapshots.build(self.view(), self.now)

    def close_listeners(self):
        for sock in self.listeners.values():
            close_listener(sock, unlink=not self.upgrader.handed_over())
        self.current = dataclasses.replace(self.current, listeners={})

    def cleanup(self):
        while self.drain_channels():   # every worker has exited: take all they sent
            pass
        self.channels.shutdown()
        self.close_listeners()
        self.control.close()
        try:
            with open(self.config.server.pidfile) as fh:
                if fh.read().strip() == str(self.pid):
                    os.unlink(self.config.server.pidfile)
        except OSError:
            pass
        log.info("stopped")
        self.files.close()


def summarize_traceback(report: str) -> str:
    """One line from a boot traceback: the exception and where in the user's
    code it was raised (the last frame that is neither prefork's nor the
    import machinery's)."""
    lines = report.strip().splitlines()
    if not lines:
        return "no report"
    where = ""
    for line in lines:
        text = line.strip()
        if text.startswith('File "') and "/prefork/" not in text and "<frozen" not in text \
                and "/importlib/" not in text:
            path, _, rest = text[6:].partition('", line ')
            where = f" ({os.path.basename(path)}:{rest.split(',')[0]})"
    last = lines[-1].strip()
    if last.startswith("prefork."):   # our own exception: its words, not its class path
        last = last.partition(": ")[2] or last
    return last + where


def raise_fd_limit():
    """The soft RLIMIT_NOFILE up to the hard one: each connection is a
    descriptor, and 1024 (a common soft default) is far below what a pool holds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


# What each signal does: named functions, so that a failing one is logged by
# its name ("master: graceful_stop failed").
def graceful_stop(master):
    master.begin_stop(graceful=True)


def fast_stop(master):
    master.begin_stop(graceful=False)


def reload_config(master):
    master.begin_reload()


def one_more_worker(master):
    scale_by(master, +1)


def one_worker_fewer(master):
    scale_by(master, -1)


def scale_by(master, delta):
    refused = master.scale(master.target + delta)
    if refused:
        log.warning("scale refused: %s", refused)


def reopen_logs(master):
    master.reopen_logs()


def upgrade_master(master):
    master.begin_upgrade()


def child_exited(master):
    """Nothing: reap() runs on every loop turn (the signal only wakes it)."""


SIGNAL_ACTIONS = {
    signal.SIGTERM: graceful_stop,
    signal.SIGINT: fast_stop,
    signal.SIGQUIT: fast_stop,
    signal.SIGHUP: reload_config,
    signal.SIGTTIN: one_more_worker,
    signal.SIGTTOU: one_worker_fewer,
    signal.SIGUSR1: reopen_logs,
    signal.SIGUSR2: upgrade_master,
    signal.SIGCHLD: child_exited,
}
