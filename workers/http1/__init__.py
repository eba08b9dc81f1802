"""Sans-IO HTTP/1.x message parsing for the data plane (requests from clients, responses
from backends), on top of httptools/llhttp in its default *strict* mode.

Push bytes in with ``feed()``, get events out (h11 style): a head object, then the body as
plain ``bytes`` chunks (already de-chunked), then the :data:`END` singleton. No sockets, no
gevent: the worker owns the I/O and the timeouts.

Why a layer over llhttp at all: llhttp is a *tolerant-by-design* tokenizer that leaves
policy to its user.  A gateway is the first line of defence against request smuggling
(RFC 9112 section 11.2), so everything a backend could interpret differently from us is
refused here, before a head event exists.  What llhttp (strict mode, as shipped in
httptools 0.9) already rejects was verified by tests rather than assumed:

* rejected by llhttp: CR/LF/NUL/CTL in field values, bare LF line endings, whitespace before
  the colon, empty field names, obs-fold lines, non-decimal / signed / list / empty /
  duplicate Content-Length, Content-Length together with Transfer-Encoding (either order),
  ``chunked`` that is not the final coding, a second Transfer-Encoding after ``chunked``,
  bad or overflowing chunk sizes, chunk data not followed by CRLF, HTTP/1.2+ minors.
* added here: HTTP version other than 1.0/1.1 (llhttp accepts HTTP/0.9 request lines and
  ``HTTP/2.0``), Host rules (RFC 9112 section 3.2), Transfer-Encoding other than exactly
  ``chunked`` (``gzip, chunked`` and ``,chunked`` pass llhttp), Transfer-Encoding on HTTP/1.0
  (RFC 9112 section 6.1), request-target form (section 3.2), CONNECT, the size limits of
  CONTRACT section 3, trailing OWS in values (section 5.1), and response-side framing that
  llhttp cannot know about (responses to HEAD, section 6.3 rule 1).

One leniency is switched on, for request parsers only: llhttp's keep-alive leniency
(it goes on parsing after a request that ends its connection), so that a parser can be
renewed for the next connection (``RequestParsers``).  Section 9.6 still holds: after such
a request the parser refuses the next one itself, at its first byte.

Layout: ``common`` (HttpError, END, EventQueue, what both share), ``request`` (RequestParser),
``response`` (ResponseParser).
"""

from .common import END, Chunk, EndOfMessage, EventQueue, HttpError
from .request import RequestEvent, RequestHead, RequestParser, RequestParsers
from .response import ResponseEvent, ResponseHead, ResponseParser

__all__ = [
    "END",
    "Chunk",
    "EndOfMessage",
    "EventQueue",
    "HttpError",
    "RequestEvent",
    "RequestHead",
    "RequestParser",
    "RequestParsers",
    "ResponseEvent",
    "ResponseHead",
    "ResponseParser",
]
