"""SPKI pins for backend certificates: compute, print, parse and compare.

A pin is the SHA-256 digest of a certificate's DER-encoded SubjectPublicKeyInfo, the
same value HPKP used (RFC 7469 §2.4) and that `curl --pinnedpubkey` and
`openssl x509 -pubkey | openssl pkey -pubin -outform der | openssl dgst -sha256` print.
Pinning the key rather than the whole certificate lets a backend renew its certificate
with the same key without a config change (CONTRACT §4).

The digest is taken over the SPKI bytes *exactly as they appear in the certificate*
(RFC 5280 §4.1.2.7), not over a re-encoding of the parsed key: a re-encoding can differ
(compressed EC points, explicit curve parameters) and would then never match a pin
computed by other tools.  It also works for key types `cryptography` cannot load.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from cryptography import x509

__all__ = [
    "PIN_PREFIX",
    "format_pin",
    "load_first_certificate",
    "parse_pin",
    "pin_matches",
    "spki_sha256",
]

PIN_PREFIX = "sha256/"
_DIGEST_SIZE = 32

_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
_PEM_END = b"-----END CERTIFICATE-----"

# DER tags (X.690 §8) met while walking to the SPKI inside a TBSCertificate.
_TAG_SEQUENCE = 0x30
_TAG_VERSION = 0xA0  # [0] EXPLICIT Version, context-specific constructed


def _der_header(data: bytes, pos: int) -> tuple[int, int, int]:
    """Parse the DER identifier and length octets at `pos` (X.690 §8.1.2, §8.1.3).

    Returns (tag, start of contents, end of contents).  Only the single-octet tags and
    definite lengths that DER allows are accepted.
    """
    if pos + 2 > len(data):
        raise ValueError("truncated DER element")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise ValueError("unexpected multi-octet DER tag")
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    end = pos + length
    if end > len(data):
        raise ValueError("truncated DER element")
    return tag, pos, end


def _spki_der(tbs: bytes) -> bytes:
    """The SubjectPublicKeyInfo element of a DER TBSCertificate (RFC 5280 §4.1).

    TBSCertificate ::= SEQUENCE { version [0] EXPLICIT OPTIONAL, serialNumber,
    signature, issuer, validity, subject, subjectPublicKeyInfo, ... } — so the SPKI is
    the sixth element after the optional version.
    """
    tag, pos, end = _der_header(tbs, 0)
    if tag != _TAG_SEQUENCE:
        raise ValueError("TBSCertificate is not a SEQUENCE")
    tag, _, next_pos = _der_header(tbs, pos)
    if tag == _TAG_VERSION:
        pos = next_pos
    for _ in range(5):  # serialNumber, signature, issuer, validity, subject
        _, _, pos = _der_header(tbs, pos)
    tag, _, spki_end = _der_header(tbs, pos)
    if tag != _TAG_SEQUENCE or spki_end > end:
        raise ValueError("SubjectPublicKeyInfo not found")
    return tbs[pos:spki_end]


def spki_sha256(cert: x509.Certificate) -> bytes:
    """SHA-256 (32 bytes) of the certificate's SubjectPublicKeyInfo DER (RFC 7469 §2.4)."""
    return hashlib.sha256(_spki_der(cert.tbs_certificate_bytes)).digest()


def format_pin(digest: bytes) -> str:
    """`sha256/<standard base64>` (RFC 4648 §4, padded), as `gatewayd --pin` prints it."""
    if len(digest) != _DIGEST_SIZE:
        raise ValueError(f"a SHA-256 pin is {_DIGEST_SIZE} bytes, got {len(digest)}")
    return PIN_PREFIX + base64.b64encode(digest).decode("ascii")


def parse_pin(text: str) -> bytes:
    """The raw digest of a `sha256/<base64>` pin; ValueError saying what is wrong.

    Only standard, padded base64 (RFC 4648 §4) is accepted, so a pin copied from
    `gatewayd --pin`, curl or an HPKP header works and a mangled one fails loudly
    instead of silently never matching.  Surrounding whitespace is ignored.
    """
    stripped = text.strip()
    if not stripped.startswith(PIN_PREFIX):
        raise ValueError(f"pin {text!r} must start with {PIN_PREFIX!r}")
    encoded = stripped[len(PIN_PREFIX) :]
    try:
        digest = base64.b64decode(encoded.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise ValueError(f"pin {text!r} is not valid standard base64") from None
    if len(digest) != _DIGEST_SIZE:
        raise ValueError(
            f"pin {text!r} decodes to {len(digest)} bytes; a SHA-256 pin is {_DIGEST_SIZE}"
        )
    return digest


def load_first_certificate(data: bytes) -> x509.Certificate:
    """The first certificate of a PEM file (a chain is leaf first) or a DER certificate.

    Any text before the first `BEGIN CERTIFICATE` (comments, a private key) is skipped
    (RFC 7468 §2 allows explanatory text between blocks).
    """
    begin = data.find(_PEM_BEGIN)
    if begin >= 0:
        end = data.find(_PEM_END, begin)
        if end < 0:
            raise ValueError("not a PEM or DER certificate (unterminated PEM block)")
        block = data[begin : end + len(_PEM_END)]
        try:
            return x509.load_pem_x509_certificate(block)
        except ValueError:
            raise ValueError("not a PEM or DER certificate (malformed PEM block)") from None
    try:
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise ValueError("not a PEM or DER certificate") from None


def pin_matches(digest: bytes, allowed: frozenset[bytes]) -> bool:
    """Whether `digest` is one of `allowed`, in time independent of which pin matched.

    Every pin is compared with `hmac.compare_digest` and there is no early exit, so the
    timing reveals neither which pin matched nor how long a prefix did.
    """
    matched = False
    for pin in allowed:
        matched |= hmac.compare_digest(digest, pin)
    return matched
