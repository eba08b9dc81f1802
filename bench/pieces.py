"""Instructions per call of the request path's socket-free pieces: `python -m bench.pieces`.

`bench.instructions` counts a whole worker per request; this splits that count up.  Each
piece (parsing wrk's request, parsing nginx's /small response on a pooled parser, both
heads rebuilt, the record and stats, an access-log line) runs `--calls` times in a fresh
interpreter under callgrind, and once with no calls; the difference over the number of
calls is the piece's cost, exact and repeatable like `bench.instructions`.  The inputs are
what the bench's keep-alive scenario sends and receives, so the figures add up to most of
what gatewayd does per request on top of the stack (`bench/floor.py`).

    python -m bench.pieces [--calls N] [--only name,name]
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from bench.instructions import callgrind_total

if TYPE_CHECKING:
    from gatewayd.workers.proxy import Connection
    from gatewayd.workers.stats import Stats

#: Records per access-log flush in the "record" pieces: the worker flushes every 100 ms,
#: which is ~500 requests at the bench's keep-alive rate.
FLUSH_EVERY = 500
REQUEST = b"GET /small HTTP/1.1\r\nHost: 127.0.0.1:8443\r\n\r\n"  # what wrk sends
# what `openssl s_time` sends in the bench (bench/load.py): one request, then the close
S_TIME_REQUEST = (b"GET /small HTTP/1.1\r\nHost: proxy.test\r\nConnection: close\r\n"
                  b"X-Bench: s_time HTTP/1.0\r\n\r\n")
RESPONSE = (  # what the bench's nginx answers for /small (100-byte body)
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 30 Nov 2026 03:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 100\r\n"
    b"Last-Modified: Mon, 30 Nov 2026 02:00:00 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "6566a1b0-64"\r\nAccept-Ranges: bytes\r\n\r\n' + b"x" * 100)


#: A one-listener config for `_connection`: compiled code takes only a real Connection.
_CONFIG = """
[server]
workers = 1
[[listener]]
name = "front"
bind = "127.0.0.1:8443"
protocol = "http"
[[backend_pool]]
name = "be"
servers = ["127.0.0.1:8444"]
[[backend_settings]]
name = "be-http"
protocol = "http"
port = 8444
[[rule]]
name = "main"
priority = 10
listener = "front"
backend_pool = "be"
backend_settings = "be-http"
"""


def _connection(stats: Stats) -> Connection:
    """A real proxy Connection (no socket: the record reads only its fields), with the
    TLS fields the bench's https listener would have set."""
    from gatewayd.workers.accesslog import AccessLog
    from gatewayd.workers.balancer import Balancer
    from gatewayd.workers.proxy import BindContext, Connection, Runtime
    from gatewayd.workers.upstream import UpstreamPool

    from gatewayd.config import load_config_text
    from gatewayd.model import Address
    from gatewayd.routing import Router

    config = load_config_text(_CONFIG, source="pieces.toml", base_dir=tempfile.gettempdir())
    assert config is not None
    router = Router(config)
    rt = Runtime(server=config.server, router=router,
                 upstreams=UpstreamPool(config.backend_pools, config.backend_settings),
                 balancer=Balancer(config.backend_pools, config.backend_settings, None, [],
                                   b"0" * 32),
                 access_log=AccessLog("off", "json"), stats=stats)
    bind = BindContext(port=8443, router=router.for_bind(Address("127.0.0.1", 8443)),
                       tls=None)
    conn = Connection(rt, bind, None, ("127.0.0.1", 50000))
    conn.tls_protocol, conn.tls_cipher = "TLSv1.3", "TLS_AES_256_GCM_SHA384"
    return conn


