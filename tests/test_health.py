"""Backend health probes, live (issue: probes, one prober per instance, passive health,
DNS): a real master with forked workers and a prober, real backend processes.

The backends record every request (headers, SNI, time) as JSON lines; the prober's
requests carry `User-Agent: gatewayd-probe`, which is how they are told apart from
proxied client requests.  Helpers here are shared by tests/test_balancing.py and
tests/test_affinity.py.
"""

from __future__ import annotations

import itertools
import json
import re
import statistics
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway import Gateway, GatewaySpec, toml_value
from tests.support.procs import Backend, free_port, https_get, wait_for

PROBE_UA = "gatewayd-probe"


# -- helpers (also used by test_balancing.py and test_affinity.py) ---------------------


def header(record: dict[str, Any], name: str) -> str | None:
    for key, val in record["headers"]:
        if key.lower() == name.lower():
            return str(val)
    return None


def is_probe(record: dict[str, Any]) -> bool:
    return header(record, "user-agent") == PROBE_UA


def probe_records(backend: Backend) -> list[dict[str, Any]]:
    return [r for r in backend.records() if is_probe(r)]


def client_records(backend: Backend) -> list[dict[str, Any]]:
    return [r for r in backend.records() if not is_probe(r)]


def probe_toml(name: str, **values: Any) -> str:
    lines = ["[[probe]]", f"name = {toml_value(name)}"]
    lines += [f"{key} = {toml_value(val)}" for key, val in values.items()]
    return "\n".join(lines) + "\n\n"


def make_spec(tmp: Path, pki: Any, *, workers: int = 2,
              pools: dict[str, list[str]],
              settings: dict[str, dict[str, Any]] | None = None,
              pins: Iterable[str] = (),
              routes: dict[str, str] | None = None,
              server: dict[str, Any] | None = None,
              probes: str = "") -> GatewaySpec:
    """One https listener; one pool + one settings (named like the pool) per entry of
    `pools`; the first pool is the rule's default, `routes` maps path patterns to other
    pools.  Settings are https pinned to `pins` unless `settings[pool]` says otherwise."""
    cert = pki.issue(["127.0.0.1", "localhost"], stem="front")
    spec = GatewaySpec(
        server={"workers": workers, "runtime_dir": str(tmp / "run"),
                "access_log": str(tmp / "access.log"), "graceful_timeout": 3,
                **(server or {})},
        listeners=[{"name": "front", "bind": f"127.0.0.1:{free_port()}", "protocol": "https",
                    "certificate": str(cert.cert_path), "private_key": str(cert.key_path)}],
    )
    for name, servers in pools.items():
        spec.pools.append({"name": name, "servers": servers})
        values: dict[str, Any] = {"name": name, "protocol": "https", "port": 443,
                                  "connect_timeout": 2, "request_timeout": 5}
        if pins:
            values["pinned_public_keys"] = list(pins)
        values.update((settings or {}).get(name, {}))
        spec.settings.append(values)
    first = next(iter(pools))
    rule: dict[str, Any] = {"name": "main", "priority": 10, "listener": "front",
                            "backend_pool": first, "backend_settings": first}
    if routes:
        rule["path_rules"] = [
            {"name": f"r{i}", "paths": [pattern], "backend_pool": pool,
             "backend_settings": pool}
            for i, (pattern, pool) in enumerate(routes.items())]
    spec.rules.append(rule)
    spec.extra = probes
    return spec


def get(gw: Gateway, path: str, headers: dict[str, str] | None = None
        ) -> tuple[int, Any, bytes]:
    """One request on a fresh client connection (so it is balanced afresh)."""
    return https_get("127.0.0.1", gw.port, path, sni=None, cafile=None,
                     headers={"Host": "127.0.0.1", **(headers or {})})


def served_by(body: bytes) -> str:
    return str(json.loads(body)["backend"])


