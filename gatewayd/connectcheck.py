"""`gatewayd --check --connect`: handshake every backend server with its real settings
(SNI, pins, roots, minimum TLS version) and say, per server, OK or why not.

Runs in the CLI process with blocking sockets (no gevent); the trust decision is the same
pure function the workers use, so a green check means the workers will accept it too.
"""

from __future__ import annotations

import select
import socket
import time
from typing import TextIO

from cryptography import x509
from OpenSSL import SSL

from gatewayd.config_sections import split_host_port
from gatewayd.health import pairs
from gatewayd.model import BackendSettings, GatewayConfig
from gatewayd.pins import format_pin, spki_sha256
from gatewayd.tlsconf import client_context, verify_result
from gatewayd.trust import TrustFailure, check_backend, is_ip_literal, sni_for


def check_all(config: GatewayConfig, out: TextIO) -> bool:
    ok = True
    for pool_name, settings_name in pairs(config):
        settings = config.backend_settings[settings_name]
        for server in config.backend_pools[pool_name].servers:
            host, written_port = split_host_port(server)
            port = written_port if written_port is not None else settings.port
            verdict = check_server(settings, host, port)
            ok = ok and verdict.startswith("OK")
            print(f"{pool_name}/{settings_name} {host}:{port}: {verdict}", file=out)
    return ok


def check_server(settings: BackendSettings, host: str, port: int) -> str:
    try:
        sock = socket.create_connection((host, port), timeout=settings.connect_timeout)
    except socket.gaierror as exc:
        return f"dns: {exc}"
    except ConnectionRefusedError:
        return "connect_refused"
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return f"connect_refused: {exc}"
    with sock:
        if settings.protocol == "http":
            return "OK (plain http: no certificate to check)"
        name = sni_for(settings, host, "")
        conn = SSL.Connection(client_context(settings), sock)
        if name and not is_ip_literal(name):
            conn.set_tlsext_host_name(name.encode("idna"))
        conn.set_connect_state()
        try:
            _handshake(conn, sock, settings.connect_timeout)
        except TimeoutError:
            return "timeout"
        except SSL.Error as exc:
            return f"tls_handshake: {exc}"
        leaf = conn.get_peer_certificate(as_cryptography=True)
        result = verify_result(conn)
        version = conn.get_protocol_version_name()
        try:
            if name:
                check_backend(settings, leaf, result, name)
                note = ""
            else:
                _check_chain_only(settings, leaf, result)
                pins_only = settings.pins and not settings.trusted_roots_pem  # §4: no name
                note = "" if pins_only else " (name checked per request against the client's Host)"
        except TrustFailure as exc:
            return f"{exc.reason}: {exc.detail}"
        pin = format_pin(spki_sha256(leaf)) if leaf is not None else "-"
        return f"OK {version} {pin}{note}"


def _handshake(conn: SSL.Connection, sock: socket.socket, timeout: float) -> None:
    """Blocking-style handshake on the non-blocking socket a timeout leaves behind."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.do_handshake()
            return
        except SSL.WantReadError:
            readable, writable = [sock], []
        except SSL.WantWriteError:
            readable, writable = [], [sock]
        left = deadline - time.monotonic()
        if left <= 0 or not any(select.select(readable, writable, [], left)):
            raise TimeoutError("handshake timed out")


def _check_chain_only(
    settings: BackendSettings, leaf: x509.Certificate | None, result: int
) -> None:
    """Pins and chain, but no name: without host_name/sni_name the name to verify is
    each request's Host, unknown here."""
    try:
        check_backend(settings, leaf, result, "")
    except TrustFailure as exc:
        if exc.reason != "name_mismatch":
            raise
