"""The pyOpenSSL ⇄ gevent adapter: the only place in gatewayd that waits on a file descriptor.

pyOpenSSL drives OpenSSL directly on the socket's file descriptor.  The descriptor is
non-blocking (gevent sockets always are), so OpenSSL answers "would block"
(SSL_ERROR_WANT_READ / _WRITE); we then park the greenlet on a libev io watcher created
once per stream (not once per wait) until the descriptor is ready, bounded by a libev
timer.  A TLS 1.3 write may need a read (key update) and vice versa, so each
wait follows what OpenSSL asked for, not what the caller is doing.

`PlainStream` offers the same interface for `http` listeners and backends, so the proxy
never asks which one it has.

Why the data path calls `SSL_read`/`SSL_write` itself: pyOpenSSL's `Connection.recv` and
`send` wrap each call in several Python frames (a fresh 64 KiB buffer, text checks, a
`from_buffer` context, `_raise_ssl_error` on success too, an exception for every
would-block).  On this project's benchmark machine that wrapper cost about a quarter of a
keep-alive request (a minimal forwarder: 210 → 147 µs of CPU per request).  So established
connections call the same OpenSSL functions through the same cffi binding pyOpenSSL uses
(`OpenSSL._util.lib`), into one per-worker buffer, and handle only "done" and "would
block" inline; every other outcome is handed back to pyOpenSSL's own error translation,
so errors, EOF and verify-callback exceptions come out exactly as before.  Handshakes,
contexts, certificates and verification stay pyOpenSSL's.
"""

from __future__ import annotations

import _socket
import errno
import os
import socket
from typing import Any, Final, Protocol

from gevent import getcurrent
from gevent.hub import get_hub
from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

# Module constants are Final: compiled, each is a C static, not a lookup in the module's
# dict on every use (docs/architecture.md); the same for this function, called per wait.
_getcurrent: Final = getcurrent
_READ: Final = 1
_WRITE: Final = 2
_MIN_TIMEOUT: Final = 1e-6  # s: a wait with no time left still arms a (repeating) timer
RECV_SIZE: Final = 65536
MAX_RECORD_PLAINTEXT: Final = 16384  # TLS 1.2/1.3 record payload limit (RFC 8446 §5.1)

_SSL_read: Final = _lib.SSL_read
_SSL_write: Final = _lib.SSL_write
_SSL_get_error: Final = _lib.SSL_get_error
_SSL_do_handshake: Final = _lib.SSL_do_handshake
_SSL_shutdown: Final = _lib.SSL_shutdown
_ERR_clear_error: Final = _lib.ERR_clear_error
_SSL_get_version: Final = _lib.SSL_get_version
_SSL_get_current_cipher: Final = _lib.SSL_get_current_cipher
_SSL_CIPHER_get_name: Final = _lib.SSL_CIPHER_get_name
_PEEK: Final = int(socket.MSG_PEEK)  # a plain int: socket.MSG_* are enum members
TLS_HANDSHAKE_RECORD: Final = 0x16  # the first byte of every ClientHello (RFC 8446 §5.1)
# OpenSSL names protocol versions and ciphers with static strings, so each name is
# decoded once and then found by the address OpenSSL returns (pyOpenSSL's
# get_protocol_version_name() and get_cipher_name() copy and decode them every time).
_names: Final[dict[Any, str]] = {}
_WANT_READ: Final = _lib.SSL_ERROR_WANT_READ
_WANT_WRITE: Final = _lib.SSL_ERROR_WANT_WRITE
_ZERO_RETURN: Final = _lib.SSL_ERROR_ZERO_RETURN
_from_buffer: Final = _ffi.from_buffer
_buffer: Final = _ffi.buffer
_unpack: Final = _ffi.unpack
# One receive buffer per worker process: a greenlet copies its bytes out before it can
# yield, so no two reads ever share it.
_RECV_BUF: Final = _ffi.new("char[]", RECV_SIZE)


_CLEAN_EOF: Final = object()  # TLSStream._ended: the peer closed cleanly after the data returned

RelayBuffer = Any  # a cffi char[RECV_SIZE]: see take_relay_buffer
# What sendall takes: bytes, a memoryview, or a cffi buffer of a RelayBuffer (Any: compiled
# code checks a concrete annotation at run time, and a cffi buffer is neither).
BytesLike = Any
_relay_buffers: Final[list[RelayBuffer]] = []
_RELAY_BUFFERS_KEPT: Final = 64


