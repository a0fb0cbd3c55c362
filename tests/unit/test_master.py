"""The master's decisions, with injected signals and exits: no processes."""
import dataclasses
import itertools
import signal

import pytest

from prefork import config as configmod
from prefork.master.loop import SIGNAL_ACTIONS, Master
from prefork.master.pool import Pool
from prefork.master.lifecycle import Lifecycle, Phase
from prefork.scoreboard import BUSY, IDLE
from prefork.sockets import create_listener


class Reporter:
    def __init__(self):
        self.ready_calls, self.failures = [], []

    def ready(self, pid, urls, workers, serving=""):
        self.ready_calls.append(workers)

    def failed(self, message):
        self.failures.append(message)

    def close_in_child(self):
        pass


class RecordingPool(Pool):
    """The real Pool with fork and kill replaced by records."""

    def __init__(self, scoreboard, selector, run_child):
        super().__init__(scoreboard, selector, run_child)
        self.sent = []
        self._pids = itertools.count(1000)

    def spawn(self, gen, now, replaces=0):
        return self.add(next(self._pids), self.take_slot(), gen.number, now, None, replaces)

    def signal(self, rec, signum):
        self.sent.append((rec.pid, signum))


class NullChannels:
    """No Manager in these tests."""

    def check(self, now):
        pass

    def describe(self):
        return {}


class DecisionMaster(Master):
    """The real Master, its parts real, with a recording pool: no processes."""

    def __init__(self, **server):
        overrides = {"server": dict(server, bind=["127.0.0.1:0"])}
        super().__init__(configmod.load(None, overrides), overrides, Reporter())
        self.current = dataclasses.replace(
            self.current, listeners={"127.0.0.1:0": create_listener("127.0.0.1:0", 16)})
        self.last_publish = float("inf")   # no snapshot publishing in these tests
        self.channels = NullChannels()

    def make_pool(self):
        return RecordingPool(self.scoreboard, self.selector, None)

    @property
    def sent(self):
        return self.pool.sent

    @property
    def workers(self):
        return self.pool.workers

    def boot_all(self):
        for rec in self.workers.values():
            if rec.state == "booting":
                rec.state = "ready"
                self.scoreboard.claim(rec.slot, rec.pid, rec.generation, self.now)

    def exit(self, rec, code):
        """A worker exits: what reap() would do for it."""
        self.pool.workers[rec.pid] = rec
        gone = self.pool.remove(rec, code, self.now)
        self.watchdog.forget(rec.pid)
        if gone.boot_failure is not None:
            self.on_boot_failure(gone)

    def fail_boot(self, rec, text="ImportError: no module"):
        rec.report.boot = b"FAIL\n" + text.encode()
        self.exit(rec, 3)

    def tick(self, seconds=0.0):
        self.now += seconds
        self.supervise()

    def inject(self, signum):
        SIGNAL_ACTIONS[signum](self)


def started(**server):
    master = DecisionMaster(**server)
    master.tick()
    master.boot_all()
    master.tick()
    return master


def test_start_spawns_the_pool_and_reports_ready_once_all_boot():
    master = DecisionMaster(workers=3)
    master.tick()
    assert len(master.workers) == 3 and master.reporter.ready_calls == []
    master.boot_all()
    master.tick()
    master.tick()
    assert master.reporter.ready_calls == [3] and master.life.phase is Phase.RUNNING


def test_a_boot_failure_at_start_fails_the_start():
    master = DecisionMaster()
    master.tick()
    master.fail_boot(next(iter(master.workers.values())))
    assert master.exit_code == 1 and master.life.phase is Phase.STOPPING
    assert "ImportError" in master.reporter.failures[0]
    assert all(signum == signal.SIGQUIT for _, signum in master.sent)


def test_a_crashed_worker_is_respawned():
    master = started()
    victim = next(iter(master.workers.values()))
    master.exit(victim, -signal.SIGKILL)
    master.tick()
    assert len(master.workers) == 2 and victim.pid not in master.workers
    assert master.pool.exits["killed"] == 1


def test_boot_failures_after_start_back_off_exponentially():
    master = started()
    for rec in list(master.workers.values()):
        master.exit(rec, -signal.SIGKILL)   # the pool dies...
    delays = []
    for attempt in range(5):
        master.tick()
        booting = [r for r in master.workers.values() if r.state == "booting"]
        # ...every replacement fails to boot; after a failure, one at a time.
        assert len(booting) == (2 if attempt == 0 else 1)
        for rec in booting:
            master.fail_boot(rec)
        delays.append(master.pool.next_spawn_at - master.now)
        master.tick()
        assert not master.workers                 # nothing spawned before the delay
        master.now += delays[-1]
    assert delays == sorted(delays) and delays[-1] >= delays[0] * 8
    assert master.snapshot()["server"]["state"] == "degraded"


def test_reload_retires_the_old_generation_only_once_the_new_one_is_ready():
    master = started()
    old = set(master.workers)
    master.inject(signal.SIGHUP)
    master.tick()
    assert master.reloader.pending is not None and len(master.workers) == 4
    assert master.sent == []                  # nothing retired while new ones boot
    master.boot_all()
    master.tick()
    assert master.reloader.pending is None and master.generation == 2
    assert sorted(master.sent) == sorted((pid, signal.SIGTERM) for pid in old)


def test_reload_whose_workers_cannot_boot_keeps_the_old_generation():
    master = started()
    old = set(master.workers)
    master.inject(signal.SIGHUP)
    new = [r for r in master.workers.values() if r.generation == 2]
    master.fail_boot(new[0])
    master.tick()
    assert master.reloader.pending is None and master.generation == 1
    assert master.reloader.failed == 1 and "ImportError" in master.reloader.last_error
    assert {pid for pid, _ in master.sent} == {new[1].pid}   # only the other new one stops
    assert old <= set(master.workers)


