"""Processes, waiting and clients for live tests.

* :func:`wait_for` is the only place that polls; everything else waits through it, always
  with a deadline.
* :class:`Proc` runs any command (gatewayd itself) with stdout/stderr captured to files and
  is always reaped; :class:`Backend` runs ``python -m tests.support.backend``.
* :func:`curl`, :func:`https_get`, :func:`https_connection` are clients that never pick up a
  proxy from the environment.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import http.client
import json
import os
import random
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from signal import SIGKILL, SIGTERM
from types import TracebackType
from typing import Any, Literal, Protocol, Self, TypeVar

from tests.support.pki import Leaf

__all__ = [
    "REPO_ROOT",
    "Backend",
    "BackendFactory",
    "Proc",
    "StrPath",
    "client_context",
    "curl",
    "fetch_peer_cert",
    "free_port",
    "http_connection",
    "https_connection",
    "https_get",
    "port_open",
    "wait_for",
    "wait_port",
    "wait_port_closed",
]

#: The repository root (cwd for ``python -m tests.support.backend``).
REPO_ROOT = Path(__file__).resolve().parents[2]
CURL = shutil.which("curl") or "/usr/bin/curl"

T = TypeVar("T")
StrPath = str | os.PathLike[str]

_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy")


def _no_proxy_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for var in list(env):
        if var.lower() in _PROXY_VARS:
            del env[var]
    return env


# -- waiting --------------------------------------------------------------------------


def wait_for(
    predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.02
) -> T:
    """Poll *predicate* until it returns something truthy; return that value.

    Raises ``AssertionError(f"timed out waiting for {what}")`` once *timeout* seconds have
    passed.  The predicate is always evaluated at least once, and once more at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        now = time.monotonic()
        if now >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(min(interval, deadline - now))


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on *host* that was free a moment ago (bound, read, closed).

    Prefer letting the server bind port 0 itself and report it (as the backend does);
    use this only for programs that need a port on their command line.  The port is
    drawn below the kernel's ephemeral range (ip_local_port_range), where the kernel
    never hands out ports by itself: a port from bind(0) is in that range, where any
    outgoing connection of the suite (clients, probes, the gateway's own backend
    connections) may take it as its local port before the program binds it.
    """
    below = _below_ephemeral_range()
    for _ in range(100 if below else 0):
        port = _PORTS.choice(below)
        with socket.socket(_family(host), socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue  # taken: draw again
            return port
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


_PORTS = random.Random()  # its own generator: tests that seed `random` do not steer it


@functools.cache
def _below_ephemeral_range() -> range:
    """Ports from 10000 up to the start of the kernel's ephemeral range (empty if that
    range starts too low to leave room, or cannot be read); read once per test run, not
    once per free_port."""
    try:
        first = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return range(0)
    return range(10_000, first) if first > 11_000 else range(0)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if a TCP connect to (host, port) succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float) -> None:
    """Wait until something accepts TCP connections on (host, port)."""
    wait_for(lambda: port_open(host, port), timeout, f"{host}:{port} to accept connections")


def wait_port_closed(host: str, port: int, timeout: float) -> None:
    """Wait until nothing accepts TCP connections on (host, port)."""
    wait_for(lambda: not port_open(host, port), timeout, f"{host}:{port} to stop listening")


# -- processes ------------------------------------------------------------------------

_LIVE: weakref.WeakSet[Proc] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        proc.kill()


class Proc:
    """A subprocess with stdout/stderr captured to files, always reaped.

    It runs in its own session/process group, so :meth:`stop` can also kill any children
    (e.g. gatewayd workers) that outlive the main process.  Usable as a context manager.
    """

    def __init__(
        self,
        args: Sequence[StrPath],
        *,
        cwd: StrPath | None = None,
        env: Mapping[str, str] | None = None,
        log_dir: StrPath | None = None,
        name: str | None = None,
        stdin: int | None = subprocess.DEVNULL,
    ) -> None:
        self.args = [os.fspath(a) for a in args]
        self.name = name or Path(self.args[0]).name
        if log_dir is None:
            log_dir = tempfile.mkdtemp(prefix=f"proc-{self.name}-")
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9.-]+", "_", self.name)
        self.stdout_path = self.log_dir / f"{safe}.stdout"
        self.stderr_path = self.log_dir / f"{safe}.stderr"
        #: True when :meth:`stop` had to SIGKILL leftover members of the process group.
        self.orphans_killed = False
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.popen = subprocess.Popen(
                self.args,
                cwd=cwd,
                env=None if env is None else dict(env),
                stdin=stdin,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        self.pid = self.popen.pid
        _LIVE.add(self)

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid={self.pid} rc={self.returncode}>"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def returncode(self) -> int | None:
        """Exit status (negative = killed by that signal), None while running."""
        return self.popen.poll()

    @property
    def alive(self) -> bool:
        """True while the process has not exited."""
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """Send *sig* to the process (not its group)."""
        if self.alive:
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait for exit and return the status; AssertionError on timeout."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"timed out waiting for {self.name} (pid {self.pid}) to exit\n{self.describe()}"
            ) from None

    def stop(self, timeout: float = 10.0, sig: int = SIGTERM) -> int:
        """Send *sig* (TERM), SIGKILL the group after *timeout*; reap; return the status."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._killpg()
        rc = self.popen.wait()
        self._reap_group()
        _LIVE.discard(self)
        return rc

    def kill(self) -> None:
        """SIGKILL the whole process group and reap, no questions asked."""
        self._killpg()
        self.popen.wait()
        _LIVE.discard(self)

    def _killpg(self) -> None:
        try:
            os.killpg(self.pid, SIGKILL)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()

    def _reap_group(self) -> None:
        """Kill whatever is left in the process group once the leader has exited."""
        try:
            os.killpg(self.pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        self.orphans_killed = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, SIGKILL)

    def stdout_text(self) -> str:
        """Everything written to stdout so far."""
        return self.stdout_path.read_text(errors="replace")

    def stderr_text(self) -> str:
        """Everything written to stderr so far."""
        return self.stderr_path.read_text(errors="replace")

    def wait_for_output(
        self, pattern: str, timeout: float, stream: Literal["stdout", "stderr", "any"] = "any"
    ) -> re.Match[str]:
        """Wait until *pattern* (a regex) appears in the captured output; return the match.

        Fails early (with the logs) if the process exits without printing it.
        """
        rx = re.compile(pattern, re.MULTILINE)

        def search() -> re.Match[str] | None:
            texts = []
            if stream in ("stdout", "any"):
                texts.append(self.stdout_text())
            if stream in ("stderr", "any"):
                texts.append(self.stderr_text())
            return next((m for text in texts if (m := rx.search(text))), None)

        return self.wait_until(search, timeout, f"{pattern!r} in {self.name} {stream}")

    def wait_until(self, predicate: Callable[[], T | None], timeout: float, what: str) -> T:
        """`wait_for(predicate, timeout, what)`, failing at once if this process exits
        first; either failure carries the process's logs."""

        def probe() -> T | None:
            exited = not self.alive  # read first: what it did before exiting still counts
            result = predicate()
            if result:
                return result
            if exited:
                raise AssertionError(f"{self.name} exited with rc={self.returncode} before "
                                     f"{what}\n{self.describe()}")
            return None

        try:
            return wait_for(probe, timeout, what)
        except AssertionError as exc:
            if "timed out" in str(exc):
                raise AssertionError(f"{exc}\n{self.describe()}") from None
            raise

    def describe(self, tail: int = 4000) -> str:
        """Command, status and the tail of both logs, for assertion messages."""
        return (
            f"--- {self.name}: {' '.join(self.args)} (pid {self.pid}, rc={self.returncode})\n"
            f"--- stdout ({self.stdout_path}):\n{self.stdout_text()[-tail:]}\n"
            f"--- stderr ({self.stderr_path}):\n{self.stderr_text()[-tail:]}"
        )


