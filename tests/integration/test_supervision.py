"""Supervision with the real server: hangs, leaks, crash loops, deploys, chaos."""
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import requests

from tests.conftest import PREFORK, read_until_close, wait_for, write_config
from tests.integration.test_lifecycle import Load


def test_a_request_past_request_timeout_is_dumped_then_stopped(make_server):
    server = make_server(extra="[workers]\nrequest_timeout = 1.0\nkill_grace = 0.5\n"
                               "threads = 1\n")
    before = server.worker_pids()
    try:
        requests.get(server.url + "/slow?30", timeout=20)
        raise AssertionError("the stuck request should have been cut")
    except requests.ConnectionError:
        pass   # cut, long before the app's 30 s (a read timeout is no ConnectionError)
    wait_for(lambda: "reports:" in server.log("error"), message="the stack dump")
    log = server.log("error")
    assert "is stuck: request GET /slow?30" in log
    assert 'in slow' in log and "basic.py" in log          # the app's frame is in the dump
    wait_for(lambda: len(server.worker_pids()) == 2 and server.worker_pids() != before,
             message="a replacement")
    status = server.status()
    assert status["totals"]["timeouts"] == 1 and status["pool"]["exits"]["killed"] == 1


def test_a_request_stuck_on_an_app_thread_is_dumped_and_its_worker_replaced(make_server):
    """A thread cannot be killed: its stacks are dumped, a replacement boots,
    then the worker stops accepting and its other requests finish; the stuck
    one is cut at graceful_timeout. Nothing else fails meanwhile."""
    server = make_server(extra="[workers]\nrequest_timeout = 1.0\ngraceful_timeout = 1.0\n")
    before = server.worker_pids()
    outcome = {}

    def stuck():
        try:
            outcome["stuck"] = requests.get(server.url + "/slow?30", timeout=20).status_code
        except requests.ConnectionError:
            outcome["stuck"] = "cut"
    thread = threading.Thread(target=stuck)
    thread.start()
    with Load(server.url, threads=2, path="/") as load:
        wait_for(lambda: "reports:" in server.log("error"), message="the stack dump")
        wait_for(lambda: len(server.worker_pids() - before) == 1 and len(server.worker_pids()) == 2,
                 timeout=20, message="a replacement, and the stuck worker gone")
        status = wait_for(lambda: (lambda s: s if s["pool"]["exits"]["recycled"] else None)(
            server.status()), timeout=20, message="the stuck worker's exit")
    thread.join(20)
    assert outcome["stuck"] == "cut" and load.failures == [] and load.ok > 20
    log = server.log("error")
    assert "is stuck: request GET /slow?30 on thread" in log and "in slow" in log
    assert status["totals"]["timeouts"] == 1 and status["pool"]["exits"]["killed"] == 0


def test_slow_request_log_dumps_without_killing(make_server):
    server = make_server(extra="[workers]\nslow_request_log = 0.5\n")
    assert server.get("/slow?1.5").text == "slow done"
    wait_for(lambda: "reports:" in server.log("error"), message="the slow-request dump")
    assert "slow request: worker" in server.log("error")
    assert server.status()["pool"]["exits"]["killed"] == 0


def test_max_requests_recycles_one_at_a_time_without_losing_capacity(make_server):
    server = make_server(extra="[workers]\nmax_requests = 30\nmax_requests_jitter = 5\n")
    low = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            serving = [w for w in server.status()["workers"] if w["state"] in ("idle", "busy")]
            low.append(len(serving))
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with Load(server.url, threads=2) as load:
            wait_for(lambda: server.status()["pool"]["exits"]["recycled"] >= 3, timeout=30,
                     message="three recycled workers")
    finally:
        stop.set()
        watcher.join(10)
    assert load.failures == []
    assert min(low) >= 2, "the pool dropped below its size during recycling"
    assert "will be recycled: served" in server.log("error")


def test_max_rss_recycles_a_leaking_worker(make_server):
    server = make_server(app="tests.apps.leak:app", workers=1, extra="[workers]\nmax_rss = 80\n")
    first = server.get("/").text
    for _ in range(12):
        server.get("/")
    wait_for(lambda: server.get("/").text != first, timeout=20, message="a fresh worker")
    # the old worker is reaped once it has drained: a moment after the new one serves
    wait_for(lambda: server.status()["pool"]["exits"]["recycled"] == 1, message="the exit")
    assert "max_rss 80 MiB" in server.log("error")


