"""Routes that can never win: :func:`shadowed` reports only what it can prove.

A route is shadowed when it can never match given how the engine builds its facts, or when,
on each of its ports, another route matches everything it matches and ranks first for every
input. A route whose hooks may decline never shadows another; one whose targets may go down
shadows only while they are up (a fallback, reported as such).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from smartroute.routing.explain import (
    _ACCEPTS,
    _ANY,
    _TLS,
    _declines,
    _layer,
    _listing,
    _may_go_down,
    _watched_targets,
)
from smartroute.routing.matcher import path_rank, specificity
from smartroute.routing.model import CompiledRoute
from smartroute.routing.patterns import (
    DomainPattern,
    HeaderRule,
    IpRule,
    PathPattern,
)

__all__ = ["Shadowing", "shadowed"]


# -- shadowing ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shadowing:
    """A route that can never win, and why. ``by``: per shadowing route, the ports on which
    it takes every connection the route would match (empty when the route can never match at
    all). ``while_up``: shadowing routes whose targets can go down; the route then wins while
    none of their targets is up (a fallback), so it is shadowed only while they are up."""

    route: str
    by: tuple[tuple[str, tuple[int, ...]], ...]
    reason: str
    while_up: tuple[str, ...] = ()

    @property
    def proven(self) -> bool:
        """True when the route can never win whatever the targets' health."""
        return not self.while_up

    def text(self) -> str:
        if self.proven:
            return f"route {self.route!r} can never win: {self.reason}"
        names = " and ".join(repr(name) for name in self.while_up)
        return (
            f"route {self.route!r} wins only while no target of {names} is up (a fallback):"
            f" {self.reason}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "route": self.route,
            "by": {name: list(ports) for name, ports in self.by},
            "reason": self.reason,
            "while_up": list(self.while_up),
            "proven": self.proven,
        }


def shadowed(
    routes: Sequence[CompiledRoute], hooked: Callable[[CompiledRoute], bool] | None = None
) -> list[Shadowing]:
    """The enabled routes that can never win, each with a reason; never a route that could.

    Proven, and so reported:

    - a route that can never match: a passthrough route with a path or header condition (it
      never sees a request), a route with a ``tls`` block that needs a protocol other than
      ``tls``, a route without one that needs a request (path, headers) and a TLS version,
      ALPN, or a protocol other than ``http``;
    - a route each of whose ports has a *shadowing* route: one that matches every input the
      route matches (each condition of it is implied by the route's conditions, and it serves
      every TLS layer the route serves) and ranks first for every such input: a higher
      priority, or the same priority, every domain pattern of the route among its own, and a
      more specific path, a named protocol, or an earlier definition. Exact duplicates and
      routes under a catch-all of higher priority are the common cases.

    A route with hooks that may decline (its own, or proxy-wide ones: ``hooked``) never
    shadows: a hook's fallback hands the connection on. A route whose targets can go down
    (health checks or passive health) shadows only while one of them is up: such findings
    carry ``while_up`` and are fallbacks, often on purpose. Only single routes are checked
    as shadows (not several that together cover a route), and targets changed at runtime
    (``set_targets``) are not foreseen.
    """
    live = [route for route in routes if route.enabled]
    watched = _watched_targets(routes)
    rivals = _Rivals(live)
    found: list[Shadowing] = []
    for route in live:
        never = _never_matches(route)
        if never is not None:
            found.append(Shadowing(route.name, (), f"it can never match: {never}"))
            continue
        covers: list[tuple[bool, tuple[int, int], CompiledRoute, str]] = []
        for other in rivals.of(route):
            if other is route or other.match.ports.isdisjoint(route.match.ports):
                continue
            why = _covers(other, route)
            if why is None or _declines(other, hooked):
                continue
            gated = _may_go_down(other, watched)
            covers.append((gated, (-other.priority, other.index), other, why))
        covers.sort(key=lambda entry: entry[:2])
        left = set(route.match.ports)
        chosen: list[tuple[CompiledRoute, tuple[int, ...], str, bool]] = []
        for gated, _, other, why in covers:
            got = left & other.match.ports
            if got:
                chosen.append((other, tuple(sorted(got)), why, gated))
                left -= got
            if not left:
                break
        if left:
            continue
        by = tuple((other.name, ports) for other, ports, _, _ in chosen)
        reason = "; ".join(
            f"{why} (port{'s' * (len(ports) > 1)} {_ports(ports)})" for _, ports, why, _ in chosen
        )
        while_up = tuple(other.name for other, _, _, gated in chosen if gated)
        found.append(Shadowing(route.name, by, reason, while_up))
    return found


