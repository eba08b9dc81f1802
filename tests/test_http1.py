"""Pure tests of the sans-IO HTTP/1.x parsers (workers/http1/): no sockets, no gevent.

Most tests are tables: raw bytes in, events (or the refusing HttpError) out.  Every input
is also checked with byte-at-a-time and two-piece feeding, since the worker hands the
parser whatever recv() returned (RFC 9112 does not align messages with reads).
"""

from __future__ import annotations

from typing import Any

import pytest
from gatewayd.workers.http1 import (
    END,
    EndOfMessage,
    EventQueue,
    HttpError,
    RequestHead,
    RequestParser,
    RequestParsers,
    ResponseHead,
    ResponseParser,
)
from gatewayd.workers.http1.request import PARSERS_KEPT

from tests.support.corpus import smuggling_cases

Event = Any


def merge(events: list[Event]) -> list[Event]:
    """Join consecutive body chunks: chunk boundaries are not part of the contract."""
    out: list[Event] = []
    for ev in events:
        if isinstance(ev, bytes) and out and isinstance(out[-1], bytes):
            out[-1] = out[-1] + ev
        else:
            out.append(ev)
    return [ev for ev in out if ev != b""]


def feed_all(parser: RequestParser | ResponseParser, chunks: list[bytes]) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return merge(events)


def req(data: bytes, **kw: int) -> list[Event]:
    return feed_all(RequestParser(**kw), [data])


def req_err(data: bytes, **kw: int) -> HttpError:
    with pytest.raises(HttpError) as info:
        req(data, **kw)
    return info.value


def heads(events: list[Event]) -> list[RequestHead]:
    return [ev for ev in events if isinstance(ev, RequestHead)]


def splits(data: bytes) -> list[list[bytes]]:
    """One-shot, byte-at-a-time, and every two-piece split."""
    out = [[data], [data[i:i + 1] for i in range(len(data))]]
    out += [[data[:i], data[i:]] for i in range(1, len(data))]
    return out


H = b"Host: example.test\r\n"


# ---------------------------------------------------------------- requests: basics


def test_simple_get() -> None:
    events = req(b"GET /a?b=c HTTP/1.1\r\nHost: example.test\r\nAccept: */*\r\n\r\n")
    assert len(events) == 2 and events[1] is END
    head = events[0]
    assert head == RequestHead(
        method=b"GET", target=b"/a?b=c", version=b"1.1",
        headers=[(b"Host", b"example.test"), (b"Accept", b"*/*")], host=b"example.test",
        keep_alive=True, chunked=False, content_length=None, expect_continue=False,
        upgrade=False,
    )


def test_end_is_a_singleton() -> None:
    assert EndOfMessage() is END
    assert repr(END) == "END"


def test_header_case_order_and_ows_kept_and_stripped() -> None:
    (head,) = heads(req(b"GET / HTTP/1.1\r\nhOsT:   example.test \t\r\nX-A: 1\r\nx-a:2\r\n\r\n"))
    assert head.headers == [(b"hOsT", b"example.test"), (b"X-A", b"1"), (b"x-a", b"2")]
    assert head.host == b"example.test"


@pytest.mark.parametrize(
    ("version", "connection", "keep_alive"),
    [
        (b"1.1", None, True),
        (b"1.1", b"close", False),
        (b"1.1", b"Close", False),
        (b"1.1", b"keep-alive", True),
        (b"1.1", b"keep-alive, close", False),
        (b"1.0", None, False),
        (b"1.0", b"keep-alive", True),
        (b"1.0", b"Keep-Alive", True),
        (b"1.0", b"close", False),
    ],
)
def test_keep_alive(version: bytes, connection: bytes | None, keep_alive: bool) -> None:
    conn = b"Connection: " + connection + b"\r\n" if connection else b""
    (head,) = heads(req(b"GET / HTTP/" + version + b"\r\n" + H + conn + b"\r\n"))
    assert head.version == version
    assert head.keep_alive is keep_alive


def test_pipelined_requests_in_one_feed() -> None:
    data = (
        b"GET /1 HTTP/1.1\r\n" + H + b"\r\n"
        b"POST /2 HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhello"
        b"PUT /3 HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        b"GET /4 HTTP/1.1\r\n" + H + b"\r\n"
    )
    events = req(data)
    shape = [(ev.method, ev.target) if isinstance(ev, RequestHead) else ev for ev in events]
    assert shape == [
        (b"GET", b"/1"), END,
        (b"POST", b"/2"), b"hello", END,
        (b"PUT", b"/3"), b"abc", END,
        (b"GET", b"/4"), END,
    ]


