"""Certificate and key checks for the config loader.

Every function either returns a value or raises `FileProblem` whose message is ready to
print after ``FILE:LINE: key:``.  They name files as the operator wrote them (`shown`),
because that is what they will search their config for.  All checks happen at load so
that ``--check`` catches what would otherwise fail only when a worker builds its TLS
context (or, worse, when the first client connects).
"""

from __future__ import annotations

import datetime
import errno
import itertools

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)

from gatewayd import pins

PIN_PREFIX = "sha256/"


class FileProblem(Exception):
    """A file or its contents is unusable; `str()` is the message for the operator."""


def read_file(path: str, shown: str) -> bytes:
    """The bytes of `path` (absolute); `shown` is the path as written in the config."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise FileProblem(f"no such file {shown!r}") from None
    except PermissionError:
        raise FileProblem(f"permission denied reading {shown!r}") from None
    except IsADirectoryError:
        raise FileProblem(f"{shown!r} is a directory, not a file") from None
    except ValueError:  # open() refuses a path with a NUL byte
        raise FileProblem(f"invalid file name {shown!r}") from None
    except OSError as exc:
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, "error")
        raise FileProblem(f"cannot read {shown!r}: {reason}") from None


def load_pem_chain(data: bytes, shown: str) -> list[x509.Certificate]:
    """All certificates of a PEM file, in file order (at least one)."""
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise FileProblem(f"{shown!r} is not a PEM certificate file") from None
    if not chain:
        raise FileProblem(f"{shown!r} is not a PEM certificate file")
    return chain


def load_any_certificate(data: bytes, shown: str) -> x509.Certificate:
    """The first certificate of a PEM file, or a DER certificate (as `--pin` accepts)."""
    if b"-----BEGIN" in data:
        return load_pem_chain(data, shown)[0]
    try:
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise FileProblem(f"{shown!r} is not a certificate (PEM or DER)") from None


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def check_leaf_first(chain: list[x509.Certificate], shown: str) -> None:
    """Each certificate must be issued by the next one (RFC 8446 §4.4.2: sender's
    certificate first, each following one certifying the one before)."""
    for position, (cert, issuer) in enumerate(itertools.pairwise(chain), start=1):
        if cert.issuer != issuer.subject:
            raise FileProblem(
                f"chain in {shown!r} is not leaf first: certificate {position} "
                f"({_subject(cert)}) is not issued by certificate {position + 1} "
                f"({_subject(issuer)})"
            )


def load_private_key(data: bytes, shown: str) -> PrivateKeyTypes:
    """An unencrypted PEM private key (workers start unattended: no passphrase prompt)."""
    try:
        return load_pem_private_key(data, password=None)
    except TypeError:
        raise FileProblem(
            f"private key {shown!r} is encrypted; gatewayd needs it unencrypted"
        ) from None
    except ValueError:
        raise FileProblem(f"{shown!r} is not a PEM private key") from None
    except Exception:  # cryptography.exceptions.UnsupportedAlgorithm and friends
        raise FileProblem(f"{shown!r} holds a private key type that is not supported") from None


def _spki_der(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    )


def check_key_matches(key: PrivateKeyTypes, cert: x509.Certificate, key_shown: str,
                      cert_shown: str) -> None:
    """The key must be the certificate's: OpenSSL would refuse it only in the worker."""
    if _spki_der(key.public_key()) != _spki_der(cert.public_key()):
        raise FileProblem(f"private key {key_shown!r} does not match certificate {cert_shown!r}")


def parse_pin(text: str) -> bytes:
    """The 32 raw bytes of a ``sha256/<base64>`` pin (one parser: `gatewayd.pins`)."""
    try:
        return pins.parse_pin(text)
    except ValueError as exc:
        raise FileProblem(str(exc)) from None


def not_after(cert: x509.Certificate) -> datetime.datetime:
    """The certificate's notAfter as an aware UTC datetime."""
    return cert.not_valid_after_utc


def to_pem(cert: x509.Certificate) -> bytes:
    """Re-encoded PEM, so concatenated bundles never depend on a file's final newline."""
    return cert.public_bytes(Encoding.PEM)
