"""Configuration: conf/prefork.toml (+ CLI overrides) -> one frozen Config.

Owns: the settings table: each setting declared once (the dataclass fields
below) with its type, default, check, documentation and `start` flag. From it
come the checks, the `start` flags and their reverse (the upgrade command
line), the request reader's limits (HttpConfig), and conf/prefork.toml itself
(render_toml; a unit test fails when the shipped file drifts). Also the rule for
relative paths. Every problem becomes one ConfigError line naming the file, the
key and what is wrong. Must not: touch sockets, processes or the app.

Relative paths (pidfile, logs, pythonpath, static root...) resolve against
`[server] base`, which is itself relative to the directory holding the config
file (the shipped conf/prefork.toml sets base = ".." so paths are relative to
the project root). Without a config file, the base is the current directory.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import ipaddress
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field

from .accessformat import check_format


DEFAULT_APP = "prefork.apps.site:app"   # the built-in site


class ConfigError(Exception):
    """One readable line: file, key, what is wrong."""


def _check_positive(value):
    return None if value > 0 else "must be greater than 0"


def _check_non_negative(value):
    return None if value >= 0 else "must be 0 or more"


def _check_app(value):
    module, sep, attr = value.partition(":")
    if not sep or not module or not attr:
        return 'must look like "module:callable"'
    return None


def _check_bind(values):
    if not values:
        return "needs at least one address"
    for item in values:
        try:
            parse_bind(item)
        except ValueError as exc:
            return str(exc)
    return None


def _check_level(value):
    levels = ("debug", "info", "warning", "error", "critical")
    return None if value.lower() in levels else f"must be one of {', '.join(levels)}"


def _check_cidrs(values):
    for item in values:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            return f"{item!r} is not an address or CIDR range"
    return None


def _check_trusted(values):
    return _check_cidrs([v for v in values if v != "unix"])


def _check_mode(value):
    try:
        mode = int(value, 8)
    except ValueError:
        return 'must be an octal mode such as "0660"'
    return None if 0 <= mode <= 0o777 else "must be between 0000 and 0777"


def _check_url_path(value):
    return None if value.startswith("/") else "must start with /"


def _check_mount(value):
    if value and (not value.startswith("/") or value.endswith("/")):
        return 'must be "" or start with / and not end with /'
    return None


def _check_health(value):
    return None if not value or value.startswith("/") else 'must be "" or start with /'


def _check_url_prefix(value):
    return None if value.startswith("/") and value.endswith("/") else "must start and end with /"


def _setting(default, check=None, doc="", kind=None, path=False, flag=None):
    """One setting, declared once: its default, its check, its documentation
    (the comment above it in conf/prefork.toml), whether it is a path, and the
    `start` flag that overrides it, if any."""
    return field(default=default, metadata={"check": check, "kind": kind, "path": path,
                                            "doc": doc, "flag": flag})


def check_workers(value):
    if not 1 <= value <= MAX_WORKERS:
        return f"must be between 1 and {MAX_WORKERS}"
    return None


MAX_WORKERS = 128   # half the scoreboard: a reload boots a second generation beside the first
MAX_THREADS = 256


def check_threads(value):
    if not 1 <= value <= MAX_THREADS:
        return f"must be between 1 and {MAX_THREADS}"
    return None


@dataclass(frozen=True)
class ServerConfig:
    base: str = _setting(".", doc="""\
