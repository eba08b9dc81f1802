"""SPKI pins: digests of real certificates, the printed form, parsing, comparison."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gatewayd.pins import (
    format_pin,
    load_first_certificate,
    parse_pin,
    pin_matches,
    spki_sha256,
)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def leaf(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("backend.example.test")


def _reencoded_spki_sha256(cert: x509.Certificate) -> bytes:
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


def test_spki_sha256_matches_public_key_der(leaf: trustme.LeafCert) -> None:
    cert = load_first_certificate(leaf.cert_chain_pems[0].bytes())
    digest = spki_sha256(cert)
    assert len(digest) == 32
    assert digest == _reencoded_spki_sha256(cert)


def test_spki_sha256_rsa_and_v1_style_certificates() -> None:
    rsa_ca = trustme.CA(key_type=trustme.KeyType.RSA)
    cert = load_first_certificate(rsa_ca.cert_pem.bytes())
    assert spki_sha256(cert) == _reencoded_spki_sha256(cert)

    # A v1 certificate has no [0] version element; the walk must not depend on it.
    v1 = load_first_certificate(_as_v1(leaf_der()))
    assert v1.version is x509.Version.v1
    assert spki_sha256(v1) == _reencoded_spki_sha256(v1)


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + content


def _elements(der: bytes) -> list[bytes]:
    """The encoded children of the outer SEQUENCE in `der`."""
    from gatewayd.pins import _der_header

    _, pos, end = _der_header(der, 0)
    out = []
    while pos < end:
        _, _, stop = _der_header(der, pos)
        out.append(der[pos:stop])
        pos = stop
    return out


def leaf_der() -> bytes:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "v1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def _as_v1(der: bytes) -> bytes:
    """Drop the version and extensions from a certificate (the signature is not
    checked by parsing, so it may stay)."""
    tbs, algorithm, signature = _elements(der)
    fields = [f for f in _elements(tbs) if f[0] not in (0xA0, 0xA3)]
    return _der(0x30, _der(0x30, b"".join(fields)) + algorithm + signature)


def test_different_keys_give_different_pins(ca: trustme.CA, leaf: trustme.LeafCert) -> None:
    other = ca.issue_cert("other.example.test")
    a = spki_sha256(load_first_certificate(leaf.cert_chain_pems[0].bytes()))
    b = spki_sha256(load_first_certificate(other.cert_chain_pems[0].bytes()))
    assert a != b


def test_format_and_parse_round_trip(leaf: trustme.LeafCert) -> None:
    digest = spki_sha256(load_first_certificate(leaf.cert_chain_pems[0].bytes()))
    text = format_pin(digest)
    assert text == "sha256/" + base64.b64encode(digest).decode()
    assert len(text) == len("sha256/") + 44
    assert parse_pin(text) == digest
    assert parse_pin(f"  {text}\n") == digest


def test_format_pin_rejects_wrong_length() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        format_pin(b"x" * 20)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "must start with 'sha256/'"),
        ("sha1/" + base64.b64encode(b"x" * 20).decode(), "must start with 'sha256/'"),
        ("SHA256/" + base64.b64encode(b"x" * 32).decode(), "must start with 'sha256/'"),
        (base64.b64encode(b"x" * 32).decode(), "must start with 'sha256/'"),
        ("sha256/" + base64.b64encode(b"x" * 31).decode(), "decodes to 31 bytes"),
        ("sha256/" + base64.b64encode(b"x" * 33).decode(), "decodes to 33 bytes"),
        ("sha256/" + base64.urlsafe_b64encode(b"\xff" * 32).decode(), "not valid standard"),
        ("sha256/" + base64.b64encode(b"x" * 32).decode().rstrip("="), "not valid standard"),
        ("sha256/not base64!", "not valid standard"),
        ("sha256/ä" + "A" * 43, "not valid standard"),
    ],
)
def test_parse_pin_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_pin(text)


def test_load_pem_chain_returns_leaf(leaf: trustme.LeafCert) -> None:
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    cert = load_first_certificate(chain)
    assert cert == x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())


def test_load_pem_after_key_and_comments(leaf: trustme.LeafCert) -> None:
    data = b"# backend cert\n" + leaf.private_key_pem.bytes() + leaf.cert_chain_pems[0].bytes()
    cert = load_first_certificate(data)
    assert cert == x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())


def test_load_der(leaf: trustme.LeafCert) -> None:
    pem_cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    der = pem_cert.public_bytes(serialization.Encoding.DER)
    assert load_first_certificate(der) == pem_cert


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n",
        b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        b"\x30\x03\x02\x01\x01",
    ],
)
def test_load_rejects_non_certificates(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"^not a PEM or DER certificate"):
        load_first_certificate(data)


def test_pin_matches() -> None:
    a, b, c = (hashlib.sha256(x).digest() for x in (b"a", b"b", b"c"))
    assert pin_matches(a, frozenset({a}))
    assert pin_matches(b, frozenset({a, b, c}))
    assert not pin_matches(c, frozenset({a, b}))
    assert not pin_matches(a, frozenset())
    assert not pin_matches(a[:31], frozenset({a}))


def test_pin_matches_compares_every_pin(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = hmac.compare_digest

    def counting(x: bytes, y: bytes) -> bool:
        calls.append(y)
        return real(x, y)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    allowed = frozenset(hashlib.sha256(bytes([i])).digest() for i in range(5))
    first = next(iter(allowed))
    assert pin_matches(first, allowed)
    assert len(calls) == 5
