"""A real HTTP(S) backend process for live tests -- stdlib only, independent of gatewayd.

Run from the repository root::

    python -m tests.support.backend --listen 127.0.0.1:0 --cert C --key K --name b1 \\
        [--mode http|raw-record] [--record FILE] [--client-ca CA]

Omit ``--cert``/``--key`` for plain HTTP.  Port 0 means "pick a free port"; once listening
the process prints exactly one line ``READY <port>`` on stdout.  SIGTERM/SIGINT exit 0.

``http`` mode (any method; the request body is always read fully, Content-Length or
chunked).  Every request except ``/stats`` is counted and, with ``--record``, appended as
one JSON line (the echo dict below) *before* the response is sent:

* default: 200 JSON echo ``{"backend", "method", "target", "version", "headers",
  "body_len", "body_sha256", "handshakes", "conn_requests", ...}``.
* ``/big?bytes=N``: N bytes of :func:`pattern_bytes` with Content-Length, 64 KiB writes.
* ``/chunked?n=K&size=S``: chunked response of K chunks of S pattern bytes each.
* ``/slow?delay=S``: sleep S seconds, then echo.
* ``/die-mid?bytes=N``: Content-Length 2N, N bytes, then abrupt shutdown + close.
* ``/status/NNN``: status NNN with a short text body.
* ``/stats``: ``{"handshakes": n, "requests": n}``.
* ``/upload``: the echo.

``raw-record`` mode: accept, complete the TLS handshake, read until the peer closes or 10 s
pass, then append ``{"conn", "handshake_ok", "received": <base64>, ...}`` to ``--record``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import http.server
import json
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

#: Period of the byte pattern served by /big, /chunked and /die-mid.
PATTERN_UNIT = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_"
WRITE_SIZE = 64 * 1024
_BLOCK = PATTERN_UNIT * (WRITE_SIZE // len(PATTERN_UNIT))
#: How long raw-record mode waits for the peer to close.
RAW_READ_LIMIT = 10.0
#: Deadline for a client to complete the TLS handshake / send a request.
IO_TIMEOUT = 30.0
MAX_BODY = 1 << 30


def pattern_bytes(n: int, offset: int = 0) -> bytes:
    """The first *n* bytes of the repeating pattern starting at stream *offset*."""
    start = offset % len(PATTERN_UNIT)
    reps = (start + n) // len(PATTERN_UNIT) + 1
    return (PATTERN_UNIT * reps)[start : start + n]


def _iter_pattern(n: int) -> Iterator[bytes]:
    """Yield *n* pattern bytes in WRITE_SIZE pieces (WRITE_SIZE is a multiple of the period)."""
    while n > 0:
        piece = _BLOCK if n >= WRITE_SIZE else _BLOCK[:n]
        n -= len(piece)
        yield piece


class Counters:
    """Thread-safe process-wide counters and the record file."""

    def __init__(self, record: Path | None) -> None:
        self._lock = threading.Lock()
        self.handshakes = 0
        self.connections = 0
        self.requests = 0
        self._record = open(record, "a", encoding="utf-8") if record else None  # noqa: SIM115

    def next_connection(self) -> int:
        with self._lock:
            self.connections += 1
            return self.connections

    def handshake_done(self) -> int:
        with self._lock:
            self.handshakes += 1
            return self.handshakes

    def request_seen(self) -> int:
        with self._lock:
            self.requests += 1
            return self.requests

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"handshakes": self.handshakes, "requests": self.requests}

    def record(self, entry: dict[str, Any]) -> None:
        if self._record is None:
            return
        line = json.dumps(entry, sort_keys=True) + "\n"
        with self._lock:
            self._record.write(line)
            self._record.flush()


def _tls_details(sock: socket.socket) -> dict[str, Any]:
    if not isinstance(sock, ssl.SSLSocket):
        return {
            "tls": False,
            "sni": None,
            "alpn": None,
            "tls_version": None,
            "client_cert_cn": None,
        }
    cn = None
    peer: Any = sock.getpeercert()
    if peer:
        for rdn in peer.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    cn = value
    return {
        "tls": True,
        "sni": getattr(sock, "gw_sni", None),
        "alpn": sock.selected_alpn_protocol(),
        "tls_version": sock.version(),
        "client_cert_cn": cn,
    }


class _Server(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer doing the TLS handshake in the per-connection thread."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self, address: tuple[str, int], ctx: ssl.SSLContext | None, counters: Counters, name: str
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.ssl_context = ctx
        self.counters = counters
        self.backend_name = name
        handler: Any = _Handler  # takes an extra conn_id keyword, see finish_request
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse-DNS getfqdn(); avoid it.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = self.server_address[1]

    def finish_request(self, request: Any, client_address: Any) -> None:
        conn_id = self.counters.next_connection()
        sock: socket.socket = request
        if self.ssl_context is not None:
            sock.settimeout(IO_TIMEOUT)
            try:
                sock = self.ssl_context.wrap_socket(sock, server_side=True)
            except (OSError, ssl.SSLError) as exc:
                sys.stderr.write(f"conn {conn_id}: TLS handshake failed: {exc}\n")
                return
        self.counters.handshake_done()
        sock.settimeout(IO_TIMEOUT)
        handler: Any = self.RequestHandlerClass
        handler(sock, client_address, self, conn_id=conn_id)

    def shutdown_request(self, request: Any) -> None:
        # The handler may have closed the (wrapped) socket already; closing the raw one
        # again is harmless.
        with contextlib.suppress(OSError):
            request.close()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Handles every method via :meth:`_dispatch`."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def __init__(self, request: Any, client_address: Any, server: _Server, *, conn_id: int) -> None:
        self.conn_id = conn_id
        self.conn_requests = 0
        self.tls = _tls_details(request)
        super().__init__(request, client_address, server)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"[{self.server.backend_name}] conn {self.conn_id}: {format % args}\n")

    # -- request body -----------------------------------------------------------------

    def _read_body(self) -> tuple[bytes, bool]:
        te = ",".join(self.headers.get_all("Transfer-Encoding") or [])
        if "chunked" in te.lower():
            return self._read_chunked(), True
        length = self.headers.get("Content-Length")
        if length is None:
            return b"", False
        n = int(length.strip())
        if n < 0 or n > MAX_BODY:
            raise ValueError(f"bad Content-Length {length!r}")
        data = self.rfile.read(n)
        if len(data) != n:
            raise ConnectionError("request body truncated")
        return data, False

    def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(65537)
            if not line:
                raise ConnectionError("EOF in chunk size line")
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                break
            total += size
            if total > MAX_BODY:
                raise ValueError("chunked body too large")
            chunk = self.rfile.read(size)
            if len(chunk) != size or self.rfile.read(2) != b"\r\n":
                raise ConnectionError("truncated chunk")
            parts.append(chunk)
        while True:  # trailer section
            line = self.rfile.readline(65537)
            if line in (b"\r\n", b"\n", b""):
                break
        return b"".join(parts)

    # -- responses --------------------------------------------------------------------

    def _echo(self, body: bytes, chunked: bool) -> dict[str, Any]:
        words = self.requestline.split()
        return {
            "backend": self.server.backend_name,
            "method": self.command,
            "target": words[1] if len(words) >= 2 else "",
            "version": self.request_version,
            "headers": [[k, str(v)] for k, v in self.headers.raw_items()],
            "body_len": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "body_chunked": chunked,
            "handshakes": self.server.counters.snapshot()["handshakes"],
            "conn_requests": self.conn_requests,
            "conn_id": self.conn_id,
            "client": list(self.client_address[:2]),
            "time": time.time(),
            **self.tls,
        }

    def _send_bytes(
        self, status: int, ctype: str, payload: bytes, extra: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("X-Backend", self.server.backend_name)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and status not in (204, 304):
            self.wfile.write(payload)

    def _send_json(self, status: int, obj: Any) -> None:
        self._send_bytes(status, "application/json", json.dumps(obj).encode() + b"\n")

    def _dispatch(self) -> None:
        self.conn_requests += 1
        try:
            body, chunked = self._read_body()
        except (ValueError, ConnectionError) as exc:
            self.close_connection = True
            self._send_bytes(
                400, "text/plain", f"bad request body: {exc}\n".encode(), {"Connection": "close"}
            )
            return
        parts = urlsplit(self.path)
        path = parts.path
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        if path == "/stats":
            self._send_json(200, self.server.counters.snapshot())
            return
        self.server.counters.request_seen()
        echo = self._echo(body, chunked)
        self.server.counters.record(echo)
        if path == "/big":
            self._big(int(query.get("bytes", "0")))
        elif path == "/chunked":
            self._chunked(int(query.get("n", "4")), int(query.get("size", "1024")))
        elif path == "/slow":
            time.sleep(float(query.get("delay", "1")))
            self._send_json(200, echo)
        elif path == "/die-mid":
            self._die_mid(int(query.get("bytes", "1024")))
        elif path.startswith("/status/"):
            self._status(path[len("/status/") :])
        else:
            self._send_json(200, echo)

    def _big(self, n: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.send_header("X-Backend", self.server.backend_name)
        self.end_headers()
        if self.command == "HEAD":
            return
        for piece in _iter_pattern(n):
            self.wfile.write(piece)

    def _chunked(self, count: int, size: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Backend", self.server.backend_name)
        self.end_headers()
        if self.command == "HEAD":
            return
        for i in range(count):
            data = pattern_bytes(size, offset=i * size)
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    def _die_mid(self, n: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(2 * n))
        self.send_header("X-Backend", self.server.backend_name)
        self.end_headers()
        for piece in _iter_pattern(n):
            self.wfile.write(piece)
        self.wfile.flush()
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
        self.connection.close()

    def _status(self, code_text: str) -> None:
        try:
            code = int(code_text)
        except ValueError:
            code = 0
        if not 200 <= code <= 999:
            self._send_bytes(400, "text/plain", b"bad status\n")
            return
        self._send_bytes(code, "text/plain", f"status {code}\n".encode())


# -- raw-record mode ------------------------------------------------------------------


def _raw_connection(
    sock: socket.socket, conn_id: int, ctx: ssl.SSLContext | None, counters: Counters
) -> None:
    entry: dict[str, Any] = {
        "conn": conn_id,
        "handshake_ok": False,
        "received": "",
        "error": None,
        "peer_closed": False,
    }
    received = bytearray()
    deadline = time.monotonic() + RAW_READ_LIMIT
    try:
        if ctx is not None:
            sock.settimeout(RAW_READ_LIMIT)
            try:
                sock = ctx.wrap_socket(sock, server_side=True)
            except (OSError, ssl.SSLError) as exc:
                entry["error"] = f"handshake: {exc}"
                return
        counters.handshake_done()
        entry["handshake_ok"] = True
        entry.update(_tls_details(sock))
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            except (OSError, ssl.SSLError) as exc:
                entry["error"] = f"recv: {exc}"
                entry["peer_closed"] = True
                break
            if not data:
                entry["peer_closed"] = True
                break
            received += data
    finally:
        entry["received"] = base64.b64encode(bytes(received)).decode("ascii")
        counters.record(entry)
        with contextlib.suppress(OSError):
            sock.close()


def _serve_raw(
    listener: socket.socket, ctx: ssl.SSLContext | None, counters: Counters, stop: threading.Event
) -> None:
    listener.settimeout(0.2)  # lets the loop notice `stop`
    while not stop.is_set():
        try:
            sock, _addr = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            if stop.is_set():
                return
            raise
        sock.settimeout(None)
        conn_id = counters.next_connection()
        threading.Thread(
            target=_raw_connection, args=(sock, conn_id, ctx, counters), daemon=True
        ).start()


# -- main -----------------------------------------------------------------------------


def _parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"--listen wants HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _make_context(
    cert: str | None, key: str | None, client_ca: str | None
) -> ssl.SSLContext | None:
    if not cert and not key:
        return None
    if not (cert and key):
        raise SystemExit("--cert and --key go together")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    if client_ca:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_OPTIONAL

    def _sni(sock: Any, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        with contextlib.suppress(AttributeError):
            sock.gw_sni = server_name

    ctx.sni_callback = _sni
    return ctx


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    ap = argparse.ArgumentParser(
        prog="python -m tests.support.backend",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--listen", type=_parse_listen, default=("127.0.0.1", 0))
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--client-ca", help="request (optional) client certificates")
    ap.add_argument("--name", default="backend")
    ap.add_argument("--mode", choices=["http", "raw-record"], default="http")
    ap.add_argument("--record", type=Path)
    args = ap.parse_args(argv)

    ctx = _make_context(args.cert, args.key, args.client_ca)
    counters = Counters(args.record)
    stop = threading.Event()

    def _on_signal(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    host, port = args.listen
    if args.mode == "http":
        server = _Server((host, port), ctx, counters, args.name)
        bound_port = server.server_address[1]
        worker = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        closer = server.shutdown
        cleanup = server.server_close
    else:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(128)
        bound_port = listener.getsockname()[1]
        worker = threading.Thread(
            target=_serve_raw, args=(listener, ctx, counters, stop), daemon=True
        )
        closer = stop.set
        cleanup = listener.close
    worker.start()
    sys.stdout.write(f"READY {bound_port}\n")
    sys.stdout.flush()
    while not stop.wait(0.5):  # signals are delivered to this (main) thread
        if not worker.is_alive():
            sys.stderr.write("server thread died\n")
            return 1
    closer()
    worker.join(5)
    cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
