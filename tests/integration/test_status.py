"""Statistics through the Manager queues, the status endpoint and `prefork status`."""
import os
import signal
import threading

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_for

MIX = {"/": 200, "/missing": 404, "/crash": 500}


def send_mix(server, rounds):
    for _ in range(rounds):
        for path, status in MIX.items():
            assert server.get(path).status_code == status


def totals_reach(server, requests_count):
    return wait_for(lambda: (lambda s: s if s["totals"]["requests"] == requests_count else None)(
        server.status()), timeout=15, message=f"{requests_count} requests in the totals")


def test_totals_match_a_known_mix_class_by_class(server):
    send_mix(server, 7)
    status = totals_reach(server, 21)
    assert status["totals"]["responses"] == {"1xx": 0, "2xx": 7, "3xx": 0, "4xx": 7, "5xx": 7}
    assert status["totals"]["statuses"] == {"200": 7, "404": 7, "500": 7}
    assert status["totals"]["app_exceptions"] == 7
    assert status["totals"]["bytes_out"] > 0 and status["totals"]["bytes_in"] > 0
    assert status["totals"]["connections_accepted"] >= 21
    assert status["latency"]["count"] == 21 and status["latency"]["p99"] > 0
    # The endpoint serves the snapshot the master publishes each interval.
    body = wait_for(lambda: (lambda b: b if b["totals"]["requests"] >= 21 else None)(
        server.get("/_status?format=json").json()), message="the published snapshot")
    for key in ("server", "pool", "totals", "rates", "latency", "listen_queue", "workers"):
        assert key in body
    assert body["totals"]["requests"] >= 21
    assert set(body["workers"][0]) >= {"slot", "pid", "generation", "state", "requests",
                                       "current", "running", "threads", "rss", "cpu", "age",
                                       "heartbeat_age"}
    assert body["workers"][0]["rss"] > 1_000_000


def test_rejected_requests_are_counted(server):
    server.raw(b"GET / HTTP/1.1\r\n\r\n")   # no Host: 400 from the parser
    totals = wait_for(lambda: (lambda t: t if t["rejected"] == 1 else None)(
        server.status()["totals"]), message="a rejected request")
    assert totals["responses"]["4xx"] == 1
    # One definition of a request: every response, so the classes add up to it.
    assert sum(totals["responses"].values()) == totals["requests"]


def test_totals_survive_a_killed_worker_and_a_reload(server):
    send_mix(server, 5)
    totals_reach(server, 15)
    victim = next(iter(server.worker_pids()))
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(server.worker_pids() - {victim}) == 2, message="a replacement")
    assert server.status()["totals"]["requests"] == 15
    assert server.status()["pool"]["exits"]["killed"] == 1
    assert server.cli("reload").returncode == 0
    send_mix(server, 1)
    status = totals_reach(server, 18)
    assert status["server"]["generation"] == 2
    assert status["totals"]["statuses"] == {"200": 6, "404": 6, "500": 6}


def test_prometheus_output_parses_and_matches_the_json(server):
    send_mix(server, 3)
    totals_reach(server, 9)
    def published():
        text = server.get("/_status?format=prometheus").text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        return families if families["prefork_requests"].samples[0].value >= 9 else None
    families = wait_for(published, message="the mix in the published snapshot")
    status = server.status()   # via the master; /_status requests are counted too
    assert families["prefork_requests"].type == "counter"
    assert families["prefork_requests"].samples[0].value >= 9
    classes = {s.labels["class"]: s.value for s in families["prefork_responses"].samples}
    assert classes["4xx"] == status["totals"]["responses"]["4xx"] == 3
    assert classes["5xx"] == status["totals"]["responses"]["5xx"] == 3
    histogram = families["prefork_request_duration_seconds"]
    assert histogram.type == "histogram"
    counts = {s.labels.get("le"): s.value for s in histogram.samples if s.name.endswith("_bucket")}
    count = [s.value for s in histogram.samples if s.name.endswith("_count")][0]
    assert counts["+Inf"] == count >= 9
    busy = {s.labels["state"]: s.value for s in families["prefork_workers"].samples}
    assert busy["alive"] == 2
    slots = {s.labels["slot"] for s in families["prefork_worker_requests"].samples}
    assert slots == {str(w["slot"]) for w in status["workers"]}


@pytest.mark.parametrize("threads", [1, 32])
def test_a_slow_request_shows_busy_and_status_answers_when_all_are_stuck(make_server, threads):
    # One worker, so one held request makes every worker busy: which worker
    # takes which connection is the kernel's and the scheduler's business.
    # With threads = 1 the worker's loop is stuck in the call; with threads,
    # an app thread runs it (the loop detached it).
    server = make_server(workers=1, extra=f"[workers]\nthreads = {threads}\n")
    release = os.path.join(server.dir, "release")
    path = f"/hold?{release}"
    answers = []
    thread = threading.Thread(target=lambda: answers.append(
        requests.get(server.url + path, timeout=40)))
    thread.start()
    try:
        running = wait_for(server.running, message="the worker busy")
        assert [(r["method"], r["path"]) for r in running] == [("GET", path)]
        assert [w["state"] for w in server.status()["workers"]] == ["busy"]
        result = server.cli("status", timeout=20)   # the master answers, whatever the workers do
        assert result.returncode == 0 and result.stdout.count(f"GET {path}") == 1
        wait_for(lambda: [r for r in server.running() if r["elapsed"] > 1.0],
                 message="elapsed time to grow")
    finally:
        open(release, "w").close()
        thread.join(20)
    assert answers[0].text == "released"


def test_html_dashboard(server):
    page = server.get("/_status")
    assert page.headers["Content-Type"].startswith("text/html")
    pids = server.worker_pids()
    for pid in pids:
        assert str(pid) in page.text
    assert "http-equiv=\"refresh\"" in page.text
    assert server.get("/_status", headers={"Accept": "application/json"}).json()["pool"]


def test_clients_outside_allow_get_403(make_server):
    server = make_server(extra='[status]\nallow = ["10.0.0.0/8"]\n')
    assert server.get("/_status").status_code == 403
    assert server.get("/").status_code == 200


def test_status_disabled_leaves_the_path_to_the_app(make_server):
    server = make_server(extra="[status]\nenabled = false\n")
    assert server.get("/_status").status_code == 404   # the test app's own 404


def test_status_right_after_start_counts_every_worker(server):
    # The first snapshot is published while workers boot; the endpoint must
    # still show them serving (their scoreboard slots say so) right away.
    body = server.get("/_status?format=json").json()
    assert body["pool"]["idle"] + body["pool"]["busy"] == 2
    assert all(w["state"] in ("idle", "busy") for w in body["workers"])
