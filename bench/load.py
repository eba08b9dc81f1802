"""Load generators and what they print: wrk (keep-alive requests, 1 MiB responses) and
parallel `openssl s_time` (one new TLS connection per request, full or resumed).

Each runner returns a dict of raw figures; the caller adds the proxy's CPU from /proc.

Every client here runs with `CLIENT_ENV`: OPENSSL_CONF names `client-openssl.cnf`, which
makes it offer the TLS 1.3 suites in browsers' order, so that every server measured
negotiates the same suite (`negotiated` says which it was).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.procs import pinned

CLIENT_CONF = Path(__file__).resolve().parent / "client-openssl.cnf"
CLIENT_ENV = {**os.environ, "OPENSSL_CONF": str(CLIENT_CONF)}


def client_tls13_suites() -> str:
    """The TLS 1.3 suites CLIENT_CONF offers, in its order (its `Ciphersuites` line)."""
    for line in CLIENT_CONF.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "Ciphersuites":
            return value.strip()
    raise ValueError(f"{CLIENT_CONF}: no Ciphersuites line")

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str | None) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text or "")
    if not m:
        return math.nan
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(url: str, *, connections: int, seconds: float, cpus: str | None,
        threads: int = 1) -> dict[str, Any]:
    """`wrk --latency`: requests, req/s, p50/p99 ms, errors (socket errors + non-2xx)."""
    args = pinned(cpus, ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s",
                         "--latency", "-H", "Host: proxy.test", url])
    t0 = time.monotonic()
    out = subprocess.run(args, capture_output=True, text=True, check=True,
                         env=CLIENT_ENV).stdout
    wall = time.monotonic() - t0
    m = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)", out)
    if not m:
        raise RuntimeError(f"wrk printed no request count:\n{out}")
    requests = int(m.group(1))
    duration = float(m.group(2)) * _UNITS[m.group(3)] / 1e3
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.M))
    errors = 0
    for pattern in (r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                    r"Non-2xx or 3xx responses: (\d+)"):
        em = re.search(pattern, out)
        if em:
            errors += sum(int(g) for g in em.groups())
    return {"requests": requests, "duration_s": duration, "wall_s": wall,
            "rps": requests / duration, "p50_ms": _ms(lat.get("50")),
            "p99_ms": _ms(lat.get("99")), "errors": errors,
            **({} if "50" in lat and "99" in lat else {"wrk_output": out[-1500:]})}


def s_time(port: int, *, resume: bool, processes: int, seconds: int,
           cpus: str | None) -> dict[str, float]:
    """*processes* parallel `openssl s_time` clients, each one connection at a time, a
    `GET /small` per connection; `-new` = full handshakes, `-reuse` = resumed."""
    # s_time sends "GET <www> HTTP/1.0\r\n\r\n" and no Host; a request without Host makes
    # some proxies forward an empty Host, which the backend answers with 400 + close.  So
    # the path carries a complete HTTP/1.1 head; s_time's " HTTP/1.0" ends a dummy field.
    www = "/small HTTP/1.1\r\nHost: proxy.test\r\nConnection: close\r\nX-Bench: s_time"
    args = pinned(cpus, ["openssl", "s_time", "-connect", f"127.0.0.1:{port}",
                         "-reuse" if resume else "-new", "-time", str(seconds),
                         "-www", www])
    t0 = time.monotonic()
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=CLIENT_ENV) for _ in range(processes)]
    outs = [p.communicate()[0] for p in procs]
    wall = time.monotonic() - t0
    conns = 0
    sizes = []
    for out in outs:
        counts = re.findall(r"^(\d+) connections in [\d.]+s", out, re.M)
        if not counts:
            raise RuntimeError(f"s_time printed no count:\n{out[-2000:]}")
        conns += int(counts[-1])
        sizes += [int(x) for x in re.findall(r"(\d+) bytes read per connection", out)]
    # A 200 with the 100-byte body is ~240 bytes; an error page (e.g. a 502) differs, so
    # the spread of response sizes is kept to spot one ("bad" = clients with < 100 bytes).
    return {"connections": conns, "wall_s": wall, "cps": conns / wall,
            "bytes_per_conn_min": min(sizes, default=0),
            "bytes_per_conn_max": max(sizes, default=0),
            "bad_clients": sum(1 for x in sizes if x < 100)}


def negotiated(port: int) -> str:
    """What a bench client gets from the server on *port*: "TLSv1.3 TLS_AES_128_GCM_SHA256"
    (from one `openssl s_client` handshake with CLIENT_ENV), or "?" if it printed none."""
    try:
        out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                              "-servername", "proxy.test"], input="", capture_output=True,
                             text=True, timeout=20, env=CLIENT_ENV).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    m = re.search(r"^New, (\S+), Cipher is (\S+)$", out, re.M)
    return f"{m.group(1).rstrip(',')} {m.group(2)}" if m else "?"