def take_relay_buffer() -> RelayBuffer:
    """A RECV_SIZE buffer of its own for one body relay.  `recv_into` reads into it and
    hands back a view of the bytes, not a copy, which the relay writes out before its next
    read; so a body crosses the gateway with no copy of ours (`recv` copies every chunk
    out of the shared receive buffer).  Give it back with `return_relay_buffer`."""
    return _relay_buffers.pop() if _relay_buffers else _ffi.new("char[]", RECV_SIZE)


def return_relay_buffer(buf: RelayBuffer) -> None:
    if len(_relay_buffers) < _RELAY_BUFFERS_KEPT:  # the rest is freed
        _relay_buffers.append(buf)


class StreamTimeout(Exception):
    """A read, write or handshake did not progress within its timeout."""


class StreamClosed(Exception):
    """The peer reset or the TLS layer failed after the handshake (not a clean EOF)."""


class TLSHandshakeFailed(Exception):
    """The TLS handshake failed; `reason` is a short OpenSSL-derived description."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Stream:
    """What the proxy needs of a client or backend connection: the base of PlainStream
    and TLSStream.  A base class, not a Protocol: compiled, a call through a protocol is
    a generic method call (a lookup by name and the arguments boxed, ~250 instructions,
    four or more a request), through a base class a C call by the class's method table."""

    __slots__ = ("sock", "timeout")

    sock: _socket.socket  # the C type: accepted sockets are made as one (worker.py)
    timeout: float | None

    def recv(self, size: int = RECV_SIZE) -> bytes:
        raise NotImplementedError

    def recv_into(self, buf: RelayBuffer) -> Any:
        raise NotImplementedError

    def sendall(self, data: BytesLike) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def close_lingering(self) -> None:
        raise NotImplementedError

    def fileno(self) -> int:
        raise NotImplementedError


class Waiter(Protocol):
    """What a stream waits with.  A protocol, not `_Waiter` itself: compiled code checks
    a class annotation at run time, and tests wrap the waiter to count the waits."""

    def wait(self, events: int, timeout: float | None) -> None: ...

    def deadline(self, timeout: float) -> Any: ...

    def close(self) -> None: ...


class _Waiter:
    """Two io watchers for one descriptor, and a timer, reused for every wait on it.
    The write watcher is made on the first wait for room to write: most connections
    never fill the socket's send buffer, and a watcher made and closed per connection
    costs a couple of thousand instructions."""

    __slots__ = ("_fd", "_hub", "_loop", "_read", "_timer", "_timer_after", "_write")

    def __init__(self, fd: int) -> None:
        self._hub = get_hub()
        loop = self._loop = self._hub.loop
        self._fd = fd
        self._read = loop.io(fd, _READ)
        self._write: Any = None
        self._timer: Any = None
        self._timer_after = 0.0

    def wait(self, events: int, timeout: float | None) -> None:
        """Park until the descriptor is ready; StreamTimeout after `timeout` seconds.

        The timeout is a bare libev timer that throws into this greenlet (what
        gevent.Timeout does, minus its Python-level bookkeeping on every wait).  A stream
        waits with the same timeout again and again (keep-alive, request, send), so the
        timer is kept: a repeating one, re-armed by `again` (libev's ev_timer_again: due
        `timeout` seconds from now) and stopped after the wait, instead of a new watcher
        made and closed per wait.  After anything but a normal wake-up it is dropped."""
        if events == _READ:
            watcher = self._read
        else:
            watcher = self._write
            if watcher is None:
                watcher = self._write = self._loop.io(self._fd, _WRITE)
        if timeout is None:
            self._hub.wait(watcher)
            return
        timer = self._timer
        if timer is None or timeout != self._timer_after:
            if timer is not None:
                timer.close()
            after = max(timeout, _MIN_TIMEOUT)  # repeat 0 would make `again` a no-op
            timer = self._timer = self._loop.timer(after, after)
            self._timer_after = timeout
        timer.again(_getcurrent().throw, StreamTimeout)
        try:
            self._hub.wait(watcher)
        except BaseException:
            self._timer = None  # it may have fired (StreamTimeout): never reuse it then
            timer.close()
            raise
        timer.stop()

    def deadline(self, timeout: float) -> Any:
        """A started libev timer that throws StreamTimeout into the calling greenlet
        after `timeout` seconds, wherever it waits; the caller closes it."""
        timer = self._loop.timer(max(timeout, 0.0))
        timer.start(_getcurrent().throw, StreamTimeout)
        return timer

    def close(self) -> None:
        self._read.close()
        if self._write is not None:
            self._write.close()
        if self._timer is not None:
            self._timer.close()
            self._timer = None


