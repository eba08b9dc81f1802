"""The validated configuration, as immutable values.

`gatewayd.config` turns a TOML file into one `GatewayConfig`; everything downstream
(routing tables, TLS contexts, the master, the workers) reads only these objects, never
the raw TOML.  They are frozen so that a config handed to a forked worker or kept by an
old worker generation can never be changed underneath it.

File paths are stored absolute (resolved against the config file's folder) and the
contents of certificate files are read once at load time, so that a worker forked
minutes later serves exactly what `--check` validated.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Address:
    """A `host:port` to bind or connect to.  `host` is an IP literal or a DNS name,
    without brackets for IPv6."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """The `[server]` table (also settable by flag and environment)."""

    workers: int = 2
    worker_connections: int = 10000
    graceful_timeout: float = 30.0
    worker_timeout: float = 30.0
    admin_bind: str = "127.0.0.1:9180"
    runtime_dir: str = "/run/gatewayd"
    pidfile: str = ""
    user: str = ""
    group: str = ""
    access_log: str = "-"
    access_log_format: str = "json"
    log_level: str = "info"
    affinity_secret_file: str = ""
    max_request_line: int = 8192
    max_header_bytes: int = 32768
    max_headers: int = 100
    max_body_bytes: int = 0
    client_header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    tls_handshake_timeout: float = 10.0
    websocket_idle_timeout: float = 3600.0


@dataclass(frozen=True, slots=True)
class SslPolicy:
    """A TLS policy for client-facing listeners.

    `cipher_suites` are IANA names in preference order (TLS 1.2 and older suites);
    `tls13_suites` are the IANA names of the TLS 1.3 suites, empty when the policy's
    maximum protocol is below TLS 1.3.  Protocol names are "TLSv1.0" … "TLSv1.3".
    """

    name: str
    min_protocol: str
    max_protocol: str
    cipher_suites: tuple[str, ...]
    tls13_suites: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CertificateFile:
    """A PEM chain (leaf first) and its key, read at load time."""

    certificate_path: str
    private_key_path: str
    certificate_pem: bytes
    private_key_pem: bytes
    not_after: float  # POSIX timestamp of the leaf's notAfter


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    bind: Address
    protocol: str  # "http" | "https"
    host_names: tuple[str, ...]  # empty = basic listener (any host)
    certificate: CertificateFile | None  # None for http listeners
    ssl_policy: SslPolicy | None  # None for http listeners
    require_sni: bool = False
    x_forwarded_for_port: bool = False
    line: int = 0  # where the [[listener]] table starts in the file (for messages)
    # Mutual TLS: "none" | "optional" | "required"; the concatenated PEM of `client_ca`;
    # RFC 4514 issuer names a client certificate's issuer must be one of (empty = any).
    client_auth: str = "none"
    client_ca_pem: bytes = b""
    client_allowed_issuers: tuple[str, ...] = ()
    ocsp_response_path: str = ""
    ocsp_response: bytes = b""  # DER, read at load time like the certificate
    watch_certificates: bool = False
    # status → page body, gateway-made responses only (a tuple: Listener stays hashable)
    error_pages: tuple[tuple[int, bytes], ...] = ()

    @property
    def is_basic(self) -> bool:
        return not self.host_names


@dataclass(frozen=True, slots=True)
class BackendPool:
    name: str
    servers: tuple[str, ...]  # "host[:port]" as written; resolved by the data plane


@dataclass(frozen=True, slots=True)
class BackendSettings:
    """How to talk to the servers of a pool (Azure: "backend settings").

    `pins` is the set of raw SHA-256 digests of allowed SubjectPublicKeyInfo DER
    (from `pinned_public_keys` and the public keys of `pinned_certificates`).
    `trusted_roots_pem` is the concatenated PEM of `trusted_root_certificates`.
    Verification can never be turned off: with neither pins nor roots the system
    trust store is used.
    """

    name: str
    protocol: str  # "http" | "https"
    port: int
    host_name: str = ""
    pick_host_name_from_backend_address: bool = False
    sni_name: str = ""
    pins: frozenset[bytes] = frozenset()
    trusted_roots_pem: bytes = b""
    min_protocol: str = "TLSv1.2"
    connect_timeout: float = 5.0
    request_timeout: float = 20.0
    cookie_based_affinity: bool = False
    affinity_cookie_name: str = "ApplicationGatewayAffinity"
    connection_draining_timeout: float = 30.0
    path: str = ""  # backend path prefix override (Azure "override backend path")
    probe: str = ""  # a [[probe]] name; "" = the default probe


@dataclass(frozen=True, slots=True)
class Probe:
    """A health probe (Azure defaults: GET / every 30 s, timeout 30 s, 3 failures, 200-399).
    `protocol` "" means the backend settings' protocol; `host` "" means 127.0.0.1 as the
    Host header and no SNI beyond what the settings name."""

    name: str
    protocol: str = ""
    host: str = ""
    path: str = "/"
    interval: float = 30.0
    timeout: float = 30.0
    unhealthy_threshold: int = 3
    match_status_codes: tuple[tuple[int, int], ...] = ((200, 399),)
    match_body: str = ""


DEFAULT_PROBE = Probe(name="")


@dataclass(frozen=True, slots=True)
class PathRule:
    """`backend_pool`/`backend_settings` are "" when the path rule redirects."""

    name: str
    paths: tuple[str, ...]  # patterns: "/x/*", "/x*", "/x"
    backend_pool: str
    backend_settings: str
    redirect: str = ""  # name of a [[redirect]], instead of a pool
    rewrite_set: str = ""  # name of a [[rewrite_set]]


@dataclass(frozen=True, slots=True)
class Rule:
    """`backend_pool`/`backend_settings` are "" when the rule's default is a redirect."""

    name: str
    priority: int
    listener: str
    backend_pool: str
    backend_settings: str
    path_rules: tuple[PathRule, ...] = ()
    redirect: str = ""
    rewrite_set: str = ""


