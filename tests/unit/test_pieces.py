"""Pure pieces that the integration tests only reach through processes:
byte ranges, conditional requests, percentiles, rate windows, the
scoreboard, the Prometheus text, the response framing."""
import os
import signal
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from prefork.http.errors import AppError
from prefork.http.response import ResponseFraming
from prefork.signals import SignalInbox
from prefork.scoreboard import BUSY, IDLE, Scoreboard, busy_idle
from prefork.stats import BUCKETS, RateWindow, Totals, WorkerStats, percentile
from prefork.worker.static import StaticFiles
from prefork.worker.status import prometheus

ETAG = '"abc-10"'
MTIME = 1_700_000_000


@pytest.mark.parametrize("header,expected", [
    ("bytes=0-4", (0, 4)),
    ("bytes=5-", (5, 99)),
    ("bytes=-10", (90, 99)),
    ("bytes=90-500", (90, 99)),
    ("bytes=100-", "unsatisfiable"),
    ("bytes=-0", "unsatisfiable"),
    ("bytes=5-4", None),          # invalid (RFC 9110 14.1.1): ignored, the whole file
    ("bytes=0-1,5-6", None),      # several ranges: the whole file
    ("items=0-4", None),
    ("bytes=a-b", None),
    ("bytes=\u0663-5", None),          # a digit, but not an ASCII one: invalid, ignored
    ("bytes=0-" + "9" * 4400, (0, 99)),   # int() refuses 4,300+ digits; we do not ask it
    ("bytes=" + "9" * 4400 + "-", "unsatisfiable"),
])
def test_byte_ranges(header, expected):
    assert StaticFiles.range_for({"HTTP_RANGE": header}, ETAG, MTIME, 100) == expected


def test_if_range_that_does_not_match_gives_the_whole_file():
    environ = {"HTTP_RANGE": "bytes=0-4", "HTTP_IF_RANGE": '"other"'}
    assert StaticFiles.range_for(environ, ETAG, MTIME, 100) is None
    environ["HTTP_IF_RANGE"] = ETAG
    assert StaticFiles.range_for(environ, ETAG, MTIME, 100) == (0, 4)


@pytest.mark.parametrize("environ,expected", [
    ({"HTTP_IF_NONE_MATCH": ETAG}, True),
    ({"HTTP_IF_NONE_MATCH": f'"x", W/{ETAG}'}, True),
    ({"HTTP_IF_NONE_MATCH": "*"}, True),
    ({"HTTP_IF_NONE_MATCH": '"x"', "HTTP_IF_MODIFIED_SINCE": "Sun, 22 Nov 2099 00:00:00 GMT"},
     False),   # If-None-Match wins over If-Modified-Since
    ({"HTTP_IF_MODIFIED_SINCE": "Sun, 22 Nov 2099 00:00:00 GMT"}, True),
    ({"HTTP_IF_MODIFIED_SINCE": "Sun, 22 Nov 2000 00:00:00 GMT"}, False),
    ({"HTTP_IF_MODIFIED_SINCE": "not a date"}, False),
    ({}, False),
])
def test_conditional_requests(environ, expected):
    assert StaticFiles.not_modified(environ, ETAG, MTIME) is expected


def test_percentiles_interpolate_inside_the_bucket():
    histogram = [0] * (len(BUCKETS) + 1)
    assert percentile(histogram, 0.5) == 0.0
    histogram[0] = 100                       # all in (0, 0.5 ms]
    assert percentile(histogram, 0.5) == pytest.approx(0.00025)
    histogram[2] = 100                       # and as many in (1, 2.5 ms]
    assert percentile(histogram, 0.99) == pytest.approx(0.001 + 0.0015 * 0.98)


def test_rate_windows():
    window = RateWindow()
    assert window.rates() == {"1s": 0.0, "10s": 0.0, "60s": 0.0}
    for second in range(0, 121):
        window.observe(float(second), second * 10)   # 10 requests a second
    assert window.rates() == {"1s": 10.0, "10s": 10.0, "60s": 10.0}
    window.observe(121.0, 1200)                      # a quiet second
    assert window.rates()["1s"] < 10.0 and window.rates()["60s"] < 10.0


