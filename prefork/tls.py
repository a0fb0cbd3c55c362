"""TLS for listeners written https://HOST:PORT: Python's ssl module (OpenSSL).

Owns: the server's SSLContext as [tls] describes it, what is wrong with the
files in one line (TlsError), and what a finished handshake tells the
environ (mod_ssl's names).
Must not: do I/O on connections (the worker's loop drives each handshake
without blocking) or keep state between generations: each generation makes
its own context in the master before its workers fork, so the workers of
one generation share its session-ticket keys, and a reload reads renewed
certificates.
"""
from __future__ import annotations

import ssl
import time

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
VERIFY = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
# Mozilla's "intermediate" TLS 1.2 suites: forward secrecy and AEAD only.
DEFAULT_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
                   "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
                   "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
                   "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384")
ALPN = ["http/1.1"]
ALPN_H2 = ["h2", "http/1.1"]   # h2 first: chosen when the client offers both
EXPIRY_WARNING_DAYS = 14
DN_NAMES = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
            "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
            "streetAddress": "STREET", "domainComponent": "DC", "userId": "UID"}


class TlsError(Exception):
    """One readable line: which setting, what is wrong."""


def server_context(tls, http2: bool = False) -> ssl.SSLContext:
    """The SSLContext for [tls] (config.TlsConfig), or TlsError; http2:
    offer h2 by ALPN."""
    if not tls.certfile:
        raise TlsError("certfile: an https:// listener needs a certificate")
    if tls.verify_client != "none" and not tls.ca_certs:
        raise TlsError(f'ca_certs: verify_client = "{tls.verify_client}" needs the CA '
                       "certificates to check client certificates against")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = VERSIONS[tls.min_version]
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    try:
        ctx.set_ciphers(tls.ciphers or DEFAULT_CIPHERS)
    except ssl.SSLError:
        raise TlsError(f"ciphers: OpenSSL knows none of {tls.ciphers!r}") from None
    try:
        ctx.load_cert_chain(tls.certfile, tls.keyfile or None, tls.password or None)
    except FileNotFoundError as exc:
        raise TlsError(f"{'keyfile' if exc.filename == tls.keyfile else 'certfile'}: "
                       f"no such file {exc.filename or tls.certfile}") from None
    except ssl.SSLError as exc:
        raise TlsError(f"certfile/keyfile: {describe_load_error(exc, tls)}") from None
    except OSError as exc:
        raise TlsError(f"certfile: cannot read {tls.certfile}: {exc.strerror or exc}") from None
    if tls.ca_certs:
        try:
            ctx.load_verify_locations(cafile=tls.ca_certs)
        except (OSError, ssl.SSLError) as exc:
            raise TlsError(f"ca_certs: cannot load {tls.ca_certs}: "
                           f"{getattr(exc, 'strerror', None) or exc}") from None
    ctx.verify_mode = VERIFY[tls.verify_client]
    ctx.set_alpn_protocols(ALPN_H2 if http2 else ALPN)
    return ctx


def describe_load_error(exc: ssl.SSLError, tls) -> str:
    """OpenSSL's reason, in the operator's words where we know them."""
    reason = (exc.reason or str(exc)).upper()
    if "KEY_VALUES_MISMATCH" in reason:
        return f"the key {tls.keyfile or tls.certfile} does not match the certificate"
    if "BAD_DECRYPT" in reason or "BAD PASSWORD" in reason or "PASSWORD" in reason:
        return "the key cannot be decrypted: wrong or missing [tls] password"
    if "NO_START_LINE" in reason or "PEM" in reason:
        return f"not a PEM certificate and key: {exc.reason or exc}"
    return f"{exc.reason or exc}"


def expiry_warning(certfile: str, now: float | None = None) -> str | None:
    """A line when the certificate has expired or expires within
    EXPIRY_WARNING_DAYS (None otherwise, or when it cannot be read)."""
    try:
        not_after = ssl.cert_time_to_seconds(ssl._ssl._test_decode_cert(certfile)["notAfter"])
    except (OSError, ValueError, KeyError, AttributeError, ssl.SSLError):
        return None
    left = not_after - (time.time() if now is None else now)
    date = time.strftime("%Y-%m-%d", time.gmtime(not_after))
    if left <= 0:
        return f"the certificate {certfile} expired on {date}: clients will refuse it"
    if left < EXPIRY_WARNING_DAYS * 86400:
        return f"the certificate {certfile} expires on {date}, in {left / 86400:.0f} day(s)"
    return None


def environ_facts(sock) -> dict:
    """What a finished handshake adds to each request's environ, with
    mod_ssl's names (the client certificate's only when one was sent)."""
    cipher = sock.cipher()
    facts = {"wsgi.url_scheme": "https", "HTTPS": "on",
             "SSL_PROTOCOL": sock.version() or "", "SSL_CIPHER": cipher[0] if cipher else ""}
    der = sock.getpeercert(binary_form=True)
    if der:
        facts["SSL_CLIENT_CERT"] = ssl.DER_cert_to_PEM_cert(der)
        facts["SSL_CLIENT_VERIFY"] = "SUCCESS"   # OpenSSL failed the handshake otherwise
        subject = sock.getpeercert().get("subject", ())
        facts["SSL_CLIENT_S_DN"] = ",".join(   # RFC 4514: the most specific first
            f"{DN_NAMES.get(k, k)}={v}" for rdn in reversed(subject) for k, v in rdn)
    else:
        facts["SSL_CLIENT_VERIFY"] = "NONE"
    return facts


def failure_reason(exc: Exception) -> str:
    """A short, bounded name for a failed handshake (status counts by it)."""
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").lower()
        if reason == "http_request":
            return "plain_http"
        if "version" in reason or "protocol" in reason:
            return "protocol_version"
        if "certificate" in reason or "unknown_ca" in reason:
            return "client_certificate"
        if "cipher" in reason:
            return "no_shared_cipher"
        return "other"
    return "reset"
