"""Backend host names → addresses, cached per worker and refreshed in the background.

Names are resolved when the worker boots and every `REFRESH` seconds after that (through
gevent's resolver, so a slow DNS server never blocks the event loop).  When a refresh
fails, the last good addresses stay in use and the failure is logged once per streak, so
a DNS outage does not take healthy backends out of service.  IP literals skip all this.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Any

import gevent
from gevent import socket as gsocket

log = logging.getLogger("gatewayd.dns")
REFRESH = 30.0

AddrInfo = list[tuple[Any, ...]]


class Resolver:
    def __init__(self) -> None:
        self._cache: dict[tuple[str, int], AddrInfo] = {}
        self._failing: set[tuple[str, int]] = set()

    @staticmethod
    def _literal(host: str, port: int) -> AddrInfo | None:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return None
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 0, "", (host, port))]

    def resolve(self, host: str, port: int) -> AddrInfo:
        """Addresses for host:port; OSError only if it never resolved."""
        literal = self._literal(host, port)
        if literal is not None:
            return literal
        cached = self._cache.get((host, port))
        if cached is not None:
            return cached
        return self._lookup(host, port)

    def _lookup(self, host: str, port: int) -> AddrInfo:
        key = (host, port)
        try:
            infos = gsocket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        except OSError as exc:
            if key not in self._failing:
                self._failing.add(key)
                kept = "keeping the last good addresses" if key in self._cache \
                    else "no address known yet"
                log.warning("cannot resolve %s: %s (%s)", host, exc, kept)
            if key in self._cache:
                return self._cache[key]
            raise
        if key in self._failing:
            self._failing.discard(key)
            log.warning("%s resolves again", host)
        self._cache[key] = list(infos)
        return self._cache[key]

    def refresh_forever(self, names: list[tuple[str, int]]) -> None:
        """Resolve `names` now (at boot) and every REFRESH seconds."""
        while True:
            for host, port in names:
                if self._literal(host, port) is None:
                    try:
                        self._lookup(host, port)
                    except OSError:
                        pass  # logged; requests to it fail with reason "dns"
            gevent.sleep(REFRESH)
