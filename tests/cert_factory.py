"""Certificates and keys for the certificate store and storage tests, made with cryptography."""

from __future__ import annotations

import datetime
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from support import CertPair, TestCA

UTC = datetime.UTC
DIRECTORY = "https://acme.example/directory"


def issue(
    ca: TestCA,
    *names: str,
    key_type: Literal["ec", "rsa"] = "ec",
    days: tuple[int, int] = (-1, 7),
    chain: bool = True,
) -> CertPair:
    """A leaf for ``names`` signed by the test CA, with the CA appended as its chain."""
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    key = (
        rsa.generate_private_key(65537, 2048)
        if key_type == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    now = datetime.datetime.now(UTC).replace(microsecond=0)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=days[0]))
        .not_valid_after(now + datetime.timedelta(days=days[1]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .sign(ca.key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return CertPair(cert_pem + (ca.pem if chain else ""), key_pem)


def account_key() -> str:
    """A fresh EC P-256 account key, PEM."""
    return (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