Directory that relative paths in this file resolve against, itself relative
to this file's directory (default: the directory holding this file).""")
    bind: tuple = _setting(("127.0.0.1:8000",), _check_bind, kind="strlist", flag="--bind",
                           doc="""\
Addresses to listen on: "host:port", "[::1]:port" or "unix:/path/to.sock";
"https://host:port" speaks TLS (see [tls]) beside the plain ones.
Port 0 picks a free port (the ready line prints the real one). A list; one
address may also be written alone, as a string.""")
    workers: int = _setting(2, check_workers, kind="workers", flag="--workers", doc="""\
Number of worker processes (1 to 128): an integer, or "auto" for one per CPU core.""")
    app: str = _setting(DEFAULT_APP, _check_app, flag="--app", doc="""\
The WSGI application, as "module:callable" (the callable may be dotted).""")
    script_name: str = _setting("", _check_mount, doc="""\
The URL prefix the app is mounted under ("" or "/prefix"): it becomes
SCRIPT_NAME, and PATH_INFO is the rest of the path.""")
    chdir: str = _setting("", path=True, doc="""\
Directory the workers change to before importing the app ("": stay in base).""")
    name: str = _setting("", flag="--name", doc="""\
A name for this instance in process titles: "prefork: master [name]"
(two servers on one host are told apart in ps and top).""")
    reload_on_change: bool = _setting(False, flag="--reload", doc="""\
Development: reload (as HUP does) when a .py file of the app changes. The
master polls the files' mtimes once a second: no extra dependency, and a few
hundred stats a second cost nothing.""")
    pythonpath: tuple = _setting((), kind="strlist", path=True, doc="""\
Extra directories put in front of sys.path before the app is imported.""")
    pidfile: str = _setting("logs/prefork.pid", path=True, flag="--pidfile", doc="""\
The master writes its pid here (mode 0600); the control socket sits beside
it with the same name and a .sock suffix (mode 0600).""")
    backlog: int = _setting(2048, _check_positive, doc="""\
Listen queue length passed to listen(2).""")
    socket_mode: str = _setting("0660", _check_mode, doc="""\
Unix-socket listeners: their mode, owner and group ("" keeps the master's),
so that the front proxy's user (www-data, nginx) may connect.""")
    socket_owner: str = _setting("")
    socket_group: str = _setting("")
    user: str = _setting("", doc="""\
When started as root: the user and group workers switch to after the
listeners are bound (the master stays root to re-bind on reload). "" keeps.""")
    group: str = _setting("")


@dataclass(frozen=True)
class HttpConfig:
    """Also the request reader's limits (http/request.py reads the max_* and
    spool_threshold fields)."""
    keepalive_timeout: float = _setting(5.0, _check_non_negative, doc="""\
Seconds an idle keep-alive connection is kept open (0: close after each response).""")
    header_timeout: float = _setting(10.0, _check_positive, doc="""\
Seconds a client has to send a complete request head (else 408 and close).""")
    body_timeout: float = _setting(30.0, _check_positive, doc="""\
Seconds of silence allowed while a request body is arriving (else 408).""")
    send_timeout: float = _setting(30.0, _check_positive, doc="""\
Seconds without progress while sending a response before the connection is
cut. An app's PEP 3333 write() calls may block this long in all, per response.""")
    min_rate: int = _setting(500, _check_non_negative, doc="""\
Bytes per second a client must keep up, after rate_grace, while it sends a
request (head and body) or reads a response that had to wait for it; slower,
it is cut (408 while it sends), as Apache's mod_reqtimeout MinRate. 0: off.""")
    rate_grace: float = _setting(10.0, _check_positive, doc="""\
Seconds a request or a waiting response has before min_rate applies.""")
    max_request_line: int = _setting(8190, _check_positive, doc="""\
Longest request target accepted, in bytes (else 414).""")
    max_headers: int = _setting(100, _check_positive, doc="""\
Most header fields accepted in one request (else 431).""")
    max_header_size: int = _setting(32768, _check_positive, doc="""\
Largest header section accepted, in bytes, all fields together (else 431).""")
    max_body: int = _setting(10 * 1024 * 1024, _check_non_negative, doc="""\
Largest request body accepted, in bytes (else 413). 0 accepts no body.""")
    spool_threshold: int = _setting(64 * 1024, _check_non_negative, doc="""\
Bodies larger than this many bytes are spooled to a temporary file.""")
    spool_dir: str = _setting("", path=True, doc="""\
Directory for spooled bodies ("": the system's temporary directory). If a body
cannot be written there (disk full), that request gets 507; serving goes on.""")
    server_header: str = _setting("prefork", doc="""\
Value of the Server response header.""")


@dataclass(frozen=True)
class WorkersConfig:
    threads: int = _setting(32, check_threads, flag="--threads", doc="""\
App calls one worker runs at once (1 to 256). A worker's loop runs a fast
app itself; an app call that waits (a database, an API) is handed to an app
thread within a few milliseconds, and while the app keeps waiting, every
request goes to a thread, so such an app serves about `threads / wait`
requests per second per worker. Threads are started when needed and retired
when idle. 1: one call at a time, on the loop (no threads). With threads, the
app must be thread-safe (Django and Flask are) and each thread may hold its
own database connection: allow workers x threads of them.""")
    timeout: float = _setting(30.0, _check_positive, doc="""\
Seconds a worker's event loop may go without a heartbeat while it is not
running the app. A stuck worker first has every thread's stack written to the
error log, then gets SIGTERM, then SIGKILL after kill_grace.""")
    request_timeout: float = _setting(0.0, _check_non_negative, doc="""\
Seconds one request may run in the app before the same happens (0: `timeout`).""")
    slow_request_log: float = _setting(0.0, _check_non_negative, doc="""\
Seconds after which a running request's stacks are logged once, without
stopping anything (PHP-FPM's slowlog). 0: off.""")
    kill_grace: float = _setting(2.0, _check_non_negative, doc="""\
Seconds between SIGTERM and SIGKILL for a stuck worker or a graceful stop
that overran graceful_timeout.""")
    max_requests: int = _setting(0, _check_non_negative, doc="""\
Recycle a worker after this many requests (0: never), plus a random 0..jitter
so that workers do not all recycle together.""")
    max_requests_jitter: int = _setting(0, _check_non_negative)
    max_rss: int = _setting(0, _check_non_negative, doc="""\
Recycle a worker whose RSS stays above this many MiB for 3 samples in a row (0: off).""")
    max_age: float = _setting(0.0, _check_non_negative, doc="""\
Recycle a worker older than this many seconds (0: off).""")
    max_recycling: int = _setting(1, _check_positive, doc="""\
At most this many workers are recycled at once. A replacement is started and
ready before the old worker stops accepting, so the pool never shrinks.""")
    graceful_timeout: float = _setting(30.0, _check_non_negative, doc="""\
Seconds workers get, on stop or reload, to finish in-flight requests and the
connections already queued; keep-alive clients are answered with
Connection: close. What is left at the deadline is cut and counted in the log.""")
    boot_timeout: float = _setting(60.0, _check_positive, doc="""\
Seconds a new worker gets to import the app and report ready.""")
    ready_check: str = _setting("", _check_health, doc="""\
A path (with a query if you like) each new worker GETs through the app before
it counts as ready ("": off). A 5xx, an exception or no answer within
boot_timeout fails its boot: on reload the old generation keeps serving. It
catches what the app imports lazily (Django's views) and warms it up.""")
    drain_time: float = _setting(0.0, _check_non_negative, doc="""\
Seconds the server keeps serving after TERM with the health path answering 503,
so a health-checking load balancer takes it out before its listeners close.""")
    max_connections: int = _setting(1000, _check_positive, doc="""\
Open connections one worker holds at most; more wait in the listen queue or go
to another worker. With the [http] sizes this bounds a worker's memory: about
max_connections x (64 KiB read + 256 KiB unsent output + spool_threshold).""")

    @property
    def stop_grace(self) -> float:
        """Seconds a worker told to stop gracefully gets before SIGKILL: it
        cuts what is left at graceful_timeout itself (and logs it); the kill
        after kill_grace is the backstop for one stuck in the app."""
        return self.graceful_timeout + self.kill_grace


def _check_access_format(value):
    if value in ("combined", "json"):
        return None
    if "%(" not in value:
        return 'must be "combined", "json" or a format string with %(atom)s atoms'
    return check_format(value)


def _check_when(value):
    return None if value in ("", "midnight", "H") else 'must be "", "midnight" or "H"'


