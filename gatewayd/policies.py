"""The predefined TLS policies of Azure Application Gateway, and custom ones.

The facts come from Azure's public documentation (see ``ssl-policies.md``): five
predefined policies, each a protocol range and a set of IANA cipher suites.  They live
here as data, in one place, so that the config loader, the TLS context builder and
``--check`` all agree on them.

Choices gatewayd makes where Azure leaves room:

* **DHE suites are dropped.**  Azure lists ``TLS_DHE_*`` suites in some policies but
  Application Gateway v2 never negotiates them; gatewayd does the same, so they never
  appear in a policy's ``cipher_suites`` (they are still known to `IANA_TO_OPENSSL`
  so that a custom policy naming one is understood rather than rejected).
* **Preference order.**  Azure publishes only an unordered table, so the order is ours:
  TLS 1.3 suites (``tls13_suites``, AES-128 then AES-256 as the table lists them; OpenSSL
  keeps its own TLS 1.3 order anyway), then for TLS 1.2 and older

  1. ECDHE (ECDSA or RSA authentication) with AEAD (GCM),
  2. ECDHE with CBC,
  3. RSA key exchange with AEAD, then RSA key exchange with CBC,
  4. 3DES last;

  within a group the stronger cipher (AES-256) comes first, then SHA-2 MACs before
  SHA-1, then ECDSA before RSA authentication.
* **TLS 1.3** in the 2022 policies is exactly ``TLS_AES_128_GCM_SHA256`` and
  ``TLS_AES_256_GCM_SHA384`` (no ChaCha20), as Azure documents.

`unsupported_by_openssl` reports what the OpenSSL bundled with pyOpenSSL refuses at its
default security level (3DES, TLS 1.0/1.1 in current releases) so that ``--check`` can
say so instead of the policy silently shrinking.
"""

from __future__ import annotations

import contextlib
import datetime
import functools

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from gatewayd.model import SslPolicy

DEFAULT_POLICY = "AppGwSslPolicy20220101S"
PROTOCOLS = ("TLSv1.0", "TLSv1.1", "TLSv1.2", "TLSv1.3")

TLS13_SUITES = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384")

_POLICY_NAMES = (
    "AppGwSslPolicy20150501",
    "AppGwSslPolicy20170401",
    "AppGwSslPolicy20170401S",
    "AppGwSslPolicy20220101",
    "AppGwSslPolicy20220101S",
)

