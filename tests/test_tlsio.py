"""The pyOpenSSL ⇄ gevent adapter (workers/tlsio.py) over real sockets.

Server and client run as two gevent greenlets in the pytest process (gevent is imported,
never monkey-patched: tlsio parks greenlets on its own io watchers).  Every test runs
under a `gevent.Timeout` guard so that a bug fails the test instead of hanging it, and
every timing assertion is a deadline band measured with `time.monotonic`.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import gevent
import pytest
from gatewayd.workers.tlsio import (
    PlainStream,
    StreamClosed,
    StreamTimeout,
    TLSHandshakeFailed,
    TLSStream,
    open_tcp,
    peer_closed,
    return_relay_buffer,
    take_relay_buffer,
)
from OpenSSL import SSL

from gatewayd.model import BackendSettings
from gatewayd.tlsconf import client_context, verify_result
from tests.support.pki import Leaf, TestPKI
from tests.support.procs import free_port

T = TypeVar("T")
U = TypeVar("U")

#: Upper bound for any single test step; a hang becomes a failure after this long.
GUARD = 20.0
#: Handshake timeout used by the tests (small so the timeout tests stay fast).
HANDSHAKE_TIMEOUT = 5.0
BIG = 5 * 1024 * 1024
#: Socket buffer size for the bulk tests: far below BIG, so writers must wait.
SMALL_BUF = 64 * 1024
SNI = "backend.test"


# -- helpers --------------------------------------------------------------------------


@contextmanager
def guard(seconds: float = GUARD) -> Iterator[None]:
    """Fail (AssertionError) instead of hanging if the block takes longer than *seconds*."""
    with gevent.Timeout(seconds, AssertionError(f"test step exceeded its {seconds} s guard")):
        yield


def run_both(server: Callable[[], T], client: Callable[[], U]) -> tuple[T, U]:
    """Run *server* and *client* as concurrent greenlets; return both results.

    The first exception raised by either side is re-raised (after the other side has been
    killed), so a failure on one side never leaves the other parked forever.
    """
    glets = [gevent.spawn(server), gevent.spawn(client)]
    try:
        with guard():
            gevent.joinall(glets, raise_error=True)
        return glets[0].get(), glets[1].get()
    finally:
        gevent.killall(glets, block=True, timeout=2)


def run_both_outcomes(
    server: Callable[[], Any], client: Callable[[], Any]
) -> tuple[Any, Any]:
    """Like run_both, but return each side's result *or* the exception it raised."""

    def outcome(fn: Callable[[], Any]) -> Callable[[], Any]:
        def wrapped() -> Any:
            try:
                return fn()
            except Exception as exc:
                return exc

        return wrapped

    return run_both(outcome(server), outcome(client))


def tcp_pair(bufsize: int | None = None) -> tuple[socket.socket, socket.socket]:
    """A connected (server side, client side) pair of TCP sockets on 127.0.0.1.

    *bufsize* shrinks SO_SNDBUF/SO_RCVBUF so that large transfers must block.
    """
    with socket.create_server(("127.0.0.1", 0)) as listener:
        if bufsize:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if bufsize:
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                client.setsockopt(socket.SOL_SOCKET, opt, bufsize)
        client.settimeout(5)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
        if bufsize:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
    client.settimeout(None)
    server.settimeout(None)
    return server, client


def server_ctx(leaf: Leaf, *, max_proto: int | None = None) -> SSL.Context:
    """A plain pyOpenSSL server context serving *leaf*."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.use_certificate_chain_file(str(leaf.cert_path))
    ctx.use_privatekey_file(str(leaf.key_path))
    ctx.check_privatekey()
    if max_proto is not None:
        ctx.set_max_proto_version(max_proto)
    return ctx


def verifying_client_ctx(pki: TestPKI, *, min_proto: int | None = None) -> SSL.Context:
    """A pyOpenSSL client context that verifies against the test root (aborts on failure)."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.load_verify_locations(str(pki.ca_pem_path))
    ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: bool(ok))
    if min_proto is not None:
        ctx.set_min_proto_version(min_proto)
    return ctx


