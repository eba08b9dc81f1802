"""Run a real gatewayd (master + forked workers) from a test.

`GatewaySpec` renders a TOML config from plain Python values; `Gateway` starts
`python -m gatewayd.cli -c FILE` as its own process group, waits until every listen port
accepts, and gives access to the JSON access log and the worker pids.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from tests.support.procs import REPO_ROOT, Proc, free_port, port_open, wait_for


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def _table(header: str, values: dict[str, Any]) -> list[str]:
    lines = [header]
    lines += [f"{key} = {toml_value(val)}" for key, val in values.items()]
    return [*lines, ""]


@dataclass
class GatewaySpec:
    """A config as Python data; `render()` gives the TOML text."""

    server: dict[str, Any] = field(default_factory=dict)
    listeners: list[dict[str, Any]] = field(default_factory=list)
    pools: list[dict[str, Any]] = field(default_factory=list)
    settings: list[dict[str, Any]] = field(default_factory=list)
    rules: list[dict[str, Any]] = field(default_factory=list)
    extra: str = ""

    def render(self) -> str:
        """The TOML text; an admin_bind on a free port is added unless one is given."""
        self.server.setdefault("admin_bind", f"127.0.0.1:{free_port()}")
        lines = _table("[server]", self.server)
        for listener in self.listeners:
            lines += _table("[[listener]]", listener)
        for pool in self.pools:
            lines += _table("[[backend_pool]]", pool)
        for settings in self.settings:
            lines += _table("[[backend_settings]]", settings)
        for rule in self.rules:
            rule = dict(rule)
            path_rules = rule.pop("path_rules", [])
            lines += _table("[[rule]]", rule)
            for path_rule in path_rules:
                lines += _table("[[rule.path_rule]]", path_rule)
        return "\n".join(lines) + "\n" + self.extra


def simple_spec(tmp: Path, *, cert: Any, backends: dict[str, Any], port: int | None = None,
                workers: int = 2, settings: dict[str, Any] | None = None,
                server: dict[str, Any] | None = None) -> GatewaySpec:
    """One https listener on 127.0.0.1 with a basic rule to the first pool; each
    backend gets a pool and settings pinned to its own certificate."""
    port = port or free_port()
    spec = GatewaySpec(
        server={"workers": workers, "runtime_dir": str(tmp / "run"),
                "access_log": str(tmp / "access.log"), "graceful_timeout": 5,
                **(server or {})},
        listeners=[{"name": "front", "bind": f"127.0.0.1:{port}", "protocol": "https",
                    "certificate": str(cert.cert_path), "private_key": str(cert.key_path)}],
    )
    for name, backend in backends.items():
        spec.pools.append({"name": name, "servers": [backend.address]})
        spec.settings.append({"name": f"{name}-tls", "protocol": "https", "port": 443,
                              "pinned_public_keys": [backend.leaf.spki_pin],
                              **(settings or {})})
    first = next(iter(backends))
    spec.rules.append({"name": "main", "priority": 10, "listener": "front",
                       "backend_pool": first, "backend_settings": f"{first}-tls"})
    return spec


class Gateway:
    """A running gatewayd; use as a context manager."""

    def __init__(self, tmp: Path, spec: GatewaySpec | str, *, name: str = "gatewayd",
                 args: list[str] | None = None, env: dict[str, str] | None = None,
                 wait: bool = True) -> None:
        self.tmp = tmp
        self.config_path = tmp / f"{name}.toml"
        text = spec.render() if isinstance(spec, GatewaySpec) else spec
        self.config_path.write_text(text)
        self.spec = spec
        self.access_log = tmp / "access.log"
        full_env = {**os.environ, **(env or {})}
        self.proc = Proc([sys.executable, "-m", "gatewayd.cli", "-c", str(self.config_path),
                          *(args or [])], cwd=REPO_ROOT, env=full_env, log_dir=tmp, name=name)
        if wait:
            try:
                self.wait_ready()  # fails with gatewayd's logs (Proc.wait_until)
            except AssertionError:
                # leave no process behind: the test's `with` never starts, so __exit__
                # never runs
                if self.proc.alive:
                    self.proc.stop(timeout=10)
                raise

    def ports(self) -> list[int]:
        if not isinstance(self.spec, GatewaySpec):
            return []
        return [int(lst["bind"].rsplit(":", 1)[1]) for lst in self.spec.listeners]

    @property
    def port(self) -> int:
        return self.ports()[0]

    def wait_ready(self, timeout: float = 20.0) -> None:
        for port in self.ports():
            # a master that exited (a bad config, a port taken) fails at once, not at the
            # deadline
            self.proc.wait_until(partial(port_open, "127.0.0.1", port), timeout,
                                 f"127.0.0.1:{port} to accept connections")
        self.wait_workers(self.expected_workers(), timeout)

    def expected_workers(self) -> int:
        if isinstance(self.spec, GatewaySpec):
            return int(self.spec.server.get("workers", 2))
        return 1

    def heartbeats(self) -> list[Path]:
        return sorted((self.tmp / "run").glob("worker-*.heartbeat"))

    def wait_workers(self, count: int, timeout: float = 20.0) -> None:
        """Until `count` workers have booted (each touches its heartbeat file once it
        serves) and the master has exactly that many children."""
        self.proc.wait_until(
            lambda: len(self.heartbeats()) == count and len(self.worker_pids()) == count,
            timeout, f"{count} ready workers")

    def children(self) -> list[int]:
        """Live children of the master: workers and the admin process."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(p) for p in path.read_text().split()]
        except OSError:
            return []

    def state(self) -> dict[str, Any]:
        """The master's state file (what /healthz and /readyz read)."""
        try:
            state: dict[str, Any] = json.loads((self.tmp / "run" / "state.json").read_text())
            return state
        except (OSError, ValueError):
            return {}

    @property
    def admin_url(self) -> str:
        assert isinstance(self.spec, GatewaySpec)
        return f"http://{self.spec.server['admin_bind']}"

    def admin_pid(self) -> int:
        return int(self.state().get("admin_pid", 0))

    def worker_pids(self) -> list[int]:
        """Live workers: children of the master that its state file lists as workers
        (so the admin process, and a child the master has not published yet, never
        count)."""
        listed = set(self.state().get("worker_pids", []))
        return [pid for pid in self.children() if pid in listed and _alive(pid)]

    def log_records(self) -> list[dict[str, Any]]:
        if not self.access_log.exists():
            return []
        return [json.loads(line) for line in self.access_log.read_text().splitlines()
                if line.strip()]

    def wait_log(self, predicate: Any, timeout: float = 10.0) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            for record in self.log_records():
                if predicate(record):
                    return record
            return None

        return wait_for(find, timeout, "an access-log record")

    def stop(self, timeout: float = 20.0) -> int:
        return self.proc.stop(timeout=timeout)

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.alive:
            self.proc.stop(timeout=10)


def _alive(pid: int) -> bool:
    """Not a zombie: a killed worker stays a child until the master reaps it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