# (IANA name, OpenSSL name, membership in the five policies above as in ssl-policies.md).
# Kept in the documentation's row order so the table can be audited line by line.
_SUITES: tuple[tuple[str, str, str], ...] = (
    ("TLS_AES_128_GCM_SHA256", "TLS_AES_128_GCM_SHA256", "...xx"),
    ("TLS_AES_256_GCM_SHA384", "TLS_AES_256_GCM_SHA384", "...xx"),
    ("TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384", "ECDHE-RSA-AES256-GCM-SHA384", "xxxxx"),
    ("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "ECDHE-RSA-AES128-GCM-SHA256", "xxxxx"),
    ("TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384", "ECDHE-RSA-AES256-SHA384", "x..x."),
    ("TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256", "ECDHE-RSA-AES128-SHA256", "x..x."),
    ("TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA", "ECDHE-RSA-AES256-SHA", "xxx.."),
    ("TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA", "ECDHE-RSA-AES128-SHA", "xxx.."),
    ("TLS_DHE_RSA_WITH_AES_256_GCM_SHA384", "DHE-RSA-AES256-GCM-SHA384", "x...."),
    ("TLS_DHE_RSA_WITH_AES_128_GCM_SHA256", "DHE-RSA-AES128-GCM-SHA256", "x...."),
    ("TLS_DHE_RSA_WITH_AES_256_CBC_SHA", "DHE-RSA-AES256-SHA", "x...."),
    ("TLS_DHE_RSA_WITH_AES_128_CBC_SHA", "DHE-RSA-AES128-SHA", "x...."),
    ("TLS_RSA_WITH_AES_256_GCM_SHA384", "AES256-GCM-SHA384", "xxx.."),
    ("TLS_RSA_WITH_AES_128_GCM_SHA256", "AES128-GCM-SHA256", "xxx.."),
    ("TLS_RSA_WITH_AES_256_CBC_SHA256", "AES256-SHA256", "xxx.."),
    ("TLS_RSA_WITH_AES_128_CBC_SHA256", "AES128-SHA256", "xxx.."),
    ("TLS_RSA_WITH_AES_256_CBC_SHA", "AES256-SHA", "xxx.."),
    ("TLS_RSA_WITH_AES_128_CBC_SHA", "AES128-SHA", "xxx.."),
    ("TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "ECDHE-ECDSA-AES256-GCM-SHA384", "xxxxx"),
    ("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "ECDHE-ECDSA-AES128-GCM-SHA256", "xxxxx"),
    ("TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384", "ECDHE-ECDSA-AES256-SHA384", "xxxx."),
    ("TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256", "ECDHE-ECDSA-AES128-SHA256", "xxxx."),
    ("TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA", "ECDHE-ECDSA-AES256-SHA", "xxx.."),
    ("TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA", "ECDHE-ECDSA-AES128-SHA", "xxx.."),
    ("TLS_DHE_DSS_WITH_AES_256_CBC_SHA256", "DHE-DSS-AES256-SHA256", "x...."),
    ("TLS_DHE_DSS_WITH_AES_128_CBC_SHA256", "DHE-DSS-AES128-SHA256", "x...."),
    ("TLS_DHE_DSS_WITH_AES_256_CBC_SHA", "DHE-DSS-AES256-SHA", "x...."),
    ("TLS_DHE_DSS_WITH_AES_128_CBC_SHA", "DHE-DSS-AES128-SHA", "x...."),
    ("TLS_RSA_WITH_3DES_EDE_CBC_SHA", "DES-CBC3-SHA", "x...."),
    ("TLS_DHE_DSS_WITH_3DES_EDE_CBC_SHA", "DHE-DSS-DES-CBC3-SHA", "x...."),
)

IANA_TO_OPENSSL: dict[str, str] = {iana: openssl for iana, openssl, _ in _SUITES}

_PROTOCOL_RANGES = {
    "AppGwSslPolicy20150501": ("TLSv1.0", "TLSv1.2"),
    "AppGwSslPolicy20170401": ("TLSv1.1", "TLSv1.2"),
    "AppGwSslPolicy20170401S": ("TLSv1.2", "TLSv1.2"),
    "AppGwSslPolicy20220101": ("TLSv1.2", "TLSv1.3"),
    "AppGwSslPolicy20220101S": ("TLSv1.2", "TLSv1.3"),
}

_OPENSSL_VERSIONS = {
    "TLSv1.0": SSL.TLS1_VERSION,
    "TLSv1.1": SSL.TLS1_1_VERSION,
    "TLSv1.2": SSL.TLS1_2_VERSION,
    "TLSv1.3": SSL.TLS1_3_VERSION,
}


def is_tls13_suite(iana: str) -> bool:
    """TLS 1.3 suites name no key exchange (``TLS_AES_…``), older ones do (``…_WITH_…``)."""
    return "_WITH_" not in iana


def is_dhe_suite(iana: str) -> bool:
    """Finite-field DHE suites, which gatewayd (like Azure v2) never negotiates."""
    return iana.startswith("TLS_DHE_")


def preference_key(iana: str) -> tuple[int, int, int, int]:
    """Sort key implementing the documented order (smaller = preferred)."""
    ecdhe = iana.startswith("TLS_ECDHE_")
    aead = "_GCM_" in iana
    if "_3DES_" in iana:
        group = 4
    elif ecdhe:
        group = 0 if aead else 1
    elif iana.startswith("TLS_RSA_"):
        group = 2 if aead else 3
    else:
        group = 5
    bits = 0 if "_256_" in iana else 1
    sha1_mac = 1 if iana.endswith("_SHA") else 0
    auth = 0 if "_ECDSA_" in iana else 1
    return (group, bits, sha1_mac, auth)


def protocols_between(min_protocol: str, max_protocol: str) -> tuple[str, ...]:
    """The protocol names from `min_protocol` to `max_protocol`, inclusive."""
    lo, hi = PROTOCOLS.index(min_protocol), PROTOCOLS.index(max_protocol)
    return PROTOCOLS[lo : hi + 1]


def _predefined(index: int, name: str) -> SslPolicy:
    members = [iana for iana, _, marks in _SUITES if marks[index] == "x"]
    legacy = sorted(
        (s for s in members if not is_tls13_suite(s) and not is_dhe_suite(s)),
        key=preference_key,
    )
    min_protocol, max_protocol = _PROTOCOL_RANGES[name]
    tls13 = tuple(s for s in members if is_tls13_suite(s)) if max_protocol == "TLSv1.3" else ()
    return SslPolicy(
        name=name,
        min_protocol=min_protocol,
        max_protocol=max_protocol,
        cipher_suites=tuple(legacy),
        tls13_suites=tls13,
    )


PREDEFINED: dict[str, SslPolicy] = {
    name: _predefined(index, name) for index, name in enumerate(_POLICY_NAMES)
}


def custom_policy(
    name: str, min_protocol: str, cipher_suites: list[str] | tuple[str, ...]
) -> SslPolicy:
    """A `[ssl_policy.NAME]` policy: the operator's suites in the operator's order.

    The maximum is always TLS 1.3, so both TLS 1.3 suites are implied; TLS 1.3 names
    and DHE suites given in `cipher_suites` are dropped (implied / never negotiated).
    Names must be keys of `IANA_TO_OPENSSL` (the config loader checks that first).
    """
    if min_protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {min_protocol!r}")
    unknown = [s for s in cipher_suites if s not in IANA_TO_OPENSSL]
    if unknown:
        raise ValueError(f"unknown cipher suites: {', '.join(unknown)}")
    kept = tuple(s for s in cipher_suites if not is_tls13_suite(s) and not is_dhe_suite(s))
    return SslPolicy(
        name=name,
        min_protocol=min_protocol,
        max_protocol="TLSv1.3",
        cipher_suites=tuple(dict.fromkeys(kept)),
        tls13_suites=TLS13_SUITES,
    )


def openssl_cipher_string(policy: SslPolicy) -> str:
    """The TLS ≤1.2 suites for ``SSL_CTX_set_cipher_list``, in preference order."""
    return ":".join(IANA_TO_OPENSSL[s] for s in policy.cipher_suites)


def openssl_tls13_string(policy: SslPolicy) -> str:
    """The TLS 1.3 suites for ``SSL_CTX_set_ciphersuites`` (empty when 1.3 is off)."""
    return ":".join(IANA_TO_OPENSSL[s] for s in policy.tls13_suites)


def openssl_label() -> str:
    """"OpenSSL 4.0.3" — the library pyOpenSSL is linked against, for messages."""
    words = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode("ascii", "replace").split()
    return " ".join(words[:2])


@functools.cache
def suite_refused(iana: str) -> bool:
    """True if the bundled OpenSSL will not offer this suite at its default level.

    A suite OpenSSL does not know (compiled out, like 3DES in OpenSSL ≥ 3.x builds of
    cryptography) makes the cipher list empty, which pyOpenSSL reports as SSL.Error.
    """
    openssl_name = IANA_TO_OPENSSL[iana]
    context = SSL.Context(SSL.TLS_METHOD)
    try:
        if is_tls13_suite(iana):
            context.set_tls13_ciphersuites(openssl_name.encode("ascii"))
        else:
            context.set_cipher_list(openssl_name.encode("ascii"))
    except SSL.Error:
        return True
    return openssl_name not in SSL.Connection(context, None).get_cipher_list()


@functools.cache
def _probe_identity() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A throw-away P-256 self-signed certificate for the in-memory handshakes."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gatewayd-protocol-probe")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _pinned_context(version: int) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(version)
    context.set_max_proto_version(version)
    return context


def _step(connection: SSL.Connection, peer: SSL.Connection) -> bool:
    """Advance one side of the handshake and hand its output to the peer."""
    finished = True
    try:
        connection.do_handshake()
    except SSL.WantReadError:
        finished = False
    with contextlib.suppress(SSL.WantReadError):
        peer.bio_write(connection.bio_read(1 << 16))
    return finished


@functools.cache
def protocol_refused(protocol: str) -> bool:
    """True if a client and a server both pinned to `protocol` cannot complete a
    handshake with the bundled OpenSSL's defaults.

    A real in-memory handshake (memory BIOs) is the only reliable test: since OpenSSL
    3.0, TLS 1.0/1.1 are refused at security level 1+ not by a version switch but
    because their signature and MAC algorithms fall below the level.
    """
    cert, key = _probe_identity()
    server_context = _pinned_context(_OPENSSL_VERSIONS[protocol])
    server_context.use_certificate(cert)
    server_context.use_privatekey(key)
    server = SSL.Connection(server_context, None)
    server.set_accept_state()
    client = SSL.Connection(_pinned_context(_OPENSSL_VERSIONS[protocol]), None)
    client.set_connect_state()
    try:
        for _ in range(8):
            client_done = _step(client, server)
            server_done = _step(server, client)
            if client_done and server_done:
                return client.get_protocol_version_name() != _openssl_version_name(protocol)
    except SSL.Error:
        return True
    return True


def _openssl_version_name(protocol: str) -> str:
    """OpenSSL spells TLS 1.0 "TLSv1"."""
    return "TLSv1" if protocol == "TLSv1.0" else protocol


def unsupported_by_openssl(policy: SslPolicy) -> list[str]:
    """Human-readable warnings for each protocol and suite of `policy` that the bundled
    OpenSSL refuses at its default security level (empty when all are usable)."""
    where = f"{openssl_label()} at its default security level"
    found = [
        f"protocol {protocol} is refused by {where}"
        for protocol in protocols_between(policy.min_protocol, policy.max_protocol)
        if protocol_refused(protocol)
    ]
    found += [
        f"suite {suite} is refused by {where}"
        for suite in (*policy.cipher_suites, *policy.tls13_suites)
        if suite_refused(suite)
    ]
    return found
