"""pyOpenSSL contexts built from the config, before the workers fork.

Server contexts are built in the master so that every worker inherits the same session
ticket keys (OpenSSL draws them in SSL_CTX_new): a session issued by one worker resumes
on another.  Client (backend) contexts are built here too, once per backend setting.

Backend verification is recorded, never enforced inside the handshake (SSL_VERIFY_NONE):
`gatewayd.trust.check_backend` decides after the handshake and before the first request
byte, which gives every failure the same shape and a precise reason.
"""

from __future__ import annotations

import hashlib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib  # only for SSL_CTX_set1_curves_list, see set_groups

from gatewayd import policies
from gatewayd.clientcert import normalize_dn
from gatewayd.model import BackendSettings, CertificateFile, Listener, SslPolicy
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
    # cryptography's objects directly: pyOpenSSL deprecated its X509 and PKey here (24.3)
    ctx.use_certificate(chain[0])
    for extra in chain[1:]:
        ctx.add_extra_chain_cert(extra)
    key = load_pem_private_key(listener.certificate.private_key_pem, password=None)
    ctx.use_privatekey(key)  # type: ignore[arg-type]
    ctx.check_privatekey()
    ctx.set_session_id(_session_id_context(listener))
    ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    ctx.set_alpn_select_callback(_alpn_select)
    if listener.client_auth != "none":
        _require_client_certificates(ctx, listener)
    if listener.ocsp_response:
        ctx.set_ocsp_server_callback(_staple, listener.ocsp_response)
    return ctx


def _session_id_context(listener: Listener) -> bytes:
    """A mutual-TLS listener gets its own session id context, so that a session (or
    ticket) from a handshake without its client-certificate check never resumes on it
    (OpenSSL refuses resumption across contexts: SSL_CTX_set_session_id_context(3))."""
    if listener.client_auth == "none":
        return SESSION_ID_CONTEXT
    digest = hashlib.sha256(f"{listener.name}/{listener.client_auth}".encode()).digest()
    return SESSION_ID_CONTEXT + b"/" + digest[:20]


def _staple(conn: SSL.Connection, der: bytes | None) -> bytes:
    """OCSP stapling: OpenSSL asks only when the client sent status_request (RFC 6066
    §8); the response was read and checked at load."""
    return der or b""


@dataclass(frozen=True, slots=True)
class ClientVerify:
    """A listener's client-certificate verification, applied to a connection when the
    SNI callback switches to the listener's context: OpenSSL's SSL_set_SSL_CTX keeps
    the verify mode of the context the handshake started with (nginx re-applies it the
    same way in its servername callback)."""

    mode: int
    callback: Callable[[SSL.Connection, crypto.X509, int, int, int], bool]
    store: crypto.X509Store | None = None  # the client CAs, for optional mode's verdict

    def verdict(self, conn: SSL.Connection) -> str | None:
        """None when the client's chain verifies against the client CAs, else OpenSSL's
        reason.  Recomputed from the peer chain (not taken from the handshake) because
        optional mode accepts every certificate in the callback, which makes OpenSSL
        record success, and a resumed session would carry that verdict along."""
        peer = conn.get_peer_certificate()
        if self.store is None or peer is None or self.mode & SSL.VERIFY_FAIL_IF_NO_PEER_CERT:
            return None  # required: the handshake already refused anything else
        chain = conn.get_peer_cert_chain() or []
        try:
            crypto.X509StoreContext(self.store, peer, chain[1:]).verify_certificate()
        except crypto.X509StoreContextError as exc:
            return verify_error_string(int(exc.errors[0])) if exc.errors else str(exc)
        return None


def client_verify(listener: Listener) -> ClientVerify:
    """VERIFY_PEER for optional and required mutual TLS; required also fails the
    handshake without a (valid) certificate.  Optional records the verdict instead:
    the callback accepts anything and OpenSSL keeps the chain's error for
    `verify_result`, which becomes `X-Client-Cert-Verify: FAILED:<reason>`."""
    if listener.client_auth == "none":
        return ClientVerify(SSL.VERIFY_NONE, _accept_any)
    if listener.client_auth == "optional":
        store = crypto.X509Store()
        for ca in _load_chain(listener.client_ca_pem):
            store.add_cert(crypto.X509.from_cryptography(ca))
        _lib.X509_STORE_set_purpose(store._store, _lib.X509_PURPOSE_SSL_CLIENT)
        return ClientVerify(SSL.VERIFY_PEER, _accept_any, store)
    allowed = frozenset(normalize_dn(text) for text in listener.client_allowed_issuers)

    def required(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int,
                 ok: int) -> bool:
        if not ok:
            return False
        if depth == 0 and allowed:
            issuer = cert.to_cryptography().issuer.rfc4514_string()
            return normalize_dn(issuer) in allowed
        return True

    return ClientVerify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, required)


def _accept_any(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int,
                ok: int) -> bool:
    return True


def _require_client_certificates(ctx: SSL.Context, listener: Listener) -> None:
    """Trust `client_ca` for client chains and name its CAs in the CertificateRequest
    (RFC 8446 §4.2.4 certificate_authorities), so clients pick the right certificate."""
    store = ctx.get_cert_store()
    assert store is not None
    for ca in _load_chain(listener.client_ca_pem):
        store.add_cert(crypto.X509.from_cryptography(ca))
        ctx.add_client_ca(ca)
    verify = client_verify(listener)
    ctx.set_verify(verify.mode, verify.callback)
    ctx.set_verify_depth(8)