class Backend:
    """A ``python -m tests.support.backend`` process (see that module for the endpoints).

    ``Backend(...)`` only prepares; :meth:`start` (or ``with``) launches it and waits for its
    ``READY <port>`` line.  TLS when *cert* and *key* are given, plain HTTP otherwise.
    """

    def __init__(
        self,
        name: str = "backend",
        *,
        workdir: StrPath,
        cert: StrPath | None = None,
        key: StrPath | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        mode: Literal["http", "raw-record"] = "http",
        record: bool = True,
        client_ca: StrPath | None = None,
        start_timeout: float = 15.0,
    ) -> None:
        if (cert is None) != (key is None):
            raise ValueError("cert and key go together")
        self.name = name
        self.host = host
        self.mode = mode
        self.cert = cert
        self.key = key
        self.client_ca = client_ca
        self.start_timeout = start_timeout
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.record_path: Path | None = self.workdir / f"{name}.records.jsonl" if record else None
        self._port = port
        self.proc: Proc | None = None
        self.leaf: Any = None  # the tests.support.pki.Leaf it serves, when known

    @property
    def tls(self) -> bool:
        """True when serving HTTPS."""
        return self.cert is not None

    @property
    def port(self) -> int:
        """The bound port (known once started)."""
        if self.proc is None:
            raise RuntimeError(f"backend {self.name} not started")
        return self._port

    @property
    def url(self) -> str:
        """``https://host:port`` (or ``http://``), IPv6 hosts bracketed."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    @property
    def address(self) -> str:
        """``host:port`` (IPv6 bracketed), as used in upstream configuration."""
        return self.url.split("://", 1)[1]

    def command(self) -> list[str]:
        """The command line used to start the backend."""
        listen = f"[{self.host}]:{self._port}" if ":" in self.host else f"{self.host}:{self._port}"
        cmd = [
            sys.executable,
            "-m",
            "tests.support.backend",
            "--listen",
            listen,
            "--name",
            self.name,
            "--mode",
            self.mode,
        ]
        if self.cert is not None and self.key is not None:
            cmd += ["--cert", os.fspath(self.cert), "--key", os.fspath(self.key)]
        if self.client_ca is not None:
            cmd += ["--client-ca", os.fspath(self.client_ca)]
        if self.record_path is not None:
            cmd += ["--record", os.fspath(self.record_path)]
        return cmd

    def start(self) -> Backend:
        """Launch the process and wait (with a deadline) for ``READY <port>``."""
        if self.proc is not None:
            raise RuntimeError(f"backend {self.name} already started")
        if self.record_path is not None:
            self.record_path.touch()
        env = _no_proxy_env()
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("PYTHONSAFEPATH", None)  # -m must find tests/ via the cwd
        self.proc = Proc(
            self.command(),
            cwd=REPO_ROOT,
            env=env,
            log_dir=self.workdir,
            name=f"backend-{self.name}",
        )
        try:
            m = self.proc.wait_for_output(r"^READY (\d+)$", self.start_timeout, "stdout")
        except BaseException:
            self.proc.kill()
            raise
        self._port = int(m.group(1))
        return self

    def __enter__(self) -> Self:
        if self.proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Backend {self.name} {self.mode} port={self._port} proc={self.proc!r}>"

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM (SIGKILL after *timeout*) and reap; returns the exit status."""
        if self.proc is None:
            return None
        return self.proc.stop(timeout)

    def records(self) -> list[dict[str, Any]]:
        """The JSON lines recorded so far (complete lines only)."""
        if self.record_path is None:
            raise RuntimeError(f"backend {self.name} was started without a record file")
        try:
            text = self.record_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [
            json.loads(line)
            for line in text.splitlines(keepends=True)
            if line.endswith("\n") and line.strip()
        ]

    def wait_records(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until at least *count* records exist; return all of them."""
        wait_for(
            lambda: len(self.records()) >= count,
            timeout,
            f"{count} record(s) from backend {self.name}",
        )
        return self.records()

    def describe(self) -> str:
        """Logs of the backend process, for assertion messages."""
        return self.proc.describe() if self.proc else f"backend {self.name} not started"


class BackendFactory(Protocol):
    """Type of the ``backend_factory`` fixture (see ``tests/conftest.py``)."""

    def __call__(
        self,
        name: str = "backend",
        *,
        tls: bool = True,
        leaf: Leaf | None = None,
        names: list[str] | None = None,
        mode: Literal["http", "raw-record"] = "http",
        record: bool = True,
        host: str = "127.0.0.1",
        client_ca: StrPath | None = None,
    ) -> Backend: ...


# -- clients --------------------------------------------------------------------------


def curl(
    args: Sequence[StrPath],
    timeout: float = 20,
    *,
    text: bool = True,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[Any]:
    """Run ``curl`` with ``--silent --show-error --max-time`` and no environment proxy.

    ``-q`` (first) ignores any ``.curlrc``; ``--noproxy '*'`` plus a scrubbed environment
    make sure nothing goes through a proxy.  Does not raise on a non-zero exit status.
    """
    cmd = [
        CURL,
        "-q",
        "--silent",
        "--show-error",
        "--max-time",
        f"{timeout:g}",
        "--noproxy",
        "*",
        *(os.fspath(a) for a in args),
    ]
    kw: dict[str, Any] = {"encoding": "utf-8", "errors": "replace"} if text else {}
    return subprocess.run(
        cmd,
        capture_output=True,
        timeout=timeout + 10,
        env=_no_proxy_env(env),
        stdin=subprocess.DEVNULL,
        check=False,
        **kw,
    )


def client_context(
    cafile: StrPath | None,
    *,
    check_hostname: bool = True,
    client_cert: tuple[StrPath, StrPath] | None = None,
    alpn: Iterable[str] | None = ("http/1.1",),
) -> ssl.SSLContext:
    """A client SSLContext trusting only *cafile* (None: no verification at all)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cafile=os.fspath(cafile))
        ctx.check_hostname = check_hostname
    if client_cert is not None:
        ctx.load_cert_chain(os.fspath(client_cert[0]), os.fspath(client_cert[1]))
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def http_connection(host: str, port: int, *, timeout: float = 10) -> http.client.HTTPConnection:
    """A plain-HTTP keep-alive connection (connected lazily)."""
    return http.client.HTTPConnection(host, port, timeout=timeout)