@dataclass(frozen=True)
class LoggingConfig:
    access_log: str = _setting("logs/access.log", path=True, flag="--access-log", doc="""\
Access log: a path, "-" for standard output, or "" to turn it off.""")
    error_log: str = _setting("logs/error.log", path=True, flag="--error-log", doc="""\
Error log (start, stop, reload, worker exits, app tracebacks): a path or "-".""")
    level: str = _setting("info", _check_level, doc="""\
Error log level: debug, info, warning, error or critical.""")
    access_format: str = _setting("combined", _check_access_format, doc="""\
Access log format: "combined" (Apache/nginx combined + request time in
microseconds), "json" (one object per line), or a format string of atoms as
in gunicorn: %(h)s remote address, %(l)s "-", %(u)s remote user, %(t)s time,
%(r)s request line, %(m)s method, %(U)s path, %(q)s query, %(H)s protocol,
%(s)s status, %(b)s body bytes ("-" if none), %(B)s body bytes, %(f)s referer,
%(a)s user agent, %(T)s seconds, %(M)s milliseconds, %(D)s microseconds,
%(p)s worker pid, %({Header-Name}i)s request header, %({KEY}e)s environ value.""")
    max_bytes: int = _setting(100 * 1024 * 1024, _check_non_negative, doc="""\
Rotate a log when the next batch would take it past max_bytes (0: never).
A batch is never split, so a file may pass the limit by one batch.""")
    backups: int = _setting(10, _check_non_negative, doc="""\
Rotated files kept: access.log.1 ... access.log.N (or dated names with `when`).""")
    when: str = _setting("", _check_when, doc="""\
Rotate by time instead: "midnight", "H" (hourly), or "" (off).""")
    compress: bool = _setting(False, doc="""\
Gzip rotated files (in the background; the master's loop does not wait).""")


@dataclass(frozen=True)
class StatusConfig:
    enabled: str = _setting("auto", kind="switch", doc="""\
Serve live statistics at `path` (HTML; ?format=json; ?format=prometheus):
true, false, or "auto": on for the built-in site, off for your own app (its
URL space is its own until you say otherwise).""")
    path: str = _setting("/_status", _check_url_path)
    allow: tuple = _setting(("127.0.0.0/8", "::1/128"), _check_trusted, kind="strlist", doc="""\
Client addresses (CIDR) allowed to see it, and "unix" for clients of unix-socket
listeners; others get 403. Behind a trusted proxy ([proxy] trusted) this is the
client's address, not the proxy's.""")
    health: str = _setting("", _check_health, doc="""\
A path answering 200 while this server takes traffic and 503 once it is
draining (see [workers] drain_time), for load balancers' health checks ("": off).
Like the status path it is matched on the raw request target.""")
    statistics: bool = _setting(True, doc="""\
Count requests, bytes and latencies in the workers (false: count nothing;
status and `bin/prefork status` then show no traffic figures).""")
    interval: float = _setting(1.0, _check_positive, doc="""\
Seconds between the statistics (and log lines) each worker ships to the master.""")


@dataclass(frozen=True)
class StaticConfig:
    enabled: str = _setting("auto", kind="switch", doc="""\
Serve files from `root` under the URL prefix `url` (GET and HEAD; ETag,
Last-Modified, 304, single ranges, precompressed .br/.gz siblings, sendfile).
Paths under `url` never reach the app. For "/", the app is asked first and
a 404 from it falls back to root/index.html. true, false, or "auto": on for
the built-in site, or when `root` is set; off for your own app otherwise.""")
    url: str = _setting("/static/", _check_url_prefix)
    root: str = _setting("", path=True, doc="""\
Directory served ("": the files shipped with prefork, prefork/assets/static).""")
    index: str = _setting("index.html", doc="""\
File served for a directory.""")
    cache_control: str = _setting("public, max-age=3600", doc="""\
Cache-Control sent with every file ("" for none).""")


@dataclass(frozen=True)
class SiteConfig:
    templates: str = _setting("", path=True, doc="""\
Jinja2 templates (autoescaped) for error pages, the status dashboard and the
built-in site ("": the ones shipped with prefork, prefork/assets/templates).
Point it at a copy to change a page. A broken template falls back to a plain
built-in page and the error log says why.""")


@dataclass(frozen=True)
class ProxyConfig:
    trusted: tuple = _setting((), _check_trusted, kind="strlist", doc="""\
Peers whose forwarding headers are believed: CIDRs, and "unix" for clients of
unix-socket listeners (a proxy on the same host). From them, X-Forwarded-For,
X-Forwarded-Proto and Forwarded (RFC 7239) set REMOTE_ADDR (the rightmost
address that is not itself trusted) and wsgi.url_scheme; the status endpoint's
allow list and the access log then use that address. From anyone else these
headers are passed to the app untouched and never believed.""")
    proxy_protocol: bool = _setting(False, doc="""\
Expect the PROXY protocol (v1 or v2, as HAProxy and nginx send it) before each
connection's first request, from trusted peers only; a connection without a
valid header, or from an untrusted peer, is closed.""")