def handshake_pair(
    sctx: SSL.Context, cctx: SSL.Context, *, sni: str | None = SNI, bufsize: int | None = None
) -> tuple[TLSStream, TLSStream]:
    """Two TLSStreams over a fresh TCP pair, handshaken concurrently."""
    ssock, csock = tcp_pair(bufsize)
    server = TLSStream.server(ssock, sctx)
    client = TLSStream.client(csock, cctx, sni)
    run_both(lambda: server.handshake(HANDSHAKE_TIMEOUT),
             lambda: client.handshake(HANDSHAKE_TIMEOUT))
    return server, client


def recv_exactly(stream: Any, n: int) -> bytes:
    """Read exactly *n* bytes from a stream (AssertionError on a premature EOF)."""
    chunks: list[bytes] = []
    got = 0
    while got < n:
        data = stream.recv()
        assert data, f"EOF after {got} of {n} bytes"
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def recv_until_eof(stream: Any) -> bytes:
    """Read until the stream reports EOF (b"")."""
    chunks: list[bytes] = []
    while data := stream.recv():
        chunks.append(data)
    return b"".join(chunks)


class CountingWaiter:
    """Wraps a stream's io waiter and counts the waits by event (1 read, 2 write)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.counts: dict[int, int] = {1: 0, 2: 0}

    def wait(self, events: int, timeout: float | None) -> None:
        self.counts[events] += 1
        self.inner.wait(events, timeout)

    def close(self) -> None:
        self.inner.close()


def count_waits(stream: Any) -> CountingWaiter:
    """Instrument *stream* (white box: replaces its private `_waiter`)."""
    counter = CountingWaiter(stream._waiter)
    stream._waiter = counter
    return counter


def exchange_both_ways(a: Any, b: Any, size: int) -> None:
    """Send *size* distinct bytes a→b and b→a at the same time and check both arrive.

    Each side has a writer greenlet and a reader greenlet, so neither writer can finish
    before the peer reads: the socket buffers fill, OpenSSL answers WantWrite, and only
    correct waits let both directions make progress.
    """
    a_to_b = os.urandom(size)
    b_to_a = os.urandom(size)
    glets = [
        gevent.spawn(a.sendall, a_to_b),
        gevent.spawn(b.sendall, b_to_a),
        gevent.spawn(recv_exactly, b, size),
        gevent.spawn(recv_exactly, a, size),
    ]
    try:
        with guard():
            gevent.joinall(glets, raise_error=True)
        got_b, got_a = glets[2].get(), glets[3].get()
    finally:
        gevent.killall(glets, block=True, timeout=2)
    assert hashlib.sha256(got_b).digest() == hashlib.sha256(a_to_b).digest()
    assert hashlib.sha256(got_a).digest() == hashlib.sha256(b_to_a).digest()


def reset(sock: socket.socket) -> None:
    """Close *sock* so that the peer receives an RST (SO_LINGER with a zero timeout)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@contextmanager
def elapsed_within(low: float, high: float) -> Iterator[None]:
    """Assert the block takes between *low* and *high* seconds."""
    start = time.monotonic()
    yield
    took = time.monotonic() - start
    assert low <= took < high, f"took {took:.2f} s, expected [{low}, {high})"


@pytest.fixture
def leaf(pki: TestPKI) -> Leaf:
    """A server certificate for SNI, issued by the test root."""
    return pki.issue([SNI, "127.0.0.1"])


# -- TLSStream: handshakes and data ----------------------------------------------------


@pytest.mark.parametrize(
    ("max_proto", "expected"),
    [(None, "TLSv1.3"), (SSL.TLS1_2_VERSION, "TLSv1.2")],
    ids=["tls13", "tls12"],
)
def test_handshake_and_round_trips(
    pki: TestPKI, leaf: Leaf, max_proto: int | None, expected: str
) -> None:
    """Both sides handshake (chain and SNI seen), then request/response round trips."""
    sctx = server_ctx(leaf, max_proto=max_proto)
    seen_sni: list[bytes | None] = []
    sctx.set_tlsext_servername_callback(lambda conn: seen_sni.append(conn.get_servername()))
    server, client = handshake_pair(sctx, verifying_client_ctx(pki))
    try:
        assert server.conn.get_protocol_version_name() == expected
        assert client.conn.get_protocol_version_name() == expected
        assert seen_sni == [SNI.encode()]
        peer = client.conn.get_peer_certificate(as_cryptography=True)
        assert peer is not None and peer.serial_number == leaf.cert.serial_number

        def echo_server() -> int:
            rounds = 0
            while data := server.recv():
                server.sendall(b"echo:" + data)
                rounds += 1
            return rounds

        def client_side() -> list[bytes]:
            replies = []
            for i in range(20):
                msg = f"ping {i}".encode()
                client.sendall(msg)
                replies.append(recv_exactly(client, len(msg) + 5))
            client.close()
            return replies

        rounds, replies = run_both(echo_server, client_side)
        assert replies == [f"echo:ping {i}".encode() for i in range(20)]
        assert rounds == 20
    finally:
        server.close()
        client.close()


