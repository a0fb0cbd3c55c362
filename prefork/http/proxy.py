"""What a proxy in front says about the client: the PROXY protocol header
(v1 text, v2 binary, as HAProxy and nginx send it) and the forwarding
headers (X-Forwarded-For, X-Forwarded-Proto, RFC 7239 Forwarded). No I/O.

Owns: parsing both, and the rule for which peers are believed (Networks): a
header is only ever believed from a trusted peer, and the client is the
rightmost address of a forwarding chain that is not itself trusted (the
leftmost entries were written by whoever sent the request, so they prove
nothing). Must not: touch sockets; the connection decides when to ask.
"""
from __future__ import annotations

import ipaddress
import socket
import struct

from .errors import BadRequest

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107   # the longest v1 line, CRLF included (the spec's figure)


class BadProxyHeader(BadRequest):
    """A connection that must start with a PROXY header did not."""


class Networks:
    """A list of networks, and "unix" for unix-socket peers: [proxy] trusted
    (whose forwarding headers are believed) and [status] allow."""

    def __init__(self, entries):
        self.unix = "unix" in entries
        self.networks = [ipaddress.ip_network(e, strict=False) for e in entries if e != "unix"]

    def __bool__(self):
        return self.unix or bool(self.networks)

    def peer(self, address: str) -> bool:
        """Is this peer (an IP text, or "" for a unix-socket peer) trusted?"""
        if address == "":
            return self.unix
        return self.address(address)

    def address(self, text: str) -> bool:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)


def parse_proxy_header(data: bytes):
    """-> None when more bytes are needed, else (bytes consumed, (client
    address, client port) or None for LOCAL/UNKNOWN). Raises BadProxyHeader."""
    if data[:1] == b"P":
        if len(data) < 6:
            return None if b"PROXY "[:len(data)] == data else _bad("not a PROXY header")
        if not data.startswith(b"PROXY "):
            _bad("not a PROXY header")
        end = data.find(b"\r\n", 0, V1_MAX)
        if end < 0:
            return None if len(data) < V1_MAX else _bad("PROXY v1 line too long")
        return end + 2, _v1(data[6:end].split(b" "))
    if data[:1] == b"\r":
        if len(data) < 16:
            return None if V2_SIGNATURE[:len(data)] == data[:12] else _bad("not a PROXY header")
        if not data.startswith(V2_SIGNATURE):
            _bad("not a PROXY header")
        ver_cmd, family, length = struct.unpack("!BBH", data[12:16])
        if ver_cmd >> 4 != 2:
            _bad("PROXY v2: unknown version")
        if len(data) < 16 + length:
            return None
        return 16 + length, _v2(ver_cmd & 0x0F, family, data[16:16 + length])
    _bad("not a PROXY header")


def _v1(fields):
    if fields[:1] == [b"UNKNOWN"]:
        return None
    if len(fields) != 5 or fields[0] not in (b"TCP4", b"TCP6"):
        _bad("PROXY v1: malformed line")
    try:
        address = ipaddress.ip_address(fields[1].decode("ascii"))
        port = int(fields[3])
    except (ValueError, UnicodeDecodeError):
        _bad("PROXY v1: malformed address")
    if (address.version == 4) != (fields[0] == b"TCP4") or not 0 <= port <= 65535:
        _bad("PROXY v1: malformed address")
    return str(address), str(port)


def _v2(command, family, body):
    if command == 0:      # LOCAL: the proxy's own connection (health checks)
        return None
    if command != 1:
        _bad("PROXY v2: unknown command")
    if family >> 4 == 1 and len(body) >= 12:
        return socket.inet_ntop(socket.AF_INET, body[:4]), str(struct.unpack("!H", body[8:10])[0])
    if family >> 4 == 2 and len(body) >= 36:
        return socket.inet_ntop(socket.AF_INET6, body[:16]), str(struct.unpack("!H", body[32:34])[0])
    return None           # unix or unspecified: no address to give


def _bad(why):
    raise BadProxyHeader(why)


def forwarded_client(environ: dict, trusted: Networks):
    """(client address or None, scheme or None) from the forwarding headers
    of a request that came from a trusted peer."""
    forwarded = environ.get("HTTP_FORWARDED")
    if forwarded is not None:
        chain, protos = [], []
        for element in forwarded.split(","):
            for pair in element.split(";"):
                key, _, value = pair.strip().partition("=")
                value = value.strip().strip('"')
                if key.lower() == "for":
                    chain.append(_strip_port(value))
                elif key.lower() == "proto":
                    protos.append(value.lower())
        return _client(chain, trusted), (protos[-1] if protos else None)
    chain = [part.strip() for part in environ.get("HTTP_X_FORWARDED_FOR", "").split(",")
             if part.strip()]
    proto = environ.get("HTTP_X_FORWARDED_PROTO")
    return _client(chain, trusted), (proto.split(",")[-1].strip().lower() if proto else None)


def _strip_port(value):
    if value.startswith("["):   # "[2001:db8::1]:4711"
        return value[1:].partition("]")[0]
    host, sep, port = value.rpartition(":")
    return host if sep and port.isdigit() and host.count(":") == 0 else value


def _client(chain, trusted):
    """The rightmost entry that is not a trusted proxy."""
    for entry in reversed(chain):
        if not trusted.address(entry):
            return entry if _is_ip(entry) else None
    return chain[0] if chain and _is_ip(chain[0]) else None


def _is_ip(text):
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
