"""Request and response heads as they cross the gateway (CONTRACT §6, §7).

Bytes in, bytes out, no I/O: the framing layer hands over the parsed head, these
functions return the exact bytes to write.  They run for every request, so each
header name is classified by one dict lookup (names repeat endlessly across
requests) and each head is built with a single `b"".join`.

What is removed and why:
- hop-by-hop fields (RFC 9110 §7.6.1) and every name the `Connection` field lists —
  they describe one connection, not the message;
- `Content-Length` / `Transfer-Encoding` — the gateway re-frames each message itself
  (RFC 9112 §6), the caller passes the new framing line;
- `Host` and `Expect` — the gateway sets Host for the backend and answers
  `100-continue` itself (RFC 9110 §10.1.1);
- incoming `X-Forwarded-Proto/-Port/-Host`, `X-Original-Host`, `X-Request-Id` and
  `X-Client-Cert-*` — only the gateway may assert these, a client copy is a spoof.
`X-Forwarded-For` is the exception: it is a chain, so incoming values are kept and the
client address appended (the de-facto format RFC 7239 §1 describes).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

__all__ = [
    "HOP_BY_HOP",
    "STATUS_REASONS",
    "ForwardContext",
    "client_address",
    "client_response_head",
    "gateway_response",
    "new_request_id",
    "passed_response_head",
    "upstream_request_head",
]

HOP_BY_HOP: Final[frozenset[bytes]] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

# The one table of reason phrases for statuses the gateway makes (RFC 9110 §15).
STATUS_REASONS: Final[dict[int, bytes]] = {
    100: b"Continue",
    101: b"Switching Protocols",
    200: b"OK",
    204: b"No Content",
    301: b"Moved Permanently",
    302: b"Found",
    303: b"See Other",
    307: b"Temporary Redirect",
    308: b"Permanent Redirect",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    421: b"Misdirected Request",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


_ID_BYTES: Final = 16
_ID_BATCH: Final = 256  # ids per getrandom() call
_id_pool: Final[list[bytes]] = []


def new_request_id() -> str:
    """32 lower-case hex characters from the OS CSPRNG: unguessable, so an id seen in
    one log line cannot be forged into another request.  The random bytes are fetched
    for 256 ids at a time (one system call instead of one per request); the pool is
    emptied in a forked child, so no two processes ever hand out the same bytes."""
    if not _id_pool:
        batch = os.urandom(_ID_BYTES * _ID_BATCH)
        _id_pool.extend(batch[i:i + _ID_BYTES] for i in range(0, len(batch), _ID_BYTES))
    return _id_pool.pop().hex()


os.register_at_fork(after_in_child=_id_pool.clear)


@dataclass(slots=True)  # not frozen: a frozen __init__ costs a setattr call per field
class ForwardContext:
    """What the gateway asserts about one request to the backend.

    `client_host` is the client's Host value as received; `upstream_host` the Host
    sent to the backend.  `client_cert_headers` are the mutual-TLS
    `X-Client-Cert-*` fields (§6) the gateway computed, emitted after X-Request-Id.
    """

    client_ip: str
    client_port: int
    scheme: bytes  # b"https" | b"http"
    listener_port: int
    xff_with_port: bool
    request_id: str
    client_host: bytes
    upstream_host: bytes
    client_cert_headers: tuple[tuple[bytes, bytes], ...] = ()
    # client_address() of the fields above, when the caller already has it (a connection
    # makes it once, not once per request)
    client_element: bytes | None = None


# How a header name is treated, per direction.
_KEEP: Final = 0
_DROP: Final = 1
_CONNECTION: Final = 2  # dropped, and its value names more fields to drop
_XFF: Final = 3  # dropped where it stands, re-emitted (joined + appended) at the end

_REQUEST_DROP: Final = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"expect",
    b"x-forwarded-proto",
    b"x-forwarded-port",
    b"x-forwarded-host",
    b"x-original-host",
    b"x-request-id",
}
_RESPONSE_DROP: Final = HOP_BY_HOP | {b"content-length"}
_CLIENT_CERT_PREFIX: Final = b"x-client-cert-"

# Connection tokens that name no field to remove: the standard hop-by-hop fields go
# anyway, and "close" is a connection option, reserved as a field name (RFC 9110 §18.4).
_NOT_LISTED_FIELDS: Final = HOP_BY_HOP | {b"close"}

_CACHE_LIMIT: Final = 2048  # names seen; bounded so a client cannot grow it without limit


def _request_kind(lower: bytes) -> int:
    if lower == b"connection":
        return _CONNECTION
    if lower == b"x-forwarded-for":
        return _XFF
    if lower in _REQUEST_DROP or lower.startswith(_CLIENT_CERT_PREFIX):
        return _DROP
    return _KEEP


def _response_kind(lower: bytes) -> int:
    if lower == b"connection":
        return _CONNECTION
    return _DROP if lower in _RESPONSE_DROP else _KEEP


# (status, reason) → the status line: backends repeat the same few.
_STATUS_LINES: Final[dict[tuple[int, bytes], bytes]] = {}

# name as received → (lower-case name, kind); seeded with the usual spellings.
_REQUEST_NAMES: Final[dict[bytes, tuple[bytes, int]]] = {}
_RESPONSE_NAMES: Final[dict[bytes, tuple[bytes, int]]] = {}


def _classify_request(name: bytes) -> tuple[bytes, int]:
    lower = name.lower()
    entry = (lower, _request_kind(lower))
    if len(_REQUEST_NAMES) < _CACHE_LIMIT:
        _REQUEST_NAMES[name] = entry
    return entry


def classify_response(name: bytes) -> tuple[bytes, int]:
    """(lower-case name, kind) of a response field name, remembered in RESPONSE_NAMES."""
    lower = name.lower()
    entry = (lower, _response_kind(lower))
    if len(_RESPONSE_NAMES) < _CACHE_LIMIT:
        _RESPONSE_NAMES[name] = entry
    return entry


# For the response parser, which sorts fields as it reads them (see passed_response_head):
# the same table, so "passed on" means exactly what client_response_head keeps.
RESPONSE_NAMES: Final = _RESPONSE_NAMES  # name as received → (lower-case name, kind)
PASSED: Final = _KEEP  # the kind of a field passed on to the client
NOT_PASSED: Final[frozenset[bytes]] = _RESPONSE_DROP  # lower-case names that never are


def _seed() -> None:
    common = (
        b"Host Connection Keep-Alive Proxy-Connection TE Trailer Transfer-Encoding Upgrade "
        b"Content-Length Content-Type Expect Accept Accept-Encoding Accept-Language "
        b"Authorization Cookie Set-Cookie User-Agent Referer Origin Cache-Control Pragma "
        b"If-None-Match If-Modified-Since ETag Last-Modified Date Server Location Vary "
        b"X-Forwarded-For X-Forwarded-Proto X-Forwarded-Port X-Forwarded-Host "
        b"X-Original-Host X-Request-Id Content-Encoding Sec-WebSocket-Key "
        b"Sec-WebSocket-Version Sec-WebSocket-Accept Strict-Transport-Security"
    ).split()
    for name in common:
        for spelling in (name, name.lower()):
            _classify_request(spelling)
            classify_response(spelling)


_seed()


# Connection values that list no field beyond the standard hop-by-hop set: what nearly
# every peer sends, answered without splitting.
_PLAIN_CONNECTION: Final = frozenset((b"keep-alive", b"close", b"Keep-Alive", b"Close",
                                      b"upgrade", b"Upgrade"))


def _listed_fields(values: list[bytes]) -> set[bytes]:
    """The field names Connection lists that must go too: beyond the hop-by-hop set."""
    if len(values) == 1 and values[0] in _PLAIN_CONNECTION:
        return set()
    return _connection_tokens(values) - _NOT_LISTED_FIELDS


def _connection_tokens(values: list[bytes]) -> set[bytes]:
    """Field names listed in Connection (RFC 9110 §7.6.1), lower-cased."""
    tokens: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip()
            if token:
                tokens.add(token.lower())
    return tokens


_PORT_TEXT: Final[dict[int, bytes]] = {}


def client_address(client_ip: str, client_port: int, with_port: bool) -> bytes:
    """The X-Forwarded-For element for the client: `ip`, or `ip:port` / `[ip]:port`
    (RFC 3986 §3.2.2 brackets for IPv6) in the Azure-compatible port format."""
    if not with_port:
        return client_ip.encode("ascii")
    if ":" in client_ip:
        return f"[{client_ip}]:{client_port}".encode("ascii")
    return f"{client_ip}:{client_port}".encode("ascii")


def _port_text(port: int) -> bytes:
    text = _PORT_TEXT.get(port)
    if text is None:
        text = _PORT_TEXT[port] = b"%d" % port  # one entry per listener port
    return text


def upstream_request_head(
    method: bytes,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    ctx: ForwardContext,
    framing: bytes | None,
    *,
    upgrade: bytes | None = None,
) -> bytes:
    """The request head to send to the backend (§6).

    The request line, the client's headers in order (original name case) minus the
    fields listed in the module docstring, then `Host`, `X-Forwarded-For` (incoming
    lines joined with ", ", then the client), `X-Forwarded-Proto`, `X-Forwarded-Port`,
    `X-Forwarded-Host`, `X-Original-Host`, `X-Request-Id`, the client-certificate
    fields, the `framing` line if any, and the blank line.

    `upgrade` (e.g. b"websocket") re-adds `Connection: Upgrade` and `Upgrade: <value>`
    for a protocol switch the gateway decided to pass on (RFC 9110 §7.8) — they are
    hop-by-hop, so the client's copies are always removed.
    """
    parts: list[bytes] = [method, b" ", target, b" HTTP/1.1\r\n"]
    append = parts.append
    names = _REQUEST_NAMES
    xff: list[bytes] = []
    connection: list[bytes] | None = None
    for name, value in headers:
        entry = names.get(name)
        if entry is None:
            entry = _classify_request(name)
        kind = entry[1]
        if kind == _KEEP:
            parts += (name, b": ", value, b"\r\n")  # one extend, not four appends
        elif kind == _XFF:
            value = value.strip()
            if value:
                xff.append(value)
        elif kind == _CONNECTION:
            if connection is None:
                connection = []
            connection.append(value)

    if connection is not None:
        listed = _listed_fields(connection)
        if listed:
            if b"x-forwarded-for" in listed:
                xff.clear()
            _drop_listed(parts, 4, names, listed)

    client = ctx.client_element or client_address(ctx.client_ip, ctx.client_port,
                                                   ctx.xff_with_port)
    forwarded_for = b", ".join(xff) + b", " + client if xff else client
    parts += (
        b"Host: ", ctx.upstream_host, b"\r\n",
        b"X-Forwarded-For: ", forwarded_for, b"\r\n",
        b"X-Forwarded-Proto: ", ctx.scheme, b"\r\n",
        b"X-Forwarded-Port: ", _port_text(ctx.listener_port), b"\r\n",
        b"X-Forwarded-Host: ", ctx.client_host, b"\r\n",
        b"X-Original-Host: ", ctx.client_host, b"\r\n",
        b"X-Request-Id: ", ctx.request_id.encode("ascii"), b"\r\n",
    )  # fmt: skip
    for name, value in ctx.client_cert_headers:
        parts += (name, b": ", value, b"\r\n")
    if upgrade is not None:
        parts += (b"Connection: Upgrade\r\nUpgrade: ", upgrade, b"\r\n")
    if framing is not None:
        parts += (framing, b"\r\n")
    append(b"\r\n")
    return b"".join(parts)


def _drop_listed(
    parts: list[bytes], start: int, names: dict[bytes, tuple[bytes, int]], listed: set[bytes]
) -> None:
    """Blank out the kept headers whose names the Connection field listed.

    Kept headers sit in `parts` from `start` on, four parts each (name, ": ", value,
    CRLF).  This runs only when Connection lists a name beyond the standard hop-by-hop
    set, which is rare, so the common path records nothing per header.
    """
    for index in range(start, len(parts), 4):
        name = parts[index]
        entry = names.get(name)
        lower = entry[0] if entry is not None else name.lower()
        if lower in listed:
            parts[index] = parts[index + 1] = parts[index + 2] = parts[index + 3] = b""


def client_response_head(
    status: int,
    reason: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    framing: bytes | None,
    close: bool,
    *,
    upgrade: bytes | None = None,
    announce_keep_alive: bool = False,
) -> bytes:
    """The response head to send to the client (§6): the status line, the backend's
    headers in order minus hop-by-hop fields, names its Connection field lists,
    Content-Length and Transfer-Encoding; then `framing` if any, `Connection: close`
    if `close`, and the blank line.

    `upgrade` re-adds `Connection: Upgrade` / `Upgrade: <value>` on a 101 (RFC 9110
    §7.8); it takes the place of `Connection: close`.  `announce_keep_alive` adds
    `Connection: keep-alive` when not closing: an HTTP/1.0 client only keeps a connection
    it was told is persistent (RFC 9112 §9.3).
    """
    parts: list[bytes] = [_status_line(status, reason)]
    names = _RESPONSE_NAMES
    connection: list[bytes] | None = None
    for name, value in headers:
        entry = names.get(name)
        if entry is None:
            entry = classify_response(name)
        kind = entry[1]
        if kind == _KEEP:
            parts += (name, b": ", value, b"\r\n")  # one extend, not four appends
        elif kind == _CONNECTION:
            if connection is None:
                connection = []
            connection.append(value)
    if connection is not None:
        listed = _listed_fields(connection)
        if listed:
            _drop_listed(parts, 1, names, listed)
    return _end_response_head(parts, framing, close, upgrade, announce_keep_alive)


def passed_response_head(
    status: int,
    reason: bytes,
    passed: list[bytes],
    connection: list[bytes],
    extra: Sequence[tuple[bytes, bytes]],
    framing: bytes | None,
    close: bool,
    *,
    announce_keep_alive: bool = False,
) -> bytes:
    """`client_response_head` for a head whose fields the parser already sorted: `passed`
    are the backend's end-to-end fields as wire parts (name, ": ", value, CRLF each; the
    hop-by-hop fields and Content-Length are not among them), `connection` the values of
    its Connection fields, whose listed names are dropped too.  `extra` are the gateway's
    own fields for the client (affinity cookies), added after the backend's.

    Same bytes as `client_response_head` over all the fields plus `extra`, without a
    second look at each field: the common response needs one join.
    """
    parts: list[bytes] = [_status_line(status, reason)]
    parts += passed
    if connection:
        listed = _listed_fields(connection)
        if listed:
            _drop_listed(parts, 1, _RESPONSE_NAMES, listed)
    for name, value in extra:
        parts += (name, b": ", value, b"\r\n")
    return _end_response_head(parts, framing, close, None, announce_keep_alive)


_CONTENT_LENGTHS: Final[dict[int, bytes]] = {}


def content_length_field(length: int) -> bytes:
    """The `Content-Length: n` line (without its CRLF) for a body of `length` bytes.
    Remembered by length, up to _CACHE_LIMIT of them: a backend serves the same few
    sizes again and again, and a dict lookup by int costs a fraction of the %-format."""
    field = _CONTENT_LENGTHS.get(length)
    if field is None:
        field = b"Content-Length: %d" % length
        if len(_CONTENT_LENGTHS) < _CACHE_LIMIT:
            _CONTENT_LENGTHS[length] = field
    return field


def _status_line(status: int, reason: bytes) -> bytes:
    line = _STATUS_LINES.get((status, reason))
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
        if len(_STATUS_LINES) < _CACHE_LIMIT:
            _STATUS_LINES[(status, reason)] = line
    return line


def _end_response_head(parts: list[bytes], framing: bytes | None, close: bool,
                       upgrade: bytes | None, announce_keep_alive: bool) -> bytes:
    """The framing and Connection lines after the fields, the blank line, one join."""
    if framing is not None:
        parts += (framing, b"\r\n")
    if upgrade is not None:
        parts += (b"Connection: Upgrade\r\nUpgrade: ", upgrade, b"\r\n")
    elif close:
        parts.append(b"Connection: close\r\n")
    elif announce_keep_alive:
        parts.append(b"Connection: keep-alive\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def gateway_response(
    status: int,
    *,
    request_id: str | None = None,
    close: bool = False,
    body: bytes | None = None,
    extra_headers: Sequence[tuple[bytes, bytes]] = (),
    head: bool = False,
) -> bytes:
    """A complete response made by the gateway itself (§7).

    Layout: status line, `Content-Type` (text/plain unless `extra_headers` has one),
    `Content-Length`, `X-Request-Id` when given, `extra_headers`, `Connection: close`
    when `close`, blank line, body.  The default body is `b"<status> <reason>\\n"`.
    `head=True` answers a HEAD request: same headers, no body (RFC 9110 §9.3.2).
    A 1xx or 204 response carries no body and no Content-Length (RFC 9110 §8.6,
    §15.2), just the status line, `extra_headers` and the blank line.

    A status missing from `STATUS_REASONS` is a ValueError: the gateway only makes
    statuses it knows.
    """
    reason = STATUS_REASONS.get(status)
    if reason is None:
        raise ValueError(f"no reason phrase for gateway status {status}")
    parts: list[bytes] = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    if status < 200 or status == 204:
        for name, value in extra_headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    if body is None:
        body = b"%d %s\n" % (status, reason)
    if not any(name.lower() == b"content-type" for name, _ in extra_headers):
        parts.append(b"Content-Type: text/plain; charset=utf-8\r\n")
    parts += (b"Content-Length: %d\r\n" % len(body),)
    if request_id is not None:
        parts += (b"X-Request-Id: ", request_id.encode("ascii"), b"\r\n")
    for name, value in extra_headers:
        parts += (name, b": ", value, b"\r\n")
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    if not head:
        parts.append(body)
    return b"".join(parts)
