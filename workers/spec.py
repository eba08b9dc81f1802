"""What the master hands a worker across fork: plain data, importable without gevent so
the master can build it (the worker module itself imports gevent)."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from gatewayd.affinity import Draining
from gatewayd.health import Target
from gatewayd.model import Address, GatewayConfig
from gatewayd.routing import BindRouter, Router
from gatewayd.tlsconf import BindTLS

READY = b"R"  # + 4-byte pid, written to the master's ready pipe once a worker serves
STOPPED_ACCEPTING = b"S"  # + 4-byte pid, once a draining worker has closed its listeners


@dataclass(frozen=True, slots=True)
class BoundListener:
    """A listen socket bound by the master, with the routing and TLS built for it."""

    address: Address
    sock: socket.socket
    router: BindRouter
    tls: BindTLS | None


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything a worker needs, prepared by the master before fork."""

    config: GatewayConfig
    router: Router
    listeners: tuple[BoundListener, ...]
    heartbeat_path: str
    ready_fd: int
    master_pid: int
    generation: int
    health_path: str = ""  # the generation's shared health map ("" = no prober)
    targets: tuple[Target, ...] = ()
    affinity_secret: bytes = b""
    draining: tuple[Draining, ...] = ()
