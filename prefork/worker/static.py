"""Static files under [static] url, from [static] root.

Owns: mapping a URL path to a file that is provably inside the root, the
validators (strong ETag, Last-Modified, 304), single byte ranges (206/416),
precompressed .br/.gz siblings, and Cache-Control. The body goes out as a
wsgi.file_wrapper, which the connection sends with os.sendfile without
blocking its other connections.

Order with the app: paths under `url` never reach the app. For `/`, the app
is asked first; if it answers 404, static/index.html is served instead.
Small files (up to SMALL_FILE bytes, without precompressed siblings) are kept
in memory and sent with the head in one send() for REVALIDATE seconds after
they were read; then the path is resolved and the file read again, so a
change shows within that time (as with nginx's open_file_cache_valid). A hit
costs no stat(): in CPython a stat() costs more than the rest of the file's
part of the request. Must not: follow a path or symlink outside the root (404).
"""
from __future__ import annotations

import email.utils
import mimetypes
import os
import stat
import time

from .. import BUILTIN_STATIC
from ..templates import Templates
from ..http.response import REASONS, http_date
from .dispatch import read_only


SMALL_FILE = 64 * 1024
CACHE_ENTRIES = 1024
REVALIDATE = 1.0
TEXT_TYPES = ("application/javascript", "application/json", "image/svg+xml", "application/xml")
ENCODINGS = (("br", ".br"), ("gzip", ".gz"))   # preferred first


class NotServable(Exception):
    """Not a file we may serve: the status says how to answer."""

    def __init__(self, status):
        super().__init__(status)
        self.status = status


class CachedFile:
    """A small file held in memory, with what validates it, and the headers
    of its whole 200 response ready (the usual answer)."""
    __slots__ = ("resolved_at", "headers", "etag", "mtime", "body", "whole_headers")

    def __init__(self, resolved_at, headers, etag, mtime, body):
        self.resolved_at = resolved_at
        self.headers, self.etag, self.mtime, self.body = headers, etag, mtime, body
        self.whole_headers = headers + [("Content-Length", str(len(body)))]


def _close(fh):
    if fh is not None:
        fh.close()


def _position(text: str):
    """A byte position of a Range header: ASCII digits only (int() would take
    other scripts' digits); None if it is not one. Positions past any file
    size are all the same, so a huge number costs nothing."""
    if not text or not text.isascii() or not text.isdigit():
        return None
    return int(text) if len(text) <= 18 else 10 ** 18


