"""Master-owned logs: nothing lost to rotation, reload, stop or logrotate."""
import glob
import gzip
import json
import os
import re
import shutil
import signal
import threading

import requests

from tests.conftest import wait_for

COMBINED = re.compile(r'^\S+ - - \[[^\]]+\] "GET /\S* HTTP/1\.[01]" \d{3} \d+ "[^"]*" "[^"]*" \d+$')


def access_lines(server):
    lines = []
    for path in sorted(glob.glob(os.path.join(server.dir, "logs", "access.log*"))):
        if path.endswith(".tmp"):
            continue
        opener = gzip.open if path.endswith(".gz") else open
        try:
            with opener(path, "rt") as fh:
                lines.extend(fh.read().splitlines())
        except FileNotFoundError:
            continue   # shifted or compressed while we listed: a live server's files move
    return lines


def hammer(server, count, threads=4, path="/"):
    def run(n):
        session = requests.Session()
        for _ in range(n):
            assert session.get(server.url + path, timeout=10).status_code in (200, 404)
    workers = [threading.Thread(target=run, args=(count // threads,)) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(60)
    return count // threads * threads


def test_n_requests_n_lines_across_rotations_reload_and_stop(make_server):
    server = make_server(logging="max_bytes = 6000\nbackups = 1000\ncompress = true",
                         extra="[status]\ninterval = 0.1\n")
    sent = 0

    def round_of(count):
        nonlocal sent
        sent += hammer(server, count)
        # One round, one batch or more: each round's lines overflow max_bytes.
        wait_for(lambda: len(access_lines(server)) == sent, message=f"{sent} lines")
    for _ in range(4):
        round_of(200)
    server.signal(signal.SIGHUP)
    round_of(200)
    wait_for(lambda: server.status()["server"]["generation"] == 2, message="reload")
    round_of(200)
    rotations = server.status()["logs"]["access"]["rotations"]
    assert server.stop() == 0
    lines = access_lines(server)
    assert len(lines) == sent
    assert rotations >= 5
    assert glob.glob(os.path.join(server.dir, "logs", "access.log.*.gz"))
    assert all(COMBINED.match(line) for line in lines)


def test_lines_from_concurrent_workers_never_interleave(make_server):
    server = make_server(workers=3)
    sent = hammer(server, 1200, threads=8)
    server.stop()
    lines = access_lines(server)
    assert len(lines) == sent
    bad = [line for line in lines if not COMBINED.match(line)]
    assert bad == []


def test_external_rename_then_reopen_loses_nothing(server):
    sent = hammer(server, 100)
    log = os.path.join(server.dir, "logs", "access.log")
    wait_for(lambda: len(access_lines(server)) == sent, message="first lines written")
    os.rename(log, log + ".rotated-by-logrotate")
    sent += hammer(server, 100)
    assert server.cli("reopen").returncode == 0
    sent += hammer(server, 100)
    server.signal(signal.SIGUSR1)
    sent += hammer(server, 100)
    server.stop()
    assert len(access_lines(server)) == sent
    assert os.path.exists(log)


def test_a_failing_log_never_stops_serving_and_is_reported(server):
    logs = os.path.join(server.dir, "logs")
    hammer(server, 20)
    wait_for(lambda: access_lines(server), message="a first line")
    shutil.rmtree(logs)
    with open(logs, "w") as fh:      # a file where the directory was: writes must fail
        fh.write("not a directory")
    assert hammer(server, 50) == 48
    status = wait_for(lambda: (lambda s: s if s["logs"]["access"]["error"] else None)(
        server.status()), message="the failure in the status output")
    assert "logs/access.log" in status["logs"]["access"]["error"]
    assert status["logs"]["access"]["lost_lines"] > 0
    assert "log problem" in server.stderr()
    assert "log problem" in server.cli("status").stdout
    os.unlink(logs)                  # the operator fixes it: logging resumes
    hammer(server, 8)
    wait_for(lambda: server.status()["logs"]["access"]["error"] is None, message="recovery")


def test_json_and_custom_access_formats(make_server):
    server = make_server(logging='access_format = "json"')
    server.get("/?x=1", headers={"User-Agent": "tester"})
    server.stop()
    (line,) = access_lines(server)
    record = json.loads(line)
    assert record["uri"] == "/?x=1" and record["status"] == 200 and record["user_agent"] == "tester"


def test_custom_access_format_atoms(make_server):
    server = make_server(logging='access_format = "%(h)s %(m)s %(U)s %(q)s %(s)s %(b)s %({x-req}i)s %(D)s"')
    server.get("/missing?y=2", headers={"X-Req": "abc"})
    server.stop()
    (line,) = access_lines(server)
    assert re.match(r"^127\.0\.0\.1 GET /missing y=2 404 9 abc \d+$", line), line


def test_error_log_tells_the_story(server):
    first = server.worker_pids()
    server.get("/crash")
    assert server.cli("reload").returncode == 0
    server.stop()
    log = server.log("error")
    for words in ("starting", "spawned worker", "ready:", "boom from the app", "reloaded: generation 2",
                  "retired", "graceful stop requested", "stopped"):
        assert words in log, words
    for pid in first:
        assert f"pid {pid}" in log


def test_a_worker_killed_with_sigkill_loses_no_line_and_no_request(make_server):
    """What the kernel's OOM killer (or our watchdog) does: kill -9. The lines
    it had not shipped are in its shared batch, its requests in its slot."""
    server = make_server(workers=1, extra="[status]\ninterval = 60\n")   # ships no batch itself
    [pid] = server.worker_pids()
    for i in range(30):
        assert server.get(f"/hello?{i}").status_code == 200
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: server.status()["pool"]["exits"]["killed"] == 1, message="the kill seen")
    access = wait_for(lambda: server.log("access").count("GET /hello?") == 30 and
                      server.log("access"), message="all 30 lines")
    assert all(f"GET /hello?{i} HTTP/1.1" in access for i in range(30))
    totals = server.status()["totals"]
    assert totals["requests"] >= 30 and totals["recovered_requests"] == 30
    assert totals["lost_log_lines"] == 0
    assert "died with 30 log line(s) and 30 request(s) not shipped" in server.log("error")
