"""User-space instructions a worker spends per TLS connection and per
keep-alive TLS request: prefork beside nginx and tls_floor.py (the least a
Python server on the ssl module does), the same certificate, the same
OpenSSL, one worker each, counted by callgrind. Unlike req/s on this noisy
machine (runs spread 20-30%) the counts repeat, so they tell whose code a
gap is in: inside SSL_do_handshake, SSL_read and SSL_write, or around them.
Each server runs under valgrind; after a warm-up its worker's counters are
zeroed, then N connections (a handshake and one request each, one at a
time) and N keep-alive requests on one connection are counted.
Usage: .venv/bin/python tests/bench/tls_instructions.py [N]   (needs valgrind and nginx)
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: wrk\r\nAccept: */*\r\n"


def client_context():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def new_connections(port, n, ctx):
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port), timeout=60) as raw:
            with ctx.wrap_socket(raw) as tls:
                tls.sendall(REQUEST + b"Connection: close\r\n\r\n")
                while tls.recv(65536):
                    pass


def keepalive_requests(port, n, ctx):
    with socket.create_connection(("127.0.0.1", port), timeout=60) as raw:
        with ctx.wrap_socket(raw) as tls:
            for _ in range(n):
                tls.sendall(REQUEST + b"\r\n")
                answer = b""
                while not answer.endswith(b"Hello, World!"):
                    answer += tls.recv(65536)


def worker_pid(port) -> int:
    """The process that accepts on port and whose parent does too: the worker
    (under valgrind the titles are valgrind's)."""
    listing = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True,
                             text=True).stdout
    pids = {int(p) for p in re.findall(r"pid=(\d+)", listing)}
    for pid in pids:
        with open(f"/proc/{pid}/status") as fh:
            parent = int(re.search(r"PPid:\s+(\d+)", fh.read()).group(1))
        if parent in pids:
            return pid
    raise RuntimeError(f"no worker found on port {port}: {listing}")


def counted(pid, outdir, action) -> tuple:
    """Instructions the process spends in action(), and of them inside
    SSL_do_handshake: zeroed, run, dumped."""
    subprocess.run(["callgrind_control", "-z", str(pid)], capture_output=True, check=True)
    action()
    subprocess.run(["callgrind_control", "-d", str(pid)], capture_output=True, check=True)
    dumps = sorted((f for f in os.listdir(outdir) if f.startswith(f"cg.{pid}.")),
                   key=lambda f: int(f.rsplit(".", 1)[1]))
    path = os.path.join(outdir, dumps[-1])
    with open(path) as fh:
        total = int(re.search(r"^summary: (\d+)", fh.read(), re.M).group(1))
    report = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", path],
                            capture_output=True, text=True).stdout
    handshake = re.search(r"^\s*([\d,]+) .*:SSL_do_handshake ", report, re.M)
    return total, int(handshake.group(1).replace(",", "")) if handshake else 0


def wait_answering(port, ctx, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on {port} exited with {proc.returncode}")
        try:
            new_connections(port, 1, ctx)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"nothing answered on {port} in {timeout} s")


def measure(command, port, outdir, n, ctx):
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", "--trace-children=yes",
                             f"--callgrind-out-file={outdir}/cg.%p", *command],
                            cwd=run.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_answering(port, ctx, proc)
        pid = worker_pid(port)
        new_connections(port, 20, ctx)
        keepalive_requests(port, 100, ctx)
        conns, handshakes = counted(pid, outdir, lambda: new_connections(port, n, ctx))
        requests, _ = counted(pid, outdir, lambda: keepalive_requests(port, n * 5, ctx))
        return conns / n, handshakes / n, requests / (n * 5)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    if not shutil.which("valgrind") or not shutil.which("nginx"):
        sys.exit("tls_instructions: needs valgrind and nginx")
    parent = tempfile.mkdtemp(prefix="pftlsi")
    ctx = client_context()
    try:
        cert, key = run.tls_files(parent)
        run.WORKERS = 1
        results = {}
        port = run.free_port()
        workdir = run.server_dir(parent, "prefork")
        command = run.prefork_command(
            run.APPS["hello"], port, workdir,
            run.log_section(workdir) + f'[tls]\ncertfile = "{cert}"\nkeyfile = "{key}"\n',
            scheme="https://")
        results["prefork"] = measure(command, port, workdir, n, ctx)
        port = run.free_port()
        workdir = run.server_dir(parent, "nginx")
        os.makedirs(os.path.join(workdir, "tmp"), exist_ok=True)
        conf = os.path.join(workdir, "nginx.conf")
        with open(conf, "w") as fh:
            fh.write(run.NGINX_TLS_CONF.format(workers=1, wd=workdir, port=port, cert=cert,
                                               key=key))
        results["nginx"] = measure(["nginx", "-c", conf, "-p", workdir], port, workdir, n, ctx)
        port = run.free_port()
        workdir = run.server_dir(parent, "tls_floor")
        results["tls_floor.py"] = measure([sys.executable, run.TLS_FLOOR, str(port), "1", cert,
                                           key], port, workdir, n, ctx)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    print(f"\nworker instructions, TLS 1.3, one worker (callgrind; {n} connections, "
          f"{n * 5} keep-alive requests)")
    print(f"{'server':13} {'per connection':>15} {'in the handshake':>17} {'per request':>12}")
    for name, (per_conn, handshake, per_request) in results.items():
        print(f"{name:13} {per_conn:15,.0f} {handshake:17,.0f} {per_request:12,.0f}")
    ours, theirs = results["prefork"], results["nginx"]
    print(f"prefork / nginx: {ours[0] / theirs[0]:.2f}x per connection, "
          f"{ours[2] / theirs[2]:.2f}x per keep-alive request")


if __name__ == "__main__":
    main()
