"""Throw-away PKI for live TLS tests, built with :mod:`cryptography`.

Usage::

    pki = TestPKI(tmp_path / "pki")
    leaf = pki.issue(["app.test", "127.0.0.1"])            # signed by pki.ca
    inter = pki.intermediate()                              # optional intermediate CA
    chained = pki.issue(["chained.test"], ca=inter)         # <stem>.pem = leaf + inter
    expired = pki.issue(["old.test"], not_after=past)       # expired leaf
    pinned = pki.self_signed(["pinned.test"])               # trust it by its spki_pin
    rogue = pki.other_ca()                                  # unrelated CA (untrusted chain)
    evil = pki.issue(["app.test"], ca=rogue)

Every certificate is written to disk (``<dir>/<stem>.pem`` holding the leaf then any
intermediates, ``<dir>/<stem>.key`` holding the unencrypted PKCS#8 key) so it can be handed
to gatewayd's configuration, to a backend process or to curl.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CA", "KeyType", "Leaf", "PrivateKey", "TestPKI", "spki_pin_of"]

KeyType = Literal["ec", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

#: Default validity of issued certificates.
DEFAULT_LIFETIME = dt.timedelta(days=30)
#: Certificates start this long before "now" so small clock skews never matter.
BACKDATE = dt.timedelta(hours=1)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key(key_type: KeyType) -> PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key_type {key_type!r} (expected 'ec' or 'rsa')")


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def spki_pin_of(cert: x509.Certificate) -> str:
    """Return ``"sha256/<base64 of SHA-256(SubjectPublicKeyInfo DER)>"`` for *cert*."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256/" + base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


