"""Resource exhaustion against a live gatewayd with one worker.

* 10,000 idle TLS 1.3 client connections held open against one worker: the memory each
  costs (worker RSS growth / connections) is printed and bounded.
* `worker_connections` is enforced: connections beyond it wait in the listen backlog and
  are served once others close; the worker never crashes.
* File-descriptor exhaustion (RLIMIT_NOFILE lowered on the running worker): accept fails
  and is logged, accepting pauses, and once clients go away new requests are served.
"""

from __future__ import annotations

import asyncio
import os
import resource
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.gateway import Gateway, simple_spec
from tests.support.metrics import scrape, value
from tests.support.pki import TestPKI
from tests.support.procs import BackendFactory, https_get, wait_for

IDLE_CONNECTIONS = 10_000
KIB_PER_CONN_BOUND = 64  # target 50
# file descriptors the test client and the worker need beyond the connections themselves
FD_HEADROOM = 512



def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def nofile(request: pytest.FixtureRequest) -> Iterator[int]:
    """Raise this process's RLIMIT_NOFILE (inherited by gatewayd and the client) as far as
    allowed; yields the soft limit now in force.  Restored afterwards."""
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = IDLE_CONNECTIONS * 2 + FD_HEADROOM * 2
    soft, hard = saved
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))  # root: may raise hard
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    else:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    try:
        yield resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)


def one_worker(gw: Gateway) -> int:
    pids = gw.worker_pids()
    assert len(pids) == 1, pids
    return pids[0]


def get_ok(port: int, pki: TestPKI, timeout: float = 10) -> int:
    status, _, _ = https_get("127.0.0.1", port, "/ok", sni=None, cafile=pki.ca_pem_path,
                             timeout=timeout)
    return status


# -- 10,000 idle connections ------------------------------------------------------------

# Opens N TLS 1.3 connections (at most C handshakes in flight; plain non-blocking
# ssl sockets on epoll: far cheaper per handshake than asyncio's SSL protocol), prints
# "OPEN <ok> <failed> <seconds> <first error>", holds them until stdin closes, then closes
# them all and prints "CLOSED".
IDLE_CLIENT = r"""
import selectors, socket, ssl, sys, time, errno

def main(port, n, conc):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    sel = selectors.DefaultSelector()
    done, failed, started, inflight = [], [], 0, 0
    first = "-"
    start = time.monotonic()

    def launch():
        nonlocal started, inflight
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setblocking(False)
        err = raw.connect_ex(("127.0.0.1", port))
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, "connect")
        tls = ctx.wrap_socket(raw, do_handshake_on_connect=False)
        sel.register(tls, selectors.EVENT_WRITE)
        started += 1
        inflight += 1

    while len(done) + len(failed) < n:
        while started < n and inflight < conc:
            launch()
        for key, _ in sel.select(timeout=60):
            tls = key.fileobj
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                sel.modify(tls, selectors.EVENT_READ)
                continue
            except ssl.SSLWantWriteError:
                sel.modify(tls, selectors.EVENT_WRITE)
                continue
            except OSError as exc:
                sel.unregister(tls)
                tls.close()
                failed.append(exc)
                if first == "-":
                    first = repr(exc)
                inflight -= 1
                continue
            sel.unregister(tls)
            done.append(tls)
            inflight -= 1
    print(f"OPEN {len(done)} {len(failed)} {time.monotonic() - start:.1f} {first}", flush=True)
    sys.stdin.read()
    for tls in done:
        tls.close()
    print("CLOSED", flush=True)

main(*map(int, sys.argv[1:4]))
"""


