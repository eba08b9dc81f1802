"""The Prometheus side of CONTRACT §10, checked with Prometheus' own tools: the alert rules
(conf/prometheus-alerts.yml) and the Grafana dashboard (conf/grafana-dashboard.json) only
use metrics gatewayd exports and are valid PromQL (promtool); a live gatewayd's /metrics
passes `promtool check metrics` and matches §10 family by family; and a real Prometheus
scraping the admin endpoint counts exactly the requests sent and loads the alert rules.

Needs Debian's `prometheus` package (/usr/bin/prometheus, promtool): `make system-deps`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway import Gateway
from tests.support.metrics import good_and_evil_spec
from tests.support.pki import TestPKI
from tests.support.procs import (
    REPO_ROOT,
    BackendFactory,
    Proc,
    free_port,
    https_connection,
    wait_for,
)

ALERTS = REPO_ROOT / "conf" / "prometheus-alerts.yml"
DASHBOARD = REPO_ROOT / "conf" / "grafana-dashboard.json"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"

needs_promtool = pytest.mark.skipif(not os.access(PROMTOOL, os.X_OK),
                                    reason="promtool missing: run `make system-deps`")
needs_prometheus = pytest.mark.skipif(not os.access(PROMETHEUS, os.X_OK),
                                      reason="prometheus missing: run `make system-deps`")

#: CONTRACT §10, verbatim: name -> (type, label names).
CONTRACT: dict[str, tuple[str, frozenset[str]]] = {
    name: (kind, frozenset(labels.split()))
    for name, kind, labels in [
        ("gatewayd_requests_total", "counter", "listener rule backend_pool code"),
        ("gatewayd_request_duration_seconds", "histogram", "listener"),
        ("gatewayd_backend_connect_duration_seconds", "histogram", "backend_pool backend"),
        ("gatewayd_backend_first_byte_seconds", "histogram", "backend_pool backend"),
        ("gatewayd_backend_responses_total", "counter", "backend_pool backend code_class"),
        ("gatewayd_backend_failures_total", "counter", "backend_pool backend reason"),
        ("gatewayd_backend_healthy", "gauge", "backend_pool backend"),
        ("gatewayd_healthy_hosts", "gauge", "backend_pool"),
        ("gatewayd_unhealthy_hosts", "gauge", "backend_pool"),
        ("gatewayd_client_connections", "gauge", "listener"),
        ("gatewayd_tls_handshakes_total", "counter", "listener protocol"),
        ("gatewayd_tls_handshake_errors_total", "counter", "listener reason"),
        ("gatewayd_received_bytes_total", "counter", "listener"),
        ("gatewayd_sent_bytes_total", "counter", "listener"),
        ("gatewayd_worker_connections", "gauge", "pid"),
        ("gatewayd_worker_requests_in_flight", "gauge", "pid"),
        ("gatewayd_workers", "gauge", ""),
        ("gatewayd_config_reloads_total", "counter", "result"),
        ("gatewayd_certificate_not_after_timestamp_seconds", "gauge", "kind name"),
    ]
}
HISTOGRAMS = {name for name, (kind, _) in CONTRACT.items() if kind == "histogram"}

#: What the brief asks each artefact to cover.
REQUIRED_ALERT_METRICS = {
    "gatewayd_healthy_hosts", "gatewayd_backend_failures_total",
    "gatewayd_certificate_not_after_timestamp_seconds", "gatewayd_config_reloads_total",
    "gatewayd_requests_total", "gatewayd_workers", "gatewayd_tls_handshake_errors_total",
}
REQUIRED_DASHBOARD_METRICS = {
    "gatewayd_requests_total", "gatewayd_request_duration_seconds",
    "gatewayd_backend_first_byte_seconds", "gatewayd_backend_healthy",
    "gatewayd_healthy_hosts", "gatewayd_unhealthy_hosts", "gatewayd_backend_failures_total",
    "gatewayd_tls_handshakes_total", "gatewayd_tls_handshake_errors_total",
    "gatewayd_workers", "gatewayd_worker_connections", "gatewayd_worker_requests_in_flight",
    "gatewayd_config_reloads_total", "gatewayd_certificate_not_after_timestamp_seconds",
}

#: Grafana variables in dashboard expressions -> a PromQL-valid stand-in.
GRAFANA_VARS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h",
                "instance": ".*"}

_NAME = re.compile(r"gatewayd_[a-z_]+")
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# -- helpers ---------------------------------------------------------------------------


def metric_names(text: str) -> set[str]:
    """`gatewayd_*` names in PromQL/YAML text, histogram series mapped to their family."""
    names = set()
    for name in _NAME.findall(text):
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name.removesuffix(suffix) in HISTOGRAMS:
                name = name.removesuffix(suffix)
        names.add(name)
    return names


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_panels() -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels += panel.get("panels", [])  # panels inside collapsed rows
    return panels


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]


def as_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced by PromQL-valid values."""
    def sub(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in GRAFANA_VARS, f"unknown Grafana variable ${name} in {expr!r}"
        return GRAFANA_VARS[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, expr)


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True,
                          timeout=30, check=False)


