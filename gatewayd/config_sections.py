"""Loaders for the `[server]`, `[ssl_policy.NAME]`, `[[listener]]` and
`[[backend_settings]]` sections: the parts of the config that involve TLS material,
file paths or cross-listener consistency.  `gatewayd.config` drives them.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, fields
from typing import Any

from cryptography import x509

from gatewayd import config_certs as certs
from gatewayd import policies
from gatewayd.config_frontend import listener_extras
from gatewayd.config_reader import Loader, Table, Where, range_problem, suggest, type_name
from gatewayd.model import (
    Address,
    BackendSettings,
    CertificateFile,
    Listener,
    ServerSettings,
    SslPolicy,
)
from gatewayd.pins import spki_sha256

SERVER_KEYS: dict[str, type] = {f.name: type(f.default) for f in fields(ServerSettings)}
"""Every `[server]` key and its Python type; the CLI builds flags and env vars from it."""

_SERVER_RANGES: dict[str, tuple[int, int | None]] = {
    "workers": (0, None),
    "worker_connections": (1, None),
    "max_request_line": (1, None),
    "max_header_bytes": (1, None),
    "max_headers": (1, None),
    "max_body_bytes": (0, None),
}
_SERVER_CHOICES = {
    "log_level": ("debug", "info", "warning", "error"),
    "access_log_format": ("json", "combined"),
}
_SERVER_PATHS = ("runtime_dir", "pidfile", "access_log", "affinity_secret_file")

EXPIRY_WARNING_DAYS = 14
_HOST_PATTERN = re.compile(r"[a-z0-9*?.-]+")
_HTTPS_ONLY_SETTINGS = (
    "pinned_public_keys", "pinned_certificates", "trusted_root_certificates", "sni_name",
)


# -- addresses --------------------------------------------------------------------------

def parse_address(text: str) -> Address:
    """``host:port`` or ``[v6]:port`` → Address; ValueError with an operator message."""
    host, port = split_host_port(text)
    if port is None:
        raise ValueError(f"expected 'host:port' or '[ipv6]:port', got {text!r}")
    return Address(host, port)


def split_host_port(text: str) -> tuple[str, int | None]:
    """Split ``host[:port]`` (IPv6 in brackets); ValueError for anything malformed."""
    bad = ValueError(f"expected 'host[:port]' or '[ipv6][:port]', got {text!r}")
    port_text: str | None
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise bad
        host, rest = text[1:close], text[close + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
        if rest and not rest.startswith(":"):
            raise bad
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:
        raise ValueError(f"IPv6 addresses need brackets ('[{text}]'), got {text!r}")
    else:
        host, colon, after = text.partition(":")
        port_text = after if colon else None
    if not host or any(c.isspace() or c in "/@[]" for c in host):
        raise bad
    if port_text is None:
        return host, None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port must be between 1 and 65535, got {port_text!r}")
    return host, int(port_text)


# -- [server] ---------------------------------------------------------------------------

def server_settings(loader: Loader, data: dict[str, Any],
                    overrides: dict[str, object]) -> ServerSettings:
    """`[server]` merged with flag/env `overrides` (which win), validated.

    Relative paths from the file resolve against its folder, those from overrides
    against the working directory (where the operator typed them).  An override of
    None means "not given".  A bad file value is reported even when overridden: the
    file must stay valid for the next start without that flag.
    """
    raw = data.get("server", {})
    file_where = Where(("server",), "server")
    if not isinstance(raw, dict):
        loader.report.error(file_where, f"expected a table, got {type_name(raw)}")
        raw = {}
    Table(loader.report, file_where, raw, SERVER_KEYS)
    given = {key: value for key, value in overrides.items() if value is not None}
    for key in given:
        if key not in SERVER_KEYS:
            loader.report.error(
                Where(None, f"server.{key}"), "unknown setting" + suggest(key, SERVER_KEYS)
            )
    values: dict[str, Any] = {}
    for key, kind in SERVER_KEYS.items():
        sources = []
        if key in raw:
            sources.append((file_where.key(key), raw[key], loader.base_dir))
        if key in given:
            sources.append((Where(None, f"server.{key}"), given[key], os.getcwd()))
        for where, value, base in sources:  # the override, if any, comes last and wins
            checked = _server_value(loader, key, kind, value, where)
            if checked is not None:
                values[key] = _absolute(checked, base) if key in _SERVER_PATHS else checked
    if values.get("workers") == 0:
        values["workers"] = os.cpu_count() or 1
    return ServerSettings(**values)


def _absolute(value: object, base: str) -> object:
    """Paths become absolute; "" (unset), "-" (stdout) and "off" stay as they are."""
    if not isinstance(value, str) or value in ("", "-", "off"):
        return value
    return os.path.normpath(os.path.join(base, value))


def _server_value(loader: Loader, key: str, kind: type, value: object,
                  where: Where) -> object | None:
    """The typed, range-checked value of one server key, or None (reported)."""
    report = loader.report
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, kind):
        expected = {int: "an integer", float: "a number", str: "a string"}[kind]
        report.error(where, f"expected {expected}, got {type_name(value)}")
        return None
    problem: str | None = None
    if key in _SERVER_RANGES:
        assert isinstance(value, int)
        problem = range_problem(value, *_SERVER_RANGES[key])
    elif kind is float and not value > 0:  # type: ignore[operator]
        problem = f"must be greater than 0; got {value}"
    elif key in _SERVER_CHOICES and value not in _SERVER_CHOICES[key]:
        problem = f"must be one of {', '.join(_SERVER_CHOICES[key])}; got {value!r}"
    elif key == "admin_bind" and value != "":  # "" = no admin endpoint
        try:
            parse_address(str(value))
        except ValueError as exc:
            problem = str(exc)
    if problem:
        report.error(where, problem)
        return None
    loader.reject_unsupported("server", key, value, where)
    return value


# -- [ssl_policy.NAME] ------------------------------------------------------------------

def custom_policies(loader: Loader, data: dict[str, Any]) -> None:
    """Load every custom policy into `loader.custom_policies` (None when invalid, so
    that listeners naming it are not also told the policy does not exist)."""
    raw = data.get("ssl_policy", {})
    if not isinstance(raw, dict):
        loader.report.error(Where(("ssl_policy",), "ssl_policy"),
                            f"expected [ssl_policy.NAME] tables, got {type_name(raw)}")
        return
    for name, body in raw.items():
        where = Where(("ssl_policy", name), f"ssl_policy[{name}]")
        loader.custom_policies[name] = None
        if not isinstance(body, dict):
            loader.report.error(where, f"expected a table, got {type_name(body)}")
        elif name in policies.PREDEFINED:
            loader.report.error(where, f"{name!r} is a predefined policy and cannot be redefined")
        else:
            loader.custom_policies[name] = _custom_policy(loader, name, Table(
                loader.report, where, body, ("min_protocol", "cipher_suites")))


def _custom_policy(loader: Loader, name: str, table: Table) -> SslPolicy | None:
    min_protocol = table.get_str("min_protocol", "TLSv1.2", choices=policies.PROTOCOLS)
    suites: list[str] = []
    valid = min_protocol is not None
    entries = table.get_str_list("cipher_suites", required=min_protocol != "TLSv1.3")
    for suite, where in entries:
        if suite not in policies.IANA_TO_OPENSSL:
            loader.report.error(where, f"unknown cipher suite {suite!r}"
                                + suggest(suite, policies.IANA_TO_OPENSSL))
            valid = False
        elif policies.is_dhe_suite(suite):
            loader.report.warn(where, "DHE suites are never negotiated (as in Azure Application "
                               "Gateway v2); ignored")
        suites.append(suite)
    if not valid or min_protocol is None:
        return None
    policy = policies.custom_policy(name, min_protocol, suites)
    if not policy.cipher_suites and min_protocol != "TLSv1.3" and table.has("cipher_suites"):
        loader.report.error(table.where.key("cipher_suites"),
                            f"no usable suite for TLS 1.2 and older, but min_protocol is "
                            f"{min_protocol}")
        return None
    for message in policies.unsupported_by_openssl(policy):
        loader.report.warn(table.where, message)
    return policy


# -- [[listener]] -----------------------------------------------------------------------

@dataclass
class _Placed:
    """A loaded listener with the positions its cross-listener checks report at."""

    listener: Listener
    where: Where
    hosts: list[tuple[str, Where]]


def listeners(loader: Loader, data: dict[str, Any]) -> list[Listener]:
    items = loader.array(data, "listener", Where((), ""))
    if not items and "listener" not in data:
        loader.report.error(Where((), "listener"), "at least one [[listener]] is required")
    loader.check_unique("listener", items)
    placed = [p for where, raw in items if (p := _listener(loader, where, raw)) is not None]
    warned: set[str] = set()
    for item in placed:
        policy = item.listener.ssl_policy
        if policy is not None and policy.name in policies.PREDEFINED and policy.name not in warned:
            warned.add(policy.name)
            for message in policies.unsupported_by_openssl(policy):
                loader.report.warn(item.where.key("ssl_policy"), message)
    _check_binds(loader, placed)
    return [p.listener for p in placed]


def _listener(loader: Loader, where: Where, raw: dict[str, Any]) -> _Placed | None:
    table = loader.table("listener", where, raw)
    name = table.get_str("name", required=True)
    bind_text = table.get_str("bind", required=True)
    protocol = table.get_str("protocol", required=True, choices=("http", "https"))
    hosts = _host_names(loader, table)
    require_sni = table.get_bool("require_sni")
    bind = None
    if bind_text is not None:
        try:
            bind = parse_address(bind_text)
        except ValueError as exc:
            loader.report.error(where.key("bind"), str(exc))
    certificate, policy = None, None
    if protocol == "https":
        certificate = _listener_certificate(loader, table)
        policy = _listener_policy(loader, table)
    elif protocol == "http":
        https_only = [k for k in ("certificate", "private_key", "ssl_policy") if table.has(k)]
        https_only += ["require_sni"] if require_sni else []
        for key in https_only:
            loader.report.error(where.key(key), "only used by https listeners")
    extras = listener_extras(loader, table, protocol, certificate)
    if name is None or bind is None or protocol is None:
        return None
    listener = Listener(
        name=name, bind=bind, protocol=protocol, host_names=tuple(h for h, _ in hosts),
        certificate=certificate, ssl_policy=policy, require_sni=require_sni,
        x_forwarded_for_port=table.get_bool("x_forwarded_for_port"),
        line=loader.report.line_of(where) or 0, **extras,
    )
    return _Placed(listener, where, hosts)


def _host_names(loader: Loader, table: Table) -> list[tuple[str, Where]]:
    """Lower-cased host name patterns: letters, digits, '-', '.', '*' and '?'."""
    hosts: list[tuple[str, Where]] = []
    for host, where in table.get_str_list("host_names"):
        lowered = host.lower()
        if not _HOST_PATTERN.fullmatch(lowered):
            loader.report.error(where, f"invalid host name pattern {host!r} (letters, digits, "
                                "'-', '.' and the wildcards '*' and '?' only)")
        elif lowered in (h for h, _ in hosts):
            loader.report.error(where, f"host name {host!r} is listed twice")
        else:
            hosts.append((lowered, where))
    return hosts


def _listener_certificate(loader: Loader, table: Table) -> CertificateFile | None:
    """Chain (leaf first) and matching key, read now; expiry is an error, near expiry a
    warning (workers fork later and must serve exactly what was checked)."""
    cert_shown = table.get_str("certificate", required=True)
    key_shown = table.get_str("private_key", required=True)
    cert_where, key_where = table.where.key("certificate"), table.where.key("private_key")
    cert_pem = key_pem = chain = key = None
    if cert_shown is not None:
        cert_pem = loader.attempt(cert_where, certs.read_file, loader.path(cert_shown), cert_shown)
    if key_shown is not None:
        key_pem = loader.attempt(key_where, certs.read_file, loader.path(key_shown), key_shown)
    if cert_pem is not None and cert_shown is not None:
        chain = loader.attempt(cert_where, certs.load_pem_chain, cert_pem, cert_shown)
    if chain is not None and cert_shown is not None:
        loader.attempt(cert_where, certs.check_leaf_first, chain, cert_shown)
        _check_expiry(loader, cert_where, chain[0], cert_shown)
    if key_pem is not None and key_shown is not None:
        key = loader.attempt(key_where, certs.load_private_key, key_pem, key_shown)
    if chain is None or key is None or cert_shown is None or key_shown is None:
        return None
    loader.attempt(key_where, certs.check_key_matches, key, chain[0], key_shown, cert_shown)
    assert cert_pem is not None and key_pem is not None
    return CertificateFile(
        certificate_path=loader.path(cert_shown),
        private_key_path=loader.path(key_shown),
        certificate_pem=cert_pem,
        private_key_pem=key_pem,
        not_after=certs.not_after(chain[0]).timestamp(),
    )


def _check_expiry(loader: Loader, where: Where, leaf: x509.Certificate, shown: str) -> None:
    """Expired is fatal (clients would refuse it); under 14 days left is a warning."""
    end = certs.not_after(leaf)
    when = end.strftime("%Y-%m-%d %H:%M:%S UTC")
    left = end - loader.now
    if left.total_seconds() <= 0:
        loader.report.error(where, f"certificate {shown!r} expired on {when}")
    elif left.days < EXPIRY_WARNING_DAYS:
        loader.report.warn(where, f"certificate {shown!r} expires on {when} "
                           f"(in {left.days} days)")


def _listener_policy(loader: Loader, table: Table) -> SslPolicy | None:
    name = table.get_str("ssl_policy", policies.DEFAULT_POLICY)
    if name is None:
        return None
    if name in policies.PREDEFINED:
        return policies.PREDEFINED[name]
    if name in loader.custom_policies:
        policy: SslPolicy | None = loader.custom_policies[name]
        return policy  # None: the policy itself is broken and already reported
    known = [*policies.PREDEFINED, *loader.custom_policies]
    loader.report.error(table.where.key("ssl_policy"),
                        f"no ssl_policy named {name!r}" + suggest(name, known))
    return None


def _check_binds(loader: Loader, placed: list[_Placed]) -> None:
    """Listeners sharing a bind form one multi-site socket: they must agree on protocol
    and TLS policy, and each must be reachable (one basic listener, no host name twice).
    """
    by_bind: dict[Address, list[_Placed]] = {}
    for item in placed:
        by_bind.setdefault(item.listener.bind, []).append(item)
    for bind, group in by_bind.items():
        first = group[0].listener
        basic: _Placed | None = None
        owners: dict[str, _Placed] = {}
        for item in group:
            listener, where = item.listener, item.where
            if listener.protocol != first.protocol:
                loader.report.error(where.key("protocol"), f"listeners sharing bind {bind} must "
                                    f"use the same protocol (listener[{first.name}] is "
                                    f"{first.protocol})")
            elif (listener.ssl_policy and first.ssl_policy
                  and listener.ssl_policy.name != first.ssl_policy.name):
                loader.report.error(where.key("ssl_policy"), f"listeners sharing bind {bind} must"
                                    " use the same ssl_policy (per-SNI policies are not supported)")
            if listener.is_basic and basic is not None:
                loader.report.error(where.key("host_names"), f"unreachable: {basic.where.label} is "
                                    f"already the basic listener (no host_names) on bind {bind}")
            elif listener.is_basic:
                basic = item
            for host, host_where in item.hosts:
                if host in owners:
                    loader.report.error(host_where, f"unreachable: host name {host!r} is already "
                                        f"served by {owners[host].where.label} on bind {bind}")
                else:
                    owners[host] = item


# -- [[backend_settings]] ---------------------------------------------------------------

def backend_settings(loader: Loader, table: Table) -> BackendSettings | None:
    """One backend settings table; pins and roots are read and checked now."""
    name = table.get_str("name", required=True)
    protocol = table.get_str("protocol", required=True, choices=("http", "https"))
    default_port = 80 if protocol == "http" else 443
    port = table.get_int("port", default_port, low=1, high=65535)
    if protocol == "http":
        for key in _HTTPS_ONLY_SETTINGS:
            if table.has(key) and table.data[key] not in ("", []):
                loader.report.error(table.where.key(key), 'only used with protocol = "https"')
    settings = BackendSettings(
        name=name or "",
        protocol=protocol or "https",
        port=port or default_port,
        host_name=table.get_str("host_name") or "",
        pick_host_name_from_backend_address=table.get_bool("pick_host_name_from_backend_address"),
        sni_name=table.get_str("sni_name") or "",
        pins=frozenset(_pins(loader, table)),
        trusted_roots_pem=_trusted_roots(loader, table),
        min_protocol=table.get_str("min_protocol", "TLSv1.2", choices=policies.PROTOCOLS) or "",
        connect_timeout=table.get_seconds("connect_timeout", 5.0),
        request_timeout=table.get_seconds("request_timeout", 20.0),
        cookie_based_affinity=table.get_bool("cookie_based_affinity"),
        affinity_cookie_name=_cookie_name(table),
        connection_draining_timeout=table.get_seconds("connection_draining_timeout", 30.0),
        path=_path_override(table),
        probe=(loader.reference(table, "probe", "probe") or "") if table.has("probe") else "",
    )
    return settings if name is not None and protocol is not None and port is not None else None


_COOKIE_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")  # an RFC 6265 cookie-name token


def _cookie_name(table: Table) -> str:
    name = table.get_str("affinity_cookie_name", "ApplicationGatewayAffinity") or ""
    if name and not _COOKIE_NAME.fullmatch(name):
        table.report.error(table.where.key("affinity_cookie_name"),
                           f"not a valid cookie name: {name!r}")
    return name or "ApplicationGatewayAffinity"


def _path_override(table: Table) -> str:
    path = table.get_str("path") or ""
    if path and not path.startswith("/"):
        table.report.error(table.where.key("path"), f"must start with '/', got {path!r}")
        return ""
    return path


def _pins(loader: Loader, table: Table) -> list[bytes]:
    """Digests from `pinned_public_keys` plus those of `pinned_certificates`' keys."""
    pins = [
        pin for text, where in table.get_str_list("pinned_public_keys")
        if (pin := loader.attempt(where, certs.parse_pin, text)) is not None
    ]
    for shown, where in table.get_str_list("pinned_certificates"):
        data = loader.attempt(where, certs.read_file, loader.path(shown), shown)
        cert = None if data is None else loader.attempt(where, certs.load_any_certificate, data,
                                                        shown)
        if cert is not None:
            pins.append(spki_sha256(cert))
    return pins


def _trusted_roots(loader: Loader, table: Table) -> bytes:
    """The concatenated, re-encoded PEM of every `trusted_root_certificates` file."""
    bundle = b""
    for shown, where in table.get_str_list("trusted_root_certificates"):
        data = loader.attempt(where, certs.read_file, loader.path(shown), shown)
        chain = None if data is None else loader.attempt(where, certs.load_pem_chain, data, shown)
        bundle += b"".join(certs.to_pem(cert) for cert in chain or [])
    return bundle
