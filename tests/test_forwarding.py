"""Forwarded heads, byte for byte (CONTRACT §6, §7)."""

from __future__ import annotations

import os
import re
from dataclasses import replace

import pytest
from gatewayd.workers.http1 import ResponseHead, ResponseParser

from gatewayd.forwarding import (
    HOP_BY_HOP,
    STATUS_REASONS,
    ForwardContext,
    client_response_head,
    gateway_response,
    new_request_id,
    passed_response_head,
    upstream_request_head,
)

RID = "0123456789abcdef0123456789abcdef"
CTX = ForwardContext(
    client_ip="203.0.113.7",
    client_port=51234,
    scheme=b"https",
    listener_port=443,
    xff_with_port=False,
    request_id=RID,
    client_host=b"shop.example.test",
    upstream_host=b"backend.internal",
)

TAIL = (
    b"Host: backend.internal\r\n"
    b"X-Forwarded-For: 203.0.113.7\r\n"
    b"X-Forwarded-Proto: https\r\n"
    b"X-Forwarded-Port: 443\r\n"
    b"X-Forwarded-Host: shop.example.test\r\n"
    b"X-Original-Host: shop.example.test\r\n"
    b"X-Request-Id: " + RID.encode() + b"\r\n"
)


def head(
    headers: list[tuple[bytes, bytes]],
    ctx: ForwardContext = CTX,
    *,
    framing: bytes | None = None,
    upgrade: bytes | None = None,
) -> bytes:
    return upstream_request_head(b"GET", b"/a?b", headers, ctx, framing, upgrade=upgrade)


def header_lines(data: bytes) -> list[bytes]:
    assert data.endswith(b"\r\n\r\n")
    return data[:-4].split(b"\r\n")[1:]


def test_hop_by_hop_set() -> None:
    expected = {
        b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
        b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
    }  # fmt: skip
    assert expected == HOP_BY_HOP


def test_minimal_request_head_exact() -> None:
    assert head([]) == b"GET /a?b HTTP/1.1\r\n" + TAIL + b"\r\n"


def test_request_head_with_framing() -> None:
    data = upstream_request_head(
        b"POST", b"/upload", [(b"Content-Type", b"text/plain")], CTX, b"Content-Length: 12"
    )
    assert data == (
        b"POST /upload HTTP/1.1\r\nContent-Type: text/plain\r\n"
        + TAIL
        + b"Content-Length: 12\r\n\r\n"
    )
    chunked = upstream_request_head(b"POST", b"/", [], CTX, b"Transfer-Encoding: chunked")
    assert chunked.endswith(
        b"X-Request-Id: " + RID.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
    )


def test_order_and_name_case_kept() -> None:
    data = head([
        (b"accept", b"*/*"),
        (b"X-Custom", b"1"),
        (b"USER-AGENT", b"curl/8"),
        (b"x-custom", b"2"),
    ])  # fmt: skip
    assert header_lines(data)[:4] == [
        b"accept: */*", b"X-Custom: 1", b"USER-AGENT: curl/8", b"x-custom: 2",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "name",
    [
        b"Connection", b"Keep-Alive", b"Proxy-Connection", b"TE", b"Trailer",
        b"Transfer-Encoding", b"Upgrade", b"Proxy-Authenticate", b"Proxy-Authorization",
        b"Host", b"HOST", b"Content-Length", b"content-length", b"Expect",
        b"X-Forwarded-Proto", b"x-forwarded-port", b"X-FORWARDED-HOST", b"X-Original-Host",
        b"X-Request-Id", b"x-request-id", b"X-Client-Cert-Verify", b"x-client-cert-subject",
        b"X-Client-Cert-Fingerprint", b"X-Client-Cert-Anything",
    ],
)  # fmt: skip
def test_request_fields_removed(name: bytes) -> None:
    data = head([(b"Accept", b"*/*"), (name, b"spoofed"), (b"Via", b"1.1 x")])
    assert b"spoofed" not in data
    assert data == b"GET /a?b HTTP/1.1\r\nAccept: */*\r\nVia: 1.1 x\r\n" + TAIL + b"\r\n"