def _check_verify(value):
    return None if value in ("none", "optional", "required") else \
        'must be "none", "optional" or "required"'


def _check_frame_size(value):
    return None if 16384 <= value <= 16777215 else "must be 16384 to 16777215 (RFC 9113 6.5.2)"


def _check_tls_version(value):
    return None if value in ("1.2", "1.3") else 'must be "1.2" or "1.3" (1.0 and 1.1 are refused)'


@dataclass(frozen=True)
class TlsConfig:
    certfile: str = _setting("", path=True, doc="""\
The certificate chain (PEM: the server's certificate first, then the
intermediates) for the listeners written https://HOST:PORT in [server] bind.
Read again by each reload (HUP), so a renewed certificate needs no restart.""")
    keyfile: str = _setting("", path=True, doc="""\
Its private key (PEM; "": in certfile).""")
    password: str = _setting("", doc="""\
The key's password, if it is encrypted.""")
    ca_certs: str = _setting("", path=True, doc="""\
CA certificates (PEM) that client certificates are checked against.""")
    verify_client: str = _setting("none", _check_verify, doc="""\
Client certificates: "none" (not asked), "optional" (checked when sent) or
"required" (the handshake fails without a valid one). Needs ca_certs.""")
    min_version: str = _setting("1.2", _check_tls_version, doc="""\
The oldest TLS version accepted: "1.2" or "1.3".""")
    ciphers: str = _setting("", doc="""\
TLS 1.2 cipher suites in OpenSSL's syntax ("": forward-secret AEAD suites
only, as Mozilla's intermediate profile).""")


@dataclass(frozen=True)
class Http2Config:
    enabled: bool = _setting(True, doc="""\
Offer HTTP/2 to TLS clients (ALPN "h2", preferred over "http/1.1"). Streams
run on the app threads, so it needs [workers] threads > 1.""")
    cleartext: bool = _setting(False, doc="""\
Accept HTTP/2 with prior knowledge on plain listeners, from [proxy] trusted
peers only (a proxy or load balancer that speaks h2c to its backends); any
other client gets HTTP/1.1 (its preface is answered 505).""")
    max_concurrent_streams: int = _setting(100, _check_positive, doc="""\
Streams a client may have open at once on one connection.""")
    max_worker_streams: int = _setting(1000, _check_positive, doc="""\
Streams open at once in one worker, all connections together; past it new
streams are refused (REFUSED_STREAM: the client may retry them).""")
    initial_window: int = _setting(65535, _check_positive, doc="""\
Flow-control window, in bytes, each stream starts with for its request body.""")
    max_frame_size: int = _setting(16384, _check_frame_size, doc="""\
Largest frame the client may send, in bytes (16384 to 16777215).""")
    flood_budget: int = _setting(1000, _check_positive, doc="""\
Frames that do no work (PING, SETTINGS, empty DATA, PRIORITY, streams the
client resets) a connection may send, plus one per stream answered; past it
the connection gets GOAWAY ENHANCE_YOUR_CALM and is closed (rapid reset and
the other floods).""")


