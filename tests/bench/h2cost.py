"""What HTTP/2 costs per request in memory, no sockets and no WSGI: our
binding of libnghttp2 alone (http/_nghttp2.c answering hello), then our
session around it (prefork/http/http2.py: requests made from streams,
limits, the flood budget), and, for comparison, the h2 library alone (a
server H2Connection: what the session was built on first). Median of 5
passes of N requests, ten streams per batch.
Usage: .venv/bin/python tests/bench/h2cost.py [N]"""
import statistics
import sys
import time

import h2.config
import h2.connection
import h2.events

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
from prefork.config import Http2Config, HttpConfig  # noqa: E402
from prefork.http import _nghttp2  # noqa: E402
from prefork.http.http2 import Http2Session  # noqa: E402
from prefork.http.request import Request  # noqa: E402

HEAD = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"127.0.0.1:8443"),
        (b":path", b"/"), (b"user-agent", b"h2load nghttp2/1.52.0")]
ANSWER = [(b":status", b"200"), (b"server", b"prefork"),
          (b"date", b"Sat, 05 Dec 2026 09:00:00 GMT"), (b"content-type", b"text/plain"),
          (b"content-length", b"13")]
BODY = b"Hello, World!"


def client_bytes(n, batch=10):
    """The preface, then n requests in batches, as a client sends them."""
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    preface = client.data_to_send()
    batches = []
    for _ in range(n // batch):
        for _ in range(batch):
            client.send_headers(client.get_next_available_stream_id(), HEAD, end_stream=True)
        batches.append(client.data_to_send())
    return preface, batches


def h2_alone(n):
    preface, batches = client_bytes(n)
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None))
    server.initiate_connection()
    server.receive_data(preface)
    server.data_to_send()
    began = time.perf_counter()
    for data in batches:
        for event in server.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                server.send_headers(event.stream_id, ANSWER)
                server.send_data(event.stream_id, BODY, end_stream=True)
        server.data_to_send()
    return (time.perf_counter() - began) / n * 1e6


def engine_alone(n):
    preface, batches = client_bytes(n)
    engine = _nghttp2.Engine(100, 65535, 16384, 65536, 0)
    engine.receive(preface)
    engine.output()
    began = time.perf_counter()
    for data in batches:
        for event in engine.receive(data):
            if event[0] == _nghttp2.HEAD:
                engine.respond(event[1], ANSWER, False)
                engine.send(event[1], BODY, True)
        engine.output()
    return (time.perf_counter() - began) / n * 1e6


def with_session(n):
    preface, batches = client_bytes(n)
    session = Http2Session(HttpConfig(), Http2Config(), {}, Request)
    session.receive(preface)
    session.output()
    began = time.perf_counter()
    for data in batches:
        session.receive(data)
        while session.ready:
            request = session.ready.popleft()
            session.respond(request.stream_id, ANSWER, False)
            session.send(request.stream_id, BODY, True)
            session.earn()
        session.output()
    return (time.perf_counter() - began) / n * 1e6


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    engine, ours, h2 = [], [], []
    for _ in range(5):   # alternated: the machine's drift favours none
        engine.append(engine_alone(n))
        ours.append(with_session(n))
        h2.append(h2_alone(n))
    print(f"nghttp2 (our binding) alone: {statistics.median(engine):7.1f} us per request")
    print(f"with our session:            {statistics.median(ours):7.1f} us per request")
    print(f"h2 alone, for comparison:    {statistics.median(h2):7.1f} us per request")


if __name__ == "__main__":
    main()