def _pieces() -> dict[str, Callable[[], object]]:
    """name → one call of the piece (set up outside the call)."""
    from gatewayd.workers.accesslog import AccessLog
    from gatewayd.workers.exchange import _client_head
    from gatewayd.workers.http1 import (
        RequestHead,
        RequestParser,
        RequestParsers,
        ResponseHead,
        ResponseParser,
    )
    from gatewayd.workers.logline import FIELDS, LineMemo, json_line
    from gatewayd.workers.record import RequestRecord
    from gatewayd.workers.stats import Stats

    from gatewayd.forwarding import (
        ForwardContext,
        content_length_field,
        passed_response_head,
        upstream_request_head,
    )

    # the worker's default limits (the measured pieces below call the constructor bare)
    new_request_parser = partial(RequestParser, max_request_line=8192, max_header_bytes=32768,
                                 max_headers=100, max_body_bytes=0)
    request_parser = new_request_parser()
    head = request_parser.feed(REQUEST)[0]
    assert isinstance(head, RequestHead)
    response_parser = ResponseParser(request_method=b"GET")
    resp = response_parser.feed(RESPONSE)[0]
    assert isinstance(resp, ResponseHead) and response_parser.reusable

    parsers = RequestParsers(new_request_parser)

    def parse_on_kept(data: bytes) -> object:
        """A new connection's request on a parser an ended one gave back (the worker's
        RequestParsers), given back in turn."""
        parser = parsers.take()
        events = parser.feed(data)
        parsers.give_back(parser)
        return events

    def parse_response() -> object:
        response_parser.next_response(b"GET")
        return response_parser.feed(RESPONSE)

    # The same response with a head never seen before (its ETag differs), made up front:
    # what a backend that never repeats a head costs (a lookup and an insert that miss).
    unseen = iter([RESPONSE.replace(b'"6566a1b0-64"', b'"%012x"' % n) for n in range(20_000)])

    def parse_unseen_response() -> object:
        response_parser.next_response(b"GET")
        return response_parser.feed(next(unseen))

    ctx = ForwardContext(  # once per connection, as the proxy makes it
        client_ip="127.0.0.1", client_port=50000, scheme=b"https", listener_port=8443,
        xff_with_port=False, request_id="", client_host=b"", upstream_host=b"",
        client_element=b"127.0.0.1")

    def upstream_head() -> bytes:
        ctx.request_id = "0" * 32
        ctx.client_host = head.host
        ctx.upstream_host = b"backend.test"
        return upstream_request_head(head.method, b"/small", head.headers, ctx, None)

    from gatewayd import metrics

    metrics.prepare_dir(tempfile.mkdtemp(prefix="gatewayd-pieces-metrics-"), wipe=True)
    stats = Stats(("front",))

    def stats_updates() -> None:
        stats.request_done("front", "main", "be", 200, 0.0123)
        stats.backend_response("be", "127.0.0.1:8444", 200, 0.0042)

    conn = _connection(stats)
    log_off = AccessLog("off", "json")
    log_on = AccessLog(os.devnull, "json")

    records = [0]

    def record(log: AccessLog) -> None:
        records[0] += 1
        rec = RequestRecord(conn, head)
        rec.set_route("front", "main", "", "be", "be-http")
        rec.backend = "127.0.0.1:8444"
        rec.status = rec.backend_status = 200
        rec.bytes_sent = 100
        rec.backend_connect_time = 0.0
        rec.backend_first_byte_time = 0.000412
        rec.finish(log, stats)
        if records[0] % FLUSH_EVERY == 0:
            log.flush()  # the worker's flusher, every 100 ms

    values = tuple(0 if name in ("client_port", "status", "backend_status", "bytes_received",
                                 "bytes_sent") else 0.001 if name.endswith("_time") or
                   name == "duration" else 1764460800.0 if name == "time" else name
                   for name in FIELDS)
    log_on.write(values, LineMemo())
    log_on.flush()  # the thread pool's start (once per worker) is not a request's cost
    return {
        "request-parse": lambda: request_parser.feed(REQUEST),
        "request-parser-new": lambda: RequestParser(
            max_request_line=8192, max_header_bytes=32768, max_headers=100, max_body_bytes=0),
        "request-parse (new parser; Connection: close)": lambda: RequestParser(
            max_request_line=8192, max_header_bytes=32768, max_headers=100,
            max_body_bytes=0).feed(S_TIME_REQUEST),
        "request-parse (kept parser; Connection: close)": lambda: parse_on_kept(
            S_TIME_REQUEST),
        "response-parse (pooled parser)": parse_response,
        "response-parse (head not seen before)": parse_unseen_response,
        "response-parser-new": lambda: ResponseParser(request_method=b"GET"),
        "upstream-head": upstream_head,
        "client-head": lambda: passed_response_head(
            resp.status, resp.reason, resp.passed, resp.connection, (), b"Content-Length: 100",
            False),
        "client-head (remembered backend head)": lambda: _client_head(
            resp, [], content_length_field(100), False, False),
        "record (log off)": lambda: record(log_off),
        "record (json log on)": lambda: record(log_on),
        "stats": stats_updates,
        "json-log-line": lambda: json_line(values),
    }


def _run(name: str, calls: int) -> None:
    """The child: set everything up, collect as a worker does (boot's objects frozen out
    of the collector's sight, see workers/worker.py), then make `calls` calls of one piece.
    Without that, one full collection of everything imported would be charged to the
    calls."""
    from gatewayd.workers.worker import GC_GEN0_THRESHOLD

    piece = _pieces()[name]
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)
    for _ in range(calls):
        piece()


def _instructions(name: str, calls: int, tmp: Path) -> int:
    out = tmp / f"cg.{calls}"
    subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                    sys.executable, "-m", "bench.pieces", "--child", name, "--calls",
                    str(calls)], check=True, capture_output=True,
                   env={**os.environ, "PYTHONHASHSEED": "0"})
    return callgrind_total(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--only", help="comma-separated piece names")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _run(args.child, args.calls)
        return 0
    names = list(_pieces())
    if args.only:
        names = [name for name in names if name in args.only.split(",")]
    with tempfile.TemporaryDirectory(prefix="gatewayd-pieces-") as tmp:
        for name in names:
            try:
                base = _instructions(name, 0, Path(tmp))
                total = _instructions(name, args.calls, Path(tmp))
            except subprocess.CalledProcessError as exc:
                lines = exc.stderr.decode(errors="replace").splitlines()
                last = [line for line in lines if not line.startswith("==")][-1:]
                print(f"{'failed':>10}  {name}: {' '.join(last)}", flush=True)
                continue
            print(f"{(total - base) / args.calls:10,.0f}  {name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
