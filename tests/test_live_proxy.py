"""The end-to-end TLS request path, live: a real master with forked workers, real backend
processes, curl and openssl as independent clients."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.gateway import Gateway, GatewaySpec, simple_spec
from tests.support.procs import curl, free_port, https_connection, https_get, wait_for

GATEWAYD = [sys.executable, "-m", "gatewayd.cli"]


def _json_body(body: bytes) -> dict:
    return json.loads(body.decode())


def test_curl_through_gateway_routes_by_path_and_adds_forwarding_headers(
        tmp_path: Path, pki, backend_factory) -> None:
    web = backend_factory("web")
    images = backend_factory("images")
    front = pki.issue(["shop.example.test", "127.0.0.1"])
    spec = simple_spec(tmp_path, cert=front, backends={"web": web, "images": images})
    spec.rules[0]["path_rules"] = [{"name": "images", "paths": ["/images/*"],
                                    "backend_pool": "images",
                                    "backend_settings": "images-tls"}]
    with Gateway(tmp_path, spec) as gw:
        url = f"https://shop.example.test:{gw.port}"
        resolve = f"shop.example.test:{gw.port}:127.0.0.1"
        base = ["--cacert", str(pki.ca_pem_path), "--resolve", resolve]
        out = curl([*base, f"{url}/images/a.png?x=1", "-H", "X-Forwarded-Proto: gopher",
                    "-H", "X-Forwarded-For: 203.0.113.9"])
        assert out.returncode == 0, out.stderr
        seen = json.loads(out.stdout)
        assert seen["backend"] == "images"
        assert seen["target"] == "/images/a.png?x=1"
        headers = {k.lower(): v for k, v in seen["headers"]}
        assert headers["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
        assert headers["x-forwarded-proto"] == "https"  # the incoming copy is replaced
        assert headers["x-forwarded-port"] == str(gw.port)
        assert headers["x-original-host"] == f"shop.example.test:{gw.port}"
        assert headers["x-forwarded-host"] == f"shop.example.test:{gw.port}"
        assert len(headers["x-request-id"]) == 32
        assert [k.lower() for k, _ in seen["headers"]].count("x-forwarded-proto") == 1

        out = curl([*base, f"{url}/checkout"])
        assert json.loads(out.stdout)["backend"] == "web"
        record = gw.wait_log(lambda r: r["uri"] == "/checkout")
        assert record["status"] == 200 and record["backend_pool"] == "web"
        assert record["tls_protocol"] == "TLSv1.3"
        assert record["request_id"] and record["listener"] == "front"


def _add_blog_listener(spec: GatewaySpec, pki, port: int, pool: str) -> None:
    """A second https listener on the same bind, named blog.example.test (with its own
    certificate), whose rule sends to `pool`."""
    blog = pki.issue(["blog.example.test"])
    spec.listeners.append({"name": "blog", "bind": f"127.0.0.1:{port}", "protocol": "https",
                           "host_names": ["blog.example.test"],
                           "certificate": str(blog.cert_path),
                           "private_key": str(blog.key_path)})
    spec.rules.append({"name": "blog", "priority": 20, "listener": "blog",
                       "backend_pool": pool, "backend_settings": f"{pool}-tls"})


def test_sni_picks_certificate_among_listeners_on_one_port(tmp_path: Path, pki,
                                                           backend_factory) -> None:
    """Two https listeners share a bind; openssl s_client -servername sees each cert."""
    backend = backend_factory("app")
    shop = pki.issue(["shop.example.test"])
    port = free_port()
    spec = simple_spec(tmp_path, cert=shop, backends={"app": backend}, port=port)
    spec.listeners[0]["host_names"] = ["shop.example.test"]
    _add_blog_listener(spec, pki, port, pool="app")
    with Gateway(tmp_path, spec):
        for name in ("shop.example.test", "blog.example.test"):
            out = subprocess.run(
                ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", name,
                 "-CAfile", str(pki.ca_pem_path), "-verify_return_error", "-brief"],
                input=b"", capture_output=True, timeout=20)
            text = (out.stdout + out.stderr).decode()
            assert f"CN = {name}" in text or f"CN={name}" in text, text
            assert "Verification: OK" in text, text
        # SNI for blog, Host for shop: 421 Misdirected Request.
        status, _, _ = https_get("127.0.0.1", port, "/", sni="blog.example.test",
                                 cafile=pki.ca_pem_path,
                                 headers={"Host": "shop.example.test"})
        assert status == 421
        status, _, body = https_get("127.0.0.1", port, "/", sni="blog.example.test",
                                    cafile=pki.ca_pem_path)
        assert status == 200 and _json_body(body)["backend"] == "app"
        # A host no listener serves (no basic listener): 404.
        status, _, _ = https_get("127.0.0.1", port, "/", sni=None, cafile=None,
                                 headers={"Host": "other.example.test"})
        assert status == 404


def test_routing_follows_each_requests_host_on_one_connection(tmp_path: Path, pki,
                                                              backend_factory) -> None:
    """Routing decisions are remembered per (Host, SNI, target): the same target on one
    keep-alive connection still goes wherever each request's Host says."""
    app, two = backend_factory("app"), backend_factory("two")
    port = free_port()
    spec = simple_spec(tmp_path, cert=pki.issue(["127.0.0.1"]),
                       backends={"app": app, "two": two}, port=port, workers=1)
    _add_blog_listener(spec, pki, port, pool="two")
    with Gateway(tmp_path, spec):
        conn = https_connection("127.0.0.1", port, sni=None, cafile=None)
        try:
            seen = []
            for host in ["blog.example.test", "other.test", "BLOG.example.test:443",
                         "other.test", "blog.example.test"] * 2:
                conn.request("GET", "/same?q=1", headers={"Host": host})
                response = conn.getresponse()
                seen.append((host, response.status, _json_body(response.read())["backend"]))
        finally:
            conn.close()
    expected = [(host, 200, "two" if host.lower().startswith("blog") else "app")
                for host, _, _ in seen]
    assert seen == expected


