"""Listen sockets: bound by the master before any worker forks, or inherited from systemd
socket activation (LISTEN_FDS), matched to listeners by address.

Sockets are keyed by `Address` so a reload can keep the ones still configured, bind the
new ones before touching anything old, and close the ones no longer used.
"""

from __future__ import annotations

import ipaddress
import socket

from gatewayd.model import Address

BACKLOG = 2048


class BindError(Exception):
    """A listen address could not be bound (in use, permission, bad address)."""


def _family(host: str) -> int:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET


def bind(address: Address) -> socket.socket:
    host = address.host or "0.0.0.0"
    family = _family(host)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, address.port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot listen on {address}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


def address_of(sock: socket.socket) -> Address:
    name = sock.getsockname()
    return Address(str(name[0]), int(name[1]))


def same_address(a: Address, b: Address) -> bool:
    """Compare a configured address with a bound one ("localhost" is not resolved)."""
    if a.port != b.port:
        return False
    try:
        return ipaddress.ip_address(a.host or "0.0.0.0") == ipaddress.ip_address(b.host)
    except ValueError:
        return a.host == b.host


class ListenerSet:
    """The master's listen sockets by configured address."""

    def __init__(self, inherited: list[socket.socket] | None = None) -> None:
        self.sockets: dict[Address, socket.socket] = {}
        self._inherited = list(inherited or [])

    def ensure(self, addresses: list[Address]) -> list[Address]:
        """Bind (or adopt an inherited socket for) every address not yet open; returns
        the addresses newly opened.  On failure nothing new stays bound."""
        opened: list[Address] = []
        try:
            for address in addresses:
                if address in self.sockets:
                    continue
                self.sockets[address] = self._adopt(address) or bind(address)
                opened.append(address)
        except BindError:
            for address in opened:
                self.sockets.pop(address).close()
            raise
        return opened

    def _adopt(self, address: Address) -> socket.socket | None:
        for sock in self._inherited:
            if same_address(address, address_of(sock)):
                self._inherited.remove(sock)
                sock.set_inheritable(True)
                return sock
        return None

    def close_unused(self, keep: list[Address]) -> None:
        for address in [a for a in self.sockets if a not in keep]:
            self.sockets.pop(address).close()

    def close_all(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()