@pytest.mark.parametrize("max_proto", [None, SSL.TLS1_2_VERSION], ids=["tls13", "tls12"])
def test_five_mib_both_directions_at_once(
    pki: TestPKI, leaf: Leaf, max_proto: int | None
) -> None:
    """5 MiB each way simultaneously over TLS: WantWrite/WantRead waits do not deadlock."""
    server, client = handshake_pair(server_ctx(leaf, max_proto=max_proto),
                                    verifying_client_ctx(pki), bufsize=SMALL_BUF)
    server.timeout = client.timeout = 10.0
    waits = [count_waits(server), count_waits(client)]
    try:
        exchange_both_ways(server, client, BIG)
        for counter in waits:  # both sides really had to wait to write and to read
            assert counter.counts[2] > 0 and counter.counts[1] > 0, counter.counts
    finally:
        server.close()
        client.close()


def test_large_payload_one_way_then_close(pki: TestPKI, leaf: Leaf) -> None:
    """A 5 MiB upload followed by close_notify arrives complete, then recv gives b""."""
    server, client = handshake_pair(server_ctx(leaf), verifying_client_ctx(pki))
    payload = os.urandom(BIG)

    def download() -> bytes:
        data = recv_until_eof(server)
        server.close()
        return data

    def upload() -> bytes:
        client.sendall(payload)
        client.shutdown()  # close_notify; the socket stays open for reading
        # Drain before closing: closing with unread bytes (e.g. TLS 1.3 session tickets)
        # in the receive buffer makes the kernel send an RST instead of a FIN.
        return recv_until_eof(client)

    try:
        got, tail = run_both(download, upload)
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        assert tail == b""
    finally:
        server.close()
        client.close()


def _drain_into(stream: Any, buf: Any) -> tuple[bytes, int]:
    """Read with recv_into until EOF: (sha256 of everything, number of reads)."""
    digest, reads = hashlib.sha256(), 0
    while True:
        view = stream.recv_into(buf)
        if not len(view):
            return digest.digest(), reads
        assert not isinstance(view, bytes)  # a view of the relay buffer, not a copy
        digest.update(view)
        reads += 1


@pytest.mark.parametrize("kind", ["tls", "plain"])
def test_recv_into_a_relay_buffer(pki: TestPKI, leaf: Leaf, kind: str) -> None:
    """recv_into (what a Content-Length body relay uses) returns views of its own buffer
    that together are the stream, byte for byte, then an empty view at EOF."""
    server: Any
    client: Any
    if kind == "tls":
        server, client = handshake_pair(server_ctx(leaf), verifying_client_ctx(pki))
    else:
        left, right = socket.socketpair()
        server, client = PlainStream(left, timeout=10), PlainStream(right, timeout=10)
    payload = os.urandom(BIG)
    buf = take_relay_buffer()

    def send() -> None:
        server.sendall(payload)
        server.close()

    try:
        _, (digest, reads) = run_both(send, lambda: _drain_into(client, buf))
        assert digest == hashlib.sha256(payload).digest()
        assert reads >= BIG // 65536
        with guard(5):
            assert not len(client.recv_into(buf))  # EOF stays EOF
    finally:
        client.close()
        return_relay_buffer(buf)


def test_tlsconf_client_context_against_a_real_server(pki: TestPKI, leaf: Leaf) -> None:
    """gatewayd's own backend context: handshakes, offers http/1.1, records the verdict."""
    settings = BackendSettings(name="b", protocol="https", port=443,
                               trusted_roots_pem=pki.ca.cert_pem)
    sctx = server_ctx(leaf)
    sctx.set_alpn_select_callback(lambda conn, offered: b"http/1.1")
    server, client = handshake_pair(sctx, client_context(settings))
    try:
        assert verify_result(client.conn) == 0
        assert client.conn.get_alpn_proto_negotiated() == b"http/1.1"
    finally:
        server.close()
        client.close()


