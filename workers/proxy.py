"""One downstream (client) connection: TLS, then request → route → exchange → response,
repeated while the connection is kept alive.

This module is the client's side: the TLS handshake and what it tells (SNI, protocol,
client certificate), reading request heads under the keep-alive and header timeouts,
routing (workers/routeplan.py), and every answer the gateway makes itself (errors,
redirects, 100 Continue).  A routed request's trip to the backend and back is
workers/exchange.py's.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final

from gevent import getcurrent

from gatewayd import errorpages
from gatewayd.clientcert import NO_CERTIFICATE, ClientCertInfo
from gatewayd.clientcert import describe as describe_client_cert
from gatewayd.forwarding import ForwardContext, gateway_response
from gatewayd.redirects import CompiledRedirect
from gatewayd.routing import RoutingError
from gatewayd.tlsconf import SNIChoice

from . import exchange
from .exchange import BODY_READ_TIMEOUT, SEND_TIMEOUT, Abort, no_body
from .http1 import END, Chunk, EventQueue, HttpError, RequestHead
from .logline import LineMemo
from .record import RequestRecord, handshake_error_reason
from .routeplan import BindContext, plan_route
from .runtime import Runtime
from .tlsio import (
    TLS_HANDSHAKE_RECORD,
    PlainStream,
    Stream,
    StreamClosed,
    StreamTimeout,
    TLSHandshakeFailed,
    TLSStream,
)

# Module constants are Final: compiled, each is a C static, not a lookup in the module's
# dict on every use (docs/architecture.md); the same for this function, called per wait.
_getcurrent: Final = getcurrent
log: Final = logging.getLogger("gatewayd.proxy")
# A draining worker keeps idle keep-alive connections this long: a request already on its
# way is answered (with Connection: close) instead of meeting a closed socket.
DRAIN_IDLE_GRACE: Final = 1.0
KEEP_ALIVE_10: Final = ((b"Connection", b"keep-alive"),)
PLAIN_HTTP_ON_TLS_PORT: Final = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 46\r\n"
    b"Connection: close\r\n\r\nThe plain HTTP request was sent to HTTPS port.\n"
)


class DrainWake(Exception):
    """Thrown by a draining worker into connections idle between requests, so that they
    shorten their keep-alive wait to DRAIN_IDLE_GRACE (see Worker.graceful_stop)."""


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
        self.received = rt.stats.received_bytes
        self.sent = rt.stats.sent_bytes
        # What this connection asserts to backends, by listener (exchange.py fills them)
        self.forward_contexts: dict[str, ForwardContext] = {}
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
        except (Abort, StreamClosed, StreamTimeout, OSError):
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

    def pump(self, timeout: float) -> bool:
        """Read once from the client into the event queue; False on EOF."""
        stream = self.stream
        assert stream is not None
        stream.timeout = timeout
        data = stream.recv()
        if not data:
            return False
        self.received[self.listener_label] += len(data)
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
                self.reply_error(error.status, error.error_info, close=True)
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
                self.reply_error(exc.status, exc.error_info, close=True)
                return None
            if not more:
                if self.parser.in_message():
                    self.reply_error(408, "request_header_timeout", close=True)
                return None

    def _pump_idle(self, timeout: float, idle: set[Any] | None) -> bool:
        """`pump`, registered in `idle` (between requests) so that a draining worker
        can wake us: see DrainWake."""
        if idle is None:
            return self.pump(timeout)
        me = _getcurrent()
        idle.add(me)
        try:
            return self.pump(timeout)
        finally:
            idle.discard(me)

    # -- one request: routed here, then proxied by exchange.run ---------------------

    def _exchange(self, head: RequestHead) -> bool:
        """Proxy one request; return True if the connection may serve another."""
        record = RequestRecord(self, head)
        stats = self.rt.stats
        stats.in_flight += 1
        try:
            if self.rt.fault_target is not None and head.target == self.rt.fault_target:
                raise RuntimeError("fault injected (GATEWAYD_FAULT_INJECTION)")
            return self._proxy(head, record)
        except Abort:
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
                self.send_client(gateway_response(500, request_id=record.request_id,
                                                  close=True))
            except (StreamClosed, StreamTimeout, OSError):
                pass
        return False

    def _proxy(self, head: RequestHead, record: RequestRecord) -> bool:
        try:
            plan = plan_route(self.bind, self.rt.router, self.rt.upstreams, head, self.sni,
                              record)
        except RoutingError as exc:
            return self.refuse(head, record, exc.status, exc.error_info)
        record.set_route(plan.listener_name, plan.rule_name, plan.path_rule_name,
                         plan.backend_pool, plan.backend_settings)
        if plan.redirect is not None:
            target = plan.target
            return self._redirect(head, record, plan.redirect, target.path, target.query)
        return exchange.run(self, head, plan, record)

    def _redirect(self, head: RequestHead, record: RequestRecord, redirect: CompiledRedirect,
                  path: str, query: str) -> bool:
        """Answer with the route's redirect (a gateway-made response: no rewrites)."""
        location = redirect.location(head.host.decode("latin-1"), path, query)
        if location is None:
            return self.refuse(head, record, 400, "redirect_without_host")
        record.redirect = location
        return self.refuse(head, record, redirect.status, "",
                           extra_headers=((b"Location", location.encode("ascii")),))

    # -- answers made by the gateway ------------------------------------------------

    def refuse(
        self, head: RequestHead, record: RequestRecord, status: int, info: str,
        body_pending: bool = True, extra_headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> bool:
        """Answer with a gateway-made status (with the listener's custom page, if any).
        Unread body → close the connection, since what follows on the wire can no longer
        be framed safely."""
        record.status = status
        record.error_info = info
        close = not head.keep_alive or self.rt.draining or status == 400 or (
            body_pending and not no_body(head))
        self.linger = close
        extra = KEEP_ALIVE_10 if head.version == b"1.0" and not close else ()
        page = self.rt.router.error_pages.page(record.listener, status)
        if page is not None:
            extra_headers = (*extra_headers, errorpages.CONTENT_TYPE)
        self.send_client(gateway_response(status, request_id=record.request_id, close=close,
                                          head=head.method == b"HEAD", body=page,
                                          extra_headers=(*extra_headers, *extra)))
        if not close and body_pending:
            self.take_end()
        return not close

    def reply_error(self, status: int, info: str, close: bool) -> None:
        self.linger = close
        record = RequestRecord(self, None)
        record.status = status
        record.error_info = info
        # Before routing the listener is the one the handshake chose (SNI or fallback).
        page = self.rt.router.error_pages.page(self.listener_label, status)
        try:
            self.send_client(gateway_response(
                status, request_id=record.request_id, close=close, body=page,
                extra_headers=(errorpages.CONTENT_TYPE,) if page is not None else ()))
        except (StreamClosed, StreamTimeout, OSError):
            pass
        record.finish(self.rt.access_log, self.rt.stats)

    def send_client(self, data: Chunk) -> None:
        assert self.stream is not None
        self.stream.timeout = SEND_TIMEOUT
        self.stream.sendall(data)
        self.sent[self.listener_label] += len(data)

    def take_end(self) -> None:
        """Consume the END of a body-less request (it may still be in the socket)."""
        while True:
            while self.events.ready():
                if self.events.take() is END:
                    return
            if not self.pump(BODY_READ_TIMEOUT):
                raise Abort()

