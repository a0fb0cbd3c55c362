"""Master supervision with the real server: crashes, reloads, stops, the CLI."""
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import requests
import socket

from tests.conftest import PREFORK, ROOT, Server, read_until_close, wait_for, write_config


class Load:
    """Threads sending requests until stopped; counts successes and failures."""

    def __init__(self, url, threads=4, path="/pid", verify=True):
        self.url = url + path
        self.verify = verify   # requests' verify: the test CA's file for https
        self.ok = 0
        self.failures = []
        self.pids = set()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self):
        session = requests.Session()
        deadline = time.monotonic() + 60   # bounded even if stop() is never called
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                # (verify per request: a Session's is overridden by REQUESTS_CA_BUNDLE)
                response = session.get(self.url, timeout=10, verify=self.verify)
                if response.status_code == 200:
                    self.ok += 1
                    self.pids.add(response.text)
                else:
                    self.failures.append(response.status_code)
            except requests.RequestException as exc:
                self.failures.append(repr(exc))

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        wait_for(lambda: self.ok > 20, message="load to start")
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join(15)


def test_killed_worker_is_replaced_while_load_runs(server):
    before = server.worker_pids()
    victim = next(iter(before))
    with Load(server.url) as load:
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(server.worker_pids() - {victim}) == 2, message="a replacement")
        done = load.ok
        wait_for(lambda: load.ok > done + 50, message="service to go on")
    assert victim not in server.worker_pids()
    wait_for(lambda: "SIGKILL" in server.log("error"), message="the kill in the error log")
    # Only requests in flight on the killed worker may fail.
    assert len(load.failures) <= 4, load.failures


def test_hup_under_load_drops_nothing_and_replaces_every_worker(server):
    before = server.worker_pids()
    with Load(server.url) as load:
        for _ in range(2):
            generation = server.status()["server"]["generation"]
            server.signal(signal.SIGHUP)
            wait_for(lambda g=generation: server.status()["server"]["generation"] == g + 1,
                     timeout=20, message="the new generation")
            wait_for(lambda: len(server.status()["workers"]) == 2, timeout=20,
                     message="old workers retired")
        done = load.ok
        wait_for(lambda: load.ok > done + 50, message="requests after the reloads")
    assert load.failures == []
    after = server.worker_pids()
    assert after and not (after & before)
    assert after <= load.pids | after


def test_reload_command_waits_for_the_new_generation(server):
    result = server.cli("reload")
    assert result.returncode == 0, result.stderr
    assert "generation 2" in result.stdout
    assert server.status()["server"]["generation"] == 2


def test_term_lets_an_in_flight_slow_request_finish(server):
    result = {}

    def slow():
        result["response"] = requests.get(server.url + "/slow?1.5", timeout=20)
    thread = threading.Thread(target=slow)
    thread.start()
    wait_for(server.running, message="busy")
    server.signal(signal.SIGTERM)
    thread.join(20)
    assert result["response"].status_code == 200 and result["response"].text == "slow done"
    assert server.proc.wait(20) == 0


@pytest.mark.parametrize("threads", [1, 32])
def test_graceful_stop_past_its_deadline_kills(make_server, threads):
    """A worker stuck in its only app call is killed by the master; one with
    app threads cuts the connection at the deadline itself and exits."""
    server = make_server(extra=f"[workers]\ngraceful_timeout = 0.5\nthreads = {threads}\n")
    def doomed():
        try:
            requests.get(server.url + "/slow?10", timeout=20)
        except requests.ConnectionError:
            pass   # expected: the worker is killed at the deadline
    thread = threading.Thread(target=doomed)
    thread.start()
    wait_for(server.running, message="busy")
    server.signal(signal.SIGTERM)
    assert server.proc.wait(10) == 0   # long before the request's own 10 s
    if threads == 1:
        assert "killing it" in server.log("error")
    else:
        assert "graceful_timeout (0.5s) reached; cutting 1 connection(s), 1 with a request " \
            "in flight" in server.log("error")
    thread.join(20)
    assert not thread.is_alive()


def test_invalid_config_on_reload_keeps_the_old_one_serving(server):
    with open(server.config, "a") as fh:
        fh.write("\n[http]\nmax_body = 'lots'\n")
    result = server.cli("reload")
    assert result.returncode == 1
    assert "max_body" in result.stderr and "keeps serving" in result.stderr
    assert server.get("/").text == "hello"
    assert server.status()["server"]["generation"] == 1
    assert "reload failed" in server.log("error")


def test_reload_to_an_app_that_cannot_boot_keeps_the_old_generation(server):
    before = server.worker_pids()
    text = open(server.config).read().replace("tests.apps.basic:app", "tests.apps.broken:app")
    with open(server.config, "w") as fh:
        fh.write(text)
    result = server.cli("reload")
    assert result.returncode == 1 and "cannot be imported" in result.stderr
    assert server.get("/").text == "hello"
    # (the new generation's other workers may still be on their way out)
    wait_for(lambda: server.worker_pids() == before, message="the old workers only")