def test_tlsconf_client_context_records_untrusted_chain(pki: TestPKI) -> None:
    """VERIFY_NONE + recorded verdict: the handshake succeeds, the verdict is non-zero."""
    rogue = pki.issue([SNI], ca=pki.other_ca())
    settings = BackendSettings(name="b", protocol="https", port=443,
                               trusted_roots_pem=pki.ca.cert_pem)
    server, client = handshake_pair(server_ctx(rogue), client_context(settings))
    try:
        assert verify_result(client.conn) != 0
    finally:
        server.close()
        client.close()


# -- TLSStream: EOF, reset, timeouts ----------------------------------------------------


def test_recv_returns_empty_on_close_notify(pki: TestPKI, leaf: Leaf) -> None:
    """A clean close (close_notify then FIN) reads as b"" after the last data."""
    server, client = handshake_pair(server_ctx(leaf), verifying_client_ctx(pki))
    try:
        def close_after_data() -> None:
            server.sendall(b"last words")
            server.close()

        _, got = run_both(close_after_data, lambda: recv_until_eof(client))
        assert got == b"last words"
        with guard(5):
            assert client.recv() == b""  # and it stays at EOF
    finally:
        client.close()


@pytest.mark.parametrize("ending", ["close_notify", "fin", "none"])
def test_recv_takes_every_arrived_record_then_reports_the_end(
    pki: TestPKI, leaf: Leaf, ending: str
) -> None:
    """A streamed body (full 16 KiB records) that has already arrived comes up in one
    recv() of up to 64 KiB, not one record per call; an end that arrived in the same
    burst is reported only after the data, by the next recv() (b"" for close_notify or
    a bare FIN), and another connection's OpenSSL errors are not disturbed by it."""
    server, client = handshake_pair(server_ctx(leaf), verifying_client_ctx(pki))
    other_server, other_client = handshake_pair(server_ctx(leaf), verifying_client_ctx(pki))
    body = os.urandom(3 * 16384 + 100)
    try:
        server.sendall(body)
        if ending == "close_notify":
            server.close()
        elif ending == "fin":
            server.sock.shutdown(socket.SHUT_RDWR)
        # wait until every record (and the end, if any) is in client's socket buffer
        deadline = time.monotonic() + 5
        while len(client.sock.recv(1 << 20, socket.MSG_PEEK)) < len(body) + 4 * 22:
            assert time.monotonic() < deadline, "the body never arrived"
            time.sleep(0.01)
        # (loopback queues a segment, and a FIN, on the receiver before send()/close()
        # return; if one still came late, the plain path below gives the same answers)
        with guard(5):
            assert client.recv() == body  # four records, one call
            if ending != "none":
                assert client.recv() == b""
                assert client.recv() == b""  # and it stays at EOF
        # the other connection still works (no error left in OpenSSL's shared queue)
        with guard(5):
            other_server.sendall(b"ping")
            assert recv_exactly(other_client, 4) == b"ping"
    finally:
        for stream in (client, other_client, other_server):
            stream.close()
        if ending == "none":
            server.close()


def test_recv_returns_empty_on_bare_tcp_close(pki: TestPKI, leaf: Leaf) -> None:
    """A TCP FIN without close_notify (unexpected EOF) also reads as b"", not an error."""
    server, client = handshake_pair(server_ctx(leaf), verifying_client_ctx(pki))
    try:
        def data_then_fin() -> None:
            server.sendall(b"truncated")
            server.sock.shutdown(socket.SHUT_RDWR)  # FIN, no close_notify

        _, got = run_both(data_then_fin, lambda: recv_until_eof(client))
        assert got == b"truncated"
    finally:
        server.close()
        client.close()


def test_recv_on_reset_peer_is_closed_or_eof(pki: TestPKI, leaf: Leaf) -> None:
    """An RST from the peer gives StreamClosed (or b""), never a hang or another error."""
    server, client = handshake_pair(server_ctx(leaf), verifying_client_ctx(pki))
    try:
        reset(server.sock)
        with guard(5):
            try:
                assert client.recv() == b""
            except StreamClosed as exc:
                assert str(exc)
    finally:
        client.close()


