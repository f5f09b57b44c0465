"""ACME TLS-ALPN-01 (RFC 8737): the challenge type for the acme library, and the responder.

The CA connects to port 443 of the domain with SNI = the domain and ALPN offering only
``acme-tls/1``; we must negotiate ``acme-tls/1`` and present a self-signed certificate for exactly
that name carrying the critical ``id-pe-acmeIdentifier`` extension, whose value is the SHA-256 of
the key authorization. The proxy reads the ClientHello anyway (it routes by SNI), so it asks
:meth:`TlsAlpnResponder.context_for` first and, when given a context, completes the handshake with
:func:`smartroute.server.tls.accept_tls` and closes: no application data follows (RFC 8737 §3).

acme 5.x dropped its TLS-ALPN-01 classes, so they are defined here and registered in the acme
library's type registries when this module is imported (see :func:`as_tls_alpn01` for challenges
decoded before that).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import ssl
from typing import Any

from acme import challenges
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from josepy.jwk import JWK

from smartroute.routing.model import CertificatePair
from smartroute.routing.patterns import normalize_host
from smartroute.server.tls import build_server_context

__all__ = [
    "ACME_IDENTIFIER_OID",
    "ACME_TLS_ALPN",
    "VALIDITY",
    "TLSALPN01",
    "TLSALPN01Response",
    "TlsAlpnResponder",
    "as_tls_alpn01",
    "validation_certificate",
]

ACME_TLS_ALPN = "acme-tls/1"
"""The ALPN protocol a TLS-ALPN-01 validator offers, alone (RFC 8737 §6.2)."""

ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
"""``id-pe-acmeIdentifier`` (id-pe 31, RFC 8737 §6.1)."""

VALIDITY = datetime.timedelta(days=7)
"""How long a validation certificate is valid; CAs validate within minutes of the answer."""

_TYPE = "tls-alpn-01"
_BACKDATE = datetime.timedelta(hours=1)  # tolerate a validator whose clock is a little behind


@challenges.ChallengeResponse.register
class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """The answer POSTed to the CA: an empty JSON object (the key authorization is not sent)."""

    typ = _TYPE


@challenges.Challenge.register
class TLSALPN01(challenges.KeyAuthorizationChallenge):
    """The ``tls-alpn-01`` challenge; :meth:`validation` is what goes into the certificate."""

    response_cls = TLSALPN01Response
    typ = response_cls.typ

    def validation(self, account_key: JWK, **unused_kwargs: Any) -> str:
        """The key authorization (``token.thumbprint``); the certificate carries its SHA-256."""
        return self.key_authorization(account_key)


def as_tls_alpn01(chall: challenges.Challenge) -> TLSALPN01 | None:
    """``chall`` as a :class:`TLSALPN01`, or None when it is another type.

    Authorizations decoded before this module was imported (or after another library replaced
    the registration) carry an ``UnrecognizedChallenge`` or a foreign class: re-decode its JSON.
    A malformed token raises ``josepy.errors.DeserializationError``, as the acme library would.
    """
    if isinstance(chall, TLSALPN01):
        return chall
    jobj = chall.to_partial_json()
    if jobj.get(chall.type_field_name) != _TYPE:
        return None
    return TLSALPN01(**TLSALPN01.fields_from_json(jobj))


def validation_certificate(domain: str, key_authorization: str) -> tuple[str, str]:
    """A TLS-ALPN-01 certificate and key for ``domain``, as (cert PEM, unencrypted PKCS#8 PEM).

    Self-signed with a fresh P-256 key; the only SAN is ``domain`` (lower-cased, without a
    trailing dot) and the critical acmeIdentifier extension holds the DER OCTET STRING of
    SHA-256(``key_authorization``). Raises ValueError for names that cannot be validated this
    way: IP addresses (RFC 8738 needs an iPAddress SAN), wildcards and non-A-label names.
    """
    name = _dns_name(domain)
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    authorization = b"\x04" + bytes([len(digest)]) + digest  # DER: OCTET STRING (SIZE (32))
    key = ec.generate_private_key(ec.SECP256R1())
    # A CN is not required; give one when it fits (64 characters) so tools show the name.
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, name if len(name) <= 64 else "acme-tls/1")]
    )
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, authorization), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()


def _dns_name(domain: str) -> str:
    name = normalize_host(domain)
    if not name:
        raise ValueError("tls-alpn-01: empty domain")
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        raise ValueError(f"tls-alpn-01: {name!r} is an IP address; only DNS names are supported")
    if "*" in name:
        raise ValueError(f"tls-alpn-01: {name!r}: wildcards are validated on the base domain")
    if not name.isascii():
        raise ValueError(f"tls-alpn-01: {name!r} must be an A-label (xn--...) name")
    return name


class TlsAlpnResponder:
    """Holds the validation certificates of pending TLS-ALPN-01 challenges, by domain.

    :meth:`add` builds the certificate and its server context up front, so answering a
    validator costs a dict lookup. Each call replaces one dict entry in a single step, so the
    ACME worker thread may add and remove while the event loop asks :meth:`context_for`.
    """

    def __init__(self) -> None:
        self._contexts: dict[str, ssl.SSLContext] = {}

    def __bool__(self) -> bool:
        """True while any challenge is pending (the proxy can skip the lookup otherwise)."""
        return bool(self._contexts)

    def __len__(self) -> int:
        return len(self._contexts)

    def __contains__(self, domain: object) -> bool:
        return isinstance(domain, str) and normalize_host(domain) in self._contexts

    def add(self, domain: str, key_authorization: str) -> None:
        """Answer validators for ``domain`` from now on; replaces a pending one for that domain.

        Raises ValueError for a domain :func:`validation_certificate` refuses.
        """
        name = _dns_name(domain)
        cert_pem, key_pem = validation_certificate(name, key_authorization)
        self._contexts[name] = build_server_context(
            CertificatePair(cert_pem, key_pem),
            alpn=(ACME_TLS_ALPN,),
            label=f"tls-alpn-01 certificate for {name!r}",
        )

    def remove(self, domain: str) -> None:
        """Stop answering for ``domain``; unknown domains are ignored."""
        self._contexts.pop(normalize_host(domain), None)

    def context_for(self, sni: str | None, alpn: tuple[str, ...]) -> ssl.SSLContext | None:
        """The context to finish this handshake with, or None to route the connection as usual.

        Only a ClientHello that offers ``acme-tls/1`` for a pending domain gets one; the SNI is
        compared case-insensitively, ignoring a trailing dot.
        """
        if sni is None or ACME_TLS_ALPN not in alpn or not self._contexts:
            return None
        return self._contexts.get(normalize_host(sni))
