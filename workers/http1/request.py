"""The requests of one client connection: llhttp plus the rules a gateway adds
(see __init__ for which are which)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NoReturn

import httptools  # type: ignore[import-untyped, unused-ignore]

from .common import (
    _BODY,
    _HEAD,
    _IDLE,
    _OWS,
    _VERSIONS,
    END,
    EndOfMessage,
    HttpError,
    LlhttpOwner,
    _HttpParserError,
    _HttpParserUpgrade,
)

# RFC 9110 section 7.2 / RFC 3986 section 3.2.2: uri-host [ ":" port ]
_HOST_RE: Final = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(?::[0-9]*)?")
# lengths of the request fields inspected here: host, expect, content-length, transfer-encoding
_SPECIAL_LENS: Final = frozenset((4, 6, 14, 17))
# Host values already found well-formed (the same few arrive on every request).
_GOOD_HOSTS: Final[set[bytes]] = set()
_GOOD_HOSTS_LIMIT: Final = 1024


@dataclass(slots=True, init=False)  # __init__ below: a generated one runs as bytecode
class RequestHead:
    """A request line plus header section, validated and framed.

    ``headers`` are as received (name case kept, order kept, values with surrounding OWS
    stripped); ``content_length`` is None when absent, and never set together with
    ``chunked``.  ``host`` is the single Host value (b"" on HTTP/1.0 without Host).
    """

    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    host: bytes
    keep_alive: bool
    chunked: bool
    content_length: int | None
    expect_continue: bool
    upgrade: bool

    def __init__(self, method: bytes, target: bytes, version: bytes,
                 headers: list[tuple[bytes, bytes]], host: bytes, keep_alive: bool,
                 chunked: bool, content_length: int | None, expect_continue: bool,
                 upgrade: bool) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.host = host
        self.keep_alive = keep_alive
        self.chunked = chunked
        self.content_length = content_length
        self.expect_continue = expect_continue
        self.upgrade = upgrade


RequestEvent = RequestHead | bytes | EndOfMessage


class _AfterClose(Exception):
    """Bytes of a request after one that ended its connection (RFC 9112 section 9.6:
    not processed).  Raised from a callback, it stops llhttp; feed() ignores them."""


def _te_error(value: bytes) -> HttpError:
    """Classify a Transfer-Encoding we do not accept (RFC 9112 sections 6.1 and 6.3).

    chunked as the final coding with others before it is well-framed but uses a coding we
    do not implement (501); anything else leaves the length undeterminable (400).
    """
    last = value.rsplit(b",", 1)[-1].strip(_OWS).lower()
    if last == b"chunked":
        return HttpError(501, "unsupported_transfer_coding")
    return HttpError(400, "bad_transfer_encoding")


class RequestParser(LlhttpOwner):
    """Incremental parser for the requests of one client connection.

    ``feed()`` returns events in wire order, pipelined requests included (RFC 9112 section
    9.3.2): ``RequestHead``, body ``bytes``..., ``END``, next ``RequestHead``...  Any
    ``HttpError`` kills the parser: the connection must be answered and closed, because
    after a framing error the position of the next request is unknowable (section 11.2).
    Requests completed before the error in the same feed are still returned, and the
    error waits in ``error`` (see ``_before_error``).

    After a request that does not keep the connection alive, further bytes are ignored
    (section 9.6: the server "MUST NOT process any further requests").  After an
    Upgrade/CONNECT stop, ``upgraded`` is set, bytes following the head are in
    ``trailing`` and ``feed()`` refuses more input.
    """

    __slots__ = (
        "_body_n",
        "_broken",
        "_chunked",
        "_cl",
        "_closed",
        "_err",
        "_events",
        "_expect",
        "_fresh",
        "_halt",
        "_hdr_bytes",
        "_head",
        "_headers",
        "_host",
        "_host_n",
        "_max_body",
        "_max_hdr",
        "_max_headers",
        "_max_line",
        "_method",
        "_raw",
        "_state",
        "_trl",
        "_up_left",
        "_url",
        "_version",
        "_version_next",
        "trailing",
        "upgraded",
    )

    def __init__(
        self,
        *,
        max_request_line: int = 8192,
        max_header_bytes: int = 32768,
        max_headers: int = 100,
        max_body_bytes: int = 0,
    ) -> None:
        self._max_line = max_request_line
        self._max_hdr = max_header_bytes
        self._max_headers = max_headers
        self._max_body = max_body_bytes
        self._p = httptools.HttpRequestParser(self)
        # llhttp goes on parsing after a request that ends its connection, so that the
        # parser can serve another connection (RequestParsers); this parser still parses
        # nothing after such a request: on_message_begin refuses once `_closed` is set.
        self._p.set_dangerous_leniencies(lenient_keep_alive=True)
        self._start()

    def _start(self) -> None:
        """The state of a parser that has seen no byte: a new one, or one renewed."""
        self._broken = False  # llhttp stopped by an error (also after `_closed`)
        self._events: list[RequestEvent] = []
        self._err: HttpError | None = None
        self._halt = False  # fast path flag: error, upgraded or closed
        self._state = _IDLE
        self._fresh = False
        self._raw = 0
        self._closed = False
        # llhttp stopped at an Upgrade/CONNECT: no more requests on this connection
        self.upgraded = False
        self._up_left = 0
        self.trailing = b""
        self._method = b""
        self._url: bytes | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._hdr_bytes = 0
        self._host: bytes | None = None
        self._host_n = 0
        self._cl: int | None = None
        self._chunked = False
        self._expect = False
        self._head: RequestHead | None = None
        self._body_n = 0
        self._trl = 0
        self._version: bytes | None = None  # of the message in progress, if read off its line
        self._version_next: bytes | None = None

    def renew(self) -> bool:
        """Make this parser as new for the next connection, if llhttp sits between two
        messages with nothing of a next one seen and no error; False (and unchanged) if
        not.  llhttp's own state is then its start state, and everything this layer keeps
        is reset: no byte, field or decision of one connection reaches the next."""
        if (self._state != _IDLE or self._broken or self._err is not None or self.upgraded
                or self._p is None):
            return False
        self._start()
        return True

    # ---- public API ---------------------------------------------------------------

    def in_message(self) -> bool:
        """True between the first byte of a request and its END (408 vs quiet close)."""
        return self._state != _IDLE

    def feed(self, data: bytes) -> list[RequestEvent]:
        """Parse ``data`` and return the events it completes; raises :class:`HttpError`."""
        if self._halt:
            if self._err is not None:
                raise self._err
            if self.upgraded:
                return self._feed_upgrade_body(data, [])
            return []  # closed after a non-persistent request
        events: list[RequestEvent] = []
        self._events = events
        if self._state == _IDLE:
            # A request that starts this feed: its version read off its own line, since
            # llhttp's get_http_version() formats a new string on every call.  Only a
            # hint for the message on_message_begin starts next (llhttp still parses and
            # validates that line); anything but a whole "... HTTP/1.1" line asks llhttp.
            eol = data.find(b"\r\n")
            self._version_next = (b"1.1" if eol > 9 and data.startswith(b" HTTP/1.1", eol - 9)
                                  else None)
        try:
            self._p.feed_data(data)
        except _HttpParserUpgrade as upgrade:
            self._on_upgrade(data[upgrade.args[0]:])
        except _HttpParserError as exc:
            self._broken = True
            if self._err is None:
                if self._closed:  # bytes after a non-persistent request: not parsed
                    return events
                self._err = HttpError(400, "bad_request: " + str(exc))
            self._halt = True
            return self._before_error(events)
        state = self._state
        if state == _HEAD:
            try:
                self._check_raw_head(len(data))
            except HttpError:
                return self._before_error(events)
        elif self._trl and state == _BODY:
            self._check_raw_trailers(len(data))
        return events

    @property
    def error(self) -> HttpError | None:
        """The error that ended parsing, once raised or deferred (see _before_error)."""
        return self._err

    def _before_error(self, events: list[RequestEvent]) -> list[RequestEvent]:
        """A feed that ends in an error: the requests it completed before the bad bytes
        are still returned, to be answered in order as a pipelining client expects
        (nginx does the same); the error is kept in `error` for the caller to answer after
        them, and the next feed raises it.  Without a complete request first, raise."""
        err = self._err
        assert err is not None
        for i in range(len(events) - 1, -1, -1):
            if events[i] is END:
                del events[i + 1:]  # the bad request's own events, if any
                return events
        raise err from None

    # ---- limits that need byte counting -------------------------------------------

    def _check_raw_head(self, n: int) -> None:
        """Bound what httptools buffers for an unfinished head (one endless field line).

        Callback-based counting only sees complete field lines; an unterminated line is
        accumulated inside httptools, so raw bytes of every feed that ends inside the head
        are counted too (the first feed of a head is counted by what the callbacks saw).
        """
        if self._fresh:
            self._fresh = False
            self._raw = self._hdr_bytes + (len(self._url) if self._url else 0)
        else:
            self._raw += n
        if self._raw > self._max_line + self._max_hdr:
            self._fail(431, "header_too_large")

    def _check_raw_trailers(self, n: int) -> None:
        """Same bound for a trailer section: a feed without any chunk data after a chunk
        header can only be trailer bytes (data would have produced on_body)."""
        if self._trl == 1:
            self._trl = 2
            return
        self._hdr_bytes += n
        if self._hdr_bytes > self._max_hdr:
            self._fail(431, "header_too_large")

    def _fail(self, status: int, info: str) -> NoReturn:
        err = HttpError(status, info)
        self._err = err
        self._halt = True
        raise err

    # ---- llhttp callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._closed:  # a request after one that ended the connection: not parsed
            raise _AfterClose
        self._state = _HEAD
        self._version, self._version_next = self._version_next, None
        self._fresh = True
        self._url = None
        self._headers = []
        self._hdr_bytes = 0
        self._host = None
        self._host_n = 0
        self._cl = None
        self._chunked = False
        self._expect = False

    def on_url(self, url: bytes) -> None:
        # on_url may arrive in pieces (one per feed); the 414 must fire as soon as the
        # limit is crossed so an endless target cannot keep us buffering.
        if self._url is None:
            method = self._p.get_method()
            if method == b"CONNECT":
                self._fail(405, "connect_not_allowed")
            self._method = method
            self._url = url
        else:
            self._url += url
        if len(self._url) + len(self._method) > self._max_line:
            self._fail(414, "request_line_too_long")

    def on_header(self, name: bytes, value: bytes) -> None:
        # llhttp drops leading OWS but keeps trailing OWS (RFC 9112 section 5.1: strip);
        # it refuses every other control byte in a value, so a last byte <= 0x20 is SP or
        # HTAB (an int comparison: `in _OWS` costs several times more, on every field)
        if value and value[-1] <= 0x20:
            value = value.rstrip(_OWS)
        n = len(name)
        size = self._hdr_bytes + n + len(value) + 4
        self._hdr_bytes = size
        self._headers.append((name, value))
        if size > self._max_hdr:
            self._fail(431, "header_too_large")
        # the field count is checked at headers-complete: the byte limit bounds it meanwhile
        if n in _SPECIAL_LENS and self._state == _HEAD:
            lname = name.lower()
            if lname == b"host":
                self._host = value
                self._host_n += 1
            elif lname == b"content-length":
                # llhttp already refuses signs, lists, empties and duplicates; the local
                # check keeps the parsed value and the forwarded text identical.
                if self._cl is not None or not value.isdigit():
                    self._fail(400, "bad_request: invalid Content-Length")
                self._cl = int(value)
            elif lname == b"transfer-encoding":
                self._on_te(value)
            elif lname == b"expect":
                self._expect = value.lower() == b"100-continue"

    def _on_te(self, value: bytes) -> None:
        """RFC 9112 section 6.1: TE in a 1.0 request means faulty framing; we implement
        exactly one coding, ``chunked``, sent once."""
        if self._p.get_http_version() == "1.0":
            self._fail(400, "te_on_http10")
        if self._chunked:
            self._fail(400, "duplicate_transfer_encoding")
        if value.lower() != b"chunked":
            err = _te_error(value)
            self._fail(err.status, err.error_info)
        self._chunked = True

    def on_headers_complete(self) -> None:
        p = self._p
        version = self._version or _VERSIONS.get(p.get_http_version())
        if version is None:  # HTTP/0.9 request lines and HTTP/2.0 reach us from llhttp
            self._fail(400, "bad_request: unsupported HTTP version")
        target = self._url
        if not target:
            self._fail(400, "bad_request: empty request-target")
        if len(self._headers) > self._max_headers:
            self._fail(431, "too_many_headers")
        host = self._host
        if host is None or self._host_n != 1:
            if self._host_n > 1:
                self._fail(400, "duplicate_host")
            if version == b"1.1":
                self._fail(400, "missing_host")
            host = b""
        elif host not in _GOOD_HOSTS:
            if _HOST_RE.fullmatch(host) is None:
                self._fail(400, "invalid_host")
            if len(_GOOD_HOSTS) < _GOOD_HOSTS_LIMIT:
                _GOOD_HOSTS.add(host)
        if target[0] != 47:  # not origin-form
            host = self._check_target(target, host)
        # A fragment is never part of a request-target (RFC 9112 3.2).  `find`, not `in`:
        # `b"#" in target` first tries the needle as an integer, and that failed attempt
        # raises (and clears) a TypeError inside CPython: ~2,000 instructions a request.
        if target.find(b"#") >= 0:
            self._fail(400, "bad_request: fragment in request-target")
        cl = self._cl
        chunked = self._chunked
        if chunked and cl is not None:  # also refused by llhttp (RFC 9112 section 6.3)
            self._fail(400, "bad_request: Content-Length with Transfer-Encoding")
        if cl is not None and self._max_body and cl > self._max_body:
            self._fail(413, "body_too_large")
        upgrade = p.should_upgrade()
        if upgrade and chunked:
            # httptools makes llhttp skip the body of an upgrade request, so a chunked body
            # could not be delimited; a Content-Length body is handled in _on_upgrade.
            self._fail(400, "bad_request: upgrade with chunked body")
        self._head = head = RequestHead(
            self._method, target, version, self._headers, host,
            p.should_keep_alive(), chunked, cl, self._expect, upgrade,
        )
        self._events.append(head)
        self._state = _BODY
        self._body_n = 0
        self._trl = 0
        # Trailer fields (RFC 9112 section 7.1.2) go to a throw-away list: counted
        # against the same limits by on_header, then discarded (nothing may depend on
        # them; framing fields there are ignored, RFC 9110 section 6.5.1).
        self._headers = []
        self._hdr_bytes = 0

    def _check_target(self, target: bytes, host: bytes) -> bytes:
        """Non-origin forms (RFC 9112 section 3.2): ``*`` only for OPTIONS; absolute-form
        only http(s), without userinfo, and naming the same authority as Host (a proxy
        that routes on Host but forwards the URI is a smuggling/cache-poisoning vector).
        Returns the host to route on."""
        if target == b"*":
            if self._method != b"OPTIONS":
                self._fail(400, "bad_request: asterisk-form target")
            return host
        low = target[:8].lower()
        if low.startswith(b"http://"):
            rest = target[7:]
        elif low.startswith(b"https://"):
            rest = target[8:]
        else:
            self._fail(400, "bad_request: invalid request-target")
        end = len(rest)
        for sep in b"/?#":
            i = rest.find(bytes((sep,)))
            if 0 <= i < end:
                end = i
        authority = rest[:end]
        if not authority or b"@" in authority or _HOST_RE.fullmatch(authority) is None:
            self._fail(400, "bad_request: invalid authority")
        if self._host_n and authority.lower() != host.lower():
            self._fail(400, "host_mismatch")
        return authority

    def on_chunk_header(self) -> None:
        self._trl = 1

    def on_body(self, body: bytes) -> None:
        if self._chunked:
            self._trl = 0
            self._body_n += len(body)
            if self._max_body and self._body_n > self._max_body:
                self._fail(413, "body_too_large")
        self._events.append(body)

    def on_message_complete(self) -> None:
        head = self._head
        if head is None:  # pragma: no cover - llhttp never completes a headless message
            return
        if head.upgrade:
            # llhttp will now raise HttpParserUpgrade; a Content-Length body (skipped by
            # llhttp, see on_headers_complete) is cut out of the trailing bytes there.
            if head.content_length:
                self._up_left = head.content_length
                return
            self._events.append(END)
            self._state = _IDLE
            return
        self._events.append(END)
        self._state = _IDLE
        if not head.keep_alive:
            # The connection ends with this request.  No exception is raised here (one
            # per such request would cost more than the request's parsing): a request
            # after it in the same bytes stops llhttp at its first byte (_AfterClose,
            # caught in feed), and `_halt` ignores every later feed.
            self._closed = self._halt = True

    # ---- upgrade ------------------------------------------------------------------

    def _on_upgrade(self, rest: bytes) -> None:
        self.upgraded = self._halt = True
        self.trailing = b""
        if self._up_left:
            self._feed_upgrade_body(rest, self._events)
        else:
            self.trailing = rest

    def _feed_upgrade_body(self, data: bytes, events: list[RequestEvent]) -> list[RequestEvent]:
        """Deliver the Content-Length body of an upgrade request that llhttp skipped."""
        if not self._up_left:
            raise RuntimeError("parser is upgraded: tunnel `trailing` and further bytes")
        take = data[: self._up_left]
        self._up_left -= len(take)
        if take:
            events.append(take)
        if not self._up_left:
            events.append(END)
            self._state = _IDLE
            self.trailing = data[len(take):]
        return events


#: Parsers a worker keeps for its next connections (see RequestParsers).
PARSERS_KEPT: Final = 256


class RequestParsers:
    """The request parsers of one worker's connections: a connection takes one and gives
    it back when it ends, renewed (RequestParser.renew) for the next.

    A new parser costs more than parsing a small request with it (~12,000 instructions:
    httptools allocates llhttp and looks up and binds each callback method), once per
    connection; new TLS connections made that a sixteenth of gatewayd's own work per
    connection (bench/README.md, "Fourteenth session").  A parser that stopped inside a
    message, on an error or at an upgrade is dropped instead, and at most PARSERS_KEPT
    wait: a burst of connections leaves no more than that behind."""

    __slots__ = ("_kept", "_new")

    def __init__(self, new: Callable[[], RequestParser]) -> None:
        self._new = new  # a parser with the worker's limits, when none is kept
        self._kept: list[RequestParser] = []

    def take(self) -> RequestParser:
        kept = self._kept
        return kept.pop() if kept else self._new()

    def give_back(self, parser: RequestParser) -> None:
        if len(self._kept) < PARSERS_KEPT and parser.renew():
            self._kept.append(parser)
        else:
            parser.close()

    def __len__(self) -> int:
        return len(self._kept)
