"""The text of one access-log record: a JSON object per line, or Apache's "combined"
format.  Formatting only; accesslog.py queues and writes the lines.

A record is a tuple of the values of FIELDS, in that order, each of a fixed type: str,
int, or a time in seconds (float, or None where a timing may be missing).  The JSON line
has the keys in FIELDS order; strings and ints come out byte for byte as
`json.dumps(..., separators=(",", ":"))` writes them, times with six decimals like nginx's
`$request_time` with three (tests/test_accesslog.py checks both against json.dumps).

This module is compiled (gatewayd/native.py), and written for it: the line is one
`str.join` over a tuple of str pieces, which compiles to a single C call; an f-string
with format specs compiles to one `format` method call per value and cost twice the
bytecode's instructions.  What repeats from request to request is rendered once and
looked up after: the fields of a connection's peer and route, of its TLS and of its
client certificate, each as one piece (`_fields`), and the method, Host, HTTP version and
error info (`_quoted`).  The request's URI and User-Agent are quoted every time.  The
time and the request id are the gateway's own ASCII (digits, hex, "-", ":", ".", "T",
"Z") and are not quoted at all.
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
# value → its JSON string.  Emptied when full rather than left full: a client sending
# endless new Host values must not leave the configured names unremembered for good.
_QUOTED: Final[dict[str, str]] = {}
_QUOTED_LIMIT: Final = 4096


def _remember(cache: dict[Any, str], key: Any, text: str) -> str:
    """Keep `text` for `key` in one of this module's bounded caches, and return it."""
    if len(cache) >= _QUOTED_LIMIT:
        cache.clear()
    cache[key] = text
    return text


def _quoted(value: str) -> str:
    """`_quote(value)`, remembered: for values seen again and again."""
    text = _QUOTED.get(value)
    return _remember(_QUOTED, value, _quote(value)) if text is None else text


def _fields(cache: dict[tuple[Any, ...], str], names: tuple[str, ...],
            values: tuple[Any, ...]) -> str:
    """'"name":value,...' for fields whose values come back together request after
    request (a connection's peer and route, its TLS, its client certificate), made once
    per distinct set of values and remembered."""
    text = cache.get(values)
    if text is not None:
        return text
    return _remember(cache, values, ",".join(
        f'"{name}":{value}' if isinstance(value, int) else f'"{name}":{_quote(value)}'
        for name, value in zip(names, values, strict=True)))


_PEER_NAMES: Final = FIELDS[2:10]  # client_ip ... backend
_TLS_NAMES: Final = FIELDS[21:24]  # tls_protocol, tls_cipher, sni
_CERT_NAMES: Final = FIELDS[27:31]  # client_cert_*
_PEER: Final[dict[tuple[Any, ...], str]] = {}
_TLS: Final[dict[tuple[Any, ...], str]] = {}
_CERT: Final[dict[tuple[Any, ...], str]] = {}
# The client-certificate fields of a listener without mutual TLS (all empty), made once.
_NO_CERT: Final = ",".join(f'"{name}":""' for name in _CERT_NAMES)


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


def _seconds(value: float | None) -> str:
    """A time with six decimals, exactly as "%.6f" writes it.

    Most times are under a second, and for them this is two table entries and one
    concatenation, a fifth of what the %-format costs (its format string is parsed on
    every call, then dtoa runs); the rest, and a time whose seventh decimal is too
    close to a half to tell by the float product, take the %-format."""
    if value is None:
        return "null"
    if 0.0 <= value < 1.0:
        scaled = value * 1e6
        micros = int(scaled)
        rest = scaled - micros
        if rest > 0.5 + _ROUNDING_MARGIN:
            micros += 1
        elif rest >= 0.5 - _ROUNDING_MARGIN:
            return "%.6f" % value  # noqa: UP031
        if micros < 1000000:
            return _MILLI_TEXT[micros // 1000] + _THREE_DIGITS[micros % 1000]
    # a %-format, not a format spec: compiled, "{:.6f}" is a method call (see above)
    return "%.6f" % value  # noqa: UP031


def _quoted_or_empty(value: str) -> str:
    """`_quote(value)`, for a field that is mostly empty (no redirect, no User-Agent)."""
    return _quote(value) if value else '""'


def json_line(values: tuple[Any, ...]) -> str:
    """The JSON access-log line of one record, newline included."""
    (stamp, request_id, client_ip, client_port, listener, rule, path_rule, backend_pool,
     backend_settings, backend, method, uri, host, http_version, status, backend_status,
     bytes_received, bytes_sent, duration, connect, first_byte, tls_protocol,
     tls_cipher, sni, user_agent, error_info, redirect_location, cert_verify, cert_subject,
     cert_issuer, cert_fingerprint) = values
    q = _quote
    return "".join((
        '{"time":"', stamp, '","request_id":"', request_id, '",',
        _fields(_PEER, _PEER_NAMES, (client_ip, client_port, listener, rule, path_rule,
                                     backend_pool, backend_settings, backend)),
        ',"method":', _quoted(method), ',"uri":', q(uri), ',"host":', _quoted(host),
        ',"http_version":', _quoted(http_version), ',"status":', int_text(status),
        ',"backend_status":', int_text(backend_status),
        ',"bytes_received":', int_text(bytes_received), ',"bytes_sent":', int_text(bytes_sent),
        ',"duration":', _seconds(duration), ',"backend_connect_time":', _seconds(connect),
        ',"backend_first_byte_time":', _seconds(first_byte), ",",
        _fields(_TLS, _TLS_NAMES, (tls_protocol, tls_cipher, sni)),
        ',"user_agent":', _quoted_or_empty(user_agent), ',"error_info":',
        _quoted(error_info), ',"redirect_location":', _quoted_or_empty(redirect_location),
        ",", _NO_CERT if not (cert_verify or cert_subject or cert_issuer or cert_fingerprint)
        else _fields(_CERT, _CERT_NAMES, (cert_verify, cert_subject, cert_issuer,
                                          cert_fingerprint)), "}\n",
    ))


# Field positions the combined format reads.
_REQUEST_ID: Final = FIELDS.index("request_id")
_CLIENT_IP: Final = FIELDS.index("client_ip")
_METHOD: Final = FIELDS.index("method")
_URI: Final = FIELDS.index("uri")
_HTTP_VERSION: Final = FIELDS.index("http_version")
_STATUS: Final = FIELDS.index("status")
_BYTES_SENT: Final = FIELDS.index("bytes_sent")
_USER_AGENT: Final = FIELDS.index("user_agent")
_ERROR_INFO: Final = FIELDS.index("error_info")


def combined_line(r: tuple[Any, ...], started: float) -> str:
    """Apache's combined format, plus the request id and the error info (or "-")."""
    stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(started))
    return "".join((
        str(r[_CLIENT_IP]), " - - [", stamp, '] "', str(r[_METHOD]), " ", str(r[_URI]),
        " HTTP/", str(r[_HTTP_VERSION]), '" ', str(r[_STATUS]), " ", str(r[_BYTES_SENT]),
        ' "-" "', str(r[_USER_AGENT] or "-"), '" ', str(r[_REQUEST_ID]), " ",
        str(r[_ERROR_INFO] or "-"), "\n",
    ))