def test_sendall_to_reset_peer_raises_stream_closed(pki: TestPKI, leaf: Leaf) -> None:
    """Writing to a peer that reset the connection ends in StreamClosed, not a hang."""
    server, client = handshake_pair(server_ctx(leaf), verifying_client_ctx(pki))
    client.timeout = 5.0
    try:
        reset(server.sock)
        with guard(10), pytest.raises(StreamClosed):
            for _ in range(100):  # the first write may still be accepted by the kernel
                client.sendall(b"x" * 65536)
    finally:
        client.close()


def test_recv_timeout(pki: TestPKI, leaf: Leaf) -> None:
    """A silent peer: recv raises StreamTimeout after about `timeout` seconds."""
    server, client = handshake_pair(server_ctx(leaf), verifying_client_ctx(pki))
    client.timeout = 0.5
    try:
        with guard(5), elapsed_within(0.4, 2.5), pytest.raises(StreamTimeout):
            client.recv()
        # the stream is still usable after a timeout
        server.sendall(b"late")
        client.timeout = 5.0
        with guard(5):
            assert client.recv() == b"late"
    finally:
        server.close()
        client.close()


def test_each_wait_gets_its_whole_timeout(pki: TestPKI, leaf: Leaf) -> None:
    """A stream keeps one timer for the timeout it waits with; every wait re-arms it from
    the moment it starts (a wait that ended early must not shorten the next one), and a
    timer that fired does not fire again into a later wait."""
    server, client = handshake_pair(server_ctx(leaf), verifying_client_ctx(pki))
    client.timeout = 1.0
    try:
        late = gevent.spawn_later(0.6, server.sendall, b"x")
        with guard(5):
            assert client.recv() == b"x"  # the first wait ended after 0.6 of its 1.0 s
        late.get()
        with guard(5), elapsed_within(0.9, 3.0), pytest.raises(StreamTimeout):
            client.recv()  # a whole 1.0 s again, not the 0.4 s left of the first wait
        server.sendall(b"y")
        with guard(5):
            assert client.recv() == b"y"  # no stray timeout from the fired timer
    finally:
        server.close()
        client.close()


def test_handshake_timeout_when_client_never_speaks(leaf: Leaf) -> None:
    """A client that connects and says nothing: StreamTimeout within ~timeout."""
    ssock, csock = tcp_pair()
    server = TLSStream.server(ssock, server_ctx(leaf))
    try:
        with guard(10), elapsed_within(0.9, 1.0 + 2.0), pytest.raises(StreamTimeout):
            server.handshake(1.0)
    finally:
        server.close()
        csock.close()


def test_handshake_timeout_when_server_never_answers(pki: TestPKI) -> None:
    """A backend that accepts but never answers the ClientHello: StreamTimeout."""
    ssock, csock = tcp_pair()
    client = TLSStream.client(csock, verifying_client_ctx(pki), SNI)
    try:
        with guard(10), elapsed_within(0.9, 1.0 + 2.0), pytest.raises(StreamTimeout):
            client.handshake(1.0)
    finally:
        client.close()
        ssock.close()


def test_handshake_timeout_is_total_not_per_step(leaf: Leaf) -> None:
    """A client trickling one byte at a time cannot extend the handshake deadline."""
    ssock, csock = tcp_pair()
    server = TLSStream.server(ssock, server_ctx(leaf))
    # A TLS record header announcing a long ClientHello, then drip-fed bytes.
    drip = b"\x16\x03\x01\x02\x00" + b"\x01" * 64

    def trickle() -> None:
        for byte in drip:
            csock.send(bytes([byte]))
            gevent.sleep(0.1)

    feeder = gevent.spawn(trickle)
    try:
        with guard(10), elapsed_within(0.9, 1.0 + 2.0), pytest.raises(StreamTimeout):
            server.handshake(1.0)
    finally:
        feeder.kill()
        server.close()
        csock.close()