def http_get(url: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with _NO_PROXY.open(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def prom_api(base: str, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    status, body = http_get(f"{base}/api/v1/{path}{query}")
    reply = json.loads(body)
    assert status == 200 and reply["status"] == "success", (path, params, body)
    return reply["data"]


def family_key(name: str) -> str:
    """The family name prometheus_client's parser gives a §10 name (counters lose _total)."""
    return name.removesuffix("_total") if CONTRACT[name][0] == "counter" else name


# -- static checks ---------------------------------------------------------------------


@needs_promtool
def test_alert_rules_pass_promtool() -> None:
    out = promtool("check", "rules", str(ALERTS))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout, out.stdout


def test_alert_and_dashboard_metrics_are_in_contract() -> None:
    alert_names = metric_names(ALERTS.read_text())
    dashboard_names = set()
    for expr in dashboard_exprs():
        dashboard_names |= metric_names(expr)
    for var in dashboard()["templating"]["list"]:
        dashboard_names |= metric_names(json.dumps(var.get("query", "")))
    assert alert_names - CONTRACT.keys() == set(), "alerts use metrics not in §10"
    assert dashboard_names - CONTRACT.keys() == set(), "dashboard uses metrics not in §10"
    assert REQUIRED_ALERT_METRICS - alert_names == set()
    assert REQUIRED_DASHBOARD_METRICS - dashboard_names == set()


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    dash = dashboard()
    assert dash["schemaVersion"] >= 36
    assert dash["title"] and dash["uid"]
    assert any(i["name"] == "DS_PROMETHEUS" and i["pluginId"] == "prometheus"
               for i in dash["__inputs"])
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    refs = [(p["id"], t["refId"]) for p in panels for t in p.get("targets", [])]
    assert len(refs) == len(set(refs))


@needs_promtool
def test_dashboard_expressions_pass_promtool(tmp_path: Path) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": as_promql(expr)}
        for i, expr in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules, indent=1))  # JSON is YAML
    out = promtool("check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in out.stdout, out.stdout


# -- live ------------------------------------------------------------------------------


def send(port: int, path: str, host: str, count: int, per_conn: int) -> list[int]:
    """`count` GETs over keep-alive connections of `per_conn` requests; the statuses."""
    statuses = []
    for start in range(0, count, per_conn):
        conn = https_connection("127.0.0.1", port, sni=None, cafile=None)
        try:
            for _ in range(min(per_conn, count - start)):
                conn.request("GET", path, headers={"Host": host})
                response = conn.getresponse()
                response.read()
                statuses.append(response.status)
        finally:
            conn.close()
    return statuses


def start_prometheus(tmp: Path, admin: str) -> tuple[Proc, str]:
    """Prometheus scraping only `admin` (host:port) every second, with the alert rules."""
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML; nothing but the static 127.0.0.1 target
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                   "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "gatewayd", "metrics_path": "/metrics",
                            "static_configs": [{"targets": [admin]}]}],
    }, indent=1))
    proc = Proc([PROMETHEUS, f"--config.file={config}",
                 f"--storage.tsdb.path={tmp / 'tsdb'}", "--storage.tsdb.retention.time=1h",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                log_dir=tmp, name="prometheus")
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.alive, proc.describe()
        try:
            return http_get(f"{base}/-/ready", timeout=1)[0] == 200
        except OSError:
            return False

    try:
        wait_for(ready, 20, "prometheus /-/ready", interval=0.1)
    except BaseException:
        proc.stop(timeout=5)
        raise
    return proc, base


def check_families(text: str, pools: dict[str, str], worker_pids: list[int]) -> None:
    """Every §10 family present with exactly its type and label names."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    problems = []
    for name, (kind, labels) in CONTRACT.items():
        family = families.get(family_key(name))
        if family is None:
            problems.append(f"{name}: missing")
            continue
        if family.type != kind:
            problems.append(f"{name}: type {family.type}, §10 says {kind}")
        seen = {frozenset(set(s.labels) - {"le"}) for s in family.samples}
        if seen != {labels}:
            problems.append(f"{name}: label sets {sorted(map(sorted, seen))}, §10 says "
                            f"{sorted(labels)}")
    extra = {f for f in families if f.startswith("gatewayd_")} - {
        family_key(n) for n in CONTRACT}
    if extra:
        problems.append(f"families not in §10: {sorted(extra)}")
    assert not problems, "\n".join(problems)

    def label_values(name: str, *keys: str) -> set[tuple[str, ...]]:
        return {tuple(s.labels[k] for k in keys) for s in families[name].samples}

    for name in ("gatewayd_worker_connections", "gatewayd_worker_requests_in_flight"):
        assert label_values(name, "pid") == {(str(p),) for p in worker_pids}, name
    for name in ("gatewayd_healthy_hosts", "gatewayd_unhealthy_hosts"):
        assert label_values(name, "backend_pool") == {(p,) for p in pools}, name
    assert label_values("gatewayd_backend_healthy", "backend_pool", "backend") == set(
        pools.items())
    workers = families["gatewayd_workers"].samples
    assert [s.value for s in workers] == [len(worker_pids)]


@needs_promtool
@needs_prometheus
def test_live_metrics_and_a_real_prometheus(tmp_path: Path, pki: TestPKI,
                                            backend_factory: BackendFactory) -> None:
    good = backend_factory("good")
    evil = backend_factory("evil", leaf=pki.self_signed(["evil.internal"]))
    spec = good_and_evil_spec(tmp_path, pki, good, evil, probe="hourly")
    pools = {"good": good.address, "evil": evil.address}
    with Gateway(tmp_path, spec) as gw:
        admin = gw.admin_url.removeprefix("http://")
        prom, base = start_prometheus(tmp_path / "prometheus", admin)
        try:
            # A refused reload, then a good one: both results of the reload counter exist.
            good_config = gw.config_path.read_text()
            gw.config_path.write_text(good_config + "\n[[listener\n")
            os.kill(gw.proc.pid, signal.SIGHUP)

            def reloads() -> dict[str, float]:
                text = http_get(f"{gw.admin_url}/metrics")[1]
                return {s.labels["result"]: s.value
                        for f in text_string_to_metric_families(text)
                        if f.name == "gatewayd_config_reloads" for s in f.samples}

            wait_for(lambda: reloads().get("failure") == 1, 15, "the refused reload")
            gw.config_path.write_text(good_config)
            old_pids = set(gw.worker_pids())
            os.kill(gw.proc.pid, signal.SIGHUP)

            # A new generation (after a reload no worker has a client_connections series
            # until it gets a client), then the known traffic: 37 x 200, 5 x 404 (no
            # listener for the host), 3 x 502 (pin mismatch).
            wait_for(lambda: len(gw.worker_pids()) == 2
                     and not old_pids & set(gw.children()), 20, "the new generation alone")
            assert send(gw.port, "/ok", "shop.test", 37, 5) == [200] * 37
            assert send(gw.port, "/", "nobody.test", 5, 1) == [404] * 5
            assert send(gw.port, "/evil/x", "shop.test", 3, 1) == [502] * 3
            # One failed handshake, so the error counter family exists: plain HTTP on
            # the HTTPS port (answered with a clear-text 400, counted as http_request).
            with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as plain:
                plain.sendall(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
                assert plain.recv(100).startswith(b"HTTP/1.1 400")
            expected = {"200": 37.0, "404": 5.0, "502": 3.0}
            total = sum(expected.values())

            def scraped() -> tuple[str, list[int]] | None:
                """/metrics once every worker has flushed its counts."""
                pids = gw.worker_pids()  # (state.json's retiring_pids can go stale)
                if len(pids) != 2 or old_pids & set(gw.children()):
                    return None
                text = http_get(f"{gw.admin_url}/metrics")[1]
                sums: dict[str, float] = {}
                pid_labels = set()
                for family in text_string_to_metric_families(text):
                    for sample in family.samples:
                        sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
                        if "pid" in sample.labels:
                            pid_labels.add(int(sample.labels["pid"]))
                done = (sums.get("gatewayd_requests_total") == total
                        and sums.get("gatewayd_backend_failures_total") == 3 + 2
                        and sums.get("gatewayd_config_reloads_total") == 2
                        and pid_labels == set(pids) and pids == gw.worker_pids())
                return (text, pids) if done else None

            try:
                text, pids = wait_for(scraped, 20, "the traffic and both reloads in /metrics",
                                      interval=0.2)
            except AssertionError:
                raise AssertionError(
                    f"state {gw.state()}, workers {gw.worker_pids()}\n"
                    f"{http_get(f'{gw.admin_url}/metrics')[1]}\n{gw.proc.describe()}") from None
            assert reloads() == {"failure": 1, "success": 1}
            assert gw.proc.alive, gw.proc.describe()

            # promtool: exit 1 = unparsable, 3 = lint problems only (printed, not fatal).
            out = promtool("check", "metrics", stdin=text)
            if out.stdout.strip() or out.stderr.strip():
                print("promtool check metrics:\n" + out.stdout + out.stderr)
            assert out.returncode in (0, 3), out.stdout + out.stderr
            assert "error while linting" not in out.stderr, out.stderr

            check_families(text, pools, pids)
            exposed = {f.name for f in text_string_to_metric_families(text)}
            live = {n for n in CONTRACT if family_key(n) in exposed}
            used = metric_names(ALERTS.read_text())
            for expr in dashboard_exprs():
                used |= metric_names(expr)
            assert used - live == set(), "alerts/dashboard use metrics /metrics lacks"

            # Prometheus' own count equals what was sent, exactly.
            def by_code() -> dict[str, float]:
                data = prom_api(base, "query", query="sum by (code) (gatewayd_requests_total)")
                return {r["metric"].get("code", ""): float(r["value"][1])
                        for r in data["result"]}

            def exact() -> bool:
                data = prom_api(base, "query", query="sum(gatewayd_requests_total)")
                return bool(data["result"]) and float(data["result"][0]["value"][1]) == total

            try:
                wait_for(exact, 20, f"sum(gatewayd_requests_total) == {total:g}",
                         interval=0.25)
            except AssertionError:
                raise AssertionError(f"prometheus sees {by_code()}, sent {expected}\n"
                                     f"{prom.describe()}") from None
            assert by_code() == expected
            targets = prom_api(base, "targets")["activeTargets"]
            assert [(t["scrapeUrl"], t["health"]) for t in targets] == [
                (f"{gw.admin_url}/metrics", "up")], targets

            # The alert rules loaded and evaluate without error.
            alert_names = set(re.findall(r"^\s*- alert: (\w+)$", ALERTS.read_text(), re.M))
            assert len(alert_names) >= 7

            def rules_ok() -> list[dict[str, Any]] | None:
                groups = prom_api(base, "rules")["groups"]
                rules = [r for g in groups for r in g["rules"]]
                if {r["name"] for r in rules} != alert_names:
                    return None
                return rules if all(r["health"] == "ok" for r in rules) else None

            try:
                rules = wait_for(rules_ok, 15, "alert rules loaded and healthy", interval=0.25)
            except AssertionError:
                raise AssertionError(json.dumps(prom_api(base, "rules"), indent=1)) from None
            for rule in rules:
                assert rule["type"] == "alerting" and not rule.get("lastError"), rule
                assert rule["labels"].get("severity") in ("warning", "critical"), rule
                for key in ("summary", "description"):
                    assert len(rule["annotations"].get(key, "")) > 20, (key, rule["name"])

            # The pin refusals and the refused reload fire their alerts (no `for:`), and
            # nothing else fires (pending ones, e.g. a 5xx ratio held `for: 5m`, may exist).
            want = {"GatewaydBackendPinMismatch", "GatewaydConfigReloadFailed"}

            def firing() -> set[str] | None:
                alerts = prom_api(base, "alerts")["alerts"]
                names = {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}
                return names if want <= names else None

            names = wait_for(firing, 15, f"alerts {sorted(want)} to fire", interval=0.25)
            assert names == want, names

            # Every dashboard query runs on real data and returns series.
            def all_return_data() -> list[str] | None:
                empty = [e for e in dashboard_exprs()
                         if not prom_api(base, "query", query=as_promql(e))["result"]]
                return empty or None

            deadline = time.monotonic() + 10
            empty = all_return_data()
            while empty and time.monotonic() < deadline:
                time.sleep(0.5)
                empty = all_return_data()
            assert not empty, f"dashboard queries without data: {empty}"
        finally:
            prom.stop(timeout=10)
        assert gw.proc.alive, gw.proc.describe()
