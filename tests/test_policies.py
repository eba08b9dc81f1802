"""The predefined Azure TLS policies, checked against ssl-policies.md, and what the
bundled OpenSSL makes of them."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from OpenSSL import SSL

from gatewayd import policies
from gatewayd.model import SslPolicy

# ssl-policies.md, column by column (DHE rows included: they must be dropped).
ECDHE_GCM = {
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384", "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
}
ECDHE_SHA1 = {
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA", "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA", "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
}
RSA_KX = {
    "TLS_RSA_WITH_AES_256_GCM_SHA384", "TLS_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_RSA_WITH_AES_256_CBC_SHA256", "TLS_RSA_WITH_AES_128_CBC_SHA256",
    "TLS_RSA_WITH_AES_256_CBC_SHA", "TLS_RSA_WITH_AES_128_CBC_SHA",
}
ECDSA_SHA2_CBC = {
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384", "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256",
}
RSA_SHA2_CBC = {"TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384", "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256"}
DHE = {
    "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384", "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_DHE_RSA_WITH_AES_256_CBC_SHA", "TLS_DHE_RSA_WITH_AES_128_CBC_SHA",
    "TLS_DHE_DSS_WITH_AES_256_CBC_SHA256", "TLS_DHE_DSS_WITH_AES_128_CBC_SHA256",
    "TLS_DHE_DSS_WITH_AES_256_CBC_SHA", "TLS_DHE_DSS_WITH_AES_128_CBC_SHA",
    "TLS_DHE_DSS_WITH_3DES_EDE_CBC_SHA",
}
TLS13 = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384")

EXPECTED = {
    "AppGwSslPolicy20150501": (
        "TLSv1.0", "TLSv1.2",
        ECDHE_GCM | ECDHE_SHA1 | RSA_KX | ECDSA_SHA2_CBC | RSA_SHA2_CBC
        | {"TLS_RSA_WITH_3DES_EDE_CBC_SHA"},
    ),
    "AppGwSslPolicy20170401": ("TLSv1.1", "TLSv1.2", ECDHE_GCM | ECDHE_SHA1 | RSA_KX
                               | ECDSA_SHA2_CBC),
    "AppGwSslPolicy20170401S": ("TLSv1.2", "TLSv1.2", ECDHE_GCM | ECDHE_SHA1 | RSA_KX
                                | ECDSA_SHA2_CBC),
    "AppGwSslPolicy20220101": ("TLSv1.2", "TLSv1.3", ECDHE_GCM | ECDSA_SHA2_CBC | RSA_SHA2_CBC),
    "AppGwSslPolicy20220101S": ("TLSv1.2", "TLSv1.3", ECDHE_GCM),
}


def test_constants() -> None:
    assert policies.DEFAULT_POLICY == "AppGwSslPolicy20220101S"
    assert policies.PROTOCOLS == ("TLSv1.0", "TLSv1.1", "TLSv1.2", "TLSv1.3")
    assert set(policies.PREDEFINED) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_predefined_policy_matches_the_table(name: str) -> None:
    low, high, suites = EXPECTED[name]
    policy = policies.PREDEFINED[name]
    assert (policy.name, policy.min_protocol, policy.max_protocol) == (name, low, high)
    assert set(policy.cipher_suites) == suites
    assert len(policy.cipher_suites) == len(suites)
    assert not set(policy.cipher_suites) & DHE
    assert policy.tls13_suites == (TLS13 if high == "TLSv1.3" else ())


def test_order_of_the_widest_policy() -> None:
    assert policies.PREDEFINED["AppGwSslPolicy20150501"].cipher_suites == (
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384",
        "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384",
        "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
        "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
        "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256",
        "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
        "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
        "TLS_RSA_WITH_AES_256_GCM_SHA384",
        "TLS_RSA_WITH_AES_128_GCM_SHA256",
        "TLS_RSA_WITH_AES_256_CBC_SHA256",
        "TLS_RSA_WITH_AES_256_CBC_SHA",
        "TLS_RSA_WITH_AES_128_CBC_SHA256",
        "TLS_RSA_WITH_AES_128_CBC_SHA",
        "TLS_RSA_WITH_3DES_EDE_CBC_SHA",
    )


def _group(suite: str) -> int:
    """ECDHE AEAD, ECDHE CBC, RSA AEAD, RSA CBC, 3DES — the documented order."""
    if "3DES" in suite:
        return 4
    return (0 if suite.startswith("TLS_ECDHE_") else 2) + (0 if "_GCM_" in suite else 1)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_order_rule_holds_for_every_policy(name: str) -> None:
    suites = policies.PREDEFINED[name].cipher_suites
    keys = [(_group(s), 0 if "_256_" in s else 1) for s in suites]
    assert keys == sorted(keys)


def test_mapping_covers_every_suite_of_the_table() -> None:
    every = set().union(*(s for _, _, s in EXPECTED.values())) | DHE | set(TLS13)
    assert set(policies.IANA_TO_OPENSSL) == every
    assert policies.IANA_TO_OPENSSL["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"] == (
        "ECDHE-RSA-AES128-GCM-SHA256"
    )
    assert policies.IANA_TO_OPENSSL["TLS_RSA_WITH_3DES_EDE_CBC_SHA"] == "DES-CBC3-SHA"
    assert policies.IANA_TO_OPENSSL["TLS_DHE_DSS_WITH_3DES_EDE_CBC_SHA"] == "DHE-DSS-DES-CBC3-SHA"
    for name in TLS13:
        assert policies.IANA_TO_OPENSSL[name] == name


def _bundled_cipher_names() -> set[str]:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_cipher_list(b"ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    return set(SSL.Connection(context, None).get_cipher_list())


def test_bundled_openssl_knows_the_mapped_names() -> None:
    """Every mapped name is one OpenSSL spells that way — except suites compiled out of
    the bundled library (3DES in OpenSSL ≥ 3 builds), which must then be *absent*
    rather than known under another name."""
    known = _bundled_cipher_names()
    for iana, name in policies.IANA_TO_OPENSSL.items():
        if "3DES" not in iana:
            assert name in known, iana


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
def test_mapping_agrees_with_openssl_stdname() -> None:
    listing = subprocess.run(
        ["openssl", "ciphers", "-stdname", "ALL:COMPLEMENTOFALL:@SECLEVEL=0"],
        capture_output=True, text=True, check=True,
    ).stdout
    standard = {}
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == "-":
            standard[parts[0]] = parts[2]
    for iana, name in policies.IANA_TO_OPENSSL.items():
        if iana in standard:
            assert standard[iana] == name, iana


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_openssl_strings_are_accepted(name: str) -> None:
    policy = policies.PREDEFINED[name]
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_cipher_list(policies.openssl_cipher_string(policy).encode())
    tls13 = policies.openssl_tls13_string(policy)
    if tls13:
        context.set_tls13_ciphersuites(tls13.encode())
    offered = SSL.Connection(context, None).get_cipher_list()
    assert tls13 == ("TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384" if tls13 else "")
    usable = [policies.IANA_TO_OPENSSL[s] for s in policy.cipher_suites
              if not policies.suite_refused(s)]
    assert [c for c in offered if not c.startswith("TLS_")] == usable


def test_cipher_string_is_colon_joined_in_order() -> None:
    policy = policies.PREDEFINED["AppGwSslPolicy20220101S"]
    assert policies.openssl_cipher_string(policy) == (
        "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
        "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"
    )


def test_custom_policy() -> None:
    policy = policies.custom_policy("mine", "TLSv1.1", [
        "TLS_RSA_WITH_AES_128_CBC_SHA",
        "TLS_AES_256_GCM_SHA384",
        "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256",
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    ])
    assert policy == SslPolicy(
        name="mine",
        min_protocol="TLSv1.1",
        max_protocol="TLSv1.3",
        cipher_suites=("TLS_RSA_WITH_AES_128_CBC_SHA", "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"),
        tls13_suites=TLS13,
    )
    assert policies.openssl_tls13_string(policy) == "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384"


@pytest.mark.parametrize(("protocol", "suites"), [("SSLv3", []), ("TLSv1.2", ["TLS_FOO"])])
def test_custom_policy_rejects_unknown_names(protocol: str, suites: list[str]) -> None:
    with pytest.raises(ValueError):
        policies.custom_policy("bad", protocol, suites)


def _refused_by_hand(openssl_name: str) -> bool:
    context = SSL.Context(SSL.TLS_METHOD)
    try:
        context.set_cipher_list(openssl_name.encode())
    except SSL.Error:
        return True
    return openssl_name not in SSL.Connection(context, None).get_cipher_list()


def test_unsupported_detection_agrees_with_the_bundled_openssl() -> None:
    policy = policies.PREDEFINED["AppGwSslPolicy20150501"]
    found = policies.unsupported_by_openssl(policy)
    where = f"is refused by {policies.openssl_label()} at its default security level"
    triple_des = f"suite TLS_RSA_WITH_3DES_EDE_CBC_SHA {where}"
    assert (triple_des in found) == _refused_by_hand("DES-CBC3-SHA")
    for protocol in ("TLSv1.0", "TLSv1.1"):
        assert (f"protocol {protocol} {where}" in found) == policies.protocol_refused(protocol)
    assert not policies.protocol_refused("TLSv1.2")
    assert not policies.protocol_refused("TLSv1.3")
    assert policies.openssl_label().startswith("OpenSSL ")


def test_modern_policies_have_no_findings() -> None:
    for name in ("AppGwSslPolicy20170401S", "AppGwSslPolicy20220101", "AppGwSslPolicy20220101S"):
        assert policies.unsupported_by_openssl(policies.PREDEFINED[name]) == []