@pytest.mark.parametrize(
    "garbage",
    [b"GET / HTTP/1.1\r\nHost: backend.test\r\n\r\n", b"\x00" * 64, os.urandom(512)],
    ids=["plain-http", "zeros", "random"],
)
def test_handshake_fails_on_garbage(leaf: Leaf, garbage: bytes) -> None:
    """Non-TLS bytes to a TLS server: TLSHandshakeFailed with a reason, quickly."""
    ssock, csock = tcp_pair()
    server = TLSStream.server(ssock, server_ctx(leaf))
    try:
        csock.sendall(garbage)
        with guard(10), elapsed_within(0, HANDSHAKE_TIMEOUT - 1), \
                pytest.raises(TLSHandshakeFailed) as info:
            server.handshake(HANDSHAKE_TIMEOUT)
        assert isinstance(info.value.reason, str) and info.value.reason
        assert str(info.value) == info.value.reason
    finally:
        server.close()
        csock.close()


def test_handshake_fails_when_client_closes_immediately(leaf: Leaf) -> None:
    """A client that connects and closes: TLSHandshakeFailed (not a timeout)."""
    ssock, csock = tcp_pair()
    server = TLSStream.server(ssock, server_ctx(leaf))
    try:
        csock.close()
        with guard(10), elapsed_within(0, HANDSHAKE_TIMEOUT - 1), \
                pytest.raises(TLSHandshakeFailed) as info:
            server.handshake(HANDSHAKE_TIMEOUT)
        assert info.value.reason
    finally:
        server.close()


def test_handshake_fails_on_protocol_version_mismatch(pki: TestPKI, leaf: Leaf) -> None:
    """Client min TLS 1.3 (gatewayd's backend context) vs server max TLS 1.2: both fail."""
    settings = BackendSettings(name="b", protocol="https", port=443,
                               trusted_roots_pem=pki.ca.cert_pem, min_protocol="TLSv1.3")
    ssock, csock = tcp_pair()
    server = TLSStream.server(ssock, server_ctx(leaf, max_proto=SSL.TLS1_2_VERSION))
    client = TLSStream.client(csock, client_context(settings), SNI)
    try:
        s_out, c_out = run_both_outcomes(lambda: server.handshake(HANDSHAKE_TIMEOUT),
                                         lambda: client.handshake(HANDSHAKE_TIMEOUT))
        assert isinstance(c_out, TLSHandshakeFailed), c_out
        assert c_out.reason
        assert isinstance(s_out, TLSHandshakeFailed), s_out
        assert s_out.reason
    finally:
        server.close()
        client.close()


def test_handshake_fails_on_untrusted_certificate_when_verifying(pki: TestPKI) -> None:
    """A client that aborts on verification errors gets TLSHandshakeFailed with a reason."""
    rogue = pki.issue([SNI], ca=pki.other_ca())
    ssock, csock = tcp_pair()
    server = TLSStream.server(ssock, server_ctx(rogue))
    client = TLSStream.client(csock, verifying_client_ctx(pki), SNI)
    try:
        _, c_out = run_both_outcomes(lambda: server.handshake(HANDSHAKE_TIMEOUT),
                                     lambda: client.handshake(HANDSHAKE_TIMEOUT))
        assert isinstance(c_out, TLSHandshakeFailed), c_out
        assert "certificate" in c_out.reason.lower()
    finally:
        server.close()
        client.close()


# -- open_tcp / peer_closed --------------------------------------------------------------


def test_open_tcp_refused() -> None:
    """Nothing listening: ConnectionRefusedError, fast, and no socket left open."""
    port = free_port()
    with guard(10), elapsed_within(0, 2), pytest.raises(ConnectionRefusedError):
        open_tcp(("127.0.0.1", port), socket.AF_INET, 5.0)