SECTIONS = {
    "server": ServerConfig,
    "http": HttpConfig,
    "workers": WorkersConfig,
    "logging": LoggingConfig,
    "status": StatusConfig,
    "static": StaticConfig,
    "site": SiteConfig,
    "proxy": ProxyConfig,
    "tls": TlsConfig,
    "http2": Http2Config,
}


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    status: StatusConfig = field(default_factory=StatusConfig)
    static: StaticConfig = field(default_factory=StaticConfig)
    site: SiteConfig = field(default_factory=SiteConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    http2: Http2Config = field(default_factory=Http2Config)
    env: tuple = ()   # [env]: (name, value) pairs set in the workers before the app loads
    source: str = ""  # the config file this came from ("" = built-in defaults)

    def serves(self, section: str) -> bool:
        """Is the server's own handler for "status" or "static" mounted? "auto"
        mounts it only for the built-in site (or static when a root is set):
        a user's app keeps its URL space."""
        enabled = getattr(self, section).enabled
        if enabled != "auto":
            return enabled
        return self.server.app == DEFAULT_APP or (section == "static" and bool(self.static.root))

    def serving(self) -> str:
        """What is served where, for the ready line."""
        parts = [f"app {self.server.app} at {self.server.script_name or '/'}"]
        if self.serves("static"):
            parts.append(f"static files at {self.static.url}")
        if self.serves("status"):
            parts.append(f"status at {self.status.path}")
        if self.status.health:
            parts.append(f"health at {self.status.health}")
        return ", ".join(parts)

    @property
    def wants_h2(self) -> bool:
        """HTTP/2 is asked for: enabled, and app threads to run its streams."""
        return self.http2.enabled and self.workers.threads > 1

    @property
    def speaks_h2(self) -> bool:
        """HTTP/2 is offered: asked for, and our binding of libnghttp2 built
        (http/http2.py; imported here only, config needs no protocol module)."""
        from .http.http2 import AVAILABLE
        return self.wants_h2 and AVAILABLE

    @property
    def control_socket(self) -> str:
        """The master's control socket sits beside the pidfile."""
        return os.path.splitext(self.server.pidfile)[0] + ".sock"


def is_tls(bind: str) -> bool:
    """A listener that speaks TLS: its bind entry is written https://HOST:PORT."""
    return bind.startswith("https://")


def parse_bind(text: str):
    """'host:port', '[v6]:port' or 'unix:/path' (host:port forms may be written
    http:// or https://) -> (family_name, address)."""
    for scheme in ("http://", "https://"):
        if text.startswith(scheme):
            text = text[len(scheme):]
            if text.startswith("unix:"):
                raise ValueError(f"{scheme}{text!r}: a unix socket takes no scheme")
            break
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ValueError(f"{text!r}: unix: needs a path")
        return ("unix", path)
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        family = "inet6"
    else:
        host, sep, port = text.rpartition(":")
        family = "inet"
    if not sep or not port.isdigit():
        raise ValueError(f"{text!r} is not host:port, [v6]:port or unix:/path")
    if int(port) > 65535:
        raise ValueError(f"{text!r}: port {int(port)} is out of range (0 to 65535)")
    return (family, (host or "0.0.0.0", int(port)))


def _coerce(kind, default, value):
    """Check a TOML value against the setting's type; return (value, problem)."""
    if isinstance(default, bool) and value in ("true", "false"):
        value = value == "true"   # from a flag
    if kind == "strlist":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return None, "expected a list of strings"
        return tuple(value), None
    if kind == "switch":   # true, false or "auto" (decided by Config.serves)
        if value in (True, False, "auto"):
            return value, None
        return None, 'expected true, false or "auto"'
    if kind == "workers":
        if value == "auto":
            return os.cpu_count() or 1, None
        if isinstance(value, bool) or not isinstance(value, int):
            return None, 'expected an integer or "auto"'
        return value, None
    if isinstance(default, bool):
        return (value, None) if isinstance(value, bool) else (None, "expected true or false")
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            return None, "expected an integer"
        return value, None
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None, "expected a number"
        return float(value), None
    if isinstance(default, str):
        return (value, None) if isinstance(value, str) else (None, "expected a string")
    raise AssertionError(f"no coercion for {kind!r}")


def _check_value(spec, raw):
    """-> (value, problem): the type, then the setting's own check."""
    value, problem = _coerce(spec.metadata["kind"], spec.default, raw)
    check = spec.metadata["check"]
    if problem is None and check is not None:
        problem = check(value)
    return value, problem


def _build_section(cls, name, table, source):
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, raw in table.items():
        spec = known.get(key)
        if spec is None:
            raise ConfigError(f"{source}: [{name}] {key}: unknown setting"
                              f"{did_you_mean(key, known)} (known: {', '.join(sorted(known))})")
        value, problem = _check_value(spec, raw)
        if problem:
            raise ConfigError(f"{source}: [{name}] {key}: {problem} (got {raw!r})")
        values[key] = value
    return cls(**values)


def did_you_mean(word, known) -> str:
    """'; did you mean "workers"?' when one known name is close to word."""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.75)
    return f'; did you mean "{close[0]}"?' if close else ""


def _check_overrides(overrides):
    """Flags are checked on their own, so a bad one is blamed on the flag."""
    flags = {(f.section, f.key): f.flag for f in start_flags()}
    for name, table in overrides.items():
        known = {f.name: f for f in dataclasses.fields(SECTIONS[name])}
        for key, raw in table.items():
            _, problem = _check_value(known[key], raw)
            if problem:
                raise ConfigError(f"command line: {flags.get((name, key), key)}: {problem} "
                                  f"(got {raw!r})")


