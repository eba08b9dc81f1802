"""Cookie-based affinity and connection draining, live (issue items 5 and 6): real
gatewayd instances (two of them sharing an affinity secret), real backends."""

from __future__ import annotations

import re
import secrets
import signal
import time
from pathlib import Path
from typing import Any

from tests.support.gateway import Gateway, GatewaySpec
from tests.support.procs import Backend, wait_for
from tests.test_health import get, make_spec, probe_toml, served_by, wait_log

COOKIE = "ApplicationGatewayAffinity"
SET_COOKIE = re.compile(rf"^{COOKIE}=([0-9a-f]+); Path=/$")
SET_COOKIE_CORS = re.compile(rf"^{COOKIE}CORS=([0-9a-f]+); Path=/; SameSite=None; Secure$")


def affinity_spec(tmp: Path, pki: Any, backends: list[Backend], *, workers: int = 2,
                  secret: Path | None = None, probes: str = "",
                  settings: dict[str, Any] | None = None) -> GatewaySpec:
    tmp.mkdir(parents=True, exist_ok=True)
    return make_spec(
        tmp, pki, workers=workers, pools={"web": [b.address for b in backends]},
        settings={"web": {"cookie_based_affinity": True, **(settings or {})}},
        pins=[b.leaf.spki_pin for b in backends],
        server={"affinity_secret_file": str(secret)} if secret else None, probes=probes)


def cookies_of(headers: Any) -> str | None:
    """The affinity value a response sets (checking both cookies' exact form), or None."""
    values = headers.get_all("Set-Cookie") or []
    if not values:
        return None
    assert len(values) == 2, values
    plain, cors = SET_COOKIE.match(values[0]), SET_COOKIE_CORS.match(values[1])
    assert plain and cors, values
    assert plain.group(1) == cors.group(1)
    return plain.group(1)


def with_cookie(value: str, name: str = COOKIE) -> dict[str, str]:
    return {"Cookie": f"other=1; {name}={value}"}


def cookie_per_server(gw: Gateway, count: int) -> dict[str, str]:
    """server name → the cookie a fresh session on it got."""
    found: dict[str, str] = {}
    for _ in range(4 * count):
        status, headers, body = get(gw, "/new-session")
        assert status == 200
        value = cookies_of(headers)
        assert value is not None, "a request without a cookie gets one"
        found.setdefault(served_by(body), value)
        if len(found) == count:
            return found
    raise AssertionError(f"sessions reached only {sorted(found)}")


def test_cookie_is_set_until_returned_and_pins_the_server(tmp_path: Path, pki,
                                                          backend_factory) -> None:
    backends = [backend_factory(n) for n in ("a", "b", "c")]
    with Gateway(tmp_path, affinity_spec(tmp_path, pki, backends, workers=4)) as gw:
        sessions = cookie_per_server(gw, 3)
        assert all(len(v) == 32 for v in sessions.values())
        for server, value in sessions.items():
            for name in (COOKIE, COOKIE + "CORS"):
                for _ in range(6):  # fresh connections: any worker
                    status, headers, body = get(gw, "/again", with_cookie(value, name))
                    assert status == 200 and served_by(body) == server, (name, server)
                    assert headers.get_all("Set-Cookie") is None


def test_forged_cookie_is_ignored_and_replaced(tmp_path: Path, pki, backend_factory) -> None:
    backends = [backend_factory(n) for n in ("a", "b")]
    with Gateway(tmp_path, affinity_spec(tmp_path, pki, backends)) as gw:
        sessions = cookie_per_server(gw, 2)
        forged = ["0" * 32, "deadbeef", sessions["a"][:-1] + "x", ""]
        for value in forged:
            status, headers, body = get(gw, "/forged", with_cookie(value))
            assert status == 200
            fresh = cookies_of(headers)
            assert fresh is not None and fresh != value
            assert fresh == sessions[served_by(body)]


