"""Config loading: a valid file becomes the right model; every kind of mistake becomes
one exact ``FILE:LINE: key: message`` line, all of them in one run (CONTRACT §2, §3)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gatewayd import policies
from gatewayd.config import (
    NOT_YET_SUPPORTED,
    SERVER_KEYS,
    ConfigError,
    Problem,
    load_config,
    load_config_text,
    parse_address,
)
from gatewayd.config_lines import index_lines
from gatewayd.model import Address, GatewayConfig, ServerSettings
from gatewayd.pins import parse_pin

REPO = Path(__file__).resolve().parent.parent
NOW = dt.datetime.now(dt.UTC)


# -- certificates -----------------------------------------------------------------------

class Issued:
    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def pin(self) -> bytes:
        spki = self.cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return hashlib.sha256(spki).digest()


def issue(cn: str, issuer: Issued | None = None, *, days: float = 30,
          expired: bool = False) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    end = NOW - dt.timedelta(days=1) if expired else NOW + dt.timedelta(days=days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.cert.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=2))
        .not_valid_after(end)
        .sign(issuer.key if issuer else key, hashes.SHA256())
    )
    return Issued(cert, key)


def write(base: Path, relative: str, data: bytes | str) -> Path:
    path = base / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Issued]:
    """The files the valid config names, written under tmp_path."""
    root = issue("Test Root")
    inter = issue("Test Intermediate", root)
    shop = issue("shop.example.test", inter)
    pinned = issue("img.internal")
    write(tmp_path, "certs/shop.pem", shop.pem + inter.pem)
    write(tmp_path, "certs/shop.key", shop.key_pem)
    write(tmp_path, "pins/img.pem", pinned.pem)
    write(tmp_path, "ca/root.pem", root.pem)
    return {"root": root, "inter": inter, "shop": shop, "pinned": pinned}


PIN_TEXT = "sha256/" + base64.b64encode(b"\x01" * 32).decode()

VALID = f"""\
[server]
workers = 3
log_level = "debug"
graceful_timeout = 12

[[listener]]
name = "shop"
bind = "0.0.0.0:8443"
protocol = "https"
host_names = ["Shop.Example.test", "*.example.test"]
certificate = "certs/shop.pem"
private_key = "certs/shop.key"
ssl_policy = "strict"

[[listener]]
name = "plain"
bind = "[::1]:8080"
protocol = "http"
x_forwarded_for_port = true

[ssl_policy.strict]
min_protocol = "TLSv1.2"
cipher_suites = ["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
                 "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"]

[[backend_pool]]
name = "web"
servers = ["127.0.0.1:9001", "web2.internal", "[::1]:9002"]

[[backend_pool]]
name = "images"
servers = []

[[backend_settings]]
name = "images-tls"
protocol = "https"
pinned_public_keys = ["{PIN_TEXT}"]
pinned_certificates = ["pins/img.pem"]

[[backend_settings]]
name = "web-tls"
protocol = "https"
port = 8443
sni_name = "web.internal"
trusted_root_certificates = ["ca/root.pem"]
connect_timeout = 2.5

[[backend_settings]]
name = "web-http"
protocol = "http"

[[rule]]
name = "plain"
priority = 20
listener = "plain"
backend_pool = "web"
backend_settings = "web-http"

[[rule]]
name = "shop"
priority = 10
listener = "shop"
backend_pool = "web"
backend_settings = "web-tls"

  [[rule.path_rule]]
  name = "images"
  paths = ["/images/*", "/img*"]
  backend_pool = "images"
  backend_settings = "images-tls"
