"""Prometheus metrics (CONTRACT §10) in prometheus_client's multiprocess mode.

Every process (master, workers, admin) writes its values to mmap files in
`<runtime_dir>/metrics`; the admin process aggregates them on scrape.  prometheus_client
picks its value backend when it is first imported, from PROMETHEUS_MULTIPROC_DIR, so this
module imports it only inside `setup()`, after the master has set the variable and wiped the
folder, and before any worker forks.

Recording a value in multiprocess mode costs ~2.5 µs (a lock and an mmap write), ten times a
dict update, and a request touches about ten series.  Workers therefore count in plain dicts
(`workers/stats.py`) and `flush()` them here once a second; `apply_histogram` adds a batch of
bucket counts to a histogram child, which prometheus_client has no public call for.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any

# Sub-millisecond to a minute: a proxy's own latency is ~0.1 ms, backends' up to request_timeout.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0)
CODE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


@dataclass(frozen=True)
class Metrics:
    """The metric objects, created once per master (inherited by forked children)."""

    requests: Any
    request_duration: Any
    backend_connect: Any
    backend_first_byte: Any
    backend_responses: Any
    backend_failures: Any
    backend_healthy: Any
    healthy_hosts: Any
    unhealthy_hosts: Any
    client_connections: Any
    tls_handshakes: Any
    tls_handshake_errors: Any
    received_bytes: Any
    sent_bytes: Any
    workers: Any
    config_reloads: Any
    certificate_not_after: Any


_metrics: Metrics | None = None


def prepare_dir(runtime_dir: str, wipe: bool) -> str:
    """Create (and on first start, empty) the multiprocess folder; export its path."""
    path = os.path.join(runtime_dir, "metrics")
    if wipe and os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


def setup() -> Metrics:
    """Define every metric (idempotent).  PROMETHEUS_MULTIPROC_DIR must be set first."""
    global _metrics
    if _metrics is not None:
        return _metrics
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        raise RuntimeError("metrics.prepare_dir() must run before metrics.setup()")
    from prometheus_client import Counter, Gauge, Histogram

    pool_server = ["backend_pool", "backend"]
    _metrics = Metrics(
        requests=Counter("gatewayd_requests_total", "Requests answered, by route and status.",
                         ["listener", "rule", "backend_pool", "code"]),
        request_duration=Histogram("gatewayd_request_duration_seconds",
                                   "Time from request head to the last response byte.",
                                   ["listener"], buckets=LATENCY_BUCKETS),
        backend_connect=Histogram("gatewayd_backend_connect_duration_seconds",
                                  "TCP connect plus TLS handshake to a backend server.",
                                  pool_server, buckets=LATENCY_BUCKETS),
        backend_first_byte=Histogram("gatewayd_backend_first_byte_seconds",
                                     "Request sent until the backend's response head.",
                                     pool_server, buckets=LATENCY_BUCKETS),
        backend_responses=Counter("gatewayd_backend_responses_total",
                                  "Responses received from backend servers.",
                                  [*pool_server, "code_class"]),
        backend_failures=Counter("gatewayd_backend_failures_total",
                                 "Failed attempts to use a backend server, by reason.",
                                 [*pool_server, "reason"]),
        backend_healthy=Gauge("gatewayd_backend_healthy", "1 if the server is healthy.",
                              pool_server, multiprocess_mode="livemax"),
        healthy_hosts=Gauge("gatewayd_healthy_hosts", "Healthy servers in the pool.",
                            ["backend_pool"], multiprocess_mode="livemax"),
        unhealthy_hosts=Gauge("gatewayd_unhealthy_hosts", "Unhealthy servers in the pool.",
                              ["backend_pool"], multiprocess_mode="livemax"),
        client_connections=Gauge("gatewayd_client_connections", "Open client connections.",
                                 ["listener"], multiprocess_mode="livesum"),
        tls_handshakes=Counter("gatewayd_tls_handshakes_total",
                               "Completed client TLS handshakes.", ["listener", "protocol"]),
        tls_handshake_errors=Counter("gatewayd_tls_handshake_errors_total",
                                     "Failed client TLS handshakes.", ["listener", "reason"]),
        received_bytes=Counter("gatewayd_received_bytes_total",
                               "Bytes received from clients (after TLS).", ["listener"]),
        sent_bytes=Counter("gatewayd_sent_bytes_total", "Bytes sent to clients (before TLS).",
                           ["listener"]),
        workers=Gauge("gatewayd_workers", "Ready workers of the serving generation.",
                      multiprocess_mode="livemax"),
        config_reloads=Counter("gatewayd_config_reloads_total", "Config reloads (SIGHUP).",
                               ["result"]),
        certificate_not_after=Gauge("gatewayd_certificate_not_after_timestamp_seconds",
                                    "notAfter of listener certificates and of backend "
                                    "certificates seen, as a Unix timestamp.",
                                    ["kind", "name"], multiprocess_mode="max"),
    )
    return _metrics


_worker_gauges: tuple[Any, Any] | None = None


def worker_gauges() -> tuple[Any, Any]:
    """`gatewayd_worker_connections` and `gatewayd_worker_requests_in_flight`, created
    only in workers: without labels a gauge writes its series when defined, and the
    multiprocess "liveall" mode labels it with the writing pid, so defining them in the
    master would export a series for the master too."""
    global _worker_gauges
    if _worker_gauges is None:
        from prometheus_client import Gauge

        _worker_gauges = (
            Gauge("gatewayd_worker_connections", "Open client connections of one worker.",
                  multiprocess_mode="liveall"),
            Gauge("gatewayd_worker_requests_in_flight", "Requests being proxied by one worker.",
                  multiprocess_mode="liveall"),
        )
    return _worker_gauges


def apply_histogram(child: Any, counts: list[int], total: float) -> None:
    """Add pre-bucketed observations to a histogram child.  In multiprocess mode each
    bucket value holds the non-cumulative count of its bucket (the collector accumulates),
    which is what `observe()` increments; this does the same for a batch."""
    for value, count in zip(child._buckets, counts, strict=True):
        if count:
            value.inc(count)
    child._sum.inc(total)


def mark_dead(pid: int) -> None:
    """Drop a dead process's live gauges (counters and histograms stay: never go back)."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


def render() -> tuple[bytes, str]:
    """The aggregated exposition over every process's files."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST
