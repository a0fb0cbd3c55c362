"""Static files, templates, the built-in site and a real Flask app."""
import gzip
import os
import socket
import sys

import pytest
import requests

from tests.conftest import ROOT, Server, read_until_close, shared_server, wait_for


def make_files(tmp_path):
    root = tmp_path / "public"
    (root / "sub").mkdir(parents=True)
    (root / "hello.txt").write_text("hello static\n")
    (root / "data.bin").write_bytes(bytes(range(256)) * 4096)   # 1 MiB
    (root / "sub" / "index.html").write_text("<p>sub index</p>")
    (root / "app.js").write_text("console.log('plain');\n")
    (root / "app.js.gz").write_bytes(gzip.compress(b"console.log('gzipped');\n"))
    (root / "index.html").write_text("<p>static home</p>")
    (tmp_path / "secret.txt").write_text("outside the root")
    os.symlink(tmp_path / "secret.txt", root / "escape.txt")
    os.symlink(root / "hello.txt", root / "inside-link.txt")
    (root / "é.txt").write_text("accented\n")
    os.mkfifo(root / "pipe.txt")
    return root


@pytest.fixture
def files(tmp_path):
    return make_files(tmp_path)


def static_settings(root):
    return {"extra": f'[static]\nroot = "{root}"\ncache_control = "public, max-age=60"\n'}


@pytest.fixture(scope="module")
def static_server(tmp_path_factory):
    """Shared by the tests that only read the files (they change nothing)."""
    with shared_server(**static_settings(make_files(tmp_path_factory.mktemp("static")))) as server:
        yield server


def test_get_and_head_with_validators(static_server):
    response = static_server.get("/static/hello.txt")
    assert response.text == "hello static\n"
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.headers["Content-Length"] == "13"
    assert response.headers["Cache-Control"] == "public, max-age=60"
    assert response.headers["ETag"].startswith('"') and "Last-Modified" in response.headers
    head = requests.head(static_server.url + "/static/hello.txt", timeout=5)
    assert head.headers["Content-Length"] == "13" and head.content == b""


def test_conditional_requests_give_304(static_server):
    first = static_server.get("/static/hello.txt")
    etag, modified = first.headers["ETag"], first.headers["Last-Modified"]
    assert static_server.get("/static/hello.txt", headers={"If-None-Match": etag}).status_code == 304
    assert static_server.get("/static/hello.txt",
                             headers={"If-Modified-Since": modified}).status_code == 304
    assert static_server.get("/static/hello.txt",
                             headers={"If-None-Match": '"other"'}).status_code == 200