def test_crash_loop_backs_off_shows_degraded_and_recovers(make_server):
    server = make_server(app="tests.apps.flaky_boot:app")
    marker = os.path.join(server.dir, "fail-boot")
    open(marker, "w").close()
    victim = next(iter(server.worker_pids()))
    os.kill(victim, signal.SIGKILL)
    status = wait_for(lambda: (lambda s: s if s["pool"]["boot_failures"] >= 3 else None)(
        server.status()), timeout=20, message="repeated boot failures")
    assert status["server"]["state"] == "degraded"
    assert "fail-boot marker present" in status["pool"]["last_boot_error"]
    human = server.cli("status").stdout
    assert "DEGRADED" in human and "fail-boot marker present" in human
    assert server.get("/").status_code == 200          # the survivor keeps serving
    log = server.log("error")
    assert log.count("RuntimeError: deploy is broken") == 1   # the traceback once...
    assert "same error as before" in log                       # ...then briefly
    os.unlink(marker)
    wait_for(lambda: (lambda s: s["server"]["state"] == "running" and s["pool"]["alive"] == 2)(
        server.status()), timeout=30, message="recovery")


def test_graceful_stop_answers_keep_alive_clients_with_close(server):
    with server.connect() as keep:
        keep.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert b"Connection: close" not in keep.recv(65536)
        slow = threading.Thread(target=lambda: requests.get(server.url + "/slow?1", timeout=20))
        slow.start()
        wait_for(server.running, message="busy")
        server.signal(signal.SIGTERM)
        time.sleep(0.2)   # the TERM reaches the workers; the client's next request follows
        keep.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        reply = read_until_close(keep)
        assert reply.startswith(b"HTTP/1.1 200") and b"Connection: close" in reply
        slow.join(20)
    assert server.proc.wait(20) == 0


def test_graceful_deadline_logs_what_was_cut(make_server):
    server = make_server(extra="[workers]\ngraceful_timeout = 0.5\n")
    with server.connect() as partial:
        partial.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")   # a request that never completes
        time.sleep(0.2)
        server.signal(signal.SIGTERM)
        assert server.proc.wait(15) == 0
    assert "graceful_timeout (0.5s) reached; cutting 1 connection(s), 1 with a request" \
        in server.log("error")


def test_hup_with_a_slow_booting_app_under_load_fails_nothing(make_server):
    server = make_server(app="tests.apps.slow_boot:app")
    with Load(server.url, threads=4, path="/") as load:
        for generation in (2, 3):
            server.signal(signal.SIGHUP)
            wait_for(lambda g=generation: server.status()["server"]["generation"] == g, timeout=20,
                     message=f"generation {generation}")
        done = load.ok
        wait_for(lambda: load.ok > done + 20, message="requests after the reloads")
    assert load.failures == []


def test_usr2_upgrade_under_load_fails_nothing(server):
    old_master = server.pid
    pidfile = os.path.join(server.dir, "prefork.pid")
    with Load(server.url, threads=4) as load:
        result = server.cli("upgrade")
        assert result.returncode == 0, result.stderr
        done = load.ok
        wait_for(lambda: load.ok > done + 50, message="requests after the upgrade")
    assert load.failures == []
    new_master = int(open(pidfile).read())
    assert new_master != old_master and psutil.pid_exists(new_master)
    assert server.proc.wait(20) == 0   # the old master drained and left
    assert requests.get(server.url + "/", timeout=5).text == "hello"
    assert server.cli("status").returncode == 0
    os.kill(new_master, signal.SIGTERM)
    wait_for(lambda: not psutil.pid_exists(new_master) or
             psutil.Process(new_master).status() == psutil.STATUS_ZOMBIE, message="new master gone")


def test_chaos_kill_a_random_worker_ten_times_under_load(server):
    """Counted in kills, not seconds: each round kills a serving worker and
    waits until it is gone from the pool, however slow the machine is."""
    kills = 0
    with Load(server.url, threads=4) as load:
        while kills < 10:
            pids = wait_for(lambda: list(server.worker_pids()), message="a serving worker")
            victim = random.choice(pids)
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                continue
            kills += 1
            wait_for(lambda v=victim: v not in {w["pid"] for w in server.status()["workers"]},
                     message="the killed worker reaped")
        wait_for(lambda: len(server.worker_pids()) == 2, message="the pool restored")
        done = load.ok
        wait_for(lambda: load.ok > done + 50, message="service after the chaos")
    # Only requests in flight on a killed worker may fail: at most one per client thread per kill.
    assert len(load.failures) <= kills * 4, load.failures
    assert load.ok > 100
    assert server.status()["pool"]["exits"]["killed"] == kills


