"""The handshake floor: the least a gevent + pyOpenSSL HTTPS server does per new connection.

Not part of gatewayd.  `bench/run.py` runs it as `floor-tls` in the new-connection
scenarios only, against `direct` (the bench's nginx serving the same 100-byte `/small`
itself): both are servers, not proxies, so the ratio `floor-tls / direct` says what this
I/O stack costs per handshake against C doing the same work, with nothing of gatewayd's on
top.  gatewayd's own handshake ratio against nginx (a proxy) can be read against it.

Per connection it does what any such server must and nothing else, in the cheapest form
gatewayd itself uses: an accept loop on the hub's io watcher, one greenlet per
connection (no gevent Greenlet or pool bookkeeping), gatewayd's `workers.tlsio` for the
handshake and records, one read of the request head, the response nginx would send, then
a close_notify and a close (one request per connection, as `openssl s_time` asks).  The
TLS context is built like a gatewayd listener's: TLS 1.2 and 1.3, a server-side session
cache and tickets (so resumption works), released buffers.

    python -m bench.floor_tls PORT CERT KEY
"""

from __future__ import annotations

import _socket
import select
import socket
import sys

from gatewayd.workers.tlsio import StreamClosed, StreamTimeout, TLSHandshakeFailed, TLSStream
from gevent.hub import get_hub
from greenlet import greenlet
from OpenSSL import SSL

TIMEOUT = 30.0
BODY = b"x" * 100  # the bench backend's /small (bench/servers.py SMALL_BODY)
# what nginx answers to it (and then, as here, closes: s_time asks for Connection: close)
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: floor\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 100\r\n\r\n" + BODY)


def serve(sock: _socket.socket, context: SSL.Context) -> None:
    stream = TLSStream.server(sock, context)
    stream.timeout = TIMEOUT
    try:
        stream.handshake(TIMEOUT)
        head = stream.recv()
        while head and b"\r\n\r\n" not in head:
            more = stream.recv()
            if not more:
                return
            head += more
        if head:
            stream.sendall(RESPONSE)
    except (StreamClosed, StreamTimeout, TLSHandshakeFailed, OSError, SSL.Error):
        return
    finally:
        stream.close()


def main(argv: list[str]) -> int:
    port, cert, key = argv
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    context.use_certificate_chain_file(cert)
    context.use_privatekey_file(key)
    context.set_session_id(b"floor-tls")
    context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    listen = socket.create_server(("127.0.0.1", int(port)), backlog=4096)
    listen.setblocking(False)
    hub = get_hub()
    ready = hub.loop.io(listen.fileno(), 1)
    queued = select.poll()
    queued.register(listen.fileno(), select.POLLIN)

    def accept_forever() -> None:
        while True:
            try:
                fd, _addr = listen._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                hub.wait(ready)
                continue
            sock = _socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hub.loop.run_callback(greenlet(serve, parent=hub).switch, sock, context)
            if not queued.poll(0):
                hub.wait(ready)

    hub.loop.run_callback(greenlet(accept_forever, parent=hub).switch)
    hub.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