def test_start_with_an_app_that_fails_to_import(tmpdir_short):
    config = write_config(tmpdir_short, app="tests.apps.broken:app")
    for mode in (["--foreground"], []):
        result = subprocess.run([sys.executable, PREFORK, "start", *mode, "-c", config],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode != 0
        assert "cannot be imported (on purpose)" in result.stderr
        assert "ImportError" in result.stderr


def test_config_error_is_one_line_and_exit_2(tmpdir_short):
    config = write_config(tmpdir_short, extra="[http]\nmax_headers = 'many'\n")
    result = subprocess.run([sys.executable, PREFORK, "start", "-c", config],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert config in result.stderr and "[http] max_headers" in result.stderr


def test_bind_error_is_reported(make_server, tmpdir_short):
    first = make_server()
    config = write_config(tmpdir_short + "/second" if os.makedirs(tmpdir_short + "/second") is None
                          else "")
    result = subprocess.run([sys.executable, PREFORK, "start", "--foreground", "-c", config,
                             "--bind", f"127.0.0.1:{first.port}"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "cannot listen on" in result.stderr


def test_daemon_start_status_stop(tmpdir_short):
    config = write_config(tmpdir_short)

    def cli(*args):
        return subprocess.run([sys.executable, PREFORK, *args, "-c", config],
                              capture_output=True, text=True, timeout=60)
    started = cli("start")
    try:
        assert started.returncode == 0, started.stderr
        assert "listening on http://127.0.0.1:" in started.stdout
        url = started.stdout.split("listening on ")[1].split()[0]
        assert requests.get(url + "/", timeout=5).text == "hello"
        pidfile = os.path.join(tmpdir_short, "prefork.pid")
        master = int(open(pidfile).read())
        assert oct(os.stat(pidfile).st_mode & 0o777) == "0o600"
        assert oct(os.stat(os.path.join(tmpdir_short, "prefork.sock")).st_mode & 0o777) == "0o600"
        again = cli("start")
        assert again.returncode == 1 and "already running" in again.stderr
        status = cli("status")
        assert status.returncode == 0 and f"master {master}" in status.stdout
        assert len([line for line in status.stdout.splitlines() if " idle " in line]) == 2
    finally:
        stopped = cli("stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not os.path.exists(pidfile)
    again = cli("stop")
    assert again.returncode == 1 and again.stderr.startswith("prefork: not running")


def gone(pid) -> bool:
    """Exited (a zombie counts: a daemon's parent is init, which may not reap here)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_restart_replaces_the_master(tmpdir_short):
    config = write_config(tmpdir_short)

    def cli(*args):
        return subprocess.run([sys.executable, PREFORK, *args, "-c", config],
                              capture_output=True, text=True, timeout=90)
    pidfile = os.path.join(tmpdir_short, "prefork.pid")
    assert cli("start").returncode == 0
    try:
        first = int(open(pidfile).read())
        restarted = cli("restart")
        assert restarted.returncode == 0, restarted.stderr
        assert "stopped" in restarted.stdout and "ready" in restarted.stdout
        second = int(open(pidfile).read())
        assert second != first and gone(first)
        url = restarted.stdout.split("listening on ")[1].split()[0]
        assert requests.get(url + "/", timeout=5).text == "hello"
    finally:
        cli("stop")


def test_stale_pidfile_is_cleaned(tmpdir_short):
    config = write_config(tmpdir_short)
    with open(os.path.join(tmpdir_short, "prefork.pid"), "w") as fh:
        fh.write("999999\n")
    result = subprocess.run([sys.executable, PREFORK, "start", "-c", config],
                            capture_output=True, text=True, timeout=60)
    try:
        assert result.returncode == 0, result.stderr
    finally:
        subprocess.run([sys.executable, PREFORK, "stop", "-c", config], timeout=60)


def test_ttin_ttou_and_scale(server):
    server.signal(signal.SIGTTIN)
    wait_for(lambda: len(server.worker_pids()) == 3, message="3 workers")
    # Identical signals sent back to back may merge in the kernel: one at a time.
    for expected in (2, 1):
        server.signal(signal.SIGTTOU)
        wait_for(lambda n=expected: len(server.status()["workers"]) == n, message=f"{expected}")
    result = server.cli("scale", "4")
    assert result.returncode == 0
    wait_for(lambda: len(server.worker_pids()) == 4, message="4 workers")


def test_check_command(tmpdir_short):
    good = write_config(tmpdir_short)
    result = subprocess.run([sys.executable, PREFORK, "check", "-c", good],
                            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 0 and "loads" in result.stdout
    bad = write_config(tmpdir_short, app="tests.apps.broken:app")
    result = subprocess.run([sys.executable, PREFORK, "check", "-c", bad],
                            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 1 and "cannot be imported" in result.stderr


def test_config_path_from_the_environment(tmpdir_short):
    bad = write_config(tmpdir_short, app="tests.apps.broken:app")
    env = dict(os.environ, PREFORK_CONFIG=bad)
    result = subprocess.run([sys.executable, PREFORK, "check"], capture_output=True, text=True,
                            timeout=30, cwd=ROOT, env=env)
    assert result.returncode == 1 and "cannot be imported" in result.stderr


def test_worker_processes_are_named(server):
    import psutil
    master = psutil.Process(server.pid)
    titles = {" ".join(child.cmdline()).strip() for child in master.children()}
    assert "prefork: worker 0" in titles and "prefork: worker 1" in titles
    assert " ".join(master.cmdline()).strip() == "prefork: master"


def test_unix_socket_listener_mode_and_group_and_no_clash_with_the_control_socket(tmpdir_short):
    import grp
    import stat as stat_module

    from tests.conftest import Server
    path = os.path.join(tmpdir_short, "http.sock")
    group = grp.getgrgid(os.getgid()).gr_name
    config = write_config(tmpdir_short)
    text = open(config).read().replace(
        'pidfile = "prefork.pid"', f'pidfile = "prefork.pid"\nsocket_mode = "0666"\n'
                                   f'socket_group = "{group}"\nbind = ["unix:{path}"]')
    text = text.replace('bind = ["127.0.0.1:0"]\n', "")
    with open(config, "w") as fh:
        fh.write(text)
    server = Server(tmpdir_short, config)
    try:
        wait_for(lambda: "ready" in server.stdout() or server.proc.poll() is not None,
                 message="ready")
        check_unix_listener(server, path, tmpdir_short, stat_module)
    finally:
        server.stop(graceful=False)
        server.kill_all()


def check_unix_listener(server, path, tmpdir_short, stat_module):
    assert stat_module.S_IMODE(os.stat(path).st_mode) == 0o666
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(b"GET /environ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = read_until_close(sock)
    assert reply.startswith(b"HTTP/1.1 200") and b"\nREMOTE_ADDR=\n" in reply   # none made up
    clash = os.path.join(tmpdir_short, "clash.toml")   # the control socket's own path
    with open(clash, "w") as fh:
        fh.write('[server]\npidfile = "p.pid"\nbind = ["unix:p.sock"]\n')
    result = subprocess.run([sys.executable, PREFORK, "check", "-c", clash],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "control socket" in result.stderr


DJANGO_SITE = {   # a Django site as small as can be: it imports its views at the first request
    "rc_settings.py": 'SECRET_KEY = "test"\nDEBUG = False\nALLOWED_HOSTS = ["*"]\n'
                      'ROOT_URLCONF = "rc_urls"\nINSTALLED_APPS = []\nMIDDLEWARE = []\n'
                      'DATABASES = {}\n',
    "rc_urls.py": 'from django.urls import path\nimport rc_views\n'
                  'urlpatterns = [path("ready/", rc_views.ready), path("", rc_views.home)]\n',
    "rc_views.py": 'from django.http import HttpResponse\n\ndef ready(request):\n'
                   '    return HttpResponse("ready")\n\ndef home(request):\n'
                   '    return HttpResponse("version 1")\n',
    "rc_wsgi.py": 'import os\nos.environ.setdefault("DJANGO_SETTINGS_MODULE", "rc_settings")\n'
                  'from django.core.wsgi import get_wsgi_application\n'
                  'application = get_wsgi_application()\n',
}


def test_a_reload_whose_ready_check_fails_keeps_the_old_generation(tmpdir_short):
    """Django imports its views at the first request: a syntax error there
    passes the import of the app. [workers] ready_check GETs a path through
    the app in each new worker before it counts: the reload is refused."""
    pytest.importorskip("django")
    for name, text in DJANGO_SITE.items():
        with open(os.path.join(tmpdir_short, name), "w") as fh:
            fh.write(text)
    config = write_config(tmpdir_short, app="rc_wsgi:application", workers=1,
                          extra='[workers]\nready_check = "/ready/"\n')
    server = Server(tmpdir_short, config).wait_ready()
    try:
        assert server.get("/").text == "version 1"
        before = server.worker_pids()
        views = os.path.join(tmpdir_short, "rc_views.py")
        with open(views, "w") as fh:
            fh.write(DJANGO_SITE["rc_views.py"].replace("def home(request):", "def home(request)")
                     .replace("version 1", "version 2"))
        result = server.cli("reload")
        assert result.returncode == 1
        assert "generation 1 keeps serving" in result.stderr
        assert "SyntaxError: expected ':'" in result.stderr and "rc_views.py" in result.stderr
        assert result.stderr.count("\n") <= 10 and "logs/error.log" in result.stderr
        assert server.get("/").text == "version 1"
        wait_for(lambda: server.worker_pids() == before, message="the old workers only")
        wait_for(lambda: "SyntaxError" in server.log("error"), message="the cause logged")
        with open(views, "w") as fh:
            fh.write(DJANGO_SITE["rc_views.py"].replace("version 1", "version 2"))
        fixed = server.cli("reload")
        assert fixed.returncode == 0, fixed.stderr
        assert server.get("/").text == "version 2"
    finally:
        server.stop(graceful=False)
