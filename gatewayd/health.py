"""The health state one prober shares with every worker of a generation.

Design (CONTRACT §3 probes, issue "one prober per instance"): the master forks ONE prober
process per generation next to its workers.  The prober probes every backend target and
writes each verdict into a small file in `runtime_dir`, mapped into memory by the prober
and by every worker (mmap, MAP_SHARED).  A worker reads a target's byte on every server
choice, so all workers act on a new verdict at once, and probe traffic does not grow
with the worker count.  Workers write back two things: a "check now" flag when a request
met a connect failure (passive health: the prober probes that target immediately), and
the instance-wide round-robin counters, so balancing spreads across the instance rather
than per worker.  Counter updates are read-add-write without a lock: a lost increment
only repeats a server once, which is harmless for balancing.

Layout: a header, then one 4-byte slot per target (state, reason, check-now, a success
counter that lets workers lift a passive "down" mark as soon as a probe succeeds), then
one 8-byte round-robin counter per (pool, settings) pair.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Final

from gatewayd.model import GatewayConfig

MAGIC: Final = b"GWHEALTH"
_HEADER: Final = struct.Struct("<8sII")  # magic, targets, pairs
_COUNTER: Final = struct.Struct("<Q")
SLOT: Final = 4

UNKNOWN: Final = 0  # not probed yet: served like HEALTHY
HEALTHY: Final = 1
UNHEALTHY: Final = 2
REASONS: Final = (
    "", "connect_refused", "connect_timeout", "dns", "tls_handshake", "pin_mismatch",
    "name_mismatch", "untrusted_chain", "expired", "response_timeout", "reset",
    "invalid_response", "status_mismatch", "body_mismatch",
)
_REASON_CODES: Final = {name: code for code, name in enumerate(REASONS)}


@dataclass(frozen=True, slots=True)
class Target:
    """One server as reached through one backend settings: what a probe checks."""

    index: int
    pair: int  # index of its (pool, settings) pair
    pool: str
    settings: str
    server: str  # as written in the pool: host[:port]


def pairs(config: GatewayConfig) -> list[tuple[str, str]]:
    """Every (backend_pool, backend_settings) combination some rule can route to."""
    seen: dict[tuple[str, str], None] = {}
    for rule in config.rules:
        seen.setdefault((rule.backend_pool, rule.backend_settings), None)
        for path_rule in rule.path_rules:
            seen.setdefault((path_rule.backend_pool, path_rule.backend_settings), None)
    return [pair for pair in seen if pair[0]]  # a redirect has no pool


def targets(config: GatewayConfig) -> list[Target]:
    found: list[Target] = []
    for pair_index, (pool, settings) in enumerate(pairs(config)):
        for server in config.backend_pools[pool].servers:
            found.append(Target(len(found), pair_index, pool, settings, server))
    return found


class HealthMap:
    """The shared file, mapped.  Create it in the master, open it in the children."""

    def __init__(self, path: str, mapping: mmap.mmap, n_targets: int, n_pairs: int) -> None:
        self.path = path
        self._mm = mapping
        self._slots = _HEADER.size
        self._counters = _HEADER.size + n_targets * SLOT
        self.n_targets = n_targets
        self.n_pairs = n_pairs

    @classmethod
    def create(cls, path: str, n_targets: int, n_pairs: int) -> HealthMap:
        size = _HEADER.size + n_targets * SLOT + max(n_pairs, 1) * _COUNTER.size
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(_HEADER.pack(MAGIC, n_targets, n_pairs))
            fh.write(bytes(size - _HEADER.size))
        os.replace(tmp, path)
        return cls.open(path)

    @classmethod
    def open(cls, path: str) -> HealthMap:
        fd = os.open(path, os.O_RDWR)
        try:
            mapping = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        magic, n_targets, n_pairs = _HEADER.unpack_from(mapping, 0)
        if magic != MAGIC:
            raise ValueError(f"{path}: not a gatewayd health file")
        return cls(path, mapping, n_targets, n_pairs)

    # -- verdicts (written by the prober) ---------------------------------------------

    def state(self, index: int) -> int:
        return self._mm[self._slots + index * SLOT]

    def healthy(self, index: int) -> bool:
        return self._mm[self._slots + index * SLOT] != UNHEALTHY

    def reason(self, index: int) -> str:
        code = self._mm[self._slots + index * SLOT + 1]
        return REASONS[code] if code < len(REASONS) else "other"

    def set(self, index: int, healthy: bool, reason: str = "") -> None:
        base = self._slots + index * SLOT
        self._mm[base + 1] = 0 if healthy else _REASON_CODES.get(reason, 0)
        self._mm[base] = HEALTHY if healthy else UNHEALTHY

    def successes(self, index: int) -> int:
        return self._mm[self._slots + index * SLOT + 3]

    def count_success(self, index: int) -> None:
        offset = self._slots + index * SLOT + 3
        self._mm[offset] = (self._mm[offset] + 1) & 0xFF

    def copy_verdicts(self, old: HealthMap, old_targets: list[Target],
                      new_targets: list[Target]) -> None:
        """Carry verdicts of unchanged targets into a new generation's map, so a reload
        does not send traffic to a dead server until it is probed again."""
        where = {(t.pool, t.settings, t.server): t.index for t in old_targets}
        for target in new_targets:
            index = where.get((target.pool, target.settings, target.server))
            if index is not None and index < old.n_targets:
                state = old.state(index)
                if state != UNKNOWN:
                    self.set(target.index, state == HEALTHY, old.reason(index))

    # -- passive health (workers ask, the prober answers) ------------------------------

    def request_check(self, index: int) -> None:
        self._mm[self._slots + index * SLOT + 2] = 1

    def take_check_requests(self) -> list[int]:
        wanted = []
        for index in range(self.n_targets):
            flag = self._slots + index * SLOT + 2
            if self._mm[flag]:
                self._mm[flag] = 0
                wanted.append(index)
        return wanted

    # -- instance-wide round robin -----------------------------------------------------

    def next_turn(self, pair: int) -> int:
        offset = self._counters + pair * _COUNTER.size
        (value,) = _COUNTER.unpack_from(self._mm, offset)
        _COUNTER.pack_into(self._mm, offset, (value + 1) & 0xFFFFFFFFFFFFFFFF)
        return value

    def close(self) -> None:
        self._mm.close()
