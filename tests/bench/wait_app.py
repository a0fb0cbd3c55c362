"""Apps that wait, as most real views wait on their database.

app: every request waits 20 ms (time.sleep, which lets go of the GIL as a
database driver does). mixed: 9 requests in 10 answer at once, the tenth
waits 200 ms (`/?slow` asks for a slow one; the bench's fast probe asks for
`/?fast`)."""
import itertools
import threading
import time

BODY = b"waited\n"
_count = itertools.count()
_lock = threading.Lock()


def app(environ, start_response):
    time.sleep(0.02)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))])
    return [BODY]


def mixed(environ, start_response):
    query = environ.get("QUERY_STRING", "")
    if query == "slow" or (query != "fast" and next(_count) % 10 == 9):
        time.sleep(0.2)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))])
    return [BODY]


def flood(environ, start_response):
    """The flood section's app: `/big` writes 4 MiB through PEP 3333 write()
    (what a slow reader holds up), anything else answers at once."""
    if environ["PATH_INFO"] == "/big":
        write = start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                          ("Content-Length", str(4 << 20))])
        for _ in range(64):
            write(b"x" * 65536)
        return []
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))])
    return [BODY]
