"""Config loading: defaults, paths, overrides, and one-line errors."""
import os

import pytest

from prefork import config


def write(tmp_path, text):
    path = tmp_path / "prefork.toml"
    path.write_text(text)
    return str(path)


def test_defaults_without_a_file():
    cfg = config.load(None)
    assert cfg.server.bind == ("127.0.0.1:8000",)
    assert cfg.http.max_body > 0 and cfg.http.max_request_line > 0
    assert cfg.status.allow == ("127.0.0.0/8", "::1/128")


def test_shipped_config_is_valid_and_resolves_against_the_project_root():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = config.load(os.path.join(root, "conf", "prefork.toml"))
    assert cfg.server.base == root
    assert cfg.logging.access_log == os.path.join(root, "logs", "access.log")
    assert cfg.control_socket == os.path.join(root, "logs", "prefork.sock")


def test_relative_paths_resolve_against_base(tmp_path):
    cfg = config.load(write(tmp_path, '[server]\nbase = "sub"\npidfile = "run/p.pid"\n'
                                      'bind = ["unix:run/s.sock"]\n'))
    assert cfg.server.pidfile == str(tmp_path / "sub" / "run" / "p.pid")
    assert cfg.server.bind == (f"unix:{tmp_path}/sub/run/s.sock",)


def test_overrides_win_and_are_checked(tmp_path):
    path = write(tmp_path, "[server]\nworkers = 3\n")
    assert config.load(path, {"server": {"workers": 5}}).server.workers == 5
    with pytest.raises(config.ConfigError):
        config.load(path, {"server": {"workers": 0}})


def test_workers_auto():
    assert config.load(None, {"server": {"workers": "auto"}}).server.workers == os.cpu_count()


@pytest.mark.parametrize("text,words", [
    ("[server]\nworkers = 'many'\n", ["[server] workers", "integer"]),
    ("[server]\nworkers = 0\n", ["[server] workers", "between 1 and 128"]),
    ("[server]\nworkers = 300\n", ["[server] workers", "between 1 and 128"]),
    ("[server]\nbogus = 1\n", ["[server] bogus", "unknown setting"]),
    ("[nope]\nx = 1\n", ["[nope]", "unknown section"]),
    ("[sever]\nworkers = 2\n", ["[sever]", 'unknown section; did you mean "server"?']),
    ("[server]\nwokers = 2\n", ["[server] wokers", 'did you mean "workers"?']),
    ("[server]\nbind = ['127.0.0.1:80011']\n", ["port 80011 is out of range (0 to 65535)"]),
    ("[server]\napp = 'no_colon'\n", ["[server] app", "module:callable"]),
    ("[server]\nbind = ['localhost']\n", ["[server] bind", "host:port"]),
    ("[http]\nmax_body = -1\n", ["[http] max_body", "0 or more"]),
    ("[http]\nkeepalive_timeout = 'soon'\n", ["[http] keepalive_timeout", "number"]),
    ("[logging]\nlevel = 'loud'\n", ["[logging] level", "one of"]),
    ("[status]\nallow = ['not-a-net']\n", ["[status] allow", "CIDR"]),
    ("[status]\nenabled = 'yes'\n", ["[status] enabled", 'true, false or "auto"']),
    ("[server\n", ["invalid TOML"]),
])
def test_errors_name_file_key_and_problem_on_one_line(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert "\n" not in message and path in message
    for word in words:
        assert word in message


def test_one_address_may_be_written_as_a_string(tmp_path):
    path = write(tmp_path, "[server]\nbind = '127.0.0.1:8001'\n")
    assert config.load(path).server.bind == ("127.0.0.1:8001",)


def test_missing_file():
    with pytest.raises(config.ConfigError, match="no such config file"):
        config.load("/nonexistent/prefork.toml")


@pytest.mark.parametrize("text,expected", [
    ("127.0.0.1:80", ("inet", ("127.0.0.1", 80))),
    ("[::1]:8080", ("inet6", ("::1", 8080))),
    (":9000", ("inet", ("0.0.0.0", 9000))),
    ("unix:/tmp/x.sock", ("unix", "/tmp/x.sock")),
])
def test_parse_bind(text, expected):
    assert config.parse_bind(text) == expected


def test_the_shipped_file_is_what_the_settings_table_generates():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "conf", "prefork.toml")) as fh:
        shipped = fh.read()
    assert shipped == config.render_toml(config.SHIPPED), "run `make conf`"


