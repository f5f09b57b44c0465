"""Certificates from the ``certificate_provider`` setting: asked first, kept in memory."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from smartroute.certs.records import StoredCertificate
from smartroute.certs.store import prepare_entry
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
        pair = _provided_pair(domain, result)
        # Checked like a stored one (key pair, names), kept in memory only.
        return prepare_entry([domain], pair.cert_pem, pair.key_pem, source="provider").certificate
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
