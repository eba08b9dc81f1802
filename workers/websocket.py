"""WebSocket (RFC 6455) tunnels: after a backend's `101 Switching Protocols` the client
and backend connections are spliced byte for byte in both directions.

The gateway does not parse frames (like nginx and Azure Application Gateway): the
opening handshake went through the HTTP path, with routing, forwarding headers and
mutual TLS; after it, the two endpoints own the protocol, including the closing
handshake (their Close frames pass through).

- Backpressure: each direction reads a chunk and writes it completely before reading
  again, so a slow reader stalls its writer instead of filling memory.
- Idle timeout: the tunnel closes once neither direction has carried a byte for
  `websocket_idle_timeout` seconds (WebSocket pings count as traffic).
- Close: when one side ends its stream cleanly, the end is passed on (TLS
  close_notify / TCP FIN) and the other direction gets `CLOSE_GRACE` seconds to finish;
  a reset, a stalled write or the idle timeout closes both at once.

Each direction runs in its own greenlet and the two never wait on the same io watcher
(one reads a stream while the other writes it; renegotiation is off on both legs, so a
write never needs a read).  The stream timeouts are switched off for the splice and
replaced by `gevent.Timeout`s owned by each greenlet.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import gevent
from gevent import Greenlet, Timeout

from .tlsio import Stream, StreamClosed, StreamTimeout, TLSStream

__all__ = ["CLOSE_GRACE", "SpliceResult", "is_websocket_upgrade", "splice"]

CLOSE_GRACE = 10.0  # s the other direction may still run after one side ended


def is_websocket_upgrade(method: bytes, version: bytes,
                         headers: list[tuple[bytes, bytes]]) -> bool:
    """An HTTP/1.1 GET asking to upgrade to websocket (RFC 6455 §4.1, RFC 9110 §7.8)."""
    if method != b"GET" or version != b"1.1":
        return False
    for name, value in headers:
        if name.lower() == b"upgrade" and any(
                token.strip().lower() == b"websocket" for token in value.split(b",")):
            return True
    return False


@dataclass(slots=True)
class SpliceResult:
    """Bytes carried each way and why the tunnel ended (for the access log)."""

    client_to_backend: int = 0
    backend_to_client: int = 0
    reason: str = ""


class _Idle(Exception):
    pass


class _Activity:
    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = time.monotonic()


def _half_close(stream: Stream) -> None:
    """Tell the peer no more data comes (TLS close_notify, else TCP FIN)."""
    try:
        if isinstance(stream, TLSStream):
            stream.shutdown()
        else:
            stream.sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _direction(src: Stream, dst: Stream, first: bytes, activity: _Activity, idle: float,
               send_timeout: float, count: Callable[[int], None]) -> str:
    """Copy src → dst until EOF, error or idleness; returns the reason it ended."""
    try:
        if first:
            with Timeout(send_timeout, StreamTimeout):
                dst.sendall(first)
            count(len(first))
        while True:
            remaining = activity.last + idle - time.monotonic()
            if remaining <= 0:
                return "idle_timeout"
            try:
                with Timeout(remaining, _Idle):
                    data = src.recv()
            except _Idle:
                continue  # the other direction may have been busy: check again
            if not data:
                return "eof"
            activity.last = time.monotonic()
            with Timeout(send_timeout, StreamTimeout):
                dst.sendall(data)
            count(len(data))
    except StreamTimeout:
        return "send_timeout"
    except (StreamClosed, OSError):
        return "reset"


def splice(client: Stream, backend: Stream, *, to_backend: bytes = b"", to_client: bytes = b"",
           idle_timeout: float, send_timeout: float,
           on_client_bytes: Callable[[int], None] = lambda n: None,
           on_backend_bytes: Callable[[int], None] = lambda n: None) -> SpliceResult:
    """Run the tunnel until both directions end.  `to_backend` / `to_client` are bytes
    that arrived behind the handshake heads (a client may send its first frame without
    waiting for the 101, a backend its first message right after it).
    `on_client_bytes(n)` counts bytes read from the client, `on_backend_bytes(n)` bytes
    written to it."""
    result = SpliceResult()
    activity = _Activity()
    client.timeout = backend.timeout = None

    def up_count(n: int) -> None:
        result.client_to_backend += n
        on_client_bytes(n)

    def down_count(n: int) -> None:
        result.backend_to_client += n
        on_backend_bytes(n)

    up = Greenlet.spawn(_direction, client, backend, to_backend, activity, idle_timeout,
                        send_timeout, up_count)
    down = Greenlet.spawn(_direction, backend, client, to_client, activity, idle_timeout,
                          send_timeout, down_count)
    try:
        first = gevent.wait([up, down], count=1)[0]
        other, target = (down, backend) if first is up else (up, client)
        reason = first.value if first.successful() else "error"
        side = "client" if first is up else "backend"
        result.reason = f"{side}_{reason}" if reason in ("eof", "reset") else reason
        if reason == "eof":
            _half_close(target)  # pass the end on; the other side may still answer
            other.join(timeout=CLOSE_GRACE)
    finally:
        gevent.killall([up, down], block=True, timeout=1)
    return result
