"""The text of one access-log record: a JSON object per line, or Apache's "combined"
format.  Formatting only; accesslog.py queues and writes the lines.

A record is a tuple of the values of FIELDS, in that order, each of a fixed type: the
time is the request's start in seconds since the epoch (float), written as ISO 8601 with
milliseconds; the rest are str, int, or a time in seconds (float, or None where a timing
may be missing).  The JSON line has the keys in FIELDS order; strings and ints come out
byte for byte as `json.dumps(..., separators=(",", ":"))` writes them, times with six
decimals like nginx's `$request_time` with three (tests/test_accesslog.py checks both
against json.dumps).

This module is compiled (gatewayd/native.py), and written for it: the line is one
`str.join` over a tuple of str pieces, which compiles to a single C call; an f-string
with format specs compiles to one `format` method call per value and cost twice the
bytecode's instructions.  The join's cost grows with its pieces (~60 instructions each),
so the literal keys travel inside the pieces next to them, and what repeats from request
to request is rendered once and looked up after: the fields of a connection's peer, route
and method, of Host and version, of its TLS and of its client certificate, each as one
piece (`_fields`); numbers below 1000 with the key that follows them (`_Then`); the
time's second, with the line's opening.  Each connection keeps the groups of its last
line (`LineMemo`): its next request mostly repeats them all.  The request's URI is
quoted every time; the request id is the gateway's own hex and is not quoted at all.
"""

from __future__ import annotations

import time
from json.encoder import encode_basestring_ascii  # C-accelerated
from typing import Any, Final

FIELDS: Final = (
    "time", "request_id", "client_ip", "client_port", "listener", "rule", "path_rule",
    "backend_pool", "backend_settings", "backend", "method", "uri", "host", "http_version",
    "status", "backend_status", "bytes_received", "bytes_sent", "duration",
    "backend_connect_time", "backend_first_byte_time", "tls_protocol", "tls_cipher", "sni",
    "user_agent", "error_info", "redirect_location", "client_cert_verify",
    "client_cert_subject", "client_cert_issuer", "client_cert_fingerprint",
)

_quote: Final = encode_basestring_ascii
# The size of each cache of rendered pieces below.  A full cache is emptied rather than
# left full: a client sending endless new Host values must not leave the configured names
# unremembered for good.
_QUOTED_LIMIT: Final = 4096


def _remember(cache: dict[Any, str], key: Any, text: str) -> str:
    """Keep `text` for `key` in one of this module's bounded caches, and return it."""
    if len(cache) >= _QUOTED_LIMIT:
        cache.clear()
    cache[key] = text
    return text


def _fields(cache: dict[tuple[Any, ...], str], names: tuple[str, ...],
            values: tuple[Any, ...], before: str, after: str) -> str:
    """`before` + '"name":value,...' + `after`, for fields whose values come back
    together request after request (a connection's peer, its route and method; Host and
    version; its TLS; its client certificate), made once per distinct set of values and
    remembered.  The literal text around a group is part of its piece: one piece of the
    line's join instead of three."""
    text = cache.get(values)
    if text is not None:
        return text
    return _remember(cache, values, before + ",".join(
        f'"{name}":{value}' if isinstance(value, int) else f'"{name}":{_quote(value)}'
        for name, value in zip(names, values, strict=True)) + after)


_PEER_NAMES: Final = FIELDS[2:11]  # client_ip ... backend, method
_HOST_NAMES: Final = FIELDS[12:14]  # host, http_version
_TLS_NAMES: Final = FIELDS[21:24]  # tls_protocol, tls_cipher, sni
_CERT_NAMES: Final = FIELDS[27:31]  # client_cert_*
_PEER: Final[dict[tuple[Any, ...], str]] = {}
_HOST: Final[dict[tuple[Any, ...], str]] = {}
_TLS: Final[dict[tuple[Any, ...], str]] = {}
_CERT: Final[dict[tuple[Any, ...], str]] = {}
_ERROR: Final[dict[str, str]] = {}  # error_info → its piece (mostly "")
# The client-certificate fields of a listener without mutual TLS (all empty), made once.
_NO_CERT: Final = "," + ",".join(f'"{name}":""' for name in _CERT_NAMES) + "}\n"


# Texts looked up instead of made: an int-to-str costs a few hundred instructions, a
# tuple index a few.  Status codes and a small body's byte counts are below 1000, and a
# sub-second time is two table entries: "0.ddd" (its milliseconds) and "ddd".
_INT_TEXT: Final = tuple(str(n) for n in range(1000))  # also the metrics' status labels
_MILLI_TEXT: Final = tuple("0.%03d" % n for n in range(1000))  # noqa: UP031
_THREE_DIGITS: Final = tuple("%03d" % n for n in range(1000))  # noqa: UP031
# How far from a half a scaled time must be for its rounding to be beyond doubt: the
# product below is within an ulp (< 2e-10 under 1e6) of the exact one.
_ROUNDING_MARGIN: Final = 1e-9


