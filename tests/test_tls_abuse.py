"""Hostile TLS clients against a live gatewayd (AppGwSslPolicy20220101S, one worker).

Each case abuses one connection and checks that only that connection is affected: a
normal request is served while the abuse is in progress and after it, the worker pid is
unchanged, and `gatewayd_tls_handshake_errors_total{reason=...}` counts the failure
(the observed reason labels are printed).
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.support.gateway import Gateway, simple_spec
from tests.support.metrics import Samples, scrape, value
from tests.support.pki import TestPKI
from tests.support.procs import Backend, https_get, wait_for

POLICY = "AppGwSslPolicy20220101S"
HANDSHAKE_TIMEOUT = 2
ERRORS = "gatewayd_tls_handshake_errors_total"
HANDSHAKES = "gatewayd_tls_handshakes_total"



def by_reason(samples: Samples) -> dict[str, float]:
    out: dict[str, float] = {}
    for (name, labels), sample_value in samples.items():
        if name == ERRORS:
            reason = dict(labels)["reason"]
            out[reason] = out.get(reason, 0.0) + sample_value
    return out


@dataclass
class Live:
    gw: Gateway
    pki: TestPKI
    port: int

    def ok(self) -> None:
        """A normal HTTPS request is served."""
        status, _, _ = https_get("127.0.0.1", self.port, "/ok", sni=None,
                                 cafile=self.pki.ca_pem_path, timeout=10)
        assert status == 200

    def pids(self) -> list[int]:
        return sorted(self.gw.worker_pids())

    def errors(self) -> dict[str, float]:
        return by_reason(scrape(self.gw))

    def wait_error(self, before: dict[str, float], reasons: set[str]) -> str:
        """Wait until one of `reasons` has grown since `before`; return it (printed)."""
        def grown() -> str | None:
            now = self.errors()
            for reason in sorted(set(now) | set(before)):
                if now.get(reason, 0) > before.get(reason, 0) and reason in reasons:
                    return reason
            return None

        try:
            reason = wait_for(grown, 10, f"{ERRORS} to grow for one of {sorted(reasons)}")
        except AssertionError:
            print("handshake errors now:", self.errors(), "before:", before)
            raise
        print(f"observed {ERRORS}{{reason={reason!r}}}")
        return reason


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("tls-abuse")
    pki = TestPKI(tmp / "pki")
    leaf = pki.issue(["localhost", "127.0.0.1", "app"], stem="backend-app")
    backend = Backend("app", workdir=tmp / "backends", cert=leaf.cert_path, key=leaf.key_path)
    backend.leaf = leaf
    backend.start()
    try:
        spec = simple_spec(tmp, cert=pki.issue(["127.0.0.1"]), backends={"app": backend},
                           workers=1, server={"tls_handshake_timeout": HANDSHAKE_TIMEOUT})
        spec.listeners[0]["ssl_policy"] = POLICY
        with Gateway(tmp, spec) as gw:
            yield Live(gw, pki, gw.port)
            assert gw.proc.alive, gw.proc.describe()
    finally:
        backend.stop()


@pytest.fixture
def guard(live: Live) -> Iterator[list[int]]:
    """Worker pids before the case; afterwards a normal request works and they are the
    same processes."""
    live.ok()
    pids = live.pids()
    assert len(pids) == 1
    yield pids
    live.ok()
    assert live.pids() == pids, "the worker was replaced"


# -- raw TLS bytes ------------------------------------------------------------------------


def client_hello() -> bytes:
    """A real TLS 1.3 ClientHello (Python's ssl through memory BIOs)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="abuse.example.test")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16" and len(hello) > 100
    return hello


def legacy_hello(version: int) -> bytes:
    """A ClientHello offering only `version` (0x0300 SSLv3, 0x0301 TLS 1.0, 0x0302 TLS
    1.1) with that era's suites, no supported_versions extension."""
    suites = [0xC014, 0xC013, 0x0035, 0x002F, 0x000A]
    extensions = b""
    if version > 0x0300:
        groups = struct.pack("!HH", 4, 0x0017) + struct.pack("!H", 0x0018)
        extensions += struct.pack("!HH", 0x000A, len(groups)) + groups  # supported_groups
        extensions += struct.pack("!HHBB", 0x000B, 2, 1, 0)  # ec_point_formats
        extensions += struct.pack("!HH", 0xFF01, 1) + b"\x00"  # renegotiation_info
    body = (struct.pack("!H", version) + os.urandom(32) + b"\x00"
            + struct.pack("!H", 2 * len(suites)) + b"".join(struct.pack("!H", s) for s in suites)
            + b"\x01\x00")
    if extensions:
        body += struct.pack("!H", len(extensions)) + extensions
    handshake = b"\x01" + struct.pack("!I", len(body))[1:] + body
    return b"\x16" + struct.pack("!HH", version, len(handshake)) + handshake


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, str]:
    """Everything the server sends until it closes; returns (bytes, how it ended)."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data, "reset"
        except TimeoutError:
            return data, "timeout"
        if not chunk:
            return data, "eof"
        data += chunk


def records(data: bytes) -> list[tuple[int, bytes]]:
    """(content type, fragment) of each complete TLS record in `data`."""
    out = []
    while len(data) >= 5:
        length = struct.unpack("!H", data[3:5])[0]
        out.append((data[0], data[5:5 + length]))
        data = data[5 + length:]
    return out


def assert_no_server_hello(data: bytes) -> None:
    for content_type, fragment in records(data):
        assert not (content_type == 22 and fragment[:1] == b"\x02"), \
            f"the server answered with a ServerHello: {data[:64].hex()}"


def abuse(live: Live, send: Callable[[socket.socket], None], *,
          timeout: float = 10) -> tuple[bytes, str, float]:
    """Connect, `send`, serve a normal request meanwhile, then read until the server
    closes; returns (bytes received, how it ended, seconds from send to close)."""
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
        send(sock)
        sent_at = time.monotonic()
        live.ok()  # the same (only) worker serves others meanwhile
        data, how = read_until_closed(sock, timeout)
        return data, how, time.monotonic() - sent_at


# -- the cases ----------------------------------------------------------------------------


def test_garbage_bytes_are_refused(live: Live, guard: list[int]) -> None:
    before = live.errors()
    data, how, _ = abuse(live, lambda s: s.sendall(b"\xde\xad\xbe\xef" * 256))
    print(f"garbage: {how}, {len(data)} bytes back")
    assert how in ("eof", "reset")
    assert_no_server_hello(data)
    live.wait_error(before, {"not_tls", "wrong_version_number", "bad_record"})


def test_truncated_client_hello_then_eof(live: Live, guard: list[int]) -> None:
    hello = client_hello()
    before = live.errors()

    def send(sock: socket.socket) -> None:
        sock.sendall(hello[: len(hello) // 2])
        sock.shutdown(socket.SHUT_WR)

    data, how, elapsed = abuse(live, send)
    print(f"truncated hello: {how} after {elapsed:.2f}s")
    assert how in ("eof", "reset") and elapsed < HANDSHAKE_TIMEOUT
    assert_no_server_hello(data)
    live.wait_error(before, {"unexpected_eof", "reset"})


def test_plain_http_on_https_port_is_refused(live: Live, guard: list[int]) -> None:
    """Either a clear-text 400 (as nginx does) then close, or a bare close: never a TLS
    handshake and never a proxied request."""
    before = live.errors()
    request = b"GET /ok HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    data, how, _ = abuse(live, lambda s: s.sendall(request))
    answer = "clear-text 400" if data else "closed without an answer"
    print(f"plain HTTP: {answer} ({how}): {data[:60]!r}")
    assert how in ("eof", "reset")
    if data:
        assert data.startswith(b"HTTP/1.1 400 "), data[:200]
        assert b"Connection: close" in data and b'"backend"' not in data, data
    assert_no_server_hello(data)
    live.wait_error(before, {"http_request"})


@pytest.mark.parametrize(("name", "version"),
                         [("SSLv3", 0x0300), ("TLSv1", 0x0301), ("TLSv1.1", 0x0302)])
def test_legacy_protocol_hello_is_refused(live: Live, guard: list[int], name: str,
                                          version: int) -> None:
    """A hand-made ClientHello for a legacy version: a protocol_version alert, never a
    ServerHello."""
    before = live.errors()
    data, how, _ = abuse(live, lambda s: s.sendall(legacy_hello(version)))
    recs = records(data)
    print(f"{name} hello: {how}, records {[(t, f.hex()) for t, f in recs]}")
    assert_no_server_hello(data)
    assert how in ("eof", "reset")
    if recs:
        assert recs[0][0] == 21 and recs[0][1][1:2] == bytes([70]), "not protocol_version"
    live.wait_error(before, {"unsupported_protocol", "wrong_version_number"})
    samples = scrape(live.gw)
    assert value(samples, HANDSHAKES, protocol=name) == 0


@pytest.mark.parametrize(("flag", "protocol"), [("-tls1", "TLSv1"), ("-tls1_1", "TLSv1.1")])
def test_openssl_s_client_legacy_protocol_never_completes(live: Live, guard: list[int],
                                                          flag: str, protocol: str) -> None:
    before = live.errors()
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{live.port}", flag,
         "-cipher", "DEFAULT:@SECLEVEL=0", "-noservername"],
        input=b"", capture_output=True, timeout=30)
    text = (out.stdout + out.stderr).decode(errors="replace")
    assert out.returncode != 0, text
    assert "Cipher is (NONE)" in text or "no protocols available" in text, text
    assert "BEGIN CERTIFICATE" not in text and "Server certificate" not in text, text
    client_side = "no protocols available" in text or "no ciphers available" in text
    if client_side:
        print(f"s_client {flag}: refused by the client's own OpenSSL")
    else:
        assert "alert protocol version" in text, text
        print(f"s_client {flag}: refused by gatewayd (protocol_version alert)")
        live.wait_error(before, {"unsupported_protocol", "wrong_version_number"})
    live.ok()
    assert value(scrape(live.gw), HANDSHAKES, protocol=protocol) == 0


def test_client_initiated_renegotiation_is_refused(live: Live, guard: list[int]) -> None:
    """s_client -tls1_2 then `R`: the server refuses (no_renegotiation) and the
    connection is not served afterwards; no second handshake happens."""
    samples = scrape(live.gw)
    tls12_before = value(samples, HANDSHAKES, protocol="TLSv1.2")
    errors_before = by_reason(samples)
    proc = subprocess.Popen(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{live.port}", "-tls1_2",
         "-noservername", "-CAfile", str(live.pki.ca_pem_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        wait_for(lambda: value(scrape(live.gw), HANDSHAKES, protocol="TLSv1.2")
                 > tls12_before, 10, "the TLS 1.2 handshake")
        proc.stdin.write(b"R\n")
        proc.stdin.flush()
        live.ok()  # meanwhile
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            # still connected: the connection must not serve a request any more
            try:
                proc.stdin.write(b"GET /ok HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                proc.stdin.close()
            except BrokenPipeError:
                pass
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = (out + err).decode(errors="replace")
    print("renegotiation:", [line for line in text.splitlines()
                             if "RENEGOTIATING" in line or "renegotiation" in line.lower()])
    assert "RENEGOTIATING" in text, text
    assert "Secure Renegotiation IS supported" in text, text
    assert "no renegotiation" in text, text
    assert "HTTP/1.1 200" not in text, text
    samples = scrape(live.gw)
    assert value(samples, HANDSHAKES, protocol="TLSv1.2") == tls12_before + 1
    # a refused renegotiation is not a handshake failure of the connection
    print(f"{ERRORS} after renegotiation: {by_reason(samples)} (before {errors_before})")


def test_handshake_that_never_finishes_is_cut_after_tls_handshake_timeout(
        live: Live, guard: list[int]) -> None:
    hello = client_hello()
    before = live.errors()
    data, how, elapsed = abuse(live, lambda s: s.sendall(hello[: len(hello) // 2]),
                               timeout=HANDSHAKE_TIMEOUT + 8)
    print(f"stalled handshake: closed ({how}) after {elapsed:.2f}s")
    assert how in ("eof", "reset"), "the stalled handshake was never closed"
    assert HANDSHAKE_TIMEOUT - 0.5 <= elapsed <= HANDSHAKE_TIMEOUT + 3
    assert_no_server_hello(data)
    live.wait_error(before, {"timeout"})


def test_many_abusive_connections_at_once(live: Live, guard: list[int]) -> None:
    """A burst of stalled and garbage connections: the worker keeps serving."""
    hello = client_hello()
    before = live.errors()
    socks = []
    try:
        for i in range(100):
            sock = socket.create_connection(("127.0.0.1", live.port), timeout=10)
            sock.sendall(hello[:40] if i % 2 else b"\x16\x03\x01\xff\xff" + b"A" * 100)
            socks.append(sock)
        live.ok()
    finally:
        for sock in socks:
            sock.close()
    wait_for(lambda: sum(live.errors().values()) >= sum(before.values()) + 100, 10,
             "100 handshake errors")
    print("burst:", {r: n - before.get(r, 0) for r, n in live.errors().items()
                     if n != before.get(r, 0)})


def test_reason_labels_are_bounded(live: Live) -> None:
    reasons = set(live.errors())
    print("all handshake error reasons seen:", sorted(reasons))
    assert reasons <= {"http_request", "not_tls", "unsupported_protocol", "wrong_version_number",
                       "no_shared_cipher", "sni_rejected", "unexpected_eof", "client_alert",
                       "bad_record", "timeout", "reset", "other"}

