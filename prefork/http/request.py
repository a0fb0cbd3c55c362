"""Request reading on top of llhttp: bytes in, Request objects out.

Owns: request limits (line, header count and size, body), Host and framing
rules, the 100-continue decision, when a body is spooled. Must not: touch
sockets, files or clocks; the worker feeds bytes, applies deadlines, and
gives the spool a large body is written to (BodySpool).

Usage: reader.feed(data) parses what it can; completed requests accumulate in
reader.ready (pipelining keeps their order). An HttpError raised from feed()
means: answer with its status and close; the reader is unusable afterwards.
RequestReader is the core, the same for both bindings of llhttp; what it
makes is one of its two drivers: LlhttpReader (our binding, _llhttp.c) where
that is built, else HttptoolsReader (httptools' binding). The tests hold the
two equal.
"""
from __future__ import annotations

import collections
import io
import re
from typing import Any, Callable, Protocol

import httptools

try:
    from . import _llhttp   # our binding of the same llhttp: one Python call per head
except ImportError:          # not built (no C compiler where prefork was installed)
    _llhttp = None   # type: ignore[assignment]

from .errors import (BadRequest, BodyTooLarge, HeadersTooLarge, HttpError, NotImplementedMethod,
                     SpoolFailed, VersionNotSupported,
                     UnsupportedTransferCoding, RequestLineTooLong)


_SP_HTAB = (32, 9)
# Header name as received (any case) -> its CGI meta-variable name (RFC 3875
# 4.1.18: HTTP_ + upper case, "-" as "_"; Content-Type and Content-Length
# without the prefix). Looked up once per header; names are the client's, so
# the cache is bounded.
_FIELD_KEYS = {b"Host": "HTTP_HOST", b"host": "HTTP_HOST",
               b"Content-Type": "CONTENT_TYPE", b"content-type": "CONTENT_TYPE",
               b"Content-Length": "CONTENT_LENGTH", b"content-length": "CONTENT_LENGTH"}
_FIELD_KEYS_MAX = 512
_new_object = object.__new__
_METHOD_NAMES = {name.encode(): name for name in ("GET", "HEAD", "POST", "PUT", "DELETE",
                                                   "OPTIONS", "PATCH")}   # httptools' bytes -> str
