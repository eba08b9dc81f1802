"""Streaming with flat memory, the demo as a user runs it, and import hygiene."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

from tests.support.gateway import Gateway, simple_spec
from tests.support.procs import REPO_ROOT, Proc, curl, free_port, wait_port

GIB = 1 << 30


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def test_one_gib_download_streams_with_flat_worker_memory(tmp_path: Path, pki,
                                                          backend_factory) -> None:
    app = backend_factory("app")
    spec = simple_spec(tmp_path, cert=pki.issue(["127.0.0.1"]), backends={"app": app},
                       workers=1)
    with Gateway(tmp_path, spec) as gw:
        (worker,) = gw.worker_pids()
        # Warm up: one request so the worker's pools and TLS contexts are in use.
        assert curl(["-k", f"https://127.0.0.1:{gw.port}/"]).returncode == 0
        baseline = _rss_kib(worker)
        peak = baseline
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(0.05):
                peak = max(peak, _rss_kib(worker))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            out = curl(["-k", "-o", "/dev/null", "-w", "%{size_download} %{speed_download}",
                        f"https://127.0.0.1:{gw.port}/big?bytes={GIB}"], timeout=180)
        finally:
            done.set()
            sampler.join()
        assert out.returncode == 0, out.stderr
        size, speed = out.stdout.split()
        assert int(size) == GIB
        growth_mib = (peak - baseline) / 1024
        print(f"1 GiB through gatewayd: {float(speed) / 1e6:.0f} MB/s, worker RSS "
              f"{baseline / 1024:.1f} MiB → peak {peak / 1024:.1f} MiB (+{growth_mib:.1f})")
        assert growth_mib < 32, f"worker RSS grew by {growth_mib:.1f} MiB for 1 GiB"
        record = gw.wait_log(lambda r: r["uri"].startswith("/big"))
        assert record["bytes_sent"] == GIB and record["status"] == 200


def test_demo_prints_curl_commands_that_work(tmp_path: Path) -> None:
    port = free_port()
    demo = Proc([sys.executable, "-m", "gatewayd.cli", "--demo", "--demo-port", str(port),
                 "--runtime-dir", str(tmp_path / "run"),
                 "--admin-bind", f"127.0.0.1:{free_port()}"],
                cwd=REPO_ROOT, log_dir=tmp_path, name="demo")
    try:
        demo.wait_for_output(r"gatewayd --pin", timeout=30, stream="stdout")
        wait_port("127.0.0.1", port, 20)
        commands = [line.strip() for line in demo.stdout_text().splitlines()
                    if line.strip().startswith("curl ")]
        assert len(commands) >= 3
        for command in commands:
            # `localhost` may resolve to ::1 first; the demo listens on 127.0.0.1.
            command = command.replace("curl ", "curl --noproxy '*' -4 ", 1)
            out = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                                 timeout=30)
            assert out.returncode == 0, (command, out.stderr)
        text = subprocess.run(["bash", "-c", commands[1].replace("curl ", "curl -4 ", 1)],
                              capture_output=True, text=True, timeout=30).stdout
        assert '"backend": "images"' in text
        pin_command = re.search(r"gatewayd --pin (\S+)", demo.stdout_text())
        assert pin_command is not None
        assert demo.stop(timeout=20) == 0
        assert not Path(pin_command.group(1)).exists()  # the throw-away files are gone
    finally:
        if demo.alive:
            demo.kill()


def test_master_and_control_plane_import_no_gevent() -> None:
    code = ("import sys, gatewayd.cli, gatewayd.master, gatewayd.config, gatewayd.routing, "
            "gatewayd.forwarding, gatewayd.pins, gatewayd.tlsconf, gatewayd.workers.spec; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'gevent'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