def https_connection(
    host: str,
    port: int,
    *,
    sni: str | None,
    cafile: StrPath | None,
    timeout: float = 10,
    client_cert: tuple[StrPath, StrPath] | None = None,
    context: ssl.SSLContext | None = None,
) -> http.client.HTTPConnection:
    """An already-handshaken HTTPS connection to (host, port) with SNI *sni*.

    The TLS handshake happens here (so verification errors raise here).  The certificate
    is verified against *cafile* and, when *sni* is not None, checked for *sni*; with
    ``sni=None`` no SNI is sent and only the chain is verified.  The default ``Host`` is
    ``sni`` (or *host*); pass an explicit ``Host`` header to decouple them.  The returned
    connection supports keep-alive; close it when done.
    """
    if context is None:
        context = client_context(cafile, check_hostname=sni is not None, client_cert=client_cert)
    raw = socket.create_connection((host, port), timeout=timeout)
    try:
        tls = context.wrap_socket(raw, server_hostname=sni)
    except BaseException:
        raw.close()
        raise
    conn = http.client.HTTPConnection(sni or host, port, timeout=timeout)
    conn.sock = tls
    return conn


def https_get(
    host: str,
    port: int,
    path: str,
    *,
    sni: str | None,
    cafile: StrPath | None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10,
    method: str = "GET",
    body: bytes | None = None,
    client_cert: tuple[StrPath, StrPath] | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One HTTPS request on a fresh connection; returns ``(status, headers, body)``.

    SNI (*sni*) and ``Host`` (``headers["Host"]``, default *sni*) are independent.  The
    returned headers are an :class:`http.client.HTTPMessage` (case-insensitive ``[]``,
    ``get_all``).
    """
    conn = https_connection(
        host, port, sni=sni, cafile=cafile, timeout=timeout, client_cert=client_cert
    )
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, resp.msg, data
    finally:
        conn.close()


def fetch_peer_cert(host: str, port: int, *, sni: str | None, timeout: float = 10) -> bytes:
    """Handshake without verification and return the server's leaf certificate (DER)."""
    ctx = client_context(None)
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=sni) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if der is None:
        raise AssertionError(f"{host}:{port} presented no certificate")
    return der
