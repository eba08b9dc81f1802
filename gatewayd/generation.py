"""A generation: one config with everything its processes need, built in the master before
they fork (routing tables, TLS contexts, the shared health map, the affinity secret and
the servers still draining from earlier generations).

Kept apart from the master, which only starts, watches and stops processes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from gatewayd import affinity, health
from gatewayd.affinity import Draining
from gatewayd.health import HealthMap, Target
from gatewayd.listeners import ListenerSet
from gatewayd.model import GatewayConfig
from gatewayd.routing import Router
from gatewayd.tlsconf import bind_tls
from gatewayd.workers.spec import BoundListener


@dataclass
class WorkerInfo:
    pid: int
    generation: int
    heartbeat: str
    started: float
    ready: bool = False


@dataclass
class Generation:
    number: int
    config: GatewayConfig
    spec_listeners: tuple[BoundListener, ...]
    router: Router
    targets: tuple[Target, ...]
    health_path: str
    secret: bytes
    draining: tuple[Draining, ...]
    workers: dict[int, WorkerInfo] = field(default_factory=dict)
    prober_pid: int = 0
    next_prober_spawn: float = 0.0


def build(config: GatewayConfig, listeners: ListenerSet, number: int,
          previous: Generation | None, fallback_secret: bytes) -> Generation:
    """Bind what is new, compile routing and TLS, create the health map.  Raises
    BindError/OSError/ValueError with an operator message when something cannot be had."""
    listeners.ensure(config.binds())
    router = Router(config)
    bound = tuple(
        BoundListener(address, listeners.sockets[address], router.for_bind(address),
                      bind_tls(router.for_bind(address)))
        for address in config.binds()
    )
    targets = tuple(health.targets(config))
    path = os.path.join(config.server.runtime_dir, f"health-{number}.bin")
    health_map = HealthMap.create(path, len(targets), len(health.pairs(config)))
    if previous is not None:
        try:
            old = HealthMap.open(previous.health_path)
        except (OSError, ValueError):
            pass  # nothing to carry over
        else:
            health_map.copy_verdicts(old, list(previous.targets), list(targets))
            old.close()
    health_map.close()
    secret_file = config.server.affinity_secret_file
    secret = affinity.load_secret(secret_file) if secret_file else fallback_secret
    return Generation(number, config, bound, router, targets, path, secret,
                      draining_after(previous, config))


def draining_after(previous: Generation | None, config: GatewayConfig) -> tuple[Draining, ...]:
    """Servers the new config removed from a pool (or still draining from before): with
    cookie affinity they keep their sessions for connection_draining_timeout."""
    if previous is None:
        return ()
    now = time.time()
    kept = [d for d in previous.draining if d.deadline > now
            and d.server not in _servers(config, d.pool)]
    old = previous.config
    for pool in old.backend_pools.values():
        timeout = _draining_timeout(old, pool.name)
        if timeout <= 0:
            continue
        for server in pool.servers:
            if server not in _servers(config, pool.name):
                kept.append(Draining(pool.name, server, now + timeout))
    return tuple(kept)


def _servers(config: GatewayConfig, pool: str) -> tuple[str, ...]:
    found = config.backend_pools.get(pool)
    return found.servers if found else ()


def _draining_timeout(config: GatewayConfig, pool: str) -> float:
    """The longest draining timeout among the affinity settings routed with `pool`."""
    longest = 0.0
    for pool_name, settings_name in health.pairs(config):
        settings = config.backend_settings[settings_name]
        if pool_name == pool and settings.cookie_based_affinity:
            longest = max(longest, settings.connection_draining_timeout)
    return longest


def remove_files(generation: Generation) -> None:
    try:
        os.unlink(generation.health_path)
    except OSError:
        pass
