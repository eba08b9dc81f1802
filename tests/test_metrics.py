"""Metrics counted exactly across workers, never going backwards, and the admin endpoint."""

from __future__ import annotations

import http.client
import json
import os
import signal
from pathlib import Path

from tests.support.gateway import Gateway, simple_spec
from tests.support.metrics import good_and_evil_spec, scrape, value
from tests.support.procs import https_connection, wait_for


def admin_get(gw: Gateway, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection(gw.admin_url.removeprefix("http://"), timeout=10)
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, response.read().decode()


def test_exact_counts_across_workers_and_no_counter_goes_backwards(
        tmp_path: Path, pki, backend_factory) -> None:
    good = backend_factory("good")
    evil = backend_factory("evil", leaf=pki.self_signed(["evil.internal"]))
    spec = good_and_evil_spec(tmp_path, pki, good, evil, probe="slow")
    with Gateway(tmp_path, spec) as gw:
        def send(path: str, host: str, count: int, per_conn: int) -> list[int]:
            statuses = []
            for start in range(0, count, per_conn):
                conn = https_connection("127.0.0.1", gw.port, sni=None, cafile=None)
                for _ in range(min(per_conn, count - start)):
                    conn.request("GET", path, headers={"Host": host})
                    response = conn.getresponse()
                    response.read()
                    statuses.append(response.status)
                conn.close()
            return statuses

        assert send("/ok", "shop.test", 100, 5) == [200] * 100
        assert send("/evil/x", "shop.test", 7, 1) == [502] * 7
        assert send("/", "nobody.test", 3, 1) == [404] * 3

        expected = {
            ("gatewayd_requests_total", (("backend_pool", "good"), ("code", "200"),
                                         ("listener", "front"), ("rule", "main"))): 100,
            ("gatewayd_requests_total", (("backend_pool", "evil"), ("code", "502"),
                                         ("listener", "front"), ("rule", "main"))): 7,
        }

        def settled() -> dict | None:
            samples = scrape(gw)
            ok = all(samples.get(key) == want for key, want in expected.items())
            ok = ok and value(samples, "gatewayd_backend_failures_total",
                              backend_pool="evil") == 8
            ok = ok and value(samples, "gatewayd_requests_total", code="404") == 3
            # a worker writes its counters, then its histograms, once a second: a scrape
            # may fall between the two, so wait for the histograms too
            ok = ok and value(samples, "gatewayd_request_duration_seconds_count",
                              listener="front") == 110
            ok = ok and value(samples, "gatewayd_backend_first_byte_seconds_count",
                              backend_pool="good") == 100
            return samples if ok else None

        samples = wait_for(settled, 10, "exact request counts in /metrics")
        assert value(samples, "gatewayd_requests_total") == 110
        assert value(samples, "gatewayd_backend_failures_total", backend_pool="evil",
                     reason="pin_mismatch") == 7 + 1  # 7 requests and the one probe
        assert value(samples, "gatewayd_backend_healthy", backend_pool="evil") == 1
        assert value(samples, "gatewayd_backend_healthy", backend_pool="good") == 1
        assert value(samples, "gatewayd_backend_responses_total", backend_pool="good",
                     code_class="2xx") == 100
        assert value(samples, "gatewayd_request_duration_seconds_count", listener="front") \
            == 110
        assert value(samples, "gatewayd_tls_handshakes_total", listener="front") == 20 + 7 + 3
        assert value(samples, "gatewayd_backend_first_byte_seconds_count",
                     backend_pool="good") == 100
        assert value(samples, "gatewayd_workers") == 2
        pids = {dict(labels)["pid"] for name, labels in samples
                if name == "gatewayd_worker_connections"}
        assert pids == {str(p) for p in gw.worker_pids()}
        assert value(samples, "gatewayd_certificate_not_after_timestamp_seconds",
                     kind="listener", name="front") > 0
        assert value(samples, "gatewayd_certificate_not_after_timestamp_seconds",
                     kind="backend", name=f"127.0.0.1:{good.port}") == \
            int(good.leaf.cert.not_valid_after_utc.timestamp())

        # Kill a worker: its counts stay, the replacement adds to them.
        before = value(samples, "gatewayd_requests_total")
        victim = gw.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: victim not in gw.worker_pids(), 10, "the worker to be reaped")
        gw.wait_workers(2)
        after = scrape(gw)
        assert value(after, "gatewayd_requests_total") >= before
        assert send("/ok", "shop.test", 10, 5) == [200] * 10
        wait_for(lambda: value(scrape(gw), "gatewayd_requests_total") == before + 10, 10,
                 "counts after the replacement")
        live = {dict(labels)["pid"] for name, labels in scrape(gw)
                if name == "gatewayd_worker_requests_in_flight"}
        assert str(victim) not in live  # per-worker gauges: live workers only


def test_healthz_and_readyz_follow_the_master(tmp_path: Path, pki, backend_factory) -> None:
    app = backend_factory("app")
    spec = simple_spec(tmp_path, cert=pki.issue(["127.0.0.1"]), backends={"app": app})
    with Gateway(tmp_path, spec) as gw:
        wait_for(lambda: admin_get(gw, "/readyz")[0] == 200, 10, "/readyz 200")
        status, text = admin_get(gw, "/healthz")
        assert status == 200 and "2 ready workers" in text
        assert admin_get(gw, "/nope")[0] == 404
        state = json.loads((tmp_path / "run" / "state.json").read_text())
        assert state["state"] == "serving" and len(state["worker_pids"]) == 2


def test_latency_bucket_is_the_one_bisect_left_finds() -> None:
    """The worker's histogram bucket (a compiled loop over the bounds) is the first bound
    that holds the value, +Inf past the last: what bisect_left finds, bounds included.
    NaN (which no clock difference gives) lands in +Inf, as prometheus_client's own
    Histogram.observe puts it, where bisect_left would say the first bucket."""
    import math
    from bisect import bisect_left

    from gatewayd.workers.stats import _bucket

    from gatewayd.metrics import LATENCY_BUCKETS

    values = [0.0, -1.0, 1e-9, 1e9, math.inf]
    for bound in LATENCY_BUCKETS:
        values += [bound, math.nextafter(bound, 0.0), math.nextafter(bound, math.inf)]
    for seconds in values:
        assert _bucket(seconds) == bisect_left(LATENCY_BUCKETS, seconds), seconds
    assert _bucket(LATENCY_BUCKETS[-1] * 2) == len(LATENCY_BUCKETS)  # +Inf
    assert _bucket(math.nan) == len(LATENCY_BUCKETS)
