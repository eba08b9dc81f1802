"""The prober process: one per generation, probing every backend target and publishing
verdicts through the shared health map (see gatewayd/health.py for the design).

Probes follow Azure Application Gateway: without a `[[probe]]`, `GET /` on the settings'
protocol and port with Host 127.0.0.1, every 30 s, timeout 30 s, unhealthy after 3
consecutive failures, healthy on 200-399, healthy again after one success.  HTTPS probes
apply the same trust decision as requests (gatewayd.trust): pins, roots and names.  The
name sent as SNI and verified: probe host > settings sni_name/host_name > the server's
host; an IP literal is never sent as SNI.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

import gevent
from gevent.event import Event

from gatewayd import metrics
from gatewayd.health import HealthMap, Target
from gatewayd.model import DEFAULT_PROBE, BackendSettings, GatewayConfig, Probe
from gatewayd.tlsconf import client_context, verify_result
from gatewayd.trust import TrustFailure, check_backend, is_ip_literal

from .http1 import END, HttpError, ResponseHead, ResponseParser
from .resolver import Resolver
from .tlsio import (
    PlainStream,
    Stream,
    StreamClosed,
    StreamTimeout,
    TLSHandshakeFailed,
    TLSStream,
    open_tcp,
)
from .upstream import parse_server

log = logging.getLogger("gatewayd.prober")
CHECK_REQUESTS_POLL = 0.2  # s between looks at the workers' "check now" flags
MAX_BODY = 65536  # bytes of a probe response kept for match_body


class ProbeFailed(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class _Watch:
    target: Target
    settings: BackendSettings
    probe: Probe
    wake: Event
    label: str  # host:port, as the workers' metrics name the server
    failures: int = 0
    healthy: bool | None = None
    reason: str = ""


def run_prober(config: GatewayConfig, health_path: str, targets: list[Target],
               master_pid: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    gevent.signal_handler(signal.SIGTERM, lambda: os._exit(0))
    for name in ("SIGHUP", "SIGUSR1", "SIGTTIN", "SIGTTOU"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    Prober(config, HealthMap.open(health_path), targets, master_pid).run()
    return 0


class Prober:
    def __init__(self, config: GatewayConfig, health: HealthMap, targets: list[Target],
                 master_pid: int) -> None:
        self.config = config
        self.health = health
        self.master_pid = master_pid
        self.metrics = metrics.setup()
        self.resolver = Resolver()
        self.contexts = {name: client_context(s) for name, s in config.backend_settings.items()
                         if s.protocol == "https"}
        self.watches = []
        for target in targets:
            settings = config.backend_settings[target.settings]
            probe = config.probes.get(settings.probe, DEFAULT_PROBE) if settings.probe \
                else DEFAULT_PROBE
            label = parse_server(target.server, settings.port).label
            self.watches.append(_Watch(target, settings, probe, Event(), label))

    def run(self) -> None:
        for watch in self.watches:  # not probed yet counts as healthy (Azure does too)
            self._publish(watch, True, "")
        for watch in self.watches:
            gevent.spawn(self._probe_forever, watch)
        names = sorted({parse_server(w.target.server, w.settings.port) for w in self.watches},
                       key=lambda server: server.label)
        gevent.spawn(self.resolver.refresh_forever, [(s.host, s.port) for s in names])
        while os.getppid() == self.master_pid:
            for index in self.health.take_check_requests():
                if index < len(self.watches):
                    self.watches[index].wake.set()
            gevent.sleep(CHECK_REQUESTS_POLL)
        log.error("master %d is gone; prober exits", self.master_pid)

    def _probe_forever(self, watch: _Watch) -> None:
        while True:
            watch.wake.clear()
            try:
                self.probe_once(watch.settings, watch.probe, watch.target.server)
            except ProbeFailed as exc:
                self._failed(watch, exc)
            except Exception as exc:  # a probe bug must not stop probing
                log.exception("probe of %s failed unexpectedly", watch.target.server)
                self._failed(watch, ProbeFailed("invalid_response", str(exc)))
            else:
                self._succeeded(watch)
            watch.wake.wait(timeout=watch.probe.interval)

    def _succeeded(self, watch: _Watch) -> None:
        watch.failures = 0
        self.health.count_success(watch.target.index)  # lifts workers' passive marks
        if watch.healthy is False:
            log.warning("backend %s/%s is healthy again", watch.target.pool,
                        watch.target.server)
            self._publish(watch, True, "")

    def _failed(self, watch: _Watch, exc: ProbeFailed) -> None:
        watch.failures += 1
        target = watch.target
        self.metrics.backend_failures.labels(target.pool, watch.label, exc.reason).inc()
        if watch.failures < watch.probe.unhealthy_threshold:
            return
        if watch.healthy is not False:
            log.warning("backend %s/%s is unhealthy after %d failed probes: %s",
                        target.pool, watch.label, watch.failures, exc)
            self._publish(watch, False, exc.reason)
        elif watch.reason != exc.reason:
            log.warning("backend %s/%s is still unhealthy, now: %s", target.pool,
                        watch.label, exc)
            self._publish(watch, False, exc.reason)

    def _publish(self, watch: _Watch, healthy: bool, reason: str) -> None:
        watch.healthy = healthy
        watch.reason = reason
        target = watch.target
        self.health.set(target.index, healthy, reason)
        self.metrics.backend_healthy.labels(target.pool, watch.label).set(1 if healthy else 0)
        pool_watches = [w for w in self.watches if w.target.pool == target.pool]
        unhealthy = {w.label for w in pool_watches if w.healthy is False}
        servers = {w.label for w in pool_watches}
        self.metrics.healthy_hosts.labels(target.pool).set(len(servers - unhealthy))
        self.metrics.unhealthy_hosts.labels(target.pool).set(len(unhealthy))

    # -- one probe ----------------------------------------------------------------------

    def probe_once(self, settings: BackendSettings, probe: Probe, server_text: str) -> None:
        server = parse_server(server_text, settings.port)
        with gevent.Timeout(probe.timeout, ProbeFailed("response_timeout", "probe timed out")):
            stream = self._connect(settings, probe, server.host, server.port)
            try:
                host = probe.host or settings.host_name or (
                    server.host if settings.pick_host_name_from_backend_address
                    else "127.0.0.1")
                stream.sendall(
                    f"GET {probe.path} HTTP/1.1\r\nHost: {host}\r\n"
                    "User-Agent: gatewayd-probe\r\nConnection: close\r\n\r\n".encode())
                status, body = _read_response(stream)
            finally:
                stream.close()
        if not any(low <= status <= high for low, high in probe.match_status_codes):
            raise ProbeFailed("status_mismatch", f"status {status}")
        if probe.match_body and probe.match_body.encode() not in body:
            raise ProbeFailed("body_mismatch", f"body lacks {probe.match_body!r}")

    def _connect(self, settings: BackendSettings, probe: Probe, host: str, port: int) -> Stream:
        try:  # cached, refreshed, last good kept: a DNS blip does not fail every probe
            infos = self.resolver.resolve(host, port)
        except OSError as exc:
            raise ProbeFailed("dns", str(exc)) from exc
        sock = None
        failure = ProbeFailed("connect_refused", "no address")
        for family, _, _, _, sockaddr in infos:  # every address, as requests do
            try:
                sock = open_tcp(sockaddr, family, settings.connect_timeout)
                break
            except StreamTimeout:
                failure = ProbeFailed("connect_timeout", "connect timed out")
            except OSError as exc:
                failure = ProbeFailed("connect_refused", str(exc))
        if sock is None:
            raise failure
        protocol = probe.protocol or settings.protocol
        if protocol == "http":
            return PlainStream(sock)
        context = self.contexts.get(settings.name) or client_context(settings)
        name = probe.host or settings.sni_name or settings.host_name or host
        stream = TLSStream.client(sock, context, None if is_ip_literal(name) else name)
        try:
            stream.handshake(settings.connect_timeout)
            leaf = stream.conn.get_peer_certificate(as_cryptography=True)
            check_backend(settings, leaf, verify_result(stream.conn), name)
        except (TLSHandshakeFailed, StreamTimeout, StreamClosed) as exc:
            stream.close()
            raise ProbeFailed("tls_handshake", str(exc)) from exc
        except TrustFailure as exc:
            stream.close()
            raise ProbeFailed(exc.reason, exc.detail) from exc
        return stream


def _read_response(stream: Stream) -> tuple[int, bytes]:
    parser = ResponseParser(request_method=b"GET")
    try:
        return _read_with(parser, stream)
    finally:
        parser.close()


def _read_with(parser: ResponseParser, stream: Stream) -> tuple[int, bytes]:
    status = 0
    body = bytearray()
    while True:
        try:
            data = stream.recv()
        except StreamClosed as exc:
            raise ProbeFailed("reset", str(exc)) from exc
        try:
            events = parser.feed(data) if data else parser.feed_eof()
        except HttpError as exc:
            raise ProbeFailed("invalid_response", exc.error_info) from exc
        for event in events:
            if isinstance(event, ResponseHead):
                if event.status >= 200:
                    status = event.status
            elif event is END:
                if status:
                    return status, bytes(body)
            elif isinstance(event, bytes) and len(body) < MAX_BODY:
                body += event
        if not data:
            raise ProbeFailed("invalid_response", "connection closed before a response")

