"""Faults done to the real server: a stopped or killed Manager, a killed
master, a pipelined flood, a hostile control request, a reload to an invalid
pool, apps that return nonsense. Each checks that service goes on and that
nothing is lost uncounted."""
import json
import os
import signal
import socket
import time

import psutil
import pytest

from prefork.master import control
from tests.conftest import read_until_close, wait_for


def manager_pid(server):
    return server.status()["manager"]["pid"]


def access_lines(server):
    return [line for line in server.log("access").splitlines() if line]


def test_a_stopped_manager_stalls_nothing_and_is_replaced(make_server):
    server = make_server()
    old = manager_pid(server)
    os.kill(old, signal.SIGSTOP)
    try:
        # Serving and the master's own answers go on while it is stopped...
        for _ in range(20):
            assert server.get("/", timeout=5).status_code == 200
        assert server.status()["server"]["state"] in ("running", "degraded")
        # ...and the master replaces it within seconds.
        wait_for(lambda: manager_pid(server) != old, timeout=15, message="a new manager")
    finally:
        try:
            os.kill(old, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert not psutil.pid_exists(old) or psutil.Process(old).status() == psutil.STATUS_ZOMBIE
    wait_for(lambda: server.status()["manager"]["state"] == "ok", message="the manager answering")
    before = len(access_lines(server))
    for _ in range(10):
        server.get("/")
    wait_for(lambda: len(access_lines(server)) >= before + 10, timeout=15,
             message="access lines written again")
    # 20 + 10 requests: each line written once or counted as lost
    wait_for(lambda: len(access_lines(server)) + server.status()["totals"]["lost_log_lines"]
             == 30, timeout=15, message="every line written or counted")
    assert "did not answer" in server.log("error")


def test_a_killed_manager_is_replaced_and_nothing_is_lost_uncounted(make_server):
    server = make_server()
    for _ in range(5):
        server.get("/")
    wait_for(lambda: len(access_lines(server)) == 5, message="5 lines")
    old = manager_pid(server)
    os.kill(old, signal.SIGKILL)
    sent = 5
    for _ in range(30):
        assert server.get("/").status_code == 200
        sent += 1
    wait_for(lambda: manager_pid(server) != old, timeout=15, message="a new manager")
    wait_for(lambda: server.status()["manager"]["state"] == "ok", message="the manager answering")
    # Every line written once, or counted as lost: none vanish, none doubled.
    wait_for(lambda: len(access_lines(server)) + server.status()["totals"]["lost_log_lines"]
             == sent, timeout=15, message="every line written or counted")
    # A worker killed afterwards is replaced: new workers reach the new manager.
    victim = next(iter(server.worker_pids()))
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in server.worker_pids() and len(server.worker_pids()) == 2,
             message="the replacement worker")
    assert server.get("/").status_code == 200
    log = server.log("error")
    assert "manager (pid %d) died" % old in log, log


def test_a_master_killed_with_sigkill_leaves_nothing_behind(make_server):
    server = make_server()
    children = psutil.Process(server.pid).children(recursive=True)
    assert len(children) == 3   # the manager and two workers
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait(5)
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []
    with socket.socket() as probe:   # the port is free again
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((server.host, server.port))


