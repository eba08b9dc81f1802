"""Per-worker metric counting in plain dicts, flushed to prometheus_client once a second.

The request path only does dict arithmetic here (~0.2 µs an update); `flush()` moves the
deltas into the multiprocess files (see gatewayd/metrics.py for why).  Gauges are kept as
current values and written when they changed.  A worker killed with SIGKILL loses at most
the last second of counts; counters never go backwards.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections import defaultdict
from typing import Any

from gatewayd import metrics as m

_NBUCKETS = len(m.LATENCY_BUCKETS) + 1
_BOUNDS = m.LATENCY_BUCKETS
# _bucket(_BOUNDS, seconds): the first bucket whose upper bound holds `seconds` (last: +Inf)
_bucket = bisect_left
_STATUS_TEXT = tuple(str(code) for code in range(1000))  # label values, made once
_CODE_CLASS = tuple(f"{digit}xx" for digit in range(10))


class _Histogram:
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * _NBUCKETS
        self.total = 0.0


class Stats:
    """What one worker has counted since the last flush."""

    def __init__(self, listeners: tuple[str, ...] = ()) -> None:
        self.metrics = m.setup()
        self.worker_connections, self.worker_in_flight = m.worker_gauges()
        self.counters: defaultdict[tuple[str, tuple[str, ...]], float] = defaultdict(float)
        self.histograms: dict[tuple[str, tuple[str, ...]], _Histogram] = {}
        self.client_connections: defaultdict[str, int] = defaultdict(int)
        self.connections = 0
        self.in_flight = 0
        self._written_gauges: dict[Any, float] = {}
        self._children: dict[tuple[str, tuple[str, ...]], Any] = {}
        self.backend_not_after: dict[str, float] = {}
        for name in listeners:  # exported at 0 from boot, not from the first client
            self.client_connections[name] = 0

    # -- recording (hot path) ---------------------------------------------------------

    def count(self, metric: str, labels: tuple[str, ...], amount: float = 1.0) -> None:
        self.counters[(metric, labels)] += amount

    def observe(self, metric: str, labels: tuple[str, ...], seconds: float) -> None:
        key = (metric, labels)
        hist = self.histograms.get(key)
        if hist is None:
            hist = self.histograms[key] = _Histogram()
        hist.counts[_bucket(_BOUNDS, seconds)] += 1
        hist.total += seconds

    # The two per-request updates below do by hand what count() and observe() do: they
    # run for every request, and each Python call saved there is measurable.

    def request_done(self, listener: str, rule: str, pool: str, status: int,
                     duration: float) -> None:
        text = _STATUS_TEXT[status] if status < 1000 else str(status)
        self.counters[("requests", (listener, rule, pool, text))] += 1
        key = ("request_duration", (listener,))
        hist = self.histograms.get(key)
        if hist is None:
            hist = self.histograms[key] = _Histogram()
        hist.counts[_bucket(_BOUNDS, duration)] += 1
        hist.total += duration

    def backend_response(self, pool: str, server: str, status: int,
                         first_byte: float) -> None:
        """A response head from a backend, `first_byte` seconds after the request went."""
        self.counters[("backend_responses", (pool, server, _CODE_CLASS[status // 100]))] += 1
        key = ("backend_first_byte", (pool, server))
        hist = self.histograms.get(key)
        if hist is None:
            hist = self.histograms[key] = _Histogram()
        hist.counts[_bucket(_BOUNDS, first_byte)] += 1
        hist.total += first_byte

    # -- flushing (once a second, from a greenlet) ------------------------------------

    def _child(self, metric: str, labels: tuple[str, ...]) -> Any:
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            parent = getattr(self.metrics, metric)
            child = parent.labels(*labels) if labels else parent
            self._children[key] = child
        return child

    def flush(self) -> None:
        counters, self.counters = self.counters, defaultdict(float)
        for (metric, labels), amount in counters.items():
            self._child(metric, labels).inc(amount)
        histograms, self.histograms = self.histograms, {}
        for (metric, labels), hist in histograms.items():
            m.apply_histogram(self._child(metric, labels), hist.counts, hist.total)
        gauges: list[tuple[Any, float]] = [
            (self._child("client_connections", (name,)), float(value))
            for name, value in self.client_connections.items()
        ]
        gauges.append((self.worker_connections, float(self.connections)))
        gauges.append((self.worker_in_flight, float(self.in_flight)))
        gauges += [(self._child("certificate_not_after", ("backend", name)), value)
                   for name, value in self.backend_not_after.items()]
        for child, value in gauges:
            if self._written_gauges.get(id(child)) != value:
                child.set(value)
                self._written_gauges[id(child)] = value


class NullStats(Stats):
    """Counts nothing (GATEWAYD_METRICS=off): only for measuring what metrics cost.  The
    few direct `counters[key] += n` updates of the hot path still land in a dict that is
    never flushed; everything else is a no-op."""

    def count(self, metric: str, labels: tuple[str, ...], amount: float = 1.0) -> None:
        pass

    def observe(self, metric: str, labels: tuple[str, ...], seconds: float) -> None:
        pass

    def request_done(self, listener: str, rule: str, pool: str, status: int,
                     duration: float) -> None:
        pass

    def backend_response(self, pool: str, server: str, status: int,
                         first_byte: float) -> None:
        pass

    def flush(self) -> None:
        self.counters.clear()


def make_stats(listeners: tuple[str, ...]) -> Stats:
    """Stats for a worker; GATEWAYD_METRICS=off (a benchmarking aid) turns them off."""
    if os.environ.get("GATEWAYD_METRICS", "on") == "off":
        return NullStats()
    return Stats(listeners)
