"""What is known about one request, gathered as its exchange proceeds, and turned into an
access-log line and metric counts when it ends (one place, so the log and the metrics
never disagree)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from gatewayd import forwarding
from gatewayd.rewrites import CompiledRewriteSet, RequestVariables
from gatewayd.routing import Route

from .accesslog import AccessLog
from .http1 import RequestHead
from .stats import Stats

if TYPE_CHECKING:
    from .proxy import Connection

CODE_CLASS = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx", "6xx", "7xx", "8xx", "9xx")


def handshake_error_reason(openssl_reason: str) -> str:
    """A short, bounded label from OpenSSL's reason string ("wrong version number" →
    "wrong_version_number"); plain HTTP on a TLS port reads "http_request"."""
    text = openssl_reason.lower()
    for needle, label in _HANDSHAKE_REASONS:
        if needle in text:
            return label
    return "other"


_HANDSHAKE_REASONS = (
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
        self.uri = head.target.decode("latin-1") if head else ""
        self.status = 0
        self.backend_status = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.backend_connect_time: float | None = None
        self.backend_first_byte_time: float | None = None
        self.error_info = ""
        # Set by the gateway for the client (affinity cookies, rewrites); see _send_response.
        self.add_response_headers: list[tuple[bytes, bytes]] = []
        self.upgrade = False  # a websocket upgrade was passed on to the backend
        self.redirect = ""  # the Location of a redirect answered by the gateway
        # The route's rewrite set and the request's variables, when it rewrites responses.
        self.rewrite: tuple[CompiledRewriteSet, RequestVariables] | None = None

    def set_route(self, route: Route) -> None:
        self.rule = route.rule.name
        self.path_rule = route.path_rule.name if route.path_rule else ""
        self.backend_pool = route.backend_pool
        self.backend_settings = route.backend_settings

    def finish(self, log: AccessLog, stats: Stats) -> None:
        head, conn = self.head, self.conn
        now = time.time()
        stats.request_done(self.listener or conn.listener_label, self.rule, self.backend_pool,
                           self.status, now - self.started)
        if not log.enabled:
            return
        user_agent = ""
        if head is not None:
            for name, value in head.headers:
                if name.lower() == b"user-agent":
                    user_agent = value.decode("latin-1")
                    break
        cert = conn.client_cert if conn.bind.router.has_client_auth else None
        log.write({
            "time": _timestamp(self.started),
            "request_id": self.request_id,
            "client_ip": conn.client_ip,
            "client_port": conn.client_port,
            "listener": self.listener,
            "rule": self.rule,
            "path_rule": self.path_rule,
            "backend_pool": self.backend_pool,
            "backend_settings": self.backend_settings,
            "backend": self.backend,
            "method": head.method.decode("latin-1") if head else "",
            "uri": self.uri,
            "host": head.host.decode("latin-1") if head else "",
            "http_version": head.version.decode() if head else "",
            "status": self.status,
            "backend_status": self.backend_status,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "duration": round(now - self.started, 6),
            "backend_connect_time": _round(self.backend_connect_time),
            "backend_first_byte_time": _round(self.backend_first_byte_time),
            "tls_protocol": conn.tls_protocol,
            "tls_cipher": conn.tls_cipher,
            "sni": conn.sni or "",
            "user_agent": user_agent,
            "error_info": self.error_info,
            "redirect_location": self.redirect,
            "client_cert_verify": cert.verify if cert is not None else "",
            "client_cert_subject": cert.subject if cert is not None else "",
            "client_cert_issuer": cert.issuer if cert is not None else "",
            "client_cert_fingerprint": cert.fingerprint if cert is not None else "",
        }, self.started)


_second: list[Any] = [-1, ""]  # the last whole second formatted, and its text


def _timestamp(started: float) -> str:
    """ISO 8601 with milliseconds, UTC; strftime runs once a second, not per request."""
    second = int(started)
    if second != _second[0]:
        _second[0], _second[1] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_second[1]}.{int(started % 1 * 1000):03d}Z"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