def int_text(value: int) -> str:
    """str(value), from a table below 1000."""
    return _INT_TEXT[value] if 0 <= value < 1000 else str(value)


class _Then:
    """The texts of 0 to 999, each followed by the same literal (the next field's key):
    made on first use, then looked up, so that a number and the key after it are one
    piece of the line."""

    __slots__ = ("_digits", "after", "texts")

    def __init__(self, digits: tuple[str, ...], after: str) -> None:
        self.after = after
        self.texts: list[str | None] = [None] * len(digits)
        self._digits = digits

    def text(self, index: int) -> str:
        text = self.texts[index]
        if text is None:
            text = self.texts[index] = self._digits[index] + self.after
        return text



def _int_then(then: _Then, value: int) -> str:
    """str(value) + then.after, looked up below 1000."""
    if 0 <= value < 1000:
        return then.text(value)
    return str(value) + then.after


def _seconds(value: float | None, then: _Then) -> tuple[str, str]:
    """A time with six decimals, exactly as "%.6f" writes it, and the next key: two
    pieces of the line (compiled, a tuple of two is returned without an allocation).

    Most times are under a second, and for them this is two table entries, a fifth of
    what the %-format costs (its format string is parsed on every call, then dtoa runs);
    the rest, and a time whose seventh decimal is too close to a half to tell by the
    float product, take the %-format."""
    if value is None:
        return "null", then.after
    if 0.0 <= value < 1.0:
        scaled = value * 1e6
        micros = int(scaled)
        rest = scaled - micros
        if rest > 0.5 + _ROUNDING_MARGIN:
            micros += 1
        elif rest >= 0.5 - _ROUNDING_MARGIN:
            return "%.6f" % value, then.after  # noqa: UP031
        if micros < 1000000:
            return _MILLI_TEXT[micros // 1000], then.text(micros % 1000)
    # a %-format, not a format spec: compiled, "{:.6f}" is a method call (see above)
    return "%.6f" % value, then.after  # noqa: UP031


_STATUS_THEN: Final = _Then(_INT_TEXT, ',"backend_status":')
_BACKEND_STATUS_THEN: Final = _Then(_INT_TEXT, ',"bytes_received":')
_RECEIVED_THEN: Final = _Then(_INT_TEXT, ',"bytes_sent":')
_SENT_THEN: Final = _Then(_INT_TEXT, ',"duration":')
_DURATION_THEN: Final = _Then(_THREE_DIGITS, ',"backend_connect_time":')
_CONNECT_THEN: Final = _Then(_THREE_DIGITS, ',"backend_first_byte_time":')
_FIRST_BYTE_THEN: Final = _Then(_THREE_DIGITS, ",")


# The whole second last written, with the line's opening ('{"time":"2026-12-01T02:52:48'):
# strftime runs once a second, not per request.
_second: Final[list[Any]] = [-1, ""]
# ".000Z" to ".999Z", each closing the time and opening the request id.
_MILLIS_THEN_ID: Final = tuple(f'.{ms:03d}Z","request_id":"' for ms in range(1000))


def _time(started: float) -> tuple[str, str]:
    """The record's time as ISO 8601 with milliseconds, UTC, in two pieces.  The second
    and the milliseconds both come from one integer count of milliseconds (integer
    arithmetic, compiled to C; a float `% 1` is a call)."""
    millis = int(started * 1000.0)
    second = millis // 1000
    if second != _second[0]:
        _second[0] = second
        _second[1] = '{"time":"' + time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return _second[1], _MILLIS_THEN_ID[millis % 1000]


def _quoted_or_empty(value: str) -> str:
    """`_quote(value)`, for a field that is mostly empty (no redirect, no User-Agent)."""
    return _quote(value) if value else '""'


def _error_piece(error_info: str) -> str:
    text = _ERROR.get(error_info)
    if text is None:
        text = _remember(_ERROR, error_info, ',"error_info":' + _quote(error_info)
                         + ',"redirect_location":')
    return text


def _tail_piece(tail: tuple[Any, ...]) -> str:
    """The line from "tls_protocol" on: the TLS, User-Agent, error info, redirect and
    client-certificate fields, and the closing brace."""
    (tls_protocol, tls_cipher, sni, user_agent, error_info, redirect_location, cert_verify,
     cert_subject, cert_issuer, cert_fingerprint) = tail
    return "".join((
        _fields(_TLS, _TLS_NAMES, (tls_protocol, tls_cipher, sni), "", ',"user_agent":'),
        _quoted_or_empty(user_agent), _error_piece(error_info),
        _quoted_or_empty(redirect_location),
        _NO_CERT if not (cert_verify or cert_subject or cert_issuer or cert_fingerprint)
        else _fields(_CERT, _CERT_NAMES, (cert_verify, cert_subject, cert_issuer,
                                          cert_fingerprint), ",", "}\n"),
    ))


class LineMemo:
    """The groups of values of the last line one connection logged, and their pieces: a
    one-entry cache per group in front of the shared ones.

    A keep-alive connection's requests mostly share their peer, route and method, their
    Host, and everything from the TLS fields on (User-Agent included).  Comparing a
    group with the last one (a tuple compare, identity first) costs a fraction of
    hashing it for a dict lookup (a tuple's hash is not cached, and a decoded Host or
    User-Agent is a new string each time), and a hit on the last group saves quoting the
    User-Agent and four pieces of the join.  Correct for any sequence of records, from
    any connections: a hit needs every value of the group equal."""

    __slots__ = ("host", "host_piece", "peer", "peer_piece", "tail", "tail_piece")

    def __init__(self) -> None:
        self.peer: tuple[Any, ...] = ()
        self.peer_piece = ""
        self.host: tuple[Any, ...] = ()
        self.host_piece = ""
        self.tail: tuple[Any, ...] = ()
        self.tail_piece = ""


_SHARED_MEMO: Final = LineMemo()  # for lines written without a connection's own


def json_line(values: tuple[Any, ...], memo: LineMemo = _SHARED_MEMO) -> str:
    """The JSON access-log line of one record, newline included: a join of 17 pieces,
    most of them looked up (see the module's docstring).  `memo` is the connection's."""
    (started, request_id, client_ip, client_port, listener, rule, path_rule, backend_pool,
     backend_settings, backend, method, uri, host, http_version, status, backend_status,
     bytes_received, bytes_sent, duration, connect, first_byte, tls_protocol,
     tls_cipher, sni, user_agent, error_info, redirect_location, cert_verify, cert_subject,
     cert_issuer, cert_fingerprint) = values
    peer = (client_ip, client_port, listener, rule, path_rule, backend_pool,
            backend_settings, backend, method)
    if peer != memo.peer:
        memo.peer, memo.peer_piece = peer, _fields(_PEER, _PEER_NAMES, peer, '",', ',"uri":')
    host_group = (host, http_version)
    if host_group != memo.host:
        memo.host = host_group
        memo.host_piece = _fields(_HOST, _HOST_NAMES, host_group, ",", ',"status":')
    tail = (tls_protocol, tls_cipher, sni, user_agent, error_info, redirect_location,
            cert_verify, cert_subject, cert_issuer, cert_fingerprint)
    if tail != memo.tail:
        memo.tail, memo.tail_piece = tail, _tail_piece(tail)
    second, millis = _time(started)
    duration_a, duration_b = _seconds(duration, _DURATION_THEN)
    connect_a, connect_b = _seconds(connect, _CONNECT_THEN)
    first_byte_a, first_byte_b = _seconds(first_byte, _FIRST_BYTE_THEN)
    return "".join((
        second, millis, request_id, memo.peer_piece, _quote(uri), memo.host_piece,
        _int_then(_STATUS_THEN, status), _int_then(_BACKEND_STATUS_THEN, backend_status),
        _int_then(_RECEIVED_THEN, bytes_received), _int_then(_SENT_THEN, bytes_sent),
        duration_a, duration_b, connect_a, connect_b, first_byte_a, first_byte_b,
        memo.tail_piece,
    ))


# Field positions the combined format reads.
_TIME: Final = FIELDS.index("time")
_REQUEST_ID: Final = FIELDS.index("request_id")
_CLIENT_IP: Final = FIELDS.index("client_ip")
_METHOD: Final = FIELDS.index("method")
_URI: Final = FIELDS.index("uri")
_HTTP_VERSION: Final = FIELDS.index("http_version")
_STATUS: Final = FIELDS.index("status")
_BYTES_SENT: Final = FIELDS.index("bytes_sent")
_USER_AGENT: Final = FIELDS.index("user_agent")
_ERROR_INFO: Final = FIELDS.index("error_info")


def combined_line(r: tuple[Any, ...]) -> str:
    """Apache's combined format, plus the request id and the error info (or "-")."""
    stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(r[_TIME]))
    return "".join((
        str(r[_CLIENT_IP]), " - - [", stamp, '] "', str(r[_METHOD]), " ", str(r[_URI]),
        " HTTP/", str(r[_HTTP_VERSION]), '" ', str(r[_STATUS]), " ", str(r[_BYTES_SENT]),
        ' "-" "', str(r[_USER_AGENT] or "-"), '" ', str(r[_REQUEST_ID]), " ",
        str(r[_ERROR_INFO] or "-"), "\n",
    ))
