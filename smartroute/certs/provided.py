"""Certificates from the ``certificate_provider`` setting: asked first, kept in memory."""

from __future__ import annotations

import datetime
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from smartroute.certs.records import StoredCertificate
from smartroute.routing.model import CertificatePair

log = logging.getLogger("smartroute.certs")

CertificateProvider = Callable[[str], Awaitable[Any]]


async def ask_provider(provider: CertificateProvider, domain: str) -> StoredCertificate | None:
    """The provider's certificate for ``domain``, or None (it has none, or it failed: logged)."""
    try:
        result = provider(domain)
        if inspect.isawaitable(result):
            result = await result
        if result is None:
            return None
        return _provided_entry(domain, _provided_pair(domain, result))
    except Exception as exc:  # a user hook must not stop issuance for other domains
        log.error("certificate_provider failed for %s", domain, exc_info=exc)
        return None


def _provided_pair(domain: str, result: Any) -> CertificatePair:
    if isinstance(result, CertificatePair):
        return result
    if isinstance(result, Mapping) and "cert" in result and "key" in result:
        return CertificatePair(str(result["cert"]), str(result["key"]))
    if isinstance(result, tuple) and len(result) == 2:
        return CertificatePair(str(result[0]), str(result[1]))
    raise TypeError(
        f"certificate_provider({domain!r}) returned {type(result).__name__}; expected None, "
        "(cert_pem, key_pem) or {'cert': ..., 'key': ...}"
    )


def _provided_entry(domain: str, pair: CertificatePair) -> StoredCertificate:
    """Describe a provider's certificate like a stored one (it is kept in memory only)."""
    leaf = x509.load_pem_x509_certificate(pair.cert_pem.encode())
    key = serialization.load_pem_private_key(pair.key_pem.encode(), password=None)
    if key.public_key().public_numbers() != leaf.public_key().public_numbers():  # type: ignore[union-attr]
        raise ValueError(f"the provider's key for {domain} does not match its certificate")
    return StoredCertificate.describe(
        (domain,),
        pair.cert_pem,
        pair.key_pem,
        leaf,
        "provider",
        datetime.datetime.now(datetime.UTC),
    )