class _Rivals:
    """The routes that may shadow a route, found by its first domain pattern: a shadow has
    no domains or a pattern covering that one (the same exact name, or a wildcard over it),
    so that checking a large route set does not compare every pair."""

    def __init__(self, routes: Iterable[CompiledRoute]) -> None:
        self.no_domain: list[CompiledRoute] = []
        self.exact: dict[str, list[CompiledRoute]] = {}
        self.wildcard: dict[str, list[CompiledRoute]] = {}  # by suffix ("" for "*")
        for route in routes:
            if not route.match.domains:
                self.no_domain.append(route)
            for pattern in route.match.domains:
                if pattern.exact:
                    self.exact.setdefault(pattern.text, []).append(route)
                else:
                    self.wildcard.setdefault(pattern.suffix, []).append(route)

    def of(self, route: CompiledRoute) -> list[CompiledRoute]:
        domains = route.match.domains
        if not domains:
            return self.no_domain  # a route with domains never takes a connection without
        first = domains[0]
        found = {id(r): r for r in self.no_domain}
        if first.exact:
            name = first.text
            found.update((id(r), r) for r in self.exact.get(name, ()))
        else:
            name = first.suffix
            found.update((id(r), r) for r in self.wildcard.get(name, ()))
        dot = name.find(".")
        while dot >= 0:  # wildcards over a shorter suffix
            found.update((id(r), r) for r in self.wildcard.get(name[dot + 1 :], ()))
            dot = name.find(".", dot + 1)
        if name:
            found.update((id(r), r) for r in self.wildcard.get("", ()))
        return list(found.values())


def _ports(ports: tuple[int, ...]) -> str:
    """``80, 443, 9000-9005``."""
    spans: list[str] = []
    start = previous = ports[0]
    for port in (*ports[1:], None):
        if port is not None and port == previous + 1:
            previous = port
            continue
        spans.append(str(start) if start == previous else f"{start}-{previous}")
        if port is not None:
            start = previous = port
    return ", ".join(spans)


def _never_matches(route: CompiledRoute) -> str | None:
    """Why no connection or request the engine routes can match ``route``, if so.

    The engine's facts: a TLS connection by its ClientHello (protocol ``tls``, no request),
    a request inside a terminated session (protocol ``tls``), a plain HTTP request (protocol
    ``http``, no TLS version or ALPN), or other first bytes (no request).
    """
    criteria = route.match
    layer = _layer(route)
    request = criteria.path is not None or bool(criteria.headers)
    protocols = criteria.protocols
    if layer == _TLS and request:
        return "it passes TLS through undecrypted, so it never sees a request's path or headers"
    if layer != _ANY and protocols and "tls" not in protocols:
        names = _listing(sorted(protocols))
        return f"it takes TLS connections only (protocol tls), yet names {names}"
    if layer == _ANY and request:
        if protocols and "http" not in protocols:
            return f"a plain request is protocol http, yet it names {_listing(sorted(protocols))}"
        if criteria.tls_version or criteria.alpn:
            return "a request outside TLS has no TLS version or ALPN, yet it needs them"
    return None


