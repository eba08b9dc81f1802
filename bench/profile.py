"""Where one gatewayd worker spends its CPU under load: `python -m bench.profile`.

Starts the bench's HTTPS nginx backend and gatewayd with one worker (same configs, same
CPU layout as `bench/run.py`: worker on CPU 0, backend and load generator on CPU 1), warms
up, then drives keep-alive requests with wrk (or new TLS connections with `openssl s_time`)
and prints the worker's user/system CPU per request from /proc.  Optionally attaches:

* `--tool py-spy`: Python frames (py-spy charges C and kernel time to the calling Python
  line: read `SSL_write` lines as "encrypt + write(2)"); prints the top self-time lines and
  keeps the raw samples in `bench/out/`.
* `--tool perf`: `perf record -g` on the worker; prints the share per shared object
  (interpreter vs kernel vs OpenSSL vs llhttp), which py-spy cannot show.
* `--tool strace`: `strace -c` on the worker; prints system calls per request (or
  connection), to see reads per TLS record, would-block reads and epoll traffic.

Profilers slow the worker down, so read their CPU-per-request line as "under the profiler";
compare code versions with plain runs, interleaved (A, B, A, B...), since this machine's
speed drifts by ±10 % between runs.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.load import CLIENT_ENV, s_time
from bench.procs import CLK_TCK, cpu_seconds, tree
from bench.servers import Gatewayd, NginxBackend, make_pki

OUT = Path(__file__).resolve().parent / "out"
LOAD_CPUS, PROXY_CPUS = "1", "0"


def _cpu(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def _load(port: int, scenario: str, seconds: int) -> int:
    """Requests (keep-alive) or connections (handshakes) completed."""
    if scenario == "hs":
        return int(s_time(port, resume=False, processes=8, seconds=seconds,
                          cpus=LOAD_CPUS)["connections"])
    path, connections = ("/1m", 8) if scenario == "mib" else ("/small", 64)
    out = subprocess.run(["taskset", "-c", LOAD_CPUS, "wrk", "-t1", f"-c{connections}",
                          f"-d{seconds}s", f"https://127.0.0.1:{port}{path}"],
                         capture_output=True, text=True, check=True, env=CLIENT_ENV).stdout
    line = next(line for line in out.splitlines() if "requests in" in line)
    return int(line.split()[0])


def _top_py_spy(raw: Path, count: int) -> list[str]:
    """Self-time share per `function (file:line)` from py-spy's raw (collapsed) output."""
    self_time: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        total += int(n)
        self_time[stack.split(";")[-1]] += int(n)
    return [f"{100 * n / total:5.1f} %  {frame}" for frame, n in self_time.most_common(count)]


def _perf_by_object(data: Path) -> list[str]:
    out = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "dso",
                          "--stdio", "-g", "none"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.strip() and not line.startswith("#")]


def _syscalls_per(summary: Path, done: int) -> list[str]:
    """`strace -c`'s table as calls per request/connection, most frequent first.  strace
    runs for the whole load while the count covers it too, so the ratio is close."""
    rows = []
    for line in summary.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1][0].isalpha():
            calls, name = int(fields[3]), fields[-1]
            errors = int(fields[4]) if len(fields) == 6 else 0
            if name != "total":
                rows.append((calls, errors, name))
    rows.sort(reverse=True)
    return [f"{calls / max(done, 1):7.2f}  {name}"
            + (f"  ({errors / max(done, 1):.2f} failed)" if errors else "")
            for calls, errors, name in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--scenario", choices=("ka", "hs", "mib"), default="ka",
                        help="ka: keep-alive /small (wrk); hs: one full handshake per "
                             "request (s_time); mib: 1 MiB responses, 8 connections (wrk)")
    parser.add_argument("--tool", choices=("none", "py-spy", "perf", "strace"), default="none")
    parser.add_argument("--top", type=int, default=30, help="lines of profile to print")
    args = parser.parse_args()
    tool = args.tool
    if tool == "py-spy":  # usually installed next to this interpreter, not on PATH
        beside = Path(sys.executable).parent / "py-spy"
        tool = str(beside) if beside.exists() else "py-spy"
    if args.tool != "none" and not shutil.which(tool):
        sys.exit(f"{args.tool} is not installed (.venv/bin/pip install py-spy; "
                 "apt-get install linux-perf)")
    OUT.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with tempfile.TemporaryDirectory(prefix="gatewayd-profile-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # nginx's workers (user nobody) must read the /1m file below it
        certs = make_pki(work)
        backend = NginxBackend(work, certs.backend, LOAD_CPUS)
        gateway = Gatewayd(work, certs, backend.port, 1, "ec", PROXY_CPUS)
        try:
            worker = gateway.worker_pid()
            _load(gateway.port, args.scenario, 1)  # warm-up: pooled backend connections
            attached: subprocess.Popen[bytes] | None = None
            suffix = {"py-spy": "txt", "perf": "perf.data"}.get(args.tool, "strace.txt")
            raw = OUT / f"profile-{stamp}.{suffix}"
            if args.tool == "py-spy":
                attached = subprocess.Popen([tool, "record", "-p", str(worker), "-r", "400",
                                             "-f", "raw", "-o", str(raw), "-d",
                                             str(args.seconds)])
            elif args.tool == "perf":
                attached = subprocess.Popen(["perf", "record", "-F", "999", "-g", "-p",
                                             str(worker), "-o", str(raw), "--", "sleep",
                                             str(args.seconds)])
            elif args.tool == "strace":
                attached = subprocess.Popen(["timeout", "-s", "INT", str(args.seconds),
                                             "strace", "-c", "-p", str(worker), "-o",
                                             str(raw)])
            backend_pids = tree(backend.proc.pid)
            user0, sys0 = _cpu(worker)
            backend0 = cpu_seconds(backend_pids)
            done = _load(gateway.port, args.scenario, args.seconds)
            user1, sys1 = _cpu(worker)
            backend1 = cpu_seconds(backend_pids)
            if attached is not None:
                attached.wait()
        finally:
            gateway.stop()
            backend.stop()
    unit = "connection" if args.scenario == "hs" else "request"
    per = 1e6 / max(done, 1)
    print(f"{done} {unit}s in {args.seconds} s; gatewayd worker CPU per {unit}: "
          f"{(user1 - user0 + sys1 - sys0) * per:.1f} µs (user {(user1 - user0) * per:.1f}, "
          f"system {(sys1 - sys0) * per:.1f}); backend nginx {(backend1 - backend0) * per:.1f} µs")
    if args.tool == "py-spy":
        print(f"\npy-spy, top self time ({raw}):")
        print("\n".join(_top_py_spy(raw, args.top)))
    elif args.tool == "perf":
        print(f"\nperf, share per object ({raw}):")
        print("\n".join(_perf_by_object(raw)[: args.top]))
    elif args.tool == "strace":
        print(f"\nstrace -c, calls per {unit} ({raw}):")
        print("\n".join(_syscalls_per(raw, done)))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
