"""The pool: the master's record of every worker process, and the one place
that forks, signals and stops them.

Owns: the worker records, the scoreboard slots they hold, each worker's report
pipe (boot report, then stack dumps), reaping and what each exit counts as,
boot-failure backoff, and keeping a generation at its target size. Every
stop goes through stop(): the deadlines (TERM after a stack dump, KILL after
the grace) are enforced here each tick. Each worker leads a process group of
its own: what its app starts (a multiprocessing Manager, a subprocess) is in
it, and is killed once the worker is gone, as systemd kills a unit's control
group, so that nothing outlives its worker holding prefork's listeners or pipes.
Must not: decide policy (when to reload, recycle or stop everything: the
master, reloader and watchdog do) or block: report pipes are non-blocking.
"""
from __future__ import annotations

import dataclasses
import gc
import heapq
import logging
import os
import selectors
import signal
import time

from ..config import MAX_WORKERS, is_tls
from ..ipc import LogBatches
from ..signals import DUMP_SIGNAL
from ..tls import expiry_warning, server_context

log = logging.getLogger("prefork.master")
MAX_SLOTS = 2 * MAX_WORKERS   # a reload boots a second generation beside the first
FAST_STOP_GRACE = 1.0
DUMP_WAIT = 0.3          # seconds between a stack dump and SIGTERM
BACKOFF_CAP = 10.0
EXIT_CATEGORIES = {"recycled": "recycled", "timeout": "killed"}


@dataclasses.dataclass(frozen=True)
class Generation:
    """What a generation of workers is started with: its number (bumped by
    each reload), its config and its listeners (bind text -> socket)."""
    number: int
    config: object            # config.Config
    listeners: dict
    tls: object = None        # the generation's ssl.SSLContext (tls.py), if it has https:// listeners

    @classmethod
    def made(cls, number, config, listeners):
        """A generation with its TLS context made here, in the master, before
        its workers fork: they share its session-ticket keys. TlsError when the
        files changed since config.load checked them."""
        context = None
        if config.wants_h2 and not config.speaks_h2:
            log.warning("http2: not offered: prefork.http._nghttp2 was not built "
                        "(it needs a C compiler: make install builds it)")
        if any(is_tls(bind) for bind in config.server.bind):
            context = server_context(config.tls, config.speaks_h2)
            warning = expiry_warning(config.tls.certfile)
            if warning:
                log.warning("tls: %s", warning)
        return cls(number, config, listeners, context)

    def tls_listeners(self) -> dict:
        """fd -> SSLContext of the listeners that speak TLS."""
        return {sock.fileno(): self.tls for bind, sock in self.listeners.items() if is_tls(bind)}


@dataclasses.dataclass
class ReportPipe:
    """The read end of a worker's report pipe: b"OK\\n" or b"FAIL\\n"+traceback
    at boot, then stack dumps (collected until they pause, then logged)."""
    fd: int | None
    boot: bytes = b""
    dump: bytes = b""
    dump_at: float = 0.0

    @property
    def booted(self) -> bool:
        return self.boot.startswith(b"OK\n")

    @property
    def failure(self) -> str | None:
        if self.boot.startswith(b"FAIL\n"):
            return self.boot[5:].decode("utf-8", "replace").strip()
        return None

    def take(self, data: bytes, now: float) -> None:
        if not self.booted:
            self.boot += data
            if self.booted:   # anything after OK is already a dump
                self.dump, self.boot = self.boot[3:], b"OK\n"
        else:
            self.dump += data
        self.dump_at = now


@dataclasses.dataclass
class WorkerRecord:
    """The master's own view of one child (never crosses a process boundary)."""
    pid: int
    slot: int
    generation: int
    spawned: float
    report: ReportPipe
    state: str = "booting"          # booting -> ready -> stopping
    exit_reason: str = ""           # why we stopped it: "stop", "retired", "scaled down",
                                    # "timeout", "recycled", "reload aborted"
    stop_deadline: float = 0.0      # SIGKILL due
    term_at: float = 0.0            # SIGTERM due (after a stack dump)
    killed: bool = False
    replaces: int = 0               # pid of the worker this one replaces (not a member yet)
    batches: LogBatches | None = None   # its unshipped log lines (shared memory)
    served: int = 0                 # requests it ended, as its scoreboard slot said at its exit


@dataclasses.dataclass(frozen=True)
class Exit:
    """What the master is told of a worker that is gone."""
    rec: WorkerRecord
    code: int
    boot_failure: str | None        # the report, when it died before booting

    @property
    def how(self) -> str:
        return f"signal {signal.Signals(-self.code).name}" if self.code < 0 else f"code {self.code}"