class PlainStream(Stream):
    """A cleartext TCP connection."""

    __slots__ = ("_fd", "_waiter")

    def __init__(self, sock: _socket.socket, timeout: float | None = None) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.timeout = timeout
        self._fd = sock.fileno()
        self._waiter: Waiter = _Waiter(self._fd)

    def fileno(self) -> int:
        return self._fd

    def recv(self, size: int = RECV_SIZE) -> bytes:
        while True:
            try:
                return self.sock.recv(size)
            except BlockingIOError:
                self._waiter.wait(_READ, self.timeout)
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise StreamClosed(str(exc)) from exc

    def recv_into(self, buf: RelayBuffer) -> Any:
        """Like recv(), into `buf`: a view of the bytes read, valid until `buf` is reused."""
        view = memoryview(_buffer(buf, RECV_SIZE))
        while True:
            try:
                # the count first: compiled (mypyc) code evaluates a call inside a slice
                # bound twice, and a second recv_into would lose the first one's bytes
                n = self.sock.recv_into(view)
                return view[:n]
            except BlockingIOError:
                self._waiter.wait(_READ, self.timeout)
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise StreamClosed(str(exc)) from exc

    def sendall(self, data: BytesLike) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                self._waiter.wait(_WRITE, self.timeout)
                continue
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise StreamClosed(str(exc)) from exc
            view = view[sent:]

    def close(self) -> None:
        self._waiter.close()
        self.sock.close()

    def close_lingering(self) -> None:
        _linger(self.sock, self._waiter)
        self.close()


