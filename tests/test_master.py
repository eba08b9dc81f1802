"""The master (arbiter), live: real forked workers, real signals, real systemd protocols.

Every test runs `python -m gatewayd.cli -c FILE` as its own process group (see
tests/support/gateway.py) in front of a real TLS backend, and waits on observable
conditions (heartbeat files, /proc children, log lines, notify datagrams) with deadlines.
CONTRACT.md §2 (exit codes), §8 (signals), §9 (systemd).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway import Gateway, GatewaySpec, simple_spec
from tests.support.pki import TestPKI
from tests.support.procs import (
    REPO_ROOT,
    BackendFactory,
    Proc,
    free_port,
    https_get,
    wait_for,
)

# -- helpers ----------------------------------------------------------------------------

_LOG_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def _spec(tmp_path: Path, pki: TestPKI, backend_factory: BackendFactory, *,
          workers: int = 2, port: int | None = None, **server: Any) -> GatewaySpec:
    """One https listener on 127.0.0.1 in front of one real TLS backend; the admin
    endpoint on a free port (never the shared default 9180)."""
    backend = backend_factory("app")
    front = pki.issue(["127.0.0.1", "localhost"])
    server.setdefault("admin_bind", f"127.0.0.1:{free_port()}")
    return simple_spec(tmp_path, cert=front, backends={"app": backend}, port=port,
                       workers=workers, server=server)


def _status(port: int, path: str = "/", timeout: float = 10.0) -> int:
    """One request on a fresh TLS connection; the HTTP status (raises on I/O errors)."""
    status, _, _ = https_get("127.0.0.1", port, path, sni=None, cafile=None,
                             timeout=timeout)
    return status


def _running(pid: int) -> bool:
    """True if `pid` exists and is not a zombie (orphans may be reparented to a PID 1
    that does not reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _children(pid: int) -> list[int]:
    """Live children of `pid` (for processes not started through `Gateway`)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split() if _running(int(p))]


def _admin_pid(runtime_dir: Path) -> int:
    """The admin process's pid from the master's state file (0 if unknown)."""
    try:
        return int(json.loads((runtime_dir / "state.json").read_text()).get("admin_pid", 0))
    except (OSError, ValueError):
        return 0


def _listed_workers(runtime_dir: Path) -> set[int]:
    """Worker pids from the master's state file (not the admin process or the prober)."""
    try:
        return set(json.loads((runtime_dir / "state.json").read_text())["worker_pids"])
    except (OSError, ValueError, KeyError):
        return set()


def _settled_workers(gw: Gateway, count: int, timeout: float = 10.0) -> list[int]:
    """The worker pids once exactly `count` have booted and the master's state file agrees
    (until it is published, `Gateway.worker_pids` cannot tell the admin process apart)."""

    def settled() -> list[int] | None:
        pids = sorted(gw.worker_pids())
        beats = gw.heartbeats()
        if len(pids) == count == len(beats) and pids == sorted(
                gw.state().get("worker_pids", [])):
            return pids
        return None

    return wait_for(settled, timeout, f"{count} settled workers")


def _fd_targets(pid: int) -> list[str]:
    """What each open fd of `pid` points at (paths, `socket:[inode]`, ...)."""
    targets = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                targets.append(os.readlink(entry.path))
    return targets


def _log_times(text: str, pattern: str) -> list[float]:
    """Timestamps (epoch seconds, ms resolution) of the log lines matching `pattern`."""
    rx = re.compile(pattern)
    times = []
    for line in text.splitlines():
        stamp = _LOG_STAMP.match(line)
        if stamp and rx.search(line):
            parsed = dt.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f")
            times.append(parsed.timestamp())
    return times


def _request_in_thread(port: int, path: str, timeout: float) -> tuple[threading.Thread,
                                                                       dict[str, Any]]:
    """Start one request in a thread; its outcome lands in the returned dict
    (`status` or `error`, and `elapsed`)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            outcome["status"] = _status(port, path, timeout)
        except Exception as exc:  # the outcome is what the test inspects
            outcome["error"] = repr(exc)
        outcome["elapsed"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


@dataclass
class _Load:
    """`threads` clients, each sending requests back to back on new connections, until
    `stop()` (or a hard bound of `max_seconds` / `max_requests` per thread)."""

    port: int
    threads: int = 3
    max_seconds: float = 20.0
    max_requests: int = 5000
    results: list[tuple[float, float, str | None]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> _Load:
        for _ in range(self.threads):
            thread = threading.Thread(target=self._client, daemon=True)
            thread.start()
            self._workers.append(thread)
        return self

    def _client(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        for _ in range(self.max_requests):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            started = time.monotonic()
            error: str | None = None
            try:
                status = _status(self.port, "/", timeout=5.0)
                if status != 200:
                    error = f"status {status}"
            except Exception as exc:  # recorded, judged by the test
                error = repr(exc)
            with self._lock:
                self.results.append((started, time.monotonic(), error))

    def snapshot(self) -> list[tuple[float, float, str | None]]:
        with self._lock:
            return list(self.results)

    def stop(self) -> list[tuple[float, float, str | None]]:
        self._stop.set()
        for thread in self._workers:
            thread.join(10)
            assert not thread.is_alive(), "a load client hung"
        return self.snapshot()


# -- supervision: dead and stalled workers -----------------------------------------------


def test_sigkilled_worker_under_load_is_replaced_within_a_second(
        tmp_path: Path, pki: TestPKI, backend_factory: BackendFactory) -> None:
    """kill -9 one of two workers while clients hammer the gateway: a replacement serves
    within 1 s; only requests in flight on the victim may fail."""
    spec = _spec(tmp_path, pki, backend_factory, workers=2)
    with Gateway(tmp_path, spec) as gw:
        load = _Load(gw.port, threads=3).start()
        try:
            wait_for(lambda: sum(1 for r in load.snapshot() if r[2] is None) >= 20, 10,
                     "20 requests served before the kill")
            victim = _settled_workers(gw, 2)[0]
            before = set(gw.heartbeats())
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)

            def replaced() -> bool:
                pids = gw.worker_pids()
                beats = set(gw.heartbeats())
                return (victim not in pids and len(pids) == 2 and len(beats) == 2
                        and bool(beats - before))

            wait_for(replaced, 5, "a replacement worker", interval=0.005)
            ready_at = time.monotonic()
            replacement = ready_at - killed_at
            print(f"\nreplacement worker ready {replacement * 1000:.0f} ms after SIGKILL")
            wait_for(lambda: sum(1 for r in load.snapshot()
                                 if r[0] > ready_at and r[2] is None) >= 30, 10,
                     "30 requests served after the replacement")
        finally:
            results = load.stop()
        failed = [r for r in results if r[2] is not None]
        late = [r for r in failed if r[0] >= ready_at]
        print(f"{len(results)} requests, {len(failed)} failed: {[r[2] for r in failed]}")
        assert replacement < 1.0, f"replacement took {replacement:.3f} s\n{gw.proc.describe()}"
        assert len(failed) <= load.threads, failed  # at most one in flight per client
        assert not late, f"requests failed after the replacement was up: {late}"
        assert all(r[0] <= ready_at for r in failed)
        assert re.search(rf"worker {victim} exited \(killed by SIGKILL\)",
                         gw.proc.stderr_text()), gw.proc.describe()


def test_stopped_worker_is_killed_after_worker_timeout_and_replaced(
        tmp_path: Path, pki: TestPKI, backend_factory: BackendFactory) -> None:
    """SIGSTOP freezes a worker's event loop: its heartbeat goes stale, and after
    worker_timeout (2 s) the master SIGKILLs it, logs why, and forks a replacement."""
    spec = _spec(tmp_path, pki, backend_factory, workers=2, worker_timeout=2)
    with Gateway(tmp_path, spec) as gw:
        victim = _settled_workers(gw, 2)[0]
        stopped_at = time.monotonic()
        os.kill(victim, signal.SIGSTOP)
        try:
            wait_for(lambda: not _running(victim), 8, f"stopped worker {victim} to be killed")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGCONT)
        elapsed = time.monotonic() - stopped_at
        print(f"\nstalled worker killed {elapsed:.2f} s after SIGSTOP")
        # The last heartbeat is up to 1 s older than the SIGSTOP; the master checks at
        # least once a second.
        assert 1.0 <= elapsed <= 4.5, elapsed
        gw.wait_workers(2, timeout=5)
        assert victim not in gw.worker_pids()
        log = gw.proc.stderr_text()
        assert re.search(rf"worker {victim} missed its heartbeat", log), gw.proc.describe()
        assert re.search(rf"worker {victim} exited \(killed by SIGKILL\)", log), log
        assert _status(gw.port) == 200


def test_crash_loop_backs_off_and_keeps_serving(
        tmp_path: Path, pki: TestPKI, backend_factory: BackendFactory) -> None:
    """Replacements that cannot boot (the access log path became a directory) are retried
    with growing gaps, not in a fork loop; the surviving worker keeps serving."""
    logs = tmp_path / "logs"
    logs.mkdir()
    access_log = logs / "access.log"
    spec = _spec(tmp_path, pki, backend_factory, workers=2, access_log=str(access_log))
    with Gateway(tmp_path, spec) as gw:
        assert _status(gw.port) == 200
        access_log.rename(logs / "access.log.old")
        access_log.mkdir()  # os.open(O_WRONLY|O_APPEND|O_CREAT) → EISDIR, even for root
        victim, survivor = _settled_workers(gw, 2)
        killed_at = time.time()
        os.kill(victim, signal.SIGKILL)
        served = 0
        most_children = 0

        def failed_boots() -> list[float]:
            return [t for t in _log_times(gw.proc.stderr_text(),
                                          r"exited \(.*\) before it was ready")
                    if t >= killed_at - 0.01]

        def backed_off() -> bool:
            """Serving all along; done once 4 s passed and the back-off shows a gap of
            at least 1.5 s between two failed boots."""
            nonlocal served, most_children
            assert gw.proc.alive, gw.proc.describe()
            most_children = max(most_children, len(gw.children()))
            assert _status(gw.port, timeout=5) == 200
            served += 1
            failures = failed_boots()
            return time.time() - killed_at >= 4.0 and any(
                b - a >= 1.5 for a, b in itertools.pairwise(failures))

        wait_for(backed_off, 15, "failed boots to back off to >= 1.5 s", interval=0.05)
        observed = time.time() - killed_at
        assert _running(survivor) and survivor in gw.worker_pids()
        failures = failed_boots()
        gaps = [b - a for a, b in itertools.pairwise(failures)]
        first_4s = [t for t in failures if t < killed_at + 4.0]
        print(f"\n{len(failures)} failed boots in {observed:.1f} s ({len(first_4s)} in the "
              f"first 4 s), gaps {[round(g, 2) for g in gaps]}, {served} requests served")
        log = gw.proc.stderr_text()
        assert 2 <= len(first_4s) <= 12, log[-3000:]
        # Two workers (one of them failing), the admin process and the prober: never a
        # pile of half-booted children.
        assert most_children <= 4
        assert gaps[-1] >= 1.5 and gaps[-1] > 1.5 * gaps[0], gaps
        assert "Is a directory" in log


# -- boot failures on the first start: exit 3 -------------------------------------------


def test_listen_port_taken_exits_3_naming_the_address(
        tmp_path: Path, pki: TestPKI, backend_factory: BackendFactory) -> None:
    """Another socket holds the listen address: exit status 3, stderr names it."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        spec = _spec(tmp_path, pki, backend_factory, port=port)
        gw = Gateway(tmp_path, spec, wait=False)
        with gw:
            rc = gw.proc.wait(15)
        err = gw.proc.stderr_text()
        assert rc == 3, gw.proc.describe()
        assert f"127.0.0.1:{port}" in err, err


def test_worker_that_cannot_boot_exits_3_promptly(
        tmp_path: Path, pki: TestPKI, backend_factory: BackendFactory) -> None:
    """Workers fail at boot on the first start (access_log is a directory): the master
    exits 3 with the reason on stderr, after at most one round of forks."""
    bad = tmp_path / "access-is-a-dir"
    bad.mkdir()
    spec = _spec(tmp_path, pki, backend_factory, workers=2, access_log=str(bad))
    started = time.monotonic()
    gw = Gateway(tmp_path, spec, wait=False)
    with gw:
        rc = gw.proc.wait(15)
    elapsed = time.monotonic() - started
    err = gw.proc.stderr_text()
    print(f"\nexit {rc} after {elapsed:.2f} s")
    assert rc == 3, gw.proc.describe()
    assert elapsed < 8, elapsed
    assert "Is a directory" in err and str(bad) in err, err
    assert len(re.findall(r"worker failed to boot", err)) <= 2, err
    assert len(re.findall(r"before it was ready", err)) <= 2, err


def test_workers_exit_when_the_master_is_killed(
        tmp_path: Path, pki: TestPKI, backend_factory: BackendFactory) -> None:
    """SIGKILL the master: its orphaned children (workers, and the admin process if any)
    notice and exit within ~3 s."""
    spec = _spec(tmp_path, pki, backend_factory, workers=2)
    with Gateway(tmp_path, spec) as gw:
        _settled_workers(gw, 2)
        workers = _children(gw.proc.pid)
        killed_at = time.monotonic()
        gw.proc.signal(signal.SIGKILL)
        gw.proc.wait(5)
        wait_for(lambda: not any(_running(pid) for pid in workers), 3.5,
                 f"orphaned workers {workers} to exit")
        print(f"\norphans gone {time.monotonic() - killed_at:.2f} s after the master died")


# -- signals ----------------------------------------------------------------------------


def test_ttin_ttou_change_the_worker_count(
        tmp_path: Path, pki: TestPKI, backend_factory: BackendFactory) -> None:
    """TTIN adds a worker (2 → 3); two TTOU retire two (3 → 1); all keep serving."""
    spec = _spec(tmp_path, pki, backend_factory, workers=2)
    with Gateway(tmp_path, spec) as gw:
        gw.proc.signal(signal.SIGTTIN)
        gw.wait_workers(3, timeout=5)
        assert _status(gw.port) == 200
        gw.proc.signal(signal.SIGTTOU)
        gw.wait_workers(2, timeout=10)
        gw.proc.signal(signal.SIGTTOU)
        gw.wait_workers(1, timeout=10)
        for _ in range(5):
            assert _status(gw.port) == 200
        assert gw.proc.alive
        assert len(gw.worker_pids()) == 1 and len(gw.heartbeats()) == 1


def test_usr1_reopens_the_access_log(
        tmp_path: Path, pki: TestPKI, backend_factory: BackendFactory) -> None:
    """logrotate style: rename access.log, USR1; later records go to a fresh access.log,
    none to the renamed one."""
    spec = _spec(tmp_path, pki, backend_factory, workers=2)
    with Gateway(tmp_path, spec) as gw:
        log, rotated = gw.access_log, Path(f"{gw.access_log}.1")
        for i in range(4):
            assert _status(gw.port, f"/before/{i}") == 200
        gw.wait_log(lambda r: r["uri"] == "/before/3")
        log.rename(rotated)
        for i in range(2):  # still written to the renamed file (workers hold it open)
            assert _status(gw.port, f"/between/{i}") == 200
        wait_for(lambda: rotated.read_text().count("/between/1") == 1, 5,
                 "the last record before USR1 in the renamed file")
        workers = _settled_workers(gw, 2)
        gw.proc.signal(signal.SIGUSR1)

        def reopened() -> bool:
            for pid in workers:
                targets = _fd_targets(pid)
                if str(rotated) in targets or str(log) not in targets:
                    return False
            return True

        wait_for(reopened, 5, "every worker to reopen the access log")
        for i in range(10):
            assert _status(gw.port, f"/after/{i}") == 200
        wait_for(lambda: len(gw.log_records()) >= 10, 5, "10 records in the fresh log")
        fresh = [r["uri"] for r in gw.log_records()]
        old = [line for line in rotated.read_text().splitlines() if line.strip()]
        assert sorted(fresh) == sorted(f"/after/{i}" for i in range(10))
        assert len(old) == 6 and not any("/after/" in line for line in old), old


def test_term_drains_in_flight_request_and_removes_pidfile(
        tmp_path: Path, pki: TestPKI, backend_factory: BackendFactory) -> None:
    """TERM with a 2 s request in flight: it completes with 200, the master exits 0;
    the pidfile holds the master pid while running and is gone afterwards."""
    pidfile = tmp_path / "gatewayd.pid"
    spec = _spec(tmp_path, pki, backend_factory, workers=2, pidfile=str(pidfile))
    with Gateway(tmp_path, spec) as gw:
        assert pidfile.read_text().strip() == str(gw.proc.pid)
        thread, outcome = _request_in_thread(gw.port, "/slow?delay=2", timeout=15)
        wait_for(lambda: _backend_saw(tmp_path, "/slow?delay=2"), 5,
                 "the slow request to reach the backend")
        term_at = time.monotonic()
        gw.proc.signal(signal.SIGTERM)
        rc = gw.proc.wait(15)
        stopped = time.monotonic() - term_at
        thread.join(5)
        print(f"\nTERM → exit {rc} in {stopped:.2f} s; request: {outcome}")
        assert outcome.get("status") == 200, (outcome, gw.proc.describe())
        assert rc == 0, gw.proc.describe()
        assert not pidfile.exists()


def test_quit_stops_fast_despite_a_long_request(
        tmp_path: Path, pki: TestPKI, backend_factory: BackendFactory) -> None:
    """QUIT with a 20 s request in flight: the master is gone in < 3 s."""
    spec = _spec(tmp_path, pki, backend_factory, workers=2)
    with Gateway(tmp_path, spec) as gw:
        workers = _children(gw.proc.pid)
        thread, outcome = _request_in_thread(gw.port, "/slow?delay=20", timeout=30)
        wait_for(lambda: _backend_saw(tmp_path, "/slow?delay=20"), 5,
                 "the slow request to reach the backend")
        quit_at = time.monotonic()
        gw.proc.signal(signal.SIGQUIT)
        rc = gw.proc.wait(10)
        stopped = time.monotonic() - quit_at
        print(f"\nQUIT → exit {rc} in {stopped:.2f} s")
        assert stopped < 3.0, gw.proc.describe()
        assert rc == 0, gw.proc.describe()
        assert not any(_running(pid) for pid in workers)
        thread.join(5)
        assert "status" not in outcome, outcome  # cut, not answered


def _backend_saw(tmp_path: Path, target: str) -> bool:
    """True once the backend named "app" recorded a request for `target` (it records
    before it answers, so the request is then in flight in the gateway)."""
    path = tmp_path / "backends" / "app.records.jsonl"
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines(keepends=True):
            if line.endswith("\n") and json.loads(line).get("target") == target:
                return True
    return False


# -- systemd ----------------------------------------------------------------------------


class _NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, directory: Path) -> None:
        self.proc: Proc | None = None  # set once the master runs: wait() fails if it dies
        path = directory / "notify.sock"
        self._tmpdir: str | None = None
        if len(str(path)) > 100:  # sun_path is 108 bytes
            self._tmpdir = tempfile.mkdtemp(prefix="gwn-", dir="/tmp")
            path = Path(self._tmpdir) / "notify.sock"
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[tuple[float, str]] = []

    def _drain(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def wait(self, predicate: Callable[[str], bool], after: int, timeout: float,
             what: str) -> int:
        """Index of the first message at index ≥ `after` matching `predicate`."""

        def find() -> int | None:
            proc = self.proc
            exited = proc is not None and not proc.alive
            self._drain()
            for index in range(after, len(self.messages)):
                if predicate(self.messages[index][1]):
                    return index + 1  # truthy even for message 0
            if exited and proc is not None:
                raise AssertionError(f"master exited while waiting for {what}; got "
                                     f"{self.texts()}\n{proc.describe()}")
            return None

        return wait_for(find, timeout, what) - 1

    def texts(self) -> list[str]:
        self._drain()
        return [text for _, text in self.messages]

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)