def _resolve_paths(section, base):
    def resolve(value):
        if not value or value == "-" or os.path.isabs(value):
            return value
        return os.path.normpath(os.path.join(base, value))

    changes = {}
    for spec in dataclasses.fields(section):
        if spec.metadata.get("path"):
            value = getattr(section, spec.name)
            changes[spec.name] = (tuple(resolve(v) for v in value)
                                  if isinstance(value, tuple) else resolve(value))
    return dataclasses.replace(section, **changes)


def _resolve_binds(server, base):
    binds = []
    for item in server.bind:
        if item.startswith("unix:") and not os.path.isabs(item[5:]):
            item = "unix:" + os.path.normpath(os.path.join(base, item[5:]))
        binds.append(item)
    return dataclasses.replace(server, bind=tuple(binds))


def _read(path):
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def load(path: str | None, overrides: dict | None = None) -> Config:
    """Read the TOML file at path (None: defaults only), apply overrides
    ({"server": {"workers": 4}}, same checks as the file), resolve paths."""
    return _build(_read(path) if path else {}, path, overrides)


def load_for_control(path: str | None, overrides: dict | None = None) -> Config:
    """For commands that only talk to a running master (stop, status, reload):
    a Config whose pidfile and control socket are right even when other
    settings in the file are not, so a half-edited file never locks the
    operator out. The master itself still validates the whole file."""
    try:
        return load(path, overrides)
    except ConfigError:
        try:
            server = _read(path).get("server", {}) if path else {}
        except ConfigError:
            server = _scan_locating_keys(path)   # not even TOML: read the two lines we need
        kept = {k: server[k] for k in ("base", "pidfile")
                if isinstance(server, dict) and isinstance(server.get(k), str)}
        pidfile = (overrides or {}).get("server", {}).get("pidfile")
        return _build({"server": kept}, path, {"server": {"pidfile": pidfile}} if pidfile else None)


def _env_table(table, path) -> tuple:
    """[env]: environment variables for the app, strings only."""
    if not isinstance(table, dict):
        raise ConfigError(f"{path or 'config'}: env: expected an [env] table")
    for key, value in table.items():
        if not isinstance(value, str) or not key or "=" in key:
            raise ConfigError(f"{path or 'config'}: [env] {key}: expected a string value "
                              f"(got {value!r})")
    return tuple(table.items())


def _scan_locating_keys(path) -> dict:
    """base and pidfile from a file that does not parse: their lines as
    written (`key = "value"`), the first of each."""
    found = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                match = re.match(r'\s*(base|pidfile)\s*=\s*"([^"]*)"\s*(#.*)?$', line)
                if match and match.group(1) not in found:
                    found[match.group(1)] = match.group(2)
    except OSError:
        pass
    return found


def _build(data: dict, path: str | None, overrides: dict | None) -> Config:
    source = os.path.abspath(path) if path else ""
    _check_overrides(overrides or {})
    for name, table in (overrides or {}).items():
        data.setdefault(name, {}).update(table)

    sections = {}
    env = _env_table(data.pop("env", {}), path)
    for name, table in data.items():
        if name not in SECTIONS:
            raise ConfigError(f"{path or 'config'}: [{name}]: unknown section"
                              f"{did_you_mean(name, SECTIONS)} (known: {', '.join(SECTIONS)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{path or 'config'}: {name}: expected a [{name}] table")
        sections[name] = _build_section(SECTIONS[name], name, table, path or "command line")

    config_dir = os.path.dirname(source) if source else os.getcwd()
    server = sections.get("server", ServerConfig())
    base = os.path.normpath(os.path.join(config_dir, server.base))
    sections["server"] = _resolve_binds(dataclasses.replace(server, base=base), base)
    for name, cls in SECTIONS.items():
        sections[name] = _resolve_paths(sections.get(name, cls()), base)
    config = Config(source=source, env=env, **sections)
    if any(is_tls(bind) for bind in config.server.bind):
        from .tls import TlsError, server_context
        try:
            server_context(config.tls)   # files, key, password: checked here, at once
        except TlsError as exc:
            raise ConfigError(f"{path or 'config'}: [tls] {exc}") from None
    for bind in config.server.bind:
        if bind.startswith("unix:") and bind[5:] in (config.control_socket, config.server.pidfile):
            raise ConfigError(f"{path or 'config'}: [server] bind: {bind} is where the "
                              f"{'control socket' if bind[5:] == config.control_socket else 'pidfile'}"
                              " goes (beside [server] pidfile): choose another path")
    return config