def verify_error_string(code: int) -> str:
    """OpenSSL's text for an X509_V_ERR_* code ("certificate has expired")."""
    return str(_ffi.string(_lib.X509_verify_cert_error_string(code)).decode("ascii", "replace"))


@dataclass(frozen=True, slots=True)
class BindTLS:
    """The contexts of one https bind: `accept_context` starts every handshake (and
    owns the session cache and ticket keys: OpenSSL keeps using the first context for
    them), and its SNI callback switches every connection to its listener's context in
    `by_listener` — the SNI match, else the fallback listener.  Because the switch
    always happens, replacing an entry of `by_listener` (certificate hot reload)
    changes what new handshakes get while open connections keep their context."""

    accept_context: SSL.Context
    by_listener: dict[str, SSL.Context]
    verify: dict[str, ClientVerify]
    switcher: SNISwitcher


def bind_tls(router: BindRouter) -> BindTLS | None:
    https = [lst for lst in router.listeners if lst.protocol == "https"]
    if not https:
        return None
    by_listener = {lst.name: server_context(lst) for lst in https}
    verify = {lst.name: client_verify(lst) for lst in https}
    default = router.certificate_listener(None)
    assert default is not None
    accept = server_context(default)  # its own object: the callback must be set before use
    switcher = SNISwitcher(router, by_listener, verify, verify[default.name].mode)
    accept.set_tlsext_servername_callback(switcher)
    return BindTLS(accept_context=accept, by_listener=by_listener, verify=verify,
                   switcher=switcher)


#: server names whose SNI decision is remembered per bind (names are client-chosen: the
#: memo is emptied when full rather than grown)
SNI_MEMO_SIZE: Final = 256


@dataclass(frozen=True, slots=True)
class SNIChoice:
    """What the SNI callback decided for one ClientHello, left on the connection
    (pyOpenSSL's app data) so the proxy need not ask OpenSSL and the router again:
    `sni` is the name as text (None without SNI), `matched` the listener it names
    (None: no match, the bind's default listener serves it), `context` the listener
    whose context serves the handshake (None: no https listener, nothing switched)."""

    sni: str | None
    matched: str | None
    context: str | None


class SNISwitcher:
    """The servername callback of a bind's accept context.

    OpenSSL runs it for every ClientHello, with or without SNI (final_server_name in
    ssl/statem/extensions.c).  Switching the context does not switch the connection's
    verify mode (it was copied from the accept context by SSL_new), so the mode is set
    too, unless both are "no client certificate": pyOpenSSL builds a new callback
    trampoline for every set_verify.  The decision depends only on the name (the router
    is fixed for a worker's life), so it is remembered by the name's bytes in `memo`;
    the context and verify mode are looked up at each handshake, since a certificate hot
    reload replaces them."""

    __slots__ = ("accept_mode", "by_listener", "memo", "router", "verify")

    def __init__(self, router: BindRouter, by_listener: dict[str, SSL.Context],
                 verify: dict[str, ClientVerify], accept_mode: int) -> None:
        self.router = router
        self.by_listener = by_listener
        self.verify = verify
        self.accept_mode = accept_mode
        self.memo: dict[bytes | None, SNIChoice] = {}

    def __call__(self, conn: SSL.Connection) -> None:
        raw = conn.get_servername()
        choice = self.memo.get(raw)
        if choice is None:
            choice = self.choose(raw)
            if len(self.memo) >= SNI_MEMO_SIZE:
                self.memo.clear()
            self.memo[raw] = choice
        conn.set_app_data(choice)
        name = choice.context
        if name is None:
            return
        conn.set_context(self.by_listener[name])
        mode = self.verify[name]
        if mode.mode != SSL.VERIFY_NONE or self.accept_mode != SSL.VERIFY_NONE:
            conn.set_verify(mode.mode, mode.callback)

    def choose(self, raw: bytes | None) -> SNIChoice:
        """The router's decision for a server name (SNIRejected: refuse the handshake)."""
        sni = raw.decode("ascii", "replace") if raw else None
        chosen = self.router.listener_for_sni(sni) if sni else None
        matched = chosen.name if chosen is not None else None
        if chosen is None or chosen.protocol != "https":
            chosen = self.router.certificate_listener(None)
            if chosen is None:
                return SNIChoice(sni, matched, None)
            if chosen.require_sni:
                raise SNIRejected(sni or "")
        return SNIChoice(sni, matched, chosen.name)


def check_certificate_pair(listener: Listener, certificate: CertificateFile) -> SSL.Context:
    """A context for `listener` with a new certificate/key pair (hot reload), or
    ValueError saying why the pair is unusable: the old context stays in service then."""
    from gatewayd import config_certs as certs  # the loader's checks, same messages

    try:
        chain = certs.load_pem_chain(certificate.certificate_pem, certificate.certificate_path)
        certs.check_leaf_first(chain, certificate.certificate_path)
        key = certs.load_private_key(certificate.private_key_pem, certificate.private_key_path)
        certs.check_key_matches(key, chain[0], certificate.private_key_path,
                                certificate.certificate_path)
    except certs.FileProblem as exc:
        raise ValueError(str(exc)) from None
    end = certs.not_after(chain[0])
    if end.timestamp() <= time.time():
        raise ValueError(f"certificate {certificate.certificate_path!r} expired on {end}")
    try:
        return server_context(replace(listener, certificate=certificate))
    except (SSL.Error, crypto.Error) as exc:
        raise ValueError(f"OpenSSL refused the pair: {exc}") from None


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