@dataclass(frozen=True, slots=True)
class Redirect:
    """A `[[redirect]]` (Azure: redirect configuration).  Exactly one of
    `target_listener` and `target_url` is set."""

    name: str
    status: int  # 301 | 302 | 303 | 307 | 308
    target_listener: str = ""
    target_url: str = ""
    include_path: bool = True
    include_query_string: bool = True


@dataclass(frozen=True, slots=True)
class RewriteCondition:
    """Azure rewrite condition: `variable` (e.g. "{http_req_user_agent}") matched by
    the regular expression `pattern` (searched, not anchored)."""

    variable: str
    pattern: str
    ignore_case: bool = True
    negate: bool = False


@dataclass(frozen=True, slots=True)
class RewriteRule:
    """One rule of a rewrite set: all `conditions` must hold for the actions to run.
    Header values may contain variables; names keep the case written."""

    name: str
    conditions: tuple[RewriteCondition, ...] = ()
    request_headers_set: tuple[tuple[str, str], ...] = ()
    request_headers_remove: tuple[str, ...] = ()
    response_headers_set: tuple[tuple[str, str], ...] = ()
    response_headers_remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RewriteSet:
    name: str
    rules: tuple[RewriteRule, ...] = ()


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Everything one generation of workers serves.  Lookups by name are dicts built
    once at load; `rules` are sorted by priority (lowest first)."""

    source: str  # the config file's path, for messages
    server: ServerSettings
    listeners: tuple[Listener, ...]
    backend_pools: dict[str, BackendPool] = field(default_factory=dict)
    backend_settings: dict[str, BackendSettings] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    probes: dict[str, Probe] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()  # non-fatal findings (e.g. a suite OpenSSL refuses)
    redirects: dict[str, Redirect] = field(default_factory=dict)
    rewrite_sets: dict[str, RewriteSet] = field(default_factory=dict)
    error_pages: dict[int, bytes] = field(default_factory=dict)  # global [error_pages]

    def binds(self) -> list[Address]:
        """Distinct listen addresses, in file order."""
        seen: dict[Address, None] = {}
        for listener in self.listeners:
            seen.setdefault(listener.bind, None)
        return list(seen)

    def rule_for_listener(self, name: str) -> Rule | None:
        for rule in self.rules:
            if rule.listener == name:
                return rule
        return None
