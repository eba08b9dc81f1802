"""`gatewayd -c FILE --check --connect` (CONTRACT §2, §4), run as the real CLI.

Every backend server reachable by a rule is handshaken with its real settings and gets
exactly one stdout line ``<pool>/<settings> <host>:<port>: OK …`` or ``…: <reason>…``;
the exit status is 0 only when every line is OK, else 4 (EXIT_CONFIG in gatewayd/cli.py).
"""

from __future__ import annotations

import datetime as dt
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway import GatewaySpec
from tests.support.pki import TestPKI
from tests.support.procs import REPO_ROOT, Backend, BackendFactory, free_port

EXIT_OK = 0
EXIT_CONFIG = 4  # gatewayd.cli.EXIT_CONFIG: "exit 0 only if all are OK", else 4
EXIT_USAGE = 2  # argparse's parser.error
CLI_TIMEOUT = 60
PIN_RE = r"sha256/[A-Za-z0-9+/]{43}="


@dataclass
class Target:
    """One backend pool + settings pair of the config and what --connect must say."""

    pool: str
    servers: list[str]
    settings: dict[str, Any]

    @property
    def settings_name(self) -> str:
        return f"{self.pool}-set"


def build_spec(tmp_path: Path, pki: TestPKI, targets: list[Target]) -> GatewaySpec:
    """One https listener, one rule whose default is the first target and one path rule
    per further target, so that every pool/settings pair is reachable."""
    front = pki.issue(["front.test"], stem="front")
    spec = GatewaySpec(
        server={"workers": 1, "runtime_dir": str(tmp_path / "run"),
                "access_log": str(tmp_path / "access.log")},
        listeners=[{"name": "front", "bind": f"127.0.0.1:{free_port()}",
                    "protocol": "https", "certificate": str(front.cert_path),
                    "private_key": str(front.key_path)}],
    )
    for target in targets:
        spec.pools.append({"name": target.pool, "servers": target.servers})
        spec.settings.append({"name": target.settings_name, "port": 443,
                              "protocol": "https", **target.settings})
    first, *rest = targets
    spec.rules.append({
        "name": "main", "priority": 10, "listener": "front",
        "backend_pool": first.pool, "backend_settings": first.settings_name,
        "path_rules": [{"name": t.pool, "paths": [f"/{t.pool}/*"], "backend_pool": t.pool,
                        "backend_settings": t.settings_name} for t in rest],
    })
    return spec