# -- what the table generates -------------------------------------------------------
HEADER = """\
# prefork configuration. Every key is optional; the values below are the defaults
# unless marked otherwise. Relative paths resolve against [server] base.
# A wrong key, type or value stops `bin/prefork start` with one line naming it.
# This file is generated from the settings table in prefork/config.py (`make conf`).
"""
SECTION_NOTES = {
    "logging": "Only the master writes log files; workers ship their lines to it. USR1 or\n"
               "`bin/prefork reopen` reopens the files for an external logrotate.",
}
# What the shipped conf/prefork.toml sets beyond the defaults.
SHIPPED = {"server": {"base": ".."}}


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)   # a TOML basic string


def render_toml(values: dict | None = None) -> str:
    """conf/prefork.toml: every setting with its documentation and default,
    or the value given in `values` ({"server": {"base": ".."}})."""
    lines = [HEADER.rstrip("\n")]
    for name, cls in SECTIONS.items():
        lines += ["", f"[{name}]"]
        for spec in dataclasses.fields(cls):
            lines += [f"# {line}" for line in spec.metadata["doc"].splitlines()]
            value = (values or {}).get(name, {}).get(spec.name, spec.default)
            marked = "" if value == spec.default else \
                f"   # not the default ({_toml_value(spec.default)})"
            lines.append(f"{spec.name} = {_toml_value(value)}{marked}")
        if name in SECTION_NOTES:
            lines += [f"# {line}" for line in SECTION_NOTES[name].splitlines()]
    return "\n".join(lines) + "\n"


class StartFlag(typing.NamedTuple):
    flag: str       # --workers
    section: str
    key: str
    kind: str       # the setting's kind ("workers", "strlist"...) or its type's name
    path: bool      # a path (relative to the shell's directory on the command line)
    help: str       # the first sentence of its documentation


def first_sentence(doc: str) -> str:
    text = " ".join(doc.split())
    found = re.match(r"(.+?\.)(\s|$)", text)
    return found.group(1) if found else text


def start_flags() -> list[StartFlag]:
    """The settings `start` can override, as flags."""
    flags = []
    for name, cls in SECTIONS.items():
        for spec in dataclasses.fields(cls):
            if spec.metadata["flag"]:
                flags.append(StartFlag(spec.metadata["flag"], name, spec.name,
                                       spec.metadata["kind"] or type(spec.default).__name__,
                                       spec.metadata["path"],
                                       first_sentence(spec.metadata["doc"])))
    return flags


def override_args(overrides: dict) -> list:
    """The `start` flags that give these overrides again (for upgrade)."""
    argv = []
    for f in start_flags():
        value = overrides.get(f.section, {}).get(f.key)
        if value is None:
            continue
        for item in (value if isinstance(value, (list, tuple)) else [value]):
            argv += [f.flag, str(item)]
    return argv


def describe(config: Config, path: str | None, overrides: dict | None) -> str:
    """The effective settings, each with where it came from (--print-config)."""
    try:
        from_file = _read(path) if path else {}
    except ConfigError:
        from_file = {}
    overrides = overrides or {}
    lines = [f"# effective settings; file: {config.source or '(none: built-in defaults)'}"]
    for name, cls in SECTIONS.items():
        lines.append(f"[{name}]")
        section = getattr(config, name)
        for spec in dataclasses.fields(cls):
            if spec.name in overrides.get(name, {}):
                origin = f"flag {spec.metadata['flag']}"
            elif spec.name in from_file.get(name, {}):
                origin = "file"
            else:
                origin = "default"
            lines.append(f"{spec.name} = {_toml_value(getattr(section, spec.name))}   # {origin}")
    if config.env:
        lines.append("[env]")
        lines += [f"{key} = {_toml_value(value)}   # file" for key, value in config.env]
    return "\n".join(lines)