class Pool:
    def __init__(self, scoreboard, selector, run_child):
        """run_child(config, listeners, slot, generation, report_fd, batches, tls)
        runs the worker in the forked child and never returns."""
        self.scoreboard = scoreboard
        self.selector = selector
        self.run_child = run_child
        self.workers: dict[int, WorkerRecord] = {}   # pid -> record
        self._free_slots = list(range(MAX_SLOTS))
        self.spawns = 0                 # workers started, ever
        self.exits = {"normal": 0, "crashed": 0, "killed": 0, "recycled": 0}
        self.boot_failures = 0       # in a row; > 0 means degraded
        self.last_boot_error = ""
        self.next_spawn_at = 0.0

    # -- membership --------------------------------------------------------------
    def __iter__(self):
        return iter(list(self.workers.values()))

    def __len__(self):
        return len(self.workers)

    def get(self, pid):
        return self.workers.get(pid)

    def members(self, generation):
        """Workers of a generation that are not on their way out."""
        return [r for r in self.workers.values()
                if r.generation == generation and r.state != "stopping"]

    def ready_count(self, generation):
        return sum(1 for r in self.members(generation) if r.state == "ready")

    # -- spawning ------------------------------------------------------------------
    def spawn(self, gen: Generation, now, replaces=0) -> WorkerRecord:
        slot = self.take_slot()
        batches = LogBatches()   # mapped before the fork: shared with the child
        read_fd, write_fd = os.pipe()
        # Objects the child inherits stay out of its collector's reach, so
        # collections there do not write to (and copy) the shared pages.
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            os.setpgid(0, 0)   # (both sides set it: whichever runs first)
            os.close(read_fd)
            for rec in self.workers.values():
                if rec.report.fd is not None:
                    os.close(rec.report.fd)
            self.run_child(gen.config, list(gen.listeners.values()), slot, gen.number, write_fd,
                           batches, gen.tls_listeners())
        try:
            os.setpgid(pid, pid)
        except OSError:   # the child did it, or is gone already
            pass
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        rec = self.add(pid, slot, gen.number, now, read_fd, replaces)
        rec.batches = batches
        self.selector.register(read_fd, selectors.EVENT_READ, lambda key: self.read_report(rec))
        # "slot": a scoreboard row, not a count (a replacement boots beside
        # the worker it replaces, so a pool of 2 may use slot 2).
        log.info("spawned worker pid %d in slot %d (generation %d%s)", pid, slot, gen.number,
                 f", to replace pid {replaces}" if replaces else "")
        return rec

    def add(self, pid, slot, generation, now, report_fd, replaces=0) -> WorkerRecord:
        rec = WorkerRecord(pid, slot, generation, now, ReportPipe(report_fd), replaces=replaces)
        self.workers[pid] = rec
        self.spawns += 1
        return rec

    def take_slot(self) -> int:
        """The lowest free scoreboard slot."""
        return heapq.heappop(self._free_slots)

    def read_report(self, rec):
        try:
            data = os.read(rec.report.fd, 65536)
        except BlockingIOError:
            return
        rec.report.take(data, time.monotonic())
        if rec.state == "booting" and rec.report.booted:
            rec.state = "ready"
            self.boot_failures = 0
        if not data:
            self._close_report(rec)

    def _close_report(self, rec):
        if rec.report.fd is not None:
            self.selector.unregister(rec.report.fd)
            os.close(rec.report.fd)
            rec.report.fd = None

    def log_dump(self, rec):
        if rec.report.dump.strip():
            log.error("worker %d (pid %d) reports:\n%s", rec.slot, rec.pid,
                      rec.report.dump.decode("utf-8", "replace").rstrip())
        rec.report.dump = b""

    # -- signals and stops ----------------------------------------------------------
    def signal(self, rec, signum):
        try:
            os.kill(rec.pid, signum)
        except ProcessLookupError:
            pass   # already gone; reap() will see it

    def stop(self, rec, reason, now, grace, fast=False, dump=False):
        """The one way a worker is asked to go. Graceful: SIGTERM (the worker
        cuts what is left at graceful_timeout itself); fast: SIGQUIT; dump:
        its stacks first, then SIGTERM. SIGKILL follows at the deadline.
        A fast stop escalates a graceful one already under way."""
        if rec.state == "stopping" and not fast:
            return
        rec.state = "stopping"
        rec.exit_reason = rec.exit_reason or reason
        if dump:
            self.signal(rec, DUMP_SIGNAL)
            rec.term_at = now + DUMP_WAIT
            rec.stop_deadline = now + DUMP_WAIT + grace
            return
        rec.stop_deadline = now + (FAST_STOP_GRACE if fast else grace)
        self.signal(rec, signal.SIGQUIT if fast else signal.SIGTERM)

    def enforce(self, now, boot_timeout):
        """Each tick: stack dumps that have paused are logged; due SIGTERMs
        and SIGKILLs are sent; workers that do not boot in time are killed."""
        for rec in self.workers.values():
            if rec.report.dump and now - rec.report.dump_at > 0.1:
                self.log_dump(rec)
            if rec.state == "stopping":
                if rec.term_at and now >= rec.term_at:
                    rec.term_at = 0.0
                    self.signal(rec, signal.SIGTERM)
                if now >= rec.stop_deadline and not rec.killed:
                    log.warning("worker %d (pid %d) still running after its stop deadline: "
                                "killing it", rec.slot, rec.pid)
                    rec.killed = True
                    self.signal(rec, signal.SIGKILL)
            elif rec.state == "booting" and now - rec.spawned > boot_timeout and not rec.killed:
                log.error("worker %d (pid %d) did not boot within %gs: killing it",
                          rec.slot, rec.pid, boot_timeout)
                rec.killed = True
                rec.report.boot = b"FAIL\nboot timeout"
                self.signal(rec, signal.SIGKILL)

    # -- exits ----------------------------------------------------------------------
    def reap(self, now) -> list:
        """Collect every exited worker: -> [Exit]."""
        gone = []
        for rec in self:
            try:
                pid, status = os.waitpid(rec.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = rec.pid, 0
            if pid:
                gone.append(self.remove(rec, os.waitstatus_to_exitcode(status), now))
        return gone

    def remove(self, rec, code, now) -> Exit:
        """Forget a worker that exited, count the exit and say why it went;
        what its app started dies with it (its process group)."""
        try:
            os.killpg(rec.pid, signal.SIGKILL)
        except OSError:   # nothing left in it
            pass
        for _ in range(64):   # the rest of a boot failure report, then done: a child of
            if rec.report.fd is None:   # its app may hold the pipe, so no wait for its end
                break
            self.read_report(rec)
        self._close_report(rec)
        self.log_dump(rec)
        del self.workers[rec.pid]
        for other in self.workers.values():
            if other.replaces == rec.pid:
                other.replaces = 0          # the worker it replaced died: it is simply a member
        rec.served = self.scoreboard.read(rec.slot).requests   # before the slot is cleared
        self.scoreboard.release(rec.slot)
        heapq.heappush(self._free_slots, rec.slot)
        failure = rec.report.failure
        if failure is None and rec.state == "booting" and not rec.killed:
            failure = f"exited while booting ({Exit(rec, code, None).how})"
        if rec.state == "stopping" and not rec.killed:
            failure = None   # asked to go before it booted (an aborted reload): not a failure
        exit = Exit(rec, code, failure)
        if failure is not None:
            self.exits["crashed"] += 1
            self.boot_failures += 1
            self.next_spawn_at = now + min(BACKOFF_CAP, 0.1 * 2 ** self.boot_failures)
        elif rec.exit_reason:
            self.exits[EXIT_CATEGORIES.get(rec.exit_reason, "normal")] += 1
            log.info("worker %d (pid %d) stopped (%s, %s)", rec.slot, rec.pid, rec.exit_reason,
                     exit.how)
        elif code == -signal.SIGKILL:
            self.exits["killed"] += 1
            log.error("worker %d (pid %d) was killed by SIGKILL (possibly out of memory)",
                      rec.slot, rec.pid)
        else:
            self.exits["crashed"] += 1
            log.error("worker %d (pid %d) died unexpectedly (%s)", rec.slot, rec.pid, exit.how)
        return exit

    def note_boot_error(self, report) -> bool:
        """Remember the last boot error; True when it repeats the one before."""
        repeated = report == self.last_boot_error
        self.last_boot_error = report
        return repeated

    def clear_backoff(self):
        self.boot_failures = 0
        self.next_spawn_at = 0.0

    # -- sizing ---------------------------------------------------------------------
    def keep_size(self, target, gen: Generation, now):
        """Spawn the missing members (one at a time while boots fail, after
        the backoff), stop the oldest extra ones."""
        # A replacement booting for a recycled worker is not a member yet.
        current = [r for r in self.members(gen.number) if not r.replaces]
        missing = target - len(current)
        if missing > 0 and now >= self.next_spawn_at:
            for _ in range(missing if self.boot_failures == 0 else 1):
                self.spawn(gen, now)
        elif missing < 0:
            for rec in sorted(current, key=lambda r: r.spawned)[:-missing]:
                self.stop(rec, "scaled down", now, gen.config.workers.stop_grace)

    def stop_all(self, reason, now, grace, fast):
        for rec in self:
            self.stop(rec, reason, now, grace, fast=fast)
