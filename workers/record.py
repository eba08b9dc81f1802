"""What is known about one request, gathered as its exchange proceeds, and turned into an
access-log line and metric counts when it ends (one place, so the log and the metrics
never disagree)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

from gatewayd import forwarding
from gatewayd.rewrites import CompiledRewriteSet, RequestVariables

from .accesslog import AccessLog
from .http1 import RequestHead
from .stats import Stats

if TYPE_CHECKING:
    from .proxy import Connection


def handshake_error_reason(openssl_reason: str) -> str:
    """A short, bounded label from OpenSSL's reason string ("wrong version number" →
    "wrong_version_number"); plain HTTP on a TLS port reads "http_request"."""
    text = openssl_reason.lower()
    for needle, label in _HANDSHAKE_REASONS:
        if needle in text:
            return label
    return "other"


_HANDSHAKE_REASONS: Final = (
    ("http request", "http_request"),
    ("unsupported protocol", "unsupported_protocol"),
    ("wrong version", "wrong_version_number"),
    ("version too low", "unsupported_protocol"),
    ("no shared cipher", "no_shared_cipher"),
    ("no suitable signature", "no_shared_cipher"),
    ("servername", "sni_rejected"),
    ("callback", "sni_rejected"),
    ("unexpected eof", "unexpected_eof"),
    ("alert", "client_alert"),
    ("record", "bad_record"),
    ("packet length", "bad_record"),
)


class RequestRecord:
    """The access-log fields of one request, filled in as the exchange proceeds."""

    __slots__ = (
        "add_response_headers",
        "backend",
        "backend_connect_time",
        "backend_first_byte_time",
        "backend_pool",
        "backend_settings",
        "backend_status",
        "bytes_received",
        "bytes_sent",
        "conn",
        "error_info",
        "head",
        "listener",
        "path_rule",
        "redirect",
        "request_id",
        "rewrite",
        "rule",
        "started",
        "status",
        "upgrade",
        "uri",
    )

    def __init__(self, conn: Connection, head: RequestHead | None) -> None:
        self.conn = conn
        self.head = head
        self.request_id = forwarding.new_request_id()
        self.started = time.time()
        self.listener = self.rule = self.path_rule = ""
        self.backend_pool = self.backend_settings = self.backend = ""
        self.uri = ""  # the backend's request-target once routed; see uri_text()
        self.status = 0
        self.backend_status = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.backend_connect_time: float | None = None
        self.backend_first_byte_time: float | None = None
        self.error_info = ""
        # Set by the gateway for the client (affinity cookies, rewrites); see exchange.py.
        self.add_response_headers: list[tuple[bytes, bytes]] = []
        self.upgrade = False  # a websocket upgrade was passed on to the backend
        self.redirect = ""  # the Location of a redirect answered by the gateway
        # The route's rewrite set and the request's variables, when it rewrites responses.
        self.rewrite: tuple[CompiledRewriteSet, RequestVariables] | None = None

    def uri_text(self) -> str:
        """The URI for the log: the one sent to the backend, else the client's target."""
        if self.uri or self.head is None:
            return self.uri
        return self.head.target.decode("latin-1")

    def set_route(self, listener: str, rule: str, path_rule: str, backend_pool: str,
                  backend_settings: str) -> None:
        """What routing chose, as names (the proxy's route plan holds them ready)."""
        self.listener = listener
        self.rule = rule
        self.path_rule = path_rule
        self.backend_pool = backend_pool
        self.backend_settings = backend_settings

    def finish(self, log: AccessLog, stats: Stats) -> None:
        head, conn = self.head, self.conn
        now = time.time()
        stats.request_done(self.listener or conn.listener_label, self.rule, self.backend_pool,
                           self.status, now - self.started)
        if not log.enabled:
            return
        user_agent = method = host = version = ""
        if head is not None:
            # The usual method and version as constants: no decode, and the log's cache
            # of quoted values finds a constant by its remembered hash.
            method = "GET" if head.method == b"GET" else head.method.decode("latin-1")
            host = head.host.decode("latin-1")
            version = "1.1" if head.version == b"1.1" else head.version.decode("latin-1")
            for name, value in head.headers:
                if len(name) == 10 and name.lower() == b"user-agent":  # no lower() per field
                    user_agent = value.decode("latin-1")
                    break
        cert_verify = cert_subject = cert_issuer = cert_fingerprint = ""
        if conn.bind.router.has_client_auth:
            cert = conn.client_cert
            cert_verify, cert_subject = cert.verify, cert.subject
            cert_issuer, cert_fingerprint = cert.issuer, cert.fingerprint
        log.write((  # logline.FIELDS, in that order
            self.started, self.request_id, conn.client_ip, conn.client_port,
            self.listener, self.rule, self.path_rule, self.backend_pool,
            self.backend_settings, self.backend, method, self.uri_text(), host, version,
            self.status, self.backend_status, self.bytes_received, self.bytes_sent,
            now - self.started, self.backend_connect_time, self.backend_first_byte_time,
            conn.tls_protocol, conn.tls_cipher, conn.sni or "", user_agent,
            self.error_info, self.redirect, cert_verify, cert_subject, cert_issuer,
            cert_fingerprint,
        ), conn.log_memo)