def test_worker_deltas_fold_into_totals():
    stats = WorkerStats(pid=7)
    stats.record(200, 10, 0.0001)
    stats.record(404, 5, 0.2)
    stats.record_rejected(400)
    delta = stats.take_delta(1.0, open_connections=3)
    totals = Totals()
    totals.fold(delta)
    totals.fold(delta)
    # A request is a response sent, refused ones included: the statuses add up.
    assert totals.requests == 6 and totals.rejected == 2 and totals.bytes_out == 30
    assert sum(totals.statuses.values()) == totals.requests
    assert totals.responses_by_class() == {"1xx": 0, "2xx": 2, "3xx": 0, "4xx": 4, "5xx": 0}
    assert stats.take_delta(2.0).requests == 0   # taken: counting starts again


def test_each_duration_lands_in_the_bucket_bisect_gives_it():
    # record() skips the search for the first bucket: the edges must agree.
    import bisect
    for duration in (0.0, BUCKETS[0] / 2, BUCKETS[0], BUCKETS[0] * 1.0001, 0.003, 10.0, 11.0):
        stats = WorkerStats()
        stats.record(200, 0, duration)
        expected = [0] * (len(BUCKETS) + 1)
        expected[bisect.bisect_left(BUCKETS, duration)] = 1
        assert stats.histogram == expected, duration


def test_scoreboard_slots_are_private_and_released():
    board = Scoreboard(4)
    board.claim(1, 111, 2, 5.0)
    board.set_state(1, 2)                         # idle
    mem, begin_at, pack_begin, end_at, pack_end = board.request_writers(1)
    mem[begin_at] = pack_begin(BUSY, 6.0, b"GET", b"/x" * 100)   # longer than the field: truncated
    view = board.read(1)
    assert (view.pid, view.generation, view.state, view.method) == (111, 2, "busy", "GET")
    assert len(view.path) == 120
    live = view.live_fields(7.5)
    assert live["current"] == {"method": "GET", "path": view.path, "elapsed": 1.5}
    mem[end_at] = pack_end(1, 200, 0.25, IDLE)
    view = board.read(1)
    assert (view.state, view.requests, view.last_status, view.last_duration, view.pid) == \
        ("idle", 1, 200, 0.25, 111)
    board.set_connections(1, 3)
    assert board.serving_connections() == (3, 1)
    assert board.read(0).pid == 0                 # other slots untouched
    board.release(1)
    assert board.read(1).state == "empty" and board.serving_connections() == (0, 0)
    assert busy_idle(["busy", "idle", "idle", "booting"]) == (1, 2)


def test_prometheus_text_parses():
    snapshot = {
        "server": {"version": "0.1.0", "python": "3.11", "uptime": 5.0, "generation": 1},
        "pool": {"busy": 1, "idle": 1, "alive": 2, "target": 2, "spawned": 2,
                 "exits": {"normal": 0, "crashed": 1, "killed": 0, "recycled": 0}},
        "totals": {"requests": 10, "responses": {"2xx": 9, "5xx": 1},
                   "statuses": {"200": 9, "500": 1}, "bytes_in": 1, "bytes_out": 2,
                   "connections_accepted": 3, "app_exceptions": 1, "rejected": 0,
                   "timeouts": 0, "connections_open": 1},
        "latency": {"counts": [10] + [0] * len(BUCKETS), "sum": 0.001, "count": 10},
        "rates": {"1s": 1.0, "10s": 1.0, "60s": 1.0},
        "listen_queue": {"depth": 0, "max": 3},
        "workers": [{"slot": 0, "requests": 10, "state": "busy", "rss": 1, "cpu": 0.5,
                     "age": 1.0}],
    }
    families = {f.name: f for f in text_string_to_metric_families(prometheus(snapshot))}
    assert families["prefork_requests"].samples[0].value == 10
    histogram = families["prefork_request_duration_seconds"]
    assert [s.value for s in histogram.samples if s.name.endswith("_count")] == [10]


def framing_for(length, lines=b"", method="GET", version="1.1"):
    framing = ResponseFraming()
    framing.status_code, framing.status_line = 200, b"HTTP/1.1 200 OK\r\n"
    framing.lines, framing.content_length = lines, length
    framing.method, framing.version = method, version
    return framing


