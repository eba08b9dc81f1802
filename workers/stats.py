"""Per-worker metric counting in plain dicts, flushed to prometheus_client once a second.

The request path only does dict arithmetic here (~0.2 µs an update); `flush()` moves the
deltas into the multiprocess files (see gatewayd/metrics.py for why).  Gauges are kept as
current values and written when they changed.  A worker killed with SIGKILL loses at most
the last second of counts; counters never go backwards.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any, Final

from gatewayd import metrics as m

from .logline import int_text

_BOUNDS: Final[tuple[float, ...]] = m.LATENCY_BUCKETS
_NBUCKETS: Final = len(_BOUNDS) + 1  # the last: +Inf


def _bucket(seconds: float) -> int:
    """The first bucket whose upper bound holds `seconds` (len(_BOUNDS): +Inf, and NaN
    too, as in prometheus_client), as bisect_left finds it.  A loop: compiled, it
    compares C doubles, where a call to bisect_left boxed the float and compared objects
    (~670 instructions a call, run twice per request)."""
    index = 0
    for bound in _BOUNDS:
        if seconds <= bound:
            return index
        index += 1
    return index


_CODE_CLASS: Final = tuple(f"{digit}xx" for digit in range(10))


class _Histogram:
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * _NBUCKETS
        self.total = 0.0

    def add(self, seconds: float) -> None:
        self.counts[_bucket(seconds)] += 1
        self.total += seconds


class _BackendSeries:
    """backend_responses_total by code class and backend_first_byte, for one (pool,
    server): kept for the worker's life and zeroed by each flush."""

    __slots__ = ("by_class", "first_byte")

    def __init__(self) -> None:
        self.by_class = [0] * 10  # index: status // 100
        self.first_byte = _Histogram()


class Stats:
    """What one worker has counted since the last flush.

    The two updates every request makes (`request_done`, `backend_response`) and the byte
    counts land in structures keyed by plain strings and ints, nested per label, and kept
    for the worker's life: a tuple key would be built, hashed and compared element by
    element on each update (tuples do not cache their hash), which cost more than the
    counting itself.  Everything else goes through `count` and `observe`.
    """

    def __init__(self, listeners: tuple[str, ...] = ()) -> None:
        self.metrics = m.setup()
        self.worker_connections, self.worker_in_flight = m.worker_gauges()
        self.counters: defaultdict[tuple[str, tuple[str, ...]], float] = defaultdict(float)
        self.histograms: dict[tuple[str, tuple[str, ...]], _Histogram] = {}
        # bytes from / to clients, by listener: `+=` on them from the connections directly
        self.received_bytes: defaultdict[str, int] = defaultdict(int)
        self.sent_bytes: defaultdict[str, int] = defaultdict(int)
        # listener → rule → pool → status → requests; listener → request_duration
        self._requests: dict[str, dict[str, dict[str, defaultdict[int, int]]]] = {}
        self._durations: dict[str, _Histogram] = {}
        self._backends: dict[str, dict[str, _BackendSeries]] = {}  # pool → server → ...
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
        hist.add(seconds)

    def request_done(self, listener: str, rule: str, pool: str, status: int,
                     duration: float) -> None:
        """requests_total and request_duration for one request that ended."""
        try:
            by_status = self._requests[listener][rule][pool]
            hist = self._durations[listener]
        except KeyError:
            by_status, hist = self._request_series(listener, rule, pool)
        by_status[status] += 1
        hist.add(duration)

    def _request_series(self, listener: str, rule: str,
                        pool: str) -> tuple[defaultdict[int, int], _Histogram]:
        by_status = self._requests.setdefault(listener, {}).setdefault(rule, {}).setdefault(
            pool, defaultdict(int))
        hist = self._durations.get(listener)
        if hist is None:
            hist = self._durations[listener] = _Histogram()
        return by_status, hist

    def backend_response(self, pool: str, server: str, status: int,
                         first_byte: float) -> None:
        """A response head from a backend, `first_byte` seconds after the request went."""
        try:
            series = self._backends[pool][server]
        except KeyError:
            series = self._backends.setdefault(pool, {}).setdefault(server, _BackendSeries())
        series.by_class[status // 100] += 1
        series.first_byte.add(first_byte)

    # -- flushing (once a second, from a greenlet) ------------------------------------

    def _child(self, metric: str, labels: tuple[str, ...]) -> Any:
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            parent = getattr(self.metrics, metric)
            child = parent.labels(*labels) if labels else parent
            self._children[key] = child
        return child

    def _take_hot(self) -> None:
        """Move what the hot-path structures counted into `counters` and `histograms`,
        and zero them (in place: they live as long as the worker)."""
        counters, histograms = self.counters, self.histograms
        for metric, by_listener in (("received_bytes", self.received_bytes),
                                    ("sent_bytes", self.sent_bytes)):
            for listener, amount in by_listener.items():
                if amount:
                    counters[(metric, (listener,))] += amount
            by_listener.clear()
        for listener, rules in self._requests.items():
            for rule, pools in rules.items():
                for pool, by_status in pools.items():
                    for status, amount in by_status.items():
                        counters[("requests", (listener, rule, pool, int_text(status)))] += (
                            amount)
                    by_status.clear()
        for listener, hist in self._durations.items():
            if hist.total or any(hist.counts):
                histograms[("request_duration", (listener,))] = hist
                self._durations[listener] = _Histogram()
        for pool, servers in self._backends.items():
            for server, series in servers.items():
                for digit, amount in enumerate(series.by_class):
                    if amount:
                        counters[("backend_responses", (pool, server, _CODE_CLASS[digit]))] += (
                            amount)
                        series.by_class[digit] = 0
                hist = series.first_byte
                if hist.total or any(hist.counts):
                    histograms[("backend_first_byte", (pool, server))] = hist
                    series.first_byte = _Histogram()

    def flush(self) -> None:
        self._take_hot()
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
    byte counts the connections add directly still land in dicts that are never flushed;
    everything else is a no-op."""

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
        self.received_bytes.clear()
        self.sent_bytes.clear()


def make_stats(listeners: tuple[str, ...]) -> Stats:
    """Stats for a worker; GATEWAYD_METRICS=off (a benchmarking aid) turns them off."""
    if os.environ.get("GATEWAYD_METRICS", "on") == "off":
        return NullStats()
    return Stats(listeners)
