"""The admin endpoint on `admin_bind`: GET /metrics, /healthz, /readyz.

It runs in its own small process, forked and supervised by the master like a worker, so
that neither the master (which must stay boring) nor a worker's event loop does the
aggregation work of a scrape.  It knows the master's view of the world from
`<runtime_dir>/state.json`, which the master rewrites atomically whenever it changes.

- /metrics: every process's multiprocess files, aggregated (Prometheus text format).
- /healthz: 200 while the master has at least one ready worker, else 503.
- /readyz: 200 while the master is serving (not starting, reloading or stopping) with at
  least one ready worker, else 503: take the instance out of the load balancer.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from gatewayd import metrics

STATE_FILE = "state.json"


def write_state(runtime_dir: str, **state: Any) -> None:
    """Atomically replace the master's state file (readers never see half a file)."""
    path = os.path.join(runtime_dir, STATE_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(state, fh)
    os.replace(tmp, path)


def read_state(runtime_dir: str) -> dict[str, Any]:
    try:
        with open(os.path.join(runtime_dir, STATE_FILE)) as fh:
            state: dict[str, Any] = json.load(fh)
            return state
    except (OSError, ValueError):
        return {}


class AdminHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "gatewayd-admin"
    runtime_dir = ""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, content_type = metrics.render()
            self._send(200, body, content_type)
        elif path in ("/healthz", "/readyz"):
            state = read_state(self.runtime_dir)
            ready = int(state.get("ready_workers", 0))
            ok = ready >= 1 and (path == "/healthz" or state.get("state") == "serving")
            text = f"{'ok' if ok else 'unavailable'}: {state.get('state', 'unknown')}, " \
                   f"{ready} ready workers, generation {state.get('generation', 0)}\n"
            self._send(200 if ok else 503, text.encode(), "text/plain; charset=utf-8")
        else:
            self._send(404, b"not found: try /metrics, /healthz, /readyz\n",
                       "text/plain; charset=utf-8")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # scrapes every few seconds would drown the log


def run_admin(sock: socket.socket, runtime_dir: str, master_pid: int) -> int:
    """Serve the admin endpoint on a socket the master bound; exit with the master."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    signal.signal(signal.SIGQUIT, lambda *_: sys.exit(0))
    for name in ("SIGHUP", "SIGUSR1", "SIGTTIN", "SIGTTOU"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    handler = type("Handler", (AdminHandler,), {"runtime_dir": runtime_dir})
    server = ThreadingHTTPServer(sock.getsockname()[:2], handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.daemon_threads = True

    def watch_master() -> None:
        while os.getppid() == master_pid:
            threading.Event().wait(1.0)
        os._exit(0)

    threading.Thread(target=watch_master, daemon=True).start()
    server.serve_forever(poll_interval=0.5)
    return 0
