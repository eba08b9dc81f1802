"""Give a worker's freed memory back to the system after a connection spike.

glibc's allocator keeps freed heap memory for reuse instead of returning it: measured with
the bench's gatewayd, a worker idles at 42 MiB, holds 374 MiB with 10,000 idle TLS client
connections, and still held 335 MiB once they had all closed (~100 MiB with the trim).
An operator reads that as a leak.  `malloc_trim(0)` returns the free pages (OpenSSL's
per-connection buffers and the greenlets' stacks are plain malloc memory).

It is called from the worker's once-a-second heartbeat when the open connections have
fallen to half of their peak since the last trim, and the peak was large enough to matter
(`MIN_PEAK`): so it runs after a spike has drained, not under steady load, and at most
once per halving.  No glibc (musl, say): nothing is trimmed.  No sockets and no gevent.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

#: Below this many connections at the peak, what could be returned is not worth a trim
#: (~33 KiB per idle TLS connection: 256 of them hold ~8 MB).
MIN_PEAK = 256


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim from the process's own C library, or None without one."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class MemoryTrimmer:
    """Decides when to trim from the number of open connections, seen once a second."""

    def __init__(self, trim: Callable[[int], int] | None, min_peak: int = MIN_PEAK) -> None:
        """`trim`: malloc_trim() here; None (no glibc) makes every observe a no-op."""
        self._trim = trim
        self._min_peak = min_peak
        self._peak = 0
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def observe(self, connections: int) -> bool:
        """Note the open connections now; True if this call trimmed."""
        if connections > self._peak:
            self._peak = connections
            return False
        if self._trim is None or self._peak < self._min_peak or 2 * connections > self._peak:
            return False
        self._trim(0)
        self._peak = connections
        self.trims += 1
        return True
