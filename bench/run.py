"""gatewayd benchmark: the same scenarios through gatewayd, nginx, HAProxy (and the
backend directly as the ceiling) on this machine.  `make bench` runs it; see README.md.

    .venv/bin/python bench/run.py            # full run: 3 runs, median (~24 min)
    .venv/bin/python bench/run.py --quick    # 1 run, short, fewer scenarios
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import load, report  # noqa: E402
from bench.idle import raise_nofile  # noqa: E402
from bench.procs import cpu_seconds, rss_kib  # noqa: E402
from bench.servers import (  # noqa: E402
    Certs,
    Direct,
    Floor,
    FloorTLS,
    Gatewayd,
    HAProxy,
    Mitmproxy,
    NginxBackend,
    NginxProxy,
    Server,
    make_pki,
)

OUT = REPO / "bench" / "out"

# CPU layout (2 cores): core 1 runs the load generators and the backend; a 1-worker
# proxy gets core 0 to itself; a 2-worker proxy gets both cores (and so shares core 1).
LOAD_CPUS = "1"
BACKEND_CPUS = "1"
PROXY_CPUS = {1: "0", 2: "0,1"}


@dataclass
class Settings:
    runs: int
    ka_seconds: float
    ka_connections: int
    hs_seconds: int  # openssl s_time -time takes whole seconds
    hs_clients: int
    mib_seconds: float
    mib_connections: int
    idle_connections: int
    idle_runs: int
    scenarios: tuple[str, ...]
    configs: tuple[str, ...]
    cost_variants: bool
    mitmproxy: bool
    #: rounds per run of the interleaved measurements (see Bench.interleaved)
    interleaved_rounds: int = 3


FULL = Settings(runs=3, ka_seconds=4, ka_connections=64, hs_seconds=3, hs_clients=8,
                mib_seconds=3, mib_connections=8, idle_connections=10_000, idle_runs=1,
                scenarios=("ka", "hs_full_ec", "hs_res_ec", "mib", "hs_full_rsa", "idle"),
                configs=("gatewayd-1w", "nginx-1w", "haproxy-1t", "gatewayd-2w", "nginx-2w",
                         "haproxy-2t", "direct", "floor-1w", "floor-tls"),
                cost_variants=True, mitmproxy=True)
QUICK = Settings(runs=1, ka_seconds=3, ka_connections=64, hs_seconds=2, hs_clients=8,
                 mib_seconds=2, mib_connections=8, idle_connections=2_000, idle_runs=1,
                 scenarios=("ka", "hs_full_ec", "mib", "idle"),
                 configs=("gatewayd-1w", "nginx-1w", "haproxy-1t", "direct"),
                 cost_variants=True, mitmproxy=False, interleaved_rounds=1)
#: The whole run may wait this long in total for a quiet machine (see wait_quiet).
QUIET_BUDGET = {"full": 60.0, "quick": 20.0}


# -- foreign load ------------------------------------------------------------------------

def busy_seconds() -> float:
    """Busy CPU time of the whole machine (all cores), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_quiet(limit: float, max_wait: float) -> float:
    """Wait (about *max_wait* s at most) until other programs use < *limit* of the machine
    for a second; return the last busy fraction seen.  Other work on a shared 2-core machine
    would distort every figure, so every measurement also records its foreign CPU."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = busy_seconds(), time.monotonic()
        time.sleep(1.0)
        frac = (busy_seconds() - b0) / (time.monotonic() - t0) / (os.cpu_count() or 1)
        if frac < limit or time.monotonic() > deadline:
            return frac


# -- measuring ---------------------------------------------------------------------------

@dataclass
class Bench:
    settings: Settings
    work: Path
    certs: Certs
    backend: NginxBackend
    results: list[dict[str, Any]] = field(default_factory=list)
    #: measurements appended as they are taken (bench/out/raw-<stamp>.jsonl)
    raw: Path = OUT / "raw.jsonl"
    #: total seconds all measurements together may spend waiting for a quiet machine
    quiet_budget: float = 60.0

    def measure(self, server: Server, config: str, run: int, scenario: str,
                fn: Callable[[], dict[str, Any]], **extra: Any) -> dict[str, Any]:
        """Run *fn* and add the proxy's CPU (master + all children, from /proc) and the
        foreign CPU (everything that is neither proxy, backend nor load generator)."""
        t_quiet = time.monotonic()
        quiet = wait_quiet(0.10, max_wait=min(5.0, self.quiet_budget))
        self.quiet_budget = max(0.0, self.quiet_budget - (time.monotonic() - t_quiet))
        pids = server.pids()
        backend_pids = [] if server.proc is self.backend.proc else self.backend.pids()
        cpu0, bcpu0, busy0 = cpu_seconds(pids), cpu_seconds(backend_pids), busy_seconds()
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        try:
            result = fn()
        except (OSError, RuntimeError, ValueError, KeyError, subprocess.SubprocessError) as exc:
            # one broken measurement must not cost the whole run: record it and go on
            print(f"  {config:22} {scenario:12} FAILED: {exc!r}", flush=True)
            with self.raw.open("a") as raw:
                raw.write(json.dumps({"config": config, "run": run, "scenario": scenario,
                                      "error": repr(exc)}) + "\n")
            return {}
        wall = time.monotonic() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        pids = server.pids()
        proxy_cpu = cpu_seconds(pids) - cpu0
        backend_cpu = cpu_seconds(backend_pids) - bcpu0
        load_cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
        foreign = busy_seconds() - busy0 - proxy_cpu - backend_cpu - load_cpu
        result.update(config=config, run=run, scenario=scenario, proxy_cpu_s=proxy_cpu,
                      backend_cpu_s=backend_cpu, loadgen_cpu_s=load_cpu,
                      foreign_cpu_pct=max(0.0, 100 * foreign / wall / (os.cpu_count() or 1)),
                      quiet_before_pct=100 * quiet, tls=getattr(server, "tls_version", "?"),
                      **extra)
        self.results.append(result)
        with self.raw.open("a") as raw:
            raw.write(json.dumps(result) + "\n")
        print(f"  {config:22} {scenario:12} " + report.one_line(result), flush=True)
        return result

    # scenarios --------------------------------------------------------------------------

    def keepalive(self, server: Server, config: str, run: int, seconds: float = 0,
                  scenario: str = "ka", **extra: Any) -> None:
        s = self.settings
        url = f"https://127.0.0.1:{server.port}/small"
        load.wrk(url, connections=s.ka_connections, seconds=1, cpus=LOAD_CPUS)  # warm-up
        self.measure(server, config, run, scenario, lambda: load.wrk(
            url, connections=s.ka_connections, seconds=seconds or s.ka_seconds,
            cpus=LOAD_CPUS), **extra)

    def handshakes(self, server: Server, config: str, run: int, scenario: str,
                   resume: bool, **extra: Any) -> None:
        s = self.settings
        self.measure(server, config, run, scenario, lambda: load.s_time(
            server.port, resume=resume, processes=s.hs_clients, seconds=s.hs_seconds,
            cpus=LOAD_CPUS), **extra)

    def big(self, server: Server, config: str, run: int) -> None:
        s = self.settings
        url = f"https://127.0.0.1:{server.port}/1m"
        self.measure(server, config, run, "mib", lambda: load.wrk(
            url, connections=s.mib_connections, seconds=s.mib_seconds, cpus=LOAD_CPUS))

    def idle(self, server: Server, config: str, run: int) -> None:
        n = self.settings.idle_connections

        def hold() -> dict[str, Any]:
            time.sleep(1)
            before = rss_kib(server.pids())
            client = subprocess.Popen(
                ["taskset", "-c", LOAD_CPUS, sys.executable, "-m", "bench.idle",
                 str(server.port), str(n)], cwd=REPO, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, text=True)
            assert client.stdout is not None and client.stdin is not None
            t0 = time.monotonic()
            line = client.stdout.readline()
            open_s = time.monotonic() - t0
            opened = int(line.split()[1]) if line.startswith("READY") else 0
            time.sleep(2)
            after = rss_kib(server.pids())
            client.stdin.close()
            client.wait(60)
            return {"connections": opened, "wanted": n, "open_s": open_s,
                    "rss_before_kib": before, "rss_after_kib": after,
                    "kib_per_conn": (after - before) / opened if opened else float("nan")}

        self.measure(server, config, run, "idle", hold)

    # proxies ------------------------------------------------------------------------------

    def start(self, config: str, key: str) -> Server:
        work, certs, bport = self.work, self.certs, self.backend.port
        if config == "direct":
            return Direct(NginxBackend(work, certs.front[key], PROXY_CPUS[1],
                                       name=f"direct-{key}"))
        if config == "floor-tls":
            return FloorTLS(work, certs, key, PROXY_CPUS[1])
        kind, _, size = config.partition("-")
        n = int(size[0]) if size else 1
        cpus = PROXY_CPUS[n] if size else PROXY_CPUS[1]
        if kind == "gatewayd":
            variant = config.split("-", 2)[2] if config.count("-") >= 2 else ""
            return Gatewayd(work, certs, bport, n, key, cpus, tag="-" + variant if variant
                            else "", access_log=variant == "all-on",
                            metrics=variant != "all-off")
        if kind == "nginx":
            return NginxProxy(work, certs, bport, n, key, cpus)
        if kind == "haproxy":
            return HAProxy(work, certs, bport, n, key, cpus)
        if kind == "mitmproxy":
            return Mitmproxy(work, certs, bport, key, cpus)
        if kind == "floor":
            return Floor(work, certs, bport, key, cpus)
        raise ValueError(config)

    def run_config(self, config: str, run: int) -> None:
        sc = self.settings.scenarios
        if config == "floor-1w":
            # The floor passes requests on as they came: an HTTP/1.0 client (s_time) makes
            # it open a backend connection per client connection, and its idle footprint is
            # gevent's StreamServer's, so only its keep-alive and 1 MiB figures compare.
            sc = tuple(name for name in sc if name in ("ka", "mib"))
        elif config == "floor-tls":
            # a server, not a proxy: only its handshakes compare (with `direct`)
            sc = tuple(name for name in sc if name.startswith("hs_"))
        server = self.start(config, "ec")
        try:
            if "ka" in sc:
                self.keepalive(server, config, run)
            if "hs_full_ec" in sc:
                self.handshakes(server, config, run, "hs_full_ec", resume=False)
            if "hs_res_ec" in sc:
                self.handshakes(server, config, run, "hs_res_ec", resume=True)
            if "mib" in sc:
                self.big(server, config, run)
            if "idle" in sc and run < self.settings.idle_runs:
                self.idle(server, config, run)
        finally:
            server.stop()
            if isinstance(server, Direct):
                server.proc.stop()
        if "hs_full_rsa" in sc:
            server = self.start(config, "rsa")
            try:
                self.handshakes(server, config, run, "hs_full_rsa", resume=False)
            finally:
                server.proc.stop()

    def interleaved(self, configs: list[str], run: int, scenario: str = "ka_i") -> None:
        """One scenario through *configs*, all started at once and each measured in turn,
        `interleaved_rounds` times, the order rotating by one per round: keep-alive ("ka_i") or
        full handshakes ("hs_full_ec_i", "hs_full_rsa_i").

        The ratios the targets use come from here: two measurements seconds apart share
        the machine's drift (±30 % between runs on this shared 2-core machine), and no
        proxy is measured only as the first thing after its boot.  The idle proxies use
        the same core but next to no CPU while another one is measured."""
        key = "rsa" if scenario == "hs_full_rsa_i" else "ec"
        servers: dict[str, Server] = {}
        try:
            for config in configs:
                servers[config] = self.start(config, key)
            for rnd in range(self.settings.interleaved_rounds):
                shift = (run * self.settings.interleaved_rounds + rnd) % len(configs)
                for config in configs[shift:] + configs[:shift]:
                    if scenario == "ka_i":
                        self.keepalive(servers[config], config, run, scenario=scenario,
                                       round=rnd)
                    else:
                        self.handshakes(servers[config], config, run, scenario,
                                        resume=False, round=rnd)
        finally:
            for server in servers.values():
                server.stop()
                if isinstance(server, Direct):  # its own nginx here, not the backend
                    server.proc.stop()

    def run_ka_only(self, config: str, run: int, seconds: float = 0) -> None:
        server = self.start(config, "ec")
        try:
            self.keepalive(server, config, run, seconds)
        finally:
            server.stop()


def versions() -> dict[str, str]:
    def first_line(args: list[str]) -> str:
        try:
            p = subprocess.run(args, capture_output=True, text=True, timeout=20)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "n/a"

    import OpenSSL

    gw = first_line([str(Path(sys.executable).parent / "gatewayd"), "--version"])
    git = first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    return {
        "cpu": f"{cpu} x {os.cpu_count()}",
        "memory": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "gatewayd": f"{gw} (git {git})",
        "pyOpenSSL": f"{OpenSSL.__version__} ({OpenSSL.SSL.SSLeay_version(0).decode()})",
        "nginx": first_line(["nginx", "-v"]),
        "haproxy": first_line(["haproxy", "-v"]),
        "wrk": first_line(["wrk", "--version"]),
        "openssl": first_line(["openssl", "version"]),
        "mitmproxy": first_line([str(Mitmproxy.EXE), "--version"])
        if Mitmproxy.EXE.exists() else "not installed",
    }


def _interrupted(signum: int, frame: object) -> None:
    raise SystemExit(f"bench: interrupted by signal {signum}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 run, short, fewer scenarios")
    ap.add_argument("--runs", type=int, help="override the number of runs")
    ap.add_argument("--only", help="comma-separated configs (e.g. gatewayd-1w,nginx-1w)")
    ap.add_argument("--no-write", action="store_true", help="do not rewrite RESULTS.md")
    ap.add_argument("--report", metavar="JSON",
                    help="only rewrite RESULTS.md from a bench/out/results-*.json")
    args = ap.parse_args()
    if args.report:
        data = json.loads(Path(args.report).read_text())
        (REPO / "bench" / "RESULTS.md").write_text(report.markdown(data["meta"],
                                                                   data["results"]))
        return 0
    s = QUICK if args.quick else FULL
    if args.runs:
        s.runs = args.runs
    if args.only:
        s.configs = tuple(args.only.split(","))
        s.cost_variants = s.mitmproxy = False
    for tool in ("nginx", "haproxy", "wrk", "openssl", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} not found (make bench installs it)")
    raise_nofile(20_000)
    # `make bench &` starts us with SIGINT ignored; make both signals unwind the `finally`
    # blocks so that no proxy or backend outlives the harness.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupted)
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = OUT / f"work-{stamp}"
    started = time.monotonic()

    machine = versions()  # before measuring: the code that is measured
    certs = make_pki(work)
    backend = NginxBackend(work, certs.backend, BACKEND_CPUS)
    bench = Bench(s, work, certs, backend, raw=OUT / f"raw-{stamp}.jsonl",
                  quiet_budget=QUIET_BUDGET["quick" if args.quick else "full"])
    mitm = s.mitmproxy and Mitmproxy.EXE.exists()
    notes: list[str] = []
    if s.mitmproxy and not mitm:
        notes.append("mitmproxy skipped: bench/.venv/bin/mitmdump missing "
                     "(`make bench` installs it from PyPI; the install failed or was skipped)")
    try:
        for run in range(s.runs):
            print(f"== run {run + 1}/{s.runs} ({time.monotonic() - started:.0f} s)",
                  flush=True)
            for config in s.configs:
                bench.run_config(config, run)
            # the keep-alive targets' pair, and the lean forwarder they were derived from
            ka_set = [c for c in ("gatewayd-1w", "nginx-1w", "floor-1w") if c in s.configs]
            cost = ["gatewayd-1w-all-on", "gatewayd-1w-all-off"] if s.cost_variants else []
            if len(ka_set + cost) >= 2:
                bench.interleaved(ka_set + cost, run)
            # the handshake targets' pair, and the bare stack's pair beside it
            hs_pair: list[str] = [c for c in ("gatewayd-1w", "nginx-1w", "floor-tls", "direct")
                                 if c in s.configs]
            for scenario in ("hs_full_ec", "hs_full_rsa"):
                if len(hs_pair) >= 2 and scenario in s.scenarios:
                    bench.interleaved(hs_pair, run, scenario + "_i")
            if mitm:
                try:
                    bench.run_ka_only("mitmproxy", run)
                except (RuntimeError, TimeoutError, OSError) as exc:
                    notes.append(f"mitmproxy failed: {exc}")
                    mitm = False
    finally:
        backend.stop()
    elapsed = time.monotonic() - started
    meta = {"settings": s.__dict__, "versions": machine, "elapsed_s": elapsed,
            "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "quick": args.quick,
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "notes": notes,
            "layout": {"load": LOAD_CPUS, "backend": BACKEND_CPUS,
                       "proxy": {str(k): v for k, v in PROXY_CPUS.items()}}}
    (OUT / f"results-{stamp}.json").write_text(
        json.dumps({"meta": meta, "results": bench.results}, indent=1))
    text = report.markdown(meta, bench.results)
    print(text)
    if not args.no_write:
        (REPO / "bench" / "RESULTS.md").write_text(text)
    shutil.rmtree(work, ignore_errors=True)
    print(f"bench: done in {elapsed:.0f} s; raw JSON in {OUT}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