"""


def load(base: Path, text: str, **overrides: object) -> GatewayConfig:
    return load_config_text(text, source="gw.toml", base_dir=str(base), overrides=overrides)


def problems(base: Path, text: str, **overrides: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(base, text, **overrides)
    return [str(p) for p in caught.value.problems]


def line_of(text: str, snippet: str, nth: int = 1) -> int:
    """1-based line of the nth line containing `snippet`."""
    hits = [n for n, line in enumerate(text.splitlines(), 1) if snippet in line]
    return hits[nth - 1]


def edit(old: str, new: str, text: str = VALID, count: int = 1) -> str:
    assert old in text, old
    return text.replace(old, new, count)


def only(base: Path, text: str, **overrides: object) -> str:
    found = problems(base, text, **overrides)
    assert len(found) == 1, found
    return found[0]


# -- the valid file ---------------------------------------------------------------------

def test_valid_config_loads_to_the_model(tmp_path: Path, pki: dict[str, Issued]) -> None:
    config = load(tmp_path, VALID)
    assert config.source == "gw.toml"
    assert config.server == ServerSettings(workers=3, log_level="debug", graceful_timeout=12.0)
    assert config.warnings == ()
    shop, plain = config.listeners
    assert shop.bind == Address("0.0.0.0", 8443)
    assert shop.host_names == ("shop.example.test", "*.example.test")
    assert shop.line == line_of(VALID, '"shop"') - 1
    assert shop.ssl_policy == policies.custom_policy(
        "strict", "TLSv1.2",
        ["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"],
    )
    assert shop.certificate is not None
    assert shop.certificate.certificate_pem == pki["shop"].pem + pki["inter"].pem
    assert shop.certificate.private_key_pem == pki["shop"].key_pem
    assert shop.certificate.not_after == pki["shop"].cert.not_valid_after_utc.timestamp()
    assert plain.bind == Address("::1", 8080) and plain.is_basic
    assert plain.certificate is None and plain.ssl_policy is None
    assert plain.x_forwarded_for_port is True
    assert config.backend_pools["web"].servers == ("127.0.0.1:9001", "web2.internal", "[::1]:9002")
    assert config.backend_pools["images"].servers == ()
    images = config.backend_settings["images-tls"]
    assert images.port == 443 and images.min_protocol == "TLSv1.2"
    assert images.pins == frozenset({b"\x01" * 32, pki["pinned"].pin})
    web = config.backend_settings["web-tls"]
    assert (web.port, web.sni_name, web.connect_timeout) == (8443, "web.internal", 2.5)
    assert web.trusted_roots_pem == pki["root"].pem and web.pins == frozenset()
    assert config.backend_settings["web-http"].port == 80
    assert [r.name for r in config.rules] == ["shop", "plain"]  # sorted by priority
    (path_rule,) = config.rules[0].path_rules
    assert path_rule.paths == ("/images/*", "/img*")
    assert (path_rule.backend_pool, path_rule.backend_settings) == ("images", "images-tls")
    assert config.rule_for_listener("plain") is config.rules[1]


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, pki: dict[str, Issued], monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, "gw.toml", VALID)
    monkeypatch.chdir("/")
    config = load_config(str(tmp_path / "gw.toml"))
    certificate = config.listeners[0].certificate
    assert certificate is not None
    assert certificate.certificate_path == str(tmp_path / "certs/shop.pem")
    assert certificate.private_key_path == str(tmp_path / "certs/shop.key")


def test_server_paths_become_absolute(tmp_path: Path, pki: dict[str, Issued]) -> None:
    text = edit("workers = 3", 'workers = 3\nruntime_dir = "run"\naccess_log = "logs/a.log"')
    server = load(tmp_path, text).server
    assert server.runtime_dir == str(tmp_path / "run")
    assert server.access_log == str(tmp_path / "logs/a.log")
    assert load(tmp_path, VALID).server.access_log == "-"


def test_workers_zero_means_one_per_cpu(tmp_path: Path, pki: dict[str, Issued]) -> None:
    assert load(tmp_path, edit("workers = 3", "workers = 0")).server.workers == os.cpu_count()


def test_overrides_win_over_the_file(tmp_path: Path, pki: dict[str, Issued]) -> None:
    server = load(tmp_path, VALID, workers=7, keepalive_timeout=5, log_level="error").server
    assert (server.workers, server.keepalive_timeout, server.log_level) == (7, 5.0, "error")
    assert server.graceful_timeout == 12.0  # from the file


def test_none_override_means_not_given(tmp_path: Path, pki: dict[str, Issued]) -> None:
    assert load(tmp_path, VALID, workers=None).server.workers == 3


def test_bad_file_value_is_reported_even_when_overridden(tmp_path: Path,
                                                         pki: dict[str, Issued]) -> None:
    text = edit("workers = 3", "workers = -3")
    assert only(tmp_path, text, workers=4) == (
        "gw.toml:2: server.workers: must be at least 0; got -3"
    )


def test_invalid_overrides_are_reported_without_a_line(tmp_path: Path,
                                                       pki: dict[str, Issued]) -> None:
    assert problems(tmp_path, VALID, workers=-2, wrokers=1) == [
        "gw.toml: server.wrokers: unknown setting (did you mean 'workers'?)",
        "gw.toml: server.workers: must be at least 0; got -2",
    ]


def test_server_keys_cover_server_settings() -> None:
    assert SERVER_KEYS["workers"] is int
    assert SERVER_KEYS["graceful_timeout"] is float
    assert SERVER_KEYS["access_log"] is str
    assert set(SERVER_KEYS) == set(ServerSettings.__dataclass_fields__)


def test_reference_example_fails_only_for_missing_files() -> None:
    path = REPO / "conf" / "gatewayd.toml"
    with pytest.raises(ConfigError) as caught:
        load_config_text(path.read_text(), source="gatewayd.toml", base_dir=str(path.parent))
    assert caught.value.problems
    for problem in caught.value.problems:
        assert problem.message.startswith("no such file 'example-certs/"), str(problem)


# -- syntax and structure ---------------------------------------------------------------

def test_toml_syntax_error_reports_its_line(tmp_path: Path) -> None:
    text = "[server]\nworkers = 2\nlog_level = info\n"
    assert problems(tmp_path, text) == [
        "gw.toml:3: invalid TOML: Expected newline or end of document after a statement"
    ]


def test_unknown_key_suggests_a_close_match(tmp_path: Path, pki: dict[str, Issued]) -> None:
    text = edit('bind = "0.0.0.0:8443"', 'bnid = "0.0.0.0:8443"')
    line = line_of(text, "bnid")
    assert problems(tmp_path, text) == [
        f"gw.toml:{line - 2}: listener[shop].bind: required key is missing",
        f"gw.toml:{line}: listener[shop].bnid: unknown key (did you mean 'bind'?)",
    ]


def test_unknown_table(tmp_path: Path, pki: dict[str, Issued]) -> None:
    text = VALID + '\n[[backend_pools]]\nname = "x"\n'
    assert only(tmp_path, text) == (
        f"gw.toml:{line_of(text, '[[backend_pools]]')}: backend_pools: "
        "unknown key (did you mean 'backend_pool'?)"
    )


def test_unknown_key_in_a_path_rule(tmp_path: Path, pki: dict[str, Issued]) -> None:
    text = edit('  paths = ["/images/*", "/img*"]', '  paths = ["/images/*"]\n  path = "/x"')
    assert only(tmp_path, text) == (
        f"gw.toml:{line_of(text, 'path = ')}: rule[shop].path_rule[images].path: "
        "unknown key (did you mean 'paths'?)"
    )


def test_bool_is_not_an_integer(tmp_path: Path, pki: dict[str, Issued]) -> None:
    text = edit("workers = 3", "workers = true")
    assert only(tmp_path, text) == "gw.toml:2: server.workers: expected an integer, got a boolean"


@pytest.mark.parametrize(
    ("old", "new", "key", "message"),
    [
        ("x_forwarded_for_port = true", "x_forwarded_for_port = 1",
         "listener[plain].x_forwarded_for_port",
         "expected a boolean (true or false), got an integer"),
        ('priority = 20', 'priority = "20"', "rule[plain].priority",
         "expected an integer, got a string"),
        ('port = 8443', 'port = 84.43', "backend_settings[web-tls].port",
         "expected an integer, got a float"),
        ('connect_timeout = 2.5', 'connect_timeout = "2s"',
         "backend_settings[web-tls].connect_timeout", "expected a number of seconds, got a string"),
        ('servers = []', 'servers = "a:1"', "backend_pool[images].servers",
         "expected an array of strings, got a string"),
        ('graceful_timeout = 12', 'graceful_timeout = false', "server.graceful_timeout",
         "expected a number, got a boolean"),
    ],
)
def test_wrong_types(tmp_path: Path, pki: dict[str, Issued], old: str, new: str, key: str,
                     message: str) -> None:
    text = edit(old, new)
    assert only(tmp_path, text) == f"gw.toml:{line_of(text, new)}: {key}: {message}"


def test_wrong_type_of_array_element(tmp_path: Path, pki: dict[str, Issued]) -> None:
    text = edit('servers = []', 'servers = ["a", 7]')
    at = line_of(text, 'servers = ["a"')
    assert only(tmp_path, text) == (
        f"gw.toml:{at}: backend_pool[images].servers[1]: "
        "expected a string, got an integer"
    )


def test_listener_must_be_an_array_of_tables(tmp_path: Path) -> None:
    assert problems(tmp_path, '[listener]\nname = "x"\n') == [
        "gw.toml:1: listener: expected an array of tables ([[listener]]), got a table",
    ]
    assert problems(tmp_path, "[server]\n") == [
        "gw.toml: listener: at least one [[listener]] is required",
    ]


# -- missing keys -----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("old", "key", "header"),
    [
        ('bind = "[::1]:8080"\n', "listener[plain].bind", '[[listener]]'),
        ('protocol = "http"\nx_forwarded', "listener[plain].protocol", '[[listener]]'),
        ('servers = []\n', "backend_pool[images].servers", '[[backend_pool]]'),
        ('protocol = "http"\n\n[[rule]]', "backend_settings[web-http].protocol",
         '[[backend_settings]]'),
        ('priority = 20\n', "rule[plain].priority", '[[rule]]'),
        ('backend_pool = "web"\nbackend_settings = "web-http"', "rule[plain].backend_pool",
         '[[rule]]'),
    ],
)
def test_missing_required_keys_point_at_the_table(tmp_path: Path, pki: dict[str, Issued],
                                                  old: str, key: str, header: str) -> None:
    text = edit(old, old.split("\n", 1)[1] if "\n" in old else "")
    found = problems(tmp_path, text)
    header_lines = [n for n, line in enumerate(text.splitlines(), 1) if line == header]
    owner = key.split("[")[0]
    nth = {"listener": 2, "backend_pool": 2, "backend_settings": 3, "rule": 1}[owner]
    assert found[0] == f"gw.toml:{header_lines[nth - 1]}: {key}: required key is missing"


def test_https_listener_needs_certificate_and_key(tmp_path: Path, pki: dict[str, Issued]) -> None:
    text = edit('certificate = "certs/shop.pem"\nprivate_key = "certs/shop.key"\n', "")
    header = line_of(text, "[[listener]]")
    assert problems(tmp_path, text) == [
        f"gw.toml:{header}: listener[shop].certificate: required key is missing",
        f"gw.toml:{header}: listener[shop].private_key: required key is missing",
    ]


def test_http_listener_rejects_tls_keys(tmp_path: Path, pki: dict[str, Issued]) -> None:
    text = edit('protocol = "http"\nx_forwarded',
                'protocol = "http"\nssl_policy = "strict"\nx_forwarded')
    assert only(tmp_path, text) == (
        f"gw.toml:{line_of(text, 'ssl_policy = ', 2)}: listener[plain].ssl_policy: "
        "only used by https listeners"
    )


# -- values -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("old", "new", "key", "message"),
    [
        ("workers = 3", "workers = -1", "server.workers", "must be at least 0; got -1"),
        ("workers = 3", "max_headers = 0", "server.max_headers", "must be at least 1; got 0"),
        ("workers = 3", "keepalive_timeout = 0", "server.keepalive_timeout",
         "must be greater than 0; got 0.0"),
        ('log_level = "debug"', 'log_level = "verbose"', "server.log_level",
         "must be one of debug, info, warning, error; got 'verbose'"),
        ("workers = 3", 'access_log_format = "xml"', "server.access_log_format",
         "must be one of json, combined; got 'xml'"),
        ("workers = 3", 'admin_bind = "9180"', "server.admin_bind",
         "expected 'host:port' or '[ipv6]:port', got '9180'"),
        ('bind = "0.0.0.0:8443"', 'bind = "0.0.0.0:0"', "listener[shop].bind",
         "port must be between 1 and 65535, got '0'"),
        ('bind = "0.0.0.0:8443"', 'bind = "::1:8443"', "listener[shop].bind",
         "IPv6 addresses need brackets ('[::1:8443]'), got '::1:8443'"),
        ('protocol = "https"', 'protocol = "tcp"', "listener[shop].protocol",
         "must be one of http, https; got 'tcp'"),
        ('priority = 20', 'priority = 20001', "rule[plain].priority",
         "must be between 1 and 20000; got 20001"),
        ('port = 8443', 'port = 70000', "backend_settings[web-tls].port",
         "must be between 1 and 65535; got 70000"),
        ('connect_timeout = 2.5', 'connect_timeout = 0',
         "backend_settings[web-tls].connect_timeout", "must be greater than 0; got 0"),
        ('port = 8443', 'min_protocol = "SSLv3"', "backend_settings[web-tls].min_protocol",
         "must be one of TLSv1.0, TLSv1.1, TLSv1.2, TLSv1.3; got 'SSLv3'"),
        ('min_protocol = "TLSv1.2"', 'min_protocol = "TLS1.2"', "ssl_policy[strict].min_protocol",
         "must be one of TLSv1.0, TLSv1.1, TLSv1.2, TLSv1.3; got 'TLS1.2'"),
        ('servers = []', 'servers = ["img:99999"]', "backend_pool[images].servers[0]",
         "port must be between 1 and 65535, got '99999'"),
        ('servers = []', 'servers = [":443"]', "backend_pool[images].servers[0]",
         "expected 'host[:port]' or '[ipv6][:port]', got ':443'"),
        ('paths = ["/images/*", "/img*"]', 'paths = ["/images/*", "img*"]',
         "rule[shop].path_rule[images].paths[1]", "a path pattern must start with '/', got 'img*'"),
        ('paths = ["/images/*", "/img*"]', 'paths = ["/i*/x"]',
         "rule[shop].path_rule[images].paths[0]",
         "'*' is only allowed at the end of a path, got '/i*/x'"),
        ('paths = ["/images/*", "/img*"]', 'paths = []', "rule[shop].path_rule[images].paths",
         "needs at least one path pattern"),
        ('host_names = ["Shop.Example.test", "*.example.test"]',
         'host_names = ["shop_1.example.test"]', "listener[shop].host_names[0]",
         "invalid host name pattern 'shop_1.example.test' (letters, digits, '-', '.' and "
         "the wildcards '*' and '?' only)"),
    ],
)
def test_values_out_of_range(tmp_path: Path, pki: dict[str, Issued], old: str, new: str,
                             key: str, message: str) -> None:
    text = edit(old, new)
    assert only(tmp_path, text) == f"gw.toml:{line_of(text, new)}: {key}: {message}"


def test_parse_address() -> None:
    assert parse_address("[2001:db8::1]:443") == Address("2001:db8::1", 443)
    assert str(parse_address("localhost:80")) == "localhost:80"
    with pytest.raises(ValueError, match="not an IPv6 address"):
        parse_address("[nope]:80")


# -- names and references ---------------------------------------------------------------

def test_duplicate_names(tmp_path: Path, pki: dict[str, Issued]) -> None:
    text = edit('name = "images"\nservers = []', 'name = "web"\nservers = []')
    first = line_of(text, '[[backend_pool]]')
    second = line_of(text, 'name = "web"', 2)
    found = problems(tmp_path, text)
    assert found[0] == (
        f"gw.toml:{second}: backend_pool[web].name: duplicate backend_pool name 'web' "
        f"(first defined at line {first})"
    )


def test_duplicate_priority(tmp_path: Path, pki: dict[str, Issued]) -> None:
    text = edit("priority = 10", "priority = 20")
    assert only(tmp_path, text) == (
        f"gw.toml:{line_of(text, 'priority = 20', 2)}: rule[shop].priority: "
        "priority 20 is already used by rule[plain]"
    )


@pytest.mark.parametrize(
    ("old", "new", "key", "message"),
    [
        ('backend_pool = "web"\nbackend_settings = "web-http"',
         'backend_pool = "nope"\nbackend_settings = "web-http"', "rule[plain].backend_pool",
         "no backend_pool named 'nope'"),
        ('backend_settings = "web-http"', 'backend_settings = "web-https"',
         "rule[plain].backend_settings",
         "no backend_settings named 'web-https' (did you mean 'web-http'?)"),
        ('  backend_pool = "images"', '  backend_pool = "image"',
         "rule[shop].path_rule[images].backend_pool",
         "no backend_pool named 'image' (did you mean 'images'?)"),
        ('ssl_policy = "strict"', 'ssl_policy = "AppGwSslPolicy20220101T"',
         "listener[shop].ssl_policy",
         "no ssl_policy named 'AppGwSslPolicy20220101T' (did you mean 'AppGwSslPolicy20220101'?)"),
    ],
)
def test_dangling_references(tmp_path: Path, pki: dict[str, Issued], old: str, new: str,
                             key: str, message: str) -> None:
    text = edit(old, new)
    target = new.split("\n")[0]
    assert only(tmp_path, text).startswith(f"gw.toml:{line_of(text, target)}: {key}: {message}")


def test_dangling_rule_listener_also_leaves_the_listener_unreachable(
    tmp_path: Path, pki: dict[str, Issued]
) -> None:
    text = edit('listener = "plain"', 'listener = "plane"')
    at = line_of(text, 'name = "plain"')
    assert problems(tmp_path, text) == [
        f"gw.toml:{at}: listener[plain].name: "
        "no rule references this listener, so it can never be reached",
        f"gw.toml:{line_of(text, 'listener = ')}: rule[plain].listener: "
        "no listener named 'plane' (did you mean 'plain'?)",
    ]


def test_one_rule_per_listener(tmp_path: Path, pki: dict[str, Issued]) -> None:
    text = VALID + (
        '\n[[rule]]\nname = "again"\npriority = 30\nlistener = "shop"\n'
        'backend_pool = "web"\nbackend_settings = "web-tls"\n'
    )
    at = line_of(text, 'listener = "shop"', 2)
    assert only(tmp_path, text) == (
        f"gw.toml:{at}: rule[again].listener: "
        "listener 'shop' is already used by rule[shop] (one rule per listener)"
    )


# -- listeners sharing a bind -----------------------------------------------------------

def test_shared_bind_needs_one_protocol(tmp_path: Path, pki: dict[str, Issued]) -> None:
    text = edit('bind = "[::1]:8080"', 'bind = "0.0.0.0:8443"')
    at = line_of(text, 'protocol = "http"')
    assert only(tmp_path, text) == (
        f"gw.toml:{at}: listener[plain].protocol: "
        "listeners sharing bind 0.0.0.0:8443 must use the same protocol (listener[shop] is https)"
    )


SECOND_SITE = """
[[listener]]
name = "blog"
bind = "0.0.0.0:8443"
protocol = "https"
certificate = "certs/shop.pem"
private_key = "certs/shop.key"
{extra}
[[rule]]
name = "blog"
priority = 30
listener = "blog"
backend_pool = "web"
backend_settings = "web-tls"
"""


def test_shared_bind_needs_one_ssl_policy(tmp_path: Path, pki: dict[str, Issued]) -> None:
    text = VALID + SECOND_SITE.format(extra='host_names = ["blog.test"]\n')
    at = line_of(text, 'name = "blog"') - 1
    assert only(tmp_path, text) == (
        f"gw.toml:{at}: listener[blog].ssl_policy: listeners "
        "sharing bind 0.0.0.0:8443 must use the same ssl_policy (per-SNI policies are not "
        "supported)"
    )


def test_second_basic_listener_is_unreachable(tmp_path: Path, pki: dict[str, Issued]) -> None:
    text = edit('host_names = ["Shop.Example.test", "*.example.test"]\n', "")
    text += SECOND_SITE.format(extra='ssl_policy = "strict"\n')
    at = line_of(text, 'name = "blog"') - 1
    assert only(tmp_path, text) == (
        f"gw.toml:{at}: listener[blog].host_names: "
        "unreachable: listener[shop] is already the basic listener (no host_names) on bind "
        "0.0.0.0:8443"
    )


def test_duplicate_host_name_on_one_bind(tmp_path: Path, pki: dict[str, Issued]) -> None:
    text = VALID + SECOND_SITE.format(
        extra='ssl_policy = "strict"\nhost_names = ["blog.test", "SHOP.example.test"]\n'
    )
    at = line_of(text, 'host_names = ["blog.test"')
    assert only(tmp_path, text) == (
        f"gw.toml:{at}: listener[blog].host_names[1]: "
        "unreachable: host name 'shop.example.test' is already served by listener[shop] on "
        "bind 0.0.0.0:8443"
    )


def test_listener_without_rule_is_unreachable(tmp_path: Path, pki: dict[str, Issued]) -> None:
    text = VALID + '\n[[listener]]\nname = "lonely"\nbind = "127.0.0.1:81"\nprotocol = "http"\n'
    assert only(tmp_path, text) == (
        f"gw.toml:{line_of(text, 'lonely')}: listener[lonely].name: "
        "no rule references this listener, so it can never be reached"
    )


# -- files and certificates -------------------------------------------------------------

def test_missing_pinned_certificate_matches_the_contract_example(
    tmp_path: Path, pki: dict[str, Issued]
) -> None:
    (tmp_path / "pins/img.pem").unlink()
    assert only(tmp_path, VALID) == (
        f"gw.toml:{line_of(VALID, 'pinned_certificates')}: "
        "backend_settings[images-tls].pinned_certificates[0]: no such file 'pins/img.pem'"
    )


def _only_as_nobody(base: Path, text: str) -> str:
    """`only()` in a forked child that runs as uid/gid 65534, so that file permissions
    apply when the tests run as root (as they do in CI).  The files are copied to a
    directory that user can enter (pytest's own temp root is private to root)."""
    world = Path(tempfile.mkdtemp(prefix="gatewayd-perm-"))
    try:
        shutil.copytree(base, world, dirs_exist_ok=True)
        for directory in (world, *(p for p in world.rglob("*") if p.is_dir())):
            directory.chmod(0o777)
        (world / "certs/shop.key").chmod(0)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: drop root, load, report, exit without pytest's teardown
            status = 1
            try:
                os.close(read_end)
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                os.write(write_end, only(world, text).encode())
                status = 0
            finally:
                os._exit(status)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            answer = pipe.read().decode()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, answer
        return answer
    finally:
        shutil.rmtree(world, ignore_errors=True)


def test_unreadable_file(tmp_path: Path, pki: dict[str, Issued]) -> None:
    if os.geteuid() == 0:  # root reads any file: check as an unprivileged user instead
        found = _only_as_nobody(tmp_path, VALID)
    else:
        (tmp_path / "certs/shop.key").chmod(0)
        found = only(tmp_path, VALID)
    assert found == (
        f"gw.toml:{line_of(VALID, 'private_key')}: listener[shop].private_key: "
        "permission denied reading 'certs/shop.key'"
    )


def test_certificate_path_that_is_a_directory(tmp_path: Path, pki: dict[str, Issued]) -> None:
    text = edit('certificate = "certs/shop.pem"', 'certificate = "certs"')
    assert only(tmp_path, text) == (
        f"gw.toml:{line_of(text, 'certificate = ')}: listener[shop].certificate: "
        "'certs' is a directory, not a file"
    )


def test_certificate_that_does_not_parse(tmp_path: Path, pki: dict[str, Issued]) -> None:
    bad_pem = "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"
    write(tmp_path, "certs/shop.pem", bad_pem)
    assert only(tmp_path, VALID) == (
        f"gw.toml:{line_of(VALID, 'certificate = ')}: listener[shop].certificate: "
        "'certs/shop.pem' is not a PEM certificate file"
    )


def test_chain_must_be_leaf_first(tmp_path: Path, pki: dict[str, Issued]) -> None:
    write(tmp_path, "certs/shop.pem", pki["inter"].pem + pki["shop"].pem)
    found = problems(tmp_path, VALID)
    assert found[0] == (
        f"gw.toml:{line_of(VALID, 'certificate = ')}: listener[shop].certificate: chain in "
        "'certs/shop.pem' is not leaf first: certificate 1 (CN=Test Intermediate) is not issued "
        "by certificate 2 (CN=shop.example.test)"
    )


def test_key_must_match_certificate(tmp_path: Path, pki: dict[str, Issued]) -> None:
    write(tmp_path, "certs/shop.key", issue("other").key_pem)
    assert only(tmp_path, VALID) == (
        f"gw.toml:{line_of(VALID, 'private_key')}: listener[shop].private_key: "
        "private key 'certs/shop.key' does not match certificate 'certs/shop.pem'"
    )


def test_key_that_does_not_parse(tmp_path: Path, pki: dict[str, Issued]) -> None:
    write(tmp_path, "certs/shop.key", pki["shop"].pem)
    assert only(tmp_path, VALID) == (
        f"gw.toml:{line_of(VALID, 'private_key')}: listener[shop].private_key: "
        "'certs/shop.key' is not a PEM private key"
    )


def test_expired_listener_certificate_is_an_error(tmp_path: Path, pki: dict[str, Issued]) -> None:
    old = issue("shop.example.test", pki["inter"], expired=True)
    write(tmp_path, "certs/shop.pem", old.pem + pki["inter"].pem)
    write(tmp_path, "certs/shop.key", old.key_pem)
    when = old.cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S UTC")
    assert only(tmp_path, VALID) == (
        f"gw.toml:{line_of(VALID, 'certificate = ')}: listener[shop].certificate: "
        f"certificate 'certs/shop.pem' expired on {when}"
    )


def test_expiring_listener_certificate_is_a_warning(tmp_path: Path,
                                                    pki: dict[str, Issued]) -> None:
    soon = issue("shop.example.test", pki["inter"], days=3.5)
    write(tmp_path, "certs/shop.pem", soon.pem + pki["inter"].pem)
    write(tmp_path, "certs/shop.key", soon.key_pem)
    when = soon.cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S UTC")
    assert load(tmp_path, VALID).warnings == (
        f"gw.toml:{line_of(VALID, 'certificate = ')}: listener[shop].certificate: "
        f"certificate 'certs/shop.pem' expires on {when} (in 3 days)",
    )


@pytest.mark.parametrize("pin", ["sha1/AAAA", "sha256/not base64!", "sha256/" + "A" * 40])
def test_pin_format(tmp_path: Path, pki: dict[str, Issued], pin: str) -> None:
    text = edit(PIN_TEXT, pin)
    with pytest.raises(ValueError) as reason:
        parse_pin(pin)
    assert only(tmp_path, text) == (
        f"gw.toml:{line_of(text, 'pinned_public_keys')}: "
        f"backend_settings[images-tls].pinned_public_keys[0]: {reason.value}"
    )


def test_pinned_certificate_may_be_der(tmp_path: Path, pki: dict[str, Issued]) -> None:
    write(tmp_path, "pins/img.pem", pki["pinned"].cert.public_bytes(serialization.Encoding.DER))
    assert pki["pinned"].pin in load(tmp_path, VALID).backend_settings["images-tls"].pins


def test_pinned_and_root_files_that_do_not_parse(tmp_path: Path, pki: dict[str, Issued]) -> None:
    write(tmp_path, "pins/img.pem", "garbage")
    write(tmp_path, "ca/root.pem", "garbage")
    assert problems(tmp_path, VALID) == [
        f"gw.toml:{line_of(VALID, 'pinned_certificates')}: "
        "backend_settings[images-tls].pinned_certificates[0]: "
        "'pins/img.pem' is not a certificate (PEM or DER)",
        f"gw.toml:{line_of(VALID, 'trusted_root')}: "
        "backend_settings[web-tls].trusted_root_certificates[0]: "
        "'ca/root.pem' is not a PEM certificate file",
    ]


def test_pins_on_plain_http_settings(tmp_path: Path, pki: dict[str, Issued]) -> None:
    text = edit('protocol = "http"\n\n[[rule]]', f'protocol = "http"\npinned_public_keys = '
                f'["{PIN_TEXT}"]\n\n[[rule]]')
    assert only(tmp_path, text) == (
        f"gw.toml:{line_of(text, 'pinned_public_keys', 2)}: "
        'backend_settings[web-http].pinned_public_keys: only used with protocol = "https"'
    )


# -- TLS policies -----------------------------------------------------------------------

def test_custom_policy_with_unknown_suite(tmp_path: Path, pki: dict[str, Issued]) -> None:
    text = edit('"TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",',
                '"TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA265",')
    assert only(tmp_path, text) == (
        f"gw.toml:{line_of(text, 'cipher_suites')}: ssl_policy[strict].cipher_suites[0]: "
        "unknown cipher suite 'TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA265' "
        "(did you mean 'TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256'?)"
    )


def test_custom_policy_cannot_reuse_a_predefined_name(tmp_path: Path,
                                                      pki: dict[str, Issued]) -> None:
    text = edit("[ssl_policy.strict]", "[ssl_policy.AppGwSslPolicy20220101S]")
    assert problems(tmp_path, text)[-1] == (
        f"gw.toml:{line_of(text, '[ssl_policy.')}: ssl_policy[AppGwSslPolicy20220101S]: "
        "'AppGwSslPolicy20220101S' is a predefined policy and cannot be redefined"
    )


def test_custom_policy_dhe_suite_is_a_warning(tmp_path: Path, pki: dict[str, Issued]) -> None:
    text = edit('"TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",',
                '"TLS_DHE_RSA_WITH_AES_128_GCM_SHA256", "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",')
    config = load(tmp_path, text)
    assert config.warnings == (
        f"gw.toml:{line_of(text, 'cipher_suites')}: ssl_policy[strict].cipher_suites[0]: "
        "DHE suites are never negotiated (as in Azure Application Gateway v2); ignored",
    )
    policy = config.listeners[0].ssl_policy
    assert policy is not None
    assert "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256" not in policy.cipher_suites


def test_policy_refused_by_openssl_becomes_warnings(tmp_path: Path,
                                                    pki: dict[str, Issued]) -> None:
    text = edit('ssl_policy = "strict"', 'ssl_policy = "AppGwSslPolicy20150501"')
    config = load(tmp_path, text)
    expected = policies.unsupported_by_openssl(policies.PREDEFINED["AppGwSslPolicy20150501"])
    prefix = f"gw.toml:{line_of(text, 'ssl_policy = ')}: listener[shop].ssl_policy: "
    assert config.warnings == tuple(prefix + message for message in expected)


def test_default_policy(tmp_path: Path, pki: dict[str, Issued]) -> None:
    config = load(tmp_path, edit('ssl_policy = "strict"\n', ""))
    assert config.listeners[0].ssl_policy == policies.PREDEFINED[policies.DEFAULT_POLICY]


# -- not yet supported ------------------------------------------------------------------

def test_a_key_marked_not_yet_supported_is_an_error_unless_default(
        tmp_path: Path, pki: dict[str, Issued], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every contract key is implemented today, so NOT_YET_SUPPORTED is empty; the
    mechanism stays for the next contract key that lands before its feature."""
    assert not any(NOT_YET_SUPPORTED.values())
    monkeypatch.setitem(NOT_YET_SUPPORTED, "listener", {"http3": (False, "HTTP/3")})
    text = edit('name = "plain"', 'name = "plain"\nhttp3 = true')
    assert only(tmp_path, text) == (
        f"gw.toml:{line_of(text, 'http3 = true')}: listener[plain].http3: "
        "not supported yet (HTTP/3 arrives in a later release)"
    )
    load(tmp_path, edit('name = "plain"', 'name = "plain"\nhttp3 = false'))


def test_not_yet_supported_keys_with_default_values_are_accepted(
    tmp_path: Path, pki: dict[str, Issued]
) -> None:
    text = edit('name = "plain"', 'name = "plain"\nclient_auth = "none"\nclient_ca = []\n'
                'watch_certificates = false')
    text = edit('name = "web-http"', 'name = "web-http"\ncookie_based_affinity = false\n'
                'connection_draining_timeout = 30\npath = ""', text)
    load(tmp_path, text)


def test_probe_tables_and_backend_settings_health_keys(tmp_path: Path,
                                                        pki: dict[str, Issued]) -> None:
    text = VALID + """
[[probe]]
name = "health"
protocol = "https"
host = "probe.example.test"
path = "/healthz"
interval = 5
timeout = 2
unhealthy_threshold = 2
match_status_codes = ["200-204", "401"]
match_body = "ok"
"""
    text = edit('name = "web-http"', 'name = "web-http"\nprobe = "health"\n'
                'cookie_based_affinity = true\naffinity_cookie_name = "Sticky"\n'
                'connection_draining_timeout = 60\npath = "/override/"', text)
    config = load(tmp_path, text)
    probe = config.probes["health"]
    assert (probe.protocol, probe.host, probe.path) == ("https", "probe.example.test", "/healthz")
    assert (probe.interval, probe.timeout, probe.unhealthy_threshold) == (5.0, 2.0, 2)
    assert probe.match_status_codes == ((200, 204), (401, 401))
    assert probe.match_body == "ok"
    settings = config.backend_settings["web-http"]
    assert settings.probe == "health" and settings.cookie_based_affinity
    assert settings.affinity_cookie_name == "Sticky"
    assert settings.connection_draining_timeout == 60.0 and settings.path == "/override/"


def test_probe_problems(tmp_path: Path, pki: dict[str, Issued]) -> None:
    text = VALID + """
[[probe]]
name = "bad"
path = "healthz"
match_status_codes = ["2xx", "500-400"]
"""
    text = edit('name = "web-http"', 'name = "web-http"\nprobe = "missing"', text)
    found = problems(tmp_path, text)
    assert any("probe[bad].path: must start with '/'" in p for p in found), found
    assert any("match_status_codes[0]: expected a status code" in p for p in found), found
    assert any("match_status_codes[1]: status range must lie" in p for p in found), found
    assert any("backend_settings[web-http].probe: no probe named 'missing'" in p
               for p in found), found


# -- everything at once -----------------------------------------------------------------

def test_all_problems_are_reported_at_once_in_file_order(tmp_path: Path,
                                                         pki: dict[str, Issued]) -> None:
    text = edit("workers = 3", "workers = -3")
    text = edit('protocol = "https"', 'protocol = "htps"', text)
    text = edit("priority = 10", "priority = 0", text)
    (tmp_path / "ca/root.pem").unlink()
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    lines = [p.line or 0 for p in caught.value.problems]
    assert lines == sorted(lines) and len(lines) == 4
    assert str(caught.value).splitlines() == [str(p) for p in caught.value.problems]
    assert [p.key for p in caught.value.problems] == [
        "server.workers",
        "listener[shop].protocol",
        "backend_settings[web-tls].trusted_root_certificates[0]",
        "rule[shop].priority",
    ]


def test_problem_formatting() -> None:
    assert str(Problem("gw.toml", 41, "a.b", "bad")) == "gw.toml:41: a.b: bad"
    assert str(Problem("gw.toml", None, "a.b", "bad")) == "gw.toml: a.b: bad"


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config: no such file"):
        load_config(str(tmp_path / "absent.toml"))


# -- the line scanner -------------------------------------------------------------------

def test_line_index_follows_arrays_of_tables_and_multiline_values() -> None:
    text = (
        "[server]\n"                     # 1
        "workers = 2\n"                  # 2
        "[[rule]]\n"                     # 3
        "name = 'a'\n"                   # 4
        "  [[rule.path_rule]]\n"         # 5
        "  paths = [\n"                  # 6
        "    '/x', # [not a table]\n"    # 7
        "  ]\n"                          # 8
        "[[rule]]\n"                     # 9
        'name = """\n'                   # 10
        "[fake]\n"                       # 11
        '"""\n'                          # 12
        "  [[rule.path_rule]]\n"         # 13
        "  [[rule.path_rule]]\n"         # 14
        '  "quoted key" = 1\n'           # 15
        "[ssl_policy.strict]\n"          # 16
        "min_protocol = 'TLSv1.2'\n"     # 17
    )
    lines = index_lines(text)
    assert lines.line(("server", "workers")) == 2
    assert lines.line(("rule", 0, "path_rule", 0, "paths")) == 6
    assert lines.line(("rule", 0, "path_rule", 0, "paths", 0)) == 6
    assert lines.line(("rule", 1, "name")) == 10
    assert lines.line(("fake",)) is None
    assert lines.line(("rule", 1, "path_rule", 1)) == 14
    assert lines.line(("rule", 1, "path_rule", 1, "quoted key")) == 15
    assert lines.line(("rule", 1, "path_rule", 1, "missing")) == 14
    assert lines.line(("ssl_policy", "strict", "min_protocol")) == 17
