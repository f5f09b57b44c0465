"""What is known about a connection when it is matched, and whether a route's conditions
other than port and domain hold for it (pure and synchronous; :mod:`.matcher` orders and
indexes the routes)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from smartroute.routing.model import CompiledRoute, MatchCriteria
from smartroute.routing.patterns import IPAddress

NO_PARAMS: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ConnectionFacts:
    """What is known about a connection when it is matched."""

    port: int
    client_ip: IPAddress  # from patterns.parse_ip (IPv4-mapped already unwrapped)
    domain: str | None = None  # SNI (TLS) or Host (HTTP), already normalize_host'ed
    is_tls: bool = False
    tls_version: str | None = None  # the highest version the ClientHello offers ("TLSv1.3")
    alpn: tuple[str, ...] = ()  # offered by the client
    path: str | None = None  # HTTP only, without query
    headers: Mapping[str, str] | None = None  # HTTP only, lower-cased names
    terminated: bool = False  # matched inside a TLS session the proxy terminated
    protocol: str | None = None  # what the first bytes are ("tls", "http", a probe's name)
    # Inside a terminated TLS session: the CA its handshake checked client certificates
    # against (None: it asked for none), and whether the client presented one.
    client_ca: str | None = None
    client_cert: bool = False


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """The winning route and the path params it captured (empty if none)."""

    route: CompiledRoute
    params: Mapping[str, str]


def has_conditions(criteria: MatchCriteria) -> bool:
    """True when something other than port and domain must be checked per connection."""
    return bool(
        criteria.path
        or criteria.client_ip
        or criteria.tls_version
        or criteria.alpn
        or criteria.headers
        or criteria.protocols
    )


def conditions(criteria: MatchCriteria, facts: ConnectionFacts) -> Mapping[str, str] | None:
    """Check everything but port and domain; return the path params, or None on a mismatch."""
    # Plain loops rather than any()/all(): a generator costs more than a rule check here.
    if criteria.protocols and facts.protocol not in criteria.protocols:
        return None
    if criteria.client_ip:
        address = facts.client_ip
        for ip_rule in criteria.client_ip:
            if ip_rule.matches(address):
                break
        else:
            return None
    if criteria.tls_version and facts.tls_version not in criteria.tls_version:
        return None
    if criteria.alpn and criteria.alpn.isdisjoint(facts.alpn):
        return None
    if criteria.headers:
        headers = facts.headers
        if headers is None:
            return None
        for header_rule in criteria.headers:
            if not header_rule.matches(headers):
                return None
    if criteria.path is None:
        return NO_PARAMS
    if facts.path is None:
        return None
    return criteria.path.match(facts.path)
