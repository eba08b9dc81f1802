"""What the request and the response parsers share: the error every refusal is, the
END event, llhttp's exceptions, the parser states and small helpers (see __init__)."""

from __future__ import annotations

from typing import Any, ClassVar, Final

import httptools  # type: ignore[import-untyped, unused-ignore]

_HttpParserError: Final = httptools.HttpParserError
_HttpParserUpgrade: Final = httptools.HttpParserUpgrade

_VERSIONS: Final = {"1.1": b"1.1", "1.0": b"1.0"}
#: A body chunk as the parsers hand it back: bytes, or, for a counted response body (see
#: ResponseParser.counting), the very view of a relay buffer the caller fed.  Any, because
#: compiled code (gatewayd/native.py) checks a concrete annotation at run time, and a cffi
#: buffer is neither bytes nor memoryview.
Chunk = Any
_OWS: Final = b" \t"


class HttpError(Exception):
    """The peer sent something we refuse; the connection must be closed after answering.

    ``status`` is the status the gateway answers with (CONTRACT section 7: 400, 405, 413,
    414, 431, 501 for requests, 502 for backend responses) and ``error_info`` the short
    cause for the access log.
    """

    def __init__(self, status: int, error_info: str) -> None:
        super().__init__(status, error_info)
        self.status = status
        self.error_info = error_info

    def __str__(self) -> str:
        return f"{self.status} {self.error_info}"


class EndOfMessage:
    """Marks the end of one message; use the singleton :data:`END`."""

    __slots__ = ()
    _instance: ClassVar[EndOfMessage | None] = None

    def __new__(cls) -> EndOfMessage:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "END"


END: Final = EndOfMessage()


class _Stop(Exception):
    """Raised from a callback to make llhttp stop where we decided the stream ends.
    Raise a new instance every time: raising one shared instance again prepends the new
    traceback entries to the ones it already carries, so its traceback (and the frames
    it holds) would grow by every raise for the worker's life."""

# parser states
_IDLE: Final = 0  # between messages (llhttp may be skipping CRLFs)
_HEAD: Final = 1  # request/status line or header section in progress
_BODY: Final = 2  # after the head, before END


class EventQueue:
    """The events the parsers handed back and the proxy has not taken yet, in order.

    A list and a read position, not a deque: compiled, each deque method is a generic
    method call (~200 instructions, seven a request), where these are C calls.  The proxy
    takes every event before it feeds the parser again, so `put` mostly swaps in the
    parser's new list; taking moves the position, never the items (a `pop(0)` per event
    would move them all: quadratic for a read of many small chunks), and lets go of the
    event taken: an idle keep-alive connection must not hold its last request's body."""

    __slots__ = ("_items", "_next")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._next = 0

    def ready(self) -> bool:
        """An event is waiting."""
        return self._next < len(self._items)

    def put(self, events: list[Any]) -> None:
        """Queue `events` (a list the caller hands over: it is kept, not copied)."""
        if self._next < len(self._items):
            events = self._items[self._next:] + events
        self._items = events
        self._next = 0

    def peek(self) -> Any:
        """The next event, left in the queue (IndexError if none)."""
        return self._items[self._next]

    def take(self) -> Any:
        """The next event (IndexError if none)."""
        index = self._next
        items = self._items
        item = items[index]
        items[index] = None
        self._next = index + 1
        return item


def _has_token(value: bytes, token: bytes) -> bool:
    """True if the comma-separated list ``value`` contains ``token`` (case-insensitive)."""
    return any(t.strip(_OWS).lower() == token for t in value.split(b","))


class LlhttpOwner:
    """Base of both parsers, which keep their httptools parser in `_p`."""

    __slots__ = ("_p",)
    _p: Any  # httptools' parser; None once closed

    def close(self) -> None:
        """Drop llhttp, once this parser's connection is done.  httptools keeps the bound
        callback methods of the parser, and the parser keeps httptools': a reference cycle
        that only the cyclic collector would free (a dozen objects per parser), and only
        late for a long-lived connection.  No feed after this; closing twice is fine.
        (An assignment, not `del`: a compiled class's attributes cannot be deleted.)"""
        self._p = None
