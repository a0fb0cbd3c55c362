"""Configuration: conf/prefork.toml (+ CLI overrides) -> one frozen Config.

Owns: the list of settings, their defaults, types and checks, and the rule for
relative paths. Every problem becomes one ConfigError line naming the file, the
key and what is wrong. Must not: touch sockets, processes or the app.

Relative paths (pidfile, logs, pythonpath, static root...) resolve against
`[server] base`, which is itself relative to the directory holding the config
file (the shipped conf/prefork.toml sets base = ".." so paths are relative to
the project root). Without a config file, the base is the current directory.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from dataclasses import dataclass, field


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


def _check_url_path(value):
    return None if value.startswith("/") else "must start with /"


def _check_url_prefix(value):
    return None if value.startswith("/") and value.endswith("/") else "must start and end with /"


def _setting(default, check=None, kind=None, path=False):
    """A setting: its default, an optional check, and whether it is a path."""
    return field(default=default, metadata={"check": check, "kind": kind, "path": path})


@dataclass(frozen=True)
class ServerConfig:
    bind: tuple = _setting(("127.0.0.1:8000",), _check_bind, kind="strlist")
    workers: int = _setting(2, _check_positive, kind="workers")
    app: str = _setting("prefork.apps.site:app", _check_app)
    pythonpath: tuple = _setting((), kind="strlist", path=True)
    pidfile: str = _setting("logs/prefork.pid", path=True)
    backlog: int = _setting(2048, _check_positive)
    base: str = _setting(".")
    user: str = _setting("")
    group: str = _setting("")


@dataclass(frozen=True)
class HttpConfig:
    keepalive_timeout: float = _setting(5.0, _check_non_negative)
    header_timeout: float = _setting(10.0, _check_positive)
    body_timeout: float = _setting(30.0, _check_positive)
    send_timeout: float = _setting(30.0, _check_positive)
    max_request_line: int = _setting(8190, _check_positive)
    max_headers: int = _setting(100, _check_positive)
    max_header_size: int = _setting(32768, _check_positive)
    max_body: int = _setting(10 * 1024 * 1024, _check_non_negative)
    spool_threshold: int = _setting(1024 * 1024, _check_non_negative)
    server_header: str = _setting("prefork")


@dataclass(frozen=True)
class WorkersConfig:
    timeout: float = _setting(30.0, _check_positive)
    request_timeout: float = _setting(0.0, _check_non_negative)
    slow_request_log: float = _setting(0.0, _check_non_negative)
    graceful_timeout: float = _setting(30.0, _check_non_negative)
    boot_timeout: float = _setting(60.0, _check_positive)
    kill_grace: float = _setting(2.0, _check_non_negative)
    max_requests: int = _setting(0, _check_non_negative)
    max_requests_jitter: int = _setting(0, _check_non_negative)
    max_rss: int = _setting(0, _check_non_negative)
    max_age: float = _setting(0.0, _check_non_negative)
    max_recycling: int = _setting(1, _check_positive)


def _check_access_format(value):
    if value in ("combined", "json"):
        return None
    if "%(" not in value:
        return 'must be "combined", "json" or a format string with %(atom)s atoms'
    from .logs import check_format   # late: logs imports nothing from config
    return check_format(value)


def _check_when(value):
    return None if value in ("", "midnight", "H") else 'must be "", "midnight" or "H"'


@dataclass(frozen=True)
class LoggingConfig:
    access_log: str = _setting("logs/access.log", path=True)
    error_log: str = _setting("logs/error.log", path=True)
    level: str = _setting("info", _check_level)
    access_format: str = _setting("combined", _check_access_format)
    max_bytes: int = _setting(100 * 1024 * 1024, _check_non_negative)
    backups: int = _setting(10, _check_non_negative)
    when: str = _setting("", _check_when)
    compress: bool = _setting(False)


@dataclass(frozen=True)
class StatusConfig:
    enabled: bool = _setting(True)
    path: str = _setting("/_status", _check_url_path)
    allow: tuple = _setting(("127.0.0.0/8", "::1/128"), _check_cidrs, kind="strlist")
    interval: float = _setting(1.0, _check_positive)


@dataclass(frozen=True)
class StaticConfig:
    enabled: bool = _setting(True)
    url: str = _setting("/static/", _check_url_prefix)
    root: str = _setting("", path=True)   # "": the static/ shipped with prefork
    index: str = _setting("index.html")
    cache_control: str = _setting("public, max-age=3600")


@dataclass(frozen=True)
class SiteConfig:
    templates: str = _setting("", path=True)   # "": the templates/ shipped with prefork


SECTIONS = {
    "server": ServerConfig,
    "http": HttpConfig,
    "workers": WorkersConfig,
    "logging": LoggingConfig,
    "status": StatusConfig,
    "static": StaticConfig,
    "site": SiteConfig,
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
    source: str = ""  # the config file this came from ("" = built-in defaults)

    @property
    def control_socket(self) -> str:
        """The master's control socket sits beside the pidfile."""
        return os.path.splitext(self.server.pidfile)[0] + ".sock"


def parse_bind(text: str):
    """'host:port', '[v6]:port' or 'unix:/path' -> (family_name, address)."""
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
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r} is not host:port, [v6]:port or unix:/path")
    return (family, (host or "0.0.0.0", int(port)))


def _coerce(kind, default, value):
    """Check a TOML value against the setting's type; return (value, problem)."""
    if kind == "strlist":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return None, "expected a list of strings"
        return tuple(value), None
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


def _build_section(cls, name, table, source):
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, raw in table.items():
        spec = known.get(key)
        if spec is None:
            raise ConfigError(f"{source}: [{name}] {key}: unknown setting "
                              f"(known: {', '.join(sorted(known))})")
        value, problem = _coerce(spec.metadata["kind"], spec.default, raw)
        check = spec.metadata["check"]
        if problem is None and check is not None:
            problem = check(value)
        if problem:
            raise ConfigError(f"{source}: [{name}] {key}: {problem} (got {raw!r})")
        values[key] = value
    return cls(**values)


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
            server = {}
        kept = {k: server[k] for k in ("base", "pidfile")
                if isinstance(server, dict) and isinstance(server.get(k), str)}
        return _build({"server": kept}, path, None)


def _build(data: dict, path: str | None, overrides: dict | None) -> Config:
    source = os.path.abspath(path) if path else ""
    for name, table in (overrides or {}).items():
        data.setdefault(name, {}).update(table)

    sections = {}
    for name, table in data.items():
        if name not in SECTIONS:
            raise ConfigError(f"{path or 'config'}: [{name}]: unknown section "
                              f"(known: {', '.join(SECTIONS)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{path or 'config'}: {name}: expected a [{name}] table")
        sections[name] = _build_section(SECTIONS[name], name, table, path or "command line")

    config_dir = os.path.dirname(source) if source else os.getcwd()
    server = sections.get("server", ServerConfig())
    base = os.path.normpath(os.path.join(config_dir, server.base))
    sections["server"] = _resolve_binds(dataclasses.replace(server, base=base), base)
    for name, cls in SECTIONS.items():
        sections[name] = _resolve_paths(sections.get(name, cls()), base)
    return Config(source=source, **sections)