def _fields(message: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message.splitlines() if "=" in line)


def test_systemd_notify_ready_reload_and_stop(
        tmp_path: Path, pki: TestPKI, backend_factory: BackendFactory) -> None:
    """READY=1 once workers serve; RELOADING=1 + MONOTONIC_USEC then READY=1 around a
    HUP; `reload failed` in STATUS for a bad config; STOPPING=1 on TERM."""
    spec = _spec(tmp_path, pki, backend_factory, workers=2)
    notify = _NotifySocket(tmp_path)
    try:
        gw = Gateway(tmp_path, spec, env={"NOTIFY_SOCKET": str(notify.path)}, wait=False)
        notify.proc = gw.proc
        with gw:
            first = notify.wait(lambda m: "READY=1" in m.splitlines(), 0, 20, "READY=1")
            assert _status(gw.port) == 200  # right after READY=1: workers serve
            status = _fields(notify.messages[first][1]).get("STATUS", "")
            assert re.search(r"\b2 workers\b", status) and re.search(r"generation 1\b",
                                                                     status), status

            hup_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            gw.proc.signal(signal.SIGHUP)
            reloading = notify.wait(lambda m: "RELOADING=1" in m.splitlines(), first + 1,
                                    10, "RELOADING=1")
            usec = int(_fields(notify.messages[reloading][1])["MONOTONIC_USEC"])
            assert 0 <= usec - hup_usec < 5_000_000, (usec, hup_usec)
            ready = notify.wait(lambda m: "READY=1" in m.splitlines(), reloading + 1, 20,
                                "READY=1 after the reload")
            status = _fields(notify.messages[ready][1]).get("STATUS", "")
            assert "generation 2" in status and "2 workers" in status, status
            assert _status(gw.port) == 200

            spec.server["workers"] = "many"
            gw.config_path.write_text(spec.render())
            gw.proc.signal(signal.SIGHUP)
            failed = notify.wait(lambda m: "reload failed" in _fields(m).get("STATUS", ""),
                                 ready + 1, 10, "STATUS=reload failed")
            assert "READY=1" in notify.messages[failed][1].splitlines()
            assert _status(gw.port) == 200  # still serving the old config

            gw.proc.signal(signal.SIGTERM)
            notify.wait(lambda m: "STOPPING=1" in m.splitlines(), failed + 1, 10,
                        "STOPPING=1")
            assert gw.proc.wait(15) == 0, gw.proc.describe()
        print("\nnotify datagrams:", [m.replace("\n", " | ") for m in notify.texts()])
    finally:
        notify.close()


