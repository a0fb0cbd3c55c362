"""Fixtures that run the real bin/prefork on port 0 in a temporary directory."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil

import pytest
import requests

from prefork.master import control

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFORK = os.path.join(ROOT, "bin", "prefork")
READY = re.compile(r"listening on (\S+)")


@pytest.fixture(params=["ours", "httptools"])
def llhttp_binding(request, monkeypatch):
    """Run a reader test against both bindings of llhttp: ours
    (prefork/http/_llhttp.c) and httptools', the fallback where ours is not
    built. Readers made during the test use the one named."""
    from prefork.http import request as reader_module
    if request.param == "httptools":
        monkeypatch.setattr(reader_module, "_llhttp", None)
    elif reader_module._llhttp is None:
        pytest.fail("prefork/http/_llhttp.c is not built: was there a C compiler "
                    "when `make install` ran?")
    return request.param


def wait_for(predicate, timeout=10.0, interval=0.05, message="condition"):
    """Poll until predicate() is truthy; return its value or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def write_config(directory, app="tests.apps.basic:app", workers=2, extra="", logging="",
                 bind='["127.0.0.1:0"]'):
    # [server] base is the temp directory; the tests' apps import from ROOT.
    # The tests watch the status endpoint, which a user's app gets when asked for.
    if "[status]\nenabled" in extra:
        pass
    elif "[status]\n" in extra:
        extra = extra.replace("[status]\n", "[status]\nenabled = true\n", 1)
    else:
        extra += "\n[status]\nenabled = true\n"
    text = f"""
[server]
bind = {bind}
workers = {workers}
app = "{app}"
pythonpath = ["{ROOT}"]
pidfile = "prefork.pid"
[logging]
access_log = "logs/access.log"
error_log = "logs/error.log"
level = "info"
{logging}
{extra}
"""
    path = os.path.join(directory, "prefork.toml")
    with open(path, "w") as fh:
        fh.write(text)
    return path




_STARTED: list = []   # every Server the running test started (see the fixture below)


@pytest.fixture(autouse=True)
def no_server_outlives_its_test():
    """Whatever the test did or failed to do, every server it started is gone
    after it: its whole process group (master, workers, Manager) is killed."""
    yield
    while _STARTED:
        _STARTED.pop().kill_all()


class Server:
    """A real prefork master in the foreground, as a child of the test, in a
    process group of its own."""

    def __init__(self, directory, config_path, args=(), command=(sys.executable, PREFORK),
                 preexec_fn=None, pass_fds=()):
        self.dir = directory
        self.config = config_path
        self.stdout_path = os.path.join(directory, "stdout.txt")
        self.stderr_path = os.path.join(directory, "stderr.txt")
        self.proc = subprocess.Popen(
            [*command, "start", "--foreground", "-c", config_path, *args],
            stdout=open(self.stdout_path, "w"), stderr=open(self.stderr_path, "w"),
            cwd=directory, start_new_session=True, preexec_fn=preexec_fn, pass_fds=pass_fds)
        _STARTED.append(self)
        self.url = None

    def wait_ready(self, timeout=15.0):
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"prefork exited with {self.proc.returncode}: "
                                     f"{self.stderr()}")
            match = READY.search(self.stdout())
            return match.group(1) if match else None
        self.url = wait_for(ready, timeout, message="the ready line")
        host, port = self.url.split("//")[1].rsplit(":", 1)
        self.host, self.port = host, int(port)
        return self

    def stdout(self):
        with open(self.stdout_path) as fh:
            return fh.read()

    def stderr(self):
        with open(self.stderr_path) as fh:
            return fh.read()

    def log(self, name="error"):
        try:
            with open(os.path.join(self.dir, "logs", f"{name}.log")) as fh:
                return fh.read()
        except FileNotFoundError:
            return ""

    @property
    def pid(self):
        return self.proc.pid

    def signal(self, signum):
        os.kill(self.proc.pid, signum)

    def cli(self, *args, timeout=60):
        return subprocess.run([sys.executable, PREFORK, *args, "-c", self.config],
                              capture_output=True, text=True, timeout=timeout, cwd=self.dir)

    def status(self):
        """The master's snapshot over its control socket, in-process: the
        same answer `bin/prefork status --json` prints, without a process per poll."""
        answer = control.request(os.path.join(self.dir, "prefork.sock"), {"cmd": "status"}, 10)
        assert answer["ok"], answer
        return answer["status"]

    def running(self):
        """The requests the workers are running, on their loops or threads."""
        return [r for w in self.status()["workers"]
                for r in ([w["current"]] if w["current"] else []) + w["running"]]

    def worker_pids(self):
        return {w["pid"] for w in self.status()["workers"] if w["state"] in ("idle", "busy")}

    def get(self, path, **kwargs):
        kwargs.setdefault("timeout", 10)
        return requests.get(self.url + path, **kwargs)

    def connect(self, timeout=10):
        return socket.create_connection((self.host, self.port), timeout=timeout)

    def raw(self, data: bytes, timeout=5.0) -> bytes:
        """Send bytes, read until the server closes (or timeout)."""
        with self.connect(timeout) as sock:
            sock.sendall(data)
            return read_until_close(sock, timeout)

    def stop(self, timeout=30, graceful=True):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM if graceful else signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode

    def kill_all(self):
        """SIGKILL to the master's process group while the master lives. Once it
        is reaped its number is free, and may by now lead another test's server
        (the suite starts thousands of processes; testssl alone, thousands of
        openssl): then only what it left behind in its group is killed, the
        orphans that init adopted."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            for proc in psutil.process_iter(["ppid"]):
                try:
                    if proc.info["ppid"] == 1 and os.getpgid(proc.pid) == self.proc.pid:
                        proc.kill()
                except (ProcessLookupError, psutil.Error):
                    pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


def read_until_close(sock, timeout=5.0) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


@pytest.fixture
def tmpdir_short():
    # Unix socket paths are limited to 108 bytes: keep the directory short.
    directory = tempfile.mkdtemp(prefix="pf", dir="/tmp")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def shared_server(**settings):
    """A server for a whole module of tests that only read from it (one
    start instead of one per test); make_server's arguments."""
    directory = tempfile.mkdtemp(prefix="pf", dir="/tmp")
    server = Server(directory, write_config(directory, **settings))
    _STARTED.remove(server)   # it outlives each test of its module: stopped below
    server.wait_ready()
    try:
        yield server
    finally:
        server.stop(timeout=20, graceful=False)
        server.kill_all()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def make_server(tmpdir_short):
    """make_server(app=..., workers=..., extra="[http]\\n...") -> ready Server."""
    servers = []

    def make(app="tests.apps.basic:app", workers=2, extra="", args=(), wait=True, logging=""):
        config = write_config(tmpdir_short, app, workers, extra, logging)
        server = Server(tmpdir_short, config, args)
        servers.append(server)
        return server.wait_ready() if wait else server

    yield make
    for server in servers:
        server.stop(timeout=20, graceful=False)   # the test is over: nothing to drain
        server.kill_all()


@pytest.fixture
def server(make_server):
    return make_server()


def pytest_collection_modifyitems(config, items):
    """Tests marked long start first: with pytest-xdist the others run beside
    them instead of waiting for them at the end."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)