@pytest.mark.parametrize("case", ["pin_mismatch", "name_mismatch", "untrusted_chain"])
def test_refused_backend_receives_zero_bytes(tmp_path: Path, pki, backend_factory,
                                             case: str) -> None:
    """The handshake completes, then the connection closes with no HTTP byte sent."""
    if case == "pin_mismatch":
        leaf = pki.self_signed(["evil.internal"])
        settings = {"pinned_public_keys": [pki.self_signed(["good.internal"]).spki_pin]}
    elif case == "name_mismatch":
        leaf = pki.issue(["wrong.internal"])
        settings = {"trusted_root_certificates": [str(pki.ca_pem_path)],
                    "host_name": "app.internal"}
    else:
        leaf = pki.issue(["app.internal"], ca=pki.other_ca())
        settings = {"trusted_root_certificates": [str(pki.ca_pem_path)],
                    "host_name": "app.internal"}
    evil = backend_factory("evil", mode="raw-record", leaf=leaf)
    front = pki.issue(["127.0.0.1"])
    spec = simple_spec(tmp_path, cert=front, backends={"evil": evil})
    spec.settings[0].pop("pinned_public_keys")
    spec.settings[0].update(settings)
    with Gateway(tmp_path, spec) as gw:
        status, _, _ = https_get("127.0.0.1", gw.port, "/secret", sni="127.0.0.1",
                                    cafile=pki.ca_pem_path,
                                    headers={"Authorization": "Bearer hunter2"})
        assert status == 502
        records = evil.wait_records(1)
        assert records and all(r["received"] == "" for r in records), records
        assert any(r["handshake_ok"] for r in records), records
        record = gw.wait_log(lambda r: r["uri"] == "/secret")
        assert record["status"] == 502
        assert record["error_info"].startswith(case), record


def test_gateway_statuses_404_502_503_504(tmp_path: Path, pki, backend_factory) -> None:
    app = backend_factory("app")
    front = pki.issue(["127.0.0.1"])
    dead_port = free_port()
    spec = simple_spec(tmp_path, cert=front, backends={"app": app},
                       settings={"request_timeout": 1, "connect_timeout": 2})
    spec.pools += [{"name": "dead", "servers": [f"127.0.0.1:{dead_port}"]},
                   {"name": "empty", "servers": []}]
    spec.listeners[0]["host_names"] = ["127.0.0.1"]
    spec.rules[0]["path_rules"] = [
        {"name": "dead", "paths": ["/dead"], "backend_pool": "dead",
         "backend_settings": "app-tls"},
        {"name": "empty", "paths": ["/empty"], "backend_pool": "empty",
         "backend_settings": "app-tls"},
    ]
    with Gateway(tmp_path, spec) as gw:
        def get(path: str, host: str = "127.0.0.1") -> int:
            status, _, _ = https_get("127.0.0.1", gw.port, path, sni=None, cafile=None,
                                     headers={"Host": host}, timeout=15)
            return status

        assert get("/", host="nobody.test") == 404
        assert get("/dead") == 502
        assert get("/empty") == 503
        assert get("/slow?delay=3") == 504
        assert get("/") == 200
        def info(uri: str) -> str:  # the log is written in batches: wait for the line
            return str(gw.wait_log(lambda r: r["uri"] == uri)["error_info"])

        assert info("/dead").startswith("connect_refused")
        assert info("/empty") == "no_healthy_server"
        assert info("/slow?delay=3") == "response_timeout"


