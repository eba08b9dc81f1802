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
import types
from collections.abc import Callable
from pathlib import Path

from bench.instructions import callgrind_total

REQUEST = b"GET /small HTTP/1.1\r\nHost: 127.0.0.1:8443\r\n\r\n"  # what wrk sends
RESPONSE = (  # what the bench's nginx answers for /small (100-byte body)
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 30 Nov 2026 03:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 100\r\n"
    b"Last-Modified: Mon, 30 Nov 2026 02:00:00 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "6566a1b0-64"\r\nAccept-Ranges: bytes\r\n\r\n' + b"x" * 100)


def _pieces() -> dict[str, Callable[[], object]]:
    """name → one call of the piece (set up outside the call)."""
    from gatewayd.workers.http1 import RequestHead, RequestParser, ResponseHead, ResponseParser
    from gatewayd.workers.logline import FIELDS, json_line
    from gatewayd.workers.record import RequestRecord
    from gatewayd.workers.stats import Stats

    from gatewayd.forwarding import ForwardContext, passed_response_head, upstream_request_head

    request_parser = RequestParser(max_request_line=8192, max_header_bytes=32768,
                                   max_headers=100, max_body_bytes=0)
    head = request_parser.feed(REQUEST)[0]
    assert isinstance(head, RequestHead)
    response_parser = ResponseParser(request_method=b"GET")
    resp = response_parser.feed(RESPONSE)[0]
    assert isinstance(resp, ResponseHead) and response_parser.reusable

    def parse_response() -> object:
        response_parser.next_response(b"GET")
        return response_parser.feed(RESPONSE)

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

    log = types.SimpleNamespace(enabled=False)
    conn = types.SimpleNamespace(listener_label="front")

    def record() -> None:
        rec = RequestRecord(conn, head)
        rec.status = 200
        rec.finish(log, stats)

    values = tuple(0 if name in ("client_port", "status", "backend_status", "bytes_received",
                                 "bytes_sent") else 0.001 if name.endswith("_time") or
                   name == "duration" else name for name in FIELDS)
    return {
        "request-parse": lambda: request_parser.feed(REQUEST),
        "response-parse (pooled parser)": parse_response,
        "response-parser-new": lambda: ResponseParser(request_method=b"GET"),
        "upstream-head": upstream_head,
        "client-head": lambda: passed_response_head(
            resp.status, resp.reason, resp.passed, resp.connection, (), b"Content-Length: 100",
            False),
        "record (log off)": record,
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
                # e.g. "record" hands RequestRecord a stand-in connection, which compiled
                # code refuses (it checks argument types): GATEWAYD_PURE_PYTHON=1 runs it
                lines = exc.stderr.decode(errors="replace").splitlines()
                last = [line for line in lines if not line.startswith("==")][-1:]
                print(f"{'failed':>10}  {name}: {' '.join(last)}", flush=True)
                continue
            print(f"{(total - base) / args.calls:10,.0f}  {name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