def test_requests_before_a_malformed_one_in_the_same_feed_are_still_returned() -> None:
    """A pipelining client's good requests are answered before the 400 for the bad one
    that follows them in the same read (as nginx does); nothing of the bad one comes out,
    the error waits in `error` and the next feed raises it."""
    good = (b"GET /a HTTP/1.1\r\n" + H + b"\r\n"
            b"POST /b HTTP/1.1\r\n" + H + b"Content-Length: 2\r\n\r\nok")
    bad = (b"POST /c HTTP/1.1\r\n" + H + b"Content-Length: 4\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    for chunks in ([good + bad], [good[:-1], good[-1:] + bad]):
        p = RequestParser()
        events = feed_all(p, chunks)
        assert [h.target for h in heads(events)] == [b"/a", b"/b"]
        assert events[-2:] == [b"ok", END]
        assert p.error is not None and p.error.status == 400
        with pytest.raises(HttpError) as info:
            p.feed(b"GET /d HTTP/1.1\r\n" + H + b"\r\n")
        assert info.value is p.error
    # the bad request alone in its read: raised at once, as before
    p = RequestParser()
    assert p.error is None
    assert len(heads(feed_all(p, [good]))) == 2
    with pytest.raises(HttpError):
        p.feed(bad)
    # an error inside a request whose head was already returned: raised at once
    p = RequestParser()
    p.feed(b"POST /e HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n")
    with pytest.raises(HttpError):
        p.feed(b"zz\r\n")


def test_bytes_after_non_persistent_request_are_ignored() -> None:
    """RFC 9112 section 9.6: no further requests after ``close``."""
    p = RequestParser()
    events = p.feed(b"GET /1 HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\nGET /2 HTTP/1.1\r\n")
    assert [ev.target for ev in heads(events)] == [b"/1"] and events[-1] is END
    assert p.feed(b"Host: x\r\n\r\n") == []
    assert not p.in_message()


def test_leading_empty_lines_are_skipped() -> None:
    """RFC 9112 section 2.2: a server SHOULD ignore at least one empty line first."""
    assert heads(req(b"\r\n\r\nGET / HTTP/1.1\r\n" + H + b"\r\n"))[0].target == b"/"


def test_in_message() -> None:
    p = RequestParser()
    assert not p.in_message()
    p.feed(b"\r\n")
    assert not p.in_message()
    p.feed(b"GE")
    assert p.in_message()
    p.feed(b"T / HTTP/1.1\r\n" + H + b"Content-Length: 2\r\n\r\nx")
    assert p.in_message()
    assert p.feed(b"y") == [b"y", END]
    assert not p.in_message()


def test_expect_continue() -> None:
    base = b"PUT / HTTP/1.1\r\n" + H + b"Content-Length: 1\r\n"
    assert heads(req(base + b"Expect: 100-Continue\r\n\r\nx"))[0].expect_continue
    assert not heads(req(base + b"Expect: something\r\n\r\nx"))[0].expect_continue
    assert not heads(req(base + b"\r\nx"))[0].expect_continue


# ------------------------------------------------------------- requests: split feeding

SPLIT_SAMPLES = [
    b"GET /split/target?q=1 HTTP/1.1\r\n" + H + b"X-Long: " + b"v" * 40 + b"\r\n\r\n",
    b"POST /p HTTP/1.1\r\n" + H + b"Content-Length: 11\r\n\r\nhello world",
    b"POST /c HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"5;name=value\r\nhello\r\n1;a;b=\"q\"\r\n!\r\n0\r\nX-Trailer: t\r\n\r\n",
    b"GET /1 HTTP/1.1\r\n" + H + b"\r\nPOST /2 HTTP/1.1\r\n" + H
    + b"Content-Length: 3\r\n\r\nabcGET /3 HTTP/1.0\r\n\r\n",
]


@pytest.mark.parametrize("data", SPLIT_SAMPLES)
def test_split_feeding_equals_one_shot(data: bytes) -> None:
    expected = req(data)
    assert expected and expected[-1] is END
    for chunks in splits(data):
        assert feed_all(RequestParser(), chunks) == expected, chunks


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n" + H + H + b"\r\n",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + H + b"Foo: a\r\n b\r\n\r\n",
    ],
)
def test_split_feeding_errors_equal_one_shot(data: bytes) -> None:
    status = req_err(data).status
    for chunks in splits(data):
        with pytest.raises(HttpError) as info:
            feed_all(RequestParser(), chunks)
        assert info.value.status == status


# ------------------------------------------------------------------- requests: chunked


def test_chunked_body_with_extensions_and_trailers() -> None:
    events = req(
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: Chunked\r\n\r\n"
        b"4;ext=1\r\nWiki\r\n5;x\r\npedia\r\nA\r\n in chunks\r\n0\r\nExpires: never\r\n\r\n"
    )
    head = events[0]
    assert head.chunked and head.content_length is None
    assert events[1:] == [b"Wikipedia in chunks", END]
    # trailers are discarded, never merged into the head
    assert head.headers == [(b"Host", b"example.test"), (b"Transfer-Encoding", b"Chunked")]


def test_chunked_empty_body() -> None:
    events = req(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert events[1:] == [END]


# -------------------------------------------------------------------- requests: limits


def test_414_request_line() -> None:
    assert req(b"GET /" + b"a" * 8188 + b" HTTP/1.1\r\n" + H + b"\r\n")[-1] is END  # 3+5+8188
    err = req_err(b"GET /" + b"a" * 8189 + b" HTTP/1.1\r\n" + H + b"\r\n")
    assert (err.status, err.error_info) == (414, "request_line_too_long")


def test_414_detected_while_the_target_still_streams() -> None:
    p = RequestParser(max_request_line=100)
    p.feed(b"GET /")
    with pytest.raises(HttpError) as info:
        for _ in range(100):
            p.feed(b"x" * 10)  # no SP, no CRLF: the line never ends
    assert info.value.status == 414
    with pytest.raises(HttpError):  # the parser stays dead
        p.feed(b" HTTP/1.1\r\n")


def test_431_header_bytes() -> None:
    ok = b"GET / HTTP/1.1\r\n" + H + b"X: " + b"a" * 100 + b"\r\n\r\n"
    limit = len(b"Host") + len(b"example.test") + 4 + 1 + 100 + 4
    assert req(ok, max_header_bytes=limit)[-1] is END
    err = req_err(ok, max_header_bytes=limit - 1)
    assert (err.status, err.error_info) == (431, "header_too_large")


def test_431_header_bytes_accumulate_across_fragmented_headers() -> None:
    p = RequestParser(max_header_bytes=1000)
    p.feed(b"GET / HTTP/1.1\r\n" + H)
    with pytest.raises(HttpError) as info:
        for i in range(200):
            p.feed(b"X-%d: " % i)
            p.feed(b"0123456789\r\n")
    assert (info.value.status, info.value.error_info) == (431, "header_too_large")


def test_431_endless_header_value_before_the_line_ends() -> None:
    """One unterminated field line is buffered inside httptools: bounded by raw bytes."""
    p = RequestParser(max_request_line=100, max_header_bytes=1000)
    p.feed(b"GET / HTTP/1.1\r\n" + H + b"X: ")
    with pytest.raises(HttpError) as info:
        for _ in range(200):
            p.feed(b"a" * 10)
    assert info.value.status == 431
    with pytest.raises(HttpError):  # dead
        p.feed(b"\r\n\r\n")


def test_431_too_many_headers() -> None:
    data = b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: v\r\n" % i for i in range(9)) + b"\r\n"
    assert req(data, max_headers=10)[-1] is END
    err = req_err(data, max_headers=9)
    assert (err.status, err.error_info) == (431, "too_many_headers")


def test_431_endless_trailer_section() -> None:
    p = RequestParser(max_header_bytes=500)
    p.feed(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\nX: ")
    with pytest.raises(HttpError) as info:
        for _ in range(200):
            p.feed(b"a" * 10)
    assert info.value.status == 431


def test_413_content_length_at_head_time() -> None:
    head = b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 10\r\n\r\n"
    assert req(head + b"0123456789", max_body_bytes=10)[-2:] == [b"0123456789", END]
    p = RequestParser(max_body_bytes=9)
    with pytest.raises(HttpError) as info:
        p.feed(head)  # no body byte needed
    assert (info.value.status, info.value.error_info) == (413, "body_too_large")


def test_413_chunked_as_soon_as_crossed() -> None:
    p = RequestParser(max_body_bytes=10)
    events = p.feed(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n")
    assert events[0].chunked
    assert p.feed(b"a\r\n0123456789\r\n") == [b"0123456789"]
    with pytest.raises(HttpError) as info:
        p.feed(b"1\r\nx")
    assert info.value.status == 413


def test_max_body_zero_is_unlimited() -> None:
    assert req(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 100000\r\n\r\n" + b"x" * 100000)[
        -1] is END


# ----------------------------------------------------------------- requests: refusals


@pytest.mark.parametrize(
    ("data", "status", "info"),
    [
        # Host rules, RFC 9112 section 3.2
        (b"GET / HTTP/1.1\r\n\r\n", 400, "missing_host"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400, "duplicate_host"),
        (b"GET / HTTP/1.0\r\nHost: a\r\nhost: b\r\n\r\n", 400, "duplicate_host"),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400, "invalid_host"),
        (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400, "invalid_host"),
        (b"GET http://b/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, "host_mismatch"),
        (b"GET http://u@a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request: invalid authority"),
        (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request: asterisk-form target"),
        (b"GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request: fragment in request-target"),
        (b"GET ftp://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request: invalid request-target"),
        # versions llhttp lets through
        (b"GET /\r\n\r\n", 400, "bad_request: unsupported HTTP version"),
        (b"GET / HTTP/0.9\r\nHost: a\r\n\r\n", 400, "bad_request: unsupported HTTP version"),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 400, "bad_request: unsupported HTTP version"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, None),
        # methods
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405, "connect_not_allowed"),
        # Transfer-Encoding, RFC 9112 sections 6.1 and 6.3
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "te_on_http10"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501,
         "unsupported_transfer_coding"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ,chunked\r\n\r\n", 501,
         "unsupported_transfer_coding"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400,
         "bad_transfer_encoding"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked \"x\"\r\n\r\n", 400, None),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n", 400,
         "bad_transfer_encoding"),
        # refused at the first field line already, before the list is complete
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked"
         b"\r\n\r\n", 400, "bad_transfer_encoding"),
    ],
)
def test_refused_by_gatewayd(data: bytes, status: int, info: str | None) -> None:
    """Refusals that strict llhttp does NOT make by itself (checked in this module)."""
    err = req_err(data)
    assert err.status == status
    if info is not None:
        assert err.error_info == info