def test_every_setting_is_documented_and_the_generated_file_loads_to_the_defaults(tmp_path):
    import dataclasses
    for cls in config.SECTIONS.values():
        for spec in dataclasses.fields(cls):
            # a setting without text of its own shares the one above it (user/group)
            assert spec.metadata["doc"] or spec.name in (
                "group", "max_requests_jitter", "path", "url", "socket_owner", "socket_group"), spec.name
    rendered, empty = tmp_path / "rendered.toml", tmp_path / "empty.toml"
    rendered.write_text(config.render_toml())
    empty.write_text("")
    assert config.load(str(rendered)) == dataclasses.replace(config.load(str(empty)),
                                                             source=str(rendered))


def test_a_bad_flag_is_blamed_on_the_flag_not_the_file(tmp_path):
    path = write(tmp_path, "[server]\nworkers = 3\n")
    with pytest.raises(config.ConfigError) as info:
        config.load(path, {"server": {"workers": 0}})
    assert str(info.value).startswith("command line: --workers: must be between 1 and 128")


def test_override_args_give_the_same_overrides_back():
    overrides = {"server": {"bind": ["127.0.0.1:0", "unix:/tmp/x.sock"], "workers": 3,
                            "app": "a:b", "pidfile": "/tmp/p.pid"}}
    assert config.override_args(overrides) == [
        "--bind", "127.0.0.1:0", "--bind", "unix:/tmp/x.sock", "--workers", "3",
        "--app", "a:b", "--pidfile", "/tmp/p.pid"]


def test_the_operations_files_say_what_upgrade_and_reload_need():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "conf", "prefork.service")) as fh:
        unit = fh.read()
    assert "\nNotifyAccess=all\n" in unit            # the new master of an upgrade is heard
    assert "\nExecReload=/srv/app/bin/prefork reload " in unit   # waits for the outcome
    assert "\nLimitNOFILE=65536\n" in unit
    with open(os.path.join(root, "conf", "logrotate.example")) as fh:
        rotate = fh.read()
    assert "prefork reopen" in rotate and "max_bytes = 0" in rotate


def test_start_flags_say_whole_sentences_and_their_paths_come_from_the_table():
    flags = {f.flag: f for f in config.start_flags()}
    assert all(f.help.endswith(".") for f in flags.values()), [f.help for f in flags.values()]
    assert flags["--threads"].help == "App calls one worker runs at once (1 to 256)."
    assert {f.key for f in flags.values() if f.path} == {"pidfile", "access_log", "error_log"}


def test_tls_settings_are_checked_when_a_listener_speaks_https(tmp_path):
    path = write(tmp_path, "[server]\nbind = ['https://127.0.0.1:8443']\n")
    with pytest.raises(config.ConfigError, match=r"\[tls\] certfile: an https:// listener needs"):
        config.load(path)
    path = write(tmp_path, "[server]\nbind = ['https://127.0.0.1:8443']\n"
                           "[tls]\ncertfile = 'missing.pem'\n")
    with pytest.raises(config.ConfigError, match="no such file"):
        config.load(path)
    with pytest.raises(config.ConfigError, match='must be "1.2" or "1.3"'):
        config.load(write(tmp_path, "[tls]\nmin_version = '1.1'\n"))
    assert config.parse_bind("https://[::1]:8443") == ("inet6", ("::1", 8443))
    assert config.is_tls("https://0.0.0.0:443") and not config.is_tls("0.0.0.0:80")


def test_an_expiring_certificate_is_said_with_its_date(tmp_path):
    trustme = pytest.importorskip("trustme")
    import datetime

    from prefork.tls import expiry_warning
    ca = trustme.CA()
    soon = ca.issue_cert("localhost", not_after=datetime.datetime.now(datetime.timezone.utc)
                         + datetime.timedelta(days=3))
    path = tmp_path / "soon.pem"
    soon.cert_chain_pems[0].write_to_path(str(path))
    assert "expires on" in expiry_warning(str(path))
    later = ca.issue_cert("localhost")
    later.cert_chain_pems[0].write_to_path(str(path))
    assert expiry_warning(str(path)) is None
    assert "expired on" in expiry_warning(str(path), now=1e11)
