"""The worker's own decisions in-process: which connections it accepts, when
it stops accepting and starts again, what a graceful stop does. A real Worker
(not booted: no app), real listening sockets and epoll; no processes."""
import errno
import os
import select
import socket

import pytest

from prefork import config as config_mod
from prefork import scoreboard as sb
from prefork.scoreboard import Scoreboard
from prefork.worker import loop as loop_mod
from prefork.worker.loop import ACCEPT_PAUSE, IDLE_GRACE, Worker


class NullSink:
    def __init__(self):
        self.deltas = []

    def ship_stats(self, delta):
        self.deltas.append(delta)

    shipped = {"access": 0, "error": 0}

    def ship_logs(self, batch):
        return True   # taken: the batch is cleared, as after a real shipment

    def count_lost(self, lines):
        pass

    def take_lost_lines(self):
        return 0


@pytest.fixture
def made(tmp_path):
    """A worker in slot 0 of a two-worker scoreboard (slot 1 serves too), with
    one listener; -> (worker, listener, clients list)."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    listener.setblocking(False)
    clients = []

    def make(**workers):
        config = config_mod.load(None, {"workers": dict(threads=1, **workers), "logging": {
            "access_log": str(tmp_path / "a.log"), "error_log": str(tmp_path / "e.log")}})
        board = Scoreboard(2)
        for slot in (0, 1):
            board.claim(slot, 100 + slot, 1, 0.0)
            board.set_state(slot, sb.IDLE)
        worker = Worker(config, [listener], board, 0, 1, os.getppid(), NullSink())
        worker.poller = select.epoll()
        worker.poller.register(listener.fileno(), select.EPOLLIN)
        return worker
    yield make, listener, clients
    for client in clients:
        client.close()
    listener.close()


def knock(listener, clients, count):
    for _ in range(count):
        clients.append(socket.create_connection(listener.getsockname(), timeout=5))


def test_a_worker_takes_its_fair_share_and_declines_at_most_once_in_a_row(made):
    make, listener, clients = made
    worker = make()
    knock(listener, clients, 4)
    worker.accept(listener)          # (0 open + 4 waiting) / 2 workers: 2
    assert len(worker.conns) == 2 and not worker.declined
    worker.accept(listener)          # (2 + 2) / 2: it has its share
    assert len(worker.conns) == 2 and worker.declined
    worker.accept(listener)          # but never twice in a row: a busy peer strands none
    assert len(worker.conns) == 3 and not worker.declined
    assert worker.scoreboard.read(0).connections == 3


def test_at_max_connections_it_stops_watching_the_listener_and_resumes_when_one_closes(made):
    make, listener, clients = made
    worker = make(max_connections=2)
    knock(listener, clients, 4)
    worker.accept(listener)
    worker.accept(listener)
    assert len(worker.conns) == 2 and not worker.listening
    next(iter(worker.conns.values())).close()
    assert worker.listening


def test_out_of_descriptors_it_pauses_accepting_then_resumes(made, monkeypatch):
    make, listener, clients = made
    worker = make()
    knock(listener, clients, 1)

    class Exhausted:
        def __getattr__(self, name):
            return getattr(listener, name)

        def accept(self):
            raise OSError(errno.EMFILE, "Too many open files")
    worker.now = 50.0
    worker.accept(Exhausted())
    assert not worker.listening and worker.accept_paused_until == 50.0 + ACCEPT_PAUSE
    assert worker.accept_failures == 1
    worker.resume_accepting(50.0 + ACCEPT_PAUSE / 2)
    assert not worker.listening
    worker.resume_accepting(50.0 + ACCEPT_PAUSE)
    assert worker.listening and worker.accept_paused_until == 0.0


def test_a_graceful_stop_serves_what_is_queued_and_gives_idle_connections_a_grace(made):
    make, listener, clients = made
    worker = make()
    knock(listener, clients, 1)
    worker.accept(listener)
    [idle] = worker.conns.values()
    knock(listener, clients, 3)       # in the listen queue when TERM comes
    worker.now = 10.0
    worker.begin_graceful_stop()
    assert len(worker.conns) == 4     # the queued ones were accepted, not reset
    assert worker.stopping and not worker.listeners and listener.fileno() == -1
    assert idle.deadline == 10.0 + IDLE_GRACE
    assert worker.scoreboard.read(0).state == "stopping"
    assert worker.stop_deadline == 10.0 + worker.config.workers.graceful_timeout


def test_the_tick_cuts_what_is_left_at_the_graceful_deadline(made, monkeypatch):
    make, listener, clients = made
    worker = make(graceful_timeout=1.0)
    knock(listener, clients, 2)
    worker.accept(listener)
    worker.now = 0.0
    worker.begin_graceful_stop()
    monkeypatch.setattr(loop_mod.os, "getppid", lambda: worker.master_pid)
    worker.tick(0.5)
    assert worker.conns
    worker.tick(1.0)
    assert not worker.conns


def test_at_max_connections_the_idle_and_slowest_make_room_for_the_waiting(made, monkeypatch):
    make, listener, clients = made
    worker = make(max_connections=3)
    worker.scoreboard.set_state(1, sb.EMPTY)   # no peer: this worker alone serves
    knock(listener, clients, 3)
    worker.accept(listener)
    assert len(worker.conns) == 3 and not worker.listening
    idle, arriving, busy = list(worker.conns.values())
    idle.deadline = 50.0                       # the longest idle (the earliest deadline)
    arriving.reader.in_message, arriving.began, arriving.progress = True, 0.0, 10
    monkeypatch.setattr(busy, "exchange", object())   # its request in the app
    knock(listener, clients, 2)                # two more wait in the queue
    worker.now = 10.0
    monkeypatch.setattr(loop_mod.os, "getppid", lambda: worker.master_pid)
    worker.tick(10.0)
    assert idle.state == "closed" and arriving.state == "closed" and busy.state != "closed"
    assert worker.stats.evicted + sum(d.evicted for d in worker.sink.deltas) == 2
    assert worker.listening
    worker.accept(listener)
    assert len(worker.conns) == 3
