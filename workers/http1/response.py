"""The responses on one backend connection: llhttp plus the framing rules a proxy
needs (see __init__)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, NoReturn

import httptools  # type: ignore[import-untyped, unused-ignore]

from gatewayd.forwarding import NOT_PASSED, PASSED, RESPONSE_NAMES, classify_response

from .common import (
    _BODY,
    _HEAD,
    _IDLE,
    _OWS,
    _VERSIONS,
    END,
    Chunk,
    EndOfMessage,
    HttpError,
    LlhttpOwner,
    _has_token,
    _HttpParserError,
    _HttpParserUpgrade,
    _Stop,
)

_NO_BODY_STATUS: Final = frozenset((204, 304))

_REASON_CHARS: Final = bytes([0x09, *range(0x20, 0x7F), *range(0x80, 0x100)])
# Reason phrases already found valid: a backend sends the same few again and again, and a
# set lookup costs a fraction of the character check.  Bounded like forwarding's caches.
_GOOD_REASONS: Final[set[bytes]] = set()
_GOOD_REASONS_LIMIT: Final = 256
#: A Content-Length body this long or longer is counted without llhttp: httptools copies
#: every chunk it is fed into a new bytes object for on_body, a second copy of the whole
#: body (after OpenSSL's) that is ~4 % of a 1 MiB response's CPU.  The parser is not
#: reused after such a body (llhttp never saw its end); making a new one costs less than
#: copying 64 KiB.
_UNFED_BODY: Final = 65536
# Lengths of the response field names that are not passed on (hop-by-hop, Content-Length):
# a name of another length is passed on without a lookup.
_NOT_PASSED_LENS: Final = frozenset(len(name) for name in NOT_PASSED)


@dataclass(slots=True, init=False)  # __init__ below: a generated one runs as bytecode
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
    # The head the proxy made from this one for a client (workers/proxy.py, _client_head),
    # with what it depended on besides this head: (framing line, close, announce
    # keep-alive, the bytes).  A head remembered by its bytes comes back as this very
    # object, and the client's head with it.
    sent: tuple[bytes | None, bool, bool, bytes] | None

    def __init__(self, status: int, reason: bytes, version: bytes, passed: list[bytes],
                 hop_fields: list[tuple[int, bytes, bytes]], connection: list[bytes],
                 keep_alive: bool, chunked: bool, content_length: int | None,
                 until_eof: bool) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.passed = passed
        self.hop_fields = hop_fields
        self.connection = connection
        self.keep_alive = keep_alive
        self.chunked = chunked
        self.content_length = content_length
        self.until_eof = until_eof
        self.sent = None

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


# Final response heads already parsed, by their exact bytes.  A backend sends the same head
# again and again (the same resource: only Date changes, once a second), and parsing one
# with llhttp costs ~20,000 instructions (a Python callback and a sort per field), a dict
# lookup a few hundred: the lookup's hash is the bytes' own, kept in the object.  The same
# bytes parse to the same head, so a head found here is what llhttp would have produced;
# only what depends on the parser (its limits, HEAD) is checked again (_cached_head).  Only
# Content-Length framed heads are kept, so the body is counted without llhttp (which
# never sees the message and stays between messages).  Bounded in count and key size:
# emptied when full (cheaper than dropping the oldest one by one, which leaves a dict's
# iteration to skip the holes), so heads that never repeat (a Set-Cookie per response)
# cost a lookup and an insert each and cannot grow it, and the heads in use come back.
# The heads here are shared: nothing changes a ResponseHead once the parser has made it.
_HEADS: Final[dict[bytes, ResponseHead]] = {}
_HEADS_LIMIT: Final = 256
_HEAD_KEY_MAX: Final = 1024


ResponseEvent = ResponseHead | Chunk | EndOfMessage


class ResponseParser(LlhttpOwner):
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

    def feed(self, data: Chunk) -> list[ResponseEvent]:
        """Parse ``data`` (bytes; while `counting`, any bytes-like object); returns the
        completed events, raises ``HttpError(502, ...)``."""
        err = self._err  # a local: a callback may set _err, which mypy cannot see
        if err is not None:
            raise err
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
        err = self._err
        if err is not None:
            raise err
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
            whole = not self._began  # the head starts in this read, so may be all in it
            if whole:
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
            head_bytes = data[:end]
            # a head that came whole in this read, at its start, maybe parsed before (never
            # taken for a response to HEAD: no body follows it then)
            key = (head_bytes if whole and start == 0 and end <= _HEAD_KEY_MAX
                   and not self._method_head else None)
            if key is not None:
                seen = _HEADS.get(key)
                if seen is not None and self._cached_head(seen, data, end):
                    return
            try:
                p.feed_data(head_bytes)  # fires on_headers_complete for this head
            except (_HttpParserUpgrade, _HttpParserError):
                # llhttp pauses after a 101 (with or without Upgrade fields): fine once
                # the head is accepted; anything else is a real error.
                if not self._done or self._err is not None:
                    raise
            if key is not None:
                self._remember(key)
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

    def _cached_head(self, head: ResponseHead, data: bytes, end: int) -> bool:
        """Take `head`, found in _HEADS for `data[:end]`, as this response's head if this
        parser's limits allow it (else llhttp parses it again, and fails it), and the rest
        of `data` as its body.  The Content-Length body is counted without llhttp, which
        never saw the head and stays between messages: the parser stays `reusable`."""
        if self._over_limit(head.passed, head.hop_fields, end, head.reason):
            return False
        self._head = head
        self._events.append(head)
        length = head.content_length
        if length:
            self._state = _BODY
            self._left = length
            self._unfed = True
            if end < len(data):
                self._count_body(data[end:])
        else:  # Content-Length: 0, so anything after the head is not this response's
            self._events.append(END)
            self._done = True
            if end < len(data):
                self.extra = True
        return True

    def _remember(self, key: bytes) -> None:
        """Keep the final head llhttp just parsed from `key` (not an answer to HEAD: see
        _feed_heads) in _HEADS if its body is framed by Content-Length."""
        head = self._head  # None after an interim head
        if (head is None or head.content_length is None
                or head.status < 200 or head.status in _NO_BODY_STATUS):  # 101, 204, 304
            return
        if len(_HEADS) >= _HEADS_LIMIT:
            _HEADS.clear()  # the heads still in use come back on their next miss
        _HEADS[key] = head

    def _count_body(self, data: Chunk) -> None:
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
            raise _Stop()  # a new one each time: see _Stop
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
        over = self._over_limit(self._passed, self._hop, self._head_len, self._reason)
        if over:
            self._fail(over)
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

    def _over_limit(self, passed: list[bytes], hop: list[tuple[int, bytes, bytes]],
                    head_len: int, reason: bytes) -> str:
        """Which of this parser's head limits a complete head breaks ("" if none): the
        field count, and the field lines' size as the request side counts it, i.e. the
        head minus the status line ("HTTP/1.1 200 " + reason + CRLF, bounded in
        on_status) and the blank line."""
        if len(passed) // 4 + len(hop) > self._max_headers:
            return "too_many_headers"
        if head_len - len(reason) - 17 > self._max_hdr:
            return "header_too_large"
        return ""

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