def test_spoofed_forwarding_headers_replaced() -> None:
    data = head([
        (b"X-Forwarded-Proto", b"http"),
        (b"X-Forwarded-Port", b"80"),
        (b"X-Forwarded-Host", b"evil.test"),
        (b"X-Original-Host", b"evil.test"),
        (b"X-Request-Id", b"deadbeef"),
        (b"X-Client-Cert-Verify", b"SUCCESS"),
        (b"Host", b"evil.test"),
    ])  # fmt: skip
    assert data == b"GET /a?b HTTP/1.1\r\n" + TAIL + b"\r\n"


def test_connection_listed_names_removed_wherever_they_are() -> None:
    data = head([
        (b"X-Before", b"gone"),
        (b"Keep", b"me"),
        (b"Connection", b"keep-alive, X-Before"),
        (b"x-after", b"gone"),
        (b"Connection", b" X-AFTER ,,"),
        (b"X-Other", b"kept"),
    ])  # fmt: skip
    assert header_lines(data)[:2] == [b"Keep: me", b"X-Other: kept"]
    assert b"gone" not in data


def test_connection_listing_xff_drops_incoming_chain_only() -> None:
    data = head([(b"X-Forwarded-For", b"10.0.0.1"), (b"Connection", b"X-Forwarded-For")])
    assert b"X-Forwarded-For: 203.0.113.7\r\n" in data
    assert b"10.0.0.1" not in data


def test_connection_cannot_remove_gateway_headers() -> None:
    data = head([(b"Connection", b"X-Request-Id, Host, X-Forwarded-Proto")])
    assert data == b"GET /a?b HTTP/1.1\r\n" + TAIL + b"\r\n"


@pytest.mark.parametrize(
    ("incoming", "xff"),
    [
        ([], b"203.0.113.7"),
        ([b"10.0.0.1"], b"10.0.0.1, 203.0.113.7"),
        ([b"10.0.0.1, 10.0.0.2"], b"10.0.0.1, 10.0.0.2, 203.0.113.7"),
        ([b"10.0.0.1", b"10.0.0.2"], b"10.0.0.1, 10.0.0.2, 203.0.113.7"),
        ([b" 10.0.0.1 ", b"", b"10.0.0.2"], b"10.0.0.1, 10.0.0.2, 203.0.113.7"),
    ],
)
def test_x_forwarded_for_append_and_join(incoming: list[bytes], xff: bytes) -> None:
    headers = [(b"X-Forwarded-For" if i % 2 else b"x-forwarded-for", v)
               for i, v in enumerate(incoming)]  # fmt: skip
    lines = header_lines(head([(b"A", b"1"), *headers, (b"B", b"2")]))
    assert lines[:2] == [b"A: 1", b"B: 2"]
    assert [line for line in lines if line.lower().startswith(b"x-forwarded-for")] == [
        b"X-Forwarded-For: " + xff
    ]


@pytest.mark.parametrize(
    ("ip", "with_port", "xff"),
    [
        ("203.0.113.7", True, b"203.0.113.7:51234"),
        ("2001:db8::7", False, b"2001:db8::7"),
        ("2001:db8::7", True, b"[2001:db8::7]:51234"),
    ],
)
def test_x_forwarded_for_port_format(ip: str, with_port: bool, xff: bytes) -> None:
    ctx = replace(CTX, client_ip=ip, xff_with_port=with_port)
    data = head([(b"X-Forwarded-For", b"10.0.0.1")], ctx)
    assert b"\r\nX-Forwarded-For: 10.0.0.1, " + xff + b"\r\n" in data


def test_context_values() -> None:
    ctx = replace(
        CTX, scheme=b"http", listener_port=8080, client_host=b"Shop.Example.Test:8080",
        upstream_host=b"shop.example.test:8080",
    )  # fmt: skip
    lines = header_lines(head([], ctx))
    assert lines == [
        b"Host: shop.example.test:8080",
        b"X-Forwarded-For: 203.0.113.7",
        b"X-Forwarded-Proto: http",
        b"X-Forwarded-Port: 8080",
        b"X-Forwarded-Host: Shop.Example.Test:8080",
        b"X-Original-Host: Shop.Example.Test:8080",
        b"X-Request-Id: " + RID.encode(),
    ]


def test_client_cert_headers_from_context() -> None:
    ctx = replace(
        CTX, client_cert_headers=((b"X-Client-Cert-Verify", b"SUCCESS"),
                                  (b"X-Client-Cert-Subject", b"CN=alice")),
    )  # fmt: skip
    data = head([(b"X-Client-Cert-Verify", b"SUCCESS-SPOOF")], ctx, framing=b"Content-Length: 0")
    assert data == (
        b"GET /a?b HTTP/1.1\r\n" + TAIL
        + b"X-Client-Cert-Verify: SUCCESS\r\nX-Client-Cert-Subject: CN=alice\r\n"
        + b"Content-Length: 0\r\n\r\n"
    )  # fmt: skip


