"""The master process (arbiter): binds, forks and supervises workers; never serves requests.

In the style of gunicorn's arbiter: signal handlers only queue the signal; the main loop
dispatches it to `handle_<name>`; exit reasons are `HaltServer` exceptions.  Unlike
gunicorn, a bad config on HUP keeps the running generation, and a new generation that
fails to boot is discarded while the old one keeps serving.

A *generation* is one config with its routing/TLS tables and its workers.  A reload
builds generation N+1 (binding new addresses first), waits for all its workers to report
ready, and only then tells generation N to drain.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from queue import Empty, SimpleQueue

from gatewayd import generation as generations
from gatewayd import metrics, native, systemd
from gatewayd.admin import write_state
from gatewayd.config import ConfigError, load_config
from gatewayd.generation import Generation, WorkerInfo
from gatewayd.listeners import BindError, ListenerSet, bind
from gatewayd.model import Address, GatewayConfig
from gatewayd.workers.spec import STOPPED_ACCEPTING, WorkerSpec

log = logging.getLogger("gatewayd.master")

EXIT_OK, EXIT_RUNTIME, EXIT_BOOT, EXIT_CONFIG = 0, 1, 3, 4
BOOT_TIMEOUT = 30.0
QUIESCE_TIMEOUT = 2.0  # s a reload waits for old workers to stop accepting
SIGNALS = ("HUP", "QUIT", "INT", "TERM", "TTIN", "TTOU", "USR1", "CHLD")


class HaltServer(Exception):
    """Stop the master with `status` (and `reason` logged)."""

    def __init__(self, reason: str, status: int = EXIT_OK) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class Arbiter:
    def __init__(self, config_path: str, config: GatewayConfig,
                 overrides: dict[str, object] | None = None,
                 loader: Callable[..., GatewayConfig] = load_config) -> None:
        self.config_path = config_path
        self.overrides = overrides or {}
        self.loader = loader
        self.config = config
        self.listeners = ListenerSet(systemd.listen_fds())
        self.signals: SimpleQueue[str] = SimpleQueue()
        self.generations: list[Generation] = []
        self.retiring: dict[int, tuple[WorkerInfo, float]] = {}  # pid → (info, kill deadline)
        self.worker_count = config.server.workers
        self.spawn_failures = 0
        self.next_spawn = 0.0
        self.seq = 0
        self.pid = os.getpid()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._ready_r, self._ready_w = os.pipe2(os.O_NONBLOCK)
        self.admin_pid = 0
        self.stopped_probers: set[int] = set()
        self.quiesced: set[int] = set()  # retiring workers that no longer accept
        self.fallback_secret = os.urandom(32)  # affinity without affinity_secret_file
        self.admin_sock: socket.socket | None = None
        self.admin_address: Address | None = None
        self.next_admin_spawn = 0.0
        self.state = "starting"
        self._published: tuple[object, ...] = ()

    # -- lifecycle --------------------------------------------------------------------

    def run(self) -> int:
        try:
            self._start()
            while True:
                self._loop_once()
        except HaltServer as halt:
            if halt.status:
                log.error("stopping: %s", halt.reason)
            else:
                log.info("stopping: %s", halt.reason)
            systemd.notify("STOPPING=1", f"STATUS={halt.reason}")
            self._stop(graceful=halt.status == EXIT_OK and "graceful" in halt.reason)
            return halt.status
        finally:
            self._cleanup()

    def _start(self) -> None:
        # compiled or not: a Python build costs about a third more CPU per request
        compiled = native.installed_compiled()
        (log.info if len(compiled) == len(native.COMPILED) else log.warning)(
            "%s", native.describe(compiled))
        os.makedirs(self.config.server.runtime_dir, exist_ok=True)
        self._write_pidfile()
        metrics.prepare_dir(self.config.server.runtime_dir, wipe=True)
        self.metrics = metrics.setup()
        for result in ("success", "failure"):  # present from the start: increase() sees 1
            self.metrics.config_reloads.labels(result)
        for name in SIGNALS:
            signal.signal(getattr(signal, f"SIG{name}"), self._queue_signal)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        try:
            generation = self._build_generation(self.config)
            self._bind_admin(self.config)
        except BindError as exc:
            raise HaltServer(str(exc), EXIT_BOOT) from exc
        self._spawn_generation(generation, boot=True)
        self._spawn_admin()
        self.state = "serving"
        self._notify_ready()

    def _loop_once(self) -> None:
        wake_in = self.next_spawn - time.monotonic()
        self._wait_for_events(min(1.0, wake_in) if wake_in > 0 else 1.0)
        while True:
            try:
                name = self.signals.get_nowait()
            except Empty:
                break
            handler = getattr(self, f"handle_{name.lower()}", None)
            if handler:
                handler()
        self._reap()
        self._read_ready()
        self._murder_stalled()
        self._kill_overdue_retirees()
        self._maintain_workers()
        self._maintain_admin()
        self._maintain_prober()
        self._publish_state()

    def _queue_signal(self, signum: int, _frame: object) -> None:
        self.signals.put(signal.Signals(signum).name[3:])

    def _wait_for_events(self, timeout: float) -> None:
        try:
            ready, _, _ = select.select([self._wake_r, self._ready_r], [], [], timeout)
        except InterruptedError:
            return
        if self._wake_r in ready:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass

    # -- signal handlers (called from the main loop, never from the signal) ----------

    def handle_term(self) -> None:
        raise HaltServer("graceful stop (SIGTERM)")

    def handle_int(self) -> None:
        raise HaltServer("fast stop (SIGINT)")

    def handle_quit(self) -> None:
        raise HaltServer("fast stop (SIGQUIT)")

    def handle_chld(self) -> None:
        pass  # reaping happens every loop

    def handle_ttin(self) -> None:
        self.worker_count += 1
        log.info("SIGTTIN: workers → %d", self.worker_count)

    def handle_ttou(self) -> None:
        if self.worker_count > 1:
            self.worker_count -= 1
            log.info("SIGTTOU: workers → %d", self.worker_count)
            current = self.generations[-1]
            if len(current.workers) > self.worker_count:
                oldest = min(current.workers.values(), key=lambda w: w.started)
                self._retire(current.workers.pop(oldest.pid))

    def handle_usr1(self) -> None:
        for gen in self.generations:
            for pid in gen.workers:
                self._kill(pid, signal.SIGUSR1)

    def handle_hup(self) -> None:
        self.reload()

    # -- reload -----------------------------------------------------------------------

    def reload(self) -> None:
        systemd.notify("RELOADING=1", systemd.monotonic_usec(), "STATUS=reloading")
        self.state = "reloading"
        self._publish_state()
        try:
            self._reload()
        finally:
            self.state = "serving"
            self._publish_state()

    def _reload_failed(self, why: str) -> None:
        self.metrics.config_reloads.labels("failure").inc()
        systemd.notify("READY=1", f"STATUS=reload failed: {why}")

    def _reload(self) -> None:
        try:
            config = self.loader(self.config_path, self.overrides)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config:\n%s", exc)
            self._reload_failed(str(exc).splitlines()[0])
            return
        running = list(self.generations)  # every generation that must retire on success
        try:
            generation = self._build_generation(config)
            self._bind_admin(config)
        except (BindError, OSError, ValueError) as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            self.generations = running
            self._reload_failed(str(exc))
            return
        previous = running[-1]
        if self.worker_count == previous.config.server.workers:
            self.worker_count = config.server.workers
        if not self._spawn_generation(generation, boot=False):
            self.generations.remove(generation)
            log.error("reload failed: new workers did not boot; old workers keep serving")
            self._reload_failed("workers did not boot")
            return
        self.config = config
        for gen in running:
            for info in gen.workers.values():
                self._retire(info)
            gen.workers.clear()
            self._stop_prober(gen)
            self.generations.remove(gen)
        self.listeners.close_unused(config.binds())
        self._wait_quiesced(QUIESCE_TIMEOUT)
        self.metrics.config_reloads.labels("success").inc()
        log.info("reloaded: generation %d serving", generation.number)
        self._notify_ready()

    # -- generations and workers -------------------------------------------------------

    def _build_generation(self, config: GatewayConfig) -> Generation:
        previous = self.generations[-1] if self.generations else None
        number = previous.number + 1 if previous else 1
        generation = generations.build(config, self.listeners, number, previous,
                                       self.fallback_secret)
        self._publish_config_gauges(config)
        self.generations.append(generation)
        return generation

    def _spawn_generation(self, generation: Generation, boot: bool) -> bool:
        for _ in range(self.worker_count):
            self._spawn(generation)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not all(w.ready for w in generation.workers.values()) or len(
                generation.workers) < self.worker_count:
            if time.monotonic() > deadline:
                break
            self._wait_for_events(0.2)
            self._read_ready()
            dead = self._reap()
            if any(info.generation == generation.number and not info.ready for info in dead):
                break
        ok = len(generation.workers) >= self.worker_count and all(
            w.ready for w in generation.workers.values())
        if ok:
            self._spawn_prober(generation)
            return True
        for info in list(generation.workers.values()):
            self._kill(info.pid, signal.SIGKILL)
        self._reap_blocking(list(generation.workers))
        generation.workers.clear()
        generations.remove_files(generation)
        if boot:
            raise HaltServer("workers failed to boot (see the log above)", EXIT_BOOT)
        return False

    def _spawn(self, generation: Generation) -> None:
        self.seq += 1
        heartbeat = os.path.join(generation.config.server.runtime_dir,
                                 f"worker-{self.seq}.heartbeat")
        spec = WorkerSpec(generation.config, generation.router, generation.spec_listeners,
                          heartbeat, self._ready_w, self.pid, generation.number,
                          generation.health_path, generation.targets, generation.secret,
                          generation.draining)
        pid = os.fork()
        if pid:
            generation.workers[pid] = WorkerInfo(pid, generation.number, heartbeat,
                                                 time.monotonic())
            return
        status = EXIT_RUNTIME
        try:  # the child never returns into the master's code
            self._become_child(keep=generation.config.binds())
            from gatewayd.workers.worker import run_worker

            status = run_worker(spec)
        except BaseException:
            log.exception("worker failed to boot")
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)

    def _become_child(self, keep: list[Address], admin: bool = False) -> None:
        """In a freshly forked child: drop the master's signal plumbing and every listen
        socket the child does not serve (a removed bind must stop accepting as soon as
        the old workers let go of it, not when the last unrelated child exits)."""
        signal.set_wakeup_fd(-1)
        for name in SIGNALS:
            signal.signal(getattr(signal, f"SIG{name}"), signal.SIG_DFL)
        os.close(self._wake_r)
        os.close(self._ready_r)
        for address, sock in self.listeners.sockets.items():
            if address not in keep:
                sock.close()
        if self.admin_sock is not None and not admin:
            self.admin_sock.close()

    def _retire(self, info: WorkerInfo) -> None:
        """Ask a worker to drain; SIGKILL it if still alive after graceful_timeout."""
        deadline = time.monotonic() + self.config.server.graceful_timeout + 5
        self.retiring[info.pid] = (info, deadline)
        self._kill(info.pid, signal.SIGTERM)

    def _wait_quiesced(self, timeout: float) -> None:
        """Until every retiring worker has stopped accepting (it writes STOPPED_ACCEPTING
        once its listen sockets are closed) or exited: only then does the new config
        serve every new connection, so only then is the reload reported done."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._read_ready()
            self._reap()
            if all(pid in self.quiesced for pid in self.retiring):
                break
            self._wait_for_events(0.01)
        self.quiesced &= set(self.retiring)

    def _read_ready(self) -> None:
        try:
            data = os.read(self._ready_r, 4096)
        except BlockingIOError:
            return
        for offset in range(0, len(data) - 4, 5):
            kind = data[offset:offset + 1]
            (pid,) = struct.unpack("!I", data[offset + 1: offset + 5])
            if kind == STOPPED_ACCEPTING:
                self.quiesced.add(pid)
                continue
            for gen in self.generations:
                if pid in gen.workers:
                    gen.workers[pid].ready = True
                    self.spawn_failures = 0

    def _reap(self) -> list[WorkerInfo]:
        dead: list[WorkerInfo] = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return dead
            if not pid:
                return dead
            code = os.waitstatus_to_exitcode(status)
            metrics.mark_dead(pid)
            if pid == self.admin_pid:
                log.warning("admin process %d exited (%s)", pid, _describe(code))
                self.admin_pid = 0
                continue
            if pid in self.stopped_probers:
                self.stopped_probers.discard(pid)
                continue
            prober_of = [gen for gen in self.generations if gen.prober_pid == pid]
            if prober_of:
                log.warning("prober %d exited (%s)", pid, _describe(code))
                prober_of[0].prober_pid = 0
                continue
            if pid in self.retiring:
                _unlink(self.retiring.pop(pid)[0].heartbeat)
                continue
            for gen in self.generations:
                info = gen.workers.pop(pid, None)
                if info is not None:
                    _unlink(info.heartbeat)
                    dead.append(info)
                    log.warning("worker %d exited (%s)%s", pid, _describe(code),
                                "" if info.ready else " before it was ready")
                    if not info.ready:
                        self.spawn_failures += 1

    def _reap_blocking(self, pids: list[int]) -> None:
        for pid in pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass

    def _maintain_workers(self) -> None:
        """Keep the current generation at worker_count, backing off on a crash loop."""
        if not self.generations:
            return
        current = self.generations[-1]
        now = time.monotonic()
        if len(current.workers) >= self.worker_count or now < self.next_spawn:
            return
        self._spawn(current)
        # After failed boots, the next spawn waits 0.2, 0.4, … up to 10 s (crash loop).
        self.next_spawn = now + (min(0.1 * 2 ** self.spawn_failures, 10.0)
                                 if self.spawn_failures else 0.0)

    def _murder_stalled(self) -> None:
        timeout = self.config.server.worker_timeout
        now = time.time()
        for gen in self.generations:
            for info in gen.workers.values():
                if not info.ready:
                    if time.monotonic() - info.started > BOOT_TIMEOUT:
                        log.error("worker %d did not boot within %.0fs: killing it",
                                  info.pid, BOOT_TIMEOUT)
                        self._kill(info.pid, signal.SIGKILL)
                    continue
                try:
                    age = now - os.stat(info.heartbeat).st_mtime
                except OSError:
                    continue
                if age > timeout:
                    log.error("worker %d missed its heartbeat for %.0fs: killing it",
                              info.pid, age)
                    self._kill(info.pid, signal.SIGKILL)

    def _kill_overdue_retirees(self) -> None:
        now = time.monotonic()
        for pid, (_info, deadline) in list(self.retiring.items()):
            if now > deadline:
                self._kill(pid, signal.SIGKILL)

    def _kill(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def _notify_ready(self) -> None:
        current = self.generations[-1]
        systemd.notify("READY=1", f"STATUS=serving: {len(current.workers)} workers, "
                                  f"generation {current.number}")

    # -- the prober (one per generation) ---------------------------------------------

    def _spawn_prober(self, generation: Generation) -> None:
        if not generation.targets:
            return
        generation.next_prober_spawn = time.monotonic() + 1.0  # restarts: at most 1/s
        pid = os.fork()
        if pid:
            generation.prober_pid = pid
            return
        status = EXIT_RUNTIME
        try:
            self._become_child(keep=[])
            from gatewayd.workers.prober import run_prober

            status = run_prober(generation.config, generation.health_path,
                                list(generation.targets), self.pid)
        except BaseException:
            log.exception("prober failed")
        finally:
            os._exit(status)

    def _maintain_prober(self) -> None:
        if not self.generations:
            return
        current = self.generations[-1]
        if (not current.prober_pid and current.targets and current.workers
                and time.monotonic() >= current.next_prober_spawn):
            self._spawn_prober(current)

    def _stop_prober(self, generation: Generation) -> None:
        if generation.prober_pid:
            self.stopped_probers.add(generation.prober_pid)
            self._kill(generation.prober_pid, signal.SIGTERM)
            generation.prober_pid = 0
        generations.remove_files(generation)

    # -- admin process, state and gauges ------------------------------------------------

    def _bind_admin(self, config: GatewayConfig) -> None:
        """(Re)bind admin_bind when it changed; the admin process restarts on it."""
        from gatewayd.config import parse_address

        address = parse_address(config.server.admin_bind) if config.server.admin_bind else None
        if address == self.admin_address:
            return
        sock = bind(address) if address else None
        if self.admin_sock is not None:
            self.admin_sock.close()
        self.admin_sock, self.admin_address = sock, address
        if self.admin_pid:
            self._kill(self.admin_pid, signal.SIGTERM)

    def _spawn_admin(self) -> None:
        if self.admin_sock is None:
            return
        self.next_admin_spawn = time.monotonic() + 1.0  # at most one restart a second
        sock, runtime_dir = self.admin_sock, self.config.server.runtime_dir
        pid = os.fork()
        if pid:
            self.admin_pid = pid
            return
        status = EXIT_RUNTIME
        try:
            self._become_child(keep=[], admin=True)
            from gatewayd.admin import run_admin

            status = run_admin(sock, runtime_dir, self.pid)
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 0
        except BaseException:
            log.exception("admin process failed")
        finally:
            os._exit(status)

    def _maintain_admin(self) -> None:
        if not self.admin_pid and self.admin_sock and time.monotonic() >= self.next_admin_spawn:
            self._spawn_admin()

    def _publish_state(self) -> None:
        current = self.generations[-1] if self.generations else None
        ready = sum(w.ready for w in current.workers.values()) if current else 0
        pids = sorted(pid for gen in self.generations for pid in gen.workers)
        state = (self.state, ready, current.number if current else 0, pids, self.admin_pid,
                 sorted(self.retiring))
        if state == self._published:
            return
        self._published = state
        write_state(self.config.server.runtime_dir, state=self.state, ready_workers=ready,
                    generation=state[2], master_pid=self.pid, worker_pids=pids,
                    retiring_pids=sorted(self.retiring), admin_pid=self.admin_pid)
        self.metrics.workers.set(ready)

    def _publish_config_gauges(self, config: GatewayConfig) -> None:
        """Certificate expiry of listeners (backend health gauges are the prober's)."""
        for listener in config.listeners:
            if listener.certificate is not None:
                self.metrics.certificate_not_after.labels("listener", listener.name).set(
                    listener.certificate.not_after)

    # -- stop -------------------------------------------------------------------------

    def _stop(self, graceful: bool) -> None:
        sig = signal.SIGTERM if graceful else signal.SIGQUIT
        self.state = "stopping"
        self._publish_state()
        workers = [pid for gen in self.generations for pid in gen.workers] + list(
            self.retiring)
        if self.admin_pid:
            workers.append(self.admin_pid)
        workers += [gen.prober_pid for gen in self.generations if gen.prober_pid]
        self.listeners.close_all()
        for pid in workers:
            self._kill(pid, sig)
        limit = self.config.server.graceful_timeout + 2 if graceful else 2.0
        deadline = time.monotonic() + limit
        remaining = set(workers)
        while remaining and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                remaining.discard(pid)
            else:
                self._wait_for_events(0.05)
        for pid in remaining:
            self._kill(pid, signal.SIGKILL)
        self._reap_blocking(list(remaining))

    def _cleanup(self) -> None:
        pidfile = self.config.server.pidfile
        if pidfile:
            try:
                os.unlink(pidfile)
            except OSError:
                pass
        for gen in self.generations:
            for info in gen.workers.values():
                _unlink(info.heartbeat)
            generations.remove_files(gen)

    def _write_pidfile(self) -> None:
        path = self.config.server.pidfile
        if not path:
            return
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        os.replace(tmp, path)  # atomic: readers never see a half-written pid


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


def _describe(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"
