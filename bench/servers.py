"""The throw-away PKI, the HTTPS backend and the proxies under test.

Every proxy verifies the backend's certificate against the throw-away CA with the name
`backend.test`, keeps backend connections alive, adds X-Forwarded-For, terminates TLS 1.3
for clients and writes no access log (gatewayd's metrics stay on: that is its default).
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.load import client_tls13_suites, negotiated
from bench.procs import Proc, free_port, pinned, tree, wait_port
from tests.support.gateway import GatewaySpec
from tests.support.pki import Leaf, TestPKI

REPO = Path(__file__).resolve().parents[1]
SMALL_BODY = b"x" * 100
ONE_MIB = 1 << 20
BACKEND_NAME = "backend.test"
IDLE_TIMEOUT = 300  # s every proxy keeps an idle client connection (idle-connection test)
#: Mozilla's "intermediate" TLS 1.3 suites, in its order, which is also browsers' order
#: and so what the load generators offer (bench/client-openssl.cnf)
INTERMEDIATE_TLS13 = client_tls13_suites()
SESSIONS_LOG_FORMAT = ("$ssl_session_reused $ssl_protocol $connection $connection_requests "
                       "$ssl_cipher")


@dataclass
class Certs:
    ca: Path                  # trust anchor of the backend certificate
    backend: Leaf             # ECDSA P-256, backend.test + 127.0.0.1
    front: dict[str, Leaf]    # what proxies present to clients: "ec" / "rsa"


def make_pki(directory: Path) -> Certs:
    pki = TestPKI(directory / "pki", ca_key_type="ec")
    rsa_ca = pki.other_ca("bench RSA CA", key_type="rsa")
    names = ["proxy.test", "127.0.0.1"]
    return Certs(
        ca=pki.ca_pem_path,
        backend=pki.issue([BACKEND_NAME, "127.0.0.1"], key_type="ec", stem="backend"),
        front={"ec": pki.issue(names, key_type="ec", stem="front-ec"),
               "rsa": pki.issue(names, key_type="rsa", ca=rsa_ca, stem="front-rsa")},
    )


def combined_pem(leaf: Leaf, directory: Path) -> Path:
    """cert chain + key in one file (HAProxy `crt`, mitmproxy `--certs`)."""
    path = directory / f"{leaf.cert_path.stem}.combined.pem"
    path.write_bytes(leaf.chain_pem + leaf.key_pem)
    path.chmod(0o600)
    return path


def check_get(port: int, path: str = "/small", tries: int = 50) -> str:
    """GET *path* over TLS until it answers 200; return the TLS version and suite the
    bench's load generators negotiate with it ("TLSv1.3 TLS_AES_128_GCM_SHA256")."""
    import http.client

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    last: Exception | None = None
    for _ in range(tries):
        try:
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
            conn.request("GET", path, headers={"Host": "proxy.test"})
            resp = conn.getresponse()
            body = resp.read()
            assert conn.sock is not None
            version = str(conn.sock.version())  # type: ignore[attr-defined, unused-ignore]
            conn.close()
            if resp.status == 200 and len(body) in (len(SMALL_BODY), ONE_MIB):
                suite = negotiated(port)
                return suite if suite != "?" else version
            last = RuntimeError(f"GET {path}: {resp.status} {body[:200]!r}")
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"127.0.0.1:{port}{path} never answered 200: {last}")


# -- servers ----------------------------------------------------------------------------

class Server:
    """A running server: `pids()` is its whole process tree (for /proc accounting)."""

    label = "?"
    proc: Proc
    port: int

    def pids(self) -> list[int]:
        return tree(self.proc.pid)

    def stop(self) -> None:
        self.proc.stop()


