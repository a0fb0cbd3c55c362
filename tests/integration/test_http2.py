"""HTTP/2 against real clients (curl, nghttp, h2load, httpx) and raw frames:
ALPN h2 on TLS listeners, prior knowledge in cleartext from trusted peers,
streams of one connection served at once, graceful GOAWAY, and the known
floods, each done to the real server, which goes on serving."""
import os
import shutil
import socket
import ssl
import subprocess
import time

import hpack
import pytest
import requests
from hyperframe.frame import (ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame,
                              PingFrame, RstStreamFrame, SettingsFrame)

from tests.conftest import shared_server, wait_for

trustme = pytest.importorskip("trustme")
httpx = pytest.importorskip("httpx")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
NO_ERROR, PROTOCOL_ERROR, CANCEL, REFUSED_STREAM, ENHANCE_YOUR_CALM = 0, 1, 8, 7, 11


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {name: str(directory / f"{name}.pem") for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(paths["ca"])
    cert.cert_chain_pems[0].write_to_path(paths["cert"])
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(paths["cert"], append=True)
    cert.private_key_pem.write_to_path(paths["key"])
    return paths


@pytest.fixture(scope="module")
def server(pki):
    """One server for the module: a plain listener that takes cleartext
    HTTP/2 from 127.0.0.1 (trusted) and an https one that offers h2."""
    extra = (f'[tls]\ncertfile = "{pki["cert"]}"\nkeyfile = "{pki["key"]}"\n'
             '[http2]\ncleartext = true\n[proxy]\ntrusted = ["127.0.0.1/32"]\n'
             '[http]\nsend_timeout = 2.0\nkeepalive_timeout = 3.0\n')
    with shared_server(extra=extra, bind='["127.0.0.1:0", "https://127.0.0.1:0"]') as srv:
        srv.tls_url = wait_for(lambda: next(
            (w for w in srv.stdout().split() if w.startswith("https://")), None)).rstrip(",")
        srv.tls_port = int(srv.tls_url.rsplit(":", 1)[1])
        yield srv


def h2_totals(server):
    return server.status()["totals"]["http2"]


# -- a raw client: frames out, frames in -------------------------------------------
class RawH2:
    """A cleartext HTTP/2 connection that sends whatever frames a test makes
    (hyperframe) and reads the server's frames back, every read bounded."""

    def __init__(self, server, source="127.0.0.1", settings=None):
        self.sock = socket.create_connection((server.host, server.port), timeout=10,
                                             source_address=(source, 0))
        self.encoder = hpack.Encoder()
        self.buffer = b""
        hello = SettingsFrame(0)
        hello.settings = settings or {}
        self.sock.sendall(PREFACE + hello.serialize())

    def head(self, path="/", method="GET"):
        return self.encoder.encode([(":method", method), (":scheme", "http"),
                                    (":authority", "example.test"), (":path", path)])

    def request(self, stream_id, path="/", end=True):
        flags = ["END_HEADERS", "END_STREAM"] if end else ["END_HEADERS"]
        return HeadersFrame(stream_id, self.head(path), flags=flags).serialize()

    def send(self, *frames):
        self.sock.sendall(b"".join(f if isinstance(f, bytes) else f.serialize() for f in frames))

    def frames(self, until, timeout=15.0):
        """Frames until until(frame) is true (-> that frame), or the close (-> None)."""
        deadline = time.monotonic() + timeout
        while True:
            while len(self.buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(self.buffer[:9]))
                if len(self.buffer) < 9 + length:
                    break
                frame.parse_body(memoryview(self.buffer[9:9 + length]))
                self.buffer = self.buffer[9 + length:]
                if until(frame):
                    return frame
            left = deadline - time.monotonic()
            assert left > 0, "no such frame in time"
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.buffer += data

    def goaway(self):
        return self.frames(lambda f: isinstance(f, GoAwayFrame))

    def closed(self, timeout=15.0):
        """True once the server has closed the connection."""
        try:
            self.frames(lambda f: False, timeout)
        except (AssertionError, OSError):
            return False
        return True

    def close(self):
        self.sock.close()


def answered_by_another_connection(server):
    with httpx.Client(http2=True, http1=False, timeout=10) as client:
        answer = client.get(server.url + "/")
    return answer.http_version == "HTTP/2" and answer.text == "hello"


# -- negotiation and real clients ------------------------------------------------------
def test_curl_nghttp_and_httpx_speak_h2_over_tls(server, pki):
    curl = shutil.which("curl")
    if curl:
        out = subprocess.run([curl, "-s", "--http2", "--cacert", pki["ca"], "-w",
                              "\n%{http_version}", server.tls_url + "/"],
                             capture_output=True, text=True, timeout=20).stdout
        assert out == "hello\n2"
    with httpx.Client(http2=True, verify=ssl.create_default_context(cafile=pki["ca"]), timeout=10) as client:
        answer = client.get(server.tls_url + "/environ", headers=[
            ("cookie", "a=1"), ("cookie", "b=2"), ("x-thing", "one")])
    assert answer.http_version == "HTTP/2"
    environ = dict(line.split("=", 1) for line in answer.text.splitlines() if "=" in line)
    assert environ["SERVER_PROTOCOL"] == "HTTP/2"
    assert environ["HTTPS"] == "on" and environ["wsgi.url_scheme"] == "https"
    assert environ["HTTP_HOST"] == f"127.0.0.1:{server.tls_port}"   # :authority
    assert environ["HTTP_COOKIE"] == "a=1; b=2"                        # crumbs joined
    assert environ["HTTP_X_THING"] == "one"
    if shutil.which("nghttp"):
        out = subprocess.run(["nghttp", "-nv", server.tls_url + "/"], capture_output=True,
                             text=True, timeout=20).stdout
        assert "recv (stream_id=" in out and ":status: 200" in out
        assert "negotiated protocol: h2" in out
    wait_for(lambda: '"GET /environ HTTP/2" 200' in server.log("access"),
             message="the HTTP/2 request in the access log")


def test_alpn_prefers_h2_and_plain_http11_clients_still_work(server, pki):
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.set_alpn_protocols(["http/1.1", "h2"])   # the client's order does not decide
    with socket.create_connection(("127.0.0.1", server.tls_port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.selected_alpn_protocol() == "h2"
    # A client that offers only HTTP/1.1 (requests) is served as before.
    assert requests.get(server.tls_url + "/", verify=pki["ca"], timeout=10).text == "hello"


def test_cleartext_prior_knowledge_only_from_trusted_peers(server):
    with httpx.Client(http2=True, http1=False, timeout=10) as client:
        answer = client.get(server.url + "/environ")
    assert answer.http_version == "HTTP/2" and "SERVER_PROTOCOL=HTTP/2" in answer.text
    curl = shutil.which("curl")
    if curl:
        out = subprocess.run([curl, "-s", "--http2-prior-knowledge", "-w", "\n%{http_version}",
                              server.url + "/"], capture_output=True, text=True, timeout=20).stdout
        assert out == "hello\n2"
    # 127.0.0.2 is not in [proxy] trusted: its preface is HTTP/1.1 to us, answered 505.
    with socket.create_connection((server.host, server.port), timeout=10,
                                  source_address=("127.0.0.2", 0)) as sock:
        sock.sendall(PREFACE)
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 505 ")


def test_streams_of_one_connection_run_at_once(server, tmp_path):
    """Three streams held in the app do not hold back a fourth on the same connection."""
    flag = tmp_path / "go"
    conn = RawH2(server)
    try:
        conn.send(*(conn.request(sid, f"/hold?{flag}") for sid in (1, 3, 5)))
        conn.send(conn.request(7, "/"))
        first = conn.frames(lambda f: isinstance(f, DataFrame) and "END_STREAM" in f.flags)
        assert first.stream_id == 7 and first.data == b"hello"
        flag.write_text("go")
        done = set()
        conn.frames(lambda f: isinstance(f, DataFrame) and "END_STREAM" in f.flags
                    and (done.add(f.stream_id) or done == {1, 3, 5}))
    finally:
        conn.close()


def test_h2load_many_streams_on_many_connections(server, pki):
    if not shutil.which("h2load"):
        pytest.skip("h2load (Debian's nghttp2-client) is not installed")
    for url in (server.tls_url, server.url):
        out = subprocess.run(["h2load", "-n", "400", "-c", "4", "-m", "10", url + "/"],
                             capture_output=True, text=True, timeout=60).stdout
        assert "400 succeeded, 0 failed" in out, out


def test_a_body_is_read_spooled_and_echoed(server, pki):
    body = os.urandom(300_000)   # past spool_threshold: spooled to a file
    with httpx.Client(http2=True, verify=ssl.create_default_context(cafile=pki["ca"]), timeout=20) as client:
        answer = client.post(server.tls_url + "/echo", content=body)
        assert answer.http_version == "HTTP/2" and answer.content == body
        big = client.get(server.tls_url + "/big?3000000")
        assert len(big.content) == 3_000_000
        assert client.get(server.tls_url + "/crash").status_code == 500


# -- graceful ----------------------------------------------------------------------------
def test_reload_sends_goaway_finishes_in_flight_and_refuses_new_streams(pki, tmp_path):
    extra = '[http2]\ncleartext = true\n[proxy]\ntrusted = ["127.0.0.1/32"]\n'
    with shared_server(extra=extra) as srv:
        flag = tmp_path / "go"
        conn = RawH2(srv)
        try:
            conn.send(conn.request(1, f"/hold?{flag}"))
            wait_for(lambda: srv.running(), message="the held stream running")
            srv.signal(1)   # HUP: the old generation stops gracefully
            goaway = conn.goaway()
            assert goaway.error_code == NO_ERROR and goaway.last_stream_id == 1
            conn.send(conn.request(3, "/"))   # after GOAWAY: refused, safe to retry
            reset = conn.frames(lambda f: isinstance(f, RstStreamFrame))
            assert reset.stream_id == 3 and reset.error_code == REFUSED_STREAM
            flag.write_text("go")
            end = conn.frames(lambda f: isinstance(f, DataFrame) and "END_STREAM" in f.flags)
            assert end.stream_id == 1 and end.data == b"released"
            assert conn.closed()
        finally:
            conn.close()
        assert answered_by_another_connection(srv)


# -- the floods: GOAWAY with its code, the connection closed, others served, counted ------
def attack(server, build, code=ENHANCE_YOUR_CALM, settings=None):
    before = h2_totals(server)["goaways"]
    conn = RawH2(server, settings=settings)
    try:
        try:
            build(conn)
        except (BrokenPipeError, ConnectionResetError):
            pass   # the server had enough and closed
        goaway = conn.goaway()
        assert goaway is not None, "closed without GOAWAY"
        assert goaway.error_code == code
        assert conn.closed()
    finally:
        conn.close()
    assert answered_by_another_connection(server)
    return before


def goaways_counted(server, reason, before):
    wait_for(lambda: h2_totals(server)["goaways"].get(reason, 0) > before.get(reason, 0),
             message=f"a GOAWAY ({reason}) counted in status")


def test_rapid_reset_is_cut(server):
    def build(conn):
        for sid in range(1, 6000, 2):
            conn.send(conn.request(sid), RstStreamFrame(sid, error_code=CANCEL))
    goaways_counted(server, "flood", attack(server, build))


def test_ping_settings_and_empty_data_floods_are_cut(server):
    def pings(conn):
        conn.send(*[PingFrame(0, opaque_data=b"%08d" % i) for i in range(3000)])

    def settings(conn):
        conn.send(*[SettingsFrame(0) for _ in range(3000)])

    def empty_data(conn):
        conn.send(conn.request(1, "/echo", end=False))
        conn.send(*[DataFrame(1, b"") for _ in range(3000)])
    for build in (pings, settings, empty_data):
        goaways_counted(server, "flood", attack(server, build))


def test_continuation_flood_is_cut(server):
    """nghttp2 takes 8 CONTINUATION frames of one block (CVE-2024-27316's class)."""
    def build(conn):
        head = HeadersFrame(1, conn.head())   # no END_HEADERS: CONTINUATION must follow
        conn.send(head)
        for _ in range(200):
            conn.send(ContinuationFrame(1, b"\x00" * 1000))
    goaways_counted(server, "flood", attack(server, build))


def test_a_protocol_error_gets_its_goaway_and_is_counted(server):
    def build(conn):
        conn.send(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")   # DATA on stream 0
    goaways_counted(server, "protocol_error", attack(server, build, PROTOCOL_ERROR))


def test_hpack_bomb_is_cut(server):
    def build(conn):
        # One 4 KiB field put in the dynamic table, then named 40 times by its
        # index (a byte each): about 100 bytes that decode to over 160 KiB.
        block = conn.encoder.encode([(":method", "GET"), (":scheme", "http"),
                                     (":authority", "x"), (":path", "/"),
                                     ("x-bomb", "a" * 4000)])
        block += bytes([0x80 | 62]) * 40
        conn.send(HeadersFrame(1, block, flags=["END_HEADERS", "END_STREAM"]))
    goaways_counted(server, "flood", attack(server, build))


def test_a_zero_window_held_open_is_reset_and_does_not_pin_the_worker(server):
    """The client opens no window (SETTINGS_INITIAL_WINDOW_SIZE 0): past
    send_timeout its stream is reset, and everything else goes on meanwhile."""
    conn = RawH2(server, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 0})
    try:
        conn.send(conn.request(1, "/big?1000000"))
        assert answered_by_another_connection(server)
        reset = conn.frames(lambda f: isinstance(f, RstStreamFrame))
        assert reset.stream_id == 1 and reset.error_code == CANCEL
    finally:
        conn.close()
    assert answered_by_another_connection(server)


def test_stream_ids_run_out_cleanly(server):
    """The last stream id a client may use is answered; a lower one after it
    is not served (nghttp2 ignores a HEADERS it cannot be sure is new, RFC
    9113 5.1.1's case), and the connection and the server go on."""
    last = 2**31 - 1
    conn = RawH2(server)
    try:
        conn.send(conn.request(last))
        end = conn.frames(lambda f: isinstance(f, DataFrame) and "END_STREAM" in f.flags)
        assert end.stream_id == last and end.data == b"hello"
        conn.send(conn.request(1), PingFrame(0, opaque_data=b"reused!!"))
        seen = []   # what comes back until a PING sent a round trip later is answered
        conn.frames(lambda f: seen.append(f) or isinstance(f, PingFrame))
        conn.send(PingFrame(0, opaque_data=b"after!!!"))
        conn.frames(lambda f: seen.append(f) or isinstance(f, PingFrame)
                    and f.opaque_data == b"after!!!")
        assert [f for f in seen if f.stream_id == 1] == [], seen
    finally:
        conn.close()
    assert answered_by_another_connection(server)


# -- frameworks and a browser ---------------------------------------------------------------
H2C = '[http2]\ncleartext = true\n[proxy]\ntrusted = ["127.0.0.1/32"]\n'


def test_flask_and_django_over_h2(tmp_path):
    pytest.importorskip("flask")
    with shared_server(app="tests.apps.flask_app:app", extra=H2C) as srv:
        with httpx.Client(http2=True, http1=False, timeout=10) as client:
            assert client.get(srv.url + "/").text == "flask index"
            assert client.get(srv.url + "/items/7").json() == {"id": 7, "method": "GET"}
            streamed = client.get(srv.url + "/stream")   # an iterator, pulled inline
            assert streamed.http_version == "HTTP/2" and streamed.text == "part 0\npart 1\npart 2\n"
            form = client.post(srv.url + "/form", data={"name": "Ada", "tag": ["a", "b"]})
            assert form.json() == {"name": "Ada", "tags": ["a", "b"]}
    pytest.importorskip("django")
    with shared_server(app="tests.apps.django_site.wsgi:application",
                       extra=H2C + f'[env]\nDJANGO_DB = "{tmp_path / "db.sqlite3"}"\n') as srv:
        with httpx.Client(http2=True, http1=False, timeout=10) as client:
            page = client.get(srv.url + "/form/")
            assert page.http_version == "HTTP/2" and "csrfmiddlewaretoken" in page.text
            sent = client.post(srv.url + "/upload/", content=b"y" * 300_000).json()
            assert sent["received"] == 300_000 and sent["remote"] == "127.0.0.1"


def test_chromium_loads_the_dashboard_over_https_with_h2(server, tmp_path):
    from tests.integration.test_dashboard import CHROMIUM, browse
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    dom = browse(server.tls_url + "/_status", str(tmp_path), "--ignore-certificate-errors",
                 "--dump-dom").stdout
    assert "prefork status" in dom and 'data-updated="' in dom   # its script ran, over h2
    wait_for(lambda: '"GET /_status HTTP/2" 200' in server.log("access")
             and "\"GET /_status?format=json HTTP/2\" 200" in server.log("access"),
             message="Chromium's page and its script's JSON requests, over HTTP/2")


def test_a_body_past_max_body_gets_413_on_its_stream_and_the_connection_goes_on(server):
    conn = RawH2(server)
    try:
        block = conn.encoder.encode([(":method", "POST"), (":scheme", "http"),
                                     (":authority", "x"), (":path", "/echo"),
                                     ("content-length", str(20 * 1024 * 1024))])
        conn.send(HeadersFrame(1, block, flags=["END_HEADERS"]))   # its body would follow
        head = conn.frames(lambda f: isinstance(f, HeadersFrame) and f.stream_id == 1)
        assert hpack.Decoder().decode(head.data)[0] == (":status", "413")
        conn.send(conn.request(3, "/"))   # the same connection serves on
        end = conn.frames(lambda f: isinstance(f, DataFrame) and f.stream_id == 3
                          and "END_STREAM" in f.flags)
        assert end.data == b"hello"
    finally:
        conn.close()
