"""Routes for the app-thread tests: each waits first (as a view waits on its
database), so that its call leaves the loop for an app thread."""
import threading
import time

_barriers: dict = {}
_barriers_lock = threading.Lock()


def app(environ, start_response):
    handler = ROUTES.get(environ["PATH_INFO"])
    if handler is None:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]
    return handler(environ, start_response, environ["QUERY_STRING"])


def text(start_response, body, status="200 OK"):
    start_response(status, [("Content-Type", "text/plain")])
    return [body.encode()]


def meet(parties: int) -> bool:
    """Wait until `parties` callers are here at once (at most 10 s): True
    when they met, False when they did not (calls run one by one)."""
    with _barriers_lock:
        gate = _barriers.get(parties)
        if gate is None or gate.broken:
            gate = _barriers[parties] = threading.Barrier(parties)
    try:
        gate.wait(timeout=10)
    except threading.BrokenBarrierError:
        return False
    return True


def barrier(environ, start_response, query):
    """/barrier?N: passes only once N requests are in the app at once."""
    if not meet(int(query)):
        return text(start_response, "broken", "503 Service Unavailable")
    return text(start_response, f"passed on {threading.current_thread().name}")


def where(environ, start_response, query):
    """/where?S: which thread answers, after S seconds."""
    time.sleep(float(query or 0))
    return text(start_response, f"{threading.current_thread().name} "
                                f"multithread={environ['wsgi.multithread']}")


def stream(environ, start_response, query):
    """/stream?S: waits S seconds, then yields five chunks."""
    time.sleep(float(query or 0))
    start_response("200 OK", [("Content-Type", "text/plain")])
    for i in range(5):
        yield b"chunk%d\n" % i


def write(environ, start_response, query):
    """/write?S: waits, then three PEP 3333 write() calls and an iterable."""
    time.sleep(float(query or 0))
    out = start_response("200 OK", [("Content-Type", "text/plain")])
    for i in range(3):
        out(b"written%d\n" % i)
    return [b"returned\n"]


def big_list(environ, start_response, query):
    """/big-list?S: waits, then returns 4 MiB in hand."""
    time.sleep(float(query or 0))
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return [b"x" * (4 << 20)]


def big_stream(environ, start_response, query):
    """/big-stream?S: waits, then yields 1 GiB in 64 KiB chunks (more than any
    socket buffers: a client that stops reading stops it)."""
    time.sleep(float(query or 0))
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    chunk = b"y" * 65536
    for _ in range(16384):
        yield chunk


def file(environ, start_response, query):
    """/file?S: waits, then a wsgi.file_wrapper of this module's source."""
    time.sleep(float(query or 0))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return environ["wsgi.file_wrapper"](open(__file__, "rb"))


def fails(environ, start_response, query):
    """/fails?S: waits, then raises."""
    time.sleep(float(query or 0))
    raise RuntimeError("failed on a thread")


ROUTES = {"/barrier": barrier, "/where": where, "/stream": stream, "/write": write,
          "/big-list": big_list, "/big-stream": big_stream, "/file": file, "/fails": fails}
