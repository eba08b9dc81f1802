"""Mutual TLS: what the gateway tells the backend about the client certificate
(CONTRACT §6), computed once per connection after the handshake.  Pure: takes the
certificate and OpenSSL's verdict, returns header values.

`X-Client-Cert-Verify` follows nginx's `$ssl_client_verify` (which Azure's
`client_certificate_verification` variable mirrors): `SUCCESS`, `FAILED:<reason>`,
`NONE`.  Names are RFC 4514 strings; non-ASCII characters are escaped as `\\XX` UTF-8
bytes (RFC 4514 §2.4) so every value is a valid header value.  `Not-After` is in
OpenSSL's format (`Jan  2 03:04:05 2030 GMT`, like nginx's `$ssl_client_v_end`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes

__all__ = ["NO_CERTIFICATE", "ClientCertInfo", "describe", "normalize_dn"]

_SPLIT = re.compile(r"(?<!\\)[,+]")


def normalize_dn(text: str) -> frozenset[tuple[str, str]]:
    """An RFC 4514 distinguished name as a set of (TYPE, value) with the type upper-cased,
    the value case-folded and spaces around separators ignored: the allowed-issuer check
    is then insensitive to attribute order and spelling variants.  ValueError when an
    element has no `=`."""
    parts: set[tuple[str, str]] = set()
    for element in _SPLIT.split(text):
        kind, equals, value = element.partition("=")
        if not equals or not kind.strip():
            raise ValueError(f"not an RFC 4514 distinguished name: {text!r}")
        parts.add((kind.strip().upper(), value.strip().casefold()))
    return frozenset(parts)


def _ascii(text: str) -> str:
    if text.isascii():
        return text
    return "".join(c if c.isascii() else "".join(f"\\{b:02X}" for b in c.encode()) for c in text)


@dataclass(frozen=True, slots=True)
class ClientCertInfo:
    verify: str  # SUCCESS | FAILED:<reason> | NONE
    fingerprint: str = ""
    subject: str = ""
    issuer: str = ""
    not_after: str = ""

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """The `X-Client-Cert-*` fields; only Verify when no certificate was presented."""
        fields = [(b"X-Client-Cert-Verify", self.verify)]
        if self.fingerprint:
            fields += [
                (b"X-Client-Cert-Fingerprint", self.fingerprint),
                (b"X-Client-Cert-Subject", self.subject),
                (b"X-Client-Cert-Issuer", self.issuer),
                (b"X-Client-Cert-Not-After", self.not_after),
            ]
        return tuple((name, value.encode("ascii")) for name, value in fields)


NO_CERTIFICATE = ClientCertInfo("NONE")


def describe(cert: x509.Certificate | None, verify_error: str | None,
             allowed_issuers: frozenset[frozenset[tuple[str, str]]] = frozenset()
             ) -> ClientCertInfo:
    """The client certificate as the backend will see it.  `verify_error` is OpenSSL's
    reason (None when the chain verified); an issuer outside `allowed_issuers` (when
    given) fails as `issuer_not_allowed`."""
    if cert is None:
        return NO_CERTIFICATE
    issuer = cert.issuer.rfc4514_string()
    if verify_error is None and allowed_issuers and normalize_dn(issuer) not in allowed_issuers:
        verify_error = "issuer_not_allowed"
    return ClientCertInfo(
        verify="SUCCESS" if verify_error is None else "FAILED:" + _ascii(verify_error),
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
        subject=_ascii(cert.subject.rfc4514_string()),
        issuer=_ascii(issuer),
        not_after=cert.not_valid_after_utc.strftime("%b %e %H:%M:%S %Y GMT"),
    )