def test_chunked_upload_and_backend_keepalive_reuse(tmp_path: Path, pki,
                                                     backend_factory) -> None:
    app = backend_factory("app")
    front = pki.issue(["127.0.0.1"])
    spec = simple_spec(tmp_path, cert=front, backends={"app": app}, workers=1)
    with Gateway(tmp_path, spec) as gw:
        body = b"x" * 300_000

        def chunks():
            for i in range(0, len(body), 7000):
                yield body[i:i + 7000]

        conn = https_connection("127.0.0.1", gw.port, sni=None, cafile=None)
        conn.request("POST", "/upload", body=chunks(), encode_chunked=True,
                     headers={"Transfer-Encoding": "chunked"})
        seen = _json_body(conn.getresponse().read())
        assert seen["body_len"] == len(body)
        assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
        assert seen["body_chunked"] is True
        # Ten more requests on new client connections reuse the pooled backend connection.
        for _ in range(10):
            status, _, _ = https_get("127.0.0.1", gw.port, "/", sni=None, cafile=None)
            assert status == 200
        # What the backend saw, leaving out the prober's own requests (one per interval).
        proxied = [r for r in app.records()
                   if dict((k.lower(), v) for k, v in r["headers"]).get("user-agent")
                   != "gatewayd-probe"]
        assert len(proxied) == 11
        assert len({r["conn_id"] for r in proxied}) == 1, proxied  # one TLS connection


def test_backend_dying_mid_response_closes_the_client_connection(
        tmp_path: Path, pki, backend_factory) -> None:
    app = backend_factory("app")
    spec = simple_spec(tmp_path, cert=pki.issue(["127.0.0.1"]), backends={"app": app})
    with Gateway(tmp_path, spec) as gw:
        conn = https_connection("127.0.0.1", gw.port, sni=None, cafile=None, timeout=10)
        conn.request("GET", "/die-mid?bytes=50000")
        response = conn.getresponse()
        assert response.status == 200
        with pytest.raises(Exception) as err:  # IncompleteRead, not a hang
            response.read()
        assert "IncompleteRead" in type(err.value).__name__ or isinstance(
            err.value, (ConnectionError, ssl.SSLError)), err.value
        record = gw.wait_log(lambda r: r["uri"].startswith("/die-mid"))
        assert record["error_info"].startswith("upstream_truncated")
        # and the worker is fine
        assert https_get("127.0.0.1", gw.port, "/", sni=None, cafile=None)[0] == 200


def test_plain_http_listener_and_http10_client(tmp_path: Path, pki, backend_factory) -> None:
    app = backend_factory("app")
    spec = simple_spec(tmp_path, cert=pki.issue(["127.0.0.1"]), backends={"app": app})
    spec.listeners[0] = {"name": "front", "bind": spec.listeners[0]["bind"],
                         "protocol": "http"}
    with Gateway(tmp_path, spec) as gw:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
            sock.sendall(b"GET /chunked?n=3&size=5 HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"transfer-encoding" not in head.lower()  # HTTP/1.0: delimited by close
        assert len(body) == 15
        seen = gw.wait_log(lambda r: r["uri"].startswith("/chunked"))
        assert seen["http_version"] == "1.0" and seen["tls_protocol"] == ""


def test_worker_killed_is_replaced_and_term_stops_cleanly(tmp_path: Path, pki,
                                                          backend_factory) -> None:
    app = backend_factory("app")
    spec = simple_spec(tmp_path, cert=pki.issue(["127.0.0.1"]), backends={"app": app})
    gw = Gateway(tmp_path, spec)
    try:
        victim = gw.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: victim not in gw.worker_pids(), 10, "the killed worker reaped")
        gw.wait_workers(2)
        assert https_get("127.0.0.1", gw.port, "/", sni=None, cafile=None)[0] == 200
        workers = gw.worker_pids()
        assert gw.stop() == 0
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
                f"/proc/{pid}/status").read_text().lower()
    finally:
        if gw.proc.alive:
            gw.proc.kill()