def run_check(tmp_path: Path, spec: GatewaySpec | str, *args: str,
              name: str = "gw.toml") -> subprocess.CompletedProcess[str]:
    """Write the config and run ``gatewayd -c FILE <args>`` (bounded)."""
    cfg = tmp_path / name
    cfg.write_text(spec.render() if isinstance(spec, GatewaySpec) else spec)
    return subprocess.run(
        [sys.executable, "-m", "gatewayd.cli", "-c", str(cfg), *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=CLI_TIMEOUT,
        stdin=subprocess.DEVNULL, check=False,
    )


def lines_by_server(out: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """``{"<pool>/<settings> <host>:<port>": verdict}``; each server exactly once."""
    result: dict[str, str] = {}
    for line in out.stdout.splitlines():
        if not line.strip():
            continue
        m = re.fullmatch(r"(\S+/\S+ \S+:\d+): (.+)", line)
        assert m, f"unexpected output line {line!r}\n{describe(out)}"
        assert m.group(1) not in result, f"server reported twice: {line!r}"
        result[m.group(1)] = m.group(2)
    return result


def describe(out: subprocess.CompletedProcess[str]) -> str:
    """The CLI's output, for assertion messages."""
    return f"exit {out.returncode}\n--- stdout\n{out.stdout}--- stderr\n{out.stderr}"


def key(target: Target, server: str) -> str:
    """The line prefix gatewayd prints for *server* of *target*."""
    return f"{target.pool}/{target.settings_name} {server}"


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections (kernel backlog) but never speaks TLS."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as listener:
        yield listener.getsockname()[1]


def test_every_verdict_one_line_per_server(
    tmp_path: Path, pki: TestPKI, backend_factory: BackendFactory, silent_port: int
) -> None:
    """OK, pin_mismatch, name_mismatch, untrusted_chain, expired, connect_refused and
    timeout side by side; one line each; exit 4 because not all are OK."""
    roots = [str(pki.ca_pem_path)]
    good = backend_factory("good")
    rooted = backend_factory("rooted")
    wrong_pin = backend_factory("wrongpin")
    wrong_name = backend_factory("wrongname")
    rogue = backend_factory("rogue", leaf=pki.issue(["localhost"], ca=pki.other_ca()))
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    expired = backend_factory("expired", leaf=pki.issue(["localhost"], not_after=past))
    other_pin = pki.self_signed(["unrelated.test"]).spki_pin
    refused = f"127.0.0.1:{free_port()}"
    silent = f"127.0.0.1:{silent_port}"

    targets = {
        "ok": Target("ok", [good.address], {"pinned_public_keys": [good.leaf.spki_pin]}),
        "okroots": Target("okroots", [rooted.address],
                          {"trusted_root_certificates": roots, "host_name": "localhost"}),
        "pin": Target("pin", [wrong_pin.address], {"pinned_public_keys": [other_pin]}),
        "name": Target("name", [wrong_name.address],
                       {"trusted_root_certificates": roots,
                        "host_name": "wrong.example.test"}),
        "chain": Target("chain", [rogue.address],
                        {"trusted_root_certificates": roots, "host_name": "localhost"}),
        "expired": Target("expired", [expired.address],
                          {"trusted_root_certificates": roots, "host_name": "localhost"}),
        "refused": Target("refused", [refused], {"pinned_public_keys": [other_pin]}),
        "silent": Target("silent", [silent],
                         {"pinned_public_keys": [other_pin], "connect_timeout": 1}),
    }
    out = run_check(tmp_path, build_spec(tmp_path, pki, list(targets.values())),
                    "--check", "--connect")
    assert out.returncode == EXIT_CONFIG, describe(out)
    got = lines_by_server(out)
    expected_keys = {key(t, s) for t in targets.values() for s in t.servers}
    assert set(got) == expected_keys, describe(out)

    def verdict(name: str) -> str:
        target = targets[name]
        return got[key(target, target.servers[0])]

    assert re.fullmatch(rf"OK TLSv1\.3 {re.escape(good.leaf.spki_pin)}", verdict("ok")), \
        describe(out)
    assert re.fullmatch(rf"OK TLSv1\.[23] {PIN_RE}", verdict("okroots")), describe(out)
    pin_line = verdict("pin")
    assert pin_line.startswith(
        f"pin_mismatch: got {wrong_pin.leaf.spki_pin}, allowed [{other_pin}]"
    ), describe(out)
    assert "pin_mismatch: got sha256/" in pin_line and ", allowed [" in pin_line
    assert verdict("name").startswith("name_mismatch"), describe(out)
    assert "wrong.example.test" in verdict("name"), describe(out)
    assert verdict("chain").startswith("untrusted_chain"), describe(out)
    assert verdict("expired").startswith("expired"), describe(out)
    assert verdict("refused").startswith("connect_refused"), describe(out)
    assert verdict("silent").startswith("timeout"), describe(out)
    assert not [line for line in got.values() if line.startswith("OK")
                and line not in (verdict("ok"), verdict("okroots"))]


def test_roots_without_name_still_checks_the_chain(
    tmp_path: Path, pki: TestPKI, backend_factory: BackendFactory
) -> None:
    """No host_name/sni_name: the name is unknown until a request, but an untrusted
    chain or an expired leaf is reported already."""
    roots = [str(pki.ca_pem_path)]
    rogue = backend_factory("rogue", leaf=pki.issue(["localhost"], ca=pki.other_ca()))
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    expired = backend_factory("expired", leaf=pki.issue(["localhost"], not_after=past))
    targets = [Target("chain", [rogue.address], {"trusted_root_certificates": roots}),
               Target("expired", [expired.address], {"trusted_root_certificates": roots})]
    out = run_check(tmp_path, build_spec(tmp_path, pki, targets), "--check", "--connect")
    assert out.returncode == EXIT_CONFIG, describe(out)
    got = lines_by_server(out)
    assert got[key(targets[0], rogue.address)].startswith("untrusted_chain"), describe(out)
    assert got[key(targets[1], expired.address)].startswith("expired"), describe(out)


def test_all_ok_exits_zero(
    tmp_path: Path, pki: TestPKI, backend_factory: BackendFactory
) -> None:
    """Pins only, pins + roots + name, roots + name, and a plain http backend: exit 0."""
    roots = [str(pki.ca_pem_path)]
    pinned_self_signed = pki.self_signed(["pinned.test"])
    selfsigned = backend_factory("selfsigned", leaf=pinned_self_signed)
    both = backend_factory("both")
    a = backend_factory("poola")
    b = backend_factory("poolb")
    plain = backend_factory("plain", tls=False)
    noname = backend_factory("noname")
    targets = [
        Target("pins", [selfsigned.address],
               {"pinned_public_keys": [pinned_self_signed.spki_pin]}),
        Target("both", [both.address], {"pinned_public_keys": [both.leaf.spki_pin],
                                        "trusted_root_certificates": roots,
                                        "sni_name": "localhost"}),
        Target("multi", [a.address, b.address],
               {"trusted_root_certificates": roots, "host_name": "localhost"}),
        Target("plain", [plain.address], {"protocol": "http"}),
        Target("noname", [noname.address], {"trusted_root_certificates": roots}),
    ]
    out = run_check(tmp_path, build_spec(tmp_path, pki, targets), "--check", "--connect")
    assert out.returncode == EXIT_OK, describe(out)
    got = lines_by_server(out)
    assert set(got) == {key(t, s) for t in targets for s in t.servers}, describe(out)
    assert all(line.startswith("OK") for line in got.values()), describe(out)
    assert got[key(targets[0], selfsigned.address)] == (
        f"OK TLSv1.3 {pinned_self_signed.spki_pin}"
    ), describe(out)
    assert got[key(targets[3], plain.address)].startswith("OK (plain http"), describe(out)
    # roots without host_name/sni_name: chain checked now, the name per request
    assert got[key(targets[4], noname.address)].endswith(
        "(name checked per request against the client's Host)"
    ), describe(out)
    # pins only: no name is ever checked (CONTRACT §4), so no such note
    assert "name checked" not in got[key(targets[0], selfsigned.address)]


def test_a_single_bad_server_in_a_pool_fails_the_check(
    tmp_path: Path, pki: TestPKI, backend_factory: BackendFactory
) -> None:
    """One pool, one good and one refused server: both reported, exit 4."""
    good: Backend = backend_factory("good")
    refused = f"127.0.0.1:{free_port()}"
    target = Target("web", [good.address, refused],
                    {"pinned_public_keys": [good.leaf.spki_pin]})
    out = run_check(tmp_path, build_spec(tmp_path, pki, [target]), "--check", "--connect")
    assert out.returncode == EXIT_CONFIG, describe(out)
    got = lines_by_server(out)
    assert got[key(target, good.address)].startswith("OK"), describe(out)
    assert got[key(target, refused)].startswith("connect_refused"), describe(out)
    assert len(got) == 2


def test_check_without_connect_does_not_handshake(
    tmp_path: Path, pki: TestPKI
) -> None:
    """Plain --check accepts a config whose backends are down: it never connects."""
    target = Target("down", [f"127.0.0.1:{free_port()}"],
                    {"pinned_public_keys": [pki.self_signed(["x.test"]).spki_pin]})
    out = run_check(tmp_path, build_spec(tmp_path, pki, [target]), "--check")
    assert out.returncode == EXIT_OK, describe(out)
    assert "connect_refused" not in out.stdout + out.stderr


def test_connect_without_check_is_a_usage_error(tmp_path: Path, pki: TestPKI) -> None:
    """`--connect` alone is rejected by the argument parser before anything runs."""
    target = Target("down", [f"127.0.0.1:{free_port()}"],
                    {"pinned_public_keys": [pki.self_signed(["x.test"]).spki_pin]})
    out = run_check(tmp_path, build_spec(tmp_path, pki, [target]), "--connect")
    assert out.returncode == EXIT_USAGE, describe(out)
    assert "--connect" in out.stderr and "--check" in out.stderr, describe(out)
    assert "usage:" in out.stderr.lower(), describe(out)
    assert out.stdout == "", describe(out)


def test_invalid_config_with_connect_reports_problems_not_handshakes(
    tmp_path: Path, pki: TestPKI
) -> None:
    """An invalid config fails validation (exit 4, FILE:LINE lines) before any connect."""
    target = Target("down", [f"127.0.0.1:{free_port()}"],
                    {"pinned_certificates": [str(tmp_path / "missing.pem")]})
    out = run_check(tmp_path, build_spec(tmp_path, pki, [target]), "--check", "--connect")
    assert out.returncode == EXIT_CONFIG, describe(out)
    assert "missing.pem" in out.stderr, describe(out)
    assert re.search(r"gw\.toml:\d+: ", out.stderr), describe(out)
    assert "connect_refused" not in out.stdout, describe(out)