_LINE_VERSIONS = {b" HTTP/1.1\r\n": "1.1", b" HTTP/1.0\r\n": "1.0"}
_GOOD_HOSTS = {""}   # Host values already found valid ("": HTTP/1.0 without one)
# RFC 9112 3.2 Host: uri-host [":" port]; uri-host is an IP literal or a reg-name.
_IP_LITERAL = re.compile(r"\[[0-9A-Fa-f:.]+\](:[0-9]*)?")
_REG_NAME_CHARS = str.maketrans("", "", "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                "0123456789-._~!$&'()*+,;=%")
# A method the reader refused is 501 only in a request line of the right shape.
_REQUEST_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [^ \r\n]+ HTTP/[0-9]\.[0-9]\r?\n")


def field_key(name: bytes) -> str | None:
    """The meta-variable name of a header, or None for a name with "_": X_Foo
    would collide with X-Foo, so such names are not kept (as nginx and
    gunicorn do), rather than let one spoof the other."""
    if b"_" in name:
        return None
    text = name.decode("latin-1").upper().replace("-", "_")
    key = text if text in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + text
    if len(_FIELD_KEYS) < _FIELD_KEYS_MAX:
        _FIELD_KEYS[name] = key
    return key


def valid_authority(host: str) -> bool:
    """Host's value: reg-name or [IP literal], then an optional :port."""
    if host[:1] == "[":
        return _IP_LITERAL.fullmatch(host) is not None
    name, _, port = host.partition(":")
    return not name.translate(_REG_NAME_CHARS) and (not port or (port.isascii() and port.isdigit()))


class Limits(Protocol):
    """What the reader enforces; config.HttpConfig is one (the defaults live
    there, once)."""
    max_request_line: int
    max_headers: int
    max_header_size: int
    max_body: int
    spool_threshold: int


class BodySpool(Protocol):
    """Where a body past the spool threshold is written as it arrives; it
    becomes the request's body_file (read from 0). An OSError from opening
    or writing it is the request's 507 (SpoolFailed)."""
    def write(self, data: bytes) -> int: ...
    def seek(self, position: int) -> int: ...
    def close(self) -> None: ...


class Request:
    """One complete request: its head, its header fields, and the body (bytes,
    or a file past the spool threshold). The defaults live on the class, so a
    request stores only what differs; the reader sets the rest, and version
    and keep_alive always (the hot path reads them: in CPython 3.11 a class
    attribute read through an instance costs about four instance reads)."""
    method = "GET"           # str
    target = b"/"            # bytes, the raw request-target
    version = "1.1"          # "1.1" or "1.0"
    # The environ in the making: a copy of the reader's template (see
    # RequestReader; the worker's is the base environ) plus one entry per
    # header field, CGI name -> value (str, latin-1), repeated fields joined
    # with "," ("; " for Cookie). The worker's build_environ completes this
    # very dict. The reader sets it (no shared default dict).
    fields: Any = None
    keep_alive = True        # decided when the message is complete (False after an upgrade)
    body = b""
    body_file: BodySpool | None = None   # set instead of body when spooled


class TrailerBudget:
    """Stands in for the fields once the head is read: the fields of a
    chunked trailer section are counted against max_header_size, not kept."""
    __slots__ = ("left",)

    def __init__(self):
        self.left = 0

    def __contains__(self, key):
        return False

    def __setitem__(self, key, value):
        self.spend(len(key) + len(value))

    def spend(self, size):
        self.left -= size
        if self.left < 0:
            raise HeadersTooLarge()


class RequestReader:
    """The protocol object of one connection's llhttp parser: what a request
    may be (limits, Host, framing, bodies), whichever binding drives llhttp.

    RequestReader(...) makes the driver of the binding at hand, a subclass
    that owns its parser and feed(): LlhttpReader (ours, _llhttp.c), which
    gathers a head in C and hands it over in one call, on_head(); or
    HttptoolsReader, the fallback where ours is not built, which is called
    back for each part of a head and calls on_head itself. Both then call
    on_body and on_message_complete, and on_header for trailer fields.

    template: the dict each request's fields start from (a copy per request).
    The worker passes the connection's base environ, so the fields become the
    WSGI environ with no second pass over the headers. request_type: what a
    request is made as, Request or a subclass (the worker's exchange, so that
    a request and its response are one object). spool: opens the BodySpool of
    a body past limits.spool_threshold (the worker's opens a temporary file;
    by default the body stays in memory)."""

    def __new__(cls, *args, **kwargs):
        if cls is RequestReader:   # the driver of the binding built (looked up now: tests switch)
            cls = LlhttpReader if _llhttp is not None else HttptoolsReader
        return object.__new__(cls)

    def __init__(self, limits: Limits, template: dict | None = None, request_type=Request,
                 spool: Callable[[], BodySpool] = io.BytesIO):
        self.limits = limits
        self._request_type = request_type
        self._open_spool = spool
        self.template = {} if template is None else template   # read-only: copied per request
        self._max_fields = len(self.template) + limits.max_headers
        self.ready: collections.deque[Request] = collections.deque()   # complete, in order
        self.continue_pending = False      # worker should send 100 Continue
        self.in_message = False            # bytes of an unfinished request seen
        self.in_head = False               # ... and its head is not complete yet
        self._parser: Any = None           # the driver's
        # An unfinished head is bounded by what it may hold (each driver counts).
        self._head_limit = limits.max_request_line + limits.max_header_size + 64
        self._max_line = limits.max_request_line
        self._trailers = TrailerBudget()
        self._fields: Any = None   # a dict in a head; a TrailerBudget after a chunked one
        self._url = b""
        self._request = None
        self._reset_counts()
        self._reset_body()

    def retemplate(self, template: dict) -> None:
        """The dict the next requests' fields start from (a TLS connection's,
        once its handshake adds its facts), between requests only."""
        self.template = template
        self._max_fields = len(template) + self.limits.max_headers

    def _reset_counts(self):
        self._extra_fields = 0     # fields repeated or refused (not one entry each)
        self._extra_size = 0       # ... and their bytes

    def _reset_body(self):
        self._chunked = False
        self._body_chunks = None   # made by the first body fragment
        self._body_size = 0
        self._body_file: BodySpool | None = None

    # -- input ----------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Parse what data holds (the driver's)."""
        raise NotImplementedError

    def _raise_as_http(self, exc: Exception, data: bytes, completed_in_feed: bool) -> None:
        """What a binding raised from feed_data, as the HttpError to answer
        (both raise httptools' exception classes, with llhttp's reasons)."""
        if isinstance(exc, httptools.HttpParserCallbackError):
            cause = exc.__context__
            if isinstance(cause, HttpError):
                raise cause from None
            raise exc
        if isinstance(exc, httptools.HttpParserUpgrade):
            # We do not speak any upgraded protocol: answer the request that
            # asked for it, then close (the bytes after it are not HTTP/1.1).
            if self.ready:
                self.ready[-1].keep_alive = False
            return
        if isinstance(exc, httptools.HttpParserInvalidMethodError):
            # llhttp knows a fixed set of methods; any other token is a valid
            # method we do not implement (RFC 9110 9.1): 501, not 400.
            line = self._pending_line(data, completed_in_feed)
            if _REQUEST_LINE.match(line):
                method = line.split(b" ", 1)[0].decode("latin-1")
                raise NotImplementedMethod(f"method {method!r}") from None
            raise BadRequest("invalid method") from None
        if isinstance(exc, httptools.HttpParserError):
            text = str(exc)
            if "PRI/Upgrade" in text:   # HTTP/2's preface from a client not allowed it
                raise VersionNotSupported("HTTP/2 with prior knowledge (accepted only with "
                                          "[http2] cleartext, from [proxy] trusted peers)")
            if "invalid `Transfer-Encoding`" in text:
                # A transfer coding we cannot decode (RFC 9112 6.1: 501).
                raise UnsupportedTransferCoding(text) from None
            raise BadRequest(text) from None
        raise exc

    def _pending_line(self, data: bytes, completed_in_feed: bool) -> bytes:
        """The request line of the request llhttp refused, when this feed
        began with it (llhttp checks the method first); else b"" (400)."""
        if completed_in_feed:
            return b""
        return data.lstrip(b"\r\n").partition(b"\n")[0] + b"\n"

    def close(self) -> None:
        """The connection ends: close the spool of a body being read and those
        of requests read but not answered (an aborted upload holds no disk)."""
        spools: list[BodySpool] = [request.body_file for request in self.ready
                                   if request.body_file is not None]
        if self._body_file is not None:
            spools.append(self._body_file)
            self._body_file = None
        self.ready.clear()
        for spool in spools:
            spool.close()

    def partial(self) -> tuple:
        """(method, target, version) of the request being read, as far as
        known: what the access log shows for a rejected request."""
        url = self._url or self._pending_url()
        method = self._parser.get_method().decode("latin-1", "replace") if url else "-"
        return method, (url or b"-").decode("latin-1"), "-"

    def _pending_url(self) -> bytes:
        """The target of a head not yet whole, where the binding holds it."""
        return b""

    # -- callbacks from the parser --------------------------------------------
    def on_url(self, fragment):
        # httptools: each fragment; ours: the whole target, once it is too long.
        url = self._url + fragment
        if len(url) > self._max_line:
            raise RequestLineTooLong()
        self._url = url

    def on_header(self, name, value):
        # Called once per header, so it only files the field: the limits are
        # checked once, in on_headers_complete. Memory meanwhile is bounded by
        # the bytes fed (feed() bounds a head that spans reads; one read is
        # bounded by the caller).
        if value and value[-1] in _SP_HTAB:
            # Whitespace around a field value is not part of it (RFC 9110
            # 5.5); llhttp drops only the leading part.
            value = value.rstrip(b" \t")
        key = _FIELD_KEYS.get(name)
        if key is None:
            key = field_key(name)
            if key is None:
                return self._uncounted(name, value)
        fields = self._fields
        if key in fields:
            return self._repeated(key, name, value)
        fields[key] = value.decode("latin-1")

    def _uncounted(self, name, value):
        """A field that is not one entry of its own: counted, not kept."""
        size = len(name) + len(value) + 4
        if self._request is not None:   # in a trailer section
            self._trailers.spend(size)
            return
        self._extra_fields += 1
        self._extra_size += size

    def _repeated(self, key, name, value):
        """A field name seen before in this head: joined to the first (RFC
        9110 5.3), except where one value is all HTTP allows."""
        if key == "HTTP_HOST":
            raise BadRequest("HTTP/1.1 needs exactly one Host header")
        if key == "CONTENT_TYPE":
            raise BadRequest("more than one Content-Type")
        if key == "CONTENT_LENGTH":
            raise BadRequest("more than one Content-Length")
        self._uncounted(name, value)
        self._fields[key] += ("; " if key == "HTTP_COOKIE" else ",") + value.decode("latin-1")

    def on_head(self, method, url, version, fields, odd, size):
        """A whole head: method (str), target (bytes), version ("M.m"), the
        fields filed so far, the (name, value) pairs still to file (None:
        none), and the fields' size as max_header_size counts it (-1: not
        summed, as the head is known to be small). See _llhttp.c."""
        self._url = url
        self._fields = fields
        if odd is not None:
            for name, value in odd:
                self.on_header(name, value)
        if version not in ("1.1", "1.0"):
            if version[:2] != "1.":
                raise VersionNotSupported(f"HTTP/{version}")
            version = "1.1"   # a higher 1.x minor: served as 1.1
        if len(fields) + self._extra_fields > self._max_fields:
            raise HeadersTooLarge(f"more than {self.limits.max_headers} headers")
        if size > self.limits.max_header_size:
            raise HeadersTooLarge()
        if url[:1] != b"/":
            self._check_target(url, method)
        host = fields.get("HTTP_HOST")
        if host is None:
            if version == "1.1":
                raise BadRequest("HTTP/1.1 needs exactly one Host header")
        elif host not in _GOOD_HOSTS:   # most requests name one of a few hosts
            if not valid_authority(host):
                raise BadRequest("Host is not a valid authority (RFC 9112 3.2)")
            if len(_GOOD_HOSTS) < 256:   # bounded: the values are the client's
                _GOOD_HOSTS.add(host)
        if "CONTENT_LENGTH" in fields or "HTTP_TRANSFER_ENCODING" in fields:
            self._check_body_fields(fields, version, size)
        self.in_head = False
        # Made without an __init__ frame (this runs once per request): the
        # class holds the defaults, and only these fields are set.
        request = self._request = _new_object(self._request_type)
        request.method = method
        request.target = url
        request.version = version
        request.fields = fields

    def head_size(self) -> int:
        """The header section's size as max_header_size counts it."""
        size = self._extra_size
        for key, value in self._fields.items():
            if key[:5] == "HTTP_":
                size += len(key) - 5 + len(value) + 4
            elif key == "CONTENT_TYPE" or key == "CONTENT_LENGTH":
                size += len(key) + len(value) + 4
        return size

    def _check_body_fields(self, fields, version, size):
        length = fields.get("CONTENT_LENGTH")
        expects_body = False
        if length is not None:
            if int(length) > self.limits.max_body:
                raise BodyTooLarge()
            expects_body = int(length) > 0
        coding = fields.get("HTTP_TRANSFER_ENCODING")
        if coding is not None:
            if version == "1.0":
                raise BadRequest("Transfer-Encoding in an HTTP/1.0 request (RFC 9112 6.1)")
            if coding.lower() != "chunked":
                # llhttp takes "gzip, chunked"; we decode no coding but chunked.
                raise UnsupportedTransferCoding(f"transfer coding {coding!r}")
            expects_body = self._chunked = True
            # Trailer fields count on from the head's size; they are not kept.
            self._trailers.left = self.limits.max_header_size - (
                size if size >= 0 else self.head_size())
            self._fields = self._trailers
        expect = fields.get("HTTP_EXPECT")
        self.continue_pending = (expect is not None and expect.lower() == "100-continue"
                                 and expects_body and version == "1.1")

    def _check_target(self, url, method):
        """Asterisk-form only for OPTIONS; absolute-form names the host, which
        then stands in place of the Host header (RFC 9112 3.2.2)."""
        if not url:
            raise BadRequest("empty request target")
        if url == b"*":
            if method != "OPTIONS":
                raise BadRequest("* is a target for OPTIONS only")
            return
        if url[:7].lower() == b"http://" or url[:8].lower() == b"https://":
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                raise BadRequest("invalid absolute URL") from None
            if parsed.userinfo is not None:   # RFC 9110 4.2.4: not in http(s) URIs
                raise BadRequest("userinfo in the request target (RFC 9110 4.2.4)")
            # The authority as written (host and port; an IPv6 literal in its
            # brackets) stands for Host; the Host check follows in on_head.
            rest = url[url.index(b"//") + 2:]
            for end in (b"/", b"?", b"#"):
                rest = rest.partition(end)[0]
            self._fields.pop("HTTP_HOST", None)
            self._fields["HTTP_HOST"] = rest.decode("latin-1")
            return
        raise BadRequest("request target must be a path, an absolute URL or *")

    def on_body(self, data):
        self._body_size += len(data)
        if self._body_size > self.limits.max_body:
            raise BodyTooLarge()
        if self._body_file is not None:
            try:
                self._body_file.write(data)
            except OSError as exc:
                raise SpoolFailed(f"cannot spool the body: {exc.strerror}") from None
            return
        if self._body_chunks is None:
            self._body_chunks = []
        self._body_chunks.append(data)
        if self._body_size > self.limits.spool_threshold:
            try:
                self._body_file = self._open_spool()
                self._body_file.write(b"".join(self._body_chunks))
            except OSError as exc:
                raise SpoolFailed(f"cannot spool the body: {exc.strerror}") from None
            self._body_chunks = []

    def on_message_complete(self, keep_alive):
        """keep_alive: llhttp's verdict on the connection after this request."""
        request = self._request
        request.keep_alive = keep_alive
        if self._body_size or self._chunked:
            if self._chunked:
                # Its length is known now that it is read: the app gets a
                # Content-Length (Django reads nothing without one).
                request.fields["CONTENT_LENGTH"] = str(self._body_size)
            if self._body_file is not None:
                self._body_file.seek(0)
                request.body_file = self._body_file
            elif self._body_chunks:
                request.body = b"".join(self._body_chunks)
            self._reset_body()
        if self.continue_pending:
            self.continue_pending = False
        self.ready.append(request)
        self.in_message = False
        self._url = b""
        self._request = None
        self._fields = None   # the request has them: an idle connection keeps no environ
        if self._extra_fields:
            self._reset_counts()


class LlhttpReader(RequestReader):
    """The driver of our binding (_llhttp.c): it gathers a head in C, files
    its usual fields into a copy of the template, and calls on_head once."""

    def __init__(self, limits: Limits, template: dict | None = None, request_type=Request,
                 spool: Callable[[], BodySpool] = io.BytesIO):
        super().__init__(limits, template, request_type, spool)
        self._parser = _llhttp.Parser(self, self.template, _FIELD_KEYS, limits.max_request_line)
        # llhttp refuses HTTP/1.2; RFC 9110 2.5 says a higher minor version is
        # served as the highest we speak. The major version is checked in on_head.
        self._parser.set_lenient_version(True)

    def retemplate(self, template: dict) -> None:
        super().retemplate(template)
        self._parser.set_template(template)

    def feed(self, data: bytes) -> None:
        ready_before = len(self.ready)
        parser = self._parser
        try:
            parser.feed_data(data)
        except Exception as exc:
            self._raise_as_http(exc, data, len(self.ready) > ready_before)
        finally:
            self.in_message = parser.in_message
            self.in_head = in_head = parser.in_head
        # Our binding holds an unfinished head's target and fields; bound them.
        if in_head and parser.pending > self._head_limit:
            raise HeadersTooLarge()

    def _pending_url(self) -> bytes:
        return self._parser.url


class HttptoolsReader(RequestReader):
    """The driver of httptools' binding, the fallback where ours is not
    built: called back for the start of a request, each piece of its target,
    each header field and the head's end, it gathers what on_head takes."""

    def __init__(self, limits: Limits, template: dict | None = None, request_type=Request,
                 spool: Callable[[], BodySpool] = io.BytesIO):
        super().__init__(limits, template, request_type, spool)
        self._parser = httptools.HttpRequestParser(self)
        self._parser.set_dangerous_leniencies(lenient_version=True)   # as LlhttpReader
        self._small_feed = False   # this feed is small enough not to sum a head's size
        self._small_size = limits.max_header_size - limits.max_headers
        self._head_began_in_feed = False
        self._head_fed = 0         # bytes of whole feeds inside this head
        self._version: str | None = None   # from the request line, when feed() saw it whole

    def feed(self, data: bytes) -> None:
        ready_before = len(self.ready)
        # A head that begins in a feed this small needs no sum of its size:
        # each field counts at most one byte more than it takes on the wire,
        # and there are at most max_headers of them.
        self._small_feed = len(data) <= self._small_size
        if not self.in_message:
            # httptools formats the version anew on each call (a large share
            # of a small request's cost); when this feed begins a request, its
            # request line's end names it. llhttp checks that line: this only
            # reads it, and leaves any other version to get_http_version().
            end = data.find(b"\n")
            if end > 10:
                self._version = _LINE_VERSIONS.get(data[end - 10:end + 1])
        try:
            self._parser.feed_data(data)
        except Exception as exc:
            self._raise_as_http(exc, data, len(self.ready) > ready_before)
        if self.in_head:
            # httptools buffers a header line internally until it is complete,
            # so bound the bytes of an unfinished head here as well.
            # Only whole feeds inside one head count: in the feed where the
            # head began, the bytes before it were other requests' (a
            # pipelined burst is not a large head). That feed's share of the
            # head is at most one read, which the caller bounds.
            if self._head_began_in_feed:
                self._head_began_in_feed = False
            else:
                self._head_fed += len(data)
            if self._head_fed > self._head_limit:
                raise HeadersTooLarge()

    def on_message_begin(self):
        self.in_message = True
        self.in_head = True
        self._head_began_in_feed = True
        self._fields = self.template.copy()

    def on_headers_complete(self):
        parser = self._parser
        version = self._version or parser.get_http_version()
        size = -1   # not summed
        if not (self._head_began_in_feed and self._small_feed):
            size = self.head_size()
        method = parser.get_method()
        self.on_head(_METHOD_NAMES.get(method) or method.decode("ascii"), self._url, version,
                     self._fields, None, size)
        if parser.should_upgrade() and (self._chunked or self._fields.get("CONTENT_LENGTH",
                                                                           "0") != "0"):
            # Our binding reads such a body as usual (we switch to no other
            # protocol); httptools' skips it, and the app would get none.
            raise NotImplementedMethod("an Upgrade request with a body needs prefork's own "
                                       "llhttp binding (prefork/http/_llhttp.c)")

    def on_message_complete(self, keep_alive=None):
        super().on_message_complete(self._parser.should_keep_alive())
        self._version = None
        self._head_fed = 0