_ACTIVATION_WRAPPER = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "gatewayd.cli", "-c", sys.argv[2]])
"""


class _FdProc(Proc):
    """A `Proc` whose command inherits some extra fds (socket activation)."""

    def __init__(self, args: Sequence[str], *, pass_fds: Sequence[int], log_dir: Path,
                 name: str) -> None:
        self.args = list(args)
        self.name = name
        self.log_dir = log_dir
        self.stdout_path = log_dir / f"{name}.stdout"
        self.stderr_path = log_dir / f"{name}.stderr"
        self.orphans_killed = False
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.popen = subprocess.Popen(self.args, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=err, pass_fds=tuple(pass_fds),
                                          start_new_session=True)
        self.pid = self.popen.pid


def _listen_inodes(port: int) -> set[int]:
    """Inodes of the TCP sockets listening on 127.0.0.1:`port` (from /proc/net/tcp)."""
    local = f"0100007F:{port:04X}"
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[1] == local and cols[3] == "0A":  # 0A = LISTEN
            inodes.add(int(cols[9]))
    return inodes


def test_socket_activation_serves_on_the_passed_socket(
        tmp_path: Path, pki: TestPKI, backend_factory: BackendFactory) -> None:
    """LISTEN_FDS=1 with a socket bound by the "service manager" (the test) at the
    listener's address: gatewayd adopts it instead of binding its own."""
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(128)
        port = lsock.getsockname()[1]
        inode = os.fstat(lsock.fileno()).st_ino
        spec = _spec(tmp_path, pki, backend_factory, workers=2, port=port)
        config = tmp_path / "gatewayd.toml"
        config.write_text(spec.render())
        proc = _FdProc([sys.executable, "-c", _ACTIVATION_WRAPPER, str(lsock.fileno()),
                        str(config)], pass_fds=[lsock.fileno()], log_dir=tmp_path,
                       name="gatewayd-activated")
        with proc:
            def two_workers() -> bool:
                assert proc.alive, proc.describe()
                beats = list((tmp_path / "run").glob("worker-*.heartbeat"))
                admin = _admin_pid(tmp_path / "run")
                listed = _listed_workers(tmp_path / "run")
                workers = [pid for pid in _children(proc.pid) if pid in listed]
                return bool(admin) and len(workers) == 2 and len(beats) == 2

            wait_for(two_workers, 20, "2 ready workers")
            for _ in range(3):
                assert _status(port) == 200
            assert f"socket:[{inode}]" in _fd_targets(proc.pid), _fd_targets(proc.pid)
            assert _listen_inodes(port) == {inode}, "gatewayd bound a socket of its own"
            assert proc.stop(timeout=15) == 0, proc.describe()