def test_open_tcp_timeout() -> None:
    """A SYN that is never answered (full accept queue): StreamTimeout after ~timeout."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # never accepted: the queue fills, later SYNs are dropped
        for _ in range(4):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
            fillers.append(filler)
        time.sleep(0.2)  # let the fillers' handshakes settle into the queue
        with guard(10), elapsed_within(0.9, 1.0 + 2.0), pytest.raises(StreamTimeout):
            open_tcp(listener.getsockname(), socket.AF_INET, 1.0)
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_open_tcp_success_and_peer_closed() -> None:
    """A live idle connection is not 'closed'; after the peer closes (or writes), it is."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with guard(10):
            sock = open_tcp(listener.getsockname(), socket.AF_INET, 5.0)
        try:
            assert not sock.getblocking()
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            peer, _ = listener.accept()
            assert peer.getpeername() == sock.getsockname()
            assert peer_closed(sock) is False
            with guard(10):  # the connection is usable end to end
                stream = PlainStream(sock, timeout=5)
                peer.sendall(b"hello")
                assert stream.recv() == b"hello"
            assert peer_closed(sock) is False  # consumed: idle again
            peer.close()
            deadline = time.monotonic() + 5
            while not peer_closed(sock):
                assert time.monotonic() < deadline, "peer_closed stayed False after close"
                time.sleep(0.01)
            assert peer_closed(sock) is True  # peeking does not consume the EOF
        finally:
            sock.close()


def test_peer_closed_true_when_peer_wrote_unsolicited_bytes() -> None:
    """Bytes on an idle pooled connection mean it must not be reused."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sock = open_tcp(listener.getsockname(), socket.AF_INET, 5.0)
        peer, _ = listener.accept()
        try:
            peer.sendall(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
            deadline = time.monotonic() + 5
            while not peer_closed(sock):
                assert time.monotonic() < deadline, "peer_closed stayed False"
                time.sleep(0.01)
        finally:
            peer.close()
            sock.close()


def test_peer_closed_true_after_reset() -> None:
    """An RST on an idle connection counts as closed."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sock = open_tcp(listener.getsockname(), socket.AF_INET, 5.0)
        peer, _ = listener.accept()
        try:
            reset(peer)
            deadline = time.monotonic() + 5
            while not peer_closed(sock):
                assert time.monotonic() < deadline, "peer_closed stayed False"
                time.sleep(0.01)
        finally:
            sock.close()


# -- PlainStream ------------------------------------------------------------------------


def plain_pair(bufsize: int | None = None) -> tuple[PlainStream, PlainStream]:
    """Two PlainStreams over a fresh TCP pair."""
    ssock, csock = tcp_pair(bufsize)
    return PlainStream(ssock), PlainStream(csock)


def test_plain_round_trips_and_eof() -> None:
    """Echo round trips, then the peer's close reads as b""."""
    server, client = plain_pair()
    try:
        def echo_server() -> None:
            while data := server.recv():
                server.sendall(data.upper())
            server.close()

        def client_side() -> list[bytes]:
            replies = []
            for i in range(10):
                client.sendall(f"ping {i}".encode())
                replies.append(recv_exactly(client, len(f"ping {i}")))
            client.sock.shutdown(socket.SHUT_WR)
            assert client.recv() == b""
            return replies

        _, replies = run_both(echo_server, client_side)
        assert replies == [f"PING {i}".encode() for i in range(10)]
        assert server.fileno() != client.fileno()
    finally:
        client.close()


def test_plain_five_mib_both_directions_at_once() -> None:
    """The same simultaneous 5 MiB exchange over cleartext."""
    server, client = plain_pair(bufsize=SMALL_BUF)
    server.timeout = client.timeout = 10.0
    waits = [count_waits(server), count_waits(client)]
    try:
        exchange_both_ways(server, client, BIG)
        for counter in waits:
            assert counter.counts[2] > 0 and counter.counts[1] > 0, counter.counts
    finally:
        server.close()
        client.close()


def test_plain_recv_timeout() -> None:
    """A silent peer: StreamTimeout after about `timeout` seconds."""
    server, client = plain_pair()
    client.timeout = 0.5
    try:
        with guard(5), elapsed_within(0.4, 2.5), pytest.raises(StreamTimeout):
            client.recv()
    finally:
        server.close()
        client.close()


def test_plain_reset_peer() -> None:
    """An RST: recv raises StreamClosed (or returns b""); sendall raises StreamClosed."""
    server, client = plain_pair()
    client.timeout = 5.0
    try:
        reset(server.sock)
        with guard(5):
            try:
                assert client.recv() == b""
            except StreamClosed:
                pass
        server2, client2 = plain_pair()
        client2.timeout = 5.0
        try:
            reset(server2.sock)
            with guard(10), pytest.raises(StreamClosed):
                for _ in range(100):
                    client2.sendall(b"x" * 65536)
        finally:
            client2.close()
    finally:
        client.close()
