"""A yardstick, not a server: the least a WSGI server written in Python does per
hello-world request over Python's ssl module (OpenSSL), as prefork's TLS runs.

An epoll loop per forked worker, the handshake stepped without blocking, one
SSLSocket.recv and one send per request, httptools callbacks, an environ per
request, the app called through start_response, the head joined. No limits,
no timeouts, no logs, no statistics, no error pages. What prefork's TLS figures spend beyond this is
prefork's own; what this spends, any server on Python's ssl module spends.
Usage: python tls_floor.py PORT WORKERS CERTFILE KEYFILE   (stop with TERM or INT)
"""
import io
import os
import select
import signal
import socket
import ssl
import sys

import httptools

BODY = b"Hello, World!"


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))])
    return [BODY]


class Conn:
    __slots__ = ("sock", "parser", "env", "out", "done", "shaken")

    def __init__(self, sock):
        self.sock = sock
        self.parser = httptools.HttpRequestParser(self)
        self.out = []
        self.done = self.shaken = False

    def on_message_begin(self):
        self.env = BASE.copy()

    def on_url(self, url):
        path, _, query = url.partition(b"?")
        self.env["PATH_INFO"] = path.decode("latin-1")
        self.env["QUERY_STRING"] = query.decode("latin-1")

    def on_header(self, name, value):
        key = name.decode("latin-1").upper().replace("-", "_")
        if key not in ("CONTENT_LENGTH", "CONTENT_TYPE"):
            key = "HTTP_" + key
        self.env[key] = value.decode("latin-1")

    def on_message_complete(self):
        env = self.env
        env["REQUEST_METHOD"] = self.parser.get_method().decode()
        env["SERVER_PROTOCOL"] = "HTTP/1.1"
        env["wsgi.input"] = io.BytesIO(b"")
        started = []

        def start_response(status, headers, exc_info=None):
            started.append(status)
            started.append(headers)
        body = app(env, start_response)
        self.done = not self.parser.should_keep_alive()
        head = ["HTTP/1.1 ", started[0], "\r\n"]
        for name, value in started[1]:
            head.append(f"{name}: {value}\r\n")
        head.append("Connection: close\r\n\r\n" if self.done else "\r\n")
        self.out.append("".join(head).encode("latin-1"))
        self.out.extend(body)


def serve(listener, context):
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    conns = {}

    def close(fd):
        poller.unregister(fd)
        conns.pop(fd).sock.close()
    while True:
        for fd, _ in poller.poll():
            if fd == listener.fileno():
                try:
                    while True:
                        sock, _ = listener.accept()
                        sock.setblocking(False)
                        sock = context.wrap_socket(sock, server_side=True,
                                                   do_handshake_on_connect=False)
                        conns[sock.fileno()] = Conn(sock)
                        poller.register(sock.fileno(), select.EPOLLIN)
                except BlockingIOError:
                    pass
                continue
            conn = conns[fd]
            try:
                if not conn.shaken:
                    conn.sock.do_handshake()
                    conn.shaken = True
                data = conn.sock.recv(65536)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                continue
            except OSError:
                data = b""
            if not data:
                close(fd)
                continue
            conn.parser.feed_data(data)
            try:
                conn.sock.send(b"".join(conn.out))
            except OSError:
                conn.done = True
            conn.out.clear()
            if conn.done:
                close(fd)


port, workers = int(sys.argv[1]), int(sys.argv[2])
CONTEXT = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
CONTEXT.load_cert_chain(sys.argv[3], sys.argv[4])
LISTENER = socket.socket()
LISTENER.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
LISTENER.bind(("127.0.0.1", port))
LISTENER.listen(1024)
LISTENER.setblocking(False)
BASE = {"wsgi.version": (1, 0), "wsgi.url_scheme": "https", "wsgi.errors": sys.stderr,
        "wsgi.multithread": False, "wsgi.multiprocess": True, "wsgi.run_once": False,
        "SERVER_NAME": "127.0.0.1", "SERVER_PORT": str(port), "SCRIPT_NAME": "", "HTTPS": "on"}
kids = []
for _ in range(workers):
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        serve(LISTENER, CONTEXT)
        os._exit(0)
    kids.append(pid)


def stop(*_):
    for kid in kids:
        os.kill(kid, signal.SIGTERM)
    sys.exit(0)


signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
signal.pause()
