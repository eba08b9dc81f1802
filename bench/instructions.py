"""Instructions one gatewayd worker executes per request: `python -m bench.instructions`.

This machine's speed drifts by ±10-20 % from one minute to the next (it is a shared
virtual machine without hardware counters), so a 3 % change cannot be seen in CPU
seconds without many interleaved runs.  Instruction counts do not drift: the same code,
the same requests and the same environment give the same count to within a few tenths of
a per cent.  So this runs the bench's gatewayd (one worker, the bench config) under
valgrind's callgrind twice, once with `--warmup` requests and once with `--requests` more
(h2load: keep-alive; or one new TLS connection per request; or 1 MiB responses), and
prints the difference in the worker's instructions per request: boot and shutdown cancel
out.  (callgrind_control cannot reach a forked worker, hence two runs.)

Use it to compare two versions of the code (A/B), not as a speed figure: instructions are
not time (a cache miss or a system call's kernel work counts as nothing here), and
valgrind's synthetic CPU runs OpenSSL's generic code paths.  `make bench` gives the
figures; this tells quickly and exactly whether a change removed work.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.servers import Gatewayd, NginxBackend, make_pki

BOOT_TIMEOUT = 300.0  # s: the master and worker import everything under valgrind
#: gevent's hub wait (compiled by Cython: a C function callgrind counts the calls of),
#: where a greenlet parks until its socket is ready: both builds of gatewayd wait there.
WAIT_FUNCTION = "WaitOperationsGreenlet_wait"


def _h2load(port: int, scenario: str, requests: int) -> None:
    """Exactly `requests` successful requests, or an error.  One client connection at a
    time: with concurrent clients, how many requests one wake-up of the worker serves
    depends on timing, and so would the count."""
    url = f"https://127.0.0.1:{port}/{'1m' if scenario == 'mib' else 'small'}"
    # hs: one request per connection, so `requests` full handshakes, one after another
    runs = [1] * requests if scenario == "hs" else [requests]
    for n in runs:
        out = subprocess.run(["h2load", "--h1", "-n", str(n), "-c", "1", url],
                             capture_output=True, text=True, timeout=3600).stdout
        line = next((x for x in out.splitlines() if x.startswith("requests:")), "")
        if f"{n} succeeded" not in line:
            sys.exit(f"h2load did not complete {n} requests: {line or out[-500:]}")


def _worker_instructions(scenario: str, requests: int, keep: Path | None = None,
                         access_log: bool = False) -> tuple[int, int]:
    """Start the backend and gatewayd under callgrind, send `requests`, stop, and return
    the worker's instruction count for its whole life (callgrind writes it at exit) and
    how many times it waited in gevent's hub."""
    with tempfile.TemporaryDirectory(prefix="gatewayd-instructions-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # nginx's workers (user nobody) read the /1m file below it
        certs = make_pki(work)
        backend = NginxBackend(work, certs.backend, None)
        out_dir = work / "callgrind"
        out_dir.mkdir()
        wrapper = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_dir}/cg.%p"]
        gateway = Gatewayd(work, certs, backend.port, 1, "ec", None, wrapper=wrapper,
                           boot_timeout=BOOT_TIMEOUT, access_log=access_log)
        try:
            worker = gateway.worker_pid(timeout=60.0)
            _h2load(gateway.port, scenario, requests)
        finally:
            gateway.stop()
            backend.stop()
        dump = out_dir / f"cg.{worker}"
        if keep is not None:  # for callgrind_annotate: the C functions' shares
            shutil.copy(dump, keep)
        return callgrind_total(dump), callgrind_calls(dump, WAIT_FUNCTION)


def callgrind_calls(dump: Path, fragment: str) -> int:
    """How many calls a callgrind output file counted to the functions whose names
    contain `fragment` (from its `cfn=` / `calls=` lines; a name is given once, on the
    first `fn=` or `cfn=` line of its id, later lines name the id alone)."""
    names: dict[str, str] = {}
    total = 0
    target = ""
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith(("fn=", "cfn=")):
            ident, _, name = line.partition("=")[2].partition(" ")
            if name:
                names[ident] = name
            if line[0] == "c":
                target = names.get(ident, "")
        elif line.startswith("calls=") and fragment in target:
            total += int(line[6:].split()[0])
    return total


def callgrind_total(dump: Path) -> int:
    """The instructions a callgrind output file counted, in all."""
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=("ka", "hs", "mib"), default="ka",
                        help="ka: keep-alive /small; hs: a new TLS connection per request; "
                             "mib: 1 MiB responses")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--access-log", action="store_true",
                        help="with the JSON access log on (to a file), as `make bench`'s "
                             "everything-on variant")
    parser.add_argument("--keep", type=Path, metavar="FILE",
                        help="keep the callgrind files: FILE (the longer run) and FILE.base; "
                             "python -m bench.instructions_diff FILE shows per function "
                             "what the extra requests cost")
    args = parser.parse_args()
    for tool in ("valgrind", "h2load"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (apt-get install valgrind nghttp2-client)")
    # Two runs that differ only in the number of requests: boot, warm-up and shutdown
    # cancel out in the difference.
    base, base_waits = _worker_instructions(
        args.scenario, args.warmup, args.keep.with_suffix(".base") if args.keep else None,
        args.access_log)
    more, more_waits = _worker_instructions(args.scenario, args.warmup + args.requests,
                                            args.keep, args.access_log)
    total = more - base
    unit = "connection" if args.scenario == "hs" else "request"
    # Whether a read finds its bytes there or waits depends on timing (valgrind's speed
    # against the backend's and h2load's), and a wait costs thousands of instructions:
    # compare two versions at about the same waits (bench/README.md).
    print(f"{args.scenario}: {total / args.requests:,.0f} instructions per {unit}, "
          f"{(more_waits - base_waits) / args.requests:.2f} waits per {unit} "
          f"(gatewayd worker, {args.requests} {unit}s, callgrind)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