def scrape(gw: Gateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"{gw.admin_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(gw: Gateway, name: str, /, **labels: str) -> float | None:
    """Sum of the samples of `name` whose labels include `labels`; None if there is none."""
    found = None
    for (sample_name, sample_labels), val in scrape(gw).items():
        if sample_name == name and labels.items() <= dict(sample_labels).items():
            found = (found or 0.0) + val
    return found


def wait_metric(gw: Gateway, name: str, want: float, timeout: float = 10.0, *,
                at_least: bool = False, **labels: str) -> float:
    last: list[float | None] = [None]

    def check() -> bool:
        last[0] = got = metric(gw, name, **labels)
        return got is not None and (got >= want if at_least else got == want)

    try:
        wait_for(check, timeout, f"{name}{labels}")
    except AssertionError:
        raise AssertionError(f"{name}{labels}: last value {last[0]!r}, wanted "
                             f"{'>=' if at_least else '=='} {want}\n"
                             f"{gw.proc.stderr_text()[-3000:]}") from None
    assert last[0] is not None
    return last[0]


def wait_log(gw: Gateway, pattern: str, timeout: float = 10.0) -> re.Match[str]:
    """Wait for `pattern` in gatewayd's stderr log."""
    return gw.proc.wait_for_output(pattern, timeout, "stderr")


def restart(backend: Backend) -> Backend:
    """A new backend process on the port (and with the identity) of a stopped one."""
    again = Backend(backend.name, workdir=backend.workdir, cert=backend.cert, key=backend.key,
                    host=backend.host, port=backend.port)
    again.leaf = backend.leaf
    return again.start()


# -- 1. the default probe and custom probes --------------------------------------------


def test_default_probe_is_get_root_with_host_127_0_0_1_over_settings_port(
        tmp_path: Path, pki, backend_factory) -> None:
    named = backend_factory("named")
    literal = backend_factory("literal")
    spec = make_spec(
        tmp_path, pki, workers=4,
        pools={"named": ["localhost"], "literal": [literal.address]},
        settings={"named": {"port": named.port}},
        pins=[named.leaf.spki_pin, literal.leaf.spki_pin],
        routes={"/literal/*": "literal"})
    with Gateway(tmp_path, spec) as gw:
        for backend, sni in ((named, "localhost"), (literal, None)):
            wait_for(lambda b=backend: probe_records(b), 10, f"a probe of {backend.name}")
            probe = probe_records(backend)[0]
            assert probe["method"] == "GET" and probe["target"] == "/"
            assert header(probe, "host") == "127.0.0.1"
            assert probe["tls"] is True
            # SNI is the server's name (never the probe's Host 127.0.0.1, never an IP).
            assert probe["sni"] == sni, probe
        # The default interval is 30 s: one probe per target, not one per worker.
        status, _, body = get(gw, "/x")
        assert status == 200 and served_by(body) == "named"
        assert len(probe_records(named)) == 1
        assert len(probe_records(literal)) == 1
        assert metric(gw, "gatewayd_backend_healthy", backend_pool="literal",
                      backend=literal.address) == 1
        # A server written without a port is labelled the same by the prober's gauge
        # and by the workers' counters.
        wait_metric(gw, "gatewayd_backend_responses_total", 1, backend_pool="named",
                    at_least=True)
        labels = {dict(lbl).get("backend") for (name, lbl) in scrape(gw)
                  if name.startswith("gatewayd_backend") and dict(lbl).get("backend_pool")
                  == "named"}
        assert len(labels) == 1, f"pool 'named' has several backend labels: {labels}"


def test_one_prober_per_instance_with_four_workers(tmp_path: Path, pki, backend_factory
                                                    ) -> None:
    backend = backend_factory("solo")
    spec = make_spec(tmp_path, pki, workers=4, pools={"solo": [backend.address]},
                     settings={"solo": {"probe": "fast"}}, pins=[backend.leaf.spki_pin],
                     probes=probe_toml("fast", path="/health", interval=0.5, timeout=2))
    with Gateway(tmp_path, spec):
        wait_for(lambda: len(probe_records(backend)) >= 7, 10, "7 probes")
        times = [r["time"] for r in probe_records(backend)]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        # 4 probers would give ~0.125 s gaps; one prober gives the interval.
        assert statistics.median(gaps) > 0.4, gaps
        span = times[-1] - times[0]
        assert len(times) <= span / 0.5 + 2, (len(times), span)
        assert {r["target"] for r in probe_records(backend)} == {"/health"}


def test_probe_matchers_status_lists_ranges_body_and_host(
        tmp_path: Path, pki, backend_factory) -> None:
    """One backend in several pools, each probed differently."""
    x = backend_factory("x")
    probes = "".join([
        probe_toml("p418", path="/status/418", interval=0.5, unhealthy_threshold=1,
                   match_status_codes=["200-399", "418"]),
        probe_toml("p204", path="/status/204", interval=0.5, unhealthy_threshold=1,
                   match_status_codes=["200"]),
        probe_toml("p500", path="/status/500", interval=0.5, unhealthy_threshold=1),
        probe_toml("bodyok", path="/b", interval=0.5, unhealthy_threshold=1,
                   match_body='"backend": "x"'),
        probe_toml("bodybad", path="/b", interval=0.5, unhealthy_threshold=1,
                   match_body="no such text"),
        probe_toml("host", path="/hostcheck", host="probe.example", interval=0.5),
    ])
    names = ["p418", "p204", "p500", "bodyok", "bodybad", "host"]
    spec = make_spec(tmp_path, pki, pools={"main": [x.address]} | {n: [x.address]
                                                                      for n in names},
                     settings={n: {"probe": n} for n in names}, pins=[x.leaf.spki_pin],
                     routes={f"/{n}/*": n for n in names}, probes=probes)
    with Gateway(tmp_path, spec) as gw:
        wait_log(gw, rf"backend p204/{x.address} is unhealthy.*status_mismatch")
        wait_log(gw, rf"backend p500/{x.address} is unhealthy.*status_mismatch")
        wait_log(gw, rf"backend bodybad/{x.address} is unhealthy.*body_mismatch")
        # the healthy ones have been probed a few times by now
        wait_for(lambda: sum(r["target"] == "/status/418" for r in probe_records(x)) >= 3,
                 10, "3 probes of /status/418")
        log = gw.proc.stderr_text()
        for pool in ("p418", "bodyok", "host", "main"):
            assert f"backend {pool}/" not in log, log
        for pool, want in (("p418", 200), ("bodyok", 200), ("host", 200), ("p204", 503),
                           ("p500", 503), ("bodybad", 503)):
            status, _, _ = get(gw, f"/{pool}/a")
            assert status == want, (pool, status)
        record = gw.wait_log(lambda r: r["uri"] == "/p500/a")
        assert "no_healthy_server" in record["error_info"], record
        # the custom host is the probe's Host header and its SNI
        hosted = [r for r in probe_records(x) if r["target"] == "/hostcheck"]
        assert hosted and header(hosted[0], "host") == "probe.example"
        assert hosted[0]["sni"] == "probe.example"
        # reasons and health in metrics
        assert metric(gw, "gatewayd_backend_healthy", backend_pool="p500") == 0
        assert metric(gw, "gatewayd_backend_healthy", backend_pool="p418") == 1
        assert metric(gw, "gatewayd_unhealthy_hosts", backend_pool="bodybad") == 1
        assert metric(gw, "gatewayd_healthy_hosts", backend_pool="bodyok") == 1
        assert (metric(gw, "gatewayd_backend_failures_total", backend_pool="p204",
                       reason="status_mismatch") or 0) >= 1
        assert (metric(gw, "gatewayd_backend_failures_total", backend_pool="bodybad",
                       reason="body_mismatch") or 0) >= 1


def test_https_probes_apply_backend_trust_rules(tmp_path: Path, pki, backend_factory
                                                 ) -> None:
    good = backend_factory("good")
    named = backend_factory("named", names=["other.example"])
    rogue = backend_factory("rogue", leaf=pki.self_signed(["other.example"]))
    ca = str(pki.ca_pem_path)
    fast = {"probe": "fast"}
    pools = {
        "main": [good.address],
        "pinbad": [good.address],                 # pinned to another key
        "nameip": [named.address],                # roots; verified name 127.0.0.1
        "namehost": [named.address],              # roots; settings host_name matches
        "probehost": [named.address],             # probe host beats settings host_name
        "untrusted": [rogue.address],             # roots; self-signed
    }
    settings: dict[str, dict[str, Any]] = {
        "main": {"pinned_public_keys": [good.leaf.spki_pin], **fast},
        "pinbad": {"pinned_public_keys": [rogue.leaf.spki_pin], **fast},
        "nameip": {"trusted_root_certificates": [ca], **fast},
        "namehost": {"trusted_root_certificates": [ca], "host_name": "other.example", **fast},
        "probehost": {"trusted_root_certificates": [ca], "host_name": "wrong.example",
                      "probe": "withhost"},
        "untrusted": {"trusted_root_certificates": [ca], "host_name": "other.example", **fast},
    }
    probes = (probe_toml("fast", interval=0.5, unhealthy_threshold=1, path="/p")
              + probe_toml("withhost", interval=0.5, unhealthy_threshold=1, path="/ph",
                           host="other.example"))
    spec = make_spec(tmp_path, pki, pools=pools, settings=settings,
                     routes={f"/{n}/*": n for n in pools if n != "main"}, probes=probes)
    with Gateway(tmp_path, spec) as gw:
        wait_log(gw, rf"backend pinbad/{good.address} is unhealthy.*pin_mismatch")
        wait_log(gw, rf"backend nameip/{named.address} is unhealthy.*name_mismatch")
        wait_log(gw, rf"backend untrusted/{rogue.address} is unhealthy.*untrusted_chain")
        wait_for(lambda: len([r for r in probe_records(named) if r["target"] == "/ph"]) >= 2,
                 10, "probes with the probe's host")
        log = gw.proc.stderr_text()
        assert "backend namehost/" not in log and "backend probehost/" not in log, log
        by_target = {r["target"]: r for r in probe_records(named)}
        assert by_target["/p"]["sni"] == "other.example"       # settings host_name
        assert header(by_target["/p"], "host") == "other.example"
        assert by_target["/ph"]["sni"] == "other.example"      # probe host wins
        assert header(by_target["/ph"], "host") == "other.example"
        # no request byte reached a backend that failed the trust check
        assert not any(r["target"] == "/p" for r in rogue.records())
        assert all(r["target"] == "/p" for r in probe_records(good))
        for reason, pool in (("pin_mismatch", "pinbad"), ("name_mismatch", "nameip"),
                             ("untrusted_chain", "untrusted")):
            assert (metric(gw, "gatewayd_backend_failures_total", backend_pool=pool,
                           reason=reason) or 0) >= 1, reason
            assert metric(gw, "gatewayd_backend_healthy", backend_pool=pool) == 0


def test_unhealthy_after_threshold_then_healthy_after_one_success(
        tmp_path: Path, pki, backend_factory) -> None:
    a = backend_factory("a")
    b = backend_factory("b")
    spec = make_spec(tmp_path, pki, workers=4, pools={"web": [a.address, b.address]},
                     settings={"web": {"probe": "fast"}},
                     pins=[a.leaf.spki_pin, b.leaf.spki_pin],
                     probes=probe_toml("fast", interval=0.5, timeout=1,
                                       unhealthy_threshold=3))
    with Gateway(tmp_path, spec) as gw:
        wait_metric(gw, "gatewayd_healthy_hosts", 2, backend_pool="web")
        wait_for(lambda: probe_records(b), 5, "a probe of b")
        b.stop()
        stopped = time.time()
        wait_log(gw, rf"backend web/{b.address} is unhealthy after 3 failed probes: "
                     r"connect_refused")
        # three failures at 0.5 s intervals, not fewer
        assert time.time() - stopped >= 0.9
        wait_metric(gw, "gatewayd_backend_healthy", 0, backend_pool="web", backend=b.address)
        assert metric(gw, "gatewayd_healthy_hosts", backend_pool="web") == 1
        assert metric(gw, "gatewayd_unhealthy_hosts", backend_pool="web") == 1
        assert (metric(gw, "gatewayd_backend_failures_total", backend_pool="web",
                       backend=b.address, reason="connect_refused") or 0) >= 3
        before = len(gw.log_records())
        for _ in range(16):
            status, _, body = get(gw, "/while-b-is-down")
            assert status == 200 and served_by(body) == "a"
        wait_for(lambda: len(gw.log_records()) >= before + 16, 5, "16 access-log records")
        recent = [r for r in gw.log_records() if r["uri"] == "/while-b-is-down"]
        assert all(r["error_info"] == "" for r in recent), recent  # no connect attempt to b

        b2 = restart(b)
        try:
            wait_log(gw, rf"backend web/{b.address} is healthy again", timeout=5)
            wait_metric(gw, "gatewayd_backend_healthy", 1, backend_pool="web",
                        backend=b.address)
            seen = {served_by(get(gw, "/b-is-back")[2]) for _ in range(8)}
            assert seen == {"a", "b"}
        finally:
            b2.stop()


def test_no_healthy_server_is_503_with_error_info(tmp_path: Path, pki, backend_factory
                                                   ) -> None:
    a = backend_factory("a")
    spec = make_spec(tmp_path, pki, pools={"web": [a.address]},
                     settings={"web": {"probe": "fast"}}, pins=[a.leaf.spki_pin],
                     probes=probe_toml("fast", interval=0.5, timeout=1,
                                       unhealthy_threshold=1))
    with Gateway(tmp_path, spec) as gw:
        wait_for(lambda: probe_records(a), 5, "a probe")
        a.stop()
        wait_log(gw, rf"backend web/{a.address} is unhealthy.*connect_refused")
        status, _, _ = get(gw, "/nobody-home")
        assert status == 503
        record = gw.wait_log(lambda r: r["uri"] == "/nobody-home")
        assert record["status"] == 503 and "no_healthy_server" in record["error_info"]


# -- 3. passive health -------------------------------------------------------------------


def test_connect_failure_is_retried_and_tells_the_prober(tmp_path: Path, pki,
                                                           backend_factory) -> None:
    """A long probe interval: only the workers' "check now" flag can make the prober
    look at the dead server within the test."""
    a = backend_factory("a")
    b = backend_factory("b")
    spec = make_spec(tmp_path, pki, workers=1, pools={"web": [b.address, a.address]},
                     settings={"web": {"probe": "slow"}},
                     pins=[a.leaf.spki_pin, b.leaf.spki_pin],
                     probes=probe_toml("slow", interval=3600, unhealthy_threshold=1))
    with Gateway(tmp_path, spec) as gw:
        wait_for(lambda: probe_records(a) and probe_records(b), 5, "the first probes")
        b.stop()
        started = time.monotonic()
        statuses = [get(gw, f"/passive/{i}")[0] for i in range(4)]
        assert statuses == [200] * 4
        wait_log(gw, rf"backend web/{b.address} is unhealthy.*connect_refused", timeout=5)
        assert time.monotonic() - started < 5
        records = [r for r in gw.log_records() if r["uri"].startswith("/passive/")]
        assert all(r["backend"] == a.address for r in records), records
        assert len(client_records(a)) == 4


def test_passive_down_is_lifted_once_the_prober_sees_the_server_again(
        tmp_path: Path, pki, backend_factory) -> None:
    """A single-server pool: one refused connect (a backend restarting) must not keep the
    worker answering 503 after the prober has found the server serving again."""
    a = backend_factory("a")
    spec = make_spec(tmp_path, pki, workers=1, pools={"web": [a.address]},
                     settings={"web": {"probe": "fast"}}, pins=[a.leaf.spki_pin],
                     probes=probe_toml("fast", interval=0.5, timeout=1,
                                       unhealthy_threshold=3))
    with Gateway(tmp_path, spec) as gw:
        wait_for(lambda: probe_records(a), 5, "a probe")
        a.stop()
        status, _, _ = get(gw, "/during-restart")
        assert status == 502
        again = restart(a)
        try:
            seen = len(probe_records(again))
            wait_for(lambda: len(probe_records(again)) >= seen + 2, 5,
                     "two successful probes after the restart")
            assert "is unhealthy" not in gw.proc.stderr_text()
            status, _, _ = get(gw, "/after-restart")
            record = gw.wait_log(lambda r: r["uri"] == "/after-restart")
            assert status == 200, record
        finally:
            again.stop()


# -- 8. DNS ----------------------------------------------------------------------------


def test_server_host_names_resolve_and_unresolvable_names_are_reported(
        tmp_path: Path, pki, backend_factory) -> None:
    a = backend_factory("a")
    spec = make_spec(tmp_path, pki, pools={"web": [f"localhost:{a.port}",
                                                   f"no-such-host.invalid:{a.port}"]},
                     settings={"web": {"probe": "fast"}}, pins=[a.leaf.spki_pin],
                     probes=probe_toml("fast", interval=0.5, unhealthy_threshold=1))
    with Gateway(tmp_path, spec) as gw:
        wait_log(gw, r"backend web/no-such-host.invalid:\d+ is unhealthy.*dns")
        wait_log(gw, r"cannot resolve no-such-host\.invalid")
        for _ in range(4):
            status, _, body = get(gw, "/dns")
            assert status == 200 and served_by(body) == "a"
        assert metric(gw, "gatewayd_backend_healthy", backend_pool="web",
                      backend=f"localhost:{a.port}") == 1
        assert (metric(gw, "gatewayd_backend_failures_total", backend_pool="web",
                       reason="dns") or 0) >= 1
        # the worker sent SNI for the name (the client's Host here) and reached a
        assert client_records(a)[-1]["client"][0] == "127.0.0.1"