def test_framing_decides_length_chunking_and_close():
    fixed = b"Server: p\r\nDate: d\r\n"
    framing = framing_for(None, b"X: 1\r\n")
    head = framing.framed(b"", fixed, False)
    assert head == b"HTTP/1.1 200 OK\r\nServer: p\r\nDate: d\r\nX: 1\r\n" \
                   b"Transfer-Encoding: chunked\r\n\r\n" and not framing.ends_connection
    assert framing.headers_sent
    assert framing.framed(b"abc", fixed, False) == b"3\r\nabc\r\n"
    assert framing.ending(fixed, False) == b"0\r\n\r\n"
    framing = framing_for(None, version="1.0")
    head = framing.framed(b"", fixed, False)
    assert head.endswith(b"Connection: close\r\n\r\n") and framing.ends_connection
    framing = framing_for(5)
    assert framing.framed(b"1234567", fixed, False).endswith(b"\r\n\r\n12345")
    assert framing.framed(b"8", fixed, False) == b""
    framing = framing_for(5)
    framing.framed(b"12", fixed, False)
    assert framing.ending(fixed, False) == b"" and framing.ends_connection   # short: only a close delimits it
    framing = framing_for(5, method="HEAD", version="1.0")
    head = framing.framed(b"12345", fixed, False)
    assert head.endswith(b"Connection: keep-alive\r\n\r\n")
    # The server's closing and the request's keep-alive verdict close it too.
    assert framing_for(5).framed(b"", fixed, True).endswith(b"Connection: close\r\n\r\n")
    framing = framing_for(5)
    framing.keep_alive = False
    assert framing.whole(fixed, False, b"12345").endswith(b"Connection: close\r\n\r\n12345")
    # ending() with nothing sent: the head, with a length of 0 unless the app said.
    framing = framing_for(None)
    assert framing.ending(fixed, False).endswith(b"Content-Length: 0\r\n\r\n")
    # whole(): the body in hand gives the length, or is cut to the declared one.
    framing = framing_for(None)
    assert framing.whole(fixed, False, b"abc").endswith(
        b"Content-Length: 3\r\n\r\nabc") and (framing.sent, framing.ends_connection) == (3, False)
    framing = framing_for(2)
    assert framing.whole(fixed, False, b"abc").endswith(b"\r\n\r\nab")
    framing = framing_for(5)
    assert framing.whole(fixed, False, b"abc").endswith(b"\r\n\r\nabc")
    assert framing.ends_connection and framing.end() == b""
    framing = framing_for(3, method="HEAD")
    assert framing.whole(fixed, False, b"abc").endswith(b"Length: 3\r\n\r\n")
    # A file's length: what is left of it, cut to the declared length.
    assert framing_for(None).file_length(10) == 10 and framing_for(4).file_length(10) == 4
    # A bad first chunk leaves the head unsent (an error page can answer);
    # so does a response that was never started.
    framing = framing_for(None)
    with pytest.raises(AppError):
        framing.framed("text", fixed, False)
    assert not framing.headers_sent
    with pytest.raises(AppError, match="start_response"):
        ResponseFraming().whole(fixed, False, b"abc")


@pytest.fixture(params=["c", "python"])
def combined_formatter(request, monkeypatch):
    """The combined line made by prefork/worker/_combined.c, or by the Python
    definition (the fallback where the C is not built)."""
    from prefork.worker import logship
    if request.param == "python":
        monkeypatch.setattr(logship, "_combined_line", logship.combined_line)
        monkeypatch.setattr(logship, "_combined_into", None)
    elif logship._fast_combined_line is None:
        pytest.fail("prefork/worker/_combined.c is not built: was there a C compiler "
                    "when `make install` ran?")
    return request.param


def test_the_combined_line_quotes_only_what_needs_it(combined_formatter):
    from prefork.config import LoggingConfig
    from prefork.worker.logship import AccessLog

    class Sink:
        shipped = {"access": 0}

        def ship_logs(self, batch):
            self.batch = batch
            self.shipped["access"] += batch[1].count("\n")
            return True
    sink = Sink()
    log = AccessLog(LoggingConfig(access_log="access.log"), sink)
    log.set_time(0)
    environ = {"REMOTE_ADDR": "", "REQUEST_METHOD": "GET", "RAW_URI": "/a",
               "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_USER_AGENT": 'x"y\\z'}
    log.record(environ, 200, 5, 0.001)
    log.record(dict(environ, HTTP_USER_AGENT="curl", HTTP_REFERER="/b"), 404, 0, 0.0000015)
    log.flush()
    assert sink.batch[1] == (
        '- - - [01/Jan/1970:00:00:00 +0000] "GET /a HTTP/1.1" 200 5 "-" "x\\"y\\\\z" 1000\n'
        '- - - [01/Jan/1970:00:00:00 +0000] "GET /a HTTP/1.1" 404 0 "/b" "curl" 1\n')
    assert log.batch.leftover() == (2, "")   # shipped: cleared, numbered


