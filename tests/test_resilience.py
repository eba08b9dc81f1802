"""No worker crash, ever: a bug in one request and a slow-HTTP attack (slowhttptest) each
touch only their own connections."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.gateway import Gateway, simple_spec
from tests.support.procs import https_connection, https_get, wait_for

FAULT = "/__fault__"


def test_an_exception_in_one_request_is_logged_counted_and_contained(
        tmp_path: Path, pki, backend_factory) -> None:
    app = backend_factory("app")
    spec = simple_spec(tmp_path, cert=pki.issue(["127.0.0.1"]), backends={"app": app},
                       workers=1)
    with Gateway(tmp_path, spec, env={"GATEWAYD_FAULT_INJECTION": FAULT}) as gw:
        (worker,) = gw.worker_pids()
        bystander = https_connection("127.0.0.1", gw.port, sni=None, cafile=None)
        bystander.request("GET", "/before")
        assert bystander.getresponse().read()
        status, _, body = https_get("127.0.0.1", gw.port, FAULT, sni=None, cafile=None)
        assert status == 500 and body == b"500 Internal Server Error\n"
        # The other connection, the worker and new connections are unaffected.
        bystander.request("GET", "/after")
        response = bystander.getresponse()
        assert response.status == 200 and response.read()
        assert https_get("127.0.0.1", gw.port, "/new", sni=None, cafile=None)[0] == 200
        assert gw.worker_pids() == [worker]
        record = gw.wait_log(lambda r: r["uri"] == FAULT)
        assert record["status"] == 500
        assert record["error_info"] == "internal_error: RuntimeError"
        log = gw.proc.stderr_text()
        assert re.search(rf"internal error in request {record['request_id']} {FAULT} from "
                         r"127\.0\.0\.1:\d+", log), log
        assert "Traceback" in log and "fault injected" in log

        def counted() -> bool:
            with urllib.request.urlopen(f"{gw.admin_url}/metrics", timeout=10) as r:
                text = r.read().decode()
            return 'code="500"' in text and re.search(
                r'gatewayd_requests_total\{[^}]*code="500"[^}]*\} 1\.0', text) is not None

        wait_for(counted, 10, "the 500 in gatewayd_requests_total")


@pytest.mark.skipif(shutil.which("slowhttptest") is None,
                    reason="slowhttptest is installed by `make system-deps`")
@pytest.mark.parametrize("mode", ["-H", "-B", "-X"])
def test_slowhttptest_does_not_starve_normal_clients(tmp_path: Path, pki, backend_factory,
                                                     mode: str) -> None:
    """slowhttptest holds 300 connections open slowly (slowloris -H, slow body -B, slow
    read -X) for 12 s while a normal client keeps getting answers."""
    app = backend_factory("app")
    bulk = backend_factory("bulk")  # the attack's target: its own backend process, so
    # that what is measured is gatewayd, not a stdlib test backend serving 300 streams
    spec = simple_spec(tmp_path, cert=pki.issue(["127.0.0.1"]),
                       backends={"app": app, "bulk": bulk}, workers=1,
                       server={"client_header_timeout": 5})
    spec.rules[0]["path_rules"] = [{"name": "bulk", "paths": ["/big*"],
                                    "backend_pool": "bulk", "backend_settings": "bulk-tls"}]
    with Gateway(tmp_path, spec) as gw:
        attack = subprocess.Popen(
            ["slowhttptest", mode, "-c", "300", "-r", "100", "-i", "2", "-l", "12",
             "-s", "100000", "-t", "POST" if mode == "-B" else "GET",
             "-u", f"https://127.0.0.1:{gw.port}/big?bytes=20000000", "-p", "3"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        latencies: list[float] = []
        failures: list[str] = []
        stop = threading.Event()

        def normal_client() -> None:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    status, _, _ = https_get("127.0.0.1", gw.port, "/ok", sni=None,
                                             cafile=None, timeout=5)
                    if status != 200:
                        failures.append(str(status))
                except Exception as exc:
                    failures.append(repr(exc))
                latencies.append(time.monotonic() - started)
                stop.wait(0.2)

        client = threading.Thread(target=normal_client)
        client.start()
        try:
            output, _ = attack.communicate(timeout=60)
        finally:
            stop.set()
            client.join(timeout=20)
            if attack.poll() is None:
                attack.kill()
        assert "connected" in output or "pending" in output, output[-2000:]
        worst = max(latencies)
        print(f"slowhttptest {mode}: {len(latencies)} normal requests, "
              f"{len(failures)} failed, worst latency {worst * 1000:.0f} ms")
        assert len(latencies) >= 20
        assert not failures, failures[:5]
        assert worst < 3.0
