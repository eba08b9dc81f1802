"""The two pieces of systemd's protocol gatewayd speaks, without libsystemd:
sd_notify(3) (a datagram to $NOTIFY_SOCKET) and sd_listen_fds(3) (LISTEN_FDS/LISTEN_PID)."""

from __future__ import annotations

import os
import socket
import time

SD_LISTEN_FDS_START = 3


def notify(*lines: str) -> bool:
    """Send `KEY=value` lines to the service manager; False when not under systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall("\n".join(lines).encode())
    except OSError:
        return False
    return True


def monotonic_usec() -> str:
    """MONOTONIC_USEC= for RELOADING=1, as systemd 253+ expects (CLOCK_MONOTONIC)."""
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


def listen_fds(unset: bool = True) -> list[socket.socket]:
    """Sockets passed by socket activation, if they are meant for this process."""
    try:
        if int(os.environ.get("LISTEN_PID", "0")) != os.getpid():
            return []
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        sock = socket.socket(fileno=fd)
        sock.set_inheritable(True)
        sockets.append(sock)
    return sockets