def test_ttin_and_ttou_change_the_pool():
    master = started()
    master.inject(signal.SIGTTIN)
    master.tick()
    assert len(master.pool.members(1)) == 3
    master.boot_all()
    master.inject(signal.SIGTTOU)
    master.inject(signal.SIGTTOU)
    master.tick()
    assert len(master.pool.members(1)) == 1
    assert len([s for _, s in master.sent if s == signal.SIGTERM]) == 2


def test_graceful_stop_then_kill_at_the_deadline():
    master = started()
    master.inject(signal.SIGTERM)
    assert master.life.phase is Phase.STOPPING and {s for _, s in master.sent} == {signal.SIGTERM}
    cfg = master.config.workers
    master.tick(cfg.graceful_timeout)   # the workers cut what is left themselves...
    assert signal.SIGKILL not in {s for _, s in master.sent}
    master.tick(cfg.kill_grace + 0.1)   # ...and the master kills any that did not
    assert {s for _, s in master.sent} == {signal.SIGTERM, signal.SIGKILL}
    for rec in list(master.workers.values()):
        master.exit(rec, -signal.SIGKILL)
    master.tick()
    assert master.life.phase is Phase.FINISHED


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGQUIT])
def test_fast_stop(signum):
    master = started()
    master.inject(signum)
    assert {s for _, s in master.sent} == {signal.SIGQUIT}


def test_a_hung_worker_gets_a_stack_dump_then_term_then_kill():
    master = started()
    rec = next(iter(master.workers.values()))
    master.tick(master.config.workers.timeout + 1)   # no heartbeat from either worker
    assert [s for p, s in master.sent if p == rec.pid] == [signal.SIGUSR2]
    master.tick(0.5)
    assert [s for p, s in master.sent if p == rec.pid] == [signal.SIGUSR2, signal.SIGTERM]
    master.tick(master.config.workers.kill_grace)
    assert [s for p, s in master.sent if p == rec.pid][-1] == signal.SIGKILL
    assert master.snapshot()["totals"]["timeouts"] == 2


def test_a_request_past_request_timeout_is_stopped_and_a_shorter_one_is_not():
    master = started()
    set_workers(master, request_timeout=5.0)
    slow, fine = list(master.workers.values())
    for worker, began, path in ((slow, master.now, b"/slow"), (fine, master.now + 2, b"/fine")):
        mem, begin_at, pack_begin, _, _ = master.scoreboard.request_writers(worker.slot)
        mem[begin_at] = pack_begin(BUSY, began, b"GET", path)
    master.tick(6)
    assert (slow.pid, signal.SIGUSR2) in master.sent and slow.exit_reason == "timeout"
    assert all(pid != fine.pid for pid, _ in master.sent)


def set_workers(master, **settings):
    """The running generation's [workers] settings, changed (as a reload would)."""
    config = master.config
    master.current = dataclasses.replace(master.current, config=dataclasses.replace(
        config, workers=dataclasses.replace(config.workers, **settings)))


def test_recycling_replaces_before_retiring_one_at_a_time():
    master = DecisionMaster()
    set_workers(master, max_requests=10)
    master.tick()
    master.boot_all()
    master.tick()
    for rec in master.workers.values():   # each has served its 10 requests
        mem, _, _, end_at, pack_end = master.scoreboard.request_writers(rec.slot)
        mem[end_at] = pack_end(10, 200, 0.001, IDLE)
    master.tick()
    replacements = [r for r in master.workers.values() if r.replaces]
    assert len(replacements) == 1 and master.sent == []   # max_recycling = 1; nobody stopped yet
    assert len(master.pool.members(1)) == 3
    old_pid = replacements[0].replaces
    master.boot_all()
    master.tick()
    assert master.sent == [(old_pid, signal.SIGTERM)]   # retired once its replacement is ready
    assert master.workers[old_pid].exit_reason == "recycled"


def test_max_age_marks_a_worker_for_recycling():
    master = started()
    set_workers(master, max_age=60.0)
    for rec in master.workers.values():
        master.scoreboard.heartbeat(rec.slot, master.now + 61)
    master.tick(61)
    assert all("max_age" in master.watchdog.watches[rec.pid].recycle_reason
               for rec in master.workers.values()
               if rec.generation == 1 and not rec.replaces)
    assert sum(1 for r in master.workers.values() if r.replaces) == 1   # one at a time


def test_the_lifecycle_moves_only_as_its_transitions_say():
    life = Lifecycle()
    assert life.drain(0.0, 5.0) is life and life.serving          # not ready yet: no drain
    life = life.ready()
    assert life.phase is Phase.RUNNING and life.ready() == life
    draining = life.drain(10.0, 5.0)
    assert draining.phase is Phase.DRAINING and not draining.serving
    assert draining.drain(12.0, 5.0) is draining                  # a second TERM: unchanged
    assert not draining.drained(14.9) and draining.drained(15.0)
    stopping = draining.stop()
    assert stopping.phase is Phase.STOPPING and stopping.stop() is stopping
    assert stopping.drain(20.0, 5.0) is stopping and stopping.ready() is stopping
    assert life.workers_gone() is life                            # only a stopping one finishes
    assert stopping.workers_gone().phase is Phase.FINISHED
    assert Lifecycle().stop().phase is Phase.STOPPING             # a failed start stops at once
