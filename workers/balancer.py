"""Which server of a pool gets a request: health, instance-wide round robin, cookie
affinity and connection draining.

- Health comes from the prober through the shared health map (gatewayd/health.py); a
  server this worker just failed to reach is also avoided locally for a short while
  (passive health) and the prober is asked to probe it now.
- Round robin uses the instance-wide counter of the (pool, settings) pair in the shared
  map, so N workers together spread connections evenly, not each on its own.
- Affinity (`cookie_based_affinity`): a valid cookie picks its server while that server
  is healthy, or while it drains after a reload removed it (`connection_draining_timeout`);
  otherwise the request is balanced and the response sets a fresh cookie.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from gatewayd import affinity
from gatewayd.affinity import Draining
from gatewayd.health import HealthMap, Target
from gatewayd.model import BackendPool, BackendSettings

from .upstream import Server, parse_server

PASSIVE_DOWN_SECONDS: Final = 10.0  # a server this worker could not reach is skipped this long


@dataclass(slots=True)
class _Pair:
    """The servers of one pool as reached through one backend settings."""

    key: tuple[str, str]  # (pool, settings)
    index: int
    settings: BackendSettings
    servers: list[Server]
    texts: list[str]  # as written in the pool: the identity behind the cookie
    slots: list[int]  # health-map target index per server (-1: not probed)
    cookies: dict[str, int] = field(default_factory=dict)  # cookie value → server position


class Balancer:
    def __init__(self, pools: dict[str, BackendPool], settings: dict[str, BackendSettings],
                 health: HealthMap | None, targets: list[Target], secret: bytes,
                 draining: tuple[Draining, ...] = ()) -> None:
        self._pools = pools
        self._settings = settings
        self._health = health
        self._secret = secret
        self._slots = {(t.pool, t.settings, t.server): t.index for t in targets}
        self._pair_index = {(t.pool, t.settings): t.pair for t in targets}
        self._pairs: dict[str, dict[str, _Pair]] = {}  # pool → settings → pair
        self._down_until: dict[Server, float] = {}
        self._down_seen: dict[Server, tuple[int, int]] = {}  # slot, prober successes then
        self._local_turns: dict[tuple[str, str], int] = {}
        self._draining: dict[str, dict[str, tuple[Server, float]]] = {}
        for entry in draining:
            value = affinity.cookie_value(secret, entry.pool, entry.server)
            self._draining.setdefault(entry.pool, {})[value] = (
                parse_server(entry.server, 0), entry.deadline)

    def _pair(self, pool: str, settings_name: str) -> _Pair:
        try:
            return self._pairs[pool][settings_name]
        except KeyError:
            key = (pool, settings_name)
            settings = self._settings[settings_name]
            texts = list(self._pools[pool].servers)
            pair = _Pair(
                key=key,
                index=self._pair_index.get(key, -1),
                settings=settings,
                servers=[parse_server(text, settings.port) for text in texts],
                texts=texts,
                slots=[self._slots.get((pool, settings_name, text), -1) for text in texts],
            )
            if settings.cookie_based_affinity:
                table = affinity.value_table(self._secret, pool, texts)
                pair.cookies = {value: texts.index(text) for value, text in table.items()}
            self._pairs.setdefault(pool, {})[settings_name] = pair
            return pair

    def servers(self, pool: str, settings_name: str) -> list[Server]:
        return self._pair(pool, settings_name).servers

    def _usable(self, pair: _Pair, position: int, now: float) -> bool:
        slot = pair.slots[position]
        health = self._health
        if slot >= 0 and health is not None and not health.healthy(slot):
            return False
        server = pair.servers[position]
        until = self._down_until.get(server)
        if until is None:
            return True
        seen = self._down_seen.get(server)
        if until < now or (seen is not None and health is not None
                           and health.successes(seen[0]) != seen[1]):
            del self._down_until[server]  # expired, or the prober reached it since
            self._down_seen.pop(server, None)
            return True
        return False

    def choose(
        self, pool: str, settings_name: str, request_headers: list[tuple[bytes, bytes]]
    ) -> tuple[Server, Sequence[tuple[bytes, bytes]]]:
        """The server for a request and the headers to add to its response (a fresh
        affinity cookie when one is due); IndexError when no server is usable."""
        pair = self._pair(pool, settings_name)
        settings = pair.settings
        if not settings.cookie_based_affinity:
            return self._pick(pair, None), ()
        value = affinity.read_cookie(request_headers, settings.affinity_cookie_name)
        if value is not None:
            position = pair.cookies.get(value)
            if position is not None and self._usable(pair, position, time.monotonic()):
                return pair.servers[position], ()
            drained = self._draining.get(pool, {}).get(value)
            if drained is not None and drained[1] > time.time():
                server = drained[0]
                if not server.port:
                    server = Server(server.host, settings.port)
                return server, ()
        server = self.pick(pool, settings_name)
        position = pair.servers.index(server)
        cookie = affinity.cookie_value(self._secret, pool, pair.texts[position])
        return server, affinity.set_cookie_headers(settings.affinity_cookie_name, cookie)

    def pick(self, pool: str, settings_name: str, exclude: Server | None = None) -> Server:
        """Round robin over the usable servers; IndexError when there is none."""
        return self._pick(self._pair(pool, settings_name), exclude)

    def _pick(self, pair: _Pair, exclude: Server | None) -> Server:
        health = self._health
        if exclude is None and not self._down_until:  # the common case, kept short
            if health is None:
                usable = pair.servers
            elif len(pair.servers) == 1:  # one server: no list, no turn to take
                slot = pair.slots[0]
                if slot < 0 or health.healthy(slot):
                    return pair.servers[0]
                raise IndexError(pair.key[0])
            else:
                healthy = health.healthy
                usable = [server for server, slot in zip(pair.servers, pair.slots, strict=True)
                          if slot < 0 or healthy(slot)]
        else:
            now = time.monotonic()
            usable = [server for position, server in enumerate(pair.servers)
                      if self._usable(pair, position, now) and server != exclude]
        if len(usable) == 1:
            return usable[0]
        if not usable:
            raise IndexError(pair.key[0])
        return usable[self._next_turn(pair) % len(usable)]

    def _next_turn(self, pair: _Pair) -> int:
        if self._health is not None and pair.index >= 0:
            return self._health.next_turn(pair.index)
        turn = self._local_turns.get(pair.key, 0)
        self._local_turns[pair.key] = turn + 1
        return turn

    def mark_down(self, pool: str, settings_name: str, server: Server) -> None:
        """Passive health: avoid `server` here for a while and ask the prober to look."""
        self._down_until[server] = time.monotonic() + PASSIVE_DOWN_SECONDS
        pair = self._pair(pool, settings_name)
        if server in pair.servers and self._health is not None:
            slot = pair.slots[pair.servers.index(server)]
            if slot >= 0:
                self._down_seen[server] = (slot, self._health.successes(slot))
                self._health.request_check(slot)

    def cookie_headers(self, pool: str, settings_name: str,
                       server: Server) -> list[tuple[bytes, bytes]]:
        """A fresh affinity cookie for `server` (after a retry moved the request)."""
        pair = self._pair(pool, settings_name)
        if not pair.settings.cookie_based_affinity or server not in pair.servers:
            return []
        text = pair.texts[pair.servers.index(server)]
        value = affinity.cookie_value(self._secret, pool, text)
        return affinity.set_cookie_headers(pair.settings.affinity_cookie_name, value)