class TLSStream(Stream):
    """A TLS connection (either side) over a connected, non-blocking socket."""

    __slots__ = ("_ended", "_fd", "_ssl", "_waiter", "conn")

    def __init__(self, sock: _socket.socket, conn: SSL.Connection,
                 timeout: float | None = None):
        sock.setblocking(False)
        self.sock = sock
        self.conn = conn
        self._ssl = conn._ssl  # the SSL* the fast path below passes to OpenSSL
        self._ended: StreamClosed | object | None = None  # see _read_more
        self.timeout = timeout
        self._fd = sock.fileno()
        self._waiter: Waiter = _Waiter(self._fd)

    @classmethod
    def server(cls, sock: _socket.socket, context: SSL.Context) -> TLSStream:
        # pyOpenSSL's hint says socket.socket; it only asks the object for fileno()
        conn = SSL.Connection(context, sock)  # type: ignore[arg-type]
        conn.set_accept_state()
        return cls(sock, conn)

    @classmethod
    def client(cls, sock: _socket.socket, context: SSL.Context,
               sni: str | None) -> TLSStream:
        conn = SSL.Connection(context, sock)  # type: ignore[arg-type]  # see server()
        if sni:
            conn.set_tlsext_host_name(sni.encode("idna"))
        conn.set_connect_state()
        return cls(sock, conn)

    def fileno(self) -> int:
        return self._fd

    def protocol_name(self) -> str:
        """The negotiated protocol version ("TLSv1.3"), as pyOpenSSL names it."""
        pointer = _SSL_get_version(self._ssl)
        name = _names.get(pointer)
        if name is None:
            name = _names[pointer] = _ffi.string(pointer).decode("utf-8")
        return name

    def cipher_name(self) -> str:
        """The negotiated cipher's OpenSSL name; "" before a handshake completed."""
        cipher = _SSL_get_current_cipher(self._ssl)
        if cipher == _ffi.NULL:
            return ""
        name = _names.get(cipher)
        if name is None:
            name = _names[cipher] = _ffi.string(_SSL_CIPHER_get_name(cipher)).decode("utf-8")
        return name

    def _peek(self) -> bytes:
        """The first bytes the peer sent, left in the socket (b"" if it closed first):
        lets the server tell a TCP health check or plain HTTP from a TLS ClientHello
        before OpenSSL sees anything."""
        while True:
            try:
                return self.sock.recv(16, _PEEK)
            except BlockingIOError:
                self._waiter.wait(_READ, None)
            except OSError as exc:
                raise StreamClosed(str(exc)) from exc

    def accept(self, timeout: float) -> bytes:
        """A server's start: _peek() and, when the first byte starts a TLS handshake
        record, _handshake(), both within `timeout` seconds in total under one timer (a
        timer made, started and closed costs a few thousand instructions a connection).
        Returns the peeked bytes: b"" if the peer closed first; anything not starting
        with a handshake record is left unread and the handshake not begun."""
        timer = self._waiter.deadline(timeout)
        try:
            first = self._peek()
            if first and first[0] == TLS_HANDSHAKE_RECORD:
                self._handshake()
            return first
        finally:
            timer.close()

    def handshake(self, timeout: float) -> None:
        """Complete the handshake within `timeout` seconds in total (not per step), so a
        peer that trickles bytes cannot hold the connection longer.  Like recv(), it
        calls OpenSSL directly and leaves only failures to pyOpenSSL's translation."""
        timer = self._waiter.deadline(timeout)
        try:
            self._handshake()
        finally:
            timer.close()

    def _handshake(self) -> None:
        """handshake() without a deadline of its own: the caller holds one."""
        ssl = self._ssl
        while True:
            result = _SSL_do_handshake(ssl)
            if result == 1:
                self.conn._raise_ssl_error(ssl, result)  # a callback's stored exception
                return
            error = _SSL_get_error(ssl, result)
            if error == _WANT_READ:
                self._waiter.wait(_READ, None)
            elif error == _WANT_WRITE:
                self._waiter.wait(_WRITE, None)
            else:
                try:
                    self.conn._raise_ssl_error(ssl, result)
                except SSL.SysCallError as sys_exc:
                    raise TLSHandshakeFailed(_syscall_reason(sys_exc)) from sys_exc
                except SSL.Error as exc:
                    raise TLSHandshakeFailed(_ssl_reason(exc)) from exc
                raise TLSHandshakeFailed("handshake_failure")

    def recv(self, size: int = RECV_SIZE) -> bytes:
        """Return decrypted bytes; b"" on EOF (a close_notify or a bare TCP close: for
        HTTP the framing layer decides whether a message was cut short)."""
        n = self._read(_RECV_BUF, size if size < RECV_SIZE else RECV_SIZE)
        return _unpack(_RECV_BUF, n) if n else b""  # one copy out, no buffer object

    def recv_into(self, buf: RelayBuffer) -> Any:
        """Like recv(), into `buf` (see take_relay_buffer): a view of the decrypted bytes,
        valid until `buf` is read into again; empty on EOF."""
        return _buffer(buf, self._read(buf, RECV_SIZE))

    def _read(self, buf: Any, size: int) -> int:
        """Decrypt into `buf`: the number of bytes, 0 on EOF."""
        ended = self._ended
        if ended is not None:
            if isinstance(ended, StreamClosed):
                raise ended
            return 0  # _CLEAN_EOF
        ssl = self._ssl
        while True:
            n = _SSL_read(ssl, buf, size)
            if n > 0:
                if n >= MAX_RECORD_PLAINTEXT:
                    n = self._read_more(buf, n, size)
                return n
            error = _SSL_get_error(ssl, n)
            if error == _WANT_READ:
                self._waiter.wait(_READ, self.timeout)
            elif error == _WANT_WRITE:
                self._waiter.wait(_WRITE, self.timeout)
            else:
                # close_notify is a clean EOF: no pyOpenSSL call (and ZeroReturnError) for it
                if error != _ZERO_RETURN:
                    self._raise_ssl_error(n, reading=True)
                self._ended = _CLEAN_EOF  # EOF stays EOF (OpenSSL would now report an error)
                return 0

    def _read_more(self, buf: Any, n: int, size: int) -> int:
        """After a full-sized record (the peer is streaming a body), take the records
        that have already arrived too, up to `size` bytes in all, without waiting: one
        SSL_read returns at most one record (16 KiB), and every chunk handed up costs
        the proxy a parser call and a write.  Stops at "would block" or at the end of
        the stream, which is kept in `_ended` and reported by the next recv()."""
        ssl = self._ssl
        while n < size:
            more = _SSL_read(ssl, buf + n, size - n)
            if more > 0:
                n += more
                continue
            error = _SSL_get_error(ssl, more)
            if error != _WANT_READ and error != _WANT_WRITE:
                # Translate now (it drains OpenSSL's per-thread error queue, which other
                # connections share) and report it on the next recv(), after this data.
                try:
                    self._raise_ssl_error(more, reading=True)
                    self._ended = _CLEAN_EOF
                except StreamClosed as exc:
                    self._ended = exc
            break
        return n

    def sendall(self, data: BytesLike) -> None:
        ssl = self._ssl
        left = len(data)
        if not left:
            return
        ptr = _from_buffer(data)
        while True:
            n = _SSL_write(ssl, ptr, left)
            if n > 0:
                left -= n
                if not left:
                    return
                ptr += n  # partial writes are enabled (pyOpenSSL sets the mode)
                continue
            error = _SSL_get_error(ssl, n)
            if error == _WANT_WRITE:
                self._waiter.wait(_WRITE, self.timeout)
            elif error == _WANT_READ:
                self._waiter.wait(_READ, self.timeout)
            else:
                self._raise_ssl_error(n, reading=False)

    def _raise_ssl_error(self, result: int, *, reading: bool) -> None:
        """Translate a failed SSL_read/SSL_write through pyOpenSSL: returns only for a
        clean EOF while reading, else raises StreamClosed with OpenSSL's reason."""
        try:
            self.conn._raise_ssl_error(self._ssl, result)
        except SSL.ZeroReturnError:
            if reading:
                return
            raise StreamClosed("closed by peer") from None
        except SSL.SysCallError as sys_exc:
            if reading and sys_exc.args and sys_exc.args[0] == -1:  # unexpected EOF
                return
            raise StreamClosed(_syscall_reason(sys_exc)) from sys_exc
        except SSL.Error as exc:
            raise StreamClosed(_ssl_reason(exc)) from exc
        raise StreamClosed("tls_error")  # SSL_ERROR_NONE with a failed call: not expected

    def shutdown(self) -> None:
        """Send close_notify without waiting for the peer's (best effort)."""
        if _SSL_shutdown(self._ssl) < 0:  # pyOpenSSL's shutdown(), minus its Python call
            _ERR_clear_error()  # what it would have raised (and we would have ignored)

    def close(self) -> None:
        self.shutdown()
        self._waiter.close()
        self.sock.close()

    def close_lingering(self) -> None:
        self.shutdown()
        _linger(self.sock, self._waiter)
        self._waiter.close()
        self.sock.close()


