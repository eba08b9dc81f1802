"""A byte-exact HTTP/1.x client over TLS for hostile-input tests.

:class:`RawClient` sends exactly the bytes it is given and parses what comes back with its
own small, strict response parser (status line, fields, Content-Length / chunked / HEAD /
1xx / 204 / 304 / close-delimited framing), so a test can count responses on the wire and
notice a desynchronised stream (a response that does not start where the previous one
ended).  Every read has a deadline; nothing here sleeps.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

from tests.support.procs import StrPath, client_context

__all__ = ["Closed", "RawClient", "Response", "parse_responses"]


class Closed(Exception):
    """The peer closed the connection (EOF, TLS close, reset) before a full response."""

    def __init__(self, partial: bytes) -> None:
        super().__init__(f"connection closed; {len(partial)} unparsed byte(s): {partial[:200]!r}")
        self.partial = partial


class Desync(AssertionError):
    """Bytes that cannot be the start of an HTTP response where one was expected."""


@dataclass
class Response:
    status: int
    reason: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    raw_head: bytes = b""
    complete: bool = True  # False: close-delimited body / truncated
    interims: list[Response] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def json(self) -> Any:
        return json.loads(self.body.decode())


class _NeedMore(Exception):
    pass


def _parse_one(buf: bytes, head_request: bool, eof: bool) -> tuple[Response, int]:
    """Parse one response at the start of ``buf``; returns it and the bytes consumed.
    Raises _NeedMore when incomplete (and not ``eof``), Desync when not HTTP."""
    if buf and not buf.startswith(b"HTTP/"[: len(buf)]):
        raise Desync(f"stream does not start with a status line: {buf[:200]!r}")
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        raise _NeedMore
    raw_head = buf[: end + 4]
    lines = raw_head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise Desync(f"bad status line {lines[0]!r}")
    status = int(parts[1])
    reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if b":" not in line or line[:1] in (b" ", b"\t"):
            raise Desync(f"bad header line {line!r}")
        name, value = line.split(b":", 1)
        headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    resp = Response(status, reason, parts[0].decode(), headers, raw_head=raw_head)
    pos = end + 4
    te = ",".join(v for k, v in headers if k.lower() == "transfer-encoding").lower()
    cls = [v for k, v in headers if k.lower() == "content-length"]
    if head_request or 100 <= status < 200 or status in (204, 304):
        return resp, pos
    if te:
        if te.strip() != "chunked":
            raise Desync(f"unsupported Transfer-Encoding {te!r}")
        body = bytearray()
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                raise _NeedMore
            size_text = buf[pos:eol].split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise Desync(f"bad chunk size line {buf[pos:eol]!r}") from None
            pos = eol + 2
            if size == 0:
                while True:  # trailers
                    eol = buf.find(b"\r\n", pos)
                    if eol < 0:
                        raise _NeedMore
                    line = buf[pos:eol]
                    pos = eol + 2
                    if not line:
                        resp.body = bytes(body)
                        return resp, pos
            if len(buf) < pos + size + 2:
                raise _NeedMore
            if buf[pos + size : pos + size + 2] != b"\r\n":
                raise Desync("chunk data not followed by CRLF")
            body += buf[pos : pos + size]
            pos += size + 2
    if cls:
        if len(cls) != 1 or not cls[0].isdigit():
            raise Desync(f"client got ambiguous Content-Length {cls!r}")
        n = int(cls[0])
        if len(buf) < pos + n:
            raise _NeedMore
        resp.body = buf[pos : pos + n]
        return resp, pos + n
    if not eof:
        raise _NeedMore
    resp.body = buf[pos:]
    resp.complete = False
    return resp, len(buf)


def parse_responses(data: bytes, head_flags: list[bool] | None = None) -> list[Response]:
    """All complete responses in ``data`` (which ended with EOF); 1xx counted separately.
    Raises Desync on garbage, and on a trailing partial response."""
    out: list[Response] = []
    pos = 0
    i = 0
    while pos < len(data):
        head = bool(head_flags and i < len(head_flags) and head_flags[i])
        try:
            resp, used = _parse_one(data[pos:], head, eof=True)
        except _NeedMore:
            raise Desync(f"truncated response at end of stream: {data[pos:pos + 200]!r}") from None
        pos += used
        out.append(resp)
        if not 100 <= resp.status < 200:
            i += 1
    return out


class RawClient:
    """One TLS connection to the gateway; bytes out exactly as given."""

    def __init__(self, port: int, cafile: StrPath | None, *, sni: str | None = "localhost",
                 host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        ctx = client_context(cafile, check_hostname=False)
        raw = socket.create_connection((host, port), timeout=timeout)
        try:
            self.sock: ssl.SSLSocket = ctx.wrap_socket(raw, server_hostname=sni)
        except BaseException:
            raw.close()
            raise
        self.timeout = timeout
        self.buf = b""
        self.eof = False

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        """Read once more; False on EOF.  AssertionError at the deadline."""
        if self.eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out waiting for the gateway; have {self.buf[:300]!r}")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise AssertionError(
                f"timed out waiting for the gateway; have {self.buf[:300]!r}") from None
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError,
                BrokenPipeError):
            data = b""
        except ssl.SSLError as exc:
            if "EOF" in str(exc) or "closed" in str(exc).lower():
                data = b""
            else:
                raise
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read_response(self, *, head: bool = False, timeout: float | None = None,
                      final: bool = True) -> Response:
        """The next response (with ``final``: skip and collect 1xx interims).  Raises
        :class:`Closed` if the connection ends first."""
        deadline = time.monotonic() + (timeout or self.timeout)
        interims: list[Response] = []
        while True:
            try:
                resp, used = _parse_one(self.buf, head, self.eof)
            except _NeedMore:
                if self.eof:
                    raise Closed(self.buf) from None
                self._fill(deadline)
                continue
            self.buf = self.buf[used:]
            if final and 100 <= resp.status < 200 and resp.status != 101:
                interims.append(resp)
                continue
            resp.interims = interims
            return resp

    def read_until_eof(self, timeout: float = 5.0) -> bytes:
        """Everything until the gateway closes (AssertionError if it does not in time);
        returns (and consumes) the unparsed bytes."""
        deadline = time.monotonic() + timeout
        while self._fill(deadline):
            pass
        rest, self.buf = self.buf, b""
        return rest

    def closed_within(self, timeout: float) -> float:
        """Seconds until EOF (AssertionError after ``timeout``); asserts no bytes came."""
        start = time.monotonic()
        rest = self.read_until_eof(timeout)
        assert rest == b"", f"unexpected bytes before close: {rest[:300]!r}"
        return time.monotonic() - start

    def request(self, data: bytes, *, head: bool = False, timeout: float | None = None
                ) -> Response:
        self.send(data)
        return self.read_response(head=head, timeout=timeout)


def get(path: str, host: str = "localhost", extra: str = "") -> bytes:
    """A plain GET request's bytes."""
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode("latin-1")
