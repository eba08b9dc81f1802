"""A worker process: booted by the master right after fork, it serves connections on the
inherited listen sockets until told to stop.

gevent is imported here for the first time in the process (the master never imports
it), so every worker starts with a fresh hub.  Signals: TERM = graceful (stop accepting,
let in-flight requests finish for up to graceful_timeout, close idle keep-alives);
INT/QUIT = stop now; USR1 = reopen the access log.  A heartbeat file is touched from the
hub every second, so a worker whose event loop is stuck stops heartbeating and the
master replaces it.
"""

from __future__ import annotations

import _socket
import gc
import logging
import os
import select
import signal
import socket
import struct
import sys
import time
from types import TracebackType

import gevent
from gevent.hub import get_hub

from gatewayd.health import HealthMap
from gatewayd.tlsconf import SNIRejected

from . import certwatch
from .accesslog import AccessLog
from .balancer import Balancer
from .memtrim import MemoryTrimmer, malloc_trim
from .proxy import Connection, DrainWake
from .routeplan import BindContext
from .runtime import Runtime
from .serving import ServingGreenlets
from .spec import READY, STOPPED_ACCEPTING, BoundListener, WorkerSpec
from .stats import make_stats
from .upstream import UpstreamPool

log = logging.getLogger("gatewayd.worker")
HEARTBEAT_INTERVAL = 1.0
METRICS_FLUSH_INTERVAL = 1.0


def run_worker(spec: WorkerSpec) -> int:
    """Serve until stopped; returns the process exit status."""
    _quiet_sni_rejections()
    worker = Worker(spec)
    try:
        return worker.run()
    except Exception:
        log.exception("worker %d crashed", os.getpid())
        return 1


class Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        server = spec.config.server
        self.runtime = Runtime(
            server=server,
            router=spec.router,
            upstreams=UpstreamPool(spec.config.backend_pools, spec.config.backend_settings),
            balancer=Balancer(spec.config.backend_pools, spec.config.backend_settings,
                              HealthMap.open(spec.health_path) if spec.health_path else None,
                              list(spec.targets), spec.affinity_secret, spec.draining),
            access_log=AccessLog(server.access_log, server.access_log_format),
            stats=make_stats(tuple(lst.name for lst in spec.config.listeners)),
            fault_target=os.environ.get("GATEWAYD_FAULT_INJECTION", "").encode() or None,
        )
        self.pool = ServingGreenlets(server.worker_connections)
        self.accepting: list[gevent.Greenlet] = []
        self.drainer: gevent.Greenlet | None = None
        self.stopping = False

    def run(self) -> int:
        hub = get_hub()
        hub.NOT_ERROR = (*hub.NOT_ERROR, SNIRejected)
        for signum in (signal.SIGINT, signal.SIGQUIT):
            signal.signal(signum, signal.SIG_DFL)  # fast stop: the default action
        gevent.signal_handler(signal.SIGTERM, self.graceful_stop)
        gevent.signal_handler(signal.SIGUSR1, self._reopen_logs)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads are the master's job
        signal.signal(signal.SIGTTIN, signal.SIG_IGN)
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        for bound in self.spec.listeners:
            self.accepting.append(gevent.spawn(self._accept_loop, bound))
        self.runtime.access_log.start()
        upstreams = self.runtime.upstreams
        gevent.spawn(upstreams.resolver.refresh_forever, upstreams.server_names())
        heartbeat = gevent.spawn(self._heartbeat)
        gevent.spawn(self._flush_metrics)
        watched = certwatch.watched_listeners(self.spec.listeners)
        if watched:  # listeners with watch_certificates = true
            gevent.spawn(certwatch.watch_forever, watched)
        _tune_gc()
        os.write(self.spec.ready_fd, READY + struct.pack("!I", os.getpid()))
        gevent.joinall(self.accepting)
        if self.drainer is not None:
            self.drainer.join()  # graceful stop: in-flight requests finish first
        heartbeat.kill()
        return 0

    def _accept_loop(self, bound: BoundListener) -> None:
        listen = bound.sock
        listen.setblocking(False)
        family = int(listen.family)
        ctx = BindContext(port=bound.address.port, router=bound.router, tls=bound.tls)
        watcher = get_hub().loop.io(listen.fileno(), 1)
        # Whether another connection is queued, asked without accepting: an accept that
        # finds none raises BlockingIOError, whose exception and traceback cost several
        # times a poll system call, and most accepts would end so when connections come
        # one at a time.
        queued = select.poll()
        queued.register(listen.fileno(), select.POLLIN)
        rt = self.runtime
        pool = self.pool
        failures, last_warning = 0, 0.0
        try:
            while not self.stopping:
                try:
                    # _accept + the C socket type: socket.accept() would also turn the
                    # family and type into enum members for every connection, and
                    # socket.socket adds a Python __init__ and close() (for makefile(),
                    # which nothing here uses).
                    fd, addr = listen._accept()  # type: ignore[attr-defined]
                    sock = _socket.socket(family, socket.SOCK_STREAM, 0, fd)
                except BlockingIOError:
                    get_hub().wait(watcher)
                    continue
                except OSError as exc:  # EMFILE etc.: back off instead of spinning
                    failures += 1
                    now = time.monotonic()
                    if now - last_warning >= 1.0:  # one line a second, not one per retry
                        log.warning("accept failed (%d times): %s", failures, exc)
                        last_warning, failures = now, 0
                    gevent.sleep(0.1)
                    continue
                # Responses leave in as few writes as we can, but a head and a body that
                # arrive apart must not wait for a delayed ACK (Nagle): like nginx's
                # tcp_nodelay, on for every client connection.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                pool.spawn(_serve, rt, ctx, sock, addr)
                if not queued.poll(0):
                    get_hub().wait(watcher)  # until the next connection is queued
        finally:
            watcher.close()

    def _heartbeat(self) -> None:
        path = self.spec.heartbeat_path
        with open(path, "wb"):
            pass
        trimmer = MemoryTrimmer(malloc_trim())  # memory back after a spike (see memtrim)
        while True:
            if os.getppid() != self.spec.master_pid:
                log.error("master %d is gone; worker exits", self.spec.master_pid)
                os._exit(0)
            os.utime(path)
            trimmer.observe(self.runtime.stats.connections)
            gevent.sleep(HEARTBEAT_INTERVAL)

    def _reopen_logs(self) -> None:
        log = self.runtime.access_log
        log.flush()  # lines of requests served before the rename belong to the old file
        log.reopen()

    def _flush_metrics(self) -> None:
        while True:
            gevent.sleep(METRICS_FLUSH_INTERVAL)
            self._flush_quietly()

    def _flush_quietly(self) -> None:
        try:
            self.runtime.stats.flush()
        except Exception:  # metrics must never take the data path down
            log.exception("metrics flush failed")

    def graceful_stop(self) -> None:
        """Stop accepting; let open connections finish (up to graceful_timeout)."""
        if self.stopping:
            return
        self.stopping = True
        self.runtime.draining = True
        for greenlet in self.accepting:
            greenlet.kill(block=False)
        for bound in self.spec.listeners:
            bound.sock.close()
        try:  # tell the master: new connections now only reach the new generation
            os.write(self.spec.ready_fd, STOPPED_ACCEPTING + struct.pack("!I", os.getpid()))
        except OSError:
            pass
        loop = get_hub().loop
        for idle in list(self.runtime.idle):
            loop.run_callback(self._wake_if_idle, idle)
        self.drainer = gevent.spawn(self._drain)

    def _wake_if_idle(self, greenlet: gevent.Greenlet) -> None:
        """Runs in the hub: a greenlet still in the idle set is blocked in its keep-alive
        read (membership is only held around that wait), so the throw lands there."""
        if greenlet in self.runtime.idle:
            greenlet.throw(DrainWake)

    def _drain(self) -> None:
        timeout = self.spec.config.server.graceful_timeout
        self.pool.join(timeout=timeout)
        if len(self.pool):
            log.warning("graceful_timeout %.0fs: cutting %d connections", timeout,
                        len(self.pool))
            self.pool.kill(timeout=1)
        self.runtime.upstreams.close_idle()
        self._flush_quietly()
        self.runtime.access_log.flush()
        os._exit(0)


# gen-0 collections run after this many net allocations of tracked objects (CPython's
# default is 700; one proxied request allocates ~40, so the default collects every ~17
# requests and each pass walks every in-flight connection's young objects).
GC_GEN0_THRESHOLD = 20_000


def _tune_gc() -> None:
    """Move what boot created (modules, config, routing and TLS tables) out of the
    collector's sight, and collect the young generation less often.  Request objects
    are freed by reference counting; the collector only exists for the rare cycle."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def _serve(rt: Runtime, ctx: BindContext, sock: _socket.socket, addr: tuple) -> None:
    try:
        Connection(rt, ctx, sock, addr).serve()
    except Exception:
        log.exception("connection from %s failed", addr[0])


def _quiet_sni_rejections() -> None:
    """pyOpenSSL reports exceptions from the SNI callback to sys.excepthook; a refused
    handshake for require_sni is expected traffic, not a crash worth a traceback."""
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException,
             tb: TracebackType | None) -> None:
        if not isinstance(value, SNIRejected):
            previous(kind, value, tb)

    sys.excepthook = hook
