"""The per-worker state every connection of one config generation shares: the settings,
the router, the upstream pool and balancer, the access log and the metrics, the drain
flag, and the request parsers kept for the next connections.  Made by the worker
(workers/worker.py) at boot and on each reload; read by the proxy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gatewayd.model import ServerSettings
from gatewayd.routing import Router

from .accesslog import AccessLog
from .balancer import Balancer
from .http1 import RequestParser, RequestParsers
from .stats import Stats
from .upstream import UpstreamPool


@dataclass(slots=True)
class Runtime:
    """Per-worker state shared by every connection of one config generation."""

    server: ServerSettings
    router: Router
    upstreams: UpstreamPool
    balancer: Balancer
    access_log: AccessLog
    stats: Stats
    draining: bool = False
    idle: set[Any] = field(default_factory=set)  # greenlets waiting for a next request
    # A request target that raises inside the exchange, set from GATEWAYD_FAULT_INJECTION
    # (tests prove that a bug in one request harms nothing else); None in production.
    fault_target: bytes | None = None
    # request parsers kept from ended connections for the next ones (made from `server`)
    parsers: RequestParsers = field(init=False)

    def __post_init__(self) -> None:
        self.parsers = RequestParsers(self._new_parser)

    def _new_parser(self) -> RequestParser:
        limits = self.server
        return RequestParser(
            max_request_line=limits.max_request_line,
            max_header_bytes=limits.max_header_bytes,
            max_headers=limits.max_headers,
            max_body_bytes=limits.max_body_bytes,
        )
