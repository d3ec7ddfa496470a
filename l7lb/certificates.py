# -*- test-case-name: tests.test_tls -*-
"""
Certificate files as l7lb reads them: a chain and its key in one PEM file
(HAProxy's habit), checked to belong together, with the names they serve;
and CA bundles for verifying backends.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID

EXPIRY_WARNING = datetime.timedelta(days=14)


@dataclass(frozen=True)
class CertificateFile:
    """
    A PEM file's certificate chain and key, checked to belong together, and
    the host names it serves.
    """

    path: str
    chain: tuple[x509.Certificate, ...]
    key: PrivateKeyTypes
    names: tuple[str, ...]

    @property
    def not_after(self) -> datetime.datetime:
        return self.chain[0].not_valid_after_utc


def load_certificate_file(path: str) -> CertificateFile:
    """
    Read a PEM file holding a certificate chain and its private key.

    @raise ValueError: with a message fit for the configuration error line.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    try:
        chain = tuple(x509.load_pem_x509_certificates(data))
    except ValueError:
        raise ValueError(f"{path} holds no PEM certificate") from None
    if b"PRIVATE KEY-----" not in data:
        raise ValueError(
            f"{path} holds no private key (a chain and its key belong in one file)"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ValueError(f"the private key in {path} is encrypted") from None
    except ValueError as e:
        raise ValueError(f"cannot read the private key in {path}: {e}") from None
    if _public_bytes(key.public_key()) != _public_bytes(chain[0].public_key()):
        raise ValueError(
            f"the private key in {path} does not match its first certificate"
        )
    return CertificateFile(path, chain, key, _names(chain[0]))


def _public_bytes(key: Any) -> bytes:
    data: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def _names(certificate: x509.Certificate) -> tuple[str, ...]:
    """
    The DNS names a certificate serves: its subjectAltNames, else its CN.
    """
    try:
        extension = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
    except x509.ExtensionNotFound:
        names = [
            str(attribute.value)
            for attribute in certificate.subject.get_attributes_for_oid(
                NameOID.COMMON_NAME
            )
        ]
    else:
        names = extension.value.get_values_for_type(x509.DNSName)
    return tuple(name.lower().rstrip(".") for name in names)


def expiry_warnings(
    files: Sequence[CertificateFile], now: datetime.datetime
) -> list[str]:
    """
    A line for each certificate that has expired or expires within 14 days.
    """
    warnings = []
    for certificate in files:
        left = certificate.not_after - now
        if left < datetime.timedelta(0):
            expired = f"{certificate.not_after:%Y-%m-%d}"
            warnings.append(f"certificate {certificate.path} expired on {expired}")
        elif left < EXPIRY_WARNING:
            warnings.append(
                f"certificate {certificate.path} expires on "
                f"{certificate.not_after:%Y-%m-%d}, in {left.days} days"
            )
    return warnings


def load_ca_certificates(path: str) -> list[x509.Certificate]:
    """
    The certificates of a PEM CA bundle.

    @raise ValueError: when the file cannot be read or holds no certificate.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"{path} holds no PEM certificate") from None
