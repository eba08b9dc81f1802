"""Limits and timeouts (CONTRACT section 3), live: request-line / header / body limits are
answered by the gateway without contacting the backend; slow, silent and idle clients are
cut off on time; a client that stops reading a huge response does not grow the worker.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.gateway import Gateway, simple_spec
from tests.support.pki import TestPKI
from tests.support.procs import Backend
from tests.support.rawclient import RawClient, Response, get

LIMITS = {"max_request_line": 1024, "max_header_bytes": 4096, "max_headers": 20,
          "max_body_bytes": 10_000, "client_header_timeout": 2, "keepalive_timeout": 2,
          "tls_handshake_timeout": 2}
RSS_BOUND = 32 * 1024 * 1024


class Env:
    def __init__(self, gw: Gateway, limits: Backend, ok: Backend, pki: TestPKI) -> None:
        self.gw, self.limits, self.ok, self.pki = gw, limits, ok, pki

    def client(self, timeout: float = 10.0) -> RawClient:
        return RawClient(self.gw.port, self.pki.ca_pem_path, sni="localhost", timeout=timeout)

    def refused(self, raw: bytes, status: int) -> Response:
        """Send ``raw``; the gateway answers ``status`` and closes; the backend behind the
        default rule never hears of it."""
        with self.client() as c:
            c.send(raw)
            resp = c.read_response()
            assert resp.status == status, (resp.status, resp.body)
            assert (resp.header("connection") or "").lower() == "close"
            assert c.read_until_eof(5) == b""
        self.served("after-refusal")
        assert self.proxied() == [], self.proxied()
        return resp

    def proxied(self) -> list[dict]:
        """What reached the default-rule backend, minus the prober's own requests."""
        return [r for r in self.limits.records()
                if dict((k.lower(), v) for k, v in r["headers"]).get("user-agent")
                != "gatewayd-probe"]

    def served(self, tag: str) -> None:
        target = f"/ok/{tag}/{time.monotonic_ns()}"
        with self.client() as c:
            resp = c.request(get(target))
        assert resp.status == 200 and resp.json()["target"] == target, resp


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("limits")
    pki = TestPKI(tmp / "pki")
    started = []
    try:
        backends = {}
        for name in ("limits", "ok"):
            leaf = pki.issue(["localhost", "127.0.0.1"], stem=f"backend-{name}")
            b = Backend(name, workdir=tmp / "backends", cert=leaf.cert_path, key=leaf.key_path)
            b.leaf = leaf
            started.append(b.start())
            backends[name] = b
        front = pki.issue(["localhost", "127.0.0.1"])
        spec = simple_spec(tmp, cert=front, backends=backends, workers=1, server=LIMITS)
        spec.rules[0]["path_rules"] = [{"name": "ok", "paths": ["/ok*", "/big*"],
                                        "backend_pool": "ok", "backend_settings": "ok-tls"}]
        with Gateway(tmp, spec) as gw:
            yield Env(gw, backends["limits"], backends["ok"], pki)
    finally:
        for b in started:
            b.stop()


def test_request_line_too_long_is_414(env: Env) -> None:
    env.refused(get("/x/" + "a" * 1100), 414)


def test_request_line_too_long_in_pieces_is_414(env: Env) -> None:
    """The limit fires while the target is still arriving (no endless buffering)."""
    with env.client() as c:
        c.send(b"GET /x/")
        for _ in range(10):
            try:
                c.send(b"a" * 300)
            except OSError:
                break
        resp = c.read_response()
        assert resp.status == 414
    assert env.proxied() == []


def test_header_bytes_over_limit_is_431(env: Env) -> None:
    env.refused(get("/x/h1", extra="X-Big: " + "b" * 5000 + "\r\n"), 431)
    many = "".join(f"X-H{i}: {'v' * 300}\r\n" for i in range(15))  # 15 lines, > 4096 bytes
    env.refused(get("/x/h2", extra=many), 431)


def test_unterminated_header_line_is_431(env: Env) -> None:
    """One endless field line, sent in pieces, without its CRLF."""
    with env.client() as c:
        c.send(b"GET /x/h3 HTTP/1.1\r\nHost: localhost\r\nX-Endless: ")
        try:
            for _ in range(20):
                c.send(b"e" * 1000)
        except OSError:
            pass
        assert c.read_response().status == 431
    assert env.proxied() == []


def test_too_many_headers_is_431(env: Env) -> None:
    env.refused(get("/x/h4", extra="".join(f"X-N{i}: 1\r\n" for i in range(25))), 431)


def test_body_over_limit_by_content_length_is_413(env: Env) -> None:
    """Answered from the head alone: the client does not have to send the body."""
    env.refused(b"POST /x/b1 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10001\r\n\r\n", 413)


def test_chunked_body_crossing_limit_is_413(env: Env) -> None:
    chunk = b"%x\r\n%s\r\n" % (6000, b"c" * 6000)
    env.refused(b"POST /x/b2 HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
                + chunk + chunk + b"0\r\n\r\n", 413)


