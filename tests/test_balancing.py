"""Balancing, retries and host/path overrides, live (issue items 3, 4 and 7): a real
master with forked workers and its prober, real backend processes, and small in-process
TCP servers where a backend has to misbehave on cue (refuse TLS, never accept, drop a
pooled keep-alive connection)."""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.support.gateway import Gateway
from tests.support.procs import https_connection, wait_for
from tests.test_health import (
    client_records,
    get,
    header,
    make_spec,
    probe_records,
    probe_toml,
    served_by,
)

SLOW_PROBE = probe_toml("slow", interval=3600, unhealthy_threshold=20)


class TcpServer:
    """A tiny threaded TCP server in the test process.

    mode "close": accept and close at once (a TLS handshake against it fails).
    mode "stale": plain HTTP/1.1 keep-alive; the first request on a connection is
      answered, a later one is met by closing the connection without an answer -- the
      race of a backend dropping an idle keep-alive connection just as it is reused
      (`rst` closes with a TCP reset instead of a FIN).
    mode "blackhole": never accept, with a full backlog, so connects time out.
    """

    def __init__(self, mode: str, *, rst: bool = False) -> None:
        self.mode = mode
        self.rst = rst
        self.accepts = 0
        self.requests: list[tuple[int, str]] = []  # (connection number, request line)
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._filler: socket.socket | None = None
        self._stopped = False
        if mode == "blackhole":
            self.sock.listen(0)
            self._filler = socket.create_connection(("127.0.0.1", self.port), timeout=2)
            return
        self.sock.listen(64)
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.accepts += 1
                number = self.accepts
            if self.mode == "close":
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        conn.settimeout(10)
        buf = b""
        seq = 0
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                line = head.split(b"\r\n", 1)[0].decode("latin-1")
                seq += 1
                with self.lock:
                    self.requests.append((number, line))
                if seq > 1:  # a reused connection: drop it, no answer
                    if self.rst:
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                    return
                body = json.dumps({"backend": "stale", "conn": number}).encode()
                send_body = not line.startswith("HEAD ")
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%b"
                             % (len(body), body if send_body else b""))
        except OSError:
            return
        finally:
            conn.close()

    def close(self) -> None:
        self._stopped = True
        self.sock.close()
        if self._filler is not None:
            self._filler.close()


# -- 3. round robin across the instance ------------------------------------------------


def test_round_robin_spreads_400_connections_over_4_servers_with_4_workers(
        tmp_path: Path, pki, backend_factory) -> None:
    backends = [backend_factory(f"s{i}") for i in range(4)]
    spec = make_spec(tmp_path, pki, workers=4, pools={"web": [b.address for b in backends]},
                     pins=[b.leaf.spki_pin for b in backends])
    with Gateway(tmp_path, spec) as gw:
        def one(i: int) -> str:
            status, _, body = get(gw, f"/rr/{i}")
            assert status == 200
            return served_by(body)

        with ThreadPoolExecutor(max_workers=16) as pool:
            spread = Counter(pool.map(one, range(400)))
        print(f"round-robin spread over 400 connections: {dict(sorted(spread.items()))}")
        for backend in backends:
            assert 85 <= spread[backend.name] <= 115, spread
            assert len([r for r in client_records(backend)
                        if r["target"].startswith("/rr/")]) == spread[backend.name]


def test_sequential_connections_cycle_through_all_servers(tmp_path: Path, pki,
                                                          backend_factory) -> None:
    """One request at a time: an instance-wide counter hands out the servers in strict
    rotation, whichever worker accepts each connection."""
    backends = [backend_factory(f"s{i}") for i in range(4)]
    spec = make_spec(tmp_path, pki, workers=4, pools={"web": [b.address for b in backends]},
                     pins=[b.leaf.spki_pin for b in backends])
    with Gateway(tmp_path, spec) as gw:
        order = [served_by(get(gw, f"/seq/{i}")[2]) for i in range(24)]
        windows = [order[i:i + 4] for i in range(0, 24, 4)]
        assert all(len(set(w)) == 4 for w in windows), order
        assert Counter(order) == {b.name: 6 for b in backends}


# -- 4. retries ----------------------------------------------------------------------


def test_tls_failure_before_any_byte_is_retried_once_on_another_server_then_502(
        tmp_path: Path, pki, backend_factory) -> None:
    a = backend_factory("a")
    refusers = [TcpServer("close") for _ in range(3)]
    try:
        spec = make_spec(
            tmp_path, pki, workers=1,
            pools={"mixed": [refusers[0].address, a.address],
                   "broken": [r.address for r in refusers]},
            settings={"mixed": {"probe": "slow"}, "broken": {"probe": "slow"}},
            pins=[a.leaf.spki_pin], routes={"/broken/*": "broken"}, probes=SLOW_PROBE)
        with Gateway(tmp_path, spec) as gw:
            # the prober's first probes (one per target) have connected
            wait_for(lambda: refusers[0].accepts >= 2 and refusers[1].accepts >= 1
                     and refusers[2].accepts >= 1, 5, "the first probes")
            for i in range(6):
                status, _, body = get(gw, f"/mixed/{i}")
                assert status == 200 and served_by(body) == "a"
            before = [r.accepts for r in refusers]
            status, _, _ = get(gw, "/broken/x")
            assert status == 502
            record = gw.wait_log(lambda r: r["uri"] == "/broken/x")
            assert record["error_info"].startswith("tls_handshake"), record
            tried = [r.accepts - b for r, b in zip(refusers, before, strict=True)]
            assert sorted(tried) == [0, 1, 1], tried  # two servers, one attempt each
    finally:
        for refuser in refusers:
            refuser.close()


