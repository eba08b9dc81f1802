"""The floor: the least a gevent + pyOpenSSL + httptools HTTPS forwarder can do per request.

Not part of gatewayd.  It measures what gatewayd's features cost on top of the same I/O
stack: `bench/run.py --only floor-1w,gatewayd-1w,nginx-1w` puts all three in one run.

It does what every such forwarder must and nothing else: TLS on both legs through
gatewayd's own `workers.tlsio` (the backend's chain is verified against the CA, and its
name by service-identity, once per connection), llhttp framing of requests and responses,
and one backend connection per client connection, kept while both persist.  No routing, no
header rewriting (bytes pass through as they came, Host included), no limits, metrics,
logging, health checks, retries or error pages, and it answers nothing itself: anything
unexpected closes the connection.  Do not put it in front of anything.

    python -m bench.floor PORT CERT KEY BACKEND_PORT CA SNI_NAME
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from typing import Any

import httptools
from gatewayd.workers.tlsio import StreamClosed, StreamTimeout, TLSHandshakeFailed, TLSStream
from gevent import socket as gsocket
from gevent.server import StreamServer
from OpenSSL import SSL
from service_identity.pyopenssl import verify_hostname

TIMEOUT = 30.0


class _Framing:
    """httptools protocol object: when a message ended, and whether its connection
    persists (read at headers-complete: after the message, httptools says False)."""

    __slots__ = ("done", "keep_alive", "parser")

    def __init__(self, parser: Callable[[_Framing], Any]) -> None:
        self.done = self.keep_alive = False
        self.parser = parser(self)

    def on_headers_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()

    def on_message_complete(self) -> None:
        self.done = True


def _relay_message(src: TLSStream, parser: Callable[[_Framing], Any],
                   dst: TLSStream, first: bytes = b"") -> bool | None:
    """Pass one HTTP message from src to dst as it arrives; whether its connection
    persists, or None if src closed first."""
    framing = _Framing(parser)
    feed = framing.parser.feed_data
    data = first or src.recv()
    while True:
        if not data:
            return None
        feed(data)
        dst.sendall(data)
        if framing.done:
            return framing.keep_alive
        data = src.recv()


class Floor:
    def __init__(self, backend_port: int, ca: str, sni: str) -> None:
        self.backend = ("127.0.0.1", backend_port)
        self.sni = sni
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.load_verify_locations(ca)
        ctx.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
        self.client_ctx = ctx

    def _upstream(self) -> TLSStream:
        sock = gsocket.create_connection(self.backend)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up = TLSStream.client(sock, self.client_ctx, self.sni)
        up.timeout = TIMEOUT
        up.handshake(TIMEOUT)
        verify_hostname(up.conn, self.sni)
        return up

    def serve(self, sock: socket.socket, context: SSL.Context) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = TLSStream.server(sock, context)
        client.timeout = TIMEOUT
        up: TLSStream | None = None
        try:
            client.handshake(TIMEOUT)
            while True:
                first = client.recv()
                if not first:
                    return
                if up is None:
                    up = self._upstream()
                request_keeps = _relay_message(client, httptools.HttpRequestParser, up, first)
                if request_keeps is None:
                    return
                if not _relay_message(up, httptools.HttpResponseParser, client) or \
                        not request_keeps:
                    return
        except (StreamClosed, StreamTimeout, TLSHandshakeFailed, OSError,
                httptools.HttpParserError, SSL.Error):
            return
        finally:
            client.close()
            if up is not None:
                up.close()


def main(argv: list[str]) -> int:
    port, cert, key, backend_port, ca, sni = argv
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.use_certificate_chain_file(cert)
    context.use_privatekey_file(key)
    floor = Floor(int(backend_port), ca, sni)
    server = StreamServer(("127.0.0.1", int(port)),
                          lambda sock, _addr: floor.serve(sock, context), backlog=4096)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