def test_upgrade_request() -> None:
    data = head(
        [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"), (b"Sec-WebSocket-Key", b"k")],
        upgrade=b"websocket",
    )
    assert data == (
        b"GET /a?b HTTP/1.1\r\nSec-WebSocket-Key: k\r\n" + TAIL
        + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )  # fmt: skip


def test_unusual_header_names_are_classified_and_cached() -> None:
    names = [b"X-Rand-%d" % i for i in range(50)]
    data = head([(name, b"v") for name in names] + [(b"Connection", b"x-rand-7")])
    lines = header_lines(data)
    assert b"X-Rand-7: v" not in lines
    assert len([line for line in lines if line.startswith(b"X-Rand-")]) == 49


# --------------------------------------------------------------------- responses


# What is left of the hostile response heads below once hop-by-hop fields, the names the
# Connection field lists, and the framing are gone.
KEPT_RESPONSE_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/html\r\n"
    b"Set-Cookie: a=1\r\n"
    b"set-cookie: b=2\r\n"
    b"X-Request-Id: backend-id\r\n"
)


def test_client_response_head_exact() -> None:
    data = client_response_head(
        200,
        b"OK",
        [
            (b"Content-Type", b"text/html"),
            (b"Connection", b"keep-alive, X-Backend-Secret"),
            (b"Keep-Alive", b"timeout=5"),
            (b"X-Backend-Secret", b"s"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Content-Length", b"5"),
            (b"Set-Cookie", b"a=1"),
            (b"set-cookie", b"b=2"),
            (b"Trailer", b"X"),
            (b"Upgrade", b"h2c"),
            (b"Proxy-Authenticate", b"Basic"),
            (b"X-Request-Id", b"backend-id"),
        ],
        b"Content-Length: 5",
        False,
    )
    assert data == KEPT_RESPONSE_HEAD + b"Content-Length: 5\r\n\r\n"


def test_passed_response_head_from_the_parser() -> None:
    """The proxy's path: the parser sorts the fields as they arrive, and the head is
    the one client_response_head makes from all of them; the gateway's own fields
    (affinity cookies) follow the backend's."""
    fields = [
        (b"Content-Type", b"text/html"),
        (b"Connection", b"keep-alive, X-Backend-Secret"),
        (b"Keep-Alive", b"timeout=5"),
        (b"X-Backend-Secret", b"s"),
        (b"Content-Length", b"5"),
        (b"Set-Cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"Trailer", b"X"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"X-Request-Id", b"backend-id"),
    ]
    raw = b"HTTP/1.1 200 OK\r\n" + b"".join(b"%s: %s \r\n" % field for field in fields)
    parser = ResponseParser(request_method=b"GET")
    head = parser.feed(raw + b"\r\nhello")[0]
    assert isinstance(head, ResponseHead)
    assert head.headers == fields  # every field, in order, trailing whitespace gone
    assert head.connection == [b"keep-alive, X-Backend-Secret"]
    cookie = [(b"Set-Cookie", b"GATEWAYD_AFFINITY=x")]
    data = passed_response_head(200, b"OK", head.passed, head.connection, cookie,
                                b"Content-Length: 5", False)
    assert data == client_response_head(200, b"OK", fields + cookie, b"Content-Length: 5",
                                        False)
    assert data == (KEPT_RESPONSE_HEAD + b"Set-Cookie: GATEWAYD_AFFINITY=x\r\n"
                    b"Content-Length: 5\r\n\r\n")
    assert passed_response_head(200, b"OK", head.passed, head.connection, (), None, True,
                                announce_keep_alive=True).endswith(
        b"X-Request-Id: backend-id\r\nConnection: close\r\n\r\n")


def test_client_response_close_and_no_framing() -> None:
    data = client_response_head(304, b"Not Modified", [(b"ETag", b'"x"')], None, True)
    assert data == b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\nConnection: close\r\n\r\n'
    chunked = client_response_head(200, b"OK", [], b"Transfer-Encoding: chunked", True)
    assert chunked == (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )


def test_client_response_upgrade() -> None:
    data = client_response_head(
        101,
        b"Switching Protocols",
        [(b"Upgrade", b"websocket"), (b"Connection", b"upgrade"), (b"Sec-WebSocket-Accept", b"a")],
        None,
        False,
        upgrade=b"websocket",
    )
    assert data == (
        b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: a\r\n"
        b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )


# ------------------------------------------------------------- gateway responses


def test_gateway_response_exact() -> None:
    assert gateway_response(502, request_id=RID, close=True) == (
        b"HTTP/1.1 502 Bad Gateway\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 16\r\n"
        b"X-Request-Id: " + RID.encode() + b"\r\n"
        b"Connection: close\r\n"
        b"\r\n"
        b"502 Bad Gateway\n"
    )
    assert gateway_response(404) == (
        b"HTTP/1.1 404 Not Found\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 14\r\n"
        b"\r\n"
        b"404 Not Found\n"
    )


def test_gateway_response_custom_body_and_headers() -> None:
    page = b"<h1>down</h1>"
    data = gateway_response(
        503, body=page, extra_headers=[(b"Content-Type", b"text/html"), (b"Retry-After", b"5")]
    )
    assert data == (
        b"HTTP/1.1 503 Service Unavailable\r\n"
        b"Content-Length: 13\r\n"
        b"Content-Type: text/html\r\n"
        b"Retry-After: 5\r\n"
        b"\r\n" + page
    )


def test_gateway_redirect() -> None:
    data = gateway_response(301, extra_headers=[(b"Location", b"https://a.test/")])
    assert data == (
        b"HTTP/1.1 301 Moved Permanently\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 22\r\n"
        b"Location: https://a.test/\r\n"
        b"\r\n"
        b"301 Moved Permanently\n"
    )


def test_gateway_response_head_and_interim() -> None:
    assert gateway_response(404, head=True) == (
        b"HTTP/1.1 404 Not Found\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 14\r\n"
        b"\r\n"
    )
    assert gateway_response(100) == b"HTTP/1.1 100 Continue\r\n\r\n"


@pytest.mark.parametrize(
    "status",
    [100, 200, 400, 403, 404, 405, 408, 413, 414, 421, 431, 500, 501, 502, 503, 504, 505],
)
def test_all_required_statuses_have_reasons(status: int) -> None:
    reason = STATUS_REASONS[status]
    data = gateway_response(status, close=True)
    assert data.startswith(b"HTTP/1.1 %d %s\r\n" % (status, reason))
    if status >= 200:
        assert data.endswith(b"\r\n\r\n%d %s\n" % (status, reason))


def test_reason_texts() -> None:
    assert STATUS_REASONS[413] == b"Content Too Large"  # RFC 9110 §15.5.14
    assert STATUS_REASONS[421] == b"Misdirected Request"
    assert STATUS_REASONS[431] == b"Request Header Fields Too Large"


def test_gateway_response_unknown_status() -> None:
    with pytest.raises(ValueError, match="299"):
        gateway_response(299)


def test_new_request_id() -> None:
    ids = {new_request_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in ids)


def test_request_ids_differ_across_fork() -> None:
    """Ids come from a per-process pool of CSPRNG bytes: a forked worker must not hand
    out the ids its parent (or a sibling) still holds."""
    ids = [new_request_id() for _ in range(600)]  # spans more than one batch
    assert len(set(ids)) == 600
    held = new_request_id()  # the parent's pool is not empty now
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        os.write(write_end, "".join(new_request_id() for _ in range(300)).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        text = pipe.read().decode()
    os.waitpid(pid, 0)
    child_ids = {text[i:i + 32] for i in range(0, len(text), 32)}
    parent_ids = {new_request_id() for _ in range(300)} | {held}
    assert len(child_ids) == 300
    assert not child_ids & parent_ids


def test_content_length_field_is_remembered_and_bounded() -> None:
    """The framing line the proxy writes for a Content-Length body: the same bytes as a
    fresh format for every length, the cache bounded (a client sending endless new
    lengths cannot grow it), and lengths past the bound still right."""
    from gatewayd import forwarding

    for length in (0, 1, 100, 65535, 10**12, 100, 0):
        assert forwarding.content_length_field(length) == b"Content-Length: %d" % length
    for length in range(3 * forwarding._CACHE_LIMIT):
        assert forwarding.content_length_field(length) == b"Content-Length: %d" % length
    assert len(forwarding._CONTENT_LENGTHS) <= forwarding._CACHE_LIMIT