def test_ranges(static_server):
    data = bytes(range(256)) * 4096
    part = static_server.get("/static/data.bin", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    tail = static_server.get("/static/data.bin", headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == data[-10:]
    bad = static_server.get("/static/data.bin", headers={"Range": f"bytes={len(data)}-"})
    assert bad.status_code == 416 and bad.headers["Content-Range"] == f"bytes */{len(data)}"
    multi = static_server.get("/static/data.bin", headers={"Range": "bytes=0-1,5-6"})
    assert multi.status_code == 200 and len(multi.content) == len(data)


def test_keep_alive_survives_a_sendfile_response(static_server):
    with static_server.connect() as sock:
        for _ in range(2):
            sock.sendall(b"GET /static/hello.txt HTTP/1.1\r\nHost: t\r\n\r\n")
            reply = b""
            while not reply.endswith(b"hello static\n"):
                data = sock.recv(65536)
                assert data, "the server closed a keep-alive connection"
                reply += data
            assert b"Connection: close" not in reply


def test_whole_large_file_via_sendfile(static_server):
    assert static_server.get("/static/data.bin").content == bytes(range(256)) * 4096


def test_a_large_file_to_a_slow_reader_does_not_block_the_worker(make_server, files):
    (files / "big.bin").write_bytes(b"x" * 30 * 1024 * 1024)
    server = make_server(workers=1, extra=f'[static]\nroot = "{files}"\n')
    with server.connect() as lazy:
        lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        lazy.sendall(b"GET /static/big.bin HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_for(lambda: server.status()["totals"]["connections_open"] >= 1, timeout=5,
                 message="the lazy connection counted")
        for _ in range(5):   # answered while 30 MiB wait for the lazy reader
            assert server.get("/static/hello.txt").text == "hello static\n"


def test_precompressed_sibling(static_server):
    zipped = static_server.raw(b"GET /static/app.js HTTP/1.1\r\nHost: t\r\n"
                               b"Accept-Encoding: gzip\r\nConnection: close\r\n\r\n")
    head, _, body = zipped.partition(b"\r\n\r\n")
    assert b"Content-Encoding: gzip" in head and b"Vary: Accept-Encoding" in head
    assert gzip.decompress(body) == b"console.log('gzipped');\n"
    plain = static_server.raw(b"GET /static/app.js HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert b"Content-Encoding" not in plain and plain.endswith(b"console.log('plain');\n")
    assert b"Vary: Accept-Encoding" in plain


def test_directory_gives_its_index_or_404(static_server):
    assert static_server.get("/static/sub/").text == "<p>sub index</p>"
    assert static_server.get("/static/sub").text == "<p>sub index</p>"
    assert static_server.get("/static/missing/").status_code == 404


@pytest.mark.parametrize("target", [
    b"/static/../secret.txt", b"/static/%2e%2e/secret.txt", b"/static/%2E%2E/secret.txt",
    b"/static/sub/../../secret.txt", b"/static/..%2fsecret.txt", b"/static/..%5csecret.txt",
    b"/static/..\\secret.txt", b"/static/hello.txt%00.png", b"/static//etc/passwd",
    b"/static/escape.txt", b"/static/%2fetc%2fpasswd",
])
def test_nothing_outside_the_root(static_server, target):
    reply = static_server.raw(b"GET " + target + b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    status = int(reply.split()[1])
    assert status in (400, 404), reply[:200]
    assert b"outside the root" not in reply and b"root:" not in reply


def test_symlink_inside_the_root_is_served(static_server):
    assert static_server.get("/static/inside-link.txt").text == "hello static\n"


def test_post_to_a_static_file_is_405(static_server):
    response = requests.post(static_server.url + "/static/hello.txt", timeout=5)
    assert response.status_code == 405 and response.headers["Allow"] == "GET, HEAD"


def test_the_app_keeps_a_root_page_it_has(static_server):
    assert static_server.get("/").text == "hello"   # tests.apps.basic answers / itself


def test_root_falls_back_to_static_index_when_the_app_answers_404(make_server, files):
    server = make_server(app="tests.apps.no_root:app", extra=f'[static]\nroot = "{files}"\n')
    assert server.get("/").text == "<p>static home</p>"
    assert server.get("/other").text == "other page"
    assert server.get("/missing").text == "app 404"   # only / falls back


# -- the built-in site and templates ---------------------------------------------------

@pytest.fixture(scope="module")
def site():
    with shared_server(app="prefork.apps.site:app") as server:
        yield server


def test_site_pages(site):
    home = site.get("/")
    assert home.status_code == 200 and 'href="/_status"' in home.text
    assert 'href="/static/style.css"' in home.text
    assert site.get("/static/style.css").headers["Content-Type"].startswith("text/css")
    request_page = site.get("/request", headers={"X-Probe": "<probe>"})
    assert "X-Probe" in request_page.text and "&lt;probe&gt;" in request_page.text   # escaped
    assert "worker pid" in request_page.text
    assert "Hello, bob &amp; co!" in site.get("/hello/bob%20&%20co").text
    info = site.get("/api/info?x=1").json()
    assert info["server"] == "prefork" and info["query"] == {"x": "1"}


def test_site_404_and_405_use_the_error_template(site):
    missing = site.get("/nope")
    assert missing.status_code == 404 and "<h1>404 Not Found</h1>" in missing.text
    assert "<style>" in missing.text and "/static/" not in missing.text   # asks nothing more
    wrong = requests.delete(site.url + "/api/info", timeout=5)
    assert wrong.status_code == 405 and "GET" in wrong.headers["Allow"]


def test_operator_overrides_a_page_and_a_broken_template_falls_back(make_server, tmp_path):
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "error.html").write_text("<h1>custom {{ status }}</h1>")
    (templates / "home.html").write_text("{% broken")
    server = make_server(app="prefork.apps.site:app", extra=f'[site]\ntemplates = "{templates}"\n')
    assert server.get("/nope").text == "<h1>custom 404</h1>"
    home = server.get("/")
    assert home.status_code == 200 and "prefork" in home.text   # the plain built-in page
    wait_for(lambda: "template home.html failed" in server.log("error"), message="why, logged")


def test_parser_errors_use_the_error_template(site):
    reply = site.raw(b"GET / HTTP/1.1\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400") and b"<h1>400 Bad Request</h1>" in reply
    assert b"<style>" in reply and b"/static/" not in reply


# -- a real Flask app ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def flask_server():
    with shared_server(app="tests.apps.flask_app:app") as server:
        yield server


def test_flask_routing_and_methods(flask_server):
    assert flask_server.get("/").text == "flask index"
    assert flask_server.get("/items/7").json() == {"id": 7, "method": "GET"}
    assert requests.delete(flask_server.url + "/items/7", timeout=5).json()["method"] == "DELETE"


def test_flask_form_post(flask_server):
    response = requests.post(flask_server.url + "/form", timeout=5,
                             data={"name": "Ada", "tag": ["a", "b"]})
    assert response.json() == {"name": "Ada", "tags": ["a", "b"]}


def test_flask_file_upload(flask_server):
    payload = b"\x89PNG" + os.urandom(3 * 1024 * 1024)   # above the spool threshold
    response = requests.post(flask_server.url + "/upload", timeout=20,
                             files={"file": ("pic.png", payload)})
    assert response.json() == {"filename": "pic.png", "size": len(payload),
                               "head": payload[:8].decode("latin-1")}


def test_flask_streamed_response(flask_server):
    reply = flask_server.raw(b"GET /stream HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in reply
    assert flask_server.get("/stream").text == "part 0\npart 1\npart 2\n"


def test_flask_reads_request_stream_in_chunks(flask_server):
    response = requests.post(flask_server.url + "/chunks", data=b"z" * 25000, timeout=5)
    assert response.json() == {"total": 25000, "reads": 25}


def test_flask_error_handlers(flask_server):
    missing = flask_server.get("/nope")
    assert missing.status_code == 404 and missing.json() == {"error": "custom not found"}
    failed = flask_server.get("/fail")
    assert failed.status_code == 500 and failed.text == "custom server error page"
    wait_for(lambda: "flask view failed" in flask_server.log("error"), message="Flask's traceback")


def test_a_cached_small_file_is_served_fresh_after_it_changes(make_server, files):
    static_server = make_server(**static_settings(files))
    assert static_server.get("/static/hello.txt").text == "hello static\n"
    (files / "hello.txt").write_text("changed and longer\n")
    wait_for(lambda: static_server.get("/static/hello.txt").text == "changed and longer\n",
             timeout=5, message="the new content")
    (files / "hello.txt").unlink()
    wait_for(lambda: static_server.get("/static/hello.txt").status_code == 404, timeout=5,
             message="a 404 for the removed file")


def test_python_m_prefork_serves_the_built_in_site_from_any_directory(tmpdir_short):
    """What an installed prefork does: the demo site, its stylesheet and the
    status page come from the package's own assets, not from a checkout."""
    config = os.path.join(tmpdir_short, "only.toml")
    with open(config, "w") as fh:
        fh.write('[server]\nbind = ["127.0.0.1:0"]\nworkers = 1\npidfile = "p.pid"\n'
                 '[logging]\naccess_log = "a.log"\nerror_log = "e.log"\n')
    server = Server(tmpdir_short, config, command=(sys.executable, "-m", "prefork"))
    try:
        server.wait_ready()
        home = server.get("/")
        assert home.status_code == 200 and "/static/style.css" in home.text
        css = server.get("/static/style.css")
        assert css.status_code == 200 and css.headers["Content-Type"].startswith("text/css")
        status = server.get("/_status")
        assert status.status_code == 200 and "<table" in status.text
    finally:
        server.stop(graceful=False)
        server.kill_all()


def test_only_regular_files_are_served_and_a_fifo_never_blocks(static_server):
    assert static_server.get("/static/pipe.txt", timeout=10).status_code == 404   # no read: no block
    assert static_server.get("/static/hello.txt").status_code == 200


def test_non_ascii_names_are_reachable_and_a_file_is_not_a_directory(static_server):
    response = static_server.get("/static/%C3%A9.txt")
    assert response.status_code == 200 and response.text == "accented\n"
    assert static_server.get("/static/hello.txt/").status_code == 404


@pytest.mark.parametrize("header", ["bytes=\u0663-5", "bytes=0-" + "9" * 4400, "bytes=" + "9" * 4400 + "-"])
def test_an_odd_range_is_ignored_or_unsatisfiable_never_a_500(static_server, header):
    with static_server.connect() as sock:
        sock.sendall(b"GET /static/hello.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\nRange: "
                     + header.encode("utf-8") + b"\r\n\r\n")
        status = read_until_close(sock).split(b" ", 2)[1]
    assert status in (b"200", b"206", b"416")


def test_a_django_apps_collected_static_files_are_served_under_static(make_server, tmp_path):
    """README's recipe: Django's collectstatic into a directory, [static] root
    on it; the admin's stylesheet comes from prefork, not from Django."""
    pytest.importorskip("django")
    import subprocess
    collected = tmp_path / "collected"
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="tests.apps.django_site.settings",
               DJANGO_STATIC_ROOT=str(collected), DJANGO_DB=str(tmp_path / "db.sqlite3"))
    done = subprocess.run([sys.executable, "-m", "django", "collectstatic", "--noinput"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    server = make_server(app="tests.apps.django_site.wsgi:application",
                         extra=f'[static]\nenabled = true\nroot = "{collected}"\n'
                               f'[env]\nDJANGO_DB = "{tmp_path / "db.sqlite3"}"\n'
                               'DJANGO_SETTINGS_MODULE = "tests.apps.django_site.settings"\n')
    login = server.get("/admin/login/")
    assert login.status_code == 200 and "/static/admin/css/base.css" in login.text
    css = server.get("/static/admin/css/base.css")
    assert css.status_code == 200 and css.headers["Content-Type"].startswith("text/css")
    assert css.content == (collected / "admin" / "css" / "base.css").read_bytes()