@pytest.mark.parametrize(
    "data",
    [
        # Content-Length, RFC 9112 section 6.3 rules 3 and 5 (llhttp + local check)
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1,1\r\n\r\nx",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        # Transfer-Encoding refused by llhttp itself
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        # chunk framing
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nZ\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 40 + b"\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n",
        # field syntax, RFC 9112 section 5
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\nb\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX : a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX\t: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",  # obs-fold
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n\tb\r\n\r\n",  # obs-fold
        b"GET / HTTP/1.1\r\n Host: a\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a\n\n",
        # request line
        b"GET / HTTP/1.2\r\nHost: a\r\n\r\n",
        b"GET HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET foo HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n",
        b"G@T / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n",
    ],
)
def test_refused_with_400(data: bytes) -> None:
    assert req_err(data).status == 400


def test_http10_without_host_is_allowed() -> None:
    (head,) = heads(req(b"GET / HTTP/1.0\r\n\r\n"))
    assert head.host == b"" and head.version == b"1.0" and not head.keep_alive


def test_empty_host_is_allowed() -> None:
    """RFC 9112 section 3.2: an empty Host is sent when the URI has no authority."""
    assert heads(req(b"GET / HTTP/1.1\r\nHost:\r\n\r\n"))[0].host == b""


@pytest.mark.parametrize(
    ("target", "host"),
    [
        (b"http://example.test/x", b"example.test"),
        (b"HTTPS://Example.Test:8443?q", b"Example.Test:8443"),
    ],
)
def test_absolute_form_matching_host(target: bytes, host: bytes) -> None:
    (head,) = heads(req(b"GET " + target + b" HTTP/1.1\r\nHost: " + host.lower() + b"\r\n\r\n"))
    assert head.target == target and head.host == host