def test_two_instances_with_one_secret_route_a_cookie_alike(tmp_path: Path, pki,
                                                            backend_factory) -> None:
    backends = [backend_factory(n) for n in ("a", "b", "c")]
    secret = tmp_path / "affinity.secret"
    secret.write_text(secrets.token_hex(32))
    spec_one = affinity_spec(tmp_path / "one", pki, backends, secret=secret)
    spec_two = affinity_spec(tmp_path / "two", pki, backends, secret=secret)
    with Gateway(tmp_path / "one", spec_one) as one, Gateway(tmp_path / "two", spec_two) as two:
        from_one = cookie_per_server(one, 3)
        for server, value in from_one.items():
            status, headers, body = get(two, "/elsewhere", with_cookie(value))
            assert status == 200 and served_by(body) == server
            assert headers.get_all("Set-Cookie") is None
        assert cookie_per_server(two, 3) == from_one


def test_cookie_for_an_unhealthy_server_rebalances(tmp_path: Path, pki, backend_factory
                                                   ) -> None:
    a, b = backend_factory("a"), backend_factory("b")
    probes = probe_toml("fast", interval=0.5, timeout=1, unhealthy_threshold=1)
    spec = affinity_spec(tmp_path, pki, [a, b], probes=probes, settings={"probe": "fast"})
    with Gateway(tmp_path, spec) as gw:
        sessions = cookie_per_server(gw, 2)
        b.stop()
        wait_log(gw, rf"backend web/{b.address} is unhealthy")
        status, headers, body = get(gw, "/b-gone", with_cookie(sessions["b"]))
        assert status == 200 and served_by(body) == "a"
        assert cookies_of(headers) == sessions["a"]


def test_cookie_names_the_server_that_answered_after_a_connect_retry(
        tmp_path: Path, pki, backend_factory) -> None:
    """The first choice is refused and the request is retried on another server: the
    cookie set on that response must lead back to the server that answered it."""
    dead, a, c = backend_factory("dead"), backend_factory("a"), backend_factory("c")
    probes = probe_toml("slow", interval=3600, unhealthy_threshold=20)
    spec = affinity_spec(tmp_path, pki, [dead, a, c], workers=1, probes=probes,
                         settings={"probe": "slow"})
    with Gateway(tmp_path, spec) as gw:
        wait_for(lambda: all(b.records() for b in (dead, a, c)), 5, "the first probes")
        dead.stop()
        status, headers, body = get(gw, "/first")
        assert status == 200
        first = served_by(body)
        value = cookies_of(headers)
        assert value is not None
        status, headers, body = get(gw, "/second", with_cookie(value))
        assert status == 200
        assert (served_by(body), cookies_of(headers)) == (first, None), (
            f"the session started on {first!r} with a cookie that leads elsewhere")


def test_connection_draining_after_a_reload_removes_a_server(tmp_path: Path, pki,
                                                             backend_factory) -> None:
    a, b = backend_factory("a"), backend_factory("b")
    spec = affinity_spec(tmp_path, pki, [a, b], settings={"connection_draining_timeout": 3})
    with Gateway(tmp_path, spec) as gw:
        sessions = cookie_per_server(gw, 2)
        spec.pools[0]["servers"] = [a.address]
        gw.config_path.write_text(spec.render())
        gw.proc.signal(signal.SIGHUP)
        wait_log(gw, r"reloaded: generation 2 serving")
        reloaded = time.monotonic()
        # the removed server keeps its sessions ...
        for _ in range(4):
            status, headers, body = get(gw, "/drain", with_cookie(sessions["b"]))
            assert status == 200 and served_by(body) == "b"
            assert headers.get_all("Set-Cookie") is None
        # ... but gets no new ones
        for _ in range(6):
            status, headers, body = get(gw, "/new")
            assert status == 200 and served_by(body) == "a"
            assert cookies_of(headers) == sessions["a"]
        assert time.monotonic() - reloaded < 2.5, "too slow to check within the timeout"

        def moved() -> bool:
            status, headers, body = get(gw, "/drain", with_cookie(sessions["b"]))
            assert status == 200
            return served_by(body) == "a" and cookies_of(headers) == sessions["a"]

        wait_for(moved, 8, "the drained sessions to move", interval=0.2)
        assert time.monotonic() - reloaded >= 2.0, "drained before the timeout"