def _general_name(name: str) -> x509.GeneralName:
    """An IP SAN when *name* parses as an IP address, else a DNS SAN."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _validity(
    not_before: dt.datetime | None, not_after: dt.datetime | None
) -> tuple[dt.datetime, dt.datetime]:
    now = _now()
    if not_after is None:
        not_after = now + DEFAULT_LIFETIME
    if not_before is None:
        # Backdated; and always before not_after so that expired leaves are well-formed.
        not_before = min(now - BACKDATE, not_after - dt.timedelta(days=1))
    if not_before.tzinfo is None or not_after.tzinfo is None:
        raise ValueError("not_before/not_after must be timezone-aware datetimes")
    if not_before >= not_after:
        raise ValueError("not_before must be earlier than not_after")
    return not_before, not_after


@dataclass
class CA:
    """A certificate authority (root or intermediate) of a :class:`TestPKI`."""

    name: str
    cert: x509.Certificate
    key: PrivateKey
    #: File holding just this CA's certificate (PEM); for a root, the trust anchor file.
    pem_path: Path
    #: Certificates to send after a leaf issued by this CA: empty for a root; this
    #: intermediate followed by its own parents (excluding the root) otherwise.
    chain: list[x509.Certificate] = field(default_factory=list)

    @property
    def cert_pem(self) -> bytes:
        """This CA certificate as PEM."""
        return _cert_pem(self.cert)

    @property
    def is_root(self) -> bool:
        """True for a self-signed root CA."""
        return not self.chain


@dataclass
class Leaf:
    """An issued end-entity certificate and where it was written."""

    names: list[str]
    #: ``<stem>.pem``: the leaf followed by its intermediates (a server's chain file).
    cert_path: Path
    #: ``<stem>.key``: unencrypted PKCS#8 PEM private key.
    key_path: Path
    chain_pem: bytes
    key_pem: bytes
    #: ``"sha256/<base64>"`` of the SubjectPublicKeyInfo, as used for backend pinning.
    spki_pin: str
    cert: x509.Certificate
    key: PrivateKey
    #: The issuing CA, or None for a self-signed certificate.
    issuer: CA | None = None

    @property
    def cert_pem(self) -> bytes:
        """The leaf certificate alone as PEM."""
        return _cert_pem(self.cert)

    @property
    def sha256_fingerprint(self) -> str:
        """Hex SHA-256 fingerprint of the leaf certificate DER."""
        return self.cert.fingerprint(hashes.SHA256()).hex()


class TestPKI:
    """A directory-backed PKI with one trusted root CA (:attr:`ca`).

    :attr:`ca_pem_path` is the file to trust (``--cacert`` for curl, ``cafile`` for stdlib
    clients, the upstream CA bundle for gatewayd).  Not thread-safe.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, directory: Path | str, *, ca_key_type: KeyType = "ec") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._counter = itertools.count(1)
        self.ca: CA = self._make_root("gatewayd Test Root CA", "ca", ca_key_type)

    # -- public API -------------------------------------------------------------------

    @property
    def ca_pem_path(self) -> Path:
        """PEM file holding the trusted root CA certificate."""
        return self.ca.pem_path

    def other_ca(self, name: str = "Unrelated Test CA", *, key_type: KeyType = "ec") -> CA:
        """Create a second root CA unrelated to :attr:`ca` (for untrusted-chain tests)."""
        return self._make_root(name, self._unique_stem("other-ca"), key_type)

    def intermediate(
        self,
        name: str = "gatewayd Test Intermediate CA",
        *,
        ca: CA | None = None,
        key_type: KeyType = "ec",
    ) -> CA:
        """Create an intermediate CA signed by *ca* (default: the root :attr:`ca`)."""
        parent = ca or self.ca
        key = _new_key(key_type)
        not_before, not_after = _validity(None, parent.cert.not_valid_after_utc)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            self._ca_builder(subject, key, not_before, not_after)
            .issuer_name(parent.cert.subject)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(self._aki(parent.key), critical=False)
            .sign(parent.key, hashes.SHA256())
        )
        stem = self._unique_stem("intermediate")
        pem_path = self.directory / f"{stem}.pem"
        pem_path.write_bytes(_cert_pem(cert))
        self._write_key(self.directory / f"{stem}.key", key)
        return CA(name=name, cert=cert, key=key, pem_path=pem_path, chain=[cert, *parent.chain])

    def issue(
        self,
        names: list[str],
        *,
        key_type: KeyType = "ec",
        not_after: dt.datetime | None = None,
        not_before: dt.datetime | None = None,
        ca: CA | None = None,
        stem: str | None = None,
    ) -> Leaf:
        """Issue a leaf for *names* (DNS names or IP addresses) signed by *ca*.

        *ca* defaults to the trusted root.  A *not_after* in the past gives an expired
        certificate.  Writes ``<stem>.pem`` (leaf then intermediates) and ``<stem>.key``;
        *stem* defaults to a unique name derived from ``names[0]``.
        """
        issuer = ca or self.ca
        return self._leaf(names, key_type, not_before, not_after, issuer, stem)

    def self_signed(
        self,
        names: list[str],
        *,
        key_type: KeyType = "ec",
        not_after: dt.datetime | None = None,
        not_before: dt.datetime | None = None,
        stem: str | None = None,
    ) -> Leaf:
        """A self-signed end-entity certificate (no CA), e.g. for pinned backends."""
        return self._leaf(names, key_type, not_before, not_after, None, stem)

    # -- internals --------------------------------------------------------------------

    def _unique_stem(self, base: str) -> str:
        base = re.sub(r"[^A-Za-z0-9.-]+", "_", base.replace("*", "wildcard")).strip("._")
        base = base or "cert"
        stem = base
        while (self.directory / f"{stem}.pem").exists():
            stem = f"{base}-{next(self._counter)}"
        return stem

    @staticmethod
    def _write_key(path: Path, key: PrivateKey) -> bytes:
        pem = _key_pem(key)
        path.write_bytes(pem)
        path.chmod(0o600)
        return pem

    @staticmethod
    def _aki(issuer_key: PrivateKey) -> x509.AuthorityKeyIdentifier:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())

    @staticmethod
    def _ca_builder(
        subject: x509.Name, key: PrivateKey, not_before: dt.datetime, not_after: dt.datetime
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
        )

    def _make_root(self, name: str, stem: str, key_type: KeyType) -> CA:
        key = _new_key(key_type)
        now = _now()
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gatewayd tests"),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]
        )
        cert = (
            self._ca_builder(subject, key, now - BACKDATE, now + dt.timedelta(days=365))
            .issuer_name(subject)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(self._aki(key), critical=False)
            .sign(key, hashes.SHA256())
        )
        pem_path = self.directory / f"{stem}.pem"
        pem_path.write_bytes(_cert_pem(cert))
        self._write_key(self.directory / f"{stem}.key", key)
        return CA(name=name, cert=cert, key=key, pem_path=pem_path)

    def _leaf(
        self,
        names: list[str],
        key_type: KeyType,
        not_before: dt.datetime | None,
        not_after: dt.datetime | None,
        issuer: CA | None,
        stem: str | None,
    ) -> Leaf:
        if not names:
            raise ValueError("at least one name is required")
        key = _new_key(key_type)
        not_before, not_after = _validity(not_before, not_after)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])])
        signing_key = issuer.key if issuer else key
        key_usage = x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=key_type == "rsa",
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=False,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.cert.subject if issuer else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(key_usage, critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([_general_name(n) for n in names]),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(self._aki(signing_key), critical=False)
            .sign(signing_key, hashes.SHA256())
        )
        stem = self._unique_stem(stem or names[0])
        cert_path = self.directory / f"{stem}.pem"
        key_path = self.directory / f"{stem}.key"
        intermediates = issuer.chain if issuer else []
        chain_pem = b"".join(_cert_pem(c) for c in [cert, *intermediates])
        cert_path.write_bytes(chain_pem)
        key_pem = self._write_key(key_path, key)
        return Leaf(
            names=list(names),
            cert_path=cert_path,
            key_path=key_path,
            chain_pem=chain_pem,
            key_pem=key_pem,
            spki_pin=spki_pin_of(cert),
            cert=cert,
            key=key,
            issuer=issuer,
        )