class StaticFiles:
    def __init__(self, static_config, templates: Templates | None = None):
        self.templates = templates or Templates("")   # for its 404 and 403 pages
        self.prefix = static_config.url
        self.root = os.path.realpath(static_config.root or BUILTIN_STATIC)
        self.index = static_config.index
        self.cache_control = static_config.cache_control
        self._cache = {}   # relative URL path -> CachedFile

    def app_or_index(self, app, environ, start_response):
        """Ask the app first; a 404 it gave for / while it was being called,
        before any write(), becomes static/index.html when that file exists (a
        generator that starts its response later keeps its own 404: it is
        under way). The app's 404 is held back until that is decided."""
        held, committed = [], []

        def start_or_hold(status, headers, exc_info=None):
            if status[:3] != "404" or exc_info is not None or held:
                return start_response(status, headers, exc_info)
            held.append((status, headers))
            return write

        def write(data):   # write() after a 404: the app's page it is
            if not committed:
                committed.append(start_response(*held.pop()))
            committed[0](data)
        result = app(environ, start_or_hold)
        if not held:
            return result
        if not os.path.isfile(os.path.join(self.root, self.index)):
            start_response(*held.pop())
            return result
        if hasattr(result, "close"):
            result.close()
        return self.serve(environ, start_response, "")

    # -- path safety -------------------------------------------------------------
    @staticmethod
    def encoded_separators(environ, relative: str) -> bool:
        """Encoded slashes, backslashes and NUL never name a real file."""
        raw = environ.get("RAW_URI", "")
        if "%" in raw:
            raw = raw.split("?", 1)[0].lower()
            if "%2f" in raw or "%5c" in raw:
                return True
        return "\\" in relative or "\0" in relative

    def resolve(self, environ, relative: str) -> str:
        # PATH_INFO is latin-1 text over the raw bytes; the file system wants
        # those bytes as its own names (UTF-8 here), so /static/%C3%A9.txt finds é.txt.
        relative = os.fsdecode(relative.encode("latin-1"))
        parts = [p for p in relative.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise NotServable(404)
        candidate = os.path.join(self.root, *parts)
        real = os.path.realpath(candidate)
        if real != self.root and not real.startswith(self.root + os.sep):
            raise NotServable(404)   # a symlink pointing outside the root
        if os.path.isdir(real):
            real = os.path.join(real, self.index)
        elif relative.endswith("/"):
            raise NotServable(404)   # a file is not a directory: /a.txt/ names nothing
        return real

    # -- serving ---------------------------------------------------------------
    def serve(self, environ, start_response, relative):
        method = environ["REQUEST_METHOD"]
        if method not in ("GET", "HEAD"):
            return read_only(start_response)
        if self.encoded_separators(environ, relative):
            return self.not_found(start_response, 404)
        entry = self.cached(relative)
        if entry is not None:
            return self.respond(environ, start_response, entry.headers, entry.etag,
                                entry.mtime, len(entry.body), entry)
        try:
            path = self.resolve(environ, relative)
            encoding, fh, st = self.open_variant(environ, path)
        except NotServable as exc:
            return self.not_found(start_response, exc.status)
        variant = os.path.exists(path + ".gz") or os.path.exists(path + ".br")
        headers = self.base_headers(path, encoding, st, variant)
        etag = dict(headers)["ETag"]
        entry = None
        if not variant and st.st_size <= SMALL_FILE:
            body = fh.read()
            if len(body) == st.st_size:
                fh.close()
                fh = None
                entry = self.remember(relative, st, headers, etag, body)
            else:
                fh.seek(0)   # changed while we read it: send the file, keep nothing
        return self.respond(environ, start_response, headers, etag, st.st_mtime, st.st_size,
                            entry, fh)

    def cached(self, relative):
        entry = self._cache.get(relative)
        if entry is None:
            return None
        if time.monotonic() - entry.resolved_at > REVALIDATE:
            del self._cache[relative]   # due to be looked up and read again
            return None
        return entry

    def remember(self, relative, st, headers, etag, body):
        if len(self._cache) >= CACHE_ENTRIES:
            self._cache.pop(next(iter(self._cache)))
        entry = CachedFile(time.monotonic(), headers, etag, st.st_mtime, body)
        self._cache[relative] = entry
        return entry

    def respond(self, environ, start_response, headers, etag, mtime, size, entry, fh=None):
        """Validators, range, then the body: from memory (entry) or the file
        (fh), which is closed here unless the file wrapper takes it."""
        if entry is not None and "HTTP_IF_NONE_MATCH" not in environ \
                and "HTTP_IF_MODIFIED_SINCE" not in environ and "HTTP_RANGE" not in environ:
            start_response("200 OK", entry.whole_headers)   # the usual answer, ready
            return [] if environ["REQUEST_METHOD"] == "HEAD" else [entry.body]
        if self.not_modified(environ, etag, mtime):
            _close(fh)
            start_response("304 Not Modified", [h for h in headers
                                                if h[0] in ("ETag", "Last-Modified",
                                                            "Cache-Control", "Vary")])
            return []
        headers = list(headers)
        status, start, length = "200 OK", 0, size
        byte_range = self.range_for(environ, etag, mtime, size)
        if byte_range == "unsatisfiable":
            _close(fh)
            start_response("416 Range Not Satisfiable", [("Content-Range", f"bytes */{size}"),
                                                         ("Content-Type", "text/plain")])
            return [b"range not satisfiable\n"]
        if byte_range is not None:
            start, end = byte_range
            status, length = "206 Partial Content", end - start + 1
            headers.append(("Content-Range", f"bytes {start}-{end}/{size}"))
        headers.append(("Content-Length", str(length)))
        start_response(status, headers)
        if environ["REQUEST_METHOD"] == "HEAD":
            _close(fh)
            return []
        if entry is not None:
            return [entry.body[start:start + length] if length != size else entry.body]
        fh.seek(start)
        return environ["wsgi.file_wrapper"](fh)   # closed by the connection when sent

    def open_variant(self, environ, path):
        """(encoding or None, open file, stat) for the best representation."""
        accepted = environ.get("HTTP_ACCEPT_ENCODING", "")
        candidates = [(name, path + ext) for name, ext in ENCODINGS if name in accepted]
        for encoding, candidate in candidates + [(None, path)]:
            try:
                # O_NONBLOCK: opening a FIFO must not wait for a writer.
                fd = os.open(candidate, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                continue
            except PermissionError:
                raise NotServable(403) from None
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):   # regular files only: no FIFO, device, socket
                os.set_blocking(fd, True)
                return encoding, os.fdopen(fd, "rb"), st
            os.close(fd)
        raise NotServable(404)

    def base_headers(self, path, encoding, st, variant):
        ctype, _ = mimetypes.guess_type(path)
        ctype = ctype or "application/octet-stream"
        if ctype.startswith("text/") or ctype in TEXT_TYPES:
            ctype += "; charset=utf-8"
        suffix = f"-{encoding}" if encoding else ""
        headers = [("Content-Type", ctype),
                   ("ETag", f'"{st.st_mtime_ns:x}-{st.st_size:x}{suffix}"'),
                   ("Last-Modified", http_date(st.st_mtime)),
                   ("Accept-Ranges", "bytes")]
        if self.cache_control:
            headers.append(("Cache-Control", self.cache_control))
        if encoding:
            headers.append(("Content-Encoding", encoding))
        if variant:
            headers.append(("Vary", "Accept-Encoding"))
        return headers

    @staticmethod
    def not_modified(environ, etag, mtime) -> bool:
        if_none_match = environ.get("HTTP_IF_NONE_MATCH")
        if if_none_match is not None:   # takes precedence over If-Modified-Since
            tags = [t.strip() for t in if_none_match.split(",")]
            return "*" in tags or etag in tags or f"W/{etag}" in tags
        since = environ.get("HTTP_IF_MODIFIED_SINCE")
        if since:
            try:
                return int(mtime) <= email.utils.parsedate_to_datetime(since).timestamp()
            except (TypeError, ValueError):
                return False
        return False

    @staticmethod
    def range_for(environ, etag, mtime, size):
        """(start, end) for one satisfiable range, "unsatisfiable", or None
        (no Range, several ranges, or an If-Range that does not match)."""
        header = environ.get("HTTP_RANGE", "")
        if not header.startswith("bytes=") or "," in header:
            return None
        if_range = environ.get("HTTP_IF_RANGE")
        if if_range and if_range != etag and if_range != http_date(mtime):
            return None
        first, sep, last = header[6:].strip().partition("-")
        start, end = _position(first), _position(last)
        if not sep or (start is None and end is None) or (first and start is None) \
                or (last and end is None) or (start is not None and end is not None
                                              and end < start):
            # Not a valid range (a last-pos below the first-pos is invalid too,
            # RFC 9110 14.1.1): ignored, the whole file (14.2).
            return None
        if start is None:                   # suffix: the last N bytes
            if end == 0:
                return "unsatisfiable"
            return max(0, size - end), size - 1
        if start >= size:
            return "unsatisfiable"
        return start, size - 1 if end is None else min(end, size - 1)

    def not_found(self, start_response, status):
        """404 or 403 as the templated error page every other error uses."""
        body = self.templates.render_error(status).encode()
        start_response(f"{status} {REASONS[status]}",
                       [("Content-Type", "text/html; charset=utf-8"),
                        ("Content-Length", str(len(body)))])
        return [body]
