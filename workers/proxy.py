"""One downstream (client) connection: TLS, then request → route → upstream → response,
repeated while the connection is kept alive.

Framing is never passed through: request and response bodies are parsed by llhttp
(`http1`) and re-framed by us (Content-Length kept, chunked re-encoded), so what reaches
either side is unambiguous whatever the other sent.  Bodies are streamed chunk by chunk
with no whole-body buffering; a slow reader stalls its writer (backpressure).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Final

from gevent import getcurrent

from gatewayd import errorpages, forwarding
from gatewayd.backendpath import override_path
from gatewayd.clientcert import NO_CERTIFICATE, ClientCertInfo
from gatewayd.clientcert import describe as describe_client_cert
from gatewayd.forwarding import ForwardContext, gateway_response, upstream_request_head
from gatewayd.model import Listener, ServerSettings
from gatewayd.redirects import CompiledRedirect
from gatewayd.rewrites import CompiledRewriteSet, RequestVariables
from gatewayd.routing import (
    BindRouter,
    Router,
    RoutingError,
    Target,
    normalize_target,
)
from gatewayd.tlsconf import BindTLS, SNIChoice

from .accesslog import AccessLog
from .balancer import Balancer
from .http1 import (
    END,
    Chunk,
    EventQueue,
    HttpError,
    RequestHead,
    RequestParser,
    RequestParsers,
    ResponseHead,
    ResponseParser,
)
from .logline import LineMemo
from .record import RequestRecord, handshake_error_reason
from .stats import Stats
from .tlsio import (
    TLS_HANDSHAKE_RECORD,
    PlainStream,
    Stream,
    StreamClosed,
    StreamTimeout,
    TLSHandshakeFailed,
    TLSStream,
    return_relay_buffer,
    take_relay_buffer,
)
from .upstream import Upstream, UpstreamConnectError, UpstreamError, UpstreamPool
from .websocket import is_websocket_upgrade, splice

# Module constants are Final: compiled, each is a C static, not a lookup in the module's
# dict on every use (docs/architecture.md); the same for this function, called per wait.
_getcurrent: Final = getcurrent
log: Final = logging.getLogger("gatewayd.proxy")
BODY_READ_TIMEOUT: Final = 60.0  # s between two reads of a request body (nginx client_body_timeout)
SEND_TIMEOUT: Final = 60.0  # s a client may take to accept more of a response (nginx send_timeout)
IDEMPOTENT: Final = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))
# A draining worker keeps idle keep-alive connections this long: a request already on its
# way is answered (with Connection: close) instead of meeting a closed socket.
DRAIN_IDLE_GRACE: Final = 1.0
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
KEEP_ALIVE_10: Final = ((b"Connection", b"keep-alive"),)
PLAIN_HTTP_ON_TLS_PORT: Final = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 46\r\n"
    b"Connection: close\r\n\r\nThe plain HTTP request was sent to HTTPS port.\n"
)
LAST_CHUNK: Final = b"0\r\n\r\n"


ROUTE_CACHE_SIZE: Final = 2048  # (Host, SNI, target) → route entries kept per bind
ROUTE_CACHE_KEY_BYTES: Final = 512  # longer targets are routed every time, not remembered


@dataclass(slots=True)
class BindContext:
    """What a connection accepted on one bind needs: its routing and TLS contexts.

    `routes` remembers what routing decided for recent (Host, SNI, target) triples:
    routing is a pure function of the generation's config, so a repeated request skips
    target normalisation, the Host/SNI lookup, the path match and the URI rewriting
    (see `_route`)."""

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


class DrainWake(Exception):
    """Thrown by a draining worker into connections idle between requests, so that they
    shorten their keep-alive wait to DRAIN_IDLE_GRACE (see Worker.graceful_stop)."""


class _Abort(Exception):
    """Stop serving this connection (already answered or unanswerable)."""


def _client_head(resp: ResponseHead, extra: list[tuple[bytes, bytes]],
                 framing: bytes | None, close: bool, announce: bool) -> bytes:
    """`forwarding.passed_response_head` of `resp`, remembered on it (`resp.sent`) when
    the gateway adds no fields of its own.  A backend's head seen before is the same
    object (http1/response.py remembers heads by their bytes), so its client head is a
    look-up too; a head met once pays one tuple and a store."""
    if not extra:
        sent = resp.sent
        # `is` for the framing line: content_length_field hands out one object per length
        # (a different object with equal bytes only makes the head again)
        if (sent is not None and sent[0] is framing and sent[1] == close
                and sent[2] == announce):
            return sent[3]
    data = forwarding.passed_response_head(
        resp.status, resp.reason, resp.passed, resp.connection, extra, framing, close,
        announce_keep_alive=announce)
    if not extra:
        resp.sent = (framing, close, announce, data)
    return data


class Connection:
    """Serves one accepted client socket until it closes."""

    def __init__(self, rt: Runtime, bind: BindContext, sock: Any, addr: tuple) -> None:
        self.rt = rt
        self.bind = bind
        self.sock = sock
        self.client_ip = addr[0]
        self.client_port = addr[1]
        self.stream: Stream | None = None
        self.sni: str | None = None
        self.parser = rt.parsers.take()
        self.events = EventQueue()
        self.scheme = b"https" if bind.tls else b"http"
        self.tls_protocol = ""
        self.tls_cipher = ""
        self.linger = False  # we close while the client may still be sending
        self.client_cert = NO_CERTIFICATE  # mutual TLS: set after the handshake
        self.listener_label = bind.default_label  # metrics: the SNI-selected listener, if any
        # client byte counts by listener (Stats): the dicts themselves, one lookup less
        self._received = rt.stats.received_bytes
        self._sent = rt.stats.sent_bytes
        # What this connection asserts to backends, by listener: made once, and only the
        # request's own values (id, Host) are set on it per request (see _forward_context)
        self._forwarding: dict[str, ForwardContext] = {}
        self.log_memo = LineMemo()  # the access log's pieces of this connection's last line

    # -- connection lifecycle -------------------------------------------------------

    def serve(self) -> None:
        stats = self.rt.stats
        counted = False
        try:
            self.stream = self._open_stream()
            if self.stream is None:
                return
            label = self.listener_label
            stats.connections += 1
            stats.client_connections[label] += 1
            counted = True
            first = True
            while True:
                head = self._next_head(first)
                if head is None or not self._exchange(head):
                    break
                first = False
        except (_Abort, StreamClosed, StreamTimeout, OSError):
            pass
        finally:
            self.rt.parsers.give_back(self.parser)  # renewed for a next connection, or closed
            if counted:
                stats.connections -= 1
                stats.client_connections[self.listener_label] -= 1
            if self.stream is not None and self.linger:
                self.stream.close_lingering()
            elif self.stream is not None:
                self.stream.close()
            else:
                self.sock.close()

    def _open_stream(self) -> Stream | None:
        tls = self.bind.tls
        if tls is None:
            return PlainStream(self.sock)
        stream = TLSStream.server(self.sock, tls.accept_context)
        try:
            first = stream.accept(self.rt.server.tls_handshake_timeout)
            if not first:
                stream.close()  # a TCP health check: connected, closed, said nothing
                return None
            if first[0] != TLS_HANDSHAKE_RECORD:
                self._not_tls(stream, first)
                return None
        except TLSHandshakeFailed as exc:
            self._handshake_failed(stream, handshake_error_reason(exc.reason))
            return None
        except StreamTimeout:
            self._handshake_failed(stream, "timeout")
            return None
        except (StreamClosed, OSError):
            self._handshake_failed(stream, "reset")
            return None
        # What the SNI callback decided: OpenSSL runs it for every ClientHello, and it
        # leaves its choice on the connection before the handshake can complete.
        choice = stream.conn.get_app_data()
        if isinstance(choice, SNIChoice):
            self.sni = choice.sni
            if choice.matched is not None:
                self.listener_label = choice.matched
        self.tls_protocol = stream.protocol_name()
        self.tls_cipher = stream.cipher_name()
        if self.bind.router.has_client_auth:
            self.client_cert = self._client_certificate(stream)
        self.rt.stats.count("tls_handshakes", (self.listener_label, self.tls_protocol))
        return stream

    def _client_certificate(self, stream: TLSStream) -> ClientCertInfo:
        """The client certificate as the backend will be told (once per connection; a
        resumed session carries the certificate and verdict of its full handshake)."""
        listener = self.bind.router.certificate_listener(self.sni)
        if listener is None or listener.client_auth == "none":
            return NO_CERTIFICATE
        peer = stream.conn.get_peer_certificate()
        if peer is None or self.bind.tls is None:
            return NO_CERTIFICATE
        return describe_client_cert(
            peer.to_cryptography(), self.bind.tls.verify[listener.name].verdict(stream.conn),
            self.rt.router.allowed_issuers(listener.name))

    def _not_tls(self, stream: TLSStream, first: bytes) -> None:
        """Plain HTTP on an HTTPS port gets a clear-text 400 saying so (as nginx does);
        other non-TLS bytes just a close."""
        if first[:1].isalpha():
            self._handshake_failed(stream, "http_request", close=False)
            try:
                stream.sock.sendall(PLAIN_HTTP_ON_TLS_PORT)
            except OSError:
                pass
            stream.close_lingering()
        else:
            self._handshake_failed(stream, "not_tls")

    def _handshake_failed(self, stream: TLSStream, reason: str, close: bool = True) -> None:
        self.rt.stats.count("tls_handshake_errors", (self.listener_label, reason))
        if close:
            stream.close()

    def _pump(self, timeout: float) -> bool:
        """Read once from the client into the event queue; False on EOF."""
        stream = self.stream
        assert stream is not None
        stream.timeout = timeout
        data = stream.recv()
        if not data:
            return False
        self._received[self.listener_label] += len(data)
        self.events.put(self.parser.feed(data))
        return True

    def _next_head(self, first: bool) -> RequestHead | None:
        """Wait for the next request head: keepalive_timeout while idle, then at most
        client_header_timeout in total for the head itself (slowloris)."""
        limits = self.rt.server
        deadline: float | None = None
        while True:
            if self.events.ready():
                event = self.events.take()
                if isinstance(event, RequestHead):
                    return event
                continue  # stray events cannot happen; be robust anyway
            if self.parser.upgraded:
                return None
            error = self.parser.error
            if error is not None:  # malformed bytes pipelined after the requests answered
                self._reply_error(error.status, error.error_info, close=True)
                return None
            if deadline is None and (first or self.parser.in_message()):
                deadline = time.monotonic() + limits.client_header_timeout
            timeout = (limits.keepalive_timeout if deadline is None
                       else deadline - time.monotonic())
            if self.rt.draining:
                timeout = min(timeout, DRAIN_IDLE_GRACE)
            try:
                more = timeout > 0 and self._pump_idle(
                    timeout, self.rt.idle if deadline is None else None)
            except DrainWake:
                continue  # wait again, now with the short draining grace
            except StreamTimeout:
                more = False
            except HttpError as exc:
                self._reply_error(exc.status, exc.error_info, close=True)
                return None
            if not more:
                if self.parser.in_message():
                    self._reply_error(408, "request_header_timeout", close=True)
                return None

    def _pump_idle(self, timeout: float, idle: set[Any] | None) -> bool:
        """`_pump`, registered in `idle` (between requests) so that a draining worker
        can wake us: see DrainWake."""
        if idle is None:
            return self._pump(timeout)
        me = _getcurrent()
        idle.add(me)
        try:
            return self._pump(timeout)
        finally:
            idle.discard(me)

    # -- one request/response exchange ----------------------------------------------

    def _exchange(self, head: RequestHead) -> bool:
        """Proxy one request; return True if the connection may serve another."""
        record = RequestRecord(self, head)
        stats = self.rt.stats
        stats.in_flight += 1
        try:
            if self.rt.fault_target is not None and head.target == self.rt.fault_target:
                raise RuntimeError("fault injected (GATEWAYD_FAULT_INJECTION)")
            return self._proxy(head, record)
        except _Abort:
            return False
        except (StreamClosed, StreamTimeout, OSError, DrainWake):
            raise
        except Exception as exc:
            return self._internal_error(record, exc)
        finally:
            stats.in_flight -= 1
            record.finish(self.rt.access_log, stats)

    def _internal_error(self, record: RequestRecord, exc: Exception) -> bool:
        """A bug met by one request: logged with its context, counted (status 500 in
        the metrics and the access log), answered if nothing was sent yet, and this
        connection closed; the worker and every other connection carry on."""
        log.exception("internal error in request %s %s from %s:%s", record.request_id,
                      record.uri_text(), self.client_ip, self.client_port)
        record.error_info = f"internal_error: {type(exc).__name__}"
        if record.status == 0:
            record.status = 500
            self.linger = True
            try:
                self._send_client(gateway_response(500, request_id=record.request_id,
                                                   close=True))
            except (StreamClosed, StreamTimeout, OSError):
                pass
        return False

    def _route(self, head: RequestHead, record: RequestRecord) -> RoutePlan:
        """Routing (§5) for one request, remembered per bind; RoutingError is not
        remembered (re-raising one exception object would grow its traceback)."""
        key = (head.host, self.sni, head.target)
        routes = self.bind.routes
        found = routes.get(key)
        if found is not None:
            return found
        target = normalize_target(head.target)
        listener = self.bind.router.select(head.host.decode("latin-1"), self.sni)
        record.listener = listener.name  # a 404 for "no rule" still names its listener
        route = self.rt.router.route(listener, target.path)
        settings = None  # a redirect has no backend
        path = target.path
        if route.redirect is None:
            settings = self.rt.upstreams.settings(route.backend_settings)
            if settings.path:
                path = override_path(path, settings.path,
                                     route.path_rule.paths if route.path_rule else ())
        uri = path + ("?" + target.query if target.query else "")
        found = RoutePlan(
            target, listener, uri, uri.encode("latin-1"), listener.name,
            route.rule.name, route.path_rule.name if route.path_rule else "",
            route.backend_pool, route.backend_settings,
            settings.request_timeout if settings is not None else 0.0,
            _idna(settings.host_name) if settings is not None and settings.host_name else b"",
            settings is not None and settings.pick_host_name_from_backend_address,
            route.redirect, route.rewrites)
        if len(head.target) <= ROUTE_CACHE_KEY_BYTES:
            if len(routes) >= ROUTE_CACHE_SIZE:
                routes.clear()
            routes[key] = found
        return found

    def _proxy(self, head: RequestHead, record: RequestRecord) -> bool:
        try:
            plan = self._route(head, record)
        except RoutingError as exc:
            return self._refuse(head, record, exc.status, exc.error_info)
        target = plan.target
        record.set_route(plan.listener_name, plan.rule_name, plan.path_rule_name,
                         plan.backend_pool, plan.backend_settings)
        if plan.redirect is not None:
            return self._redirect(head, record, plan.redirect, target.path, target.query)
        record.uri = plan.uri
        upstream = self._connect(head, plan, record)
        if upstream is None:
            return False
        if head.expect_continue:
            self._send_client(CONTINUE)
        ctx = self._forward_context(head, plan, upstream, record.request_id)
        framing = _request_framing(head)
        headers = head.headers
        if plan.rewrites is not None:
            headers = self._rewrite(head, record, plan.rewrites, target.path, target.query)
        record.upgrade = head.upgrade and is_websocket_upgrade(head.method, head.version,
                                                               head.headers)
        request = upstream_request_head(head.method, plan.uri_bytes, headers, ctx, framing,
                                        upgrade=b"websocket" if record.upgrade else None)
        return self._relay(head, plan, upstream, request, record)

    def _rewrite(self, head: RequestHead, record: RequestRecord, rewrites: CompiledRewriteSet,
                 path: str, query: str) -> list[tuple[bytes, bytes]]:
        """Apply the request side of the route's rewrite set now and keep what the
        response side needs on the record (variables see the request as received)."""
        env = RequestVariables(
            client_ip=self.client_ip, client_port=self.client_port,
            host=_host_name(head.host.decode("latin-1")),
            request_uri=head.target.decode("latin-1"), uri_path=path, query_string=query,
            ssl_protocol=self.tls_protocol, ssl_cipher=self.tls_cipher,
            client_certificate_fingerprint=self.client_cert.fingerprint,
            request_headers=head.headers)
        if rewrites.rewrites_response:
            record.rewrite = (rewrites, env)
        if rewrites.rewrites_request:
            return rewrites.rewrite_request(env)
        return head.headers

    def _redirect(self, head: RequestHead, record: RequestRecord, redirect: CompiledRedirect,
                  path: str, query: str) -> bool:
        """Answer with the route's redirect (a gateway-made response: no rewrites)."""
        location = redirect.location(head.host.decode("latin-1"), path, query)
        if location is None:
            return self._refuse(head, record, 400, "redirect_without_host")
        record.redirect = location
        return self._refuse(head, record, redirect.status, "",
                            extra_headers=((b"Location", location.encode("ascii")),))

    def _connect(self, head: RequestHead, plan: RoutePlan, record: RequestRecord
                 ) -> Upstream | None:
        """A connection to a usable server.  A failure before any request byte was sent
        (TCP connect, DNS, or the TLS handshake itself) is retried once on another
        server; a trust failure (pin, name, chain) is configuration, not luck, and is not."""
        balancer, ups = self.rt.balancer, self.rt.upstreams
        pool, settings_name = plan.backend_pool, plan.backend_settings
        try:
            server, cookies = balancer.choose(pool, settings_name, head.headers)
        except IndexError:
            self._refuse(head, record, 503, "no_healthy_server")
            return None
        first_choice = server
        for attempt in (1, 2):
            record.backend = server.label
            try:
                up = ups.acquire(pool, settings_name, server, head.host)
            except UpstreamError as exc:
                record.error_info = f"{exc.reason}: {exc.detail}"
                self._backend_failed(record, exc.reason)
                transient = isinstance(exc, UpstreamConnectError) or exc.reason == "tls_handshake"
                if isinstance(exc, UpstreamConnectError):
                    balancer.mark_down(pool, settings_name, server)
                if attempt == 2 or not transient:
                    break
                try:
                    server = balancer.pick(pool, settings_name, exclude=server)
                except IndexError:
                    break
                continue
            if server is not first_choice:  # a retry moved the request: so moves the session
                cookies = balancer.cookie_headers(pool, settings_name, server)
            record.add_response_headers.extend(cookies)
            if up.reused:
                record.backend_connect_time = 0.0
            else:
                record.backend_connect_time = up.connect_time
                self.rt.stats.observe("backend_connect", (pool, server.label), up.connect_time)
                if up.not_after:
                    self.rt.stats.backend_not_after[server.label] = up.not_after
            return up
        # Unreachable after the retry: 502 (a connect timeout too: the backend never got
        # the request, which is what 504 "backend timeout" would claim).
        self._refuse(head, record, 502, record.error_info)
        return None

    def _forward_context(
        self, head: RequestHead, plan: RoutePlan, up: Upstream, request_id: str
    ) -> ForwardContext:
        if plan.host_name:
            upstream_host = plan.host_name
        elif plan.pick_host_name:
            upstream_host = _idna(up.server.host)
        elif head.host:
            upstream_host = head.host
        else:  # an HTTP/1.0 client sent no Host: name the backend, as nginx's $proxy_host
            upstream_host = _idna(up.server.label)
        ctx = self._forwarding.get(plan.listener_name)
        if ctx is None:  # once per connection and listener; requests here come one by one
            listener = plan.listener
            with_port = listener.x_forwarded_for_port
            ctx = self._forwarding[plan.listener_name] = ForwardContext(
                client_ip=self.client_ip,
                client_port=self.client_port,
                scheme=self.scheme,
                listener_port=self.bind.port,
                xff_with_port=with_port,
                request_id="",
                client_host=b"",
                upstream_host=b"",
                client_cert_headers=self.client_cert.headers()
                if listener.client_auth != "none" else (),
                client_element=forwarding.client_address(self.client_ip, self.client_port,
                                                         with_port),
            )
        ctx.request_id = request_id
        ctx.client_host = head.host
        ctx.upstream_host = upstream_host
        return ctx

    def _relay(
        self, head: RequestHead, plan: RoutePlan, up: Upstream, request: bytes,
        record: RequestRecord, retry: bool = False,
    ) -> bool:
        """Send the request (head + streamed body) and stream the response back.  A retry
        (only ever of a body-less request) resends the head alone: the client's side of
        the request was consumed the first time."""
        sent_at = time.monotonic()
        try:
            up.stream.timeout = plan.request_timeout
            _upstream_send(up, request)
            if not retry:
                record.bytes_received += self._send_body(head, up)
            parser = up.parser  # the last response's, if it left llhttp between messages
            if parser is not None and parser.reusable:
                parser.next_response(head.method)
            else:
                if parser is not None:
                    parser.close()
                parser = up.parser = ResponseParser(request_method=head.method)
            resp, pending = self._read_response_head(up, parser, upgrade=record.upgrade)
        except _UpstreamGone as exc:
            up.close()
            if up.reused and head.method in IDEMPOTENT and _no_body(head):
                # the backend closed a pooled connection as we reused it: try a new one
                fresh = self._reconnect(head, plan, up, record)
                if fresh is None:
                    return False
                return self._relay(head, plan, fresh, request, record, retry=True)
            self._backend_failed(record, exc.reason)
            return self._refuse(head, record, 502, exc.reason, body_pending=False)
        except StreamTimeout:
            up.close()
            self._backend_failed(record, "response_timeout")
            return self._refuse(head, record, 504, "response_timeout", body_pending=False)
        except HttpError as invalid:
            up.close()
            self._backend_failed(record, "invalid_response")
            return self._refuse(head, record, 502, invalid.error_info, body_pending=False)
        first_byte = time.monotonic() - sent_at
        record.backend_first_byte_time = first_byte
        record.backend_status = resp.status
        self.rt.stats.backend_response(plan.backend_pool, up.server.label, resp.status,
                                       first_byte)
        if resp.status == 101:  # only ever for a websocket upgrade we passed on
            return self._websocket(head, resp, parser, up, record)
        keep = head.keep_alive and not self.parser.upgraded and not self.rt.draining
        return self._send_response(head, resp, pending, parser, up, record, keep)

    def _websocket(self, head: RequestHead, resp: ResponseHead, parser: ResponseParser,
                   up: Upstream, record: RequestRecord) -> bool:
        """Pass the backend's 101 on and splice the two connections until the tunnel
        ends; the connection (and the backend connection) close afterwards."""
        headers = resp.headers
        if record.rewrite is not None:
            headers = record.rewrite[0].rewrite_response(record.rewrite[1], headers)
        record.status = 101
        assert self.stream is not None
        try:
            self._send_client(forwarding.client_response_head(
                101, resp.reason, headers + record.add_response_headers, None, False,
                upgrade=b"websocket"))

            def received(n: int) -> None:
                self._received[self.listener_label] += n

            def sent(n: int) -> None:
                self._sent[self.listener_label] += n

            result = splice(self.stream, up.stream, to_backend=self.parser.trailing,
                            to_client=parser.trailing,
                            idle_timeout=self.rt.server.websocket_idle_timeout,
                            send_timeout=SEND_TIMEOUT, on_client_bytes=received,
                            on_backend_bytes=sent)
            record.bytes_received += result.client_to_backend
            record.bytes_sent = result.backend_to_client
            record.error_info = f"websocket_closed: {result.reason}"
        finally:
            up.close()
        return False

    def _reconnect(
        self, head: RequestHead, plan: RoutePlan, stale: Upstream, record: RequestRecord
    ) -> Upstream | None:
        try:
            return self.rt.upstreams.acquire_fresh(
                plan.backend_pool, plan.backend_settings, stale.server, head.host)
        except UpstreamError as exc:
            self._refuse(head, record, 502, f"{exc.reason}: {exc.detail}", body_pending=False)
            return None

    def _send_body(self, head: RequestHead, up: Upstream) -> int:
        """Stream the request body to the backend, re-framed; returns body bytes sent."""
        if _no_body(head):
            self._take_end()
            return 0
        total = 0
        while True:
            while self.events.ready():
                event = self.events.peek()
                if isinstance(event, RequestHead):
                    raise HttpError(400, "bad_request: body ended early")
                self.events.take()
                if event is END:
                    if head.chunked:
                        _upstream_send(up, LAST_CHUNK)
                    return total
                total += len(event)
                if head.chunked:
                    _upstream_send(up, b"%x\r\n%b\r\n" % (len(event), event))
                else:
                    _upstream_send(up, event)
            try:
                if not self._pump(BODY_READ_TIMEOUT):
                    raise _Abort()  # client went away mid-body: nothing to answer
            except StreamTimeout:
                self._reply_error(408, "request_body_timeout", close=True)
                raise _Abort() from None
            except HttpError as exc:
                self._reply_error(exc.status, exc.error_info, close=True)
                raise _Abort() from None

    def _take_end(self) -> None:
        """Consume the END of a body-less request (it may still be in the socket)."""
        while True:
            while self.events.ready():
                if self.events.take() is END:
                    return
            if not self._pump(BODY_READ_TIMEOUT):
                raise _Abort()

    def _read_response_head(
        self, up: Upstream, parser: ResponseParser, *, upgrade: bool = False
    ) -> tuple[ResponseHead, EventQueue]:
        pending = EventQueue()
        received = False
        while True:
            try:
                data = up.stream.recv()
            except StreamClosed as exc:
                raise _UpstreamGone("reset") from exc
            if not data and not received:
                raise _UpstreamGone("reset")  # closed before answering (stale keep-alive?)
            received = True
            pending.put(parser.feed(data) if data else parser.feed_eof())
            while pending.ready():
                event = pending.take()
                if isinstance(event, ResponseHead):
                    if event.status == 101 and upgrade:
                        return event, pending
                    if 100 <= event.status < 200:  # interim: drop it and its END
                        if event.status == 101:
                            raise HttpError(502, "invalid_response: unexpected 101")
                        continue
                    return event, pending
            if not data:
                raise _UpstreamGone("reset")

    def _send_response(
        self,
        head: RequestHead,
        resp: ResponseHead,
        pending: EventQueue,
        parser: ResponseParser,
        up: Upstream,
        record: RequestRecord,
        keep: bool,
    ) -> bool:
        bodyless = head.method == b"HEAD" or resp.status in (204, 304)
        rechunk = False
        if resp.content_length is not None:
            framing: bytes | None = forwarding.content_length_field(resp.content_length)
        elif bodyless:
            framing = None
        elif head.version == b"1.1":
            framing, rechunk = b"Transfer-Encoding: chunked", True
        else:
            framing, keep = None, False  # HTTP/1.0 client: delimit by closing
        out: list[Chunk]
        if record.rewrite is None:  # the backend's fields go on as the parser sorted them
            out = [_client_head(resp, record.add_response_headers, framing, not keep,
                                head.version == b"1.0")]
        else:
            headers = record.rewrite[0].rewrite_response(record.rewrite[1], resp.headers)
            out = [forwarding.client_response_head(
                resp.status, resp.reason, headers + record.add_response_headers, framing,
                not keep, announce_keep_alive=head.version == b"1.0")]
        record.status = resp.status
        sent = 0
        complete = False
        relay = None  # a buffer of our own once a Content-Length body streams: no copies
        try:
            while True:
                while pending.ready():
                    event = pending.take()
                    if event is END:
                        complete = True
                        break
                    if isinstance(event, ResponseHead):
                        continue
                    sent += len(event)
                    out.append(b"%x\r\n%b\r\n" % (len(event), event) if rechunk else event)
                if complete:
                    if rechunk:
                        out.append(LAST_CHUNK)
                    self._send_client(b"".join(out))
                    break
                self._send_client(b"".join(out) if len(out) > 1 else out[0])
                out = []  # nothing refers to the relay buffer's bytes any more
                if parser.counting:
                    if relay is None:
                        relay = take_relay_buffer()
                    data = up.stream.recv_into(relay)
                else:
                    data = up.stream.recv()
                pending.put(parser.feed(data) if data else parser.feed_eof())
        except (HttpError, StreamClosed, StreamTimeout) as exc:
            up.close()
            record.error_info = f"upstream_truncated: {exc}"
            self._backend_failed(record, "reset")
            record.bytes_sent = sent
            raise _Abort() from None  # the client sees the connection close mid-body
        finally:
            if relay is not None:
                return_relay_buffer(relay)
        record.bytes_sent = sent
        if resp.keep_alive and not parser.extra:
            up.requests += 1
            self.rt.upstreams.release(up)
        else:
            up.close()
        return keep

    # -- answers made by the gateway ------------------------------------------------

    def _refuse(
        self, head: RequestHead, record: RequestRecord, status: int, info: str,
        body_pending: bool = True, extra_headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> bool:
        """Answer with a gateway-made status (with the listener's custom page, if any).
        Unread body → close the connection, since what follows on the wire can no longer
        be framed safely."""
        record.status = status
        record.error_info = info
        close = not head.keep_alive or self.rt.draining or status == 400 or (
            body_pending and not _no_body(head))
        self.linger = close
        extra = KEEP_ALIVE_10 if head.version == b"1.0" and not close else ()
        page = self.rt.router.error_pages.page(record.listener, status)
        if page is not None:
            extra_headers = (*extra_headers, errorpages.CONTENT_TYPE)
        self._send_client(gateway_response(status, request_id=record.request_id, close=close,
                                           head=head.method == b"HEAD", body=page,
                                           extra_headers=(*extra_headers, *extra)))
        if not close and body_pending:
            self._take_end()
        return not close

    def _reply_error(self, status: int, info: str, close: bool) -> None:
        self.linger = close
        record = RequestRecord(self, None)
        record.status = status
        record.error_info = info
        # Before routing the listener is the one the handshake chose (SNI or fallback).
        page = self.rt.router.error_pages.page(self.listener_label, status)
        try:
            self._send_client(gateway_response(
                status, request_id=record.request_id, close=close, body=page,
                extra_headers=(errorpages.CONTENT_TYPE,) if page is not None else ()))
        except (StreamClosed, StreamTimeout, OSError):
            pass
        record.finish(self.rt.access_log, self.rt.stats)

    def _send_client(self, data: Chunk) -> None:
        assert self.stream is not None
        self.stream.timeout = SEND_TIMEOUT
        self.stream.sendall(data)
        self._sent[self.listener_label] += len(data)

    def _backend_failed(self, record: RequestRecord, reason: str) -> None:
        self.rt.stats.count("backend_failures", (record.backend_pool, record.backend, reason))


class _UpstreamGone(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _no_body(head: RequestHead) -> bool:
    return not head.chunked and not head.content_length


def _request_framing(head: RequestHead) -> bytes | None:
    if head.chunked:
        return b"Transfer-Encoding: chunked"
    if head.content_length is not None:
        return forwarding.content_length_field(head.content_length)
    return None


def _upstream_send(up: Upstream, data: bytes) -> None:
    try:
        up.stream.sendall(data)
    except StreamClosed as exc:
        raise _UpstreamGone("reset") from exc


_IDNA: Final[dict[str, bytes]] = {}  # configured host names, encoded: the codec is pure Python


def _idna(name: str) -> bytes:
    """A configured name (host_name, a server's host) as sent in Host: encoded once, not
    on every request (the "idna" codec costs thousands of instructions a call)."""
    encoded = _IDNA.get(name)
    if encoded is None:
        encoded = _IDNA[name] = name.encode("idna")  # config names only: bounded
    return encoded


def _host_name(host: str) -> str:
    """A Host value without its port, lower-cased: what `{host}` expands to (nginx's
    `$host`)."""
    if host.startswith("["):
        end = host.find("]") + 1
        return host[:end].lower()
    return (host.rpartition(":")[0] if host.count(":") == 1 else host).lower()