def test_systemd_units_verify_and_carry_the_contract(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts both units (ExecStart pointed at the venv's
    gatewayd), and the service has the settings CONTRACT §9 promises."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (make system-deps)")
    gatewayd_bin = Path(sys.executable).parent / "gatewayd"
    assert gatewayd_bin.exists(), gatewayd_bin
    units = []
    for name in ("gatewayd.service", "gatewayd.socket"):
        text = (REPO_ROOT / "systemd" / name).read_text()
        copy = tmp_path / name
        copy.write_text(text.replace("/usr/local/bin/gatewayd", str(gatewayd_bin)))
        units.append(str(copy))
    out = subprocess.run([analyze, "verify", *units], capture_output=True, text=True,
                         timeout=60, check=False)
    output = out.stdout + out.stderr
    print(output)
    assert out.returncode == 0, output
    assert not [line for line in output.splitlines() if "gatewayd" in line], output

    service = (REPO_ROOT / "systemd" / "gatewayd.service").read_text()
    settings: dict[str, list[str]] = {}
    for line in service.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())

    def one(key: str) -> str:
        assert key in settings, f"{key}= missing from gatewayd.service"
        return settings[key][-1]

    assert one("Type") == "notify"
    assert any(v.split()[-1] == "--check" or " --check" in v
               for v in settings.get("ExecStartPre", [])), settings.get("ExecStartPre")
    assert "$MAINPID" in one("ExecReload") and "HUP" in one("ExecReload")
    assert one("KillMode") == "mixed"
    assert float(one("TimeoutStopSec").rstrip("s")) > 30
    assert one("RestartPreventExitStatus").split() == ["3", "4"]
    assert one("RuntimeDirectory")
    assert one("User") and one("User") != "root"
    assert "CAP_NET_BIND_SERVICE" in one("AmbientCapabilities").split()
    assert one("NoNewPrivileges") == "yes"
    assert one("ProtectSystem") == "strict"
