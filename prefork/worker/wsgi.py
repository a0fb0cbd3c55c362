"""PEP 3333 glue: environ from a Request, start_response, wsgi.file_wrapper.

Owns: the environ's contents and the start_response state machine (status and
headers checked and encoded before anything is sent; exc_info rules). Must not: do socket
I/O (the connection sends what this module prepares).
"""
from __future__ import annotations

import io
import sys
import tempfile
from urllib.parse import unquote_to_bytes

import httptools

from ..http.errors import AppError, BadRequest
from ..http.response import ResponseFraming

_HOP_BY_HOP = frozenset(["connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                         "te", "trailers", "transfer-encoding", "upgrade"])


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """Request-target -> (path, query), both still percent-encoded."""
    if target[:1] == b"/":
        path, _, query = target.partition(b"?")
        return path.partition(b"#")[0], query.partition(b"#")[0]
    if target == b"*":
        return b"*", b""
    if target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
        url = httptools.parse_url(target)
        return url.path or b"/", url.query or b""
    raise BadRequest("request target must be a path or an absolute URL")


class EmptyInput(io.BytesIO):
    """wsgi.input of a request without a body: one shared, empty and
    read-only stream per process (a BytesIO per request costs more than the
    rest of the environ). Closing it is a no-op, so no app can break it for
    the next request."""

    def write(self, data):
        raise io.UnsupportedOperation("wsgi.input is not writable")

    writelines = write

    def truncate(self, size=None):
        raise io.UnsupportedOperation("wsgi.input is not writable")

    def close(self):
        pass


NO_BODY = EmptyInput()


class FileWrapper:
    """wsgi.file_wrapper: the connection sends it with os.sendfile when the
    file has a real descriptor; otherwise it iterates blocks."""

    def __init__(self, filelike, blksize: int = 65536):
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self):
        read = self.filelike.read
        while True:
            data = read(self.blksize)
            if not data:
                return
            yield data

    def fileno(self):
        return self.filelike.fileno()


def spool_opener(directory: str):
    """What the reader spools a large body to ([http] spool_dir; "": the
    system's temporary directory): an unnamed temporary file, which becomes
    wsgi.input."""
    directory = directory or None

    def open_spool():
        return tempfile.TemporaryFile(dir=directory)
    return open_spool


def base_environ(server_name: str, server_port: str, errors, script_name: str = "",
                 multithread: bool = False) -> dict:
    """The part of the environ that is the same for every request on a
    listener. Each request's header fields are read into a copy of it, and
    build_environ adds the rest (the client's address too). It is made with
    room for those keys (see _with_room)."""
    return _with_room({
        "SERVER_NAME": server_name,
        "SERVER_PORT": server_port,
        "SCRIPT_NAME": script_name,
        "wsgi.input_terminated": True,   # bodies are read whole before the app runs
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.errors": errors,
        "wsgi.multithread": multithread,   # app threads ([workers] threads > 1)
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.file_wrapper": FileWrapper,
        # Set for each request by build_environ (the last three only when a
        # request differs from these).
        "REMOTE_ADDR": "",
        "REMOTE_PORT": "",
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "",
        "QUERY_STRING": "",
        "RAW_URI": "",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.input": NO_BODY,
    })


def _with_room(environ: dict) -> dict:
    """environ, its hash table grown by keys added and removed again: CPython
    keeps a dict's table size when it copies a dense dict, so a request's copy
    takes its header fields (about twenty) without the resize that would
    otherwise cost more than a thousand instructions per request."""
    size = sys.getsizeof(environ)
    spare = 0
    while sys.getsizeof(environ) == size:
        environ[spare] = None
        spare += 1
    for key in range(spare):
        del environ[key]
    return environ


# One base environ per listener (and wsgi.errors and mount prefix), shared by
# the worker's connections, which only copy it: an idle connection holds none.
_TEMPLATES: dict = {}
_TEMPLATES_MAX = 64


def environ_template(server_name: str, server_port: str, errors, script_name: str = "",
                     multithread: bool = False) -> dict:
    """The shared base environ for requests that come to this listener."""
    key = (server_name, server_port, errors, script_name, multithread)
    template = _TEMPLATES.get(key)
    if template is None:
        if len(_TEMPLATES) >= _TEMPLATES_MAX:
            _TEMPLATES.clear()
        template = _TEMPLATES[key] = base_environ(*key)
    return template


def build_environ(request, remote: tuple = ("", "")) -> dict:
    """The request's fields already sit in a copy of the listener's base
    environ (the reader's template): add what the request line says, and the
    client's (address, port) as strings ("" for a unix-socket peer)."""
    environ = request.fields
    environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = remote
    target = request.target
    raw = target.decode("latin-1")
    # (Tests on the str: `bytes in bytes` first tries the needle as an int,
    # and the TypeError it makes and drops costs more than the search.)
    if raw[:1] == "/" and "#" not in raw:
        path, _, query = raw.partition("?")
        if "%" in path:
            path = unquote_to_bytes(path.encode("latin-1")).decode("latin-1")
    else:
        path, query = split_target(target)
        path = unquote_to_bytes(path).decode("latin-1")
        query = query.decode("latin-1")
    prefix = environ["SCRIPT_NAME"]
    if prefix and path.startswith(prefix):
        path = path[len(prefix):]   # mounted under a prefix: the app sees the rest
    environ["REQUEST_METHOD"] = request.method
    environ["PATH_INFO"] = path
    environ["RAW_URI"] = raw
    # The base environ holds the usual values: only a different one is set.
    if query:
        environ["QUERY_STRING"] = query
    if request.version != "1.1":
        environ["SERVER_PROTOCOL"] = "HTTP/" + request.version   # 1.0, or 2 (a stream)
    if "CONTENT_LENGTH" in environ:   # a body came (the reader sets it for a chunked one)
        if request.body_file is not None:
            environ["wsgi.input"] = request.body_file
        elif request.body:
            environ["wsgi.input"] = io.BytesIO(request.body)
    return environ


# What an app's header item is, once checked: kept, its Content-Length, or a
# hop-by-hop header dropped (framing and connection management are the
# server's job), "Connection: close" noted. Items already checked are looked
# up instead of checked again; bounded, as values may carry client data.
KEEP, LENGTH, DROP, CLOSE = "keep", "length", "drop", "close"
_CHECKED: dict = {}
_CHECKED_MAX = 1024

# What start_response made of a (status, headers) the app gave before, ready
# to go on the wire: (status code, status line, header lines, Content-Length,
# close). Most apps send a few header sets again and again; a set that varies
# per response (a Content-Length per page) misses and is prepared afresh.
# Bounded in entries and in the size of each, as values may carry client data.
_STARTED: dict = {}
_STARTED_MAX = 1024
_STARTED_LINES_MAX = 1024
# The last (status, headers list, result): an app that answers alike again
# and again costs one list comparison, not a tuple built and hashed.
_LAST_STARTED: list = [None, None, None]


def _classify(item):
    try:
        name, value = item
    except (TypeError, ValueError):
        raise AppError(f"header {item!r} is not a pair of str") from None
    if type(name) is not str or type(value) is not str:
        raise AppError(f"header {item!r} is not a pair of str")
    if "\r" in name or "\n" in name or "\0" in name \
            or "\r" in value or "\n" in value or "\0" in value:
        raise AppError(f"header {name!r} contains CR, LF or NUL")
    lname = name.lower()
    if lname == "content-length":
        if not (value.isascii() and value.isdigit()):
            raise AppError(f"invalid Content-Length {value!r}")
        kind = LENGTH
    elif lname in _HOP_BY_HOP:
        kind = CLOSE if lname == "connection" and "close" in value.lower() else DROP
    else:
        kind = KEEP
    if type(item) is tuple and len(_CHECKED) < _CHECKED_MAX:
        _CHECKED[item] = kind
    return kind


def prepare_start(status, items, key) -> tuple:
    """Check what the app gave start_response and encode it (see _STARTED);
    key: the cache key, or None when the items are not hashable."""
    if type(status) is not str or len(status) < 4 or not status[:3].isdigit() \
            or status[3] != " " or "\r" in status or "\n" in status or "\0" in status:
        raise AppError(f"invalid status {status!r}")
    lines = []
    content_length = None
    close = False
    checked = _CHECKED.get
    for item in items:
        try:
            kind = checked(item)
        except TypeError:          # unhashable: not a tuple of str
            kind = None
        if kind is None:
            kind = _classify(item)
        if kind is KEEP:
            lines.append(f"{item[0]}: {item[1]}\r\n")
        elif kind is LENGTH:
            content_length = int(item[1])   # written once, with the framing
        elif kind is CLOSE:
            close = True
    try:
        started = (int(status[:3]), f"HTTP/1.1 {status}\r\n".encode("latin-1"),
                   "".join(lines).encode("latin-1"), content_length, close)
    except UnicodeEncodeError:
        raise AppError("response status or header is not latin-1") from None
    if key is not None and len(_STARTED) < _STARTED_MAX \
            and len(started[2]) <= _STARTED_LINES_MAX:
        _STARTED[key] = started
    return started


def look_up_start(status, headers) -> tuple:
    """What start_response makes of (status, headers): from _STARTED, else
    prepared (and kept when it can be); remembered as the last one."""
    try:
        items = tuple(headers)
    except TypeError:
        raise AppError(f"headers must be a list, not {type(headers).__name__}") from None
    key = (status, items)
    try:
        started = _STARTED.get(key)
    except TypeError:   # an item is not hashable (nor immutable): not remembered
        return prepare_start(status, items, None)
    if started is None:
        started = prepare_start(status, items, key)
    _LAST_STARTED[:] = (status, list(items), started)
    return started


class Response(ResponseFraming):
    """One response as the app starts it: the start_response callable and
    what it recorded; the framing (inherited) owns the rest of its life. The
    connection's exchange is one, so a request allocates one object for all
    of it. Defaults on the class, as in ResponseFraming."""
    status = None             # the app's status string, once start_response ran

    def write(self, data):
        """The PEP 3333 write() callable: sending is the connection's."""
        raise NotImplementedError

    def __call__(self, status, headers, exc_info=None):
        if exc_info is not None:
            try:
                if self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None  # no reference cycle through the frame
        elif self.status is not None:
            raise AssertionError("start_response called twice without exc_info")
        last = _LAST_STARTED
        if headers == last[1] and status == last[0]:
            started = last[2]   # the same as the previous response's: no hashing
        else:
            started = look_up_start(status, headers)
        self.status_code, self.status_line, self.lines, self.content_length, \
            self.ends_connection = started
        self.status = status
        return self.write

    def restart(self):
        """Undo an unsent status, so that another responder may start over."""
        self.status = None
        self.status_code = 0
        self.status_line = b""
        self.content_length = None
        self.ends_connection = False
        self.lines = b""


class ErrorStream:
    """wsgi.errors: text written here reaches the error log, line by line."""

    def __init__(self, logger):
        self._logger = logger
        self._partial = ""

    def write(self, text):
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._logger.error("%s", line)
        return len(text)

    def writelines(self, seq):
        for text in seq:
            self.write(text)

    def flush(self):
        if self._partial:
            self._logger.error("%s", self._partial)
            self._partial = ""
