"""One routed request's trip upstream: a backend connection (with one retry), the request
head and its streamed body, the response head, and the response streamed back to the
client (or a websocket tunnel).  The client's side of the connection, reading requests
and answering what the gateway answers itself, is workers/proxy.py's.

Framing is never passed through: the request body comes re-framed from the client's
parser, the response body is parsed by llhttp (`http1`) and re-framed here (Content-Length
kept, chunked re-encoded), so what reaches either side is unambiguous whatever the other
sent.  Bodies are streamed chunk by chunk with no whole-body buffering; a slow reader
stalls its writer (backpressure).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

from gatewayd import forwarding
from gatewayd.forwarding import ForwardContext, upstream_request_head
from gatewayd.rewrites import CompiledRewriteSet, RequestVariables

from .http1 import END, Chunk, EventQueue, HttpError, RequestHead, ResponseHead, ResponseParser
from .record import RequestRecord
from .routeplan import RoutePlan, idna_name
from .tlsio import StreamClosed, StreamTimeout, return_relay_buffer, take_relay_buffer
from .upstream import Upstream, UpstreamConnectError, UpstreamError
from .websocket import is_websocket_upgrade, splice

if TYPE_CHECKING:
    from .proxy import Connection

BODY_READ_TIMEOUT: Final = 60.0  # s between two reads of a request body (nginx client_body_timeout)
SEND_TIMEOUT: Final = 60.0  # s a client may take to accept more of a response (nginx send_timeout)
IDEMPOTENT: Final = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK: Final = b"0\r\n\r\n"


class Abort(Exception):
    """Stop serving this connection (already answered or unanswerable)."""


class _UpstreamGone(Exception):
    """The backend closed or reset the connection before its response head."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def run(conn: Connection, head: RequestHead, plan: RoutePlan, record: RequestRecord) -> bool:
    """Proxy one routed request to its backend pool and the response back; True if the
    client connection may serve another request.

    Functions of the connection rather than an object per request: the exchange reads
    the client's stream, parser and identity off `conn` and answers through it
    (`send_client`, `refuse`), and an object of its own would cost an allocation and a
    collection per request for nothing else."""
    record.uri = plan.uri
    upstream = _connect(conn, head, plan, record)
    if upstream is None:
        return False
    if head.expect_continue:
        conn.send_client(CONTINUE)
    ctx = _forward_context(conn, head, plan, upstream, record.request_id)
    framing = _request_framing(head)
    headers = head.headers
    if plan.rewrites is not None:
        headers = _rewrite(conn, head, plan, record, plan.rewrites)
    record.upgrade = head.upgrade and is_websocket_upgrade(head.method, head.version,
                                                           head.headers)
    request = upstream_request_head(head.method, plan.uri_bytes, headers, ctx, framing,
                                    upgrade=b"websocket" if record.upgrade else None)
    return _relay(conn, head, plan, record, upstream, request)


def _rewrite(conn: Connection, head: RequestHead, plan: RoutePlan, record: RequestRecord,
             rewrites: CompiledRewriteSet) -> list[tuple[bytes, bytes]]:
    """Apply the request side of the route's rewrite set now and keep what the
    response side needs on the record (variables see the request as received)."""
    target = plan.target
    env = RequestVariables(
        client_ip=conn.client_ip, client_port=conn.client_port,
        host=_host_name(head.host.decode("latin-1")),
        request_uri=head.target.decode("latin-1"), uri_path=target.path,
        query_string=target.query, ssl_protocol=conn.tls_protocol,
        ssl_cipher=conn.tls_cipher,
        client_certificate_fingerprint=conn.client_cert.fingerprint,
        request_headers=head.headers)
    if rewrites.rewrites_response:
        record.rewrite = (rewrites, env)
    if rewrites.rewrites_request:
        return rewrites.rewrite_request(env)
    return head.headers