def test_ten_thousand_idle_tls_connections_on_one_worker(
        tmp_path: Path, pki: TestPKI, backend_factory: BackendFactory, nofile: int) -> None:
    count = IDLE_CONNECTIONS
    if nofile < count + FD_HEADROOM:
        pytest.skip(f"RLIMIT_NOFILE {nofile} is too low for {count} connections")
    app = backend_factory("app")
    spec = simple_spec(tmp_path, cert=pki.issue(["127.0.0.1"]), backends={"app": app},
                       workers=1, server={"worker_connections": 20000,
                                          "client_header_timeout": 600,
                                          "keepalive_timeout": 600,
                                          "tls_handshake_timeout": 120})
    with Gateway(tmp_path, spec) as gw:
        worker = one_worker(gw)
        for _ in range(5):
            assert get_ok(gw.port, pki) == 200
        before = rss_kib(worker)
        fds_before = open_fds(worker)
        script = tmp_path / "idle_client.py"
        script.write_text(IDLE_CLIENT)
        started = time.monotonic()
        client = subprocess.Popen([sys.executable, str(script), str(gw.port), str(count), "100"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        assert client.stdin is not None and client.stdout is not None
        try:
            line = client.stdout.readline()
            assert line.startswith("OPEN"), (line, client.stderr.read() if client.stderr
                                             else "")
            _, opened, failed, seconds, _first = line.split(" ", 4)
            assert int(opened) == count and int(failed) == 0, line
            wait_for(lambda: value(scrape(gw), "gatewayd_worker_connections",
                                   pid=str(worker)) == count, 20,
                     f"{count} connections counted by the worker")
            after = rss_kib(worker)
            fds_after = open_fds(worker)
            per_conn = (after - before) / count
            print(f"\n{count} idle TLS 1.3 connections opened in {float(seconds):.1f}s; "
                  f"worker RSS {before} KiB -> {after} KiB: {per_conn:.1f} KiB per "
                  f"connection; fds {fds_before} -> {fds_after}")
            assert fds_after - fds_before >= count
            assert get_ok(gw.port, pki) == 200  # still serving with 10k idle clients
            assert gw.worker_pids() == [worker]
            assert per_conn <= KIB_PER_CONN_BOUND, f"{per_conn:.1f} KiB per idle connection"
        finally:
            if client.poll() is None:
                client.stdin.close()
                client.wait(60)
        wait_for(lambda: value(scrape(gw), "gatewayd_worker_connections",
                               pid=str(worker)) == 0, 30, "the worker to drop them all")
        # The spike's memory goes back to the system (workers/memtrim.py): without the
        # trim glibc kept ~90 % of it (335 of 374 MiB); with it, ~80 % is returned.
        limit = before + (after - before) // 2
        wait_for(lambda: rss_kib(worker) <= limit, 15,
                 f"worker RSS back to <= {limit} KiB (was {after} KiB with the connections)")
        print(f"total {time.monotonic() - started:.1f}s; RSS after close "
              f"{rss_kib(worker)} KiB")
        assert get_ok(gw.port, pki) == 200
        assert gw.worker_pids() == [worker]


# -- worker_connections ---------------------------------------------------------------


async def _hold_connections(port: int, count: int, limit: int, gw: Gateway,
                            worker: int) -> list[int]:
    """Open `count` TLS connections at once; only `limit` complete while they are held.
    Then release the established ones in turn (one request each, then close): the
    waiting ones are accepted as slots free up.  Returns the statuses."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    release = asyncio.Event()
    established = 0
    statuses: list[int] = []

    async def one() -> None:
        nonlocal established
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                       ssl_handshake_timeout=120)
        established += 1
        await release.wait()
        writer.write(b"GET /ok HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        status_line = await asyncio.wait_for(reader.readline(), 30)
        statuses.append(int(status_line.split()[1]))
        await reader.read()
        writer.close()

    tasks = [asyncio.create_task(one()) for _ in range(count)]
    deadline = time.monotonic() + 20
    while established < limit and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(2)  # would more be accepted, given time?
    held = established
    in_worker = value(await asyncio.to_thread(scrape, gw), "gatewayd_worker_connections",
                      pid=str(worker))
    print(f"\n{count} concurrent connections, worker_connections={limit}: {held} "
          f"established while held (worker gauge {in_worker:.0f})")
    assert held == limit
    assert 0 < in_worker <= limit
    release.set()
    done, pending = await asyncio.wait(tasks, timeout=60)
    for task in pending:
        task.cancel()
    errors = [t.exception() for t in done if t.exception() is not None]
    assert not pending and not errors, (len(pending), errors[:3])
    return statuses


def test_worker_connections_limit_holds_extra_connections_in_the_backlog(
        tmp_path: Path, pki: TestPKI, backend_factory: BackendFactory) -> None:
    app = backend_factory("app")
    limit, count = 50, 200
    spec = simple_spec(tmp_path, cert=pki.issue(["127.0.0.1"]), backends={"app": app},
                       workers=1, server={"worker_connections": limit,
                                          "client_header_timeout": 60,
                                          "keepalive_timeout": 60})
    with Gateway(tmp_path, spec) as gw:
        worker = one_worker(gw)
        statuses = asyncio.run(_hold_connections(gw.port, count, limit, gw, worker))
        assert statuses == [200] * count
        assert gw.worker_pids() == [worker] and gw.proc.alive
        assert get_ok(gw.port, pki) == 200


# -- file-descriptor exhaustion ----------------------------------------------------------


async def _flood(port: int, count: int, wait: float) -> tuple[list, list]:
    """Start `count` TLS handshakes; after `wait` s return (established, still pending)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE

    async def one() -> asyncio.StreamWriter:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                  ssl_handshake_timeout=60)
        return writer

    tasks = [asyncio.create_task(one()) for _ in range(count)]
    await asyncio.wait(tasks, timeout=wait)
    established = [t.result() for t in tasks if t.done() and t.exception() is None]
    pending = [t for t in tasks if not t.done()]
    failed = [t for t in tasks if t.done() and t.exception() is not None]
    print(f"flood: {len(established)} established, {len(pending)} pending, "
          f"{len(failed)} failed ({[repr(t.exception()) for t in failed[:2]]})")
    for writer in established:
        writer.transport.abort()
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return established, pending


def test_fd_exhaustion_pauses_accepting_and_recovers(
        tmp_path: Path, pki: TestPKI, backend_factory: BackendFactory) -> None:
    app = backend_factory("app")
    spec = simple_spec(tmp_path, cert=pki.issue(["127.0.0.1"]), backends={"app": app},
                       workers=1, server={"client_header_timeout": 60})
    with Gateway(tmp_path, spec) as gw:
        worker = one_worker(gw)
        assert get_ok(gw.port, pki) == 200  # an upstream connection is pooled now
        used = open_fds(worker)
        limit = max(64, used + 24)
        resource.prlimit(worker, resource.RLIMIT_NOFILE, (limit, limit))
        print(f"\nworker {worker}: {used} fds open, RLIMIT_NOFILE lowered to {limit}")
        established, pending = asyncio.run(_flood(gw.port, 3 * limit, 5))
        assert pending, "no connection had to wait: the limit was not reached"
        assert 0 < len(established) < limit
        log = gw.proc.stderr_text() + gw.proc.stdout_text()
        assert "accept failed" in log and "Too many open files" in log, log[-2000:]
        warnings = log.count("accept failed")
        print(f"'accept failed' logged {warnings} times")
        assert gw.worker_pids() == [worker] and gw.proc.alive
        # the clients are gone: the worker accepts and serves again (still under the limit)
        wait_for(lambda: open_fds(worker) < limit - 4, 20, "the worker to close the fds")
        statuses = [get_ok(gw.port, pki) for _ in range(5)]
        assert statuses == [200] * 5
        assert gw.worker_pids() == [worker]
        assert open_fds(worker) <= limit
