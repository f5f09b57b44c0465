"""The one context shape every action, target callable and handler sees."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class RouteContext:
    """What smartroute knows about a connection when it picks a route.

    Fields the connection did not reveal (no SNI, not HTTP, ...) are ``None``.
    """

    port: int
    client_ip: str
    client_port: int
    server_ip: str
    connection_id: str
    timestamp: float
    domain: str | None = None
    path: str | None = None
    query: str | None = None
    method: str | None = None
    headers: Mapping[str, str] | None = None
    is_tls: bool = False
    tls_version: str | None = None
    alpn: tuple[str, ...] | None = None
    route_name: str | None = None
    params: Mapping[str, str] | None = None
    # The protocol named by the first bytes ("tls", "http", a probe's name; see match.protocol)
    protocol: str | None = None
    # The client's verified certificate on a terminated connection with client_ca: subject,
    # issuer (RFC 4514), san (list of str), serial (int), fingerprint_sha256 (hex of the DER)
    client_cert: Mapping[str, Any] | None = None
