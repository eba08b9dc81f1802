"""Debian's testssl.sh (binary `testssl`) scans a live listener with the default policy
AppGwSslPolicy20220101S: protocols, cipher categories, forward secrecy, renegotiation
and the vulnerability checks.  The JSON findings are asserted on and summarised."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.support.gateway import Gateway, simple_spec
from tests.support.pki import TestPKI
from tests.support.procs import BackendFactory, https_get

TESTSSL = shutil.which("testssl") or shutil.which("testssl.sh")
CHECKS = ["--protocols", "--std", "--fs", "--server-preference", "--vulnerable",
          "--renegotiation"]
AEAD = ("GCM", "CHACHA20", "POLY1305", "CCM")


def run_testssl(port: int, out: Path) -> tuple[list[dict], float]:
    assert TESTSSL is not None
    cmd = [TESTSSL, "--nodns", "none", "--quiet", "--warnings", "off", "--color", "0",
           "--jsonfile", str(out), *CHECKS, f"127.0.0.1:{port}"]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - started
    assert out.exists(), f"testssl wrote no JSON (rc={proc.returncode})\n{proc.stdout[-3000:]}" \
                         f"\n{proc.stderr[-3000:]}"
    findings: list[dict] = json.loads(out.read_text())
    return findings, elapsed


def by_id(findings: list[dict]) -> dict[str, dict]:
    return {f["id"]: f for f in findings}


@pytest.mark.skipif(TESTSSL is None, reason="testssl (Debian package testssl.sh) not installed")
def test_testssl_scan_of_default_policy(tmp_path: Path, pki: TestPKI,
                                        backend_factory: BackendFactory) -> None:
    app = backend_factory("app")
    spec = simple_spec(tmp_path, cert=pki.issue(["127.0.0.1"]), backends={"app": app},
                       workers=1)
    spec.listeners[0]["ssl_policy"] = "AppGwSslPolicy20220101S"
    with Gateway(tmp_path, spec) as gw:
        pids = gw.worker_pids()
        findings, elapsed = run_testssl(gw.port, tmp_path / "testssl.json")
        status, _, _ = https_get("127.0.0.1", gw.port, "/", sni=None, cafile=pki.ca_pem_path)
        assert status == 200 and gw.worker_pids() == pids  # the scan hurt nobody
    ids = by_id(findings)
    severities = Counter(f["severity"] for f in findings)
    print(f"\ntestssl {' '.join(CHECKS)}: {len(findings)} findings in {elapsed:.0f}s, "
          f"by severity {dict(severities)}")
    for f in findings:
        if f["severity"] not in ("OK", "INFO", "DEBUG"):
            print(f"  {f['severity']:8} {f['id']}: {f['finding']}")
    engine_errors = [f for f in findings if f["id"] in ("scanProblem", "engine_problem")]
    assert not engine_errors, engine_errors

    # protocols: TLS 1.2 and 1.3 only
    for legacy in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
        assert ids[legacy]["finding"].startswith("not offered"), ids[legacy]
    assert ids["TLS1_2"]["finding"].startswith("offered"), ids["TLS1_2"]
    assert ids["TLS1_3"]["finding"].startswith("offered"), ids["TLS1_3"]

    # ciphers: every offered suite is forward-secret AEAD (the server's per-protocol list)
    orders = {k: v["finding"] for k, v in ids.items() if k.startswith("cipherorder_")}
    print(f"  cipher order: {orders}")
    assert set(orders) == {"cipherorder_TLSv1_2", "cipherorder_TLSv1_3"}, orders
    suites = " ".join(orders.values()).split()
    fs_key = ids.get("FS_ciphers", ids.get("PFS_ciphers"))
    assert fs_key is not None
    fs_suites = set(fs_key["finding"].split())
    for suite in suites:
        assert any(a in suite for a in AEAD), suite
        assert suite.startswith(("ECDHE-", "TLS_AES_")), suite
        assert suite in fs_suites, (suite, fs_suites)
    for category in ("cipherlist_NULL", "cipherlist_aNULL", "cipherlist_EXPORT",
                     "cipherlist_LOW", "cipherlist_3DES_IDEA", "cipherlist_AVERAGE",
                     "cipherlist_OBSOLETED"):
        if category in ids:
            assert ids[category]["finding"].startswith("not offered"), ids[category]
    fs = ids.get("FS", ids.get("PFS"))
    assert fs is not None and fs["severity"] == "OK", fs
    curves = ids.get("FS_ECDHE_curves", ids.get("PFS_ECDHE_curves"))
    assert curves is not None and not {"X448", "secp521r1"} & set(curves["finding"].split())

    # renegotiation and compression
    assert ids["secure_renego"]["finding"].startswith("supported"), ids["secure_renego"]
    assert ids["secure_client_renego"]["severity"] in ("OK", "INFO") and \
        "not vulnerable" in ids["secure_client_renego"]["finding"], ids["secure_client_renego"]
    assert ids["CRIME_TLS"]["severity"] == "OK", ids["CRIME_TLS"]

    # no vulnerability finding with severity HIGH or CRITICAL, anywhere
    bad = [f for f in findings if f["severity"] in ("HIGH", "CRITICAL")]
    assert not bad, bad
