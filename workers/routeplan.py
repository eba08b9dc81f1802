"""What routing decided for one request, and the per-bind cache that remembers it.

Routing (gatewayd/routing.py) is a pure function of the generation's config: the same
(Host, SNI, request-target) always reaches the same listener, rule, path rule and backend
settings.  So a bind remembers the outcome as a `RoutePlan`, together with what follows
from it alone (the URI sent to the backend, the Host it is sent with), and a repeated
request skips target normalisation, the Host/SNI lookup, the path match and the URI
rewriting.  No I/O here: the proxy calls `plan_route` and acts on the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from gatewayd.backendpath import override_path
from gatewayd.model import Listener
from gatewayd.redirects import CompiledRedirect
from gatewayd.rewrites import CompiledRewriteSet
from gatewayd.routing import BindRouter, Router, Target, normalize_target
from gatewayd.tlsconf import BindTLS

from .http1 import RequestHead
from .record import RequestRecord
from .upstream import UpstreamPool

ROUTE_CACHE_SIZE: Final = 2048  # (Host, SNI, target) → route entries kept per bind
ROUTE_CACHE_KEY_BYTES: Final = 512  # longer targets are routed every time, not remembered


@dataclass(slots=True, frozen=True)
class RoutePlan:
    """What routing decided for one (Host, SNI, target), and what follows from it alone:
    the URI sent to the backend (after a path override) and what the backend settings say.

    The names and values every request reads are copied out of the config objects here,
    once per plan: `Listener`, `Route` and `BackendSettings` are plain Python objects, and
    compiled code reads their attributes by a generic lookup (~90 instructions each, some
    fifteen a request), where a plan's fields are C struct members."""

    target: Target
    listener: Listener
    uri: str  # the backend's request-target, as the access log shows it
    uri_bytes: bytes
    listener_name: str
    rule_name: str
    path_rule_name: str  # "" when no path rule matched
    backend_pool: str
    backend_settings: str
    request_timeout: float  # the settings' (0.0 for a redirect)
    host_name: bytes  # the settings' host_name as sent in Host:, b"" for none
    pick_host_name: bool  # the settings' pick_host_name_from_backend_address
    redirect: CompiledRedirect | None
    rewrites: CompiledRewriteSet | None


@dataclass(slots=True)
class BindContext:
    """What a connection accepted on one bind needs: its routing and TLS contexts.

    `routes` remembers what routing decided for recent (Host, SNI, target) triples
    (see `plan_route`)."""

    port: int
    router: BindRouter
    tls: BindTLS | None
    routes: dict[tuple[bytes, str | None, bytes], RoutePlan] = field(default_factory=dict)
    #: the metrics label of a connection no SNI names a listener for: the listener whose
    #: certificate answers without SNI, else the bind's first (found once, not per connection)
    default_label: str = ""

    def __post_init__(self) -> None:
        if not self.default_label:
            default = self.router.certificate_listener(None) or self.router.listeners[0]
            self.default_label = default.name


def plan_route(bind: BindContext, router: Router, upstreams: UpstreamPool,
               head: RequestHead, sni: str | None, record: RequestRecord) -> RoutePlan:
    """Routing (CONTRACT §5) for one request, remembered per bind.  A RoutingError
    (404, 421...) is raised, never remembered (re-raising one exception object would grow
    its traceback); `record.listener` is set first, so that a 404 for "no rule" still
    names its listener."""
    key = (head.host, sni, head.target)
    routes = bind.routes
    found = routes.get(key)
    if found is not None:
        return found
    target = normalize_target(head.target)
    listener = bind.router.select(head.host.decode("latin-1"), sni)
    record.listener = listener.name
    route = router.route(listener, target.path)
    settings = None  # a redirect has no backend
    path = target.path
    if route.redirect is None:
        settings = upstreams.settings(route.backend_settings)
        if settings.path:
            path = override_path(path, settings.path,
                                 route.path_rule.paths if route.path_rule else ())
    uri = path + ("?" + target.query if target.query else "")
    found = RoutePlan(
        target, listener, uri, uri.encode("latin-1"), listener.name,
        route.rule.name, route.path_rule.name if route.path_rule else "",
        route.backend_pool, route.backend_settings,
        settings.request_timeout if settings is not None else 0.0,
        idna_name(settings.host_name) if settings is not None and settings.host_name else b"",
        settings is not None and settings.pick_host_name_from_backend_address,
        route.redirect, route.rewrites)
    if len(head.target) <= ROUTE_CACHE_KEY_BYTES:
        if len(routes) >= ROUTE_CACHE_SIZE:
            routes.clear()
        routes[key] = found
    return found


_IDNA: Final[dict[str, bytes]] = {}  # configured host names, encoded: the codec is pure Python


def idna_name(name: str) -> bytes:
    """A configured name (host_name, a server's host) as sent in Host: encoded once, not
    on every request (the "idna" codec costs thousands of instructions a call)."""
    encoded = _IDNA.get(name)
    if encoded is None:
        encoded = _IDNA[name] = name.encode("idna")  # config names only: bounded
    return encoded
