"""Life behind a proxy, in-process: which peers are believed, the forwarding
headers, the PROXY protocol (v1 and v2), bytes in and the environ out."""
import socket
import struct

import pytest

from prefork.http.proxy import BadProxyHeader, Networks, forwarded_client, parse_proxy_header
from tests.unit.test_connection import Pair
from tests.unit.test_protocol_corpus import echo_environ, exchange


def seen_by_app(data, **settings):
    pair = Pair(echo_environ, family=socket.AF_INET, **settings)
    pair.send(data)
    out = pair.read_all()
    return out, pair


def test_trusted_peers():
    trusted = Networks(("10.0.0.0/8", "unix"))
    assert trusted.peer("10.1.2.3") and trusted.peer("") and trusted.peer("::ffff:10.0.0.1")
    assert not trusted.peer("192.0.2.1") and not Networks(("10.0.0.0/8",)).peer("")
    assert not Networks(())


@pytest.mark.parametrize("headers,expected", [
    ({"HTTP_X_FORWARDED_FOR": "203.0.113.9"}, ("203.0.113.9", None)),
    # the client may write anything on the left: the rightmost untrusted entry is the client
    ({"HTTP_X_FORWARDED_FOR": "1.1.1.1, 203.0.113.9, 10.0.0.5"}, ("203.0.113.9", None)),
    ({"HTTP_X_FORWARDED_FOR": "10.0.0.7, 10.0.0.5"}, ("10.0.0.7", None)),
    ({"HTTP_X_FORWARDED_FOR": "not-an-ip"}, (None, None)),
    ({"HTTP_X_FORWARDED_PROTO": "https"}, (None, "https")),
    ({"HTTP_FORWARDED": 'for=192.0.2.60;proto=https;by=10.0.0.1, for="[2001:db8::1]:4711"'},
     ("2001:db8::1", "https")),
    ({"HTTP_FORWARDED": "for=198.51.100.17:8080", "HTTP_X_FORWARDED_FOR": "1.2.3.4"},
     ("198.51.100.17", None)),   # the standard header wins
])
def test_forwarding_headers(headers, expected):
    assert forwarded_client(headers, Networks(("10.0.0.0/8",))) == expected


def test_forwarding_headers_are_believed_from_a_trusted_peer_only():
    request = (b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.9\r\n"
               b"X-Forwarded-Proto: https\r\nConnection: close\r\n\r\n")
    out, _ = seen_by_app(request, trusted=("127.0.0.0/8",))
    assert b'"REMOTE_ADDR": "203.0.113.9"' in out
    out, _ = seen_by_app(request)   # nobody trusted
    assert b'"REMOTE_ADDR": "127.0.0.1"' in out
    _, seen, _ = exchange(request, trusted=("unix",))   # a unix-socket proxy
    assert seen[0]["REMOTE_ADDR"] == "203.0.113.9"


V2_TCP4 = (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", 12)
           + socket.inet_aton("198.51.100.7") + socket.inet_aton("10.0.0.2")
           + struct.pack("!HH", 51000, 80))


@pytest.mark.parametrize("data,expected", [
    (b"PROXY TCP4 198.51.100.7 10.0.0.2 51000 80\r\nGET", (43, ("198.51.100.7", "51000"))),
    (b"PROXY TCP6 2001:db8::7 2001:db8::2 51000 80\r\n", (45, ("2001:db8::7", "51000"))),
    (b"PROXY UNKNOWN\r\n", (15, None)),
    (b"PROXY TCP4 198.51", None),                      # more bytes needed
    (V2_TCP4 + b"GET", (28, ("198.51.100.7", "51000"))),
    (V2_TCP4[:10], None),
    (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00, 0, 0]), (16, None)),   # LOCAL
])
def test_proxy_headers(data, expected):
    assert parse_proxy_header(data) == expected


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n", b"PROXY TCP4 999.1.1.1 1.1.1.1 1 2\r\n",
                                  b"PROXY TCP4 ::1 ::1 1 2\r\n", b"PROXY " + b"x" * 200])
def test_bad_proxy_headers(data):
    with pytest.raises(BadProxyHeader):
        parse_proxy_header(data)


def test_the_proxy_protocol_names_the_client_split_anywhere():
    pair = Pair(echo_environ, family=socket.AF_INET, trusted=("127.0.0.0/8",), proxy_protocol=True)
    data = b"PROXY TCP4 198.51.100.7 10.0.0.2 51000 80\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"
    for i in range(len(data)):
        pair.send(data[i:i + 1])
    assert b'"REMOTE_ADDR": "198.51.100.7"' in pair.read_all()


def test_the_proxy_protocol_is_refused_from_an_untrusted_peer_and_without_a_header():
    untrusted = Pair(echo_environ, family=socket.AF_INET, proxy_protocol=True)
    untrusted.send(b"PROXY TCP4 198.51.100.7 10.0.0.2 51000 80\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert untrusted.read_all() == b"" and untrusted.conn.state == "closed"
    missing = Pair(echo_environ, family=socket.AF_INET, trusted=("127.0.0.0/8",), proxy_protocol=True)
    missing.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert missing.read_all() == b"" and missing.conn.state == "closed"