def _nginx_prefix(directory: Path) -> Path:
    for sub in ("tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi", "logs"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    return directory


def _nginx_common(d: Path, workers: int) -> str:
    return f"""
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile 20000;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp/body;
  proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;
  keepalive_requests 1000000;
  keepalive_timeout {IDLE_TIMEOUT}s;
  ssl_protocols TLSv1.2 TLSv1.3;
"""


class NginxBackend(Server):
    """nginx (1 worker) serving /small (100 B) and /1m (1 MiB) over HTTPS, keep-alive."""

    label = "backend"

    def __init__(self, work: Path, leaf: Leaf, cpus: str | None, name: str = "backend",
                 log_sessions: bool = False) -> None:
        d = _nginx_prefix(work / name)
        (d / "www").mkdir(exist_ok=True)
        (d / "www" / "1m").write_bytes(os.urandom(ONE_MIB))
        self.port = free_port()
        access = (f"access_log {d}/logs/sessions.log sessions;" if log_sessions else "")
        conf = _nginx_common(d, 1) + f"""
  log_format sessions "{SESSIONS_LOG_FORMAT}";
  server {{
    listen 127.0.0.1:{self.port} ssl;
    ssl_certificate {leaf.cert_path};
    ssl_certificate_key {leaf.key_path};
    {access}
    root {d}/www;
    location = /small {{ default_type text/plain; return 200 "{SMALL_BODY.decode()}"; }}
    location = /1m {{ default_type application/octet-stream; }}
    # gatewayd's default health probe is GET / expecting 200-399 (Azure's default probe)
    location = / {{ default_type text/plain; return 200 "ok"; }}
  }}
}}
"""
        (d / "nginx.conf").write_text(conf)
        self.sessions_log = d / "logs" / "sessions.log"
        self.proc = Proc(f"{name}-nginx", pinned(cpus, [
            "nginx", "-e", str(d / "logs" / "error.log"), "-p", str(d), "-c",
            str(d / "nginx.conf")]), d)
        wait_port(self.port, proc=self.proc)
        self.proc.check_alive()
        check_get(self.port)


class NginxProxy(Server):
    def __init__(self, work: Path, certs: Certs, backend_port: int, workers: int,
                 key: str, cpus: str | None) -> None:
        self.label = f"nginx-{workers}w"
        d = _nginx_prefix(work / f"nginx-{workers}w-{key}")
        front = certs.front[key]
        self.port = free_port()
        conf = _nginx_common(d, workers) + f"""
  upstream backend {{
    server 127.0.0.1:{backend_port};
    keepalive 256;
    keepalive_requests 1000000;
  }}
  server {{
    listen 127.0.0.1:{self.port} ssl;
    ssl_certificate {front.cert_path};
    ssl_certificate_key {front.key_path};
    location / {{
      proxy_pass https://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto https;
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate {certs.ca};
      proxy_ssl_name {BACKEND_NAME};
      proxy_ssl_server_name on;
      proxy_ssl_session_reuse on;
      proxy_max_temp_file_size 0;
    }}
  }}
}}
"""
        (d / "nginx.conf").write_text(conf)
        self.proc = Proc(f"nginx-{workers}w", pinned(cpus, [
            "nginx", "-e", str(d / "logs" / "error.log"), "-p", str(d), "-c",
            str(d / "nginx.conf")]), d)
        wait_port(self.port, proc=self.proc)
        self.proc.check_alive()
        self.tls_version = check_get(self.port)


class HAProxy(Server):
    def __init__(self, work: Path, certs: Certs, backend_port: int, threads: int,
                 key: str, cpus: str | None) -> None:
        self.label = f"haproxy-{threads}t"
        d = work / f"haproxy-{threads}t-{key}"
        d.mkdir(parents=True, exist_ok=True)
        crt = combined_pem(certs.front[key], d)
        self.port = free_port()
        server = (f"server b1 127.0.0.1:{backend_port} ssl verify required ca-file {certs.ca}"
                  f" sni str({BACKEND_NAME}) verifyhost {BACKEND_NAME}")
        conf = f"""
global
  nbthread {threads}
  # HAProxy picks the TLS 1.3 suite by its own order: Mozilla's "intermediate" one
  ssl-default-bind-ciphersuites {INTERMEDIATE_TLS13}
  maxconn 10100
  no strict-limits  # the hard RLIMIT_NOFILE here is 20000; 10,100 clients fit
  ssl-server-verify required

defaults
  mode http
  timeout connect 5s
  timeout client {IDLE_TIMEOUT}s
  timeout server 30s
  timeout http-request 10s
  timeout http-keep-alive {IDLE_TIMEOUT}s
  option forwardfor

frontend fe
  bind 127.0.0.1:{self.port} ssl crt {crt}
  default_backend be

backend be
  http-reuse always
  {server}
"""
        (d / "haproxy.cfg").write_text(conf)
        self.proc = Proc(f"haproxy-{threads}t", pinned(cpus, [
            "haproxy", "-db", "-f", str(d / "haproxy.cfg")]), d)
        wait_port(self.port, proc=self.proc)
        self.proc.check_alive()
        self.tls_version = check_get(self.port)


class Gatewayd(Server):
    def __init__(self, work: Path, certs: Certs, backend_port: int, workers: int,
                 key: str, cpus: str | None, *, access_log: bool = False,
                 metrics: bool = True, tag: str = "", wrapper: Sequence[str] = (),
                 boot_timeout: float = 20.0) -> None:
        """`wrapper` goes before the gatewayd command (bench/instructions.py runs it under
        valgrind, which also needs a longer `boot_timeout`)."""
        self.label = f"gatewayd-{workers}w{tag}"
        d = work / f"{self.label}-{key}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        front = certs.front[key]
        self.port = free_port()
        self.access_log = d / "access.log"
        spec = GatewaySpec(
            server={"workers": workers, "worker_connections": 12000,
                    "runtime_dir": str(d / "run"),
                    "access_log": str(self.access_log) if access_log else "off",
                    "graceful_timeout": 2, "log_level": "warning",
                    "keepalive_timeout": IDLE_TIMEOUT},
            listeners=[{"name": "front", "bind": f"127.0.0.1:{self.port}",
                        "protocol": "https", "certificate": str(front.cert_path),
                        "private_key": str(front.key_path)}],
            pools=[{"name": "be", "servers": [f"127.0.0.1:{backend_port}"]}],
            settings=[{"name": "be-tls", "protocol": "https", "port": backend_port,
                       "trusted_root_certificates": [str(certs.ca)],
                       "sni_name": BACKEND_NAME}],
            rules=[{"name": "main", "priority": 10, "listener": "front",
                    "backend_pool": "be", "backend_settings": "be-tls"}],
        )
        (d / "gatewayd.toml").write_text(spec.render())
        env = dict(os.environ)
        if not metrics:
            env["GATEWAYD_METRICS"] = "off"
        exe = str(Path(sys.executable).parent / "gatewayd")
        self.proc = Proc(self.label, pinned(cpus, [*wrapper, exe, "-c",
                                                   str(d / "gatewayd.toml")]), d, env=env)
        self.runtime_dir = d / "run"
        wait_port(self.port, timeout=boot_timeout, proc=self.proc)
        deadline = time.monotonic() + boot_timeout
        while len(list((d / "run").glob("worker-*.heartbeat"))) < workers:
            self.proc.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.label}: workers never became ready")
            time.sleep(0.05)
        self.tls_version = check_get(self.port)

    def worker_pid(self, timeout: float = 20.0) -> int:
        """The first worker's pid, from the master's state file."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                state = json.loads((self.runtime_dir / "state.json").read_text())
            except (OSError, ValueError):
                state = {}
            if state.get("worker_pids"):
                return int(state["worker_pids"][0])
            time.sleep(0.1)
        raise TimeoutError(f"{self.label}: no worker pid in state.json")


class Floor(Server):
    """bench/floor.py: the least a gevent + pyOpenSSL + httptools forwarder does, on
    gatewayd's own TLS layer; one process (so "1w")."""

    def __init__(self, work: Path, certs: Certs, backend_port: int, key: str,
                 cpus: str | None) -> None:
        self.label = "floor-1w"
        d = work / f"{self.label}-{key}"
        d.mkdir(parents=True, exist_ok=True)
        front = certs.front[key]
        self.port = free_port()
        script = Path(__file__).resolve().parent / "floor.py"
        self.proc = Proc(self.label, pinned(cpus, [
            sys.executable, str(script), str(self.port), str(front.cert_path),
            str(front.key_path), str(backend_port), str(certs.ca), BACKEND_NAME]), d)
        wait_port(self.port, proc=self.proc)
        self.tls_version = check_get(self.port)