def test_connect_timeout_is_retried_on_another_server_then_502(
        tmp_path: Path, pki, backend_factory) -> None:
    a = backend_factory("a")
    holes = [TcpServer("blackhole") for _ in range(2)]
    try:
        spec = make_spec(
            tmp_path, pki, workers=1,
            pools={"mixed": [holes[0].address, a.address],
                   "holes": [h.address for h in holes]},
            settings={"mixed": {"probe": "slow", "connect_timeout": 0.5},
                      "holes": {"probe": "slow", "connect_timeout": 0.5}},
            pins=[a.leaf.spki_pin], routes={"/holes/*": "holes"}, probes=SLOW_PROBE)
        with Gateway(tmp_path, spec) as gw:
            statuses = [get(gw, f"/mixed/{i}")[0] for i in range(2)]
            assert statuses == [200, 200]
            status, _, _ = get(gw, "/holes/x")
            record = gw.wait_log(lambda r: r["uri"] == "/holes/x")
            assert record["error_info"].startswith("connect_timeout"), record
            assert status == 502, f"issue item 4: retried once, then 502 (got {status})"
    finally:
        for hole in holes:
            hole.close()


def test_stale_pooled_connection_is_retried_for_idempotent_requests(tmp_path: Path, pki
                                                                     ) -> None:
    for rst in (False, True):
        run = tmp_path / ("rst" if rst else "fin")
        run.mkdir()
        stale = TcpServer("stale", rst=rst)
        try:
            spec = make_spec(run, pki, workers=1, pools={"web": [stale.address]},
                             settings={"web": {"protocol": "http", "port": 80,
                                               "probe": "slow"}}, probes=SLOW_PROBE)
            with Gateway(run, spec) as gw:
                conn = https_connection("127.0.0.1", gw.port, sni=None, cafile=None)
                try:
                    results = []
                    for method in ("GET", "GET", "HEAD", "OPTIONS", "DELETE", "PUT", "GET"):
                        conn.request(method, f"/k/{method}", headers={"Host": "x"})
                        response = conn.getresponse()
                        response.read()
                        results.append((method, response.status))
                finally:
                    conn.close()
                assert all(status == 200 for _, status in results), (rst, results)
                reused = [line for number, line in stale.requests
                          if sum(n == number for n, _ in stale.requests) > 1]
                # every request after the first met a dropped pooled connection
                assert len(reused) >= 5, stale.requests
                records = wait_for(
                    lambda: (lambda rs: rs if len(rs) >= 7 else None)(
                        [r for r in gw.log_records() if r["uri"].startswith("/k/")]),
                    5, "7 access-log records")
                assert [r["status"] for r in records] == [200] * 7, records
        finally:
            stale.close()


# -- 7. host name and path overrides -------------------------------------------------


def test_host_name_and_path_overrides(tmp_path: Path, pki, backend_factory) -> None:
    b = backend_factory("b")
    pools = {"override": [b.address], "plain": [b.address], "hostname": [b.address],
             "pick": [f"localhost:{b.port}"], "prefix": [b.address], "deeper": [b.address],
             "exact": [b.address]}
    settings: dict[str, dict[str, Any]] = {
        "hostname": {"host_name": "backend.example"},
        "pick": {"pick_host_name_from_backend_address": True},
        "override": {"path": "/override/"},
        "prefix": {"path": "/override/"},
        "deeper": {"path": "/override/"},
        "exact": {"path": "/override/"},
    }
    spec = make_spec(tmp_path, pki, pools=pools, settings=settings, pins=[b.leaf.spki_pin],
                     routes={"/plain/*": "plain", "/hostname/*": "hostname",
                             "/pick/*": "pick", "/pathrule/home*": "deeper",
                             "/pathrule*": "prefix", "/exactrule/": "exact"})
    cases = [
        # (request, Host sent, target the backend must see, Host it must see, SNI)
        ("/plain/a?q=1", "shop.test", "/plain/a?q=1", "shop.test", "shop.test"),
        ("/hostname/a", "shop.test", "/hostname/a", "backend.example", "backend.example"),
        ("/pick/a", "shop.test", "/pick/a", "localhost", "localhost"),
        # Azure's table for "override backend path"; /home/ matches no path rule, so
        # the rule's default (with the override) serves it.
        ("/home/", "shop.test", "/override/home/", "shop.test", "shop.test"),
        ("/home/secondhome/?q=2", "shop.test", "/override/home/secondhome/?q=2",
         "shop.test", "shop.test"),
        ("/pathrule/home/", "shop.test", "/override/", "shop.test", "shop.test"),
        ("/pathrule/home/secondhome/", "shop.test", "/override/secondhome/", "shop.test",
         "shop.test"),
        ("/pathrule/x/", "shop.test", "/override/x/", "shop.test", "shop.test"),
        ("/exactrule/", "shop.test", "/override/", "shop.test", "shop.test"),
    ]
    with Gateway(tmp_path, spec) as gw:
        for request, host, target, backend_host, sni in cases:
            status, _, body = get(gw, request, headers={"Host": host})
            assert status == 200, (request, status, body)
            seen = json.loads(body)
            assert seen["target"] == target, (request, seen["target"])
            assert header(seen, "host") == backend_host, (request, seen["headers"])
            assert seen["sni"] == sni, (request, seen["sni"])
        # the prober never asked for the client's paths
        assert {r["target"] for r in probe_records(b)} == {"/"}