def test_sd_notify_and_socket_activation(tmpdir_short):
    notify_path = os.path.join(tmpdir_short, "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(20)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    config = write_config(tmpdir_short)
    env = dict(os.environ, NOTIFY_SOCKET=notify_path, LISTEN_FDS="1")

    def as_fd_3():
        os.dup2(listener.fileno(), 3)
    # LISTEN_PID must name the exact process that receives the fds: $$ is
    # the shell's pid, which exec keeps (so does bin/prefork's own re-exec).
    proc = subprocess.Popen(["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", sys.executable, PREFORK,
                             "start", "--foreground", "-c", config],
                            env=env, preexec_fn=as_fd_3, close_fds=False,  # keep fd 3
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        ready = notify.recv(4096).decode()
        assert "READY=1" in ready and f"MAINPID={proc.pid}" in ready and "STATUS=" in ready
        listener.close()   # the server holds its own copy
        assert requests.get(f"http://127.0.0.1:{port}/", timeout=5).text == "hello"
        proc.send_signal(signal.SIGHUP)
        assert "RELOADING=1" in notify.recv(4096).decode()
        assert "READY=1" in notify.recv(4096).decode()
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in notify.recv(4096).decode()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        notify.close()


def world_readable(path) -> bool:
    """Can an unprivileged user reach `path`? (every parent o+x, itself o+r)."""
    import stat
    parts = os.path.abspath(path).split(os.sep)
    for i in range(2, len(parts)):   # the parents: o+x
        mode = os.stat(os.sep.join(parts[:i]) or os.sep).st_mode
        if not mode & stat.S_IXOTH:
            return False
    return bool(os.stat(path).st_mode & stat.S_IROTH)


def test_user_setting_makes_workers_run_as_that_user(tmpdir_short, make_server):
    import pytest
    from tests.conftest import ROOT
    if os.geteuid() != 0:
        pytest.skip("needs root to change user")
    if not world_readable(os.path.join(ROOT, "tests", "apps", "basic.py")):
        pytest.skip("the checkout is not readable by 'nobody', who must import the app")
    os.chmod(tmpdir_short, 0o755)
    with open(os.path.join(tmpdir_short, "prefork.toml"), "w"):
        pass
    server = make_server()
    server.stop()
    text = open(server.config).read().replace('pidfile = "prefork.pid"',
                                              'pidfile = "prefork.pid"\nuser = "nobody"')
    with open(server.config, "w") as fh:
        fh.write(text)
    server2 = type(server)(server.dir, server.config).wait_ready()
    try:
        import pwd
        nobody = pwd.getpwnam("nobody").pw_uid
        workers = psutil.Process(server2.pid).children()
        uids = {w.uids().real for w in workers if "worker" in " ".join(w.cmdline())}
        assert uids == {nobody}
        assert psutil.Process(server2.pid).uids().real == 0   # the master keeps root
        assert server2.get("/").text == "hello"
        for _ in range(10):   # workers running as nobody reach the Manager: every line arrives
            server2.get("/")
        wait_for(lambda: len(server2.log("access").splitlines()) == 11, message="11 lines")
        # A worker ships its lines, then its statistics: the master may have
        # written the one before it folds the other.
        wait_for(lambda: server2.status()["totals"]["requests"] == 11, message="11 requests")
    finally:
        server2.stop()
        server2.kill_all()


def test_graceful_stop_serves_connections_already_queued(make_server):
    """One worker busy in the app; a second client's connection waits in the
    listen queue. TERM arrives: the queued request is still answered."""
    server = make_server(workers=1)
    result = {}
    slow = threading.Thread(target=lambda: result.update(
        slow=requests.get(server.url + "/slow?1.5", timeout=20).text))
    slow.start()
    wait_for(server.running, message="busy")
    queued = server.connect()
    queued.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    server.signal(signal.SIGTERM)
    reply = read_until_close(queued, timeout=10)
    queued.close()
    slow.join(20)
    assert result["slow"] == "slow done"
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"hello")
    assert server.proc.wait(20) == 0
