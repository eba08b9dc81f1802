"""Connections to backend servers: connect, TLS, the trust decision, and a per-worker
keep-alive pool (Envoy's "upstream" side).

A connection leaves `connect` only after `gatewayd.trust.check_backend` has accepted the
backend's certificate; on refusal the socket is closed right after the handshake, so the
backend never receives a byte of the request.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Final

from OpenSSL import SSL

from gatewayd.config_sections import split_host_port
from gatewayd.model import BackendPool, BackendSettings
from gatewayd.tlsconf import client_context, verify_result
from gatewayd.trust import (
    TrustFailure,
    check_backend,
    is_ip_literal,
    sni_for,
    sni_from_request,
)

from .http1 import ResponseParser
from .resolver import Resolver
from .tlsio import (
    PlainStream,
    Stream,
    StreamTimeout,
    TLSHandshakeFailed,
    TLSStream,
    open_tcp,
    peer_closed,
)

# Idle pooled connections older than this are closed rather than reused: most servers
# drop idle keep-alive connections after 60-75 s (nginx: 75 s, Apache: 5 s is the rare
# outlier, and the retry in the proxy covers that race).
IDLE_TTL: Final = 50.0
# A connection back in the pool for less than this is reused without first peeking at
# its socket (one system call per request under load): a backend whose own idle timeout
# is this short is not a keep-alive backend, and the retry covers the race anyway.
PEEK_AFTER: Final = 0.25
MAX_IDLE_PER_KEY: Final = 64


class UpstreamError(Exception):
    """No usable connection to a backend; `reason` is a CONTRACT §10 failure reason."""

    def __init__(self, reason: str, detail: str, server: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.server = server


class UpstreamConnectError(UpstreamError):
    """TCP or DNS failed: nothing was sent; safe to try another server."""


class UpstreamTLSError(UpstreamError):
    """The handshake failed or the certificate was refused: no request byte was sent."""


@dataclass(frozen=True, slots=True)
class Server:
    """One pool member: `host:port` as the config names it."""

    host: str
    port: int
    # `host:port` (`[v6]:port`) for logs and metric labels: used several times per request,
    # so made once (an IPv6 literal gets brackets, RFC 3986 §3.2.2).
    label: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        label = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        object.__setattr__(self, "label", label)


def parse_server(text: str, default_port: int) -> Server:
    """A pool member as written (validated at config load) with the settings' port as
    the default; one parser for the whole project: config_sections.split_host_port."""
    host, port = split_host_port(text)
    return Server(host, port if port is not None else default_port)


@dataclass(slots=True)
class Upstream:
    """A live connection to one server, with what the pool needs to reuse it: `idle` is
    where it waits between requests, shared by every connection to the same server with
    the same settings and TLS name."""

    stream: Stream
    server: Server
    idle: list[Upstream]
    connect_time: float
    idle_since: float = 0.0
    requests: int = 0
    reused: bool = False
    not_after: float = 0.0  # the backend leaf's notAfter (0 for plain http)
    # The http1.ResponseParser that read the last response: the next response on this
    # connection reuses it if it is `reusable` (see exchange._relay).
    parser: ResponseParser | None = None

    def close(self) -> None:
        """Close the connection for good (it is not returned to the pool)."""
        self.stream.close()
        if self.parser is not None:
            self.parser.close()
            self.parser = None


@dataclass(slots=True)
class _Target:
    """A (pool, settings) pair.  When the name sent as SNI and verified does not depend
    on the request (sni_name, host_name, the server's own name, or plain http), each
    server's idle connections are found by its label alone: no key built per request."""

    settings: BackendSettings
    context: SSL.Context | None
    request_named: bool  # the name comes from the client's Host
    idle_by_server: dict[str, list[Upstream]] = field(default_factory=dict)


class UpstreamPool:
    """Per-worker connections to backend servers: new ones (connect, TLS, trust) and idle
    keep-alive ones for reuse.  Which server to use is the Balancer's business."""

    def __init__(
        self, pools: dict[str, BackendPool], settings: dict[str, BackendSettings]
    ) -> None:
        self._contexts = {
            name: client_context(s) for name, s in settings.items() if s.protocol == "https"
        }
        self._pools = pools
        self._settings = settings
        self._targets: dict[str, dict[str, _Target]] = {}  # pool → settings → target
        # (host, port, settings, TLS name) → idle connections, most recently used last
        self._idle: dict[tuple[str, int, str, str], list[Upstream]] = {}
        self.resolver = Resolver()

    def server_names(self) -> list[tuple[str, int]]:
        """Every (host, port) this worker may connect to, for the resolver's refresh."""
        names: dict[tuple[str, int], None] = {}
        for pool in self._pools.values():
            for settings in self._settings.values():
                for text in pool.servers:
                    server = parse_server(text, settings.port)
                    names.setdefault((server.host, server.port), None)
        return list(names)

    def _target(self, pool_name: str, settings_name: str) -> _Target:
        try:
            return self._targets[pool_name][settings_name]
        except KeyError:
            settings = self._settings[settings_name]
            context = self._contexts.get(settings_name)
            target = _Target(settings, context,
                             context is not None and sni_from_request(settings))
            self._targets.setdefault(pool_name, {})[settings_name] = target
            return target

    def _idle_for(self, target: _Target, server: Server, name: str) -> list[Upstream]:
        key = (server.host, server.port, target.settings.name, name)
        idle = self._idle.get(key)
        if idle is None:
            idle = self._idle[key] = []
        return idle

    def _name(self, target: _Target, server: Server, client_host: bytes) -> str:
        """The name sent as SNI and verified ("" for plain http); `client_host` is the
        client's Host as received (decoded only when the name comes from it)."""
        if target.context is None:
            return ""
        return sni_for(target.settings, server.host, client_host.decode("latin-1"))

    def settings(self, name: str) -> BackendSettings:
        return self._settings[name]

    def acquire(
        self, pool_name: str, settings_name: str, server: Server, client_host: bytes
    ) -> Upstream:
        """An idle pooled connection to `server` if one is alive, else a new one."""
        target = self._target(pool_name, settings_name)
        name = None  # the TLS name, computed only if needed
        if target.request_named:
            name = self._name(target, server, client_host)
            idle = self._idle_for(target, server, name)
        else:
            found = target.idle_by_server.get(server.label)
            if found is None:
                name = self._name(target, server, client_host)
                found = target.idle_by_server[server.label] = self._idle_for(
                    target, server, name)
            idle = found
        if idle:
            now = time.monotonic()
            while idle:
                up = idle.pop()
                idle_for = now - up.idle_since
                if idle_for < PEEK_AFTER or (idle_for < IDLE_TTL
                                             and not peer_closed(up.stream.sock)):
                    up.reused = True
                    return up
                up.close()
        if name is None:
            name = self._name(target, server, client_host)
        return self._connect(target, server, idle, name)

    def acquire_fresh(
        self, pool_name: str, settings_name: str, server: Server, client_host: bytes
    ) -> Upstream:
        """A new connection, never a pooled one (after a pooled one turned out dead)."""
        target = self._target(pool_name, settings_name)
        name = self._name(target, server, client_host)
        return self._connect(target, server, self._idle_for(target, server, name), name)

    def release(self, up: Upstream) -> None:
        """Return a connection whose last response was complete and keep-alive."""
        idle = up.idle
        if len(idle) >= MAX_IDLE_PER_KEY:
            up.close()
            return
        up.idle_since = time.monotonic()
        up.stream.timeout = None
        idle.append(up)

    def close_idle(self) -> None:
        for idle in self._idle.values():
            while idle:
                idle.pop().close()

    def _connect(
        self, target: _Target, server: Server, idle: list[Upstream], name: str
    ) -> Upstream:
        settings = target.settings
        started = time.monotonic()
        sock = self._open(server, settings.connect_timeout)
        if target.context is None:
            return Upstream(PlainStream(sock), server, idle, time.monotonic() - started)
        sni = None if is_ip_literal(name) else name
        stream = TLSStream.client(sock, target.context, sni)
        try:
            stream.handshake(settings.connect_timeout)
            leaf = stream.conn.get_peer_certificate(as_cryptography=True)
            check_backend(settings, leaf, verify_result(stream.conn), name)
        except TLSHandshakeFailed as exc:
            stream.close()
            raise UpstreamTLSError("tls_handshake", exc.reason, server.label) from exc
        except StreamTimeout as timed_out:
            stream.close()
            raise UpstreamTLSError("tls_handshake", "handshake timed out",
                                   server.label) from timed_out
        except TrustFailure as trust:
            stream.close()  # after the handshake, before any request byte
            raise UpstreamTLSError(trust.reason, trust.detail, server.label) from trust
        stream.timeout = settings.request_timeout
        up = Upstream(stream, server, idle, time.monotonic() - started)
        if leaf is not None:
            up.not_after = leaf.not_valid_after_utc.timestamp()
        return up

    def _open(self, server: Server, timeout: float) -> socket.socket:
        try:
            infos = self.resolver.resolve(server.host, server.port)
        except OSError as exc:
            raise UpstreamConnectError("dns", str(exc), server.label) from exc
        last: UpstreamConnectError | None = None
        for family, _type, _proto, _canon, sockaddr in infos:
            try:
                return open_tcp(sockaddr, family, timeout)
            except StreamTimeout:
                last = UpstreamConnectError("connect_timeout", "connect timed out", server.label)
            except ConnectionRefusedError as refused:
                last = UpstreamConnectError("connect_refused", str(refused), server.label)
            except OSError as exc:
                last = UpstreamConnectError("connect_refused", str(exc), server.label)
        assert last is not None
        raise last