@pytest.mark.parametrize("change", [
    {}, {"REMOTE_ADDR": "10.0.0.1"}, {"RAW_URI": '/q?a="b"\\c'}, {"HTTP_REFERER": "\\"},
    {"HTTP_USER_AGENT": "caf\xe9 \xff"},          # latin-1 beyond ASCII
    {"HTTP_USER_AGENT": "\u20ac"},                # not latin-1: the C hands it back
    {"RAW_URI": b"/a"},                           # an app put bytes there: the same
    {"RAW_URI": "/" + "x" * 9000},                # past the C buffer: the same
    {"SERVER_PROTOCOL": "HTTP/1.0", "REQUEST_METHOD": "HEAD"},
])
@pytest.mark.parametrize("numbers", [(200, 0, 0.0), (599, 10**12, 12.3456789), (101, 7, 1e-7)])
def test_the_c_combined_line_is_the_python_one(change, numbers):
    from prefork.worker import logship
    if logship._fast_combined_line is None:
        pytest.fail("prefork/worker/_combined.c is not built")
    environ = dict({"REMOTE_ADDR": "", "REQUEST_METHOD": "GET", "RAW_URI": "/a",
                    "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_USER_AGENT": "curl"}, **change)
    stamp = "[01/Jan/1970:00:00:00 +0000]"
    expected = logship.combined_line(environ, stamp, *numbers)
    fast = logship._fast_combined_line(environ, stamp, *numbers)
    assert fast in (expected, None)
    handed_back = any(not isinstance(v, str) or max(map(ord, v), default=0) > 255 or len(v) > 8000
                      for v in change.values())
    assert (fast is None) == handed_back


def test_a_cached_file_is_served_from_memory_until_it_is_due_to_be_read_again(
        tmp_path, monkeypatch):
    import types

    from prefork import config as config_mod
    from prefork.worker import static as static_mod
    (tmp_path / "a.txt").write_text("one")
    files = StaticFiles(config_mod.StaticConfig(root=str(tmp_path)))
    clock = [1000.0]
    monkeypatch.setattr(static_mod, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))

    def get():
        statuses = []
        body = b"".join(files.serve({"REQUEST_METHOD": "GET", "RAW_URI": "/static/a.txt"},
                                    lambda status, headers: statuses.append(status), "a.txt"))
        return statuses[0], body

    assert get() == ("200 OK", b"one")
    (tmp_path / "a.txt").write_text("two, longer")
    clock[0] += static_mod.REVALIDATE
    with monkeypatch.context() as during_the_hit:
        during_the_hit.setattr(static_mod.os, "stat", None)   # a hit looks at no file
        assert get() == ("200 OK", b"one")
    clock[0] += 0.001   # past REVALIDATE since it was read: looked up and read again
    assert get() == ("200 OK", b"two, longer")


def test_the_date_line_follows_the_wall_clock_second_read_off_the_monotonic_clock(
        monkeypatch, tmp_path):
    import types

    from prefork import config as config_mod
    from prefork.scoreboard import Scoreboard
    from prefork.worker import loop as loop_mod
    clocks = {"monotonic": 100.0, "time": 1_800_000_000.5}
    reads = []

    def read(name):
        reads.append(name)
        return clocks[name]
    monkeypatch.setattr(loop_mod, "time", types.SimpleNamespace(
        monotonic=lambda: read("monotonic"), time=lambda: read("time")))
    config = config_mod.load(None, {"logging": {"access_log": "", "error_log": ""},
                                    "server": {"base": str(tmp_path)}})
    worker = loop_mod.Worker(config, [], Scoreboard(1), 0, 1, 0, None)
    first = worker.date
    assert first == "Fri, 15 Jan 2027 08:00:00 GMT"
    reads.clear()
    clocks.update(monotonic=100.4, time=1_800_000_000.9)
    worker.clock()
    assert worker.date == first and reads == ["monotonic"]   # within the second: one read
    clocks.update(monotonic=100.5, time=1_800_000_001.0)
    worker.clock()
    assert worker.date == "Fri, 15 Jan 2027 08:00:01 GMT"
    assert worker.fixed_headers.endswith(f"Date: {worker.date}\r\n".encode())


def test_a_master_reading_while_a_worker_writes_never_sees_its_slot_zeroed():
    import os

    board = Scoreboard(1)
    board.claim(0, os.getpid(), 1, 1.0)
    board.set_state(0, IDLE)
    mem, begin_at, pack_begin, end_at, pack_end = board.request_writers(0)
    child = os.fork()
    if child == 0:   # the worker: requests begin and end, the loop beats
        try:
            for number in range(1, 100_001):
                mem[begin_at] = pack_begin(BUSY, 2.0, b"GET", b"/x")
                mem[end_at] = pack_end(number, 200, 0.001, IDLE)
                if number % 100 == 0:
                    board.heartbeat(0, 3.0)
        finally:
            os._exit(0)
    seen = set()
    while os.waitpid(child, os.WNOHANG) == (0, 0):
        view = board.read(0)
        seen.add((view.state, view.heartbeat > 0, view.pid > 0))
    assert board.read(0).requests == 100_000   # the worker wrote them all
    assert seen <= {("idle", True, True), ("busy", True, True)}


