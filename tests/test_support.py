"""Live tests of the test-support code itself: real processes, sockets and TLS."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import http.client
import json
import signal
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.support.backend import pattern_bytes
from tests.support.pki import TestPKI
from tests.support.procs import (
    Backend,
    BackendFactory,
    Proc,
    curl,
    fetch_peer_cert,
    free_port,
    http_connection,
    https_connection,
    https_get,
    wait_for,
    wait_port,
)

LOCAL = "127.0.0.1"


def _json(body: bytes) -> dict[str, Any]:
    return json.loads(body)


def _tls_client(
    pki_: TestPKI, backend: Backend, sni: str = "localhost"
) -> http.client.HTTPConnection:
    return https_connection(LOCAL, backend.port, sni=sni, cafile=pki_.ca_pem_path)


# -- PKI ------------------------------------------------------------------------------


def test_pki_issue_files_and_ip_san(pki: TestPKI) -> None:
    leaf = pki.issue(["app.test", "127.0.0.1", "::1"], key_type="rsa")
    assert leaf.cert_path == pki.directory / "app.test.pem"
    assert leaf.key_path.read_bytes() == leaf.key_pem
    san = leaf.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["app.test"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert leaf.spki_pin.startswith("sha256/") and len(leaf.spki_pin) == 7 + 44
    # The same name again gets a distinct file rather than overwriting the first one.
    assert pki.issue(["app.test"]).cert_path != leaf.cert_path


def test_pki_intermediate_chain_verifies_from_root(pki: TestPKI) -> None:
    inter = pki.intermediate()
    leaf = pki.issue(["chained.test"], ca=inter)
    certs = x509.load_pem_x509_certificates(leaf.cert_path.read_bytes())
    assert [c.subject for c in certs] == [leaf.cert.subject, inter.cert.subject]
    with Backend(
        "chained", workdir=pki.directory.parent / "b", cert=leaf.cert_path, key=leaf.key_path
    ) as backend:
        status, _, body = https_get(
            LOCAL, backend.port, "/", sni="chained.test", cafile=pki.ca_pem_path
        )
    assert status == 200 and _json(body)["sni"] == "chained.test"


# -- backend over TLS -----------------------------------------------------------------


def test_tls_backend_verified_by_stdlib_client(
    pki: TestPKI, backend_factory: BackendFactory
) -> None:
    backend = backend_factory("alpha")
    status, headers, body = https_get(
        LOCAL,
        backend.port,
        "/hello?x=1",
        sni="localhost",
        cafile=pki.ca_pem_path,
        headers={"Host": "other.example", "X-Probe": "1"},
    )
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    echo = _json(body)
    assert echo["backend"] == "alpha"
    assert echo["target"] == "/hello?x=1"
    assert echo["sni"] == "localhost"  # SNI and Host are independent
    assert ["Host", "other.example"] in echo["headers"]
    assert ["X-Probe", "1"] in echo["headers"]
    assert backend.records()[-1]["target"] == "/hello?x=1"


def test_untrusted_ca_expired_and_wrong_name_are_rejected(
    pki: TestPKI, backend_factory: BackendFactory
) -> None:
    backend = backend_factory("trusted")
    rogue = pki.other_ca()
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        https_get(LOCAL, backend.port, "/", sni="localhost", cafile=rogue.pem_path)
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        https_get(LOCAL, backend.port, "/", sni="wrong.test", cafile=pki.ca_pem_path)

    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    expired = pki.issue(["localhost"], not_after=past)
    assert expired.cert.not_valid_after_utc < dt.datetime.now(dt.UTC)
    old = backend_factory("expired", leaf=expired)
    with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
        https_get(LOCAL, old.port, "/", sni="localhost", cafile=pki.ca_pem_path)


def test_self_signed_backend_pin_matches_served_cert(
    pki: TestPKI, backend_factory: BackendFactory
) -> None:
    leaf = pki.self_signed(["pinned.test"])
    backend = backend_factory("pinned", leaf=leaf)
    served = x509.load_der_x509_certificate(fetch_peer_cert(LOCAL, backend.port, sni="pinned.test"))
    assert served == leaf.cert
    # Independent recomputation of the pin from the served certificate.
    spki = served.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert leaf.spki_pin == "sha256/" + base64.b64encode(hashlib.sha256(spki).digest()).decode()
    # Trusting the self-signed cert itself works; trusting the PKI's CA does not.
    status, _, _ = https_get(LOCAL, backend.port, "/", sni="pinned.test", cafile=leaf.cert_path)
    assert status == 200
    with pytest.raises(ssl.SSLCertVerificationError):
        https_get(LOCAL, backend.port, "/", sni="pinned.test", cafile=pki.ca_pem_path)


def test_echo_chunked_upload_headers_and_hash(
    pki: TestPKI, backend_factory: BackendFactory
) -> None:
    backend = backend_factory("echo")
    pieces = [b"hello ", b"chunked ", b"world" * 1000]
    conn = _tls_client(pki, backend)
    try:
        conn.request(
            "POST",
            "/upload",
            body=iter(pieces),
            encode_chunked=True,
            headers={"Transfer-Encoding": "chunked", "X-Trace": "abc", "x-dup": "1"},
        )
        resp = conn.getresponse()
        echo = _json(resp.read())
    finally:
        conn.close()
    whole = b"".join(pieces)
    assert resp.status == 200
    assert echo["method"] == "POST"
    assert echo["body_len"] == len(whole)
    assert echo["body_sha256"] == hashlib.sha256(whole).hexdigest()
    assert echo["body_chunked"] is True
    assert ["Transfer-Encoding", "chunked"] in echo["headers"]
    assert ["x-dup", "1"] in echo["headers"]  # case exactly as sent
    (record,) = backend.records()
    assert record["body_sha256"] == echo["body_sha256"]
    assert record["headers"] == echo["headers"]


def test_content_length_upload_and_keepalive_counters(
    pki: TestPKI, backend_factory: BackendFactory
) -> None:
    backend = backend_factory("counter")
    body = b"x" * 100_000
    conn1 = _tls_client(pki, backend)
    try:
        conn1.request("PUT", "/upload", body=body)
        first = _json(conn1.getresponse().read())
        conn1.request("GET", "/again")
        second = _json(conn1.getresponse().read())
    finally:
        conn1.close()
    assert first["body_len"] == len(body)
    assert (first["conn_requests"], second["conn_requests"]) == (1, 2)
    assert first["handshakes"] == second["handshakes"] == 1

    conn2 = _tls_client(pki, backend)
    try:
        conn2.request("GET", "/third")
        third = _json(conn2.getresponse().read())
        conn2.request("GET", "/stats")
        stats = _json(conn2.getresponse().read())
    finally:
        conn2.close()
    assert third["handshakes"] == 2 and third["conn_requests"] == 1
    assert stats == {"handshakes": 2, "requests": 3}  # /stats itself is not counted
    assert [r["target"] for r in backend.records()] == ["/upload", "/again", "/third"]


def test_big_streams_exact_length(pki: TestPKI, backend_factory: BackendFactory) -> None:
    backend = backend_factory("big")
    n = 3 * 64 * 1024 + 12345
    status, headers, body = https_get(
        LOCAL, backend.port, f"/big?bytes={n}", sni="localhost", cafile=pki.ca_pem_path
    )
    assert status == 200
    assert int(headers["Content-Length"]) == n
    assert len(body) == n
    assert body == pattern_bytes(n)


def test_chunked_response(pki: TestPKI, backend_factory: BackendFactory) -> None:
    backend = backend_factory("chunky")
    status, headers, body = https_get(
        LOCAL, backend.port, "/chunked?n=5&size=1000", sni="localhost", cafile=pki.ca_pem_path
    )
    assert status == 200
    assert headers["Transfer-Encoding"] == "chunked"
    assert body == pattern_bytes(5000)


def test_die_mid_closes_early(pki: TestPKI, backend_factory: BackendFactory) -> None:
    backend = backend_factory("dier")
    conn = _tls_client(pki, backend)
    try:
        conn.request("GET", "/die-mid?bytes=5000")
        resp = conn.getresponse()
        assert resp.status == 200
        assert int(resp.headers["Content-Length"]) == 10000
        with pytest.raises(http.client.IncompleteRead) as info:
            resp.read()
    finally:
        conn.close()
    assert info.value.partial == pattern_bytes(5000)


def test_status_and_slow(pki: TestPKI, backend_factory: BackendFactory) -> None:
    backend = backend_factory("misc")
    status, _, body = https_get(
        LOCAL, backend.port, "/status/503", sni="localhost", cafile=pki.ca_pem_path
    )
    assert (status, body) == (503, b"status 503\n")
    status, _, body = https_get(
        LOCAL, backend.port, "/slow?delay=0.2", sni="localhost", cafile=pki.ca_pem_path
    )
    assert status == 200 and _json(body)["target"] == "/slow?delay=0.2"


def test_plain_http_backend(backend_factory: BackendFactory) -> None:
    backend = backend_factory("plain", tls=False)
    assert backend.url == f"http://127.0.0.1:{backend.port}"
    conn = http_connection(LOCAL, backend.port)
    try:
        conn.request("HEAD", "/big?bytes=10")
        resp = conn.getresponse()
        assert resp.read() == b"" and resp.headers["Content-Length"] == "10"
        conn.request("GET", "/x")
        echo = _json(conn.getresponse().read())
    finally:
        conn.close()
    assert echo["tls"] is False and echo["conn_requests"] == 2


def test_ipv6_backend(pki: TestPKI, backend_factory: BackendFactory) -> None:
    try:
        free_port("::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    backend = backend_factory("six", host="::1", names=["localhost", "::1"])
    status, _, body = https_get("::1", backend.port, "/", sni="localhost", cafile=pki.ca_pem_path)
    assert status == 200 and _json(body)["client"][0] == "::1"


def test_backend_reports_client_certificate(pki: TestPKI, backend_factory: BackendFactory) -> None:
    backend = backend_factory("mtls", client_ca=pki.ca_pem_path)
    client = pki.issue(["client.test"])
    _, _, body = https_get(
        LOCAL,
        backend.port,
        "/",
        sni="localhost",
        cafile=pki.ca_pem_path,
        client_cert=(client.cert_path, client.key_path),
    )
    assert _json(body)["client_cert_cn"] == "client.test"
    _, _, body = https_get(LOCAL, backend.port, "/", sni="localhost", cafile=pki.ca_pem_path)
    assert _json(body)["client_cert_cn"] is None  # optional, not required


# -- raw-record -----------------------------------------------------------------------


def test_raw_record_bytes_after_handshake(pki: TestPKI, backend_factory: BackendFactory) -> None:
    backend = backend_factory("raw", mode="raw-record")
    ctx = ssl.create_default_context(cafile=str(pki.ca_pem_path))

    with (
        socket.create_connection((LOCAL, backend.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET /secret HTTP/1.1\r\nHost: x\r\n\r\n")
    (first,) = backend.wait_records(1)
    assert first["handshake_ok"] is True and first["peer_closed"] is True
    assert base64.b64decode(first["received"]) == b"GET /secret HTTP/1.1\r\nHost: x\r\n\r\n"

    # A client that completes the handshake and closes: zero application bytes.
    with (
        socket.create_connection((LOCAL, backend.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost"),
    ):
        pass
    second = backend.wait_records(2)[1]
    assert second["handshake_ok"] is True and second["received"] == ""

    # A client that refuses the server's certificate: handshake fails, zero bytes.
    rogue_ctx = ssl.create_default_context(cafile=str(pki.other_ca().pem_path))
    with (
        socket.create_connection((LOCAL, backend.port), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        rogue_ctx.wrap_socket(raw, server_hostname="localhost")
    third = backend.wait_records(3)[2]
    assert third["handshake_ok"] is False and third["received"] == ""
    assert [r["conn"] for r in backend.records()] == [1, 2, 3]


# -- curl -----------------------------------------------------------------------------


def test_curl_with_cacert(pki: TestPKI, backend_factory: BackendFactory) -> None:
    backend = backend_factory("curly", names=["curly.test"])
    url = f"https://curly.test:{backend.port}/via-curl?q=1"
    resolve = f"curly.test:{backend.port}:127.0.0.1"
    ok = curl(
        [
            "--cacert",
            pki.ca_pem_path,
            "--resolve",
            resolve,
            "-H",
            "X-Curl: yes",
            "--data-binary",
            "payload",
            url,
        ]
    )
    assert ok.returncode == 0, ok.stderr
    echo = json.loads(ok.stdout)
    assert echo["method"] == "POST" and echo["target"] == "/via-curl?q=1"
    assert echo["sni"] == "curly.test" and ["X-Curl", "yes"] in echo["headers"]
    assert echo["body_sha256"] == hashlib.sha256(b"payload").hexdigest()

    refused = curl(["--cacert", pki.other_ca().pem_path, "--resolve", resolve, url])
    assert refused.returncode == 60, refused  # peer certificate cannot be authenticated


# -- processes ------------------------------------------------------------------------


def test_backend_sigterm_exits_zero(tmp_path: Path) -> None:
    with Backend("term", workdir=tmp_path) as backend:  # plain HTTP
        wait_port(LOCAL, backend.port, 5)
        assert backend.proc is not None
        backend.proc.signal(signal.SIGTERM)
        assert backend.proc.wait(10) == 0


def test_proc_escalates_to_kill_and_captures_output(tmp_path: Path) -> None:
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('started', flush=True)\n"
        "print('to-stderr', file=sys.stderr, flush=True)\n"
        "time.sleep(60)\n"
    )
    with Proc([sys.executable, "-c", code], log_dir=tmp_path, name="stubborn") as proc:
        proc.wait_for_output(r"^started$", 10, "stdout")
        assert proc.alive
        assert proc.stop(timeout=0.5) == -signal.SIGKILL
    assert "to-stderr" in proc.stderr_text() and "started" in proc.stdout_text()
    assert not proc.alive


def test_proc_reports_early_exit(tmp_path: Path) -> None:
    with Proc([sys.executable, "-c", "raise SystemExit(3)"], log_dir=tmp_path) as proc:
        with pytest.raises(AssertionError, match="exited"):
            proc.wait_for_output("never", 10)
        assert proc.wait(5) == 3


def test_wait_for_deadline() -> None:
    with pytest.raises(AssertionError, match="timed out waiting for the impossible"):
        wait_for(lambda: False, 0.1, "the impossible")
    assert wait_for(lambda: 42, 1, "a value") == 42


def test_gateway_that_cannot_start_fails_at_once_with_its_log(
        tmp_path: Path, pki: TestPKI, backend_factory: BackendFactory) -> None:
    """A master that exits (here: its port is bound by a socket of ours) fails
    `Gateway(...)` well before the 20 s readiness deadline, with gatewayd's own stderr in
    the assertion, and leaves no process behind."""
    from tests.support.gateway import Gateway, simple_spec

    backend = backend_factory("app")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # bound, not listening: a connect is refused
        port = taken.getsockname()[1]
        spec = simple_spec(tmp_path, cert=pki.issue(["front.test"]), backends={"app": backend},
                           port=port)
        started = time.monotonic()
        with pytest.raises(AssertionError) as failed:
            Gateway(tmp_path, spec)
        assert time.monotonic() - started < 15
    message = str(failed.value)
    assert "exited with rc=" in message and "--- stderr" in message, message
    assert str(port) in message, message  # gatewayd says which address it could not bind


def test_free_port_is_below_the_kernels_ephemeral_range_and_bindable() -> None:
    """So that no port the kernel hands out (bind(0), outgoing connections) can take
    it between the draw and the program's own bind."""
    from tests.support.procs import _below_ephemeral_range

    first = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    if not _below_ephemeral_range():
        pytest.skip(f"ephemeral range starts at {first}: free_port falls back to bind(0)")
    ports = {free_port() for _ in range(20)}
    assert all(10_000 <= port < first for port in ports), ports
    assert len(ports) > 1  # drawn, not one fixed port
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
