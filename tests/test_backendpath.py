"""Pure logic behind the live balancing tests: the backend path override (Azure's table),
the stateless affinity cookie, and the shared health map."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from pathlib import Path

import pytest

from gatewayd import affinity
from gatewayd.backendpath import matched_prefix, override_path
from gatewayd.health import HEALTHY, UNHEALTHY, UNKNOWN, HealthMap

# -- backend path override ------------------------------------------------------------


@pytest.mark.parametrize(("path", "patterns", "want"), [
    # Azure's "override backend path" table, override "/override/"
    ("/pathrule/home/", ("/pathrule*",), "/override/home/"),
    ("/pathrule/home/secondhome/", ("/pathrule*",), "/override/home/secondhome/"),
    ("/home/", (), "/override/home/"),                      # basic rule / no path rule
    ("/home/secondhome/", (), "/override/home/secondhome/"),
    ("/pathrule/home/", ("/pathrule/home*",), "/override/"),
    ("/pathrule/home/secondhome/", ("/pathrule/home*",), "/override/secondhome/"),
    ("/pathrule/", ("/pathrule/",), "/override/"),
    # "/x/*" patterns and the rest of Azure's semantics
    ("/pathrule/home/secondhome/", ("/pathrule/home/*",), "/override/secondhome/"),
    ("/pathrule/homepage", ("/pathrule/home*",), "/override/page"),
    ("/PathRule/Home/x", ("/pathrule/home*",), "/override/x"),  # case-insensitive match
    ("/", (), "/override/"),
    ("/other", ("/images/*", "/other"), "/override/"),
])
def test_override_path_follows_azure(path: str, patterns: tuple[str, ...], want: str
                                     ) -> None:
    assert override_path(path, "/override/", patterns) == want


def test_override_path_without_trailing_slash_and_without_override() -> None:
    assert override_path("/home/", "") == "/home/"
    assert override_path("/home/", "/override") == "/override/home/"
    assert override_path("/pathrule/home", "/override", ("/pathrule*",)) == "/override/home"
    assert override_path("/a/b", "/", ()) == "/a/b"
    assert override_path("/pathrule/b", "/", ("/pathrule/*",)) == "/b"


def test_matched_prefix() -> None:
    assert matched_prefix("/images/*", "/Images/a.png") == "/Images/"
    assert matched_prefix("/images/*", "/images") is None
    assert matched_prefix("/img*", "/img2/x") == "/img"
    assert matched_prefix("/exact", "/EXACT") == "/EXACT"
    assert matched_prefix("/exact", "/exact/") is None


# -- affinity cookie ---------------------------------------------------------------------


def test_cookie_value_is_an_hmac_of_pool_and_server() -> None:
    secret = b"s" * 32
    value = affinity.cookie_value(secret, "web", "10.0.0.1:443")
    assert re.fullmatch(r"[0-9a-f]{32}", value)
    expected = hmac.new(secret, b"web\x0010.0.0.1:443", hashlib.sha256).hexdigest()[:32]
    assert value == expected
    assert affinity.cookie_value(secret, "web", "10.0.0.1:443") == value  # stateless
    assert affinity.cookie_value(b"t" * 32, "web", "10.0.0.1:443") != value
    assert affinity.cookie_value(secret, "api", "10.0.0.1:443") != value
    assert affinity.cookie_value(secret, "web", "10.0.0.2:443") != value
    table = affinity.value_table(secret, "web", ["a:1", "b:1"])
    assert table == {affinity.cookie_value(secret, "web", s): s for s in ("a:1", "b:1")}


def test_read_cookie() -> None:
    name = "ApplicationGatewayAffinity"
    assert affinity.read_cookie([(b"Cookie", b"x=1; ApplicationGatewayAffinity=abc")],
                                name) == "abc"
    assert affinity.read_cookie([(b"cookie", b"ApplicationGatewayAffinityCORS=\"q\"")],
                                name) == "q"
    assert affinity.read_cookie([(b"Cookie", b"a=1"), (b"COOKIE", f"{name}=z".encode())],
                                name) == "z"
    assert affinity.read_cookie([(b"Cookie", b"ApplicationGatewayAffinityX=abc")],
                                name) is None
    assert affinity.read_cookie([(b"X-Cookie", f"{name}=abc".encode())], name) is None
    assert affinity.read_cookie([(b"Cookie", name.encode())], name) is None


def test_set_cookie_headers_are_azures_pair() -> None:
    assert affinity.set_cookie_headers("Aff", "v1") == [
        (b"Set-Cookie", b"Aff=v1; Path=/"),
        (b"Set-Cookie", b"AffCORS=v1; Path=/; SameSite=None; Secure"),
    ]


def test_load_secret(tmp_path: Path) -> None:
    good = tmp_path / "secret"
    good.write_bytes(b"0123456789abcdef0123\n")
    assert affinity.load_secret(str(good)) == b"0123456789abcdef0123"
    short = tmp_path / "short"
    short.write_bytes(b"tooshort\n")
    with pytest.raises(ValueError, match="16 bytes"):
        affinity.load_secret(str(short))
    one, two = affinity.load_secret(""), affinity.load_secret("")
    assert len(one) == 32 and one != two


# -- the shared health map ------------------------------------------------------------


def test_health_map_verdicts_are_shared_between_mappings(tmp_path: Path) -> None:
    path = str(tmp_path / "health.bin")
    prober = HealthMap.create(path, n_targets=3, n_pairs=2)
    worker = HealthMap.open(path)
    try:
        assert [worker.state(i) for i in range(3)] == [UNKNOWN] * 3
        assert all(worker.healthy(i) for i in range(3))  # not probed yet: served
        prober.set(1, False, "status_mismatch")
        assert worker.state(1) == UNHEALTHY and not worker.healthy(1)
        assert worker.reason(1) == "status_mismatch"
        prober.set(1, True)
        assert worker.state(1) == HEALTHY and worker.healthy(1) and worker.reason(1) == ""
        prober.set(2, False, "body_mismatch")
        assert worker.reason(2) == "body_mismatch" and worker.healthy(0)
    finally:
        prober.close()
        worker.close()


def test_health_map_check_requests_and_round_robin_counters(tmp_path: Path) -> None:
    path = str(tmp_path / "health.bin")
    prober = HealthMap.create(path, n_targets=4, n_pairs=2)
    workers = [HealthMap.open(path) for _ in range(3)]
    try:
        assert prober.take_check_requests() == []
        workers[0].request_check(3)
        workers[1].request_check(0)
        workers[2].request_check(3)
        assert prober.take_check_requests() == [0, 3]
        assert prober.take_check_requests() == []
        turns = [workers[i % 3].next_turn(0) for i in range(9)]
        assert turns == list(range(9))  # one counter for the whole instance
        assert workers[1].next_turn(1) == 0  # per (pool, settings) pair
        assert workers[0].next_turn(0) == 9
        # counters live after the slots: verdicts do not disturb them
        prober.set(3, False, "reset")
        assert workers[2].next_turn(1) == 1 and workers[0].reason(3) == "reset"
    finally:
        prober.close()
        for worker in workers:
            worker.close()


def test_health_map_rejects_foreign_files_and_survives_replacement(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.bin"
    bogus.write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match="not a gatewayd health file"):
        HealthMap.open(str(bogus))
    path = str(tmp_path / "health.bin")
    old = HealthMap.create(path, 1, 1)
    old.set(0, False, "dns")
    new = HealthMap.create(path, 1, 1)  # a new generation's file replaces it atomically
    try:
        assert new.healthy(0) and not old.healthy(0)
    finally:
        old.close()
        new.close()


def test_health_map_without_pairs_still_has_a_counter(tmp_path: Path) -> None:
    health = HealthMap.create(str(tmp_path / "h.bin"), 0, 0)
    try:
        assert health.take_check_requests() == []
        assert health.next_turn(0) == 0 and health.next_turn(0) == 1
    finally:
        health.close()
