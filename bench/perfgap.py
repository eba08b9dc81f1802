"""Where gatewayd's CPU per new TLS connection goes beyond the bare stack's:
`python -m bench.perfgap`.

Starts the bench's nginx backend, gatewayd (1 worker) and `floor-tls` (bench/floor_tls.py:
a gevent + pyOpenSSL server that answers the request itself), on the CPUs `bench/run.py`
gives them, then for a few interleaved rounds drives each with full ECDSA handshakes
(`openssl s_time -new`, one request per connection, as the bench does) while
`perf record -e cpu-clock` samples that one process.  It prints CPU per connection from
/proc and, from the samples, microseconds per connection by shared object and by symbol,
gatewayd beside floor-tls, largest difference first.

Why this and not instruction counts: valgrind hides CPU features from OpenSSL (SHA-NI,
for one), so its counts weigh the cryptography differently from the real run, and it
counts instructions, not the cycles that cache-cold code costs.  `cpu-clock` is a
software event, so this works on virtual machines without hardware counters; it samples
time, so a symbol's share is its share of the CPU the process used.

    python -m bench.perfgap [--rounds 3] [--seconds 6] [--top 30]
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.load import s_time
from bench.procs import cpu_seconds
from bench.run import BACKEND_CPUS, LOAD_CPUS, PROXY_CPUS
from bench.servers import FloorTLS, Gatewayd, NginxBackend, Server, make_pki

SERVER_CPUS = PROXY_CPUS[1]  # both servers where bench/run.py puts a 1-worker proxy
HZ = 4000  # samples per second of CPU time

Samples = collections.Counter[tuple[str, str]]  # (shared object, symbol) -> samples


def _record(pid: int, data: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", str(HZ), "-o",
                             str(data), "-p", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _samples(data: Path) -> Samples:
    out = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort",
                          "dso,sym", "-F", "sample,dso,sym", "--stdio", "-q"],
                         capture_output=True, text=True).stdout
    counts: Samples = collections.Counter()
    for line in out.splitlines():
        fields = line.split(None, 2)
        if len(fields) == 3 and fields[0].isdigit():
            counts[(fields[1], fields[2].strip())] += int(fields[0])
    return counts


def _measure(pid: int, port: int, seconds: int, data: Path) -> tuple[int, float, Samples]:
    """Connections served, CPU seconds used and perf samples of one load of `seconds`."""
    recorder = _record(pid, data)
    time.sleep(0.5)  # perf attached
    cpu0 = cpu_seconds([pid])
    done = int(s_time(port, resume=False, processes=8, seconds=seconds,
                      cpus=LOAD_CPUS)["connections"])
    cpu = cpu_seconds([pid]) - cpu0
    recorder.send_signal(signal.SIGINT)
    recorder.wait()
    return done, cpu, _samples(data)


def _table(title: str, rows: dict[str, tuple[float, float]], top: int) -> list[str]:
    lines = [title, f"  {'gatewayd':>9} {'floor-tls':>9} {'diff':>8}"]
    ordered = sorted(rows.items(), key=lambda kv: -abs(kv[1][0] - kv[1][1]))
    for name, (gw, floor) in ordered[:top]:
        lines.append(f"  {gw:9.1f} {floor:9.1f} {gw - floor:+8.1f}  {name}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=6, help="load per server and round")
    ap.add_argument("--top", type=int, default=30, help="symbols to print")
    args = ap.parse_args()
    for tool in ("perf", "openssl", "nginx", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (make bench installs nginx and openssl; "
                     "apt-get install linux-perf)")
    done: collections.Counter[str] = collections.Counter()
    cpu: dict[str, float] = collections.defaultdict(float)
    samples: dict[str, Samples] = {"gatewayd": collections.Counter(),
                                   "floor-tls": collections.Counter()}
    with tempfile.TemporaryDirectory(prefix="gatewayd-perfgap-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # nginx's workers (user nobody) read below it
        certs = make_pki(work)
        backend = NginxBackend(work, certs.backend, BACKEND_CPUS)
        servers: dict[str, Server] = {}
        try:
            gateway = Gatewayd(work, certs, backend.port, 1, "ec", SERVER_CPUS)
            servers["gatewayd"] = gateway
            servers["floor-tls"] = FloorTLS(work, certs, "ec", SERVER_CPUS)
            pids = {"gatewayd": gateway.worker_pid(),
                    "floor-tls": servers["floor-tls"].pids()[0]}
            for server in servers.values():  # warm-up: pooled backend connections
                s_time(server.port, resume=False, processes=8, seconds=1, cpus=LOAD_CPUS)
            for rnd in range(args.rounds):
                order = list(servers) if rnd % 2 == 0 else list(servers)[::-1]
                for name in order:
                    n, used, counted = _measure(pids[name], servers[name].port,
                                                args.seconds, work / f"{name}-{rnd}.data")
                    done[name] += n
                    cpu[name] += used
                    samples[name] += counted
                print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(
                    f"{name} {1e6 * cpu[name] / max(done[name], 1):.0f} µs/connection"
                    for name in servers), flush=True)
        finally:
            for server in servers.values():
                server.stop()
            backend.stop()
    per_sample = 1e6 / HZ  # µs of CPU time per sample
    per: dict[str, dict[tuple[str, str], float]] = {
        name: {key: n * per_sample / max(done[name], 1) for key, n in counts.items()}
        for name, counts in samples.items()}
    print()
    for name in servers:
        print(f"{name}: {done[name]} connections; CPU {1e6 * cpu[name] / max(done[name], 1):.0f}"
              f" µs/connection (/proc), {sum(per[name].values()):.0f} µs sampled")
    by_object: dict[str, tuple[float, float]] = {}
    by_symbol: dict[str, tuple[float, float]] = {}
    for key in set(per["gatewayd"]) | set(per["floor-tls"]):
        gw, floor = per["gatewayd"].get(key, 0.0), per["floor-tls"].get(key, 0.0)
        old = by_object.get(key[0], (0.0, 0.0))
        by_object[key[0]] = (old[0] + gw, old[1] + floor)
        by_symbol[f"{key[0][:30]:30} {key[1]}"] = (gw, floor)
    print()
    print("\n".join(_table("µs per connection by shared object:",
                           {k: v for k, v in by_object.items() if max(v) >= 1.0}, 20)))
    print()
    print("\n".join(_table("µs per connection by symbol:", by_symbol, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
