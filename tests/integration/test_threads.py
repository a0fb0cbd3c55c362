"""App threads ([workers] threads) in the real server: calls that wait run
at once, the loop keeps serving, nothing is lost or miscounted. Each route of
tests/apps/threaded.py waits first, so its call leaves the loop for a thread;
the assertions hold whenever that happens (nothing here is timed)."""
import os
import signal
import threading

import pytest
import requests

from tests.conftest import ROOT, read_until_close, wait_for

APP = "tests.apps.threaded:app"


def threads(server):
    [worker] = server.status()["workers"]
    return worker["threads"]


def in_parallel(count, call):
    results = [None] * count

    def run(i):
        try:
            results[i] = call()
        except requests.RequestException as exc:
            results[i] = exc
    pool = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(40)
    return results


def test_calls_that_wait_run_at_once_and_every_one_is_logged_and_counted(make_server):
    server = make_server(app=APP, workers=1, extra="[workers]\nthreads = 8\n")
    answers = in_parallel(6, lambda: server.get("/barrier?6", timeout=30))
    assert [a.status_code for a in answers] == [200] * 6, [getattr(a, "text", a) for a in answers]
    assert all(a.text.startswith("passed") for a in answers)
    figures = threads(server)
    assert figures["limit"] == 8 and figures["detaches"] >= 1
    wait_for(lambda: server.status()["totals"]["requests"] == 6, message="6 requests counted")
    wait_for(lambda: server.log("access").count("GET /barrier?6 HTTP/1.1\" 200") == 6,
             message="6 access lines")


def test_the_environ_says_multithread_and_one_thread_keeps_the_loop_alone(make_server):
    server = make_server(app=APP, workers=1, extra="[workers]\nthreads = 1\n")
    assert server.get("/where?0.05").text == "MainThread multithread=False"
    assert "threads" not in server.status()["workers"][0] or not threads(server)
    server.stop()
    server = make_server(app=APP, workers=1)   # the default: threads
    assert server.get("/where").text.endswith("multithread=True")


def test_streams_write_files_and_errors_from_app_threads(make_server):
    server = make_server(app=APP, workers=1)
    assert server.get("/where?0.3").status_code == 200
    wait_for(lambda: threads(server)["detaches"] >= 1, message="a detached call")
    assert server.get("/stream?0.2").text == "".join(f"chunk{i}\n" for i in range(5))
    assert server.get("/write?0.2").text == "written0\nwritten1\nwritten2\nreturned\n"
    with open(os.path.join(ROOT, "tests", "apps", "threaded.py"), "rb") as fh:
        assert server.get("/file?0.2").content == fh.read()   # sent by the loop (sendfile)
    response = server.get("/fails?0.2")
    assert response.status_code == 500
    wait_for(lambda: "failed on a thread" in server.log("error"), message="the traceback")
    wait_for(lambda: server.status()["totals"]["app_exceptions"] == 1, message="counted")


def test_a_response_in_hand_frees_its_thread_before_the_client_reads_it(make_server):
    server = make_server(app=APP, workers=1, extra="[workers]\nthreads = 2\n")
    with server.connect() as slow:
        slow.sendall(b"GET /big-list?0.3 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        wait_for(lambda: threads(server)["detaches"] >= 1, message="the call detached")
        wait_for(lambda: not server.running(), message="its thread free, 4 MiB unread")
        for _ in range(3):   # both threads serve others meanwhile
            assert server.get("/where?0.1").status_code == 200
        reply = read_until_close(slow, timeout=20)
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"x" * 1000)
    assert len(reply.split(b"\r\n\r\n", 1)[1]) == 4 << 20


def test_a_client_that_stops_reading_holds_a_thread_at_most_send_timeout(make_server):
    server = make_server(app=APP, workers=1,
                         extra="[workers]\nthreads = 2\n[http]\nsend_timeout = 1\n")
    with server.connect() as slow:
        slow.sendall(b"GET /big-stream?0.3 HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_for(lambda: [r for r in server.running() if r["path"] == "/big-stream?0.3"],
                 message="the stream running")
        wait_for(lambda: not server.running(), timeout=20, message="its thread let go")
        assert server.get("/where?0.1").status_code == 200
        received = len(read_until_close(slow, timeout=10))
    assert received < 1 << 30   # cut: the client never read it all
    wait_for(lambda: server.status()["totals"]["timeouts"] >= 1, message="the cut counted")


def test_requests_beyond_the_threads_wait_for_one_and_are_counted(make_server):
    server = make_server(app=APP, workers=1, extra="[workers]\nthreads = 2\n")
    answers = in_parallel(4, lambda: server.get("/where?1", timeout=30))
    assert [a.status_code for a in answers] == [200] * 4
    assert threads(server)["waits"] >= 1


def test_graceful_stop_finishes_the_requests_on_every_thread(make_server):
    server = make_server(app=APP, workers=1, extra="[workers]\nthreads = 8\n")
    answers = []
    clients = [threading.Thread(target=lambda: answers.append(server.get("/where?1.5", timeout=30)))
               for _ in range(3)]
    for client in clients:
        client.start()
    wait_for(lambda: len(server.running()) == 3, message="three requests running")
    server.signal(signal.SIGTERM)
    for client in clients:
        client.join(30)
    assert [a.status_code for a in answers] == [200] * 3
    assert server.proc.wait(20) == 0


def test_django_queries_its_database_from_several_threads_at_once(make_server, tmpdir_short):
    pytest.importorskip("django")
    db = os.path.join(tmpdir_short, "django.sqlite3")
    server = make_server(app="tests.apps.django_site.wsgi:application", workers=1,
                         extra=f'[workers]\nthreads = 8\n[env]\nDJANGO_DB = "{db}"\n'
                               'DJANGO_SETTINGS_MODULE = "tests.apps.django_site.settings"\n')
    answers = in_parallel(4, lambda: server.get("/queries/4/", timeout=30))
    assert [a.status_code for a in answers] == [200] * 4, [getattr(a, "text", a) for a in answers]
    seen = [a.json() for a in answers]
    assert all(s["answers"] == [1, 2] and s["passed"] for s in seen)
    assert len({s["connection"] for s in seen}) == 4   # one database connection per thread
