"""prefork behind real proxies: nginx over a unix socket, HAProxy with the
PROXY protocol, health checks and a rolling restart. The shipped example
configs are run as they are, with only paths, addresses and ports rewritten.
Each test skips, saying why, where nginx or HAProxy is not installed (.ci/run
installs both)."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from tests.conftest import ROOT, Server, wait_for, write_config

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def example(name):
    with open(os.path.join(ROOT, "conf", name)) as fh:
        return fh.read()


def prefork_with(directory, server_lines, extra, bind):
    config = write_config(directory, extra=extra)
    text = open(config).read().replace('bind = ["127.0.0.1:0"]', f'bind = ["{bind}"]')
    text = text.replace('pidfile = "prefork.pid"', 'pidfile = "prefork.pid"\n' + server_lines)
    with open(config, "w") as fh:
        fh.write(text)
    return Server(directory, config)


class Proxy:
    def __init__(self, argv):
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def nginx_in_front(directory, sock_path):
    """The shipped conf/nginx.conf.example, pointed at sock_path: -> (Proxy, url)."""
    port = free_port()
    conf = example("nginx.conf.example")
    conf = (conf.replace("unix:/run/prefork/http.sock", f"unix:{sock_path}")
            .replace("listen 80;", f"listen 127.0.0.1:{port};")
            .replace("/run/nginx.pid", os.path.join(directory, "nginx.pid"))
            .replace("/var/log/nginx/", directory + "/nginx-"))
    nginx_conf = os.path.join(directory, "nginx.conf")
    with open(nginx_conf, "w") as fh:
        fh.write(conf)
    url = f"http://127.0.0.1:{port}"
    return Proxy([NGINX, "-c", nginx_conf, "-g", "daemon off;"]), url


def behind_nginx(directory, app="tests.apps.basic:app", extra=""):
    """prefork on a unix socket (mode 0666, trusting unix peers) behind nginx."""
    os.chmod(directory, 0o755)   # nginx's workers (www-data) reach the socket
    sock_path = os.path.join(directory, "http.sock")
    config = write_config(directory, app=app, extra='[proxy]\ntrusted = ["unix"]\n' + extra)
    text = open(config).read().replace('bind = ["127.0.0.1:0"]', f'bind = ["unix:{sock_path}"]')
    text = text.replace('pidfile = "prefork.pid"', 'pidfile = "prefork.pid"\nsocket_mode = "0666"')
    with open(config, "w") as fh:
        fh.write(text)
    server = Server(directory, config)
    wait_for(lambda: "ready" in server.stdout() or server.proc.poll() is not None,
             timeout=30, message="ready")
    nginx, url = nginx_in_front(directory, sock_path)
    wait_for(lambda: _get(url + "/") is not None and _get(url + "/") < 500, timeout=15,
             message="nginx up")
    return server, nginx, url


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")
def test_behind_nginx_over_a_unix_socket(tmpdir_short):
    server, nginx, url = behind_nginx(tmpdir_short)
    try:
        # The client's address reaches the app (nginx is trusted over the unix socket)...
        body = requests.get(url + "/environ", headers={"X-Forwarded-For": "203.0.113.50"},
                            timeout=10).text
        assert "REMOTE_ADDR=127.0.0.1" in body.splitlines()   # nginx appends the real peer
        # ...and a chunked upload arrives whole, with its length.
        chunks = (b"x" * 1000 for _ in range(100))
        echoed = requests.post(url + "/echo", data=chunks, timeout=10)
        assert echoed.status_code == 200 and len(echoed.content) == 100_000
        # The status page: allowed from the proxy's own host, never by an encoded path.
        assert requests.get(url + "/_status", timeout=10).status_code == 200
        raw = _raw(int(url.rsplit(":", 1)[1]),
                   b"GET /%5Fstatus HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert not raw.startswith(b"HTTP/1.1 200")
        # Keep-alive upstream connections across prefork's idleness limit: no 502.
        session = requests.Session()
        codes = [session.post(url + "/echo", data=b"x", timeout=10).status_code for _ in range(20)]
        assert codes == [200] * 20
    finally:
        nginx.stop()
        server.stop(graceful=False)
        server.kill_all()


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")
def test_django_admin_csrf_and_chunked_upload_behind_nginx(tmpdir_short):
    pytest.importorskip("django")
    db = os.path.join(tmpdir_short, "django.sqlite3")
    env = dict(os.environ, DJANGO_DB=db, DJANGO_SETTINGS_MODULE="tests.apps.django_site.settings")
    setup = ("import django; django.setup(); from django.core.management import call_command; "
             "call_command('migrate', verbosity=0); from django.contrib.auth.models import User; "
             "User.objects.create_superuser('admin', 'admin@example.com', 'correct horse')")
    subprocess.run([sys.executable, "-c", setup], cwd=ROOT, env=env, check=True, timeout=120)
    server, nginx, url = behind_nginx(tmpdir_short, app="tests.apps.django_site.wsgi:application",
                                      extra=f'[env]\nDJANGO_DB = "{db}"\n')
    try:
        # The admin: a CSRF-protected login, then the index.
        session = requests.Session()
        session.get(url + "/admin/login/", timeout=10)
        login = session.post(url + "/admin/login/?next=/admin/", timeout=10, data={
            "csrfmiddlewaretoken": session.cookies["csrftoken"], "username": "admin",
            "password": "correct horse", "next": "/admin/"})
        assert login.status_code == 200 and "Site administration" in login.text
        # A form without its token is refused; with it, accepted.
        assert requests.post(url + "/form/", data={"name": "x"}, timeout=10).status_code == 403
        page = session.get(url + "/form/", timeout=10).text
        token = page.split('name="csrfmiddlewaretoken" value="')[1].split('"')[0]
        assert session.post(url + "/form/", data={"csrfmiddlewaretoken": token, "name": "Ada"},
                            timeout=10).text == "thanks, Ada"
        # A chunked upload arrives whole, from the real client (a spoofed header is ignored).
        sent = requests.post(url + "/upload/", data=(b"y" * 1000 for _ in range(300)),
                             headers={"X-Forwarded-For": "198.51.100.66"}, timeout=10).json()
        assert sent["received"] == 300_000 and sent["remote"] == "127.0.0.1"
    finally:
        nginx.stop()
        server.stop(graceful=False)
        server.kill_all()


def _get(url):
    try:
        return requests.get(url, timeout=2).status_code
    except requests.RequestException:
        return None


def _raw(port, data):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


class Load:
    """Client threads through the proxy, new connections and kept-alive ones."""

    def __init__(self, url, threads=3):
        self.url, self.ok, self.failures = url, 0, []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(threads)]

    def run(self):
        session = requests.Session()
        deadline = time.monotonic() + 90
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                code = session.get(self.url, timeout=10).status_code
                if code == 200:
                    self.ok += 1
                else:
                    self.failures.append(code)
            except requests.RequestException as exc:
                self.failures.append(repr(exc))

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(15)


@pytest.mark.skipif(HAPROXY is None, reason="HAProxy is not installed (apt-get install haproxy)")
def test_rolling_restart_behind_haproxy_fails_no_request(tmpdir_short):
    """Two prefork hosts behind HAProxy (PROXY protocol, health checks);
    each is stopped and started again in turn under load: zero failures."""
    ports = [free_port(), free_port()]
    settings = ('[proxy]\ntrusted = ["127.0.0.0/8"]\nproxy_protocol = true\n'
                '[status]\nhealth = "/_health"\n[workers]\ndrain_time = 2\n')
    dirs = []
    for name in ("a", "b"):
        directory = os.path.join(tmpdir_short, name)
        os.makedirs(directory)
        dirs.append(directory)

    def start(i):
        return prefork_with(dirs[i], "", settings, f"127.0.0.1:{ports[i]}").wait_ready()
    servers = [start(0), start(1)]
    front = free_port()
    # retries 0: no second chance hides a failed request; the drain alone must do it.
    conf = (example("haproxy.cfg.example").replace("bind :80", f"bind 127.0.0.1:{front}")
            .replace("    option forwardfor\n", "    option forwardfor\n    retries 0\n")
            .replace("10.0.0.11:8000", f"127.0.0.1:{ports[0]}")
            .replace("10.0.0.12:8000", f"127.0.0.1:{ports[1]}"))
    cfg = os.path.join(tmpdir_short, "haproxy.cfg")
    with open(cfg, "w") as fh:
        fh.write(conf)
    haproxy = Proxy([HAPROXY, "-db", "-f", cfg])
    url = f"http://127.0.0.1:{front}"
    try:
        wait_for(lambda: _get(url + "/pid") == 200, timeout=15, message="haproxy up")
        # The client's address arrives through the PROXY header.
        assert "REMOTE_ADDR=127.0.0.1" in requests.get(url + "/environ", timeout=10).text
        served_by = set()
        with Load(url + "/pid") as load:
            wait_for(lambda: load.ok > 50, message="load through haproxy")
            for i in (0, 1):
                before = load.ok
                servers[i].signal(signal.SIGTERM)     # drains 2 s, health 503, then stops
                assert servers[i].proc.wait(30) == 0
                servers[i] = start(i)
                # back in rotation: HAProxy sends it requests again
                wait_for(lambda i=i: _served_by(url, servers[i]), timeout=20,
                         message=f"host {i} back in rotation")
                served_by.add(i)
                assert load.ok > before
        assert load.failures == [], load.failures[:5]
        assert load.ok > 100 and served_by == {0, 1}
    finally:
        haproxy.stop()
        for server in servers:
            server.stop(graceful=False)
            server.kill_all()


def _served_by(url, server):
    pids = {str(w["pid"]) for w in server.status()["workers"]}
    return any(requests.get(url + "/pid", timeout=5).text in pids for _ in range(10))
