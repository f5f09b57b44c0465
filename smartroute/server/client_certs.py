"""Client certificates (mTLS): asking for them on a server context, and what a verified one says.

A terminating route with ``client_ca`` asks every client for a certificate signed by that CA:
``required`` refuses a handshake without one, ``optional`` lets it go on without one. In
both modes a certificate that does not verify fails the handshake (OpenSSL sends the alert
that says why); it is never treated as absent. What a verified certificate says reaches
handlers, target callables and hooks as ``RouteContext.client_cert``.
"""

from __future__ import annotations

import hashlib
import ssl
from typing import Any

from cryptography import x509

from smartroute.routing.model import ClientAuth

__all__ = ["ask_for_client_certificates", "client_cert_info", "peer_certificate"]

_MODES = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL}


def ask_for_client_certificates(
    context: ssl.SSLContext, ca_pem: str, mode: ClientAuth = "required"
) -> None:
    """Make the server ``context`` ask for (``optional``) or demand (``required``) a client
    certificate that ``ca_pem`` (one or more PEM CA certificates) signed.

    Raises ``ssl.SSLError`` or ``ValueError`` when ``ca_pem`` holds no usable certificate.
    """
    context.load_verify_locations(cadata=ca_pem)
    context.verify_mode = _MODES[mode]


def peer_certificate(ssl_object: ssl.SSLObject) -> dict[str, Any] | None:
    """``RouteContext.client_cert`` of a completed handshake: None when the context did not
    ask for a certificate or the client sent none (``optional``)."""
    if ssl_object.context.verify_mode == ssl.CERT_NONE:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return client_cert_info(der) if der else None


def client_cert_info(der: bytes) -> dict[str, Any]:
    """The fields of ``RouteContext.client_cert`` for the DER certificate ``der``: ``subject``
    and ``issuer`` (RFC 4514 strings), ``san`` (DNS names, IP addresses, e-mail addresses
    and URIs, in that order), ``serial`` and ``fingerprint_sha256`` (hex of the DER)."""
    cert = x509.load_der_x509_certificate(der)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san: list[str] = []
    else:
        san = [
            *names.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in names.get_values_for_type(x509.IPAddress)),
            *names.get_values_for_type(x509.RFC822Name),
            *names.get_values_for_type(x509.UniformResourceIdentifier),
        ]
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "san": san,
        "serial": cert.serial_number,
        "fingerprint_sha256": hashlib.sha256(der).hexdigest(),
    }
