"""The Manager channels in-process: a real Manager process, the master's and
a worker's side of it in this one, no server. What is held, lost, counted."""
import multiprocessing
import os
import signal
import time
from multiprocessing.managers import BaseManager

import pytest

from prefork.config import LoggingConfig
from prefork.ipc import ACCESS, ERROR, LineLedger, MasterChannels, SharedBatch
from prefork.stats import WorkerStats
from prefork.worker.logship import AccessLog
from tests.conftest import wait_for


def test_the_ledger_writes_each_line_once_and_counts_every_gap():
    ledger = LineLedger()
    assert ledger.fresh(7, ACCESS, 0, "a\nb\nc\n") == "a\nb\nc\n"   # lines 0-2
    assert ledger.fresh(7, ACCESS, 0, "a\nb\nc\n") == ""           # sent twice: dropped
    assert ledger.fresh(7, ERROR, 0, "x\ny\n") == "x\ny\n"        # each kind is numbered apart
    assert ledger.fresh(7, ACCESS, 5, "f\n") == "f\n"              # 3 and 4 died with a manager
    assert ledger.lost == 2 and ledger.expected[7, ACCESS] == 6
    # A put whose answer timed out had arrived; the worker kept its lines,
    # added two, and shipped (or left at its death) all of them: the two only.
    assert ledger.fresh(7, ACCESS, 6, "g\n") == "g\n"
    assert ledger.fresh(7, ACCESS, 6, "g\nh\ni\n") == "h\ni\n"
    assert ledger.lost == 2 and ledger.expected[7, ACCESS] == 9
    ledger.dropped(pid=8, lines=4)                           # a worker's own count
    assert ledger.lost == 6
    ledger.expected.update({(pid, ACCESS): 0 for pid in range(100, 1200)})
    ledger.prune(alive={7})
    assert {pid for pid, _ in ledger.expected} == {7}


def test_a_shared_batch_keeps_what_was_not_shipped_for_the_master():
    batch = SharedBatch(64, "latin-1")
    assert batch.append("one\n") and batch.append("caf\xe9\n")
    assert not batch.append("x" * 100)                        # no room: nothing written
    assert batch.text() == "one\ncaf\xe9\n"
    batch.shipped(2)
    assert batch.leftover() == (2, "")
    batch.append("three\n")
    assert batch.leftover() == (2, "three\n")   # what a killed worker leaves, numbered


@pytest.fixture
def channels():
    master = MasterChannels(lambda: [])
    yield master
    master.shutdown()


def test_a_workers_lines_stats_and_the_board_go_through_the_manager(channels):
    sink = channels.worker_sink()
    assert sink.connect()
    assert sink.ship_logs((ACCESS, "one\ntwo\n"))
    assert sink.ship_logs((ERROR, "oops\n"))
    assert sink.ship_logs((ACCESS, "three\n"))
    stats = WorkerStats(os.getpid())
    stats.record(200, 10, 0.001)
    sink.ship_stats(stats.take_delta(1.0))
    assert channels.drain_logs() == [(ACCESS, "one\ntwo\n", os.getpid(), 0),
                                     (ERROR, "oops\n", os.getpid(), 0),
                                     (ACCESS, "three\n", os.getpid(), 2)]
    [delta] = channels.drain_stats()
    assert delta.requests == 1 and delta.bytes_out == 10
    channels.publish({"generation": 3})
    assert sink.snapshot() == {"generation": 3}


def test_lines_wait_in_their_batch_while_the_manager_is_gone_and_the_overflow_is_counted(
        channels):
    sink = channels.worker_sink()
    assert sink.connect()
    os.kill(channels.pid, signal.SIGKILL)
    log = AccessLog(LoggingConfig(access_log="on", access_format="%(U)s"), sink,
                    SharedBatch(64, "latin-1"))
    environ = {"PATH_INFO": "/held", "REQUEST_METHOD": "GET"}
    log.record(environ, 200, 0, 0.0)
    log.flush()                                       # cannot ship: stays in the batch
    assert log.batch.text() == "/held\n"
    log.record(dict(environ, PATH_INFO="/" + "x" * 80), 200, 0, 0.0)   # never fits: counted
    assert sink.take_lost_lines() == 1 and sink.take_lost_lines() == 0
    wait_for(lambda: channels.check(time.monotonic()) or channels.restarts == 1,
             message="the manager replaced")
    # The worker reconnects by itself (at most every RECONNECT_EVERY) and ships what waited.
    ledger = LineLedger()

    def delivered():
        log.flush()
        return [b for b in channels.drain_logs() if ledger.fresh(b[2], b[0], b[3], b[1])]
    batches = wait_for(delivered, message="the lines that waited")
    assert batches[0][1] == "/held\n" and ledger.lost == 0 and log.batch.text() == ""


def stopped(pid) -> bool:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] == "T"


def test_a_batch_whose_answer_timed_out_after_it_arrived_is_written_once_with_what_followed(
        channels):
    """The Manager stalls past the call's bound with the put in its socket:
    the worker cannot know the lines arrived, keeps them, adds more and ships
    them all again. Each line is written once, none lost, no gap counted."""
    sink = channels.worker_sink()
    assert sink.connect()
    log = AccessLog(LoggingConfig(access_log="on", access_format="%(U)s"), sink,
                    SharedBatch(4096, "latin-1"))
    environ = {"PATH_INFO": "/a", "REQUEST_METHOD": "GET"}
    log.record(environ, 200, 0, 0.0)
    log.flush()   # shipped (and the connection to the Manager made)
    log.record(dict(environ, PATH_INFO="/b"), 200, 0, 0.0)
    os.kill(channels.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: stopped(channels.pid), message="the Manager stopped")
        log.flush()   # the put waits in the Manager's socket; its answer comes too late
    finally:
        os.kill(channels.pid, signal.SIGCONT)
    assert log.batch.text() == "/b\n"
    log.record(dict(environ, PATH_INFO="/c"), 200, 0, 0.0)
    ledger = LineLedger()
    written = []

    def delivered():
        log.flush()   # reconnects (at most every RECONNECT_EVERY), then ships /b and /c
        for kind, text, pid, before in channels.drain_logs():
            written.append(ledger.fresh(pid, kind, before, text))
        return log.batch.text() == "" and len(written) == 3
    wait_for(delivered, message="the lines shipped again")
    assert "".join(written) == "/a\n/b\n/c\n" and ledger.lost == 0


class _SlowHub(BaseManager):
    pass


def _slow():
    time.sleep(0.8)   # longer than prefork's own bound on Manager calls
    return "answered"


_SlowHub.register("slow", callable=_slow)


def test_an_apps_own_manager_keeps_multiprocessings_plain_client(tmp_path):
    """Only prefork's Manager is called with the 0.5 s bound: an app's own,
    in a worker, waits as long as its calls take."""
    hub = _SlowHub(address=str(tmp_path / "app.sock"), authkey=b"app",
                   ctx=multiprocessing.get_context("fork"))
    hub.start()
    try:
        assert hub.slow()._getvalue() == "answered"
    finally:
        hub.shutdown()
