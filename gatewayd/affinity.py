"""Cookie-based session affinity, stateless (CONTRACT §6, §11).

The cookie value is an HMAC-SHA256, keyed by the shared `affinity_secret_file`, of the
pool and server identity.  Any instance holding the same secret maps the same cookie to
the same server without sharing state, so instances scale out behind an L4 balancer.  A
value that matches no current (or draining) server — forged, or for a removed server — is
simply not found: the request is balanced and a fresh cookie is set.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Draining:
    """A server a reload removed from `pool`, still reachable by its affinity cookie until
    `deadline` (time.time()) — Azure's connection draining."""

    pool: str
    server: str
    deadline: float


VALUE_LENGTH = 32  # hex characters: 128 bits of the MAC
CORS_SUFFIX = "CORS"


def load_secret(path: str) -> bytes:
    """The shared secret; without a file, a random one (this instance only)."""
    if not path:
        return os.urandom(32)
    with open(path, "rb") as fh:
        secret = fh.read().strip()
    if len(secret) < 16:
        raise ValueError(f"{path}: an affinity secret needs at least 16 bytes")
    return secret


def cookie_value(secret: bytes, pool: str, server: str) -> str:
    mac = hmac.new(secret, f"{pool}\0{server}".encode(), hashlib.sha256)
    return mac.hexdigest()[:VALUE_LENGTH]


def value_table(secret: bytes, pool: str, servers: Iterable[str]) -> dict[str, str]:
    """cookie value → server, built once per pool (lookups are then a dict get)."""
    return {cookie_value(secret, pool, server): server for server in servers}


def read_cookie(headers: Iterable[tuple[bytes, bytes]], name: str) -> str | None:
    """The value of cookie `name` (or `<name>CORS`) in the request's Cookie headers."""
    wanted = {name.encode(), (name + CORS_SUFFIX).encode()}
    for header, value in headers:
        if header.lower() != b"cookie":
            continue
        for part in value.split(b";"):
            key, eq, cookie = part.strip().partition(b"=")
            if eq and key in wanted:
                return cookie.strip().strip(b'"').decode("latin-1")
    return None


def set_cookie_headers(name: str, value: str) -> list[tuple[bytes, bytes]]:
    """Azure's pair: the plain cookie, and `<name>CORS` for cross-site requests."""
    return [
        (b"Set-Cookie", f"{name}={value}; Path=/".encode()),
        (b"Set-Cookie", f"{name}{CORS_SUFFIX}={value}; Path=/; SameSite=None; Secure".encode()),
    ]
