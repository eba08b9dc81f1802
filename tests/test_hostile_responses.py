"""Hostile backend responses, live: a raw TLS backend (pinned in the config) answers with
crafted bytes (tests/support/rawbackend.py).

For each case: the client gets 502, or the correct relayed response for the valid ones;
never two responses for one request; the client connection is not desynchronised (the
next request on it gets its own answer, or the connection is closed); and a backend
connection that carried anything unframeable or leftover bytes is closed by the gateway
and never reused (the follow-up request is served on a different backend connection).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.gateway import Gateway, simple_spec
from tests.support.pki import TestPKI
from tests.support.procs import wait_for
from tests.support.rawbackend import RawBackend
from tests.support.rawclient import Closed, RawClient, Response

OK = "HTTP/1.1 200 OK\r\n"
SMUGGLED = "HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Smuggled: 1\r\n\r\nsmuggled"


def send(text: str) -> dict[str, Any]:
    return {"send": text}


CLOSE = {"close": True}


@dataclass
class Case:
    steps: list[dict[str, Any]]
    expect: str  # "502" | "relay" | "relay-or-502" | "truncated"
    status: int = 200
    body: bytes = b""
    reuse: bool = False  # the backend connection may (and should) be reused
    method: str = "GET"
    wait_step: int | None = None  # wait for this scripted send before the follow-up


CASES: dict[str, Case] = {
    "cl-invalid": Case([send(OK + "Content-Length: abc\r\n\r\nabc")], "502"),
    "cl-negative": Case([send(OK + "Content-Length: -1\r\n\r\nabc")], "502"),
    "cl-plus": Case([send(OK + "Content-Length: +3\r\n\r\nabc")], "502"),
    "cl-duplicate-differing": Case(
        [send(OK + "Content-Length: 2\r\nContent-Length: 3\r\n\r\nabc")], "502"),
    "cl-duplicate-same": Case(
        [send(OK + "Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc")], "relay-or-502",
        body=b"abc"),
    "cl-list": Case([send(OK + "Content-Length: 3, 3\r\n\r\nabc")], "relay-or-502", body=b"abc"),
    "cl-and-te": Case(
        [send(OK + "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
              "3\r\nabc\r\n0\r\n\r\n")], "502"),
    "te-and-cl": Case(
        [send(OK + "Transfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n"
              "3\r\nabc\r\n0\r\n\r\n" + SMUGGLED)], "502"),
    "te-gzip": Case([send(OK + "Transfer-Encoding: gzip\r\n\r\nabc")], "502"),
    "te-on-http10": Case(
        [send("HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")],
        "502"),
    "hdr-bare-cr": Case(
        [send(OK + "X-A: a\rSet-Cookie: injected=1\r\nContent-Length: 2\r\n\r\nok")], "502"),
    "hdr-bare-lf": Case(
        [send(OK + "X-A: a\nSet-Cookie: injected=1\r\nContent-Length: 2\r\n\r\nok")], "502"),
    "hdr-crlf-split": Case(  # a header value that "contains" CRLF is just a new header;
        [send(OK + "X-A: a\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), CLOSE],
        "relay", body=b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),  # a body
    "hdr-obs-fold": Case(
        [send(OK + "X-A: a\r\n Set-Cookie: injected=1\r\nContent-Length: 2\r\n\r\nok")], "502"),
    "hdr-nul": Case([send(OK + "X-A: a\x00b\r\nContent-Length: 2\r\n\r\nok")], "502"),
    "hdr-space-before-colon": Case(
        [send(OK + "Content-Length : 2\r\n\r\nok")], "502"),
    "status-garbage": Case([send("HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok")], "502"),
    "not-http": Case([send("SSH-2.0-OpenSSH_9.0\r\n\r\n")], "502"),
    "http2-version": Case([send("HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok")], "502"),
    "interim-100": Case(
        [send("HTTP/1.1 100 Continue\r\n\r\n" + OK + "Content-Length: 2\r\n\r\nok")],
        "relay", body=b"ok", reuse=True),
    "interim-103": Case(
        [send("HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
              "HTTP/1.1 100 Continue\r\n\r\n" + OK + "Content-Length: 2\r\n\r\nok")],
        "relay", body=b"ok", reuse=True),
    "head-with-cl": Case([send(OK + "Content-Length: 1000\r\n\r\n")], "relay", method="HEAD",
                         reuse=True),
    "head-with-chunked": Case([send(OK + "Transfer-Encoding: chunked\r\n\r\n")], "relay",
                              method="HEAD", reuse=True),
    "no-content-204": Case([send("HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")], "relay",
                           status=204, reuse=True),
    "not-modified-304": Case(
        [send('HTTP/1.1 304 Not Modified\r\nETag: "x"\r\nContent-Length: 50\r\n\r\n')],
        "relay", status=304, reuse=True),
    "204-then-bytes": Case([send("HTTP/1.1 204 No Content\r\n\r\n" + SMUGGLED)], "relay",
                           status=204),
    "304-then-bytes": Case([send("HTTP/1.1 304 Not Modified\r\n\r\n" + SMUGGLED)], "relay",
                           status=304),
    "head-then-bytes": Case([send(OK + "Content-Length: 8\r\n\r\nsmuggled")], "relay",
                            method="HEAD"),
    "early-eof-empty": Case([CLOSE], "502"),
    "early-eof-head": Case([send("HTTP/1.1 200 OK\r\nContent-Le"), CLOSE], "502"),
    "early-eof-body": Case([send(OK + "Content-Length: 100\r\n\r\nshort"), CLOSE],
                           "truncated"),
    "early-eof-chunked": Case(
        [send(OK + "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"), CLOSE], "truncated"),
    "close-delimited": Case([send(OK + "Content-Type: text/plain\r\n\r\nuntil-close"), CLOSE],
                            "relay", body=b"until-close"),
    "extra-same-write": Case([send(OK + "Content-Length: 2\r\n\r\nok" + SMUGGLED)], "relay",
                             body=b"ok"),
    "extra-later-write": Case(
        [send(OK + "Content-Length: 2\r\n\r\nok"), {"sleep": 0.3}, send(SMUGGLED)], "relay",
        body=b"ok", wait_step=2),
    "chunked-then-bytes": Case(
        [send(OK + "Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n" + SMUGGLED)],
        "relay", body=b"ok"),
    "switching-101": Case(
        [send("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
              "Connection: Upgrade\r\n\r\n" + SMUGGLED)], "502"),
    "switching-101-bare": Case([send("HTTP/1.1 101 Switching Protocols\r\n\r\n")], "502"),
}


class Env:
    def __init__(self, gw: Gateway, raw: RawBackend, pki: TestPKI) -> None:
        self.gw = gw
        self.raw = raw
        self.pki = pki

    def client(self) -> RawClient:
        return RawClient(self.gw.port, self.pki.ca_pem_path, sni="localhost", timeout=10)

    def conns_of(self, target: str) -> list[int]:
        """Backend connections that received ``target``: one, or two when the gateway
        retried an idempotent request after a pooled connection turned out dead."""
        reqs = wait_for(lambda: [e for e in self.raw.requests() if e["target"] == target], 10,
                        f"raw backend request {target}")
        assert len(reqs) <= 2, f"{target} reached the backend {len(reqs)} times: {reqs}"
        return [int(r["conn"]) for r in reqs]

    def conn_of(self, target: str) -> int:
        return self.conns_of(target)[-1]

    def closed(self, conn: int) -> dict[str, Any]:
        return wait_for(lambda: next((e for e in self.raw.events("closed")
                                      if e["conn"] == conn), None), 10,
                        f"backend connection {conn} to be closed")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("hostile")
    pki = TestPKI(tmp / "pki")
    leaf = pki.self_signed(["raw.internal"])
    script = {f"/h/{name}": case.steps for name, case in CASES.items()}
    with RawBackend(tmp / "raw", leaf.cert_path, leaf.key_path, script) as raw:
        raw.leaf = leaf  # type: ignore[attr-defined]
        front = pki.issue(["localhost", "127.0.0.1"])
        spec = simple_spec(tmp, cert=front, backends={"raw": raw}, workers=1,
                           settings={"request_timeout": 5})
        with Gateway(tmp, spec) as gw:
            yield Env(gw, raw, pki)


def _req(method: str, target: str) -> bytes:
    return f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()


def _check_followup(env: Env, c: RawClient, tag: str) -> tuple[Response | None, int | None]:
    """Send a plain GET on the same client connection: it must get its own answer (or
    the connection is closed with nothing more on it)."""
    target = f"/follow/{tag}"
    try:
        c.send(_req("GET", target))
        resp = c.read_response(timeout=10)
    except Closed as exc:
        assert exc.partial == b"", f"stray bytes on the client connection: {exc.partial!r}"
        return None, None
    except OSError:
        return None, None
    assert resp.status == 200, f"follow-up got {resp.status}: {resp.body[:200]!r}"
    assert resp.header("x-smuggled") is None, "a smuggled response reached the client"
    assert resp.body.endswith(target.encode()), f"desync: follow-up got {resp.body!r}"
    return resp, env.conn_of(target)


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_response(env: Env, name: str) -> None:
    case = CASES[name]
    target = f"/h/{name}"
    accepts_before = env.raw.accepts()
    head = case.method == "HEAD"
    with env.client() as c:
        c.send(_req(case.method, target))
        if case.expect == "truncated":
            # the head was relayed before the backend died: the client must see the
            # connection close with an incomplete message, never a complete one
            with pytest.raises(Closed) as info:
                c.read_response(head=head)
            assert info.value.partial.startswith(b"HTTP/1.1 200"), info.value.partial
            for conn in env.conns_of(target):
                env.closed(conn)
            return
        resp = c.read_response(head=head)
        assert resp.header("x-smuggled") is None
        assert len(resp.header_all("content-length")) <= 1, resp.headers
        assert not (resp.header("content-length") and resp.header("transfer-encoding"))
        for k, v in resp.headers:
            assert k.lower() != "set-cookie" or "injected" not in v, resp.headers
        expect = case.expect
        if expect == "relay-or-502":
            expect = "502" if resp.status == 502 else "relay"
        if expect == "502":
            assert resp.status == 502, f"{name}: {resp.status} {resp.body[:200]!r}"
        else:
            assert resp.status == case.status, f"{name}: {resp.status} {resp.body[:200]!r}"
            assert resp.body == case.body, resp.body
            assert resp.interims == [] or all(i.status in (100, 103) for i in resp.interims)
        hostile_conn = env.conn_of(target)
        if case.wait_step is not None:
            wait_for(lambda: any(e["conn"] == hostile_conn and e["step"] == case.wait_step
                                 for e in env.raw.events("sent")), 10, "the late bytes")
        follow, follow_conn = _check_followup(env, c, name)
    if case.reuse:
        assert follow is not None, "a clean exchange must keep the client connection"
        assert follow_conn == hostile_conn, (
            f"{name}: clean backend connection {hostile_conn} not reused ({follow_conn})")
    else:
        # the tainted backend connection is closed by the gateway and never reused
        for conn in env.conns_of(target):
            env.closed(conn)
        if follow_conn is not None:
            assert follow_conn != hostile_conn, f"{name}: tainted connection reused"
        else:  # client connection closed: prove it on a fresh one
            with env.client() as c2:
                follow, follow_conn = _check_followup(env, c2, name + "-fresh")
            assert follow_conn is not None and follow_conn != hostile_conn
        assert env.raw.accepts() > accepts_before or follow_conn != hostile_conn
    # nothing the backend smuggled ever reached anyone as a response: checked above via
    # X-Smuggled; and the gateway is still healthy
    with env.client() as c3:
        assert c3.request(_req("GET", f"/health/{name}")).status == 200


@pytest.mark.parametrize("name", ["cl-invalid", "switching-101", "early-eof-head"])
def test_gateway_502_to_head_request_has_no_body(env: Env, name: str) -> None:
    """A gateway-made error answering HEAD must not carry a body (RFC 9110 section 9.3.2):
    on a kept-alive connection the body bytes would be read as the next response."""
    with env.client() as c:
        c.send(_req("HEAD", f"/h/{name}?head"))
        resp = c.read_response(head=True)
        assert resp.status == 502
        keep = (resp.header("connection") or "").lower() != "close"
        if keep:
            _check_followup(env, c, f"head-{name}")
        else:
            rest = c.read_until_eof(5)
            assert rest == b"", f"bytes after a HEAD response head: {rest!r}"


def _pool_one_connection(env: Env, c: RawClient, tag: str) -> int:
    """A clean exchange, so that the worker has an idle pooled backend connection."""
    target = f"/warm/{tag}"
    resp = c.request(_req("GET", target))
    assert resp.status == 200
    return env.conn_of(target)


def test_retry_after_stale_pooled_connection_does_not_hang(env: Env) -> None:
    """The backend closes a pooled connection when the next request arrives on it
    (what a backend's keep-alive timeout racing a request looks like).  The gateway may
    retry the idempotent GET once on a fresh connection; either way the client must get
    an answer promptly (the backend also closes the fresh one: 502), not a hang."""
    with env.client() as c:
        warm = _pool_one_connection(env, c, "retry")
        c.send(_req("GET", "/h/early-eof-empty?retry"))
        resp = c.read_response(timeout=8)
        assert resp.status == 502
        assert warm in env.conns_of("/h/early-eof-empty?retry")
        _check_followup(env, c, "retry")


def test_retry_after_stale_pooled_connection_keeps_pipelined_request(env: Env) -> None:
    """Same, with the next request already pipelined behind: it must be answered, not
    swallowed by the retry."""
    with env.client() as c:
        _pool_one_connection(env, c, "retry-pipe")
        c.send(_req("GET", "/h/early-eof-empty?retry-pipe") + _req("GET", "/follow/retry-pipe"))
        first = c.read_response(timeout=8)
        assert first.status == 502, first
        second = c.read_response(timeout=8)
        assert second.status == 200 and second.body.endswith(b"/follow/retry-pipe"), second


def test_many_hostile_responses_do_not_leak_backend_connections(env: Env) -> None:
    """Every backend connection that carried leftover bytes is closed by the gateway."""
    conns = set()
    for i in range(10):
        with env.client() as c:
            target = f"/h/extra-same-write?n={i}"
            resp = c.request(_req("GET", target))
            assert resp.body == b"ok"
        conns.add(env.conn_of(target))
    assert len(conns) == 10, f"a tainted connection was reused: {sorted(conns)}"
    for conn in conns:
        env.closed(conn)


def test_slow_backend_gets_504_and_client_stays_in_sync(env: Env) -> None:
    env.raw.set_script({**{f"/h/{n}": c.steps for n, c in CASES.items()},
                        "/h/slow": [{"sleep": 7}, send(OK + "Content-Length: 2\r\n\r\nok")]})
    with env.client() as c:
        resp = c.request(_req("GET", "/h/slow"), timeout=15)
        assert resp.status == 504
        _check_followup(env, c, "after-504")