def test_chunked_body_crossing_limit_later_is_413(env: Env) -> None:
    """The head and a first chunk within the limit, then the crossing chunk in a later
    write: 413 and close; the backend never receives a complete request."""
    chunk = b"%x\r\n%s\r\n" % (6000, b"c" * 6000)
    with env.client() as c:
        c.send(b"POST /x/b3 HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
               + chunk)
        with pytest.raises(AssertionError, match="timed out"):
            c.read_response(timeout=0.5)  # nothing to answer yet
        c.send(chunk)
        resp = c.read_response()
        assert resp.status == 413
        assert c.read_until_eof(5) == b""
    env.served("after-b3")
    assert env.proxied() == []


def test_body_within_limit_passes(env: Env) -> None:
    with env.client() as c:
        body = b"p" * 10_000
        resp = c.request(b"POST /ok/b4 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10000"
                         b"\r\n\r\n" + body)
        assert resp.status == 200 and resp.json()["body_len"] == 10_000


def test_slowloris_gets_408_and_close(env: Env) -> None:
    """Header bytes trickle in (one every 0.2 s, each well within any per-read timeout):
    client_header_timeout (2 s) bounds the whole head."""
    with env.client() as c:
        start = time.monotonic()
        c.send(b"GET /x/slow HTTP/1.1\r\n")
        trickle = b"Host: localhost\r\n" + b"X-Slow: " + b"s" * 200
        got = b""
        for byte in trickle:  # one byte, then up to 0.2 s for an answer
            try:
                c.send(bytes((byte,)))
                c.sock.settimeout(0.2)
                got = c.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                pass
            break  # an answer or EOF
        elapsed = time.monotonic() - start
        c.buf = got
        resp = c.read_response()
        assert resp.status == 408, resp
        assert c.read_until_eof(3) == b""
    print(f"slowloris answered 408 after {elapsed:.2f} s")
    assert 1.5 <= elapsed <= 4.0, elapsed
    assert env.proxied() == []


def test_silent_tls_client_closed_within_header_timeout(env: Env) -> None:
    with env.client() as c:
        start = time.monotonic()
        rest = c.read_until_eof(6)
        elapsed = time.monotonic() - start
    print(f"silent TLS client closed after {elapsed:.2f} s ({rest[:60]!r})")
    assert rest == b"" or rest.startswith(b"HTTP/1.1 408"), rest
    assert 1.5 <= elapsed <= 4.0, elapsed


def test_silent_tcp_client_closed_within_handshake_timeout(env: Env) -> None:
    with socket.create_connection(("127.0.0.1", env.gw.port), timeout=6) as s:
        start = time.monotonic()
        try:
            data = s.recv(100)
        except ConnectionResetError:
            data = b""
        elapsed = time.monotonic() - start
    assert data == b""
    print(f"silent TCP client closed after {elapsed:.2f} s")
    assert 1.5 <= elapsed <= 4.0, elapsed


def test_idle_keepalive_connection_closed_after_keepalive_timeout(env: Env) -> None:
    with env.client() as c:
        assert c.request(get("/ok/ka")).status == 200
        start = time.monotonic()
        rest = c.read_until_eof(6)
        elapsed = time.monotonic() - start
    print(f"idle keep-alive connection closed after {elapsed:.2f} s")
    assert rest == b"", rest
    assert 1.5 <= elapsed <= 4.0, elapsed


def test_keepalive_request_within_timeout_is_served(env: Env) -> None:
    """A request arriving before keepalive_timeout on the same connection is served, and
    the header timeout restarts per request."""
    with env.client() as c:
        for i in range(3):
            assert c.request(get(f"/ok/ka-{i}")).status == 200
            with pytest.raises(AssertionError, match="timed out"):
                c.read_response(timeout=1.0)  # nothing arrives, connection not closed


def _vmrss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_non_reading_client_does_not_grow_worker(env: Env) -> None:
    (worker,) = env.gw.worker_pids()
    for i in range(5):  # warm up: allocate what normal traffic allocates
        env.served(f"warm-{i}")
    baseline = _vmrss(worker)
    with env.client(timeout=30) as c:
        c.send(get("/big?bytes=500000000"))
        c.sock.settimeout(10)
        first = c.sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first[:100]
        assert b"Content-Length: 500000000" in first
        # stop reading; sample the worker while other clients are served
        samples = []
        served = 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            env.served(f"meanwhile-{served}")
            served += 1
            samples.append(_vmrss(worker))
            time.sleep(0.1)  # sampling period, not a synchronisation
        peak = max(samples)
        big_records = [r for r in env.ok.records() if r["target"].startswith("/big")]
        assert len(big_records) == 1
    growth = peak - baseline
    print(f"worker {worker} VmRSS baseline {baseline / 2**20:.1f} MiB, peak "
          f"{peak / 2**20:.1f} MiB, growth {growth / 2**20:.1f} MiB over "
          f"{len(samples)} samples; {served} other requests served meanwhile")
    assert served >= 5
    assert growth < RSS_BOUND, f"worker grew by {growth / 2**20:.1f} MiB"
    env.served("after-big")


def test_worker_still_serves_after_everything(env: Env) -> None:
    """Nothing above wedged the worker or leaked into the default backend."""
    env.served("final")
    env.refused(b"POST /x/final HTTP/1.1\r\nHost: localhost\r\nContent-Length: 99999\r\n\r\n",
                413)
