"""Greenlets that serve one connection after another, instead of one new greenlet each.

A new greenlet per accepted connection costs, besides creating it, gevent's Greenlet and
Pool bookkeeping (links, a semaphore, a callback when it ends) and, on CPython 3.11, a
fresh 16 KiB chunk of interpreter frame stack: an mmap when its first Python frame runs
and an munmap when it dies, with the page faults in between (`strace` showed one of each
per connection).  A greenlet that finishes a connection parks instead and takes the next
one; at most `PARKED_KEPT` wait, the rest end.

Same contract as the `gevent.pool.Pool` it replaces: `spawn` blocks while `limit`
connections are being served (worker_connections), `join` waits for them to end, `kill`
ends them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import Event
from gevent.hub import get_hub
from greenlet import GreenletExit, getcurrent, greenlet

PARKED_KEPT = 128  # idle serving greenlets kept for the next connections


class ServingGreenlets:
    """Runs `fn(*args)` for each connection on a reused greenlet, at most `limit` at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._hub = get_hub()
        self._active: set[greenlet] = set()
        self._parked: list[greenlet] = []
        self._room = Event()  # set while fewer than `limit` connections are served
        self._room.set()
        self._empty = Event()  # set while no connection is served
        self._empty.set()

    def __len__(self) -> int:
        return len(self._active)

    def spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        """Serve `fn(*args)` soon, on a parked greenlet if there is one; blocks while
        `limit` connections are being served."""
        while len(self._active) >= self.limit:
            self._room.clear()
            self._room.wait()
        serving = None
        while self._parked:
            candidate = self._parked.pop()
            if not candidate.dead:
                serving = candidate
                break
        if serving is None:
            serving = greenlet(self._serve_forever, parent=self._hub)
        self._active.add(serving)
        self._empty.clear()
        self._hub.loop.run_callback(serving.switch, (fn, args))

    def _serve_forever(self, job: tuple[Callable[..., Any], tuple[Any, ...]]) -> None:
        me = getcurrent()
        while True:
            fn, args = job
            try:
                fn(*args)
            finally:
                self._active.discard(me)
                self._room.set()
                if not self._active:
                    self._empty.set()
            if len(self._parked) >= PARKED_KEPT:
                return
            self._parked.append(me)
            while True:
                try:
                    job = self._hub.switch()  # until spawn() hands over the next connection
                except BaseException:  # killed while parked
                    if me in self._parked:
                        self._parked.remove(me)
                    raise
                if type(job) is tuple and len(job) == 2:
                    break
                # anything else is a stray wake-up: stay parked

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no connection is served (or `timeout`); True if none is."""
        return self._empty.wait(timeout)

    def kill(self, timeout: float | None = None) -> None:
        """End every connection being served (GreenletExit thrown into it), waiting up to
        `timeout` for them to finish."""
        for serving in list(self._active):
            gevent.kill(serving, GreenletExit)
        self.join(timeout)
