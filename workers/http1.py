"""Sans-IO HTTP/1.x message parsing for the data plane (requests from clients, responses
from backends), on top of httptools/llhttp in its default *strict* mode.

Push bytes in with ``feed()``, get events out (h11 style): a head object, then the body as
plain ``bytes`` chunks (already de-chunked), then the :data:`END` singleton. No sockets, no
gevent: the worker owns the I/O and the timeouts.

Why a layer over llhttp at all: llhttp is a *tolerant-by-design* tokenizer that leaves
policy to its user.  A gateway is the first line of defence against request smuggling
(RFC 9112 section 11.2), so everything a backend could interpret differently from us is
refused here, before a head event exists.  What llhttp (strict mode, as shipped in
httptools 0.9) already rejects was verified by tests rather than assumed:

* rejected by llhttp: CR/LF/NUL/CTL in field values, bare LF line endings, whitespace before
  the colon, empty field names, obs-fold lines, non-decimal / signed / list / empty /
  duplicate Content-Length, Content-Length together with Transfer-Encoding (either order),
  ``chunked`` that is not the final coding, a second Transfer-Encoding after ``chunked``,
  bad or overflowing chunk sizes, chunk data not followed by CRLF, HTTP/1.2+ minors.
* added here: HTTP version other than 1.0/1.1 (llhttp accepts HTTP/0.9 request lines and
  ``HTTP/2.0``), Host rules (RFC 9112 section 3.2), Transfer-Encoding other than exactly
  ``chunked`` (``gzip, chunked`` and ``,chunked`` pass llhttp), Transfer-Encoding on HTTP/1.0
  (RFC 9112 section 6.1), request-target form (section 3.2), CONNECT, the size limits of
  CONTRACT section 3, trailing OWS in values (section 5.1), and response-side framing that
  llhttp cannot know about (responses to HEAD, section 6.3 rule 1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NoReturn

import httptools  # type: ignore[import-untyped, unused-ignore]

from gatewayd.forwarding import NOT_PASSED, PASSED, RESPONSE_NAMES, classify_response

__all__ = [
    "END",
    "EndOfMessage",
    "HttpError",
    "RequestHead",
    "RequestParser",
    "ResponseHead",
    "ResponseParser",
]

_HttpParserError = httptools.HttpParserError
_HttpParserUpgrade = httptools.HttpParserUpgrade

_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}
_OWS = b" \t"
# RFC 9110 section 7.2 / RFC 3986 section 3.2.2: uri-host [ ":" port ]
_HOST_RE = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(?::[0-9]*)?")
_NO_BODY_STATUS = frozenset((204, 304))
# lengths of the request fields inspected here: host, expect, content-length, transfer-encoding
_SPECIAL_LENS = frozenset((4, 6, 14, 17))


_REASON_CHARS = bytes([0x09, *range(0x20, 0x7F), *range(0x80, 0x100)])
# Reason phrases already found valid: a backend sends the same few again and again, and a
# set lookup costs a fraction of the character check.  Bounded like forwarding's caches.
_GOOD_REASONS: set[bytes] = set()
_GOOD_REASONS_LIMIT = 256
#: A Content-Length body this long or longer is counted without llhttp: httptools copies
#: every chunk it is fed into a new bytes object for on_body, a second copy of the whole
#: body (after OpenSSL's) that is ~4 % of a 1 MiB response's CPU.  The parser is not
#: reused after such a body (llhttp never saw its end); making a new one costs less than
#: copying 64 KiB.
_UNFED_BODY = 65536
# Host values already found well-formed (the same few arrive on every request).
_GOOD_HOSTS: set[bytes] = set()
_GOOD_HOSTS_LIMIT = 1024

class HttpError(Exception):
    """The peer sent something we refuse; the connection must be closed after answering.

    ``status`` is the status the gateway answers with (CONTRACT section 7: 400, 405, 413,
    414, 431, 501 for requests, 502 for backend responses) and ``error_info`` the short
    cause for the access log.
    """

    def __init__(self, status: int, error_info: str) -> None:
        super().__init__(status, error_info)
        self.status = status
        self.error_info = error_info

    def __str__(self) -> str:
        return f"{self.status} {self.error_info}"


@dataclass(slots=True)
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


@dataclass(slots=True)
class ResponseHead:
    """A status line plus header section from a backend.

    ``until_eof`` means the body is delimited by the connection close (RFC 9112 section 6.3
    rule 8); ``keep_alive`` is False then.  For interim (1xx), 204, 304 and HEAD responses no
    body follows whatever ``chunked``/``content_length`` say (they describe the
    representation, RFC 9110 section 8.6).

    The fields arrive sorted the way a proxy uses them, so the head it sends on is one join
    instead of a second walk over every field: ``passed`` holds the end-to-end fields as
    wire parts, four per field (name, ``b": "``, value, CRLF); ``hop_fields`` the fields that
    describe this connection or this framing (the hop-by-hop fields of RFC 9110 section
    7.6.1 and Content-Length) as (position in ``passed``, name, value); ``connection`` the
    values of the Connection fields among them.  ``headers`` gives them all, in wire order.
    Values never carry surrounding whitespace.
    """

    status: int
    reason: bytes
    version: bytes
    passed: list[bytes]
    hop_fields: list[tuple[int, bytes, bytes]]
    connection: list[bytes]
    keep_alive: bool
    chunked: bool
    content_length: int | None
    until_eof: bool

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """Every field as (name, value), in the order received."""
        passed = self.passed
        out: list[tuple[bytes, bytes]] = []
        at = 0
        for position, name, value in self.hop_fields:
            out += zip(passed[at:position:4], passed[at + 2:position:4], strict=True)
            out.append((name, value))
            at = position
        out += zip(passed[at::4], passed[at + 2::4], strict=True)
        return out


class EndOfMessage:
    """Marks the end of one message; use the singleton :data:`END`."""

    __slots__ = ()
    _instance: EndOfMessage | None = None

    def __new__(cls) -> EndOfMessage:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "END"


END = EndOfMessage()

RequestEvent = RequestHead | bytes | EndOfMessage
ResponseEvent = ResponseHead | bytes | EndOfMessage


class _Stop(Exception):
    """Raised from a callback to make llhttp stop where we decided the stream ends."""


_STOP = _Stop()

# parser states
_IDLE = 0  # between messages (llhttp may be skipping CRLFs)
_HEAD = 1  # request/status line or header section in progress
_BODY = 2  # after the head, before END


def _te_error(value: bytes) -> HttpError:
    """Classify a Transfer-Encoding we do not accept (RFC 9112 sections 6.1 and 6.3).

    chunked as the final coding with others before it is well-framed but uses a coding we
    do not implement (501); anything else leaves the length undeterminable (400).
    """
    last = value.rsplit(b",", 1)[-1].strip(_OWS).lower()
    if last == b"chunked":
        return HttpError(501, "unsupported_transfer_coding")
    return HttpError(400, "bad_transfer_encoding")


# Lengths of the response field names that are not passed on (hop-by-hop, Content-Length):
# a name of another length is passed on without a lookup.
_NOT_PASSED_LENS = frozenset(len(name) for name in NOT_PASSED)


def _has_token(value: bytes, token: bytes) -> bool:
    """True if the comma-separated list ``value`` contains ``token`` (case-insensitive)."""
    return any(t.strip(_OWS).lower() == token for t in value.split(b","))


class RequestParser:
    """Incremental parser for the requests of one client connection.

    ``feed()`` returns events in wire order, pipelined requests included (RFC 9112 section
    9.3.2): ``RequestHead``, body ``bytes``..., ``END``, next ``RequestHead``...  Any
    ``HttpError`` kills the parser: the connection must be answered and closed, because
    after a framing error the position of the next request is unknowable (section 11.2).

    After a request that does not keep the connection alive, further bytes are ignored
    (section 9.6: the server "MUST NOT process any further requests").  After an
    Upgrade/CONNECT stop, ``upgraded`` is set, bytes following the head are in
    ``trailing`` and ``feed()`` refuses more input.
    """

    __slots__ = (
        "_body_n",
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
        "_p",
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
        self._p = httptools.HttpRequestParser(self)

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
        except _HttpParserUpgrade as exc:
            self._on_upgrade(data[exc.args[0]:])
        except _HttpParserError as exc:
            if self._err is None:
                if self._closed:  # our _STOP after a non-persistent request: not an error
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
            self._closed = self._halt = True
            raise _STOP

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


class ResponseParser:
    """Incremental parser for one response (plus interim 1xx responses) from a backend.

    Every violation is ``HttpError(502, "invalid_response: ...")``: a response we cannot
    frame unambiguously must not be relayed (RFC 9112 section 11.2 applies to responses
    too: response splitting / desync of the pooled connection).

    Head boundaries are found here, not by llhttp: the head ends at the first CRLFCRLF
    (strict llhttp accepts no bare LF and no CR inside a head), and only the head bytes are
    handed to llhttp while the final response's framing is unknown.  That is how a HEAD
    response, which llhttp would otherwise read a body for, ends right after its head
    (RFC 9112 section 6.3 rule 1), and how bytes after a 101 are kept in ``trailing``.
    """

    __slots__ = (
        "_began",
        "_between",
        "_chunked",
        "_cl",
        "_conn",
        "_done",
        "_err",
        "_events",
        "_hdr_bytes",
        "_head",
        "_head_len",
        "_hop",
        "_interims",
        "_left",
        "_max_hdr",
        "_max_headers",
        "_method_head",
        "_p",
        "_passed",
        "_raw",
        "_reason",
        "_state",
        "_tail",
        "_unfed",
        "_version",
        "extra",
        "trailing",
    )

    def __init__(
        self, *, request_method: bytes, max_header_bytes: int = 65536, max_headers: int = 200
    ) -> None:
        self._max_hdr = max_header_bytes
        self._max_headers = max_headers
        self._p = httptools.HttpResponseParser(self)
        self._between = True  # llhttp is between messages (see `reusable`)
        self._method_head = request_method == b"HEAD"
        self._events: list[ResponseEvent] = []
        self._err: HttpError | None = None
        self._state = _IDLE
        self._done = False
        self._tail = b""
        self._raw = 0
        self.extra = False
        self.trailing = b""
        self._reason = b""
        self._passed: list[bytes] = []
        self._hop: list[tuple[int, bytes, bytes]] = []
        self._conn: list[bytes] = []
        self._hdr_bytes = 0
        self._head: ResponseHead | None = None
        self._head_len = 0
        self._cl: int | None = None
        self._chunked = False
        self._interims = 0
        self._began = False
        self._left: int | None = None  # bytes still due of a Content-Length body
        self._unfed = False  # ... which llhttp is not fed (see _UNFED_BODY)
        self._version: bytes | None = None  # read off the status line (see _feed_heads)

    def next_response(self, request_method: bytes) -> None:
        """Get a `reusable` parser ready for the connection's next response, to
        `request_method`.  A complete response leaves the rest as a new parser has it:
        no error, no extra bytes, no body left to count, llhttp between messages; the
        head's own state is reset by on_message_begin when the next head starts."""
        self._method_head = request_method == b"HEAD"
        self._done = False
        self._head = None
        self._interims = 0

    @property
    def reusable(self) -> bool:
        """The response is complete and llhttp ended its message at the same byte, so
        this parser (and its llhttp state) can read the connection's next response:
        making one costs more than a small response's whole head.  Not after an error,
        bytes past the end, a 101, or a HEAD response (llhttp would still expect its
        body)."""
        head = self._head
        return (self._done and self._between and self._err is None and not self.extra
                and head is not None and head.status != 101)

    @property
    def counting(self) -> bool:
        """A Content-Length body is being counted: `feed` hands each chunk back as the very
        object it was given (so a caller may feed views of a buffer it reuses)."""
        return self._left is not None

    def feed(self, data: bytes) -> list[ResponseEvent]:
        """Parse ``data``; returns the completed events, raises ``HttpError(502, ...)``."""
        if self._err is not None:
            raise self._err
        if self._done:
            if data:
                self.extra = True
            return []
        events: list[ResponseEvent] = []
        self._events = events
        try:
            if self._left is not None:
                self._count_body(data)
            elif self._state == _BODY:
                self._p.feed_data(data)
            else:
                self._feed_heads(data)
        except _HttpParserUpgrade:
            pass  # 101 with Upgrade headers: handled at headers-complete
        except _HttpParserError as exc:
            if self._err is None:
                if self._done:  # bytes after the final response confused llhttp
                    self.extra = True
                    return events
                self._err = HttpError(502, "invalid_response: " + str(exc))
            raise self._err from None
        return events

    def feed_eof(self) -> list[ResponseEvent]:
        """The backend closed: END for a close-delimited body, else 502 if incomplete."""
        if self._err is not None:
            raise self._err
        if self._done:
            return []
        head = self._head
        if self._state == _BODY and head is not None and head.until_eof:
            self._done = True
            self._state = _IDLE
            return [END]
        if self._state == _IDLE and not self._began and not self._interims:
            self._err = HttpError(502, "invalid_response: empty")
        else:
            self._err = HttpError(502, "invalid_response: truncated")
        raise self._err

    # ---- head framing -------------------------------------------------------------

    def _feed_heads(self, data: bytes) -> None:
        """Hand llhttp exactly the head bytes of each message until the final response's
        head is complete; then the body (if any) goes straight to llhttp."""
        p = self._p
        while data:
            if not self._began:
                # llhttp skips empty lines before a status line; so must the boundary search
                stripped = data.lstrip(b"\r\n")
                if not stripped:
                    p.feed_data(data)
                    return
                start = len(data) - len(stripped)
                buf = stripped
                tail = b""
                # the version off the status line: llhttp's get_http_version() formats a
                # new string on every call; anything but "HTTP/1.1 " here asks llhttp
                self._version = b"1.1" if stripped.startswith(b"HTTP/1.1 ") else None
            else:
                start = 0
                tail = self._tail
                buf = tail + data if tail else data
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                p.feed_data(data)
                if self._err is None:
                    self._raw += len(data) - start
                    self._tail = buf[-3:]
                    if self._raw > self._max_hdr + 8192:
                        self._fail("header_too_large")
                return
            end = start + i + 4 - len(tail)
            self._head_len = self._raw + end - start  # checked in on_headers_complete
            self._tail = b""
            self._raw = 0
            try:
                p.feed_data(data[:end])  # fires on_headers_complete for this head
            except (_HttpParserUpgrade, _HttpParserError):
                # llhttp pauses after a 101 (with or without Upgrade fields): fine once
                # the head is accepted; anything else is a real error.
                if not self._done or self._err is not None:
                    raise
            rest = data[end:]
            if self._state == _BODY:  # final response with a body
                if rest:
                    if self._left is not None:
                        self._count_body(rest)
                    else:
                        p.feed_data(rest)  # chunked or close-delimited: llhttp frames it
                return
            if self._done:  # final response without a body (HEAD, 204, 304, 101)
                if rest:
                    self.extra = True
                    if self._head is not None and self._head.status == 101:
                        self.trailing = rest
                return
            data = rest  # after an interim response: the next head follows

    def _count_body(self, data: bytes) -> None:
        """A Content-Length body is passed on as it came: each chunk is the very object
        fed (a caller's view, not a copy), and whatever follows the last byte is `extra`
        (the connection is not reused then).  A short body is fed to llhttp too (on_body
        ignores it) so that its message ends where the body does: on_message_complete adds
        END and the parser stays `reusable`.  A long one (_UNFED_BODY) is only counted;
        its last byte adds END here, and the parser is not reused."""
        left = self._left
        assert left is not None
        size = len(data)
        if size > left:
            self.extra = True
            data = data[:left]
            size = left
        self._events.append(data)
        if self._unfed:
            left -= size
            if left:
                self._left = left
            else:
                self._left = None
                self._events.append(END)
                self._state = _IDLE
                self._done = True
            return
        self._p.feed_data(data)
        self._left = left - size or None

    def _fail(self, info: str) -> NoReturn:
        err = HttpError(502, "invalid_response: " + info)
        self._err = err
        raise err

    # ---- llhttp callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._done:  # bytes after the final response's END
            self.extra = True
            raise _STOP
        self._between = False
        self._began = True
        self._state = _HEAD
        self._reason = b""
        self._passed = []
        self._hop = []
        self._conn = []
        self._hdr_bytes = 0
        self._cl = None
        self._chunked = False

    def on_status(self, reason: bytes) -> None:
        self._reason += reason
        if len(self._reason) > 8192:
            self._fail("status_line_too_long")
        if reason not in _GOOD_REASONS:
            if reason.translate(None, _REASON_CHARS):
                self._fail("bad reason phrase")  # only HTAB, SP, VCHAR, obs-text (RFC 9112 §4)
            if len(_GOOD_REASONS) < _GOOD_REASONS_LIMIT:
                _GOOD_REASONS.add(reason)

    def on_header(self, name: bytes, value: bytes) -> None:
        # The head's size and field count are checked once it is complete (_feed_heads,
        # on_headers_complete): this runs for every field of every response, and most
        # end-to-end fields cost one length test and one list extend (see ResponseHead).
        if self._state != _HEAD:  # trailers: bounded by the same limits, then dropped
            self._hdr_bytes += len(name) + len(value) + 4
            if self._hdr_bytes > self._max_hdr:
                self._fail("header_too_large")
            return
        if value and value[-1] <= 0x20:  # SP or HTAB: see RequestParser.on_header
            value = value.rstrip(_OWS)
        if len(name) in _NOT_PASSED_LENS:
            lower, kind = RESPONSE_NAMES.get(name) or classify_response(name)
            if kind != PASSED:
                self._hop_field(lower, name, value)
                return
        self._passed += (name, b": ", value, b"\r\n")

    def _hop_field(self, lower: bytes, name: bytes, value: bytes) -> None:
        """A field not passed on: kept aside (ResponseHead.hop_fields), and the framing
        and Connection fields checked and remembered."""
        self._hop.append((len(self._passed), name, value))
        if lower == b"content-length":
            if self._cl is not None or not value.isdigit():
                self._fail("invalid Content-Length")
            self._cl = int(value)
        elif lower == b"transfer-encoding":
            # We re-frame bodies and drop hop-by-hop TE, so only ``chunked`` can be
            # relayed faithfully; other codings would reach the client undecoded.
            if self._chunked or value.lower() != b"chunked":
                self._fail("unsupported Transfer-Encoding")
            if self._p.get_http_version() == "1.0":  # RFC 9112 section 6.1
                self._fail("Transfer-Encoding on HTTP/1.0")
            self._chunked = True
        elif lower == b"connection":
            self._conn.append(value)

    def on_headers_complete(self) -> None:
        p = self._p
        version = self._version or _VERSIONS.get(p.get_http_version())
        if version is None:
            self._fail("unsupported HTTP version")
        if len(self._passed) // 4 + len(self._hop) > self._max_headers:
            self._fail("too_many_headers")
        # The field lines' size, as the request side counts it: the head minus the status
        # line ("HTTP/1.1 200 " + reason + CRLF, bounded in on_status) and the blank line.
        if self._head_len - len(self._reason) - 17 > self._max_hdr:
            self._fail("header_too_large")
        status = p.get_status_code()
        chunked = self._chunked
        cl = self._cl
        if chunked and cl is not None:
            self._fail("Content-Length with Transfer-Encoding")
        self._hdr_bytes = 0
        self._began = False
        if 100 <= status < 200 and status != 101:
            # interim response (RFC 9110 section 15.2): head, END, and the final follows
            self._events.append(ResponseHead(
                status, self._reason, version, self._passed, self._hop, self._conn, False,
                False, cl, False))
            self._events.append(END)
            self._interims += 1
            self._state = _IDLE
            return
        no_body = self._method_head or status in _NO_BODY_STATUS or status == 101
        if no_body:
            keep_alive = False if status == 101 else self._persistent(version)
            until_eof = False
        else:
            until_eof = not chunked and cl is None
            keep_alive = False if until_eof else p.should_keep_alive()
        self._head = head = ResponseHead(
            status, self._reason, version, self._passed, self._hop, self._conn, keep_alive,
            chunked, cl, until_eof)
        self._events.append(head)
        if no_body:
            self._events.append(END)
            self._done = True
            self._state = _IDLE
        else:
            self._state = _BODY
            if cl:  # counted by _count_body from here on; llhttp completes a 0 itself
                self._left = cl
                self._unfed = cl >= _UNFED_BODY

    def _persistent(self, version: bytes) -> bool:
        """RFC 9112 section 9.3, computed here for bodiless responses llhttp misjudges
        (it expects a close-delimited body after a HEAD response without length)."""
        if version == b"1.1":
            return not any(_has_token(v, b"close") for v in self._conn)
        return any(_has_token(v, b"keep-alive") for v in self._conn)

    def on_body(self, body: bytes) -> None:
        if self._left is None:  # a counted Content-Length body is relayed by _count_body
            self._events.append(body)

    def on_message_complete(self) -> None:
        self._between = True
        if self._state != _BODY:
            return  # interim/bodiless: END already emitted at headers-complete
        self._events.append(END)
        self._state = _IDLE
        self._done = True