def _covers(shadow: CompiledRoute, route: CompiledRoute) -> str | None:
    """Why ``shadow`` takes every input ``route`` matches (on their common ports), if it
    provably does; None when that is not proven."""
    if shadow.priority < route.priority:
        return None
    if not _ACCEPTS[_layer(route)] <= _ACCEPTS[_layer(shadow)]:
        return None
    mine, theirs = shadow.match, route.match
    first = (specificity(mine), shadow.index)
    second = (specificity(theirs), route.index)
    if shadow.priority == route.priority:
        # Every pattern of the route among the shadow's: the shadow's best domain class is
        # at least as good for every name the route takes; then the rest of the key decides.
        if not set(theirs.domains) <= set(mine.domains) or (mine.domains and not theirs.domains):
            return None
        if first >= second:
            return None
    elif not _domains_cover(mine.domains, theirs.domains):
        return None
    if not (
        _path_covers(mine.path, theirs.path)
        and _ips_cover(mine.client_ip, theirs.client_ip)
        and _set_covers(mine.tls_version, theirs.tls_version)
        and _set_covers(mine.alpn, theirs.alpn)
        and _set_covers(mine.protocols, theirs.protocols)
        and all(any(_header_covers(a, b) for b in theirs.headers) for a in mine.headers)
    ):
        return None
    name = repr(shadow.name)
    same = replace(theirs, ports=mine.ports) == mine and _layer(shadow) == _layer(route)
    if shadow.priority > route.priority:
        rank = f"has a higher priority ({shadow.priority} > {route.priority})"
    elif path_rank(mine.path) != path_rank(theirs.path):
        rank = "has a more specific path"
    elif first[0] != second[0]:
        rank = "names a protocol"
    else:
        rank = "comes first in definition order"
    if same:
        return f"{name} has the same match and {rank}"
    return f"{name} matches everything it matches and {rank}"


def _domains_cover(mine: tuple[DomainPattern, ...], theirs: tuple[DomainPattern, ...]) -> bool:
    if not mine:
        return True
    return bool(theirs) and all(any(_domain_covers(a, b) for a in mine) for b in theirs)


def _domain_covers(a: DomainPattern, b: DomainPattern) -> bool:
    """Every name ``b`` matches, ``a`` matches."""
    if a.exact:
        return b.exact and a.text == b.text
    if not a.suffix:
        return True
    if b.exact:
        return b.text.endswith("." + a.suffix)
    return bool(b.suffix) and (b.suffix == a.suffix or b.suffix.endswith("." + a.suffix))


def _path_covers(a: PathPattern | None, b: PathPattern | None) -> bool:
    """Every path ``b`` matches, ``a`` matches."""
    if a is None:
        return True
    if b is None:
        return False
    if a.text == b.text:
        return True
    if b.kind == "exact":
        return a.match(b.text) is not None
    prefix = a.literal_prefix
    if a.kind != "glob" or a.text != prefix + "*" or not b.literal_prefix.startswith(prefix):
        return False
    # "/api/*" also takes "/api": a pattern starting so matches its bare prefix.
    if b.text.endswith("/*") and b.literal_prefix == b.text[:-1] and len(b.text) > 2:
        return a.match(b.text[:-2]) is not None
    return True


def _ips_cover(mine: tuple[IpRule, ...], theirs: tuple[IpRule, ...]) -> bool:
    if not mine or any(rule.text == "*" for rule in mine):
        return True
    return bool(theirs) and all(any(_ip_covers(a, b) for a in mine) for b in theirs)


def _ip_covers(a: IpRule, b: IpRule) -> bool:
    """Every address ``b`` matches, ``a`` matches (``a`` is not ``*``)."""
    if b.text == "*":
        return False
    if a.network is not None and b.network is not None:
        if a.network.version != b.network.version:
            return False
        return b.network.subnet_of(a.network)  # type: ignore[arg-type]
    if a.octets is not None and b.octets is not None:
        return all(x is None or x == y for x, y in zip(a.octets, b.octets, strict=True))
    if a.octets is not None and isinstance(b.network, ipaddress.IPv4Network):
        packed = b.network.network_address.packed
        fixed = b.network.prefixlen // 8  # whole octets the network fixes
        return all(x is None or (i < fixed and x == packed[i]) for i, x in enumerate(a.octets))
    if isinstance(a.network, ipaddress.IPv4Network) and b.octets is not None:
        needed = -(-a.network.prefixlen // 8)  # octets the network's prefix touches
        if any(octet is None for octet in b.octets[:needed]):
            return False
        sample = ipaddress.IPv4Address(bytes(octet or 0 for octet in b.octets))
        return sample in a.network
    return False


def _set_covers(mine: frozenset[str], theirs: frozenset[str]) -> bool:
    return not mine or (bool(theirs) and theirs <= mine)


def _header_covers(a: HeaderRule, b: HeaderRule) -> bool:
    """Every request ``b`` accepts, ``a`` accepts."""
    if a.name != b.name:
        return False
    if a.value == b.value:
        return True
    return a.regex is not None and b.regex is None and a.regex.fullmatch(b.value) is not None
