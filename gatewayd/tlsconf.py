"""pyOpenSSL contexts built from the config, before the workers fork.

Server contexts are built in the master so that every worker inherits the same session
ticket keys (OpenSSL draws them in SSL_CTX_new): a session issued by one worker resumes
on another.  Client (backend) contexts are built here too, once per backend setting.

Backend verification is recorded, never enforced inside the handshake (SSL_VERIFY_NONE):
`gatewayd.trust.check_backend` decides after the handshake and before the first request
byte, which gives every failure the same shape and a precise reason.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL, crypto
from OpenSSL._util import lib as _lib  # only for SSL_CTX_set1_curves_list, see set_groups

from gatewayd import policies
from gatewayd.model import BackendSettings, Listener, SslPolicy
from gatewayd.routing import BindRouter

_VERSIONS = {
    "TLSv1.0": SSL.TLS1_VERSION,
    "TLSv1.1": SSL.TLS1_1_VERSION,
    "TLSv1.2": SSL.TLS1_2_VERSION,
    "TLSv1.3": SSL.TLS1_3_VERSION,
}
ALPN_HTTP11 = b"http/1.1"
# X25519MLKEM768 first where OpenSSL has it; never X448 or P-521 (ssl-policies.md).
GROUPS_PREFERRED = b"X25519MLKEM768:X25519:P-256:P-384"
GROUPS_FALLBACK = b"X25519:P-256:P-384"
SESSION_ID_CONTEXT = b"gatewayd"


class SNIRejected(Exception):
    """Raised from the SNI callback to abort a handshake with a fatal alert (require_sni).
    pyOpenSSL reports callback exceptions to sys.excepthook; the worker filters this one."""


def set_groups(ctx: SSL.Context) -> str:
    """Offer only the key-exchange groups TLS scanners accept; returns the list in use.
    pyOpenSSL has no public call for this, so use the binding's SSL_CTX_set1_curves_list
    (an alias of set1_groups_list) and keep OpenSSL's default if it is ever missing."""
    setter = getattr(_lib, "SSL_CTX_set1_curves_list", None)
    if setter is None:
        return "openssl-default"
    raw = ctx._context
    for groups in (GROUPS_PREFERRED, GROUPS_FALLBACK):
        if setter(raw, groups) == 1:
            return groups.decode()
    return "openssl-default"


def _load_chain(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def _apply_policy(ctx: SSL.Context, policy: SslPolicy) -> None:
    ctx.set_min_proto_version(_VERSIONS[policy.min_protocol])
    ctx.set_max_proto_version(_VERSIONS[policy.max_protocol])
    tls12 = policies.openssl_cipher_string(policy)
    if tls12:
        ctx.set_cipher_list(tls12.encode())
    tls13 = policies.openssl_tls13_string(policy)
    if tls13:
        ctx.set_tls13_ciphersuites(tls13.encode())


def _alpn_select(conn: SSL.Connection, offered: list[bytes]) -> bytes | Any:
    """HTTP/2 is not served yet: pick http/1.1 or carry on without ALPN."""
    return ALPN_HTTP11 if ALPN_HTTP11 in offered else SSL.NO_OVERLAPPING_PROTOCOLS


def server_context(listener: Listener) -> SSL.Context:
    """A context serving one listener's certificate under its policy."""
    assert listener.certificate is not None and listener.ssl_policy is not None
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_options(
        SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION
    )
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)  # idle keep-alive connections hold no buffers
    _apply_policy(ctx, listener.ssl_policy)
    set_groups(ctx)
    chain = _load_chain(listener.certificate.certificate_pem)
    ctx.use_certificate(crypto.X509.from_cryptography(chain[0]))
    for extra in chain[1:]:
        ctx.add_extra_chain_cert(crypto.X509.from_cryptography(extra))
    key = load_pem_private_key(listener.certificate.private_key_pem, password=None)
    ctx.use_privatekey(crypto.PKey.from_cryptography_key(key))  # type: ignore[arg-type]
    ctx.check_privatekey()
    ctx.set_session_id(SESSION_ID_CONTEXT)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    ctx.set_alpn_select_callback(_alpn_select)
    return ctx


@dataclass(frozen=True, slots=True)
class BindTLS:
    """The contexts of one https bind: `accept_context` starts every handshake, and its
    SNI callback switches to the listener whose host names match."""

    accept_context: SSL.Context
    by_listener: dict[str, SSL.Context]


def bind_tls(router: BindRouter) -> BindTLS | None:
    https = [lst for lst in router.listeners if lst.protocol == "https"]
    if not https:
        return None
    by_listener = {lst.name: server_context(lst) for lst in https}
    default = router.certificate_listener(None)
    assert default is not None
    accept = server_context(default)  # its own object: the callback must be set before use
    accept.set_tlsext_servername_callback(_sni_switcher(router, by_listener))
    return BindTLS(accept_context=accept, by_listener=by_listener)


def _sni_switcher(
    router: BindRouter, by_listener: dict[str, SSL.Context]
) -> Callable[[SSL.Connection], None]:
    def on_servername(conn: SSL.Connection) -> None:
        raw = conn.get_servername()
        sni = raw.decode("ascii", "replace") if raw else None
        chosen = router.listener_for_sni(sni) if sni else None
        if chosen is None:
            fallback = router.certificate_listener(None)
            if fallback is not None and fallback.require_sni:
                raise SNIRejected(sni or "")
            return
        conn.set_context(by_listener[chosen.name])

    return on_servername


def client_context(settings: BackendSettings) -> SSL.Context:
    """A context for connections to one backend setting's servers (CONTRACT §4)."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    ctx.set_min_proto_version(_VERSIONS[settings.min_protocol])
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    set_groups(ctx)
    # Record the chain verdict; trust.check_backend enforces it after the handshake.
    ctx.set_verify(SSL.VERIFY_NONE)
    if settings.trusted_roots_pem:
        store = ctx.get_cert_store()
        assert store is not None
        for root in _load_chain(settings.trusted_roots_pem):
            store.add_cert(crypto.X509.from_cryptography(root))
    elif not settings.pins:
        paths = ssl.get_default_verify_paths()
        ctx.load_verify_locations(paths.cafile, paths.capath)
    ctx.set_alpn_protos([ALPN_HTTP11])
    return ctx


def verify_result(conn: SSL.Connection) -> int:
    """OpenSSL's recorded chain verdict (X509_V_OK = 0) for a finished handshake."""
    return int(_lib.SSL_get_verify_result(conn._ssl))
