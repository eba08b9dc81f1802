"""A scriptable raw TLS backend: answers requests with the exact bytes a test gives it.

Run from the repository root::

    python -m tests.support.rawbackend --listen 127.0.0.1:0 --cert C --key K \\
        --script SCRIPT.json --record RECORD.jsonl

Prints ``READY <port>`` once listening; SIGTERM exits 0.  Each accepted connection is
served by a thread: read a request head (up to CRLFCRLF), read its body (Content-Length or
chunked), look the request path up in the script and play the steps, then read the next
request on the same connection unless a step closed it.

The script (re-read for every request, so a test may rewrite it) maps a path to a list of
steps::

    {"/h/x": [{"send": "HTTP/1.1 200 OK\\r\\n..."}, {"sleep": 0.2}, {"send": "..."},
              {"close": true}]}

``send`` strings are latin-1 (bytes 0-255); ``{conn}`` in them is replaced by the
connection number.  Unknown paths get ``200`` with ``Content-Length`` and the body
``conn=<n> target=<target>`` (and header ``X-Conn: <n>``).

Every event is appended to the record file as one JSON line, flushed at once:
``{"event": "accept", "conn": n}``, ``{"event": "request", "conn": n, "seq": k, "target",
"head": <latin-1 raw head>, "body_len"}``, ``{"event": "sent", "conn": n, "target",
"step": i}`` after each ``send`` step, and ``{"event": "closed", "conn": n, "by": "peer" |
"script"}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Any

IO_TIMEOUT = 30.0

__all__ = ["RawBackend", "main"]


class _Recorder:
    def __init__(self, path: Path | None) -> None:
        self._lock = threading.Lock()
        self._file = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115
        self.conns = 0

    def next_conn(self) -> int:
        with self._lock:
            self.conns += 1
            return self.conns

    def write(self, entry: dict[str, Any]) -> None:
        if self._file is None:
            return
        entry["time"] = time.time()
        line = json.dumps(entry, sort_keys=True) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()


class _PeerGone(Exception):
    pass


class _Conn:
    def __init__(self, sock: Any, conn_id: int, rec: _Recorder, script: Path | None) -> None:
        self.sock = sock
        self.conn = conn_id
        self.rec = rec
        self.script = script
        self.buf = b""

    def _recv(self) -> bytes:
        try:
            data: bytes = self.sock.recv(65536)
        except (OSError, ssl.SSLError):
            data = b""
        if not data:
            raise _PeerGone
        return data

    def _read_until(self, marker: bytes) -> bytes:
        while True:
            i = self.buf.find(marker)
            if i >= 0:
                out, self.buf = self.buf[: i + len(marker)], self.buf[i + len(marker):]
                return out
            if len(self.buf) > 1 << 20:
                raise _PeerGone
            self.buf += self._recv()

    def _read_n(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.buf += self._recv()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _read_body(self, head: bytes) -> int:
        cl = None
        chunked = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            lname = name.strip().lower()
            if lname == b"content-length":
                cl = int(value.strip())
            elif lname == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            total = 0
            while True:
                size = int(self._read_until(b"\r\n").split(b";")[0].strip(), 16)
                if size == 0:
                    while self._read_until(b"\r\n") != b"\r\n":
                        pass
                    return total
                total += len(self._read_n(size))
                self._read_n(2)
        if cl:
            return len(self._read_n(cl))
        return 0

    def _steps(self, path: str, target: str) -> list[dict[str, Any]]:
        script: dict[str, Any] = {}
        if self.script is not None:
            with contextlib.suppress(OSError, ValueError):
                script = json.loads(self.script.read_text(encoding="utf-8"))
        steps = script.get(path)
        if steps is not None:
            return list(steps)
        body = f"conn={self.conn} target={target}".encode("latin-1")
        return [{"send": (f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n"
                          f"X-Conn: {self.conn}\r\nContent-Type: text/plain\r\n\r\n").encode()
                 .decode("latin-1") + body.decode("latin-1")}]

    def serve(self) -> None:
        seq = 0
        by = "peer"
        try:
            while True:
                head = self._read_until(b"\r\n\r\n")
                seq += 1
                words = head.split(b"\r\n", 1)[0].split(b" ")
                target = words[1].decode("latin-1") if len(words) > 1 else ""
                body_len = self._read_body(head)
                self.rec.write({"event": "request", "conn": self.conn, "seq": seq,
                                "target": target, "head": head.decode("latin-1"),
                                "body_len": body_len})
                path = target.split("?", 1)[0]
                closed = False
                for i, step in enumerate(self._steps(path, target)):
                    if "send" in step:
                        data = step["send"].replace("{conn}", str(self.conn))
                        self.sock.sendall(data.encode("latin-1"))
                        self.rec.write({"event": "sent", "conn": self.conn, "target": target,
                                        "step": i})
                    if "sleep" in step:
                        time.sleep(float(step["sleep"]))
                    if step.get("close"):
                        closed = True
                        break
                if closed:
                    by = "script"
                    break
        except (_PeerGone, OSError, ssl.SSLError, ValueError):
            pass
        finally:
            self.rec.write({"event": "closed", "conn": self.conn, "by": by})
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self.sock.close()


def _handle(raw: socket.socket, ctx: ssl.SSLContext, rec: _Recorder, script: Path | None
            ) -> None:
    conn_id = rec.next_conn()
    rec.write({"event": "accept", "conn": conn_id})
    raw.settimeout(IO_TIMEOUT)
    try:
        sock = ctx.wrap_socket(raw, server_side=True)
    except (OSError, ssl.SSLError) as exc:
        rec.write({"event": "closed", "conn": conn_id, "by": f"handshake: {exc}"})
        raw.close()
        return
    _Conn(sock, conn_id, rec, script).serve()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.support.rawbackend", description=__doc__)
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--script", type=Path)
    ap.add_argument("--record", type=Path)
    args = ap.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    # No session tickets: nothing but the scripted bytes ever follows a response.
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    rec = _Recorder(args.record)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, int(port)))
    listener.listen(128)
    listener.settimeout(0.2)
    sys.stdout.write(f"READY {listener.getsockname()[1]}\n")
    sys.stdout.flush()
    while not stop.is_set():
        try:
            raw, _addr = listener.accept()
        except TimeoutError:
            continue
        threading.Thread(target=_handle, args=(raw, ctx, rec, args.script),
                         daemon=True).start()
    listener.close()
    return 0


class RawBackend:
    """Runs ``python -m tests.support.rawbackend`` for a test; use as a context manager."""

    def __init__(self, workdir: Path, cert: Any, key: Any, script: dict[str, Any],
                 name: str = "raw") -> None:
        from tests.support.procs import REPO_ROOT, Proc

        workdir.mkdir(parents=True, exist_ok=True)
        self.script_path = workdir / f"{name}.script.json"
        self.record_path = workdir / f"{name}.records.jsonl"
        self.record_path.touch()
        self.set_script(script)
        self.proc = Proc([sys.executable, "-m", "tests.support.rawbackend", "--listen",
                          "127.0.0.1:0", "--cert", str(cert), "--key", str(key),
                          "--script", str(self.script_path), "--record",
                          str(self.record_path)],
                         cwd=REPO_ROOT, log_dir=workdir, name=f"rawbackend-{name}")
        try:
            m = self.proc.wait_for_output(r"^READY (\d+)$", 15, "stdout")
        except BaseException:
            self.proc.kill()
            raise
        self.port = int(m.group(1))
        self.address = f"127.0.0.1:{self.port}"

    def set_script(self, script: dict[str, Any]) -> None:
        tmp = self.script_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(script), encoding="utf-8")
        tmp.replace(self.script_path)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        text = self.record_path.read_text(encoding="utf-8")
        out = [json.loads(line) for line in text.splitlines(keepends=True)
               if line.endswith("\n") and line.strip()]
        return [e for e in out if kind is None or e["event"] == kind]

    def accepts(self) -> int:
        return len(self.events("accept"))

    def requests(self, target_prefix: str = "") -> list[dict[str, Any]]:
        return [e for e in self.events("request") if e["target"].startswith(target_prefix)]

    def stop(self) -> None:
        self.proc.stop(5)

    def __enter__(self) -> RawBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
