"""SIGHUP reloads, live (CONTRACT §8): a real master with forked workers, real backends,
real signals, wrk and stdlib clients.

Every wait is on a condition with a deadline (`wait_for`, `Proc.wait_for_output`); the only
sleeps are the deliberate pacing of a slow reader.  A reload is "done" when the master logs
``reloaded: generation N serving`` (it logs that once the new workers are ready and the
old ones have been told to drain).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding

from tests.support.backend import PATTERN_UNIT
from tests.support.gateway import Gateway, GatewaySpec, simple_spec
from tests.support.pki import Leaf, TestPKI
from tests.support.procs import (
    Backend,
    BackendFactory,
    Proc,
    fetch_peer_cert,
    free_port,
    https_connection,
    https_get,
    port_open,
    wait_for,
)

HOST = "127.0.0.1"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
#: How long a reload may take (the master's BOOT_TIMEOUT is 30 s) before a test gives up.
RELOAD_TIMEOUT = 40.0
SOAK_RELOADS = 20
#: The streamed download of the in-flight tests: large enough to outlast a reload.
BIG_BYTES = 300 * 1024 * 1024
READ_SIZE = 64 * 1024
#: The backend's /big pattern, long enough to slice any READ_SIZE piece at any phase.
_PATTERN_BLOCK = PATTERN_UNIT * (READ_SIZE // len(PATTERN_UNIT) + 2)


# -- helpers --------------------------------------------------------------------------


def _server(**settings: Any) -> dict[str, Any]:
    """``[server]`` overrides for one test: *settings* plus an admin_bind of its own (made
    once per test, so that reloads keep it), never the shared default port."""
    return {"admin_bind": f"{HOST}:{free_port()}", **settings}


def _spec(tmp: Path, *, cert: Leaf, one: Backend, two: Backend, target: str, port: int,
          server: dict[str, Any]) -> GatewaySpec:
    """One https listener on *port*: `/x` goes to pool *target*, everything else to "one".
    *server* comes from :func:`_server`."""
    spec = simple_spec(tmp, cert=cert, backends={"one": one, "two": two}, port=port,
                       server=server)
    spec.rules[0]["path_rules"] = [{"name": "x", "paths": ["/x"], "backend_pool": target,
                                    "backend_settings": f"{target}-tls"}]
    return spec


@contextmanager
def _gateway(tmp: Path, spec: GatewaySpec) -> Iterator[Gateway]:
    """A running gatewayd for *spec* (stopped at exit); a start-up failure shows its log."""
    with Gateway(tmp, spec, wait=False) as gw:
        try:
            gw.wait_ready(timeout=30)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{gw.proc.describe()}") from None
        yield gw


def _install(path: Path, text: str) -> None:
    """Replace the config file atomically (write a temp file, then rename over it)."""
    tmp = path.with_name(f".{path.name}.new")
    tmp.write_text(text)
    os.replace(tmp, path)


def _replace_file(src: Path, dst: Path) -> None:
    """Copy *src* over *dst* atomically."""
    tmp = dst.with_name(f".{dst.name}.new")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _hup(gw: Gateway, generation: int, timeout: float = RELOAD_TIMEOUT) -> float:
    """SIGHUP the master and wait for ``reloaded: generation N serving``.

    Fails at once (with the master's log) if the master refuses or fails the reload.
    Returns how long the reload took.
    """
    start_at = len(gw.proc.stderr_text())
    done = re.compile(rf"reloaded: generation {generation} serving")
    failed = re.compile(r"reload (refused|failed)")
    started = time.monotonic()
    gw.proc.signal(signal.SIGHUP)

    def reloaded() -> bool:
        text = gw.proc.stderr_text()[start_at:]
        if failed.search(text):
            raise AssertionError(f"reload to generation {generation} failed\n"
                                 f"{gw.proc.describe()}")
        if not gw.proc.alive:
            raise AssertionError(f"master exited during a reload\n{gw.proc.describe()}")
        return bool(done.search(text))

    try:
        wait_for(reloaded, timeout, f"reloaded: generation {generation} serving")
    except AssertionError as exc:
        if "timed out" in str(exc):
            raise AssertionError(f"{exc}\n{gw.proc.describe()}") from None
        raise
    return time.monotonic() - started


def _get_json(port: int, path: str, cafile: Path) -> dict[str, Any]:
    """One request on a fresh TLS connection; asserts 200 and returns the backend's echo."""
    status, _, body = https_get(HOST, port, path, sni=None, cafile=cafile, timeout=15)
    assert status == 200, (status, body[:300])
    echo: dict[str, Any] = json.loads(body)
    return echo


def _alive(pids: set[int]) -> set[int]:
    """The subset of *pids* that still exist (and are not zombies)."""
    alive = set()
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        if "\nState:\tZ" not in status:
            alive.add(pid)
    return alive


def _wait_exited(pids: set[int], timeout: float, what: str) -> None:
    """Wait until none of *pids* exists any more."""
    wait_for(lambda: not _alive(pids), timeout, f"{what} (pids {sorted(pids)}) to exit")


def _check_pattern(data: bytes, offset: int) -> None:
    """Assert *data* is the backend's /big pattern at stream *offset*."""
    start = offset % len(PATTERN_UNIT)
    if data != _PATTERN_BLOCK[start:start + len(data)]:
        raise AssertionError(f"/big body corrupted in the {len(data)} bytes at offset {offset}")


def _listen_inodes(port: int) -> set[str]:
    """Socket inodes of the LISTEN sockets on 127.0.0.1:*port* (from /proc/net/tcp)."""
    want = f"0100007F:{port:04X}"
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[1] == want and cols[3] == "0A":  # 0A = LISTEN
            inodes.add(cols[9])
    return inodes


def _holds(pid: int | str, inodes: set[str]) -> bool:
    """True if process *pid* has one of the socket *inodes* open."""
    try:
        links = {os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()}
    except OSError:
        return False
    return any(f"socket:[{inode}]" in links for inode in inodes)


def _listen_holders(port: int) -> list[str]:
    """``"pid (cmdline)"`` of every process holding a LISTEN socket on 127.0.0.1:*port*
    (diagnostics for assertion messages)."""
    inodes = _listen_inodes(port)
    holders = []
    for proc_dir in Path("/proc").iterdir():
        if proc_dir.name.isdigit() and _holds(proc_dir.name, inodes):
            try:
                cmdline = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            holders.append(f"{proc_dir.name} ({cmdline.strip()})")
    return holders


def _wait_stopped_accepting(pids: set[int], port: int, timeout: float = 10) -> None:
    """Wait until none of the (old) workers *pids* holds the listen socket of *port* any
    more: a retired worker closes it when it handles SIGTERM, and from then on every new
    connection goes to the new generation.

    Tests that are not about *when* the switch happens use this after :func:`_hup`;
    the soak test asserts that it has already happened when the reload is logged.
    """
    inodes = _listen_inodes(port)
    wait_for(lambda: not any(_holds(pid, inodes) for pid in pids), timeout,
             f"old workers {sorted(pids)} to stop accepting on port {port}")


# -- wrk --------------------------------------------------------------------------------


@dataclass
class WrkResult:
    """What one wrk run reports in its summary."""

    requests: int
    connect: int = 0
    read: int = 0
    write: int = 0
    timeout: int = 0
    non_2xx: int = 0
    text: str = ""

    @property
    def socket_errors(self) -> int:
        return self.connect + self.read + self.write + self.timeout

    @classmethod
    def parse(cls, text: str) -> WrkResult:
        total = re.search(r"^\s*(\d+) requests in ", text, re.MULTILINE)
        if total is None:
            raise AssertionError(f"no summary in wrk's output:\n{text}")
        result = cls(requests=int(total.group(1)), text=text)
        errors = re.search(
            r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
        if errors:
            result.connect, result.read, result.write, result.timeout = map(
                int, errors.groups())
        non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
        if non_2xx:
            result.non_2xx = int(non_2xx.group(1))
        return result


class Wrk:
    """A running ``wrk`` (stopped early with SIGINT, which still prints the summary)."""

    def __init__(self, url: str, *, connections: int, log_dir: Path, name: str,
                 headers: tuple[str, ...] = (), duration: float = 120) -> None:
        args: list[str] = [WRK, "-t", "1", "-c", str(connections), "-d", f"{duration:.0f}s",
                           "--timeout", "10s", "--latency"]
        for header in headers:
            args += ["-H", header]
        self.proc = Proc([*args, url], log_dir=log_dir, name=name)

    def stop(self) -> WrkResult:
        """SIGINT, wait for the summary, parse it; fails if wrk had already finished
        (its duration did not cover the whole test)."""
        assert self.proc.alive, f"wrk ended before the test did\n{self.proc.describe()}"
        self.proc.signal(signal.SIGINT)
        self.proc.wait(timeout=20)
        return WrkResult.parse(self.proc.stdout_text())

    def kill(self) -> None:
        if self.proc.alive:
            self.proc.kill()


# -- 1. reload under load ------------------------------------------------------------


def test_twenty_reloads_under_load_lose_no_request(tmp_path: Path, pki: TestPKI,
                                                   backend_factory: BackendFactory) -> None:
    """wrk (keep-alive and Connection: close) runs while 20 HUPs flip `/x` between two
    pools: every request succeeds, and each new config is in force once it is logged."""
    one = backend_factory("one", record=False)
    two = backend_factory("two", record=False)
    front = pki.issue([HOST])
    port = free_port()
    server = _server(graceful_timeout=10)
    specs = {target: _spec(tmp_path, cert=front, one=one, two=two, target=target, port=port,
                           server=server)
             for target in ("one", "two")}
    texts = {target: spec.render() for target, spec in specs.items()}
    with _gateway(tmp_path, specs["one"]) as gw:
        assert _get_json(port, "/x", pki.ca_pem_path)["backend"] == "one"
        url = f"https://{HOST}:{port}/x"
        loads = [Wrk(url, connections=8, log_dir=tmp_path, name="wrk-keepalive"),
                 Wrk(url, connections=4, log_dir=tmp_path, name="wrk-close",
                     headers=("Connection: close",))]
        try:
            # wrk traffic flows before the first HUP.
            wait_for(lambda: _backend_stats(one)["requests"] > 200, 20,
                     "wrk traffic to reach pool one")
            durations = []
            stale: list[str] = []  # reported after the soak, with wrk's figures
            for i in range(SOAK_RELOADS):
                target = "two" if i % 2 == 0 else "one"
                _install(gw.config_path, texts[target])
                durations.append(_hup(gw, generation=i + 2))
                if problem := _stale_config(port, target, pki.ca_pem_path):
                    stale.append(f"reload {i + 1} (generation {i + 2}): {problem}")
            # Some traffic on the last generation before stopping the load.
            last = two if SOAK_RELOADS % 2 else one
            before = _backend_stats(last)["requests"]
            wait_for(lambda: _backend_stats(last)["requests"] > before + 200, 20,
                     "wrk traffic on the last generation")
            results = [load.stop() for load in loads]
        finally:
            for load in loads:
                load.kill()
        # Old generations drain and exit; the master is back to exactly 2 workers.
        gw.wait_workers(2, timeout=30)
        assert gw.proc.alive
        keepalive, close = results
        total = sum(r.requests for r in results)
        failed = sum(r.socket_errors + r.non_2xx for r in results)
        resets = sum(r.read + r.write for r in results)
        print(f"\nreload soak: {total} requests sent, {failed} failed, {resets} resets over "
              f"{SOAK_RELOADS} reloads (keep-alive {keepalive.requests}, "
              f"Connection: close {close.requests}; reload took "
              f"{min(durations):.2f}-{max(durations):.2f} s, "
              f"mean {sum(durations) / len(durations):.2f} s)")
        assert not stale, ("new connections still served by the old config after "
                           "'reloaded: generation N serving':\n" + "\n".join(stale))
        for name, result in (("keep-alive", keepalive), ("Connection: close", close)):
            assert result.requests > 100, f"wrk {name} barely ran:\n{result.text}"
            assert result.socket_errors == 0, f"wrk {name} socket errors:\n{result.text}"
            assert result.non_2xx == 0, f"wrk {name} non-2xx responses:\n{result.text}"


def _stale_config(port: int, target: str, cafile: Path) -> str | None:
    """None if a fresh connection's `/x` reaches pool *target* at once; otherwise how long
    (and for how many fresh connections) the old config kept answering."""
    reloaded_at = time.monotonic()
    seen = []

    def switched() -> bool:
        seen.append(_get_json(port, "/x", cafile)["backend"])
        return seen[-1] == target

    if switched():
        return None
    try:
        wait_for(switched, 5, f"fresh connections to reach pool {target}")
    except AssertionError:
        return f"{len(seen)} fresh connections in 5 s all went to the old pool {seen[0]!r}"
    return (f"{len(seen) - 1} fresh connection(s) went to the old pool {seen[0]!r}; the "
            f"next one, done {1000 * (time.monotonic() - reloaded_at):.0f} ms after the log "
            f"line, reached {target!r}")


def _backend_stats(backend: Backend) -> dict[str, int]:
    """The backend's own counters (``/stats`` is not counted as a request)."""
    status, _, body = https_get(HOST, backend.port, "/stats", sni=None, cafile=None)
    assert status == 200
    stats: dict[str, int] = json.loads(body)
    return stats


# -- 2. an invalid config on HUP -----------------------------------------------------------


def test_invalid_config_on_hup_keeps_the_running_generation(
        tmp_path: Path, pki: TestPKI, backend_factory: BackendFactory) -> None:
    """A broken file is refused with FILE:LINE: problems; nothing changes; a fixed file
    then reloads normally."""
    one = backend_factory("one")
    two = backend_factory("two")
    front = pki.issue([HOST])
    port = free_port()
    server = _server()
    spec_a = _spec(tmp_path, cert=front, one=one, two=two, target="one", port=port,
                   server=server)
    with _gateway(tmp_path, spec_a) as gw:
        assert _get_json(port, "/x", pki.ca_pem_path)["backend"] == "one"
        pids = sorted(gw.worker_pids())
        broken = _spec(tmp_path, cert=front, one=one, two=two, target="two", port=port,
                       server=server)
        broken.rules[0]["path_rules"][0]["backend_pool"] = "missing-pool"
        _install(gw.config_path, broken.render())
        start_at = len(gw.proc.stderr_text())
        gw.proc.signal(signal.SIGHUP)
        gw.proc.wait_for_output(r"reload refused, keeping the running config:", 15, "stderr")
        config = re.escape(str(gw.config_path))
        problem = wait_for(
            lambda: re.search(rf"^{config}:\d+:.*missing-pool", gw.proc.stderr_text()[start_at:],
                              re.MULTILINE),
            5, "the FILE:LINE: problem line")
        assert problem
        assert "reloaded:" not in gw.proc.stderr_text()[start_at:]
        assert gw.proc.alive, gw.proc.describe()
        assert sorted(gw.worker_pids()) == pids
        for _ in range(4):
            assert _get_json(port, "/x", pki.ca_pem_path)["backend"] == "one"
        # The same generation number is still free: the refused file built nothing.
        fixed = _spec(tmp_path, cert=front, one=one, two=two, target="two", port=port,
                      server=server)
        _install(gw.config_path, fixed.render())
        _hup(gw, generation=2)
        _wait_stopped_accepting(set(pids), port)
        assert _get_json(port, "/x", pki.ca_pem_path)["backend"] == "two"
        gw.wait_workers(2)
        assert not set(gw.worker_pids()) & set(pids)
        assert gw.proc.alive


# -- 3. in-flight work across a reload ----------------------------------------------------


@dataclass
class _Outcome:
    """How one client request ended (filled in by its thread)."""

    status: int = 0
    length: int = 0
    body: bytes = b""
    error: BaseException | None = None
    ended: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)


def _in_thread(target: Callable[[_Outcome], None]) -> _Outcome:
    """Run *target(outcome)* in a daemon thread; exceptions land in ``outcome.error``."""
    outcome = _Outcome()

    def run() -> None:
        try:
            target(outcome)
        except BaseException as exc:  # reported by the test through outcome.error
            outcome.error = exc
        finally:
            outcome.ended = time.monotonic()
            outcome.done.set()

    threading.Thread(target=run, daemon=True).start()
    return outcome


def _slow_request(port: int, delay: float) -> Callable[[_Outcome], None]:
    def run(outcome: _Outcome) -> None:
        conn = https_connection(HOST, port, sni=None, cafile=None, timeout=60)
        try:
            conn.request("GET", f"/slow?delay={delay:g}")
            resp = conn.getresponse()
            outcome.status = resp.status
            outcome.body = resp.read()
        finally:
            conn.close()

    return run


def _open_big(port: int) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Start the /big download; returns once the response head has arrived."""
    conn = https_connection(HOST, port, sni=None, cafile=None, timeout=60)
    conn.request("GET", f"/big?bytes={BIG_BYTES}")
    resp = conn.getresponse()
    assert resp.status == 200
    assert int(resp.headers["Content-Length"]) == BIG_BYTES
    return conn, resp


def _read_big(resp: http.client.HTTPResponse, offset: int, limit: int,
              pace: float = 0.0) -> int:
    """Read and check the /big body from *offset* up to *limit* bytes in READ_SIZE
    pieces, sleeping *pace* s between reads (a slow client); returns the new offset."""
    while offset < limit:
        data = resp.read(min(READ_SIZE, limit - offset))
        if not data:
            raise http.client.IncompleteRead(b"", BIG_BYTES - offset)
        _check_pattern(data, offset)
        offset += len(data)
        if pace:
            time.sleep(pace)
    return offset


def _wait_slow_at_backend(backend: Backend) -> None:
    wait_for(lambda: any(r["target"].startswith("/slow") for r in backend.records()), 10,
             "the slow request to reach the backend")


def test_in_flight_requests_finish_across_a_reload(
        tmp_path: Path, pki: TestPKI, backend_factory: BackendFactory) -> None:
    """graceful_timeout 30: a 10 s request and a 300 MB download started before the HUP
    both complete, intact, after the reload; then the old workers exit."""
    one = backend_factory("one")
    two = backend_factory("two")
    port = free_port()
    cert = pki.issue([HOST])
    server = _server(graceful_timeout=30)
    spec = _spec(tmp_path, cert=cert, one=one, two=two, target="one", port=port, server=server)
    with _gateway(tmp_path, spec) as gw:
        old = set(gw.worker_pids())
        slow = _in_thread(_slow_request(port, 10))
        _wait_slow_at_backend(one)
        conn, resp = _open_big(port)
        try:
            offset = _read_big(resp, 0, 4 * READ_SIZE)
            _install(gw.config_path, _spec(tmp_path, cert=cert, one=one, two=two,
                                           target="two", port=port, server=server).render())
            _hup(gw, generation=2)
            reloaded_at = time.monotonic()
            _wait_stopped_accepting(old, port)
            assert _get_json(port, "/x", pki.ca_pem_path)["backend"] == "two"
            assert _alive(old), "every old worker exited with requests in flight"
            assert not slow.done.is_set(), "the slow request ended before the reload"
            offset = _read_big(resp, offset, BIG_BYTES)
            assert resp.read() == b""
            big_done = time.monotonic()
        finally:
            conn.close()
        assert offset == BIG_BYTES
        assert big_done > reloaded_at
        assert slow.done.wait(30), "the slow request never finished"
        assert slow.error is None, f"slow request failed: {slow.error!r}"
        assert slow.status == 200 and json.loads(slow.body)["backend"] == "one"
        assert slow.ended > reloaded_at
        _wait_exited(old, 15, "the drained old workers")
        gw.wait_workers(2)


def test_in_flight_requests_are_cut_after_graceful_timeout(
        tmp_path: Path, pki: TestPKI, backend_factory: BackendFactory) -> None:
    """graceful_timeout 2: the same in-flight requests are cut ~2 s after the old workers
    were told to drain, and the old workers exit."""
    one = backend_factory("one")
    two = backend_factory("two")
    port = free_port()
    cert = pki.issue([HOST])
    server = _server(graceful_timeout=2)
    spec = _spec(tmp_path, cert=cert, one=one, two=two, target="one", port=port, server=server)
    with _gateway(tmp_path, spec) as gw:
        old = set(gw.worker_pids())
        slow = _in_thread(_slow_request(port, 20))
        _wait_slow_at_backend(one)
        conn, resp = _open_big(port)
        started = threading.Event()

        def download(outcome: _Outcome) -> None:
            outcome.length = _read_big(resp, 0, 4 * READ_SIZE)
            started.set()
            # ~13 MB/s at most: 300 MB would take far longer than graceful_timeout.
            outcome.length = _read_big(resp, outcome.length, BIG_BYTES, pace=0.005)

        try:
            big = _in_thread(download)
            assert started.wait(10), f"the download did not start: {big.error!r}"
            _install(gw.config_path, _spec(tmp_path, cert=cert, one=one, two=two,
                                           target="two", port=port, server=server).render())
            hup_at = time.monotonic()
            _hup(gw, generation=2)
            _wait_stopped_accepting(old, port)
            assert _get_json(port, "/x", pki.ca_pem_path)["backend"] == "two"
            assert slow.done.wait(15) and big.done.wait(15), "in-flight requests not cut"
        finally:
            conn.close()
        print(f"\ngraceful_timeout 2: slow request cut {slow.ended - hup_at:.2f} s, download "
              f"cut {big.ended - hup_at:.2f} s after the HUP ({big.length} bytes read)")
        for name, outcome in (("slow", slow), ("download", big)):
            assert outcome.error is not None, f"{name} was not cut: {outcome}"
            assert isinstance(outcome.error, (http.client.HTTPException, ConnectionError,
                                              ssl.SSLError)), (name, repr(outcome.error))
            cut = outcome.ended - hup_at
            assert 1.5 <= cut <= 8, f"{name} cut {cut:.2f} s after the HUP"
        assert big.length < BIG_BYTES
        _wait_exited(old, 10, "the old workers")
        gw.wait_workers(2)
        assert gw.proc.alive


# -- 4. listener changes ------------------------------------------------------------------


def test_hup_adds_then_removes_a_listener(tmp_path: Path, pki: TestPKI,
                                          backend_factory: BackendFactory) -> None:
    """A listener added by a reload serves as soon as the reload is logged; once it is
    removed and the old workers have drained, its port refuses connections."""
    one = backend_factory("one")
    two = backend_factory("two")
    port, port2 = free_port(), free_port()
    cert = pki.issue([HOST])
    server = _server()
    base = _spec(tmp_path, cert=cert, one=one, two=two, target="one", port=port, server=server)
    wider = _spec(tmp_path, cert=cert, one=one, two=two, target="one", port=port, server=server)
    wider.listeners.append({"name": "second", "bind": f"{HOST}:{port2}", "protocol": "https",
                            "certificate": str(cert.cert_path),
                            "private_key": str(cert.key_path)})
    wider.rules.append({"name": "second", "priority": 20, "listener": "second",
                        "backend_pool": "two", "backend_settings": "two-tls"})
    with _gateway(tmp_path, base) as gw:
        assert not port_open(HOST, port2)
        _install(gw.config_path, wider.render())
        _hup(gw, generation=2)
        assert _get_json(port2, "/", pki.ca_pem_path)["backend"] == "two"
        assert _get_json(port, "/", pki.ca_pem_path)["backend"] == "one"
        serving_second = set(gw.worker_pids())

        _install(gw.config_path, base.render())
        _hup(gw, generation=3)
        assert _get_json(port, "/", pki.ca_pem_path)["backend"] == "one"
        _wait_exited(serving_second, 15, "the workers of the two-listener generation")
        gw.wait_workers(2)
        try:
            with socket.create_connection((HOST, port2), timeout=3):
                pass
        except ConnectionRefusedError:
            pass
        else:
            raise AssertionError(
                f"{HOST}:{port2} still accepts connections after its listener was removed "
                f"and the old workers exited; LISTEN socket held by: "
                f"{_listen_holders(port2)} (master {gw.proc.pid}, "
                f"workers {gw.worker_pids()})")


def test_hup_picks_up_a_replaced_certificate(tmp_path: Path, pki: TestPKI,
                                             backend_factory: BackendFactory) -> None:
    """A certificate file replaced on disk + HUP: new TLS connections get the new
    certificate; a keep-alive connection from before the HUP serves one more request."""
    one = backend_factory("one")
    two = backend_factory("two")
    port = free_port()
    cert = pki.issue(["front.example.test", HOST], stem="front")
    rotated = pki.issue(["rotated.example.test", HOST], stem="rotated")
    assert rotated.cert.serial_number != cert.cert.serial_number
    old_der = cert.cert.public_bytes(Encoding.DER)
    new_der = rotated.cert.public_bytes(Encoding.DER)
    spec = _spec(tmp_path, cert=cert, one=one, two=two, target="one", port=port,
                 server=_server())
    with _gateway(tmp_path, spec) as gw:
        assert fetch_peer_cert(HOST, port, sni=None) == old_der
        old = set(gw.worker_pids())
        kept = https_connection(HOST, port, sni=None, cafile=pki.ca_pem_path, timeout=15)
        try:
            kept.request("GET", "/x")
            first = kept.getresponse()
            assert first.status == 200 and json.loads(first.read())["backend"] == "one"
            assert not first.will_close
            assert isinstance(kept.sock, ssl.SSLSocket)
            assert kept.sock.getpeercert(binary_form=True) == old_der
            _replace_file(rotated.key_path, cert.key_path)
            _replace_file(rotated.cert_path, cert.cert_path)
            _hup(gw, generation=2)
            # The kept connection is answered (by its old, draining worker).
            kept.request("GET", "/x")
            second = kept.getresponse()
            assert second.status == 200 and json.loads(second.read())["backend"] == "one"
        finally:
            kept.close()
        _wait_stopped_accepting(old, port)
        for _ in range(4):  # new connections, whichever worker takes them
            assert fetch_peer_cert(HOST, port, sni=None) == new_der
        status, _, _ = https_get(HOST, port, "/x", sni="rotated.example.test",
                                 cafile=pki.ca_pem_path)
        assert status == 200