def _connect(conn: Connection, head: RequestHead, plan: RoutePlan, record: RequestRecord
             ) -> Upstream | None:
    """A connection to a usable server.  A failure before any request byte was sent
    (TCP connect, DNS, or the TLS handshake itself) is retried once on another
    server; a trust failure (pin, name, chain) is configuration, not luck, and is not."""
    rt = conn.rt
    balancer, ups = rt.balancer, rt.upstreams
    pool, settings_name = plan.backend_pool, plan.backend_settings
    try:
        server, cookies = balancer.choose(pool, settings_name, head.headers)
    except IndexError:
        conn.refuse(head, record, 503, "no_healthy_server")
        return None
    first_choice = server
    for attempt in (1, 2):
        record.backend = server.label
        try:
            up = ups.acquire(pool, settings_name, server, head.host)
        except UpstreamError as exc:
            record.error_info = f"{exc.reason}: {exc.detail}"
            _backend_failed(conn, record, exc.reason)
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
            rt.stats.observe("backend_connect", (pool, server.label), up.connect_time)
            if up.not_after:
                rt.stats.backend_not_after[server.label] = up.not_after
        return up
    # Unreachable after the retry: 502 (a connect timeout too: the backend never got
    # the request, which is what 504 "backend timeout" would claim).
    conn.refuse(head, record, 502, record.error_info)
    return None


def _forward_context(conn: Connection, head: RequestHead, plan: RoutePlan, up: Upstream,
                     request_id: str) -> ForwardContext:
    """What the backend is told about the client (X-Forwarded-*, Host, request id)."""
    if plan.host_name:
        upstream_host = plan.host_name
    elif plan.pick_host_name:
        upstream_host = idna_name(up.server.host)
    elif head.host:
        upstream_host = head.host
    else:  # an HTTP/1.0 client sent no Host: name the backend, as nginx's $proxy_host
        upstream_host = idna_name(up.server.label)
    # What a connection asserts to backends, by listener: made once, and only the
    # request's own values (id, Host) are set on it per request
    ctx = conn.forward_contexts.get(plan.listener_name)
    if ctx is None:  # once per connection and listener; requests here come one by one
        listener = plan.listener
        with_port = listener.x_forwarded_for_port
        ctx = conn.forward_contexts[plan.listener_name] = ForwardContext(
            client_ip=conn.client_ip,
            client_port=conn.client_port,
            scheme=conn.scheme,
            listener_port=conn.bind.port,
            xff_with_port=with_port,
            request_id="",
            client_host=b"",
            upstream_host=b"",
            client_cert_headers=conn.client_cert.headers()
            if listener.client_auth != "none" else (),
            client_element=forwarding.client_address(conn.client_ip, conn.client_port,
                                                     with_port),
        )
    ctx.request_id = request_id
    ctx.client_host = head.host
    ctx.upstream_host = upstream_host
    return ctx


def _relay(conn: Connection, head: RequestHead, plan: RoutePlan, record: RequestRecord,
           up: Upstream, request: bytes, retry: bool = False) -> bool:
    """Send the request (head + streamed body) and stream the response back.  A retry
    (only ever of a body-less request) resends the head alone: the client's side of
    the request was consumed the first time."""
    sent_at = time.monotonic()
    try:
        up.stream.timeout = plan.request_timeout
        _upstream_send(up, request)
        if not retry:
            record.bytes_received += _send_body(conn, head, up)
        parser = up.parser  # the last response's, if it left llhttp between messages
        if parser is not None and parser.reusable:
            parser.next_response(head.method)
        else:
            if parser is not None:
                parser.close()
            parser = up.parser = ResponseParser(request_method=head.method)
        resp, pending = _read_response_head(up, parser, upgrade=record.upgrade)
    except _UpstreamGone as exc:
        up.close()
        if up.reused and head.method in IDEMPOTENT and no_body(head):
            # the backend closed a pooled connection as we reused it: try a new one
            fresh = _reconnect(conn, head, plan, record, up)
            if fresh is None:
                return False
            return _relay(conn, head, plan, record, fresh, request, retry=True)
        _backend_failed(conn, record, exc.reason)
        return conn.refuse(head, record, 502, exc.reason, body_pending=False)
    except StreamTimeout:
        up.close()
        _backend_failed(conn, record, "response_timeout")
        return conn.refuse(head, record, 504, "response_timeout", body_pending=False)
    except HttpError as invalid:
        up.close()
        _backend_failed(conn, record, "invalid_response")
        return conn.refuse(head, record, 502, invalid.error_info, body_pending=False)
    first_byte = time.monotonic() - sent_at
    record.backend_first_byte_time = first_byte
    record.backend_status = resp.status
    conn.rt.stats.backend_response(plan.backend_pool, up.server.label, resp.status,
                                   first_byte)
    if resp.status == 101:  # only ever for a websocket upgrade we passed on
        return _websocket(conn, record, resp, parser, up)
    keep = head.keep_alive and not conn.parser.upgraded and not conn.rt.draining
    return _send_response(conn, head, record, resp, pending, parser, up, keep)


