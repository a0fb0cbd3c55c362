"""The worker's per-request path in one process, without wrk or a scheduler.

A real Worker and Connection serve keep-alive requests written into one end of a
socketpair; the other end reads the responses. Beside it runs the floor: the
same recv + send of fixed bytes with no HTTP at all, and the app called
directly with a ready environ. What is left is what our Python costs per
request. With --profile, cProfile's top functions are printed.

Usage: .venv/bin/python tests/bench/hotpath.py [--app hello|flask] [--requests N] [--profile]
       [--path /static/style.css --set static.enabled=true] [--only [--loop READY]]
       [--without-c] [--tls]
--loop serves through the worker loop's rounds (Worker.serve_round) instead of
calling the connection directly: the loop's own cost per request is the
difference (`tests/bench/instructions.sh hello --loop 25`).
Repeatable counts on a noisy machine: instructions per request are the
difference of two `valgrind --tool=callgrind ... --only --requests N` runs
divided by the difference of their N (tests/bench/instructions.sh).
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import select
import socket
import sys
import time
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests", "bench")]

from prefork import config as config_mod            # noqa: E402
from prefork.http.request import RequestReader      # noqa: E402
from prefork.scoreboard import Scoreboard           # noqa: E402
from prefork.worker.connection import Connection    # noqa: E402
from prefork.worker.dispatch import compose, load_app  # noqa: E402
from prefork.worker import loop as loop_mod         # noqa: E402
from prefork.worker.loop import Worker              # noqa: E402
from prefork.worker.static import StaticFiles       # noqa: E402
from prefork.worker.threads import AppThreads       # noqa: E402
from prefork.worker.wsgi import base_environ, build_environ  # noqa: E402

APPS = {"hello": "prefork.apps.hello:app", "flask": "flask_app:app"}
REQUEST = (b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\n"
           b"Accept: */*\r\n\r\n")


class NullSink:
    """Where stats and log batches would go: the Manager is not what we time."""
    def ship_stats(self, delta):
        pass

    shipped = {"access": 0, "error": 0}

    def ship_logs(self, batch):
        return True   # taken: the batch is cleared, as after a real shipment

    def count_lost(self, lines):
        pass

    def take_lost_lines(self):
        return 0


def make_worker(app_spec, settings=()):
    """settings: "section.key=toml-value" strings, as in conf/prefork.toml."""
    workdir = f"/tmp/pfhot{os.getpid()}"
    os.makedirs(workdir, exist_ok=True)
    overrides = {
        "server": {"app": app_spec, "base": ROOT},
        "logging": {"access_log": f"{workdir}/access.log", "error_log": f"{workdir}/error.log"},
    }
    for setting in settings:
        name, _, value = setting.partition("=")
        section, _, key = name.partition(".")
        overrides.setdefault(section, {})[key] = tomllib.loads(f"v = {value}")["v"]
    config = config_mod.load(None, overrides)
    worker = Worker(config, [], Scoreboard(1, config.workers.threads), 0, 1, os.getppid(),
                    NullSink())
    if config.workers.threads > 1:
        # As boot() makes them, but for the sentinel: its wakeups (every 5 ms
        # while requests flow) would be counted by the time valgrind takes.
        worker.threads = AppThreads(worker, config.workers.threads)
        worker.claims = worker.threads.claims
    static = StaticFiles(config.static) if config.serves("static") else None
    worker.app = compose(load_app(app_spec, (ROOT, os.path.join(ROOT, "tests", "bench"))),
                         None, static)
    worker.poller = select.epoll()
    return worker


def round_trips(count, client, answer):
    """Seconds per request: the client sends REQUEST, answer() serves it on
    the other end, the client reads the response."""
    started = time.perf_counter()
    for _ in range(count):
        client.send(REQUEST)
        answer()
        client.recv(65536)
    return (time.perf_counter() - started) / count


TLS = None   # (server context, client context) with --tls


def connected(worker, number=0):
    """A Connection of the worker's, registered as the worker's own are, on
    one end of a socketpair: -> (connection, the client's end). With --tls
    both ends speak TLS, the handshake done before the first request."""
    server, client = socket.socketpair()
    if TLS is not None:
        import threading
        server = TLS[0].wrap_socket(server, server_side=True, do_handshake_on_connect=False)
        client = TLS[1].wrap_socket(client, do_handshake_on_connect=False)
        shake = threading.Thread(target=server.do_handshake)
        shake.start()
        client.do_handshake()
        shake.join()
    server.setblocking(False)
    conn = Connection(worker, server, ("127.0.0.1", 40000 + number), ("127.0.0.1", 8080))
    worker.conns[conn.fd] = conn
    worker.poller.register(conn.fd, select.EPOLLIN)
    if TLS is not None:
        conn.on_readable()   # its handshake is done: on to HTTP
    return conn, client


def served(worker, count):
    conn, client = connected(worker)
    try:
        took = round_trips(count, client, conn.on_readable)
        # What is deferred to the ship counts too (the batch is shipped per
        # stats interval; here once per run, which the count's difference of
        # two runs takes in).
        worker.flush_logs()
        return took
    finally:
        conn.close()
        client.close()


def served_by_the_loop(worker, count, ready):
    """Like served(), through the worker loop's rounds (Worker.serve_round):
    `ready` connections each have a request waiting when a round polls. For
    a repeatable count the round's clock-driven parts are held off: no
    mid-round refresh, no tick (their checks still run)."""
    loop_mod.FRESH_SECONDS = float("inf")
    worker.tick_seconds = float("inf")
    worker._next_tick = float("inf")
    pairs = [connected(worker, number) for number in range(ready)]
    started = time.perf_counter()
    for _ in range(count // ready):
        for _, client in pairs:
            client.send(REQUEST)
        worker.serve_round(worker.poller.poll(1))
        for _, client in pairs:
            client.recv(65536)
    took = (time.perf_counter() - started) / (count // ready * ready)
    worker.flush_logs()
    for conn, client in pairs:
        conn.close()
        client.close()
    return took


def floor(count, response):
    server, client = socket.socketpair()

    def answer():
        server.recv(65536)
        server.send(response)
    try:
        return round_trips(count, client, answer)
    finally:
        server.close()
        client.close()


def app_alone(worker, count):
    """The WSGI app called directly with a ready environ: its own cost."""
    reader = RequestReader(worker.http, base_environ("127.0.0.1", "8080", worker.wsgi_errors))
    reader.feed(REQUEST)
    environ = build_environ(reader.ready.popleft(), ("127.0.0.1", "40000"))
    app = load_app(worker.config.server.app, (ROOT, os.path.join(ROOT, "tests", "bench")))

    def start_response(status, headers, exc_info=None):
        return None
    started = time.perf_counter()
    for _ in range(count):
        result = app(dict(environ), start_response)
        b"".join(result)
        if hasattr(result, "close"):
            result.close()
    return (time.perf_counter() - started) / count


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--app", default="hello", choices=APPS)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--path", default="/", help="the request's target, e.g. /static/1k.bin "
                        "(with --set static.enabled=true)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help='a config setting, e.g. --set \'logging.access_log=""\'')
    parser.add_argument("--only", action="store_true",
                        help="just serve --requests requests (for valgrind's instruction counts)")
    parser.add_argument("--loop", type=int, default=0, metavar="READY",
                        help="serve through the worker loop's rounds, READY connections "
                        "with a request waiting per round (with --only)")
    parser.add_argument("--without-c", action="store_true",
                        help="serve as where prefork's C modules are not built: httptools' "
                        "binding of llhttp, logship.combined_line")
    parser.add_argument("--tls", action="store_true",
                        help="the connection speaks TLS 1.3 (a throwaway certificate)")
    args = parser.parse_args()
    if args.tls:
        import ssl
        import tempfile

        from run import tls_files
        global TLS
        cert, key = tls_files(tempfile.mkdtemp(prefix="pfhot"))
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(cert, key)
        client_ctx = ssl.create_default_context()
        client_ctx.check_hostname, client_ctx.verify_mode = False, ssl.CERT_NONE
        TLS = (server_ctx, client_ctx)
    if args.without_c:
        from prefork.http import request as request_mod
        from prefork.worker import logship
        request_mod._llhttp = None
        logship._combined_line = logship.combined_line
        logship._combined_into = None
    global REQUEST
    REQUEST = REQUEST.replace(b"GET / ", f"GET {args.path} ".encode(), 1)
    worker = make_worker(APPS[args.app], args.set)
    served(worker, 1000)   # warm caches (static's index check, templates)
    if args.only:
        if args.loop:
            served_by_the_loop(worker, args.requests, args.loop)
        else:
            served(worker, args.requests)
        return
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(served, worker, args.requests)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return
    ours = min(served(worker, args.requests) for _ in range(3))
    base = min(floor(args.requests, b"x" * 150) for _ in range(3))
    app = min(app_alone(worker, args.requests) for _ in range(3))
    print(f"{args.app}: {ours * 1e6:.2f} us/request through prefork = "
          f"{app * 1e6:.2f} us the app alone + {base * 1e6:.2f} us bare recv+send + "
          f"{(ours - app - base) * 1e6:.2f} us prefork's own")


if __name__ == "__main__":
    main()