LINGER_TIME: Final = 2.0  # s, like nginx's lingering_timeout but shorter: a courtesy, not a duty
LINGER_BYTES: Final = 1 << 20


def _linger(sock: _socket.socket, waiter: Waiter) -> None:
    """Half-close and discard what the client still sends (RFC 9112 §9.6).  Closing a
    socket with unread input makes the kernel send RST, which can destroy the error
    response we just wrote before the client reads it (nginx: lingering_close)."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return
    discarded = 0
    timer = waiter.deadline(LINGER_TIME)
    try:
        while discarded < LINGER_BYTES:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                waiter.wait(_READ, None)
                continue
            if not data:
                return
            discarded += len(data)
    except (StreamTimeout, OSError):
        pass
    finally:
        timer.close()


def _ssl_reason(exc: SSL.Error) -> str:
    """The most specific OpenSSL reason string in a pyOpenSSL error."""
    try:
        errors = exc.args[0]
        if errors and isinstance(errors, list):
            return str(errors[-1][2]) or "tls_error"
    except (IndexError, TypeError):
        pass
    return str(exc) or "tls_error"


def _syscall_reason(exc: SSL.SysCallError) -> str:
    if exc.args and exc.args[0] == -1:
        return "unexpected eof"
    return str(exc.args[1]) if len(exc.args) > 1 else "syscall error"


def open_tcp(sockaddr: tuple, family: int, timeout: float) -> socket.socket:
    """A non-blocking TCP connection to `sockaddr`; ConnectionRefusedError/OSError on
    failure, StreamTimeout if it does not complete within `timeout` seconds."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(sockaddr)
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            raise OSError(err, os.strerror(err))
        if err:
            waiter = _Waiter(sock.fileno())
            try:
                waiter.wait(_WRITE, timeout)
            finally:
                waiter.close()
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err == errno.ECONNREFUSED:
                raise ConnectionRefusedError(err, os.strerror(err))
            if err:
                raise OSError(err, os.strerror(err))
        return sock
    except BaseException:
        sock.close()
        raise


_PEEK_NOWAIT: Final = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)  # a plain int: no enum code


def peer_closed(sock: _socket.socket) -> bool:
    """True if an idle pooled connection has been closed (or written to) by the peer.
    Anything readable on an idle HTTP/1.1 connection means it must not be reused."""
    try:
        return sock.recv(1, _PEEK_NOWAIT) is not None
    except BlockingIOError:
        return False
    except OSError:
        return True