def test_pin_command_matches_openssl(tmp_path: Path, pki) -> None:
    leaf = pki.self_signed(["pinned.internal"])
    out = subprocess.run([*GATEWAYD, "--pin", str(leaf.cert_path)], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    # The same pin computed by openssl, independently (the HPKP recipe).
    pubkey = subprocess.run(["openssl", "x509", "-in", str(leaf.cert_path), "-pubkey",
                             "-noout"], capture_output=True, check=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "der"], input=pubkey,
                         capture_output=True, check=True).stdout
    digest = subprocess.run(["openssl", "dgst", "-sha256", "-binary"], input=der,
                            capture_output=True, check=True).stdout
    b64 = subprocess.run(["openssl", "base64", "-A"], input=digest, capture_output=True,
                         check=True).stdout.decode().strip()
    assert out.stdout.strip() == f"sha256/{b64}" == leaf.spki_pin


def test_check_reports_problems_with_file_and_line(tmp_path: Path) -> None:
    config = tmp_path / "gw.toml"
    config.write_text(GatewaySpec(
        server={"workers": 2},
        listeners=[{"name": "x", "bind": "127.0.0.1:1", "protocol": "https",
                    "certificate": "missing.pem", "private_key": "missing.key"}],
        rules=[{"name": "r", "priority": 1, "listener": "x", "backend_pool": "nope",
                "backend_settings": "nope"}],
    ).render())
    out = subprocess.run([*GATEWAYD, "-c", str(config), "--check"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 4
    lines = out.stderr.strip().splitlines()
    assert any(line.startswith(f"{config}:") and "missing.pem" in line for line in lines), \
        out.stderr
    assert any("backend_pool" in line and "nope" in line for line in lines), out.stderr


def test_tls_session_issued_by_one_worker_resumes_on_another(tmp_path: Path, pki,
                                                             backend_factory) -> None:
    """Server contexts are built before fork, so every worker shares the ticket keys: a
    session from a worker that has since been killed resumes on its replacement."""
    app = backend_factory("app")
    spec = simple_spec(tmp_path, cert=pki.issue(["127.0.0.1"]), backends={"app": app},
                       workers=1)
    with Gateway(tmp_path, spec) as gw:
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            ctx = ssl.create_default_context(cafile=str(pki.ca_pem_path))
            ctx.maximum_version = version
            first = https_connection("127.0.0.1", gw.port, sni="127.0.0.1", cafile=None,
                                     context=ctx)
            first.request("GET", "/")
            first.getresponse().read()  # TLS 1.3 tickets arrive after the handshake
            session = first.sock.session
            first.close()
            assert session is not None
            (old_worker,) = gw.worker_pids()
            os.kill(old_worker, signal.SIGKILL)
            wait_for(lambda old=old_worker: old not in gw.worker_pids(), 10, "worker reaped")
            gw.wait_workers(1)
            raw = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
            resumed = ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session)
            try:
                assert resumed.session_reused, f"{version.name} session not resumed"
            finally:
                resumed.close()


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_openssl_s_client_resumes_a_killed_workers_session_on_another(
        tmp_path: Path, pki, backend_factory, version: str) -> None:
    """The same check with openssl s_client as the independent client: `-sess_out` saves
    the session a worker issued, that worker is killed, and `-sess_in` on a fresh
    connection (necessarily to another worker) reports `Reused`."""
    app = backend_factory("app")
    spec = simple_spec(tmp_path, cert=pki.issue(["127.0.0.1"]), backends={"app": app},
                       workers=1)
    session = tmp_path / f"session{version}.pem"
    request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    with Gateway(tmp_path, spec) as gw:
        args = ["openssl", "s_client", "-connect", f"127.0.0.1:{gw.port}", "-servername",
                "127.0.0.1", "-CAfile", str(pki.ca_pem_path), "-verify_return_error",
                "-ign_eof", version]
        first = subprocess.run([*args, "-sess_out", str(session)], input=request,
                               capture_output=True, timeout=30)
        assert b"HTTP/1.1 200" in first.stdout, first.stdout[-2000:]
        assert session.stat().st_size > 0
        (old_worker,) = gw.worker_pids()
        os.kill(old_worker, signal.SIGKILL)
        wait_for(lambda: old_worker not in gw.worker_pids(), 10, "worker reaped")
        gw.wait_workers(1)
        assert gw.worker_pids() != [old_worker]
        second = subprocess.run([*args, "-sess_in", str(session)], input=request,
                                capture_output=True, timeout=30)
        text = second.stdout.decode("latin-1")
        assert "Reused, TLSv1." in text, text[-2000:]
        assert "HTTP/1.1 200" in text


def test_int_stops_fast_even_with_a_request_in_flight(tmp_path: Path, pki,
                                                      backend_factory) -> None:
    app = backend_factory("app")
    spec = simple_spec(tmp_path, cert=pki.issue(["127.0.0.1"]), backends={"app": app},
                       server={"graceful_timeout": 30})
    gw = Gateway(tmp_path, spec)
    try:
        conn = https_connection("127.0.0.1", gw.port, sni=None, cafile=None, timeout=30)
        conn.request("GET", "/slow?delay=20")
        wait_for(lambda: app.records(), 10, "the slow request to reach the backend")
        started = time.monotonic()
        gw.proc.signal(signal.SIGINT)
        assert gw.proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 5  # not the 20 s of the request
        assert gw.worker_pids() == []
    finally:
        if gw.proc.alive:
            gw.proc.kill()


def test_require_sni_refuses_unknown_names(tmp_path: Path, pki, backend_factory) -> None:
    app = backend_factory("app")
    spec = simple_spec(tmp_path, cert=pki.issue(["shop.example.test"]),
                       backends={"app": app})
    spec.listeners[0].update({"host_names": ["shop.example.test"], "require_sni": True})
    with Gateway(tmp_path, spec) as gw:
        status, _, _ = https_get("127.0.0.1", gw.port, "/", sni="shop.example.test",
                                 cafile=pki.ca_pem_path)
        assert status == 200
        for sni in ("other.example.test", None):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                https_get("127.0.0.1", gw.port, "/", sni=sni, cafile=None)
        assert https_get("127.0.0.1", gw.port, "/", sni="shop.example.test",
                         cafile=pki.ca_pem_path)[0] == 200


def test_http10_request_without_host_names_the_backend(tmp_path: Path, pki,
                                                       backend_factory) -> None:
    """HTTP/1.0 allows no Host; the backend (HTTP/1.1) must get one: its address."""
    app = backend_factory("app")
    spec = simple_spec(tmp_path, cert=pki.issue(["127.0.0.1"]), backends={"app": app})
    with Gateway(tmp_path, spec) as gw:
        out = curl(["-k", "-0", "-H", "Host:", f"https://127.0.0.1:{gw.port}/no-host"])
        assert out.returncode == 0, out.stderr
        seen = json.loads(out.stdout)
        hosts = [v for k, v in seen["headers"] if k.lower() == "host"]
        assert hosts == [f"127.0.0.1:{app.port}"]


def test_alpn_offers_only_http11(tmp_path: Path, pki, backend_factory) -> None:
    """HTTP/2 to clients is not served: ALPN picks http/1.1, and an h2-only client gets
    no protocol (and falls back to HTTP/1.1), never h2."""
    app = backend_factory("app")
    spec = simple_spec(tmp_path, cert=pki.issue(["127.0.0.1"]), backends={"app": app})
    with Gateway(tmp_path, spec) as gw:
        def negotiated(offer: str) -> str:
            out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{gw.port}",
                                  "-alpn", offer], input=b"", capture_output=True,
                                 timeout=20)
            return out.stdout.decode(errors="replace")

        assert "ALPN protocol: http/1.1" in negotiated("h2,http/1.1")
        only_h2 = negotiated("h2")
        assert "No ALPN negotiated" in only_h2 and "ALPN protocol: h2" not in only_h2
        out = curl(["-k", "--http2", "-o", "/dev/null", "-w", "%{http_version}",
                    f"https://127.0.0.1:{gw.port}/"])
        assert out.stdout == "1.1", out
