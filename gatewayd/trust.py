"""The backend trust decision of CONTRACT §4, as a pure function.

The data plane completes the TLS handshake with OpenSSL's verification set to "record,
don't abort" (SSL_VERIFY_NONE + SSL_get_verify_result), then asks `check_backend` whether
the peer may receive the request.  Deciding after the handshake, before any request byte,
gives one code path for every failure and a precise reason for logs and metrics.

Rules (no switch turns them off):
- pins given: the leaf's SubjectPublicKeyInfo SHA-256 must be in the set; if roots are also
  given, the chain and the name must verify too;
- else trusted roots (or the system store when none): chain and name must verify.
"""

from __future__ import annotations

import ipaddress

from cryptography import x509
from service_identity import VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)

from gatewayd.model import BackendSettings
from gatewayd.pins import format_pin, pin_matches, spki_sha256

# X509_V_ERR_* codes from OpenSSL's x509_vfy.h that mean "outside the validity period".
_X509_V_OK = 0
_VALIDITY_ERRORS = {9, 10}  # CERT_NOT_YET_VALID, CERT_HAS_EXPIRED


class TrustFailure(Exception):
    """The backend's certificate is not acceptable; `reason` is a §10 failure reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def sni_for(settings: BackendSettings, server_host: str, client_host: str) -> str:
    """The name sent as SNI and verified: sni_name > host_name > the server's host name
    (with pick_host_name_from_backend_address) > the client's Host (port stripped).
    The caller never sends an IP literal as SNI (RFC 6066 §3) but still verifies it."""
    if settings.sni_name:
        return settings.sni_name
    if settings.host_name:
        return settings.host_name
    if settings.pick_host_name_from_backend_address:
        return server_host
    return strip_port(client_host)


def sni_from_request(settings: BackendSettings) -> bool:
    """Whether `sni_for` takes the name from the client's Host (else it is fixed per
    server), so a pool can key its idle connections by server alone."""
    return not (settings.sni_name or settings.host_name
                or settings.pick_host_name_from_backend_address)


def strip_port(host: str) -> str:
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def check_backend(
    settings: BackendSettings,
    leaf: x509.Certificate | None,
    verify_result: int,
    verify_name: str,
) -> None:
    """Raise TrustFailure unless the backend may be sent the request."""
    if leaf is None:
        raise TrustFailure("tls_handshake", "backend sent no certificate")
    if settings.pins:
        digest = spki_sha256(leaf)
        if not pin_matches(digest, settings.pins):
            allowed = ", ".join(sorted(format_pin(p) for p in settings.pins))
            raise TrustFailure("pin_mismatch", f"got {format_pin(digest)}, allowed [{allowed}]")
        if not settings.trusted_roots_pem:
            return
    if verify_result != _X509_V_OK:
        reason = "expired" if verify_result in _VALIDITY_ERRORS else "untrusted_chain"
        raise TrustFailure(reason, f"certificate verify error {verify_result}")
    check_name(leaf, verify_name)


def check_name(leaf: x509.Certificate, name: str) -> None:
    if not name:
        raise TrustFailure("name_mismatch", "no name to verify the backend against")
    try:
        if is_ip_literal(name):
            verify_certificate_ip_address(leaf, name.strip("[]"))
        else:
            verify_certificate_hostname(leaf, name)
    except VerificationError as exc:
        raise TrustFailure("name_mismatch", f"certificate is not valid for {name!r}") from exc
    except Exception as exc:  # service_identity raises on certificates without SANs
        raise TrustFailure("name_mismatch", f"certificate has no usable names: {exc}") from exc
