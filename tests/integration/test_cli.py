"""The command line as an operator meets it: exact exit codes and lines."""
import json
import os
import socket
import subprocess
import sys

from tests.conftest import PREFORK, wait_for, write_config


def run(*args, cwd=None, timeout=60):
    return subprocess.run([sys.executable, PREFORK, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def test_a_broken_config_file_never_hides_the_running_master(server):
    with open(server.config, "a") as fh:
        fh.write("\n[server\nthis is not toml\n")
    status = server.cli("status")
    assert status.returncode == 0 and "master" in status.stdout
    reload = server.cli("reload")
    assert reload.returncode == 1 and "invalid TOML" in reload.stderr
    stop = server.cli("stop")
    assert stop.returncode == 0 and "stopped" in stop.stdout
    assert server.proc.wait(20) == 0


def test_control_commands_take_the_pidfile_start_was_given(tmpdir_short):
    config = write_config(tmpdir_short)
    pidfile = os.path.join(tmpdir_short, "elsewhere", "p.pid")
    started = run("start", "-c", config, "--pidfile", pidfile, cwd=tmpdir_short)
    assert started.returncode == 0, started.stderr
    try:
        assert run("status", "-c", config, "--pidfile", pidfile).returncode == 0
        unreachable = run("status", "-c", config, cwd=tmpdir_short)
        assert unreachable.returncode == 1
    finally:
        stop = run("stop", "-c", config, "--pidfile", pidfile)
    assert stop.returncode == 0 and "stopped" in stop.stdout


def test_start_with_an_app_that_fails_to_import_says_one_line(tmpdir_short):
    config = write_config(tmpdir_short, app="tests.apps.broken:app")
    result = run("start", "-c", config, cwd=tmpdir_short)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Error" in lines[0] and "broken.py:" in lines[0]
    assert f"the traceback is in {tmpdir_short}/logs/error.log" in lines[0]
    with open(os.path.join(tmpdir_short, "logs", "error.log")) as fh:
        assert "Traceback" in fh.read()


def test_an_app_name_that_is_not_there_is_said_in_the_words_of_the_user(tmpdir_short):
    config = write_config(tmpdir_short, app="tests.apps.basic:ap")
    result = run("start", "-c", config, cwd=tmpdir_short)
    assert result.returncode == 1
    assert "cannot load app tests.apps.basic:ap: module 'tests.apps.basic' has no attribute " \
           "'ap'" in result.stderr
    assert "prefork.worker" not in result.stderr


def test_check_exits_2_on_a_config_error_and_flags_are_blamed_as_flags(tmpdir_short):
    bad = os.path.join(tmpdir_short, "bad.toml")
    with open(bad, "w") as fh:
        fh.write("[server]\nworkers = 'many'\n")
    result = run("check", "-c", bad)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    config = write_config(tmpdir_short)
    flag = run("start", "-c", config, "--workers", "0", cwd=tmpdir_short)
    assert flag.returncode == 2 and "--workers: must be between 1 and 128" in flag.stderr
    assert config not in flag.stderr


def test_status_into_a_closed_pipe_is_quiet(server):
    result = subprocess.run(f"{sys.executable} {PREFORK} status -c {server.config} | head -c 10",
                            shell=True, capture_output=True, text=True, timeout=30)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


def test_reopen_says_what_it_did(server):
    result = server.cli("reopen")
    assert result.returncode == 0 and result.stdout.strip() == "prefork: log files reopened"


def test_an_upgrade_that_cannot_start_fails_at_once_with_the_reason(server):
    with open(server.config) as fh:
        text = fh.read()
    with open(server.config, "w") as fh:
        fh.write(text.replace('app = "tests.apps.basic:app"', 'app = "tests.apps.broken:app"'))
    result = server.cli("upgrade", timeout=60)
    assert result.returncode == 1
    assert "upgrade failed" in result.stderr and "Error" in result.stderr
    assert server.get("/").status_code == 200   # the old master keeps serving
    wait_for(lambda: server.status()["server"]["pid"] == server.pid, message="the old master")


def test_the_foreground_error_log_reaches_the_terminal(server):
    server.get("/crash")
    wait_for(lambda: "app error on GET /crash" in server.stderr(), message="the error on stderr")


def test_development_reload_env_chdir_name_and_print_config(tmpdir_short):
    from tests.conftest import Server
    app_file = os.path.join(tmpdir_short, "devapp.py")
    source = ('import os\n'
              'def app(environ, start_response):\n'
              '    start_response("200 OK", [("Content-Type", "text/plain")])\n'
              '    return [("%s " + os.environ["GREETING"] + " " + os.getcwd()).encode()]\n')
    with open(app_file, "w") as fh:
        fh.write(source % "v1")
    os.makedirs(os.path.join(tmpdir_short, "work"))
    config = write_config(tmpdir_short, app="devapp:app",
                          extra='[env]\nGREETING = "hello"\n')
    text = open(config).read().replace(
        'pythonpath = [', f'chdir = "work"\nname = "shop"\npythonpath = ["{tmpdir_short}", ')
    with open(config, "w") as fh:
        fh.write(text)
    printed = run("start", "-c", config, "--print-config", "--reload", cwd=tmpdir_short)
    assert printed.returncode == 0
    assert 'reload_on_change = true   # flag --reload' in printed.stdout
    assert 'name = "shop"   # file' in printed.stdout and "backlog = 2048   # default" in printed.stdout
    server = Server(tmpdir_short, config, args=("--reload",)).wait_ready()
    try:
        body = server.get("/").text
        assert body == f"v1 hello {os.path.join(tmpdir_short, 'work')}"
        import psutil
        titles = {" ".join(p.cmdline()).strip() for p in [psutil.Process(server.pid)]
                  + psutil.Process(server.pid).children()}
        assert "prefork: master [shop]" in titles and "prefork: worker 0 [shop]" in titles
        with open(app_file, "w") as fh:
            fh.write(source % "v2")
        os.utime(app_file, ns=(1, 10**18))   # a surely different mtime
        wait_for(lambda: server.get("/").text.startswith("v2"), timeout=20, message="v2 served")
    finally:
        server.stop(graceful=False)
        server.kill_all()


def test_a_users_app_keeps_its_url_space_unless_told_otherwise(tmpdir_short):
    from tests.conftest import Server
    config = os.path.join(tmpdir_short, "user.toml")
    with open(config, "w") as fh:
        fh.write(f'[server]\nbind = ["127.0.0.1:0"]\napp = "tests.apps.flask_app:app"\n'
                 f'pythonpath = ["{os.path.dirname(os.path.dirname(os.path.dirname(__file__)))}"]\n'
                 f'pidfile = "p.pid"\n[logging]\naccess_log = "a.log"\nerror_log = "e.log"\n')
    server = Server(tmpdir_short, config).wait_ready()
    try:
        assert "app tests.apps.flask_app:app at /, listening on" in server.stdout()
        assert "status at" not in server.stdout() and "static files at" not in server.stdout()
        assert server.get("/_status").status_code == 404          # Flask's own 404
        # prefork's own stylesheet would be here if its static files were mounted
        assert server.get("/static/style.css").status_code == 404
    finally:
        server.stop(graceful=False)
        server.kill_all()


def test_access_log_dash_goes_to_stdout_in_the_foreground(make_server):
    server = make_server(args=("--access-log", "-"))
    server.get("/hello?from=stdout")
    wait_for(lambda: '"GET /hello?from=stdout HTTP/1.1" 200' in server.stdout(),
             message="the access line on stdout")


def test_silent_control_clients_never_keep_status_from_answering(server):
    """Connections to the control socket that send nothing are read without
    blocking the master and dropped after their second; status still answers."""
    silent = []
    try:
        for _ in range(20):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(os.path.join(server.dir, "prefork.sock"))
            silent.append(sock)
        result = server.cli("status", timeout=30)
        assert result.returncode == 0 and "generation 1" in result.stdout
        assert server.status()["server"]["state"] == "running"
        sock = silent[-1]
        sock.settimeout(10)
        assert b"bad control request" in sock.recv(4096)   # dropped, with a word
    finally:
        for sock in silent:
            sock.close()


def test_from_another_directory_stop_says_where_it_looked_and_which_master_runs(server, tmp_path):
    """No -c, so the default pidfile relative to another directory: no master
    there. Exit 1 (not 0 while the server keeps running), and the master that
    does run is named with what reaches it."""
    for command in ("stop", "reload", "status"):
        result = run(command, cwd=tmp_path)
        assert result.returncode == 1, (command, result.stdout)
        assert f"no live master in {tmp_path}" in result.stderr
        assert f"runs as pid {server.pid} " in result.stderr
        # (its config, as it answers status; its pidfile if it is too busy to)
        assert f"add -c {server.config}" in result.stderr \
            or f"add --pidfile {server.dir}/prefork.pid" in result.stderr, result.stderr
    assert server.get("/").status_code == 200   # still serving


def test_restart_keeps_the_flags_start_was_given(tmpdir_short):
    config = write_config(tmpdir_short)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = run("start", "-c", config, "--bind", f"127.0.0.1:{port}", "--workers", "1",
                  cwd=tmpdir_short)
    assert started.returncode == 0, started.stderr
    try:
        restarted = run("restart", "-c", config, cwd=tmpdir_short)
        assert restarted.returncode == 0, restarted.stderr
        assert f"127.0.0.1:{port}" in restarted.stdout
        status = run("status", "-c", config, "--json", cwd=tmpdir_short)
        shown = json.loads(status.stdout)
        assert shown["pool"]["target"] == 1 and shown["server"]["listeners"] == [
            f"http://127.0.0.1:{port}"]
    finally:
        run("stop", "-c", config, "--fast", cwd=tmpdir_short)
