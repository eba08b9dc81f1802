"""The frontend features live: a real master and workers, real backends, curl,
`openssl s_client` and a real WebSocket client and server as independent peers."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp

from tests.support.gateway import Gateway, GatewaySpec, simple_spec
from tests.support.pki import Leaf, TestPKI
from tests.support.procs import curl, free_port, https_connection, https_get, wait_for


def _headers(body: bytes) -> dict[str, str]:
    return {k.lower(): v for k, v in json.loads(body)["headers"]}


# -- redirects ----------------------------------------------------------------------------


def test_redirects_exact_location(tmp_path: Path, pki: TestPKI, backend_factory: Any) -> None:
    """HTTP → HTTPS on a listener redirect, a path-rule redirect to a URL, and the
    HTTPS listener still proxying."""
    app = backend_factory("app")
    front = pki.issue(["shop.example.test"])
    https_port, http_port = free_port(), free_port()
    spec = simple_spec(tmp_path, cert=front, backends={"app": app}, port=https_port)
    spec.listeners.append({"name": "plain", "bind": f"127.0.0.1:{http_port}",
                           "protocol": "http"})
    spec.rules.append({"name": "plain", "priority": 20, "listener": "plain",
                       "redirect": "to-https",
                       "path_rules": [{"name": "legacy", "paths": ["/legacy/*"],
                                       "redirect": "to-docs"}]})
    spec.extra = ('[[redirect]]\nname = "to-https"\nstatus = 301\ntarget_listener = "front"\n'
                  '[[redirect]]\nname = "to-docs"\nstatus = 307\n'
                  'target_url = "https://docs.example.test/v2/"\ninclude_query_string = false\n')
    with Gateway(tmp_path, spec) as gw:
        out = curl(["-i", f"http://127.0.0.1:{http_port}/a/./b?x=1&y=2",
                    "-H", f"Host: shop.example.test:{http_port}"])
        assert out.stdout.startswith("HTTP/1.1 301 Moved Permanently"), out.stdout
        assert f"Location: https://shop.example.test:{https_port}/a/b?x=1&y=2\n" in out.stdout
        out = curl(["-i", f"http://127.0.0.1:{http_port}/legacy/page?x=1",
                    "-H", "Host: shop.example.test"])
        assert out.stdout.startswith("HTTP/1.1 307 Temporary Redirect"), out.stdout
        assert "Location: https://docs.example.test/v2/legacy/page\n" in out.stdout
        # curl follows the redirect to the HTTPS listener, which proxies.
        out = curl(["-L", "--cacert", str(pki.ca_pem_path), "--resolve",
                    f"shop.example.test:{https_port}:127.0.0.1",
                    "--connect-to", f"shop.example.test:{http_port}:127.0.0.1:{http_port}",
                    f"http://shop.example.test:{http_port}/after"])
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["target"] == "/after"
        record = gw.wait_log(lambda r: r["uri"] == "/legacy/page?x=1")
        assert record["status"] == 307 and record["path_rule"] == "legacy"
        assert record["redirect_location"] == "https://docs.example.test/v2/legacy/page"
        assert record["backend_pool"] == ""


# -- mutual TLS -----------------------------------------------------------------------------


def _mtls_setup(tmp_path: Path, pki: TestPKI, backend_factory: Any
                ) -> tuple[GatewaySpec, int, int, Leaf, Leaf]:
    app = backend_factory("app")
    client_ca = pki.other_ca("Client CA")
    alice = pki.issue(["alice.client.test"], ca=client_ca)
    mallory = pki.issue(["mallory.client.test"], ca=pki.other_ca("Rogue CA"))
    front = pki.issue(["secure.example.test", "open.example.test", "opt.example.test"])
    port, opt_port = free_port(), free_port()
    spec = simple_spec(tmp_path, cert=front, backends={"app": app}, port=port)
    spec.listeners[0]["host_names"] = ["open.example.test"]
    spec.listeners += [
        {"name": "secure", "bind": f"127.0.0.1:{port}", "protocol": "https",
         "host_names": ["secure.example.test"], "certificate": str(front.cert_path),
         "private_key": str(front.key_path), "client_auth": "required",
         "client_ca": [str(client_ca.pem_path)]},
        {"name": "opt", "bind": f"127.0.0.1:{opt_port}", "protocol": "https",
         "certificate": str(front.cert_path), "private_key": str(front.key_path),
         "client_auth": "optional", "client_ca": [str(client_ca.pem_path)]},
    ]
    for priority, name in ((20, "secure"), (30, "opt")):
        spec.rules.append({"name": name, "priority": priority, "listener": name,
                           "backend_pool": "app", "backend_settings": "app-tls"})
    return spec, port, opt_port, alice, mallory


def test_mutual_tls_required_and_optional(tmp_path: Path, pki: TestPKI,
                                          backend_factory: Any) -> None:
    spec, port, opt_port, alice, mallory = _mtls_setup(tmp_path, pki, backend_factory)
    ca = ["--cacert", str(pki.ca_pem_path)]
    alice_cert = ["--cert", str(alice.cert_path), "--key", str(alice.key_path)]
    with Gateway(tmp_path, spec) as gw:
        secure = ["--resolve", f"secure.example.test:{port}:127.0.0.1"]
        url = f"https://secure.example.test:{port}/who"
        out = curl([*ca, *secure, *alice_cert, url, "-H", "X-Client-Cert-Verify: SUCCESS",
                    "-H", "X-Client-Cert-Subject: CN=admin"])
        assert out.returncode == 0, out.stderr
        headers = _headers(out.stdout.encode())
        assert headers["x-client-cert-verify"] == "SUCCESS"
        assert headers["x-client-cert-fingerprint"] == alice.sha256_fingerprint
        assert headers["x-client-cert-subject"] == "CN=alice.client.test"
        assert headers["x-client-cert-issuer"] == "CN=Client CA,O=gatewayd tests"
        assert headers["x-client-cert-not-after"].endswith(" GMT")
        seen = [k.lower() for k, _ in json.loads(out.stdout)["headers"]]
        assert seen.count("x-client-cert-verify") == 1  # the spoofed copies are gone
        assert seen.count("x-client-cert-subject") == 1
        record = gw.wait_log(lambda r: r["uri"] == "/who")
        assert record["client_cert_verify"] == "SUCCESS"
        assert record["client_cert_fingerprint"] == alice.sha256_fingerprint
        assert record["client_cert_subject"] == "CN=alice.client.test"

        # required: no certificate, or one from another CA, fails the handshake.
        for extra in ([], ["--cert", str(mallory.cert_path), "--key", str(mallory.key_path)]):
            out = curl([*ca, *secure, *extra, url])
            assert out.returncode != 0 and not out.stdout, out.stdout

        # The open listener's SNI (no certificate asked) cannot reach "secure" by Host.
        status, _, _ = https_get("127.0.0.1", port, "/", sni="open.example.test",
                                 cafile=pki.ca_pem_path,
                                 headers={"Host": "secure.example.test"})
        assert status == 421
        # Nor can a connection without SNI (the basic/fallback listener's handshake).
        status, _, _ = https_get("127.0.0.1", port, "/", sni=None, cafile=pki.ca_pem_path,
                                 headers={"Host": "secure.example.test"})
        assert status == 421
        status, _, body = https_get("127.0.0.1", port, "/", sni="open.example.test",
                                    cafile=pki.ca_pem_path,
                                    headers={"X-Client-Cert-Verify": "SUCCESS"})
        assert status == 200 and "x-client-cert-verify" not in _headers(body)

        # optional: NONE without a certificate, FAILED:<reason> with a wrong one.
        opt = ["--resolve", f"opt.example.test:{opt_port}:127.0.0.1"]
        opt_url = f"https://opt.example.test:{opt_port}/opt"
        out = curl([*ca, *opt, opt_url])
        assert _headers(out.stdout.encode())["x-client-cert-verify"] == "NONE"
        out = curl([*ca, *opt, "--cert", str(mallory.cert_path), "--key",
                    str(mallory.key_path), opt_url])
        headers = _headers(out.stdout.encode())
        assert headers["x-client-cert-verify"].startswith("FAILED:"), headers
        assert "issuer" in headers["x-client-cert-verify"], headers
        assert headers["x-client-cert-fingerprint"] == mallory.sha256_fingerprint
        out = curl([*ca, *opt, *alice_cert, opt_url])
        assert _headers(out.stdout.encode())["x-client-cert-verify"] == "SUCCESS"


def test_mutual_tls_allowed_issuers(tmp_path: Path, pki: TestPKI, backend_factory: Any) -> None:
    spec, port, opt_port, alice, _ = _mtls_setup(tmp_path, pki, backend_factory)
    spec.listeners[2]["client_allowed_issuers"] = ["CN=Some Other CA"]
    spec.listeners[1]["client_allowed_issuers"] = ["o=gatewayd tests, cn=client ca"]
    with Gateway(tmp_path, spec):
        cert = ["--cert", str(alice.cert_path), "--key", str(alice.key_path),
                "--cacert", str(pki.ca_pem_path)]
        out = curl([*cert, "--resolve", f"opt.example.test:{opt_port}:127.0.0.1",
                    f"https://opt.example.test:{opt_port}/"])
        assert _headers(out.stdout.encode())["x-client-cert-verify"] == \
            "FAILED:issuer_not_allowed"
        out = curl([*cert, "--resolve", f"secure.example.test:{port}:127.0.0.1",
                    f"https://secure.example.test:{port}/"])
        assert _headers(out.stdout.encode())["x-client-cert-verify"] == "SUCCESS"


# -- header rewrites and error pages --------------------------------------------------------


def test_rewrites_and_error_pages(tmp_path: Path, pki: TestPKI, backend_factory: Any) -> None:
    app = backend_factory("app")
    front = pki.issue(["shop.example.test"])
    dead = free_port()
    (tmp_path / "502.html").write_text("<h1>We are fixing it</h1>\n")
    (tmp_path / "404.html").write_text("<h1>Nothing here</h1>\n")
    spec = simple_spec(tmp_path, cert=front, backends={"app": app})
    spec.listeners[0]["host_names"] = ["shop.example.test"]
    spec.pools.append({"name": "dead", "servers": [f"127.0.0.1:{dead}"]})
    spec.rules[0]["rewrite_set"] = "site"
    spec.rules[0]["path_rules"] = [
        {"name": "down", "paths": ["/down/*"], "backend_pool": "dead",
         "backend_settings": "app-tls", "rewrite_set": "site"}]
    spec.extra = (
        '[error_pages]\n502 = "502.html"\n404 = "404.html"\n'
        '[[rewrite_set]]\nname = "site"\n'
        '  [[rewrite_set.rule]]\n  name = "always"\n'
        '  request_headers_set = { X-Client-Port = "{client_port}", '
        'X-Seen = "{host} {uri_path} {query_string} {ssl_protocol}" }\n'
        '  request_headers_remove = ["X-Debug"]\n'
        '  response_headers_set = { Strict-Transport-Security = "max-age=31536000", '
        'X-Backend-Type = "{http_resp_content_type}" }\n'
        '  [[rewrite_set.rule]]\n  name = "not-curl"\n'
        '  condition = { variable = "{http_req_user_agent}", pattern = "^curl/", '
        'negate = true }\n'
        '  response_headers_set = { X-Browser = "yes" }\n'
    )
    with Gateway(tmp_path, spec) as gw:
        base = ["--cacert", str(pki.ca_pem_path), "--resolve",
                f"shop.example.test:{gw.port}:127.0.0.1", "-i"]
        url = f"https://shop.example.test:{gw.port}"
        out = curl([*base, f"{url}/p/../q?z=1", "-H", "X-Debug: 1"])
        head, _, body = out.stdout.partition("\n\n")
        assert "Strict-Transport-Security: max-age=31536000" in head
        assert "X-Backend-Type: application/json" in head
        assert "X-Browser" not in head
        seen = {k.lower(): v for k, v in json.loads(body)["headers"]}
        assert "x-debug" not in seen
        assert seen["x-seen"] == "shop.example.test /q z=1 TLSv1.3"
        assert int(seen["x-client-port"]) > 0
        out = curl([*base, "-A", "Mozilla/5.0", f"{url}/"])
        assert "X-Browser: yes" in out.stdout
        # A backend's own error passes through unchanged and is rewritten like any response.
        out = curl([*base, f"{url}/status/502"])
        assert out.stdout.startswith("HTTP/1.1 502")
        assert out.stdout.endswith("status 502\n") and "Strict-Transport" in out.stdout
        # A gateway-made 502: the custom page, and no rewrite.
        out = curl([*base, f"{url}/down/x"])
        assert out.stdout.startswith("HTTP/1.1 502")
        assert out.stdout.endswith("<h1>We are fixing it</h1>\n")
        assert "Content-Type: text/html; charset=utf-8" in out.stdout
        assert "Strict-Transport" not in out.stdout
        # 404 for a host no listener serves: the global page.
        status, _, body = https_get("127.0.0.1", gw.port, "/", sni="shop.example.test",
                                          cafile=pki.ca_pem_path,
                                          headers={"Host": "nobody.example.test"})
        assert status == 421 or (status == 404 and body == b"<h1>Nothing here</h1>\n")
        status, _, body = https_get("127.0.0.1", gw.port, "/", sni=None, cafile=None,
                                          headers={"Host": "nobody.example.test"})
        assert status == 404 and body == b"<h1>Nothing here</h1>\n"


# -- OCSP stapling --------------------------------------------------------------------------


def _ocsp_response(pki: TestPKI, leaf: Leaf) -> bytes:
    now = dt.datetime.now(dt.UTC)
    builder = ocsp.OCSPResponseBuilder().add_response(
        cert=leaf.cert, issuer=pki.ca.cert, algorithm=hashes.SHA256(),
        cert_status=ocsp.OCSPCertStatus.GOOD, this_update=now,
        next_update=now + dt.timedelta(days=1), revocation_time=None, revocation_reason=None,
    ).responder_id(ocsp.OCSPResponderEncoding.HASH, pki.ca.cert)
    return builder.sign(pki.ca.key, hashes.SHA256()).public_bytes(Encoding.DER)


def _s_client(port: int, *args: str) -> str:
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
                         input=b"", capture_output=True, timeout=20)
    return (out.stdout + out.stderr).decode(errors="replace")


def test_ocsp_stapling(tmp_path: Path, pki: TestPKI, backend_factory: Any) -> None:
    app = backend_factory("app")
    front = pki.issue(["127.0.0.1"])
    staple = tmp_path / "front.ocsp"
    staple.write_bytes(_ocsp_response(pki, front))
    spec = simple_spec(tmp_path, cert=front, backends={"app": app})
    spec.listeners[0]["ocsp_response_file"] = str(staple)
    with Gateway(tmp_path, spec) as gw:
        text = _s_client(gw.port, "-status", "-servername", "127.0.0.1")
        assert "OCSP Response Status: successful" in text, text
        assert "Cert Status: good" in text, text
        for version in ("-tls1_2", "-tls1_3"):
            assert "Cert Status: good" in _s_client(gw.port, "-status", version)
        assert "OCSP" not in _s_client(gw.port)  # only when the client asks


def test_ocsp_response_for_another_certificate_is_a_config_error(tmp_path: Path,
                                                                  pki: TestPKI) -> None:
    front, other = pki.issue(["127.0.0.1"]), pki.issue(["other.test"])
    staple = tmp_path / "wrong.ocsp"
    staple.write_bytes(_ocsp_response(pki, other))
    spec = simple_spec(tmp_path, cert=front, backends={"app": _FakeBackend()})
    spec.listeners[0]["ocsp_response_file"] = str(staple)
    path = tmp_path / "gw.toml"
    path.write_text(spec.render())
    out = subprocess.run([sys.executable, "-m", "gatewayd.cli", "-c", str(path), "--check"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 4
    assert "ocsp_response_file: " in out.stderr and "another certificate" in out.stderr


class _FakeBackend:
    address = "127.0.0.1:9"

    class leaf:  # mimics Backend.leaf
        spki_pin = "sha256/" + "A" * 43 + "="


# -- certificates without a restart ---------------------------------------------------------


def _serial(port: int, sni: str = "127.0.0.1") -> int:
    from cryptography import x509

    from tests.support.procs import fetch_peer_cert
    return x509.load_der_x509_certificate(fetch_peer_cert("127.0.0.1", port, sni=sni)
                                           ).serial_number


RELOADED = r"listener front: certificate reloaded from "
REFUSED = r"listener front: new certificate refused, still serving the previous one: "


def _log_count(gw: Gateway, pattern: str) -> int:
    """How many log lines so far match *pattern* (every worker logs its own)."""
    return len(re.findall(pattern, gw.proc.stdout_text() + gw.proc.stderr_text()))


def _replace_pair(target: Leaf, new: Leaf) -> None:
    """Atomic renames, as certbot-like tools do: key first, then the certificate."""
    for src, dst in ((new.key_path, target.key_path), (new.cert_path, target.cert_path)):
        tmp = dst.with_suffix(".tmp")
        tmp.write_bytes(src.read_bytes())
        os.replace(tmp, dst)


def test_watch_certificates_picks_up_new_pair_and_refuses_a_broken_one(
        tmp_path: Path, pki: TestPKI, backend_factory: Any) -> None:
    app = backend_factory("app")
    front = pki.issue(["127.0.0.1"], stem="front")
    spec = simple_spec(tmp_path, cert=front, backends={"app": app}, workers=2)
    spec.listeners[0]["watch_certificates"] = True
    with Gateway(tmp_path, spec) as gw:
        assert _serial(gw.port) == front.cert.serial_number
        kept = https_connection("127.0.0.1", gw.port, sni="127.0.0.1", cafile=pki.ca_pem_path)
        kept.request("GET", "/before")
        assert kept.getresponse().read()
        renewed = pki.issue(["127.0.0.1"])
        _replace_pair(front, renewed)
        # Both workers must have switched (one may first have polled between the two
        # renames, refused the half-renewed pair, and switched on its next poll): six
        # handshakes alone could all land on one worker.
        wait_for(lambda: _log_count(gw, RELOADED) >= 2, 20, "both workers reloaded")
        assert all(_serial(gw.port) == renewed.cert.serial_number for _ in range(6))
        kept.request("GET", "/after")  # the open connection carries on
        assert kept.getresponse().status == 200
        kept.close()
        # A certificate whose key does not match: refused, the renewed one stays.
        refusals = _log_count(gw, REFUSED)
        broken = pki.issue(["127.0.0.1"])
        front.cert_path.write_bytes(broken.cert_path.read_bytes())
        wait_for(lambda: _log_count(gw, REFUSED) > refusals, 20, "the broken pair refused")
        assert all(_serial(gw.port) == renewed.cert.serial_number for _ in range(6))
        status, _, _ = https_get("127.0.0.1", gw.port, "/", sni="127.0.0.1",
                                 cafile=pki.ca_pem_path)
        assert status == 200


def test_hup_reloads_certificates_and_keeps_old_on_broken_pair(
        tmp_path: Path, pki: TestPKI, backend_factory: Any) -> None:
    app = backend_factory("app")
    front = pki.issue(["127.0.0.1"], stem="front")
    spec = simple_spec(tmp_path, cert=front, backends={"app": app}, workers=1)
    with Gateway(tmp_path, spec) as gw:
        renewed = pki.issue(["127.0.0.1"])
        _replace_pair(front, renewed)
        gw.proc.signal(signal.SIGHUP)
        wait_for(lambda: _serial(gw.port) == renewed.cert.serial_number, 20, "new certificate")
        broken = pki.issue(["127.0.0.1"])
        front.cert_path.write_bytes(broken.cert_path.read_bytes())
        gw.proc.signal(signal.SIGHUP)
        gw.proc.wait_for_output(r"private_key: .*does not match", 20)
        time.sleep(1)
        assert _serial(gw.port) == renewed.cert.serial_number


# -- WebSocket ------------------------------------------------------------------------------


@pytest.fixture
def ws_backend(pki: TestPKI) -> Iterator[tuple[Any, Leaf, list[dict[str, str]]]]:
    """A real `websockets` server over TLS: echoes messages; "/close4001" closes with
    code 4001; records each handshake's headers."""
    from websockets.sync.server import serve

    leaf = pki.issue(["127.0.0.1"], stem="ws-backend")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(leaf.cert_path, leaf.key_path)
    seen: list[dict[str, str]] = []

    def handler(ws: Any) -> None:
        seen.append({k.lower(): v for k, v in ws.request.headers.raw_items()}
                    | {":path": ws.request.path})
        if ws.request.path == "/close4001":
            ws.close(4001, "bye")
            return
        for message in ws:
            ws.send(message)

    server = serve(handler, "127.0.0.1", 0, ssl=ctx, ping_interval=None,
                   max_size=None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, leaf, seen
    finally:
        server.shutdown()
        thread.join(5)


def _ws_gateway(tmp_path: Path, pki: TestPKI, ws_backend: Any, **server: Any) -> GatewaySpec:
    server_obj, leaf, _ = ws_backend
    port = server_obj.socket.getsockname()[1]

    class _B:
        address = f"127.0.0.1:{port}"

    _B.leaf = leaf  # type: ignore[attr-defined]
    front = pki.issue(["127.0.0.1"])
    return simple_spec(tmp_path, cert=front, backends={"ws": _B()}, workers=1,
                       server=server)


def _ws_connect(port: int, pki: TestPKI, path: str = "/chat") -> Any:
    from websockets.sync.client import connect

    ctx = ssl.create_default_context(cafile=str(pki.ca_pem_path))
    return connect(f"wss://127.0.0.1:{port}{path}", ssl=ctx, ping_interval=None,
                   max_size=None, open_timeout=10)


def test_websocket_echo_both_tls_legs(tmp_path: Path, pki: TestPKI, ws_backend: Any) -> None:
    from websockets.exceptions import ConnectionClosed

    spec = _ws_gateway(tmp_path, pki, ws_backend)
    with Gateway(tmp_path, spec) as gw:
        with _ws_connect(gw.port, pki) as ws:
            ws.send("hello")
            assert ws.recv(timeout=10) == "hello"
            big = os.urandom(4 << 20)  # larger than every socket buffer: backpressure
            ws.send(big)
            assert ws.recv(timeout=30) == big
            for i in range(50):
                ws.send(f"m{i}")
            assert [ws.recv(timeout=10) for _ in range(50)] == [f"m{i}" for i in range(50)]
            ws.close(1000, "done")
            assert ws.close_code == 1000
        seen = ws_backend[2][0]
        assert seen[":path"] == "/chat"
        assert seen["x-forwarded-for"] == "127.0.0.1" and seen["x-forwarded-proto"] == "https"
        assert seen["upgrade"].lower() == "websocket"
        # The backend closes with its own code: the client sees it.
        with _ws_connect(gw.port, pki, "/close4001") as ws, pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == 4001
        record = gw.wait_log(lambda r: r["uri"] == "/chat")
        assert record["status"] == 101
        assert record["bytes_received"] > 4 << 20 and record["bytes_sent"] > 4 << 20
        assert record["error_info"].startswith("websocket_closed:")


def test_websocket_idle_timeout(tmp_path: Path, pki: TestPKI, ws_backend: Any) -> None:
    from websockets.exceptions import ConnectionClosed

    spec = _ws_gateway(tmp_path, pki, ws_backend, websocket_idle_timeout=2)
    with Gateway(tmp_path, spec) as gw, _ws_connect(gw.port, pki) as ws:
        for _ in range(3):  # traffic keeps it open past the timeout
            time.sleep(1)
            ws.send("x")
            assert ws.recv(timeout=5) == "x"
        started = time.monotonic()
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=15)
        assert 1.5 < time.monotonic() - started < 6
        assert gw.wait_log(lambda r: r["status"] == 101)["error_info"] == \
            "websocket_closed: idle_timeout"


def test_websocket_survives_reload_until_graceful_timeout(tmp_path: Path, pki: TestPKI,
                                                          ws_backend: Any) -> None:
    from websockets.exceptions import ConnectionClosed

    spec = _ws_gateway(tmp_path, pki, ws_backend, graceful_timeout=4)
    with Gateway(tmp_path, spec) as gw, _ws_connect(gw.port, pki) as ws:
        old = gw.worker_pids()
        gw.proc.signal(signal.SIGHUP)
        wait_for(lambda: gw.worker_pids() and gw.worker_pids() != old, 20, "new workers")
        reloaded = time.monotonic()
        ws.send("still here")
        assert ws.recv(timeout=5) == "still here"
        with _ws_connect(gw.port, pki) as fresh:  # new tunnels go to the new generation
            fresh.send("new")
            assert fresh.recv(timeout=5) == "new"
        with pytest.raises(ConnectionClosed):
            while True:
                ws.send("ping")
                ws.recv(timeout=10)
                time.sleep(0.2)
        assert time.monotonic() - reloaded < 10  # cut at graceful_timeout (4 s)