def test_options_asterisk() -> None:
    assert heads(req(b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n"))[0].target == b"*"


def test_error_kills_the_parser() -> None:
    p = RequestParser()
    with pytest.raises(HttpError) as first:
        p.feed(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(HttpError) as second:
        p.feed(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
    assert second.value is first.value


# ------------------------------------------------------------------- requests: upgrade


def test_websocket_upgrade_and_trailing() -> None:
    p = RequestParser()
    events = p.feed(
        b"GET /ws HTTP/1.1\r\n" + H + b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n\x81\x05hello"
    )
    assert len(events) == 2 and events[1] is END
    assert events[0].upgrade and p.upgraded
    assert p.trailing == b"\x81\x05hello"
    assert not p.in_message()
    with pytest.raises(RuntimeError):
        p.feed(b"more")


def test_upgrade_needs_connection_upgrade() -> None:
    p = RequestParser()
    (head,) = heads(p.feed(b"GET / HTTP/1.1\r\n" + H + b"Upgrade: websocket\r\n\r\n"))
    assert not head.upgrade and not p.upgraded


def test_h2c_upgrade_is_one_request() -> None:
    p = RequestParser()
    events = p.feed(
        b"GET / HTTP/1.1\r\n" + H + b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
        b"Connection: Upgrade, HTTP2-Settings\r\n\r\nGET /next HTTP/1.1\r\n"
    )
    assert len(heads(events)) == 1 and events[-1] is END and p.upgraded
    assert p.trailing == b"GET /next HTTP/1.1\r\n"


def test_upgrade_with_content_length_body() -> None:
    """httptools makes llhttp skip an upgrade request's body; we cut it out ourselves."""
    p = RequestParser()
    data = (b"POST / HTTP/1.1\r\n" + H + b"Upgrade: h2c\r\nConnection: upgrade\r\n"
            b"Content-Length: 5\r\n\r\nhel")
    events = p.feed(data)
    assert events[0].upgrade and events[1:] == [b"hel"] and p.in_message()
    assert p.feed(b"lo\x00tunnel") == [b"lo", END]
    assert p.trailing == b"\x00tunnel" and p.upgraded and not p.in_message()


def test_upgrade_with_chunked_body_is_refused() -> None:
    err = req_err(b"POST / HTTP/1.1\r\n" + H + b"Upgrade: h2c\r\nConnection: upgrade\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert err.status == 400


# --------------------------------------------------------------- the smuggling corpus


def _cases() -> list[dict[str, Any]]:
    return smuggling_cases()


def _feed_requests(p: RequestParser,
                   chunks: list[bytes]) -> tuple[list[Event], HttpError | None]:
    events: list[Event] = []
    try:
        for chunk in chunks:
            if p.upgraded and not p.in_message():
                break  # the rest belongs to the tunnel (p.trailing and later reads)
            events.extend(p.feed(chunk))
    except HttpError as exc:
        return events, exc
    return events, None


def _check_case(case: dict[str, Any], chunks: list[bytes]) -> None:
    events, err = _feed_requests(RequestParser(), chunks)
    produced = heads(events)
    for head in produced:
        assert b"/smuggled-" not in head.target, case["id"]
        assert not (head.chunked and head.content_length is not None), case["id"]
        names = [n.lower() for n, _ in head.headers]
        assert not (b"content-length" in names and b"transfer-encoding" in names), case["id"]
    if case["expected"] == "400":
        # Rejected with one of the case's statuses.  When the request arrives in one read
        # nothing at all is produced; when split, the /sm/ head may precede a body error.
        assert err is not None, case["id"]
        assert err.status in case["reject_statuses"], (case["id"], err)
        if len(chunks) == 1:
            assert produced == [], case["id"]
    elif case["expected"] == "forward-normalized":
        assert err is None, (case["id"], err)
        assert len(produced) == 1 and events[-1] is END, case["id"]
        if "backend_body_len" in case["check"]:
            body = b"".join(ev for ev in events if isinstance(ev, bytes))
            assert len(body) == case["check"]["backend_body_len"], case["id"]
    else:  # "close": refusing is one of the acceptable outcomes, else one request only
        assert (err is not None and err.status in case["reject_statuses"]) or len(produced) == 1


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["id"])
def test_smuggling_case(case: dict[str, Any]) -> None:
    raw = case["raw_request"].encode("latin-1")
    _check_case(case, [raw])
    _check_case(case, [raw[i:i + 1] for i in range(min(len(raw), 2000))] + [raw[2000:]])
    for i in range(1, min(len(raw), 400), 7):
        _check_case(case, [raw[:i], raw[i:]])


# ------------------------------------------- request parsers kept for the next connection

# How a connection can leave its parser: between two messages, nothing of a next one seen.
_ENDINGS = [
    b"GET /a HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n",
    b"GET /b HTTP/1.0\r\n\r\n",
    b"POST /c HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nExpect: 100-continue\r\n\r\nabc",
    b"POST /d HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
    b"X-Trailer: t\r\n\r\n",
    b"\r\nGET /e HTTP/1.1\r\n" + H + b"X-Long: " + b"v" * 3000 + b"\r\n\r\n\r\n",
]
_LIMITS = {"max_request_line": 200, "max_header_bytes": 4000, "max_headers": 20,
           "max_body_bytes": 1000}


def _request_outcome(parser: RequestParser, chunks: list[bytes]) -> tuple[Any, ...]:
    """Everything a connection's requests make of a parser, comparable between two."""
    events, exc = _feed_requests(parser, chunks)
    error = None if exc is None else (exc.status, str(exc))
    shown = [(ev.method, ev.target, ev.version, ev.headers, ev.host, ev.keep_alive,
              ev.chunked, ev.content_length, ev.expect_continue, ev.upgrade)
             if isinstance(ev, RequestHead) else ev for ev in merge(events)]
    return (shown, error, parser.upgraded, parser.trailing, parser.in_message(),
            parser.error is not None)


def _next_connections() -> list[bytes]:
    """What the next connection sends: the smuggling corpus, and requests that meet each
    limit, pipeline, or close."""
    ordinary = [
        b"GET / HTTP/1.1\r\n" + H + b"\r\n",
        b"GET /1 HTTP/1.1\r\n" + H + b"\r\nGET /2 HTTP/1.0\r\n\r\nGET /3 HTTP/1.1\r\n\r\n",
        b"GET /" + b"x" * 300 + b" HTTP/1.1\r\n" + H + b"\r\n",
        b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: 1\r\n" % i for i in range(30)) + b"\r\n",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 2000\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\nGET /smuggled-x HTTP/1.1\r\n",
        b"GET /chat HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\nhi",
        b"GET / HTTP/1.1\r\n\r\n",
    ]
    return ordinary + [case["raw_request"].encode("latin-1") for case in smuggling_cases()]


@pytest.mark.parametrize("ending", _ENDINGS, ids=range(len(_ENDINGS)))
def test_a_renewed_request_parser_reads_the_next_connection_as_a_fresh_one(
        ending: bytes) -> None:
    """A worker gives an ended connection's parser to the next one (RequestParsers).  Its
    llhttp then carries on after the message the last connection ended with, Connection:
    close and HTTP/1.0 included, and nothing of that connection may show: every next
    connection, in one read or byte by byte, comes out exactly as from a new parser."""
    pool = RequestParsers(lambda: RequestParser(**_LIMITS))
    for raw in _next_connections():
        for chunks in ([raw], [raw[i:i + 1] for i in range(len(raw))]):
            used = pool.take()
            assert _request_outcome(used, [ending])[1] is None
            pool.give_back(used)
            renewed = pool.take()
            assert renewed is used  # renewed, not made anew
            assert (_request_outcome(renewed, chunks)
                    == _request_outcome(RequestParser(**_LIMITS), chunks)), raw[:80]
            pool.give_back(renewed)


@pytest.mark.parametrize("data", [
    b"GE",  # inside a request line
    b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nab",  # inside a body
    b"GET / HTTP/1.1\r\n" + H + b"X-Bad : 1\r\n\r\n",  # an error
    b"GET / HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\nGET / HTTP/1.1\r\n",  # after close
    b"GET /chat HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
])
def test_a_request_parser_is_kept_only_between_messages(data: bytes) -> None:
    pool = RequestParsers(lambda: RequestParser(**_LIMITS))
    parser = pool.take()
    try:
        parser.feed(data)
    except HttpError:
        pass
    assert not parser.renew()
    pool.give_back(parser)
    assert len(pool) == 0 and pool.take() is not parser


def test_request_parsers_kept_are_bounded() -> None:
    pool = RequestParsers(lambda: RequestParser(**_LIMITS))
    parsers = [pool.take() for _ in range(PARSERS_KEPT + 5)]
    for parser in parsers:
        pool.give_back(parser)
    assert len(pool) == PARSERS_KEPT


# ------------------------------------------------------------------------- responses


def resp(data: bytes | list[bytes], method: bytes = b"GET", eof: bool = False) -> list[Event]:
    p = ResponseParser(request_method=method)
    events = feed_all(p, [data] if isinstance(data, bytes) else data)
    if eof:
        events = merge(events + p.feed_eof())
    return events


# A connection's responses, one after another (the method each answers): a parser kept on a
# pooled connection must read each exactly as a fresh parser would, byte split or not.
_SEQUENCE = [
    (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello", True),
    (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n", True),
    (b"GET", b"HTTP/1.1 204 No Content\r\nX-B: 2\r\n\r\n", True),
    (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", True),
    (b"POST", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\n"
              b"Content-Length: 2\r\n\r\nok", True),
    (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", True),
    (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 65535\r\n\r\n" + b"z" * 65535, True),
    # a body of _UNFED_BODY bytes or more is only counted, llhttp never sees its end
    (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 65536\r\n\r\n" + b"z" * 65536, False),
    (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", True),
    # llhttp would still expect a HEAD response's body: not reusable after it
    (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", False),
]


@pytest.mark.parametrize("split", [False, True], ids=["one-feed", "byte-splits"])
def test_a_reused_response_parser_reads_each_response_as_a_fresh_one(split: bool) -> None:
    kept: ResponseParser | None = None
    for method, data, reusable in _SEQUENCE:
        chunks = [data[i:i + 7] for i in range(0, len(data), 7)] if split else [data]
        if kept is None:
            kept = ResponseParser(request_method=method)
        else:
            kept.next_response(method)
        assert feed_all(kept, chunks) == resp(chunks, method)
        assert kept.reusable is reusable
        if not reusable:
            kept = None


def test_a_long_counted_body_ends_where_its_content_length_says() -> None:
    """A body llhttp is not fed (_UNFED_BODY) is framed by the count alone: the chunks
    come back as the very objects fed, END comes with its last byte, bytes past it are
    `extra` and never relayed, and the parser reports the backend's EOF after it as
    nothing (the response was complete)."""
    size = 100_000
    p = ResponseParser(request_method=b"GET")
    events = p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"a" * 10)
    assert isinstance(events[0], ResponseHead) and events[0].content_length == size
    assert p.counting
    chunk = memoryview(b"b" * 60_000)
    assert p.feed(chunk)[0] is chunk
    last = p.feed(b"c" * (size - 60_010) + b"HTTP/1.1 200 OK\r\n")
    assert last == [b"c" * (size - 60_010), END]
    assert p.extra and not p.reusable and not p.counting
    assert p.feed(b"more") == [] and p.feed_eof() == []
    # cut short: a truncated response, as with a short body
    q = ResponseParser(request_method=b"GET")
    q.feed(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"a" * 99_999)
    with pytest.raises(HttpError, match="truncated"):
        q.feed_eof()


def test_a_response_parser_is_not_reusable_before_the_end_or_after_extra_bytes() -> None:
    p = ResponseParser(request_method=b"GET")
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel")
    assert not p.reusable  # mid-body
    p.feed(b"lo")
    assert p.reusable
    p = ResponseParser(request_method=b"GET")
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n")
    assert p.extra and not p.reusable  # bytes nobody asked for: the connection is dropped
    p = ResponseParser(request_method=b"GET")
    p.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\n\r\n")
    assert not p.reusable
    p = ResponseParser(request_method=b"GET")
    with pytest.raises(HttpError):
        p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    assert not p.reusable


# ---- heads remembered by their bytes (response._HEADS) --------------------------------


@pytest.fixture
def no_remembered_heads() -> Any:
    """An empty head memory before and after: what llhttp makes of a head is then the first
    outcome, and other tests' heads do not decide whether this one is remembered."""
    from gatewayd.workers.http1 import response

    response._HEADS.clear()
    yield response._HEADS
    response._HEADS.clear()


def _outcome(parser: ResponseParser, chunks: list[bytes], eof: bool) -> tuple[Any, ...]:
    try:
        events = feed_all(parser, chunks)
        if eof:
            events = merge(events + parser.feed_eof())
    except HttpError as exc:
        return ("error", exc.status, exc.error_info)
    return (events, parser.extra, parser.reusable, parser.counting)


_REMEMBERED = [  # (method, response, remembered): only Content-Length framed final heads
    (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello", True),
    (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", True),  # body due
    (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1", True),  # extra
    (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", True),
    (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nX", True),  # extra
    (b"GET", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", True),  # not kept alive
    (b"GET", b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 2\r\n"
             b"Connection: x-trace\r\nX-Trace: 1\r\n\r\nno", True),
    (b"POST", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\n"
              b"Content-Length: 2\r\n\r\nok", True),  # the final head, after the interim
    (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", False),
    (b"GET", b"HTTP/1.1 200 OK\r\n\r\nuntil eof", False),
    (b"GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", False),
    (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", False),
    (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", False),
    (b"GET", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
             b"Connection: Upgrade\r\nContent-Length: 3\r\n\r\nabc", False),
    (b"GET", b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", False),  # lead CRLF
    (b"GET", b"HTTP/1.1 200 OK\r\nX: " + b"v" * 1100 + b"\r\nContent-Length: 2\r\n\r\nok",
     False),  # longer than _HEAD_KEY_MAX
    (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nok", False),
]


@pytest.mark.parametrize(("method", "data", "remembered"), _REMEMBERED)
@pytest.mark.parametrize("eof", [False, True])
def test_a_remembered_head_reads_as_llhttp_read_it(
    no_remembered_heads: dict[bytes, ResponseHead], method: bytes, data: bytes,
    remembered: bool, eof: bool
) -> None:
    """The second time the same bytes arrive, the head comes from memory (the very object
    llhttp's parse made) and everything else (body, END, extra bytes, reusable, the EOF
    verdict) is what a parse by llhttp gave the first time."""
    first = _outcome(ResponseParser(request_method=method), [data], eof)
    assert bool(no_remembered_heads) is remembered
    second = _outcome(ResponseParser(request_method=method), [data], eof)
    assert second == first
    if remembered and second[0] != "error":  # the final head: the very object made before
        final = [e for e in second[0] if isinstance(e, ResponseHead)][-1]
        assert final is [e for e in first[0] if isinstance(e, ResponseHead)][-1]
    # and the same on a parser kept from a previous response
    kept = ResponseParser(request_method=b"GET")
    feed_all(kept, [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"])
    assert kept.reusable
    kept.next_response(method)
    assert _outcome(kept, [data], eof) == first


def test_a_reused_parser_reads_a_new_head_after_a_remembered_one(
    no_remembered_heads: dict[bytes, ResponseHead],
) -> None:
    """llhttp never sees a remembered head or its body, so it is still between messages:
    the next response on the connection, whatever its framing, parses as on a new parser."""
    known = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    resp([known + b"hello"])
    p = ResponseParser(request_method=b"GET")
    for _ in range(2):
        assert feed_all(p, [known, b"he", b"llo"])[1:] == [b"hello", END]
        assert p.reusable
        p.next_response(b"GET")
        chunked = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
                   b"0\r\n\r\n"]
        assert feed_all(p, chunked) == resp(chunked)
        assert p.reusable
        p.next_response(b"GET")


def test_only_a_head_that_starts_in_the_read_is_looked_up(
    no_remembered_heads: dict[bytes, ResponseHead],
) -> None:
    """The end of a head begun in an earlier read may spell a whole remembered head: it is
    still part of the head it ends, not that head."""
    known = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
    resp(known + b"ok")
    assert known in no_remembered_heads
    p = ResponseParser(request_method=b"GET")
    events = feed_all(p, [b"HTTP/1.1 200 OK\r\nX-A: ", known + b"ok"])
    assert events[0].headers == [(b"X-A", b"HTTP/1.1 200 OK"), (b"Content-Length", b"2")]
    assert events[1:] == [b"ok", END]


def test_a_remembered_head_still_meets_each_parsers_limits(
    no_remembered_heads: dict[bytes, ResponseHead],
) -> None:
    data = (b"HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: " + b"d" * 300 +
            b"\r\nContent-Length: 2\r\n\r\nok")
    resp(data)
    assert len(no_remembered_heads) == 1
    with pytest.raises(HttpError, match="too_many_headers"):
        ResponseParser(request_method=b"GET", max_headers=4).feed(data)
    with pytest.raises(HttpError, match="header_too_large"):
        ResponseParser(request_method=b"GET", max_header_bytes=300).feed(data)
    assert ResponseParser(request_method=b"GET", max_headers=5).feed(data)[1:] == [b"ok", END]


def test_a_head_to_head_is_not_taken_from_memory(
    no_remembered_heads: dict[bytes, ResponseHead],
) -> None:
    """The same head answers a HEAD request without a body: a remembered GET answer must
    not make the parser wait for (or relay) one."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    resp(head + b"hello")
    p = ResponseParser(request_method=b"HEAD")
    events = p.feed(head)
    assert events[1:] == [END] and events[0].content_length == 5
    assert not p.counting


def test_a_remembered_heads_client_head_is_remembered_for_its_inputs(
        no_remembered_heads: dict[bytes, ResponseHead]) -> None:
    """The head sent to the client is made once per remembered backend head and set of
    inputs (framing, close, keep-alive announcement), and equals a fresh one every
    time, whatever order the inputs come in; fields the gateway adds bypass it."""
    import random

    from gatewayd.workers.exchange import _client_head

    from gatewayd import forwarding

    wire = (b"HTTP/1.1 200 OK\r\nServer: t\r\nConnection: keep-alive, x-hop\r\n"
            b"X-Hop: 1\r\nETag: \"a\"\r\nContent-Length: 3\r\n\r\nabc")
    parser = ResponseParser(request_method=b"GET")
    first = parser.feed(wire)[0]
    parser.next_response(b"GET")
    resp = parser.feed(wire)[0]
    assert isinstance(resp, ResponseHead) and resp is first  # remembered
    rng = random.Random(3)
    cookie = [(b"Set-Cookie", b"affinity=1")]
    made: dict[tuple[object, ...], bytes] = {}
    reused = 0
    for _ in range(300):
        framing = rng.choice([forwarding.content_length_field(3), b"Content-Length: 3", None])
        close, announce = rng.random() < 0.5, rng.random() < 0.5
        extra = cookie if rng.random() < 0.2 else []
        data = _client_head(resp, extra, framing, close, announce)
        assert data == forwarding.passed_response_head(
            resp.status, resp.reason, resp.passed, resp.connection, extra, framing, close,
            announce_keep_alive=announce)
        assert b"X-Hop" not in data and (b"affinity=1" in data) == bool(extra)
        key = (id(framing), close, announce, bool(extra))
        reused += made.get(key) is data
        made[key] = data
        repeat = _client_head(resp, extra, framing, close, announce)
        assert repeat == data and (repeat is data) == (not extra)
    assert reused > 10


def test_the_head_memory_is_bounded(no_remembered_heads: dict[bytes, ResponseHead]) -> None:
    from gatewayd.workers.http1 import response

    for n in range(response._HEADS_LIMIT * 2 + 10):
        resp(b"HTTP/1.1 200 OK\r\nETag: \"%d\"\r\nContent-Length: 0\r\n\r\n" % n)
        assert 1 <= len(no_remembered_heads) <= response._HEADS_LIMIT
    last = b"HTTP/1.1 200 OK\r\nETag: \"%d\"\r\nContent-Length: 0\r\n\r\n" % n
    assert last in no_remembered_heads


def resp_err(data: bytes, method: bytes = b"GET", eof: bool = False) -> HttpError:
    with pytest.raises(HttpError) as info:
        resp(data, method, eof)
    assert info.value.status == 502
    assert info.value.error_info.startswith("invalid_response: ")
    return info.value


def test_response_content_length() -> None:
    p = ResponseParser(request_method=b"GET")
    events = p.feed(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello")
    assert events[0] == ResponseHead(
        status=200, reason=b"OK", version=b"1.1",
        passed=[b"Content-Type", b": ", b"text/plain", b"\r\n"],
        hop_fields=[(4, b"Content-Length", b"5")], connection=[],
        keep_alive=True, chunked=False, content_length=5, until_eof=False,
    )
    assert events[0].headers == [(b"Content-Type", b"text/plain"), (b"Content-Length", b"5")]
    assert events[1:] == [b"hello", END]
    assert not p.extra and p.feed_eof() == []


def test_response_chunked() -> None:
    events = resp(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nT: v\r\n\r\n")
    assert events[0].chunked and events[0].keep_alive and not events[0].until_eof
    assert events[1:] == [b"hello world", END]


def test_response_until_eof() -> None:
    p = ResponseParser(request_method=b"GET")
    events = p.feed(b"HTTP/1.1 200 OK\r\nContent-Type: x\r\n\r\nsome")
    assert events[0].until_eof and not events[0].keep_alive
    assert p.feed(b" more") == [b" more"]
    assert p.feed_eof() == [END]


def test_response_to_head_ends_after_the_head() -> None:
    p = ResponseParser(request_method=b"HEAD")
    events = p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    assert events[1:] == [END] and events[0].content_length == 1234
    assert events[0].keep_alive and not events[0].until_eof and not p.extra
    assert p.feed(b"") == [] and not p.extra
    assert p.feed(b"x") == [] and p.extra


@pytest.mark.parametrize(
    ("head", "keep_alive"),
    [
        (b"HTTP/1.1 200 OK\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\n\r\n", True),
    ],
)
def test_response_to_head_keep_alive(head: bytes, keep_alive: bool) -> None:
    p = ResponseParser(request_method=b"HEAD")
    events = p.feed(head + b"garbage")
    assert events[0].keep_alive is keep_alive and events[1] is END and p.extra


@pytest.mark.parametrize("status", [204, 304])
def test_response_without_body_by_status(status: int) -> None:
    p = ResponseParser(request_method=b"GET")
    events = p.feed(b"HTTP/1.1 %d X\r\nContent-Length: 10\r\n\r\n" % status)
    assert events[0].status == status and events[1:] == [END]
    assert events[0].keep_alive and not p.extra


@pytest.mark.parametrize("interim", [b"100 Continue", b"103 Early Hints\r\nLink: </s.css>"])
def test_interim_then_final(interim: bytes) -> None:
    data = b"HTTP/1.1 " + interim + b"\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    expected = resp(data)
    assert [(ev.status if isinstance(ev, ResponseHead) else ev) for ev in expected] == [
        int(interim[:3]), END, 200, b"ok", END]
    for chunks in splits(data):
        assert resp(chunks) == expected


def test_several_interims() -> None:
    events = resp(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n"
                  b"HTTP/1.1 103 EH\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
    assert [ev.status for ev in events if isinstance(ev, ResponseHead)] == [100, 102, 103, 204]
    assert events.count(END) == 4


def test_101_is_final_and_keeps_trailing() -> None:
    for extra_headers in (b"Upgrade: websocket\r\nConnection: Upgrade\r\n", b""):
        p = ResponseParser(request_method=b"GET")
        events = p.feed(b"HTTP/1.1 101 Switching Protocols\r\n" + extra_headers + b"\r\n\x81\x00")
        assert events[0].status == 101 and events[1:] == [END]
        assert p.trailing == b"\x81\x00" and p.extra and not events[0].keep_alive


def test_extra_bytes_after_the_response() -> None:
    for tail in (b"HTTP/1.1 200 OK\r\n", b"xyz", b"GET"):
        p = ResponseParser(request_method=b"GET")
        events = p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + tail)
        assert events[1:] == [b"ok", END] and p.extra, tail
    p = ResponseParser(request_method=b"GET")
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert not p.extra
    assert p.feed(b"late") == [] and p.extra


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxx",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nSet-Cookie: a\rInjected: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX : a\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
        b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_invalid_responses(data: bytes) -> None:
    resp_err(data)


def test_response_header_limits() -> None:
    p = ResponseParser(request_method=b"GET", max_header_bytes=100)
    with pytest.raises(HttpError):
        p.feed(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 200 + b"\r\n\r\n")
    p = ResponseParser(request_method=b"GET", max_headers=2)
    with pytest.raises(HttpError):
        p.feed(b"HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n")
    p = ResponseParser(request_method=b"GET", max_header_bytes=100)
    with pytest.raises(HttpError):
        for _ in range(1000):
            p.feed(b"HTTP/1.1 200 OK\r\nX: " if _ == 0 else b"a" * 10)


def test_truncated_and_empty_responses() -> None:
    assert resp_err(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", eof=True).error_info == (
        "invalid_response: truncated")
    assert resp_err(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
                    eof=True).error_info == "invalid_response: truncated"
    assert resp_err(b"HTTP/1.1 200 OK\r\nContent-", eof=True).error_info == (
        "invalid_response: truncated")
    assert resp_err(b"HTTP/1.1 100 Continue\r\n\r\n", eof=True).error_info == (
        "invalid_response: truncated")
    assert resp_err(b"", eof=True).error_info == "invalid_response: empty"


@pytest.mark.parametrize(
    ("data", "keep_alive"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", True),
        (b"HTTP/1.1 204 No Content\r\n\r\n", True),
        (b"HTTP/1.1 304 Not Modified\r\nConnection: close\r\n\r\n", False),
    ],
)
def test_response_keep_alive(data: bytes, keep_alive: bool) -> None:
    """Read at headers-complete: httptools reports False once the message completed."""
    events = resp(data)
    assert events[0].keep_alive is keep_alive and events[-1] is END
    for chunks in splits(data):
        assert resp(chunks) == events


def test_response_split_feeding_equals_one_shot() -> None:
    data = (b"\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
            b"\r\n3;e=1\r\nabc\r\n0\r\nT: 1\r\n\r\n")
    expected = resp(data)
    assert expected[-2:] == [b"abc", END]
    for chunks in splits(data):
        assert resp(chunks) == expected
    head_data = b"HTTP/1.1 103 EH\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n"
    expected = resp(head_data, b"HEAD")
    assert expected[-1] is END
    for chunks in splits(head_data):
        assert resp(chunks, b"HEAD") == expected


def test_content_length_body_is_counted_and_passed_on_as_received() -> None:
    """A Content-Length body is counted, not re-parsed: a chunk wholly inside the body
    comes out as the very object fed (no copy), the last one is cut at the length, and
    anything after it marks the connection as not reusable."""
    body = bytes(range(256)) * 40  # 10,240 bytes
    p = ResponseParser(request_method=b"GET")
    events = p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10240\r\n\r\n" + body[:3000])
    assert events[0].content_length == 10240 and events[1:] == [body[:3000]]
    middle = body[3000:10000]
    (chunk,) = p.feed(middle)
    assert chunk is middle
    assert p.feed(body[10000:] + b"HTTP/1.1 200 OK\r\n") == [body[10000:], END]
    assert p.extra
    assert p.feed(b"more") == [] and p.feed_eof() == []
    truncated = ResponseParser(request_method=b"GET")
    truncated.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
    with pytest.raises(HttpError, match="truncated"):
        truncated.feed_eof()


# The version is read off the request/status line when the line starts a feed (llhttp's
# get_http_version() formats a string per call); whatever the split, llhttp's own reading
# and ours agree, pipelined requests with the same target included.
VERSION_CASES = [
    (b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n" + H + b"\r\nGET /a HTTP/1.1\r\n" + H
     + b"\r\n", [b"1.0", b"1.1"]),
    (b"GET /a HTTP/1.1\r\n" + H + b"\r\nGET /a HTTP/1.0\r\n" + H + b"\r\n", [b"1.1", b"1.0"]),
    (b"\r\nGET /HTTP/1.1 HTTP/1.0\r\n" + H + b"\r\n", [b"1.0"]),
    (b"GET /a HTTP/1.1\r\nX-A: HTTP/1.0\r\n" + H + b"\r\n", [b"1.1"]),
]


@pytest.mark.parametrize(("data", "versions"), VERSION_CASES)
def test_request_version_whatever_the_split(data: bytes, versions: list[bytes]) -> None:
    for chunks in splits(data):
        heads = [e for e in feed_all(RequestParser(), chunks) if isinstance(e, RequestHead)]
        assert [h.version for h in heads] == versions, chunks


def test_http09_request_line_is_refused_even_if_it_ends_like_a_version() -> None:
    # no space before "HTTP/1.1": that is the target, and llhttp reads HTTP/0.9
    assert req_err(b"GET /HTTP/1.1\r\n\r\n").status == 400


@pytest.mark.parametrize(("data", "versions"), [
    (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", [b"1.0"]),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
     [b"1.1", b"1.0"]),
])
def test_response_version_whatever_the_split(data: bytes, versions: list[bytes]) -> None:
    for chunks in splits(data):
        heads = [e for e in resp(chunks) if isinstance(e, ResponseHead)]
        assert [h.version for h in heads] == versions, chunks


@pytest.mark.parametrize("ctl", [c for c in range(0x20) if c != 0x09])
def test_control_bytes_at_the_end_of_a_value_are_refused(ctl: int) -> None:
    # on_header's trailing-whitespace test relies on it: a last byte <= 0x20 is SP or HTAB
    assert req_err(b"GET / HTTP/1.1\r\nHost: a\r\nX: a" + bytes([ctl]) + b"\r\n\r\n").status == 400
    resp_err(b"HTTP/1.1 200 OK\r\nX: a" + bytes([ctl]) + b"\r\nContent-Length: 0\r\n\r\n")


def test_a_closed_parser_leaves_no_cyclic_garbage() -> None:
    """httptools keeps a parser's bound callbacks and the parser keeps httptools': closing
    breaks that cycle, so a finished connection's parsers are freed by reference counting
    instead of waiting for the cyclic collector (closing twice is harmless)."""
    import gc

    gc.collect()
    gc.disable()
    try:
        for _ in range(50):
            req_parser = RequestParser()
            req_parser.feed(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
            resp_parser = ResponseParser(request_method=b"GET")
            resp_parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            req_parser.close()
            req_parser.close()
            resp_parser.close()
            del req_parser, resp_parser
        assert gc.collect() == 0
        leaky = RequestParser()  # not closed: the cycle the close() breaks is real
        del leaky
        assert gc.collect() > 0
    finally:
        gc.enable()


def test_event_queue_keeps_order_across_puts() -> None:
    """Events come out in the order put, one at a time; a put while some are still queued
    keeps those first (the proxy drains before it feeds, but the queue does not rely on
    it); an empty queue says so and raises rather than inventing an event."""
    queue = EventQueue()
    assert not queue.ready()
    queue.put([1, 2, 3])
    assert queue.take() == 1
    assert queue.peek() == 2 and queue.take() == 2
    queue.put([4, 5])
    assert [queue.take() for _ in range(3)] == [3, 4, 5]
    assert not queue.ready()
    with pytest.raises(IndexError):
        queue.take()
    queue.put([])
    assert not queue.ready()
    queue.put([END])
    assert queue.ready() and queue.take() is END


def test_event_queue_lets_go_of_taken_events() -> None:
    """A keep-alive connection keeps its queue while idle: the last request's body
    chunks must not stay alive in it."""
    import weakref

    class Chunk(bytearray):  # bytes cannot be weakly referenced; a subclass can
        pass

    queue = EventQueue()
    chunk = Chunk(b"x" * 65536)
    alive = weakref.ref(chunk)
    queue.put([chunk, END])
    assert queue.take() is chunk and queue.take() is END
    del chunk
    assert alive() is None


def test_ending_at_a_message_leaves_no_traceback_behind() -> None:
    """Parsing that ends at a Connection: close request (no exception at all now) or at
    bytes after a backend's final response (a new exception each time) keeps nothing
    alive: one shared exception raised again and again carried a traceback that grew by
    every raise, with the frames it holds, for the worker's life."""
    import gc
    import types

    def tracebacks() -> int:
        gc.collect()
        return sum(1 for obj in gc.get_objects() if isinstance(obj, types.TracebackType))

    def run(n: int) -> None:
        for _ in range(n):
            request = RequestParser()
            events = request.feed(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
                                  b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n")
            assert isinstance(events[0], RequestHead) and events[1:] == [END]
            assert events[0].target == b"/" and request.feed(b"GET / HTTP/1.1\r\n") == []
            response = ResponseParser(request_method=b"GET")
            response.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n")
            assert response.extra

    run(10)  # first-use caches
    before = tracebacks()
    run(300)
    assert tracebacks() - before < 10
