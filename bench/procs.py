"""Processes for the benchmark: start/stop in their own process group, CPU pinning, and
what /proc says about a process tree (CPU seconds, RSS)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0, proc: Proc | None = None) -> None:
    """Wait until 127.0.0.1:*port* accepts; fail early if *proc* exits meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            proc.check_alive()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def pinned(cpus: str | None, args: Sequence[str]) -> list[str]:
    """*args* prefixed with `taskset -c CPUS` (no prefix when *cpus* is None)."""
    return ["taskset", "-c", cpus, *args] if cpus else list(args)


class Proc:
    """A long-running server process in its own session, output captured to files."""

    def __init__(self, name: str, args: Sequence[str], log_dir: Path,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.args = list(args)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout = log_dir / f"{name}.stdout"
        self.stderr = log_dir / f"{name}.stderr"
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.popen = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                env=None if env is None else dict(env), cwd=cwd, start_new_session=True)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}: "
                               f"{self.stderr.read_text(errors='replace')[-2000:]}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL whatever is left after *timeout*."""
        if self.alive():
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)  # stragglers of our own group only
        except ProcessLookupError:
            pass
        self.popen.wait()


def tree(pid: int) -> list[int]:
    """*pid* and all its descendants (via /proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime (all threads) of *pids*, in seconds."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def rss_kib(pids: Sequence[int]) -> int:
    """Sum of VmRSS of *pids*, KiB."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total
