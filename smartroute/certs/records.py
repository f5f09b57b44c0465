"""Certificates as values: the record of a stored certificate, and the PEM checks behind it.

A chain and key become a :class:`StoredCertificate` only after they pass these checks (the
chain parses, the key is an unencrypted private key matching the leaf, the leaf's SAN covers
every domain). Errors never quote key material.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from smartroute.errors import CertificateStoreError
from smartroute.routing.model import CertificatePair

_UTC = datetime.UTC


@dataclass(frozen=True, slots=True)
class StoredCertificate:
    """One stored certificate: its chain, its key and what the store knows about it."""

    domains: tuple[str, ...]  # sorted, lower-case
    cert_pem: str  # leaf first, then the chain
    key_pem: str = field(repr=False)  # never in logs or reprs
    not_before: datetime.datetime  # aware, UTC; from the leaf
    not_after: datetime.datetime
    issuer: str  # RFC 4514 string of the leaf's issuer
    source: str  # "acme", "provider", ...
    stored_at: datetime.datetime
    cert_path: str | None = None
    key_path: str | None = None

    @classmethod
    def describe(
        cls,
        domains: tuple[str, ...],
        cert_pem: str,
        key_pem: str,
        leaf: x509.Certificate,
        source: str,
        stored_at: datetime.datetime,
        files: tuple[Path, Path] | None = None,
    ) -> StoredCertificate:
        """The entry for a parsed leaf; ``files`` are its cert and key files (None: memory only)."""
        return cls(
            domains=domains,
            cert_pem=cert_pem,
            key_pem=key_pem,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            issuer=leaf.issuer.rfc4514_string(),
            source=source,
            stored_at=stored_at,
            cert_path=None if files is None else str(files[0]),
            key_path=None if files is None else str(files[1]),
        )

    @property
    def pair(self) -> CertificatePair:
        """What the TLS layer serves."""
        return CertificatePair(self.cert_pem, self.key_pem, self.cert_path, self.key_path)

    def remaining(self, now: datetime.datetime | None = None) -> datetime.timedelta:
        """Time left until ``not_after`` (negative once expired); ``now`` must be aware."""
        return self.not_after - (now if now is not None else datetime.datetime.now(_UTC))

    @property
    def lifetime(self) -> datetime.timedelta:
        return self.not_after - self.not_before


@dataclass(frozen=True, slots=True)
class StoreProblem:
    """An entry that ``load`` skipped: its folder name and why."""

    name: str
    reason: str


def normalize_domains(domains: Sequence[str]) -> tuple[str, ...]:
    """Lower-case, de-duplicated, sorted; raises CertificateStoreError for an empty set."""
    if isinstance(domains, str):
        domains = [domains]
    result = tuple(sorted({d.lower() for d in domains}))
    if not result or not all(result):
        raise CertificateStoreError("a certificate needs at least one non-empty domain")
    return result


# -- PEM checks ---------------------------------------------------------------------------------


def parse_chain(cert_pem: str) -> x509.Certificate:
    """The leaf (first) certificate of a PEM chain."""
    if "PRIVATE KEY" in cert_pem:  # never let a key land in the world-readable cert.pem
        raise CertificateStoreError("the certificate chain contains a private key")
    try:
        chain = x509.load_pem_x509_certificates(cert_pem.encode())
    except ValueError:
        raise CertificateStoreError("the certificate is not a valid PEM certificate") from None
    return chain[0]


def parse_key(key_pem: str, what: str) -> PrivateKeyTypes:
    """The private key of ``key_pem``; ``what`` names it in the error."""
    # The library's messages do not quote the key, but nothing of it may leak: drop the cause.
    try:
        return serialization.load_pem_private_key(key_pem.encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CertificateStoreError(
            f"{what} is not an unencrypted PEM private key that can be read"
        ) from None


def same_public_key(key: PrivateKeyTypes, leaf: x509.Certificate) -> bool:
    """Whether ``key`` is the private half of the leaf's public key."""
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(*spki) == leaf.public_key().public_bytes(*spki)


def dns_names(leaf: x509.Certificate) -> set[str]:
    """The leaf's SAN DNS names, lower-case."""
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return set()
    return {name.lower() for name in san.value.get_values_for_type(x509.DNSName)}


def uncovered(domains: Sequence[str], leaf: x509.Certificate) -> list[str]:
    """The domains the leaf's SAN DNS names do not cover (exactly or by a wildcard)."""
    sans = dns_names(leaf)
    missing = []
    for domain in domains:
        head, _, rest = domain.partition(".")
        if domain not in sans and not (rest and head != "*" and f"*.{rest}" in sans):
            missing.append(domain)
    return missing