class FloorTLS(Server):
    """bench/floor_tls.py: the least a gevent + pyOpenSSL HTTPS server does per new
    connection, answering /small itself (compare with `direct`, nginx doing the same)."""

    def __init__(self, work: Path, certs: Certs, key: str, cpus: str | None) -> None:
        self.label = "floor-tls"
        d = work / f"{self.label}-{key}"
        d.mkdir(parents=True, exist_ok=True)
        front = certs.front[key]
        self.port = free_port()
        self.proc = Proc(self.label, pinned(cpus, [
            sys.executable, "-m", "bench.floor_tls", str(self.port), str(front.cert_path),
            str(front.key_path)]), d, cwd=REPO)
        wait_port(self.port, proc=self.proc)
        self.tls_version = check_get(self.port)


class Direct(Server):
    """The backend itself as the 'proxy' (the ceiling): nothing extra runs."""

    def __init__(self, backend: NginxBackend) -> None:
        self.label = "direct"
        self.proc = backend.proc
        self.port = backend.port
        self.tls_version = check_get(self.port)

    def stop(self) -> None:  # the backend outlives the scenario
        pass


class Mitmproxy(Server):
    """mitmdump in reverse mode (optional; from the separate venv bench/.venv)."""

    EXE = Path(__file__).resolve().parent / ".venv" / "bin" / "mitmdump"

    def __init__(self, work: Path, certs: Certs, backend_port: int, key: str,
                 cpus: str | None) -> None:
        self.label = "mitmproxy"
        d = work / f"mitmproxy-{key}"
        d.mkdir(parents=True, exist_ok=True)
        crt = combined_pem(certs.front[key], d)
        self.port = free_port()
        # Upstream verification against the bench CA; the backend is addressed by IP and
        # its certificate carries that IP as a SAN, so the name check is real too.
        self.proc = Proc("mitmproxy", pinned(cpus, [
            str(self.EXE), "--mode", f"reverse:https://127.0.0.1:{backend_port}/",
            "--listen-host", "127.0.0.1", "--listen-port", str(self.port),
            "--certs", f"*={crt}", "--set", f"confdir={d}",
            "--set", f"ssl_verify_upstream_trusted_ca={certs.ca}",
            "--set", "keep_host_header=true", "--set", "flow_detail=0",
            "--set", "termlog_verbosity=error", "-q"]), d)
        wait_port(self.port, timeout=60, proc=self.proc)
        self.proc.check_alive()
        self.tls_version = check_get(self.port)