def test_two_thousand_pipelined_requests_in_one_write_are_all_answered_and_logged(server):
    with server.connect() as sock:
        requests_ = b"".join(b"GET /hello?n=%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(1999))
        sock.sendall(requests_ + b"GET /hello?n=1999 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = read_until_close(sock, timeout=20)
    assert data.count(b"HTTP/1.1 200 OK") == 2000
    wait_for(lambda: len([line for line in access_lines(server) if "/hello?n=" in line]) == 2000,
             timeout=15, message="2000 access lines")
    numbers = [int(line.split("/hello?n=")[1].split()[0]) for line in access_lines(server)
               if "/hello?n=" in line]
    assert numbers == list(range(2000))


def test_a_hostile_control_request_is_refused_and_the_master_goes_on(server):
    path = os.path.join(server.dir, "prefork.sock")
    for line in (b"[" * 60000 + b"\n", b"[" * 3000 + b"\n", b"not json\n"):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(path)
            try:
                sock.sendall(line)
            except OSError:
                pass   # it may stop reading early; what matters is what follows
            answer = sock.makefile("rb").readline()
        assert answer == b"" or json.loads(answer)["ok"] is False
    assert control.request(path, {"cmd": "status"}, 5)["ok"]
    assert server.get("/").status_code == 200


def test_a_reload_to_an_invalid_pool_size_keeps_the_old_generation(server):
    with open(server.config, "a") as fh:
        fh.write("\n")
    text = open(server.config).read().replace("workers = 2", "workers = 300")
    with open(server.config, "w") as fh:
        fh.write(text)
    result = server.cli("reload")
    assert result.returncode == 1 and "between 1 and 128" in result.stderr
    status = server.status()
    assert status["server"]["generation"] == 1 and len(server.worker_pids()) == 2
    assert server.get("/").status_code == 200


@pytest.mark.parametrize("scale,ok", [("0", False), ("-1", False), ("1000", False), ("3", True)])
def test_scale_refuses_what_it_cannot_do_and_says_why(server, scale, ok):
    result = server.cli("scale", "--", scale) if scale.startswith("-") else server.cli("scale", scale)
    assert (result.returncode == 0) is ok
    assert (result.stdout if ok else result.stderr).strip()


def test_an_app_returning_none_gets_500_and_the_worker_survives(server):
    pids = server.worker_pids()
    for _ in range(4):
        assert server.get("/returns-none").status_code == 500
    assert server.worker_pids() == pids
    assert server.get("/").status_code == 200


def test_many_quick_manager_kills_never_stop_service(make_server):
    server = make_server()
    for _ in range(3):
        old = manager_pid(server)
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while manager_pid(server) == old:
            assert server.get("/").status_code == 200
            assert time.monotonic() < deadline, "no new manager"
    assert server.status()["manager"]["restarts"] == 3


def test_out_of_descriptors_idle_connections_make_room_without_spinning(tmpdir_short):
    """Under a 128-descriptor limit, 400 connections that send nothing: the
    workers close idle ones for those waiting (a pause of accepts only when
    none can go), serve a new client meanwhile and never spin."""
    import resource
    from tests.conftest import Server, write_config

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
    config = write_config(tmpdir_short)
    server = Server(tmpdir_short, config, preexec_fn=low_limit).wait_ready()
    held = []
    try:
        for _ in range(400):   # more than two workers can hold: the rest wait in the queue
            sock = server.connect()
            held.append(sock)
        workers = [psutil.Process(pid) for pid in server.worker_pids()]
        wait_for(lambda: "to make room for new ones" in server.log("error"),
                 message="the room made logged")
        before = [sum(w.cpu_times()[:2]) for w in workers]
        time.sleep(1)   # a spinning worker would burn this second
        used = [sum(w.cpu_times()[:2]) - b for w, b in zip(workers, before, strict=True)]
        assert max(used) < 0.5, used
        assert len(server.log("error")) < 100_000
        assert server.get("/", timeout=10).status_code == 200   # while they are held
        for sock in held:
            sock.close()
        held = []
        wait_for(lambda: server.get("/").status_code == 200, timeout=15, message="service again")
        assert server.worker_pids() == {w.pid for w in workers}   # nobody crashed
    finally:
        for sock in held:
            sock.close()
        server.stop(graceful=False)
        server.kill_all()


def test_a_worker_holds_at_most_max_connections_and_the_queue_waits(make_server, tmp_path):
    """Connections whose requests the app runs are never closed to make room:
    the next client waits in the listen queue until one of them ends."""
    server = make_server(workers=1, extra="[workers]\nmax_connections = 3\n")
    release = tmp_path / "release"
    held = []
    for _ in range(3):
        sock = server.connect()
        sock.sendall(f"GET /hold?{release} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        held.append(sock)
    wait_for(lambda: len(server.running()) == 3, message="3 in the app")
    waiting = server.connect()
    waiting.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    waiting.settimeout(1.5)
    with pytest.raises(socket.timeout):
        waiting.recv(4096)            # the worker is full: it is still in the queue
    release.touch()                   # they end...
    assert read_until_close(waiting, timeout=10).startswith(b"HTTP/1.1 200")   # ...it is served
    for sock in held:
        sock.settimeout(10)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.close()


def test_at_max_connections_an_idle_connection_makes_room(make_server):
    """As nginx reuses idle keep-alive connections when it runs out: the one
    idle the longest is closed for the client waiting in the queue."""
    server = make_server(workers=1, extra="[workers]\nmax_connections = 3\n")
    held = []
    for _ in range(3):
        sock = server.connect()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        held.append(sock)
    waiting = server.connect()
    waiting.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert read_until_close(waiting, timeout=10).startswith(b"HTTP/1.1 200")
    held[0].settimeout(10)
    assert held[0].recv(4096) == b""  # the oldest idle one went
    wait_for(lambda: server.status()["totals"]["evicted"] == 1, message="counted")
    for sock in held:
        sock.close()


def test_a_body_that_cannot_be_spooled_gets_507_and_the_worker_goes_on(make_server):
    server = make_server(extra='[http]\nspool_threshold = 1000\nspool_dir = "/nonexistent/spool"\n')
    pids = server.worker_pids()
    response = requests_post(server, b"x" * 200_000)
    assert response.status_code == 507
    assert requests_post(server, b"small").status_code == 200
    assert server.worker_pids() == pids


def requests_post(server, body):
    import requests
    return requests.post(server.url + "/echo", data=body, timeout=10)


def test_children_an_app_forks_are_reaped(server):
    for _ in range(3):
        assert server.get("/fork").status_code == 200
    def zombies():
        found = []
        for pid in server.worker_pids():
            for child in psutil.Process(pid).children():
                try:
                    found.append(child.status() == psutil.STATUS_ZOMBIE)
                except psutil.NoSuchProcess:
                    pass   # reaped while we looked
        return any(found)
    wait_for(lambda: not zombies(), message="no zombie children")


def test_an_encoded_status_path_is_not_the_status_path(server):
    """A proxy denying the literal /_status must not be bypassed by encoding it."""
    assert server.get("/_status").status_code == 200
    for path in (b"/%5Fstatus", b"/_statu%73", b"/%5f%73tatus"):   # raw: requests would unquote
        reply = server.raw(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 404 ")   # the app's answer, not the status page


def test_drain_time_keeps_serving_with_health_503_then_stops(make_server):
    server = make_server(extra="[status]\nhealth = \"/_health\"\n[workers]\ndrain_time = 2\n")
    assert server.get("/_health").status_code == 200
    server.signal(signal.SIGTERM)
    wait_for(lambda: server.get("/_health").status_code == 503, message="health 503")
    assert server.get("/").status_code == 200          # still serving while it drains
    assert server.status()["server"]["state"] == "draining"
    assert server.proc.wait(20) == 0                  # then a graceful stop


def test_a_workers_memory_is_bounded_by_its_settings_not_by_its_clients(make_server):
    """Slow readers of a large generated response, and bodies that stall half
    sent: the iterator pauses at the output's high-water mark, bodies spool
    past spool_threshold, so a worker's memory stays near its settings."""
    server = make_server(workers=1, extra="[workers]\nmax_connections = 400\n")
    worker = psutil.Process(next(iter(server.worker_pids())))
    before = worker.memory_info().rss
    held = []
    try:
        for _ in range(150):   # each would be 50 MB if the generator ran unchecked
            sock = server.connect()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"GET /big?50000000 HTTP/1.1\r\nHost: x\r\n\r\n")
            held.append(sock)
        for _ in range(150):   # 1 MB bodies, half sent, then silence
            sock = server.connect()
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
                         + b"y" * 500_000)
            held.append(sock)
        wait_for(lambda: server.status()["totals"]["connections_open"] >= 300, timeout=20,
                 message="all 300 connections open")
        grown = worker.memory_info().rss - before
        # 150 x 256 KiB of paused output + 150 x 64 KiB in memory before spooling,
        # with room for the allocator: far below the 7.5 GB the clients asked for.
        print(f"worker RSS grew {grown / 1048576:.0f} MiB for 300 hostile connections")
        assert grown < 200 * 1024 * 1024, f"{grown / 1048576:.0f} MiB"
        assert server.get("/").status_code == 200   # and it still serves
    finally:
        for sock in held:
            sock.close()


def test_what_an_app_starts_dies_with_its_worker_and_frees_the_port(make_server):
    """A worker's app starts a multiprocessing Manager (which inherits the
    listener) and a subprocess: stop ends in time, and nothing of theirs is
    left holding the port."""
    server = make_server(app="tests.apps.children:app", workers=1)
    children = [int(server.get(path, timeout=30).text.split()[1])
                for path in ("/manager", "/sleeper")]
    assert all(psutil.pid_exists(pid) for pid in children)
    assert server.stop(timeout=30) == 0
    wait_for(lambda: not any(psutil.pid_exists(pid) and psutil.Process(pid).status()
                             != psutil.STATUS_ZOMBIE for pid in children),
             message="the app's children gone")
    with socket.socket() as probe:   # the port is free again
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((server.host, server.port))


def test_a_flood_of_idle_and_trickling_connections_never_locks_clients_out(make_server):
    """More connections than the worker holds, each sending nothing or a body
    that never ends (or waiting after Expect: 100-continue): the idle and the
    slowest make room, every legitimate request is answered, the worker stays."""
    server = make_server(workers=1, extra="[workers]\nmax_connections = 20\n")
    before = server.worker_pids()
    flood = []
    try:
        for i in range(60):
            sock = server.connect()
            if i % 3 == 1:
                sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\nx")
            elif i % 3 == 2:
                sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n"
                             b"Expect: 100-continue\r\n\r\n")
            flood.append(sock)
        for _ in range(10):
            assert server.get("/", timeout=15).text == "hello"
        totals = wait_for(lambda: (lambda t: t if t["evicted"] else None)(
            server.status()["totals"]), message="evictions counted")
        assert totals["evicted"] >= 30 and server.worker_pids() == before
        wait_for(lambda: "to make room for new ones" in server.log("error"), message="logged")
    finally:
        for sock in flood:
            sock.close()