def test_an_operator_hears_when_the_c_modules_are_not_built(monkeypatch, capsys):
    import importlib.util

    import prefork
    from prefork import cli, config as config_mod
    assert prefork.missing_c_modules() == []   # built here (make install compiles them)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None
                        if name == "prefork.worker._combined" else real_find_spec(name, *rest))
    assert prefork.missing_c_modules() == ["prefork.worker._combined"]
    config = config_mod.load(None, {"server": {"app": "prefork.apps.hello:app"}})
    assert cli.cmd_check(None, config) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "is valid" in out[0]
    assert out[1].startswith("prefork: note: not built here: prefork.worker._combined")


def test_the_signal_inbox_is_read_from_its_pipe_by_any_thread():
    """A worker's loop may run on another thread than the main one, which may
    be stuck in an app's call: the pipe, not a Python handler, records."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGUSR1, signal.SIGUSR2)}
    inbox = SignalInbox(saved)
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR1)
        taken = []
        reader = threading.Thread(target=lambda: taken.extend(inbox.drain()))
        reader.start()
        reader.join(5)
        assert taken == [signal.SIGUSR2, signal.SIGUSR1] and inbox.drain() == []
    finally:
        inbox.close()
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def test_the_index_page_answers_for_an_apps_404_at_the_root_and_only_then(tmp_path):
    from prefork import config as config_mod
    (tmp_path / "index.html").write_bytes(b"<h1>index</h1>")
    files = StaticFiles(config_mod.StaticConfig(root=str(tmp_path)))
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "RAW_URI": "/", "QUERY_STRING": ""}

    def call(app):
        started = []

        def start_response(status, headers, exc_info=None):
            started.append(status)
            return lambda data: started.append(data)
        body = b"".join(files.app_or_index(app, dict(environ), start_response))
        return started, body

    def missing(environ, start_response):
        start_response("404 Not Found", [])
        return [b"app's 404"]

    def writes_its_404(environ, start_response):
        start_response("404 Not Found", [])(b"written ")
        return [b"app's 404"]

    def found(environ, start_response):
        start_response("200 OK", [])
        return [b"app's page"]
    started, body = call(missing)
    assert started == ["200 OK"] and body == b"<h1>index</h1>"     # the app's 404 never went out
    assert call(writes_its_404) == (["404 Not Found", b"written "], b"app's 404")
    assert call(found) == (["200 OK"], b"app's page")
    (tmp_path / "index.html").unlink()
    assert call(missing) == (["404 Not Found"], b"app's 404")


def test_the_status_page_leaves_itself_out_and_its_totals_agree_with_the_rows():
    from prefork import scoreboard as sb
    from prefork.worker.status import refresh_live
    board = sb.Scoreboard(2)
    board.claim(0, 111, 1, 0.0)
    board.claim(1, 222, 1, 0.0)
    mem, begin_at, pack_begin, end_at, pack_end = board.request_writers(0)
    mem[end_at] = pack_end(3, 200, 0.01, sb.IDLE)              # 3 served, 1 reported so far
    mem[begin_at] = pack_begin(sb.BUSY, 1.0, b"GET", b"/_status?format=json")   # this page
    board.set_state(1, sb.IDLE)
    rows = [{"slot": 0, "pid": 111, "state": "idle", "reported": 1},
            {"slot": 1, "pid": 222, "state": "idle", "reported": 0}]
    snapshot = {"workers": rows, "pool": {}, "totals": {"requests": 1}}
    refresh_live(snapshot, board, 2.0, own=(111, "/_status"))
    assert rows[0]["state"] == "idle" and rows[0]["current"] is None and rows[0]["this_page"]
    assert snapshot["pool"]["busy"] == 0 and snapshot["pool"]["idle"] == 2
    assert snapshot["totals"]["requests_live"] == 3   # 1 reported + 2 the slot counted since
    refresh_live(snapshot, board, 2.0, own=(999, "/_status"))   # another worker's page
    assert rows[0]["state"] == "busy" and rows[0]["current"]["path"] == "/_status?format=json"