def _websocket(conn: Connection, record: RequestRecord, resp: ResponseHead,
               parser: ResponseParser, up: Upstream) -> bool:
    """Pass the backend's 101 on and splice the two connections until the tunnel
    ends; the connection (and the backend connection) close afterwards."""
    headers = resp.headers
    if record.rewrite is not None:
        headers = record.rewrite[0].rewrite_response(record.rewrite[1], headers)
    record.status = 101
    assert conn.stream is not None
    try:
        conn.send_client(forwarding.client_response_head(
            101, resp.reason, headers + record.add_response_headers, None, False,
            upgrade=b"websocket"))

        def received(n: int) -> None:
            conn.received[conn.listener_label] += n

        def sent(n: int) -> None:
            conn.sent[conn.listener_label] += n

        result = splice(conn.stream, up.stream, to_backend=conn.parser.trailing,
                        to_client=parser.trailing,
                        idle_timeout=conn.rt.server.websocket_idle_timeout,
                        send_timeout=SEND_TIMEOUT, on_client_bytes=received,
                        on_backend_bytes=sent)
        record.bytes_received += result.client_to_backend
        record.bytes_sent = result.backend_to_client
        record.error_info = f"websocket_closed: {result.reason}"
    finally:
        up.close()
    return False


def _reconnect(conn: Connection, head: RequestHead, plan: RoutePlan, record: RequestRecord,
               stale: Upstream) -> Upstream | None:
    try:
        return conn.rt.upstreams.acquire_fresh(
            plan.backend_pool, plan.backend_settings, stale.server, head.host)
    except UpstreamError as exc:
        conn.refuse(head, record, 502, f"{exc.reason}: {exc.detail}", body_pending=False)
        return None


def _send_body(conn: Connection, head: RequestHead, up: Upstream) -> int:
    """Stream the request body to the backend, re-framed; returns body bytes sent."""
    if no_body(head):
        conn.take_end()
        return 0
    events = conn.events
    total = 0
    while True:
        while events.ready():
            event = events.peek()
            if isinstance(event, RequestHead):
                raise HttpError(400, "bad_request: body ended early")
            events.take()
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
            if not conn.pump(BODY_READ_TIMEOUT):
                raise Abort()  # client went away mid-body: nothing to answer
        except StreamTimeout:
            conn.reply_error(408, "request_body_timeout", close=True)
            raise Abort() from None
        except HttpError as exc:
            conn.reply_error(exc.status, exc.error_info, close=True)
            raise Abort() from None


def _send_response(conn: Connection, head: RequestHead, record: RequestRecord,
                   resp: ResponseHead, pending: EventQueue, parser: ResponseParser,
                   up: Upstream, keep: bool) -> bool:
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
                conn.send_client(b"".join(out))
                break
            conn.send_client(b"".join(out) if len(out) > 1 else out[0])
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
        _backend_failed(conn, record, "reset")
        record.bytes_sent = sent
        raise Abort() from None  # the client sees the connection close mid-body
    finally:
        if relay is not None:
            return_relay_buffer(relay)
    record.bytes_sent = sent
    if resp.keep_alive and not parser.extra:
        up.requests += 1
        conn.rt.upstreams.release(up)
    else:
        up.close()
    return keep


def _backend_failed(conn: Connection, record: RequestRecord, reason: str) -> None:
    conn.rt.stats.count("backend_failures", (record.backend_pool, record.backend, reason))


def _read_response_head(up: Upstream, parser: ResponseParser, *, upgrade: bool = False
                        ) -> tuple[ResponseHead, EventQueue]:
    """The backend's final response head (interim 1xx dropped; a 101 only for a websocket
    upgrade we passed on) and the events already parsed after it."""
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


def no_body(head: RequestHead) -> bool:
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


def _host_name(host: str) -> str:
    """A Host value without its port, lower-cased: what `{host}` expands to (nginx's
    `$host`)."""
    if host.startswith("["):
        end = host.find("]") + 1
        return host[:end].lower()
    return (host.rpartition(":")[0] if host.count(":") == 1 else host).lower()
