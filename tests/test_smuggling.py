"""Request smuggling, live: every case of the shared corpus (tests/support/corpus.py; plus our own)
goes on its own TLS connection through a real gatewayd to a recording backend.

Per the corpus `_meta`: a rejected case gets one of its `reject_statuses`, nothing of it
reaches a backend and the connection is closed; an accepted case reaches the backend
exactly once with unambiguous framing and its `check`s hold (`soft_check` → WARN).  For
every case: nothing under `/smuggled-` ever reaches a backend, the client never gets more
responses than intended, and a plain GET works afterwards.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.corpus import smuggling_cases
from tests.support.gateway import Gateway, simple_spec
from tests.support.pki import TestPKI
from tests.support.procs import Backend, wait_for
from tests.support.rawclient import Closed, RawClient, Response, get, parse_responses

CASES = {c["id"]: c for c in smuggling_cases()}
# Cases whose note allows a silent close instead of an error response.
SILENT_CLOSE_OK = {"reqline-http09"}


class Env:
    def __init__(self, gw: Gateway, backend: Backend, pki: TestPKI) -> None:
        self.gw = gw
        self.backend = backend
        self.pki = pki
        self.port = gw.port

    def client(self, timeout: float = 10.0) -> RawClient:
        return RawClient(self.port, self.pki.ca_pem_path, sni="localhost", timeout=timeout)

    def records(self, marker: str) -> list[dict[str, Any]]:
        return [r for r in self.backend.records() if marker in r["target"]]

    def plain_get_works(self, tag: str) -> None:
        """A fresh connection's GET is answered by the backend (no crash, no wedge);
        once its record exists, earlier requests have had every chance to arrive."""
        target = f"/plain/{tag}/{time.monotonic_ns()}"
        with self.client() as c:
            resp = c.request(get(target))
        assert resp.status == 200, resp
        assert resp.json()["target"] == target
        wait_for(lambda: self.records(target), 10, f"backend record of {target}")
        self.assert_universal()

    def assert_universal(self) -> None:
        for rec in self.backend.records():
            assert "/smuggled-" not in rec["target"], f"smuggled request reached backend: {rec}"
            assert_clean_framing(rec)


def headers_of(rec: dict[str, Any]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in rec["headers"]]


def header_values(rec: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in headers_of(rec) if k.lower() == name.lower()]


def assert_clean_framing(rec: dict[str, Any]) -> None:
    """Universal invariant 2: unambiguous framing, no CR/LF/NUL in values, no whitespace
    before a colon, no obs-fold (a fold shows up as a name starting with whitespace or a
    line break inside a value in the backend's parse)."""
    names = [k.lower() for k, _ in headers_of(rec)]
    assert not ("content-length" in names and "transfer-encoding" in names), rec
    assert names.count("content-length") <= 1 and names.count("transfer-encoding") <= 1, rec
    for k, v in headers_of(rec):
        assert k == k.strip() and " " not in k and "\t" not in k, f"bad field name {k!r}"
        assert not any(ch in v for ch in "\r\n\0"), f"control char in {k}: {v!r}"
    if "content-length" in names:
        assert header_values(rec, "content-length")[0].isdigit(), rec


def run_checks(case: dict[str, Any], rec: dict[str, Any], resp: Response,
               checks: dict[str, Any]) -> list[str]:
    """The corpus `check` keys; returns the failures."""
    fails = []
    for key, want in checks.items():
        if key == "backend_body_len":
            ok = rec["body_len"] == want
            got: Any = rec["body_len"]
        elif key == "backend_no_ctl_in_values":
            got = [v for _, v in headers_of(rec) if any(ch in v for ch in "\r\n\0")]
            ok = not got
        elif key == "backend_header_absent":
            got = [n for n in want if header_values(rec, n)]
            ok = not got
        elif key == "backend_no_folded_lines":
            got = [(k, v) for k, v in headers_of(rec)
                   if k[:1] in (" ", "\t") or "\n" in v or "\r" in v]
            ok = not got
        elif key == "backend_host_equals":
            got = header_values(rec, "host")
            ok = got == [want]
        elif key == "backend_path":
            got = rec["target"].split("?", 1)[0]
            ok = got == want
        elif key == "backend_xff_last":
            xff = header_values(rec, "x-forwarded-for")
            got = xff[-1].split(",")[-1].strip() if xff else None
            ok = got == want
        elif key == "backend_header_equals":
            got = {n: header_values(rec, n) for n in want}
            ok = all(got[n] == [v] for n, v in want.items())
        elif key == "no_101":
            got = resp.status
            ok = resp.status != 101
        else:
            raise AssertionError(f"{case['id']}: unknown check {key!r}")
        if not ok:
            fails.append(f"{key}: want {want!r}, got {got!r}")
    return fails


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("smuggling")
    pki = TestPKI(tmp / "pki")
    leaf = pki.issue(["localhost", "127.0.0.1"], stem="backend-sm")
    backend = Backend("sm", workdir=tmp / "backends", cert=leaf.cert_path, key=leaf.key_path)
    backend.leaf = leaf
    backend.start()
    try:
        front = pki.issue(["localhost", "127.0.0.1"])
        spec = simple_spec(tmp, cert=front, backends={"sm": backend}, workers=1)
        spec.listeners[0]["host_names"] = ["localhost"]
        with Gateway(tmp, spec) as gw:
            yield Env(gw, backend, pki)
    finally:
        backend.stop()


# -- the shared corpus ------------------------------------------------------------------


@pytest.mark.parametrize("case_id", list(CASES))
def test_corpus_case(env: Env, case_id: str) -> None:
    case = CASES[case_id]
    marker = f"/sm/{case_id}"
    raw = case["raw_request"].encode("latin-1")
    acceptable = set(case["acceptable"])
    with env.client() as c:
        c.send(raw)
        try:
            resp: Response | None = c.read_response()
        except Closed as exc:
            assert exc.partial == b"", f"garbage before close: {exc.partial!r}"
            resp = None
        if resp is None:
            # no response at all: only a silent close of a never-forwarded request
            assert case_id in SILENT_CLOSE_OK, f"{case_id}: connection closed, no response"
            env.plain_get_works(case_id)
            assert env.records(marker) == [], env.records(marker)
            return
        assert resp.status != 101, f"{case_id}: gateway switched protocols"
        if resp.status in case["reject_statuses"] and "400" in acceptable:
            # -- rejected: closed, nothing forwarded, nothing more answered
            rest = c.read_until_eof(timeout=5)
            assert rest == b"", f"{case_id}: more bytes after the rejection: {rest!r}"
            env.plain_get_works(case_id)
            assert env.records(marker) == [], f"{case_id}: rejected but forwarded"
            return
        # -- accepted: forwarded once, normalised
        assert acceptable & {"close", "forward-normalized"}, (
            f"{case_id}: expected one of {sorted(acceptable)} / {case['reject_statuses']}, "
            f"got {resp.status}: {resp.body[:200]!r}")
        assert resp.status == 200, f"{case_id}: {resp.status} {resp.body[:300]!r}"
        echo = resp.json()
        assert marker in echo["target"], echo
        if "forward-normalized" in acceptable:
            # keep-alive allowed: the next response on this connection must be ours
            try:
                nxt = c.request(get(f"/plain/same-conn/{case_id}"), timeout=5)
            except Closed as exc:
                assert exc.partial == b"", f"{case_id}: stray bytes {exc.partial!r}"
            else:
                assert nxt.status == 200 and nxt.json()["target"].endswith(case_id), nxt
        else:  # 'close': one response, then the gateway closes
            rest = c.read_until_eof(timeout=5)
            assert rest == b"", f"{case_id}: more bytes after the response: {rest!r}"
    env.plain_get_works(case_id)
    recs = env.records(marker)
    assert len(recs) == 1, f"{case_id}: forwarded {len(recs)} times: {recs}"
    rec = recs[0]
    assert_clean_framing(rec)
    fails = run_checks(case, rec, resp, case.get("check") or {})
    assert not fails, f"{case_id}: checks failed: {fails}; backend saw {rec}"
    soft = run_checks(case, rec, resp, case.get("soft_check") or {})
    for f in soft:
        msg = f"WARN {case_id}: soft_check {f}"
        print(msg)
        warnings.warn(msg, stacklevel=1)


# -- our own cases ----------------------------------------------------------------------


def _rejected(env: Env, raw: bytes, statuses: set[int], marker: str, *,
              must_close: bool = True) -> Response:
    """``must_close``: a framing error, the rest of the stream cannot be trusted.  Else
    (a well-framed request refused, e.g. by routing) the connection may stay open if the
    response says so and the next request on it gets its own answer."""
    with env.client() as c:
        c.send(raw)
        resp = c.read_response()
        assert resp.status in statuses, (resp.status, resp.body)
        if must_close or (resp.header("connection") or "").lower() == "close":
            assert c.read_until_eof(timeout=5) == b""
        else:
            nxt = c.request(get("/plain/after-refusal"), timeout=5)
            assert nxt.json()["target"] == "/plain/after-refusal"
    env.plain_get_works("after-rejection")
    assert env.records(marker) == []
    return resp


def test_absolute_form_target_is_forwarded_in_origin_form(env: Env) -> None:
    with env.client() as c:
        resp = c.request(b"GET https://localhost/sm/own-abs?q=1 HTTP/1.1\r\n"
                         b"Host: localhost\r\n\r\n")
        assert resp.status == 200, resp
    rec = env.records("/sm/own-abs")
    assert len(rec) == 1 and rec[0]["target"] == "/sm/own-abs?q=1", rec
    assert header_values(rec[0], "host") == ["localhost"]
    env.assert_universal()


@pytest.mark.parametrize("target", [
    b"https://evil.example/sm/own-abs-mismatch",
    b"http://evil.example:8443/sm/own-abs-mismatch2",
])
def test_absolute_form_disagreeing_with_host(env: Env, target: bytes) -> None:
    """Reject, or route and forward by the target's authority; never route on Host
    while forwarding the URI's authority (or vice versa)."""
    marker = target.split(b"/", 3)[3].decode()
    with env.client() as c:
        resp = c.request(b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
        if resp.status in (400, 421):
            assert c.read_until_eof(5) == b""
            env.plain_get_works("abs-mismatch")
            assert env.records(marker) == []
            return
    assert resp.status == 200, resp
    rec = env.records(marker)
    assert len(rec) == 1 and header_values(rec[0], "host")[0].startswith("evil.example"), rec


def test_absolute_form_with_dot_segments(env: Env) -> None:
    with env.client() as c:
        resp = c.request(b"GET https://localhost/public/../sm/own-absdot HTTP/1.1\r\n"
                         b"Host: localhost\r\n\r\n")
        if resp.status == 400:
            assert env.records("own-absdot") == []
        else:
            assert resp.status == 200
            rec = env.records("own-absdot")
            assert [r["target"] for r in rec] == ["/sm/own-absdot"], rec
    # climbing above the root is 400, in absolute form and in origin form
    for target in (b"https://localhost/../../smuggled-absdot", b"/sm/../../smuggled-dot"):
        resp = _rejected(env, b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",
                         {400}, "smuggled-", must_close=False)
        assert resp.status == 400


def test_expect_100_continue(env: Env) -> None:
    with env.client() as c:
        c.send(b"POST /sm/own-expect HTTP/1.1\r\nHost: localhost\r\n"
               b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        interim = c.read_response(final=False)
        assert interim.status == 100, interim
        c.send(b"hello")
        resp = c.read_response()
        assert resp.status == 200 and resp.interims == [], resp
        # the connection stays usable
        assert c.request(get("/sm/own-expect-after")).status == 200
    rec = env.records("/sm/own-expect")
    assert len(rec) == 2, rec
    first = next(r for r in rec if r["target"] == "/sm/own-expect")
    assert first["body_len"] == 5
    assert header_values(first, "expect") == [], first["headers"]


def test_pipelined_requests_answered_in_order(env: Env) -> None:
    raw = b"".join(get(f"/sm/own-pipe-{i}") for i in range(1, 4))
    with env.client() as c:
        c.send(raw)
        got = [c.read_response().json()["target"] for _ in range(3)]
        assert got == [f"/sm/own-pipe-{i}" for i in range(1, 4)]
        assert c.request(get("/sm/own-pipe-4")).json()["target"] == "/sm/own-pipe-4"
    assert len(env.records("/sm/own-pipe-")) == 4


def test_pipelined_post_bodies_stay_bodies(env: Env) -> None:
    """A body that looks like a request is a body, the request after it is a request."""
    body = b"GET /smuggled-pipe-body HTTP/1.1\r\nHost: localhost\r\n\r\n"
    raw = (b"POST /sm/own-pipe-post HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n"
           % len(body)) + body + get("/sm/own-pipe-post-next")
    with env.client() as c:
        c.send(raw)
        first, second = c.read_response(), c.read_response()
    assert first.json()["body_len"] == len(body)
    assert second.json()["target"] == "/sm/own-pipe-post-next"
    env.plain_get_works("pipe-post")


def test_http10_keep_alive(env: Env) -> None:
    with env.client() as c:
        req = (b"GET /sm/own-http10-ka HTTP/1.0\r\nHost: localhost\r\n"
               b"Connection: keep-alive\r\n\r\n")
        resp = c.request(req)
        assert resp.status == 200
        assert resp.header("transfer-encoding") is None  # never chunked to a 1.0 client
        resp2 = c.request(req.replace(b"ka ", b"ka2 "))
        assert resp2.json()["target"] == "/sm/own-http10-ka2"
        # RFC 9112 section 9.3 / 1.0 persistence: a 1.0 client only keeps the connection
        # if the response says "Connection: keep-alive"
        assert (resp.header("connection") or "").lower() == "keep-alive", (
            f"kept alive but not announced to the HTTP/1.0 client: {resp.headers}")
    with env.client() as c:  # without keep-alive: one response, then close
        resp = c.request(b"GET /sm/own-http10-close HTTP/1.0\r\nHost: localhost\r\n\r\n"
                         + get("/smuggled-http10"))
        assert resp.status == 200
        assert c.read_until_eof(5) == b""
    env.plain_get_works("http10")


def test_chunked_with_trailers(env: Env) -> None:
    raw = (b"POST /sm/own-trailers HTTP/1.1\r\nHost: localhost\r\n"
           b"Transfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
           b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Checksum: abc\r\n"
           b"X-Other: 1\r\n\r\n")
    with env.client() as c:
        resp = c.request(raw + get("/sm/own-trailers-next"))
        assert resp.status == 200, resp
        assert resp.json()["body_len"] == 11
        assert c.read_response().json()["target"] == "/sm/own-trailers-next"
    rec = env.records("/sm/own-trailers")[0]
    assert rec["body_chunked"] is True
    assert header_values(rec, "x-checksum") == [] and header_values(rec, "x-other") == []
    env.assert_universal()


def test_framing_field_in_trailers_never_used(env: Env) -> None:
    """Content-Length / Transfer-Encoding in a trailer section: rejected (llhttp) or
    ignored; never turned into framing or a header upstream."""
    raw = (b"POST /sm/own-trailer-cl HTTP/1.1\r\nHost: localhost\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
           b"Content-Length: 58\r\n\r\n" + get("/smuggled-trailer-cl"))
    with env.client() as c:
        resp = c.request(raw)
        assert resp.status in (200, 400), resp
        if resp.status == 400:
            assert c.read_until_eof(5) == b""
    for rec in env.records("/sm/own-trailer-cl"):
        assert rec["body_len"] == 5 and header_values(rec, "content-length") == []
    env.plain_get_works("trailer-cl")


def test_ten_thousand_tiny_chunks(env: Env) -> None:
    body = b"1\r\na\r\n" * 10_000 + b"0\r\n\r\n"
    started = time.monotonic()
    with env.client(timeout=30) as c:
        resp = c.request(b"POST /sm/own-tiny-chunks HTTP/1.1\r\nHost: localhost\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n" + body)
        assert resp.status == 200
        assert resp.json()["body_len"] == 10_000
    assert time.monotonic() - started < 20
    env.plain_get_works("tiny-chunks")


@pytest.mark.parametrize("kind", ["websocket", "h2c"])
def test_upgrade_not_passed_on_and_trailing_bytes_never_forwarded(env: Env, kind: str) -> None:
    """h2c is never passed on; a websocket upgrade is, but the backend here answers without
    switching, so no tunnel opens and the bytes behind the head are never forwarded."""
    if kind == "websocket":
        head = (b"GET /sm/own-upgrade-ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n")
        marker = "/sm/own-upgrade-ws"
    else:
        head = (b"GET /sm/own-upgrade-h2c HTTP/1.1\r\nHost: localhost\r\nUpgrade: h2c\r\n"
                b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
                b"Connection: Upgrade, HTTP2-Settings\r\n\r\n")
        marker = "/sm/own-upgrade-h2c"
    trailing = get(f"/smuggled-upgrade-{kind}")
    with env.client() as c:
        c.send(head + trailing)
        try:
            resp = c.read_response()
        except Closed:
            resp = None
        if resp is not None:
            assert resp.status != 101, resp
            assert resp.header("upgrade") is None
            tail = c.read_until_eof(5)
            # the pipelined request after an upgrade request is never answered/forwarded
            assert parse_responses(tail) == [] if tail else True, tail
    env.plain_get_works(f"upgrade-{kind}")
    for rec in env.records(marker):
        if kind == "websocket":  # passed on (the backend did not switch: no tunnel)
            assert header_values(rec, "upgrade") == ["websocket"], rec["headers"]
            continue
        assert header_values(rec, "upgrade") == [], rec["headers"]
        assert all("upgrade" not in v.lower() for v in header_values(rec, "connection"))
        if kind == "h2c":
            assert header_values(rec, "http2-settings") == [], rec["headers"]


def test_transfer_encoding_on_http10_rejected(env: Env) -> None:
    raw = (b"POST /sm/own-te10 HTTP/1.0\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
           b"Connection: keep-alive\r\n\r\n5\r\nhello\r\n0\r\n\r\n" + get("/smuggled-te10"))
    _rejected(env, raw, {400}, "/sm/own-te10")


def test_connect_is_405(env: Env) -> None:
    resp = _rejected(env, b"CONNECT localhost:443 HTTP/1.1\r\nHost: localhost:443\r\n\r\n"
                     + get("/smuggled-connect"), {405}, "localhost:443")
    assert resp.status == 405


def test_te_cl_after_valid_request_on_same_connection(env: Env) -> None:
    """A good request, then a CL+TE one in the same write: the first is answered, the
    second rejected with a 400, nothing smuggled, then close (as nginx does)."""
    bad = (b"POST /sm/own-second-clte HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + get("/smuggled-second"))
    with env.client() as c:
        c.send(get("/sm/own-first-ok") + bad)
        first = c.read_response()
        assert first.status == 200, first
        assert first.json()["target"] == "/sm/own-first-ok"
        second = c.read_response()
        assert second.status == 400, second
        assert c.read_until_eof(5) == b""
    env.plain_get_works("second-clte")
    assert env.records("/sm/own-second-clte") == []


def test_te_cl_after_valid_request_in_a_later_write(env: Env) -> None:
    bad = (b"POST /sm/own-later-clte HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + get("/smuggled-later"))
    with env.client() as c:
        assert c.request(get("/sm/own-later-ok")).status == 200
        resp = c.request(bad)
        assert resp.status == 400, resp
        assert c.read_until_eof(5) == b""
    env.plain_get_works("later-clte")
    assert env.records("/sm/own-later-clte") == []
